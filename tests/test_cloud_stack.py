"""The assembled local stack end to end: an OTA job is signed in SoftHSM2 with the key the
node trusts, served over HTTPS, and announced on ``otaurl`` — checked with espsecure."""

from __future__ import annotations

import base64
import json
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from rig.cloud.stack import LocalStack
from rig.cloud.store import Role
from rig.espressif_tools import run_tool
from rig.firmware.image import build_app_image
from rig.firmware.secure_boot_v2 import parse_signature_sector, split_signed_image
from tests.cloud_fixtures import MqttProbe, tls_context
from tests.firmware_samples import DESC


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with LocalStack(tmp_path_factory.mktemp("stack"), test_mode=True) as s:
        yield s


def node_probe(stack: LocalStack, node_id: str) -> MqttProbe:
    pair = stack.pki.node_cert(node_id)
    ep = stack.endpoints
    probe = MqttProbe(ep.mqtt_host, ep.mqtt_port, tls_context(stack.pki.ca_cert_path, pair), node_id)
    assert probe.connect().accepted
    return probe


def owner_client(stack: LocalStack, node_id: str) -> httpx.Client:
    email = f"owner-{node_id}@rig.test"
    user_id = stack.add_user(email, "owner-password-1")
    assert stack.store is not None
    stack.store.map_node(node_id, user_id, Role.PRIMARY, stack.clock.now())
    verify = ssl.create_default_context(cafile=stack.endpoints.ca_cert)
    client = httpx.Client(base_url=stack.endpoints.api_url, verify=verify, timeout=30)
    token = client.post("/v1/login2", json={"user_name": email, "password": "owner-password-1"}).json()["accesstoken"]
    client.headers["Authorization"] = token
    return client


def report_config(stack: LocalStack, probe: MqttProbe, node_id: str, digests: dict[str, str | None]) -> None:
    assert stack.mqtt is not None
    mark = stack.mqtt.mark()
    config = {"node_id": node_id, "config_version": "2020-03-20", "info": {"name": "n", "fw_version": "1.4.2",
              "type": "t", "project_name": DESC.project_name, "platform": "esp32c3", "secure_boot_digest": digests},
              "devices": []}  # fmt: skip
    probe.publish(f"$aws/rules/esp_node_config/node/{node_id}/config", json.dumps(config).encode())
    stack.mqtt.wait_handled(node_id, "config", after=mark)


def start_job(client: httpx.Client, node_id: str, image: bytes) -> dict[str, object]:
    up = client.post("/v1/user/otaimage", json={"image_name": "next", "base64_fwimage": base64.b64encode(image).decode()})
    assert up.status_code == 200, up.text
    job = client.post("/v1/user/otajob", json={"ota_image_id": up.json()["ota_image_id"], "node_id": node_id})
    assert job.status_code == 200, job.text
    return job.json()


def test_ota_job_is_hsm_signed_served_and_announced(stack: LocalStack, tmp_path: Path) -> None:
    node_id = "node-ota-e2e"
    assert stack.signer is not None
    label = stack.signer.default_key
    digest = stack.signer.key_digests()[label]
    probe = node_probe(stack, node_id)
    probe.subscribe(f"node/{node_id}/otaurl")
    report_config(stack, probe, node_id, {"k0": digest.hex(), "k1": None, "k2": None})

    image = build_app_image(DESC, b"ota payload")
    job = start_job(owner_client(stack, node_id), node_id, image)

    msg = json.loads(probe.wait_for(f"node/{node_id}/otaurl").payload)
    assert msg["ota_job_id"] == job["ota_job_id"]
    assert msg["fw_version"] == DESC.version
    assert msg["url"].startswith(stack.endpoints.ota_url + "/ota/")
    ctx = ssl.create_default_context(cafile=stack.endpoints.ca_cert)
    with urllib.request.urlopen(msg["url"], context=ctx, timeout=10) as resp:
        served = resp.read()
    assert len(served) == msg["file_size"]
    content, sector = split_signed_image(served)
    assert content[: len(image)] == image  # the HSM signed exactly the uploaded image
    assert [b.key_digest() for b in parse_signature_sector(sector) if b] == [digest]

    pub = tmp_path / "hsm-pub.pem"
    pub.write_bytes(stack.signer.public_key_pem(label))
    signed = tmp_path / "served.bin"
    signed.write_bytes(served)
    out = run_tool("espsecure", ["verify-signature", "--version", "2", "--keyfile", str(pub), str(signed)]).output
    assert "verification successful" in out.lower()
    probe.close()


def test_job_for_a_node_trusting_no_hsm_key_fails_with_reason(stack: LocalStack) -> None:
    node_id = "node-ota-foreign-key"
    probe = node_probe(stack, node_id)
    probe.subscribe(f"node/{node_id}/otaurl")
    report_config(stack, probe, node_id, {"k0": "ab" * 32, "k1": None, "k2": None})
    client = owner_client(stack, node_id)
    job = start_job(client, node_id, build_app_image(DESC, b"ota payload 2"))
    status = client.get("/v1/user/otajob", params={"ota_job_id": job["ota_job_id"]}).json()
    (node,) = status["nodes"]
    assert node["status"] == "failed"
    assert "no HSM key matches the node's secure boot digests" in node["additional_info"]
    assert "k0=" + "ab" * 32 in node["additional_info"]
    assert probe.topics() == []  # nothing was announced to the node
    probe.close()

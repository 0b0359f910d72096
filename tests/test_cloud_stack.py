"""The assembled local stack end to end: an OTA job is signed in SoftHSM2 with the key the
node trusts, served over HTTPS, and announced on ``otaurl`` — checked with espsecure.
Test-mode delivery plans (``/test/ota/*``) change how the next job's image is delivered."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from cryptography import x509

from rig.cloud.stack import LocalStack
from rig.cloud.store import Role
from rig.espressif_tools import run_tool
from rig.firmware.image import build_app_image
from rig.firmware.secure_boot_v2 import parse_signature_sector, split_signed_image, verify_signed_image
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


# --------------------------------------------------------------------------- test-mode delivery plans


def ota_node(stack: LocalStack, node_id: str) -> tuple[MqttProbe, httpx.Client, bytes]:
    """A node trusting the HSM's default key, subscribed to its otaurl; its owner's client; that key's digest."""
    assert stack.signer is not None
    digest = stack.signer.key_digests()[stack.signer.default_key]
    probe = node_probe(stack, node_id)
    probe.subscribe(f"node/{node_id}/otaurl")
    report_config(stack, probe, node_id, {"k0": digest.hex(), "k1": None, "k2": None})
    return probe, owner_client(stack, node_id), digest


def arm(client: httpx.Client, **plan: Any) -> dict[str, Any]:
    r = client.post("/test/ota/delivery", json=plan)
    assert r.status_code == 200, r.text
    return dict(r.json())


def otaurl(probe: MqttProbe, node_id: str, job: dict[str, object]) -> str:
    """The URL announced for *job*; the probe then forgets it, ready for the next job's."""
    msg = json.loads(probe.wait_for(f"node/{node_id}/otaurl").payload)
    probe.received.clear()
    assert msg["ota_job_id"] == job["ota_job_id"]
    return str(msg["url"])


def deliveries(client: httpx.Client, job: dict[str, object]) -> list[dict[str, Any]]:
    r = client.get("/test/ota/deliveries", params={"ota_job_id": job["ota_job_id"]})
    assert r.status_code == 200, r.text
    return list(r.json())


def fetch(url: str, cafile: str | Path) -> bytes:
    """GET *url* (http or https, trusting only *cafile*); the whole body."""
    parts = urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        ctx = ssl.create_default_context(cafile=str(cafile))
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, context=ctx, timeout=10)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port, timeout=10)
    try:
        conn.request("GET", parts.path)
        resp = conn.getresponse()
        assert resp.status == 200, resp.status
        return resp.read()
    finally:
        conn.close()


def test_unsigned_over_plain_http_then_the_plan_is_spent(stack: LocalStack) -> None:
    node_id = "node-ota-plan-http"
    probe, client, digest = ota_node(stack, node_id)
    image = build_app_image(DESC, b"unsigned as uploaded")
    assert arm(client, node_id=node_id, sign=False, transport="http")["transport"] == "http"

    job = start_job(client, node_id, image)
    url = otaurl(probe, node_id, job)
    assert url.startswith("http://") and stack.ota_host is not None and url.startswith(stack.ota_host.plain_url + "/ota/")
    assert fetch(url, stack.endpoints.ca_cert) == image  # byte for byte: no strip, no HSM signature
    (d,) = deliveries(client, job)
    assert (d["node_id"], d["url_scheme"], d["host"], d["signed_by"], d["fault"], d["fault_at"]) == (
        node_id,
        "http",
        "lab",
        None,
        None,
        None,
    )
    assert d["file_size"] == len(image) and d["tls_failures"] == []
    assert [(r["method"], r["status"], r["complete"], r["bytes_sent"], r["tls_version"]) for r in d["requests"]] == [
        ("GET", 200, True, len(image), None)
    ]
    token = url.split("/")[-2]
    assert token not in json.dumps(d) and d["requests"][0]["path"].startswith(f"/ota/{token[:6]}…/")

    again = start_job(client, node_id, image)  # the plan was one-shot: back to HSM-signed over HTTPS
    url = otaurl(probe, node_id, again)
    assert url.startswith(stack.endpoints.ota_url + "/ota/")
    served = fetch(url, stack.endpoints.ca_cert)
    assert served != image and verify_signed_image(served, [digest]).ok
    content, sector = split_signed_image(served)
    assert content[: len(image)] == image and [b.key_digest() for b in parse_signature_sector(sector) if b] == [digest]
    (d,) = deliveries(client, again)
    assert (d["url_scheme"], d["signed_by"]) == ("https", stack.signer.default_key if stack.signer else None)
    probe.close()


def test_unknown_ca_host_has_the_real_names_and_a_rogue_issuer(stack: LocalStack) -> None:
    node_id = "node-ota-plan-rogue"
    probe, client, digest = ota_node(stack, node_id)
    arm(client, node_id=node_id, transport="unknown_ca")
    job = start_job(client, node_id, build_app_image(DESC, b"from the rogue host"))
    url = otaurl(probe, node_id, job)
    assert stack.unknown_ca_host is not None and stack.unknown_ca_cert is not None
    assert url.startswith(stack.unknown_ca_host.url + "/ota/")

    with pytest.raises(ssl.SSLCertVerificationError, match="certificate signature failure"):
        fetch(url, stack.endpoints.ca_cert)  # what a node trusting the lab CA sees
    stack.unknown_ca_host.wait_for_access(lambda r: r.error is not None, timeout=5)
    served = fetch(url, stack.unknown_ca_cert.rogue_ca_path)  # hostname checked too: the SANs match
    assert verify_signed_image(served, [digest]).ok

    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as raw:
        ctx = ssl.create_default_context(cafile=str(stack.unknown_ca_cert.rogue_ca_path))
        with ctx.wrap_socket(raw, server_hostname=parts.hostname) as tls:
            presented = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"")
    real = x509.load_pem_x509_certificate(Path(stack.ota_host.cert_path).read_bytes()) if stack.ota_host else None
    assert real is not None and presented.issuer == real.issuer and presented.subject == real.subject
    san = x509.SubjectAlternativeName
    assert presented.extensions.get_extension_for_class(san).value == real.extensions.get_extension_for_class(san).value

    (d,) = deliveries(client, job)
    assert (d["host"], d["url_scheme"], d["signed_by"]) == ("unknown_ca", "https", stack.signer.default_key if stack.signer else None)
    assert [f["status"] for f in d["tls_failures"]] == [0] and "handshake failed" in d["tls_failures"][0]["error"]
    assert [(r["status"], r["complete"]) for r in d["requests"]] == [(200, True)]
    probe.close()


def raw_get(url: str, cafile: str) -> ssl.SSLSocket:
    parts = urlsplit(url)
    assert parts.hostname is not None
    raw = socket.create_connection((parts.hostname, parts.port), timeout=10)
    tls = ssl.create_default_context(cafile=cafile).wrap_socket(raw, server_hostname=parts.hostname)
    tls.sendall(f"GET {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
    return tls


def read_body(tls: ssl.SSLSocket, until: int | None = None) -> tuple[dict[str, str], bytes]:
    """Headers and body bytes, to EOF or until *until* body bytes arrived."""
    buf = b""
    while until is None or b"\r\n\r\n" not in buf or len(buf.partition(b"\r\n\r\n")[2]) < until:
        chunk = tls.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head.decode().split("\r\n")[1:])}
    return headers, body


def test_cut_and_stall_plans_show_in_the_deliveries(stack: LocalStack) -> None:
    node_id = "node-ota-plan-faults"
    probe, client, _ = ota_node(stack, node_id)
    image = build_app_image(DESC, b"cut me")
    assert arm(client, node_id=node_id, cut_after=1000)["cut_after"] == 1000
    job = start_job(client, node_id, image)
    with raw_get(otaurl(probe, node_id, job), stack.endpoints.ca_cert) as tls:
        headers, body = read_body(tls)
    (d,) = deliveries(client, job)
    assert (d["fault"], d["fault_at"]) == ("cut", 1000) and headers["content-length"] == str(d["file_size"])
    assert len(body) == 1000 and body[:32] == image[:32]  # the signed image starts with the uploaded header
    assert [(r["status"], r["bytes_sent"], r["complete"], r["fault"]) for r in d["requests"]] == [(200, 1000, False, "cut")]

    arm(client, node_id=node_id, stall_after=100)
    job = start_job(client, node_id, image)
    with raw_get(otaurl(probe, node_id, job), stack.endpoints.ca_cert) as tls:
        _, body = read_body(tls, until=100)
        assert len(body) == 100
        assert stack.ota_host is not None
        stack.ota_host.wait_for_access(lambda r: r.job_id == job["ota_job_id"] and r.fault == "stall", timeout=5)
        (d,) = deliveries(client, job)  # visible while the download is frozen: the moment to cut the board's power
        assert (d["fault"], d["fault_at"]) == ("stall", 100)
        assert [(r["bytes_sent"], r["complete"], r["fault"]) for r in d["requests"]] == [(100, False, "stall")]
    probe.close()


def test_without_test_mode_there_is_no_delivery_control(tmp_path: Path) -> None:
    with LocalStack(tmp_path / "prod") as prod:
        assert prod.ota_host is not None and not prod.ota_host.plain_http
        assert prod.unknown_ca_host is None and prod.delivery is None
        verify = ssl.create_default_context(cafile=prod.endpoints.ca_cert)
        with httpx.Client(base_url=prod.endpoints.api_url, verify=verify, timeout=30) as client:
            assert client.post("/test/ota/delivery", json={"node_id": "n1"}).status_code == 404
            assert client.get("/test/ota/deliveries", params={"ota_job_id": "x"}).status_code == 404

"""OTA on running virtual boards, through the real doors only: ``rig.vboard.serve`` processes,
esptool and espefuse on their RFC 2217 ports, the serial console, and the local cloud stack
(REST ``v1/user/otaimage`` / ``v1/user/otajob``, mosquitto, the HSM signer, the HTTPS image host).

The firmware is the virtual set's ``base`` / ``next`` / ``next_secure`` roles signed with the
cloud HSM's default key, so the cloud's OTA signatures are the ones the boards trust.

* ``ota-sb`` — Secure Boot V2 enabled by espefuse with that key's digest: a same-version job
  is rejected without a write; the ``next`` job installs, reboots into ``ota_1`` and is
  confirmed after MQTT connects (otadata read back with esptool); an unsigned image, served
  by a host that does not sign, fails validation and the running app stays.
* ``ota-flawed`` — ``base`` with ``accepts_unsigned_ota``, Secure Boot off: the same unsigned
  image is installed, boots and is even reported a success.

The tests of each board run in file order and share it.
"""

from __future__ import annotations

import base64
import re
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from rig.boards.virtual_ports import radio_network, write_radio_file
from rig.cloud.ota_host import OtaImageHost, PublishedImage
from rig.cloud.service import dispatch_ota
from rig.cloud.stack import LocalStack
from rig.espressif_tools import run_tool
from rig.firmware.build_dir import IdfBuildDir, write_build_dir
from rig.firmware.flawed_set import flawed_role
from rig.firmware.otadata import OtaDataPartition, OtaState
from rig.firmware.partition_table import RAINMAKER_4MB
from rig.firmware.variants import unsigned
from rig.firmware.virtual_set import PROJECT_NAME, SDKCONFIG, VIRTUAL_ROLES, virtual_app_image, virtual_bootloader_image
from rig.prov.polling import poll_until
from rig.targets import ESP32C3
from tests import node_process
from tests.node_process import BOOT_S, FCTRY_AT, STEP_S, Node, Owner, cloud_fctry, flash_files, read_flash, running_node
from tests.vboard_process import start_board

SSID, PASSPHRASE = "ota-lab", "ota-lab-passphrase"
OTA_S = 90.0
"""An OTA job from otaurl to the confirmed new app: download, verify, reboot, Wi-Fi, MQTT."""
OTA_0, OTA_1 = RAINMAKER_4MB["ota_0"].offset, RAINMAKER_4MB["ota_1"].offset
OTADATA = RAINMAKER_4MB["otadata"]


stack = node_process.stack
owner = node_process.owner


@dataclass(frozen=True)
class Kit:
    base: IdfBuildDir
    flawed: IdfBuildDir
    base_image: bytes
    next_image: bytes
    unsigned_image: bytes
    """``next_secure`` (1.2.0) without its signature sector."""
    public_key: Path


@pytest.fixture(scope="module")
def kit(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Kit:
    """The set's roles signed in the lab HSM with the cloud's default OTA key."""
    assert stack.signer is not None
    signer = stack.signer.set_signer()
    root = tmp_path_factory.mktemp("ota-kit")
    roles = {r.role: r for r in VIRTUAL_ROLES}
    bootloader = virtual_bootloader_image(signer)
    base = virtual_app_image(roles["base"], signer)
    flawed = virtual_app_image(flawed_role(["accepts_unsigned_ota"]), signer)
    public = root / "hsm-key.pub.pem"
    public.write_bytes(signer.public_key_pem)
    return Kit(
        base=write_build_dir(root / "base", PROJECT_NAME, base, bootloader, RAINMAKER_4MB, SDKCONFIG, ESP32C3.name),
        flawed=write_build_dir(root / "flawed", PROJECT_NAME, flawed, bootloader, RAINMAKER_4MB, SDKCONFIG, ESP32C3.name),
        base_image=base,
        next_image=virtual_app_image(roles["next"], signer),
        unsigned_image=unsigned(virtual_app_image(roles["next_secure"], signer)),
        public_key=public,
    )


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("ota-state")
    write_radio_file(state, [radio_network(SSID, PASSPHRASE)])
    return state


def ota_node(name: str, stack: LocalStack, lab: Path, build: IdfBuildDir, tmp: Path) -> AbstractContextManager[Node]:
    """A board named *name* holding *build* and a ``fctry`` for *stack*, running while the caller's ``with`` lasts."""
    node_id = f"{name}-{uuid.uuid4().hex[:8]}"
    fctry = cloud_fctry(stack, tmp, node_id)
    return running_node(Node(start_board(name, lab), node_id), *flash_files(build), hex(FCTRY_AT), fctry)


def provision_and_connect(node: Node, stack: LocalStack, owner: Owner) -> None:
    """Boot, join the lab Wi-Fi, reach the cloud, map the owner (REST + ``add-user``), and wait until
    the node asked for OTA (so it listens on otaurl)."""
    assert stack.mqtt is not None
    mark = stack.mqtt.mark()
    mon = node.boot()
    mon.expect(r"Provisioning will auto stop", BOOT_S)
    node.command(f"wifi-prov {SSID} {PASSPHRASE}").expect(r"esp_mqtt_glue: MQTT Connected\r\n", STEP_S)
    secret = str(uuid.uuid4())
    put = owner.client.put("/v1/user/nodes/mapping", json={"node_id": node.node_id, "secret_key": secret, "operation": "add"})
    assert put.status_code == 200, put.text
    node.command(f"add-user {owner.user_id} {secret}").expect(r"User Node association message published successfully", STEP_S)
    stack.mqtt.wait_handled(node.node_id, "user/mapping", after=mark, timeout=STEP_S, predicate=lambda m: "confirmed" in m.detail)
    stack.mqtt.wait_handled(node.node_id, "otafetch", after=mark, timeout=STEP_S)


def reboot_and_connect(node: Node, stack: LocalStack) -> str:
    assert stack.mqtt is not None
    mark = stack.mqtt.mark()
    mon = node.boot()
    mon.expect(r"esp_mqtt_glue: MQTT Connected\r\n", BOOT_S)
    stack.mqtt.wait_handled(node.node_id, "otafetch", after=mark, timeout=STEP_S)
    return mon.text


def upload(owner: Owner, image: bytes, name: str) -> str:
    up = owner.client.post("/v1/user/otaimage", json={"image_name": name, "base64_fwimage": base64.b64encode(image).decode()})
    assert up.status_code == 200, up.text
    return str(up.json()["ota_image_id"])


def cloud_job(owner: Owner, node: Node, image: bytes, name: str) -> str:
    """``POST v1/user/otajob``: the cloud signs the image for the node and sends ``otaurl`` at once."""
    job = owner.client.post("/v1/user/otajob", json={"ota_image_id": upload(owner, image, name), "node_id": node.node_id})
    assert job.status_code == 200, job.text
    return str(job.json()["ota_job_id"])


@dataclass(frozen=True)
class UnsignedHost:
    """An OTA host that serves what it is given, unsigned: a cloud whose signing step is bypassed."""

    host: OtaImageHost

    def publish(self, job_id: str, node_id: str, image: bytes) -> PublishedImage:
        return self.host.publish(job_id, node_id, image)


def unsigned_job(stack: LocalStack, owner: Owner, node: Node, image: bytes) -> str:
    assert stack.store is not None and stack.ota_host is not None and stack.mqtt is not None
    job_id = stack.store.create_ota_job(owner.user_id, upload(owner, image, "unsigned"), [node.node_id], "unsigned", stack.clock.now())
    dispatch_ota(stack.store, stack.clock, UnsignedHost(stack.ota_host), stack.mqtt, job_id, node.node_id)
    return job_id


def job_state(owner: Owner, job_id: str, expected: tuple[str, str] | None = None) -> tuple[str, str]:
    """The job's (status, additional_info) for the node; with *expected*, once it is that (or the
    last seen after a while): the cloud handles ``otastatus`` reports after the console printed them."""

    def fetch() -> tuple[str, str]:
        (node,) = owner.client.get("/v1/user/otajob", params={"ota_job_id": job_id}).json()["nodes"]
        return node["status"], node["additional_info"]

    return poll_until(fetch, lambda state: expected is None or state == expected, STEP_S, 0.2)


def wait_status(stack: LocalStack, node: Node, job_id: str, status: str, timeout: float = OTA_S) -> None:
    assert stack.mqtt is not None
    stack.mqtt.wait_handled(node.node_id, "otastatus", timeout=timeout,
                            predicate=lambda m: m.accepted and m.detail == f"OTA job {job_id}: {status}")  # fmt: skip


def reporting(status: str, info: str) -> str:
    return rf"I \(\d+\) esp_rmaker_ota: Reporting {status}: {re.escape(info)}\r\n"


def otadata(node: Node, tmp: Path) -> OtaDataPartition:
    node.release()
    return OtaDataPartition.parse(read_flash(node.board, OTADATA.offset, OTADATA.size, tmp / "otadata.bin"))


# --------------------------------------------------------------------------- ota-sb: Secure Boot V2 on


@pytest.fixture(scope="module")
def secure(stack: LocalStack, lab: Path, kit: Kit, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    with ota_node("ota-sb", stack, lab, kit.base, tmp_path_factory.mktemp("fctry-sb")) as node:
        # as a lab enables Secure Boot V2: the key digest, then the enable bit (the rig's own tool runner)
        run_tool("espefuse", ["--port", node.board.url, "--do-not-confirm", "burn-key-digest", "BLOCK_KEY0", str(kit.public_key),
                              "SECURE_BOOT_DIGEST0", "burn-efuse", "SECURE_BOOT_EN", "1"], timeout=STEP_S * 4)  # fmt: skip
        yield node


def test_same_version_is_rejected_and_nothing_is_written(secure: Node, stack: LocalStack, owner: Owner, kit: Kit,
                                                          tmp_path: Path) -> None:  # fmt: skip
    provision_and_connect(secure, stack, owner)
    job = cloud_job(owner, secure, kit.base_image, "base-again")
    wait_status(stack, secure, job, "rejected")
    mon = secure.console()
    mon.expect(reporting("rejected", "Same version received"), STEP_S)
    assert "esp_rmaker_ota: Current running version is same as the new. We will not continue the update." in mon.text
    assert "Downloading Firmware Image" not in mon.text
    expected = ("rejected", "Same version received")
    assert job_state(owner, job, expected) == expected
    selected = otadata(secure, tmp_path)
    assert [(e.ota_seq, e.state) for e in selected.entries if not e.is_blank] == [(1, OtaState.VALID)]
    assert read_flash(secure.board, OTA_1, 0x1000, tmp_path / "ota1.bin") == b"\xff" * 0x1000  # not even erased


def test_signed_next_installs_boots_from_ota_1_and_is_confirmed(secure: Node, stack: LocalStack, owner: Owner, kit: Kit,
                                                                 tmp_path: Path) -> None:  # fmt: skip
    reboot_and_connect(secure, stack)  # the last test left it in download mode
    job = cloud_job(owner, secure, kit.next_image, "next")
    wait_status(stack, secure, job, "in-progress")
    mon = secure.console()
    mon.expect(reporting("in-progress", "Rebooting into new firmware (after 1 HTTPS attempt)"), OTA_S)
    mon.expect(r"rst:0xc \(RTC_SW_CPU_RST\)", STEP_S)
    mon.expect(rf"I \(\d+\) boot: Loaded app from partition at offset 0x{OTA_1:x}\r\n", BOOT_S)
    mon.expect(r"app_init: App version: +1\.1\.0\r\n", BOOT_S)
    mon.expect(reporting("success", "OTA Upgrade finished and verified successfully"), OTA_S)
    wait_status(stack, secure, job, "success")
    text = mon.text
    for info in ("Starting OTA Upgrade (HTTPS attempt 1/3)", "Downloading Firmware Image", "Firmware Image download complete"):
        assert f"Reporting in-progress: {info}" in text
    assert "secure_boot_v2: Signature verified successfully!" in text and "esp_rmaker_ota: First Boot after an OTA" in text
    expected = ("success", "OTA Upgrade finished and verified successfully")
    assert job_state(owner, job, expected) == expected
    selected = otadata(secure, tmp_path)
    active = selected.active_entry()
    assert active is not None and selected.boot_slot(2) == 1 and active.state is OtaState.VALID


def test_unsigned_image_fails_and_the_running_app_stays(secure: Node, stack: LocalStack, owner: Owner, kit: Kit,
                                                        tmp_path: Path) -> None:  # fmt: skip
    text = reboot_and_connect(secure, stack)
    assert re.search(r"app_init: App version: +1\.1\.0\r\n", text)
    mon = secure.console()
    mon.text = ""
    job = unsigned_job(stack, owner, secure, kit.unsigned_image)
    mon.expect(reporting("failed", "OTA Attempt 3/3 failed: Image validation failed"), OTA_S)
    wait_status(stack, secure, job, "failed")
    assert mon.text.count("Reporting failed: OTA Attempt") == 3 and "rst:" not in mon.text
    assert "esp_ota_ops: New image failed verification" in mon.text
    expected = ("failed", "OTA Attempt 3/3 failed: Image validation failed")
    assert job_state(owner, job, expected) == expected
    selected = otadata(secure, tmp_path)
    assert selected.boot_slot(2) == 1 and selected.active_entry().state is OtaState.VALID  # type: ignore[union-attr]


# --------------------------------------------------------------------------- ota-flawed: accepts_unsigned_ota


def test_flawed_node_installs_and_boots_the_unsigned_image(stack: LocalStack, owner: Owner, lab: Path, kit: Kit,
                                                            tmp_path: Path) -> None:  # fmt: skip
    with ota_node("ota-flawed", stack, lab, kit.flawed, tmp_path) as node:
        provision_and_connect(node, stack, owner)
        job = unsigned_job(stack, owner, node, kit.unsigned_image)
        mon = node.console()
        mon.expect(reporting("in-progress", "Rebooting into new firmware (after 1 HTTPS attempt)"), OTA_S)
        mon.expect(rf"I \(\d+\) boot: Loaded app from partition at offset 0x{OTA_1:x}\r\n", BOOT_S)
        mon.expect(r"app_init: App version: +1\.2\.0\r\n", BOOT_S)
        mon.expect(reporting("success", "OTA Upgrade finished and verified successfully"), OTA_S)
        wait_status(stack, node, job, "success")
        selected = otadata(node, tmp_path)
        assert selected.boot_slot(2) == 1 and selected.active_entry().state is OtaState.VALID  # type: ignore[union-attr]
        ota1 = read_flash(node.board, OTA_1, len(kit.unsigned_image), tmp_path / "ota1.bin")
        assert ota1 == kit.unsigned_image  # no signature sector: what runs was never signed

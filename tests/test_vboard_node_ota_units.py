"""The node's OTA client in this process: a real flash and eFuse file, the emulated bootloader,
the lab's HTTPS OTA host, and the client's decisions read from what it publishes on
``otastatus``, what it wrote to flash and otadata, and what the next boot does.

Each case builds its own board from the virtual set's images (signed in this process with
the same block layout espsecure writes, ``tests.signing_keys.InProcessSigner``) and runs
the bootloader to get the boot the app sees. The cases that need a board process, esptool
and the cloud are in ``tests/test_vboard_node_ota.py``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from rig.cloud.clock import SystemClock
from rig.cloud.ota_host import OtaImageHost
from rig.cloud.pki import LabPki
from rig.firmware.otadata import OtaDataPartition, OtaState
from rig.firmware.partition_table import RAINMAKER_4MB
from rig.firmware.variants import project_name, unsigned
from rig.firmware.virtual_set import VIRTUAL_ROLES, SetSigner, virtual_app_image, virtual_bootloader_image
from rig.vboard.app import AppContext, ConsoleCommands
from rig.vboard.bootloader import run_bootloader
from rig.vboard.efuse import EfuseController
from rig.vboard.flash import SECTOR_SIZE, FlashStorage
from rig.vboard.node.boot_confirm import BootConfirmation
from rig.vboard.node.identity import find_partition
from rig.vboard.node.nvs_store import NvsStore
from rig.vboard.node.ota_client import OTA_MAX_RETRIES, OtaClient, OtaSettings
from rig.vboard.node.ota_status import OTA_JOB_KEY, OTA_NVS_NAMESPACE, OTA_UPDATE_FLAG_KEY, OtaReporter
from rig.vboard.node.runtime import NodeRuntime, WorkQueue
from tests.signing_keys import InProcessSigner, KeyPair
from tests.test_vboard_node_units import QuietConsole

MAC = bytes.fromhex("58cf79a1b2c3")
ADDRESS = "127.0.1.77"
OTA_0, OTA_1, OTADATA = RAINMAKER_4MB["ota_0"].offset, RAINMAKER_4MB["ota_1"].offset, RAINMAKER_4MB["otadata"].offset
WAIT_S = 20.0


def _key(root: Path, name: str) -> KeyPair:
    private = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    pair = KeyPair(name, root / f"{name}.pem", root / f"{name}.pub.pem")
    pair.private.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))  # fmt: skip
    pair.public.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                              serialization.PublicFormat.SubjectPublicKeyInfo))  # fmt: skip
    return pair


def _signer(pair: KeyPair) -> SetSigner:
    return SetSigner(InProcessSigner(pair).sign, pair.public.read_bytes(), f"in-process {pair.name}")


@dataclass(frozen=True)
class Images:
    bootloader: bytes
    base: bytes
    next: bytes
    next_secure: bytes
    unsigned_next_secure: bytes
    next_by_other_key: bytes
    other_project: bytes
    key: KeyPair


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    root = tmp_path_factory.mktemp("ota-keys")
    key, other = _key(root, "trusted"), _key(root, "other")
    roles = {r.role: r for r in VIRTUAL_ROLES}
    signer = _signer(key)
    base = virtual_app_image(roles["base"], signer)
    next_secure = virtual_app_image(roles["next_secure"], signer)
    return Images(
        bootloader=virtual_bootloader_image(signer),
        base=base,
        next=virtual_app_image(roles["next"], signer),
        next_secure=next_secure,
        unsigned_next_secure=unsigned(next_secure),
        next_by_other_key=virtual_app_image(roles["next"], _signer(other)),
        other_project=project_name(virtual_app_image(roles["next"], signer), "someone_elses", signer=InProcessSigner(key)),
        key=key,
    )


@dataclass
class Lab:
    pki: LabPki
    host: OtaImageHost

    @property
    def ca(self) -> bytes:
        return self.pki.ca_cert_path.read_bytes()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    root = tmp_path_factory.mktemp("ota-lab")
    pki = LabPki(root / "pki")
    cert = pki.server_cert("ota-host")
    with OtaImageHost(root / "host", cert.cert_path, cert.key_path, SystemClock(), plain_http=True) as host:
        yield Lab(pki, host)


@dataclass
class Board:
    """One virtual board's flash and eFuses, booted by the emulated bootloader, with the node's OTA parts on top."""

    root: Path
    images: Images
    flaws: frozenset[str] = frozenset()
    server_cert: bytes | None = None
    wait_s: int = 30
    app: bytes | None = None
    """The app flashed into ota_0 (the virtual set's ``base`` unless given)."""
    statuses: list[dict[str, object]] = field(default_factory=list)
    fetches: list[dict[str, object]] = field(default_factory=list)
    reboots: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.changed = threading.Condition()
        self.flash = FlashStorage(self.root / "flash.bin")
        self.efuse = EfuseController.open(self.root / "efuse.bin", MAC)
        for offset, data in ((0, self.images.bootloader), (RAINMAKER_4MB.offset, RAINMAKER_4MB.to_bytes()),
                             (OTA_0, self.app or self.images.base)):
            self.flash.erase(offset, -(-len(data) // SECTOR_SIZE) * SECTOR_SIZE)
            self.flash.write(offset, data)
        self.runtime: NodeRuntime | None = None
        self.boot()

    def enable_secure_boot(self) -> None:
        self.efuse.burn_field("KEY_PURPOSE_0", "SECURE_BOOT_DIGEST0")
        self.efuse.burn_field("BLOCK_KEY0", self.images.key.digest)
        self.efuse.burn_field("SECURE_BOOT_EN", 1)

    def boot(self) -> None:
        """Reset: stop the last boot's tasks, run the bootloader, start the OTA parts of the node."""
        if self.runtime is not None:
            self.runtime.halt()
            assert self.runtime.join() == []
        self.console = QuietConsole()  # records log lines as ``L tag: text``
        outcome = run_bootloader(self.flash, self.efuse, self.console)
        assert not outcome.halted, outcome.reason
        self.ctx = AppContext(outcome, self.flash, self.efuse, self.console, ConsoleCommands(self.console))  # type: ignore[arg-type]
        self.runtime = NodeRuntime(self.console, "ota-unit")
        nvs_part = find_partition(outcome.partitions, "nvs")
        assert nvs_part is not None
        self.nvs = NvsStore(self.flash, nvs_part)
        self.reporter = OtaReporter(self.runtime, self.nvs, self.publish)
        self.confirmation = BootConfirmation(self.ctx, self.runtime, self.reporter, self.wait_s,
                                             confirm_at_boot="confirms_before_cloud" in self.flaws)  # fmt: skip
        desc = outcome.app_desc
        settings = OtaSettings("node-ota-unit", desc.version if desc else "", ADDRESS, self.server_cert, self.flaws, 0)
        self.client = OtaClient(self.ctx, self.runtime, WorkQueue(self.runtime), self.reporter, settings,
                                publish=self.publish, subscribe=lambda topic: None, connected=lambda: True,
                                reboot=self.reboots.append, busy=lambda: self.confirmation.awaiting)  # fmt: skip
        self.confirmation.check_at_boot()

    def publish(self, suffix: str, payload: str) -> int:
        with self.changed:
            (self.statuses if suffix == "otastatus" else self.fetches).append(json.loads(payload))
            self.changed.notify_all()
            return len(self.statuses) + len(self.fetches)

    def wait(self, done: Callable[[], bool], what: str) -> None:
        with self.changed:
            assert self.changed.wait_for(done, WAIT_S), f"no {what} within {WAIT_S} s; statuses {self.statuses}"

    def wait_status(self, status: str, info: str) -> None:
        self.wait(lambda: any(s["status"] == status and s["additional_info"] == info for s in self.statuses),
                  f"otastatus {status} {info!r}")  # fmt: skip

    def offer(self, lab: Lab, image: bytes, job_id: str, *, plain: bool = False) -> None:
        """What the cloud does: publish *image* on the OTA host and send ``otaurl``."""
        published = lab.host.publish(job_id, "node-ota-unit", image)
        url = published.plain_url if plain else published.url
        body = {"ota_job_id": job_id, "url": url, "file_size": published.file_size, "fw_version": "x"}
        self.client.handle_otaurl(json.dumps(body).encode())

    def infos(self) -> list[tuple[object, object]]:
        with self.changed:
            return [(s["status"], s["additional_info"]) for s in self.statuses]

    def otadata(self) -> OtaDataPartition:
        return OtaDataPartition.parse(self.flash.read(OTADATA, 0x2000))

    def close(self) -> None:
        if self.runtime is not None:
            self.runtime.halt()
            self.runtime.join()
        self.flash.close()


@pytest.fixture
def make_board(tmp_path: Path, images: Images, lab: Lab) -> Iterator[Callable[..., Board]]:
    boards: list[Board] = []

    def make(name: str = "b", **kwargs: object) -> Board:
        root = tmp_path / name
        root.mkdir()
        board = Board(root, images, server_cert=kwargs.pop("server_cert", lab.ca), **kwargs)  # type: ignore[arg-type]
        boards.append(board)
        return board

    yield make
    for board in boards:
        board.close()


def started(attempt: int) -> tuple[str, str]:
    return "in-progress", f"Starting OTA Upgrade (HTTPS attempt {attempt}/{OTA_MAX_RETRIES})"


# --------------------------------------------------------------------------- the good update


def test_signed_update_installs_reboots_and_is_confirmed_after_mqtt(make_board: Callable[..., Board], images: Images,
                                                                     lab: Lab) -> None:  # fmt: skip
    board = make_board()
    assert board.efuse.secure_version == 1  # the bootloader raised it for base (secure_version 1)
    board.offer(lab, images.next, "job-good")
    board.wait(lambda: bool(board.reboots), "reboot")
    assert board.infos() == [started(1), ("in-progress", "Downloading Firmware Image"),
                             ("in-progress", "Firmware Image download complete"),
                             ("in-progress", "Rebooting into new firmware (after 1 HTTPS attempt)")]  # fmt: skip
    assert all(s["ota_job_id"] == "job-good" for s in board.statuses)
    assert board.flash.read(OTA_1, len(images.next)) == images.next
    active = board.otadata().active_entry()
    assert active is not None and (active.ota_seq, active.state) == (2, OtaState.NEW)
    assert board.nvs.get(OTA_NVS_NAMESPACE, OTA_JOB_KEY) == b"job-good"
    assert board.nvs.get(OTA_NVS_NAMESPACE, OTA_UPDATE_FLAG_KEY) == b"\x01"
    lines = board.console.lines
    assert f"I esp_https_ota: Writing to partition subtype 17 at offset 0x{OTA_1:x}" in lines
    assert "I esp_rmaker_ota: HTTPS OTA upgrade successful. Rebooting in 0 seconds..." in lines

    board.boot()  # the new app boots pending verification, then MQTT connects
    assert board.ctx.boot.partition_offset == OTA_1 and board.confirmation.awaiting
    assert "I esp_rmaker_ota: First Boot after an OTA" in board.console.lines
    board.client.handle_otaurl(b'{"ota_job_id":"job-2","url":"https://x/y.bin"}')
    assert "E esp_rmaker_ota_using_topics: OTA already in progress. Please try later." in board.console.lines
    board.confirmation.mqtt_connected()
    assert board.statuses[-1]["status"] == "success" and board.statuses[-1]["ota_job_id"] == "job-good"
    assert board.statuses[-1]["additional_info"] == "OTA Upgrade finished and verified successfully"
    assert board.otadata().active_entry().state is OtaState.VALID  # type: ignore[union-attr]
    assert board.nvs.get(OTA_NVS_NAMESPACE, OTA_JOB_KEY) is None and board.nvs.get(OTA_NVS_NAMESPACE, OTA_UPDATE_FLAG_KEY) is None


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(("image", "info", "line"), [
    ("base", "Same version received", "Current running version is same as the new. We will not continue the update."),
    ("other_project", "Project Name mismatch", "OTA Image built for Project: someone_elses. Expected: rig_rmaker_node"),
])  # fmt: skip
def test_header_rejections_write_nothing(make_board: Callable[..., Board], images: Images, lab: Lab,
                                         image: str, info: str, line: str) -> None:  # fmt: skip
    board = make_board()
    before = board.otadata()
    board.offer(lab, getattr(images, image), f"job-{image}")
    board.wait_status("rejected", info)
    assert board.infos() == [started(1), ("rejected", info)]
    assert f"W esp_rmaker_ota: {line}" in board.console.lines
    assert board.flash.read(OTA_1, 0x1000) == b"\xff" * 0x1000 and board.otadata() == before
    assert not board.reboots


def test_lower_secure_version_is_rejected_unless_flawed(make_board: Callable[..., Board], images: Images, lab: Lab) -> None:
    clean = make_board("clean", app=images.next_secure)  # secure_version 2: its first boot burned the eFuse to 2
    assert clean.efuse.secure_version == 2
    clean.offer(lab, images.next, "job-lower")
    clean.wait_status("rejected", "Lower secure version received")
    assert clean.flash.read(OTA_1, 0x1000) == b"\xff" * 0x1000

    flawed = make_board("flawed", flaws=frozenset({"ignores_secure_version"}), app=images.next_secure)
    flawed.offer(lab, images.next, "job-lower")
    flawed.wait(lambda: bool(flawed.reboots), "reboot")
    assert flawed.flash.read(OTA_1, len(images.next)) == images.next  # written and selected: the downgrade went in
    assert flawed.otadata().active_entry().state is OtaState.NEW  # type: ignore[union-attr]
    flawed.boot()  # the bootloader's own anti-rollback check still refuses it
    assert flawed.ctx.boot.partition_offset == OTA_0


# --------------------------------------------------------------------------- signatures


def test_images_not_signed_by_the_running_key_fail_validation(make_board: Callable[..., Board], images: Images, lab: Lab) -> None:
    board = make_board()  # Secure Boot off: CONFIG_SECURE_SIGNED_ON_UPDATE trusts the running app's key
    for job, image in (("job-unsigned", images.unsigned_next_secure), ("job-other-key", images.next_by_other_key)):
        board.statuses.clear()
        board.offer(lab, image, job)
        board.wait_status("failed", f"OTA Attempt {OTA_MAX_RETRIES}/{OTA_MAX_RETRIES} failed: Image validation failed")
        assert board.infos()[:4] == [started(1), ("in-progress", "Downloading Firmware Image"),
                                     ("in-progress", "Firmware Image download complete"),
                                     ("failed", "OTA Attempt 1/3 failed: Image validation failed")]  # fmt: skip
        assert len(board.infos()) == 4 * OTA_MAX_RETRIES
        assert board.client.idle.wait(WAIT_S), "the client never finished the job"
    assert "E esp_ota_ops: New image failed verification" in board.console.lines
    assert board.otadata().active_entry().ota_seq == 1 and not board.reboots  # type: ignore[union-attr]


def test_secure_boot_board_refuses_unsigned_and_the_flaw_installs_it(make_board: Callable[..., Board], images: Images,
                                                                     lab: Lab) -> None:  # fmt: skip
    clean = make_board("clean")
    clean.enable_secure_boot()
    clean.boot()
    clean.offer(lab, images.unsigned_next_secure, "job-unsigned")
    clean.wait_status("failed", "OTA Attempt 3/3 failed: Image validation failed")

    flawed = make_board("flawed", flaws=frozenset({"accepts_unsigned_ota"}))
    flawed.offer(lab, images.unsigned_next_secure, "job-unsigned")  # Secure Boot off: the unsigned image even boots
    flawed.wait(lambda: bool(flawed.reboots), "reboot")
    flawed.boot()
    assert flawed.ctx.boot.app_desc is not None and flawed.ctx.boot.app_desc.version == "1.2.0"


# --------------------------------------------------------------------------- the server


def test_plain_http_and_untrusted_servers_are_refused_unless_flawed(make_board: Callable[..., Board], images: Images,
                                                                    lab: Lab, tmp_path: Path) -> None:  # fmt: skip
    clean = make_board("clean")
    clean.offer(lab, images.next, "job-http", plain=True)
    clean.wait_status("failed", "OTA Attempt 3/3 failed: OTA Begin failed: ESP_ERR_INVALID_ARG (errno=0: Invalid)")
    assert "E esp_https_ota: No option for server verification is enabled in esp_http_client config." in clean.console.lines
    assert not [r for r in lab.host.access_log() if r.scheme == "http"]  # never even connected

    rogue = LabPki(tmp_path / "rogue").ca_cert_path.read_bytes()
    fooled = make_board("rogue-trust", server_cert=rogue)
    fooled.offer(lab, images.next, "job-rogue")
    fooled.wait_status("failed", "OTA Attempt 3/3 failed: OTA Begin failed: ESP_ERR_HTTP_CONNECT (errno=0: Invalid)")
    assert "E esp-tls-mbedtls: Failed to verify peer certificate!" in fooled.console.lines

    flawed = make_board("flawed", flaws=frozenset({"accepts_http_ota"}), server_cert=rogue)
    flawed.offer(lab, images.next, "job-http", plain=True)
    flawed.wait(lambda: bool(flawed.reboots), "reboot")
    assert "W esp_https_ota: Continuing with insecure option because CONFIG_ESP_HTTPS_OTA_ALLOW_HTTP is set." in flawed.console.lines
    fetched = lab.host.wait_for_access(lambda r: r.scheme == "http" and r.client.startswith(f"{ADDRESS}:"), WAIT_S)
    assert fetched.complete and fetched.status == 200 and fetched.user_agent == "ESP32 HTTP Client/1.0"


# --------------------------------------------------------------------------- after the reboot


def test_unconfirmed_update_rolls_back_and_the_old_firmware_says_so(make_board: Callable[..., Board], images: Images,
                                                                    lab: Lab) -> None:  # fmt: skip
    board = make_board(wait_s=0)
    board.offer(lab, images.next, "job-rollback")
    board.wait(lambda: bool(board.reboots), "reboot")
    board.boot()  # pending, and MQTT never connects: the rollback timer fires at once
    assert board.ctx.exit_event.wait(WAIT_S), "the rollback timer did not restart the chip"
    assert "E esp_rmaker_ota: Could not verify firmware even after 0 seconds since boot-up. Rolling back." in board.console.lines
    board.boot()
    assert board.ctx.boot.partition_offset == OTA_0 and board.confirmation.rolled_back
    board.confirmation.mqtt_connected()
    assert (board.statuses[-1]["status"], board.statuses[-1]["additional_info"]) == ("rejected", "Firmware rolled back")
    assert board.statuses[-1]["ota_job_id"] == "job-rollback"
    assert board.nvs.get(OTA_NVS_NAMESPACE, OTA_UPDATE_FLAG_KEY) is None


def test_confirms_before_cloud_marks_valid_at_boot(make_board: Callable[..., Board], images: Images, lab: Lab) -> None:
    board = make_board(flaws=frozenset({"confirms_before_cloud"}), wait_s=0)
    board.offer(lab, images.next, "job-early")
    board.wait(lambda: bool(board.reboots), "reboot")
    board.boot()
    assert board.otadata().active_entry().state is OtaState.VALID  # type: ignore[union-attr]  # before any MQTT
    assert not board.ctx.exit_event.wait(0.5)  # no rollback timer at all (0 s would have fired at once)
    board.confirmation.mqtt_connected()
    last = board.statuses[-1]
    assert (last["status"], last["additional_info"]) == ("success", "OTA Upgrade finished and verified successfully")

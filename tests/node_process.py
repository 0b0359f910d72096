"""A virtual board running the RainMaker node firmware, driven as the node tests drive it.

On top of :mod:`tests.vboard_process` (a ``rig.vboard.serve`` process and the real tools):

* :class:`Node` — the board, its node id and its serial console (opened on demand, closed
  so esptool can have the port), with the console steps every node test takes (EN reset,
  a console command) and its ``nvs`` partition read back with esptool;
* :func:`running_node` — flash a node, hand it to the tests, then stop it and check that
  the board process ended cleanly;
* :func:`node_fctry` / :func:`cloud_fctry` — the ``fctry`` partition as ``rmaker claim``
  makes it, from a lab PKI;
* :func:`publish_as_cloud` — a raw publish to a node's topic with a cloud service
  certificate, for payloads the cloud's own JSON publisher cannot send;
* ``stack`` / ``owner`` — module-scoped fixtures: the local cloud stack in test mode, and a
  user logged in to its REST API. A module binds them by assignment, as with
  :mod:`tests.cloud_fixtures`: ``stack = node_process.stack``, ``owner = node_process.owner``.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx
import pytest

from rig.boards.claim import mqtt_host_value
from rig.boards.virtual_ports import default_board_address, published_address
from rig.cloud.fctry import build_fctry, read_nvs
from rig.cloud.pki import SERVICE_IDENTITY, LabPki
from rig.cloud.stack import LocalStack
from rig.firmware.build_dir import IdfBuildDir
from rig.firmware.nvs_encryption import NvsXtsKeys
from rig.firmware.partition_table import RAINMAKER_4MB
from rig.vboard.efuse import EfuseController
from rig.vboard.node.nvs_keys import derived_nvs_keys
from tests.cloud_fixtures import MqttProbe, tls_context
from tests.vboard_process import BoardProcess, SerialMonitor, output, pinned_esptool

BOOT_S = 60.0
"""EN reset to the app's first awaited line."""
STEP_S = 60.0
"""One console or cloud step: an upper bound, as a 2-core CI host running two test modules can be slow."""
FCTRY_AT = RAINMAKER_4MB["fctry"].offset
NVS = RAINMAKER_4MB["nvs"]
RANDOM = bytes(range(64))
"""The ``fctry`` ``random`` unless a test picks its own: PoP ``00010203`` (its first 4 bytes),
service name ``PROV_3d3e3f`` (its last 3)."""
UNREACHABLE_MQTT = "127.0.0.1:9"
"""An MQTT host on a closed port (discard): for nodes whose tests need Wi-Fi or local control but no cloud."""
BOARD_LOG_ERRORS = ("Traceback", "ignored the reset", "could not listen")
"""What a board process must never log: an unhandled exception, a node task that outlived an EN
reset (``rig.vboard.node.runtime``), a flaw's debug port that found its port still taken."""

N = TypeVar("N", bound="Node")


def flash_files(build: IdfBuildDir) -> list[str | Path]:
    """*build*'s ``flasher_args.json`` files as ``write-flash`` arguments: ``OFFSET FILE ...``."""
    return [x for off, path in sorted(build.flash_files.items()) for x in (hex(off), path)]


def write_flash(board: BoardProcess, *files: str | Path) -> None:
    """esptool ``write-flash OFFSET FILE ...``, staying in download mode (through its API on a
    pinned port: see tests/vboard_process.py)."""
    proc = pinned_esptool(board.url, "--after", "no-reset", "write-flash", *files)
    assert proc.returncode == 0, output(proc)


def read_flash(board: BoardProcess, offset: int, size: int, dest: Path) -> bytes:
    """esptool ``read-flash`` into *dest*, staying in download mode; the bytes read."""
    proc = pinned_esptool(board.url, "--after", "no-reset", "read-flash", hex(offset), hex(size), dest)
    assert proc.returncode == 0, output(proc)
    return dest.read_bytes()


def erased_nvs(directory: Path) -> Path:
    """A file of 0xFF the size of the ``nvs`` partition: written at ``NVS.offset``, the node boots
    factory fresh (no Wi-Fi, no mapping, no PoP), as after ``erase-region``."""
    path = directory / "nvs-erased.bin"
    path.write_bytes(b"\xff" * NVS.size)
    return path


@dataclass
class Node:
    """A board process holding node firmware, and its console while a test uses it."""

    board: BoardProcess
    node_id: str
    monitor: SerialMonitor | None = field(default=None, kw_only=True)

    @property
    def address(self) -> str:
        """The board's own loopback address (DESIGN.md, Board): its servers and connections use it."""
        return published_address(self.board.state_dir, self.board.name) or default_board_address(self.board.name)

    def console(self) -> SerialMonitor:
        if self.monitor is None:
            self.monitor = SerialMonitor(self.board.url)
        return self.monitor

    def boot(self) -> SerialMonitor:
        """EN pulse with GPIO9 released: boot from flash; the console text starts empty."""
        mon = self.console()
        mon.text = ""
        mon.hard_reset()
        return mon

    def command(self, line: str) -> SerialMonitor:
        """Type *line* on the node's console; the console text starts empty (``""`` only clears it)."""
        mon = self.console()
        mon.text = ""
        mon.write_line(line)
        return mon

    def release(self) -> None:
        """Close the console so esptool can have the port."""
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None

    def nvs_keys(self) -> NvsXtsKeys | None:
        """The keys the board's firmware encrypts NVS with, derived from its chip's HMAC eFuse key
        (a test may read the virtual chip's files; a rig suite never can), or None before the
        firmware's first boot made one."""
        return derived_nvs_keys(EfuseController.open(self.board.efuse_path, bytes(6)))

    def read_nvs(self, dest: Path, *, encrypted: bool = True) -> dict[str, dict[str, bytes]]:
        """The ``nvs`` partition read back with esptool (into *dest*), namespace → key → value,
        decrypted with :meth:`nvs_keys` (*encrypted*: the clean firmware's NVS encryption; False
        for an image built without it). Leaves the board in download mode: the next :meth:`boot`
        resets it."""
        self.release()
        image = read_flash(self.board, NVS.offset, NVS.size, dest)
        return read_nvs(image, keys=self.nvs_keys() if encrypted else None)


@contextmanager
def running_node(node: N, *files: str | Path) -> Iterator[N]:
    """Write *files* (``OFFSET FILE ...``) to *node*'s board, hand the node over, then stop the
    board and check it exited cleanly and logged none of :data:`BOARD_LOG_ERRORS`."""
    try:
        if files:
            write_flash(node.board, *files)
        yield node
    finally:
        node.release()
        assert node.board.stop() == 0, node.board.log_text()[-3000:]
    log = node.board.log_text()
    assert not any(error in log for error in BOARD_LOG_ERRORS), log[-3000:]


def node_fctry(dest: Path, node_id: str, mqtt_host: str, pki: LabPki, random: bytes = RANDOM,
               trusted_ca: Path | None = None) -> Path:  # fmt: skip
    """The ``fctry.bin`` ``rmaker claim`` would write into *dest*: *pki*'s client certificate for
    *node_id*, *mqtt_host*, *random*, and *trusted_ca* (default: *pki*'s CA) as ``server_cert``."""
    return build_fctry(dest, node_id, mqtt_host, pki.node_cert(node_id), random, server_cert=trusted_ca or pki.ca_cert_path).bin_path


def cloud_fctry(stack: LocalStack, dest: Path, node_id: str, mqtt_host: str | None = None, trusted_ca: Path | None = None) -> Path:
    """A ``fctry`` for the local *stack*: its PKI, its broker (unless *mqtt_host* says otherwise)."""
    ep = stack.endpoints
    return node_fctry(dest, node_id, mqtt_host or mqtt_host_value(ep.mqtt_host, ep.mqtt_port), stack.pki, trusted_ca=trusted_ca)


def publish_as_cloud(stack: LocalStack, topic: str, payload: bytes) -> None:
    """Publish *payload* as is on *topic* (QoS 1, after the broker's PUBACK) with a cloud service
    certificate: the cloud's own publisher (``CloudMqtt.publish_to_node``) sends only valid JSON."""
    ep = stack.endpoints
    probe = MqttProbe(ep.mqtt_host, ep.mqtt_port, tls_context(stack.pki.ca_cert_path, stack.pki.service_cert(SERVICE_IDENTITY)),
                      f"{SERVICE_IDENTITY}-probe-{uuid.uuid4().hex[:6]}")  # fmt: skip
    try:
        assert probe.connect().accepted
        probe.publish(topic, payload)
    finally:
        probe.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """The local cloud stack in test mode (mosquitto, REST API, signer, OTA host), for one module."""
    with LocalStack(tmp_path_factory.mktemp("stack"), test_mode=True) as s:
        yield s


@dataclass
class Owner:
    """A user of the local stack, logged in: *client* carries the access token."""

    client: httpx.Client
    user_id: str


@pytest.fixture(scope="module")
def owner(stack: LocalStack) -> Iterator[Owner]:
    """A new user, logged in to the stack's REST API (``v1/login2``) as a phone app would."""
    email, password = f"owner-{uuid.uuid4().hex[:6]}@rig.test", "owner-password-1"
    user_id = stack.add_user(email, password)
    client = httpx.Client(base_url=stack.endpoints.api_url, verify=ssl.create_default_context(cafile=stack.endpoints.ca_cert),
                          timeout=60)  # fmt: skip
    login = client.post("/v1/login2", json={"user_name": email, "password": password})
    assert login.status_code == 200, login.text
    client.headers["Authorization"] = login.json()["accesstoken"]
    yield Owner(client, user_id)
    client.close()

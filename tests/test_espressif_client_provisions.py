"""Cross-check: Espressif's own provisioning client provisions a virtual board over SoftAP HTTP.

The client is esp-rainmaker-cli's ``rmaker_tools`` (``rmaker_prov/prov/prov_util.py``,
``rmaker_prov/esp_rainmaker_prov.py``, ``common/security``, ``common/transport/transport_http.py``,
``common/prov``), driven as a phone app drives a node (rainmaker-protocol.md §4, §2.1):
``proto-ver``, a ``prov-session`` handshake with the PoP from the node's QR line (security 2:
user ``wifiprov``, password = PoP; security 1 on a sec1 image), a Wi-Fi scan, ``cloud_user_assoc``,
the Wi-Fi config, apply, and status polls at the client's own pace until the node reports
Connected. The rig's code plays no part on the client side: when the two disagree, the rig's
server is what deviates (or ESP-IDF's source says otherwise, and the finding is reported).

One board process (``espressif-client``) serves the whole module. Each test boots it factory
fresh: the image under test written if the board holds another, the ``nvs`` partition
overwritten with 0xFF (no Wi-Fi, no mapping) and an EN reset, through esptool only. The
node's ``fctry`` points MQTT at a closed local port: Wi-Fi provisioning needs no cloud.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from rig.boards.virtual_ports import radio_network, write_radio_file
from rig.cloud.pki import LabPki
from rig.firmware.build_dir import IdfBuildDir
from rig.firmware.flawed_set import write_flawed_build
from rig.firmware.virtual_set import ensure_virtual_set
from tests import espressif_prov_client
from tests.node_process import (
    BOOT_S,
    FCTRY_AT,
    NVS,
    STEP_S,
    UNREACHABLE_MQTT,
    Node,
    erased_nvs,
    flash_files,
    node_fctry,
    running_node,
    write_flash,
)
from tests.vboard_process import SerialMonitor, start_board

prov_util: ModuleType = espressif_prov_client.module("rmaker_prov.prov.prov_util")
rainmaker_prov: ModuleType = espressif_prov_client.module("rmaker_prov.esp_rainmaker_prov")

BOARD = "espressif-client"
SSID, PASSPHRASE = "espressif-lab", "espressif-lab-passphrase"
NEIGHBOUR = radio_network("neighbour-open", "", "open", 11)
LAB_AP = radio_network(SSID, PASSPHRASE)
RANDOM = bytes(range(0x40, 0x80))
"""fctry ``random``: PoP ``40414243`` (first 4 bytes), service name ``PROV_7d7e7f`` (last 3)."""
POP, SERVICE_NAME = "40414243", "PROV_7d7e7f"
HTTP_PORT = 80
PROV_VERSION = "v1.1"
"""``WIFI_PROV_MGR_VERSION`` (esp-idf ``components/wifi_provisioning/src/manager.c``)."""
CLIENT_POLL_S = 5.0
"""esp_rainmaker_prov ``provision_device``'s ``wait_for_wifi_connection``: five seconds before
each status request. (Espressif's Android library waits 2 s after apply, then 5 s between polls.)
Part of the client's behaviour under test, not a synchronisation."""
CONNECT_S = 60.0
DONE_S = 10.0
"""Client read Connected → service stopped: the manager's cleanup delay (1 s) plus slack."""
QR_LINE = re.compile(r"QRCODE: (\{[^\r\n]*\})\r\n")
MISMATCH_LINE = re.compile(r"E \(\d+\) app_network: Received incorrect PoP or invalid security params! event: 2\r\n")


@dataclass
class Images:
    base: IdfBuildDir
    sec1: IdfBuildDir
    """The virtual ``base`` with no flaws and ``prov_security`` 1 (rig.firmware.flawed_set)."""


@dataclass
class VirtualNode(Node):
    """The module's board: which image it holds, the QR its last boot printed."""

    blank_nvs: Path
    image: IdfBuildDir | None = None
    qr: dict[str, str] = field(default_factory=dict)

    def boot_fresh(self, image: IdfBuildDir) -> SerialMonitor:
        """Factory state for *image*: write it if the board holds another, erase ``nvs``, reset,
        and wait for the provisioning QR block."""
        self.release()
        files: list[str | Path] = [] if image is self.image else flash_files(image)
        write_flash(self.board, *files, hex(NVS.offset), self.blank_nvs)
        self.image = image
        mon = self.boot()
        match = mon.expect(QR_LINE.pattern, BOOT_S)
        mon.expect(r"Provisioning will auto stop after \d+ minute\(s\)\.", STEP_S)
        self.qr = json.loads(match.group(1))
        return mon


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    root = tmp_path_factory.mktemp("espressif-client-set")
    base = ensure_virtual_set(root / "virtual", root / "sbv2.pem").build("base")
    sec1 = write_flawed_build(root / "sec1", [], root / "sbv2.pem", prov_security=1)
    return Images(base, sec1)


@pytest.fixture(scope="module")
def node(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[VirtualNode]:
    state = tmp_path_factory.mktemp("espressif-client-lab")
    write_radio_file(state, [LAB_AP, NEIGHBOUR])
    node_id = f"espressif-client-{uuid.uuid4().hex[:8]}"
    # no broker: the node joins Wi-Fi and then fails to reach MQTT, which these tests do not judge
    fctry = node_fctry(state / "fctry", node_id, UNREACHABLE_MQTT, LabPki(state / "pki"), RANDOM)
    blank = erased_nvs(state)
    virtual = VirtualNode(start_board(BOARD, state), node_id, blank, images.base)
    with running_node(virtual, *flash_files(images.base), hex(FCTRY_AT), fctry):
        yield virtual


# --------------------------------------------------------------------------- Espressif's client


@dataclass
class Onboarding:
    """What Espressif's client saw while provisioning."""

    version: dict[str, Any]
    access_points: list[dict[str, Any]]
    assoc_status: int
    node_id: str
    polls: list[str]


def espressif_transport(address: str) -> Any:
    """Their SoftAP HTTP transport on the node's address (a phone on the SoftAP uses 192.168.4.1:80)."""
    return prov_util.get_transport("softap", f"{address}:{HTTP_PORT}")


def espressif_security(transport: Any, sec_ver: int, pop: str, username: str = "") -> Any:
    """Their security object as ``provision_device`` builds it: sec2 takes the advertised
    patch version, the user name (default ``wifiprov``) and the PoP as SRP6a password."""
    if sec_ver == 2:
        patch = prov_util.get_sec_patch_ver(transport)
        return prov_util.get_security(2, patch, username or "wifiprov", pop, pop)
    return prov_util.get_security(sec_ver, 0, "", "", pop)


def wait_connected(transport: Any, security: Any, timeout: float = CONNECT_S) -> list[str]:
    """Status polls at the client's pace until it reads something other than ``connecting``."""
    polls: list[str] = []
    deadline = time.monotonic() + timeout
    while not polls or polls[-1] == "connecting":
        assert time.monotonic() < deadline, f"Espressif's client still read 'connecting' after {timeout} s: {polls}"
        time.sleep(CLIENT_POLL_S)
        polls.append(prov_util.get_wifi_config(transport, security))
    return polls


def espressif_onboards(address: str, pop: str, username: str, user_id: str, secret: str) -> Onboarding:
    """Version check, session, scan, user association, Wi-Fi config, apply, status polls —
    every step one of Espressif's functions."""
    transport = espressif_transport(address)
    version = json.loads(prov_util.get_version(transport))
    assert prov_util.version_match(transport, PROV_VERSION) is True
    assert prov_util.has_capability(transport, "wifi_scan") is True
    security = espressif_security(transport, version["prov"]["sec_ver"], pop, username)
    assert prov_util.establish_session(transport, security) is True
    access_points = prov_util.scan_wifi_APs("softap", transport, security)
    assoc_status, node_id = rainmaker_prov.custom_config(transport, security, user_id, secret)
    assert prov_util.send_wifi_config(transport, security, SSID, PASSPHRASE) is True
    assert prov_util.apply_wifi_config(transport, security) is True
    polls = wait_connected(transport, security)
    return Onboarding(version, access_points, assoc_status, node_id, polls)


def scanned(ap: Any) -> dict[str, Any]:
    """A radio-file access point as their scan list shows it."""
    auth = {"open": "Open", "wpa2_psk": "WPA2_PSK"}[ap.auth]
    return {"ssid": ap.ssid, "bssid": ap.bssid.replace(":", ""), "channel": ap.channel, "rssi": ap.rssi, "auth": auth}


def assert_joined(node: VirtualNode, mon: SerialMonitor, onboarding: Onboarding, user_id: str, secret: str) -> None:
    assert onboarding.polls[-1] == "connected", f"Espressif's client read {onboarding.polls}"
    assert onboarding.assoc_status == 0 and onboarding.node_id == node.node_id  # RMakerConfigStatus Success, the fctry node id
    assert scanned(LAB_AP) in onboarding.access_points and scanned(NEIGHBOUR) in onboarding.access_points
    mon.expect(rf"I \(\d+\) app_network: Connected with IP Address:{re.escape(node.address)}\r\n", STEP_S)
    mon.expect(r"esp_rmaker_core: Waiting for MQTT connection\r\n", STEP_S)
    assert "I (" in mon.text and "app_network: Secured session established!\r\n" in mon.text
    assert f"app_wifi: Received Wi-Fi credentials\r\n\tSSID     : {SSID}\r\n" in mon.text
    assert "app_wifi: Provisioning successful\r\n" in mon.text
    assert f"esp_rmaker_user_mapping: Got user_id = {user_id}, secret_key = {secret}\r\n" in mon.text
    assert PASSPHRASE not in mon.text and "Password" not in mon.text
    assert "Received incorrect PoP" not in mon.text
    # reading Connected ends provisioning (get_status_handler -> wifi_prov_mgr_done), well before the 30 s auto-stop
    mon.expect(r"I \(\d+\) network_prov_mgr: Provisioning stopped\r\n", DONE_S)


# --------------------------------------------------------------------------- tests


def test_security2_image_is_provisioned_by_espressifs_client(node: VirtualNode, images: Images) -> None:
    mon = node.boot_fresh(images.base)
    assert node.qr == {"ver": "v1", "name": SERVICE_NAME, "username": "wifiprov", "pop": POP, "transport": "softap"}
    user_id, secret = f"user-{uuid.uuid4().hex[:10]}", str(uuid.uuid4())
    onboarding = espressif_onboards(node.address, node.qr["pop"], node.qr["username"], user_id, secret)
    prov = onboarding.version["prov"]
    assert (prov["ver"], prov["sec_ver"], prov["sec_patch_ver"]) == (PROV_VERSION, 2, 1)
    assert "wifi_scan" in prov["cap"] and "no_sec" not in prov["cap"] and "no_pop" not in prov["cap"]
    assert_joined(node, mon, onboarding, user_id, secret)


def test_security1_image_is_provisioned_by_espressifs_client(node: VirtualNode, images: Images) -> None:
    mon = node.boot_fresh(images.sec1)
    assert node.qr == {"ver": "v1", "name": SERVICE_NAME, "pop": POP, "transport": "softap"}
    user_id, secret = f"user-{uuid.uuid4().hex[:10]}", str(uuid.uuid4())
    onboarding = espressif_onboards(node.address, node.qr["pop"], "", user_id, secret)
    prov = onboarding.version["prov"]
    assert (prov["ver"], prov["sec_ver"]) == (PROV_VERSION, 1) and prov.get("sec_patch_ver", 0) == 0
    assert "wifi_scan" in prov["cap"] and "no_pop" not in prov["cap"]
    assert_joined(node, mon, onboarding, user_id, secret)


@pytest.mark.parametrize("image_name", ["base", "sec1"])
def test_espressifs_client_with_a_wrong_pop_gets_no_session(node: VirtualNode, images: Images, image_name: str) -> None:
    image = getattr(images, image_name)
    mon = node.boot_fresh(image)
    wrong = POP[:-1] + ("0" if POP[-1] != "0" else "1")
    transport = espressif_transport(node.address)
    sec_ver = json.loads(prov_util.get_version(transport))["prov"]["sec_ver"]
    security = espressif_security(transport, sec_ver, wrong, node.qr.get("username", ""))
    with pytest.raises(RuntimeError, match="Connection Failure"):  # the handshake fails, esp_http_server drops the socket
        prov_util.establish_session(transport, security)
    mon.expect(MISMATCH_LINE.pattern, STEP_S)
    assert "Secured session established!" not in mon.text and "Received Wi-Fi credentials" not in mon.text


@pytest.mark.parametrize("image_name", ["sec1", "base"])
def test_espressifs_provision_device_detects_the_scheme_and_provisions(node: VirtualNode, images: Images, image_name: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """Their whole ``provision_device`` (what ``esp-rainmaker-cli provision`` runs): scheme from
    ``proto-ver``, session, ``cloud_user_assoc``, Wi-Fi config, apply, its own status loop."""
    mon = node.boot_fresh(getattr(images, image_name))
    joined = prov_util.get_transport
    # a phone on the node's SoftAP reaches 192.168.4.1:80; the virtual node is at its own address
    monkeypatch.setattr(prov_util, "get_transport", lambda mode, _name: joined(mode, f"{node.address}:{HTTP_PORT}"))
    user_id, secret = f"user-{uuid.uuid4().hex[:10]}", str(uuid.uuid4())
    result = rainmaker_prov.provision_device("softap", node.qr["pop"], user_id, secret, SSID, PASSPHRASE, no_retry=True)
    assert result == (node.node_id, False)  # node id from cloud_user_assoc, no challenge-response
    mon.expect(rf"app_network: Connected with IP Address:{re.escape(node.address)}\r\n", STEP_S)
    mon.expect(r"network_prov_mgr: Provisioning stopped\r\n", DONE_S)
    assert f"esp_rmaker_user_mapping: Got user_id = {user_id}, secret_key = {secret}\r\n" in mon.text

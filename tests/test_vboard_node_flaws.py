"""Each flaw the node firmware implements, observed from outside — beside a clean board in the
same situation that does not show it.

Both boards get a ``fctry`` whose ``server_cert`` is a *rogue* CA (not the one that issued
the broker's certificate) and the same Wi-Fi; the flawed image (``rig.firmware.flawed_set``:
the virtual ``base`` with flaws) carries ``logs_wifi_password``, ``plaintext_mqtt`` (its
plaintext port pointed at a listener of this test), ``no_server_cert_check``,
``open_debug_port``, ``panics_on_bad_params``, ``factory_reset_keeps_wifi`` and
``no_reconnect_backoff``. What is looked at: the UART, the listener, a TCP connect to the
board's address, the cloud's store, esptool's read-back of ``nvs``.
"""

from __future__ import annotations

import itertools
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rig.boards.virtual_ports import radio_network, write_radio_file
from rig.cloud.adversaries import MqttConnect, parse_mqtt_connect
from rig.cloud.pki import LabPki
from rig.cloud.stack import LocalStack
from rig.firmware.build_dir import read_build_dir
from rig.firmware.firmware_set import FirmwareSet
from rig.firmware.flawed_set import write_flawed_build
from rig.firmware.virtual_set import ensure_virtual_set
from rig.vboard.flaws import check_flaws
from rig.vboard.node.debug_port import BANNER, DEBUG_PORT
from tests import node_process
from tests.node_process import BOOT_S, FCTRY_AT, STEP_S, Node, cloud_fctry, flash_files, publish_as_cloud, running_node, write_flash
from tests.vboard_process import start_board

SSID, PASSPHRASE = "flaw-lab", "flaw-lab-passphrase"
FLAWS = ("logs_wifi_password", "plaintext_mqtt", "no_server_cert_check", "open_debug_port",
         "panics_on_bad_params", "factory_reset_keeps_wifi", "no_reconnect_backoff")  # fmt: skip
ERROR_LINE = re.compile(r"E \((\d+)\) esp_mqtt_glue: MQTT_EVENT_ERROR\r\n")


@dataclass
class PlainListener:
    """A plaintext "broker" on the broker's host: records the CONNECT each client sends, then hangs up."""

    sock: socket.socket
    connects: list[tuple[str, MqttConnect | None]] = field(default_factory=list)
    changed: threading.Condition = field(default_factory=threading.Condition)

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1])

    def serve(self) -> None:
        while True:
            try:
                conn, (host, _port) = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                data = b""
                try:
                    while len(data) < 4096 and parse_mqtt_connect(data) is None:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                except OSError:
                    pass
            with self.changed:
                self.connects.append((host, parse_mqtt_connect(data)))
                self.changed.notify_all()

    def wait_from(self, host: str, timeout: float) -> MqttConnect | None:
        with self.changed:
            assert self.changed.wait_for(lambda: any(h == host for h, _ in self.connects), timeout), \
                f"no plaintext connection from {host} within {timeout} s"  # fmt: skip
            return next(c for h, c in self.connects if h == host)


stack = node_process.stack


@pytest.fixture(scope="module")
def listener() -> Iterator[PlainListener]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    plain = PlainListener(sock)
    threading.Thread(target=plain.serve, daemon=True).start()
    yield plain
    sock.close()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("flaw-state")
    write_radio_file(state, [radio_network(SSID, PASSPHRASE)])
    return state


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory, listener: PlainListener) -> tuple[FirmwareSet, Path]:
    root = tmp_path_factory.mktemp("flaw-set")
    clean = ensure_virtual_set(root / "virtual", root / "sbv2.pem")
    check_flaws(FLAWS)
    flawed = write_flawed_build(root / "flawed", FLAWS, root / "sbv2.pem", extra={"plaintext_mqtt_port": listener.port})
    return clean, flawed.path


def rogue_fctry(stack: LocalStack, dest: Path, node_id: str, mqtt_host: str | None = None) -> Path:
    """A fctry whose trust anchor is a CA that never issued the broker's certificate."""
    return cloud_fctry(stack, dest / "fctry", node_id, mqtt_host, trusted_ca=LabPki(dest / "rogue-pki").ca_cert_path)


@pytest.fixture(scope="module")
def flawed(stack: LocalStack, builds: tuple[FirmwareSet, Path], lab: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node_id = f"flawed-{uuid.uuid4().hex[:8]}"
    fctry = rogue_fctry(stack, tmp_path_factory.mktemp("f"), node_id)
    with running_node(Node(start_board("flawed-1", lab), node_id), *flash_files(read_build_dir(builds[1])), hex(FCTRY_AT), fctry) as node:
        yield node


@pytest.fixture(scope="module")
def strict(stack: LocalStack, builds: tuple[FirmwareSet, Path], lab: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node_id = f"strict-{uuid.uuid4().hex[:8]}"
    fctry = rogue_fctry(stack, tmp_path_factory.mktemp("s"), node_id)
    with running_node(Node(start_board("strict-1", lab), node_id), *flash_files(builds[0].build("base")), hex(FCTRY_AT), fctry) as node:
        yield node


def provision(node: Node) -> str:
    mon = node.boot()
    mon.expect(r"Provisioning will auto stop after 30 minute", BOOT_S)
    mon.text = ""
    mon.write_line(f"wifi-prov {SSID} {PASSPHRASE}")
    mon.expect(r"app_network: Connected with IP Address:", STEP_S)
    return mon.text


def error_times(text: str) -> list[int]:
    return [int(m.group(1)) for m in ERROR_LINE.finditer(text)]


# --------------------------------------------------------------------------- the clean board


def test_clean_board_keeps_secrets_verifies_the_server_and_backs_off(strict: Node, listener: PlainListener) -> None:
    text = provision(strict)
    assert "Password" not in text and PASSPHRASE not in text.replace(f"wifi-prov {SSID} {PASSPHRASE}", "")
    mon = strict.console()
    mon.expect(r"(?s)(MQTT_EVENT_ERROR.*){3}", 30)  # three refused attempts: backoff 1-2 s, then 2-4 s
    assert "esp-tls-mbedtls: Failed to verify peer certificate!" in mon.text
    assert "esp_mqtt_glue: MQTT Connected" not in mon.text
    times = error_times(mon.text)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert gaps[0] >= 1000 and gaps[1] >= 2000, f"no exponential backoff: {gaps} ms between attempts"
    address = strict.address
    assert all(host != address for host, _ in listener.connects)  # never tried MQTT in plaintext
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((address, DEBUG_PORT), timeout=5).close()


# --------------------------------------------------------------------------- the flawed board, in order


def test_flawed_board_logs_the_passphrase(flawed: Node) -> None:
    text = provision(flawed)
    assert f"app_wifi: Received Wi-Fi credentials\r\n\tSSID     : {SSID}\r\n\tPassword : {PASSPHRASE}\r\n" in text


def test_flawed_board_sends_its_connect_in_plaintext_then_trusts_any_server(flawed: Node, listener: PlainListener,
                                                                            stack: LocalStack) -> None:  # fmt: skip
    connect = listener.wait_from(flawed.address, STEP_S)
    assert connect is not None and connect.client_id == flawed.node_id and connect.username is not None
    assert connect.username.startswith("?Platform=APN3|")
    assert stack.mqtt is not None
    flawed.console().expect(r"esp_mqtt_glue: MQTT Connected\r\n", STEP_S)  # the rogue CA did not stop it
    assert stack.mqtt.wait_handled(flawed.node_id, "config", timeout=STEP_S).accepted


def test_flawed_board_has_an_open_debug_port(flawed: Node) -> None:
    with socket.create_connection((flawed.address, DEBUG_PORT), timeout=5) as conn:
        conn.settimeout(5)
        assert conn.recv(len(BANNER)) == BANNER


def test_flawed_board_panics_on_malformed_params(flawed: Node, stack: LocalStack) -> None:
    assert stack.mqtt is not None
    # params/local/init goes out right after the SUBSCRIBE to params/remote, on the same connection
    stack.mqtt.wait_handled(flawed.node_id, "params/local/init", timeout=STEP_S)
    mon = flawed.console()
    mon.text = ""
    publish_as_cloud(stack, f"node/{flawed.node_id}/params/remote", b'{"Switch":{"Power":tru')
    mon.expect(r"Guru Meditation Error: Core  0 panic'ed \(Load access fault\)\. Exception was unhandled\.", STEP_S)
    mon.expect(r"Rebooting\.\.\.\r\n", STEP_S)
    mon.expect(r"rst:0xc \(RTC_SW_CPU_RST\)", STEP_S)
    mon.expect(r"app_wifi: Already provisioned, starting Wi-Fi STA", BOOT_S)
    # the reset closed the old listener, so the new boot could listen again on the same port
    with socket.create_connection((flawed.address, DEBUG_PORT), timeout=5) as conn:
        conn.settimeout(5)
        assert conn.recv(len(BANNER)) == BANNER


def test_flawed_factory_reset_keeps_wifi(flawed: Node, tmp_path: Path) -> None:
    flawed.command("set-param Switch Power true").expect(r"Successfully set Switch\.Power to true", STEP_S)
    mon = flawed.command("reset-to-factory")
    mon.expect(r"rst:0xc \(RTC_SW_CPU_RST\)", STEP_S)
    mon.expect(r"app_wifi: Already provisioned, starting Wi-Fi STA", BOOT_S)  # a clean node provisions again
    nvs = flawed.read_nvs(tmp_path / "nvs.bin")
    assert nvs["nvs.net80211"]["sta.pswd"].rstrip(b"\0") == PASSPHRASE.encode()  # kept: the flaw
    assert nvs["Switch"]["Power"] == bytes([1, 0, 0, 0, 0, 0, 0, 0])  # the rest was erased: back to the default


def test_flawed_board_reconnects_without_backoff(flawed: Node, stack: LocalStack, tmp_path: Path) -> None:
    with socket.socket() as probe:  # a port nothing listens on: every attempt is refused
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    write_flash(flawed.board, hex(FCTRY_AT), rogue_fctry(stack, tmp_path, flawed.node_id, f"127.0.0.1:{closed}"))
    mon = flawed.boot()
    mon.expect(r"(?s)(MQTT_EVENT_ERROR.*){10}", STEP_S)
    times = error_times(mon.text)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert max(gaps) < 1000, f"the flawed node was expected to retry at once, gaps {gaps} ms"
    assert "delayed connect error: Connection refused" in mon.text

"""Provisioning over the serial console: ESP-IDF's ``protocomm_console`` on the virtual node, and the
rig's :class:`rig.prov.transport_console.ConsoleTransport` that drives it.

The line protocol (esp-idf ``components/protocomm/src/transports/protocomm_console.c``, esp_prov
``tools/esp_prov/transport/transport_console.py``): a request is ``<endpoint> <session id> <hex>``
and CR; the answer ``\\r\\n<hex>\\r\\n``; a refused request prints no answer (RainMaker's console task
then prints ``rmaker_console: Console command failed with error: <esp_err_t>``).

* Known answers for both ends of the framing, in process: the device's ``atoi`` / ``hex2bin`` /
  answer line, the client's request line, answer parsing and errors, through a pyserial-like port
  and a pexpect-like dut; the node's endpoint commands on its console (a default image has none).
* A ``rig.vboard.serve`` board (``console-prov``) booted factory fresh per test through esptool: a
  security 1 image and a security 2 image (with a console keeping long lines) provisioned through
  the console — by ``provision_wifi`` over the rig's RFC 2217 client and over a pexpect dut — until the
  node reports its IP address on that same console; a wrong PoP that never yields a session; a
  security 2 image with ESP-IDF's 254-character console, where the handshake cannot cross; and
  Espressif's own console transport (esp-rainmaker-cli ``rmaker_tools``) typing its lines.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pexpect
import pexpect.fdpexpect
import pytest
import serial

from rig.boards import serial_url_handlers
from rig.boards.virtual_ports import radio_network, write_radio_file
from rig.cloud.pki import LabPki
from rig.firmware.behaviour import BehaviourManifest
from rig.firmware.build_dir import IdfBuildDir
from rig.firmware.flawed_set import write_flawed_build
from rig.firmware.partition_table import RAINMAKER_4MB
from rig.firmware.virtual_set import ensure_virtual_set
from rig.protocomm.endpoints import provisioning_version
from rig.protocomm.messages import WifiStationState
from rig.prov.provisioner import ProvisioningClient, ProvisioningError, provision_wifi
from rig.prov.transport_console import (
    RESPONSE_LINE,
    ConsoleTransport,
    ConsoleTransportError,
    DutLink,
    SerialLink,
    TransportError,
    as_link,
    parse_response,
    request_line,
)
from rig.vboard.app import AppContext, ConsoleCommands
from rig.vboard.bootloader import BootOutcome, PartitionEntry
from rig.vboard.flash import FlashStorage
from rig.vboard.node import provisioning
from rig.vboard.node.node import NodePlatform, RainMakerNode
from rig.vboard.node.prov_console import (
    DEFAULT_LINE_MAX,
    NO_SESSION_ID,
    console_enabled,
    console_line_max,
    hex_to_bytes,
    parse_session_id,
    response_text,
)
from rig.vboard.node.prov_transport import EXAMPLE_POP
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

BOARD = "console-prov"
SSID, PASSPHRASE = "console-lab", "console-lab-passphrase"
LAB_AP = radio_network(SSID, PASSPHRASE)
RANDOM = bytes(range(0x20, 0x60))
"""fctry ``random``: PoP ``20212223`` (its first 4 bytes), service name ``PROV_5d5e5f`` (its last 3)."""
POP = "20212223"
WRONG_POP = "20212224"
LONG_LINES = 4096
"""``prov_console_line_max`` of the security 2 image whose console keeps long lines."""
CONNECT_S = 60.0
QR_LINE = re.compile(r"QRCODE: (\{[^\r\n]*\})\r\n")
MISMATCH_LINE = r"E \(\d+\) app_network: Received incorrect PoP or invalid security params! event: 2\r\n"
SEC1_VERSION = '{"prov":{"ver":"v1.1","sec_ver":1,"cap":["wifi_scan"]},"rmaker":{"ver":"1.0","cap":["wifi_scan"]}}'
SEC2_VERSION = '{"prov":{"ver":"v1.1","sec_ver":2,"sec_patch_ver":1,"cap":["wifi_scan"]},"rmaker":{"ver":"1.0","cap":["wifi_scan"]}}'


# =========================================================================== framing, device side


def test_device_reads_the_session_id_as_atoi_does() -> None:
    assert parse_session_id("0") == 0
    assert parse_session_id("123456") == 123456
    assert parse_session_id("  +42x") == 42  # blanks, sign, digits up to the first other character
    assert parse_session_id("abc") == 0 and parse_session_id("") == 0
    assert parse_session_id("-1") == NO_SESSION_ID == 0xFFFFFFFF  # int -1 as uint32_t: "no session"
    assert parse_session_id("99999999999") == 0x7FFFFFFF  # newlib's strtol clamps to LONG_MAX
    assert parse_session_id("-99999999999") == 0x80000000


def test_device_reads_the_payload_as_hex2bin_does() -> None:
    assert hex_to_bytes("2d2d2d") == b"---"
    assert hex_to_bytes("0aFF") == b"\x0a\xff"  # sscanf %hhx takes either case
    assert hex_to_bytes("abc") == b"\xab"  # an odd last digit is ignored
    assert hex_to_bytes("0g1z") == b"\x00\x01"  # a pair is read as far as it is hex
    assert hex_to_bytes("zz41") == b"\x00\x41"  # an unreadable pair leaves its byte unset (0 here)
    assert hex_to_bytes("") == b""


def test_device_answer_is_one_line_of_lower_case_hex_between_crlfs() -> None:
    assert response_text(b"{}") == "\r\n7b7d\r\n"
    assert response_text(bytes([0, 0xAB, 0x10])) == "\r\n00ab10\r\n"


def test_only_the_manifest_turns_the_console_transport_on() -> None:
    assert not console_enabled(BehaviourManifest().extra)  # RainMaker's app_network offers SoftAP and BLE only
    assert console_enabled({"prov_console": True})
    assert not console_enabled({"prov_console": 1}) and not console_enabled({"prov_console": "yes"})
    assert console_line_max({}) == DEFAULT_LINE_MAX == 254  # rmaker_console.c: linebuf[256], the CR dropped
    assert console_line_max({"prov_console_line_max": 4096}) == 4096
    assert console_line_max({"prov_console_line_max": True}) == console_line_max({"prov_console_line_max": 3}) == 254


# =========================================================================== framing, client side


class ScriptedPort:
    """A pyserial port whose board answers each written line from a script (bytes, or nothing)."""

    def __init__(self, *answers: bytes, noise: bytes = b"") -> None:
        self.timeout: float | None = None
        self.written: list[bytes] = []
        self._answers = list(answers)
        self._rx = bytearray(noise)

    @property
    def in_waiting(self) -> int:
        return len(self._rx)

    def read(self, size: int = 1) -> bytes:
        if not self._rx and self.timeout:
            time.sleep(self.timeout)  # pyserial's read waits out its timeout when nothing comes
        data = bytes(self._rx[:size])
        del self._rx[:size]
        return data

    def write(self, data: bytes) -> int:
        self.written.append(bytes(data))
        if self._answers:
            self._rx += self._answers.pop(0)
        return len(data)


def test_request_line_and_answer_known_answer() -> None:
    assert request_line("proto-ver", 0, b"---") == "proto-ver 0 2d2d2d"
    json_hex = SEC1_VERSION.encode().hex()
    # what the virtual node prints (newlib: CRLF) and a chip prints (CR CR LF), prompt and a log line around it
    for answer in (f"\n\r\n{json_hex}\r\n\n>> ".encode(), f"\r\n\r\r\n{json_hex}\r\r\n\n>> ".encode()):
        port = ScriptedPort(b"I (812) app_wifi: unrelated\r\n" + answer, noise=b">> old output\r\n")
        transport = ConsoleTransport(port, session_id=7)
        assert transport.send("proto-ver", b"---") == SEC1_VERSION.encode()
        assert port.written == [b"proto-ver 7 2d2d2d\r"]  # one line, CR only: a LF would start the next command
        assert port.timeout == 0.05  # read in short slices, set once
        link = transport.link
        assert isinstance(link, SerialLink) and link.text().startswith(">> old output\r\n")  # skipped, kept in the transcript


def test_a_random_session_id_per_transport_and_a_new_one_on_forget() -> None:
    one, two = ConsoleTransport(ScriptedPort()), ConsoleTransport(ScriptedPort())
    assert 1 <= one.session_id <= 2**31 - 1 and one.session_id != two.session_id
    before = one.session_id
    one.forget_session()
    assert one.session_id != before
    with pytest.raises(ValueError, match="atoi"):
        ConsoleTransport(ScriptedPort(), session_id=2**31)


def test_the_consoles_failure_report_is_an_error_naming_endpoint_and_esp_err() -> None:
    port = ScriptedPort(b"\nE (90) app_network: Received incorrect PoP or invalid security params! event: 2\n"
                        b"rmaker_console: Console command failed with error: -1\n\n>> ")  # fmt: skip
    with pytest.raises(ConsoleTransportError) as caught:
        ConsoleTransport(port, session_id=3).send("prov-session", b"\x08\x01")
    error = caught.value
    assert isinstance(error, TransportError) and error.status is None and error.esp_err == -1
    assert error.endpoint == "prov-session" and port.written == [b"prov-session 3 0801\r"]
    assert str(error).startswith("console prov-session: the device's console reported error -1 (ESP_FAIL) and no answer. Fix:")
    assert "wrong PoP" in error.fix
    port = ScriptedPort(b"\nrmaker_console: Console command failed with error: 259\n")
    with pytest.raises(ConsoleTransportError, match=r"error 259 \(ESP_ERR_INVALID_STATE\).*handshake") as caught:
        ConsoleTransport(port).send("prov-config", b"\x00")
    assert caught.value.esp_err == 259


def test_no_answer_is_a_timeout_naming_the_endpoint() -> None:
    port = ScriptedPort(b"\n>> ")  # protocomm_console's own task prints nothing for a refused request
    started = time.monotonic()
    with pytest.raises(ConsoleTransportError) as caught:
        ConsoleTransport(port, timeout=0.3).send("prov-config", b"\x01\x02")
    assert 0.3 <= time.monotonic() - started < 3
    assert caught.value.esp_err is None and caught.value.endpoint == "prov-config"
    assert str(caught.value).startswith("console prov-config: no answer within 0.3 s. Fix:")


def test_a_malformed_answer_line_is_an_error() -> None:
    port = ScriptedPort(b"\r\n7b7d7\r\n")  # the last digit of a byte missing
    with pytest.raises(ConsoleTransportError, match=r"malformed response line '7b7d7': 5 hex digits are not whole bytes") as caught:
        ConsoleTransport(port).send("proto-ver", b"---")
    assert caught.value.line == "7b7d7"
    assert parse_response("x", "0aff") == b"\x0a\xff"
    with pytest.raises(ConsoleTransportError, match="not hex"):
        parse_response("x", "zz")


def test_requests_the_device_cannot_take_are_refused_before_anything_is_sent() -> None:
    port = ScriptedPort()
    transport = ConsoleTransport(port, session_id=10)
    with pytest.raises(ConsoleTransportError, match=r"request line is 256 characters.*keeps 254.*SoftAP or BLE"):
        transport.send("prov-session", bytes(120))  # "prov-session 10 " + 240 hex digits
    with pytest.raises(ConsoleTransportError, match="empty payload"):
        transport.send("proto-ver", b"")
    with pytest.raises(ConsoleTransportError, match="one console word"):
        transport.send("prov session", b"\x00")
    assert port.written == []
    port = ScriptedPort(b"\r\n00\r\n")
    assert ConsoleTransport(port, session_id=10).send("prov-session", bytes(119)) == b"\x00"  # 254 characters: sent
    assert len(port.written[0]) == 254 + 1


class ExpectDut:
    """A pexpect-style dut on a byte buffer: ``write(bytes)``; ``expect`` consumes up to the match or
    raises pexpect's TIMEOUT, as pytest-embedded's ``dut`` does."""

    def __init__(self, output: bytes) -> None:
        self.buffer = output
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def expect(self, pattern: re.Pattern[bytes], timeout: float = 30) -> re.Match[bytes]:
        found = pattern.search(self.buffer)
        if found is None:
            raise pexpect.TIMEOUT(f"Not found {pattern!r}")
        self.buffer = self.buffer[found.end():]
        return found


def test_dut_link_known_answer() -> None:
    dut = ExpectDut(b">> proto-ver 9 2d2d2d\r\n\r\r\n7b7d\r\r\n\n>> ")  # a chip echoes the line it read
    transport = ConsoleTransport(dut, session_id=9)
    assert isinstance(transport.link, DutLink)
    assert transport.send("proto-ver", b"---") == b"{}"
    assert dut.written == [b"proto-ver 9 2d2d2d\r"]  # bytes: pytest-embedded's SerialDut adds no LF to bytes
    assert dut.buffer == b"\n>> "  # consumed up to the answer line
    dut = ExpectDut(b"\nrmaker_console: Console command failed with error: 258\n")
    with pytest.raises(ConsoleTransportError, match=r"error 258 \(ESP_ERR_INVALID_ARG\)"):
        ConsoleTransport(dut).send("prov-config", b"\x00")
    with pytest.raises(ConsoleTransportError, match="no answer within"):
        ConsoleTransport(ExpectDut(b"I (5) tag: 7b7d\r\n"), timeout=0.1).send("proto-ver", b"---")  # hex in a log line is no answer
    link = DutLink(ExpectDut(b"abc\r\n0aff\r\n"))
    found = link.read_line_matching(RESPONSE_LINE, 1)
    assert found is not None and found.group("hex") == "abc"  # a whole line, however odd: the transport judges it


def test_as_link_names_what_it_accepts() -> None:
    assert isinstance(as_link(ScriptedPort()), SerialLink)
    assert isinstance(as_link(ExpectDut(b"")), DutLink)
    link = DutLink(ExpectDut(b""))
    assert as_link(link) is link
    with pytest.raises(TypeError, match=r"pyserial port .* pytest-embedded dut .* ConsoleLink"):
        as_link(object())


# =========================================================================== the node's endpoint commands, in process


class RecordingConsole:
    """The node's UART as text (``\\n`` line ends, as the node writes them)."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.out: list[str] = []

    def write(self, text: str) -> None:
        self.out.append(text)

    def read_line(self, timeout: float) -> str | None:
        return None

    def uptime_ms(self) -> int:
        return 0

    def log(self, level: str, tag: str, text: str) -> None:
        self.out.append(f"{level} (0) {tag}: {text}\n")

    def take(self) -> str:
        text, self.out = "".join(self.out), []
        return text


class ConsoleTask:
    """:class:`ConsoleLink` straight into a node's command list, as RainMaker's console task runs a
    line: ``\\n`` after the line, the command, the failure report for a non-zero return."""

    def __init__(self, ctx: AppContext, console: RecordingConsole) -> None:
        self.ctx = ctx
        self.console = console

    def write_line(self, line: str) -> None:
        self.console.write("\n")
        result = self.ctx.commands.run(line)
        if result:
            self.console.write(f"rmaker_console: Console command failed with error: {result}\n")
        self.console.write("\n>> ")

    def read_line_matching(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        for line in self.console.take().split("\n"):
            found = pattern.fullmatch(line.strip("\r"))
            if found is not None:
                return found
        return None


@dataclass
class InProcessNode:
    node: RainMakerNode
    ctx: AppContext
    console: RecordingConsole
    service: provisioning.ProvisioningService

    def run(self, line: str) -> tuple[object, str]:
        result = self.ctx.commands.run(line)
        return result, self.console.take()


@pytest.fixture
def in_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """A node booted with *extra* in its manifest, in provisioning (PoP ``abcd1234``: ``static_pop``,
    no fctry needed), its SoftAP server on a free port."""
    monkeypatch.setattr(provisioning, "HTTP_PORT", 0)
    made: list[tuple[RainMakerNode, FlashStorage]] = []

    def make(extra: dict[str, object], prov_security: int = 1) -> InProcessNode:
        console = RecordingConsole()
        partitions = tuple(PartitionEntry(i, p.name, p.type, p.subtype, p.offset, p.size) for i, p in enumerate(RAINMAKER_4MB.partitions))
        manifest = BehaviourManifest(prov_security=prov_security, extra=extra)  # type: ignore[arg-type]
        boot = BootOutcome(partition=None, image=b"", app_desc=None, behaviour=manifest, otadata=None, halted=False, reason="",
                           partitions=partitions)  # fmt: skip
        flash = FlashStorage(tmp_path / f"flash{len(made)}.bin")
        ctx = AppContext(boot, flash, None, console, ConsoleCommands(console))  # type: ignore[arg-type]
        node = RainMakerNode(ctx, NodePlatform("unit", "127.0.1.96", bytes(6), tmp_path / "radio.json"))
        node.flaws = frozenset({"static_pop"})
        made.append((node, flash))
        service = provisioning.ProvisioningService(node)
        assert service.start()
        console.take()
        return InProcessNode(node, ctx, console, service)

    yield make
    for node, flash in made:
        node.runtime.halt()
        assert node.runtime.join() == []
        flash.close()


def test_a_default_image_registers_no_endpoint_commands(in_process: Any) -> None:
    node = in_process({})
    assert not any(name.startswith(("proto-ver", "prov-")) for name in node.ctx.commands.names)
    assert node.run("proto-ver 0 2d2d2d") == (None, "")  # an unknown command: nothing at all


def test_the_node_answers_console_requests_as_protocomm_console_does(in_process: Any) -> None:
    node = in_process({"prov_console": True})
    names = node.ctx.commands.names
    assert names[-6:] == ["proto-ver", "prov-session", "prov-config", "prov-scan", "prov-ctrl", "cloud_user_assoc"]
    version = provisioning_version("v1.1", 1, None, ["wifi_scan"], {"rmaker": {"ver": "1.0", "cap": ["wifi_scan"]}})
    assert version == SEC1_VERSION
    assert node.run("proto-ver 0 2d2d2d") == (0, "\r\n" + SEC1_VERSION.encode().hex() + "\r\n")
    assert node.run("proto-ver 0") == (0x102, "")  # two arguments: ESP_ERR_INVALID_ARG, protocomm untouched
    assert node.run("prov-config 0 0801") == (0x103, "")  # no handshake yet: ESP_ERR_INVALID_STATE, no answer
    assert node.run("prov-session 0 00") == (0x102, "")  # not a SessionData for security 1
    assert node.run("help prov-session") == (0, "prov-session \n  \n")  # esp_console's help of protocomm_console's help ""


def test_a_console_session_on_the_node_is_protocomms_own(in_process: Any) -> None:
    node = in_process({"prov_console": True})
    link = ConsoleTask(node.ctx, node.console)
    client = ProvisioningClient(ConsoleTransport(link, session_id=11), pop=EXAMPLE_POP)
    client.open_session()
    assert client.wifi_status().sta_state == WifiStationState.Disconnected
    wrong = ProvisioningClient(ConsoleTransport(link, session_id=12), pop="abcd1235")
    with pytest.raises(ConsoleTransportError) as caught:
        wrong.open_session()  # session 12 replaces session 11 on the device (one live session)
    assert caught.value.esp_err == -1
    with pytest.raises(ConsoleTransportError) as caught:
        client.wifi_status()  # session 11 is gone: the console opens it afresh, without a handshake
    assert caught.value.esp_err == 0x103


def test_an_over_long_line_is_cut_as_the_console_cuts_it(in_process: Any) -> None:
    node = in_process({"prov_console": True}, prov_security=2)
    client = ProvisioningClient(ConsoleTransport(ConsoleTask(node.ctx, node.console), session_id=1, max_line=None), pop=EXAMPLE_POP)
    assert client.proto_version().sec_ver == 2  # short requests cross
    with pytest.raises(ConsoleTransportError) as caught:
        client.open_session()  # S2SessionCmd0: ~800 hex digits, cut at 254 characters: no SessionData left
    assert caught.value.esp_err == 0x102
    long_lines = in_process({"prov_console": True, "prov_console_line_max": LONG_LINES}, prov_security=2)
    client = ProvisioningClient(ConsoleTransport(ConsoleTask(long_lines.ctx, long_lines.console), max_line=None), pop=EXAMPLE_POP)
    assert client.open_session().established


def test_after_provisioning_stops_the_endpoint_commands_answer_nothing(in_process: Any) -> None:
    node = in_process({"prov_console": True})
    node.service.stop()
    assert node.console.take() == ("I (0) protocomm_console: Stopping console...\n"
                                   "I (0) protocomm_console: Console stopped\n"
                                   "I (0) network_prov_mgr: Provisioning stopped\n")  # fmt: skip
    assert node.run("proto-ver 0 2d2d2d") == (0, "")


# =========================================================================== a board process


@dataclass
class Images:
    plain: IdfBuildDir
    """The virtual ``base``: security 2, no console transport (RainMaker's default)."""
    sec1: IdfBuildDir
    sec2: IdfBuildDir
    """Security 2 on ESP-IDF's console (254 characters a line)."""
    sec2_long: IdfBuildDir
    """Security 2 on a console that keeps :data:`LONG_LINES` characters a line."""


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    root = tmp_path_factory.mktemp("console-set")
    key = root / "sbv2.pem"
    plain = ensure_virtual_set(root / "virtual", key).build("base")
    console = {"prov_console": True}
    return Images(
        plain,
        write_flawed_build(root / "sec1", [], key, prov_security=1, extra=console),
        write_flawed_build(root / "sec2", [], key, extra=console),
        write_flawed_build(root / "sec2-long", [], key, extra={**console, "prov_console_line_max": LONG_LINES}),
    )


@dataclass
class ConsoleNode(Node):
    blank_nvs: Path
    image: IdfBuildDir | None = None
    qr: dict[str, str] = field(default_factory=dict)

    def boot_fresh(self, image: IdfBuildDir) -> None:
        """Factory state for *image* (written if the board holds another, ``nvs`` erased), an EN
        reset, the provisioning QR awaited; then the port is free for the transport under test."""
        self.release()
        files: list[str | Path] = [] if image is self.image else flash_files(image)
        write_flash(self.board, *files, hex(NVS.offset), self.blank_nvs)
        self.image = image
        mon = self.boot()
        self.qr = json.loads(mon.expect(QR_LINE.pattern, BOOT_S).group(1))
        mon.expect(r"Provisioning will auto stop after \d+ minute\(s\)\.", STEP_S)
        self.release()


@pytest.fixture(scope="module")
def node(images: Images, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ConsoleNode]:
    state = tmp_path_factory.mktemp("console-lab")
    write_radio_file(state, [LAB_AP, radio_network("neighbour-open", "", "open", 11)])
    node_id = f"console-prov-{uuid.uuid4().hex[:8]}"
    fctry = node_fctry(state / "fctry", node_id, UNREACHABLE_MQTT, LabPki(state / "pki"), RANDOM)
    virtual = ConsoleNode(start_board(BOARD, state), node_id, erased_nvs(state), images.plain)
    with running_node(virtual, *flash_files(images.plain), hex(FCTRY_AT), fctry):
        yield virtual


def open_port(url: str) -> serial.Serial:
    """The board's port through the rig's RFC 2217 client, DTR and RTS released (no reset)."""
    serial_url_handlers.install()
    port = serial.serial_for_url(url, do_not_open=True, baudrate=115200, timeout=0.05)
    port.dtr = False
    port.rts = False
    port.open()
    return port


class PexpectDut:
    """What pytest-embedded's ``dut`` is to a test: ``write`` to the port, pexpect ``expect`` over what
    the board printed (a thread copies the port into a pipe that ``fdspawn`` reads, as
    pytest-embedded feeds its pexpect process), and the whole output kept in :attr:`transcript`."""

    def __init__(self, port: serial.Serial) -> None:
        self.port = port
        self.transcript = bytearray()
        read_end, self._write_end = os.pipe()
        os.set_blocking(self._write_end, False)  # a full pipe drops data for pexpect, never stalls the reader
        self.proc = pexpect.fdpexpect.fdspawn(read_end, timeout=STEP_S)
        self._stop = threading.Event()
        self._pump = threading.Thread(target=self._copy, name="dut-reader", daemon=True)
        self._pump.start()

    def _copy(self) -> None:
        while not self._stop.is_set():
            data = self.port.read(max(1, self.port.in_waiting))
            if data:
                self.transcript += data
                try:
                    os.write(self._write_end, data)
                except BlockingIOError:
                    pass

    def write(self, data: bytes) -> None:
        self.port.write(data)

    def expect(self, pattern: re.Pattern[bytes], timeout: float = STEP_S) -> re.Match[bytes]:
        self.proc.expect(pattern, timeout=timeout)
        return self.proc.match  # type: ignore[no-any-return]

    def text(self) -> str:
        return bytes(self.transcript).decode("utf-8", "replace")

    def close(self) -> None:
        self._stop.set()
        self._pump.join(5)
        self.proc.close()
        os.close(self._write_end)
        self.port.close()


def assert_provisioned_over_the_console(node: ConsoleNode, text: str, user_id: str, secret: str) -> None:
    """The node's own console lines: session, credentials, user, the station's address, the end of
    provisioning — and neither the passphrase nor its bytes in anything the node printed."""
    assert re.search(r"I \(\d+\) app_network: Secured session established!\r\n", text)
    assert f"app_wifi: Received Wi-Fi credentials\r\n\tSSID     : {SSID}\r\n" in text
    assert f"esp_rmaker_user_mapping: Got user_id = {user_id}, secret_key = {secret}\r\n" in text
    assert re.search(rf"I \(\d+\) app_network: Connected with IP Address:{re.escape(node.address)}\r\n", text)
    assert "app_wifi: Provisioning successful\r\n" in text
    assert PASSPHRASE not in text and PASSPHRASE.encode().hex() not in text
    assert "Received incorrect PoP" not in text and "Console command failed" not in text


def test_a_default_image_offers_no_provisioning_over_the_console(node: ConsoleNode, images: Images) -> None:
    node.boot_fresh(images.plain)
    with SerialMonitor(node.board.url) as mon:
        mon.write_line("help")
        # the node's last command, then the prompt: no endpoint commands after it (only SoftAP, as real RainMaker firmware)
        mon.expect(r"get-param \r\n  Get the value of a parameter\. Usage: get-param <device> <param>\r\n\r\n\r\n>> ", STEP_S)
        assert "prov-session" not in mon.text and "proto-ver" not in mon.text


def test_security1_image_is_provisioned_over_the_console(node: ConsoleNode, images: Images) -> None:
    node.boot_fresh(images.sec1)
    assert node.qr == {"ver": "v1", "name": "PROV_5d5e5f", "pop": POP, "transport": "softap"}  # SoftAP stays the announced one
    user_id, secret = f"user-{uuid.uuid4().hex[:10]}", str(uuid.uuid4())
    with ConsoleTransport.open(node.board.url) as transport:
        link = transport.link
        assert isinstance(link, SerialLink)
        client = ProvisioningClient(transport, pop=node.qr["pop"])
        outcome = provision_wifi(client, SSID, PASSPHRASE, user_id, secret, timeout=CONNECT_S)
        assert outcome.connected and outcome.ip4_addr == node.address and client.node_id == node.node_id
        link.wait_for(r"I \(\d+\) protocomm_console: Stopping console\.\.\.\r\nI \(\d+\) protocomm_console: Console stopped\r\n"
                      r"I \(\d+\) network_prov_mgr: Provisioning stopped\r\n", STEP_S)  # reading Connected ends provisioning
        text = link.text()
    assert "\r\n" + SEC1_VERSION.encode().hex() + "\r\n" in text  # proto-ver's answer, byte for byte on the wire
    assert_provisioned_over_the_console(node, text, user_id, secret)


def test_security2_image_with_long_console_lines_is_provisioned_through_a_dut(node: ConsoleNode, images: Images) -> None:
    node.boot_fresh(images.sec2_long)
    assert node.qr["username"] == "wifiprov" and node.qr["pop"] == POP
    user_id, secret = f"user-{uuid.uuid4().hex[:10]}", str(uuid.uuid4())
    dut = PexpectDut(open_port(node.board.url))
    try:
        transport = ConsoleTransport(dut, max_line=LONG_LINES)
        assert isinstance(transport.link, DutLink)
        client = ProvisioningClient(transport, pop=node.qr["pop"], username=node.qr["username"])
        outcome = provision_wifi(client, SSID, PASSPHRASE, user_id, secret, timeout=CONNECT_S)
        assert outcome.connected and outcome.ip4_addr == node.address
        assert client.version is not None and (client.version.sec_ver, client.version.sec_patch_ver) == (2, 1)
        dut.expect(re.compile(rb"network_prov_mgr: Provisioning stopped\r\n"), STEP_S)  # reading Connected ends provisioning
        text = dut.text()
    finally:
        dut.close()
    assert "\r\n" + SEC2_VERSION.encode().hex() + "\r\n" in text
    assert_provisioned_over_the_console(node, text, user_id, secret)


def test_security2_cannot_cross_an_esp_idf_console(node: ConsoleNode, images: Images) -> None:
    node.boot_fresh(images.sec2)
    with ConsoleTransport.open(node.board.url) as transport:
        client = ProvisioningClient(transport, pop=node.qr["pop"])
        assert client.proto_version().sec_ver == 2  # short requests cross
        with pytest.raises(ConsoleTransportError, match=r"request line is \d{3} characters.*keeps 254") as refused:
            client.open_session()  # the client knows: S2SessionCmd0 carries the 384-byte SRP6a public key
        assert refused.value.endpoint == "prov-session"
        transport.max_line = None  # send it anyway: the board's console cuts the line and protocomm gets no SessionData
        with pytest.raises(ConsoleTransportError) as cut:
            ProvisioningClient(transport, pop=node.qr["pop"]).open_session()
        assert cut.value.esp_err == 0x102
        link = transport.link
        assert isinstance(link, SerialLink)
        assert "rmaker_console: Console command failed with error: 258\r\n" in link.text()
        assert "Secured session established!" not in link.text()


@pytest.mark.parametrize("image_name", ["sec1", "sec2_long"])
def test_a_wrong_pop_never_yields_a_session_over_the_console(node: ConsoleNode, images: Images, image_name: str) -> None:
    node.boot_fresh(getattr(images, image_name))
    with ConsoleTransport.open(node.board.url, max_line=LONG_LINES) as transport:
        client = ProvisioningClient(transport, pop=WRONG_POP)
        client.proto_version()
        with pytest.raises(ConsoleTransportError) as caught:
            client.open_session()
        assert caught.value.endpoint == "prov-session" and caught.value.esp_err == -1  # ESP_FAIL, and no answer line
        link = transport.link
        assert isinstance(link, SerialLink)
        link.wait_for(MISMATCH_LINE, STEP_S)
        with pytest.raises(ProvisioningError, match="no secure session"):
            client.set_wifi_config(SSID, PASSPHRASE)
        with pytest.raises(ConsoleTransportError) as no_session:
            transport.send("prov-config", bytes(24))  # anything encrypted: the device has no session to decrypt it with
        assert no_session.value.esp_err == 0x103  # ESP_ERR_INVALID_STATE
        text = link.text()
    assert "Secured session established!" not in text and "Received Wi-Fi credentials" not in text
    assert "rmaker_console: Console command failed with error: -1\r\n" in text


def test_espressifs_console_transport_provisions_through_the_lines_it_asks_a_user_to_type(
    node: ConsoleNode, images: Images, monkeypatch: pytest.MonkeyPatch
) -> None:
    """esp-rainmaker-cli's ``Transport_Console`` prints ``Client->Device msg : <endpoint> 0 <hex>`` for a
    person to type on the device and reads the device's hex line back: here the rig types it."""
    transport_console = espressif_prov_client.module("common.transport.transport_console")
    prov_util = espressif_prov_client.module("rmaker_prov.prov.prov_util")
    node.boot_fresh(images.sec1)
    typed: list[str] = []
    with ConsoleTransport.open(node.board.url) as transport:
        link = transport.link
        assert isinstance(link, SerialLink)
        prefix = "Client->Device msg : "

        def show(*args: object, **_kwargs: object) -> None:
            text = " ".join(map(str, args))
            if text.startswith(prefix):
                typed.append(text[len(prefix):])
                link.write_line(text[len(prefix):])

        def answer(prompt: str = "") -> str:
            assert prompt == "Enter device->client msg : "
            found = link.read_line_matching(re.compile(r"[0-9a-f]+"), STEP_S)
            assert found is not None, link.text()[-2000:]
            return found.group(0)

        monkeypatch.setattr(transport_console, "print", show, raising=False)
        monkeypatch.setattr(transport_console, "input", answer, raising=False)

        class Console(transport_console.Transport_Console):  # type: ignore[misc,name-defined]
            """Their transport's ``send_data`` is a coroutine and takes text only; their HTTP one is
            synchronous and takes bytes too: this calls it as their prov_util calls a transport."""

            def send_data(self, path: str, data: Any, session_id: int = 0) -> Any:
                text = data.decode("latin-1") if isinstance(data, bytes | bytearray) else data
                return asyncio.run(super().send_data(path, text, session_id))

        tp = Console()
        version = json.loads(prov_util.get_version(tp))
        assert version["prov"]["sec_ver"] == 1
        security = prov_util.get_security(1, 0, "", "", node.qr["pop"])
        assert prov_util.establish_session(tp, security) is True
        assert prov_util.send_wifi_config(tp, security, SSID, PASSPHRASE) is True
        assert prov_util.apply_wifi_config(tp, security) is True
        link.wait_for(r"app_network: Connected with IP Address:|app_wifi: Provisioning failed", CONNECT_S)  # the node's own word
        assert prov_util.get_wifi_config(tp, security) == "connected"
        text = link.text()
    assert typed[0] == "proto-ver 0 2d2d2d" and all(line.split(" ")[1] == "0" for line in typed)  # esp_prov's session id
    assert [line.split(" ")[0] for line in typed[:3]] == ["proto-ver", "prov-session", "prov-session"]
    assert re.search(rf"app_network: Connected with IP Address:{re.escape(node.address)}\r\n", text)
    assert "app_network: Secured session established!\r\n" in text and PASSPHRASE not in text

"""The rig's own esptool/espefuse runs: ``rig.boards.tool_runner`` and its ``rfc2217://`` client.

What must hold: a port timeout change never reaches the server (no renegotiation), line
settings do (a baud change is negotiated and reaches the far UART), the data stream and
DTR/RTS are pyserial's, and every Board operation works through the runner on a virtual
board — with esptool's own fatal-error text when one fails.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import serial
from serial import rfc2217

from rig.boards import serial_url_handlers
from rig.boards.board import Board, BoardError
from rig.boards.serial_url_handlers import protocol_rfc2217
from rig.boards.tool_runner import PORT_TOOLS, UNRENDERED_HEX, console_entry
from rig.espressif_tools import TOOL_RUNNER, tool_argv
from rig.lab import BoardSpec
from rig.vboard.rfc2217_server import Rfc2217Server
from tests.vboard_process import BoardProcess, vboard_factory  # noqa: F401  (fixture)

EVENT_TIMEOUT_S = 5.0


class RecordingLine:
    """The device end of an in-process RFC 2217 server: records what reached it, echoes nothing."""

    def __init__(self) -> None:
        self.bauds: list[int] = []
        self.controls: list[tuple[str, bool]] = []
        self.received = bytearray()
        self.got_data = threading.Condition()
        self.sink: Callable[[bytes], None] | None = None

    def attach(self, sink: Callable[[bytes], None]) -> None:
        self.sink = sink

    def detach(self) -> None:
        self.sink = None

    def host_write(self, data: bytes) -> None:
        with self.got_data:
            self.received += data
            self.got_data.notify_all()

    def set_dtr(self, asserted: bool) -> None:
        self.controls.append(("dtr", asserted))

    def set_rts(self, asserted: bool) -> None:
        self.controls.append(("rts", asserted))

    def set_host_baudrate(self, baud: int) -> None:
        self.bauds.append(baud)

    def purge_host_input(self) -> None:
        pass

    def wait_received(self, size: int) -> bytes:
        with self.got_data:
            if not self.got_data.wait_for(lambda: len(self.received) >= size, EVENT_TIMEOUT_S):
                raise TimeoutError(f"the line got {len(self.received)} of {size} bytes within {EVENT_TIMEOUT_S} s")
            return bytes(self.received)


@pytest.fixture
def line_server() -> Iterator[tuple[RecordingLine, str]]:
    line = RecordingLine()
    with Rfc2217Server(line) as server:
        yield line, server.url


def test_rfc2217_urls_resolve_to_the_rig_client_and_other_schemes_stay_pyserials() -> None:
    serial_url_handlers.install()
    serial_url_handlers.install()  # idempotent: listed once, first
    assert serial.protocol_handler_packages.count(serial_url_handlers.PACKAGE) == 1
    assert serial.protocol_handler_packages[0] == serial_url_handlers.PACKAGE
    assert type(serial.serial_for_url("rfc2217://127.0.0.1:1", do_not_open=True)) is protocol_rfc2217.Serial
    assert type(serial.serial_for_url("loop://", do_not_open=True)).__module__ == "serial.urlhandler.protocol_loop"
    assert issubclass(protocol_rfc2217.Serial, rfc2217.Serial)


def test_timeout_changes_stay_local_and_line_settings_are_negotiated(line_server: tuple[RecordingLine, str]) -> None:
    line, url = line_server
    port = protocol_rfc2217.Serial(url, baudrate=115200, timeout=0.5)
    try:
        assert line.bauds == [115200] and port.negotiated == (115200, 8, "N", 1, False, False)
        for t in (3, 0.001, 10, None, 0.5):  # what esptool does around its commands
            port.timeout = t
        port.inter_byte_timeout = 0.1
        port.dtr = True  # an acknowledged SET_CONTROL: everything sent before it has been processed
        assert line.bauds == [115200] and line.controls[-1] == ("dtr", True)

        port.baudrate = 460800  # esptool's CHANGE_BAUDRATE: the far UART must follow
        assert line.bauds == [115200, 460800] and port.negotiated is not None and port.negotiated[0] == 460800

        port.write(b"\x00\xff\xc0 data \xff\xff")  # IAC (0xFF) escaped by pyserial, unescaped by the server
        assert line.wait_received(11) == b"\x00\xff\xc0 data \xff\xff"
        assert line.sink is not None
        line.sink(b"from the chip \xff")
        assert port.read(15) == b"from the chip \xff"
    finally:
        port.close()
    assert port.negotiated is None


def test_pyserials_own_client_renegotiates_on_every_timeout(line_server: tuple[RecordingLine, str]) -> None:
    """The behaviour the rig's client removes (pyserial 3.5), so this file notices if pyserial changes it."""
    line, url = line_server
    port = rfc2217.Serial(url, baudrate=115200, timeout=0.5)
    try:
        port.timeout = 3
        port.timeout = 0.5
        assert line.bauds == [115200, 115200, 115200]
    finally:
        port.close()


def test_run_tool_runs_port_tools_through_the_runner() -> None:
    argv = tool_argv("esptool", ["--port", "rfc2217://h:1", "chip-id"])
    assert argv[1:4] == ("-m", TOOL_RUNNER, "esptool") and argv[4:] == ("--port", "rfc2217://h:1", "chip-id")
    assert tool_argv("espsecure", ["--help"])[0].endswith("espsecure")
    assert set(PORT_TOOLS) == {"esptool", "espefuse"}
    assert all(callable(console_entry(t)) for t in PORT_TOOLS)


# ------------------------------------------------------------------ a Board on a virtual board, through the runner


@pytest.fixture(scope="module")
def board(vboard_factory) -> Board:  # noqa: F811
    proc: BoardProcess = vboard_factory("runner1")
    return Board(BoardSpec(name=proc.name, kind="virtual", chip="esp32c3"), port=proc.url,
                 log=logging.getLogger("test.runner"))


def test_board_operations_work_through_the_runner(board: Board, tmp_path: Path) -> None:
    mac = board.verify_identity()
    assert mac.startswith("60:55:f9")
    data = bytes(range(256)) * 64 + b"\xff\xc0\xdb" * 1000  # IAC, SLIP END and ESC in the stream
    image = tmp_path / "data.bin"
    image.write_bytes(data)
    assert board.baud == 460800  # write-flash changes the rate after the stub starts: negotiated, or nothing arrives
    board.flash({0x200000: image})
    assert board.read_flash(0x200000, len(data)) == data
    summary = board.efuse_summary()
    assert summary["MAC"]["value"].startswith(mac)
    assert "Flags" in board.security_info()
    board.hard_reset()


def test_a_failing_tool_still_reports_esptools_own_fatal_error(board: Board) -> None:
    fatal = r"failed \(exit 2\): ERROR: A fatal error occurred: Can.t access flash regions larger than detected"
    with pytest.raises(BoardError, match=fatal):
        board.esptool("read-flash", "0x3ff000", "0x2000", "/dev/null")  # past the end of the 4 MB flash


def test_runner_exit_status_and_usage() -> None:
    usage = subprocess.run([sys.executable, "-m", TOOL_RUNNER, "espsecure"], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "usage: python -m rig.boards.tool_runner" in usage.stderr
    version = subprocess.run([sys.executable, "-m", TOOL_RUNNER, "esptool", "version"], capture_output=True, text=True,
                             check=False)  # fmt: skip
    assert version.returncode == 0 and "esptool v5" in version.stdout


def _hex_rendering(args: list[str]) -> str:
    code = (
        "import sys\n"
        "from rig.boards.tool_runner import skip_unprinted_hex_dumps\n"
        "from esptool.loader import HexFormatter\n"
        "skip_unprinted_hex_dumps(sys.argv[1:])\n"
        "print(str(HexFormatter(bytes(range(20)))))\n"
    )
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, timeout=60).stdout


def test_hex_dumps_are_rendered_only_when_esptool_traces() -> None:
    assert _hex_rendering(["--port", "loop://", "read-mac"]).strip() == UNRENDERED_HEX
    assert "0001020304050607 08090a0b0c0d0e0f" in _hex_rendering(["--trace", "--port", "loop://", "read-mac"])

"""The virtual ESP32-C3 board judged by the real tools: esptool 5.6, espefuse, pyserial, pytest-embedded.

Each board is a ``python -m rig.vboard.serve`` process reached only through its
``rfc2217://`` URL. Esptool over RFC 2217 spends ~0.2 s of client-side waiting per
command (pyserial renegotiates the port whenever esptool assigns a timeout; see
``tests/vboard_process.py``), so the scenarios below run concurrently, one board each,
from a module fixture, and each test then checks one scenario's record. A scenario
never asserts: it records what the tools did (exit status, output, files), so a failing
check names the command and shows its output.

The esptool CLI (``python -m esptool --port rfc2217://…``) is used wherever the command
itself is under test; long register- or block-level flows (espefuse burns, the 1 MB
read-back, ROM-loader writes) go through ``pinned_esptool``/``pinned_espefuse``: the
same tools' Python API on a port whose timeout is set once, which keeps the module
well under 90 s.

Fast unit checks of the SLIP decoder and the ROM/stub protocol engine come first; they
need no board process.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from rig.firmware.firmware_set import FirmwareSet
from rig.firmware.virtual_set import ensure_virtual_set
from rig.vboard import slip
from rig.vboard.board import board_mac
from rig.vboard.rom import (
    HEADER,
    OHAI,
    SYNC_PAYLOAD,
    SYNC_ROM_VALUE,
    DownloadMode,
    Op,
    StubStatus,
    data_checksum,
    known_stubs,
)
from tests.vboard_process import (
    REPO_ROOT,
    TOOL_ENV,
    BoardFactory,
    BoardProcess,
    SerialMonitor,
    board_port_file,
    board_published,
    espefuse,
    esptool,
    output,
    pinned_espefuse,
    pinned_esptool,
    printed_mac,
    run_tool,
    vboard_factory,  # noqa: F401  (pytest fixture)
)

SCENARIO_TIMEOUT_S = 300
CONSOLE_TIMEOUT_S = 20


def mac_text(name: str) -> str:
    return ":".join(f"{b:02x}" for b in board_mac(name))


def blob(seed: int, size: int, compressible: bool = False) -> bytes:
    """Deterministic test data: random, or half random / half runs (compresses ~2:1)."""
    rnd = random.Random(seed)
    if not compressible:
        return rnd.randbytes(size)
    out = bytearray()
    while len(out) < size:
        out += rnd.randbytes(256) + bytes([rnd.randrange(256)]) * 256
    return bytes(out[:size])


# =========================================================================== unit checks (no board)


def test_slip_roundtrip_and_resync_after_noise() -> None:
    payloads = [b"\xc0\xdb\x00", b"plain", bytes(range(256))]
    dec = slip.SlipDecoder()
    stream = b"line noise \xdb\xdd" + b"".join(slip.encode(p) for p in payloads)
    assert dec.feed(stream) == payloads
    assert dec.stats.noise_bytes == len(b"line noise \xdb\xdd")
    # a stray 0xC0 in noise must not leave the decoder out of step with the next frame
    assert dec.feed(b"\xc0" + slip.encode(b"after")) == [b"after"]
    # invalid escape and oversized frames are dropped, the next frame still decodes
    small = slip.SlipDecoder(max_frame=64)
    assert small.feed(b"\xc0ab\xdb\x01cd\xc0" + b"\xc0" + b"x" * 100 + b"\xc0" + slip.encode(b"ok")) == [b"ok"]
    assert small.stats.bad_escapes == 1 and small.stats.oversized == 1


class _FakeEfuse:
    """Blank eFuses at the register level the loader needs (the real controller is tested by espefuse below)."""

    secure_download_enabled = False
    download_mode_disabled = False

    def handles(self, addr: int) -> bool:
        return 0x60008800 <= addr < 0x60008A00

    def read_reg(self, addr: int) -> int:
        return 0

    def write_reg(self, addr: int, value: int, mask: int) -> None:
        pass

    def security_info_payload(self) -> bytes:
        return struct.pack("<IB7BII", 0, 0, 0, 0, 0, 0, 0, 0, 12, 5, 3)


def _request(op: int, data: bytes = b"", chk: int = 0) -> bytes:
    return HEADER.pack(0, op, len(data), chk) + data


def _loader(tmp_path: Path) -> tuple[DownloadMode, list[bytes]]:
    from rig.vboard.flash import FlashStorage

    sent: list[bytes] = []
    flash = FlashStorage(tmp_path / "flash.bin")
    return DownloadMode(flash, _FakeEfuse(), sent.append, lambda baud: None, 115200), sent


def test_rom_answers_with_four_status_bytes_and_rom_error_codes(tmp_path: Path) -> None:
    loader, sent = _loader(tmp_path)
    loader.handle_frame(_request(Op.SYNC, SYNC_PAYLOAD))
    assert len(sent) == 8 and all(f == HEADER.pack(1, Op.SYNC, 4, SYNC_ROM_VALUE) + bytes(4) for f in sent)
    sent.clear()
    loader.handle_frame(HEADER.pack(0, Op.READ_REG, 4, 0) + b"\x00\x10")  # size field lies
    assert sent[-1][8:] == bytes([1, 0x05, 0, 0])
    loader.handle_frame(_request(Op.FLASH_BEGIN, struct.pack("<5I", 0x1000, 4, 0x400, 0, 0)))
    block = b"\x11" * 0x400
    loader.handle_frame(_request(Op.FLASH_DATA, struct.pack("<4I", len(block), 0, 0, 0) + block, data_checksum(block) ^ 1))
    assert sent[-1][8:] == bytes([1, 0x07, 0, 0])  # checksum error
    loader.handle_frame(_request(Op.FLASH_BEGIN, struct.pack("<5I", 0x2000, 8, 0x400, 0x3FF000, 0)))
    assert sent[-1][8:] == bytes([1, 0x06, 0, 0])  # past the ROM's default 2 MB flash size
    loader.handle_frame(_request(Op.ERASE_FLASH))
    assert sent[-1][1] == Op.ERASE_FLASH and sent[-1][8:10] == bytes([1, 0x05])  # stub-only command


def test_stub_upload_switches_to_stub_semantics(tmp_path: Path) -> None:
    stubs = known_stubs()
    assert stubs, "esptool ships its ESP32-C3 flasher stub"
    stub = stubs[0]
    desc_dir = "2" if "v2" in stub.name else "1"
    import base64
    from importlib import resources

    desc = json.loads((resources.files("esptool") / "targets" / "stub_flasher" / desc_dir / "esp32c3.json").read_text())
    text = base64.b64decode(desc["text"])
    loader, sent = _loader(tmp_path)
    loader.handle_frame(_request(Op.MEM_BEGIN, struct.pack("<4I", len(text), 1, 0x1800, desc["text_start"])))
    loader.handle_frame(_request(Op.MEM_DATA, struct.pack("<4I", len(text), 0, 0, 0) + text, data_checksum(text)))
    loader.handle_frame(_request(Op.MEM_END, struct.pack("<II", 0, desc["entry"])))
    assert sent[-1] == OHAI and loader.stub_running
    # stub: 2-byte big-endian status, deferred errors reported on the next command
    loader.handle_frame(_request(Op.FLASH_DEFL_BEGIN, struct.pack("<5I", 100, 1, 0x4000, 0x10000, 0)))
    junk = b"not a zlib stream"
    loader.handle_frame(_request(Op.FLASH_DEFL_DATA, struct.pack("<4I", len(junk), 0, 0, 0) + junk, data_checksum(junk)))
    assert sent[-1][8:] == b"\x00\x00"  # acknowledged before inflating
    loader.handle_frame(_request(Op.READ_REG, struct.pack("<I", 0x60008844)))
    assert sent[-1][8:] == struct.pack(">H", StubStatus.INFLATE_ERROR)
    loader.handle_frame(_request(Op.SPI_ATTACH, bytes(8)))  # the stub wants 4 bytes
    assert sent[-1][8:] == struct.pack(">H", StubStatus.BAD_DATA_LEN)


# =========================================================================== scenarios on board processes


@dataclass
class Record:
    """What one scenario saw: named tool runs and values, for the tests to judge."""

    runs: dict[str, subprocess.CompletedProcess[str]] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)

    def run(self, name: str, proc: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
        self.runs[name] = proc
        return proc

    def ok(self, name: str, *expected: str) -> str:
        """Assert run *name* exited 0 and printed each regex of *expected*; its output."""
        proc = self.runs[name]
        text = output(proc)
        assert proc.returncode == 0, f"{name}: exit {proc.returncode}\n{text[-4000:]}"
        for pattern in expected:
            assert re.search(pattern, text, re.MULTILINE), f"{name}: no {pattern!r} in:\n{text[-4000:]}"
        return text


@dataclass
class Env:
    factory: BoardFactory
    work: Path
    firmware: Future[FirmwareSet]


def flash_args(fs: FirmwareSet, role: str = "base") -> list[str]:
    build = fs.build(role)
    settings = build.flash_settings
    args = ["--flash-mode", settings.flash_mode, "--flash-freq", settings.flash_freq, "--flash-size", settings.flash_size]
    for offset, path in sorted(build.flash_files.items()):
        args += [hex(offset), str(path)]
    return args


def scenario_stub_info(env: Env) -> Record:
    rec, board = Record(), env.factory("stub-info")
    rec.values["url"] = board.url
    rec.values["published"] = board_published(board)
    for cmd in ("chip-id", "read-mac", "flash-id", "get-security-info"):
        rec.run(cmd, esptool(board.url, cmd))
    return rec


def scenario_rom_info(env: Env) -> Record:
    rec, board = Record(), env.factory("rom-info")
    for cmd in ("chip-id", "read-mac", "flash-id", "get-security-info"):
        rec.run(cmd, esptool(board.url, "--no-stub", cmd))
    return rec


def scenario_stub_write(env: Env) -> Record:
    rec, board = Record(), env.factory("stub-write")
    files = {0x1000: blob(1, 5000), 0x10000: blob(2, 40_000), 0x3F0000: blob(3, 8192, True), 0x100000: blob(4, 65536, True)}
    paths = {}
    for off, data in files.items():
        paths[off] = env.work / f"stub-write-{off:x}.bin"
        paths[off].write_bytes(data)
    rec.run("plain", esptool(board.url, "write-flash", "-u", "0x1000", paths[0x1000], "0x10000", paths[0x10000]))
    rec.run("compressed", esptool(board.url, "write-flash", "-z", "0x3f0000", paths[0x3F0000], "0x100000", paths[0x100000]))
    rec.run("verify", pinned_esptool(board.url, "verify-flash", *[a for off, p in paths.items() for a in (hex(off), p)]))
    bad = env.work / "stub-write-bad.bin"
    bad.write_bytes(blob(99, 4096))
    rec.run("verify-bad", pinned_esptool(board.url, "verify-flash", "0x1000", bad))
    rec.values["files"] = files
    rec.values["on_disk"] = {off: board.read_flash_file(off, len(data)) for off, data in files.items()}
    return rec


def scenario_stub_erase(env: Env) -> Record:
    rec, board = Record(), env.factory("stub-erase")
    data = blob(5, 65536)
    path = env.work / "stub-erase.bin"
    path.write_bytes(data)
    rec.run("write", pinned_esptool(board.url, "write-flash", "0x20000", path))
    rec.run("erase-region", esptool(board.url, "erase-region", "0x21000", "0x2000"))
    readback = env.work / "stub-erase-readback.bin"
    rec.run("read", pinned_esptool(board.url, "read-flash", "0x20000", "0x4000", readback))
    rec.values["data"] = data
    rec.values["readback"] = readback.read_bytes() if readback.exists() else b""
    rec.run("erase-flash", esptool(board.url, "erase-flash"))
    rec.values["after_erase"] = board.read_flash_file(0, 4 * 1024 * 1024)
    return rec


def scenario_rom_write(env: Env) -> Record:
    rec, board = Record(), env.factory("rom-write")
    files = {0x1000: blob(6, 5000), 0x8100: blob(7, 3000), 0x30000: blob(8, 20000, True)}
    paths = {off: env.work / f"rom-write-{off:x}.bin" for off in files}
    for off, data in files.items():
        paths[off].write_bytes(data)
    rec.run("plain", pinned_esptool(board.url, "--no-stub", "write-flash", "0x1000", paths[0x1000], "0x8100", paths[0x8100]))
    rec.run("compressed", pinned_esptool(board.url, "--no-stub", "write-flash", "-z", "0x30000", paths[0x30000]))
    rec.run("verify", pinned_esptool(board.url, "--no-stub", "verify-flash", *[a for off, p in paths.items() for a in (hex(off), p)]))
    rec.values["files"] = files
    rec.values["on_disk"] = {off: board.read_flash_file(off, len(data)) for off, data in files.items()}
    # the ROM aligns an unaligned write down to its sector: 0x8000..0x8100 is erased, not kept
    rec.values["before_unaligned"] = board.read_flash_file(0x8000, 0x100)
    # UART rates must agree: a terminal left at 9600 baud sees nothing of the 115200 boot
    with SerialMonitor(board.url, baud=9600) as mon:
        mon.hard_reset()
        with pytest.raises(TimeoutError):
            mon.expect("ESP-ROM", 2.0)
        rec.values["at_9600"] = mon.text
    with SerialMonitor(board.url) as mon:
        mon.hard_reset()
        rec.values["at_115200"] = mon.expect(r"ESP-ROM:esp32c3-api1-20210207\r\n", CONSOLE_TIMEOUT_S).group(0)
    return rec


def scenario_rom_misc(env: Env) -> Record:
    rec, board = Record(), env.factory("rom-misc")
    data = blob(9, 8192)
    path = env.work / "rom-misc.bin"
    path.write_bytes(data)
    rec.run("write", pinned_esptool(board.url, "--no-stub", "write-flash", "0x10000", path))
    first = env.work / "rom-misc-read1.bin"
    rec.run("read", pinned_esptool(board.url, "--no-stub", "read-flash", "0x10000", "0x100", first))
    rec.run("erase-region", pinned_esptool(board.url, "--no-stub", "erase-region", "0x10000", "0x1000"))
    second = env.work / "rom-misc-read2.bin"
    rec.run("read-erased", pinned_esptool(board.url, "--no-stub", "read-flash", "0x10000", "0x100", second))
    rec.values["data"] = data
    rec.values["read1"] = first.read_bytes() if first.exists() else b""
    rec.values["read2"] = second.read_bytes() if second.exists() else b""
    rec.values["kept"] = board.read_flash_file(0x11000, 0x1000)
    # `run` from the ROM leaves download mode and boots from flash; this flash has no
    # bootloader, so the ROM reports the erased header, over and over.
    rec.run("run", esptool(board.url, "--no-stub", "--after", "no-reset", "run"))
    with SerialMonitor(board.url) as mon:
        rec.values["after_run"] = mon.expect(r"invalid header: 0xffffffff\r\n.*invalid header", CONSOLE_TIMEOUT_S).group(0)
    return rec


def scenario_big(env: Env) -> Record:
    rec, board = Record(), env.factory("big")
    data = blob(10, 1024 * 1024, compressible=True)
    path = env.work / "big.bin"
    path.write_bytes(data)
    rec.run("write", pinned_esptool(board.url, "--baud", "921600", "write-flash", "0x100000", path))
    readback = env.work / "big-readback.bin"
    rec.run("read", pinned_esptool(board.url, "--baud", "921600", "read-flash", "--no-progress", "0x100000", str(len(data)), readback))
    rec.values["data"] = data
    rec.values["readback"] = readback.read_bytes() if readback.exists() else b""
    return rec


def _raw_frames(mon: SerialMonitor, want: int, timeout: float) -> list[bytes]:
    dec = slip.SlipDecoder()
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(frames) < want and time.monotonic() < deadline:
        frames += dec.feed(mon.port.read(4096))
    return frames


def scenario_robust(env: Env) -> Record:
    rec, board = Record(), env.factory("robust")
    with SerialMonitor(board.url) as mon:
        mon.download_reset()
        rec.values["banner"] = mon.expect(
            r"rst:0x1 \(POWERON\),boot:0x5 \(DOWNLOAD\(USB/UART0/1\)\)\r\nwaiting for download\r\n", CONSOLE_TIMEOUT_S
        ).group(0)
        mon.port.write(b"noise\r\n" + bytes(range(256)) + b"\xc0")  # junk, then a frame end
        mon.port.write(b"\xc0" + _request(Op.READ_REG) + b"\xdb\x01\xc0")  # invalid escape: dropped
        mon.port.write(b"\xc0\x01\x02\x03\xc0")  # too short for a header: ignored
        mon.port.write(b"\xc0" + b"\x55" * 20000 + b"\xc0")  # oversized: dropped
        mon.port.write(slip.encode(HEADER.pack(0, Op.READ_REG, 4, 0) + b"\x44\x88"))  # size field lies
        block = b"\x5a" * 64
        mon.port.write(slip.encode(_request(Op.FLASH_DATA, struct.pack("<4I", 64, 0, 0, 0) + block, 0)))  # bad checksum
        mon.port.write(slip.encode(_request(Op.SYNC, SYNC_PAYLOAD)))
        frames = _raw_frames(mon, 11, CONSOLE_TIMEOUT_S)
        rec.values["frames"] = frames
    # the ROM survived all that: esptool talks to it without resetting it
    rec.run("no-reset-chip-id", esptool(board.url, "--before", "no-reset", "chip-id"))
    # a client killed in the middle of a write
    big = env.work / "robust-kill.bin"
    big.write_bytes(blob(11, 512 * 1024))
    proc = subprocess.Popen(
        [sys.executable, "-m", "esptool", "--port", board.url, "write-flash", "0x0", str(big)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **TOOL_ENV},
    )
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + 120
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while "Writing at 0x0001" not in seen and time.monotonic() < deadline and sel.select(deadline - time.monotonic()):
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    rec.values["killed_output"] = seen
    rec.run("after-kill", esptool(board.url, "read-mac"))
    # esptool's --after watchdog-reset sequence, sent as one burst: unlock, timeout, enable, lock
    with SerialMonitor(board.url) as mon:
        mon.download_reset()
        mon.expect(r"waiting for download\r\n", CONSOLE_TIMEOUT_S)
        for addr, value in ((0x600080A8, 0x50D83AA1), (0x60008094, 2000), (0x60008090, 1 << 31 | 5 << 28 | 1 << 8 | 2), (0x600080A8, 0)):
            mon.port.write(slip.encode(_request(Op.WRITE_REG, struct.pack("<4I", addr, value, 0xFFFFFFFF, 0))))
        rec.values["watchdog"] = mon.expect(
            r"rst:0x10 \(RTCWDT_RTC_RST\),boot:0xd \(SPI_FAST_FLASH_BOOT\)\r\nSaved PC:0x[0-9a-f]{8}\r\n", CONSOLE_TIMEOUT_S
        ).group(0)
    rec.values["board_alive"] = board.proc.poll() is None
    return rec


def scenario_hung_client(env: Env) -> Record:
    rec, board = Record(), env.factory("hung")
    host, port = board.url.removeprefix("rfc2217://").split(":")
    hung = socket.create_connection((host, int(port)))  # connects, never negotiates, never reads
    try:
        rec.run("while-busy", esptool(board.url, "read-mac"))
    finally:
        hung.close()
    rec.run("after", esptool(board.url, "read-mac"))
    rec.values["board_alive"] = board.proc.poll() is None
    return rec


def scenario_pair(env: Env) -> Record:
    rec = Record()
    boards = {name: env.factory(name) for name in ("pair-a", "pair-b")}
    datas = {name: blob(20 + i, 4096) for i, name in enumerate(boards)}
    for name, data in datas.items():
        (env.work / f"{name}.bin").write_bytes(data)
    with ThreadPoolExecutor(2) as pool:
        macs = {n: pool.submit(esptool, b.url, "read-mac") for n, b in boards.items()}
        writes = {n: pool.submit(esptool, b.url, "write-flash", "0x9000", env.work / f"{n}.bin") for n, b in boards.items()}
        for n in boards:
            rec.run(f"mac-{n}", macs[n].result())
            rec.run(f"write-{n}", writes[n].result())
    rec.values["datas"] = datas
    rec.values["on_disk"] = {n: b.read_flash_file(0x9000, 4096) for n, b in boards.items()}
    rec.values["paths"] = {n: b.flash_path for n, b in boards.items()}
    return rec


def scenario_efuse_summary(env: Env) -> Record:
    rec, board = Record(), env.factory("efuse-sum")
    port_json = env.work / "efuse-port.json"
    rec.run("summary", espefuse(board.url, "summary", "--format", "json", "--file", port_json))
    copy = env.work / "efuse-sum-copy.bin"
    shutil.copyfile(board.efuse_path, copy)
    virt_json = env.work / "efuse-virt.json"
    rec.run("virt", run_tool("espefuse", "--chip", "esp32c3", "--virt", "--path-efuse-file", copy,
                             "summary", "--format", "json", "--file", virt_json))  # fmt: skip
    rec.values["port"] = json.loads(port_json.read_text()) if port_json.exists() else {}
    rec.values["virt"] = json.loads(virt_json.read_text()) if virt_json.exists() else {}
    return rec


def scenario_efuse_burn(env: Env) -> Record:
    rec, board = Record(), env.factory("efuse-burn")
    rec.run("flash", pinned_esptool(board.url, "--baud", "921600", "write-flash", *flash_args(env.firmware.result())))
    with SerialMonitor(board.url) as mon:
        mon.hard_reset()
        rec.values["boot_before"] = mon.expect(r"main_task: Returned from app_main\(\)", CONSOLE_TIMEOUT_S).string
    rec.run("burn", pinned_espefuse(board.url, "burn", "SECURE_VERSION", "3"))
    copy = env.work / "efuse-burn-copy.bin"
    shutil.copyfile(board.efuse_path, copy)
    rec.run("virt", run_tool("espefuse", "--chip", "esp32c3", "--virt", "--path-efuse-file", copy,
                             "summary", "--format", "value_only", "SECURE_VERSION"))  # fmt: skip
    with SerialMonitor(board.url) as mon:
        mon.hard_reset()
        rec.values["boot_after"] = mon.expect(
            r"(?s)No bootable app partitions in the partition table.*?rst:0x3 \(RTC_SW_SYS_RST\)", CONSOLE_TIMEOUT_S
        ).string
    return rec


def scenario_secure_download(env: Env) -> Record:
    rec, board = Record(), env.factory("sdm")
    rec.run("burn", pinned_espefuse(board.url, "burn", "ENABLE_SECURITY_DOWNLOAD", "1"))
    rec.run("security-info", esptool(board.url, "get-security-info"))
    rec.run("read-flash", esptool(board.url, "read-flash", "0", "16", env.work / "sdm.bin"))
    data = env.work / "sdm-write.bin"
    data.write_bytes(blob(30, 4096))
    rec.run("write-flash", esptool(board.url, "write-flash", "0x10000", data))
    rec.values["written"] = board.read_flash_file(0x10000, 4096)
    rec.values["data"] = data.read_bytes()
    # what the ROM itself refuses, asked through esptool's loader
    from esptool.cmds import detect_chip
    from esptool.util import UnsupportedCommandError

    esp = detect_chip(board.url)
    try:
        rec.values["sdm_flag"] = esp.secure_download_mode
        refused = {}
        for name, call in {
            "READ_REG": lambda: esp.read_reg(0x60008844),
            "READ_FLASH_SLOW": lambda: esp.read_flash_slow(0, 64, None),
            "SPI_FLASH_MD5": lambda: esp.flash_md5sum(0, 4096),
            "MEM_BEGIN": lambda: esp.mem_begin(16, 1, 16, 0x3FC96000),
        }.items():
            try:
                call()
                refused[name] = "accepted"
            except UnsupportedCommandError as exc:
                refused[name] = str(exc)
        rec.values["refused"] = refused
    finally:
        esp._port.close()
    return rec


def scenario_boot(env: Env) -> Record:
    rec, board = Record(), env.factory("boot")
    rec.run("flash", esptool(board.url, "--baud", "921600", "write-flash", *flash_args(env.firmware.result())))
    with SerialMonitor(board.url) as mon:
        mon.hard_reset()
        mon.expect(r"main_task: Returned from app_main\(\)", CONSOLE_TIMEOUT_S)
        rec.values["first_boot"] = mon.text
        mon.text = ""
        mon.write_line("reboot")
        mon.expect(r"(?s)rst:0xc \(RTC_SW_CPU_RST\).*main_task: Returned from app_main\(\)", CONSOLE_TIMEOUT_S)
        rec.values["reboot"] = mon.text
        mon.text = ""
        mon.download_reset()
        mon.expect(r"waiting for download\r\n", CONSOLE_TIMEOUT_S)
        rec.values["download"] = mon.text
    rec.run("run", esptool(board.url, "--no-stub", "--after", "no-reset", "run"))
    with SerialMonitor(board.url) as mon:
        mon.write_line("up-time")
        rec.values["after_run"] = mon.expect(r"Uptime of the device: \d+ milliseconds", CONSOLE_TIMEOUT_S).group(0)
    return rec


PYTEST_EMBEDDED_TEST = """
def test_startup_lines(dut):
    dut.expect(r"rst:0x1 \\(POWERON\\),boot:0xd \\(SPI_FAST_FLASH_BOOT\\)", timeout=60)
    dut.expect(r"app_init: Project name:\\s+rig_rmaker_node", timeout=30)
    dut.expect(r"app_init: App version:\\s+1\\.0\\.0", timeout=10)
    dut.expect(r"app_init: Secure version:\\s+1", timeout=10)
    dut.expect(r"app_init: ESP-IDF:\\s+v5\\.4\\.1", timeout=10)
    dut.expect(r"main_task: Returned from app_main\\(\\)", timeout=10)
"""


def scenario_pytest_embedded(env: Env) -> Record:
    rec, board = Record(), env.factory("pe")
    build = env.firmware.result().build("base").path
    root = env.work / "pe"
    root.mkdir()
    (root / "test_dut.py").write_text(PYTEST_EMBEDDED_TEST)
    rec.run("pytest", subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir", str(root), str(root / "test_dut.py"),
         "--embedded-services", "esp,idf", "--port", board.url, "--target", "esp32c3",
         "--app-path", str(build), "--build-dir", str(build),
         "--part-tool", str(REPO_ROOT / "rig" / "firmware" / "partition_table.py"), "-q"],
        capture_output=True, text=True, timeout=SCENARIO_TIMEOUT_S, cwd=root, check=False,
        env={**os.environ, **TOOL_ENV},
    ))  # fmt: skip
    return rec


SCENARIOS: dict[str, Callable[[Env], Record]] = {
    "big": scenario_big,
    "pytest_embedded": scenario_pytest_embedded,
    "stub_info": scenario_stub_info,
    "rom_info": scenario_rom_info,
    "stub_write": scenario_stub_write,
    "rom_write": scenario_rom_write,
    "stub_erase": scenario_stub_erase,
    "rom_misc": scenario_rom_misc,
    "robust": scenario_robust,
    "pair": scenario_pair,
    "hung_client": scenario_hung_client,
    "efuse_summary": scenario_efuse_summary,
    "efuse_burn": scenario_efuse_burn,
    "secure_download": scenario_secure_download,
    "boot": scenario_boot,
}


@pytest.fixture(scope="module")
def scenarios(vboard_factory: BoardFactory, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Future[Record]]]:  # noqa: F811
    work = tmp_path_factory.mktemp("vboard-work")
    with ThreadPoolExecutor(max_workers=len(SCENARIOS) + 1) as pool:
        firmware = pool.submit(ensure_virtual_set, work / "firmware", work / "keys" / "sbv2.pem")
        env = Env(vboard_factory, work, firmware)
        futures = {name: pool.submit(_timed, fn, env) for name, fn in SCENARIOS.items()}
        yield futures
        for f in futures.values():
            f.cancel()


def _timed(fn: Callable[[Env], Record], env: Env) -> Record:
    started = time.monotonic()
    rec = fn(env)
    rec.values["elapsed_s"] = time.monotonic() - started
    return rec


def record(scenarios: dict[str, Future[Record]], name: str) -> Record:
    return scenarios[name].result(timeout=SCENARIO_TIMEOUT_S)


# --------------------------------------------------------------------------- identity


def test_zz_report_scenario_durations(scenarios: dict[str, Future[Record]]) -> None:
    print({name: round(record(scenarios, name).values["elapsed_s"], 1) for name in scenarios})


def test_board_publishes_its_url(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "stub_info")
    assert rec.values["url"].startswith("rfc2217://127.0.0.1:")
    assert rec.values["published"] == rec.values["url"]


@pytest.mark.parametrize("scenario", ["stub_info", "rom_info"])
def test_chip_id_read_mac_flash_id_security_info(scenarios: dict[str, Future[Record]], scenario: str) -> None:
    rec = record(scenarios, scenario)
    name = "stub-info" if scenario == "stub_info" else "rom-info"
    stub_line = r"^Stub flasher running\."
    for cmd in ("chip-id", "read-mac", "flash-id", "get-security-info"):
        text = rec.ok(
            cmd,
            r"Detecting chip type\.\.\. ESP32-C3",
            r"Chip type:\s+ESP32-C3 \(QFN32\) \(revision v0\.4\)",
            r"Features:\s+Wi-Fi, BT 5 \(LE\), Single Core, 160MHz",
            r"Crystal frequency:\s+40MHz",
        )
        assert bool(re.search(stub_line, text, re.MULTILINE)) == (scenario == "stub_info"), cmd
        assert printed_mac(rec.runs[cmd]) == mac_text(name), cmd
    rec.ok("chip-id", r"ESP32-C3 has no chip ID\. Reading MAC address instead\.")
    rec.ok("flash-id", r"Manufacturer: c8", r"Device: 4016", r"Detected flash size: 4MB")
    rec.ok(
        "get-security-info",
        r"Flags: 0x00000000",
        r"Key Purposes: \(0, 0, 0, 0, 0, 0, 12\)",
        r"Chip ID: 5",
        r"Secure Boot: Disabled",
        r"Flash Encryption: Disabled",
    )


def test_macs_are_stable_distinct_and_espressif() -> None:
    assert board_mac("vb1") == board_mac("vb1") != board_mac("vb2")
    assert board_mac("vb1")[:3] == bytes.fromhex("6055f9")


# --------------------------------------------------------------------------- writing


def test_stub_write_plain_and_compressed_several_regions(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "stub_write")
    rec.ok("plain", r"Wrote 5000 bytes at 0x00001000", r"Wrote 40000 bytes at 0x00010000", r"Hash of data verified\.")
    assert "compressed)" not in output(rec.runs["plain"])
    rec.ok("compressed", r"Wrote 8192 bytes \(\d+ compressed\) at 0x003f0000", r"Wrote 65536 bytes \(\d+ compressed\) at 0x00100000")
    assert output(rec.runs["compressed"]).count("Hash of data verified.") == 2
    assert rec.ok("verify").count("Verification successful (digest matched).") == 4
    bad = rec.runs["verify-bad"]
    assert bad.returncode != 0 and "Verification failed (digest mismatch)." in output(bad)
    assert rec.values["on_disk"] == rec.values["files"]


def test_rom_write_plain_and_compressed_several_regions(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "rom_write")
    rec.ok("plain", r"Erasing flash\.\.\.", r"Wrote 5000 bytes at 0x00001000", r"Hash of data verified\.")
    assert "Stub flasher running" not in output(rec.runs["plain"])
    rec.ok("compressed", r"Wrote 20000 bytes \(\d+ compressed\) at 0x00030000", r"Hash of data verified\.")
    assert rec.ok("verify").count("Verification successful (digest matched).") == 3
    assert rec.values["on_disk"] == rec.values["files"]
    assert rec.values["before_unaligned"] == b"\xff" * 0x100


def test_uart_bytes_pass_only_when_host_and_chip_rates_agree(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "rom_write")
    assert rec.values["at_9600"] == "" and rec.values["at_115200"]


def test_one_megabyte_compressed_write_read_back_byte_for_byte(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "big")
    rec.ok("write", r"Changing baud rate to 921600", r"Wrote 1048576 bytes \((\d+) compressed\) at 0x00100000", r"Hash of data verified\.")
    rec.ok("read", r"Read 1048576 bytes from 0x00100000")
    assert hashlib.sha256(rec.values["readback"]).digest() == hashlib.sha256(rec.values["data"]).digest()


# --------------------------------------------------------------------------- erasing, reading, running


def test_stub_erase_region_read_flash_erase_flash(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "stub_erase")
    rec.ok("write")
    rec.ok("erase-region", r"Flash memory region erased successfully")
    rec.ok("read", r"Read 16384 bytes from 0x00020000")
    data, back = rec.values["data"], rec.values["readback"]
    assert back[:0x1000] == data[:0x1000] and back[0x1000:0x3000] == b"\xff" * 0x2000 and back[0x3000:] == data[0x3000:0x4000]
    rec.ok("erase-flash", r"Flash memory erased successfully")
    assert rec.values["after_erase"] == b"\xff" * (4 * 1024 * 1024)


def test_rom_read_flash_slow_erase_region_and_run(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "rom_misc")
    rec.ok("write")
    rec.ok("read", r"Read 256 bytes from 0x00010000")
    assert rec.values["read1"] == rec.values["data"][:0x100]
    rec.ok("erase-region", r"Flash memory region erased successfully")
    rec.ok("read-erased")
    assert rec.values["read2"] == b"\xff" * 0x100 and rec.values["kept"] == rec.values["data"][0x1000:0x2000]
    rec.ok("run", r"Staying in bootloader\.")
    assert "invalid header: 0xffffffff" in rec.values["after_run"]


# --------------------------------------------------------------------------- bad input and bad clients


def test_malformed_frames_get_rom_errors_and_the_rom_keeps_serving(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "robust")
    frames = rec.values["frames"]
    statuses = {(f[1], f[8:]) for f in frames if len(f) >= 12 and f[0] == 1}
    assert (Op.READ_REG, bytes([1, 0x05, 0, 0])) in statuses  # invalid message
    assert (Op.FLASH_DATA, bytes([1, 0x07, 0, 0])) in statuses  # checksum error
    syncs = [f for f in frames if f[:2] == bytes([1, Op.SYNC])]
    assert len(syncs) == 8 and all(f[8:] == bytes(4) for f in syncs)
    rec.ok("no-reset-chip-id", r"Chip type:\s+ESP32-C3")


def test_client_killed_mid_write_then_next_client_works(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "robust")
    assert "Writing at" in rec.values["killed_output"]
    assert printed_mac(rec.runs["after-kill"]) == mac_text("robust")
    assert rec.values["board_alive"]


def test_rtc_watchdog_armed_over_write_reg_resets_the_chip(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "robust")
    assert rec.values["watchdog"].startswith("rst:0x10 (RTCWDT_RTC_RST)")


def test_one_client_at_a_time_and_a_hung_client_costs_only_its_session(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "hung_client")
    busy = rec.runs["while-busy"]
    assert busy.returncode != 0 and "Could not open" in output(busy)
    assert printed_mac(rec.runs["after"]) == mac_text("hung") and rec.values["board_alive"]


def test_two_boards_side_by_side_share_nothing(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "pair")
    macs = {n: printed_mac(rec.runs[f"mac-{n}"]) for n in ("pair-a", "pair-b")}
    assert macs == {n: mac_text(n) for n in macs} and len(set(macs.values())) == 2
    for n in macs:
        rec.ok(f"write-{n}", r"Hash of data verified\.")
    assert rec.values["on_disk"] == rec.values["datas"]
    assert rec.values["paths"]["pair-a"] != rec.values["paths"]["pair-b"]


# --------------------------------------------------------------------------- eFuses


def test_espefuse_summary_over_the_port_matches_the_efuse_file(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "efuse_summary")
    rec.ok("summary")
    rec.ok("virt")
    port, virt = rec.values["port"], rec.values["virt"]
    assert port and port == virt
    assert port["MAC"]["value"].startswith(mac_text("efuse-sum"))


def test_burning_secure_version_persists_and_the_bootloader_enforces_it(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "efuse_burn")
    rec.ok("flash")
    assert "app_init: Secure version:   1" in rec.values["boot_before"]
    rec.ok("burn", r"BURN BLOCK0 +- OK")
    assert rec.ok("virt").strip().splitlines()[-1] == "3"
    after = rec.values["boot_after"]
    assert "Secure version (from eFuse) = 2" in after and "app_init: Project name" not in after


def test_secure_download_mode_refuses_what_the_chip_refuses(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "secure_download")
    rec.ok("burn", r"Secure download mode is enabled")
    rec.ok("security-info", r"Chip type:\s+ESP32-C3 in Secure Download Mode", r"Flags: 0x00000004")
    assert rec.runs["read-flash"].returncode != 0
    assert "not available in Secure Download Mode" in output(rec.runs["read-flash"])
    rec.ok("write-flash", r"Cannot verify written data if encrypted or in secure download mode\.")
    assert rec.values["written"] == rec.values["data"]
    assert rec.values["sdm_flag"] is True
    for cmd, outcome in rec.values["refused"].items():
        assert "not supported in Secure Download Mode" in outcome, cmd


# --------------------------------------------------------------------------- booting


def test_hard_reset_boots_the_app_and_its_startup_lines_appear(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "boot")
    rec.ok("flash", r"Hash of data verified\.", r"Hard resetting via RTS pin\.\.\.")
    first = rec.values["first_boot"]
    for line in (
        "ESP-ROM:esp32c3-api1-20210207\r\nBuild:Feb  7 2021\r\nrst:0x1 (POWERON),boot:0xd (SPI_FAST_FLASH_BOOT)\r\n",
        "SPIWP:0xee\r\nmode:DIO, clock div:1\r\n",
        "boot: ESP-IDF v5.4.1 2nd stage bootloader",
        "app_init: Project name:     rig_rmaker_node",
        "app_init: App version:      1.0.0",
        "app_init: ESP-IDF:          v5.4.1",
        "main_task: Returned from app_main()",
    ):
        assert line in first
    assert re.search(r"load:0x[0-9a-f]{8},len:0x[0-9a-f]+\r\n.*entry 0x[0-9a-f]{8}\r\n", first, re.DOTALL)
    assert "rst:0xc (RTC_SW_CPU_RST),boot:0xd (SPI_FAST_FLASH_BOOT)\r\nSaved PC:0x" in rec.values["reboot"]
    assert "rst:0x1 (POWERON),boot:0x5 (DOWNLOAD(USB/UART0/1))\r\nwaiting for download\r\n" in rec.values["download"]
    rec.ok("run")
    assert rec.values["after_run"].startswith("Uptime of the device")


def test_pytest_embedded_flashes_a_virtual_set_and_expects_startup_lines(scenarios: dict[str, Future[Record]]) -> None:
    rec = record(scenarios, "pytest_embedded")
    rec.ok("pytest", r"1 passed")


# --------------------------------------------------------------------------- process lifecycle


def test_serve_exits_cleanly_on_sigterm_and_unpublishes(tmp_path: Path) -> None:
    from tests.vboard_process import start_board

    board: BoardProcess = start_board("lifecycle", tmp_path)
    assert board_published(board) == board.url
    busy = run_tool("rig.vboard.serve", "lifecycle", "--state-dir", tmp_path, timeout=30)
    assert busy.returncode == 3 and "already running" in busy.stderr
    assert board.stop() == 0
    assert not board_port_file(board).exists()


LAB_YAML = """
lab: cli-test
boards:
  - name: cli-vb
    kind: virtual
  - name: bench-01
    kind: esp
    port: /dev/ttyUSB0
"""


def test_rig_vboard_serve_runs_a_lab_board_in_the_foreground(tmp_path: Path) -> None:
    lab = tmp_path / "boards.yaml"
    lab.write_text(LAB_YAML)
    cli = [sys.executable, "-c", "from rig.vboard.cli import app; app()", "serve"]
    proc = subprocess.Popen([*cli, "cli-vb", "--boards", str(lab)], stdout=subprocess.PIPE, text=True, cwd=tmp_path)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    try:
        assert url.startswith("rfc2217://127.0.0.1:")
        assert (tmp_path / ".rig" / "boards" / "cli-vb" / "port").read_text().strip() == url
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        proc.stdout.close()
    assert not (tmp_path / ".rig" / "boards" / "cli-vb" / "port").exists()
    real = subprocess.run([*cli, "bench-01", "--boards", str(lab)], capture_output=True, text=True, timeout=60, check=False)
    assert real.returncode == 2 and "only virtual boards can be served" in real.stderr
    unknown = subprocess.run([*cli, "nope", "--boards", str(lab)], capture_output=True, text=True, timeout=60, check=False)
    assert unknown.returncode == 2 and "no board named 'nope'" in unknown.stderr

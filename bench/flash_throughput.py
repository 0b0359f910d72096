"""esptool write throughput to a virtual board, side by side with a real ESP32-C3's ceiling.

Run: ``.venv/bin/python bench/flash_throughput.py [--size BYTES] [--baud 921600] [--repeats 3] [--clients cli,local]``

A real chip's ceiling is the UART: at *baud* with 8N1 framing (10 bits per byte) the
wire carries ``baud / 10`` bytes per second — 92 160 B/s at 921 600 baud — and no
write can go faster than the bytes esptool must send. With compression (esptool's
default with the stub) those wire bytes are deflated data, so the real ceiling for
the file is ``baud / 10 * (file bytes / wire bytes)``; both ceilings are printed.

The virtual board is started as the farm starts it (``python -m rig.vboard.serve``)
and written by these clients:

* ``cli``    — ``esptool --port rfc2217://… write-flash`` as a lab engineer types it.
  pyserial's RFC 2217 client renegotiates every port setting (two acknowledged round
  trips, each polled with a 50 ms sleep) whenever a port timeout is assigned, and
  esptool assigns one around most commands;
* ``pinned`` — the same ``esptool.main`` on a port whose timeout was set once to
  esptool's command timeout: commands with the default timeout skip the
  renegotiation, compressed blocks get computed timeouts and still pay;
* ``local``  — what the rig itself runs (``rig.espressif_tools.run_tool``):
  ``python -m rig.boards.tool_runner esptool …``, esptool on the rig's RFC 2217 client
  whose timeout changes stay local (line settings are still negotiated), and without
  rendering the trace hex dumps esptool 5.6 builds and discards when ``--trace`` is off
  (see :mod:`rig.boards.tool_runner`). What remains is esptool's and the emulator's own cost;

A last pair of rows (``engine``) feeds the same write, as the bytes arrive on the TCP
socket (Telnet-escaped SLIP frames), through the emulator's RFC 2217 data filter, SLIP
decoder and protocol engine in this process: the emulator's own capacity, without
sockets and thread hand-offs.

Throughput is esptool's own figure ("Wrote … in … seconds (… kbit/s)"): file bytes
over the time from the first FLASH_BEGIN to the last block, excluding connect and
verification. Each row is measured ``--repeats`` times; the table shows the median and
the spread (min–max of the ratio), because the host is shared and numbers are noisy.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
UART_BITS_PER_BYTE = 10
"""8N1: start bit, 8 data bits, stop bit."""
WRITE_OFFSET = 0x100000
ENV = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200", "PYTHONPATH": str(REPO_ROOT)}
STUB_BLOCK = 0x4000
"""esptool's stub FLASH_WRITE_SIZE: the block size of every write below."""

PINNED_RUNNER = """
import sys
import esptool
from esptool.cmds import detect_chip
from esptool.loader import DEFAULT_TIMEOUT
esp = detect_chip(sys.argv[1])
esp._port.timeout = DEFAULT_TIMEOUT
try:
    esptool.main(sys.argv[2:], esp=esp)
finally:
    esp._port.close()
"""

CLIENTS = ("cli", "pinned", "local")
PAYLOADS = (("random", False), ("random", True), ("firmware", True))


@dataclass(frozen=True)
class Sample:
    """One write: file bytes, bytes on the wire (deflated with ``-z``), seconds, file bytes per second."""

    file_bytes: int
    wire_bytes: int
    seconds: float
    bytes_per_s: float


@dataclass(frozen=True)
class Row:
    client: str
    payload: str
    compress: bool
    samples: tuple[Sample, ...]

    @property
    def file_bytes(self) -> int:
        return self.samples[0].file_bytes

    @property
    def wire_bytes(self) -> int:
        return self.samples[0].wire_bytes

    @property
    def rates(self) -> list[float]:
        return [s.bytes_per_s for s in self.samples]


def payload(kind: str, size: int) -> bytes:
    """``random``: incompressible. ``firmware``: alternating random and constant 256-byte
    runs, which deflates about 2:1 — the order of an ESP-IDF app image."""
    rnd = random.Random(2026)
    if kind == "random":
        return rnd.randbytes(size)
    out = bytearray()
    while len(out) < size:
        out += rnd.randbytes(256) + bytes([rnd.randrange(256)]) * 256
    return bytes(out[:size])


def start_board(state_dir: Path) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "rig.vboard.serve", "bench", "--state-dir", str(state_dir)],
        stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()  # the board prints its URL once it listens
    if not url.startswith("rfc2217://"):
        proc.kill()
        raise SystemExit(f"the virtual board did not start (got {url!r})")
    return proc, url


def command(client: str, url: str, args: list[str]) -> list[str]:
    if client == "cli":
        return [sys.executable, "-m", "esptool", "--port", url, *args]
    if client == "local":
        return [sys.executable, "-m", "rig.boards.tool_runner", "esptool", "--port", url, *args]
    return [sys.executable, "-c", PINNED_RUNNER, url, *args]


def write(url: str, client: str, path: Path, compress: bool, baud: int) -> str:
    args = ["--baud", str(baud), "write-flash", "--no-progress", "-z" if compress else "-u", hex(WRITE_OFFSET), str(path)]
    proc = subprocess.run(command(client, url, args), capture_output=True, text=True, env=ENV, cwd=REPO_ROOT,
                          timeout=600, check=False)  # fmt: skip
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"esptool failed ({client}, {path.name}):\n{text[-3000:]}")
    return text


WROTE_RE = re.compile(
    r"Wrote (?P<n>\d+) bytes(?: \((?P<wire>\d+) compressed\))? at 0x[0-9a-f]+ in (?P<s>[\d.]+) seconds \((?P<kbit>[\d.]+) kbit/s\)"
)


def measure(url: str, client: str, path: Path, compress: bool, baud: int) -> Sample:
    m = WROTE_RE.search(write(url, client, path, compress, baud))
    if m is None:
        raise SystemExit("esptool printed no 'Wrote ... kbit/s' line")
    wire = int(m["wire"]) if m["wire"] else int(m["n"])
    rate = float(m["kbit"]) * 1000 / 8  # esptool's rate is exact; its seconds are rounded to 0.1
    return Sample(int(m["n"]), wire, int(m["n"]) / rate, rate)


def engine_alone(data: bytes, compress: bool, work: Path) -> Sample:
    """The emulator's data path on its own, timed from FLASH_(DEFL_)BEGIN to the last block:
    the write as esptool frames it (16 KB blocks, deflated with ``-z``), SLIP-encoded and
    Telnet-escaped as it arrives on the socket, through the RFC 2217 server's data filter,
    the SLIP decoder and the download-mode engine (replies SLIP-encoded, then dropped)."""
    from serial import rfc2217

    from rig.vboard import slip
    from rig.vboard.board import board_mac
    from rig.vboard.efuse import EfuseController
    from rig.vboard.flash import FlashStorage
    from rig.vboard.rfc2217_server import _FastPortManager, _PortModel
    from rig.vboard.rom import HEADER, DownloadMode, Op, data_checksum, known_stubs

    class NoLine:  # the port model's far end: line changes are not part of this measurement
        def __getattr__(self, _name: str) -> object:
            return lambda *_a: None

    class NoSocket:
        def write(self, _raw: bytes) -> None: ...

    body = zlib.compress(data, 9) if compress else data
    begin_op, data_op = (Op.FLASH_DEFL_BEGIN, Op.FLASH_DEFL_DATA) if compress else (Op.FLASH_BEGIN, Op.FLASH_DATA)
    begin = struct.pack("<5I", len(data), -(-len(body) // STUB_BLOCK), STUB_BLOCK, WRITE_OFFSET, 0)
    frames = [HEADER.pack(0, begin_op, len(begin), 0) + begin]
    for seq, start in enumerate(range(0, len(body), STUB_BLOCK)):
        chunk = body[start : start + STUB_BLOCK]
        if not compress:
            chunk = chunk.ljust(STUB_BLOCK, b"\xff")
        sub = struct.pack("<4I", len(chunk), seq, 0, 0) + chunk
        frames.append(HEADER.pack(0, data_op, len(sub), data_checksum(chunk)) + sub)
    wire = [slip.encode(f).replace(rfc2217.IAC, rfc2217.IAC_DOUBLED) for f in frames]

    with FlashStorage(work / "engine-flash.bin") as flash:
        efuse = EfuseController.open(work / "engine-efuse.bin", board_mac("bench"))
        loader = DownloadMode(flash, efuse, lambda payload: slip.encode(payload), lambda _baud: None, 115200)
        loader.stub = known_stubs()[0]  # as after the upload and OHAI
        telnet = _FastPortManager(_PortModel(NoLine()), NoSocket())  # type: ignore[arg-type]
        decoder = slip.SlipDecoder()
        received: list[bytes] = []
        started = time.perf_counter()
        for raw in wire:
            for at in range(0, len(raw), 65536):  # the server's recv size
                telnet.feed(raw[at : at + 65536], received.append)
                for chunk in received:
                    for frame in decoder.feed(chunk):
                        loader.handle_frame(frame)
                received.clear()
        end = HEADER.pack(0, Op.FLASH_DEFL_END if compress else Op.FLASH_END, 4, 0) + struct.pack("<I", 1)
        loader.handle_frame(end)  # the stub reports the last block's deferred write here
        elapsed = time.perf_counter() - started
        if flash.read(WRITE_OFFSET, len(data)) != data:
            raise SystemExit("the engine wrote something other than the payload")
    return Sample(len(data), len(body), elapsed, len(data) / elapsed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024 * 1024, help="bytes per write (default 1 MiB)")
    parser.add_argument("--baud", type=int, default=921600, help="esptool --baud, and the real chip's UART rate")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row (median and spread shown)")
    parser.add_argument("--clients", default=",".join(CLIENTS), help=f"comma-separated subset of {','.join(CLIENTS)}")
    args = parser.parse_args(argv)
    clients = [c for c in args.clients.split(",") if c]
    unknown = set(clients) - set(CLIENTS)
    if unknown:
        parser.error(f"unknown client(s) {', '.join(sorted(unknown))}; choose from {', '.join(CLIENTS)}")
    raw_ceiling = args.baud / UART_BITS_PER_BYTE

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="vboard-bench-") as tmp:
        work = Path(tmp)
        files = {}
        for kind, _ in PAYLOADS:
            files[kind] = work / f"{kind}.bin"
            files[kind].write_bytes(payload(kind, args.size))
        proc, url = start_board(work / "state")
        try:
            samples: dict[tuple[str, str, bool], list[Sample]] = {}
            for _ in range(args.repeats):  # repeats outermost: a noisy minute spreads over every row
                for client in clients:
                    for kind, compress in PAYLOADS:
                        samples.setdefault((client, kind, compress), []).append(
                            measure(url, client, files[kind], compress, args.baud))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        rows += [Row(c, k, z, tuple(s)) for (c, k, z), s in samples.items()]
        for kind, compress in (("random", False), ("firmware", True)):
            engine = [engine_alone(payload(kind, args.size), compress, work) for _ in range(args.repeats)]
            rows.append(Row("engine", kind, compress, tuple(engine)))

    print(f"esptool write-flash to a virtual ESP32-C3 over RFC 2217, {args.size} bytes per write, "
          f"median of {args.repeats}")  # fmt: skip
    print(f"real ESP32-C3 ceiling at {args.baud} baud (8N1): {raw_ceiling / 1000:.1f} kB/s on the wire\n")
    header = (f"{'client':<7} {'payload':<9} {'mode':<11} {'wire bytes':>10} {'seconds':>8} {'virtual kB/s':>13} "
              f"{'real ceiling kB/s':>18} {'ratio':>8} {'spread':>15} {'ratio to raw':>13}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:
        ceiling = raw_ceiling * r.file_bytes / r.wire_bytes  # what a real chip could reach for this file
        rate = statistics.median(r.rates)
        seconds = statistics.median(s.seconds for s in r.samples)
        spread = f"{min(r.rates) / ceiling:.1f}–{max(r.rates) / ceiling:.1f}x"
        mode = "compressed" if r.compress else "plain"
        print(f"{r.client:<7} {r.payload:<9} {mode:<11} {r.wire_bytes:>10} {seconds:>8.2f} {rate / 1000:>13.1f} "
              f"{ceiling / 1000:>18.1f} {rate / ceiling:>7.1f}x {spread:>15} {rate / raw_ceiling:>12.1f}x")  # fmt: skip
    print("\nratio = virtual throughput / real chip's ceiling for the same bytes on the wire;"
          " ratio to raw = against 92 kB/s flat.")  # fmt: skip
    print("local = what the rig runs;"
          " engine = the emulator's data path in-process.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""esptool write throughput to a virtual board, side by side with a real ESP32-C3's ceiling.

Run: ``.venv/bin/python bench/flash_throughput.py [--size BYTES] [--baud 921600]``

A real chip's ceiling is the UART: at *baud* with 8N1 framing (10 bits per byte) the
wire carries ``baud / 10`` bytes per second — 92 160 B/s at 921 600 baud — and no
write can go faster than the bytes esptool must send. With compression (esptool's
default with the stub) those wire bytes are deflated data, so the real ceiling for
the file is ``baud / 10 * (file bytes / wire bytes)``; both ceilings are printed.

The virtual board is started as the farm starts it (``python -m rig.vboard.serve``)
and written two ways:

* ``cli``    — ``esptool --port rfc2217://… write-flash`` as a lab engineer types it;
* ``pinned`` — the same ``esptool.main`` on a port whose timeout was set once to
  esptool's command timeout. pyserial's RFC 2217 client renegotiates every port
  setting (two acknowledged round trips, each polled with a 50 ms sleep) whenever a
  port timeout is assigned, and the CLI path assigns one around each command; pinned,
  commands with esptool's default timeout skip it (compressed blocks get computed
  timeouts, so they still pay);
* ``local`` — ``esptool.main`` on pyserial's RFC 2217 client subclassed so that a
  timeout change stays local (timeouts are the client's business; nothing needs to
  cross the network): what remains is esptool's and the emulator's own cost.

A last row feeds the same compressed write, as stub frames, straight into the
emulator's protocol engine in this process: the emulator's own capacity.

Throughput is esptool's own figure ("Wrote … in … seconds (… kbit/s)"): file bytes
over the time from the first FLASH_BEGIN to the last block, excluding connect and
verification.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
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
ENV = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"}

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


LOCAL_TIMEOUT_RUNNER = """
import sys
import esptool
from esptool.cmds import detect_chip
from serial import rfc2217

class LocalTimeoutSerial(rfc2217.Serial):
    # renegotiate only when a setting the server needs changed, never for a timeout
    _negotiated = None

    def _reconfigure_port(self):
        if self._write_timeout is not None:
            raise NotImplementedError("write_timeout is currently not supported")  # as pyserial's
        wanted = (self._baudrate, self._bytesize, self._parity, self._stopbits, self._rtscts, self._xonxoff)
        if wanted != self._negotiated:
            super()._reconfigure_port()
            self._negotiated = wanted

port = LocalTimeoutSerial()
port.port = sys.argv[1]
port.baudrate = 115200
port.open()
esp = detect_chip(port)
try:
    esptool.main(sys.argv[2:], esp=esp)
finally:
    port.close()
"""

CLIENTS = ("cli", "pinned", "local")
RUNNERS = {"pinned": PINNED_RUNNER, "local": LOCAL_TIMEOUT_RUNNER}


@dataclass(frozen=True)
class Result:
    client: str
    payload: str
    compress: bool
    file_bytes: int
    wire_bytes: int
    seconds: float
    bytes_per_s: float


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
    url = proc.stdout.readline().strip()
    if not url.startswith("rfc2217://"):
        proc.kill()
        raise SystemExit(f"the virtual board did not start (got {url!r})")
    return proc, url


def write(url: str, client: str, path: Path, compress: bool, baud: int) -> str:
    args = ["--baud", str(baud), "write-flash", "--no-progress", "-z" if compress else "-u", hex(WRITE_OFFSET), str(path)]
    if client == "cli":
        cmd = [sys.executable, "-m", "esptool", "--port", url, *args]
    else:
        cmd = [sys.executable, "-c", RUNNERS[client], url, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO_ROOT, timeout=600, check=False)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise SystemExit(f"esptool failed ({client}, {path.name}):\n{text[-3000:]}")
    return text


WROTE_RE = re.compile(
    r"Wrote (?P<n>\d+) bytes(?: \((?P<wire>\d+) compressed\))? at 0x[0-9a-f]+ in (?P<s>[\d.]+) seconds \((?P<kbit>[\d.]+) kbit/s\)"
)


def measure(url: str, client: str, kind: str, data: bytes, compress: bool, baud: int, work: Path) -> Result:
    path = work / f"{kind}.bin"
    path.write_bytes(data)
    m = WROTE_RE.search(write(url, client, path, compress, baud))
    if m is None:
        raise SystemExit("esptool printed no 'Wrote ... kbit/s' line")
    wire = int(m["wire"]) if m["wire"] else int(m["n"])
    return Result(client, kind, compress, int(m["n"]), wire, float(m["s"]), float(m["kbit"]) * 1000 / 8)


def engine_alone(data: bytes, work: Path) -> Result:
    """The emulator's protocol engine on its own: a stub session's compressed write as
    esptool frames it (16 KB deflate blocks), timed from FLASH_DEFL_BEGIN to FLASH_DEFL_END."""
    from rig.vboard.board import board_mac
    from rig.vboard.efuse import EfuseController
    from rig.vboard.flash import FlashStorage
    from rig.vboard.rom import HEADER, DownloadMode, Op, data_checksum, known_stubs

    with FlashStorage(work / "engine-flash.bin") as flash:
        efuse = EfuseController.open(work / "engine-efuse.bin", board_mac("bench"))
        loader = DownloadMode(flash, efuse, lambda _frame: None, lambda _baud: None, 115200)
        loader.stub = known_stubs()[0]  # as after the upload and OHAI
        deflated = zlib.compress(data, 9)
        block = 0x4000
        begin = struct.pack("<5I", len(data), -(-len(deflated) // block), block, WRITE_OFFSET, 0)
        frames = [HEADER.pack(0, Op.FLASH_DEFL_BEGIN, len(begin), 0) + begin]
        for seq, start in enumerate(range(0, len(deflated), block)):
            chunk = deflated[start : start + block]
            body = struct.pack("<4I", len(chunk), seq, 0, 0) + chunk
            frames.append(HEADER.pack(0, Op.FLASH_DEFL_DATA, len(body), data_checksum(chunk)) + body)
        frames.append(HEADER.pack(0, Op.FLASH_DEFL_END, 4, 0) + struct.pack("<I", 1))
        started = time.perf_counter()
        for frame in frames:
            loader.handle_frame(frame)
        elapsed = time.perf_counter() - started
        if flash.read(WRITE_OFFSET, len(data)) != data:
            raise SystemExit("the engine wrote something other than the payload")
    return Result("engine", "firmware", True, len(data), len(deflated), elapsed, len(data) / elapsed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024 * 1024, help="bytes per write (default 1 MiB)")
    parser.add_argument("--baud", type=int, default=921600, help="esptool --baud, and the real chip's UART rate")
    args = parser.parse_args(argv)
    raw_ceiling = args.baud / UART_BITS_PER_BYTE

    with tempfile.TemporaryDirectory(prefix="vboard-bench-") as tmp:
        work = Path(tmp)
        proc, url = start_board(work / "state")
        try:
            results = [
                measure(url, client, kind, payload(kind, args.size), compress, args.baud, work)
                for client in CLIENTS
                for kind, compress in (("random", False), ("random", True), ("firmware", True))
            ]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        results.append(engine_alone(payload("firmware", args.size), work))

    print(f"esptool write-flash to a virtual ESP32-C3 over RFC 2217, {args.size} bytes per write")
    print(f"real ESP32-C3 ceiling at {args.baud} baud (8N1): {raw_ceiling / 1000:.1f} kB/s on the wire\n")
    header = (f"{'client':<7} {'payload':<9} {'mode':<11} {'wire bytes':>10} {'seconds':>8} {'virtual kB/s':>13} "
              f"{'real ceiling kB/s':>18} {'ratio':>7} {'ratio to raw':>13}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in results:
        ceiling = raw_ceiling * r.file_bytes / r.wire_bytes  # what a real chip could reach for this file
        mode = "compressed" if r.compress else "plain"
        print(f"{r.client:<7} {r.payload:<9} {mode:<11} {r.wire_bytes:>10} {r.seconds:>8.2f} {r.bytes_per_s / 1000:>13.1f} "
              f"{ceiling / 1000:>18.1f} {r.bytes_per_s / ceiling:>6.1f}x {r.bytes_per_s / raw_ceiling:>12.1f}x")  # fmt: skip
    print("\nratio = virtual throughput / real chip's ceiling for the same bytes on the wire;"
          " ratio to raw = against 92 kB/s flat.")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())

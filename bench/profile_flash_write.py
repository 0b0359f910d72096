"""Where an esptool write to a virtual board spends its time: both sides, profiled with cProfile.

Run: ``.venv/bin/python bench/profile_flash_write.py [--payload random|firmware] [--compress] [--top 15]``

The board runs in this process with every thread profiled (the chip thread: UART, SLIP
decoder, download-mode engine, flash; the RFC 2217 session's reader and writer); esptool
runs as the rig runs it (``python -m rig.boards.tool_runner esptool … write-flash``)
under ``python -m cProfile``. Prints, per side, the functions with the most time of
their own. Profiling slows Python code several-fold, so compare shares, not seconds;
bench/flash_throughput.py has the unprofiled numbers.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from bench.flash_throughput import ENV, WRITE_OFFSET, payload  # noqa: E402

MIN_THREAD_SECONDS = 0.05
"""Threads with less profiled time than this (idle helpers) are not printed."""


def profile_threads() -> dict[str, cProfile.Profile]:
    """Profile every thread started from now on; thread name → its profile."""
    profiles: dict[str, cProfile.Profile] = {}
    run = threading.Thread.run

    def profiled_run(self: threading.Thread) -> None:
        profile = profiles[self.name] = cProfile.Profile()
        profile.enable()
        try:
            run(self)
        finally:
            profile.disable()

    threading.Thread.run = profiled_run  # type: ignore[method-assign]
    return profiles


def top(stats: pstats.Stats, count: int) -> str:
    out = io.StringIO()
    stats.stream = out  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(count)
    return "\n".join(line for line in out.getvalue().splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--payload", choices=("random", "firmware"), default="random")
    parser.add_argument("--compress", action="store_true", help="esptool -z (default: -u, plain)")
    parser.add_argument("--size", type=int, default=1024 * 1024)
    parser.add_argument("--baud", type=int, default=921600)
    parser.add_argument("--top", type=int, default=15, help="functions shown per side")
    args = parser.parse_args(argv)

    profiles = profile_threads()
    from rig.vboard.board import VirtualBoard

    with tempfile.TemporaryDirectory(prefix="vboard-profile-") as tmp:
        work = Path(tmp)
        image = work / "payload.bin"
        image.write_bytes(payload(args.payload, args.size))
        esptool_profile = work / "esptool.prof"
        with VirtualBoard("profile", work / "state").start() as board:
            started = time.monotonic()
            proc = subprocess.run(
                [sys.executable, "-m", "cProfile", "-o", str(esptool_profile), "-m", "rig.boards.tool_runner", "esptool",
                 "--port", board.url, "--baud", str(args.baud), "write-flash", "--no-progress",
                 "-z" if args.compress else "-u", hex(WRITE_OFFSET), str(image)],
                capture_output=True, text=True, env=ENV, cwd=REPO_ROOT, timeout=600, check=False,
            )  # fmt: skip
            wall = time.monotonic() - started
        if proc.returncode != 0:
            raise SystemExit(f"esptool failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
        wrote = next((ln for ln in proc.stdout.splitlines() if ln.startswith("Wrote ")), "(no 'Wrote' line)")
        print(f"esptool run (connect, write, verify, reset) {wall:.2f} s under the profiler; {wrote}\n")
        for name, profile in profiles.items():
            stats = pstats.Stats(profile)
            if stats.total_tt >= MIN_THREAD_SECONDS:  # type: ignore[attr-defined]
                print(f"=== emulator thread {name!r}\n{top(stats, args.top)}\n")
        print(f"=== esptool (python -m rig.boards.tool_runner)\n{top(pstats.Stats(str(esptool_profile)), args.top)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

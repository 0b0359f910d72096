"""Where a running virtual board publishes its serial URL.

A virtual board is a separate process; when it listens it writes its
``rfc2217://127.0.0.1:<port>`` URL to ``.rig/boards/<name>/port`` in the lab's state
folder and removes the file when it stops. The farm reads that file — it never
imports the emulator — so a suite reaches a virtual board exactly as a real one.
"""

from __future__ import annotations

import select
import subprocess
import sys
from pathlib import Path


def board_state_dir(state_dir: Path, name: str) -> Path:
    return state_dir / "boards" / name


def port_file(state_dir: Path, name: str) -> Path:
    return board_state_dir(state_dir, name) / "port"


def published_port(state_dir: Path, name: str) -> str | None:
    """The URL a running virtual board published, or ``None`` when it is not running."""
    try:
        url = port_file(state_dir, name).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return url or None


class VirtualBoardStartError(RuntimeError):
    """A virtual board process did not come up; the message names its log."""


def launch_virtual_board(name: str, state_dir: Path, log_path: Path, timeout: float = 30.0) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m rig.vboard.serve NAME`` and wait (on its stdout, not a sleep) for its URL.

    Used by `rig up`'s supervisor and by the farm; neither imports the emulator.
    """
    argv = [sys.executable, "-m", "rig.vboard.serve", name, "--state-dir", str(state_dir)]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode("utf-8", "replace").strip() if ready else ""
    if not line.startswith("rfc2217://"):
        stop_virtual_board(proc)
        raise VirtualBoardStartError(f"virtual board '{name}' did not start (it printed {line!r}). Fix: read {log_path}")
    return proc, line


def stop_virtual_board(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM (the board removes its port file), then SIGKILL if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

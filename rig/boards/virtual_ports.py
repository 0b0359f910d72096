"""Where a running virtual board publishes its serial URL.

A virtual board is a separate process; when it listens it writes its
``rfc2217://127.0.0.1:<port>`` URL to ``.rig/boards/<name>/port`` in the lab's state
folder and removes the file when it stops. The farm reads that file — it never
imports the emulator — so a suite reaches a virtual board exactly as a real one.
"""

from __future__ import annotations

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

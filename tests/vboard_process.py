"""Virtual boards as separate processes, for tests that judge them with the real tools.

A test gets a board exactly as the farm does: ``python -m rig.vboard.serve NAME
--state-dir DIR`` in a subprocess, whose first stdout line is its
``rfc2217://127.0.0.1:<port>`` URL. Everything else goes through that URL (esptool,
espefuse, pyserial, pytest-embedded) or the board's files in the state folder.

* :func:`start_board` / :class:`BoardProcess` — start one, wait for its URL, stop it
  with SIGTERM (and check it removed its port file);
* ``vboard_factory`` — a pytest fixture (module scope) handing out boards in a
  temporary state folder, all stopped at the end of the module;
* :func:`run_tool` — ``python -m esptool|espefuse ...`` in a subprocess, never raising
  on the exit status;
* :func:`pinned_esptool` / :func:`pinned_espefuse` — the same tools through their
  Python API on a port whose timeout is set once to esptool's command timeout (see below);
* :class:`SerialMonitor` — pyserial's RFC 2217 client driving DTR/RTS and collecting
  what the board prints, for console expectations.

Why tests run many board processes side by side: pyserial's RFC 2217 client
renegotiates all port settings (two acknowledged round trips, each polled with a
50 ms sleep) whenever a port's timeout is assigned, and esptool assigns it around
almost every command. Each esptool command therefore costs ~0.2 s of client-side
waiting whatever the board does; independent scenarios are run on separate boards
concurrently to keep the wall time down. Long register-level flows (espefuse burns,
hundreds of READ_REG/WRITE_REG) run through :func:`pinned_espefuse`, which opens the
port, connects with esptool and sets the port timeout to esptool's DEFAULT_TIMEOUT
once: esptool then skips the per-command renegotiation, and the tools' own code does
everything else (``python -m tests.vboard_process``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import serial
from esptool.cmds import detect_chip
from esptool.loader import DEFAULT_TIMEOUT, ESPLoader

from rig.boards.virtual_ports import board_state_dir, port_file, published_port

REPO_ROOT = Path(__file__).resolve().parents[1]
READY_TIMEOUT_S = 30.0
"""Board start to URL on stdout: Python start-up plus opening flash and eFuse files."""
STOP_TIMEOUT_S = 15.0
TOOL_TIMEOUT_S = 240.0
TOOL_ENV = {"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"}


@dataclass
class BoardProcess:
    """One running ``rig.vboard.serve`` process."""

    name: str
    state_dir: Path
    url: str
    proc: subprocess.Popen[str]
    log_path: Path

    @property
    def root(self) -> Path:
        return board_state_dir(self.state_dir, self.name)

    @property
    def flash_path(self) -> Path:
        return self.root / "flash.bin"

    @property
    def efuse_path(self) -> Path:
        return self.root / "efuse.bin"

    def read_flash_file(self, offset: int, size: int) -> bytes:
        """The board's flash as persisted on disk (the board keeps it memory-mapped)."""
        with self.flash_path.open("rb") as f:
            f.seek(offset)
            return f.read(size)

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int:
        """SIGTERM and wait; the exit status (0 = clean)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode


def start_board(name: str, state_dir: Path, port: int = 0, ready_timeout: float = READY_TIMEOUT_S) -> BoardProcess:
    """Start board *name* with state in *state_dir* and wait for its URL line."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    log_path = state_dir / f"{name}.serve.log"
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rig.vboard.serve", name, "--state-dir", str(state_dir), "--port", str(port),
             "--log-level", "INFO"],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )  # fmt: skip
    assert proc.stdout is not None
    deadline = time.monotonic() + ready_timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not sel.select(remaining):
                proc.kill()
                proc.wait()
                raise TimeoutError(f"virtual board {name} printed no URL within {ready_timeout} s:\n{log_path.read_text()}")
            line = proc.stdout.readline()
            if not line:
                proc.wait()
                raise RuntimeError(f"virtual board {name} exited ({proc.returncode}) before listening:\n{log_path.read_text()}")
            if line.startswith("rfc2217://"):
                return BoardProcess(name, state_dir, line.strip(), proc, log_path)


@dataclass
class BoardFactory:
    """Hands out boards under one state folder and stops them all at the end."""

    state_dir: Path
    boards: list[BoardProcess] = field(default_factory=list)

    def __call__(self, name: str) -> BoardProcess:
        board = start_board(name, self.state_dir)
        self.boards.append(board)
        return board

    def stop_all(self) -> dict[str, int]:
        return {b.name: b.stop() for b in self.boards}


@pytest.fixture(scope="module")
def vboard_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BoardFactory]:
    """Start virtual board processes in a module-wide temporary state folder."""
    factory = BoardFactory(tmp_path_factory.mktemp("vboards"))
    yield factory
    factory.stop_all()


# --------------------------------------------------------------------------- tools


def run_tool(tool: str, *args: str | Path, timeout: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``python -m <tool> ARGS`` (esptool, espefuse, espsecure) with plain output; never raises on exit status."""
    return subprocess.run(
        [sys.executable, "-m", tool, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **TOOL_ENV},
        check=False,
    )


def esptool(url: str, *args: str | Path, timeout: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return run_tool("esptool", "--port", url, *args, timeout=timeout)


def espefuse(url: str, *args: str | Path, timeout: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    return run_tool("espefuse", "--port", url, *args, timeout=timeout)


def output(proc: subprocess.CompletedProcess[str]) -> str:
    return proc.stdout + proc.stderr


def printed_mac(proc: subprocess.CompletedProcess[str]) -> str | None:
    """The ``MAC:`` esptool printed (the last one)."""
    found = re.findall(r"^MAC:\s+([0-9a-f:]{17})", output(proc), re.MULTILINE)
    return found[-1] if found else None


def board_published(board: BoardProcess) -> str | None:
    return published_port(board.state_dir, board.name)


def board_port_file(board: BoardProcess) -> Path:
    return port_file(board.state_dir, board.name)


def pinned_esptool(url: str, *args: str | Path, timeout: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """esptool ARGS through ``esptool.main(args, esp=...)`` on a port with a pinned timeout."""
    return _runner("esptool", url, *args, timeout=timeout)


def pinned_espefuse(url: str, *args: str | Path, timeout: float = TOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``summary FILE`` (JSON) or ``burn NAME VALUE [NAME VALUE ...]`` through espefuse's
    ``init_commands`` API on a port with a pinned timeout (espefuse 5.6's ``main(esp=...)``
    ignores the external loader, so its command objects are used directly)."""
    return _runner("espefuse", url, *args, timeout=timeout)


def _runner(tool: str, url: str, *args: str | Path, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.vboard_process", tool, url, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **TOOL_ENV},
        cwd=REPO_ROOT,
        check=False,
    )


def _pinned_loader(url: str) -> ESPLoader:
    esp = detect_chip(url)
    esp._port.timeout = DEFAULT_TIMEOUT  # one renegotiation now instead of two per command
    return esp


def _run_pinned(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vboard_process")
    parser.add_argument("tool", choices=("esptool", "espefuse"))
    parser.add_argument("url")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    esp = _pinned_loader(ns.url)
    try:
        if ns.tool == "esptool":
            import esptool

            esptool.main(ns.args, esp=esp)
            return 0
        from espefuse import init_commands

        commands = init_commands(esp=esp, do_not_confirm=True)
        action, *rest = ns.args
        if action == "summary":
            with open(rest[0], "w") as out:
                commands.summary([], "json", out)
            json.loads(Path(rest[0]).read_text())  # fail here, not in the test, on broken output
        elif action == "burn":
            commands.burn_efuse(dict(zip(rest[::2], rest[1::2], strict=True)))
        else:
            raise SystemExit(f"unknown espefuse action {action!r}")
        return 0
    finally:
        esp._port.close()


# --------------------------------------------------------------------------- console


class SerialMonitor:
    """pyserial's RFC 2217 client on a board: DTR/RTS control and console capture.

    Opened with DTR and RTS released (as a terminal with the lines off), so opening it
    never resets the chip.
    """

    def __init__(self, url: str, baud: int = 115200) -> None:
        self.port = serial.serial_for_url(url, do_not_open=True, baudrate=baud, timeout=0.1)
        self.port.dtr = False
        self.port.rts = False
        self.port.open()
        self.text = ""

    def hard_reset(self) -> None:
        """EN pulse with GPIO9 released, as esptool's HardReset: boots from flash."""
        self.port.rts = True
        time.sleep(0.1)  # EN held low for 100 ms, as esptool holds it
        self.port.rts = False

    def download_reset(self) -> None:
        """esptool's ClassicReset: EN low, then GPIO9 low while EN rises: download mode."""
        self.port.dtr = False
        self.port.rts = True
        time.sleep(0.1)
        self.port.dtr = True
        self.port.rts = False
        time.sleep(0.05)
        self.port.dtr = False

    def expect(self, pattern: str, timeout: float) -> re.Match[str]:
        """Read until *pattern* (a regex) appears in the console text; the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.text)
            if m:
                return m
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} on the console within {timeout} s; got:\n{self.text[-3000:]}")
            self.text += self.port.read(4096).decode("utf-8", "replace")

    def write_line(self, line: str) -> None:
        self.port.write(line.encode() + b"\r\n")

    def close(self) -> None:
        self.port.close()

    def __enter__(self) -> SerialMonitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


if __name__ == "__main__":
    sys.exit(_run_pinned(sys.argv[1:]))

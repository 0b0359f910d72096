"""Running Espressif's own tools (esptool, espefuse, espsecure) as a lab engineer would.

The rig reaches a board only through its serial port and these tools, so the
same commands work on a real and a virtual board. Each tool runs as a subprocess of
the rig's interpreter environment, with a timeout, and a failure becomes a
:class:`EspressifToolError` quoting the tool's own ``A fatal error occurred`` line plus
a fix, never a bare ``CalledProcessError``.

The tools that open a port (esptool, espefuse) run through
``python -m rig.boards.tool_runner``: the tool's own console entry point, unmodified,
with pyserial's ``rfc2217://`` client swapped for one whose port-timeout changes stay
local (:mod:`rig.boards.serial_url_handlers.protocol_rfc2217`). Line settings are still
negotiated with the server, so this serves a board behind Espressif's
``esp_rfc2217_server`` as well as a virtual one. espsecure runs as its console script.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

TOOLS = ("esptool", "espefuse", "espsecure")
PORT_TOOLS = ("esptool", "espefuse")
"""Tools that open a serial port (espsecure works on files only); they run through :data:`TOOL_RUNNER`."""
TOOL_RUNNER = "rig.boards.tool_runner"


class EspressifToolError(RuntimeError):
    """An esptool/espefuse/espsecure run failed; the message says why and what to do."""

    def __init__(self, message: str, run: ToolRun | None = None):
        super().__init__(message)
        self.run = run


@dataclass(frozen=True)
class ToolRun:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def tool_path(name: str) -> str:
    """The console script *name* next to the running interpreter, else on ``PATH``."""
    if name not in TOOLS:
        raise ValueError(f"unknown Espressif tool {name!r}; expected one of {TOOLS}")
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise EspressifToolError(f"{name} is not installed. Fix: run `make install` (it installs esptool>=5 into .venv)")
    return found


def tool_argv(name: str, args: Sequence[str]) -> tuple[str, ...]:
    """The command line that runs ``<name> <args>``: the runner module for port tools, else the console script."""
    if name in PORT_TOOLS:
        if importlib.util.find_spec(name) is None:
            raise EspressifToolError(
                f"{name} is not installed for {sys.executable}. Fix: run `make install` (it installs esptool>=5 into .venv)"
            )
        return (sys.executable, "-m", TOOL_RUNNER, name, *map(str, args))
    return (tool_path(name), *map(str, args))


def _with_rig_importable(env: dict[str, str] | None) -> dict[str, str]:
    """*env* (default: this process's) with the folder holding the ``rig`` package on
    ``PYTHONPATH``, so the runner imports this rig even when it is not installed."""
    env = dict(os.environ if env is None else env)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


def _fatal_line(text: str) -> str:
    """esptool's own explanation: the 'A fatal error occurred' line and the one after it."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for i, ln in enumerate(lines):
        if "fatal error" in ln.lower() or ln.startswith("ERROR"):
            return " ".join(lines[i : i + 2])
    return lines[-1] if lines else "no output"


def redact(text: str, secrets: Sequence[str]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def run_tool(
    name: str,
    args: Sequence[str],
    *,
    timeout: float = 120.0,
    check: bool = True,
    secrets: Sequence[str] = (),
    input_text: str | None = None,
    env: dict[str, str] | None = None,
) -> ToolRun:
    """Run ``<name> <args>``; with *check*, a non-zero exit raises :class:`EspressifToolError`.

    *secrets* are scrubbed from everything the error or the returned run carries, so a
    PIN passed through a config file never reaches a log through a tool's echo.
    """
    argv = tool_argv(name, args)
    if name in PORT_TOOLS:
        env = _with_rig_importable(env)
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, input=input_text, env=env, check=False)
    except subprocess.TimeoutExpired as exc:
        raise EspressifToolError(
            f"`{name} {' '.join(map(str, args[-2:]))}` did not finish within {timeout:.0f} s. "
            "Fix: check the board is powered and in reach (a hung board needs a power cycle)"
        ) from exc
    run = ToolRun(argv, proc.returncode, redact(proc.stdout, secrets), redact(proc.stderr, secrets))
    if check and proc.returncode != 0:
        shown = redact(" ".join(map(str, args)), secrets)
        raise EspressifToolError(f"`{name} {shown}` failed (exit {proc.returncode}): {_fatal_line(run.output)}", run)
    return run

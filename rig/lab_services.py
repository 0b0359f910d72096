"""`rig up` / `rig status` / `rig down`: the lab's background services.

`rig up` starts one supervisor process per lab (detached, its own session) that runs
the local cloud stack in-process and one ``python -m rig.vboard.serve`` process per
virtual board, then records what it started in ``.rig/up.json``. The parent waits for
the supervisor's single ``READY``/``ERROR`` line on a pipe — an event, not a sleep —
so a port already taken comes back to the engineer as one readable message.
`rig down` sends SIGTERM and waits on a pidfd for the supervisor to exit; the
supervisor stops boards and stack in reverse order and removes the state file.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO

from rig.boards.virtual_ports import (
    VirtualBoardStartError,
    address_file,
    launch_virtual_board,
    port_file,
    stop_virtual_board,
    write_radio_file,
)
from rig.cloud.stack import LocalStack, StackEndpoints, StackPorts
from rig.lab import Lab, LabConfigError, load_lab

STATE_FILE = "up.json"
LOG_FILE = "up.log"
READY = "READY"
ERROR = "ERROR"


class LabServicesError(RuntimeError):
    """The lab's services could not be started or stopped; the message names the fix."""


@dataclass
class LabServicesState:
    pid: int
    lab: str
    started_at: float
    stack: StackEndpoints | None
    boards: dict[str, str] = field(default_factory=dict)
    board_pids: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        return json.dumps(data, indent=2)

    @classmethod
    def from_json(cls, text: str) -> LabServicesState:
        data = json.loads(text)
        stack = StackEndpoints(**data["stack"]) if data.get("stack") else None
        return cls(data["pid"], data["lab"], data["started_at"], stack, data.get("boards", {}), data.get("board_pids", {}))


def state_path(lab: Lab) -> Path:
    return lab.state_dir / STATE_FILE


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def running_state(lab: Lab) -> LabServicesState | None:
    """The state of a live supervisor for this lab, or ``None`` (a stale file is removed)."""
    path = state_path(lab)
    try:
        state = LabServicesState.from_json(path.read_text())
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return None
    if not pid_alive(state.pid):
        path.unlink(missing_ok=True)
        return None
    return state


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- the parent side


def start(lab: Lab, boards_file: Path, *, test_mode: bool = False, timeout: float = 120.0) -> tuple[LabServicesState, bool]:
    """Start the lab's services (or find them running). Returns (state, started_now)."""
    existing = running_state(lab)
    if existing:
        return existing, False
    lab.state_dir.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "rig.lab_services", "--boards", str(boards_file.resolve())]
    if test_mode:
        argv.append("--test-mode")
    with open(lab.state_dir / LOG_FILE, "ab") as logf:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL, start_new_session=True)
    assert proc.stdout is not None
    line = _read_line(proc.stdout, timeout)
    if line.startswith(READY):
        proc.stdout.close()
        return LabServicesState.from_json(line[len(READY) :].strip()), True
    proc.wait(timeout=30)
    if line.startswith(ERROR):
        raise LabServicesError(line[len(ERROR) :].strip())
    raise LabServicesError(
        f"the lab services did not start within {timeout:.0f} s. Fix: read {lab.state_dir / LOG_FILE} for the reason"
    )


def _read_line(stream: IO[bytes], timeout: float) -> str:
    ready, _, _ = select.select([stream], [], [], timeout)
    if not ready:
        return ""
    return stream.readline().decode("utf-8", "replace")


def stop(lab: Lab, timeout: float = 60.0) -> LabServicesState | None:
    """Stop the running supervisor; returns what was running, or ``None`` if nothing was."""
    state = running_state(lab)
    if state is None:
        return None
    try:
        pidfd = os.pidfd_open(state.pid)
    except ProcessLookupError:
        state_path(lab).unlink(missing_ok=True)
        return state
    try:
        os.kill(state.pid, signal.SIGTERM)
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            os.kill(state.pid, signal.SIGKILL)
            raise LabServicesError(
                f"the lab services (pid {state.pid}) did not stop within {timeout:.0f} s and were killed. "
                f"Fix: check {lab.state_dir / LOG_FILE}; stray board processes may need `pkill -f rig.vboard.serve`"
            )
    finally:
        os.close(pidfd)
    state_path(lab).unlink(missing_ok=True)
    return state


# --------------------------------------------------------------------------- the supervisor


class _Supervisor:
    def __init__(self, lab: Lab, boards_file: Path, test_mode: bool):
        self.lab = lab
        self.boards_file = boards_file
        self.test_mode = test_mode
        self.stack: LocalStack | None = None
        self.boards: dict[str, subprocess.Popen[bytes]] = {}
        self.urls: dict[str, str] = {}
        self.stopping = threading.Event()

    def start(self) -> LabServicesState:
        endpoints = None
        if self.lab.stack.kind == "local":
            ports = StackPorts(mqtt=self.lab.stack.mqtt_port, api=self.lab.stack.api_port, ota=self.lab.stack.ota_port)
            self.stack = LocalStack.for_lab(self.lab, test_mode=self.test_mode, ports=ports)
            endpoints = self.stack.start()
        virtual = [board for board in self.lab.boards if board.kind == "virtual"]
        if virtual:
            write_radio_file(self.lab.state_dir, self.lab.radio_networks())  # the boards' air: boards.yaml wifi:
        for board in virtual:
            self.urls[board.name] = self._start_board(board.name, board.address)
        return LabServicesState(
            os.getpid(), self.lab.lab, time.time(), endpoints, dict(self.urls), {n: p.pid for n, p in self.boards.items()}
        )

    def _start_board(self, name: str, address: str | None) -> str:
        try:
            log_path = self.lab.state_dir / f"vboard-{name}.log"
            proc, url = launch_virtual_board(name, self.lab.state_dir, log_path, address=address)
        except VirtualBoardStartError as exc:
            raise LabServicesError(str(exc)) from None
        self.boards[name] = proc
        return url

    def stop(self) -> None:
        for name, proc in reversed(list(self.boards.items())):
            stop_virtual_board(proc)
            port_file(self.lab.state_dir, name).unlink(missing_ok=True)
            address_file(self.lab.state_dir, name).unlink(missing_ok=True)
        if self.stack:
            self.stack.stop()


def supervise(boards_file: Path, test_mode: bool) -> int:
    """The supervisor's main: start, report READY/ERROR on stdout, run until SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        lab = load_lab(boards_file)
    except LabConfigError as exc:
        print(f"{ERROR} {exc}", flush=True)
        return 2
    sup = _Supervisor(lab, boards_file, test_mode)
    stop_requested = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop_requested.set())
    signal.signal(signal.SIGINT, lambda *_: stop_requested.set())
    try:
        state = sup.start()
    except Exception as exc:  # every start failure must reach the engineer as one line
        sup.stop()
        print(f"{ERROR} {exc}".replace("\n", " "), flush=True)
        return 2
    path = state_path(lab)
    path.write_text(state.to_json())
    print(f"{READY} {json.dumps(json.loads(state.to_json()))}", flush=True)
    sys.stdout.close()
    stop_requested.wait()
    sup.stop()
    path.unlink(missing_ok=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rig.lab_services", description=__doc__)
    parser.add_argument("--boards", type=Path, required=True)
    parser.add_argument("--test-mode", action="store_true")
    args = parser.parse_args(argv)
    return supervise(args.boards, args.test_mode)


if __name__ == "__main__":
    sys.exit(main())

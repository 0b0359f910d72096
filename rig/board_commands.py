"""``rig board …``: bench operations on one board of the lab, through its serial port.

Kept apart from :mod:`rig.cli` so each command group stays small; the CLI mounts it.
Every command resolves the board as the farm does (a real board's declared port, a
virtual board's published URL) and talks to it only through esptool.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rig.boards.board import Board, BoardError
from rig.boards.claim import claim_board
from rig.boards.virtual_ports import board_state_dir, published_port
from rig.cloud.pki import LabPki
from rig.cloud.stack import StackEndpoints
from rig.lab import DEFAULT_BOARDS_FILE, Lab, LabConfigError, load_lab
from rig.lab_services import running_state

board_app = typer.Typer(no_args_is_help=True, help="Operations on one board (identity, claim).")
console = Console()
err_console = Console(stderr=True)

BoardsOption = Annotated[Path, typer.Option("--boards", "-b", help="lab description file", show_default=True)]


def _fail(message: str) -> typer.Exit:
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(2)


def load_lab_or_exit(path: Path) -> Lab:
    try:
        return load_lab(path)
    except LabConfigError as exc:
        raise _fail(f"{path} is not usable:\n" + "\n".join(f"  {p}" for p in exc.problems)) from None


def board_for(lab: Lab, name: str) -> Board:
    """The named board with its live port, or a readable exit naming the fix."""
    try:
        spec = lab.board(name)
    except LabConfigError as exc:
        raise _fail("\n".join(exc.problems)) from None
    port = spec.port if spec.kind == "esp" else published_port(lab.state_dir, spec.name)
    if port is None:
        raise _fail(f"virtual board {name!r} is not running. Fix: `rig up` (or `rig vboard serve {name}`)")
    return Board(spec=spec, port=port, firmware_dir=lab.firmware_dir(spec), log=logging.getLogger(f"rig.board.{name}"))


def running_stack(lab: Lab) -> StackEndpoints:
    """The endpoints of the lab's running local stack (started by `rig up`)."""
    state = running_state(lab)
    if state is None or state.stack is None:
        raise _fail("the lab's cloud stack is not running. Fix: `rig up` first")
    return state.stack


@board_app.command("claim")
def claim(
    name: str,
    boards_file: BoardsOption = Path(DEFAULT_BOARDS_FILE),
    force: Annotated[bool, typer.Option(help="write a new fctry (new random, new PoP) even if it matches")] = False,
) -> None:
    """Give a board its cloud identity: a node certificate from the lab PKI in its fctry partition."""
    lab = load_lab_or_exit(boards_file)
    board = board_for(lab, name)
    stack = running_stack(lab)
    try:
        pki = LabPki(Path(stack.state_dir) / "pki")
        record = claim_board(board, pki, stack.mqtt_host, stack.mqtt_port, board_state_dir(lab.state_dir, name), force=force)
    except BoardError as exc:
        raise _fail(str(exc)) from None
    action = "written" if record.written else "already in place"
    console.print(f"board {name}: node {record.node_id} (MAC {record.mac}), fctry at {record.fctry_offset:#x} {action}")

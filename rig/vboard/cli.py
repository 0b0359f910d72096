"""``rig vboard``: run a virtual board of the lab in the foreground.

``rig vboard serve NAME [--boards boards.yaml] [--port N]`` checks that NAME is a
``kind: virtual`` board of the lab, then serves it until Ctrl-C / SIGTERM, printing
its ``rfc2217://127.0.0.1:<port>`` URL and publishing it in
``.rig/boards/<NAME>/port`` for the farm (see :mod:`rig.vboard.serve`).

``rig vboard new-chip NAME`` puts a new chip on a stopped virtual board: blank flash and
factory eFuses on its next start, the old chip's files kept under ``retired/`` (see
:mod:`rig.vboard.chip_swap`) — for a board whose SECURE_VERSION bits are spent.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rig.lab import DEFAULT_BOARDS_FILE, LabConfigError, load_lab
from rig.vboard.board import BoardBusyError
from rig.vboard.chip_swap import replace_chip
from rig.vboard.serve import run_foreground

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Virtual ESP32-C3 boards.")
err_console = Console(stderr=True)


@app.callback()
def vboard() -> None:
    """Virtual ESP32-C3 boards (a callback keeps ``serve`` a subcommand even while it is the only one)."""


def _virtual_board(boards_file: Path, name: str) -> Path:
    """The lab's state folder, once *name* is known to be a virtual board of it (exit 2 otherwise)."""
    try:
        lab = load_lab(boards_file)
        board = lab.board(name)
    except LabConfigError as exc:
        err_console.print(f"[bold red]{boards_file} is not usable:[/]")
        for problem in exc.problems:
            err_console.print(f"  {problem}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if board.kind != "virtual":
        err_console.print(
            f"board '{name}' is a real board (kind: {board.kind}); only virtual boards can be served. "
            f"Fix: pick one of {', '.join(b.name for b in lab.boards if b.kind == 'virtual') or '(none in this lab)'}",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)
    return lab.state_dir


@app.command("new-chip")
def new_chip(
    name: Annotated[str, typer.Argument(help="the virtual board, as named in boards.yaml")],
    boards_file: Annotated[Path, typer.Option("--boards", "-b", help="lab description file")] = Path(DEFAULT_BOARDS_FILE),
) -> None:
    """Put a new chip on stopped virtual board NAME (blank flash, factory eFuses); the old one's files are kept."""
    state_dir = _virtual_board(boards_file, name)
    try:
        retired = replace_chip(state_dir, name)
    except BoardBusyError as exc:
        err_console.print(f"{exc}", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    print(f"{name}: new chip; the old one's flash, eFuses, claim and ledger are in {retired}" if retired
          else f"{name}: the board has not run yet; it already has a new chip")  # fmt: skip


@app.command()
def serve(
    name: Annotated[str, typer.Argument(help="the virtual board to run, as named in boards.yaml")],
    boards_file: Annotated[Path, typer.Option("--boards", "-b", help="lab description file")] = Path(DEFAULT_BOARDS_FILE),
    port: Annotated[int, typer.Option("--port", help="TCP port on 127.0.0.1 (0 = any free port)", min=0, max=65535)] = 0,
) -> None:
    """Run virtual board NAME until interrupted; prints its rfc2217:// URL when ready."""
    raise typer.Exit(run_foreground(name, _virtual_board(boards_file, name), port))

"""What every ``rig`` command that reads the lab shares: the ``--boards`` option, and loading
that file into a :class:`rig.lab.Lab` with one readable message per problem (exit status 2)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rig.lab import Lab, LabConfigError, load_lab

BoardsOption = Annotated[Path, typer.Option("--boards", "-b", help="lab description file", show_default=True)]
err_console = Console(stderr=True)


def load_lab_or_exit(path: Path) -> Lab:
    try:
        return load_lab(path)
    except LabConfigError as exc:
        err_console.print(f"[bold red]{path} is not usable:[/]")
        for problem in exc.problems:
            err_console.print(f"  {problem}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None

"""A new chip on a virtual board: what a lab does when a sacrificial board's eFuses are spent.

On silicon an anti-rollback run burns ``SECURE_VERSION`` bits for good, and the ledger
(:mod:`rig.boards.secure_version_ledger`) refuses runs once the 16 are gone; the lab then
solders a new chip or takes a new board. :func:`replace_chip` is that for a virtual board:
its next start finds blank flash and factory eFuses (the same MAC — the board keeps its name
and ``127.0.1.N`` address). Nothing is deleted: the old chip's flash, eFuses (the file and
the sidecar holding its read-protected keys), claim and ledger move to
``<board>/retired/<UTC time>/``, so the evidence of what was burned stays.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from rig.boards.secure_version_ledger import LEDGER_FILE
from rig.vboard.board import BoardBusyError, BoardPaths

__all__ = ["CLAIM_FILES", "replace_chip"]

CLAIM_FILES = ("claim.json", "claim")
"""The identity written to ``fctry`` (:mod:`rig.boards.claim`): its record and its work folder."""


def replace_chip(state_dir: Path, name: str, now: datetime | None = None) -> Path | None:
    """Retire virtual board *name*'s chip; returns the folder its files moved to (``None``: the
    board never ran, it has no chip yet). Refused while the board runs (its lock is held).

    What belongs to the chip rather than to the board: its flash and eFuses (:class:`BoardPaths`;
    the eFuse file and its read-protected keys' sidecar, which only together are the chip's fuse
    array), its claim and its SECURE_VERSION ledger."""
    paths = BoardPaths.of(state_dir, name)
    chip = (paths.flash, paths.efuse, paths.efuse_read_protected, *(paths.root / f for f in (*CLAIM_FILES, LEDGER_FILE)))
    present = [path for path in chip if path.exists()]
    if not present:
        return None
    lock = os.open(paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BoardBusyError(f"virtual board {name!r} is running; stop it first (`rig down`, or end its `rig vboard serve`)") from None
        stamp = (now or datetime.now(UTC)).strftime("%Y%m%dT%H%M%SZ")
        retired = paths.root / "retired" / stamp
        retired.mkdir(parents=True, exist_ok=False)
        for path in present:
            shutil.move(path, retired / path.name)
        return retired
    finally:
        os.close(lock)

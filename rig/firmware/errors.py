"""Errors raised while reading or writing firmware artefacts."""

from __future__ import annotations


class FirmwareFormatError(ValueError):
    """A firmware artefact is not what its format says it must be.

    Carries *what* was being read, the byte *offset* where it went wrong and, where
    the rig knows one, a *fix* for the engineer. ``str()`` is one readable line.
    """

    def __init__(self, what: str, problem: str, offset: int | None = None, fix: str | None = None):
        self.what = what
        self.problem = problem
        self.offset = offset
        self.fix = fix
        where = f" at offset 0x{offset:x}" if offset is not None else ""
        hint = f" — {fix}" if fix else ""
        super().__init__(f"{what}: {problem}{where}{hint}")

"""Reading a suite run's pytest output in meta-tests: what failed, and why, in a few lines."""

from __future__ import annotations

import re

_WHY = re.compile(r"^(E  .*|FAILED .*|ERROR .*|_{3,} .* _{3,})$", re.MULTILINE)


def failure_excerpt(stdout: str, limit: int = 80) -> str:
    """The failing tests' headers, their ``E`` lines and the short summary: enough to tell a
    flaw caught from a test that failed for another reason (a timeout under load, a lab fault)."""
    lines = _WHY.findall(stdout)
    return "\n".join(lines[:limit]) or stdout[-3000:]

"""Meta-tests of the HIL suites: run a suite as `rig run` runs it and read what failed, and why.

* :func:`suite_tests` — the test functions a suite file defines;
* :func:`virtual_lab` — a ``boards.yaml`` for a lab of virtual boards with the local stack;
* :func:`run_suites` — pytest on suite test ids in its own process, its own lab and run folder;
* :func:`failure_report` — what one test's failure raised, to tell a flaw caught on its check from
  a test that failed on the way there (a timeout under load, a lab fault);
* :func:`failure_excerpt` — every failure's headers and ``E`` lines, for an assertion message;
* :func:`run_clean_and_flawed`, :func:`assert_passed`, :func:`assert_failed_on` — the shape every
  suite meta-test has: a clean board passes, each flawed board fails the right check.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

from rig.firmware.flawed_set import write_flawed_build
from rig.firmware.virtual_set import build_virtual_set, ensure_signing_key

REPO = Path(__file__).resolve().parents[1]
SUITE_TIMEOUT_S = 900.0

_WHY = re.compile(r"^(E  .*|FAILED .*|ERROR .*|_{3,} .* _{3,})$", re.MULTILINE)
_SECTION = re.compile(r"^_+ (?!_ )(.+?) _+$")
"""A report section's header, ``____ test_name[board] ____`` (not the ``_ _ _`` line between two frames)."""
_SECTION_END = re.compile(r"^(-+ Captured .* -+|=+ .* =+)$")


def suite_tests(suite: str) -> list[str]:
    """The ``test_*`` functions *suite* (a path from the repo root) defines, in file order."""
    return re.findall(r"^def (test_\w+)\(", (REPO / suite).read_text(), re.MULTILINE)


def virtual_lab(path: Path, lab: str, boards: Mapping[str, Path], sacrificial: Iterable[str] = ()) -> Path:
    """Write *path*: lab *lab*, the local stack, one Wi-Fi network, and a virtual board per
    *boards* entry (name → firmware set folder); boards named in *sacrificial* may burn eFuses."""
    spend = set(sacrificial)
    path.write_text(
        f"lab: {lab}\nstack: {{kind: local}}\n"
        "wifi:\n  - ssid: meta-lab\n    passphrase: meta-lab-passphrase\n"
        "boards:\n" + "".join(f"  - name: {name}\n    kind: virtual\n    firmware: {fw}\n"
                  + ("    efuse: {sacrificial: true}\n" if name in spend else "") for name, fw in boards.items())
    )
    return path


def run_suites(tests: Iterable[str], boards: Path, run_dir: Path, *options: str,
               timeout: float = SUITE_TIMEOUT_S) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """``pytest TESTS --boards=BOARDS --rig-run-dir=RUN_DIR -q -rA OPTIONS`` from the repo root,
    as `rig run` runs the suites; never raises on the exit status. The terminal is wide, so
    report lines are not cut."""
    argv = [sys.executable, "-m", "pytest", *tests, f"--boards={boards}", f"--rig-run-dir={run_dir}", "-q", "-rA",
            "-p", "no:randomly", *options]  # fmt: skip
    env = {**os.environ, "COLUMNS": "400"}
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False, env=env)


def failure_report(stdout: str, test: str) -> str:
    """The ``E`` lines of *test*'s failure section (*test* as pytest names it in the run:
    ``test_name[board]``), without their ``E`` margin; empty if it has none.

    Look for a failure message here, never in the whole output: a long traceback prints the
    failing test's whole source and the frames it went through (pytest-embedded's ``expect``
    included), assertion messages and all, so any fragment of them is in the output whenever
    the test fails for any reason. A captured ESP-IDF ``E (…)`` log line is not an ``E`` line,
    and an INCONCLUSIVE (``pytest.fail(..., pytrace=False)``) has none."""
    raised: list[str] = []
    inside = False
    for line in stdout.splitlines():
        header = _SECTION.match(line)
        if header is not None or _SECTION_END.match(line):
            inside = header is not None and header.group(1) == test
        elif inside and line.startswith("E  "):
            raised.append(line[1:].strip())
    return "\n".join(raised)


def failure_excerpt(stdout: str, limit: int = 80) -> str:
    """The failing tests' headers, their ``E`` lines and the short summary: enough to tell a
    flaw caught from a test that failed for another reason (a timeout under load, a lab fault)."""
    lines = _WHY.findall(stdout)
    return "\n".join(lines[:limit]) or stdout[-3000:]


def run_clean_and_flawed(root: Path, lab: str, boards: Mapping[str, str | tuple[str, ...] | None],
                         selected: Iterable[str]) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """The usual meta-test run: the virtual set for each board mapped to None, the set's ``base``
    with the flaw (or flaws) each other board maps to (built once per combination), one lab *lab*
    holding them all, and one :func:`run_suites` of *selected* (``suite::test[board]`` ids) in *root*."""
    key = ensure_signing_key(root / "key.pem")
    build_virtual_set(root / "sets" / "clean", key)
    folders: dict[str, Path] = {}
    for board, flaws in boards.items():
        names = (flaws,) if isinstance(flaws, str) else tuple(flaws or ())
        folder = root / "sets" / ("+".join(names) or "clean")
        if names and not (folder / "base").exists():
            write_flawed_build(folder / "base", list(names), key)
        folders[board] = folder
    return run_suites(list(selected), virtual_lab(root / "boards.yaml", lab, folders), root / "run")


def assert_passed(run: subprocess.CompletedProcess[str], suite: str, test_id: str) -> None:
    """*test_id* (``test[board]``, as the run names it) of *suite* passed."""
    assert f"PASSED {suite}::{test_id}" in run.stdout, failure_excerpt(run.stdout)


def assert_failed_on(run: subprocess.CompletedProcess[str], suite: str, test_id: str, message: str) -> None:
    """*test_id* of *suite* failed, and on its own check: its failure raised *message*."""
    assert f"FAILED {suite}::{test_id}" in run.stdout, f"{test_id} did not fail\n{failure_excerpt(run.stdout)}"
    raised = failure_report(run.stdout, test_id)
    assert message in raised, f"{test_id} failed, but not on its check ({message!r}): {raised}"

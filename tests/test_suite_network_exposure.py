"""suites/test_network_exposure.py passes on a clean node and catches an undocumented debug port.

One lab with two virtual boards — the virtual set's ``base``, and ``base`` with the flaw
``open_debug_port`` (an extra TCP listener on the board's address that greets every client with
a shell prompt) — and one pytest run of the suite: the clean board runs every test and must pass
them all; the flawed board runs the tests that must FAIL on it, each for the reason named here.
The suite runs as `rig run` would run it: its own process, its own lab file (never the repo's
boards.yaml), its own in-process cloud.
"""

from __future__ import annotations

import subprocess

import pytest

from rig.firmware.flawed_set import write_flawed_build
from rig.firmware.virtual_set import build_virtual_set, ensure_signing_key
from tests.suite_runs import failure_excerpt, failure_report, run_suites, suite_tests, virtual_lab

SUITE = "suites/test_network_exposure.py"
CLEAN_BOARD = "nx-clean"
FLAWED_BOARD = "nx-debugport"
FLAW = "open_debug_port"
CAUGHT_BY = {
    "test_only_documented_ports_are_open": "is open on the board and not documented (it answers 'esp32c3 debug console",
    "test_only_the_provisioning_port_is_open_before_onboarding": "is open on the board and not documented (it answers",
}
"""The tests that must FAIL on the flawed board, and a fragment of each failure message."""


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    root = tmp_path_factory.mktemp("nxsuite")
    key = ensure_signing_key(root / "key.pem")
    build_virtual_set(root / "sets" / "clean", key)
    write_flawed_build(root / "sets" / FLAW / "base", [FLAW], key)
    lab = virtual_lab(root / "boards.yaml", "network-exposure-meta",
                      {CLEAN_BOARD: root / "sets" / "clean", FLAWED_BOARD: root / "sets" / FLAW})  # fmt: skip
    selected = [f"{SUITE}::{name}[{CLEAN_BOARD}]" for name in suite_tests(SUITE)]
    selected += [f"{SUITE}::{name}[{FLAWED_BOARD}]" for name in CAUGHT_BY]
    return run_suites(selected, lab, root / "run")


def test_the_suite_has_the_tests_this_meta_test_names() -> None:
    assert set(CAUGHT_BY) <= set(suite_tests(SUITE))


def test_clean_board_passes_every_network_exposure_test(suite_run: subprocess.CompletedProcess[str]) -> None:
    for name in suite_tests(SUITE):
        assert f"PASSED {SUITE}::{name}[{CLEAN_BOARD}]" in suite_run.stdout, failure_excerpt(suite_run.stdout)


@pytest.mark.parametrize("test", sorted(CAUGHT_BY))
def test_an_open_debug_port_fails_the_suite(suite_run: subprocess.CompletedProcess[str], test: str) -> None:
    assert f"FAILED {SUITE}::{test}[{FLAWED_BOARD}]" in suite_run.stdout, f"{test} did not fail\n{failure_excerpt(suite_run.stdout)}"
    raised = failure_report(suite_run.stdout, f"{test}[{FLAWED_BOARD}]")
    assert CAUGHT_BY[test] in raised, f"{test} failed, but not on its check ({CAUGHT_BY[test]!r}): {raised}"

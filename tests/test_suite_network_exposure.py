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

from tests.suite_runs import assert_failed_on, assert_passed, run_clean_and_flawed, suite_tests

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
    selected = [f"{SUITE}::{name}[{CLEAN_BOARD}]" for name in suite_tests(SUITE)]
    selected += [f"{SUITE}::{name}[{FLAWED_BOARD}]" for name in CAUGHT_BY]
    boards = {CLEAN_BOARD: None, FLAWED_BOARD: FLAW}
    return run_clean_and_flawed(tmp_path_factory.mktemp("nxsuite"), "network-exposure-meta", boards, selected)


def test_the_suite_has_the_tests_this_meta_test_names() -> None:
    assert set(CAUGHT_BY) <= set(suite_tests(SUITE))


def test_clean_board_passes_every_network_exposure_test(suite_run: subprocess.CompletedProcess[str]) -> None:
    for name in suite_tests(SUITE):
        assert_passed(suite_run, SUITE, f"{name}[{CLEAN_BOARD}]")


@pytest.mark.parametrize("test", sorted(CAUGHT_BY))
def test_an_open_debug_port_fails_the_suite(suite_run: subprocess.CompletedProcess[str], test: str) -> None:
    assert_failed_on(suite_run, SUITE, f"{test}[{FLAWED_BOARD}]", CAUGHT_BY[test])

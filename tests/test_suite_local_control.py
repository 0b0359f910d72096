"""suites/test_local_control.py passes on a clean node and catches local control without a PoP.

One lab with two virtual boards — the virtual set's ``base``, and ``base`` with the flaw
``local_ctrl_no_pop`` (security 1 without proof of possession, empty ``POP`` reported) — and
one pytest run of the suite: the clean board runs every test and must pass them all; the
flawed board runs the tests that must FAIL on it, each for the reason named here. The suite
runs as `rig run` would run it: its own process, its own lab file (never the repo's
boards.yaml), its own in-process cloud.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.suite_runs import assert_failed_on, assert_passed, run_clean_and_flawed, suite_tests

SUITE = "suites/test_local_control.py"
CLEAN_BOARD = "lc-clean"
FLAWED_BOARD = "lc-nopop"
FLAW = "local_ctrl_no_pop"
CAUGHT_BY = {
    "test_local_control_needs_the_pop": "a local-control session was established without a PoP",
    "test_local_control_pop_is_the_nodes_own_secret": "reports no PoP",
}
"""The tests that must FAIL on the flawed board, and a fragment of each failure message."""


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    selected = [f"{SUITE}::{name}[{CLEAN_BOARD}]" for name in suite_tests(SUITE)]
    selected += [f"{SUITE}::{name}[{FLAWED_BOARD}]" for name in CAUGHT_BY]
    boards = {CLEAN_BOARD: None, FLAWED_BOARD: FLAW}
    return run_clean_and_flawed(tmp_path_factory.mktemp("lcsuite"), "local-control-meta", boards, selected)


def test_the_suite_has_the_tests_this_meta_test_names() -> None:
    assert set(CAUGHT_BY) <= set(suite_tests(SUITE))


def test_clean_board_passes_every_local_control_test(suite_run: subprocess.CompletedProcess[str]) -> None:
    for name in suite_tests(SUITE):
        assert_passed(suite_run, SUITE, f"{name}[{CLEAN_BOARD}]")


@pytest.mark.parametrize("test", sorted(CAUGHT_BY))
def test_local_control_without_a_pop_fails_the_suite(suite_run: subprocess.CompletedProcess[str], test: str) -> None:
    assert_failed_on(suite_run, SUITE, f"{test}[{FLAWED_BOARD}]", CAUGHT_BY[test])

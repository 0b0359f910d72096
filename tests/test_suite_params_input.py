"""suites/test_params_input.py passes on a clean node and catches a node that panics on malformed params.

One lab with two virtual boards — the virtual set's ``base``, and ``base`` with the flaw
``panics_on_bad_params`` (a ``params/remote`` payload that does not parse panics the firmware:
Guru Meditation, reset, reboot) — and one pytest run of the suite: the clean board runs every
test and must pass them all; the flawed board runs the tests that must FAIL on it, each for the
reason named here. The suite runs as `rig run` would run it: its own process, its own lab file
(never the repo's boards.yaml), its own in-process cloud in test mode.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from rig.cloud.api import MAX_RAW_TO_NODE_BYTES
from suites.test_params_input import MALFORMED, POWER, SWITCH
from tests.suite_runs import assert_failed_on, assert_passed, run_clean_and_flawed, suite_tests

SUITE = "suites/test_params_input.py"
CLEAN_BOARD = "pi-clean"
FLAWED_BOARD = "pi-panics"
FLAW = "panics_on_bad_params"
CAUGHT_BY = {
    "test_malformed_params_do_not_crash_the_node": "the node crashed on malformed params/remote input (",
}
"""The tests that must FAIL on the flawed board, and a fragment of each failure message."""


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    selected = [f"{SUITE}::{name}[{CLEAN_BOARD}]" for name in suite_tests(SUITE)]
    selected += [f"{SUITE}::{name}[{FLAWED_BOARD}]" for name in CAUGHT_BY]
    boards = {CLEAN_BOARD: None, FLAWED_BOARD: FLAW}
    return run_clean_and_flawed(tmp_path_factory.mktemp("pisuite"), "params-input-meta", boards, selected)


def test_the_suite_has_the_tests_this_meta_test_names() -> None:
    assert set(CAUGHT_BY) <= set(suite_tests(SUITE))


def test_the_catalogue_is_malformed_and_fits_the_test_control() -> None:
    """No payload is a valid Power write (the echo the suite waits for must come from its own valid
    write), labels name one case each, and every payload fits ``POST /test/mqtt/to-node``."""
    assert len({m.label for m in MALFORMED}) == len(MALFORMED)
    for case in MALFORMED:
        assert len(case.payload) <= MAX_RAW_TO_NODE_BYTES, case.label
        try:
            body = json.loads(case.payload)
        except ValueError:
            continue
        device = body.get(SWITCH) if isinstance(body, dict) else None
        assert not (isinstance(device, dict) and isinstance(device.get(POWER), bool)), f"{case.label} is a valid {SWITCH}.{POWER} write"


def test_clean_board_passes_every_params_input_test(suite_run: subprocess.CompletedProcess[str]) -> None:
    for name in suite_tests(SUITE):
        assert_passed(suite_run, SUITE, f"{name}[{CLEAN_BOARD}]")


@pytest.mark.parametrize("test", sorted(CAUGHT_BY))
def test_a_node_that_panics_on_bad_params_fails_the_suite(suite_run: subprocess.CompletedProcess[str], test: str) -> None:
    assert_failed_on(suite_run, SUITE, f"{test}[{FLAWED_BOARD}]", CAUGHT_BY[test])

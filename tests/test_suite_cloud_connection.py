"""suites/test_cloud_connection.py passes on a clean node and catches each connection flaw.

One lab, one run of the suite as `rig run` runs it (its own process, lab file and in-process
cloud): the clean board runs every test and must pass; each flawed board (the virtual set's
``base`` with one flaw) runs the tests that must FAIL on it, each for the reason named here.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.suite_runs import assert_failed_on, assert_passed, run_clean_and_flawed, suite_tests

SUITE = "suites/test_cloud_connection.py"
CLEAN_BOARD = "cc-clean"
IMPOSTOR_TEST = "test_node_refuses_a_broker_it_cannot_authenticate"
IMPOSTORS = ("unknown_ca", "wrong_subject", "expired")
"""The suite's impostor kinds (fixtures.impostor.IMPOSTOR_KINDS), which pytest puts before the board in the id."""

CAUGHT_BY: dict[str, tuple[str, list[tuple[str, str]]]] = {
    "no_server_cert_check": ("cc-nocert", [
        (f"{IMPOSTOR_TEST}[unknown_ca-", "completed a TLS handshake with an impostor broker"),
        (f"{IMPOSTOR_TEST}[wrong_subject-", "completed a TLS handshake with an impostor broker"),
        (f"{IMPOSTOR_TEST}[expired-", "completed a TLS handshake with an impostor broker"),
    ]),
    "plaintext_mqtt": ("cc-plainmqtt", [("test_node_reaches_the_cloud_only_over_tls[", "plaintext MQTT port")]),
    "no_reconnect_backoff": ("cc-storm", [("test_node_backs_off_while_it_cannot_connect[", "reconnection storm")]),
}  # fmt: skip
"""flaw → (its board, [(the test's id up to the board, a fragment of its failure message)])."""


def run_id(test: str, board: str) -> str:
    """A test id prefix from :data:`CAUGHT_BY` completed with *board*."""
    return f"{test}{board}]"


def clean_ids() -> list[str]:
    return [f"{IMPOSTOR_TEST}[{kind}-" if name == IMPOSTOR_TEST else f"{name}[" for name in suite_tests(SUITE)
            for kind in (IMPOSTORS if name == IMPOSTOR_TEST else ("",))]  # fmt: skip


CATCHES = [(flaw, board, test, message) for flaw, (board, tests) in sorted(CAUGHT_BY.items()) for test, message in tests]


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    boards: dict[str, str | None] = {CLEAN_BOARD: None} | {board: flaw for flaw, (board, _) in CAUGHT_BY.items()}
    selected = [f"{SUITE}::{run_id(test, CLEAN_BOARD)}" for test in clean_ids()]
    selected += [f"{SUITE}::{run_id(test, board)}" for _, board, test, _ in CATCHES]
    return run_clean_and_flawed(tmp_path_factory.mktemp("ccsuite"), "cloud-connection-meta", boards, selected)


def test_the_suite_has_the_tests_this_meta_test_names() -> None:
    names = suite_tests(SUITE)
    assert IMPOSTOR_TEST in names
    for _, _, test, _ in CATCHES:
        assert test.split("[")[0] in names


def test_clean_board_passes_every_test(suite_run: subprocess.CompletedProcess[str]) -> None:
    for test in clean_ids():
        assert_passed(suite_run, SUITE, run_id(test, CLEAN_BOARD))


@pytest.mark.parametrize(("flaw", "board", "test", "message"), CATCHES, ids=[f"{f}-{t.split('[')[1] or 'board'}" for f, _, t, _ in CATCHES])
def test_flaw_fails_its_check(suite_run: subprocess.CompletedProcess[str], flaw: str, board: str, test: str, message: str) -> None:
    assert_failed_on(suite_run, SUITE, run_id(test, board), message)

"""The node suites catch the virtual board's flaws in their area (provisioning, factory reset).

One lab, one board per flawed firmware set (the virtual set's ``base`` with one flaw),
one pytest run selecting, per board, the test that must catch its flaw — plus the clean
board running every test of those suites, which must pass. The suites run exactly as
`rig run` would run them: their own process, their own lab, their own in-process cloud.
"""

from __future__ import annotations

import subprocess

import pytest

from rig.firmware.flawed_set import write_flawed_build
from rig.firmware.virtual_set import build_virtual_set, ensure_signing_key
from tests.suite_runs import failure_excerpt, failure_report, run_suites, suite_tests, virtual_lab

PROVISIONING = "suites/test_provisioning.py"
FACTORY_RESET = "suites/test_factory_reset.py"
SUITES = (PROVISIONING, FACTORY_RESET)

# flaw → (board name, suite, the test that must FAIL on it, a fragment of its failure message)
CAUGHT_BY = {
    "sec0_provisioning": ("pv-sec0", PROVISIONING, "test_security_0_is_refused", "offers provisioning without security"),
    "wrong_pop_accepted": ("pv-wrongpop", PROVISIONING, "test_wrong_pop_never_yields_a_session", "a session was established"),
    "static_pop": ("pv-staticpop", PROVISIONING, "test_pop_is_unique_and_not_derivable", "Espressif's example value"),
    "pop_from_mac": ("pv-macpop", PROVISIONING, "test_pop_is_unique_and_not_derivable", "MAC address bytes"),
    "logs_wifi_password": ("pv-logspass", PROVISIONING, "test_provisioning_with_the_pop_reaches_the_cloud", "should not have been matched"),
    "factory_reset_keeps_wifi": ("fr-keepswifi", FACTORY_RESET, "test_factory_reset_erases_user_data_and_keeps_identity",
                                 "user data survived the factory reset"),
}
CLEAN_BOARD = "pv-clean"


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    root = tmp_path_factory.mktemp("nodesuites")
    key = ensure_signing_key(root / "key.pem")
    build_virtual_set(root / "sets" / "clean", key)
    boards = {CLEAN_BOARD: root / "sets" / "clean"}
    selected = [f"{suite}::{name}[{CLEAN_BOARD}]" for suite in SUITES for name in suite_tests(suite)]
    for flaw, (board, suite, test, _) in CAUGHT_BY.items():
        write_flawed_build(root / "sets" / flaw / "base", [flaw], key)
        boards[board] = root / "sets" / flaw
        selected.append(f"{suite}::{test}[{board}]")
    return run_suites(selected, virtual_lab(root / "boards.yaml", "flawed-nodes", boards), root / "run")


def test_the_suites_have_the_tests_this_meta_test_names() -> None:
    for board, suite, test, _ in CAUGHT_BY.values():
        assert test in suite_tests(suite), f"{suite} has no {test} to catch the flaw of {board}"


@pytest.mark.parametrize("suite", SUITES)
def test_clean_board_passes_every_test(suite_run: subprocess.CompletedProcess[str], suite: str) -> None:
    for name in suite_tests(suite):
        assert f"PASSED {suite}::{name}[{CLEAN_BOARD}]" in suite_run.stdout, failure_excerpt(suite_run.stdout)


@pytest.mark.parametrize("flaw", sorted(CAUGHT_BY))
def test_flaw_fails_its_check(suite_run: subprocess.CompletedProcess[str], flaw: str) -> None:
    board, suite, test, message = CAUGHT_BY[flaw]
    assert f"FAILED {suite}::{test}[{board}]" in suite_run.stdout, f"{flaw}: {test} did not fail\n{failure_excerpt(suite_run.stdout)}"
    raised = failure_report(suite_run.stdout, f"{test}[{board}]")
    assert message in raised, f"{flaw}: {test} failed, but not on its check ({message!r}): {raised}"

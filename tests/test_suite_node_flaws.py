"""The node suites catch the virtual board's flaws in their area (provisioning, factory reset).

One lab, one board per flawed firmware set (the virtual set's ``base`` with one flaw),
one pytest run selecting, per board, the test that must catch its flaw — plus the clean
board running every test of those suites, which must pass. The suites run exactly as
`rig run` would run them: their own process, their own lab, their own in-process cloud.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rig.firmware.flawed_set import write_flawed_build
from rig.firmware.virtual_set import build_virtual_set, ensure_signing_key
from tests.suite_runs import failure_excerpt

REPO = Path(__file__).resolve().parents[1]
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
    boards = [f"  - name: {CLEAN_BOARD}\n    kind: virtual\n    firmware: {root / 'sets' / 'clean'}\n"]
    selected = [f"{suite}::{name}[{CLEAN_BOARD}]" for suite in SUITES for name in _suite_tests(suite)]
    for flaw, (board, suite, test, _) in CAUGHT_BY.items():
        write_flawed_build(root / "sets" / flaw / "base", [flaw], key)
        boards.append(f"  - name: {board}\n    kind: virtual\n    firmware: {root / 'sets' / flaw}\n")
        selected.append(f"{suite}::{test}[{board}]")
    lab = root / "boards.yaml"
    lab.write_text(
        "lab: flawed-nodes\nstack: {kind: local}\n"
        "wifi:\n  - ssid: meta-lab\n    passphrase: meta-lab-passphrase\n"
        "boards:\n" + "".join(boards)
    )
    argv = [sys.executable, "-m", "pytest", *selected, f"--boards={lab}", f"--rig-run-dir={root / 'run'}", "-q", "-rA",
            "-p", "no:randomly"]  # fmt: skip
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900, check=False)


def _suite_tests(suite: str) -> list[str]:
    return re.findall(r"^def (test_\w+)\(", (REPO / suite).read_text(), re.MULTILINE)


@pytest.mark.parametrize("suite", SUITES)
def test_clean_board_passes_every_test(suite_run: subprocess.CompletedProcess[str], suite: str) -> None:
    for name in _suite_tests(suite):
        assert f"PASSED {suite}::{name}[{CLEAN_BOARD}]" in suite_run.stdout, failure_excerpt(suite_run.stdout)


@pytest.mark.parametrize("flaw", sorted(CAUGHT_BY))
def test_flaw_fails_its_check(suite_run: subprocess.CompletedProcess[str], flaw: str) -> None:
    board, suite, test, message = CAUGHT_BY[flaw]
    failed = f"FAILED {suite}::{test}[{board}]"
    lines = [line for line in suite_run.stdout.splitlines() if line.startswith(failed)]
    assert lines, f"{flaw}: expected {failed}\n{failure_excerpt(suite_run.stdout)}"
    assert message in "\n".join(lines) or message in suite_run.stdout, f"{flaw}: {lines}\n{failure_excerpt(suite_run.stdout)}"

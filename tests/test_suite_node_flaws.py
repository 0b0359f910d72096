"""The node suites catch the virtual board's flaws in their area (provisioning, factory reset,
secure storage).

One lab, one board per flawed firmware set (the virtual set's ``base`` with one flaw),
one pytest run selecting, per board, the test that must catch its flaw — plus the clean
board running every test of those suites, which must pass. The suites run exactly as
`rig run` would run them: their own process, their own lab, their own in-process cloud.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.suite_runs import assert_failed_on, assert_passed, run_clean_and_flawed, suite_tests

PROVISIONING = "suites/test_provisioning.py"
FACTORY_RESET = "suites/test_factory_reset.py"
SECURE_STORAGE = "suites/test_secure_storage.py"
SUITES = (PROVISIONING, FACTORY_RESET, SECURE_STORAGE)
FACTORY_RESET_TEST = "test_factory_reset_erases_user_data_and_keeps_identity"
VARIANTS = {FACTORY_RESET_TEST: ("console", "boot_button")}
"""Suite tests parametrized beside the board, and their ids (which pytest puts before the
board's): the factory reset runs once per way the device offers (the suite's RESET_WAYS)."""


def variant_ids(name: str) -> list[str]:
    """Suite test *name*'s ids without the board: ``name``, or ``name[variant`` per variant."""
    return [f"{name}[{variant}" for variant in VARIANTS.get(name, ())] or [name]


def on_board(test: str, board: str) -> str:
    """A test id from :func:`variant_ids` (or :data:`CAUGHT_BY`) completed with *board*, as pytest names it."""
    return f"{test}-{board}]" if "[" in test else f"{test}[{board}]"


# flaw → (board name, suite, the test that must FAIL on it — an id of variant_ids —, a fragment of its
# failure message), or a list of those when several tests must each catch it on their own check
# (on the same board)
CAUGHT_BY: dict[str, tuple[str, str, str, str] | list[tuple[str, str, str, str]]] = {
    "sec0_provisioning": [
        ("pv-sec0", PROVISIONING, "test_security_0_is_refused", "offers provisioning without security"),
        ("pv-sec0", PROVISIONING, "test_secrets_never_cross_the_wire_in_clear", "the Wi-Fi passphrase in clear"),
    ],
    "wrong_pop_accepted": ("pv-wrongpop", PROVISIONING, "test_wrong_pop_never_yields_a_session", "a session was established"),
    "static_pop": ("pv-staticpop", PROVISIONING, "test_pop_is_unique_and_not_derivable", "Espressif's example value"),
    "pop_from_mac": ("pv-macpop", PROVISIONING, "test_pop_is_unique_and_not_derivable", "MAC address bytes"),
    "logs_wifi_password": ("pv-logspass", PROVISIONING, "test_provisioning_with_the_pop_reaches_the_cloud", "should not have been matched"),
    "plaintext_nvs": [  # a new chip: no HMAC key from an earlier clean image either
        ("st-plainnvs", SECURE_STORAGE, "test_user_secrets_are_not_readable_in_flash", "the Wi-Fi passphrase is readable in clear"),
        ("st-plainnvs", SECURE_STORAGE, "test_nvs_encryption_key_cannot_be_read_out", "no eFuse key block has purpose HMAC_UP"),
    ],
    "factory_reset_keeps_wifi": [  # one erase function behind the console command and the BOOT button
        ("fr-keepswifi", FACTORY_RESET, test, "user data survived the factory reset") for test in variant_ids(FACTORY_RESET_TEST)
    ],
}


def catches(flaw: str) -> list[tuple[str, str, str, str]]:
    """Every (board, suite, test, message) that must catch *flaw*."""
    entry = CAUGHT_BY[flaw]
    return entry if isinstance(entry, list) else [entry]


PLAIN_NVS_BOARD = "fr-plainnvs"
PLAIN_NVS_KEEPS_WIFI_BOARD = "fr-plainkeeps"
PLAIN_NVS_TESTS = [f"{FACTORY_RESET_TEST}[console", "test_short_boot_button_press_resets_only_wifi"]
"""Where NVS is in clear (a real board built without NVS encryption) the factory-reset suite judges
by namespace names instead of entry by entry: it must pass such a clean-behaving board, and catch
``factory_reset_keeps_wifi`` there by name. One reset way is enough: the judging is the same."""

CATCHES = [(flaw, *catch) for flaw in sorted(CAUGHT_BY) for catch in catches(flaw)]
"""(flaw, board, suite, test, message), one per test that must catch a flaw."""
CLEAN_BOARD = "pv-clean"


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    boards: dict[str, str | tuple[str, ...] | None] = {CLEAN_BOARD: None} | {board: flaw for flaw, board, *_ in CATCHES}
    boards |= {PLAIN_NVS_BOARD: "plaintext_nvs", PLAIN_NVS_KEEPS_WIFI_BOARD: ("plaintext_nvs", "factory_reset_keeps_wifi")}
    selected = [f"{suite}::{on_board(test, CLEAN_BOARD)}" for suite in SUITES for name in suite_tests(suite) for test in variant_ids(name)]
    selected += [f"{suite}::{on_board(test, board)}" for _, board, suite, test, _ in CATCHES]
    selected += [f"{FACTORY_RESET}::{on_board(test, PLAIN_NVS_BOARD)}" for test in PLAIN_NVS_TESTS]
    selected.append(f"{FACTORY_RESET}::{on_board(PLAIN_NVS_TESTS[0], PLAIN_NVS_KEEPS_WIFI_BOARD)}")
    return run_clean_and_flawed(tmp_path_factory.mktemp("nodesuites"), "flawed-nodes", boards, selected)


def test_the_suites_have_the_tests_this_meta_test_names() -> None:
    for _, board, suite, test, _ in CATCHES:
        assert test.split("[")[0] in suite_tests(suite), f"{suite} has no {test} to catch the flaw of {board}"
    boards: dict[str, str] = {}
    for flaw, board, *_ in CATCHES:
        assert boards.setdefault(board, flaw) == flaw, f"board {board} would carry two flaws, {boards[board]} and {flaw}"


@pytest.mark.parametrize("suite", SUITES)
def test_clean_board_passes_every_test(suite_run: subprocess.CompletedProcess[str], suite: str) -> None:
    for name in suite_tests(suite):
        for test in variant_ids(name):
            assert_passed(suite_run, suite, on_board(test, CLEAN_BOARD))


@pytest.mark.parametrize(("flaw", "board", "suite", "test", "message"), CATCHES,
                         ids=[flaw if len(catches(flaw)) == 1 else f"{flaw}-{test.replace('[', '-')}" for flaw, _, _, test, _ in CATCHES])
def test_flaw_fails_its_check(suite_run: subprocess.CompletedProcess[str], flaw: str, board: str, suite: str, test: str,
                              message: str) -> None:
    assert_failed_on(suite_run, suite, on_board(test, board), message)


def test_factory_reset_on_nvs_in_clear_is_judged_by_name(suite_run: subprocess.CompletedProcess[str]) -> None:
    for test in PLAIN_NVS_TESTS:
        assert_passed(suite_run, FACTORY_RESET, on_board(test, PLAIN_NVS_BOARD))
    assert_failed_on(suite_run, FACTORY_RESET, on_board(PLAIN_NVS_TESTS[0], PLAIN_NVS_KEEPS_WIFI_BOARD),
                     "user data survived the factory reset: NVS still holds ['nvs.net80211']")  # fmt: skip

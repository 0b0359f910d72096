"""The OTA suites catch the virtual board's OTA flaws, and pass on a clean board.

One lab of virtual boards, each with a full firmware set signed by the lab HSM's default key
(the key the lab's cloud signs OTA images with), and one pytest run of the suites as `rig run`
runs them. A flaw lives in the role that is *running* when the check happens: the update
client's flaws in ``base`` (or in ``next_secure`` for the anti-rollback check, which runs
after ``next_secure`` installed), ``confirms_before_cloud`` in the ``no_cloud`` image that
must roll back. The clean board runs the same tests and must pass them.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from rig.cloud.stack import LocalStack
from rig.firmware.flawed_set import write_flawed_build
from rig.firmware.virtual_set import SetSigner, build_virtual_set
from rig.lab import load_lab
from tests.suite_runs import failure_excerpt, failure_report, run_suites, suite_tests, virtual_lab

OTA, ANTI_ROLLBACK = "suites/test_ota.py", "suites/test_anti_rollback.py"
CLEAN_BOARD = "ota-clean"
PARTIAL_BOARD = "ota-partial"
"""A real farm's set may lack roles: this board's has only ``base`` and ``next``."""
MISSING_ROLES = {
    "crash_on_boot": f"{OTA}::test_image_that_crashes_on_boot_is_rolled_back[OTAE2EImageCrashed",
    "no_cloud": f"{OTA}::test_image_that_cannot_reach_the_cloud_is_rolled_back[OTAE2ERollbackIfUnableToConnectAfterUpdate",
    "next_secure": f"{ANTI_ROLLBACK}::test_secure_version_is_raised_and_older_images_are_refused[advanced_https_ota_anti_rollback",
}

# flaw → (board, role that carries it, suite, test id without the board, a fragment of its failure message)
CAUGHT_BY = {
    "accepts_unsigned_ota": ("ota-unsigned", "base", OTA, "test_bad_image_is_never_booted[OTAE2EUnsignedImage",
                             "instead of refusing the image"),
    "accepts_http_ota": ("ota-http", "base", OTA, "test_download_from_an_unauthenticated_server_is_refused[esp_https_ota_plain_http",
                         "instead of refusing the image"),
    "ignores_secure_version": ("ota-ignoresv", "next_secure", ANTI_ROLLBACK,
                               "test_secure_version_is_raised_and_older_images_are_refused[advanced_https_ota_anti_rollback",
                               "Lower secure version received"),
    "confirms_before_cloud": ("ota-confirms", "no_cloud", OTA,
                              "test_image_that_cannot_reach_the_cloud_is_rolled_back[OTAE2ERollbackIfUnableToConnectAfterUpdate",
                              "it confirmed itself without the cloud"),
}  # fmt: skip
ALSO_CAUGHT = {
    "accepts_unsigned_ota": (OTA, "test_bad_image_is_never_booted[OTAE2EUntrustedCertificate", "instead of refusing the image"),
    "accepts_http_ota": (OTA, "test_download_from_an_unauthenticated_server_is_refused[device_advisor_tls_unknown_ca",
                         "instead of refusing the image"),
}  # fmt: skip
"""Further checks the same flawed boards must fail (no signature check also lets a foreign key in; no server
verification also lets an unknown CA serve). Run on the flawed boards only: `make run` shows clean boards passing them."""


def flawed_set(dest: Path, signer: SetSigner, flaw: str, role: str) -> Path:
    """The clean virtual set with *role* replaced by the same role carrying *flaw*."""
    build_virtual_set(dest, signer)
    write_flawed_build(dest / role, [flaw], signer, base_role=role)  # type: ignore[arg-type]
    return dest


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory: pytest.TempPathFactory) -> subprocess.CompletedProcess[str]:
    root = tmp_path_factory.mktemp("otasuites")
    sets = {CLEAN_BOARD: root / "sets" / "clean", PARTIAL_BOARD: root / "sets" / "partial"}
    sets |= {board: root / "sets" / flaw for flaw, (board, *_) in CAUGHT_BY.items()}
    boards_yaml = virtual_lab(root / "boards.yaml", "ota-meta", sets, sacrificial=set(sets))
    signer = LocalStack.for_lab(load_lab(boards_yaml)).open_signer().set_signer()  # the key the lab's cloud signs with
    build_virtual_set(sets[CLEAN_BOARD], signer)
    for role in ("base", "next"):
        shutil.copytree(sets[CLEAN_BOARD] / role, sets[PARTIAL_BOARD] / role)
    selected = [f"{test}-{PARTIAL_BOARD}]" for test in MISSING_ROLES.values()]
    for flaw, (board, role, suite, test, _) in CAUGHT_BY.items():
        flawed_set(sets[board], signer, flaw, role)
        selected += [f"{suite}::{test}-{board}]", f"{suite}::{test}-{CLEAN_BOARD}]"]
    for flaw, (suite, test, _) in ALSO_CAUGHT.items():
        selected.append(f"{suite}::{test}-{CAUGHT_BY[flaw][0]}]")
    return run_suites(selected, boards_yaml, root / "run")


def test_the_suites_have_the_tests_this_meta_test_names() -> None:
    named = [(flaw, suite, test) for flaw, (_, _, suite, test, _) in CAUGHT_BY.items()]
    named += [(flaw, suite, test) for flaw, (suite, test, _) in ALSO_CAUGHT.items()]
    for flaw, suite, test in named:
        assert test.split("[")[0] in suite_tests(suite), f"{suite} has no {test} to catch {flaw}"


@pytest.mark.parametrize("flaw", sorted(CAUGHT_BY))
def test_clean_board_passes_the_check(suite_run: subprocess.CompletedProcess[str], flaw: str) -> None:
    _, _, suite, test, _ = CAUGHT_BY[flaw]
    assert f"PASSED {suite}::{test}-{CLEAN_BOARD}]" in suite_run.stdout, failure_excerpt(suite_run.stdout)


def assert_caught(run: subprocess.CompletedProcess[str], flaw: str, board: str, suite: str, test: str, message: str) -> None:
    assert f"FAILED {suite}::{test}-{board}]" in run.stdout, f"{flaw}: {test} did not fail\n{failure_excerpt(run.stdout)}"
    raised = failure_report(run.stdout, f"{test}-{board}]")
    assert message in raised, f"{flaw}: {test} failed, but not on its check ({message!r}): {raised}"


@pytest.mark.parametrize("flaw", sorted(CAUGHT_BY))
def test_flaw_fails_its_check(suite_run: subprocess.CompletedProcess[str], flaw: str) -> None:
    board, _, suite, test, message = CAUGHT_BY[flaw]
    assert_caught(suite_run, flaw, board, suite, test, message)


@pytest.mark.parametrize("flaw", sorted(ALSO_CAUGHT))
def test_flaw_fails_its_further_checks(suite_run: subprocess.CompletedProcess[str], flaw: str) -> None:
    assert_caught(suite_run, flaw, CAUGHT_BY[flaw][0], *ALSO_CAUGHT[flaw])


@pytest.mark.parametrize("role", sorted(MISSING_ROLES))
def test_a_missing_role_is_not_applicable_and_named(suite_run: subprocess.CompletedProcess[str], role: str) -> None:
    """NOT_APPLICABLE with the role named, never a pass and never a silent skip."""
    assert f"PASSED {MISSING_ROLES[role]}-{PARTIAL_BOARD}]" not in suite_run.stdout
    skipped = re.search(rf"^SKIPPED .* NOT_APPLICABLE: firmware set \S+partial has no '{role}' build", suite_run.stdout, re.MULTILINE)
    assert skipped, failure_excerpt(suite_run.stdout)

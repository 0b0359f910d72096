"""suites/test_firmware_set.py catches a flawed firmware set (the check's negative path)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from rig.firmware.variants import unsigned, version
from rig.firmware.virtual_set import PROJECT_NAME, build_virtual_set, ensure_signing_key
from tests.suite_runs import failure_excerpt, failure_report, run_suites, virtual_lab

SUITE = "suites/test_firmware_set.py"


@pytest.fixture(scope="module")
def good_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fwset")
    key = ensure_signing_key(root / "k.pem")
    build_virtual_set(root / "set", key)
    return root


def run_suite(tmp_path: Path, firmware: Path) -> subprocess.CompletedProcess[str]:
    return run_suites([SUITE], virtual_lab(tmp_path / "boards.yaml", "flawed", {"vb1": firmware}), tmp_path / "run", timeout=300)


def test_clean_set_passes(good_set: Path, tmp_path: Path) -> None:
    res = run_suite(tmp_path, good_set / "set")
    # passed, not skipped: a set the suite cannot judge (NOT_APPLICABLE) passes nothing
    assert res.returncode == 0 and "SKIPPED" not in res.stdout, failure_excerpt(res.stdout)


def test_unsigned_app_fails_the_signature_check(good_set: Path, tmp_path: Path) -> None:
    flawed = tmp_path / "set"
    shutil.copytree(good_set / "set", flawed)
    app = flawed / "next" / f"{PROJECT_NAME}.bin"
    app.write_bytes(unsigned(app.read_bytes()))
    res = run_suite(tmp_path, flawed)
    assert f"FAILED {SUITE}::test_signed_builds_verify_with_one_key[vb1]" in res.stdout, failure_excerpt(res.stdout)
    assert "next app: " in failure_report(res.stdout, "test_signed_builds_verify_with_one_key[vb1]"), failure_excerpt(res.stdout)


def test_same_version_next_fails_the_ordering_check(good_set: Path, tmp_path: Path) -> None:
    flawed = tmp_path / "set"
    shutil.copytree(good_set / "set", flawed)
    app = flawed / "next" / f"{PROJECT_NAME}.bin"
    app.write_bytes(version(app.read_bytes(), "1.0.0", signer=good_set / "k.pem"))
    res = run_suite(tmp_path, flawed)
    assert f"FAILED {SUITE}::test_next_is_a_newer_version_of_the_same_project[vb1]" in res.stdout, failure_excerpt(res.stdout)
    raised = failure_report(res.stdout, "test_next_is_a_newer_version_of_the_same_project[vb1]")
    assert "RainMaker rejects an OTA with the same version" in raised, failure_excerpt(res.stdout)

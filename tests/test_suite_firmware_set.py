"""suites/test_firmware_set.py catches a flawed firmware set (the check's negative path)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from rig.firmware.variants import unsigned, version
from rig.firmware.virtual_set import PROJECT_NAME, build_virtual_set, ensure_signing_key

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def good_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fwset")
    key = ensure_signing_key(root / "k.pem")
    build_virtual_set(root / "set", key)
    return root


def run_suite(tmp_path: Path, firmware: Path) -> subprocess.CompletedProcess[str]:
    lab = tmp_path / "boards.yaml"
    lab.write_text(f"lab: flawed\nboards:\n  - name: vb1\n    kind: virtual\n    firmware: {firmware}\n")
    argv = [sys.executable, "-m", "pytest", str(REPO / "suites" / "test_firmware_set.py"), f"--boards={lab}",
            f"--rig-run-dir={tmp_path / 'run'}", "-q", "-rA", "-p", "no:randomly"]  # fmt: skip
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)


def test_clean_set_passes(good_set: Path, tmp_path: Path) -> None:
    res = run_suite(tmp_path, good_set / "set")
    assert res.returncode == 0, res.stdout[-3000:]


def test_unsigned_app_fails_the_signature_check(good_set: Path, tmp_path: Path) -> None:
    flawed = tmp_path / "set"
    shutil.copytree(good_set / "set", flawed)
    app = flawed / "next" / f"{PROJECT_NAME}.bin"
    app.write_bytes(unsigned(app.read_bytes()))
    res = run_suite(tmp_path, flawed)
    assert "FAILED suites/test_firmware_set.py::test_signed_builds_verify_with_one_key[vb1]" in res.stdout
    assert "next app" in res.stdout


def test_same_version_next_fails_the_ordering_check(good_set: Path, tmp_path: Path) -> None:
    flawed = tmp_path / "set"
    shutil.copytree(good_set / "set", flawed)
    app = flawed / "next" / f"{PROJECT_NAME}.bin"
    app.write_bytes(version(app.read_bytes(), "1.0.0", signer=good_set / "k.pem"))
    res = run_suite(tmp_path, flawed)
    assert "FAILED suites/test_firmware_set.py::test_next_is_a_newer_version_of_the_same_project[vb1]" in res.stdout
    assert "RainMaker rejects an OTA with the same version" in res.stdout

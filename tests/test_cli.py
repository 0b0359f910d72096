"""The `rig` command as a lab engineer runs it: output, exit codes, the run folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def rig(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "rig.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def test_boards_shows_the_default_farm() -> None:
    res = rig("boards")
    assert res.returncode == 0, res.stderr
    assert "lab virtual-desk — 2 board(s), stack: local" in res.stdout
    for cell in ("vb1", "vb2", "virtual", "esp32c3", "generated", "sacrificial"):
        assert cell in res.stdout


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("lab: x\nboards:\n  - name: a\n    kind: esp\n", "boards.yaml:3: boards[0] (a): board 'a' is a real board"),
        ("lab: x\nboards:\n  - name: a\n   kind: virtual\n", "boards.yaml:4:4: YAML syntax error"),
        ("lab: x\nboards:\n  - name: a\n    kind: virtual\n    chip: esp8266\n", "chip 'esp8266' is not supported yet"),
    ],
)
def test_boards_rejects_bad_file_with_one_clear_message(tmp_path: Path, text: str, expect: str) -> None:
    bad = tmp_path / "boards.yaml"
    bad.write_text(text)
    res = rig("boards", "--boards", str(bad))
    assert res.returncode == 2
    assert expect in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_boards_missing_file(tmp_path: Path) -> None:
    res = rig("boards", "--boards", str(tmp_path / "none.yaml"))
    assert res.returncode == 2 and "file not found. Fix: pass --boards FILE" in res.stderr


def test_run_unknown_board(tmp_path: Path) -> None:
    res = rig("run", "--board", "vb9")
    assert res.returncode == 2 and "no board named 'vb9'" in res.stderr


def test_run_writes_junit_allure_and_board_logs(tmp_path: Path) -> None:
    lab = tmp_path / "boards.yaml"
    lab.write_text("lab: t\nboards:\n  - name: vb1\n    kind: virtual\n  - name: vb2\n    kind: virtual\n")
    res = rig("run", "--boards", str(lab), "--board", "vb1", "--", "-k", "otadata or next_is")
    assert res.returncode == 0, res.stdout + res.stderr
    (run,) = (tmp_path / "reports").iterdir()
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{6}", run.name)
    assert str(run) in res.stdout
    cases = ET.parse(run / "junit.xml").getroot().iter("testcase")
    names = sorted(c.get("name") for c in cases)
    assert names == ["test_initial_otadata_is_blank[vb1]", "test_next_is_a_newer_version_of_the_same_project[vb1]"]
    results = [json.loads(p.read_text()) for p in (run / "allure-results").glob("*-result.json")]
    assert sorted((r["name"], r["status"]) for r in results) == [
        ("test_initial_otadata_is_blank[vb1]", "passed"),
        ("test_next_is_a_newer_version_of_the_same_project[vb1]", "passed"),
    ]
    log = (run / "logs" / "vb1.log").read_text()
    assert "lease suites/test_firmware_set.py::test_initial_otadata_is_blank[vb1]" in log
    assert not (run / "logs" / "vb2.log").exists()


def test_run_propagates_pytest_failure_code(tmp_path: Path) -> None:
    lab = tmp_path / "boards.yaml"
    lab.write_text("lab: t\nboards:\n  - name: vb1\n    kind: virtual\n")
    res = rig("run", "--boards", str(lab), "--", "-k", "no_such_test_anywhere")
    assert res.returncode == 5  # pytest: no tests collected
    (run,) = (tmp_path / "reports").iterdir()
    assert (run / "junit.xml").exists()


def test_firmware_build_virtual_writes_every_role(tmp_path: Path) -> None:
    res = rig("firmware", "build-virtual", "--dest", str(tmp_path / "set"), "--key", str(tmp_path / "k.pem"))
    assert res.returncode == 0, res.stderr
    for role, version in (("base", "1.0.0"), ("next_secure", "1.2.0"), ("crash_on_boot", "1.1.0-crash")):
        assert role in res.stdout and version in res.stdout
        assert (tmp_path / "set" / role / "flasher_args.json").is_file()
    assert (tmp_path / "k.pem").stat().st_mode & 0o077 == 0  # the signing key is private to its owner


def test_firmware_build_virtual_with_the_lab_hsm(tmp_path: Path) -> None:
    from rig.cloud.signer import CloudSigner
    from rig.firmware.secure_boot_v2 import verify_signed_image
    from rig.firmware.softhsm import SoftHsmUnavailable, find_softhsm_library, find_softhsm_util
    from rig.firmware.virtual_set import PROJECT_NAME, PUBLIC_KEY_FILE, set_key_digest

    try:
        find_softhsm_library(), find_softhsm_util()
    except SoftHsmUnavailable as exc:
        pytest.skip(str(exc))
    pin, so_pin = "cli-user-pin-2718", "cli-so-pin-3141"
    lab = tmp_path / "boards.yaml"
    lab.write_text(f"lab: t\nhsm:\n  pin: {pin}\n  so_pin: {so_pin}\nboards:\n  - name: vb1\n    kind: virtual\n")
    res = rig("firmware", "build-virtual", "--boards", str(lab), "--hsm")
    assert res.returncode == 0, res.stdout + res.stderr
    assert pin not in res.stdout + res.stderr and so_pin not in res.stdout + res.stderr
    out = tmp_path / ".rig" / "firmware" / "virtual"
    # the key is the one the lab's cloud stack signs OTA images with: its token, its default key
    cloud = CloudSigner(tmp_path / ".rig" / "cloud" / "hsm", pin, so_pin)
    digest = cloud.key_digests()[cloud.default_key]
    assert set_key_digest(out) == digest
    assert f"Secure Boot V2 key digest: {digest.hex()}" in res.stdout
    assert f"espefuse burn-key-digest BLOCK_KEY0 {out / PUBLIC_KEY_FILE} SECURE_BOOT_DIGEST0" in res.stdout
    assert "signed by lab HSM key 'sbv2-key-0'" in res.stdout
    for role in ("base", "next_secure"):
        build = out / role
        assert verify_signed_image((build / f"{PROJECT_NAME}.bin").read_bytes(), [digest]).ok
        assert verify_signed_image((build / "bootloader" / "bootloader.bin").read_bytes(), [digest]).ok
    assert not (tmp_path / ".rig" / "keys").exists()  # no key file was made: the private key stays in the token


def test_firmware_build_virtual_hsm_and_key_conflict(tmp_path: Path) -> None:
    res = rig("firmware", "build-virtual", "--dest", str(tmp_path / "set"), "--key", str(tmp_path / "k.pem"), "--hsm")
    assert res.returncode == 2 and "--hsm and --key name two different signing keys" in res.stderr
    assert not (tmp_path / "set").exists() and not (tmp_path / "k.pem").exists()

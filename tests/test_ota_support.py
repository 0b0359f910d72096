"""What the OTA suites stand on: a set lifted to a burned SECURE_VERSION, the per-board ledger and
its refusal of a run, the suites' reading of job statuses and otadata, and the evidence door."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from fixtures.evidence import Evidence
from fixtures.ota import flash_view, is_final
from rig.boards.board import BoardError, secure_version_of
from rig.boards.secure_version_ledger import LEDGER_FILE, SecureVersionExhausted, SecureVersionLedger
from rig.evidence.redaction import SECRETS
from rig.firmware.firmware_set import FirmwareSet
from rig.firmware.image import EspImage
from rig.firmware.lifted_set import LIFT_MANIFEST, lift_set, lifted_secure_versions
from rig.firmware.otadata import OtaDataPartition, OtaState
from rig.firmware.partition_table import RAINMAKER_4MB
from rig.firmware.secure_boot_v2 import public_key_digest, verify_signed_image
from rig.firmware.virtual_set import PUBLIC_KEY_FILE, build_virtual_set, ensure_signing_key
from rig.vboard.board import BoardBusyError, BoardPaths
from rig.vboard.chip_swap import replace_chip
from rig.vboard.efuse import EfuseController
from tests.suite_runs import REPO, virtual_lab

# --------------------------------------------------------------------------- lifted set


@pytest.fixture(scope="module")
def supplied(tmp_path_factory: pytest.TempPathFactory) -> tuple[FirmwareSet, Path]:
    root = tmp_path_factory.mktemp("lift")
    key = ensure_signing_key(root / "key.pem")
    return build_virtual_set(root / "set", key), key


def test_lifting_raises_every_role_by_the_same_amount_and_re_signs(supplied: tuple[FirmwareSet, Path], tmp_path: Path) -> None:
    fw, key = supplied
    before = {role: fw.app_desc(role).secure_version for role in fw.roles}
    assert before["base"] == 1 and before["next_secure"] == 2
    lifted = lift_set(fw, 3, key, tmp_path / "sv3")
    after = {role: lifted.app_desc(role).secure_version for role in lifted.roles}
    assert after == {role: v + 2 for role, v in before.items()} == lifted_secure_versions(fw, 3)
    digest = public_key_digest((fw.root / PUBLIC_KEY_FILE).read_bytes())
    for role in fw.roles:
        old, new = fw.build(role), lifted.build(role)
        image = new.read_app_image()
        assert verify_signed_image(image, [digest]).ok, role
        assert EspImage.parse(image).app_desc.version == fw.app_desc(role).version
        assert new.bootloader_bin.read_bytes() == old.bootloader_bin.read_bytes()
        assert new.partition_table_bin.read_bytes() == old.partition_table_bin.read_bytes()
    assert json.loads((tmp_path / "sv3" / LIFT_MANIFEST).read_text())["floor"] == 3


def test_a_lifted_set_is_made_once_and_not_at_all_when_base_already_runs(supplied: tuple[FirmwareSet, Path], tmp_path: Path) -> None:
    fw, key = supplied
    first = lift_set(fw, 2, key, tmp_path / "sv2")
    stamp = first.build("base").app_bin.stat().st_mtime_ns
    again = lift_set(fw, 2, key, tmp_path / "sv2")
    assert again.build("base").app_bin.stat().st_mtime_ns == stamp
    assert lifted_secure_versions(fw, 1) == {role: fw.app_desc(role).secure_version for role in fw.roles}
    assert lifted_secure_versions(fw, 0)["base"] == 1


# --------------------------------------------------------------------------- ledger


def test_ledger_records_burns_and_refuses_what_does_not_fit(tmp_path: Path) -> None:
    ledger = SecureVersionLedger.load("vb9", tmp_path, 16)
    assert ledger.last_known == 0 and ledger.entries == []
    ledger.check(14, 2, "a test")
    ledger.record("run-1", "suites/test_anti_rollback.py::t[vb9]", 1, 2)
    reloaded = SecureVersionLedger.load("vb9", tmp_path, 16)
    assert reloaded.last_known == 2 and reloaded.entries[0].test.endswith("t[vb9]")
    with pytest.raises(SecureVersionExhausted, match=r"needs SECURE_VERSION 17, but the eFuse holds 16 of 16.*Fix: .*sacrificial"):
        reloaded.check(16, 1, "a test")


def test_an_unreadable_ledger_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    (tmp_path / LEDGER_FILE).write_text("{not json")
    with pytest.raises(SecureVersionExhausted, match=r"unreadable.*espefuse summary"):
        SecureVersionLedger.load("vb9", tmp_path, 16)


def test_a_run_that_would_exhaust_a_board_is_refused_at_collection(tmp_path: Path) -> None:
    sets = {"vb-spent": tmp_path / "set"}
    boards = virtual_lab(tmp_path / "boards.yaml", "spent", sets, sacrificial=sets)
    ledger = SecureVersionLedger.load("vb-spent", tmp_path / ".rig" / "boards" / "vb-spent", 16)
    ledger.record("old-run", "an earlier test", 15, 16)
    proc = subprocess.run([sys.executable, "-m", "pytest", "suites/test_anti_rollback.py", f"--boards={boards}",
                           f"--rig-run-dir={tmp_path / 'run'}", "--collect-only", "-q"],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "board 'vb-spent'" in proc.stderr and "holds 16 of 16" in proc.stderr, proc.stderr


def test_secure_version_is_the_count_of_burned_bits() -> None:
    assert secure_version_of({"SECURE_VERSION": {"value": 0b111}}, "b") == 3
    assert secure_version_of({"SECURE_VERSION": {"value": "0x0003"}}, "b") == 2
    with pytest.raises(BoardError, match="no readable SECURE_VERSION"):
        secure_version_of({}, "b")


# --------------------------------------------------------------------------- reading the device


@pytest.mark.parametrize(
    ("status", "final"),
    [
        ({"status": "in-progress", "additional_info": "Downloading Firmware Image"}, False),
        ({"status": "failed", "additional_info": "OTA Attempt 1/3 failed: Image validation failed"}, False),
        ({"status": "failed", "additional_info": "OTA Attempt 3/3 failed: Image validation failed"}, True),
        ({"status": "failed", "additional_info": "Aborted. URL not found in JSON"}, True),
        ({"status": "rejected", "additional_info": "Same version received"}, True),
        ({"status": "success", "additional_info": "OTA Upgrade finished and verified successfully"}, True),
        ({"status": "triggered", "additional_info": ""}, False),
    ],
)
def test_a_job_is_final_on_the_nodes_last_word(status: dict[str, str], final: bool) -> None:
    assert is_final(status) is final


def test_flash_view_follows_otadata_to_the_slot_and_its_app(supplied: tuple[FirmwareSet, Path]) -> None:
    fw, _ = supplied
    slots = RAINMAKER_4MB.app_slots()
    images = {slots[0].offset: fw.build("base").read_app_image(), slots[1].offset: fw.build("next").read_app_image()}

    def read(offset: int, size: int) -> bytes:
        return images[offset][:size]

    initial = flash_view(OtaDataPartition.blank().to_bytes(), slots, read)
    assert initial.slot == slots[0] and initial.state is None and initial.app is not None and initial.app.version == "1.0.0"
    otadata = OtaDataPartition.blank()
    otadata.set_boot_slot(1, 2)
    pending = flash_view(otadata.to_bytes(), slots, read)
    assert pending.slot == slots[1] and pending.state is OtaState.NEW and pending.app is not None
    assert pending.app.version == "1.1.0" and pending.record()["selected_slot"] == "ota_1"


# --------------------------------------------------------------------------- evidence


def test_evidence_keeps_bytes_as_read_and_text_without_secrets(tmp_path: Path) -> None:
    SECRETS.add("pop-secret-0042")
    evidence = Evidence(tmp_path / "t")
    raw = bytes(range(256))
    assert evidence.attach("otadata.bin", raw).read_bytes() == raw
    text = evidence.attach("console.log", "I (1) prov: PoP pop-secret-0042\n").read_text()
    assert "pop-secret-0042" not in text and "PoP" in text
    assert json.loads(evidence.attach_json("job.json", {"b": 1, "a": [2]}).read_text()) == {"a": [2], "b": 1}
    with pytest.raises(ValueError, match="plain file name"):
        evidence.attach("../escape.txt", "x")


# --------------------------------------------------------------------------- a new chip on a virtual board


def test_a_new_chip_retires_the_old_ones_files_and_keeps_them(tmp_path: Path) -> None:
    root = tmp_path / "boards" / "vb1"
    root.mkdir(parents=True)
    assert replace_chip(tmp_path, "vb1") is None
    chip_files = {"flash.bin": b"\xff" * 16, "efuse.bin": b"\x01" * 8, "efuse-read-protected.json": b"{}", LEDGER_FILE: b"{}"}
    for name, data in {**chip_files, "address": b"127.0.1.9"}.items():
        (root / name).write_bytes(data)
    retired = replace_chip(tmp_path, "vb1", now=datetime(2026, 11, 30, 12, 0, tzinfo=UTC))
    assert retired == root / "retired" / "20261130T120000Z"
    assert sorted(p.name for p in retired.iterdir()) == sorted(chip_files)
    assert (retired / "efuse.bin").read_bytes() == b"\x01" * 8
    assert not (root / "flash.bin").exists() and (root / "address").read_bytes() == b"127.0.1.9"
    (root / "efuse.bin").write_bytes(b"")
    held = os.open(root / "lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(BoardBusyError, match="running; stop it first"):
            replace_chip(tmp_path, "vb1")
    finally:
        os.close(held)


def test_a_retired_chip_takes_its_read_protected_keys_along(tmp_path: Path) -> None:
    """The eFuse file cannot hold a read-protected key; its sidecar does, and is the chip's too."""
    paths = BoardPaths.of(tmp_path, "vb1")
    mac = bytes.fromhex("58cf79a1b2c3")
    EfuseController.open(paths.efuse, mac).write_key(0, "HMAC_UP", bytes(range(32)))
    assert paths.efuse_read_protected.exists()
    retired = replace_chip(tmp_path, "vb1", now=datetime(2026, 11, 30, 12, 0, tzinfo=UTC))
    assert retired is not None
    assert not paths.efuse.exists() and not paths.efuse_read_protected.exists()
    old = EfuseController.open(retired / paths.efuse.name, mac)
    assert old.read_protected_path == retired / paths.efuse_read_protected.name
    assert old.find_purpose("HMAC_UP") == 0 and len(old.hmac_calculate(0, b"seed")) == 32
    new = EfuseController.open(paths.efuse, mac)
    assert new.find_purpose("HMAC_UP") is None and new.find_unused_key_block() == 0

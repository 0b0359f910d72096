"""App rollback on a running virtual board, observed only through its doors: esptool writes
the images and otadata, the console shows what booted, esptool reads otadata back."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from rig.firmware.firmware_set import FirmwareSet
from rig.firmware.otadata import OtaDataPartition, OtaState
from rig.firmware.virtual_set import build_virtual_set, ensure_signing_key
from tests.vboard_process import BoardFactory, SerialMonitor, esptool, output, vboard_factory  # noqa: F401

BOOT_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> FirmwareSet:
    root = tmp_path_factory.mktemp("rollback-set")
    return build_virtual_set(root / "virtual", ensure_signing_key(root / "k.pem"))


def read_otadata(url: str, offset: int, tmp_path: Path) -> OtaDataPartition:
    out = tmp_path / "otadata-read.bin"
    proc = esptool(url, "--after", "no-reset", "read-flash", hex(offset), "0x2000", out)
    assert proc.returncode == 0, output(proc)
    return OtaDataPartition.parse(out.read_bytes())


def boot_and_expect(url: str, version: str) -> str:
    with SerialMonitor(url) as mon:
        mon.hard_reset()
        mon.expect(r"App version:\s+" + re.escape(version) + r"\b", BOOT_TIMEOUT_S)
        mon.expect(r"Calling app_main\(\)", BOOT_TIMEOUT_S)
        return mon.text


def test_unconfirmed_update_rolls_back_on_next_boot(
    vboard_factory: BoardFactory,  # noqa: F811
    firmware: FirmwareSet,
    tmp_path: Path,
) -> None:
    base, nxt = firmware.build("base"), firmware.build("next")
    table = base.read_partition_table()
    ota1, otadata_part = table["ota_1"], table.otadata
    assert otadata_part is not None
    otadata = OtaDataPartition.blank()
    otadata.set_boot_slot(1, len(table.app_slots()))  # as esp_ota_set_boot_partition after an OTA download
    otadata_bin = tmp_path / "otadata.bin"
    otadata_bin.write_bytes(otadata.to_bytes())

    board = vboard_factory("rollback1")
    files = [*(x for off, p in sorted(base.flash_files.items()) if off != otadata_part.offset for x in (hex(off), p)),
             hex(ota1.offset), nxt.app_bin, hex(otadata_part.offset), otadata_bin]  # fmt: skip
    proc = esptool(board.url, "--after", "no-reset", "write-flash", *files)  # stay in download mode
    assert proc.returncode == 0, output(proc)

    # first boot: the new app (ota_1) starts, un-confirmed — this app never confirms itself
    boot_and_expect(board.url, "1.1.0")
    after_first = read_otadata(board.url, otadata_part.offset, tmp_path)
    assert after_first.boot_slot(2) == 1
    assert after_first.active_entry().state is OtaState.PENDING_VERIFY

    # next boot: the bootloader aborts the pending app and the old one runs again
    boot_and_expect(board.url, "1.0.0")
    after_second = read_otadata(board.url, otadata_part.offset, tmp_path)
    states = {e.state for e in after_second.entries if not e.is_blank}
    assert OtaState.ABORTED in states
    assert after_second.boot_slot(2) != 1

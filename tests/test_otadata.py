"""otadata: entry bytes, validity, slot selection and every rollback state transition.

Known answers are computed here with ``zlib`` and ``struct`` from the spec, and one is a
real otadata dump (``01 00 00 00``, 20 × ``ff``, ``02 00 00 00``, ``9a 98 43 47``: seq 1,
VALID — the same CRC as Arduino-ESP32's ``boot_app0.bin``, which selects ota_0).
"""

from __future__ import annotations

import struct
import zlib

import pytest

from rig.firmware.errors import FirmwareFormatError
from rig.firmware.otadata import (
    OTA_SELECT_ENTRY_LAYOUT,
    OtaDataPartition,
    OtaSelectEntry,
    OtaState,
    ota_seq_crc,
)

DUMP_SEQ1_VALID = bytes.fromhex("01000000" + "ff" * 20 + "02000000" + "9a984347")


def zcrc(seq: int) -> int:
    """esp_rom_crc32_le(UINT32_MAX, &seq, 4), computed independently of the module."""
    return zlib.crc32(struct.pack("<I", seq), 0xFFFFFFFF)


def states(ota: OtaDataPartition) -> list[tuple[int, int]]:
    return [(e.ota_seq, e.ota_state) for e in ota.entries]


# --------------------------------------------------------------------------- bytes

def test_layout_matches_esp_flash_partitions_h() -> None:
    assert OTA_SELECT_ENTRY_LAYOUT.size == 32
    assert [(f.name, OTA_SELECT_ENTRY_LAYOUT.offset_of(f.name)) for f in OTA_SELECT_ENTRY_LAYOUT.fields] == [
        ("ota_seq", 0), ("seq_label", 4), ("ota_state", 24), ("crc", 28)]
    assert [int(s) for s in OtaState] == [0, 1, 2, 3, 4, 0xFFFFFFFF]


def test_crc_known_answers() -> None:
    assert zcrc(1) == 0x4743989A
    for seq in (1, 2, 3, 0x10, 0xFFFFFFFE):
        assert ota_seq_crc(seq) == zcrc(seq)


def test_real_dump_entry() -> None:
    entry = OtaSelectEntry.parse(DUMP_SEQ1_VALID)
    assert (entry.ota_seq, entry.state, entry.crc) == (1, OtaState.VALID, 0x4743989A)
    assert entry.is_valid and entry.slot(2) == 0
    assert OtaSelectEntry.for_seq(1, OtaState.VALID).to_bytes() == DUMP_SEQ1_VALID


def test_blank_partition_is_ota_data_initial_bin() -> None:
    ota = OtaDataPartition.blank()
    assert ota.to_bytes() == b"\xff" * 0x2000
    assert ota.active_entry() is None and ota.boot_slot(2) is None
    assert ota.has_initial_contents
    assert all(e.is_blank and e.is_invalid for e in ota.entries)


def test_round_trip_and_sector_bytes() -> None:
    data = DUMP_SEQ1_VALID + b"\xff" * (0x1000 - 32) + b"\xff" * 0x1000
    ota = OtaDataPartition.parse(data)
    assert ota.to_bytes() == data and OtaDataPartition.parse(ota.to_bytes()) == ota
    assert ota.sector(0) == data[:0x1000]


def test_every_wrong_length_is_a_format_error() -> None:
    data = OtaDataPartition.blank().to_bytes()
    for n in range(0x2002):
        if n == 0x2000:
            continue
        with pytest.raises(FirmwareFormatError, match="0x2000"):
            OtaDataPartition.parse((data + b"\xff")[:n])


# --------------------------------------------------------------------------- validity

@pytest.mark.parametrize(("entry", "valid", "invalid"), [
    (OtaSelectEntry.for_seq(1, OtaState.NEW), True, False),
    (OtaSelectEntry.for_seq(1, OtaState.PENDING_VERIFY), True, False),
    (OtaSelectEntry.for_seq(1, OtaState.VALID), True, False),
    (OtaSelectEntry.for_seq(1, OtaState.UNDEFINED), True, False),
    (OtaSelectEntry.for_seq(1, 7), True, False),  # unknown state: only INVALID/ABORTED disqualify
    (OtaSelectEntry.for_seq(1, OtaState.INVALID), False, True),
    (OtaSelectEntry.for_seq(1, OtaState.ABORTED), False, True),
    (OtaSelectEntry(1, OtaState.VALID, zcrc(1) ^ 1), False, False),  # bad CRC: not valid, not "invalid"
    (OtaSelectEntry.blank(), False, True),
])
def test_entry_predicates(entry: OtaSelectEntry, valid: bool, invalid: bool) -> None:
    assert entry.is_valid is valid
    assert entry.is_invalid is invalid


def test_active_entry_is_higher_valid_seq_and_tie_goes_to_sector_0() -> None:
    a, b = OtaSelectEntry.for_seq(4, OtaState.VALID), OtaSelectEntry.for_seq(5, OtaState.VALID)
    assert OtaDataPartition([a, b]).active_index() == 1
    assert OtaDataPartition([b, a]).active_index() == 0
    assert OtaDataPartition([a, a]).active_index() == 0
    assert OtaDataPartition([a, b.with_state(OtaState.ABORTED)]).active_index() == 0
    assert OtaDataPartition([OtaSelectEntry(9, 2, 0), a]).active_index() == 1  # bad CRC loses
    assert OtaDataPartition([a, b]).boot_slot(8) == 4  # (5 - 1) % 8, the esp_ota_ops.c comment's example


# --------------------------------------------------------------------------- esp_rewrite_ota_data

def test_set_boot_slot_from_blank_writes_sector_0() -> None:
    ota = OtaDataPartition.blank()
    assert ota.set_boot_slot(1, 2) == (0,)
    assert states(ota) == [(2, OtaState.NEW), (0xFFFFFFFF, 0xFFFFFFFF)]
    assert ota.entries[0].crc == zcrc(2) and ota.entries[0].seq_label == b"\xff" * 20
    assert ota.boot_slot(2) == 1


def test_set_boot_slot_without_rollback_writes_undefined() -> None:
    ota = OtaDataPartition.blank()
    ota.set_boot_slot(0, 2, rollback_enabled=False)
    assert states(ota)[0] == (1, OtaState.UNDEFINED)


def test_set_boot_slot_alternates_sectors_with_next_seq() -> None:
    ota = OtaDataPartition.blank()
    written = [ota.set_boot_slot(slot, 2) for slot in (0, 1, 0, 1)]
    assert written == [(0,), (1,), (0,), (1,)]
    assert [e.ota_seq for e in ota.entries] == [3, 4]
    assert ota.boot_slot(2) == 1


def test_set_boot_slot_sequence_arithmetic_with_three_slots() -> None:
    # active seq 5 -> slot 1; ask for slot 0: smallest seq >= 5 with (seq-1)%3 == 0 is 7
    ota = OtaDataPartition([OtaSelectEntry.for_seq(5, OtaState.VALID), OtaSelectEntry.blank()])
    ota.set_boot_slot(0, 3)
    assert states(ota)[1] == (7, OtaState.NEW) and ota.boot_slot(3) == 0
    ota.set_boot_slot(2, 3)  # from seq 7: 9
    assert states(ota)[0] == (9, OtaState.NEW) and ota.boot_slot(3) == 2


def test_set_boot_slot_same_slot_both_esp_idf_behaviours() -> None:
    start = [OtaSelectEntry.for_seq(2, OtaState.VALID), OtaSelectEntry.for_seq(1, OtaState.VALID)]
    v54 = OtaDataPartition(list(start))
    assert v54.set_boot_slot(1, 2) == (1,)  # other sector, same seq 2
    assert states(v54) == [(2, OtaState.VALID), (2, OtaState.NEW)]
    assert v54.active_index() == 0  # the tie goes to sector 0: the NEW state is not what boots
    newer = OtaDataPartition(list(start))
    assert newer.set_boot_slot(1, 2, rewrite_active_when_same_slot=True) == (0,)
    assert states(newer) == [(2, OtaState.NEW), (1, OtaState.VALID)]


def test_set_boot_slot_after_both_entries_invalid_restarts_at_sector_0() -> None:
    ota = OtaDataPartition([OtaSelectEntry.for_seq(5, OtaState.ABORTED), OtaSelectEntry.for_seq(4, OtaState.INVALID)])
    assert ota.set_boot_slot(1, 2) == (0,)
    assert states(ota) == [(2, OtaState.NEW), (4, OtaState.INVALID)]


@pytest.mark.parametrize(("slot", "num"), [(2, 2), (-1, 2), (0, 0)])
def test_set_boot_slot_refuses_a_missing_slot(slot: int, num: int) -> None:
    with pytest.raises(ValueError, match="ESP_ERR_INVALID_ARG"):
        OtaDataPartition.blank().set_boot_slot(slot, num)


# --------------------------------------------------------------------------- rollback story

def test_new_image_confirmed_valid() -> None:
    ota = OtaDataPartition([OtaSelectEntry.for_seq(1, OtaState.VALID), OtaSelectEntry.blank()])
    ota.set_boot_slot(1, 2)                              # esp_ota_set_boot_partition(ota_1)
    assert ota.bootloader_select(2) == 1                 # boot: NEW -> PENDING_VERIFY
    assert states(ota)[1] == (2, OtaState.PENDING_VERIFY)
    assert ota.mark_valid() == (1,)                      # app connected to MQTT
    assert states(ota)[1] == (2, OtaState.VALID)
    assert ota.mark_valid() == ()                        # already VALID: no flash write
    assert ota.bootloader_select(2) == 1 and states(ota)[1] == (2, OtaState.VALID)


def test_new_image_never_confirmed_rolls_back() -> None:
    ota = OtaDataPartition([OtaSelectEntry.for_seq(1, OtaState.VALID), OtaSelectEntry.blank()])
    ota.set_boot_slot(1, 2)
    assert ota.bootloader_select(2) == 1                 # first boot of ota_1, crashes before mark_valid
    assert ota.bootloader_select(2) == 0                 # PENDING_VERIFY -> ABORTED, back to ota_0
    assert states(ota) == [(1, OtaState.VALID), (2, OtaState.ABORTED)]
    assert ota.entries[1].crc == zcrc(2)


def test_new_image_rejects_itself() -> None:
    ota = OtaDataPartition([OtaSelectEntry.for_seq(1, OtaState.VALID), OtaSelectEntry.blank()])
    ota.set_boot_slot(1, 2)
    ota.bootloader_select(2)
    assert ota.mark_invalid() == (1,)
    assert states(ota)[1] == (2, OtaState.INVALID)
    assert ota.bootloader_select(2) == 0


def test_abort_pending_keeps_the_stored_crc() -> None:
    bad = OtaSelectEntry(3, OtaState.PENDING_VERIFY, 0x12345678)
    ota = OtaDataPartition([bad, OtaSelectEntry.for_seq(2, OtaState.PENDING_VERIFY)])
    assert ota.abort_pending() == (0, 1)
    assert states(ota) == [(3, OtaState.ABORTED), (2, OtaState.ABORTED)]
    assert ota.entries[0].crc == 0x12345678
    assert ota.abort_pending() == ()


def test_rollback_disabled_bootloader_changes_nothing() -> None:
    ota = OtaDataPartition.blank()
    ota.set_boot_slot(1, 2, rollback_enabled=False)
    before = ota.to_bytes()
    assert ota.bootloader_select(2, rollback_enabled=False) == 1
    assert ota.to_bytes() == before
    pending = OtaDataPartition([OtaSelectEntry.for_seq(2, OtaState.PENDING_VERIFY), OtaSelectEntry.blank()])
    assert pending.bootloader_select(2, rollback_enabled=False) == 1
    assert states(pending)[0] == (2, OtaState.PENDING_VERIFY)


def test_bootloader_without_usable_otadata_selects_no_slot() -> None:
    assert OtaDataPartition.blank().bootloader_select(2) is None
    only_bad_crc = OtaDataPartition([OtaSelectEntry(1, OtaState.VALID, 0), OtaSelectEntry.blank()])
    assert only_bad_crc.bootloader_select(2) is None
    assert only_bad_crc.has_initial_contents
    assert OtaDataPartition([OtaSelectEntry.for_seq(1, OtaState.NEW), OtaSelectEntry.blank()]).bootloader_select(0) \
        is None


def test_set_actual_ota_seq_after_first_boot_from_blank() -> None:
    ota = OtaDataPartition.blank()
    assert ota.set_actual_ota_seq(0) == (0,)
    assert ota.entries[0].to_bytes() == DUMP_SEQ1_VALID
    assert not ota.has_initial_contents


def test_mark_valid_or_invalid_without_active_entry_is_factory() -> None:
    for call in (OtaDataPartition.mark_valid, OtaDataPartition.mark_invalid):
        with pytest.raises(ValueError, match="factory"):
            call(OtaDataPartition.blank())


def test_entry_field_ranges() -> None:
    with pytest.raises(ValueError, match="uint32_t"):
        OtaSelectEntry(1 << 32, 0, 0)
    with pytest.raises(ValueError, match="20 bytes"):
        OtaSelectEntry(1, 0, 0, b"")
    with pytest.raises(ValueError, match="two entries"):
        OtaDataPartition([OtaSelectEntry.blank()])

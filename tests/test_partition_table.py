"""Partition table: binary and CSV, against hand-built bytes and gen_esp32part's own code.

Known-answer bytes are built here from the spec (esp_flash_partitions.h, gen_esp32part.py
``STRUCT_FORMAT``), not with the module under test. When ``esp-idf-defs`` is installed
(it ships Espressif's gen_esp32part.py v1.5 as ``esp_idf_defs.partitions``), the same
tables are also built and read by that code and must agree byte for byte.
"""

from __future__ import annotations

import hashlib
import struct
import subprocess
import sys

import pytest

from rig.firmware.errors import FirmwareFormatError
from rig.firmware.partition_table import (
    MD5_ENTRY_LAYOUT,
    PART_TOOL_SCRIPT,
    PARTITION_ENTRY_LAYOUT,
    RAINMAKER_4MB,
    RAINMAKER_4MB_CSV,
    TABLE_MAX_LEN,
    TYPE_ESP_SECURE_CERT,
    AppSubtype,
    DataSubtype,
    Partition,
    PartitionTable,
    PartitionType,
)

SMALL_CSV = """\
# Name,   Type, SubType, Offset,  Size, Flags
nvs,      data, nvs,     ,        0x6000,
otadata,  data, ota,     ,        0x2000
phy_init, data, phy,     ,        0x1000,
factory,  app,  factory, ,        1M,
"""


def entry(name: str, ptype: int, subtype: int, offset: int, size: int, flags: int = 0) -> bytes:
    """One entry per gen_esp32part ``STRUCT_FORMAT = '<2sBBLL16sL'``."""
    return struct.pack("<2sBBLL16sL", b"\xaa\x50", ptype, subtype, offset, size, name.encode(), flags)


def table_bytes(entries: list[bytes], md5: bool = True) -> bytes:
    body = b"".join(entries)
    if md5:
        body += b"\xeb\xeb" + b"\xff" * 14 + hashlib.md5(body).digest()
    return body + b"\xff" * (0xC00 - len(body))


FEATURES_CSV = """\
bootloader, bootloader, primary, N/A, N/A
partition_table, partition_table, primary, N/A, N/A
nvs, data, nvs, , 24k, readonly
app, app, ota_0, , -0x200000
store, data, 0x99, 0x300000, 0x1000, encrypted:readonly
cd, data, coredump, , 64K
t, app, test, , 64K
"""

SMALL_BYTES = table_bytes([
    entry("nvs", 1, 2, 0x9000, 0x6000),
    entry("otadata", 1, 0, 0xF000, 0x2000),
    entry("phy_init", 1, 1, 0x11000, 0x1000),
    entry("factory", 0, 0, 0x20000, 0x100000),
])


# --------------------------------------------------------------------------- layout

def test_entry_layout_is_gen_esp32part_struct_format() -> None:
    assert PARTITION_ENTRY_LAYOUT.size == struct.calcsize("<2sBBLL16sL") == 32
    assert [f.name for f in PARTITION_ENTRY_LAYOUT.fields] == [
        "magic", "type", "subtype", "offset", "size", "label", "flags"]
    assert PARTITION_ENTRY_LAYOUT.offset_of("offset") == 4
    assert PARTITION_ENTRY_LAYOUT.offset_of("label") == 12
    assert MD5_ENTRY_LAYOUT.offset_of("md5") == 16


def test_partition_entry_known_answer() -> None:
    p = Partition("ota_0", PartitionType.APP, AppSubtype.OTA_0, 0x20000, 0x1E0000)
    assert p.to_bytes() == bytes.fromhex(
        "aa50" "00" "10" "00000200" "00001e00" + b"ota_0".hex().ljust(32, "0") + "00000000")


def test_named_constants_match_esp_partition_h() -> None:
    assert (PartitionType.APP, PartitionType.DATA) == (0x00, 0x01)
    assert (AppSubtype.FACTORY, AppSubtype.OTA_0, AppSubtype.OTA_15, AppSubtype.TEST) == (0x00, 0x10, 0x1F, 0x20)
    assert (DataSubtype.OTA, DataSubtype.PHY, DataSubtype.NVS, DataSubtype.COREDUMP, DataSubtype.NVS_KEYS,
            DataSubtype.EFUSE, DataSubtype.UNDEFINED) == (0, 1, 2, 3, 4, 5, 6)
    assert TYPE_ESP_SECURE_CERT == 0x3F


# --------------------------------------------------------------------------- CSV → binary

def test_small_csv_auto_places_and_matches_hand_built_bytes() -> None:
    table = PartitionTable.from_csv(SMALL_CSV)  # table at 0x8000 → first partition at 0x9000
    assert [(p.name, hex(p.offset)) for p in table] == [
        ("nvs", "0x9000"), ("otadata", "0xf000"), ("phy_init", "0x11000"), ("factory", "0x20000")]
    assert table.to_bytes() == SMALL_BYTES
    assert len(SMALL_BYTES) == TABLE_MAX_LEN


def test_rainmaker_4mb_matches_protocol_sheet_8_1() -> None:
    t = RAINMAKER_4MB
    assert t.offset == 0xC000
    got = {p.name: (p.type, p.subtype, p.offset, p.size, p.encrypted) for p in t}
    assert got == {
        "esp_secure_cert": (0x3F, 0x06, 0xD000, 0x2000, True),
        "nvs_key": (1, DataSubtype.NVS_KEYS, 0xF000, 0x1000, True),
        "nvs": (1, DataSubtype.NVS, 0x10000, 0x6000, False),
        "otadata": (1, DataSubtype.OTA, 0x16000, 0x2000, False),
        "phy_init": (1, DataSubtype.PHY, 0x18000, 0x1000, False),
        "ota_0": (0, AppSubtype.OTA_0, 0x20000, 0x1E0000, False),
        "ota_1": (0, AppSubtype.OTA_1, 0x200000, 0x1E0000, False),
        "reserved": (0x06, 0x06, 0x3E0000, 0x1A000, False),
        "fctry": (1, DataSubtype.NVS, 0x3FA000, 0x6000, False),
    }
    assert t.flash_size_needed() == 4 * 1024 * 1024
    t.check_fits(4 * 1024 * 1024)
    assert [p.name for p in t.app_slots()] == ["ota_0", "ota_1"]
    assert t.otadata is t["otadata"] and t.factory is None


def test_csv_round_trip_and_gen_esp32part_text() -> None:
    text = RAINMAKER_4MB.to_csv()
    assert text.splitlines()[:3] == [
        "# ESP-IDF Partition Table",
        "# Name, Type, SubType, Offset, Size, Flags",
        "esp_secure_cert,63,6,0xd000,8K,encrypted",
    ]
    assert "ota_1,app,ota_1,0x200000,1920K," in text
    assert PartitionTable.from_csv(text, offset=0xC000) == RAINMAKER_4MB


def test_csv_features_negative_size_flags_bootloader_rows() -> None:
    table = PartitionTable.from_csv(FEATURES_CSV, offset=0x8000)
    assert table["bootloader"].offset == 0 and table["bootloader"].size == 0x8000
    assert table["partition_table"].offset == 0x8000 and table["partition_table"].size == 0x1000
    assert table["nvs"].readonly and table["nvs"].offset == 0x9000
    assert (table["app"].offset, table["app"].end) == (0x10000, 0x200000)
    assert table["store"].flags == 3 and table["store"].subtype == 0x99
    assert PartitionTable.parse(table.to_bytes()) == table


@pytest.mark.parametrize(("csv", "words"), [
    ("a, app, , , 0x10000", "needs a subtype"),
    ("a, nope, nvs, , 0x1000", "type 'nope'"),
    ("a, data, nvs, , ", "size field is empty"),
    ("a, data, nvs, , 0x3000, shiny", "unknown flag"),
    ("a, data, nvs, 0x9000, 0x3000\nb, data, nvs, 0xA000, 0x3000", "line 2: offset 0xa000 overlaps"),
    ("a, data, nvs, 0x9100, 0x3000", "not aligned"),
    ("a, app, factory, 0x18000, 0x10000", "not aligned to 0x10000"),
    ("a, data, ota, , 0x3000", "must be 0x2000"),
    ("a, data, nvs, , 0x3000\na, data, nvs, , 0x3000", "unique"),
    ("a_name_that_is_too_long, data, nvs, , 0x3000", "1..16 bytes"),
    ("a, data, nvs, 0x8000, 0x1000", "overlaps"),
    ("# only a comment\n", "no partitions"),
    ("a, data, nvs, $OFFSET, 0x1000", "environment variables"),
])
def test_bad_csv_names_the_problem(csv: str, words: str) -> None:
    with pytest.raises(FirmwareFormatError, match=words):
        PartitionTable.from_csv(csv)


# --------------------------------------------------------------------------- binary → table

def test_parse_known_bytes() -> None:
    table = PartitionTable.parse(SMALL_BYTES)
    assert table == PartitionTable.from_csv(SMALL_CSV)
    assert table.md5 is True
    assert table.find("factory") == Partition("factory", 0, 0, 0x20000, 0x100000)
    assert table.find("missing") is None
    with pytest.raises(KeyError, match="nvs, otadata"):
        table["missing"]


def test_parse_without_md5_entry() -> None:
    data = table_bytes([entry("nvs", 1, 2, 0x9000, 0x6000)], md5=False)
    table = PartitionTable.parse(data)
    assert table.md5 is False and table.to_bytes() == data


def test_every_prefix_of_a_small_table() -> None:
    """Every cut short of the end marker is a FirmwareFormatError; a cut after it reads the same table.

    The bootloader stops at the end marker, which it recognises by magic, type and subtype
    being 0xFF (esp_partition_table_verify): 4 bytes after 4 partitions and the MD5 entry.
    """
    table = PartitionTable.parse(SMALL_BYTES)
    end_of_marker = (4 + 1) * 32 + 4
    for n in range(len(SMALL_BYTES) + 1):
        if n < end_of_marker:
            with pytest.raises(FirmwareFormatError) as err:
                PartitionTable.parse(SMALL_BYTES[:n])
            assert err.value.offset is not None
        else:
            assert PartitionTable.parse(SMALL_BYTES[:n]) == table


def corrupt(at: int, value: bytes, data: bytes = SMALL_BYTES) -> bytes:
    return data[:at] + value + data[at + len(value):]


@pytest.mark.parametrize(("data", "offset", "words"), [
    (corrupt(0, b"\x12\x34"), 0, "magic 1234"),
    (corrupt(32 + 5, b"\x01"), 4 * 32, "MD5 entry says"),
    (corrupt(4 * 32 + 20, b"\x00"), 4 * 32, "MD5 entry says"),
    (table_bytes([entry("a", 1, 2, 0x9000, 0x1000), entry("b", 1, 2, 0x9800, 0x1000)], md5=False), 32,
     "not aligned"),
    (table_bytes([entry("a", 1, 2, 0x9000, 0x3000), entry("b", 1, 2, 0xA000, 0x1000)]), 32, "overlaps"),
    (table_bytes([entry("a", 0, 0, 0x18000, 0x10000)]), 0, "not aligned to 0x10000"),
    (table_bytes([entry("a", 1, 2, 0x8000, 0x1000)]), 0, "below the end of the partition table"),
    (table_bytes([entry("a", 1, 2, 0x9000, 0x1000), entry("a", 1, 2, 0xA000, 0x1000)]), 32, "unique"),
    (b"\xff" * 0xC00, 0, "no partitions"),
    (b"\x00" * 0xC00, 0, "is this the partition table"),
    (table_bytes([entry("a", 1, 2, 0x9000, 0x1000)]) [:64] + table_bytes([entry("b", 1, 2, 0xA000, 0x1000)]),
     64, "follows the MD5 entry"),
    (b"".join(entry(f"p{i}", 1, 2, 0x9000 + i * 0x1000, 0x1000) for i in range(96)), 0xC00, "no end marker"),
    (corrupt(12, b"\xff\xfe"), 12, "not UTF-8"),
])
def test_corrupt_tables_raise_with_offset(data: bytes, offset: int, words: str) -> None:
    with pytest.raises(FirmwareFormatError, match=words) as err:
        PartitionTable.parse(data)
    assert err.value.offset == offset


def test_two_md5_entries() -> None:
    once = table_bytes([entry("a", 1, 2, 0x9000, 0x1000)])
    data = once[:64] + once[32:64] + b"\xff" * 32
    with pytest.raises(FirmwareFormatError, match="second MD5"):
        PartitionTable.parse(data)


def test_check_fits_flash() -> None:
    with pytest.raises(FirmwareFormatError, match="past the 0x200000-byte flash"):
        RAINMAKER_4MB.check_fits(2 * 1024 * 1024)


def test_too_many_entries_for_the_sector() -> None:
    parts = tuple(Partition(f"p{i}", 1, 2, 0x9000 + i * 0x1000, 0x1000) for i in range(95))
    with pytest.raises(FirmwareFormatError, match="holds at most"):
        PartitionTable(parts)
    assert len(PartitionTable(parts[:94]).to_bytes()) == 0xC00


def test_app_slots_stop_at_a_gap() -> None:
    table = PartitionTable.from_csv("a, app, ota_0, , 64K\nb, app, ota_2, , 64K\nf, app, factory, , 64K")
    assert [p.name for p in table.app_slots()] == ["a"]
    assert table.factory is table["f"]


# --------------------------------------------------------------------------- the real tool's code

def test_against_gen_esp32part_from_esp_idf_defs() -> None:
    gen = pytest.importorskip("esp_idf_defs.partitions", reason="pip install esp-idf-defs to cross-check")
    for csv, offset in ((RAINMAKER_4MB_CSV, 0xC000), (SMALL_CSV, 0x8000), (FEATURES_CSV, 0x8000)):
        theirs = gen.PartitionTable.from_csv(csv, offset, 0x0)
        theirs.verify(offset)
        ours = PartitionTable.from_csv(csv, offset=offset)
        assert ours.to_bytes() == theirs.to_binary()
        assert ours.to_csv() == theirs.to_csv()
        back = gen.PartitionTable.from_binary(ours.to_bytes())
        assert [(p.name, p.type, p.subtype, p.offset, p.size, p.encrypted, p.readonly) for p in back] == [
            (p.name, p.type, p.subtype, p.offset, p.size, p.encrypted, p.readonly) for p in ours]


def test_command_line_is_a_gen_esp32part_stand_in(tmp_path) -> None:  # type: ignore[no-untyped-def]
    binary = tmp_path / "partition-table.bin"
    binary.write_bytes(RAINMAKER_4MB.to_bytes())
    out = subprocess.run([sys.executable, str(PART_TOOL_SCRIPT), str(binary)], capture_output=True, check=True)
    assert out.stdout.decode() == RAINMAKER_4MB.to_csv()
    csv = tmp_path / "partitions.csv"
    csv.write_text(RAINMAKER_4MB_CSV)
    made = tmp_path / "made.bin"
    subprocess.run([sys.executable, str(PART_TOOL_SCRIPT), "--offset", "0xc000", str(csv), str(made)], check=True)
    assert made.read_bytes() == RAINMAKER_4MB.to_bytes()
    binary.write_bytes(corrupt(5, b"\x11", RAINMAKER_4MB.to_bytes()))
    bad = subprocess.run([sys.executable, str(PART_TOOL_SCRIPT), str(binary)], capture_output=True)
    assert bad.returncode == 2 and b"MD5 entry says" in bad.stderr
    binary.write_bytes(b"\x00\xff" * 8)  # not the binary magic, so read as CSV, as gen_esp32part does
    bad = subprocess.run([sys.executable, str(PART_TOOL_SCRIPT), str(binary)], capture_output=True)
    assert bad.returncode == 2 and b"not UTF-8" in bad.stderr

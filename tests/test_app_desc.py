"""esp_app_desc_t: layout against ESP-IDF's header and esptool's parser, round trips, bad input."""

from __future__ import annotations

import struct

import pytest

from rig.firmware.app_desc import APP_DESC_LAYOUT, APP_DESC_MAGIC, APP_DESC_OFFSET, AppDescriptor
from rig.firmware.errors import FirmwareFormatError
from tests.firmware_samples import FULL_DESC

# esptool/cmds.py _parse_app_info
ESPTOOL_APP_DESC_FMT = "<II8s32s32s16s16s32s32sHHB3s72s"


def test_layout_is_esptools_struct() -> None:
    assert APP_DESC_LAYOUT.size == struct.calcsize(ESPTOOL_APP_DESC_FMT) == 256
    assert "<" + "".join(f.fmt for f in APP_DESC_LAYOUT.fields) == ESPTOOL_APP_DESC_FMT


def test_field_offsets_match_esp_app_desc_h() -> None:
    # offsets from esp-idf components/esp_app_format/include/esp_app_desc.h
    expected = {
        "magic_word": 0, "secure_version": 4, "reserv1": 8, "version": 16, "project_name": 48,
        "time": 80, "date": 96, "idf_ver": 112, "app_elf_sha256": 144, "min_efuse_blk_rev_full": 176,
        "max_efuse_blk_rev_full": 178, "mmu_page_size": 180, "reserv3": 181, "reserv2": 184,
    }  # fmt: skip
    assert {f.name: APP_DESC_LAYOUT.offset_of(f.name) for f in APP_DESC_LAYOUT.fields} == expected
    assert APP_DESC_OFFSET == 24 + 8


def test_known_bytes() -> None:
    expected = struct.pack(
        ESPTOOL_APP_DESC_FMT,
        0xABCD5432, 7, bytes(8), b"2.3.1", b"rmaker_switch", b"12:34:56", b"Mar  4 2025",
        b"v5.4.1-dirty", bytes(range(32)), 1, 199, 16, bytes(3), bytes(72),
    )  # fmt: skip
    assert FULL_DESC.to_bytes() == expected
    assert FULL_DESC.to_bytes()[:4] == bytes.fromhex("3254cdab")


def test_esptools_own_parser_reads_what_we_write() -> None:
    from esptool.cmds import _parse_app_info

    info = _parse_app_info(FULL_DESC.to_bytes())
    assert info is not None
    assert info["project_name"] == "rmaker_switch"
    assert info["version"] == "2.3.1"
    assert info["secure_version"] == 7
    assert info["idf_ver"] == "v5.4.1-dirty"
    assert info["app_elf_sha256"] == FULL_DESC.elf_sha256_hex
    assert info["mmu_page_size"] == "64 KB"
    assert info["min_efuse_blk_rev_full"] == "0.1"
    assert info["max_efuse_blk_rev_full"] == "1.99"


def test_round_trip_keeps_reserved_bytes() -> None:
    raw = bytearray(FULL_DESC.to_bytes())
    raw[181] = 2  # newer ESP-IDF stores spi_flash_mode here
    raw[8:16] = b"\x11" * 8
    raw[200] = 0x5A
    parsed = AppDescriptor.parse(bytes(raw))
    assert parsed.to_bytes() == bytes(raw)
    assert parsed.reserv3 == b"\x02\x00\x00"
    assert AppDescriptor.parse(FULL_DESC.to_bytes()) == FULL_DESC


def test_parse_at_an_offset() -> None:
    blob = b"\xe9" + bytes(APP_DESC_OFFSET - 1) + FULL_DESC.to_bytes() + b"tail"
    assert AppDescriptor.parse(blob, APP_DESC_OFFSET) == FULL_DESC


def test_wrong_magic_names_offset_and_expected_magic() -> None:
    raw = bytearray(FULL_DESC.to_bytes())
    raw[0] ^= 0xFF
    with pytest.raises(FirmwareFormatError) as err:
        AppDescriptor.parse(bytes(32) + bytes(raw), offset=32)
    assert err.value.offset == 32
    assert f"0x{APP_DESC_MAGIC:08x}" in str(err.value)
    assert "0x20" in str(err.value)  # the fix says where the descriptor lives


def test_short_buffer_is_a_format_error() -> None:
    with pytest.raises(FirmwareFormatError) as err:
        AppDescriptor.parse(FULL_DESC.to_bytes()[:255])
    assert "256" in str(err.value)


def test_unterminated_string_is_a_format_error() -> None:
    raw = bytearray(FULL_DESC.to_bytes())
    raw[16:48] = b"x" * 32  # version with no NUL
    with pytest.raises(FirmwareFormatError, match="version"):
        AppDescriptor.parse(bytes(raw))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"version": "v" * 32},
        {"project_name": "p" * 40},
        {"date": "a very long date string"},
        {"app_elf_sha256": bytes(31)},
        {"secure_version": -1},
        {"secure_version": 1 << 32},
        {"min_efuse_blk_rev_full": 70000},
        {"mmu_page_size": 256},
        {"reserv2": bytes(71)},
    ],
)
def test_values_that_do_not_fit_are_refused_at_construction(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        AppDescriptor(**kwargs)  # type: ignore[arg-type]


def test_longest_strings_fit_with_their_nul() -> None:
    desc = AppDescriptor(version="v" * 31, project_name="p" * 31, time="t" * 15, idf_ver="i" * 31)
    assert AppDescriptor.parse(desc.to_bytes()) == desc

"""The ESP app image format: known answers, round trips, ESP-IDF's checks, and the real esptool's verdict."""

from __future__ import annotations

import hashlib
import random
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from rig.firmware.app_desc import APP_DESC_OFFSET
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.image import (
    IMAGE_HEADER_LAYOUT,
    SEGMENT_HEADER_LAYOUT,
    EspImage,
    ImageHeader,
    Segment,
    build_app_image,
    build_image,
    esp_checksum,
    verify_image,
)
from rig.targets.esp32c3 import ESP32C3
from tests.esptool_cli import ImageInfo, elf2image, image_info, riscv_elf
from tests.firmware_samples import DESC, MANIFEST, SPIN

DRAM = 0x3FC88000
IRAM = 0x40380000


def small_image(header: ImageHeader | None = None) -> bytes:
    """A few hundred bytes, no flash-mapped segment past the first: cheap to mutilate at every offset."""
    return build_image(
        [Segment(ESP32C3.drom_base + 0x20, MANIFEST), Segment(DRAM, b"\x11" * 16), Segment(IRAM, SPIN * 2)],
        app_desc=DESC,
        header=header or ImageHeader(entry_addr=IRAM),
    )


def flipped(data: bytes, offset: int, mask: int = 0x01) -> bytes:
    out = bytearray(data)
    out[offset] ^= mask
    return bytes(out)


# --------------------------------------------------------------------------- layouts and known answers


def test_header_layout_matches_esp_app_format_h() -> None:
    expected = {
        "magic": 0, "segment_count": 1, "spi_mode": 2, "spi_speed_size": 3, "entry_addr": 4, "wp_pin": 8,
        "spi_pin_drv": 9, "chip_id": 12, "min_chip_rev": 14, "min_chip_rev_full": 15, "max_chip_rev_full": 17,
        "reserved": 19, "hash_appended": 23,
    }  # fmt: skip
    assert {f.name: IMAGE_HEADER_LAYOUT.offset_of(f.name) for f in IMAGE_HEADER_LAYOUT.fields} == expected
    assert IMAGE_HEADER_LAYOUT.size == 24
    assert SEGMENT_HEADER_LAYOUT.size == 8
    # esptool: "<BBBBI" common header + ESP32FirmwareImage.EXTENDED_HEADER_STRUCT_FMT
    assert struct.calcsize("<BBBBI" + "BBBBHBHH" + "B" * 4 + "B") == 24


def test_default_header_bytes() -> None:
    header = ImageHeader(entry_addr=0x42000020, segment_count=4)
    assert header.to_bytes() == bytes.fromhex(
        "e9"  # magic
        "04"  # segment_count
        "02"  # spi_mode DIO
        "2f"  # 4MB << 4 | 80m
        "20000042"  # entry_addr
        "ee"  # wp_pin disabled
        "000000"  # spi_pin_drv
        "0500"  # chip_id ESP32-C3
        "00"  # min_chip_rev (legacy)
        "0300"  # min_chip_rev_full v0.3
        "c700"  # max_chip_rev_full v1.99
        "00000000"  # reserved
        "01"  # hash_appended
    )
    assert ImageHeader.parse(header.to_bytes()) == header


def test_tiny_image_known_answer() -> None:
    # one RAM segment of 01 02 03 04: checksum 0xEF ^ 1 ^ 2 ^ 3 ^ 4 = 0xEB, as the last byte of the 16-byte block
    header = ImageHeader(entry_addr=IRAM, hash_appended=0)
    image = build_image([Segment(IRAM, b"\x01\x02\x03\x04")], header=header)
    expected = (
        replace(header, segment_count=1).to_bytes()
        + struct.pack("<II", IRAM, 4)
        + b"\x01\x02\x03\x04"
        + bytes(11)
        + b"\xeb"
    )
    assert image == expected
    assert len(image) == 48

    hashed = build_image([Segment(IRAM, b"\x01\x02\x03\x04")], header=replace(header, hash_appended=1))
    assert hashed[:48] == expected[:23] + b"\x01" + expected[24:]
    assert hashed[48:] == hashlib.sha256(hashed[:48]).digest()


def test_segment_data_is_padded_to_four_bytes() -> None:
    image = EspImage.parse(build_image([Segment(IRAM, b"\xaa\xbb\xcc")], header=ImageHeader(entry_addr=IRAM)))
    assert image.segments[0].data == b"\xaa\xbb\xcc\x00"


@pytest.mark.parametrize("length", [0, 1, 7, 8, 9, 63, 64, 1001])
def test_checksum_matches_a_plain_xor(length: int) -> None:
    data = random.Random(length).randbytes(length)
    expected = 0xEF
    for b in data:
        expected ^= b
    assert esp_checksum(data) == expected


# --------------------------------------------------------------------------- round trips


def test_app_image_layout() -> None:
    image = EspImage.parse(build_app_image(DESC, MANIFEST))
    assert [s.memory_type() for s in image.segments] == ["DROM", "RAM", "PADDING", "IROM"]
    drom, iram, _, irom = image.segments
    assert drom.load_addr == 0x3C000020
    assert iram.load_addr == 0x40380000
    assert irom.load_addr == 0x42010020  # first page after DROM's
    assert image.header.entry_addr == irom.load_addr
    offsets = image.segment_offsets()
    assert offsets[0] + 8 == APP_DESC_OFFSET
    for seg, off in zip(image.segments, offsets, strict=True):
        if seg.is_mapped():
            assert (off + 8) % 0x10000 == seg.load_addr % 0x10000
    assert image.app_desc == DESC
    assert drom.data[256 : 256 + len(MANIFEST)] == MANIFEST
    assert image.trailer == b""
    assert verify_image(build_app_image(DESC, MANIFEST)).ok


def test_drom_spanning_pages_moves_irom_along() -> None:
    image = EspImage.parse(build_app_image(DESC, bytes(0x12000)))
    assert image.segments[-1].load_addr == 0x42020020


def test_round_trip_is_byte_identical() -> None:
    for data in (build_app_image(DESC, MANIFEST), build_app_image(DESC, secure_pad_v2=True), small_image()):
        image = EspImage.parse(data)
        assert image.to_bytes() == data
        assert image.calculated_checksum() == image.checksum
        assert image.calculated_digest() == image.digest


def test_trailer_is_kept_apart() -> None:
    data = build_app_image(DESC, MANIFEST, secure_pad_v2=True)
    assert len(data) % 0x10000 == 0
    signature_sector = b"\xe7\x02" + bytes(1214) + b"\xff" * (4096 - 1216)
    padded = data + signature_sector
    image = EspImage.parse(padded)
    assert image.image_length == len(data)
    assert image.trailer == signature_sector
    assert image.to_bytes() + image.trailer == padded


def test_non_zero_checksum_padding_survives_a_round_trip() -> None:
    data = small_image()
    image = EspImage.parse(data)
    pad_at = sum(8 + len(s.data) for s in image.segments) + 24
    doctored = bytearray(data)
    doctored[pad_at] = 0x5A
    # re-hash so that only the padding differs
    body_end = image.image_length - 32
    doctored[body_end:] = hashlib.sha256(doctored[:body_end]).digest()
    again = EspImage.parse(bytes(doctored))
    assert again.checksum_pad is not None
    assert again.to_bytes() == bytes(doctored)
    assert verify_image(bytes(doctored)).ok  # ESP-IDF hashes the padding but does not check it
    with pytest.raises(ValueError, match="checksum_pad"):
        replace(again, segments=again.segments[:1]).to_bytes()


def test_image_without_digest() -> None:
    data = build_app_image(DESC, header=ImageHeader(hash_appended=0))
    image = EspImage.parse(data)
    assert image.digest is None
    assert image.to_bytes() == data
    assert verify_image(data).ok


# --------------------------------------------------------------------------- the real esptool

ESPTOOL_CASES = {
    "app": lambda: build_app_image(DESC, MANIFEST),
    "big": lambda: build_app_image(replace(DESC, secure_version=40), random.Random(1).randbytes(70_001)),
    "small": small_image,
    "flip_data": lambda: flipped(build_app_image(DESC, MANIFEST), 0x200 + 24),  # in the DROM payload
    "flip_digest": lambda: flipped(build_app_image(DESC, MANIFEST), -1),
    "flip_header": lambda: flipped(build_app_image(DESC, MANIFEST), 5),  # entry address
    "bad_magic": lambda: b"\xff" + build_app_image(DESC, MANIFEST)[1:],
    "truncated": lambda: build_app_image(DESC, MANIFEST)[:0x400],
}


@pytest.fixture(scope="module")
def esptool_reports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[bytes, ImageInfo]]:
    """``esptool image-info`` on each case, run in parallel to keep the suite fast."""
    folder = tmp_path_factory.mktemp("image-info")
    files: dict[str, tuple[bytes, Path]] = {}
    for name, make in ESPTOOL_CASES.items():
        data = make()
        path = folder / f"{name}.bin"
        path.write_bytes(data)
        files[name] = (data, path)
    with ThreadPoolExecutor(max_workers=len(files)) as pool:
        infos = dict(zip(files, pool.map(image_info, (p for _, p in files.values())), strict=True))
    return {name: (files[name][0], infos[name]) for name in files}


@pytest.mark.parametrize("case", ["app", "big", "small"])
def test_esptool_image_info_agrees(case: str, esptool_reports: dict[str, tuple[bytes, ImageInfo]]) -> None:
    data, info = esptool_reports[case]
    image = EspImage.parse(data)
    assert info.returncode == 0, info.stdout + info.stderr
    assert "WARNING" not in (info.stdout + info.stderr).upper()
    assert info.chip == "ESP32-C3"
    assert info.chip_id == 5
    assert info.entry == image.header.entry_addr
    assert (info.flash_mode, info.flash_freq, info.flash_size) == ("DIO", "80m", "4MB")
    assert (info.min_rev, info.max_rev) == ("v0.3", "v1.99")
    assert info.segment_count == len(image.segments)
    ours = [
        (len(s.data), s.load_addr, off) for s, off in zip(image.segments, image.segment_offsets(), strict=True)
    ]
    assert [(s.length, s.load_addr, s.file_offset) for s in info.segments] == ours
    for seg, row in zip(image.segments, info.segments, strict=True):
        if seg.memory_type() != "RAM":
            assert row.memory_types == seg.memory_type()
    assert info.checksum == image.checksum and info.checksum_valid
    assert image.digest is not None
    assert info.validation_hash == image.digest.hex() and info.hash_valid
    desc = image.app_desc
    assert info.app["Project name"] == desc.project_name
    assert info.app["App version"] == desc.version
    assert info.app["Compile time"] == f"{desc.date} {desc.time}"
    assert info.app["ELF file SHA256"] == desc.elf_sha256_hex
    assert info.app["ESP-IDF"] == desc.idf_ver
    assert info.app["Secure version"] == str(desc.secure_version)
    assert info.app["MMU page size"] == "64 KB"


def test_flipped_data_byte_fails_the_checksum(esptool_reports: dict[str, tuple[bytes, ImageInfo]]) -> None:
    data, info = esptool_reports["flip_data"]
    good = EspImage.parse(build_app_image(DESC, MANIFEST))
    result = verify_image(data)
    assert result.codes == ["checksum"]  # ESP-IDF stops at the checksum; the hash is wrong too
    calculated = good.checksum ^ 0x01
    assert result.problems[0].message == f"Checksum failed. Calculated 0x{calculated:x} read 0x{good.checksum:x}"
    assert result.problems[0].tag == "esp_image"
    assert info.checksum_valid is False and info.calculated_checksum == calculated
    assert info.hash_valid is False


def test_flipped_digest_fails_the_hash(esptool_reports: dict[str, tuple[bytes, ImageInfo]]) -> None:
    data, info = esptool_reports["flip_digest"]
    result = verify_image(data)
    assert result.codes == ["sha256"]
    assert result.problems[0].message == "Image hash failed - image is corrupt"
    assert info.checksum_valid is True and info.hash_valid is False


def test_flipped_header_byte_fails_only_the_hash(esptool_reports: dict[str, tuple[bytes, ImageInfo]]) -> None:
    data, info = esptool_reports["flip_header"]
    assert verify_image(data).codes == ["sha256"]  # the header is not in the checksum
    assert info.checksum_valid is True and info.hash_valid is False


def test_bad_magic(esptool_reports: dict[str, tuple[bytes, ImageInfo]]) -> None:
    data, info = esptool_reports["bad_magic"]
    with pytest.raises(FirmwareFormatError) as err:
        EspImage.parse(data)
    assert err.value.offset == 0 and "0xe9" in str(err.value)
    result = verify_image(data, flash_offset=0x20000)
    assert result.codes == ["magic"]
    assert result.problems[0].message == "image at 0x20000 has invalid magic byte (nothing flashed here?)"
    assert info.returncode == 2
    assert info.fatal_error == "This is not a valid image (invalid magic number: 0xff)."


def test_truncated_image(esptool_reports: dict[str, tuple[bytes, ImageInfo]]) -> None:
    data, info = esptool_reports["truncated"]
    with pytest.raises(FirmwareFormatError, match="segment 2") as err:
        EspImage.parse(data)
    assert err.value.offset == EspImage.parse(build_app_image(DESC, MANIFEST)).segment_offsets()[2]
    assert verify_image(data).codes == ["truncated"]
    assert info.returncode == 2
    assert info.fatal_error is not None and info.fatal_error.startswith("End of file reading segment 0x0")


@pytest.mark.parametrize("secure_pad", [False, True], ids=["plain", "secure-pad-v2"])
def test_same_bytes_as_esptool_elf2image(secure_pad: bool, tmp_path: Path) -> None:
    """The same sections through ``esptool elf2image`` give the very same image."""
    payload = b"behaviour manifest, not a multiple of 4!!"
    layout = EspImage.parse(build_app_image(DESC, payload))
    irom = layout.segments[-1].load_addr
    unhashed = replace(DESC, app_elf_sha256=bytes(32))  # elf2image patches the ELF's SHA-256 in at 0xB0
    elf = riscv_elf(
        [
            (".flash.appdesc", 0x3C000020, unhashed.to_bytes()),
            (".flash.rodata", 0x3C000120, payload),
            (".iram0.text", IRAM, SPIN),
            (".flash.text", irom, SPIN),
        ],
        entry=irom,
    )
    (tmp_path / "app.elf").write_bytes(elf)
    theirs = elf2image(tmp_path / "app.elf", tmp_path / "app.bin", *(["--secure-pad-v2"] if secure_pad else []))

    ours = build_app_image(
        replace(DESC, app_elf_sha256=hashlib.sha256(elf).digest()), payload, secure_pad_v2=secure_pad
    )
    assert ours == theirs
    parsed = EspImage.parse(theirs)
    assert parsed.to_bytes() == theirs
    assert parsed.app_desc.app_elf_sha256 == hashlib.sha256(elf).digest()
    assert verify_image(theirs).ok


# --------------------------------------------------------------------------- ESP-IDF's checks


def test_every_prefix_is_a_clean_error() -> None:
    data = small_image()
    assert len(data) < 600
    for end in range(len(data)):
        prefix = data[:end]
        with pytest.raises(FirmwareFormatError):
            EspImage.parse(prefix)
        result = verify_image(prefix)
        assert not result.ok, end
        assert result.codes[0] in {"truncated", "magic"}, (end, result)
    assert verify_image(data).ok


def test_every_corrupted_byte_is_caught_or_cleanly_refused() -> None:
    data = small_image()
    for offset in range(len(data)):
        bad = flipped(data, offset, 0xFF)
        try:
            EspImage.parse(bad)
        except FirmwareFormatError:
            pass
        result = verify_image(bad)
        assert not result.ok, f"corrupting byte 0x{offset:x} went unnoticed"


def test_clearing_hash_appended_downgrades_to_the_checksum() -> None:
    """Without Secure Boot, ESP-IDF trusts the header's own word that no hash follows."""
    data = small_image()
    stripped = data[:23] + b"\x00" + data[24:-32]
    assert verify_image(stripped).ok
    assert EspImage.parse(data[:23] + b"\x00" + data[24:]).trailer == data[-32:]


def test_wrong_chip_id() -> None:
    data = small_image(ImageHeader(entry_addr=IRAM, chip_id=9))
    image = EspImage.parse(data)  # structurally fine
    assert image.header.chip_id == 9
    result = verify_image(data)
    assert result.codes == ["chip_id"]
    assert result.problems[0].message == "mismatch chip ID, expected 5, found 9"
    assert result.problems[0].tag == "boot_comm"
    assert result.problems[0].offset == 12


def test_chip_revision_range() -> None:
    data = small_image()
    assert verify_image(data, chip_revision=4).ok
    low = verify_image(data, chip_revision=2)
    assert low.codes == ["chip_rev"]
    assert low.problems[0].message == "chip revision check failed. Required >= v0.3, found v0.2."
    high = verify_image(data, chip_revision=200)
    assert high.problems[0].message == "chip revision check failed. Required <= v1.99, found v2.0."
    unbounded = small_image(ImageHeader(entry_addr=IRAM, max_chip_rev_full=0xFFFF))
    assert verify_image(unbounded, chip_revision=900).ok


def test_too_many_segments() -> None:
    with pytest.raises(ValueError, match="at most 16"):
        build_image([Segment(DRAM + 4 * i, SPIN) for i in range(17)])
    data = bytearray(small_image())
    data[1] = 17
    with pytest.raises(FirmwareFormatError) as err:
        EspImage.parse(bytes(data))
    assert err.value.offset == 1
    result = verify_image(bytes(data), flash_offset=0x10000)
    assert result.problems[0].message == "image at 0x10000 segment count 17 exceeds max 16"


def test_unaligned_segment_length() -> None:
    data = bytearray(small_image())
    seg1 = EspImage.parse(bytes(data)).segment_offsets()[1]
    struct.pack_into("<I", data, seg1 + 4, 13)
    with pytest.raises(FirmwareFormatError, match="multiple of 4") as err:
        EspImage.parse(bytes(data))
    assert err.value.offset == seg1 + 4
    result = verify_image(bytes(data))
    assert result.codes == ["segment"]
    assert result.problems[0].message == "invalid segment length 0xd"


def test_misaligned_flash_segment() -> None:
    irom = Segment(ESP32C3.irom_base + 0x100, SPIN)
    data = build_image([irom], header=ImageHeader(entry_addr=irom.load_addr), align_flash_segments=False)
    result = verify_image(data, flash_offset=0x10000)
    assert result.codes == ["segment"]
    assert result.problems[0].message == "Segment 0 load address 0x42000100, doesn't match data 0x00010020"
    aligned = build_image([irom], header=ImageHeader(entry_addr=irom.load_addr))
    assert [s.load_addr for s in EspImage.parse(aligned).segments] == [0, irom.load_addr]
    assert verify_image(aligned).ok


def test_partition_offset_must_keep_the_mapping_aligned() -> None:
    data = build_app_image(DESC)
    assert verify_image(data, flash_offset=0x110000).ok
    result = verify_image(data, flash_offset=0x108000)  # not on a 64 KB boundary
    assert result.codes == ["segment"]
    assert result.problems[0].message == "Segment 0 load address 0x3c000020, doesn't match data 0x00108020"


def test_image_must_fit_its_partition() -> None:
    data = build_app_image(DESC)
    assert verify_image(data, partition_size=0x100000).ok
    result = verify_image(data, partition_size=0x10000)
    assert result.codes == ["partition"]
    assert result.problems[0].message == f"Image length {len(data)} doesn't fit in partition length 65536"
    assert result.image_length == len(data)


def test_partition_dump_with_erased_tail_verifies() -> None:
    data = build_app_image(DESC, MANIFEST)
    dump = data + b"\xff" * 0x1000
    assert verify_image(dump).ok
    assert verify_image(dump).image_length == len(data)
    assert EspImage.parse(dump).trailer == b"\xff" * 0x1000


def test_app_desc_requires_a_descriptor() -> None:
    ram_only = build_image([Segment(IRAM, SPIN * 80)], header=ImageHeader(entry_addr=IRAM))
    with pytest.raises(FirmwareFormatError) as err:
        _ = EspImage.parse(ram_only).app_desc
    assert err.value.offset == APP_DESC_OFFSET
    assert "not in DROM" in str(err.value)
    short = build_image([Segment(IRAM, SPIN)], header=ImageHeader(entry_addr=IRAM))
    with pytest.raises(FirmwareFormatError):
        _ = EspImage.parse(short).app_desc


def test_build_refuses_a_descriptor_outside_drom() -> None:
    with pytest.raises(ValueError, match="DROM"):
        build_image([Segment(IRAM, SPIN)], app_desc=DESC)
    with pytest.raises(ValueError, match="modulo"):
        build_image([Segment(ESP32C3.drom_base + 0x100, b"")], app_desc=DESC)
    with pytest.raises(ValueError, match="first segment"):
        build_image([], app_desc=DESC)

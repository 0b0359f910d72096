"""The ESP app image format: parse, build and verify.

An app image (``<project>.bin``, what sits in a ``factory``/``ota_N`` partition) is::

    esp_image_header_t                      24 bytes, magic 0xE9
    { esp_image_segment_header_t; data }    segment_count times (at most 16)
    zero padding + checksum byte            to the next 16-byte boundary
    SHA-256 of all of the above             32 bytes, if hash_appended
    [0xFF padding + Secure Boot V2 signature sector, added by espsecure]

Sources:

* esp-idf ``components/bootloader_support/include/esp_app_format.h`` —
  ``esp_image_header_t``, ``esp_image_segment_header_t``, ``ESP_IMAGE_MAX_SEGMENTS``;
* esp-idf ``components/bootloader_support/src/esp_image_format.c`` — ``image_load``
  (``esp_image_verify``), ``verify_image_header``, ``process_segment``,
  ``verify_segment_header``, ``should_map``/``should_load``, ``process_checksum``,
  ``process_appended_hash_and_sig``, ``verify_simple_hash``: what :func:`verify_image`
  checks and the log lines it reports;
* esp-idf ``components/bootloader_support/src/bootloader_common_loader.c`` —
  ``bootloader_common_check_chip_validity`` (chip id and revision, tag ``boot_comm``);
* esptool ``esptool/bin_image.py`` ``ESP32FirmwareImage`` — how ``elf2image`` lays out
  flash-mapped segments (padding segments at load address 0) and ``--secure-pad-v2``,
  which :func:`build_image` reproduces byte for byte.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from functools import reduce
from operator import xor

from rig.firmware.app_desc import APP_DESC_LAYOUT, APP_DESC_OFFSET, AppDescriptor
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.layout import Field, Layout
from rig.targets.esp32c3 import ESP32C3, ChipTarget

IMAGE_MAGIC = 0xE9
"""``ESP_IMAGE_HEADER_MAGIC``."""
MAX_SEGMENTS = 16
"""``ESP_IMAGE_MAX_SEGMENTS``."""
CHECKSUM_INITIAL = 0xEF
"""``ESP_ROM_CHECKSUM_INITIAL`` (esp_image_format.c)."""
DIGEST_LEN = 32
"""``ESP_IMAGE_HASH_LEN``: the appended SHA-256."""
MAX_SEGMENT_LEN = 0x1000000
"""``SIXTEEN_MB``: a segment must be shorter (``verify_segment_header``)."""
FLASH_MAP_WINDOW = 0x800000
"""Size of the IROM and DROM windows: ESP32-C3 ``SOC_IROM_HIGH - SOC_IROM_LOW`` and
``SOC_DROM_HIGH - SOC_DROM_LOW`` (esp-idf ``components/soc/esp32c3/include/soc/soc.h``).
Not in :class:`ChipTarget` yet; correct for the ESP32-C3 only."""
LOADABLE_MIN_ADDR = 0x10000000
"""Load addresses below this are never loaded (0 = padding, 4 = reserved for an MD5
block) — ``should_load`` in esp_image_format.c."""

SPI_MODES = {"qio": 0, "qout": 1, "dio": 2, "dout": 3, "fast_read": 4, "slow_read": 5}
"""``esp_image_spi_mode_t`` values, keyed by esptool's ``--flash-mode`` names."""
FLASH_SIZE_NIBBLES = {"1MB": 0, "2MB": 1, "4MB": 2, "8MB": 3, "16MB": 4, "32MB": 5, "64MB": 6, "128MB": 7}
"""``esp_image_flash_size_t`` (high nibble of byte 3), keyed by esptool's ``--flash-size`` names."""
FLASH_FREQ_NIBBLES = {"80m": 0xF, "40m": 0x0, "26m": 0x1, "20m": 0x2}
"""``esp_image_spi_freq_t`` (low nibble of byte 3) on ESP32-C3, keyed by esptool's ``--flash-freq``
names (esptool ``targets/esp32.py`` ``FLASH_FREQUENCY``, inherited by ESP32-C3)."""

IMAGE_HEADER_LAYOUT = Layout(
    "esp_image_header_t",
    [
        Field("magic", "B", "ESP_IMAGE_HEADER_MAGIC, 0xE9"),
        Field("segment_count", "B", "number of segments, at most ESP_IMAGE_MAX_SEGMENTS (16)"),
        Field("spi_mode", "B", "esp_image_spi_mode_t: 0 QIO, 1 QOUT, 2 DIO, 3 DOUT, 4 FAST_READ, 5 SLOW_READ"),
        Field("spi_speed_size", "B", "low nibble spi_speed (esp_image_spi_freq_t), high nibble spi_size"),
        Field("entry_addr", "I", "entry point address"),
        Field("wp_pin", "B", "WP pin when SPI pins are set via eFuse; 0xEE = disabled"),
        Field("spi_pin_drv", "3s", "drive settings of the SPI flash pins (clk/q, d/cs, hd/wp nibbles)"),
        Field("chip_id", "H", "esp_chip_id_t; ESP32-C3 = 0x0005"),
        Field("min_chip_rev", "B", "minimal chip revision, legacy major-only field"),
        Field("min_chip_rev_full", "H", "minimal chip revision, major*100+minor"),
        Field("max_chip_rev_full", "H", "maximal chip revision, major*100+minor"),
        Field("reserved", "4s", "reserved bytes"),
        Field("hash_appended", "B", "1 = a SHA-256 of the image follows the checksum block"),
    ],
    source="esp-idf components/bootloader_support/include/esp_app_format.h",
)
assert IMAGE_HEADER_LAYOUT.size == 24, "esp_image_header_t is 24 bytes"

SEGMENT_HEADER_LAYOUT = Layout(
    "esp_image_segment_header_t",
    [
        Field("load_addr", "I", "address of the segment in the CPU's memory map (0 = padding)"),
        Field("data_len", "I", "length of the data that follows, a multiple of 4"),
    ],
    source="esp-idf components/bootloader_support/include/esp_app_format.h",
)
assert SEGMENT_HEADER_LAYOUT.size == 8, "esp_image_segment_header_t is 8 bytes"

# A RISC-V "j ." (jal x0, 0): an infinite loop, the code of the rig's placeholder apps.
_RISCV_SPIN = bytes.fromhex("6f000000")


# --------------------------------------------------------------------------- header


@dataclass(frozen=True)
class ImageHeader:
    """``esp_image_header_t``, with the defaults of an ESP-IDF ESP32-C3 build.

    Defaults: DIO, 80 MHz, 4 MB, WP pin disabled, chip id 5, chip revision v0.3 to
    v1.99 (ESP-IDF's ``CONFIG_ESP32C3_REV_MIN_FULL``/``REV_MAX_FULL`` defaults), SHA-256
    appended. ``segment_count`` is what the header says; :func:`build_image` fills it in.
    """

    spi_mode: int = SPI_MODES["dio"]
    spi_speed: int = FLASH_FREQ_NIBBLES["80m"]
    spi_size: int = FLASH_SIZE_NIBBLES["4MB"]
    entry_addr: int = 0
    wp_pin: int = 0xEE
    spi_pin_drv: bytes = bytes(3)
    chip_id: int = ESP32C3.image_chip_id
    min_chip_rev: int = 0
    min_chip_rev_full: int = 3
    max_chip_rev_full: int = 199
    reserved: bytes = bytes(4)
    hash_appended: int = 1
    segment_count: int = 0
    magic: int = IMAGE_MAGIC

    def __post_init__(self) -> None:
        for name in ("spi_speed", "spi_size"):
            if not 0 <= getattr(self, name) <= 0xF:
                raise ValueError(f"{name} is a nibble (0..15), got {getattr(self, name)}")
        if len(self.spi_pin_drv) != 3 or len(self.reserved) != 4:
            raise ValueError("spi_pin_drv must be 3 bytes and reserved 4 bytes")

    @property
    def spi_speed_size(self) -> int:
        """Byte 3 of the header: ``spi_size << 4 | spi_speed``."""
        return self.spi_size << 4 | self.spi_speed

    def to_bytes(self) -> bytes:
        """The 24 header bytes, exactly as the fields say."""
        return IMAGE_HEADER_LAYOUT.pack(
            {
                "magic": self.magic,
                "segment_count": self.segment_count,
                "spi_mode": self.spi_mode,
                "spi_speed_size": self.spi_speed_size,
                "entry_addr": self.entry_addr,
                "wp_pin": self.wp_pin,
                "spi_pin_drv": self.spi_pin_drv,
                "chip_id": self.chip_id,
                "min_chip_rev": self.min_chip_rev,
                "min_chip_rev_full": self.min_chip_rev_full,
                "max_chip_rev_full": self.max_chip_rev_full,
                "reserved": self.reserved,
                "hash_appended": self.hash_appended,
            }
        )

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, offset: int = 0, what: str = "app image") -> ImageHeader:
        """Read the header fields at *offset*; does not judge them (see :func:`verify_image`)."""
        raw = IMAGE_HEADER_LAYOUT.unpack(data, offset, what=what)
        speed_size = raw.pop("spi_speed_size")
        return cls(spi_speed=speed_size & 0xF, spi_size=speed_size >> 4, **raw)


# --------------------------------------------------------------------------- segments


def _in_window(addr: int, base: int) -> bool:
    return base <= addr < base + FLASH_MAP_WINDOW


def is_flash_mapped(load_addr: int, target: type[ChipTarget] = ESP32C3) -> bool:
    """True for IROM/DROM addresses, which the bootloader maps through the flash MMU
    instead of copying (``should_map`` in esp_image_format.c)."""
    return _in_window(load_addr, target.irom_base) or _in_window(load_addr, target.drom_base)


@dataclass(frozen=True)
class Segment:
    """One image segment: where it goes (``load_addr``) and its bytes."""

    load_addr: int
    data: bytes

    def is_mapped(self, target: type[ChipTarget] = ESP32C3) -> bool:
        """IROM/DROM: mapped from flash by the MMU."""
        return is_flash_mapped(self.load_addr, target)

    def is_loaded(self, target: type[ChipTarget] = ESP32C3) -> bool:
        """Copied into RAM by the bootloader (not mapped, not a padding segment)."""
        return not self.is_mapped(target) and self.load_addr >= LOADABLE_MIN_ADDR

    def memory_type(self, target: type[ChipTarget] = ESP32C3) -> str:
        """A short name for logs: ``DROM``, ``IROM``, ``PADDING`` or ``RAM``."""
        if _in_window(self.load_addr, target.drom_base):
            return "DROM"
        if _in_window(self.load_addr, target.irom_base):
            return "IROM"
        if self.load_addr < LOADABLE_MIN_ADDR:
            return "PADDING"
        return "RAM"


def esp_checksum(data: bytes | bytearray | memoryview, initial: int = CHECKSUM_INITIAL) -> int:
    """The ROM/bootloader checksum: XOR of every byte of *data*, starting from *initial*.

    ESP-IDF XORs 32-bit words and folds the result to a byte (``process_checksum``);
    for 4-byte-aligned segments that is the same number.
    """
    raw = bytes(data)
    whole = len(raw) - len(raw) % 8
    acc = reduce(xor, memoryview(raw[:whole]).cast("Q"), 0) if whole else 0
    for shift in range(0, 64, 8):
        initial ^= (acc >> shift) & 0xFF
    for b in raw[whole:]:
        initial ^= b
    return initial


def _checksum_block_len(unpadded_len: int) -> int:
    """Bytes from the end of the last segment through the checksum byte (1..16)."""
    return ((unpadded_len + 1 + 15) & ~15) - unpadded_len


def _pad4(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


# --------------------------------------------------------------------------- image


@dataclass(frozen=True)
class EspImage:
    """An app image taken apart.

    ``image_length`` counts from the header through the checksum block and, if
    present, the digest; ``trailer`` is everything after it in the parsed data
    (0xFF padding, a Secure Boot V2 signature sector, the rest of a partition dump).
    ``checksum_pad`` holds the bytes between the last segment and the checksum byte
    when they are not all zero (esptool writes zeros; ESP-IDF hashes but never checks
    them), so :meth:`to_bytes` gives back exactly the bytes that were parsed.
    """

    header: ImageHeader
    segments: tuple[Segment, ...]
    checksum: int
    digest: bytes | None
    image_length: int
    trailer: bytes = b""
    checksum_pad: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "segments", tuple(self.segments))

    # -- reading

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, what: str = "app image") -> EspImage:
        """Take *data* (an image file, or a partition read from offset 0) apart.

        Structural breakage — wrong magic, more than 16 segments, a segment length
        that is not a multiple of 4 or runs past the end, no room for the checksum or
        the digest — is a :class:`FirmwareFormatError` with the offset. Semantic checks
        (chip id, checksum and digest values, flash-mapping alignment) are
        :func:`verify_image`'s job; ``parse`` accepts such images so that negative
        variants can be taken apart too.
        """
        buf = bytes(data)
        header = ImageHeader.parse(buf, 0, what)
        if header.magic != IMAGE_MAGIC:
            raise FirmwareFormatError(
                what,
                f"first byte is 0x{header.magic:02x}, an ESP image starts with 0x{IMAGE_MAGIC:02x}",
                0,
                "0xff means erased flash (nothing flashed here); otherwise check the file and the "
                "partition offset, and that flash encryption is not hiding the plaintext",
            )
        if header.segment_count > MAX_SEGMENTS:
            raise FirmwareFormatError(
                what,
                f"header declares {header.segment_count} segments, ESP-IDF accepts at most {MAX_SEGMENTS}",
                IMAGE_HEADER_LAYOUT.offset_of("segment_count"),
                "the header is corrupt, or this is not an app image",
            )
        segments: list[Segment] = []
        pos = IMAGE_HEADER_LAYOUT.size
        for index in range(header.segment_count):
            seg = SEGMENT_HEADER_LAYOUT.unpack(buf, pos, what=f"{what}, header of segment {index}")
            data_len = seg["data_len"]
            if data_len % 4 or data_len >= MAX_SEGMENT_LEN:
                raise FirmwareFormatError(
                    what,
                    f"segment {index} (load 0x{seg['load_addr']:08x}) has length 0x{data_len:x}; "
                    "it must be a multiple of 4 and below 16 MB",
                    pos + SEGMENT_HEADER_LAYOUT.offset_of("data_len"),
                    "the segment header is corrupt",
                )
            start = pos + SEGMENT_HEADER_LAYOUT.size
            if start + data_len > len(buf):
                raise FirmwareFormatError(
                    what,
                    f"segment {index} (load 0x{seg['load_addr']:08x}) claims 0x{data_len:x} bytes "
                    f"but only 0x{len(buf) - start:x} remain",
                    pos,
                    "the image is truncated (incomplete download or copy?)",
                )
            segments.append(Segment(seg["load_addr"], buf[start : start + data_len]))
            pos = start + data_len
        block = _checksum_block_len(pos)
        if pos + block > len(buf):
            raise FirmwareFormatError(
                what,
                f"the checksum block needs bytes up to 0x{pos + block:x} but the data ends at 0x{len(buf):x}",
                pos,
                "the image is truncated (incomplete download or copy?)",
            )
        pad = buf[pos : pos + block - 1]
        checksum = buf[pos + block - 1]
        end = pos + block
        digest: bytes | None = None
        if header.hash_appended:  # ESP-IDF: any non-zero value means "appended"
            if end + DIGEST_LEN > len(buf):
                raise FirmwareFormatError(
                    what,
                    f"hash_appended is set but only {len(buf) - end} of the {DIGEST_LEN} SHA-256 bytes are present",
                    end,
                    "the image is truncated (incomplete download or copy?)",
                )
            digest = buf[end : end + DIGEST_LEN]
            end += DIGEST_LEN
        return cls(
            header=header,
            segments=tuple(segments),
            checksum=checksum,
            digest=digest,
            image_length=end,
            trailer=buf[end:],
            checksum_pad=pad if any(pad) else None,
        )

    @property
    def app_desc(self) -> AppDescriptor:
        """The ``esp_app_desc_t`` at the start of the first segment (file offset 0x20)."""
        what = "app image, app descriptor"
        if not self.segments:
            raise FirmwareFormatError(
                what,
                "the image has no segments, so no esp_app_desc_t",
                APP_DESC_OFFSET,
                "an ESP-IDF app starts with a DROM segment holding the app descriptor",
            )
        first = self.segments[0]
        try:
            return AppDescriptor.parse(first.data, 0, what=what)
        except FirmwareFormatError as exc:
            fix = exc.fix
            if not first.is_mapped():
                fix = (
                    f"the first segment loads at 0x{first.load_addr:08x}, not in DROM: "
                    "this looks like a bootloader or RAM-only image, not an app"
                )
            raise FirmwareFormatError(what, exc.problem, APP_DESC_OFFSET + (exc.offset or 0), fix) from None

    def segment_offsets(self) -> list[int]:
        """File offset of each segment's header (esptool image-info's "File offs")."""
        offsets, pos = [], IMAGE_HEADER_LAYOUT.size
        for seg in self.segments:
            offsets.append(pos)
            pos += SEGMENT_HEADER_LAYOUT.size + len(seg.data)
        return offsets

    def calculated_checksum(self) -> int:
        """The checksum the segments call for (compare with :attr:`checksum`)."""
        checksum = CHECKSUM_INITIAL
        for seg in self.segments:
            checksum = esp_checksum(seg.data, checksum)
        return checksum

    # -- writing

    def _body(self) -> bytes:
        parts = [self.header.to_bytes()]
        for seg in self.segments:
            parts.append(SEGMENT_HEADER_LAYOUT.pack({"load_addr": seg.load_addr, "data_len": len(seg.data)}))
            parts.append(seg.data)
        unpadded = sum(len(p) for p in parts)
        pad_len = _checksum_block_len(unpadded) - 1
        if self.checksum_pad is None:
            parts.append(bytes(pad_len))
        elif len(self.checksum_pad) == pad_len:
            parts.append(self.checksum_pad)
        else:
            raise ValueError(
                f"checksum_pad is {len(self.checksum_pad)} bytes but these segments need {pad_len}; "
                "set it to None after changing segments"
            )
        parts.append(bytes([self.checksum]))
        return b"".join(parts)

    def calculated_digest(self) -> bytes:
        """SHA-256 over header, segments and checksum block (compare with :attr:`digest`)."""
        return hashlib.sha256(self._body()).digest()

    def to_bytes(self) -> bytes:
        """The image bytes exactly as the fields say, without the trailer.

        Nothing is recomputed: a parsed image comes back byte for byte, a doctored one
        stays doctored. Use :func:`build_image` for a fresh checksum and digest.
        """
        body = self._body()
        return body + (self.digest or b"")


# --------------------------------------------------------------------------- building


def build_image(
    segments: Sequence[Segment],
    app_desc: AppDescriptor | None = None,
    header: ImageHeader | None = None,
    target: type[ChipTarget] = ESP32C3,
    *,
    align_flash_segments: bool = True,
    secure_pad_v2: bool = False,
) -> bytes:
    """Lay *segments* out as an app image with a fresh checksum and SHA-256.

    * *app_desc*, if given, is prepended to the first segment, which must load in DROM
      at an address ≡ 0x20 modulo the MMU page (it starts at file offset 0x20).
    * Segment data is zero-padded to a multiple of 4, as esptool does.
    * With *align_flash_segments* (the default), a padding segment (load address 0)
      is inserted before any IROM/DROM segment whose data would not sit at the same
      offset within a 64 KB page in the file as its load address does — exactly as
      ``esptool elf2image`` does, so ESP-IDF's ``verify_segment_header`` accepts it.
      Without it the segments are written as given, misaligned or not (for negative
      tests; :func:`verify_image` reports them).
    * *secure_pad_v2* adds a last padding segment so that the image, digest included,
      ends on a 64 KB boundary (``elf2image --secure-pad-v2``): the Secure Boot V2
      signature sector then starts a fresh MMU page.
    * *header* defaults to :class:`ImageHeader` for *target*; its ``segment_count`` is
      replaced by the real count, everything else is written as given.
    """
    page = target.mmu_page_size
    segs = [Segment(s.load_addr, _pad4(bytes(s.data))) for s in segments]
    if app_desc is not None:
        if not segs:
            raise ValueError("an app descriptor needs a first segment to live in; give a DROM segment")
        first = segs[0]
        if not _in_window(first.load_addr, target.drom_base):
            raise ValueError(
                f"the app descriptor goes at the start of the first segment, which loads at "
                f"0x{first.load_addr:08x}; it must load in DROM (e.g. 0x{target.drom_base + APP_DESC_OFFSET:08x})"
            )
        segs[0] = Segment(first.load_addr, app_desc.to_bytes() + first.data)
    if header is None:
        header = ImageHeader(chip_id=target.image_chip_id)

    laid_out: list[Segment] = []
    pos = IMAGE_HEADER_LAYOUT.size
    for index, seg in enumerate(segs):
        data_at = pos + SEGMENT_HEADER_LAYOUT.size
        if align_flash_segments and seg.is_mapped(target) and data_at % page != seg.load_addr % page:
            if index == 0 and app_desc is not None:
                raise ValueError(
                    f"the first segment's data is at file offset 0x{data_at:x}, so its load address must be "
                    f"≡ 0x{data_at:x} modulo 0x{page:x}; 0x{seg.load_addr:08x} is not "
                    f"(use e.g. 0x{target.drom_base + data_at:08x})"
                )
            if seg.load_addr % 4:
                raise ValueError(f"flash-mapped segment at 0x{seg.load_addr:08x} is not 4-byte aligned")
            pad_len = (seg.load_addr - pos - 2 * SEGMENT_HEADER_LAYOUT.size) % page
            laid_out.append(Segment(0, bytes(pad_len)))
            pos += SEGMENT_HEADER_LAYOUT.size + pad_len
        laid_out.append(seg)
        pos += SEGMENT_HEADER_LAYOUT.size + len(seg.data)
    if secure_pad_v2:
        if not header.hash_appended:
            raise ValueError("secure_pad_v2 pads for an image with an appended SHA-256; set hash_appended")
        # esptool: pad so that segments + 16-byte checksum block + 32-byte digest end on a page boundary
        pad_len = (page - (pos + SEGMENT_HEADER_LAYOUT.size) % page - 16 - DIGEST_LEN) % page
        laid_out.append(Segment(0, bytes(pad_len)))
    if len(laid_out) > MAX_SEGMENTS:
        raise ValueError(f"{len(laid_out)} segments (padding included); ESP-IDF accepts at most {MAX_SEGMENTS}")

    image = EspImage(
        header=replace(header, segment_count=len(laid_out)),
        segments=tuple(laid_out),
        checksum=0,
        digest=None,
        image_length=0,
    )
    image = replace(image, checksum=image.calculated_checksum())
    if header.hash_appended:
        image = replace(image, digest=image.calculated_digest())
    return image.to_bytes()


def build_app_image(
    app_desc: AppDescriptor,
    payload: bytes = b"",
    *,
    header: ImageHeader | None = None,
    target: type[ChipTarget] = ESP32C3,
    iram_code: bytes = _RISCV_SPIN,
    irom_code: bytes = _RISCV_SPIN,
    secure_pad_v2: bool = False,
) -> bytes:
    """A plausible ESP32-C3 app image: what the rig's virtual boards run.

    Segments, in file order (the order ``esptool elf2image`` gives the same sections):

    0. DROM at ``drom_base + 0x20``: the app descriptor, then *payload* (e.g. the
       virtual app's behaviour manifest);
    1. IRAM at ``iram_base + 0x4000`` (``0x40380000``, after the 16 KB instruction cache
       that opens SOC_IRAM on the C3): *iram_code*;
    2. a padding segment, so that
    3. IROM, at the first 64 KB page after the pages DROM uses (+0x20, like DROM), holds
       *irom_code* and the entry point. The C3 maps IROM and DROM through one MMU
       table, so the two must not share a page index.

    ``esptool image-info`` reads it without warnings and ESP-IDF's checks pass.
    *header* defaults to :class:`ImageHeader` for *target*; an ``entry_addr`` of 0 is
    replaced by the IROM address.
    """
    page = target.mmu_page_size
    drom_load = target.drom_base + APP_DESC_OFFSET
    drom_len = APP_DESC_LAYOUT.size + len(_pad4(payload))
    drom_pages = -(-(APP_DESC_OFFSET + drom_len) // page)
    irom_load = target.irom_base + drom_pages * page + APP_DESC_OFFSET
    iram_load = target.iram_base + 0x4000
    if header is None:
        header = ImageHeader(chip_id=target.image_chip_id)
    if header.entry_addr == 0:
        header = replace(header, entry_addr=irom_load)
    return build_image(
        [Segment(drom_load, payload), Segment(iram_load, iram_code), Segment(irom_load, irom_code)],
        app_desc=app_desc,
        header=header,
        target=target,
        secure_pad_v2=secure_pad_v2,
    )


# --------------------------------------------------------------------------- verifying


@dataclass(frozen=True)
class ImageProblem:
    """One reason the bootloader would refuse the image.

    ``message`` is the line ESP-IDF logs at error level (without the ``E (ms) tag:``
    prefix), ``tag`` its log tag, ``offset`` the offset in the image data where the
    problem is. ``code`` is one of ``magic``, ``chip_id``, ``chip_rev``,
    ``segment_count``, ``segment``, ``truncated``, ``checksum``, ``partition``,
    ``sha256``. ``truncated`` has no ESP-IDF line of its own: on a device the bytes
    past the end are whatever the flash holds, so pass a whole partition to get the
    error the device prints.
    """

    code: str
    message: str
    offset: int | None = None
    tag: str = "esp_image"


@dataclass
class ImageVerification:
    """What :func:`verify_image` found. ``problems`` holds, in order, what ESP-IDF logs
    before it gives up (it stops at the first failed check, so usually one line)."""

    problems: list[ImageProblem] = field(default_factory=list)
    image_length: int | None = None
    """Length ESP-IDF computes (header through digest), when it got that far."""

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def codes(self) -> list[str]:
        return [p.code for p in self.problems]


def verify_image(
    data: bytes | bytearray | memoryview,
    target: type[ChipTarget] = ESP32C3,
    *,
    flash_offset: int = 0,
    partition_size: int | None = None,
    chip_revision: int | None = None,
) -> ImageVerification:
    """Check an app image the way ESP-IDF's ``esp_image_verify`` does, reporting, not raising.

    *data* starts at the image's first byte: a file, or a partition read from its
    start. *flash_offset* is where that is in flash (the partition offset); it appears
    in ESP-IDF's messages and in the flash-mapping alignment check, which ESP-IDF does
    on absolute flash addresses. In order, as ``image_load`` does:

    1. magic byte, chip id (and chip revision range if *chip_revision*, major*100+minor,
       is given), segment count;
    2. per segment: length a multiple of 4 and below 16 MB, IROM/DROM data at the same
       offset within a 64 KB page as its load address;
    3. checksum byte (XOR of all segment data from 0xEF);
    4. if *partition_size* is given, that the image fits the partition;
    5. if ``hash_appended``, the SHA-256 of everything through the checksum block.

    Not covered: Secure Boot signature checks (the signing module's job) and the
    bootloader's RAM overlap checks (``verify_load_addresses``), which depend on the
    bootloader's own memory layout.
    """
    buf = bytes(data)
    result = ImageVerification()

    def fail(code: str, message: str, offset: int | None, tag: str = "esp_image") -> ImageVerification:
        result.problems.append(ImageProblem(code, message, offset, tag))
        return result

    def truncated(need: int, what: str) -> ImageVerification:
        return fail(
            "truncated",
            f"image at 0x{flash_offset:x} is truncated: {what} needs bytes up to 0x{need:x}, "
            f"the data ends at 0x{len(buf):x}",
            len(buf),
        )

    if len(buf) < IMAGE_HEADER_LAYOUT.size:
        if buf and buf[0] != IMAGE_MAGIC:
            return fail("magic", f"image at 0x{flash_offset:x} has invalid magic byte (nothing flashed here?)", 0)
        return truncated(IMAGE_HEADER_LAYOUT.size, "the image header")
    header = ImageHeader.parse(buf)

    # verify_image_header
    if header.magic != IMAGE_MAGIC:
        return fail("magic", f"image at 0x{flash_offset:x} has invalid magic byte (nothing flashed here?)", 0)
    if header.chip_id != target.image_chip_id:
        return fail(
            "chip_id",
            f"mismatch chip ID, expected {target.image_chip_id}, found {header.chip_id}",
            IMAGE_HEADER_LAYOUT.offset_of("chip_id"),
            "boot_comm",
        )
    if chip_revision is not None:
        lo, hi = header.min_chip_rev_full, header.max_chip_rev_full
        if chip_revision < lo:
            return fail(
                "chip_rev",
                f"chip revision check failed. Required >= v{lo // 100}.{lo % 100}, "
                f"found v{chip_revision // 100}.{chip_revision % 100}.",
                IMAGE_HEADER_LAYOUT.offset_of("min_chip_rev_full"),
                "boot_comm",
            )
        if hi not in (0, 0xFFFF) and chip_revision > hi:  # IS_FIELD_SET(max_rev)
            return fail(
                "chip_rev",
                f"chip revision check failed. Required <= v{hi // 100}.{hi % 100}, "
                f"found v{chip_revision // 100}.{chip_revision % 100}.",
                IMAGE_HEADER_LAYOUT.offset_of("max_chip_rev_full"),
                "boot_comm",
            )
    if header.segment_count > MAX_SEGMENTS:
        return fail(
            "segment_count",
            f"image at 0x{flash_offset:x} segment count {header.segment_count} exceeds max {MAX_SEGMENTS}",
            IMAGE_HEADER_LAYOUT.offset_of("segment_count"),
        )

    # process_segments
    page = target.mmu_page_size
    checksum = CHECKSUM_INITIAL
    pos = IMAGE_HEADER_LAYOUT.size
    for index in range(header.segment_count):
        if pos + SEGMENT_HEADER_LAYOUT.size > len(buf):
            return truncated(pos + SEGMENT_HEADER_LAYOUT.size, f"the header of segment {index}")
        seg = SEGMENT_HEADER_LAYOUT.unpack(buf, pos)
        load_addr, data_len = seg["load_addr"], seg["data_len"]
        data_addr = flash_offset + pos + SEGMENT_HEADER_LAYOUT.size
        if data_len & 3 or data_len >= MAX_SEGMENT_LEN:
            return fail("segment", f"invalid segment length 0x{data_len:x}", pos + 4)
        if is_flash_mapped(load_addr, target) and data_addr % page != load_addr % page:
            return fail(
                "segment",
                f"Segment {index} load address 0x{load_addr:08x}, doesn't match data 0x{data_addr:08x}",
                pos,
            )
        start = pos + SEGMENT_HEADER_LAYOUT.size
        if start + data_len > len(buf):
            return truncated(start + data_len, f"segment {index}")
        checksum = esp_checksum(memoryview(buf)[start : start + data_len], checksum)
        pos = start + data_len

    # process_checksum
    block = _checksum_block_len(pos)
    if pos + block > len(buf):
        return truncated(pos + block, "the checksum block")
    read_checksum = buf[pos + block - 1]
    if read_checksum != checksum:
        return fail("checksum", f"Checksum failed. Calculated 0x{checksum:x} read 0x{read_checksum:x}", pos + block - 1)
    hashed_end = pos + block

    # process_appended_hash_and_sig
    image_length = hashed_end + (DIGEST_LEN if header.hash_appended else 0)
    if header.hash_appended and image_length > len(buf):
        return truncated(image_length, "the appended SHA-256")
    result.image_length = image_length
    if partition_size is not None and image_length > partition_size:
        return fail(
            "partition",
            f"Image length {image_length} doesn't fit in partition length {partition_size}",
            None,
        )

    # verify_simple_hash
    if header.hash_appended and hashlib.sha256(buf[:hashed_end]).digest() != buf[hashed_end:image_length]:
        return fail("sha256", "Image hash failed - image is corrupt", hashed_end)
    return result


__all__ = [
    "CHECKSUM_INITIAL",
    "DIGEST_LEN",
    "FLASH_FREQ_NIBBLES",
    "FLASH_MAP_WINDOW",
    "FLASH_SIZE_NIBBLES",
    "IMAGE_HEADER_LAYOUT",
    "IMAGE_MAGIC",
    "LOADABLE_MIN_ADDR",
    "MAX_SEGMENTS",
    "MAX_SEGMENT_LEN",
    "SEGMENT_HEADER_LAYOUT",
    "SPI_MODES",
    "EspImage",
    "ImageHeader",
    "ImageProblem",
    "ImageVerification",
    "Segment",
    "build_app_image",
    "build_image",
    "esp_checksum",
    "is_flash_mapped",
    "verify_image",
]

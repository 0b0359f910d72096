"""The application descriptor, ``esp_app_desc_t``.

Every ESP-IDF app carries one 256-byte descriptor at the very start of its first
(DROM) segment, i.e. at file offset :data:`APP_DESC_OFFSET` = 0x20 (24-byte image
header + 8-byte segment header). The bootloader reads ``secure_version`` from it for
anti-rollback, ``esp_ota_get_partition_description()`` reads it at that fixed offset,
and ``esptool image-info`` prints it as "Application Information".

Source: esp-idf ``components/esp_app_format/include/esp_app_desc.h``
(``esp_app_desc_t``, ``ESP_APP_DESC_MAGIC_WORD``); esptool ``esptool/cmds.py``
``_parse_app_info`` (``"<II8s32s32s16s16s32s32sHHB3s72s"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rig.firmware.errors import FirmwareFormatError
from rig.firmware.layout import Field, Layout, cstr, cstr_field

APP_DESC_MAGIC = 0xABCD5432
"""``ESP_APP_DESC_MAGIC_WORD`` (esp_app_desc.h)."""

APP_DESC_OFFSET = 0x20
"""File offset of the descriptor in an app image: ``sizeof(esp_image_header_t)`` (24)
+ ``sizeof(esp_image_segment_header_t)`` (8) — what ``esp_ota_get_partition_description``
and ``esp_https_ota_get_img_desc`` read."""

APP_DESC_LAYOUT = Layout(
    "esp_app_desc_t",
    [
        Field("magic_word", "I", "ESP_APP_DESC_MAGIC_WORD, 0xABCD5432"),
        Field("secure_version", "I", "anti-rollback version (CONFIG_BOOTLOADER_APP_SECURE_VERSION)"),
        Field("reserv1", "8s", "uint32_t reserv1[2]"),
        Field("version", "32s", "char[32], PROJECT_VER"),
        Field("project_name", "32s", "char[32], PROJECT_NAME"),
        Field("time", "16s", "char[16], __TIME__ of the build"),
        Field("date", "16s", "char[16], __DATE__ of the build"),
        Field("idf_ver", "32s", "char[32], IDF_VER"),
        Field("app_elf_sha256", "32s", "SHA-256 of the app ELF (esptool patches it in at 0xB0)"),
        Field("min_efuse_blk_rev_full", "H", "minimal eFuse block revision, major*100+minor"),
        Field("max_efuse_blk_rev_full", "H", "maximal eFuse block revision, major*100+minor"),
        Field("mmu_page_size", "B", "log2 of the flash MMU page size (ESP-IDF >= 5.4), 0 = unset"),
        Field("reserv3", "3s", "uint8_t reserv3[3] (newer ESP-IDF puts spi_flash_mode in byte 0)"),
        Field("reserv2", "72s", "uint32_t reserv2[18]"),
    ],
    source="esp-idf components/esp_app_format/include/esp_app_desc.h",
)
assert APP_DESC_LAYOUT.size == 256, "esp_app_desc_t is 256 bytes"

_STRINGS = ("version", "project_name", "time", "date", "idf_ver")
_RESERVED = {"reserv1": 8, "reserv3": 3, "reserv2": 72}


@dataclass(frozen=True)
class AppDescriptor:
    """One ``esp_app_desc_t``, with the fields a test or a report cares about.

    The strings are what ESP-IDF prints (up to the first NUL). The reserved areas are
    kept as read so that :meth:`parse` followed by :meth:`to_bytes` gives back the same
    256 bytes for any descriptor ESP-IDF writes (NUL-padded UTF-8 strings). Defaults are
    fixed values, not "now", so the rig's builds are reproducible.
    """

    version: str = "1.0.0"
    project_name: str = "rig_app"
    secure_version: int = 0
    time: str = "00:00:00"
    date: str = "Jan  1 2025"
    idf_ver: str = "v5.4.1"
    app_elf_sha256: bytes = bytes(32)
    min_efuse_blk_rev_full: int = 0
    max_efuse_blk_rev_full: int = 199
    mmu_page_size: int = 16
    reserv1: bytes = field(default=bytes(8), repr=False)
    reserv3: bytes = field(default=bytes(3), repr=False)
    reserv2: bytes = field(default=bytes(72), repr=False)

    def __post_init__(self) -> None:
        if len(self.app_elf_sha256) != 32:
            raise ValueError(f"app_elf_sha256 must be 32 bytes, got {len(self.app_elf_sha256)}")
        for name, size in _RESERVED.items():
            if len(getattr(self, name)) != size:
                raise ValueError(f"{name} must be {size} bytes, got {len(getattr(self, name))}")
        if not 0 <= self.secure_version <= 0xFFFFFFFF:
            raise ValueError(f"secure_version {self.secure_version} does not fit the uint32_t field")
        for name in ("min_efuse_blk_rev_full", "max_efuse_blk_rev_full"):
            if not 0 <= getattr(self, name) <= 0xFFFF:
                raise ValueError(f"{name} {getattr(self, name)} does not fit the uint16_t field")
        if not 0 <= self.mmu_page_size <= 0xFF:
            raise ValueError(f"mmu_page_size is log2 of the page size (16 for 64 KB), got {self.mmu_page_size}")
        for name in _STRINGS:  # fail at construction, not later in to_bytes()
            cstr_field(getattr(self, name), APP_DESC_LAYOUT.field(name).size, f"app descriptor {name}")

    @property
    def elf_sha256_hex(self) -> str:
        """The ELF SHA-256 as lower-case hex, as ``esptool image-info`` prints it."""
        return self.app_elf_sha256.hex()

    def to_bytes(self) -> bytes:
        """The 256-byte ``esp_app_desc_t``."""
        values: dict[str, object] = {
            "magic_word": APP_DESC_MAGIC,
            "secure_version": self.secure_version,
            "app_elf_sha256": self.app_elf_sha256,
            "min_efuse_blk_rev_full": self.min_efuse_blk_rev_full,
            "max_efuse_blk_rev_full": self.max_efuse_blk_rev_full,
            "mmu_page_size": self.mmu_page_size,
            **{name: getattr(self, name) for name in _RESERVED},
        }
        for name in _STRINGS:
            values[name] = cstr_field(getattr(self, name), APP_DESC_LAYOUT.field(name).size, f"app descriptor {name}")
        return APP_DESC_LAYOUT.pack(values)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, offset: int = 0, what: str = "app descriptor") -> AppDescriptor:
        """Read the descriptor at *offset* of *data* (for an app image file, offset 0x20).

        A short buffer or a wrong magic word is a :class:`FirmwareFormatError` naming
        the offset.
        """
        raw = APP_DESC_LAYOUT.unpack(data, offset, what=what)
        if raw["magic_word"] != APP_DESC_MAGIC:
            raise FirmwareFormatError(
                what,
                f"magic word is 0x{raw['magic_word']:08x}, esp_app_desc_t needs 0x{APP_DESC_MAGIC:08x}",
                offset,
                "an ESP-IDF app image has its descriptor at file offset 0x20, the start of the first (DROM) "
                "segment; this is not an app image, or not built by ESP-IDF",
            )
        try:
            return cls._from_fields(raw)
        except ValueError as exc:  # e.g. a char array with no terminating NUL
            raise FirmwareFormatError(what, str(exc), offset, "the descriptor is corrupt") from exc

    @classmethod
    def _from_fields(cls, raw: dict[str, Any]) -> AppDescriptor:
        return cls(
            version=cstr(raw["version"]),
            project_name=cstr(raw["project_name"]),
            secure_version=raw["secure_version"],
            time=cstr(raw["time"]),
            date=cstr(raw["date"]),
            idf_ver=cstr(raw["idf_ver"]),
            app_elf_sha256=raw["app_elf_sha256"],
            min_efuse_blk_rev_full=raw["min_efuse_blk_rev_full"],
            max_efuse_blk_rev_full=raw["max_efuse_blk_rev_full"],
            mmu_page_size=raw["mmu_page_size"],
            reserv1=raw["reserv1"],
            reserv3=raw["reserv3"],
            reserv2=raw["reserv2"],
        )


__all__ = ["APP_DESC_LAYOUT", "APP_DESC_MAGIC", "APP_DESC_OFFSET", "AppDescriptor"]

"""The ESP-IDF 2nd-stage bootloader of the virtual ESP32-C3, emulated over its flash.

What the ROM loads from flash offset 0 on a real board is ESP-IDF's bootloader; here
:func:`run_bootloader` plays its part once the serial side's emulated ROM has printed
its banner. It follows ESP-IDF v5.4 step by step and prints the lines the real one
prints (ESP-IDF log format, tags ``boot``, ``boot.esp32c3``, ``boot_comm``,
``esp_image``, ``secure_boot_v2``, ``efuse``, ``flash_parts``):

1. banner, chip and eFuse block revision, the bootloader image's own chip check, SPI
   settings (``bootloader_init.c``, ``bootloader_esp32c3.c``,
   ``bootloader_flash_config_esp32c3.c``);
2. the partition table (``bootloader_utility_load_partition_table``,
   ``flash_partitions.c`` ``esp_partition_table_verify``);
3. the boot slot (``bootloader_utility_get_selected_boot_partition``): PENDING_VERIFY
   entries become ABORTED (app rollback), the active otadata entry is chosen among
   those whose app passes the anti-rollback check, NEW becomes PENDING_VERIFY, a VALID
   entry raises the eFuse ``SECURE_VERSION`` to its app's;
4. the image checks of ``esp_image_format.c`` ``image_load`` in ESP-IDF's order (magic,
   chip id and revision, segment count, per-segment header and load-address checks,
   eFuse block revision, checksum, length, SHA-256 or the Secure Boot V2 signature),
   walking back from the selected slot to the factory app, then forward through the
   other OTA slots, then the test app (``bootloader_utility_load_boot_image``);
5. ``set_actual_ota_seq`` when otadata was blank, ``load_image``'s Secure Boot and
   RNG lines, or "No bootable app partitions in the partition table".

Configuration. A real bootloader is compiled with its project's sdkconfig; this one
behaves as built with the rig's virtual firmware set's (``rig.firmware.virtual_set``:
``CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE``, ``CONFIG_BOOTLOADER_APP_ANTI_ROLLBACK`` with
a 16-bit field, ``CONFIG_BOOTLOADER_COMPILE_TIME_DATE``), see :class:`BootloaderConfig`.
Two choices differ from a single compiled binary, on purpose:

* **Partition table offset.** ``CONFIG_PARTITION_TABLE_OFFSET`` is compiled into the
  real bootloader. The emulation looks at 0xC000 (RainMaker's offset, and the virtual
  set's) first and at 0x8000 (ESP-IDF's default) second, and uses the first offset that
  holds a table ``esp_partition_table_verify`` accepts with at least one partition —
  i.e. it behaves as the bootloader built for whichever layout was flashed. With
  neither, it behaves as built for 0xC000 (an erased sector is an empty table there;
  anything else, ESP-IDF's errors). :attr:`BootloaderConfig.partition_table_offset`
  pins one.
* **Secure Boot V2.** When the eFuse ``SECURE_BOOT_EN`` is burned the bootloader behaves
  as a Secure Boot V2 (RSA-3072) build after its first boot: every app must carry a
  signature block whose key digest is one of the unrevoked eFuse ``SECURE_BOOT_DIGESTn``
  (``secure_boot_signatures_bootloader.c``). Without it, it behaves as a build without
  ``CONFIG_SECURE_BOOT`` (the appended SHA-256 is checked, signatures are not). The
  first-boot *enabling* (``esp_secure_boot_v2_permanently_enable`` burning digests) is
  not emulated: a lab enables Secure Boot through espefuse, as on hardware it would
  before shipping.

Flash encryption is not emulated (no ``Checking flash encryption...``). Every otadata
change is written back the way ESP-IDF's ``write_otadata`` does it: erase the 4 KB
sector, program the 32-byte entry.

When nothing is bootable ESP-IDF calls ``bootloader_reset()`` →
``esp_rom_software_reset_system()``: the chip resets at once (``rst:0x3
(RTC_SW_SYS_RST)``), the ROM runs the bootloader again, and so on — a boot loop.
:class:`BootOutcome` reports it as ``halted`` with :data:`RESET_RTC_SW_SYS`; the board
performs the reset.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from rig.firmware.app_desc import APP_DESC_LAYOUT, APP_DESC_MAGIC, APP_DESC_OFFSET, AppDescriptor
from rig.firmware.behaviour import BehaviourManifest
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.image import (
    CHECKSUM_INITIAL,
    DIGEST_LEN,
    IMAGE_HEADER_LAYOUT,
    IMAGE_MAGIC,
    LOADABLE_MIN_ADDR,
    MAX_SEGMENT_LEN,
    MAX_SEGMENTS,
    SEGMENT_HEADER_LAYOUT,
    ImageHeader,
    esp_checksum,
    is_flash_mapped,
)
from rig.firmware.layout import Field, Layout, cstr
from rig.firmware.otadata import OtaDataPartition, OtaSelectEntry, OtaState
from rig.firmware.partition_table import (
    MD5_ENTRY_LAYOUT,
    MD5_MAGIC,
    PARTITION_ENTRY_LAYOUT,
    PARTITION_MAGIC,
    TABLE_MAX_ENTRIES,
    TABLE_MAX_LEN,
)
from rig.firmware.secure_boot_v2 import SECTOR_SIZE as SIGNATURE_SECTOR_SIZE
from rig.firmware.secure_boot_v2 import verify_signed_image
from rig.firmware.virtual_set import IDF_VERSION
from rig.targets.esp32c3 import ESP32C3
from rig.vboard.console import BoardConsole, LogLevel
from rig.vboard.efuse import EfuseError
from rig.vboard.flash import SECTOR_SIZE, FlashError, FlashStorage

__all__ = [
    "DEFAULT_CONFIG",
    "PARTITION_TABLE_OFFSETS",
    "RESET_RTC_SW_CPU",
    "RESET_RTC_SW_SYS",
    "BootEfuses",
    "BootOutcome",
    "BootloaderConfig",
    "EfuseFieldReader",
    "LogMessage",
    "PartitionEntry",
    "RomReset",
    "SlotRejection",
    "efuse_block_revision",
    "efuse_uint",
    "find_partition_table",
    "read_otadata",
    "run_bootloader",
    "select_otadata",
    "update_secure_version",
    "verify_app_partition",
    "write_otadata_entry",
]


# =========================================================================== the eFuses it reads


class BootEfuses(Protocol):
    """What the bootloader and the app's OTA code need from the board's eFuses.

    ``rig.vboard.efuse.EfuseController`` provides it; values are as ESP-IDF reads them
    (``esp_efuse_read_secure_version``: the popcount of the thermometer-coded field).
    """

    @property
    def secure_version(self) -> int:
        """EFUSE_BLK0 ``SECURE_VERSION`` as a number (count of burned bits)."""
        ...

    def raise_secure_version(self, version: int) -> None:
        """Burn bits so that :attr:`secure_version` becomes *version* (never lowers it)."""
        ...

    @property
    def secure_boot_enabled(self) -> bool:
        """``SECURE_BOOT_EN``."""
        ...

    def secure_boot_digests(self) -> list[bytes | None]:
        """``SECURE_BOOT_DIGEST0..2``: the key block holding each purpose, or None."""
        ...

    @property
    def revoked_digest_slots(self) -> set[int]:
        """Slots whose ``SECURE_BOOT_KEY_REVOKEn`` is burned."""
        ...

    @property
    def chip_revision(self) -> tuple[int, int]:
        """``(major, minor)`` wafer version, e.g. ``(0, 4)``."""
        ...


@runtime_checkable
class EfuseFieldReader(Protocol):
    """Optional: read any eFuse by espefuse's name (``EfuseController.field``). The
    bootloader uses it for ``BLK_VERSION_MAJOR``/``MINOR`` and
    ``DISABLE_WAFER_VERSION_MAJOR``, so what it prints agrees with ``espefuse summary``."""

    def field(self, name: str) -> int | bytes: ...


def efuse_uint(efuse: object, name: str, default: int = 0) -> int:
    """eFuse *name* as an int when *efuse* can read fields by name, else *default*."""
    if isinstance(efuse, EfuseFieldReader):
        value = efuse.field(name)
        return value if isinstance(value, int) else int.from_bytes(value, "little")
    return default


def efuse_block_revision(efuse: object) -> tuple[int, int]:
    """``efuse_hal_blk_version()`` as (major, minor): ``BLK_VERSION_MAJOR``/``MINOR``."""
    return efuse_uint(efuse, "BLK_VERSION_MAJOR"), efuse_uint(efuse, "BLK_VERSION_MINOR")


# =========================================================================== messages


@dataclass(frozen=True)
class LogMessage:
    """One ESP-IDF log statement: level, tag and its format (``str.format`` fields)."""

    level: LogLevel
    tag: str
    text: str

    def format(self, **values: object) -> str:
        return self.text.format(**values)


TAG_BOOT = "boot"              # bootloader_init.c, bootloader_utility.c
TAG_BOOT_CHIP = "boot.esp32c3"  # bootloader_esp32c3.c, bootloader_flash_config_esp32c3.c
TAG_BOOT_COMM = "boot_comm"     # bootloader_common_loader.c
TAG_IMAGE = "esp_image"         # esp_image_format.c
TAG_SBV2 = "secure_boot_v2"     # secure_boot_v2/secure_boot.c
TAG_EFUSE = "efuse"             # efuse/src/esp_efuse_fields.c, esp_efuse_utility.c
TAG_PARTS = "flash_parts"       # flash_partitions.c


class Msg:
    """Every line the bootloader prints, in one place, with the ESP-IDF source it comes from."""

    # bootloader_init.c bootloader_print_banner / bootloader_check_bootloader_validity / enable_random
    BANNER = LogMessage("I", TAG_BOOT, "ESP-IDF {idf_ver} 2nd stage bootloader")
    COMPILE_TIME = LogMessage("I", TAG_BOOT, "compile time {date_time}")
    CHIP_REV = LogMessage("I", TAG_BOOT, "chip revision: v{major}.{minor}")
    BLOCK_REV = LogMessage("I", TAG_BOOT, "efuse block revision: v{major}.{minor}")
    RNG_ON = LogMessage("I", TAG_BOOT, "Enabling RNG early entropy source...")
    # bootloader_flash_config_esp32c3.c print_flash_info
    SPI_SPEED = LogMessage("I", TAG_BOOT_CHIP, "SPI Speed      : {speed}")
    SPI_MODE = LogMessage("I", TAG_BOOT_CHIP, "SPI Mode       : {mode}")
    SPI_SIZE = LogMessage("I", TAG_BOOT_CHIP, "SPI Flash Size : {size}")
    # bootloader_common_loader.c bootloader_common_check_chip_validity / _check_efuse_blk_validity
    CHIP_ID = LogMessage("E", TAG_BOOT_COMM, "mismatch chip ID, expected {expected}, found {found}")
    CHIP_MIN = LogMessage("E", TAG_BOOT_COMM, "Image requires chip rev >= v{rmaj}.{rmin}, but chip is v{major}.{minor}")
    CHIP_MAX = LogMessage("E", TAG_BOOT_COMM, "Image requires chip rev <= v{rmaj}.{rmin}, but chip is v{major}.{minor}")
    BLK_MIN = LogMessage("E", TAG_BOOT_COMM,
                         "Image requires efuse blk rev >= v{rmaj}.{rmin}, but chip is v{major}.{minor}")
    BLK_MAX = LogMessage("E", TAG_BOOT_COMM,
                         "Image requires efuse blk rev <= v{rmaj}.{rmin}, but chip is v{major}.{minor}")
    # flash_partitions.c esp_partition_table_verify
    PART_SIZE = LogMessage("E", TAG_PARTS, "partition {index} invalid - offset 0x{offset:x} size 0x{size:x} "
                                           "exceeds flash chip size 0x{chip:x}")
    PART_MD5_TWICE = LogMessage("E", TAG_PARTS, "Only one MD5 checksum is allowed")
    PART_MD5_BAD = LogMessage("E", TAG_PARTS, "Incorrect MD5 checksum")
    PART_MAGIC = LogMessage("E", TAG_PARTS, "partition {index} invalid magic number 0x{magic:x}")
    PART_NO_END = LogMessage("E", TAG_PARTS, "partition table has no terminating entry, not valid")
    # bootloader_utility.c bootloader_utility_load_partition_table, bootloader_start.c
    TABLE_VERIFY_FAILED = LogMessage("E", TAG_BOOT, "Failed to verify partition table")
    TABLE_LOAD_ERROR = LogMessage("E", TAG_BOOT, "load partition table error!")
    TABLE_HEAD = LogMessage("I", TAG_BOOT, "Partition Table:")
    TABLE_COLUMNS = LogMessage("I", TAG_BOOT, "## Label            Usage          Type ST Offset   Length")
    TABLE_ROW = LogMessage("I", TAG_BOOT, "{index:2d} {label:<16} {usage:<16} {type:02x} {subtype:02x} "
                                          "{offset:08x} {size:08x}")
    TABLE_END = LogMessage("I", TAG_BOOT, "End of partition table")
    # bootloader_utility.c bootloader_utility_get_selected_boot_partition
    OTADATA_SMALL = LogMessage("E", TAG_BOOT, "ota_info partition size {size} is too small (minimum {minimum} bytes)")
    DEFAULT_FACTORY = LogMessage("I", TAG_BOOT, "Defaulting to factory image")
    NO_FACTORY = LogMessage("I", TAG_BOOT, "No factory image, trying OTA 0")
    ANTI_ROLLBACK_ON = LogMessage("I", TAG_BOOT, "Enabled a check secure version of app for anti rollback")
    EFUSE_SECURE_VERSION = LogMessage("I", TAG_BOOT, "Secure version (from eFuse) = {version}")
    OTADATA_INITIAL = LogMessage("I", TAG_BOOT, "otadata[0..1] in initial state")
    OTADATA_TO_FACTORY = LogMessage("E", TAG_BOOT, "ota data partition invalid, falling back to factory")
    OTADATA_TRY_ALL = LogMessage("E", TAG_BOOT, "ota data partition invalid and no factory, will try all partitions")
    NO_PARTITION_DESC = LogMessage("E", TAG_BOOT, "Failed to get partition description {err}")
    WRITE_OTADATA_FAILED = LogMessage("E", TAG_BOOT, "Error in write_otadata operation. err = 0x{err:x}")
    # bootloader_utility.c load_boot_image / try_load_partition / set_actual_ota_seq / log_invalid_app_partition
    LOADED = LogMessage("I", TAG_BOOT, "Loaded app from partition at offset 0x{offset:x}")
    SET_OTA_SEQ = LogMessage("I", TAG_BOOT, "Set actual ota_seq={seq} in otadata[0]")
    FACTORY_NOT_BOOTABLE = LogMessage("E", TAG_BOOT, "Factory app partition is not bootable")
    TEST_NOT_BOOTABLE = LogMessage("E", TAG_BOOT, "Factory test app partition is not bootable")
    OTA_NOT_BOOTABLE = LogMessage("E", TAG_BOOT, "OTA app partition slot {slot} is not bootable")
    TEST_FALLBACK = LogMessage("W", TAG_BOOT, "Falling back to test app as only bootable partition")
    NOTHING_BOOTABLE = LogMessage("E", TAG_BOOT, "No bootable app partitions in the partition table")
    # bootloader_utility.c load_image, secure_boot_v2/secure_boot.c esp_secure_boot_v2_permanently_enable
    SB_ENABLING = LogMessage("I", TAG_SBV2, "enabling secure boot v2...")
    SB_ALREADY = LogMessage("I", TAG_SBV2, "secure boot v2 is already enabled, continuing..")
    RNG_OFF = LogMessage("I", TAG_BOOT, "Disabling RNG early entropy source...")
    # esp_image_format.c
    PART_TOO_BIG = LogMessage("E", TAG_IMAGE, "partition size 0x{size:x} invalid, larger than 16MB")
    FLASH_READ = LogMessage("E", TAG_IMAGE, "bootloader_flash_read failed at 0x{addr:08x}")
    MMAP_FAILED = LogMessage("E", TAG_IMAGE, "bootloader_mmap(0x{addr:x}, 0x{size:x}) failed")
    BAD_MAGIC = LogMessage("E", TAG_IMAGE, "image at 0x{addr:x} has invalid magic byte (nothing flashed here?)")
    SEGMENT_COUNT = LogMessage("E", TAG_IMAGE, "image at 0x{addr:x} segment count {count} exceeds max {max}")
    SEGMENT_LENGTH = LogMessage("E", TAG_IMAGE, "invalid segment length 0x{length:x}")
    SEGMENT_MAP = LogMessage("E", TAG_IMAGE, "Segment {index} load address 0x{load:08x}, doesn't match data 0x{data:08x}")
    SEGMENT = LogMessage("I", TAG_IMAGE, "segment {index}: paddr={paddr:08x} vaddr={vaddr:08x} size={size:05x}h "
                                         "({size:6d}) {kind}")
    SEGMENT_ADDR = LogMessage("E", TAG_IMAGE, "Segment {index} 0x{start:08x}-0x{end:08x} invalid: {reason}")
    WRAPPED = LogMessage("E", TAG_IMAGE, "image offset has wrapped")
    CHECKSUM = LogMessage("E", TAG_IMAGE, "Checksum failed. Calculated 0x{calc:x} read 0x{read:x}")
    TOO_LONG = LogMessage("E", TAG_IMAGE, "Image length {length} doesn't fit in partition length {size}")
    VERIFY_SIG = LogMessage("I", TAG_IMAGE, "Verifying image signature...")
    SIG_FAILED = LogMessage("E", TAG_IMAGE, "Secure boot signature verification failed")
    SIMPLE_HASH = LogMessage("I", TAG_IMAGE, "Calculating simple hash to check for corruption...")
    CORRUPTED = LogMessage("W", TAG_IMAGE, "image corrupted on flash")
    SIG_BAD = LogMessage("W", TAG_IMAGE, "image valid, signature bad")
    HASH_FAILED = LogMessage("E", TAG_IMAGE, "Image hash failed - image is corrupt")
    # esp_efuse_fields.c esp_efuse_update_secure_version, esp_efuse_utility.c burn/check
    SECVER_MAX = LogMessage("E", TAG_EFUSE, "Max secure version is {size}. Given {version} version can not be written.")
    BURN_BLOCK = LogMessage("I", TAG_EFUSE, "BURN BLOCK{block}")
    BURN_OK_EQUAL = LogMessage("I", TAG_EFUSE, "BURN BLOCK{block} - OK (write block == read block)")
    BURN_OK_BITS = LogMessage("I", TAG_EFUSE, "BURN BLOCK{block} - OK (all write block bits are set)")
    BURN_ERROR = LogMessage("E", TAG_EFUSE, "BURN BLOCK{block} - ERROR (written bits != read bits)")
    ANTI_ROLLBACK_SET = LogMessage("I", TAG_EFUSE, "Anti-rollback is set. eFuse field is updated({version}).")
    ANTI_ROLLBACK_LOWER = LogMessage("E", TAG_EFUSE, "Anti-rollback is not set. secure_version of app is lower "
                                                     "that eFuse field({efuse}).")


def _emit(console: BoardConsole, message: LogMessage, **values: object) -> None:
    console.log(message.level, message.tag, message.format(**values))


# =========================================================================== constants


@dataclass(frozen=True)
class RomReset:
    """A reset reason as the ESP32-C3 ROM prints it: ``rst:0x{code:x} ({name})``.

    Source: esp-idf ``components/soc/esp32c3/include/soc/reset_reasons.h`` and the ROM
    banner (``rst:0xc (RTC_SW_CPU_RST)`` after ``esp_restart()``/a panic; ``rst:0x3
    (RTC_SW_SYS_RST)`` after ``esp_rom_software_reset_system()``).
    """

    code: int
    name: str

    def banner_text(self) -> str:
        return f"rst:0x{self.code:x} ({self.name})"


RESET_RTC_SW_SYS = RomReset(0x3, "RTC_SW_SYS_RST")
"""``bootloader_reset()`` → ``esp_rom_software_reset_system()`` (nothing bootable, bad table)."""
RESET_RTC_SW_CPU = RomReset(0xC, "RTC_SW_CPU_RST")
"""``esp_restart()`` and the panic handler → ``esp_rom_software_reset_cpu(0)`` on ESP32-C3."""

PARTITION_TABLE_OFFSETS = (0xC000, 0x8000)
"""Where :func:`find_partition_table` looks, in order: RainMaker's and the virtual set's
``CONFIG_PARTITION_TABLE_OFFSET``, then ESP-IDF's default."""

FACTORY_INDEX = -1    # bootloader_config.h
TEST_APP_INDEX = -2
INVALID_INDEX = -99
MAX_OTA_SLOTS = 16

SIXTEEN_MB = 0x1000000

# esp_err_t values the bootloader prints with %d (esp_err.h)
ESP_FAIL = -1
ESP_ERR_INVALID_ARG = 0x102
ESP_ERR_NOT_FOUND = 0x105
ESP_ERR_FLASH_OP_FAIL = 0x4001
# print_flash_info (bootloader_flash_config_esp32c3.c): header nibbles → text
_SPI_SPEED = {0x0: "40MHz", 0x1: "26.7MHz", 0x2: "20MHz", 0xF: "80MHz"}
_SPI_MODE = {0: "QIO", 1: "QOUT", 2: "DIO", 3: "DOUT", 4: "FAST READ"}
_SPI_SIZE = {0: "1MB", 1: "2MB", 2: "4MB", 3: "8MB", 4: "16MB"}
_SPI_SIZE_BYTES = {0: 1 << 20, 1: 2 << 20, 2: 4 << 20, 3: 8 << 20, 4: 16 << 20, 5: 32 << 20, 6: 64 << 20,
                   7: 128 << 20}

# ESP32-C3 memory map (esp-idf components/soc/esp32c3/include/soc/soc.h)
_DRAM = (0x3FC80000, 0x3FCE0000)        # SOC_DRAM_LOW/HIGH, also SOC_DIRAM_DRAM_LOW/HIGH
_IRAM = (0x4037C000, 0x403E0000)        # SOC_IRAM_LOW/HIGH
_DIRAM_IRAM = (0x40380000, 0x403E0000)  # SOC_DIRAM_IRAM_LOW/HIGH
_RTC_FAST = (0x50000000, 0x50002000)    # SOC_RTC_IRAM/DRAM_LOW/HIGH
_BOOTLOADER_STACK = (0x3FCDCB70 - 0x8000, 0x3FCEBF10)
"""What ``verify_load_addresses`` calls the bootloader stack: SP (the top of the
bootloader's usable DRAM, ``bootloader_usable_dram_end`` in esp32c3 ``bootloader.ld``)
minus ``STACK_LOAD_HEADROOM`` (32 KB) up to ``SOC_ROM_STACK_START``."""

# esp_bootloader_desc_t (esp-idf components/esp_bootloader_format/include/esp_bootloader_desc.h)
BOOTLOADER_DESC_MAGIC = 0x50
BOOTLOADER_DESC_LAYOUT = Layout(
    "esp_bootloader_desc_t",
    [
        Field("magic_byte", "B", "ESP_BOOTLOADER_DESC_MAGIC_BYTE, 0x50"),
        Field("reserved", "2s", "reserved for IDF"),
        Field("secure_version", "B", "bootloader anti-rollback version"),
        Field("version", "I", "bootloader version"),
        Field("idf_ver", "32s", "IDF version string"),
        Field("date_time", "24s", "compile date and time"),
        Field("reserved2", "16s", "reserved for IDF"),
    ],
    source="esp-idf components/esp_bootloader_format/include/esp_bootloader_desc.h",
)


# =========================================================================== configuration


@dataclass(frozen=True)
class BootloaderConfig:
    """The sdkconfig the emulated bootloader behaves as built with.

    Defaults are the rig's virtual firmware set's (``rig.firmware.virtual_set.SDKCONFIG``).
    ``idf_version``/``compile_time`` are printed when the bootloader image at flash 0x0
    carries no ``esp_bootloader_desc_t`` (the virtual set's bootloader does not).
    """

    rollback: bool = True                     # CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE
    anti_rollback: bool = True                # CONFIG_BOOTLOADER_APP_ANTI_ROLLBACK
    secure_version_bits: int = 16             # CONFIG_BOOTLOADER_APP_SEC_VER_SIZE_EFUSE_FIELD
    compile_time_date: bool = True            # CONFIG_BOOTLOADER_COMPILE_TIME_DATE
    idf_version: str = IDF_VERSION
    compile_time: str = "Nov 23 2026 12:00:00"
    partition_table_offset: int | None = None  # None: look at PARTITION_TABLE_OFFSETS


DEFAULT_CONFIG = BootloaderConfig()


# =========================================================================== partitions


_APP_TYPE, _DATA_TYPE, _BOOTLOADER_TYPE, _TABLE_TYPE = 0x00, 0x01, 0x02, 0x03
_SUBTYPE_FACTORY, _SUBTYPE_TEST, _OTA_FLAG, _OTA_MASK = 0x00, 0x20, 0x10, 0x0F
_DATA_USAGE = {0x00: "OTA data", 0x01: "RF data", 0x02: "WiFi data", 0x04: "NVS keys", 0x05: "efuse"}
_BOOTLOADER_USAGE = {0x00: "primary bootloader", 0x01: "ota bootloader", 0x02: "recovery bootloader"}
_TABLE_USAGE = {0x00: "primary partition_table", 0x01: "ota partition_table"}


@dataclass(frozen=True)
class PartitionEntry:
    """One ``esp_partition_info_t`` as the bootloader sees it (no gen_esp32part rules)."""

    index: int
    label: str
    type: int
    subtype: int
    offset: int
    size: int
    flags: int = 0

    @property
    def usage(self) -> str:
        """The "Usage" column of the bootloader's table (``bootloader_utility_load_partition_table``)."""
        if self.type == _APP_TYPE:
            if self.subtype == _SUBTYPE_FACTORY:
                return "factory app"
            if self.subtype == _SUBTYPE_TEST:
                return "test app"
            return "OTA app" if self.subtype & ~_OTA_MASK == _OTA_FLAG else "Unknown app"
        if self.type == _DATA_TYPE:
            return _DATA_USAGE.get(self.subtype, "Unknown data")
        if self.type == _BOOTLOADER_TYPE:
            return _BOOTLOADER_USAGE.get(self.subtype, "unknown")
        if self.type == _TABLE_TYPE:
            return _TABLE_USAGE.get(self.subtype, "unknown")
        return "unknown"

    @property
    def ota_slot(self) -> int | None:
        if self.type == _APP_TYPE and self.subtype & ~_OTA_MASK == _OTA_FLAG:
            return self.subtype & _OTA_MASK
        return None

    @property
    def is_factory(self) -> bool:
        return self.type == _APP_TYPE and self.subtype == _SUBTYPE_FACTORY

    @property
    def is_test(self) -> bool:
        return self.type == _APP_TYPE and self.subtype == _SUBTYPE_TEST

    @property
    def is_otadata(self) -> bool:
        return self.type == _DATA_TYPE and self.subtype == 0x00


@dataclass(frozen=True)
class _TableCheck:
    entries: tuple[PartitionEntry, ...] | None
    error: tuple[LogMessage, dict[str, object]] | None


def _verify_table(raw: bytes, chip_size: int) -> _TableCheck:
    """``esp_partition_table_verify``: entries until the end marker, one MD5 entry, sizes in the chip."""
    entries: list[PartitionEntry] = []
    md5_found = False
    for index in range(TABLE_MAX_ENTRIES):
        at = index * PARTITION_ENTRY_LAYOUT.size
        entry = PARTITION_ENTRY_LAYOUT.unpack(raw, at)
        magic = entry["magic"]
        if magic == PARTITION_MAGIC:
            if entry["offset"] > chip_size or entry["offset"] + entry["size"] > chip_size:
                return _TableCheck(None, (Msg.PART_SIZE, {"index": index, "offset": entry["offset"],
                                                          "size": entry["size"], "chip": chip_size}))
            label = cstr(entry["label"])
            entries.append(PartitionEntry(len(entries), label, entry["type"], entry["subtype"], entry["offset"],
                                          entry["size"], entry["flags"]))
        elif magic == MD5_MAGIC:
            if md5_found:
                return _TableCheck(None, (Msg.PART_MD5_TWICE, {}))
            stored = raw[at + MD5_ENTRY_LAYOUT.offset_of("md5"): at + MD5_ENTRY_LAYOUT.size]
            if hashlib.md5(raw[:at]).digest() != stored:
                return _TableCheck(None, (Msg.PART_MD5_BAD, {}))
            md5_found = True
        elif magic == b"\xff\xff" and entry["type"] == 0xFF and entry["subtype"] == 0xFF:
            return _TableCheck(tuple(entries), None)
        else:
            return _TableCheck(None, (Msg.PART_MAGIC, {"index": index, "magic": int.from_bytes(magic, "little")}))
    return _TableCheck(None, (Msg.PART_NO_END, {}))


def find_partition_table(flash: FlashStorage, config: BootloaderConfig = DEFAULT_CONFIG,
                         chip_size: int | None = None) -> tuple[int, tuple[PartitionEntry, ...]] | None:
    """The first offset of :data:`PARTITION_TABLE_OFFSETS` (or the configured one) holding a
    table the bootloader accepts with at least one partition, and its entries; None when
    there is none. (An erased sector passes ``esp_partition_table_verify`` as an empty
    table, so emptiness decides which layout was flashed.)"""
    size = flash.size if chip_size is None else chip_size
    offsets = PARTITION_TABLE_OFFSETS if config.partition_table_offset is None else (config.partition_table_offset,)
    for offset in offsets:
        if offset + TABLE_MAX_LEN > flash.size:
            continue
        check = _verify_table(flash.read(offset, TABLE_MAX_LEN), size)
        if check.entries:
            return offset, check.entries
    return None


@dataclass
class _BootState:
    """``bootloader_state_t``: where factory, test, otadata and each OTA slot are."""

    partitions: tuple[PartitionEntry, ...]
    factory: PartitionEntry | None = None
    test: PartitionEntry | None = None
    otadata: PartitionEntry | None = None
    ota: list[PartitionEntry | None] = field(default_factory=lambda: [None] * MAX_OTA_SLOTS)
    app_count: int = 0

    @classmethod
    def from_entries(cls, entries: Sequence[PartitionEntry]) -> _BootState:
        state = cls(tuple(entries))
        for p in entries:
            if p.is_factory:
                state.factory = p
            elif p.is_test:
                state.test = p
            elif p.ota_slot is not None:
                state.ota[p.ota_slot] = p
                state.app_count += 1
            elif p.is_otadata:
                state.otadata = p
        return state

    def by_index(self, index: int) -> PartitionEntry | None:
        """``index_to_partition``."""
        if index == FACTORY_INDEX:
            return self.factory
        if index == TEST_APP_INDEX:
            return self.test
        if 0 <= index < MAX_OTA_SLOTS and index < self.app_count:
            return self.ota[index]
        return None


# =========================================================================== otadata


def read_otadata(flash: FlashStorage, otadata: PartitionEntry) -> OtaDataPartition:
    """The two ``esp_ota_select_entry_t`` (``read_otadata``: 32 bytes at the start of each sector)."""
    return OtaDataPartition([OtaSelectEntry.parse(flash.read(otadata.offset + i * SECTOR_SIZE, 32))
                             for i in range(2)])


def write_otadata_entry(flash: FlashStorage, otadata: PartitionEntry, index: int, entry: OtaSelectEntry) -> None:
    """``write_otadata`` / ``rewrite_ota_seq``: erase sector *index* of otadata, program the entry."""
    flash.erase(otadata.offset + index * SECTOR_SIZE, SECTOR_SIZE)
    flash.write(otadata.offset + index * SECTOR_SIZE, entry.to_bytes())


def select_otadata(entries: Sequence[OtaSelectEntry], usable: Sequence[bool]) -> int:
    """``bootloader_common_select_otadata(..., max=true)``: the usable entry with the higher seq (tie → 0)."""
    if usable[0] and usable[1]:
        return 0 if max(entries[0].ota_seq, entries[1].ota_seq) == entries[0].ota_seq else 1
    for i in range(2):
        if usable[i]:
            return i
    return -1


# =========================================================================== eFuse secure version


def _description(flash: FlashStorage, part: PartitionEntry | None) -> tuple[AppDescriptor | None, int]:
    """``bootloader_common_get_partition_description``: (descriptor, esp_err_t)."""
    if part is None or part.offset == 0:
        return None, ESP_ERR_INVALID_ARG
    try:
        raw = flash.read(part.offset + APP_DESC_OFFSET, APP_DESC_LAYOUT.size)
    except FlashError:
        return None, ESP_FAIL
    if int.from_bytes(raw[:4], "little") != APP_DESC_MAGIC:
        return None, ESP_ERR_NOT_FOUND
    try:
        return AppDescriptor.parse(raw), 0
    except FirmwareFormatError:
        return AppDescriptor(secure_version=int.from_bytes(raw[4:8], "little")), 0


def update_secure_version(efuse: BootEfuses, console: BoardConsole, version: int,
                          field_bits: int = DEFAULT_CONFIG.secure_version_bits) -> bool:
    """``esp_efuse_update_secure_version``: burn the eFuse up to *version* (only new bits).

    Returns False (and logs ESP-IDF's error) when *version* is lower than the eFuse or
    does not fit the field.
    """
    size = min(field_bits, ESP32C3.secure_version_bits)
    if size < version:
        _emit(console, Msg.SECVER_MAX, size=size, version=version)
        return False
    current = efuse.secure_version
    if current < version:
        had_other_bits = current > 0 or efuse.secure_boot_enabled
        _emit(console, Msg.BURN_BLOCK, block=0)
        try:
            efuse.raise_secure_version(version)
        except EfuseError:  # e.g. WR_DIS protects SECURE_VERSION: the bits do not change
            _emit(console, Msg.BURN_ERROR, block=0)
        else:
            _emit(console, Msg.BURN_OK_BITS if had_other_bits else Msg.BURN_OK_EQUAL, block=0)
        # esp_efuse_update_secure_version does not check esp_efuse_write_field_blob's result
        _emit(console, Msg.ANTI_ROLLBACK_SET, version=version)
    elif current > version:
        _emit(console, Msg.ANTI_ROLLBACK_LOWER, efuse=current)
        return False
    return True


# =========================================================================== image loading


@dataclass(frozen=True)
class SlotRejection:
    """Why the bootloader did not boot one app partition.

    ``code``: ``anti_rollback``, ``no_description``, ``flash_read``, ``magic``,
    ``chip_id``, ``chip_rev``, ``segment_count``, ``segment``, ``load_address``,
    ``efuse_blk_rev``, ``checksum``, ``length``, ``sha256``, ``signature``.
    ``message`` is the last line ESP-IDF printed for it (without prefix); for
    ``anti_rollback`` / ``no_description``, which ESP-IDF only reports as "is not
    bootable", a description.
    """

    partition: str
    offset: int
    code: str
    message: str


@dataclass(frozen=True)
class _Loaded:
    header: ImageHeader
    image_len: int
    secure_boot_verified: bool


class _ImageLog:
    """Prints an image check's lines unless *silent* (``ESP_IMAGE_VERIFY_SILENT``)."""

    def __init__(self, console: BoardConsole | None):
        self.console = console
        self.last: str = ""

    def __call__(self, message: LogMessage, **values: object) -> None:
        self.last = message.format(**values)
        if self.console is not None:
            self.console.log(message.level, message.tag, self.last)

    def raw(self, level: LogLevel, tag: str, text: str) -> None:
        self.last = text
        if self.console is not None:
            self.console.log(level, tag, text)


class _Reject(Exception):
    """Internal: an image check failed with *code* (the line is already logged)."""

    def __init__(self, code: str):
        super().__init__(code)
        self.code = code


def _read(flash: FlashStorage, addr: int, length: int) -> bytes | None:
    try:
        return flash.read(addr, length)
    except FlashError:
        return None


def _chip_validity(header: ImageHeader, efuse: BootEfuses, log: _ImageLog, application: bool) -> None:
    """``bootloader_common_check_chip_validity`` (the maximum is ignored when
    ``DISABLE_WAFER_VERSION_MAJOR`` is burned)."""
    chip = efuse.chip_revision
    if header.chip_id != ESP32C3.image_chip_id:
        log(Msg.CHIP_ID, expected=ESP32C3.image_chip_id, found=header.chip_id)
        raise _Reject("chip_id")
    major, minor = chip
    revision = major * 100 + minor
    low = header.min_chip_rev_full
    if low > revision:
        log(Msg.CHIP_MIN, rmaj=low // 100, rmin=low % 100, major=major, minor=minor)
        raise _Reject("chip_rev")
    high = header.max_chip_rev_full
    if (application and high not in (0, 0xFFFF) and revision > high
            and not efuse_uint(efuse, "DISABLE_WAFER_VERSION_MAJOR")):
        log(Msg.CHIP_MAX, rmaj=high // 100, rmin=high % 100, major=major, minor=minor)
        raise _Reject("chip_rev")


def _in(span: tuple[int, int], start: int, end: int) -> bool:
    return span[0] <= start and end <= span[1]


def _overlaps(span: tuple[int, int], start: int, end: int) -> bool:
    return start < span[1] and span[0] < end


def _load_address_problem(start: int, end: int, loader: Collection[tuple[int, int]]) -> str | None:
    """``verify_load_addresses`` for ESP32-C3: None when [start, end) may be loaded."""
    diram_offset = _DIRAM_IRAM[0] - _DRAM[0]
    if _in(_DRAM, start, end):
        if _overlaps(_BOOTLOADER_STACK, start, end):
            return "overlaps bootloader stack"
        if any(_overlaps(seg, start, end) for seg in loader):
            return "overlaps bootloader data"
        start, end = start + diram_offset, end + diram_offset  # the IRAM alias of D/IRAM
    if _in(_IRAM, start, end) or _in(_DIRAM_IRAM, start, end):
        if any(_overlaps(seg, start, end) for seg in loader):
            return "overlaps loader IRAM"
        return None
    if _in(_RTC_FAST, start, end):
        return None
    return "bad load address range"


def _efuse_blk_validity(desc_raw: bytes, block: tuple[int, int], log: _ImageLog) -> None:
    """``bootloader_common_check_efuse_blk_validity`` on the app descriptor of segment 0."""
    if int.from_bytes(desc_raw[:4], "little") != APP_DESC_MAGIC or len(desc_raw) < APP_DESC_LAYOUT.size:
        return
    values = APP_DESC_LAYOUT.unpack(desc_raw)
    low, high = values["min_efuse_blk_rev_full"], values["max_efuse_blk_rev_full"]
    major, minor = block
    revision = major * 100 + minor
    if low > revision:
        log(Msg.BLK_MIN, rmaj=low // 100, rmin=low % 100, major=major, minor=minor)
        raise _Reject("efuse_blk_rev")
    if high != 0 and revision > high:
        log(Msg.BLK_MAX, rmaj=high // 100, rmin=high % 100, major=major, minor=minor)
        raise _Reject("efuse_blk_rev")


def _align_up(value: int, align: int) -> int:
    return (value + align - 1) // align * align


def _load_image(flash: FlashStorage, part: PartitionEntry, efuse: BootEfuses, log: _ImageLog,
                loader: Collection[tuple[int, int]], block_rev: tuple[int, int], *, do_load: bool,
                signed_by: Sequence[bytes | None] | None = None) -> _Loaded:
    """``image_load`` (``esp_image_format.c``) on *part*: raises :class:`_Reject` after logging.

    The signature is checked against the eFuse key digests when Secure Boot is enabled, or
    against *signed_by* when given (see :func:`verify_app_partition`)."""
    secure_boot = efuse.secure_boot_enabled or signed_by is not None
    start = part.offset
    if part.size > SIXTEEN_MB:
        log(Msg.PART_TOO_BIG, size=part.size)
        raise _Reject("length")
    raw_header = _read(flash, start, IMAGE_HEADER_LAYOUT.size)
    if raw_header is None:
        log(Msg.FLASH_READ, addr=start)
        raise _Reject("flash_read")
    header = ImageHeader.parse(raw_header)
    # verify_image_header
    if header.magic != IMAGE_MAGIC:
        log(Msg.BAD_MAGIC, addr=start)
        raise _Reject("magic")
    _chip_validity(header, efuse, log, application=True)
    if header.segment_count > MAX_SEGMENTS:
        log(Msg.SEGMENT_COUNT, addr=start, count=header.segment_count, max=MAX_SEGMENTS)
        raise _Reject("segment_count")
    # process_segments
    checksum = CHECKSUM_INITIAL
    page = ESP32C3.mmu_page_size
    pos = start + IMAGE_HEADER_LAYOUT.size
    for index in range(header.segment_count):
        raw_seg = _read(flash, pos, SEGMENT_HEADER_LAYOUT.size)
        if raw_seg is None:
            log(Msg.FLASH_READ, addr=pos)
            raise _Reject("flash_read")
        seg = SEGMENT_HEADER_LAYOUT.unpack(raw_seg)
        load_addr, data_len = seg["load_addr"], seg["data_len"]
        data_addr = pos + SEGMENT_HEADER_LAYOUT.size
        if data_len & 3 or data_len >= MAX_SEGMENT_LEN:
            log(Msg.SEGMENT_LENGTH, length=data_len)
            raise _Reject("segment")
        mapped = is_flash_mapped(load_addr)
        if mapped and data_addr % page != load_addr % page:
            log(Msg.SEGMENT_MAP, index=index, load=load_addr, data=data_addr)
            raise _Reject("segment")
        loading = do_load and not mapped and load_addr >= LOADABLE_MIN_ADDR
        log(Msg.SEGMENT, index=index, paddr=data_addr, vaddr=load_addr, size=data_len,
            kind="load" if loading else "map" if mapped else "")
        if loading and data_len:
            problem = _load_address_problem(load_addr, load_addr + data_len, loader)
            if problem is not None:
                log(Msg.SEGMENT_ADDR, index=index, start=load_addr, end=load_addr + data_len, reason=problem)
                raise _Reject("load_address")
        data = _read(flash, data_addr, data_len)
        if data is None:
            log(Msg.MMAP_FAILED, addr=data_addr, size=data_len)
            raise _Reject("flash_read")
        if index == 0:
            _efuse_blk_validity(data[:APP_DESC_LAYOUT.size], block_rev, log)
        checksum = esp_checksum(data, checksum)
        pos = data_addr + data_len
    if pos < start:
        log(Msg.WRAPPED)
        raise _Reject("segment")
    image_len = pos - start
    # process_checksum
    pad = ((image_len + 1 + 15) & ~15) - image_len
    block = _read(flash, start + image_len, pad)
    if block is None:
        log(Msg.FLASH_READ, addr=start + image_len)
        raise _Reject("flash_read")
    if block[-1] != checksum:
        log(Msg.CHECKSUM, calc=checksum, read=block[-1])
        raise _Reject("checksum")
    image_len += pad
    # process_appended_hash_and_sig
    stored_digest = bytes(DIGEST_LEN)
    if header.hash_appended:
        digest = _read(flash, start + image_len, DIGEST_LEN)
        if digest is None:
            log(Msg.FLASH_READ, addr=start + image_len)
            raise _Reject("flash_read")
        stored_digest = digest
        image_len += DIGEST_LEN
    sig_len = _align_up(image_len, SIGNATURE_SECTOR_SIZE) - image_len + SIGNATURE_SECTOR_SIZE if secure_boot else 0
    if image_len + sig_len > part.size:
        log(Msg.TOO_LONG, length=image_len + sig_len, size=part.size)
        raise _Reject("length")
    hashed_len = image_len - (DIGEST_LEN if header.hash_appended else 0)

    def simple_hash_ok() -> bool:
        body = _read(flash, start, hashed_len)
        return body is not None and hashlib.sha256(body).digest() == stored_digest

    if not secure_boot:
        if header.hash_appended and not simple_hash_ok():
            log(Msg.HASH_FAILED)
            raise _Reject("sha256")
        return _Loaded(header, image_len, False)
    # verify_secure_boot_signature
    log(Msg.VERIFY_SIG)
    end = _align_up(image_len, SIGNATURE_SECTOR_SIZE)
    signed = _read(flash, start, end + SIGNATURE_SECTOR_SIZE)
    if signed is None:
        log(Msg.MMAP_FAILED, addr=start + end, size=SIGNATURE_SECTOR_SIZE)
        raise _Reject("flash_read")
    if signed_by is None:
        digests = list(efuse.secure_boot_digests())[: ESP32C3.sbv2_max_signature_blocks]
        revoked = {slot for slot in efuse.revoked_digest_slots if 0 <= slot < ESP32C3.sbv2_max_signature_blocks}
    else:
        digests, revoked = list(signed_by), set()
    verdict = verify_signed_image(signed, digests, revoked)
    for line in verdict.log:
        log.raw(line.level, line.tag, line.text)  # type: ignore[arg-type]
    if not verdict.ok:
        log(Msg.SIG_FAILED)
        log(Msg.SIMPLE_HASH)
        if simple_hash_ok():
            log(Msg.SIG_BAD)
        else:
            log(Msg.HASH_FAILED)
            log(Msg.CORRUPTED)
        raise _Reject("signature")
    return _Loaded(header, end + SIGNATURE_SECTOR_SIZE, True)


def _loader_regions(flash: FlashStorage) -> list[tuple[int, int]]:
    """RAM the running bootloader occupies: the loaded segments of the image at flash 0x0."""
    regions: list[tuple[int, int]] = []
    raw = _read(flash, ESP32C3.bootloader_offset, IMAGE_HEADER_LAYOUT.size)
    if raw is None or raw[0] != IMAGE_MAGIC:
        return regions
    count = min(ImageHeader.parse(raw).segment_count, MAX_SEGMENTS)
    pos = ESP32C3.bootloader_offset + IMAGE_HEADER_LAYOUT.size
    for _ in range(count):
        seg_raw = _read(flash, pos, SEGMENT_HEADER_LAYOUT.size)
        if seg_raw is None:
            break
        seg = SEGMENT_HEADER_LAYOUT.unpack(seg_raw)
        if seg["load_addr"] >= LOADABLE_MIN_ADDR and not is_flash_mapped(seg["load_addr"]):
            regions.append((seg["load_addr"], seg["load_addr"] + seg["data_len"]))
        pos += SEGMENT_HEADER_LAYOUT.size + seg["data_len"]
    return regions


def verify_app_partition(flash: FlashStorage, part: PartitionEntry, efuse: BootEfuses, *,
                         signed_by: Sequence[bytes | None] | None = None) -> bool:
    """``image_validate(partition, ESP_IMAGE_VERIFY_SILENT)`` as the app does it (no output).

    *signed_by*: an app built with ``CONFIG_SECURE_SIGNED_ON_UPDATE`` on a chip without Secure
    Boot checks the signature all the same, trusting the key digests of the running app's
    signature blocks (``esp_secure_boot_get_signature_blocks_for_running_app``) instead of
    the eFuse's; pass those digests (no valid one: the image is refused)."""
    try:
        _load_image(flash, part, efuse, _ImageLog(None), (), efuse_block_revision(efuse), do_load=False, signed_by=signed_by)
    except _Reject:
        return False
    return True


# =========================================================================== outcome


@dataclass(frozen=True)
class BootOutcome:
    """What the bootloader did.

    ``partition`` is the app it started (None when ``halted``); ``image`` that app's
    bytes as loaded (header through the signature sector when Secure Boot checked it);
    ``otadata`` the otadata after the bootloader's writes (None without an otadata
    partition); ``rejected`` every app partition it refused, in the order it tried
    them. When ``halted`` the board must reset with :attr:`reset` (a boot loop, as on
    the chip). ``table_offset``/``partitions`` are the table it used (for the app's OTA
    code).
    """

    partition: PartitionEntry | None
    image: bytes
    app_desc: AppDescriptor | None
    behaviour: BehaviourManifest | None
    otadata: OtaDataPartition | None
    halted: bool
    reason: str
    table_offset: int | None = None
    partitions: tuple[PartitionEntry, ...] = ()
    header: ImageHeader | None = None
    secure_boot_verified: bool = False
    rejected: tuple[SlotRejection, ...] = ()
    chip_revision: tuple[int, int] = (0, 0)

    @property
    def partition_name(self) -> str | None:
        return None if self.partition is None else self.partition.label

    @property
    def partition_offset(self) -> int | None:
        return None if self.partition is None else self.partition.offset

    @property
    def reset(self) -> RomReset | None:
        """The reset the board performs next on its own (``bootloader_reset()``), or None."""
        return RESET_RTC_SW_SYS if self.halted else None

    @property
    def otadata_partition(self) -> PartitionEntry | None:
        return next((p for p in self.partitions if p.is_otadata), None)

    @property
    def app_slots(self) -> list[PartitionEntry | None]:
        """``bs->ota[0..app_count)``: the OTA slot partitions as the bootloader indexes them."""
        state = _BootState.from_entries(self.partitions)
        return state.ota[: state.app_count]


# =========================================================================== the run


class _Bootloader:
    """One run of the bootloader (``call_start_cpu0`` in ``bootloader_start.c``)."""

    def __init__(self, flash: FlashStorage, efuse: BootEfuses, console: BoardConsole, config: BootloaderConfig):
        self.flash = flash
        self.efuse = efuse
        self.console = console
        self.config = config
        self.rejected: list[SlotRejection] = []
        self.otadata: OtaDataPartition | None = None
        self.initial_contents = False
        self.table_offset: int | None = None
        self.state = _BootState(())
        self.loader = _loader_regions(flash)
        self.block_rev = efuse_block_revision(efuse)

    def log(self, message: LogMessage, **values: object) -> None:
        _emit(self.console, message, **values)

    def halt(self, reason: str) -> BootOutcome:
        return BootOutcome(None, b"", None, None, self.otadata, True, reason, self.table_offset,
                           self.state.partitions, None, False, tuple(self.rejected), self.efuse.chip_revision)

    # -- bootloader_init ----------------------------------------------------------------

    def init(self) -> BootOutcome | ImageHeader:
        raw = _read(self.flash, ESP32C3.bootloader_offset, IMAGE_HEADER_LAYOUT.size)
        if raw is None or raw[0] != IMAGE_MAGIC:
            # The ROM never starts a bootloader it cannot find; nothing of ours runs.
            return self.halt("no 2nd stage bootloader image at flash 0x0")
        header = ImageHeader.parse(raw)
        idf_ver, date_time = self.config.idf_version, self.config.compile_time
        desc = _read(self.flash, ESP32C3.bootloader_offset + APP_DESC_OFFSET, BOOTLOADER_DESC_LAYOUT.size)
        if desc is not None and desc[0] == BOOTLOADER_DESC_MAGIC:
            values = BOOTLOADER_DESC_LAYOUT.unpack(desc)
            idf_ver, date_time = cstr(values["idf_ver"]), cstr(values["date_time"])
        self.log(Msg.BANNER, idf_ver=idf_ver)
        if self.config.compile_time_date:
            self.log(Msg.COMPILE_TIME, date_time=date_time)
        major, minor = self.efuse.chip_revision
        self.log(Msg.CHIP_REV, major=major, minor=minor)
        self.log(Msg.BLOCK_REV, major=self.block_rev[0], minor=self.block_rev[1])
        try:
            _chip_validity(header, self.efuse, _ImageLog(self.console), application=False)
        except _Reject as exc:
            return self.halt(f"bootloader image refused by the chip check ({exc.code})")
        self.log(Msg.SPI_SPEED, speed=_SPI_SPEED.get(header.spi_speed, "20MHz"))
        self.log(Msg.SPI_MODE, mode=_SPI_MODE.get(header.spi_mode, "SLOW READ"))
        self.log(Msg.SPI_SIZE, size=_SPI_SIZE.get(header.spi_size, "2MB"))
        self.log(Msg.RNG_ON)
        return header

    # -- partition table ------------------------------------------------------------------

    def load_partition_table(self, chip_size: int) -> bool:
        """``bootloader_utility_load_partition_table`` at the offset :func:`find_partition_table`
        picks; with no populated table anywhere, as built for the first candidate offset."""
        found = find_partition_table(self.flash, self.config, chip_size)
        if found is None:
            offset = self.config.partition_table_offset or PARTITION_TABLE_OFFSETS[0]
            check = _verify_table(_read(self.flash, offset, TABLE_MAX_LEN) or b"\xff" * TABLE_MAX_LEN, chip_size)
            if check.entries is None:
                error = check.error or (Msg.PART_NO_END, {})
                self.log(error[0], **error[1])
                self.log(Msg.TABLE_VERIFY_FAILED)
                self.log(Msg.TABLE_LOAD_ERROR)
                return False
            found = offset, check.entries
        self.table_offset, entries = found
        self.state = _BootState.from_entries(entries)
        self.log(Msg.TABLE_HEAD)
        self.log(Msg.TABLE_COLUMNS)
        for p in entries:
            self.log(Msg.TABLE_ROW, index=p.index, label=p.label, usage=p.usage, type=p.type, subtype=p.subtype,
                     offset=p.offset, size=p.size)
        self.log(Msg.TABLE_END)
        return True

    # -- otadata --------------------------------------------------------------------------

    def write_entry(self, index: int, entry: OtaSelectEntry) -> None:
        assert self.state.otadata is not None and self.otadata is not None
        try:
            write_otadata_entry(self.flash, self.state.otadata, index, entry)
        except FlashError:
            self.log(Msg.WRITE_OTADATA_FAILED, err=ESP_ERR_FLASH_OP_FAIL)
            return
        self.otadata.entries[index] = entry

    def check_anti_rollback(self, part: PartitionEntry | None) -> bool:
        """``check_anti_rollback``: the app's secure_version is at least the eFuse's."""
        if not self.config.anti_rollback:
            return True
        desc, err = _description(self.flash, part)
        if desc is None:
            self.log(Msg.NO_PARTITION_DESC, err=err)
            return False
        return desc.secure_version >= self.efuse.secure_version

    def update_anti_rollback(self, part: PartitionEntry | None) -> None:
        desc, err = _description(self.flash, part)
        if desc is None:
            self.log(Msg.NO_PARTITION_DESC, err=err)
            return
        update_secure_version(self.efuse, self.console, desc.secure_version, self.config.secure_version_bits)

    def selected_boot_index(self) -> int:
        """``bootloader_utility_get_selected_boot_partition``."""
        state = self.state
        if state.otadata is None:
            return FACTORY_INDEX
        if state.otadata.size < 2 * SECTOR_SIZE:
            self.log(Msg.OTADATA_SMALL, size=state.otadata.size, minimum=2 * SECTOR_SIZE)
            return INVALID_INDEX
        self.otadata = read_otadata(self.flash, state.otadata)
        entries = self.otadata.entries
        if self.config.rollback:
            for i in range(2):
                if entries[i].ota_state == OtaState.PENDING_VERIFY:
                    self.write_entry(i, entries[i].with_state(OtaState.ABORTED))
        entries = self.otadata.entries
        boot_index = FACTORY_INDEX
        if self.config.anti_rollback:
            self.log(Msg.ANTI_ROLLBACK_ON)
            self.log(Msg.EFUSE_SECURE_VERSION, version=self.efuse.secure_version)
            if self.otadata.has_initial_contents:
                self.log(Msg.OTADATA_INITIAL)
                self.initial_contents = True
                return boot_index
            usable = [False, False]
            for i in range(2):
                if entries[i].is_valid and state.app_count:
                    usable[i] = self.check_anti_rollback(state.ota[(entries[i].ota_seq - 1) % state.app_count])
            active = select_otadata(entries, usable)
        else:
            if (entries[0].is_invalid and entries[1].is_invalid) or state.app_count == 0:
                if state.factory is not None:
                    self.log(Msg.DEFAULT_FACTORY)
                    return FACTORY_INDEX
                self.log(Msg.NO_FACTORY)
                self.initial_contents = self.otadata.has_initial_contents
                return 0
            active = select_otadata(entries, [e.is_valid for e in entries])
        if active != -1:
            entry = entries[active]
            boot_index = (entry.ota_seq - 1) % state.app_count
            if self.config.rollback and entry.ota_state == OtaState.NEW:
                self.write_entry(active, entry.with_state(OtaState.PENDING_VERIFY))
            if self.config.anti_rollback and entry.ota_state == OtaState.VALID:
                self.update_anti_rollback(state.ota[boot_index])
        elif state.factory is not None:
            self.log(Msg.OTADATA_TO_FACTORY)
        else:
            self.log(Msg.OTADATA_TRY_ALL)
        return boot_index

    # -- load_boot_image ------------------------------------------------------------------

    def try_load(self, part: PartitionEntry | None) -> _Loaded | None:
        """``check_anti_rollback(part) && try_load_partition(part)``."""
        if not self.check_anti_rollback(part):
            if part is not None and part.size:
                desc, _ = _description(self.flash, part)
                code = "anti_rollback" if desc is not None else "no_description"
                self.rejected.append(SlotRejection(part.label, part.offset, code,
                                                   f"secure_version {desc.secure_version if desc else '?'} < eFuse "
                                                   f"SECURE_VERSION {self.efuse.secure_version}"))
            return None
        if part is None or part.size == 0:
            return None
        log = _ImageLog(self.console)
        try:
            loaded = _load_image(self.flash, part, self.efuse, log, self.loader, self.block_rev, do_load=True)
        except _Reject as exc:
            self.rejected.append(SlotRejection(part.label, part.offset, exc.code, log.last))
            return None
        self.log(Msg.LOADED, offset=part.offset)
        return loaded

    def set_actual_ota_seq(self, index: int) -> None:
        if index > FACTORY_INDEX and self.initial_contents and self.state.otadata is not None:
            entry = OtaSelectEntry.for_seq(index + 1, OtaState.VALID)
            self.write_entry(0, entry)
            self.log(Msg.SET_OTA_SEQ, seq=entry.ota_seq)
            if self.config.anti_rollback:
                self.update_anti_rollback(self.state.ota[index])

    def start(self, part: PartitionEntry, loaded: _Loaded) -> BootOutcome:
        """``load_image``: the Secure Boot and RNG lines, then the app."""
        if loaded.secure_boot_verified:
            self.log(Msg.SB_ENABLING)
            self.log(Msg.SB_ALREADY)
        self.log(Msg.RNG_OFF)
        image = self.flash.read(part.offset, loaded.image_len)
        try:
            desc: AppDescriptor | None = AppDescriptor.parse(image, APP_DESC_OFFSET)
        except FirmwareFormatError:
            desc = None
        try:
            behaviour = BehaviourManifest.from_image(image)
        except FirmwareFormatError:
            behaviour = None
        return BootOutcome(part, image, desc, behaviour, self.otadata, False, "booted", self.table_offset,
                           self.state.partitions, loaded.header, loaded.secure_boot_verified, tuple(self.rejected),
                           self.efuse.chip_revision)

    def not_bootable(self, index: int) -> None:
        if index == FACTORY_INDEX:
            self.log(Msg.FACTORY_NOT_BOOTABLE)
        elif index == TEST_APP_INDEX:
            self.log(Msg.TEST_NOT_BOOTABLE)
        else:
            self.log(Msg.OTA_NOT_BOOTABLE, slot=index)

    def load_boot_image(self, start_index: int) -> BootOutcome:
        """``bootloader_utility_load_boot_image``: selected slot, down to factory, up the OTA slots, test app."""
        state = self.state
        order = list(range(start_index, FACTORY_INDEX - 1, -1)) + list(range(start_index + 1, state.app_count))
        for index in order:
            part = state.by_index(index)
            if part is None or part.size == 0:
                continue
            loaded = self.try_load(part)
            if loaded is not None:
                self.set_actual_ota_seq(index)
                return self.start(part, loaded)
            self.not_bootable(index)
        loaded = self.try_load(state.test)
        if loaded is not None and state.test is not None:
            self.log(Msg.TEST_FALLBACK)
            return self.start(state.test, loaded)
        self.log(Msg.NOTHING_BOOTABLE)
        return self.halt("no bootable app partition")

    def run(self) -> BootOutcome:
        header = self.init()
        if isinstance(header, BootOutcome):
            return header
        chip_size = _SPI_SIZE_BYTES.get(header.spi_size, 2 << 20)
        if not self.load_partition_table(chip_size):
            return self.halt("partition table not valid")
        index = self.selected_boot_index()
        if index == INVALID_INDEX:
            return self.halt("otadata partition not valid")
        return self.load_boot_image(index)


def run_bootloader(flash: FlashStorage, efuse: BootEfuses, console: BoardConsole,
                   config: BootloaderConfig = DEFAULT_CONFIG) -> BootOutcome:
    """Run the emulated ESP-IDF 2nd-stage bootloader once, from after the ROM banner.

    Prints the bootloader's lines on *console*, rewrites otadata sectors and burns the
    eFuse ``SECURE_VERSION`` as ESP-IDF does, and returns what it started. The ROM
    part (banner, ``load:``/``entry`` lines, refusing an erased flash with ``invalid
    header``) is the board's; when flash 0x0 holds no image this returns a halted
    outcome without printing anything.
    """
    return _Bootloader(flash, efuse, console, config).run()

"""The ESP-IDF partition table: binary ``partition-table.bin`` and the CSV it comes from.

Binary format (what the 2nd-stage bootloader reads at ``CONFIG_PARTITION_TABLE_OFFSET``):
a run of 32-byte ``esp_partition_info_t`` entries (magic ``0xAA 0x50``), then one MD5
entry (``0xEB 0xEB``, 14 × ``0xFF``, the MD5 of every entry before it), then ``0xFF``
up to 0xC00 bytes; an entry whose magic, type and subtype are all ``0xFF`` ends the
table. The last 1 KB of the 4 KB sector is left for a Secure Boot V1 signature.

Sources: esp-idf ``components/bootloader_support/include/esp_flash_partitions.h``
(``esp_partition_info_t``, ``ESP_PARTITION_MAGIC``, ``ESP_PARTITION_MAGIC_MD5``,
``ESP_PARTITION_TABLE_MAX_LEN``), ``components/bootloader_support/src/flash_partitions.c``
(``esp_partition_table_verify``: magic, MD5, end marker), ``components/esp_partition/
include/esp_partition.h`` (``esp_partition_type_t`` / ``esp_partition_subtype_t``) and
``components/partition_table/gen_esp32part.py`` v1.5 (``STRUCT_FORMAT = '<2sBBLL16sL'``,
``MD5_PARTITION_BEGIN``, CSV syntax, offset auto-placement, ``verify()`` rules, CSV
output). This module is also a stand-in for ``gen_esp32part.py`` on the command line
(binary → CSV and CSV → binary), so pytest-embedded-idf's ``IdfApp(part_tool=...)`` can
read a table without an ESP-IDF checkout: see :data:`PART_TOOL_SCRIPT`.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path

from rig.firmware.errors import FirmwareFormatError
from rig.firmware.layout import Field, Layout

# --------------------------------------------------------------------------- layout

PARTITION_MAGIC = b"\xaa\x50"
"""``ESP_PARTITION_MAGIC`` 0x50AA as stored (little-endian)."""
MD5_MAGIC = b"\xeb\xeb"
"""``ESP_PARTITION_MAGIC_MD5`` 0xEBEB as stored."""
END_MAGIC = b"\xff\xff"

TABLE_MAX_LEN = 0xC00
"""``ESP_PARTITION_TABLE_MAX_LEN``: entries + MD5 + end marker must fit here."""
TABLE_MAX_ENTRIES = TABLE_MAX_LEN // 32
"""``ESP_PARTITION_TABLE_MAX_ENTRIES`` (96), counting the MD5 entry and the end marker slot."""
TABLE_SECTOR_SIZE = 0x1000
"""The table owns a whole 4 KB flash sector; the first partition starts at table offset + 0x1000."""
DEFAULT_TABLE_OFFSET = 0x8000
"""``CONFIG_PARTITION_TABLE_OFFSET`` default; RainMaker examples use 0xC000."""
LABEL_SIZE = 16

PARTITION_ENTRY_LAYOUT = Layout(
    "esp_partition_info_t",
    [
        Field("magic", "2s", "ESP_PARTITION_MAGIC 0x50AA (bytes AA 50)"),
        Field("type", "B", "esp_partition_type_t"),
        Field("subtype", "B", "esp_partition_subtype_t"),
        Field("offset", "L", "esp_partition_pos_t.offset, flash address"),
        Field("size", "L", "esp_partition_pos_t.size in bytes"),
        Field("label", "16s", "NUL-padded name; 16 characters fill it with no NUL"),
        Field("flags", "L", "bit 0 encrypted, bit 1 readonly (PART_FLAG_ENCRYPTED / PART_FLAG_READONLY)"),
    ],
    source="esp-idf components/bootloader_support/include/esp_flash_partitions.h; "
    "gen_esp32part.py STRUCT_FORMAT '<2sBBLL16sL'",
)
assert PARTITION_ENTRY_LAYOUT.size == 32, "esp_partition_info_t is 32 bytes"

MD5_ENTRY_LAYOUT = Layout(
    "partition table MD5 entry",
    [
        Field("magic", "2s", "ESP_PARTITION_MAGIC_MD5 0xEBEB"),
        Field("reserved", "14s", "0xFF × 14 (gen_esp32part MD5_PARTITION_BEGIN)"),
        Field("md5", "16s", "MD5 of every entry before this one (ESP_PARTITION_MD5_OFFSET = 16)"),
    ],
    source="esp-idf components/bootloader_support/src/flash_partitions.c esp_partition_table_verify; "
    "gen_esp32part.py to_binary",
)
assert MD5_ENTRY_LAYOUT.size == 32

# --------------------------------------------------------------------------- types

class PartitionType(IntEnum):
    """``esp_partition_type_t`` and gen_esp32part ``TYPES``."""

    APP = 0x00
    DATA = 0x01
    BOOTLOADER = 0x02
    PARTITION_TABLE = 0x03


TYPE_ESP_SECURE_CERT = 0x3F
"""Custom type of the ``esp_secure_cert`` partition (esp_secure_cert_mgr, RainMaker, Matter)."""
TYPE_RESERVED_0X06 = 0x06
"""Custom type of RainMaker's ``reserved`` partition in ``partitions_4mb_optimised.csv``."""


class AppSubtype(IntEnum):
    """``esp_partition_subtype_t`` for ``ESP_PARTITION_TYPE_APP``."""

    FACTORY = 0x00
    OTA_0 = 0x10
    OTA_1 = 0x11
    OTA_2 = 0x12
    OTA_3 = 0x13
    OTA_4 = 0x14
    OTA_5 = 0x15
    OTA_6 = 0x16
    OTA_7 = 0x17
    OTA_8 = 0x18
    OTA_9 = 0x19
    OTA_10 = 0x1A
    OTA_11 = 0x1B
    OTA_12 = 0x1C
    OTA_13 = 0x1D
    OTA_14 = 0x1E
    OTA_15 = 0x1F
    TEST = 0x20
    TEE_0 = 0x30
    TEE_1 = 0x31


OTA_SUBTYPE_MIN = AppSubtype.OTA_0
OTA_SLOT_COUNT_MAX = 16


class DataSubtype(IntEnum):
    """``esp_partition_subtype_t`` for ``ESP_PARTITION_TYPE_DATA``."""

    OTA = 0x00
    PHY = 0x01
    NVS = 0x02
    COREDUMP = 0x03
    NVS_KEYS = 0x04
    EFUSE = 0x05
    UNDEFINED = 0x06
    ESPHTTPD = 0x80
    FAT = 0x81
    SPIFFS = 0x82
    LITTLEFS = 0x83
    TEE_OTA = 0x90


class BootloaderSubtype(IntEnum):
    PRIMARY = 0x00
    OTA = 0x01
    RECOVERY = 0x02


class PartitionTableSubtype(IntEnum):
    PRIMARY = 0x00
    OTA = 0x01


FLAG_ENCRYPTED = 1 << 0
FLAG_READONLY = 1 << 1
FLAG_NAMES: dict[str, int] = {"encrypted": FLAG_ENCRYPTED, "readonly": FLAG_READONLY}
"""CSV flag names → bits, in gen_esp32part ``PartitionDefinition.FLAGS`` order."""

# Keyword tables in gen_esp32part's order: to_csv prints the first name whose value matches.
TYPE_NAMES: dict[str, int] = {"bootloader": 0x02, "partition_table": 0x03, "app": 0x00, "data": 0x01}
SUBTYPE_NAMES: dict[int, dict[str, int]] = {
    PartitionType.BOOTLOADER: {"primary": 0x00, "ota": 0x01, "recovery": 0x02},
    PartitionType.PARTITION_TABLE: {"primary": 0x00, "ota": 0x01},
    PartitionType.APP: {
        "factory": 0x00,
        "test": 0x20,
        **{f"ota_{n}": 0x10 + n for n in range(OTA_SLOT_COUNT_MAX)},
        **{f"tee_{n}": 0x30 + n for n in range(2)},
    },
    PartitionType.DATA: {
        "ota": 0x00,
        "phy": 0x01,
        "nvs": 0x02,
        "coredump": 0x03,
        "nvs_keys": 0x04,
        "efuse": 0x05,
        "undefined": 0x06,
        "esphttpd": 0x80,
        "fat": 0x81,
        "spiffs": 0x82,
        "littlefs": 0x83,
        "tee_ota": 0x90,
    },
}

APP_OFFSET_ALIGN = 0x10000
"""gen_esp32part ``ALIGNMENT[APP_TYPE]``: app partitions start on a 64 KB MMU page."""
DATA_OFFSET_ALIGN = 0x1000
"""gen_esp32part ``ALIGNMENT`` for every other type: one 4 KB flash sector."""
APP_SIZE_ALIGN = 0x1000
"""gen_esp32part ``get_alignment_size_for_type(APP_TYPE)`` without Secure Boot V1."""
OTADATA_SIZE = 0x2000


def offset_alignment(ptype: int) -> int:
    """Where a partition of *ptype* may start (gen_esp32part ``get_alignment_offset_for_type``)."""
    return APP_OFFSET_ALIGN if ptype == PartitionType.APP else DATA_OFFSET_ALIGN


# --------------------------------------------------------------------------- partition

@dataclass(frozen=True)
class Partition:
    """One partition-table entry. ``type``/``subtype`` are plain ints (the enums above name them)."""

    name: str
    type: int
    subtype: int
    offset: int
    size: int
    flags: int = 0

    def __post_init__(self) -> None:
        label = self.name.encode("utf-8")
        if not label or len(label) > LABEL_SIZE:
            raise ValueError(f"partition name {self.name!r} must be 1..{LABEL_SIZE} bytes, it is {len(label)}")
        if b"\0" in label:
            raise ValueError(f"partition name {self.name!r} contains a NUL byte")
        for what, value, bits in (("type", self.type, 8), ("subtype", self.subtype, 8), ("offset", self.offset, 32),
                                  ("size", self.size, 32), ("flags", self.flags, 32)):
            if not 0 <= value < (1 << bits):
                raise ValueError(f"partition {self.name!r}: {what} {value} does not fit {bits} bits")

    @property
    def end(self) -> int:
        """First flash address after the partition."""
        return self.offset + self.size

    @property
    def encrypted(self) -> bool:
        return bool(self.flags & FLAG_ENCRYPTED)

    @property
    def readonly(self) -> bool:
        return bool(self.flags & FLAG_READONLY)

    @property
    def is_app(self) -> bool:
        return self.type == PartitionType.APP

    @property
    def ota_slot(self) -> int | None:
        """``n`` for an ``app/ota_n`` partition, else None."""
        if self.type == PartitionType.APP and OTA_SUBTYPE_MIN <= self.subtype < OTA_SUBTYPE_MIN + OTA_SLOT_COUNT_MAX:
            return self.subtype - OTA_SUBTYPE_MIN
        return None

    @property
    def type_name(self) -> str:
        """The CSV keyword of the type, or its decimal value as gen_esp32part prints it."""
        return _keyword(self.type, TYPE_NAMES)

    @property
    def subtype_name(self) -> str:
        return _keyword(self.subtype, SUBTYPE_NAMES.get(self.type, {}))

    @property
    def flag_names(self) -> list[str]:
        return [name for name, bit in FLAG_NAMES.items() if self.flags & bit]

    def to_bytes(self) -> bytes:
        """The 32-byte ``esp_partition_info_t``."""
        return PARTITION_ENTRY_LAYOUT.pack(
            {
                "magic": PARTITION_MAGIC,
                "type": self.type,
                "subtype": self.subtype,
                "offset": self.offset,
                "size": self.size,
                "label": self.name.encode("utf-8").ljust(LABEL_SIZE, b"\0"),
                "flags": self.flags,
            }
        )

    def to_csv(self) -> str:
        """One CSV row exactly as ``gen_esp32part.py`` prints it (``PartitionDefinition.to_csv``)."""
        return ",".join(
            [self.name, self.type_name, self.subtype_name, f"0x{self.offset:x}", _size_text(self.size),
             ":".join(self.flag_names)]
        )


def _keyword(value: int, keywords: dict[str, int]) -> str:
    for name, v in keywords.items():
        if v == value:
            return name
    return f"{value}"


def _size_text(size: int) -> str:
    for unit, suffix in ((0x100000, "M"), (0x400, "K")):
        if size % unit == 0:
            return f"{size // unit}{suffix}"
    return f"0x{size:x}"


def _is_primary_fixed(ptype: int, subtype: int) -> bool:
    """The primary bootloader / partition table entries sit below the table and skip placement checks."""
    return (ptype == PartitionType.BOOTLOADER and subtype == BootloaderSubtype.PRIMARY) or (
        ptype == PartitionType.PARTITION_TABLE and subtype == PartitionTableSubtype.PRIMARY
    )


# --------------------------------------------------------------------------- table

@dataclass(frozen=True)
class PartitionTable:
    """A whole partition table, validated on construction the way ``gen_esp32part.py verify()`` does.

    *offset* is where the table itself lives in flash (``CONFIG_PARTITION_TABLE_OFFSET``);
    *md5* says whether the binary carries the MD5 entry (``CONFIG_PARTITION_TABLE_MD5``,
    on by default). Any rule broken is a :class:`FirmwareFormatError` whose offset is
    the byte offset of the offending entry inside ``partition-table.bin``.
    """

    partitions: tuple[Partition, ...]
    offset: int = DEFAULT_TABLE_OFFSET
    md5: bool = True
    _index: dict[str, Partition] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "partitions", tuple(self.partitions))
        self._verify()
        object.__setattr__(self, "_index", {p.name: p for p in self.partitions})

    def _fail(self, index: int | None, problem: str, fix: str) -> FirmwareFormatError:
        return FirmwareFormatError("partition table", problem, None if index is None else index * 32, fix)

    def _verify(self) -> None:
        if self.offset % TABLE_SECTOR_SIZE:
            raise self._fail(None, f"table offset 0x{self.offset:x} is not on a 4 KB sector",
                             "CONFIG_PARTITION_TABLE_OFFSET must be a multiple of 0x1000")
        used = len(self.partitions) * 32 + (32 if self.md5 else 0)
        if used >= TABLE_MAX_LEN:
            raise self._fail(None, f"{len(self.partitions)} entries need {used} bytes; the table holds at most "
                             f"{TABLE_MAX_LEN - 1} before its end marker", "use fewer partitions")
        seen: dict[str, int] = {}
        otadata: list[int] = []
        for i, p in enumerate(self.partitions):
            if p.name in seen:
                raise self._fail(i, f"partition name {p.name!r} is used by entries {seen[p.name]} and {i}",
                                 "partition names must be unique")
            seen[p.name] = i
            align = offset_alignment(p.type)
            if p.offset % align:
                raise self._fail(i, f"partition {p.name!r} starts at 0x{p.offset:x}, not aligned to 0x{align:x}",
                                 "app partitions start on a 64 KB boundary, all others on a 4 KB sector")
            if p.type == PartitionType.APP and p.size % APP_SIZE_ALIGN:
                raise self._fail(i, f"app partition {p.name!r} size 0x{p.size:x} is not a multiple of 0x1000",
                                 "app partition sizes are whole 4 KB sectors")
            if p.size == 0:
                raise self._fail(i, f"partition {p.name!r} has size 0", "give the partition a size")
            if p.end > 1 << 32:
                raise self._fail(i, f"partition {p.name!r} ends at 0x{p.end:x}, past the 32-bit flash space",
                                 "check offset and size")
            if not _is_primary_fixed(p.type, p.subtype) and p.offset < self.offset + TABLE_SECTOR_SIZE:
                raise self._fail(i, f"partition {p.name!r} at 0x{p.offset:x} is below the end of the partition "
                                 f"table sector (0x{self.offset + TABLE_SECTOR_SIZE:x})",
                                 "partitions start after the table's 4 KB sector; is the table offset right?")
            if p.type == PartitionType.DATA and p.subtype == DataSubtype.OTA:
                otadata.append(i)
                if p.size != OTADATA_SIZE:
                    raise self._fail(i, f"otadata partition {p.name!r} is 0x{p.size:x} bytes",
                                     "the otadata partition must be 0x2000 (two 4 KB sectors)")
        if len(otadata) > 1:
            raise self._fail(otadata[1], f"{len(otadata)} otadata (data/ota) partitions",
                             "only one partition may have type data, subtype ota")
        order = sorted(range(len(self.partitions)), key=lambda k: self.partitions[k].offset)
        for before, after in itertools.pairwise(order):
            a, b = self.partitions[before], self.partitions[after]
            if b.offset < a.end:
                raise self._fail(after, f"partition {b.name!r} at 0x{b.offset:x} overlaps {a.name!r} "
                                 f"0x{a.offset:x}-0x{a.end - 1:x}", "move or shrink one of them")

    # -- lookups ---------------------------------------------------------------

    def find(self, name: str) -> Partition | None:
        """The partition called *name*, or None."""
        return self._index.get(name)

    def __getitem__(self, name: str) -> Partition:
        try:
            return self._index[name]
        except KeyError:
            raise KeyError(f"no partition named {name!r}; the table has {', '.join(self._index)}") from None

    def __iter__(self) -> Iterator[Partition]:
        return iter(self.partitions)

    def __len__(self) -> int:
        return len(self.partitions)

    def find_type(self, ptype: int, subtype: int | None = None) -> list[Partition]:
        """Every partition of *ptype* (and *subtype*, when given), in table order."""
        return [p for p in self.partitions if p.type == ptype and (subtype is None or p.subtype == subtype)]

    def app_slots(self) -> list[Partition]:
        """The OTA app partitions ordered by slot (``ota_0``, ``ota_1`` …).

        ``len(app_slots())`` is the ``num_app_slots`` otadata arithmetic uses
        (``esp_ota_get_app_partition_count`` counts ``ota_0``, ``ota_1`` … until one is missing;
        for a table with a gap only the slots before the gap are returned).
        """
        by_slot = {p.ota_slot: p for p in self.partitions if p.ota_slot is not None}
        slots: list[Partition] = []
        while len(slots) in by_slot:
            slots.append(by_slot[len(slots)])
        return slots

    def boot_default(self) -> Partition | None:
        """Where the build flashes the app: ``factory``, else the lowest ``ota_N``
        (parttool.py ``PARTITION_BOOT_DEFAULT``, used for flasher_args.json's "app" offset)."""
        if self.factory is not None:
            return self.factory
        ota = sorted((p for p in self.partitions if p.ota_slot is not None), key=lambda p: p.subtype)
        return ota[0] if ota else None

    @property
    def factory(self) -> Partition | None:
        found = self.find_type(PartitionType.APP, AppSubtype.FACTORY)
        return found[0] if found else None

    @property
    def otadata(self) -> Partition | None:
        found = self.find_type(PartitionType.DATA, DataSubtype.OTA)
        return found[0] if found else None

    def flash_size_needed(self) -> int:
        """The flash address where the last partition ends (gen_esp32part ``flash_size``)."""
        return max((p.end for p in self.partitions), default=0)

    def check_fits(self, flash_size: int) -> None:
        """Refuse a table that does not fit *flash_size* bytes (the bootloader's check against the chip size)."""
        for i, p in enumerate(self.partitions):
            if p.end > flash_size:
                raise self._fail(i, f"partition {p.name!r} ends at 0x{p.end:x}, past the 0x{flash_size:x}-byte flash",
                                 "use a table made for this flash size (CONFIG_ESPTOOLPY_FLASHSIZE)")

    # -- binary ----------------------------------------------------------------

    def to_bytes(self) -> bytes:
        """``partition-table.bin``: entries, the MD5 entry when enabled, ``0xFF`` up to 0xC00 bytes."""
        body = b"".join(p.to_bytes() for p in self.partitions)
        if self.md5:
            body += MD5_ENTRY_LAYOUT.pack({"magic": MD5_MAGIC, "reserved": b"\xff" * 14,
                                           "md5": hashlib.md5(body).digest()})
        return body.ljust(TABLE_MAX_LEN, b"\xff")

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, offset: int = DEFAULT_TABLE_OFFSET) -> PartitionTable:
        """Read a binary table as the bootloader does (``esp_partition_table_verify``).

        Entries are read until the end marker (magic, type and subtype all ``0xFF``); an
        MD5 entry, when present, must match the entries before it and must be the last
        entry. Bytes after the end marker are not read, as on the chip. *offset* is the
        table's own flash offset, needed to check that no partition overlaps it.
        """
        data = bytes(data)
        partitions: list[Partition] = []
        md5_seen = False
        for index in range(TABLE_MAX_ENTRIES):
            at = index * 32
            if at + 2 <= len(data) and data[at:at + 2] == END_MAGIC and data[at + 2:at + 4] == b"\xff\xff":
                return cls._checked(partitions, offset, md5_seen)
            raw = PARTITION_ENTRY_LAYOUT.unpack(data, at, what=f"partition table entry {index}")
            if raw["magic"] == MD5_MAGIC:
                if md5_seen:
                    raise FirmwareFormatError("partition table", "a second MD5 entry", at,
                                              "ESP-IDF writes exactly one MD5 entry, after the last partition")
                expected = hashlib.md5(data[:at]).digest()
                stored = data[at + MD5_ENTRY_LAYOUT.offset_of("md5"):at + 32]
                if stored != expected:
                    raise FirmwareFormatError(
                        "partition table", f"MD5 entry says {stored.hex()} but the entries hash to {expected.hex()}",
                        at, "the table is corrupt or was edited without regenerating it with gen_esp32part.py")
                md5_seen = True
                continue
            if raw["magic"] != PARTITION_MAGIC:
                raise FirmwareFormatError(
                    "partition table", f"entry {index} has magic {raw['magic'].hex()}, not aa50 (partition), "
                    "ebeb (MD5) or ffff (end of table)", at,
                    "is this the partition table? ESP-IDF puts it at CONFIG_PARTITION_TABLE_OFFSET (0x8000 by "
                    "default, 0xC000 in RainMaker examples)" if index == 0 else "the table is corrupt")
            if md5_seen:
                raise FirmwareFormatError("partition table", f"partition entry {index} follows the MD5 entry", at,
                                          "the MD5 entry must come after the last partition")
            label = raw["label"].split(b"\0", 1)[0]
            try:
                name = label.decode("utf-8")
            except UnicodeDecodeError:
                raise FirmwareFormatError("partition table", f"entry {index} label {raw['label']!r} is not UTF-8",
                                          at + PARTITION_ENTRY_LAYOUT.offset_of("label"),
                                          "the table is corrupt") from None
            try:
                partitions.append(Partition(name, raw["type"], raw["subtype"], raw["offset"], raw["size"],
                                            raw["flags"]))
            except ValueError as exc:
                raise FirmwareFormatError("partition table", f"entry {index}: {exc}", at,
                                          "the table is corrupt") from None
        raise FirmwareFormatError("partition table", f"no end marker in the first {TABLE_MAX_LEN} bytes",
                                  TABLE_MAX_LEN, "the table is corrupt or longer than ESP-IDF allows")

    @classmethod
    def _checked(cls, partitions: list[Partition], offset: int, md5: bool) -> PartitionTable:
        if not partitions:
            raise FirmwareFormatError("partition table", "the table has no partitions", 0,
                                      "this flash region is erased or is not a partition table")
        return cls(tuple(partitions), offset=offset, md5=md5)

    # -- CSV -------------------------------------------------------------------

    def to_csv(self) -> str:
        """The table as ``gen_esp32part.py partition-table.bin`` prints it (explicit offsets, K/M sizes)."""
        rows = ["# ESP-IDF Partition Table", "# Name, Type, SubType, Offset, Size, Flags"]
        rows += [p.to_csv() for p in self.partitions]
        return "\n".join(rows) + "\n"

    @classmethod
    def from_csv(cls, text: str, offset: int = DEFAULT_TABLE_OFFSET, bootloader_offset: int = 0x0,
                 md5: bool = True) -> PartitionTable:
        """Read an ESP-IDF ``partitions.csv`` the way ``gen_esp32part.py`` does.

        ``Name, Type, SubType, Offset, Size, Flags``; ``#`` starts a comment line; types
        and subtypes by keyword or number; offsets and sizes in decimal/hex with optional
        ``K``/``M``; an empty offset is placed after the previous partition (starting at
        *offset* + 0x1000, the end of the table's sector), aligned to 0x10000 for app
        partitions and 0x1000 for all others; a negative size means "up to that address".
        A primary ``bootloader`` / ``partition_table`` row gets *bootloader_offset* /
        *offset* and does not take part in placement. An empty subtype is ``undefined``
        (0x06), not allowed for app partitions.
        """
        rows: list[tuple[int, str, int, int, int | None, int, int]] = []
        for line_no, line in enumerate(text.splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if "$" in line:
                raise _csv_error(line_no, "environment variables in partition CSVs are not supported",
                                 "write the value out")
            fields = [f.strip() for f in (line + ",,,,").split(",")]
            name = fields[0]
            if not fields[1]:
                raise _csv_error(line_no, "the type field is empty", "use app, data or a number")
            ptype = _csv_int(fields[1], TYPE_NAMES, line_no, "type")
            if not fields[2]:
                if ptype == PartitionType.APP:
                    raise _csv_error(line_no, "an app partition needs a subtype", "e.g. factory, ota_0, test")
                subtype = int(DataSubtype.UNDEFINED)
            else:
                subtype = _csv_int(fields[2], SUBTYPE_NAMES.get(ptype, {}), line_no, "subtype")
            if ptype == PartitionType.BOOTLOADER and subtype == BootloaderSubtype.RECOVERY:
                raise _csv_error(line_no, "recovery bootloader partitions are not supported",
                                 "drop the row; the rig does not model CONFIG_BOOTLOADER_RECOVERY_OFFSET")
            part_offset: int | None
            if ptype == PartitionType.BOOTLOADER and subtype == BootloaderSubtype.PRIMARY:
                part_offset, size = bootloader_offset, offset - bootloader_offset
            elif ptype == PartitionType.PARTITION_TABLE and subtype == PartitionTableSubtype.PRIMARY:
                part_offset, size = offset, TABLE_SECTOR_SIZE
            else:
                part_offset = _csv_int(fields[3], {}, line_no, "offset") if fields[3] else None
                if not fields[4]:
                    raise _csv_error(line_no, "the size field is empty", "give a size, e.g. 0x6000 or 24K")
                size = _csv_int(fields[4], {}, line_no, "size")
            flags = 0
            for flag in fields[5].split(":"):
                if flag in FLAG_NAMES:
                    flags |= FLAG_NAMES[flag]
                elif flag:
                    raise _csv_error(line_no, f"unknown flag {flag!r}", f"known flags: {', '.join(FLAG_NAMES)}")
            rows.append((line_no, name, ptype, subtype, part_offset, size, flags))

        partitions: list[Partition] = []
        last_end = offset + TABLE_SECTOR_SIZE
        for line_no, name, ptype, subtype, part_offset, size, flags in rows:
            if not _is_primary_fixed(ptype, subtype):
                if part_offset is not None and part_offset < last_end:
                    raise _csv_error(line_no, f"offset 0x{part_offset:x} overlaps what comes before it, which "
                                     f"ends at 0x{last_end:x}", "use a free offset or leave it empty")
                if part_offset is None:
                    align = offset_alignment(ptype)
                    part_offset = -(-last_end // align) * align
                if size < 0:
                    size = -size - part_offset
                last_end = part_offset + size
            assert part_offset is not None
            try:
                partitions.append(Partition(name, ptype, subtype, part_offset, size, flags))
            except ValueError as exc:
                raise _csv_error(line_no, str(exc), "fix the row") from None
        if not partitions:
            raise _csv_error(None, "the CSV defines no partitions", "add at least one row")
        return cls(tuple(partitions), offset=offset, md5=md5)


def _csv_error(line_no: int | None, problem: str, fix: str) -> FirmwareFormatError:
    where = f"line {line_no}: " if line_no is not None else ""
    return FirmwareFormatError("partition CSV", where + problem, None, fix)


def _csv_int(text: str, keywords: dict[str, int], line_no: int, what: str) -> int:
    """gen_esp32part ``parse_int``: int(x, 0) with k/K/m/M suffixes, else a keyword."""
    lowered = text.lower()
    for suffix, unit in (("k", 1024), ("m", 1024 * 1024)):
        if lowered.endswith(suffix) and lowered not in keywords:
            return _csv_int(text[:-1], keywords, line_no, what) * unit
    try:
        return int(text, 0)
    except ValueError:
        if lowered in keywords:
            return keywords[lowered]
        known = f"; known keywords: {', '.join(keywords)}" if keywords else ""
        raise _csv_error(line_no, f"{what} {text!r} is not a number{known}", "fix the field") from None


# --------------------------------------------------------------------------- RainMaker

RAINMAKER_4MB_CSV = """\
# Name,   Type, SubType, Offset,  Size, Flags
# RainMaker partitions_4mb_optimised.csv layout (CONFIG_PARTITION_TABLE_OFFSET=0xc000, 4 MB flash)
esp_secure_cert,  0x3F, ,0xD000,    0x2000, encrypted
nvs_key,  data, nvs_keys,0xF000,    0x1000, encrypted
nvs,      data, nvs,     0x10000,   0x6000,
otadata,  data, ota,     ,          0x2000
phy_init, data, phy,     ,          0x1000,
ota_0,    app,  ota_0,   0x20000,   0x1E0000,
ota_1,    app,  ota_1,   ,          0x1E0000,
reserved, 0x06, ,        ,          0x1A000,
fctry,    data, nvs,     ,          0x6000
"""
"""The layout of esp-rainmaker ``examples/*/partitions_4mb_optimised.csv`` as resolved in the
protocol sheet §8.1 (offsets after gen_esp32part placement: otadata 0x16000, phy_init 0x18000,
ota_1 0x200000, reserved 0x3E0000, fctry 0x3FA000). The upstream file was not available to
copy; tests check every resolved offset against the sheet."""

RAINMAKER_4MB_OFFSET = 0xC000
RAINMAKER_4MB = PartitionTable.from_csv(RAINMAKER_4MB_CSV, offset=RAINMAKER_4MB_OFFSET)
"""RainMaker's default 4 MB table (esp_secure_cert, nvs_key, nvs, otadata, phy_init, ota_0,
ota_1, reserved, fctry), table at 0xC000."""

# --------------------------------------------------------------------------- command line

PART_TOOL_SCRIPT = Path(__file__).resolve()
"""Pass as pytest-embedded-idf's ``part_tool`` (``--part-tool``): run as
``python partition_table.py <file>`` it converts like ``gen_esp32part.py``."""


def main(argv: Sequence[str] | None = None) -> int:
    """``gen_esp32part.py``-compatible command line: binary → CSV, CSV → binary."""
    parser = argparse.ArgumentParser(description="ESP-IDF partition table converter (gen_esp32part.py subset)")
    parser.add_argument("--offset", "-o", default=hex(DEFAULT_TABLE_OFFSET), help="partition table offset")
    parser.add_argument("--disable-md5sum", action="store_true", help="write no MD5 entry")
    parser.add_argument("--flash-size", help="check the table fits, e.g. 4MB")
    parser.add_argument("--quiet", "-q", action="store_true", help="accepted for compatibility")
    parser.add_argument("input", help="CSV or binary table")
    parser.add_argument("output", nargs="?", default="-", help="output file, stdout when omitted")
    args = parser.parse_args(argv)
    table_offset = int(args.offset, 0)
    data = Path(args.input).read_bytes()
    try:
        if data[:2] == PARTITION_MAGIC:
            table = PartitionTable.parse(data, offset=table_offset)
            out: bytes = table.to_csv().encode()
        else:
            try:
                text = data.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise FirmwareFormatError(args.input, "starts without the binary magic aa50 and is not UTF-8 CSV",
                                          0, "pass a partition-table.bin or a partitions.csv") from None
            table = PartitionTable.from_csv(text, offset=table_offset, md5=not args.disable_md5sum)
            out = table.to_bytes()
        if args.flash_size:
            table.check_fits(int(args.flash_size.upper().removesuffix("MB")) * 1024 * 1024)
    except FirmwareFormatError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.output == "-":
        sys.stdout.buffer.write(out)
        sys.stdout.flush()
    else:
        Path(args.output).write_bytes(out)
    return 0


__all__ = [
    "DEFAULT_TABLE_OFFSET",
    "FLAG_ENCRYPTED",
    "FLAG_READONLY",
    "MD5_ENTRY_LAYOUT",
    "PARTITION_ENTRY_LAYOUT",
    "PART_TOOL_SCRIPT",
    "RAINMAKER_4MB",
    "RAINMAKER_4MB_CSV",
    "RAINMAKER_4MB_OFFSET",
    "TABLE_MAX_LEN",
    "TYPE_ESP_SECURE_CERT",
    "TYPE_RESERVED_0X06",
    "AppSubtype",
    "BootloaderSubtype",
    "DataSubtype",
    "Partition",
    "PartitionTable",
    "PartitionTableSubtype",
    "PartitionType",
    "main",
    "offset_alignment",
]

if __name__ == "__main__":
    sys.exit(main())

"""The OTA data partition (``otadata``): which OTA slot boots, and the rollback state.

The partition (type data, subtype ota, 0x2000 bytes) is two 4 KB flash sectors; each
starts with one 32-byte ``esp_ota_select_entry_t`` and is otherwise erased (``0xFF``).
Writers always erase a whole sector and write its entry, so one sector stays intact if
power fails mid-write.

- ``crc = esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4)``, i.e.
  ``binascii.crc32(struct.pack('<I', ota_seq), 0xFFFFFFFF)``: it covers ``ota_seq`` only,
  so a state change never changes the CRC.
- An entry is *invalid* when ``ota_seq == 0xFFFFFFFF`` or its state is INVALID or ABORTED
  (``bootloader_common_ota_select_invalid``), *valid* when not invalid and its CRC matches
  (``bootloader_common_ota_select_valid``).
- The *active* entry is the valid one with the higher ``ota_seq``; on a tie, sector 0
  (``bootloader_common_select_otadata``). Its slot is ``(ota_seq - 1) % num_app_slots``.

Sources: esp-idf ``components/bootloader_support/include/esp_flash_partitions.h``
(``esp_ota_select_entry_t``, ``esp_ota_img_states_t``),
``components/bootloader_support/src/bootloader_common_loader.c`` (CRC, valid/invalid,
active entry), ``components/bootloader_support/src/bootloader_utility.c``
(``bootloader_utility_get_selected_boot_index``: PENDING_VERIFY → ABORTED, NEW →
PENDING_VERIFY), ``components/app_update/esp_ota_ops.c`` (``esp_rewrite_ota_data``,
``rewrite_ota_seq``, ``esp_ota_current_ota_is_workable``), cross-checked with
``components/app_update/otatool.py`` ``switch_ota_partition`` (same sequence arithmetic).
"""

from __future__ import annotations

import binascii
import struct
from dataclasses import dataclass, replace
from enum import IntEnum

from rig.firmware.errors import FirmwareFormatError
from rig.firmware.layout import Field, Layout

OTA_SELECT_ENTRY_LAYOUT = Layout(
    "esp_ota_select_entry_t",
    [
        Field("ota_seq", "I", "sequence number; slot = (ota_seq - 1) % number of OTA app partitions"),
        Field("seq_label", "20s", "unused by ESP-IDF, left erased (0xFF)"),
        Field("ota_state", "I", "esp_ota_img_states_t"),
        Field("crc", "I", "esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4)"),
    ],
    source="esp-idf components/bootloader_support/include/esp_flash_partitions.h",
)
assert OTA_SELECT_ENTRY_LAYOUT.size == 32

SECTOR_SIZE = 0x1000
"""``SPI_FLASH_SEC_SIZE``: each entry owns one erase sector."""
OTADATA_SIZE = 2 * SECTOR_SIZE
SEQ_BLANK = 0xFFFFFFFF


class OtaState(IntEnum):
    """``esp_ota_img_states_t``."""

    NEW = 0x0
    PENDING_VERIFY = 0x1
    VALID = 0x2
    INVALID = 0x3
    ABORTED = 0x4
    UNDEFINED = 0xFFFFFFFF


def ota_seq_crc(ota_seq: int) -> int:
    """The entry CRC for *ota_seq*: ``esp_rom_crc32_le(UINT32_MAX, &ota_seq, 4)``."""
    return binascii.crc32(struct.pack("<I", ota_seq), 0xFFFFFFFF)


@dataclass(frozen=True)
class OtaSelectEntry:
    """One ``esp_ota_select_entry_t`` exactly as stored: any state value, any CRC."""

    ota_seq: int
    ota_state: int
    crc: int
    seq_label: bytes = b"\xff" * 20

    def __post_init__(self) -> None:
        for name in ("ota_seq", "ota_state", "crc"):
            if not 0 <= getattr(self, name) <= 0xFFFFFFFF:
                raise ValueError(f"{name} {getattr(self, name)} does not fit the uint32_t field")
        if len(self.seq_label) != 20:
            raise ValueError(f"seq_label must be 20 bytes, got {len(self.seq_label)}")

    @classmethod
    def blank(cls) -> OtaSelectEntry:
        """An erased sector's entry: every byte ``0xFF``."""
        return cls(SEQ_BLANK, OtaState.UNDEFINED, 0xFFFFFFFF)

    @classmethod
    def for_seq(cls, ota_seq: int, state: int = OtaState.UNDEFINED) -> OtaSelectEntry:
        """An entry with *ota_seq*, *state* and the correct CRC."""
        return cls(ota_seq, int(state), ota_seq_crc(ota_seq))

    @property
    def state(self) -> OtaState | None:
        """The state as an :class:`OtaState`, or None for a value ESP-IDF does not define."""
        try:
            return OtaState(self.ota_state)
        except ValueError:
            return None

    @property
    def is_blank(self) -> bool:
        return self.to_bytes() == b"\xff" * 32

    @property
    def crc_ok(self) -> bool:
        return self.crc == ota_seq_crc(self.ota_seq)

    @property
    def is_invalid(self) -> bool:
        """``bootloader_common_ota_select_invalid``: erased seq, or state INVALID / ABORTED (CRC not looked at)."""
        return self.ota_seq == SEQ_BLANK or self.ota_state in (OtaState.INVALID, OtaState.ABORTED)

    @property
    def is_valid(self) -> bool:
        """``bootloader_common_ota_select_valid``: not invalid and the CRC matches."""
        return not self.is_invalid and self.crc_ok

    def slot(self, num_app_slots: int) -> int:
        """The OTA slot this entry selects: ``(ota_seq - 1) % num_app_slots``."""
        if num_app_slots < 1:
            raise ValueError("the partition table has no OTA app partitions")
        return (self.ota_seq - 1) % num_app_slots

    def with_state(self, state: int) -> OtaSelectEntry:
        """The same entry, stored CRC kept, with *state*."""
        return replace(self, ota_state=int(state))

    def to_bytes(self) -> bytes:
        return OTA_SELECT_ENTRY_LAYOUT.pack(
            {"ota_seq": self.ota_seq, "seq_label": self.seq_label, "ota_state": self.ota_state, "crc": self.crc}
        )

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, offset: int = 0,
              what: str = "otadata entry") -> OtaSelectEntry:
        raw = OTA_SELECT_ENTRY_LAYOUT.unpack(data, offset, what=what)
        return cls(raw["ota_seq"], raw["ota_state"], raw["crc"], raw["seq_label"])


class OtaDataPartition:
    """The two otadata sectors, with the operations ESP-IDF performs on them.

    The mutating methods return the indices of the sectors they rewrote (erase + write),
    so an emulator can write back exactly those 4 KB sectors; :meth:`sector` gives the
    bytes of one. Bytes after each 32-byte entry are not kept: ESP-IDF never writes
    them, so they are ``0xFF`` on :meth:`to_bytes`.
    """

    def __init__(self, entries: tuple[OtaSelectEntry, OtaSelectEntry] | list[OtaSelectEntry] | None = None):
        if entries is None:
            entries = (OtaSelectEntry.blank(), OtaSelectEntry.blank())
        if len(entries) != 2:
            raise ValueError(f"otadata has exactly two entries, got {len(entries)}")
        self.entries: list[OtaSelectEntry] = list(entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, OtaDataPartition) and self.entries == other.entries

    def __repr__(self) -> str:
        return f"OtaDataPartition({self.entries!r})"

    # -- bytes -----------------------------------------------------------------

    @classmethod
    def blank(cls) -> OtaDataPartition:
        """Erased otadata, what ``ota_data_initial.bin`` holds: the bootloader boots factory, else ota_0."""
        return cls()

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> OtaDataPartition:
        """Read the 0x2000-byte partition; any other length is a :class:`FirmwareFormatError`."""
        if len(data) != OTADATA_SIZE:
            raise FirmwareFormatError(
                "otadata", f"is {len(data)} bytes; the otadata partition is 0x{OTADATA_SIZE:x} (two 4 KB sectors)",
                min(len(data), OTADATA_SIZE),
                "read the whole data/ota partition (gen_esp32part requires size 0x2000)")
        return cls([OtaSelectEntry.parse(data, i * SECTOR_SIZE, what=f"otadata sector {i}") for i in range(2)])

    def sector(self, index: int) -> bytes:
        """The 4 KB sector *index* as ESP-IDF writes it: the entry, then ``0xFF``."""
        return self.entries[index].to_bytes().ljust(SECTOR_SIZE, b"\xff")

    def to_bytes(self) -> bytes:
        return self.sector(0) + self.sector(1)

    # -- reading ---------------------------------------------------------------

    def active_index(self) -> int | None:
        """``bootloader_common_get_active_otadata``: the valid sector with the higher seq (tie → 0)."""
        first, second = (e.is_valid for e in self.entries)
        if first and second:
            return 0 if self.entries[0].ota_seq >= self.entries[1].ota_seq else 1
        if first:
            return 0
        if second:
            return 1
        return None

    def active_entry(self) -> OtaSelectEntry | None:
        index = self.active_index()
        return None if index is None else self.entries[index]

    def boot_slot(self, num_app_slots: int) -> int | None:
        """The OTA slot the bootloader selects, or None when otadata selects none.

        None means the bootloader falls back to the factory app, or to ota_0 when
        there is none (``bootloader_utility_get_selected_boot_index``).
        """
        active = self.active_entry()
        if active is None or num_app_slots < 1:
            return None
        return active.slot(num_app_slots)

    # -- the app side (esp_ota_ops.c) ---------------------------------------------

    def set_boot_slot(self, slot: int, num_slots: int, rollback_enabled: bool = True,
                      rewrite_active_when_same_slot: bool = False) -> tuple[int, ...]:
        """``esp_ota_set_boot_partition`` → ``esp_rewrite_ota_data`` for ``ota_<slot>``.

        With an active entry, the *other* sector gets the smallest seq ≥ the active one
        that maps to *slot*; with none, sector 0 gets ``seq = slot + 1``. The new state is
        NEW with ``CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE``, else UNDEFINED; the CRC is
        recomputed, ``seq_label`` kept. ESP-IDF up to v5.4 behaves so even when *slot* is
        already the active one (the other sector then gets the same seq, and a tie goes to
        sector 0); newer ESP-IDF instead rewrites the active sector's state in place —
        pass ``rewrite_active_when_same_slot=True`` for that.
        """
        if num_slots < 1 or not 0 <= slot < num_slots:
            raise ValueError(f"slot {slot} is not one of the {num_slots} OTA app partitions (ESP_ERR_INVALID_ARG)")
        active = self.active_index()
        if active is None:
            target, seq = 0, slot + 1
        else:
            current = self.entries[active].ota_seq
            if rewrite_active_when_same_slot and (current - 1) % num_slots == slot:
                target, seq = active, current
            else:
                target = 1 - active
                base = (slot + 1) % num_slots
                i = 0
                while current > base + i * num_slots:
                    i += 1
                seq = base + i * num_slots
        if seq >= SEQ_BLANK:
            raise ValueError(f"ota_seq would reach 0x{seq:x}; erase otadata to start again")
        state = OtaState.NEW if rollback_enabled else OtaState.UNDEFINED
        self.entries[target] = replace(self.entries[target], ota_seq=seq, ota_state=int(state), crc=ota_seq_crc(seq))
        return (target,)

    def _rewrite_active(self, state: OtaState, call: str) -> tuple[int, ...]:
        active = self.active_index()
        if active is None:
            raise ValueError(f"{call}: otadata selects no OTA app, the running firmware is factory (ESP_FAIL)")
        entry = self.entries[active]
        self.entries[active] = replace(entry, ota_state=int(state), crc=ota_seq_crc(entry.ota_seq))
        return (active,)

    def mark_valid(self) -> tuple[int, ...]:
        """``esp_ota_mark_app_valid_cancel_rollback``: active entry → VALID; no write when already VALID."""
        active = self.active_entry()
        if active is not None and active.ota_state == OtaState.VALID:
            return ()
        return self._rewrite_active(OtaState.VALID, "esp_ota_mark_app_valid_cancel_rollback")

    def mark_invalid(self) -> tuple[int, ...]:
        """``esp_ota_mark_app_invalid_rollback_and_reboot``: active entry → INVALID.

        ESP-IDF first checks that another bootable app exists
        (``esp_ota_check_rollback_is_possible``) and returns ``ESP_ERR_OTA_ROLLBACK_FAILED``
        otherwise; that needs the app images, so it is the caller's check.
        """
        return self._rewrite_active(OtaState.INVALID, "esp_ota_mark_app_invalid_rollback_and_reboot")

    # -- the bootloader side (bootloader_utility.c) --------------------------------

    def abort_pending(self) -> tuple[int, ...]:
        """Every entry in PENDING_VERIFY becomes ABORTED (the rollback), stored CRC kept."""
        written = []
        for i, entry in enumerate(self.entries):
            if entry.ota_state == OtaState.PENDING_VERIFY:
                self.entries[i] = entry.with_state(OtaState.ABORTED)
                written.append(i)
        return tuple(written)

    def bootloader_select(self, num_app_slots: int, rollback_enabled: bool = True) -> int | None:
        """What the bootloader does to otadata at boot; returns the selected OTA slot or None.

        With rollback enabled: PENDING_VERIFY entries become ABORTED, then an active
        entry in state NEW becomes PENDING_VERIFY. None means "no OTA slot selected"
        (factory app, else ota_0). Sectors are rewritten in place; compare
        :meth:`sector` before and after to see which.
        """
        if rollback_enabled:
            self.abort_pending()
        if num_app_slots < 1 or all(e.is_invalid for e in self.entries):
            return None
        active = self.active_index()
        if active is None:
            return None
        entry = self.entries[active]
        if rollback_enabled and entry.ota_state == OtaState.NEW:
            self.entries[active] = entry.with_state(OtaState.PENDING_VERIFY)
        return entry.slot(num_app_slots)

    @property
    def has_initial_contents(self) -> bool:
        """Both entries erased (seq 0xFFFFFFFF) or with a bad CRC: the bootloader's
        ``ota_has_initial_contents``, which it only acts on when there is no factory app."""
        return all(e.ota_seq == SEQ_BLANK or not e.crc_ok for e in self.entries)

    def set_actual_ota_seq(self, slot: int) -> tuple[int, ...]:
        """The bootloader's ``set_actual_ota_seq`` after booting ``ota_<slot>`` from initial otadata
        with no factory app: sector 0 becomes a fresh entry, ``seq = slot + 1``, VALID (and with
        anti-rollback the eFuse secure version is updated — the caller's part)."""
        self.entries[0] = OtaSelectEntry.for_seq(slot + 1, OtaState.VALID)
        return (0,)


__all__ = [
    "OTADATA_SIZE",
    "OTA_SELECT_ENTRY_LAYOUT",
    "SECTOR_SIZE",
    "OtaDataPartition",
    "OtaSelectEntry",
    "OtaState",
    "ota_seq_crc",
]

"""The firmware's ``nvs`` partition, written the way ESP-IDF's NVS library writes it.

What the node keeps there (namespaces and keys as ESP-IDF and RainMaker use them):

* ``nvs.net80211``: the Wi-Fi station config ``esp_wifi_set_config`` stores with
  ``WIFI_STORAGE_FLASH`` — ``opmode`` (u8), ``sta.ssid`` (blob: u32 length + 32 bytes),
  ``sta.pswd`` (blob: 64 bytes), ``bssid.set`` (u8) (esp-idf
  ``examples/wifi/wifi_nvs_config``: ``nvs_station_data.csv`` and its README);
* ``user_mapping``: ``user_id`` (blob, no NUL), written after the mapping's PUBACK with
  ``CONFIG_ESP_RMAKER_USER_ID_CHECK`` (esp-rainmaker ``src/core/esp_rmaker_user_mapping.c``);
* one namespace per device, named after it, one key per persistent param: a string
  param's bytes, any other ``esp_rmaker_param_val_t`` (:data:`PARAM_VAL_LAYOUT`)
  (``esp_rmaker_param_store_value`` in ``src/core/esp_rmaker_param.c``).

Layout: the page header, entry, varLength and blobIndex structures are
``rig.cloud.fctry``'s layouts and CRC helpers (declared once). Items are placed the way
Espressif's ``esp-idf-nvs-partition-gen`` places them for format version 2 (a namespace's
U8 entry before its first key, strings as ``SZ`` with their NUL, blobs as data chunks plus an
index, a page changing to FULL when the next item does not fit, one page kept free), so
:func:`build_nvs_image` of a list of items is byte-identical to the generator's output —
a test holds it to that.

:class:`NvsStore` keeps a running board's partition as ESP-IDF's runtime does
(``components/nvs_flash/src``: ``nvs_page.cpp``, ``nvs_pagemanager.cpp``,
``nvs_storage.cpp``): entries are only ever appended; a changed key is written anew and its
old entries then marked erased in the page's state bitmap (``00``); a new blob version
takes the other chunk-index half (``VerOffset`` 0x00 / 0x80) so both versions can coexist
until the old one is erased; when a page is full the next free page is taken, and when only
the reserve page is left the full page with the most erased entries is garbage-collected
into it (its live entries copied, then the page erased). So what a tester reads off the
flash is what a real board leaves there: erased data stays in place, ciphertext included,
until a garbage collection or ``nvs_flash_erase`` removes it.

With NVS encryption (:class:`rig.firmware.nvs_encryption.NvsXtsKeys`; esp-idf
``nvs_encrypted_partition.cpp``) every entry is written XTS-AES encrypted at its
partition-relative address; page headers and state bitmaps stay in clear.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from rig.cloud.fctry import (
    BITMAP_OFFSET,
    CHUNK_ANY,
    ENTRY_COUNT,
    ENTRY_ERASED,
    ENTRY_SIZE,
    ENTRY_WRITTEN,
    FIRST_ENTRY_OFFSET,
    NVS_BLOB_INDEX_LAYOUT,
    NVS_ENTRY_LAYOUT,
    NVS_PAGE_HEADER_LAYOUT,
    NVS_VARLEN_LAYOUT,
    NVS_VERSION_2,
    PAGE_ACTIVE,
    PAGE_FULL,
    PAGE_SIZE,
    PAGE_UNINITIALIZED,
    PRIMITIVE_TYPES,
    NvsType,
    entry_crc32,
    nvs_crc32,
    page_header_crc32,
    read_nvs_items,
)
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.layout import Field, Layout
from rig.firmware.nvs_encryption import NvsXtsKeys
from rig.vboard.bootloader import PartitionEntry
from rig.vboard.flash import FlashStorage

__all__ = [
    "PARAM_VAL_LAYOUT",
    "NvsFullError",
    "NvsStore",
    "NvsValue",
    "build_nvs_image",
]

MAX_KEY_LEN = 15
MAX_NAMESPACES = 254
BLOB_VERSIONS = (0x00, 0x80)
"""``VerOffset::VER_0_OFFSET`` / ``VER_1_OFFSET`` (esp-idf ``nvs_types.hpp``): a blob's chunks are
numbered from one or the other, alternating with each new version of the blob."""

PARAM_VAL_LAYOUT = Layout(
    "esp_rmaker_param_val_t",
    [
        Field("type", "I", "esp_rmaker_val_type_t: 1 bool, 2 int, 3 float, 4 string, 5 object, 6 array"),
        Field("val", "4s", "union { bool b; int i; float f; char *s; } on a 32-bit chip"),
    ],
    source="esp-rainmaker components/esp_rainmaker/include/esp_rmaker_core.h",
)
"""What ``esp_rmaker_param_store_value`` writes as a blob for a non-string param."""


class NvsFullError(RuntimeError):
    """The items do not fit the partition (one page must stay free)."""


@dataclass(frozen=True)
class NvsValue:
    """One key as it is written: ``value`` is a primitive's little-endian bytes, a
    string's text bytes (no NUL) or a blob's bytes."""

    namespace: str
    key: str
    type: NvsType
    value: bytes

    def __post_init__(self) -> None:
        for what, name in (("namespace", self.namespace), ("key", self.key)):
            if not name or len(name.encode()) > MAX_KEY_LEN:
                raise ValueError(f"NVS {what} {name!r} must be 1 to {MAX_KEY_LEN} bytes (NVS_KEY_NAME_MAX_SIZE - 1)")
        if self.type in PRIMITIVE_TYPES and len(self.value) != self.type & 0x0F:
            raise ValueError(f"NVS {self.type.name} value for {self.key!r} must be {self.type & 0x0F} bytes")
        if self.type not in PRIMITIVE_TYPES and self.type not in (NvsType.SZ, NvsType.BLOB_DATA):
            raise ValueError(f"NVS format 2 writes {self.type.name} items only as SZ or blobs (BLOB_DATA)")


def _entry(ns: int, item_type: NvsType, span: int, chunk: int, key: str, data: bytes) -> bytes:
    raw = NVS_ENTRY_LAYOUT.pack(
        {"ns": ns, "type": int(item_type), "span": span, "chunk_index": chunk, "crc32": 0,
         "key": key.encode().ljust(16, b"\0"), "data": data}
    )  # fmt: skip
    return raw[:4] + entry_crc32(raw).to_bytes(4, "little") + raw[8:]


def _varlen(size: int, payload: bytes) -> bytes:
    return NVS_VARLEN_LAYOUT.pack({"size": size, "reserved": 0xFFFF, "data_crc32": nvs_crc32(payload)})


class _Page:
    """One 4 KB page of the partition image, written in place (``nvs::Page``)."""

    def __init__(self, image: bytearray, base: int, keys: NvsXtsKeys | None):
        self.image = image
        self.base = base
        self.keys = keys

    @property
    def state(self) -> int:
        return int.from_bytes(self.image[self.base : self.base + 4], "little")

    @property
    def seq(self) -> int:
        return int.from_bytes(self.image[self.base + 4 : self.base + 8], "little")

    def entry_state(self, index: int) -> int:
        return (self.image[self.base + BITMAP_OFFSET + index // 4] >> ((index % 4) * 2)) & 0b11

    def _set_entry_state(self, index: int, state: int) -> None:
        at = self.base + BITMAP_OFFSET + index // 4
        shift = (index % 4) * 2
        self.image[at] = self.image[at] & ~(0b11 << shift) & 0xFF | state << shift

    @property
    def next_free(self) -> int:
        """The entry after the last one ever used: entries are only appended."""
        for index in range(ENTRY_COUNT - 1, -1, -1):
            if self.entry_state(index) != 0b11:
                return index + 1
        return 0

    @property
    def erased_count(self) -> int:
        return sum(self.entry_state(i) == ENTRY_ERASED for i in range(self.next_free))

    def initialize(self, seq: int) -> None:
        """``Page::initialize``: an ACTIVE header with sequence number *seq* on an erased page."""
        body = NVS_PAGE_HEADER_LAYOUT.pack(
            {"state": PAGE_ACTIVE, "seq_no": seq, "version": NVS_VERSION_2, "reserved": b"\xff" * 19, "crc32": 0}
        )
        self.image[self.base : self.base + 32] = body[:28] + page_header_crc32(body).to_bytes(4, "little")

    def mark_full(self) -> None:
        self.image[self.base : self.base + 4] = PAGE_FULL.to_bytes(4, "little")

    def erase(self) -> None:
        self.image[self.base : self.base + PAGE_SIZE] = b"\xff" * PAGE_SIZE

    def _address(self, index: int) -> int:
        return self.base + FIRST_ENTRY_OFFSET + index * ENTRY_SIZE

    def put(self, data: bytes, count: int) -> None:
        """Append *data* (padded with 0xFF to *count* entries, encrypted when the partition is)
        at the next free entry and mark those entries written (``10``)."""
        start = self.next_free
        raw = data.ljust(count * ENTRY_SIZE, b"\xff")
        at = self._address(start)
        self.image[at : at + len(raw)] = raw if self.keys is None else self.keys.encrypt(at, raw)
        for index in range(start, start + count):
            self._set_entry_state(index, ENTRY_WRITTEN)

    def read(self, index: int, count: int = 1) -> bytes:
        """Entries *index*.. in clear."""
        at = self._address(index)
        raw = bytes(self.image[at : at + count * ENTRY_SIZE])
        return raw if self.keys is None else self.keys.decrypt(at, raw)

    def mark_erased(self, index: int, count: int) -> None:
        for i in range(index, index + count):
            self._set_entry_state(i, ENTRY_ERASED)

    def items(self) -> Iterator[tuple[int, int]]:
        """``(index, span)`` of every written item, in the order it was appended."""
        index = 0
        while index < ENTRY_COUNT:
            if self.entry_state(index) != ENTRY_WRITTEN:
                index += 1
                continue
            span = self.read(index)[2]
            span = span if 1 <= span <= ENTRY_COUNT - index else 1
            yield index, span
            index += span


class _PageLog:
    """The partition's pages and the one being filled (``nvs::PageManager``), and how an item
    is laid out in them (``nvs::Storage::writeItem`` / ``writeMultiPageBlob``)."""

    def __init__(self, image: bytearray, keys: NvsXtsKeys | None):
        if len(image) < 2 * PAGE_SIZE or len(image) % PAGE_SIZE:
            raise ValueError(f"an NVS partition is a multiple of {PAGE_SIZE} bytes, at least two pages; got {len(image)}")
        self.size = len(image)
        self.pages = [_Page(image, base, keys) for base in range(0, len(image), PAGE_SIZE)]
        in_use = sorted((p for p in self.pages if p.state != PAGE_UNINITIALIZED), key=lambda p: p.seq)
        active = [p for p in in_use if p.state == PAGE_ACTIVE]
        self.active = active[-1] if active else None
        if self.active is None:
            self.new_page()

    def in_order(self) -> list[_Page]:
        """The pages that hold data, oldest first (by sequence number)."""
        return sorted((p for p in self.pages if p.state != PAGE_UNINITIALIZED), key=lambda p: p.seq)

    def new_page(self) -> _Page:
        """Close the page being filled and open the next (``PageManager::requestNewPage``):
        a free page while more than the reserve one is left, else the reserve page refilled
        with the live entries of the full page that has the most erased ones."""
        if self.active is not None:
            self.active.mark_full()
        used = self.in_order()
        seq = used[-1].seq + 1 if used else 0
        free = [p for p in self.pages if p.state == PAGE_UNINITIALIZED]
        if len(free) >= 2 or (free and not used):
            self.active = free[0]
            self.active.initialize(seq)
            return self.active
        victims = [p for p in used if p.state == PAGE_FULL and p.erased_count]
        if not free or not victims:
            raise NvsFullError(f"the items need more than the {len(self.pages) - 1} usable pages of a {self.size:#x}-byte NVS partition")
        victim = max(victims, key=lambda p: (p.erased_count, -p.seq))
        target = free[0]
        target.initialize(seq)
        for index, span in victim.items():
            target.put(victim.read(index, span), span)
        victim.erase()
        self.active = target
        return target

    def room(self, entries: int) -> _Page:
        """The page being filled once it has *entries* free entries (the generator's rule: a
        new page when ``used + entries >= 126``, so an item never ends exactly at the last entry)."""
        assert self.active is not None
        if self.active.next_free + entries > ENTRY_COUNT:
            self.new_page()
        return self.active

    def primitive(self, ns: int, key: str, item_type: NvsType, value: bytes) -> None:
        self.room(1).put(_entry(ns, item_type, 1, CHUNK_ANY, key, value.ljust(8, b"\xff")), 1)

    def string(self, ns: int, key: str, text: bytes) -> None:
        payload = text + b"\0"
        data_entries = (len(payload) + ENTRY_SIZE - 1) // ENTRY_SIZE
        page = self.room(data_entries + 2)
        page.put(_entry(ns, NvsType.SZ, data_entries + 1, CHUNK_ANY, key, _varlen(len(payload), payload)) + payload, data_entries + 1)

    def blob(self, ns: int, key: str, data: bytes, chunk_start: int = 0) -> None:
        page = self.room(1)
        offset, chunks, remaining = 0, 0, len(data)
        while True:
            tailroom = (ENTRY_COUNT - page.next_free - 1) * ENTRY_SIZE
            size = min(tailroom, remaining)
            remaining -= size
            chunk = data[offset : offset + size]
            data_entries = (size + ENTRY_SIZE - 1) // ENTRY_SIZE
            header = _entry(ns, NvsType.BLOB_DATA, data_entries + 1, chunk_start + chunks, key, _varlen(size, chunk))
            page.put(header + chunk, data_entries + 1)
            chunks += 1
            if remaining or tailroom - size < ENTRY_SIZE:
                page = self.new_page()
            offset += size
            if not remaining:
                index = {"size": len(data), "chunk_count": chunks, "chunk_start": chunk_start, "reserved": 0xFFFF}
                page.put(_entry(ns, NvsType.BLOB_IDX, 1, CHUNK_ANY, key, NVS_BLOB_INDEX_LAYOUT.pack(index)), 1)
                return

    def write(self, ns: int, item: NvsValue, chunk_start: int = 0) -> None:
        if item.type in PRIMITIVE_TYPES:
            self.primitive(ns, item.key, item.type, item.value)
        elif item.type is NvsType.SZ:
            self.string(ns, item.key, item.value)
        else:
            self.blob(ns, item.key, item.value, chunk_start)


def build_nvs_image(items: Sequence[NvsValue], size: int, keys: NvsXtsKeys | None = None) -> bytes:
    """A format-2 NVS partition of *size* bytes holding *items* in order, encrypted with
    *keys* when given (see the module doc)."""
    image = bytearray(b"\xff" * size)
    log = _PageLog(image, keys)
    namespaces: dict[str, int] = {}
    for item in items:
        if item.namespace not in namespaces:
            if len(namespaces) >= MAX_NAMESPACES:
                raise NvsFullError(f"NVS holds at most {MAX_NAMESPACES} namespaces")
            namespaces[item.namespace] = len(namespaces) + 1
            log.primitive(0, item.namespace, NvsType.U8, bytes([namespaces[item.namespace]]))
        log.write(namespaces[item.namespace], item)
    return bytes(image)


@dataclass(frozen=True)
class _Slot:
    """Entries one written item occupies: *span* entries from *index* of *page*."""

    page: _Page
    index: int
    span: int


@dataclass
class _Layout:
    """Where everything live sits, from one walk over the pages (later writes win, as in
    ``nvs::Storage::init``); ``stale`` are older copies and orphaned blob chunks that ESP-IDF
    erases when it loads the partition."""

    namespaces: dict[str, int]
    items: dict[tuple[int, str], list[_Slot]]
    chunk_start: dict[tuple[int, str], int]
    stale: list[_Slot]


def _walk(log: _PageLog) -> _Layout:
    namespaces: dict[str, int] = {}
    single: dict[tuple[int, str], _Slot] = {}
    indexes: dict[tuple[int, str], _Slot] = {}
    index_chunks: dict[tuple[int, str], range] = {}
    chunks: dict[tuple[int, str, int], _Slot] = {}
    stale: list[_Slot] = []

    def keep(table: dict[Any, _Slot], key: Any, slot: _Slot) -> None:
        if key in table:
            stale.append(table[key])  # an older copy: this one was written later
        table[key] = slot

    for page in log.in_order():
        for index, span in page.items():
            entry = NVS_ENTRY_LAYOUT.unpack(page.read(index), 0, "nvs entry")
            slot = _Slot(page, index, span)
            at = (entry["ns"], entry["key"].split(b"\0", 1)[0].decode(errors="replace"))
            if entry["ns"] == 0:
                namespaces[at[1]] = entry["data"][0]
            elif entry["type"] == NvsType.BLOB_DATA:
                keep(chunks, (*at, entry["chunk_index"]), slot)
            elif entry["type"] == NvsType.BLOB_IDX:
                fields = NVS_BLOB_INDEX_LAYOUT.unpack(entry["data"], 0, "nvs blob index")
                keep(indexes, at, slot)
                index_chunks[at] = range(fields["chunk_start"], fields["chunk_start"] + fields["chunk_count"])
            else:
                keep(single, at, slot)
    items: dict[tuple[int, str], list[_Slot]] = {at: [slot] for at, slot in single.items()}
    for at, slot in indexes.items():
        items[at] = [*(chunks.pop((*at, n)) for n in index_chunks[at] if (*at, n) in chunks), slot]
    stale.extend(chunks.values())  # chunks no live index names
    return _Layout(namespaces, items, {at: r.start for at, r in index_chunks.items()}, stale)


class NvsStore:
    """The ``nvs`` partition of a running board (``nvs_open`` / ``nvs_set_*`` / ``nvs_erase_*`` /
    ``nvs_commit``), encrypted with *keys* when the firmware enables NVS encryption.

    Loaded from flash once; changes are made to the partition image in place, as ESP-IDF
    makes them (see the module doc), and written to flash by :meth:`commit`. A partition
    ESP-IDF could not read — or one written in clear when the firmware encrypts, whose
    entries fail their CRCs once decrypted — is erased at load, as RainMaker's examples do
    when ``nvs_flash_init`` fails (``nvs_flash_erase`` then init again).
    """

    def __init__(self, flash: FlashStorage, partition: PartitionEntry, keys: NvsXtsKeys | None = None):
        self.flash = flash
        self.partition = partition
        self.keys = keys
        self._lock = threading.RLock()
        self.recovered_from: str | None = None
        """Why the partition was erased at load (it did not parse), or None."""
        self._image = bytearray(flash.read(partition.offset, partition.size))
        try:
            self._reload()
        except FirmwareFormatError as exc:
            self.recovered_from = str(exc)
            self.erase_partition()
            return
        if self._layout.stale:
            self._erase_slots(self._layout.stale)

    def _reload(self) -> None:
        """Re-read values and entry positions from the image."""
        loaded = read_nvs_items(bytes(self._image), what=f"{self.partition.label} partition", keys=self.keys)
        self._log = _PageLog(self._image, self.keys)
        self._values = {}
        for item in loaded:
            item_type = NvsType.BLOB_DATA if item.type is NvsType.BLOB else item.type
            self._values[(item.namespace, item.key)] = NvsValue(item.namespace, item.key, item_type, item.value)
        self._layout = _walk(self._log)

    def _erase_slots(self, slots: Sequence[_Slot]) -> None:
        for slot in slots:
            slot.page.mark_erased(slot.index, slot.span)
        self._reload()

    # ------------------------------------------------------------------ reading

    def get(self, namespace: str, key: str) -> bytes | None:
        with self._lock:
            item = self._values.get((namespace, key))
            return None if item is None else item.value

    def get_u8(self, namespace: str, key: str) -> int | None:
        value = self.get(namespace, key)
        return None if value is None else value[0]

    def items(self) -> list[NvsValue]:
        with self._lock:
            return list(self._values.values())

    # ------------------------------------------------------------------ writing

    def _namespace_index(self, namespace: str) -> int:
        """``nvs_open`` in read-write mode: the namespace's index, its entry written if new
        (the lowest unused index, as ``Storage::createOrOpenNamespace`` picks)."""
        index = self._layout.namespaces.get(namespace)
        if index is not None:
            return index
        used = set(self._layout.namespaces.values())
        free = [n for n in range(1, MAX_NAMESPACES + 1) if n not in used]
        if not free:
            raise NvsFullError(f"NVS holds at most {MAX_NAMESPACES} namespaces")
        self._log.primitive(0, namespace, NvsType.U8, bytes([free[0]]))
        self._layout.namespaces[namespace] = free[0]
        return free[0]

    def set(self, namespace: str, key: str, item_type: NvsType, value: bytes) -> None:
        """Append the new value, then erase the old one's entries (``Storage::writeItem``)."""
        item = NvsValue(namespace, key, item_type, value)
        with self._lock:
            if self._values.get((namespace, key)) == item:
                return
            ns = self._namespace_index(namespace)
            old_start = self._layout.chunk_start.get((ns, key))
            start = BLOB_VERSIONS[1] if old_start == BLOB_VERSIONS[0] else BLOB_VERSIONS[0]
            self._log.write(ns, item, start)
            self._layout = _walk(self._log)  # the old copy (possibly moved by a garbage collection) is now stale
            self._erase_slots(self._layout.stale)

    def set_blob(self, namespace: str, key: str, value: bytes) -> None:
        self.set(namespace, key, NvsType.BLOB_DATA, value)

    def set_str(self, namespace: str, key: str, value: str) -> None:
        self.set(namespace, key, NvsType.SZ, value.encode())

    def set_u8(self, namespace: str, key: str, value: int) -> None:
        self.set(namespace, key, NvsType.U8, bytes([value]))

    def erase_key(self, namespace: str, key: str) -> None:
        """``nvs_erase_key``: the key's entries are marked erased; their bytes stay on flash."""
        with self._lock:
            ns = self._layout.namespaces.get(namespace)
            slots = self._layout.items.get((ns, key), []) if ns is not None else []
            if slots:
                self._erase_slots(slots)

    def erase_namespace(self, namespace: str) -> None:
        """``nvs_erase_all`` on a handle of *namespace*: every key's entries marked erased (the
        namespace's own entry stays, as ESP-IDF keeps it)."""
        with self._lock:
            ns = self._layout.namespaces.get(namespace)
            if ns is None:
                return
            self._erase_slots([slot for (index, _), slots in self._layout.items.items() if index == ns for slot in slots])

    def commit(self) -> None:
        """Write the partition image to flash (``nvs_commit``)."""
        with self._lock:
            current = self.flash.read(self.partition.offset, self.partition.size)
            if current == self._image:
                return
            self.flash.erase(self.partition.offset, self.partition.size)
            self.flash.write(self.partition.offset, bytes(self._image))

    def erase_partition(self) -> None:
        """``nvs_flash_erase``: every sector of the partition back to 0xFF, nothing cached;
        the next use starts a new first page (``nvs_flash_init``)."""
        with self._lock:
            self.flash.erase(self.partition.offset, self.partition.size)
            self._image = bytearray(b"\xff" * self.partition.size)
            self._reload()

"""The firmware's ``nvs`` partition: a writer for the NVS format ``rig.cloud.fctry`` reads.

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
``rig.cloud.fctry``'s layouts and CRC helpers (declared once). :func:`build_nvs_image` places items the
way Espressif's ``esp-idf-nvs-partition-gen`` does for format version 2 (a namespace's
U8 entry before its first key, strings as ``SZ`` with their NUL, blobs as data chunks
plus an index, a page changing to FULL when the next item does not fit, the last page
left free), so for the same items its output is byte-identical to the generator's —
a test holds it to that. :class:`NvsStore` rewrites the partition compacted on each
commit instead of appending and garbage-collecting as ESP-IDF's runtime does; what is
on flash after a commit is what ESP-IDF reads back.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

from rig.cloud.fctry import (
    BITMAP_OFFSET,
    CHUNK_ANY,
    ENTRY_COUNT,
    ENTRY_SIZE,
    FIRST_ENTRY_OFFSET,
    NVS_BLOB_INDEX_LAYOUT,
    NVS_ENTRY_LAYOUT,
    NVS_PAGE_HEADER_LAYOUT,
    NVS_VARLEN_LAYOUT,
    NVS_VERSION_2,
    PAGE_ACTIVE,
    PAGE_FULL,
    PAGE_SIZE,
    PRIMITIVE_TYPES,
    NvsType,
    entry_crc32,
    nvs_crc32,
    page_header_crc32,
    read_nvs_items,
)
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.layout import Field, Layout
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


class _Page:
    """One 4 KB page being filled (``Page`` in nvs_partition_gen)."""

    def __init__(self, seq: int):
        self.buf = bytearray(b"\xff" * PAGE_SIZE)
        self.entries = 0
        reserved = b"\xff" * 19
        body = NVS_PAGE_HEADER_LAYOUT.pack(
            {"state": PAGE_ACTIVE, "seq_no": seq, "version": NVS_VERSION_2, "reserved": reserved, "crc32": 0}
        )
        self.buf[0:32] = body[:28] + page_header_crc32(body).to_bytes(4, "little")

    def mark_full(self) -> None:
        self.buf[0:4] = PAGE_FULL.to_bytes(4, "little")

    def put(self, data: bytes, count: int) -> None:
        """Write *data* at the next entry and mark *count* entries written (``10``)."""
        at = FIRST_ENTRY_OFFSET + ENTRY_SIZE * self.entries
        self.buf[at : at + len(data)] = data
        for _ in range(count):
            bit = self.entries * 2
            self.buf[BITMAP_OFFSET + bit // 8] &= ~(1 << (bit % 8)) & 0xFF
            self.entries += 1


def _entry(ns: int, item_type: NvsType, span: int, chunk: int, key: str, data: bytes) -> bytes:
    raw = NVS_ENTRY_LAYOUT.pack(
        {"ns": ns, "type": int(item_type), "span": span, "chunk_index": chunk, "crc32": 0,
         "key": key.encode().ljust(16, b"\0"), "data": data}
    )  # fmt: skip
    return raw[:4] + entry_crc32(raw).to_bytes(4, "little") + raw[8:]


def _varlen(size: int, payload: bytes) -> bytes:
    return NVS_VARLEN_LAYOUT.pack({"size": size, "reserved": 0xFFFF, "data_crc32": nvs_crc32(payload)})


class _ImageWriter:
    """``NVS`` of nvs_partition_gen: pages in sequence, the last one left free."""

    def __init__(self, size: int):
        if size < 2 * PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError(f"an NVS partition is a multiple of {PAGE_SIZE} bytes, at least two pages; got {size}")
        self.max_pages = size // PAGE_SIZE - 1  # one page stays free for ESP-IDF's garbage collection
        self.size = size
        self.pages = [_Page(0)]
        self.namespaces: dict[str, int] = {}

    @property
    def page(self) -> _Page:
        return self.pages[-1]

    def new_page(self) -> _Page:
        if len(self.pages) >= self.max_pages:
            raise NvsFullError(f"the items need more than the {self.max_pages} usable pages of a {self.size:#x}-byte NVS partition")
        self.page.mark_full()
        self.pages.append(_Page(len(self.pages)))
        return self.page

    def namespace(self, name: str) -> int:
        if name not in self.namespaces:
            if len(self.namespaces) >= MAX_NAMESPACES:
                raise NvsFullError(f"NVS holds at most {MAX_NAMESPACES} namespaces")
            index = len(self.namespaces) + 1
            self.primitive(0, name, NvsType.U8, bytes([index]))
            self.namespaces[name] = index
        return self.namespaces[name]

    def primitive(self, ns: int, key: str, item_type: NvsType, value: bytes) -> None:
        if self.page.entries >= ENTRY_COUNT:
            self.new_page()
        self.page.put(_entry(ns, item_type, 1, CHUNK_ANY, key, value.ljust(8, b"\xff")), 1)

    def string(self, ns: int, key: str, text: bytes) -> None:
        payload = text + b"\0"
        data_entries = (len(payload) + ENTRY_SIZE - 1) // ENTRY_SIZE
        if self.page.entries + data_entries + 1 >= ENTRY_COUNT:
            self.new_page()
        self.page.put(_entry(ns, NvsType.SZ, data_entries + 1, CHUNK_ANY, key, _varlen(len(payload), payload)), 1)
        self.page.put(payload, data_entries)

    def blob(self, ns: int, key: str, data: bytes) -> None:
        if self.page.entries >= ENTRY_COUNT:
            self.new_page()
        offset, chunks, remaining = 0, 0, len(data)
        while True:
            tailroom = (ENTRY_COUNT - self.page.entries - 1) * ENTRY_SIZE
            size = min(tailroom, remaining)
            remaining -= size
            chunk = data[offset : offset + size]
            data_entries = (size + ENTRY_SIZE - 1) // ENTRY_SIZE
            self.page.put(_entry(ns, NvsType.BLOB_DATA, data_entries + 1, chunks, key, _varlen(size, chunk)), 1)
            self.page.put(chunk, data_entries)
            chunks += 1
            if remaining or tailroom - size < ENTRY_SIZE:
                self.new_page()
            offset += size
            if not remaining:
                index = NVS_BLOB_INDEX_LAYOUT.pack({"size": len(data), "chunk_count": chunks, "chunk_start": 0, "reserved": 0xFFFF})
                self.page.put(_entry(ns, NvsType.BLOB_IDX, 1, CHUNK_ANY, key, index), 1)
                return

    def image(self) -> bytes:
        body = b"".join(bytes(p.buf) for p in self.pages)
        return body + b"\xff" * (self.size - len(body))


def build_nvs_image(items: Sequence[NvsValue], size: int) -> bytes:
    """A format-2 NVS partition of *size* bytes holding *items* in order (see the module doc)."""
    writer = _ImageWriter(size)
    for item in items:
        ns = writer.namespace(item.namespace)
        if item.type in PRIMITIVE_TYPES:
            writer.primitive(ns, item.key, item.type, item.value)
        elif item.type is NvsType.SZ:
            writer.string(ns, item.key, item.value)
        else:
            writer.blob(ns, item.key, item.value)
    return writer.image()


class NvsStore:
    """The ``nvs`` partition of a running board (``nvs_open`` / ``nvs_set_*`` / ``nvs_commit``).

    Loaded from flash once; every :meth:`commit` rewrites the partition with the live
    items in write order (a changed key moves to the end, as an appended entry would).
    A partition ESP-IDF could not read is erased at load, as RainMaker's examples do
    when ``nvs_flash_init`` fails (``nvs_flash_erase`` then init again).
    """

    def __init__(self, flash: FlashStorage, partition: PartitionEntry):
        self.flash = flash
        self.partition = partition
        self._lock = threading.RLock()
        self._items: dict[tuple[str, str], NvsValue] = {}
        self.recovered_from: str | None = None
        """Why the partition was erased at load (it did not parse), or None."""
        image = flash.read(partition.offset, partition.size)
        try:
            loaded = read_nvs_items(image, what=f"{partition.label} partition")
        except FirmwareFormatError as exc:
            self.recovered_from = str(exc)
            self.erase_partition()
            return
        for item in loaded:
            item_type = NvsType.BLOB_DATA if item.type is NvsType.BLOB else item.type
            self._items[(item.namespace, item.key)] = NvsValue(item.namespace, item.key, item_type, item.value)

    # ------------------------------------------------------------------ reading

    def get(self, namespace: str, key: str) -> bytes | None:
        with self._lock:
            item = self._items.get((namespace, key))
            return None if item is None else item.value

    def get_u8(self, namespace: str, key: str) -> int | None:
        value = self.get(namespace, key)
        return None if value is None else value[0]

    def items(self) -> list[NvsValue]:
        with self._lock:
            return list(self._items.values())

    # ------------------------------------------------------------------ writing

    def set(self, namespace: str, key: str, item_type: NvsType, value: bytes) -> None:
        item = NvsValue(namespace, key, item_type, value)
        with self._lock:
            if self._items.get((namespace, key)) == item:
                return
            self._items.pop((namespace, key), None)
            self._items[(namespace, key)] = item

    def set_blob(self, namespace: str, key: str, value: bytes) -> None:
        self.set(namespace, key, NvsType.BLOB_DATA, value)

    def set_str(self, namespace: str, key: str, value: str) -> None:
        self.set(namespace, key, NvsType.SZ, value.encode())

    def set_u8(self, namespace: str, key: str, value: int) -> None:
        self.set(namespace, key, NvsType.U8, bytes([value]))

    def erase_key(self, namespace: str, key: str) -> None:
        with self._lock:
            self._items.pop((namespace, key), None)

    def erase_namespace(self, namespace: str) -> None:
        """``nvs_erase_all`` on a handle of *namespace*."""
        with self._lock:
            for ns, key in [k for k in self._items if k[0] == namespace]:
                del self._items[(ns, key)]

    def commit(self) -> None:
        """Write the live items to flash (``nvs_commit``)."""
        with self._lock:
            image = build_nvs_image(list(self._items.values()), self.partition.size)
            current = self.flash.read(self.partition.offset, self.partition.size)
            if current == image:
                return
            self.flash.erase(self.partition.offset, self.partition.size)
            self.flash.write(self.partition.offset, image)

    def erase_partition(self) -> None:
        """``nvs_flash_erase``: every sector of the partition back to 0xFF, nothing cached."""
        with self._lock:
            self._items.clear()
            self.flash.erase(self.partition.offset, self.partition.size)

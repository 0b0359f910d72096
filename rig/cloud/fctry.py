"""A node's ``fctry`` NVS partition (its cloud credentials), and a reader for NVS partitions.

Writing follows ``rmaker claim`` exactly (esp-rainmaker-cli
``rmaker_tools/rmaker_claim/claim.py``: ``set_csv_file_data``, ``save_claim_data``,
``save_random_hex_str``, ``gen_nvs_partition_bin``; rainmaker-protocol.md §8.2): a
``node_info.csv``::

    key,type,encoding,value
    rmaker_creds,namespace,,
    node_id,file,binary,<dir>/node.info
    mqtt_host,file,binary,<dir>/endpoint.info
    client_cert,file,binary,<node cert PEM>
    client_key,file,binary,<node key PEM>
    random,file,hex2bin,<dir>/random.info

turned into a 0x6000-byte, version 2 (multipage blob) image by Espressif's
``esp-idf-nvs-partition-gen`` (its ``generate`` command, the same function claim.py
calls). The firmware reads every key with ``nvs_get_blob`` from namespace
``rmaker_creds`` of partition ``fctry`` (esp-rainmaker-common ``src/factory.c``).
``random`` is 64 random bytes, written as hex and stored as binary (``hex2bin``).

One key is the rig's own: ``server_cert``, the lab CA (PEM) the node trusts for the
broker and the OTA host. Real RainMaker firmware compiles its server root CA in
(``mqtt_server.crt``); a virtual node's images are shared by every lab, so its trust
anchor comes with its identity instead. Real firmware ignores the extra key.

Reading is the rig's own, from the NVS format (esp-idf
``docs/en/api-reference/storage/nvs_flash.rst``, ``components/nvs_flash/src/nvs_page.hpp``,
``nvs_types.hpp``; rainmaker-protocol.md §8.3), because the virtual board needs it to
read ``fctry`` out of its flash and a test needs it to check what the generator wrote:

- 4096-byte pages: a 32-byte header (state, sequence number, version, 19 reserved bytes,
  CRC32 of bytes 4..27), a 32-byte entry-state bitmap (2 bits per entry: ``11`` empty,
  ``10`` written, ``00`` erased), 126 entries of 32 bytes;
- an entry: namespace index, type, span, chunk index, CRC32 (of bytes 0..3 and 8..31),
  a 16-byte NUL-terminated key, 8 bytes of data. Strings and blob chunks carry size +
  data CRC32 there and their data in the next ``span - 1`` entries; a v2 blob is data
  chunks (type 0x42) plus an index entry (0x48: total size, chunk count, chunk start);
- namespace names are U8 entries in namespace 0 whose value is the namespace's index.

All CRCs are ``esp_rom_crc32_le(0xFFFFFFFF, …)`` = ``zlib.crc32(data, 0xFFFFFFFF)``.
The reader is stricter than ESP-IDF's runtime, which silently erases an entry with a
bad CRC: here any inconsistency is a :class:`FirmwareFormatError` naming the byte
offset, because a factory partition that fails a check is a rig bug or tampering.

Encrypted NVS (§8.3; esp-idf ``docs/en/api-reference/storage/nvs_encryption.rst``,
``components/nvs_flash/src/nvs_encrypted_partition.cpp``) is read when the caller passes
the partition's :class:`~rig.firmware.nvs_encryption.NvsXtsKeys`: every written entry is
XTS-AES-decrypted with its partition-relative address before it is parsed (page headers
and bitmaps are never encrypted), and all CRCs are then checked over the plaintext, as
the firmware computes them. Without keys, a partition none of whose written entries
passes its CRC raises :class:`NvsEncryptedError` (it looks encrypted); some passing and
some failing is corruption, an ordinary :class:`FirmwareFormatError`. What can be read
off an encrypted partition without keys — which entries are written, and their
ciphertext — is :func:`nvs_written_entries`.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path

from rig.cloud.pki import CertPair
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.layout import Field, Layout, cstr
from rig.firmware.nvs_encryption import NvsXtsKeys

__all__ = [
    "FCTRY_KEYS",
    "FCTRY_NAMESPACE",
    "FCTRY_PARTITION_NAME",
    "FCTRY_PARTITION_SIZE",
    "NVS_ENTRY_LAYOUT",
    "NVS_PAGE_HEADER_LAYOUT",
    "SERVER_CERT_KEY",
    "FctryImage",
    "NvsEncryptedError",
    "NvsItem",
    "NvsType",
    "build_fctry",
    "entry_crc32",
    "nvs_crc32",
    "nvs_written_entries",
    "page_header_crc32",
    "read_fctry",
    "read_nvs",
    "read_nvs_items",
]

FCTRY_PARTITION_NAME = "fctry"
"""``CONFIG_ESP_RMAKER_FACTORY_PARTITION_NAME``."""
FCTRY_NAMESPACE = "rmaker_creds"
"""``CONFIG_ESP_RMAKER_FACTORY_NAMESPACE``."""
FCTRY_PARTITION_SIZE = 0x6000
"""claim.py ``gen_nvs_partition_bin``: ``size='0x6000'``; the fctry partition in §8.1 is 0x6000 too."""
FCTRY_KEYS = ("node_id", "mqtt_host", "client_cert", "client_key", "random")
SERVER_CERT_KEY = "server_cert"  # rig-specific: the lab CA a virtual node trusts (see module docstring)
RANDOM_SIZE = 64
"""claim.py ``gen_hex_str(octets=64)``."""

PAGE_SIZE = 4096
ENTRY_SIZE = 32
ENTRY_COUNT = 126
BITMAP_OFFSET = 32
FIRST_ENTRY_OFFSET = 64
CHUNK_ANY = 0xFF

NVS_PAGE_HEADER_LAYOUT = Layout(
    "nvs page header",
    [
        Field("state", "I", "PageState: 0xFFFFFFFF uninitialized, …FE active, …FC full, …F8 freeing, …F0 corrupt"),
        Field("seq_no", "I", "page sequence number; a later page wins"),
        Field("version", "B", "0xFF = version 1, 0xFE = version 2 (multipage blobs)"),
        Field("reserved", "19s", "unused, 0xFF"),
        Field("crc32", "I", "esp_rom_crc32_le(0xFFFFFFFF) over seq_no, version, reserved (bytes 4..27)"),
    ],
    source="esp-idf components/nvs_flash/src/nvs_page.hpp (Page::Header)",
)
NVS_ENTRY_LAYOUT = Layout(
    "nvs entry",
    [
        Field("ns", "B", "namespace index; 0 holds the namespace names"),
        Field("type", "B", "ItemType"),
        Field("span", "B", "entries this item occupies, itself included"),
        Field("chunk_index", "B", "blob chunk number, 0xFF otherwise"),
        Field("crc32", "I", "esp_rom_crc32_le(0xFFFFFFFF) over bytes 0..3 and 8..31"),
        Field("key", "16s", "NUL-terminated, at most 15 characters"),
        Field("data", "8s", "primitive value, varLength or blobIndex"),
    ],
    source="esp-idf components/nvs_flash/src/nvs_types.hpp (class Item)",
)
NVS_VARLEN_LAYOUT = Layout(
    "nvs varLength",
    [Field("size", "H"), Field("reserved", "H"), Field("data_crc32", "I")],
    source="esp-idf components/nvs_flash/src/nvs_types.hpp (Item::varLength)",
)
NVS_BLOB_INDEX_LAYOUT = Layout(
    "nvs blobIndex",
    [Field("size", "I"), Field("chunk_count", "B"), Field("chunk_start", "B"), Field("reserved", "H")],
    source="esp-idf components/nvs_flash/src/nvs_types.hpp (Item::blobIndex)",
)
assert NVS_PAGE_HEADER_LAYOUT.size == 32 and NVS_ENTRY_LAYOUT.size == ENTRY_SIZE

PAGE_ACTIVE = 0xFFFFFFFE
PAGE_FULL = 0xFFFFFFFC
PAGE_FREEING = 0xFFFFFFF8
PAGE_UNINITIALIZED = 0xFFFFFFFF
READABLE_PAGE_STATES = {PAGE_ACTIVE: "active", PAGE_FULL: "full", PAGE_FREEING: "freeing"}
NVS_VERSION_2 = 0xFE
NVS_VERSIONS = {0xFF: 1, NVS_VERSION_2: 2}

ENTRY_EMPTY, ENTRY_WRITTEN, ENTRY_ERASED = 0b11, 0b10, 0b00


class NvsType(IntEnum):
    """``nvs::ItemType`` (``nvs_types.hpp``)."""

    U8 = 0x01
    I8 = 0x11
    U16 = 0x02
    I16 = 0x12
    U32 = 0x04
    I32 = 0x14
    U64 = 0x08
    I64 = 0x18
    SZ = 0x21
    BLOB = 0x41
    BLOB_DATA = 0x42
    BLOB_IDX = 0x48


PRIMITIVE_TYPES = {NvsType.U8, NvsType.I8, NvsType.U16, NvsType.I16, NvsType.U32, NvsType.I32, NvsType.U64, NvsType.I64}
VARLEN_TYPES = {NvsType.SZ, NvsType.BLOB, NvsType.BLOB_DATA}


@dataclass(frozen=True)
class NvsItem:
    """One key's value as the NVS API would return it.

    ``value`` is the stored bytes: a blob's bytes (v2 chunks joined), a string without its
    terminating NUL, a primitive as its little-endian bytes (1, 2, 4 or 8). ``offset`` is
    where the entry that names the item sits in the partition (for a v2 blob: its index
    entry, written after the chunks).
    """

    namespace: str
    key: str
    type: NvsType
    value: bytes
    offset: int


class NvsEncryptedError(FirmwareFormatError):
    """An NVS partition read without keys whose written entries all fail their CRC: it looks encrypted.

    With NVS encryption every entry is XTS-AES ciphertext, so no entry CRC (computed by
    the firmware over the plaintext) can match; a partition where some entries pass is
    corrupt instead, an ordinary :class:`FirmwareFormatError`. Read it again with
    ``keys=`` (:class:`~rig.firmware.nvs_encryption.NvsXtsKeys`).
    """


@dataclass(frozen=True)
class FctryImage:
    """A generated ``fctry`` partition and the claim-style inputs it was made from."""

    bin_path: Path
    csv_path: Path
    node_id: str

    @property
    def data(self) -> bytes:
        return self.bin_path.read_bytes()


def nvs_crc32(data: bytes) -> int:
    """``esp_rom_crc32_le(0xFFFFFFFF, …)``, the CRC of every NVS structure (module docstring)."""
    return zlib.crc32(data, 0xFFFFFFFF)


def page_header_crc32(header: bytes) -> int:
    """A page header's CRC32: over bytes 4..27 (``NVS_PAGE_HEADER_LAYOUT``'s ``crc32``)."""
    return nvs_crc32(header[4:28])


def entry_crc32(entry: bytes) -> int:
    """An entry's CRC32: over bytes 0..3 and 8..31, its own CRC field left out (``NVS_ENTRY_LAYOUT``)."""
    return nvs_crc32(entry[0:4] + entry[8:32])


# -- writing ---------------------------------------------------------------------------


def build_fctry(
    dest: Path, node_id: str, mqtt_host: str, creds: CertPair, random: bytes | None = None, server_cert: Path | None = None
) -> FctryImage:
    """Write ``dest/node_info.csv`` and its inputs as ``rmaker claim`` does, and generate ``dest/fctry.bin``.

    *creds* is the node's certificate and key from the lab PKI (its CN must be *node_id*);
    the CSV points at those files rather than copying the private key. *random* (64
    bytes) defaults to ``os.urandom(64)``. *server_cert* (the lab CA PEM) adds the
    ``server_cert`` key. *mqtt_host* is ``host`` or ``host:port`` (a port other than
    8883, as the local stack's test mode uses). The generator runs as a subprocess (``python -m
    esp_idf_nvs_partition_gen generate … 0x6000 --version 2``): its own failures exit the
    process, and its output stays out of the rig's.
    """
    if creds.common_name != node_id:
        raise ValueError(f"certificate CN {creds.common_name!r} is not node id {node_id!r}; the broker would refuse this node")
    random = os.urandom(RANDOM_SIZE) if random is None else random
    if len(random) != RANDOM_SIZE:
        raise ValueError(f"random must be {RANDOM_SIZE} bytes (claim.py gen_hex_str), got {len(random)}")
    files = [("certificate", creds.cert_path), ("key", creds.key_path)]
    if server_cert is not None:
        files.append(("server certificate", Path(server_cert)))
    for what, path in files:
        if "," in str(path) or "\n" in str(path):
            raise ValueError(f"the node {what} path {path} cannot go into a CSV cell")
    dest = Path(dest).resolve()
    if "," in str(dest):
        raise ValueError(f"{dest} cannot go into a CSV cell (comma)")
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "node.info").write_text(node_id)
    (dest / "endpoint.info").write_text(mqtt_host)
    (dest / "random.info").write_text(random.hex())
    rows = [
        "key,type,encoding,value",
        f"{FCTRY_NAMESPACE},namespace,,",
        f"node_id,file,binary,{dest / 'node.info'}",
        f"mqtt_host,file,binary,{dest / 'endpoint.info'}",
        f"client_cert,file,binary,{creds.cert_path.resolve()}",
        f"client_key,file,binary,{creds.key_path.resolve()}",
        f"random,file,hex2bin,{dest / 'random.info'}",
    ]
    if server_cert is not None:
        rows.append(f"{SERVER_CERT_KEY},file,binary,{Path(server_cert).resolve()}")
    csv_path = dest / "node_info.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    bin_path = dest / "fctry.bin"
    bin_path.unlink(missing_ok=True)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "esp_idf_nvs_partition_gen",
            "generate",
            str(csv_path),
            bin_path.name,
            hex(FCTRY_PARTITION_SIZE),
            "--version",
            "2",
            "--outdir",
            str(dest),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if run.returncode != 0 or not bin_path.exists():
        output = (run.stdout + run.stderr).strip()[-2000:]
        raise RuntimeError(
            f"esp-idf-nvs-partition-gen failed (exit {run.returncode}) on {csv_path}: {output}\n"
            "Fix: `make install` provides esp-idf-nvs-partition-gen in .venv"
        )
    return FctryImage(bin_path=bin_path, csv_path=csv_path, node_id=node_id)


# -- reading ------------------------------------------------------------------------------


def _entry_state(bitmap: bytes, index: int) -> int:
    return (bitmap[index // 4] >> ((index % 4) * 2)) & 0b11


def _decode_key(raw: bytes, what: str, offset: int) -> str:
    if b"\0" not in raw:
        raise FirmwareFormatError(what, "entry key has no terminating NUL", offset + NVS_ENTRY_LAYOUT.offset_of("key"))
    key = cstr(raw)
    if not key or not key.isprintable():
        raise FirmwareFormatError(what, f"entry key {key!r} is empty or not printable", offset + NVS_ENTRY_LAYOUT.offset_of("key"))
    return key


@dataclass(frozen=True)
class _Raw:
    """An entry as read from one page, before namespaces and blob chunks are resolved."""

    ns: int
    type: NvsType
    key: str
    chunk_index: int
    payload: bytes
    blob_size: int
    chunk_count: int
    chunk_start: int
    offset: int


def _check_partition_size(image: bytes, what: str) -> None:
    if len(image) == 0 or len(image) % PAGE_SIZE:
        raise FirmwareFormatError(what, f"size {len(image)} is not a positive multiple of the {PAGE_SIZE}-byte NVS page", 0)


def _page_header(image: bytes, base: int, what: str) -> dict[str, int] | None:
    """The checked header of the page at *base*, or None for an uninitialized (erased) page."""
    header = NVS_PAGE_HEADER_LAYOUT.unpack(image, base, what)
    if header["state"] == PAGE_UNINITIALIZED:
        return None
    if header["state"] not in READABLE_PAGE_STATES:
        raise FirmwareFormatError(what, f"page state 0x{header['state']:08x} is not active, full or freeing", base)
    if page_header_crc32(image[base : base + 32]) != header["crc32"]:
        raise FirmwareFormatError(what, f"page header CRC32 mismatch (stored 0x{header['crc32']:08x})", base + 28)
    if header["version"] not in NVS_VERSIONS:
        raise FirmwareFormatError(what, f"unknown NVS format version byte 0x{header['version']:02x}", base + 8)
    return header


def _impossible_state(what: str, base: int, index: int, state: int) -> FirmwareFormatError:
    """``0b01`` in the entry-state bitmap: no state ESP-IDF writes (``nvs_page.hpp`` ``EntryState``)."""
    return FirmwareFormatError(what, f"entry {index} has the impossible state bits 0b{state:02b}", base + BITMAP_OFFSET + index // 4)


def _crc_census(image: bytes, what: str) -> tuple[int, int]:
    """``(passed, written)``: written entries (:func:`nvs_written_entries`), each taken as an item
    header, whose entry CRC32 matches. It only classifies a CRC failure the parser already hit:
    data entries are counted too, but their chance of passing a CRC by accident is 2^-32, so
    ``passed == 0`` means no item header is intact."""
    entries = nvs_written_entries(image, what)
    passed = sum(entry_crc32(raw) == NVS_ENTRY_LAYOUT.unpack(raw)["crc32"] for raw in entries.values())
    return passed, len(entries)


def _entry_crc_error(image: bytes, what: str, offset: int, stored: int, decrypted: bool) -> FirmwareFormatError:
    """The error for the entry at *offset* failing its CRC: corruption, or a whole partition in the wrong cipher state."""
    passed, written = _crc_census(image, what)
    if passed:
        return FirmwareFormatError(what, f"entry CRC32 mismatch (stored 0x{stored:08x})", offset)
    if decrypted:
        return FirmwareFormatError(
            what,
            f"none of its {written} written entries passes its CRC32 after XTS-AES decryption: "
            "the keys do not match this partition, or it is not encrypted",
            offset,
            "use the keys of this device (its nvs_keys partition, or its HMAC eFuse key), or read a plaintext partition without keys",
        )
    return NvsEncryptedError(
        what,
        f"none of its {written} written entries passes its CRC32: the partition looks encrypted (NVS encryption, XTS-AES) "
        "and needs its XTS keys",
        offset,
        "pass keys=NvsXtsKeys.from_keys_partition(<nvs_keys partition>) or NvsXtsKeys.from_hmac_key(<eFuse HMAC key>)",
    )


def _parse_page(image: bytes, base: int, what: str, decrypted: bool = False) -> tuple[int, list[_Raw]] | None:
    """The page at *base*: ``(seq_no, entries)``, or None for an uninitialized (erased) page.

    *image* holds plaintext entries; *decrypted* says they were XTS-decrypted by the
    caller, which only changes what a CRC failure is blamed on (:func:`_entry_crc_error`).
    """
    header = _page_header(image, base, what)
    if header is None:
        return None
    bitmap = image[base + BITMAP_OFFSET : base + BITMAP_OFFSET + 32]
    entries: list[_Raw] = []
    index = 0
    while index < ENTRY_COUNT:
        state = _entry_state(bitmap, index)
        offset = base + FIRST_ENTRY_OFFSET + index * ENTRY_SIZE
        if state in (ENTRY_EMPTY, ENTRY_ERASED):
            index += 1
            continue
        if state != ENTRY_WRITTEN:
            raise _impossible_state(what, base, index, state)
        entry = NVS_ENTRY_LAYOUT.unpack(image, offset, what)
        if entry_crc32(image[offset : offset + ENTRY_SIZE]) != entry["crc32"]:
            raise _entry_crc_error(image, what, offset, entry["crc32"], decrypted)
        try:
            item_type = NvsType(entry["type"])
        except ValueError:
            raise FirmwareFormatError(what, f"unknown item type 0x{entry['type']:02x}", offset + 1) from None
        span = entry["span"]
        if span < 1 or index + span > ENTRY_COUNT:
            raise FirmwareFormatError(what, f"entry span {span} runs past the page's {ENTRY_COUNT} entries", offset + 2)
        for follower in range(index + 1, index + span):
            if _entry_state(bitmap, follower) != ENTRY_WRITTEN:
                raise FirmwareFormatError(what, f"data entry {follower} of a {span}-entry item is not marked written", offset)
        key = _decode_key(entry["key"], what, offset)
        payload, blob_size, chunk_count, chunk_start = entry["data"], 0, 0, 0
        if item_type in VARLEN_TYPES:
            varlen = NVS_VARLEN_LAYOUT.unpack(entry["data"], 0, what)
            needed = 1 + (varlen["size"] + ENTRY_SIZE - 1) // ENTRY_SIZE
            if span != needed:
                problem = f"{varlen['size']}-byte {item_type.name} needs span {needed}, entry says {span}"
                raise FirmwareFormatError(what, problem, offset + 2)
            payload = image[offset + ENTRY_SIZE : offset + ENTRY_SIZE + varlen["size"]]
            if nvs_crc32(payload) != varlen["data_crc32"]:
                raise FirmwareFormatError(what, f"data CRC32 mismatch for key {key!r}", offset + ENTRY_SIZE)
        elif item_type is NvsType.BLOB_IDX:
            index_fields = NVS_BLOB_INDEX_LAYOUT.unpack(entry["data"], 0, what)
            blob_size, chunk_count, chunk_start = index_fields["size"], index_fields["chunk_count"], index_fields["chunk_start"]
        elif span != 1:
            raise FirmwareFormatError(what, f"primitive {item_type.name} entry has span {span}", offset + 2)
        entries.append(_Raw(entry["ns"], item_type, key, entry["chunk_index"], payload, blob_size, chunk_count, chunk_start, offset))
        index += span
    return header["seq_no"], entries


def nvs_written_entries(image: bytes, what: str = "NVS partition") -> dict[int, bytes]:
    """Partition offset → the raw 32 bytes of every entry marked written, in offset order.

    Item headers and the data entries after them alike, neither decrypted nor parsed:
    what a tester can read off an encrypted partition without its keys (the bitmaps
    are plaintext), e.g. to compare ciphertext before and after a factory reset. Page
    headers are checked as :func:`read_nvs_items` checks them; uninitialized pages are
    skipped.
    """
    _check_partition_size(image, what)
    out: dict[int, bytes] = {}
    for base in range(0, len(image), PAGE_SIZE):
        if _page_header(image, base, what) is None:
            continue
        bitmap = image[base + BITMAP_OFFSET : base + BITMAP_OFFSET + 32]
        for index in range(ENTRY_COUNT):
            state = _entry_state(bitmap, index)
            offset = base + FIRST_ENTRY_OFFSET + index * ENTRY_SIZE
            if state == ENTRY_WRITTEN:
                out[offset] = bytes(image[offset : offset + ENTRY_SIZE])
            elif state not in (ENTRY_EMPTY, ENTRY_ERASED):
                raise _impossible_state(what, base, index, state)
    return out


def _decrypt_written_entries(image: bytes, keys: NvsXtsKeys, what: str) -> bytes:
    """*image* with every written entry XTS-decrypted at its partition offset; headers, bitmaps, empty entries as they are.

    The data entries of a string or blob are marked written like their header
    (``Page::writeItem``), so they are decrypted too; the parser refuses an item whose
    data entries are not marked written.
    """
    plain = bytearray(image)
    for offset, raw in nvs_written_entries(image, what).items():
        plain[offset : offset + ENTRY_SIZE] = keys.decrypt(offset, raw)
    return bytes(plain)


def read_nvs_items(image: bytes, what: str = "NVS partition", keys: NvsXtsKeys | None = None) -> list[NvsItem]:
    """Every live key of an NVS partition, in page order; a later write of a key wins.

    *keys* reads an encrypted partition (module docstring); without them, an encrypted
    one raises :class:`NvsEncryptedError`.
    """
    _check_partition_size(image, what)
    if keys is not None:
        image = _decrypt_written_entries(image, keys, what)
    pages: list[tuple[int, int, list[_Raw]]] = []
    for base in range(0, len(image), PAGE_SIZE):
        parsed = _parse_page(image, base, what, decrypted=keys is not None)
        if parsed is not None:
            pages.append((parsed[0], base, parsed[1]))
    pages.sort()
    raws = [raw for _, _, entries in pages for raw in entries]

    namespaces: dict[int, str] = {}
    for raw in raws:
        if raw.ns == 0:
            if raw.type is not NvsType.U8:
                raise FirmwareFormatError(what, f"namespace entry {raw.key!r} has type {raw.type.name}, not U8", raw.offset + 1)
            namespaces[raw.payload[0]] = raw.key

    chunks = {(raw.ns, raw.key, raw.chunk_index): raw for raw in raws if raw.type is NvsType.BLOB_DATA}
    items: dict[tuple[str, str], NvsItem] = {}
    for raw in raws:
        if raw.ns == 0 or raw.type is NvsType.BLOB_DATA:
            continue
        namespace = namespaces.get(raw.ns)
        if namespace is None:
            raise FirmwareFormatError(what, f"key {raw.key!r} uses namespace index {raw.ns}, which has no name entry", raw.offset)
        if raw.type is NvsType.BLOB_IDX:
            parts = []
            for n in range(raw.chunk_count):
                chunk = chunks.get((raw.ns, raw.key, raw.chunk_start + n))
                if chunk is None:
                    raise FirmwareFormatError(what, f"blob {raw.key!r} lacks chunk {raw.chunk_start + n}", raw.offset)
                parts.append(chunk.payload)
            value = b"".join(parts)
            if len(value) != raw.blob_size:
                problem = f"blob {raw.key!r} chunks hold {len(value)} bytes, its index says {raw.blob_size}"
                raise FirmwareFormatError(what, problem, raw.offset)
            item_type = NvsType.BLOB_DATA
        elif raw.type is NvsType.SZ:
            if not raw.payload.endswith(b"\0"):
                raise FirmwareFormatError(what, f"string {raw.key!r} is not NUL-terminated", raw.offset + ENTRY_SIZE)
            value, item_type = raw.payload[:-1], raw.type
        elif raw.type is NvsType.BLOB:
            value, item_type = raw.payload, raw.type
        else:
            value, item_type = raw.payload[: raw.type & 0x0F], raw.type
        items[(namespace, raw.key)] = NvsItem(namespace, raw.key, item_type, value, raw.offset)
    return list(items.values())


def read_nvs(image: bytes, what: str = "NVS partition", keys: NvsXtsKeys | None = None) -> dict[str, dict[str, bytes]]:
    """``{namespace: {key: value bytes}}`` of an NVS partition (see :class:`NvsItem` for the value forms).

    *keys* as for :func:`read_nvs_items`.
    """
    out: dict[str, dict[str, bytes]] = {}
    for item in read_nvs_items(image, what, keys):
        out.setdefault(item.namespace, {})[item.key] = item.value
    return out


def read_fctry(image: bytes) -> Mapping[str, bytes]:
    """The ``rmaker_creds`` keys of a ``fctry`` partition; a missing key is a :class:`FirmwareFormatError`."""
    creds = read_nvs(image, what=f"{FCTRY_PARTITION_NAME} partition").get(FCTRY_NAMESPACE, {})
    missing = [k for k in FCTRY_KEYS if k not in creds]
    if missing:
        raise FirmwareFormatError(
            f"{FCTRY_PARTITION_NAME} partition",
            f"namespace {FCTRY_NAMESPACE!r} lacks {', '.join(missing)}",
            None,
            "flash the node's fctry image made by rig.cloud.fctry.build_fctry (rig provision)",
        )
    return creds

"""The node's ``fctry`` partition (rig.cloud.fctry): made by Espressif's generator as ``rmaker claim``
does, read back by the rig's own NVS parser, and every CRC checked.

The parser is judged against ``esp-idf-nvs-partition-gen`` itself: images it wrote
(through the claim-style CSV, and through its Python API for what ``fctry`` does not
exercise — multi-page v2 blobs, v1 blobs, strings, every integer type, two namespaces)
must read back to exactly what went in.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import pytest
from esp_idf_nvs_partition_gen import nvs_partition_gen as nvs_gen

from rig.cloud.fctry import (
    FCTRY_NAMESPACE,
    FCTRY_PARTITION_SIZE,
    NVS_ENTRY_LAYOUT,
    NVS_PAGE_HEADER_LAYOUT,
    SERVER_CERT_KEY,
    NvsType,
    build_fctry,
    read_fctry,
    read_nvs,
    read_nvs_items,
)
from rig.cloud.pki import CertPair, LabPki
from rig.firmware.errors import FirmwareFormatError

RANDOM = bytes(range(64))
PAGE = 4096
FIRST_ENTRY = 64


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return LabPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def fctry_image(pki: LabPki, tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build_fctry(tmp_path_factory.mktemp("fctry"), "58CF79DAC1E4", "localhost", pki.node_cert("58CF79DAC1E4"), RANDOM).data


def expected_creds(node_id: str, host: str, pair: CertPair, random: bytes) -> dict[str, bytes]:
    return {
        "node_id": node_id.encode(),
        "mqtt_host": host.encode(),
        "client_cert": pair.cert_pem,
        "client_key": pair.key_path.read_bytes(),
        "random": random,
    }


# -- writing: as rmaker claim does ------------------------------------------------------------


@pytest.mark.parametrize("key_type", ["ec", "rsa"])
def test_fctry_round_trip(pki: LabPki, tmp_path: Path, key_type: str) -> None:
    node_id = f"node{key_type.upper()}0001"
    pair = pki.node_cert(node_id, key_type=key_type)  # type: ignore[arg-type]
    image = build_fctry(tmp_path, node_id, "mqtt.rig.local", pair, RANDOM)
    assert len(image.data) == FCTRY_PARTITION_SIZE
    assert read_nvs(image.data) == {FCTRY_NAMESPACE: expected_creds(node_id, "mqtt.rig.local", pair, RANDOM)}
    assert dict(read_fctry(image.data)) == expected_creds(node_id, "mqtt.rig.local", pair, RANDOM)
    # nvs_get_blob everywhere (esp-rainmaker-common src/factory.c): v2 blobs, not strings.
    assert {item.type for item in read_nvs_items(image.data)} == {NvsType.BLOB_DATA}


def test_claim_csv_rows(pki: LabPki, tmp_path: Path) -> None:
    pair = pki.node_cert("nodeCsv0001")
    image = build_fctry(tmp_path, "nodeCsv0001", "localhost", pair)
    rows = [line.split(",") for line in image.csv_path.read_text().splitlines()]
    assert [r[:3] for r in rows] == [
        ["key", "type", "encoding"],
        ["rmaker_creds", "namespace", ""],
        ["node_id", "file", "binary"],
        ["mqtt_host", "file", "binary"],
        ["client_cert", "file", "binary"],
        ["client_key", "file", "binary"],
        ["random", "file", "hex2bin"],
    ]
    files = {r[0]: Path(r[3]) for r in rows[2:]}
    assert files["node_id"].read_text() == "nodeCsv0001"
    assert files["client_key"] == pair.key_path.resolve()  # referenced, not copied
    random = bytes.fromhex(files["random"].read_text())
    assert len(random) == 64 and read_fctry(image.data)["random"] == random


def test_fctry_refuses_credentials_of_another_node(pki: LabPki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="is not node id"):
        build_fctry(tmp_path, "nodeOther01", "localhost", pki.node_cert("nodeMine001"))


def test_fctry_page_layout(fctry_image: bytes) -> None:
    """Page 0 active, the rest erased (the generator keeps the last page in reserve)."""
    pages = [NVS_PAGE_HEADER_LAYOUT.unpack(fctry_image, base) for base in range(0, FCTRY_PARTITION_SIZE, PAGE)]
    assert pages[0]["state"] == 0xFFFFFFFE and pages[0]["version"] == 0xFE and pages[0]["seq_no"] == 0
    assert all(p["state"] == 0xFFFFFFFF for p in pages[1:])


# -- reading: against the generator's Python API ----------------------------------------------


def generate(version: int, rows: list[tuple[str, str, str, str]], size: int = 0x6000) -> bytes:
    """An image from ``nvs_partition_gen``'s own API (``nvs_open``/``write_entry``/``nvs_close``)."""
    out = io.BytesIO()
    nvs = nvs_gen.nvs_open(out, size - PAGE, version)  # the generator reserves one page, as its CLI does
    for key, kind, encoding, value in rows:
        nvs_gen.write_entry(nvs, key, kind, encoding, value)
    nvs_gen.nvs_close(nvs)
    return out.getvalue()


def test_reader_matches_the_generator_v2_multipage(tmp_path: Path) -> None:
    big = bytes((i * 7) % 251 for i in range(9000))  # > 2 pages: chunks on three pages
    image = generate(
        nvs_gen.Page.VERSION2,
        [
            ("first", "namespace", "", ""),
            ("u8", "data", "u8", "200"),
            ("i8", "data", "i8", "-5"),
            ("u16", "data", "u16", "65535"),
            ("i16", "data", "i16", "-300"),
            ("u32", "data", "u32", "4000000000"),
            ("i32", "data", "i32", "-70000"),
            ("u64", "data", "u64", str(2**63 + 5)),
            ("i64", "data", "i64", str(-(2**40))),
            ("greeting", "data", "string", "héllo wörld"),
            ("big", "data", "hex2bin", big.hex()),
            ("second", "namespace", "", ""),
            ("b64", "data", "base64", "cmlnIGxhYg=="),
            ("u8", "data", "u8", "7"),
        ],
        size=0x5000,
    )
    got = read_nvs(image)
    assert got == {
        "first": {
            "u8": struct.pack("<B", 200),
            "i8": struct.pack("<b", -5),
            "u16": struct.pack("<H", 65535),
            "i16": struct.pack("<h", -300),
            "u32": struct.pack("<I", 4000000000),
            "i32": struct.pack("<i", -70000),
            "u64": struct.pack("<Q", 2**63 + 5),
            "i64": struct.pack("<q", -(2**40)),
            "greeting": "héllo wörld".encode(),
            "big": big,
        },
        "second": {"b64": b"rig lab", "u8": b"\x07"},
    }
    chunks = {(base // PAGE) for base in range(0, len(image), PAGE) if b"big" in image[base : base + PAGE]}
    assert len(chunks) == 3, "the blob was meant to span three pages"
    types = {(i.namespace, i.key): i.type for i in read_nvs_items(image)}
    assert types[("first", "greeting")] is NvsType.SZ and types[("first", "big")] is NvsType.BLOB_DATA


def test_reader_matches_the_generator_v1_blob() -> None:
    blob = bytes(range(256)) * 7  # 1792 bytes, under v1's 1984-byte limit
    image = generate(nvs_gen.Page.VERSION1, [("ns", "namespace", "", ""), ("blob", "data", "hex2bin", blob.hex())])
    assert read_nvs(image) == {"ns": {"blob": blob}}
    assert read_nvs_items(image)[0].type is NvsType.BLOB


# -- corruption: a clear error with the offset --------------------------------------------------------


def corrupt(image: bytes, offset: int, xor: int = 0x01) -> bytes:
    data = bytearray(image)
    data[offset] ^= xor
    return bytes(data)


def test_entry_crc_is_checked(fctry_image: bytes) -> None:
    entry = FIRST_ENTRY + 32  # entry 1: the first node_id chunk (entry 0 names the namespace)
    assert read_nvs_items(fctry_image)  # sanity: intact image reads
    with pytest.raises(FirmwareFormatError, match="entry CRC32 mismatch") as err:
        read_nvs(corrupt(fctry_image, entry + NVS_ENTRY_LAYOUT.offset_of("key")))
    assert err.value.offset == entry
    assert f"at offset 0x{entry:x}" in str(err.value)


def test_data_crc_is_checked(fctry_image: bytes) -> None:
    data = FIRST_ENTRY + 64  # the node_id chunk's data entry
    with pytest.raises(FirmwareFormatError, match="data CRC32 mismatch for key 'node_id'") as err:
        read_nvs(corrupt(fctry_image, data))
    assert err.value.offset == data


def test_page_header_crc_is_checked(fctry_image: bytes) -> None:
    with pytest.raises(FirmwareFormatError, match="page header CRC32 mismatch") as err:
        read_nvs(corrupt(fctry_image, NVS_PAGE_HEADER_LAYOUT.offset_of("seq_no")))
    assert err.value.offset == NVS_PAGE_HEADER_LAYOUT.offset_of("crc32")


def test_unknown_page_state_and_version(fctry_image: bytes) -> None:
    bad_state = bytearray(fctry_image)
    struct.pack_into("<I", bad_state, 0, 0x12345678)
    with pytest.raises(FirmwareFormatError, match="page state 0x12345678") as err:
        read_nvs(bytes(bad_state))
    assert err.value.offset == 0

    bad_version = bytearray(fctry_image)
    bad_version[8] = 0x42
    struct.pack_into("<I", bad_version, 28, zlib.crc32(bytes(bad_version[4:28]), 0xFFFFFFFF))  # header CRC made right again
    with pytest.raises(FirmwareFormatError, match="unknown NVS format version byte 0x42") as err:
        read_nvs(bytes(bad_version))
    assert err.value.offset == 8


def test_truncated_partition(fctry_image: bytes) -> None:
    with pytest.raises(FirmwareFormatError, match="not a positive multiple"):
        read_nvs(fctry_image[:-1])


def test_erased_entry_is_skipped_and_a_missing_key_is_named(fctry_image: bytes) -> None:
    items = {i.key: i for i in read_nvs_items(fctry_image)}
    index_entry = (items["random"].offset - FIRST_ENTRY) // 32  # the blob index of `random`
    erased = bytearray(fctry_image)
    erased[32 + index_entry // 4] &= ~(0b11 << ((index_entry % 4) * 2)) & 0xFF  # state bits 00 = erased
    assert "random" not in read_nvs(bytes(erased))[FCTRY_NAMESPACE]
    with pytest.raises(FirmwareFormatError, match="lacks random"):
        read_fctry(bytes(erased))


def test_server_cert_key_carries_the_lab_ca(tmp_path: Path, pki: LabPki) -> None:
    image = build_fctry(tmp_path, "nodeWithCa01", "127.0.0.1:18883", pki.node_cert("nodeWithCa01"), RANDOM, server_cert=pki.ca_cert_path)
    creds = read_fctry(image.data)
    assert creds[SERVER_CERT_KEY] == pki.ca_cert_path.read_bytes()
    assert creds["mqtt_host"] == b"127.0.0.1:18883"

"""The virtual firmware's NVS as ESP-IDF's runtime keeps it: appended entries, erased ones left in
place, blob versions, garbage collection, and XTS-AES encryption — the encrypted image checked
byte for byte against Espressif's generator, the keys against the virtual chip's HMAC peripheral."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from esp_idf_nvs_partition_gen import nvs_partition_gen as nvs_gen

from rig.cloud.fctry import (
    BITMAP_OFFSET,
    ENTRY_SIZE,
    FIRST_ENTRY_OFFSET,
    PAGE_SIZE,
    PAGE_UNINITIALIZED,
    NvsEncryptedError,
    NvsType,
    nvs_written_entries,
    read_nvs,
    read_nvs_items,
)
from rig.firmware.nvs_encryption import HMAC_EKEY_SEED, NvsXtsKeys
from rig.vboard.bootloader import PartitionEntry
from rig.vboard.efuse import EfuseController
from rig.vboard.flash import FlashStorage
from rig.vboard.node.nvs_keys import HMAC_UP, nvs_keys_for
from rig.vboard.node.nvs_store import NvsFullError, NvsStore, NvsValue, build_nvs_image

NVS_SIZE = 0x6000
KEYS = NvsXtsKeys.from_hmac_key(bytes(range(32)))
PASSPHRASE = b"virtual-lab-passphrase"


def generator_image(rows: list[tuple[str, str, str, str]], size: int, keys: NvsXtsKeys | None) -> bytes:
    """``esp-idf-nvs-partition-gen`` through its API (its CLI reserves the last page the same way)."""
    out = io.BytesIO()
    nvs = nvs_gen.nvs_open(out, size - PAGE_SIZE, nvs_gen.Page.VERSION2, is_encrypt=keys is not None,
                           key=None if keys is None else keys.xts_key)  # fmt: skip
    for key, kind, encoding, value in rows:
        nvs_gen.write_entry(nvs, key, kind, encoding, value)
    nvs_gen.nvs_close(nvs)
    return out.getvalue() + b"\xff" * (size - len(out.getvalue()))


@pytest.fixture
def store_on_flash(tmp_path: Path):  # type: ignore[no-untyped-def]
    flash = FlashStorage(tmp_path / "flash.bin")
    part = PartitionEntry(2, "nvs", 0x01, 0x02, 0x10000, NVS_SIZE)
    yield flash, part
    flash.close()


def test_encrypted_image_is_byte_identical_to_espressifs_generator() -> None:
    big = bytes((i * 7) % 253 for i in range(5000))
    rows = [  # no sta.* keys: after those the generator adds the Wi-Fi driver's own
        ("wifi", "namespace", "", ""),
        ("opmode", "data", "u8", "1"),
        ("pswd", "data", "hex2bin", PASSPHRASE.ljust(64, b"\0").hex()),
        ("Switch", "namespace", "", ""),
        ("Name", "data", "string", "Kitchen"),
        ("big", "data", "hex2bin", big.hex()),
    ]
    items = [
        NvsValue("wifi", "opmode", NvsType.U8, b"\x01"),
        NvsValue("wifi", "pswd", NvsType.BLOB_DATA, PASSPHRASE.ljust(64, b"\0")),
        NvsValue("Switch", "Name", NvsType.SZ, b"Kitchen"),
        NvsValue("Switch", "big", NvsType.BLOB_DATA, big),
    ]
    ours = build_nvs_image(items, NVS_SIZE, KEYS)
    assert ours == generator_image(rows, NVS_SIZE, KEYS)
    assert PASSPHRASE not in ours and b"Kitchen" not in ours
    assert read_nvs(ours, keys=KEYS)["wifi"]["pswd"].rstrip(b"\0") == PASSPHRASE
    with pytest.raises(NvsEncryptedError):
        read_nvs(ours)


def entry_state(image: bytes, offset: int) -> int:
    """The state bits of the entry at partition *offset* (``11`` empty, ``10`` written, ``00`` erased)."""
    page, index = offset // PAGE_SIZE * PAGE_SIZE, (offset % PAGE_SIZE - FIRST_ENTRY_OFFSET) // ENTRY_SIZE
    return (image[page + BITMAP_OFFSET + index // 4] >> (index % 4 * 2)) & 0b11


def test_a_changed_key_is_appended_and_the_old_entry_stays_erased_in_place(store_on_flash) -> None:  # type: ignore[no-untyped-def]
    flash, part = store_on_flash
    store = NvsStore(flash, part, KEYS)
    store.set_u8("app", "count", 1)
    store.commit()
    first = {i.key: i.offset for i in read_nvs_items(flash.read(part.offset, part.size), keys=KEYS)}["count"]
    old_bytes = flash.read(part.offset + first, ENTRY_SIZE)
    store.set_u8("app", "count", 2)
    store.commit()
    image = flash.read(part.offset, part.size)
    second = {i.key: i.offset for i in read_nvs_items(image, keys=KEYS)}["count"]
    assert second == first + ENTRY_SIZE  # appended right after, as Page::writeItem does
    assert image[first : first + ENTRY_SIZE] == old_bytes and entry_state(image, first) == 0b00  # erased, still there
    assert first not in nvs_written_entries(image) and second in nvs_written_entries(image)
    assert NvsStore(flash, part, KEYS).get_u8("app", "count") == 2

    store.erase_key("app", "count")
    store.commit()
    image = flash.read(part.offset, part.size)
    assert entry_state(image, second) == 0b00 and "count" not in read_nvs(image, keys=KEYS).get("app", {})


def test_blob_versions_alternate_their_chunk_indexes(store_on_flash) -> None:  # type: ignore[no-untyped-def]
    flash, part = store_on_flash
    store = NvsStore(flash, part)
    starts = []
    for value in (b"one", b"two", b"three"):
        store.set_blob("user_mapping", "user_id", value)
        store.commit()
        image = flash.read(part.offset, part.size)
        live = {offset: raw for offset, raw in nvs_written_entries(image).items() if raw[1] == NvsType.BLOB_IDX}
        assert len(live) == 1
        starts.append(next(iter(live.values()))[24 + 5])  # blobIndex.chunk_start
        assert read_nvs(image)["user_mapping"]["user_id"] == value
    assert starts == [0x00, 0x80, 0x00]  # VerOffset VER_0 / VER_1 (nvs_types.hpp)


def test_garbage_collection_keeps_a_free_page_and_the_live_values(tmp_path: Path) -> None:
    flash = FlashStorage(tmp_path / "flash.bin")
    part = PartitionEntry(2, "nvs", 0x01, 0x02, 0x10000, 3 * PAGE_SIZE)
    store = NvsStore(flash, part, KEYS)
    store.set_blob("user_mapping", "user_id", b"owner")
    for n in range(600):  # ~5 pages of appends into a 3-page partition
        store.set("app", "count", NvsType.U32, n.to_bytes(4, "little"))
    store.commit()
    image = flash.read(part.offset, part.size)
    states = [int.from_bytes(image[base : base + 4], "little") for base in range(0, part.size, PAGE_SIZE)]
    assert states.count(PAGE_UNINITIALIZED) == 1  # one page always free for the next collection
    assert read_nvs(image, keys=KEYS) == {"user_mapping": {"user_id": b"owner"}, "app": {"count": (599).to_bytes(4, "little")}}
    with pytest.raises(NvsFullError):  # live data alone beyond two pages: nothing to collect
        for n in range(300):
            store.set_blob("app", f"k{n}", bytes(20))
    flash.close()


def test_a_plaintext_partition_met_by_an_encrypting_firmware_is_erased(store_on_flash) -> None:  # type: ignore[no-untyped-def]
    flash, part = store_on_flash
    plain = NvsStore(flash, part)
    plain.set_blob("nvs.net80211", "sta.pswd", PASSPHRASE)
    plain.commit()
    assert PASSPHRASE in flash.read(part.offset, part.size)
    encrypting = NvsStore(flash, part, KEYS)
    assert encrypting.recovered_from is not None and encrypting.items() == []
    assert PASSPHRASE not in flash.read(part.offset, part.size)


def test_the_nvs_keys_come_from_an_hmac_key_burnt_on_first_boot(tmp_path: Path) -> None:
    efuse = EfuseController.open(tmp_path / "efuse.bin", bytes.fromhex("7cdfa1000001"))
    assert efuse.find_purpose(HMAC_UP) is None
    keys = nvs_keys_for(efuse, frozenset())
    block = efuse.find_purpose(HMAC_UP)
    assert keys is not None and block is not None
    assert efuse.field(f"BLOCK_KEY{block}") == bytes(32)  # read-protected: software sees zeros
    assert keys.eky == efuse.hmac_calculate(block, HMAC_EKEY_SEED)
    again = nvs_keys_for(EfuseController.open(tmp_path / "efuse.bin", bytes(6)), frozenset())  # next boot: same key
    assert again == keys and efuse.find_purpose(HMAC_UP) == block
    assert nvs_keys_for(efuse, frozenset({"plaintext_nvs"})) is None

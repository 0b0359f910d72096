"""NVS encryption (rig.firmware.nvs_encryption) and the NVS reader on encrypted partitions (rig.cloud.fctry).

Judged against Espressif's ``esp-idf-nvs-partition-gen`` run as the CLI it is
(``generate-key``, ``encrypt``, ``generate``): its key files must be byte-identical to
ours, our reader must read its encrypted images back to the CSV's values, and our
cipher must decrypt its ciphertext to exactly the plaintext it writes for the same CSV.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from rig.cloud.fctry import NvsEncryptedError, nvs_written_entries, read_nvs, read_nvs_items
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.nvs_encryption import NVS_KEYS_PARTITION_SIZE, NvsXtsKeys

PAGE = 4096
HEADER_AND_BITMAP = 64
ENTRY = 32
SIZE = 0x6000
BIG = bytes((i * 13 + 7) % 256 for i in range(5000))  # > one page's 4000-byte chunk limit: chunks on two pages
SHORT = bytes.fromhex("c0ffee00ff")
GREETING = "hello from the rig; this string spans 2 entries"  # 48 bytes with its NUL (no comma: CSV)
HMAC_KEY = bytes(range(0x40, 0x60))


def run_generator(outdir: Path, *args: str) -> None:
    """``python -m esp_idf_nvs_partition_gen <args> --outdir <outdir>``, as rig.cloud.fctry.build_fctry runs it."""
    run = subprocess.run(
        [sys.executable, "-m", "esp_idf_nvs_partition_gen", *args, "--outdir", str(outdir)],
        cwd=outdir,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, f"generator {args[0]} failed: {run.stdout}{run.stderr}"


@dataclass(frozen=True)
class Generated:
    """One CSV made into an encrypted and a plain image by the generator, and the keys it used."""

    keyfile: bytes
    keys: NvsXtsKeys
    encrypted: bytes
    plain: bytes


EXPECTED = {"rig": {"count": bytes([42]), "greeting": GREETING.encode(), "big": BIG, "short": SHORT}}


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Generated:
    tmp = tmp_path_factory.mktemp("nvs_encryption")
    (tmp / "big.bin").write_bytes(BIG)
    csv = tmp / "nvs.csv"
    csv.write_text(
        "\n".join(
            [
                "key,type,encoding,value",
                "rig,namespace,,",
                "count,data,u8,42",
                f"greeting,data,string,{GREETING}",
                f"big,file,binary,{tmp / 'big.bin'}",
                f"short,data,hex2bin,{SHORT.hex()}",
            ]
        )
        + "\n"
    )
    run_generator(tmp, "generate-key", "--keyfile", "keys.bin")
    keyfile = tmp / "keys" / "keys.bin"
    run_generator(tmp, "encrypt", str(csv), "encrypted.bin", hex(SIZE), "--inputkey", str(keyfile), "--version", "2")
    run_generator(tmp, "generate", str(csv), "plain.bin", hex(SIZE), "--version", "2")
    raw_keys = keyfile.read_bytes()
    return Generated(
        keyfile=raw_keys,
        keys=NvsXtsKeys(raw_keys[:32], raw_keys[32:64]),
        encrypted=(tmp / "encrypted.bin").read_bytes(),
        plain=(tmp / "plain.bin").read_bytes(),
    )


# -- keys --------------------------------------------------------------------------------------


def test_hmac_scheme_keys_match_the_generator(tmp_path: Path) -> None:
    (tmp_path / "hmac.bin").write_bytes(HMAC_KEY)
    run_generator(tmp_path, "generate-key", "--key_protect_hmac", "--kp_hmac_inputkey", str(tmp_path / "hmac.bin"), "--keyfile", "k.bin")
    theirs = (tmp_path / "keys" / "k.bin").read_bytes()
    ours = NvsXtsKeys.from_hmac_key(HMAC_KEY)
    assert ours.keys_partition() == theirs
    assert len(theirs) == NVS_KEYS_PARTITION_SIZE
    assert NvsXtsKeys.from_keys_partition(theirs) == ours


def test_keys_partition_of_the_generator_reads_back(generated: Generated) -> None:
    keys = NvsXtsKeys.from_keys_partition(generated.keyfile)
    assert keys.eky == generated.keyfile[:32] and keys.tky == generated.keyfile[32:64]
    assert keys.keys_partition() == generated.keyfile
    assert generated.keyfile[68:] == b"\xff" * (NVS_KEYS_PARTITION_SIZE - 68)


def test_tampered_erased_or_short_keys_partition_is_refused(generated: Generated) -> None:
    tampered = bytearray(generated.keyfile)
    tampered[5] ^= 0x01
    with pytest.raises(FirmwareFormatError, match=r"CRC32 of eky ‖ tky mismatch.*ESP_ERR_NVS_CORRUPT_KEY_PART") as err:
        NvsXtsKeys.from_keys_partition(bytes(tampered))
    assert err.value.offset == 64 and err.value.fix
    bad_crc = bytearray(generated.keyfile)
    bad_crc[64] ^= 0x80
    with pytest.raises(FirmwareFormatError, match="CRC32"):
        NvsXtsKeys.from_keys_partition(bytes(bad_crc))
    with pytest.raises(FirmwareFormatError, match="erased"):
        NvsXtsKeys.from_keys_partition(b"\xff" * NVS_KEYS_PARTITION_SIZE)
    with pytest.raises(FirmwareFormatError, match="truncated"):
        NvsXtsKeys.from_keys_partition(generated.keyfile[:67])


def test_keys_are_validated() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        NvsXtsKeys(bytes(31), bytes(32))
    with pytest.raises(TypeError, match="must be bytes"):
        NvsXtsKeys(bytearray(32), bytes(range(32)))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="two different keys"):
        NvsXtsKeys(bytes(range(32)), bytes(range(32)))
    with pytest.raises(ValueError, match="empty"):
        NvsXtsKeys.from_hmac_key(b"")


def test_repr_does_not_print_the_keys() -> None:
    keys = NvsXtsKeys(bytes(range(32)), bytes(range(0xA0, 0xC0)))
    shown = " ".join([repr(keys), str(keys), repr([keys]), f"{keys}"])
    key = keys.eky + keys.tky
    for at in range(0, len(key), 4):
        assert key[at : at + 4].hex() not in shown.lower()
    assert repr(keys.eky) not in shown and repr(keys.tky) not in shown
    assert keys.fingerprint in shown  # which keys, without the keys
    assert NvsXtsKeys.from_hmac_key(HMAC_KEY).fingerprint != keys.fingerprint


# -- the cipher --------------------------------------------------------------------------------


def test_encrypt_decrypt_round_trip_and_address_binding() -> None:
    keys = NvsXtsKeys.from_hmac_key(HMAC_KEY)
    entry = bytes(range(32))
    three = entry + bytes(reversed(entry)) + b"\xff" * 32
    assert keys.decrypt(0x1040, keys.encrypt(0x1040, three)) == three
    at_40, at_60 = keys.encrypt(0x40, entry), keys.encrypt(0x60, entry)
    assert at_40 != at_60 and entry not in (at_40, at_60)
    # several entries at once = each entry on its own at its own address
    assert keys.encrypt(0x40, three) == b"".join(keys.encrypt(0x40 + 32 * i, three[32 * i : 32 * i + 32]) for i in range(3))
    # decrypting at the wrong address does not give the plaintext back
    assert keys.decrypt(0x60, at_40) != entry
    with pytest.raises(ValueError, match="multiple of 32"):
        keys.encrypt(0x41, entry)
    with pytest.raises(ValueError, match="whole 32-byte entries"):
        keys.decrypt(0x40, entry[:31])


def test_decrypt_known_answer_from_the_generator(generated: Generated) -> None:
    """The generator's ciphertext at an offset decrypts to what it wrote there in the plain image."""
    greeting = next(item for item in read_nvs_items(generated.plain) if item.key == "greeting")
    assert 32 < len(GREETING) + 1 < 64, "meant to need two data entries, the second padded"
    data_entry = greeting.offset + ENTRY  # the string's first data entry
    ciphertext = generated.encrypted[data_entry : data_entry + ENTRY]
    plaintext = generated.plain[data_entry : data_entry + ENTRY]
    assert plaintext.startswith(GREETING.encode()[:32]) and ciphertext != plaintext
    assert generated.keys.decrypt(data_entry, ciphertext) == plaintext
    assert generated.keys.encrypt(data_entry, plaintext) == ciphertext
    # the whole item (header + two data entries, the last 0xFF-padded) in one call
    span = slice(greeting.offset, greeting.offset + 3 * ENTRY)
    assert generated.keys.decrypt(greeting.offset, generated.encrypted[span]) == generated.plain[span]
    assert generated.plain[span].endswith(b"\xff" * (3 * ENTRY - ENTRY - len(GREETING) - 1))


# -- the reader --------------------------------------------------------------------------------


def test_reads_the_generators_encrypted_partition(generated: Generated) -> None:
    assert read_nvs(generated.encrypted, keys=generated.keys) == EXPECTED
    assert read_nvs(generated.plain) == EXPECTED  # sanity: the same CSV, unencrypted
    assert read_nvs_items(generated.encrypted, keys=generated.keys) == read_nvs_items(generated.plain)
    assert read_nvs(generated.encrypted, keys=NvsXtsKeys.from_keys_partition(generated.keyfile)) == EXPECTED


def test_encrypted_partition_without_keys_is_named(generated: Generated) -> None:
    with pytest.raises(NvsEncryptedError, match=r"looks encrypted \(NVS encryption.*needs its XTS keys") as err:
        read_nvs(generated.encrypted, what="nvs partition")
    assert isinstance(err.value, FirmwareFormatError)
    assert err.value.offset == HEADER_AND_BITMAP  # the first entry, where the parser stopped
    assert "NvsXtsKeys" in (err.value.fix or "")
    with pytest.raises(NvsEncryptedError):
        read_nvs_items(generated.encrypted)


def test_wrong_keys_or_keys_on_a_plaintext_partition(generated: Generated) -> None:
    wrong = NvsXtsKeys.from_hmac_key(b"\x01" * 32)
    for image, keys in ((generated.encrypted, wrong), (generated.plain, generated.keys)):
        with pytest.raises(FirmwareFormatError, match="keys do not match this partition, or it is not encrypted") as err:
            read_nvs(image, keys=keys)
        assert type(err.value) is FirmwareFormatError


def test_a_corrupt_entry_is_corruption_not_encryption(generated: Generated) -> None:
    count = next(item for item in read_nvs_items(generated.plain) if item.key == "count")
    for image, keys in ((generated.plain, None), (generated.encrypted, generated.keys)):
        corrupt = bytearray(image)
        corrupt[count.offset + 20] ^= 0x04  # plaintext: the key; ciphertext: garbles its whole XTS block
        with pytest.raises(FirmwareFormatError, match="entry CRC32 mismatch") as err:
            read_nvs(bytes(corrupt), keys=keys)
        assert type(err.value) is FirmwareFormatError and err.value.offset == count.offset


def test_written_entries_are_readable_without_keys(generated: Generated) -> None:
    encrypted, plain = nvs_written_entries(generated.encrypted), nvs_written_entries(generated.plain)
    assert list(encrypted) == list(plain) == sorted(plain)
    assert all(encrypted[offset] != plain[offset] for offset in plain)
    assert {offset // PAGE for offset in plain} == {0, 1}, "the blob was meant to reach a second page"
    items = read_nvs_items(generated.plain)
    assert len(plain) > len(items) and {item.offset for item in items} <= set(plain)  # data entries included
    assert {offset: generated.keys.decrypt(offset, raw) for offset, raw in encrypted.items()} == plain
    for base in range(0, SIZE, PAGE):  # headers and bitmaps are never encrypted
        assert generated.encrypted[base : base + HEADER_AND_BITMAP] == generated.plain[base : base + HEADER_AND_BITMAP]
    # and nothing but the written entries differs
    outside = bytearray(generated.encrypted)
    for offset in encrypted:
        outside[offset : offset + ENTRY] = generated.plain[offset : offset + ENTRY]
    assert bytes(outside) == generated.plain


def test_written_entries_checks_the_page_headers(generated: Generated) -> None:
    bad = bytearray(generated.encrypted)
    bad[4] ^= 0x01  # seq_no: the header CRC no longer matches
    with pytest.raises(FirmwareFormatError, match="page header CRC32 mismatch"):
        nvs_written_entries(bytes(bad))
    with pytest.raises(FirmwareFormatError, match="not a positive multiple"):
        nvs_written_entries(generated.encrypted[:-1])
    assert nvs_written_entries(b"\xff" * PAGE) == {}

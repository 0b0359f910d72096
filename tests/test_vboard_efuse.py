"""The virtual ESP32-C3 eFuse controller, judged by espefuse itself.

The board's eFuse file is in ``espefuse --virt --path-efuse-file`` format, so the real
tool reads what the controller burnt and the controller reads what the tool burnt.
The register-level tests drive ``read_reg`` / ``write_reg`` in the order espefuse's
serial path does (efuse/esp32c3/fields.py, base_fields.py ``burn_words``).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from esptool.targets import ESP32C3ROM

from rig.vboard.efuse import (
    BLOCKS,
    EFUSE_BASE,
    EFUSE_MEM_SIZE,
    FIELDS,
    REGISTERS,
    EfuseController,
    EfuseError,
    EfuseWriteProtected,
    read_protected_file,
    rs_parity_words,
)
from tests.signing_keys import espsecure, generate_keys

# espefuse's CLI module imports a click API that click deprecates
pytestmark = pytest.mark.filterwarnings("ignore:'parser.OptionParser' is deprecated:DeprecationWarning")

MAC = bytes.fromhex("58cf79a1b2c3")
ESPEFUSE_TIMEOUT_S = 60

REG_CONF = EFUSE_BASE + 0x1CC
REG_CMD = EFUSE_BASE + 0x1D4
REG_PGM_DATA0 = EFUSE_BASE + 0x000
REG_RS_ERR0 = EFUSE_BASE + 0x1C0
BLOCK_KEY0_RD = EFUSE_BASE + 0x09C


def espefuse(efuse_file: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``espefuse --chip esp32c3 --virt --path-efuse-file FILE ARGS``; never raises on exit code."""
    return subprocess.run(
        [sys.executable, "-m", "espefuse", "--chip", "esp32c3", "--virt", "--path-efuse-file", str(efuse_file), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=ESPEFUSE_TIMEOUT_S,
        env={**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"},
        check=False,
    )


def summary(efuse_file: Path) -> tuple[dict[str, dict], str]:
    """espefuse's JSON summary of *efuse_file*, and what it printed (error reports go there)."""
    out = efuse_file.with_name("summary.json")
    proc = espefuse(efuse_file, "summary", "--format", "json", "--file", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(out.read_text()), proc.stdout


def key_bytes_as_espefuse_prints(data: bytes) -> str:
    return " ".join(f"{b:02x}" for b in data)


@pytest.fixture
def efuse_file(tmp_path: Path) -> Path:
    return tmp_path / "board" / "efuse.bin"


@pytest.fixture
def chip(efuse_file: Path) -> EfuseController:
    return EfuseController.open(efuse_file, MAC)


def espefuse_program(chip: EfuseController, block: int, data_words: list[int], check: list[int] | None = None) -> None:
    """One block burn exactly as espefuse sends it over serial, then its read-back."""

    def wait_idle() -> None:
        for _ in range(10):
            if chip.read_reg(REG_CMD) & 0x3 == 0 and chip.read_reg(REG_CMD) & 0x3 == 0:
                return
        raise AssertionError("eFuse controller stays busy")

    # set_efuse_timing: read-modify-write of DAC_CONF, WR_TIM_CONF1/2 (esptool update_reg)
    for offset, mask, value in ((0x1E8, 0xFF << 9, 0xFF), (0x1E8, 0xFF, 0x28), (0x1F0, 0xFFFF << 8, 0x3000), (0x1F4, 0xFFFF, 0x190)):
        shift = (mask & -mask).bit_length() - 1
        old = chip.read_reg(EFUSE_BASE + offset)
        chip.write_reg(EFUSE_BASE + offset, (old & ~mask) | ((value << shift) & mask))
    wait_idle()
    for i in range(8):
        chip.write_reg(REG_PGM_DATA0 + 4 * i, 0)
    wait_idle()
    words = list(data_words) + (list(check if check is not None else rs_parity_words(data_words)) if block else [])
    for i, word in enumerate(words):
        chip.write_reg(REG_PGM_DATA0 + 4 * i, word)
    wait_idle()
    chip.write_reg(REG_CONF, 0x5A5A)
    chip.write_reg(REG_CMD, 0x2 | block << 2)
    wait_idle()
    for i in range(8):
        chip.write_reg(REG_PGM_DATA0 + 4 * i, 0)
    wait_idle()
    chip.write_reg(REG_CONF, 0x5AA5)
    chip.write_reg(REG_CMD, 0x1)  # (esptool appends a delay entry for UART_DATE_REG, not ours)
    wait_idle()


# --------------------------------------------------------------------------- (1) fresh board


def test_fresh_board_is_a_blank_v0_4_chip_with_its_mac(efuse_file: Path, chip: EfuseController) -> None:
    assert efuse_file.stat().st_size == EFUSE_MEM_SIZE
    fuses, printed = summary(efuse_file)
    assert fuses["MAC"]["value"] == "58:cf:79:a1:b2:c3 (OK)"
    assert fuses["WAFER_VERSION_MAJOR"]["value"] == 0
    assert fuses["WAFER_VERSION_MINOR"]["value"] == 4
    assert fuses["PKG_VERSION"]["value"] == 0
    for name in ("SECURE_BOOT_EN", "DIS_PAD_JTAG", "DIS_USB_JTAG", "DIS_DOWNLOAD_MODE", "ENABLE_SECURITY_DOWNLOAD"):
        assert fuses[name]["value"] is False, name
    assert fuses["SECURE_VERSION"]["value"] == 0
    assert fuses["SPI_BOOT_CRYPT_CNT"]["value"] == "Disable"
    assert fuses["WR_DIS"]["value"] == 0 and fuses["RD_DIS"]["value"] == 0
    for i in range(6):
        assert fuses[f"KEY_PURPOSE_{i}"]["value"] == "USER"
        assert fuses[f"BLOCK_KEY{i}"]["value"] == key_bytes_as_espefuse_prints(bytes(32))
    assert "Error" not in printed

    assert chip.mac == MAC
    assert chip.chip_revision == (0, 4)
    assert chip.secure_version == 0 and not chip.secure_boot_enabled
    assert chip.secure_boot_digests() == [None, None, None]
    assert chip.revoked_digest_slots == set()
    assert not (chip.download_mode_disabled or chip.secure_download_enabled or chip.flash_encryption_enabled or chip.jtag_disabled)
    # as a real ESP32-C3 v0.4 answers get-security-info
    assert chip.security_info_payload() == struct.pack("<IB7BII", 0, 0, 0, 0, 0, 0, 0, 0, 12, 5, 3)


def test_reopening_keeps_the_state_and_the_burnt_mac(efuse_file: Path, chip: EfuseController) -> None:
    chip.raise_secure_version(2)
    again = EfuseController.open(efuse_file, bytes.fromhex("aabbccddeeff"))
    assert again.mac == MAC
    assert again.secure_version == 2


def test_file_layout_is_the_register_window_byte_reversed(efuse_file: Path, chip: EfuseController) -> None:
    data = efuse_file.read_bytes()
    for offset in (0x044, 0x048, 0x050, 0x1E8, 0x1FC):
        stored = int.from_bytes(data[EFUSE_MEM_SIZE - offset - 4 : EFUSE_MEM_SIZE - offset], "big")
        assert stored == chip.read_reg(EFUSE_BASE + offset)
    assert chip.read_reg(EFUSE_BASE + 0x044) == 0x79A1B2C3 and chip.read_reg(EFUSE_BASE + 0x048) & 0xFFFF == 0x58CF


def test_a_short_file_is_refused_not_replaced(efuse_file: Path) -> None:
    efuse_file.parent.mkdir(parents=True)
    efuse_file.write_bytes(b"\x01" * 100)
    with pytest.raises(EfuseError):
        EfuseController.open(efuse_file, MAC)
    assert efuse_file.read_bytes() == b"\x01" * 100


# --------------------------------------------------------------------------- (2) burnt here, read by espefuse


def test_fuses_burnt_through_the_named_api_are_what_espefuse_reports(efuse_file: Path, chip: EfuseController) -> None:
    digest = bytes(range(0x20, 0x40))
    chip.raise_secure_version(3)
    chip.burn_field("SECURE_BOOT_EN", 1)
    chip.burn_field("KEY_PURPOSE_0", "SECURE_BOOT_DIGEST0")
    chip.burn_field("BLOCK_KEY0", digest)
    chip.burn_field("DIS_PAD_JTAG", 1)

    fuses, printed = summary(efuse_file)
    assert fuses["SECURE_VERSION"]["value"] == 0b111
    assert fuses["SECURE_BOOT_EN"]["value"] is True
    assert fuses["KEY_PURPOSE_0"]["value"] == "SECURE_BOOT_DIGEST0"
    assert fuses["BLOCK_KEY0"]["value"] == key_bytes_as_espefuse_prints(digest)
    assert fuses["DIS_PAD_JTAG"]["value"] is True
    assert fuses["DIS_USB_JTAG"]["value"] is False
    assert fuses["MAC"]["value"] == "58:cf:79:a1:b2:c3 (OK)"
    assert "Error" not in printed

    assert chip.secure_version == 3 and chip.secure_boot_enabled
    assert chip.secure_boot_digests() == [digest, None, None]
    assert chip.pad_jtag_disabled and not chip.usb_jtag_disabled and not chip.jtag_disabled
    assert chip.security_flags() == (1 << 0) | (1 << 7)
    assert chip.key_purposes() == [9, 0, 0, 0, 0, 0, 12]


def test_security_flags_and_crypt_count_follow_the_fuses(chip: EfuseController) -> None:
    chip.burn_field("SPI_BOOT_CRYPT_CNT", 0b001)
    assert chip.flash_encryption_enabled and chip.crypt_count() == 1
    chip.burn_field("SPI_BOOT_CRYPT_CNT", 0b011)
    assert not chip.flash_encryption_enabled and chip.crypt_count() == 3
    chip.burn_field("SOFT_DIS_JTAG", 0b001)
    chip.burn_field("DIS_USB_JTAG", 1)
    assert chip.jtag_disabled
    chip.burn_field("SECURE_BOOT_KEY_REVOKE1", 1)
    chip.burn_field("ENABLE_SECURITY_DOWNLOAD", 1)
    chip.burn_field("DIS_DOWNLOAD_ICACHE", 1)
    assert chip.revoked_digest_slots == {1}
    assert chip.secure_download_enabled
    assert chip.security_flags() == (1 << 2) | (1 << 4) | (1 << 6) | (1 << 10)
    flags, crypt_cnt = struct.unpack_from("<IB", chip.security_info_payload())
    assert (flags, crypt_cnt) == (chip.security_flags(), 3)


# --------------------------------------------------------------------------- (3) burnt by espefuse, read here


def test_what_espefuse_burns_is_what_the_board_enforces(tmp_path: Path, efuse_file: Path, chip: EfuseController) -> None:
    key = generate_keys(tmp_path, ["sb"])["sb"]
    proc = espefuse(efuse_file, "--do-not-confirm", "burn-efuse", "SECURE_VERSION", "0x7")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = espefuse(efuse_file, "--do-not-confirm", "burn-key-digest", "BLOCK_KEY0", key.public, "SECURE_BOOT_DIGEST0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    digest_file = tmp_path / "digest.bin"
    proc = espsecure("digest-sbv2-public-key", "--keyfile", key.public, "--output", digest_file)
    assert proc.returncode == 0, proc.stderr
    digest = digest_file.read_bytes()

    for board in (chip, EfuseController.open(efuse_file, MAC)):  # the running board, and after a power cycle
        assert board.secure_version == 3
        assert board.secure_boot_digests() == [digest, None, None]
        assert board.mac == MAC and board.chip_revision == (0, 4)
        # burn-key-digest write-protects the key block and its purpose, as on a chip
        with pytest.raises(EfuseWriteProtected):
            board.burn_field("BLOCK_KEY0", b"\xff" * 32)
        with pytest.raises(EfuseWriteProtected):
            board.burn_field("KEY_PURPOSE_0", 0xF)
        assert board.secure_boot_digests()[0] == digest


# --------------------------------------------------------------------------- (4) bits never clear


def test_a_lower_secure_version_leaves_the_burnt_bits(efuse_file: Path, chip: EfuseController) -> None:
    chip.raise_secure_version(3)
    chip.raise_secure_version(1)
    chip.burn_field("SECURE_VERSION", 0b1)
    assert chip.secure_version == 3
    # espefuse itself calls a lower value a failed burn: the bits it would clear stay set
    proc = espefuse(efuse_file, "--do-not-confirm", "burn-efuse", "SECURE_VERSION", "0x1")
    assert proc.returncode != 0 and "failed to burn" in proc.stdout
    assert chip.secure_version == 3
    chip.raise_secure_version(5)
    assert chip.field("SECURE_VERSION") == 0b11111


def test_thermometer_fills_the_lowest_unburnt_bits(chip: EfuseController) -> None:
    chip.burn_field("SECURE_VERSION", 0b1000)
    chip.raise_secure_version(3)
    assert chip.field("SECURE_VERSION") == 0b1011 and chip.secure_version == 3
    with pytest.raises(ValueError):
        chip.raise_secure_version(17)


def test_register_writes_cannot_clear_read_registers(chip: EfuseController) -> None:
    chip.raise_secure_version(2)
    for offset in range(0x02C, 0x17C, 4):
        chip.write_reg(EFUSE_BASE + offset, 0)
    espefuse_program(chip, 0, [0] * 8)
    assert chip.secure_version == 2 and chip.mac == MAC


def test_write_protection_is_honoured(efuse_file: Path, chip: EfuseController) -> None:
    chip.raise_secure_version(1)
    chip.burn_field("WR_DIS", 1 << 18)  # the group holding SECURE_VERSION and DIS_DOWNLOAD_MODE
    with pytest.raises(EfuseWriteProtected):
        chip.raise_secure_version(4)
    with pytest.raises(EfuseWriteProtected):
        chip.burn_field("DIS_DOWNLOAD_MODE", 1)
    # at register level the chip silently keeps protected bits and burns the rest
    words = [0] * 8
    words[4] = 0xFFFF << 14  # SECURE_VERSION
    words[3] = 1 << 20  # SECURE_BOOT_EN, not protected
    espefuse_program(chip, 0, words)
    assert chip.secure_version == 1 and chip.secure_boot_enabled
    fuses, _ = summary(efuse_file)
    assert fuses["SECURE_VERSION"]["value"] == 1 and fuses["SECURE_VERSION"]["writeable"] is False
    chip.raise_secure_version(1)  # nothing new to burn: not an error

    chip.burn_field("WR_DIS", 1 << 23)  # BLOCK_KEY0
    espefuse_program(chip, 4, [0x1234_5678] * 8)
    assert chip.field("BLOCK_KEY0") == bytes(32)


def test_read_protected_key_reads_as_zeros(efuse_file: Path, chip: EfuseController) -> None:
    chip.burn_field("KEY_PURPOSE_1", "HMAC_UP")
    chip.burn_field("BLOCK_KEY1", bytes(range(1, 33)))
    chip.burn_field("RD_DIS", 1 << 1)
    assert chip.field("BLOCK_KEY1") == bytes(32)
    assert all(chip.read_reg(EFUSE_BASE + 0x0BC + 4 * i) == 0 for i in range(8))
    with pytest.raises(EfuseError):
        chip.burn_field("BLOCK_KEY1", b"\x01" * 32)
    fuses, _ = summary(efuse_file)
    assert fuses["BLOCK_KEY1"]["readable"] is False
    assert fuses["BLOCK_KEY1"]["value"] == " ".join(["??"] * 32)
    assert int(fuses["BLOCK_KEY1"]["raw_value"], 16) == 0
    # the array keeps what RD_DIS hides: the HMAC peripheral still uses it
    assert chip.hmac_calculate(1, b"seed") == hmac.new(bytes(range(1, 33)), b"seed", hashlib.sha256).digest()


# --------------------------------------------------------------------------- read-protected keys and HMAC

HMAC_KEY = bytes.fromhex("9f3a5c71e2d84b06a1c7f0e35b2d9468c4e1073fa85b2d6e19f4c3a07d5e8b21")


def hmac_sha256(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def file_block(efuse_file: Path, block: int) -> bytes:
    """The bytes of *block*'s read registers as the --virt file stores them (byte-reversed window)."""
    blk = BLOCKS[block]
    return efuse_file.read_bytes()[EFUSE_MEM_SIZE - blk.rd_offset - 4 * blk.words : EFUSE_MEM_SIZE - blk.rd_offset]


def test_an_hmac_key_is_hidden_from_espefuse_and_the_file_but_kept(efuse_file: Path, chip: EfuseController) -> None:
    assert chip.find_purpose("HMAC_UP") is None and chip.find_unused_key_block() == 0
    chip.write_key(0, "SECURE_BOOT_DIGEST0", bytes(range(32)))
    assert chip.find_unused_key_block() == 1
    chip.write_key(2, "HMAC_UP", HMAC_KEY)
    assert chip.find_purpose("HMAC_UP") == 2 and chip.find_purpose("SECURE_BOOT_DIGEST0") == 0
    assert chip.find_purpose("XTS_AES_128_KEY") is None
    assert chip.find_unused_key_block() == 1

    fuses, printed = summary(efuse_file)
    assert fuses["KEY_PURPOSE_2"]["value"] == "HMAC_UP" and fuses["KEY_PURPOSE_2"]["writeable"] is False
    assert fuses["BLOCK_KEY2"]["readable"] is False and fuses["BLOCK_KEY2"]["writeable"] is False
    assert fuses["BLOCK_KEY2"]["value"] == " ".join(["??"] * 32)
    assert int(fuses["BLOCK_KEY2"]["raw_value"], 16) == 0
    assert fuses["RD_DIS"]["value"] == 1 << 2
    assert "Error" not in printed
    data = efuse_file.read_bytes()
    assert len(data) == EFUSE_MEM_SIZE and file_block(efuse_file, 6) == bytes(32)
    assert HMAC_KEY not in data and HMAC_KEY[::-1] not in data  # the file is the window byte-reversed
    # software reads see zeros; the key lives on in the sidecar, beside the file
    assert chip.field("BLOCK_KEY2") == bytes(32)
    assert all(chip.read_reg(EFUSE_BASE + BLOCKS[6].rd_offset + 4 * i) == 0 for i in range(8))
    sidecar = read_protected_file(efuse_file)
    assert sidecar == efuse_file.with_name("efuse-read-protected.json") == chip.read_protected_path
    assert json.loads(sidecar.read_text()) == {"BLOCK_KEY2": HMAC_KEY.hex()}

    message = bytes(range(200))  # several SHA-256 blocks, as the peripheral takes them
    for board in (chip, EfuseController.open(efuse_file, MAC)):  # the running board, and after a power cycle
        assert board.hmac_calculate(2, message) == hmac_sha256(HMAC_KEY, message)
        assert board.hmac_calculate(2, b"") == hmac_sha256(HMAC_KEY, b"")
        assert board.find_purpose("HMAC_UP") == 2


def test_write_key_does_what_esp_efuse_write_key_does(chip: EfuseController) -> None:
    chip.write_key(1, "HMAC_UP", HMAC_KEY)
    assert chip.field("KEY_PURPOSE_1") == 8
    assert chip.field("WR_DIS") == (1 << 24) | (1 << 9)  # BLOCK_KEY1 and KEY_PURPOSE_1
    assert chip.field("RD_DIS") == 1 << 1
    # a used block is refused, and nothing is burnt
    for key_id, purpose in ((1, "HMAC_UP"), (1, "USER")):
        with pytest.raises(EfuseError, match="in use"):
            chip.write_key(key_id, purpose, b"\x01" * 32)
    chip.burn_field("BLOCK_KEY3", b"\x01" * 32)  # data in a USER block: in use too
    with pytest.raises(EfuseError, match="in use"):
        chip.write_key(3, "HMAC_UP", HMAC_KEY)
    with pytest.raises(EfuseError, match="BLOCK_KEY5"):
        chip.write_key(5, "XTS_AES_128_KEY", HMAC_KEY)  # the C3's BLOCK9 quirk
    assert chip.field("KEY_PURPOSE_5") == 0 and chip.field("BLOCK_KEY5") == bytes(32)
    for bad in ((6, "HMAC_UP", HMAC_KEY), (0, "NO_SUCH_PURPOSE", HMAC_KEY), (0, "HMAC_UP", bytes(33))):
        with pytest.raises(ValueError):
            chip.write_key(*bad)
    assert chip.find_unused_key_block() == 0
    chip.write_key(0, "HMAC_UP", HMAC_KEY[:16])  # a short key fills the block from its start
    assert chip.hmac_calculate(0, b"m") == hmac_sha256(HMAC_KEY[:16] + bytes(16), b"m")
    assert chip.find_purpose("HMAC_UP") == 0  # the first block with that purpose
    assert chip.find_unused_key_block() == 2


def test_a_secure_boot_digest_written_as_a_key_stays_readable(efuse_file: Path, chip: EfuseController) -> None:
    digest = bytes(range(0x40, 0x60))
    chip.write_key(0, "SECURE_BOOT_DIGEST0", digest)
    assert chip.field("BLOCK_KEY0") == digest and chip.field("RD_DIS") == 0
    assert chip.secure_boot_digests() == [digest, None, None]
    assert chip.field("WR_DIS") == (1 << 23) | (1 << 8)
    assert not read_protected_file(efuse_file).exists()
    fuses, _ = summary(efuse_file)
    assert fuses["BLOCK_KEY0"]["readable"] is True
    assert fuses["BLOCK_KEY0"]["value"] == key_bytes_as_espefuse_prints(digest)


def test_the_hmac_peripheral_refuses_a_key_not_meant_for_it(chip: EfuseController) -> None:
    chip.write_key(0, "SECURE_BOOT_DIGEST0", bytes(range(32)))
    chip.write_key(1, "HMAC_DOWN_JTAG", HMAC_KEY)
    for key_id, purpose in ((0, "SECURE_BOOT_DIGEST0"), (1, "HMAC_DOWN_JTAG"), (2, "USER")):
        with pytest.raises(EfuseError, match=f"BLOCK_KEY{key_id} has purpose {purpose}, not HMAC_UP"):
            chip.hmac_calculate(key_id, b"seed")
    with pytest.raises(ValueError):
        chip.hmac_calculate(6, b"seed")


def test_a_key_read_protected_by_espefuse_is_kept_by_the_running_board(efuse_file: Path, chip: EfuseController) -> None:
    """espefuse --virt zeroes a block in the file when it burns its RD_DIS; the running
    chip's array still holds it."""
    chip.burn_field("BLOCK_KEY4", HMAC_KEY)
    chip.burn_field("KEY_PURPOSE_4", "HMAC_UP")
    proc = espefuse(efuse_file, "--do-not-confirm", "read-protect-efuse", "BLOCK_KEY4")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert chip.field("BLOCK_KEY4") == bytes(32) and file_block(efuse_file, 8) == bytes(32)
    assert chip.hmac_calculate(4, b"seed") == hmac_sha256(HMAC_KEY, b"seed")
    assert EfuseController.open(efuse_file, MAC).hmac_calculate(4, b"seed") == hmac_sha256(HMAC_KEY, b"seed")


def test_the_sidecar_belongs_to_the_chip_in_its_file(efuse_file: Path, chip: EfuseController) -> None:
    chip.write_key(0, "HMAC_UP", HMAC_KEY)
    sidecar = read_protected_file(efuse_file)
    # a chip whose eFuse file is gone is a new chip: its predecessor's keys do not carry over
    efuse_file.unlink()
    fresh = EfuseController.open(efuse_file, MAC)
    assert not sidecar.exists() and fresh.find_unused_key_block() == 0
    # a sidecar that does not parse may be the only copy of a key: refused, not dropped
    fresh.write_key(0, "HMAC_UP", HMAC_KEY)
    sidecar.write_text('{"BLOCK_KEY0": "00"}')
    with pytest.raises(EfuseError, match="read-protected"):
        EfuseController.open(efuse_file, MAC)
    assert sidecar.read_text() == '{"BLOCK_KEY0": "00"}'


def test_a_reed_solomon_block_is_burnt_once(chip: EfuseController) -> None:
    chip.burn_field("CUSTOM_MAC", bytes.fromhex("020000000001"))
    assert chip.field("CUSTOM_MAC") == bytes.fromhex("020000000001")
    with pytest.raises(EfuseError):
        chip.burn_field("RESERVED_3_248", 1)
    chip.burn_field("CUSTOM_MAC", bytes.fromhex("020000000001"))  # nothing new: fine


# --------------------------------------------------------------------------- (5) register-level sequence


def test_espefuse_register_sequence_programs_then_reads_back(efuse_file: Path, chip: EfuseController) -> None:
    digest_words = [0x0403_0201 + 0x0404_0404 * i for i in range(8)]
    chip.write_reg(REG_PGM_DATA0, 0)
    for i, word in enumerate(digest_words + rs_parity_words(digest_words)):
        chip.write_reg(REG_PGM_DATA0 + 4 * i, word)
    chip.write_reg(REG_CONF, 0x5A5A)
    chip.write_reg(REG_CMD, 0x2 | 4 << 2)
    assert chip.read_reg(REG_CMD) & 0x3 == 0
    # the read registers change only on READ_CMD; the array is already burnt (and saved)
    assert chip.read_reg(BLOCK_KEY0_RD) == 0
    power_cycled = efuse_file.with_name("power-cycled.bin")
    power_cycled.write_bytes(efuse_file.read_bytes())
    assert EfuseController.open(power_cycled, MAC).field("BLOCK_KEY0") != bytes(32)
    chip.write_reg(REG_CONF, 0x5AA5)
    chip.write_reg(REG_CMD, 0x1)
    assert chip.read_reg(REG_CMD) & 0x3 == 0
    assert [chip.read_reg(BLOCK_KEY0_RD + 4 * i) for i in range(8)] == digest_words
    assert chip.read_reg(REG_RS_ERR0) == 0
    assert chip.read_reg(EFUSE_BASE + 0x1D8) & 0x3 == 0x3  # INT_RAW: PGM_DONE, READ_DONE
    chip.write_reg(EFUSE_BASE + 0x1E4, 0x3)  # INT_CLR
    assert chip.read_reg(EFUSE_BASE + 0x1D8) == 0

    assert EfuseController.open(efuse_file, MAC).field("BLOCK_KEY0") == b"".join(w.to_bytes(4, "little") for w in digest_words)
    fuses, printed = summary(efuse_file)
    assert fuses["BLOCK_KEY0"]["value"] == key_bytes_as_espefuse_prints(b"".join(w.to_bytes(4, "little") for w in digest_words))
    assert "Error" not in printed


class RomRegisterPath(ESP32C3ROM):
    """esptool's own ESP32-C3 loader with only the wire replaced: READ_REG, WRITE_REG
    (every 16-byte entry) and GET_SECURITY_INFO answered as the ROM emulator will,
    forwarding what falls in the eFuse window to the controller."""

    def __init__(self, chip: EfuseController):
        super().__init__(io.StringIO(), 115200)
        self.chip = chip
        self.ops: list[int] = []

    def command(self, op=None, data=b"", chk=0, wait_response=True, timeout=None):  # type: ignore[override]
        self.ops.append(op)
        status = b"\0" * 4
        if op == self.ESP_CMDS["READ_REG"]:
            (addr,) = struct.unpack("<I", data)
            return (self.chip.read_reg(addr) if self.chip.handles(addr) else 0), status
        if op == self.ESP_CMDS["WRITE_REG"]:
            for i in range(0, len(data), 16):
                addr, value, mask, _delay_us = struct.unpack_from("<IIII", data, i)
                if self.chip.handles(addr):
                    self.chip.write_reg(addr, value, mask)
            return 0, status
        if op == self.ESP_CMDS["GET_SECURITY_INFO"]:
            return 0, self.chip.security_info_payload() + status
        raise AssertionError(f"espefuse sent op 0x{op:02x}")


def test_espefuse_serial_code_path_burns_through_the_registers(efuse_file: Path, chip: EfuseController, tmp_path: Path) -> None:
    from espefuse import cli

    rom = RomRegisterPath(chip)
    key = tmp_path / "hmac.bin"
    key.write_bytes(bytes(range(100, 132)))

    def run(*args: str | Path) -> None:
        cli.main(args=["--chip", "esp32c3", "--do-not-confirm", *map(str, args)], obj={"esp": rom}, standalone_mode=False)

    run("burn-efuse", "SECURE_VERSION", "0x7", "DIS_PAD_JTAG", "1")
    assert chip.secure_version == 3 and chip.pad_jtag_disabled
    run("burn-key", "BLOCK_KEY1", key, "HMAC_UP")  # write- and read-protects the key, as on a chip
    assert chip.field("KEY_PURPOSE_1") == 8 and chip.field("BLOCK_KEY1") == bytes(32)
    assert chip.field("RD_DIS") == 1 << 1 and chip.field("WR_DIS") == (1 << 24) | (1 << 9)
    assert set(rom.ops) == {rom.ESP_CMDS[op] for op in ("READ_REG", "WRITE_REG", "GET_SECURITY_INFO")}

    fuses, printed = summary(efuse_file)
    assert fuses["SECURE_VERSION"]["value"] == 7 and fuses["KEY_PURPOSE_1"]["value"] == "HMAC_UP"
    assert fuses["BLOCK_KEY1"]["readable"] is False
    assert "Error" not in printed
    # the byte order espefuse burns an HMAC key in is the one the HMAC peripheral uses
    assert chip.hmac_calculate(1, b"nvs") == hmac.new(key.read_bytes(), b"nvs", hashlib.sha256).digest()


def test_espefuse_style_burn_of_block0(chip: EfuseController) -> None:
    words = [0] * 8
    words[1] = 1 << 19  # DIS_PAD_JTAG
    words[4] = 0b1111 << 14  # SECURE_VERSION
    espefuse_program(chip, 0, words)
    assert chip.secure_version == 4 and chip.pad_jtag_disabled
    assert chip.read_reg(EFUSE_BASE + 0x1E8) == (0xFF << 9) | 0x28  # DAC_CONF as espefuse left it


def test_security_fuses_take_effect_on_the_read_back(chip: EfuseController) -> None:
    """The ROM re-checks the read registers after each command: a burnt
    ENABLE_SECURITY_DOWNLOAD must not show before espefuse's READ_CMD (fields.py
    efuse_read expects the connection to change only there)."""
    chip.write_reg(REG_PGM_DATA0 + 16, 1 << 5)  # ENABLE_SECURITY_DOWNLOAD
    chip.write_reg(REG_CONF, 0x5A5A)
    chip.write_reg(REG_CMD, 0x2)
    assert not chip.secure_download_enabled and chip.security_flags() == 0
    chip.write_reg(REG_CONF, 0x5AA5)
    chip.write_reg(REG_CMD, 0x1)
    assert chip.secure_download_enabled and chip.security_flags() == 1 << 2


def test_a_wrong_op_code_programs_nothing(chip: EfuseController) -> None:
    chip.write_reg(REG_PGM_DATA0 + 16, 0xFFFF << 14)
    chip.write_reg(REG_CONF, 0x5AA5)  # read op code with a program command
    chip.write_reg(REG_CMD, 0x2)
    chip.write_reg(REG_CONF, 0x5AA5)
    chip.write_reg(REG_CMD, 0x1)
    assert chip.read_reg(REG_CMD) & 0x3 == 0
    assert chip.secure_version == 0


def test_bad_rs_parity_is_reported_as_the_chip_does(efuse_file: Path, chip: EfuseController) -> None:
    data = [0x1111_1111 * (i + 1) for i in range(8)]
    check = rs_parity_words(data)
    check[0] ^= 0xFF  # one parity byte wrong: correctable
    espefuse_program(chip, 4, data, check)
    assert [chip.read_reg(BLOCK_KEY0_RD + 4 * i) for i in range(8)] == data
    err0 = chip.read_reg(REG_RS_ERR0)
    assert (err0 >> 12) & 0x7 == 1  # BLOCK_KEY0 error count; its FAIL stays clear
    assert not err0 >> 19 & 1
    _, printed = summary(efuse_file)
    assert "Error(s) in BLOCK4 [ERRORS:1 FAIL:False]" in printed

    espefuse_program(chip, 5, data, [0xDEAD_BEEF, 0x0BAD_F00D, 0x1234_5678])  # beyond correction
    err0 = chip.read_reg(REG_RS_ERR0)
    assert (err0 >> 16) & 0x7 == 7 and err0 >> 23 & 1  # BLOCK_KEY1: FAIL where espefuse looks for it
    _, printed = summary(efuse_file)
    assert "Error(s) in BLOCK5 [ERRORS:7 FAIL:True]" in printed


# --------------------------------------------------------------------------- (6) garbage never raises


def test_garbage_register_traffic_never_raises(efuse_file: Path, chip: EfuseController) -> None:
    rng = random.Random(0xE5E)
    for _ in range(3000):
        addr = EFUSE_BASE + rng.randrange(EFUSE_MEM_SIZE)
        if rng.random() < 0.5:
            chip.write_reg(addr, rng.getrandbits(32), rng.choice([0xFFFF_FFFF, 0, rng.getrandbits(32)]))
        else:
            assert 0 <= chip.read_reg(addr) <= 0xFFFF_FFFF
    for cmd in (0x3 | 15 << 2, 0x2 | 11 << 2, 0xFFFF_FFFF):
        chip.write_reg(REG_CONF, 0x5A5A)
        chip.write_reg(REG_CMD, cmd)
        assert chip.read_reg(REG_CMD) & 0x3 == 0
    _, printed = summary(efuse_file)  # still a file espefuse reads
    assert "espefuse" in printed


def test_unknown_words_inside_the_window_are_plain_registers(chip: EfuseController) -> None:
    for offset in (0x18C, 0x194, 0x1BC, 0x1F8):
        chip.write_reg(EFUSE_BASE + offset, 0xCAFE_F00D)
        assert chip.read_reg(EFUSE_BASE + offset) == 0xCAFE_F00D
        chip.write_reg(EFUSE_BASE + offset, 0x0000_0000, 0x0000_FFFF)
        assert chip.read_reg(EFUSE_BASE + offset) == 0xCAFE_0000
    chip.write_reg(EFUSE_BASE + 0x1D0, 0xFFFF_FFFF)  # STATUS is read-only
    chip.write_reg(REG_PGM_DATA0 + 16, 0xFFFF << 14)
    chip.write_reg(REG_CONF, 0x5A5A)
    chip.write_reg(REG_CMD, 0x3, 0)  # a mask-0 WRITE_REG entry changes nothing, starts nothing
    assert chip.read_reg(REG_CMD) == 0 and chip.secure_version == 0
    assert chip.read_reg(EFUSE_BASE + 0x1D0) == 0


def test_handles_only_the_controller_window(chip: EfuseController) -> None:
    assert chip.handles(EFUSE_BASE) and chip.handles(EFUSE_BASE + EFUSE_MEM_SIZE - 4)
    for addr in (EFUSE_BASE - 4, EFUSE_BASE + EFUSE_MEM_SIZE, 0x40001000, 0x6000007C, 0x60008000, 0):
        assert not chip.handles(addr)
    with pytest.raises(ValueError):
        chip.read_reg(0x40001000)
    with pytest.raises(ValueError):
        chip.write_reg(0x6000007C, 0)


def test_named_api_rejects_what_does_not_fit(chip: EfuseController) -> None:
    with pytest.raises(KeyError):
        chip.field("NO_SUCH_FUSE")
    with pytest.raises(ValueError):
        chip.burn_field("KEY_PURPOSE_0", 16)
    with pytest.raises(ValueError):
        chip.burn_field("BLOCK_KEY2", b"short")
    with pytest.raises(ValueError):
        chip.burn_field("SECURE_BOOT_EN", "SECURE_BOOT_DIGEST0")
    assert chip.field("KEY0_PURPOSE") == 0  # espefuse's alternative names work too


# --------------------------------------------------------------------------- the tables against espefuse's


def test_field_table_matches_espefuse() -> None:
    import espefuse

    yaml_path = Path(espefuse.__file__).parent / "efuse_defs" / "esp32c3.yaml"
    defs = yaml.safe_load(yaml_path.read_text())["EFUSES"]
    ours = {f.name: f for f in FIELDS}
    assert set(ours) == set(defs)
    for name, d in defs.items():
        f = ours[name]
        bits = 256 if name == "BLOCK_USR_DATA" else d["len"]  # espefuse shows the whole block
        assert (f.block, f.word, f.pos, f.bits, f.wr_dis, f.rd_dis) == (d["blk"], d["word"], d["pos"], bits, d["wr_dis"], d["rd_dis"]), name
        assert set(f.aliases) == set(d["alt"].split()), name


def test_register_and_block_map_matches_espefuse() -> None:
    from espefuse.efuse.esp32c3.mem_definition import EfuseDefineBlocks, EfuseDefineRegisters

    regs = {r.name: r.offset for r in REGISTERS}
    base = EfuseDefineRegisters.DR_REG_EFUSE_BASE
    assert base == EFUSE_BASE and EfuseDefineRegisters.EFUSE_MEM_SIZE == EFUSE_MEM_SIZE
    for ours, theirs in (
        ("PGM_DATA", "EFUSE_PGM_DATA0_REG"),
        ("PGM_CHECK_VALUE", "EFUSE_CHECK_VALUE0_REG"),
        ("CLK", "EFUSE_CLK_REG"),
        ("CONF", "EFUSE_CONF_REG"),
        ("STATUS", "EFUSE_STATUS_REG"),
        ("CMD", "EFUSE_CMD_REG"),
        ("RD_RS_ERR", "EFUSE_RD_RS_ERR0_REG"),
        ("RD_REPEAT_ERR", "EFUSE_RD_REPEAT_ERR0_REG"),
        ("RD_REPEAT_ERR4", "EFUSE_RD_REPEAT_ERR4_REG"),
        ("DAC_CONF", "EFUSE_DAC_CONF_REG"),
        ("RD_TIM_CONF", "EFUSE_RD_TIM_CONF_REG"),
        ("WR_TIM_CONF1", "EFUSE_WR_TIM_CONF1_REG"),
        ("WR_TIM_CONF2", "EFUSE_WR_TIM_CONF2_REG"),
        ("DATE", "EFUSE_DATE_REG"),
    ):
        assert base + regs[ours] == getattr(EfuseDefineRegisters, theirs), ours
    for blk, row in zip(BLOCKS, EfuseDefineBlocks.BLOCKS, strict=True):
        name, _, index, rd_addr, _, wr_dis, rd_dis, words, _ = row
        assert (blk.name, blk.index, EFUSE_BASE + blk.rd_offset, blk.wr_dis_bit, blk.rd_dis_bit, blk.words) == (
            name,
            index,
            rd_addr,
            wr_dis,
            rd_dis,
            words,
        )
        err_reg, err_mask, err_shift = EfuseDefineRegisters.BLOCK_NUM_ERRORS[index]
        fail_reg, fail_bit = EfuseDefineRegisters.BLOCK_FAIL_BIT[index]
        if index:
            assert blk.rs_err_num == (err_reg - base, err_shift) and err_mask == 0x7
            assert blk.rs_fail == (None if fail_bit is None else (fail_reg - base, fail_bit))

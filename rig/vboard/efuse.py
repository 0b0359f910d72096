"""The virtual ESP32-C3's eFuse controller, at register level, as espefuse drives a chip.

The controller sits at ``0x6000_8800`` and spans 0x200 bytes. Software never touches the
fuse array directly; it goes through three groups of registers:

* **read registers** (``RD_*``): the array as last loaded by a READ command — BLOCK0
  (``RD_WR_DIS``, ``RD_REPEAT_DATA0..4``) and BLOCK1..10, six or eight words each, plus
  the error registers (``RD_REPEAT_ERR*`` for BLOCK0, ``RD_RS_ERR0/1`` for the
  Reed–Solomon-coded blocks);
* **program registers**: ``PGM_DATA0..7`` and ``PGM_CHECK_VALUE0..2`` (the RS(44,32)
  parity of BLOCK1..10);
* **control**: ``CONF`` (op code 0x5A5A program / 0x5AA5 read), ``CMD`` (``READ_CMD``,
  ``PGM_CMD`` with the block number in bits 5:2, both self-clearing), timing, interrupts.

What the hardware guarantees, and so this model: programming ORs bits into the array (a
burnt 1 never returns to 0); a set ``WR_DIS`` bit makes programming of its fields or
block a no-op; a set ``RD_DIS`` bit makes its key block read as zeros; the read
registers change only on READ_CMD (so the ROM, which re-checks the security fuses after
each command, sees a newly burnt ``DIS_DOWNLOAD_MODE`` only once espefuse reads back);
RS parity that does not match the data shows up as error counts / fail bits in
``RD_RS_ERR*`` and the data reads back as the RS decoder corrects it.

State lives in one file in the board's state folder, in exactly the format of
``espefuse --virt --path-efuse-file`` (512 bytes: the register window byte-reversed,
i.e. the register at offset ``o`` is stored big-endian at ``[512-o-4, 512-o)``), so
``espefuse --chip esp32c3 --virt --path-efuse-file <board>/efuse.bin summary`` shows the
board's real state. The file is what a power cycle would show: it is rewritten after
each program command, and re-read when another tool (espefuse ``--virt``) changed it.

A read-protected block is where the file and the chip part ways. On the chip the fuse
array keeps the block and the hardware key users (HMAC, XTS-AES, DS) still read it; only
software reads — the read registers — see zeros. espefuse's format has no room for that
(its emulator zeroes such a block: ``emulate_efuse_controller_base.py``
``check_rd_protection_area``), so the file shows the zeros software sees, and the part
of the array the file cannot hold, the content of read-protected blocks, lives in a
sidecar beside it (:func:`read_protected_file`: ``efuse-read-protected.json`` next to
``efuse.bin``). It is written, atomically, before the file whenever a block's content
goes behind its RD_DIS bit, and read back at :meth:`EfuseController.open`; the eFuse
file and the sidecar together are the chip (:mod:`rig.vboard.chip_swap` retires both).
On top of the array sit the HMAC peripheral in upstream mode
(:meth:`EfuseController.hmac_calculate`) and ESP-IDF's key-block API
(:meth:`~EfuseController.write_key`, :meth:`~EfuseController.find_purpose`,
:meth:`~EfuseController.find_unused_key_block`).

Sources (facts, not code): esp-idf ``components/soc/esp32c3/include/soc/efuse_reg.h``
(offsets, reset values, bit fields), ``components/efuse/esp32c3/esp_efuse_table.csv``
and espefuse ``efuse_defs/esp32c3.yaml`` (field positions, write/read-disable bits),
espefuse ``efuse/esp32c3/mem_definition.py`` (blocks, error-register layout including
the chip's shifted FAIL bits), ``efuse/esp32c3/fields.py`` and ``efuse/base_fields.py``
(the program/read sequence, RS(44,32) with ``reedsolo``), and
``efuse/emulate_efuse_controller_base.py`` (the ``--virt`` file format); for the key
API esp-idf ``components/efuse/src/efuse_controller/keys/with_key_purposes/esp_efuse_api_key.c``
(``esp_efuse_write_key``, ``esp_efuse_key_block_unused``, ``esp_efuse_find_purpose``)
and for the HMAC peripheral ``components/esp_security/src/esp_hmac.c``
(``esp_hmac_calculate``; ``components/esp_hw_support`` in older releases).
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import os
import struct
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import reedsolo

EFUSE_BASE = 0x6000_8800
EFUSE_MEM_SIZE = 0x200  # espefuse EfuseDefineRegisters.EFUSE_MEM_SIZE
_WORDS = EFUSE_MEM_SIZE // 4
_WORD_MASK = 0xFFFF_FFFF

# CONF op codes and CMD bits (efuse_reg.h EFUSE_OP_CODE, EFUSE_CMD_REG).
OP_CODE_PROGRAM = 0x5A5A
OP_CODE_READ = 0x5AA5
CMD_READ = 1 << 0
CMD_PGM = 1 << 1
CMD_BLK_NUM_SHIFT = 2
CMD_BLK_NUM_MASK = 0xF << CMD_BLK_NUM_SHIFT
INT_READ_DONE = 1 << 0
INT_PGM_DONE = 1 << 1

# What GET_SECURITY_INFO reports besides the fuses: chip id 5 (esptool
# targets/esp32c3.py IMAGE_CHIP_ID) and the ROM API version a real ESP32-C3 v0.4 prints
# ("API Version: 3" in published `esptool get-security-info` logs).
CHIP_ID = 5
ROM_API_VERSION = 3
# The 7th key-purpose byte of GET_SECURITY_INFO: the C3 has six key blocks; real v0.4
# parts report (0, 0, 0, 0, 0, 0, 12) — 12 is the ROM's "no such key block" purpose.
NO_KEY_BLOCK_PURPOSE = 12

# Factory identity of the emulated part: an ESP32-C3 (QFN32) v0.4 with external flash
# (the DevKitC-02 / WROOM-02 arrangement), as esptool reports a real one.
FACTORY_WAFER_VERSION = (0, 4)
FACTORY_BLK_VERSION = (1, 3)

# KEY_PURPOSE_n values (espefuse efuse/esp32c3/fields.py EfuseKeyPurposeField; esp-idf
# esp_efuse_purpose_t).
KEY_PURPOSES: dict[str, int] = {
    "USER": 0,
    "RESERVED": 1,
    "XTS_AES_128_KEY": 4,
    "HMAC_DOWN_ALL": 5,
    "HMAC_DOWN_JTAG": 6,
    "HMAC_DOWN_DIGITAL_SIGNATURE": 7,
    "HMAC_UP": 8,
    "SECURE_BOOT_DIGEST0": 9,
    "SECURE_BOOT_DIGEST1": 10,
    "SECURE_BOOT_DIGEST2": 11,
}
SECURE_BOOT_DIGEST_PURPOSES = (9, 10, 11)
KEY_BLOCK_COUNT = 6
# The purposes esp_efuse_write_key read-protects (esp_efuse_api_key.c): keys that only
# hardware uses. USER, RESERVED and the Secure Boot digests stay readable.
READ_PROTECTED_PURPOSES = frozenset({"XTS_AES_128_KEY", "HMAC_DOWN_ALL", "HMAC_DOWN_JTAG", "HMAC_DOWN_DIGITAL_SIGNATURE", "HMAC_UP"})
# SOC_EFUSE_BLOCK9_KEY_PURPOSE_QUIRK (esp-idf soc_caps.h of the C3; espefuse esp32c3
# fields.py refuses it too): a hardware bug keeps BLOCK_KEY5 from holding an XTS-AES key.
_NO_XTS_KEY_BLOCK = 5


class EfuseError(Exception):
    """A named-API request the chip (or espefuse) would refuse."""


class EfuseWriteProtected(EfuseError):
    """The field or its block is write-disabled (WR_DIS): the burn cannot set the bits."""


# --------------------------------------------------------------------------- register map


class Access(enum.Enum):
    """How a register answers the bus."""

    RW = "rw"  # read/write
    RO = "ro"  # writes are ignored
    WO = "wo"  # reads as 0 (interrupt clear)


@dataclass(frozen=True)
class Register:
    """``words`` consecutive 32-bit registers starting at ``EFUSE_BASE + offset``."""

    offset: int
    name: str
    words: int = 1
    access: Access = Access.RW
    reset: int = 0


# esp-idf components/soc/esp32c3/include/soc/efuse_reg.h; RD_REPEAT_ERR4 at 0x190 as
# espefuse reads it (efuse/esp32c3/mem_definition.py; an older efuse_reg.h says 0x18C).
# Offsets not listed (0x18C, 0x194..0x1BC, 0x1F8) behave as plain read/write words.
REGISTERS: tuple[Register, ...] = (
    Register(0x000, "PGM_DATA", 8),
    Register(0x020, "PGM_CHECK_VALUE", 3),
    Register(0x02C, "RD_WR_DIS", 1, Access.RO),
    Register(0x030, "RD_REPEAT_DATA", 5, Access.RO),
    Register(0x044, "RD_MAC_SPI_SYS", 6, Access.RO),
    Register(0x05C, "RD_SYS_PART1_DATA", 8, Access.RO),
    Register(0x07C, "RD_USR_DATA", 8, Access.RO),
    Register(0x09C, "RD_KEY0_DATA", 8, Access.RO),
    Register(0x0BC, "RD_KEY1_DATA", 8, Access.RO),
    Register(0x0DC, "RD_KEY2_DATA", 8, Access.RO),
    Register(0x0FC, "RD_KEY3_DATA", 8, Access.RO),
    Register(0x11C, "RD_KEY4_DATA", 8, Access.RO),
    Register(0x13C, "RD_KEY5_DATA", 8, Access.RO),
    Register(0x15C, "RD_SYS_PART2_DATA", 8, Access.RO),
    Register(0x17C, "RD_REPEAT_ERR", 4, Access.RO),
    Register(0x190, "RD_REPEAT_ERR4", 1, Access.RO),
    Register(0x1C0, "RD_RS_ERR", 2, Access.RO),
    Register(0x1C8, "CLK", reset=0x0000_0002),  # MEM_CLK_FORCE_ON
    Register(0x1CC, "CONF"),
    Register(0x1D0, "STATUS", access=Access.RO),
    Register(0x1D4, "CMD"),
    Register(0x1D8, "INT_RAW", access=Access.RO),
    Register(0x1DC, "INT_ST", access=Access.RO),
    Register(0x1E0, "INT_ENA"),
    Register(0x1E4, "INT_CLR", access=Access.WO),
    Register(0x1E8, "DAC_CONF", reset=(0xFF << 9) | 28),  # DAC_NUM 255, DAC_CLK_DIV 28
    Register(0x1EC, "RD_TIM_CONF", reset=0x12 << 24),  # READ_INIT_NUM
    Register(0x1F0, "WR_TIM_CONF1", reset=0x2880 << 8),  # PWR_ON_NUM
    Register(0x1F4, "WR_TIM_CONF2", reset=0x190),  # PWR_OFF_NUM
    Register(0x1FC, "DATE", reset=0x0200_7200),
)

_REG_BY_NAME = {r.name: r for r in REGISTERS}
PGM_DATA0 = _REG_BY_NAME["PGM_DATA"].offset
PGM_CHECK_VALUE0 = _REG_BY_NAME["PGM_CHECK_VALUE"].offset
RD_RS_ERR0 = 0x1C0
RD_RS_ERR1 = 0x1C4
CONF = _REG_BY_NAME["CONF"].offset
CMD = _REG_BY_NAME["CMD"].offset
INT_RAW = _REG_BY_NAME["INT_RAW"].offset
INT_ST = _REG_BY_NAME["INT_ST"].offset
INT_ENA = _REG_BY_NAME["INT_ENA"].offset
INT_CLR = _REG_BY_NAME["INT_CLR"].offset


def _access_by_word() -> list[Access]:
    table = [Access.RW] * _WORDS
    for reg in REGISTERS:
        for i in range(reg.words):
            table[reg.offset // 4 + i] = reg.access
    return table


_ACCESS = _access_by_word()


@dataclass(frozen=True)
class Block:
    """One eFuse block: where its read registers are and what protects and checks it.

    ``rs_err_num`` / ``rs_fail`` are (register offset, bit) of the block's RS error
    count (3 bits) and FAIL flag. The C3 reports each block's FAIL one block further
    along than the TRM names it (espefuse mem_definition.py ``BLOCK_FAIL_BIT``, "design
    error"); BLOCK10's FAIL is therefore not visible at all.
    """

    index: int
    name: str
    rd_offset: int
    words: int
    wr_dis_bit: int | None
    rd_dis_bit: int | None
    rs_err_num: tuple[int, int] | None
    rs_fail: tuple[int, int] | None

    @property
    def rs_coded(self) -> bool:
        return self.index != 0


# espefuse efuse/esp32c3/mem_definition.py EfuseDefineBlocks.BLOCKS / BLOCK_NUM_ERRORS /
# BLOCK_FAIL_BIT.
BLOCKS: tuple[Block, ...] = (
    Block(0, "BLOCK0", 0x02C, 6, None, None, None, None),
    Block(1, "MAC_SPI_8M_0", 0x044, 6, 20, None, (RD_RS_ERR0, 0), (RD_RS_ERR0, 7)),
    Block(2, "BLOCK_SYS_DATA", 0x05C, 8, 21, None, (RD_RS_ERR0, 4), (RD_RS_ERR0, 11)),
    Block(3, "BLOCK_USR_DATA", 0x07C, 8, 22, None, (RD_RS_ERR0, 8), (RD_RS_ERR0, 15)),
    Block(4, "BLOCK_KEY0", 0x09C, 8, 23, 0, (RD_RS_ERR0, 12), (RD_RS_ERR0, 19)),
    Block(5, "BLOCK_KEY1", 0x0BC, 8, 24, 1, (RD_RS_ERR0, 16), (RD_RS_ERR0, 23)),
    Block(6, "BLOCK_KEY2", 0x0DC, 8, 25, 2, (RD_RS_ERR0, 20), (RD_RS_ERR0, 27)),
    Block(7, "BLOCK_KEY3", 0x0FC, 8, 26, 3, (RD_RS_ERR0, 24), (RD_RS_ERR0, 31)),
    Block(8, "BLOCK_KEY4", 0x11C, 8, 27, 4, (RD_RS_ERR0, 28), (RD_RS_ERR1, 3)),
    Block(9, "BLOCK_KEY5", 0x13C, 8, 28, 5, (RD_RS_ERR1, 0), (RD_RS_ERR1, 7)),
    Block(10, "BLOCK_SYS_DATA2", 0x15C, 8, 29, 6, (RD_RS_ERR1, 4), None),
)
_ARRAY_WORDS = [b.rd_offset // 4 + i for b in BLOCKS for i in range(b.words)]
_ERROR_WORDS = [w for r in REGISTERS if r.name.startswith("RD_") and "ERR" in r.name for w in range(r.offset // 4, r.offset // 4 + r.words)]
# What a READ_CMD loads and the file keeps across power cycles.
_NONVOLATILE_WORDS = frozenset(_ARRAY_WORDS + _ERROR_WORDS)


def _reset_values() -> list[int]:
    values = [0] * _WORDS
    for reg in REGISTERS:
        for i in range(reg.words):
            values[reg.offset // 4 + i] = reg.reset
    return values


_RESET_VALUES = _reset_values()

RS_PARITY_BYTES = 12  # RS(44,32): espefuse fields.py EfuseBlock.apply_coding_scheme
_RS = reedsolo.RSCodec(RS_PARITY_BYTES)
_RS_DATA_BYTES = 32


# --------------------------------------------------------------------------- field table


@dataclass(frozen=True)
class Field:
    """A named eFuse: ``bits`` bits at bit ``word * 32 + pos`` of block ``block``.

    ``kind`` is "bool", "uint" or "bytes"; ``wr_dis`` / ``rd_dis`` name the WR_DIS /
    RD_DIS bit that protects it.
    """

    name: str
    block: int
    word: int
    pos: int
    bits: int
    kind: str
    wr_dis: int | None
    rd_dis: int | None
    aliases: tuple[str, ...] = ()

    @property
    def shift(self) -> int:
        return self.word * 32 + self.pos

    @property
    def mask(self) -> int:
        return ((1 << self.bits) - 1) << self.shift


# espefuse efuse_defs/esp32c3.yaml (= esp-idf components/efuse/esp32c3/esp_efuse_table.csv):
# name, block, word, pos, bits, kind, wr_dis bit, rd_dis bit, alternative names.
# BLOCK_USR_DATA is the whole 256-bit block, as espefuse shows it (fields.py widens it).
_FIELD_ROWS: tuple[tuple[str, int, int, int, int, str, int | None, int | None, tuple[str, ...]], ...] = (
    ("WR_DIS", 0, 0, 0, 32, "uint", None, None, ()),
    ("RD_DIS", 0, 1, 0, 7, "uint", 0, None, ()),
    ("DIS_RTC_RAM_BOOT", 0, 1, 7, 1, "bool", 1, None, ()),
    ("DIS_ICACHE", 0, 1, 8, 1, "bool", 2, None, ()),
    ("DIS_USB_JTAG", 0, 1, 9, 1, "bool", 2, None, ()),
    ("DIS_DOWNLOAD_ICACHE", 0, 1, 10, 1, "bool", 2, None, ()),
    ("DIS_USB_SERIAL_JTAG", 0, 1, 11, 1, "bool", 2, None, ("DIS_USB_DEVICE",)),
    ("DIS_FORCE_DOWNLOAD", 0, 1, 12, 1, "bool", 2, None, ()),
    ("RPT4_RESERVED6", 0, 1, 13, 1, "bool", None, None, ()),
    ("DIS_TWAI", 0, 1, 14, 1, "bool", 2, None, ("DIS_CAN",)),
    ("JTAG_SEL_ENABLE", 0, 1, 15, 1, "bool", 2, None, ()),
    ("SOFT_DIS_JTAG", 0, 1, 16, 3, "uint", 31, None, ()),
    ("DIS_PAD_JTAG", 0, 1, 19, 1, "bool", 2, None, ()),
    ("DIS_DOWNLOAD_MANUAL_ENCRYPT", 0, 1, 20, 1, "bool", 2, None, ()),
    ("USB_DREFH", 0, 1, 21, 2, "uint", 30, None, ()),
    ("USB_DREFL", 0, 1, 23, 2, "uint", 30, None, ()),
    ("USB_EXCHG_PINS", 0, 1, 25, 1, "bool", 30, None, ()),
    ("VDD_SPI_AS_GPIO", 0, 1, 26, 1, "bool", 30, None, ()),
    ("BTLC_GPIO_ENABLE", 0, 1, 27, 2, "uint", 30, None, ()),
    ("POWERGLITCH_EN", 0, 1, 29, 1, "bool", 3, None, ()),
    ("POWER_GLITCH_DSENSE", 0, 1, 30, 2, "uint", 3, None, ()),
    ("RPT4_RESERVED2", 0, 2, 0, 16, "uint", None, None, ()),
    ("WDT_DELAY_SEL", 0, 2, 16, 2, "uint", 3, None, ()),
    ("SPI_BOOT_CRYPT_CNT", 0, 2, 18, 3, "uint", 4, None, ()),
    ("SECURE_BOOT_KEY_REVOKE0", 0, 2, 21, 1, "bool", 5, None, ()),
    ("SECURE_BOOT_KEY_REVOKE1", 0, 2, 22, 1, "bool", 6, None, ()),
    ("SECURE_BOOT_KEY_REVOKE2", 0, 2, 23, 1, "bool", 7, None, ()),
    ("KEY_PURPOSE_0", 0, 2, 24, 4, "uint", 8, None, ("KEY0_PURPOSE",)),
    ("KEY_PURPOSE_1", 0, 2, 28, 4, "uint", 9, None, ("KEY1_PURPOSE",)),
    ("KEY_PURPOSE_2", 0, 3, 0, 4, "uint", 10, None, ("KEY2_PURPOSE",)),
    ("KEY_PURPOSE_3", 0, 3, 4, 4, "uint", 11, None, ("KEY3_PURPOSE",)),
    ("KEY_PURPOSE_4", 0, 3, 8, 4, "uint", 12, None, ("KEY4_PURPOSE",)),
    ("KEY_PURPOSE_5", 0, 3, 12, 4, "uint", 13, None, ("KEY5_PURPOSE",)),
    ("RPT4_RESERVED3", 0, 3, 16, 4, "uint", None, None, ()),
    ("SECURE_BOOT_EN", 0, 3, 20, 1, "bool", 15, None, ()),
    ("SECURE_BOOT_AGGRESSIVE_REVOKE", 0, 3, 21, 1, "bool", 16, None, ()),
    ("RPT4_RESERVED0", 0, 3, 22, 6, "uint", None, None, ()),
    ("FLASH_TPUW", 0, 3, 28, 4, "uint", 18, None, ()),
    ("DIS_DOWNLOAD_MODE", 0, 4, 0, 1, "bool", 18, None, ()),
    ("DIS_DIRECT_BOOT", 0, 4, 1, 1, "bool", 18, None, ("DIS_LEGACY_SPI_BOOT",)),
    ("DIS_USB_SERIAL_JTAG_ROM_PRINT", 0, 4, 2, 1, "bool", 18, None, ("UART_PRINT_CHANNEL",)),
    ("FLASH_ECC_MODE", 0, 4, 3, 1, "bool", 18, None, ()),
    ("DIS_USB_SERIAL_JTAG_DOWNLOAD_MODE", 0, 4, 4, 1, "bool", 18, None, ("DIS_USB_DOWNLOAD_MODE",)),
    ("ENABLE_SECURITY_DOWNLOAD", 0, 4, 5, 1, "bool", 18, None, ()),
    ("UART_PRINT_CONTROL", 0, 4, 6, 2, "uint", 18, None, ()),
    ("PIN_POWER_SELECTION", 0, 4, 8, 1, "bool", 18, None, ()),
    ("FLASH_TYPE", 0, 4, 9, 1, "bool", 18, None, ()),
    ("FLASH_PAGE_SIZE", 0, 4, 10, 2, "uint", 18, None, ()),
    ("FLASH_ECC_EN", 0, 4, 12, 1, "bool", 18, None, ()),
    ("FORCE_SEND_RESUME", 0, 4, 13, 1, "bool", 18, None, ()),
    ("SECURE_VERSION", 0, 4, 14, 16, "uint", 18, None, ()),
    ("RESERVED_0_158", 0, 4, 30, 1, "bool", None, None, ()),
    ("ERR_RST_ENABLE", 0, 4, 31, 1, "bool", 19, None, ()),
    ("DISABLE_WAFER_VERSION_MAJOR", 0, 5, 0, 1, "bool", 19, None, ()),
    ("DISABLE_BLK_VERSION_MAJOR", 0, 5, 1, 1, "bool", 19, None, ()),
    ("RESERVED_0_162", 0, 5, 2, 22, "uint", None, None, ()),
    ("MAC", 1, 0, 0, 48, "bytes", 20, None, ("MAC_FACTORY",)),
    ("SPI_PAD_CONFIG_CLK", 1, 1, 16, 6, "uint", 20, None, ()),
    ("SPI_PAD_CONFIG_Q", 1, 1, 22, 6, "uint", 20, None, ()),
    ("SPI_PAD_CONFIG_D", 1, 1, 28, 6, "uint", 20, None, ()),
    ("SPI_PAD_CONFIG_CS", 1, 2, 2, 6, "uint", 20, None, ()),
    ("SPI_PAD_CONFIG_HD", 1, 2, 8, 6, "uint", 20, None, ()),
    ("SPI_PAD_CONFIG_WP", 1, 2, 14, 6, "uint", 20, None, ()),
    ("SPI_PAD_CONFIG_DQS", 1, 2, 20, 6, "uint", 20, None, ()),
    ("SPI_PAD_CONFIG_D4", 1, 2, 26, 6, "uint", 20, None, ()),
    ("SPI_PAD_CONFIG_D5", 1, 3, 0, 6, "uint", 20, None, ()),
    ("SPI_PAD_CONFIG_D6", 1, 3, 6, 6, "uint", 20, None, ()),
    ("SPI_PAD_CONFIG_D7", 1, 3, 12, 6, "uint", 20, None, ()),
    ("WAFER_VERSION_MINOR_LO", 1, 3, 18, 3, "uint", 20, None, ()),
    ("PKG_VERSION", 1, 3, 21, 3, "uint", 20, None, ()),
    ("BLK_VERSION_MINOR", 1, 3, 24, 3, "uint", 20, None, ()),
    ("FLASH_CAP", 1, 3, 27, 3, "uint", 20, None, ()),
    ("FLASH_TEMP", 1, 3, 30, 2, "uint", 20, None, ()),
    ("FLASH_VENDOR", 1, 4, 0, 3, "uint", 20, None, ()),
    ("RESERVED_1_131", 1, 4, 3, 4, "uint", 20, None, ()),
    ("K_RTC_LDO", 1, 4, 7, 7, "uint", 20, None, ()),
    ("K_DIG_LDO", 1, 4, 14, 7, "uint", 20, None, ()),
    ("V_RTC_DBIAS20", 1, 4, 21, 8, "uint", 20, None, ()),
    ("V_DIG_DBIAS20", 1, 4, 29, 8, "uint", 20, None, ()),
    ("DIG_DBIAS_HVT", 1, 5, 5, 5, "uint", 20, None, ()),
    ("THRES_HVT", 1, 5, 10, 10, "uint", 20, None, ()),
    ("RESERVED_1_180", 1, 5, 20, 3, "uint", 20, None, ()),
    ("WAFER_VERSION_MINOR_HI", 1, 5, 23, 1, "bool", 20, None, ()),
    ("WAFER_VERSION_MAJOR", 1, 5, 24, 2, "uint", 20, None, ()),
    ("RESERVED_1_186", 1, 5, 26, 6, "uint", 20, None, ()),
    ("OPTIONAL_UNIQUE_ID", 2, 0, 0, 128, "bytes", 21, None, ()),
    ("BLK_VERSION_MAJOR", 2, 4, 0, 2, "uint", 21, None, ()),
    ("RESERVED_2_130", 2, 4, 2, 1, "bool", 21, None, ()),
    ("TEMP_CALIB", 2, 4, 3, 9, "uint", 21, None, ()),
    ("OCODE", 2, 4, 12, 8, "uint", 21, None, ()),
    ("ADC1_INIT_CODE_ATTEN0", 2, 4, 20, 10, "uint", 21, None, ()),
    ("ADC1_INIT_CODE_ATTEN1", 2, 4, 30, 10, "uint", 21, None, ()),
    ("ADC1_INIT_CODE_ATTEN2", 2, 5, 8, 10, "uint", 21, None, ()),
    ("ADC1_INIT_CODE_ATTEN3", 2, 5, 18, 10, "uint", 21, None, ()),
    ("ADC1_CAL_VOL_ATTEN0", 2, 5, 28, 10, "uint", 21, None, ()),
    ("ADC1_CAL_VOL_ATTEN1", 2, 6, 6, 10, "uint", 21, None, ()),
    ("ADC1_CAL_VOL_ATTEN2", 2, 6, 16, 10, "uint", 21, None, ()),
    ("ADC1_CAL_VOL_ATTEN3", 2, 6, 26, 10, "uint", 21, None, ()),
    ("RESERVED_2_228", 2, 7, 4, 28, "uint", 21, None, ()),
    ("BLOCK_USR_DATA", 3, 0, 0, 256, "bytes", 22, None, ("USER_DATA",)),
    ("RESERVED_3_192", 3, 6, 0, 8, "uint", 22, None, ()),
    ("CUSTOM_MAC", 3, 6, 8, 48, "bytes", 22, None, ("MAC_CUSTOM", "USER_DATA_MAC_CUSTOM")),
    ("RESERVED_3_248", 3, 7, 24, 8, "uint", 22, None, ()),
    ("BLOCK_KEY0", 4, 0, 0, 256, "bytes", 23, 0, ("KEY0",)),
    ("BLOCK_KEY1", 5, 0, 0, 256, "bytes", 24, 1, ("KEY1",)),
    ("BLOCK_KEY2", 6, 0, 0, 256, "bytes", 25, 2, ("KEY2",)),
    ("BLOCK_KEY3", 7, 0, 0, 256, "bytes", 26, 3, ("KEY3",)),
    ("BLOCK_KEY4", 8, 0, 0, 256, "bytes", 27, 4, ("KEY4",)),
    ("BLOCK_KEY5", 9, 0, 0, 256, "bytes", 28, 5, ("KEY5",)),
    ("BLOCK_SYS_DATA2", 10, 0, 0, 256, "bytes", 29, 6, ("SYS_DATA_PART2",)),
)
FIELDS: tuple[Field, ...] = tuple(Field(*row) for row in _FIELD_ROWS)
_FIELD_BY_NAME: dict[str, Field] = {n: f for f in FIELDS for n in (f.name, *f.aliases)}
# espefuse shows the factory MAC most-significant byte first (the address as printed);
# every other bytes field in the order of its bytes in the read registers.
_ADDRESS_ORDER_FIELDS = frozenset({"MAC"})
# Calculated, read-only: WAFER_VERSION_MINOR_HI << 3 | WAFER_VERSION_MINOR_LO (espefuse CALC).
_WAFER_VERSION_MINOR = "WAFER_VERSION_MINOR"

# GET_SECURITY_INFO flag bits (esptool loader.py SECURITY_INFO_FLAG_MAP, "same across all
# targets in the ROM") and the C3 fuse behind each. The ROM's own mapping is not public:
# SOFT_DIS_JTAG counts as set when an odd number of its bits is (efuse_reg.h: "odd number
# 1 means disable"); DIS_USB is the C3's USB-Serial-JTAG disable; the C3 has no
# DIS_DOWNLOAD_DCACHE fuse, so bit 9 is never set.
_SECURITY_FLAG_FUSES: tuple[tuple[int, str], ...] = (
    (0, "SECURE_BOOT_EN"),
    (1, "SECURE_BOOT_AGGRESSIVE_REVOKE"),
    (2, "ENABLE_SECURITY_DOWNLOAD"),
    (3, "SECURE_BOOT_KEY_REVOKE0"),
    (4, "SECURE_BOOT_KEY_REVOKE1"),
    (5, "SECURE_BOOT_KEY_REVOKE2"),
    (6, "SOFT_DIS_JTAG"),
    (7, "DIS_PAD_JTAG"),
    (8, "DIS_USB_SERIAL_JTAG"),
    (10, "DIS_DOWNLOAD_ICACHE"),
)


def field_definition(name: str) -> Field:
    """The table entry for *name* (or one of its alternative names)."""
    try:
        return _FIELD_BY_NAME[name]
    except KeyError:
        raise KeyError(f"no eFuse named {name!r} on the ESP32-C3") from None


# --------------------------------------------------------------------------- file format

READ_PROTECTED_SUFFIX = "-read-protected.json"


def read_protected_file(efuse_file: Path) -> Path:
    """The sidecar of the eFuse file *efuse_file*: ``<stem>-read-protected.json`` beside it
    (``efuse.bin`` → ``efuse-read-protected.json``).

    It holds what the chip's fuse array keeps of read-protected blocks and espefuse's
    ``--virt`` format cannot: a JSON object from block name (``"BLOCK_KEY1"``) to the
    block's 32 bytes in hex, in register byte order as :meth:`EfuseController.field`
    returns a readable block (a key reads back as the bytes given to
    :meth:`EfuseController.write_key`). No file means no such block holds anything.
    """
    efuse_file = Path(efuse_file)
    return efuse_file.with_name(efuse_file.stem + READ_PROTECTED_SUFFIX)


def _image_to_file(words: list[int]) -> bytes:
    """espefuse --virt layout: the little-endian register window, byte-reversed."""
    return b"".join(w.to_bytes(4, "little") for w in words)[::-1]


def _file_to_image(data: bytes) -> list[int]:
    window = data[:EFUSE_MEM_SIZE][::-1]
    return [int.from_bytes(window[i : i + 4], "little") for i in range(0, EFUSE_MEM_SIZE, 4)]


def _words_to_int(words: Iterable[int]) -> int:
    return sum((w & _WORD_MASK) << (32 * i) for i, w in enumerate(words))


def _int_to_words(value: int, count: int) -> list[int]:
    return [(value >> (32 * i)) & _WORD_MASK for i in range(count)]


def _words_to_bytes(words: Iterable[int]) -> bytes:
    return b"".join((w & _WORD_MASK).to_bytes(4, "little") for w in words)


def _bytes_to_words(data: bytes) -> list[int]:
    return [int.from_bytes(data[i : i + 4], "little") for i in range(0, len(data), 4)]


def rs_parity_words(data_words: list[int]) -> list[int]:
    """PGM_CHECK_VALUE0..2 for eight PGM_DATA words: RS(44,32) parity as espefuse computes it."""
    data = _words_to_bytes(data_words)
    return _bytes_to_words(bytes(_RS.encode(data)[_RS_DATA_BYTES:]))


def _read_hidden(sidecar: Path) -> dict[int, list[int]]:
    """The read-protected blocks' content kept in *sidecar* (block index -> words); none
    when there is no sidecar. A sidecar that does not parse is refused rather than
    dropped: it may hold the only copy of a key."""
    try:
        text = sidecar.read_text()
    except FileNotFoundError:
        return {}
    by_name = {blk.name: blk for blk in BLOCKS if blk.rd_dis_bit is not None}
    try:
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
        hidden: dict[int, list[int]] = {}
        for name, value in record.items():
            if name not in by_name:
                raise ValueError(f"{name!r} is not a read-protectable block")
            data = bytes.fromhex(value)
            if len(data) != 4 * by_name[name].words:
                raise ValueError(f"{name} holds {len(data)} bytes, not {4 * by_name[name].words}")
            hidden[by_name[name].index] = _bytes_to_words(data)
    except (ValueError, TypeError) as exc:
        raise EfuseError(f"{sidecar}: not a record of read-protected eFuse blocks ({exc})") from None
    return hidden


# --------------------------------------------------------------------------- controller


class EfuseController:
    """The ESP32-C3 eFuse controller of one virtual board; thread-safe.

    The ROM emulator forwards READ_REG / WRITE_REG in the controller's window
    (:meth:`handles`) to :meth:`read_reg` / :meth:`write_reg`; the emulated bootloader
    and lab set-up use the named API (:meth:`field`, :meth:`burn_field`, the security
    properties), which reads what the read registers show, as firmware would.
    """

    def __init__(self, path: Path, image: list[int], hidden: dict[int, list[int]] | None = None):
        """Use :meth:`open`; *image* is the register window as loaded from *path*, *hidden*
        the content of read-protected blocks as loaded from its sidecar."""
        self.path = Path(path)
        self.read_protected_path = read_protected_file(self.path)
        """The sidecar holding the content of read-protected blocks (:func:`read_protected_file`)."""
        self._lock = threading.RLock()
        # _regs: what the bus reads. _array: the fuse array (and the error status a READ
        # would report), laid out like the read registers; loaded into _regs by READ_CMD.
        # A read-protected block is zero in both; _hidden (block index -> words) is what
        # the array really holds there, which only the key-using peripherals see.
        self._regs = list(image)
        self._array = list(image)
        self._hidden: dict[int, list[int]] = dict(hidden or {})
        self._disk = b""
        for w in range(_WORDS):  # power-on reset of everything but the fuses
            if w not in _NONVOLATILE_WORDS:
                self._regs[w] = _RESET_VALUES[w]

    @classmethod
    def open(cls, path: Path, mac: bytes) -> EfuseController:
        """Power on the chip whose eFuses live in *path*; a missing (or empty) file is a
        factory-fresh ESP32-C3 v0.4 with base MAC *mac* (BLOCK1; the C3 keeps no MAC CRC)
        and blank security fuses. An existing file keeps its state and *mac* is ignored,
        as a chip's burnt MAC cannot change; its sidecar (:func:`read_protected_file`)
        brings back the content of its read-protected blocks. A sidecar left beside a
        missing file belonged to a chip that is gone, and is removed.
        """
        mac = bytes(mac)
        if len(mac) != 6:
            raise ValueError(f"a MAC is 6 bytes, got {len(mac)}")
        path = Path(path)
        data = path.read_bytes() if path.exists() else b""
        if not data:
            controller = cls(path, cls._factory_image(mac))
            controller.read_protected_path.unlink(missing_ok=True)
        elif len(data) < EFUSE_MEM_SIZE:
            raise EfuseError(f"{path}: {len(data)} bytes is not an eFuse image ({EFUSE_MEM_SIZE} bytes)")
        else:
            controller = cls(path, _file_to_image(data), _read_hidden(read_protected_file(path)))
        with controller._lock:
            controller._apply_read_protection()  # a file from elsewhere may show a hidden block
            for w in _NONVOLATILE_WORDS:
                controller._regs[w] = controller._array[w]
            controller._save()
        return controller

    @staticmethod
    def _factory_image(mac: bytes) -> list[int]:
        image = list(_RESET_VALUES)
        factory = {
            "MAC": int.from_bytes(mac, "big"),
            "WAFER_VERSION_MAJOR": FACTORY_WAFER_VERSION[0],
            "WAFER_VERSION_MINOR_LO": FACTORY_WAFER_VERSION[1] & 0x7,
            "WAFER_VERSION_MINOR_HI": FACTORY_WAFER_VERSION[1] >> 3,
            # A C3 v0.4 leaves the factory with eFuse block revision v1.3 (esp-idf issue #18222),
            # which the bootloader prints as "efuse block revision: v1.3".
            "BLK_VERSION_MAJOR": FACTORY_BLK_VERSION[0],
            "BLK_VERSION_MINOR": FACTORY_BLK_VERSION[1],
        }
        for name, value in factory.items():
            f = _FIELD_BY_NAME[name]
            blk = BLOCKS[f.block]
            base = blk.rd_offset // 4
            block_int = _words_to_int(image[base : base + blk.words]) | (value << f.shift)
            image[base : base + blk.words] = _int_to_words(block_int, blk.words)
        return image

    # ------------------------------------------------------------------ register interface

    @staticmethod
    def handles(addr: int) -> bool:
        """True for addresses in the controller's window 0x60008800..0x600089FF."""
        return EFUSE_BASE <= addr < EFUSE_BASE + EFUSE_MEM_SIZE

    def read_reg(self, addr: int) -> int:
        """What a 32-bit load from *addr* returns (unaligned addresses read their word)."""
        word = self._word_index(addr)
        with self._lock:
            self._sync()
            access = _ACCESS[word]
            if access is Access.WO:
                return 0
            if word * 4 == INT_ST:
                return self._regs[INT_RAW // 4] & self._regs[INT_ENA // 4]
            return self._regs[word]

    def write_reg(self, addr: int, value: int, mask: int = _WORD_MASK) -> None:
        """A store to *addr* with the ROM's WRITE_REG mask semantics
        (``new = value & mask | old & ~mask``). Read-only registers ignore it; writing
        ``CMD`` starts the command it holds. Never raises for an address in the window."""
        word = self._word_index(addr)
        value &= _WORD_MASK
        mask &= _WORD_MASK
        with self._lock:
            self._sync()
            access = _ACCESS[word]
            if access is Access.RO:
                return
            if word * 4 == INT_CLR:
                self._regs[INT_RAW // 4] &= ~(value & mask) & _WORD_MASK
                return
            self._regs[word] = (value & mask) | (self._regs[word] & ~mask & _WORD_MASK)
            if word * 4 == CMD:
                self._run_command()

    def _word_index(self, addr: int) -> int:
        if not self.handles(addr):
            raise ValueError(f"0x{addr:08x} is not in the eFuse controller (0x{EFUSE_BASE:08x}+0x{EFUSE_MEM_SIZE:x})")
        return (addr - EFUSE_BASE) // 4

    def _run_command(self) -> None:
        """Execute PGM_CMD / READ_CMD as the controller does, then clear the command bits
        (the C3 clears them when done; software polls for that). A command whose CONF op
        code does not match is not performed."""
        cmd = self._regs[CMD // 4]
        conf = self._regs[CONF // 4] & 0xFFFF
        if cmd & CMD_PGM and conf == OP_CODE_PROGRAM:
            block = (cmd & CMD_BLK_NUM_MASK) >> CMD_BLK_NUM_SHIFT
            if block < len(BLOCKS):
                pgm = self._regs[PGM_DATA0 // 4 : PGM_DATA0 // 4 + 8]
                check = self._regs[PGM_CHECK_VALUE0 // 4 : PGM_CHECK_VALUE0 // 4 + 3]
                self._program(block, pgm, check)
                self._save()
            self._regs[INT_RAW // 4] |= INT_PGM_DONE
        if cmd & CMD_READ and conf == OP_CODE_READ:
            self._load()
        self._regs[CMD // 4] = cmd & ~(CMD_PGM | CMD_READ) & _WORD_MASK

    # ------------------------------------------------------------------ the fuse array

    def _array_block(self, block: int) -> list[int]:
        blk = BLOCKS[block]
        base = blk.rd_offset // 4
        return self._array[base : base + blk.words]

    def _write_protected_mask(self, block: int) -> int:
        """Bits of *block* that programming cannot change, from the array's WR_DIS."""
        blk = BLOCKS[block]
        wr_dis = self._array[BLOCKS[0].rd_offset // 4]
        if blk.wr_dis_bit is not None and wr_dis >> blk.wr_dis_bit & 1:
            return (1 << (32 * blk.words)) - 1
        mask = 0
        for f in FIELDS:
            if f.block == block and f.wr_dis is not None and wr_dis >> f.wr_dis & 1:
                mask |= f.mask
        return mask

    def _program(self, block: int, pgm_data: list[int], check: list[int]) -> None:
        """Burn PGM_DATA (and, for BLOCK1..10, the RS parity in CHECK_VALUE) into the array.

        Cells only go 0 → 1. For an RS block the parity cells are ORed too, with the
        parity of what the block held before (the array keeps no parity of its own: a
        correctly burnt block's parity is its RS code). If data and parity then disagree,
        the block reads back as the decoder corrects it, with its error count and FAIL
        bit set, as on the chip.
        """
        blk = BLOCKS[block]
        base = blk.rd_offset // 4
        protected = self._write_protected_mask(block)
        if blk.wr_dis_bit is not None and protected == (1 << (32 * blk.words)) - 1:
            return
        if not blk.rs_coded:
            old = _words_to_int(self._array_block(block))
            new = _words_to_int(pgm_data[: blk.words]) & ~protected
            self._array[base : base + blk.words] = _int_to_words(old | new, blk.words)
        else:
            old_data = self._cells(block) + [0] * (8 - blk.words)
            old_parity = rs_parity_words(old_data)
            data = [o | n for o, n in zip(old_data, pgm_data, strict=True)]
            parity = [o | n for o, n in zip(old_parity, check, strict=True)]
            corrected, errors, failed = self._rs_read(data, parity)
            self._array[base : base + blk.words] = corrected[: blk.words]
            self._set_rs_status(blk, errors, failed)
        self._apply_read_protection()

    @staticmethod
    def _rs_read(data: list[int], parity: list[int]) -> tuple[list[int], int, bool]:
        """What the RS decoder delivers for these cells: (data words, error bytes, failed)."""
        if rs_parity_words(data) == parity:
            return data, 0, False
        codeword = bytearray(_words_to_bytes(data) + _words_to_bytes(parity))
        try:
            message, _, errata = _RS.decode(codeword)
        except reedsolo.ReedSolomonError:
            return data, 7, True
        return _bytes_to_words(bytes(message)), min(len(errata), 7), False

    def _set_rs_status(self, blk: Block, errors: int, failed: bool) -> None:
        if blk.rs_err_num is not None:
            offset, shift = blk.rs_err_num
            word = self._array[offset // 4] & ~(0x7 << shift)
            self._array[offset // 4] = word | (errors & 0x7) << shift
        if blk.rs_fail is not None:
            offset, bit = blk.rs_fail
            word = self._array[offset // 4] & ~(1 << bit)
            self._array[offset // 4] = word | int(failed) << bit

    def _read_protected(self, block: int) -> bool:
        """RD_DIS (as burnt in the array) hides *block* from the read registers."""
        bit = BLOCKS[block].rd_dis_bit
        return bit is not None and bool(self._array[BLOCKS[0].rd_offset // 4 + 1] >> bit & 1)

    def _cells(self, block: int) -> list[int]:
        """What the fuse array holds in *block*, read-protected or not."""
        if self._read_protected(block):
            return list(self._hidden.get(block, [0] * BLOCKS[block].words))
        return self._array_block(block)

    def _apply_read_protection(self) -> None:
        """A read-disabled block reads as zeros, and the file must show it so; what the
        array holds there goes to the sidecar first (ORed with what it kept: a fuse only
        goes 0 -> 1), so the key-using peripherals still find it after a power cycle."""
        changed = False
        for blk in BLOCKS:
            if not self._read_protected(blk.index):
                continue
            base = blk.rd_offset // 4
            kept = self._hidden.get(blk.index, [0] * blk.words)
            merged = [k | a for k, a in zip(kept, self._array[base : base + blk.words], strict=True)]
            if merged != kept:
                self._hidden[blk.index] = merged
                changed = True
            self._array[base : base + blk.words] = [0] * blk.words
        if changed:
            self._save_hidden()

    def _load(self) -> None:
        """READ_CMD: the read registers take the array's content and error status."""
        for w in _NONVOLATILE_WORDS:
            self._regs[w] = self._array[w]
        self._regs[INT_RAW // 4] |= INT_READ_DONE

    # ------------------------------------------------------------------ persistence

    def _save(self) -> None:
        """Write what a power cycle would show (array + current control registers),
        atomically, so espefuse --virt never sees half a file."""
        image = [self._array[w] if w in _NONVOLATILE_WORDS else self._regs[w] for w in range(_WORDS)]
        data = _image_to_file(image)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        self._disk = data

    def _save_hidden(self) -> None:
        """Write the sidecar (:func:`read_protected_file`) atomically, like :meth:`_save`."""
        record = {BLOCKS[b].name: _words_to_bytes(words).hex() for b, words in sorted(self._hidden.items()) if any(words)}
        self.read_protected_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.read_protected_path.with_name(self.read_protected_path.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        os.replace(tmp, self.read_protected_path)

    def _sync(self) -> None:
        """Adopt the file if another tool (espefuse --virt) burnt into it since we last
        wrote it: its fuses become the array and, as after a READ, the read registers.
        A block that tool read-protected keeps what the array held (espefuse's emulator
        zeroes it in the file; the chip does not)."""
        try:
            data = self.path.read_bytes()[:EFUSE_MEM_SIZE]
        except FileNotFoundError:
            self._save()
            return
        if data == self._disk or len(data) < EFUSE_MEM_SIZE:
            return  # unchanged, or another writer is half-way through
        image = _file_to_image(data)
        before = list(self._array)
        for w in _NONVOLATILE_WORDS:
            self._array[w] = image[w]
        for blk in BLOCKS:
            if self._read_protected(blk.index):
                base = blk.rd_offset // 4
                for w in range(base, base + blk.words):
                    self._array[w] |= before[w]
        self._apply_read_protection()
        for w in _NONVOLATILE_WORDS:
            self._regs[w] = self._array[w]
        self._disk = data

    # ------------------------------------------------------------------ named API

    def _read_block_int(self, block: int) -> int:
        blk = BLOCKS[block]
        base = blk.rd_offset // 4
        return _words_to_int(self._regs[base : base + blk.words])

    def _raw(self, f: Field) -> int:
        return (self._read_block_int(f.block) & f.mask) >> f.shift

    def field(self, name: str) -> int | bytes:
        """The eFuse *name* as the read registers show it, under espefuse's names.

        Integers for bool/uint fields; bytes for bytes fields, in the order espefuse
        prints them (the MAC as an address, key blocks in register byte order — a
        Secure Boot digest reads back as the 32 bytes that were burnt).
        """
        with self._lock:
            self._sync()
            if name == _WAFER_VERSION_MINOR:
                return self._raw(_FIELD_BY_NAME["WAFER_VERSION_MINOR_HI"]) << 3 | self._raw(_FIELD_BY_NAME["WAFER_VERSION_MINOR_LO"])
            f = field_definition(name)
            raw = self._raw(f)
            if f.kind != "bytes":
                return raw
            order = "big" if f.name in _ADDRESS_ORDER_FIELDS else "little"
            return raw.to_bytes(f.bits // 8, order)

    def burn_field(self, name: str, value: int | bytes | str) -> None:
        """Burn the 1-bits of *value* into eFuse *name* and read back, as
        ``espefuse burn-efuse`` / ESP-IDF's ``esp_efuse_write_field_*`` do.

        *value* is an int (bool/uint fields), bytes in :meth:`field`'s order, or for
        ``KEY_PURPOSE_n`` a purpose name ("SECURE_BOOT_DIGEST0"). Bits already burnt stay
        burnt; zeros in *value* change nothing. Raises :class:`EfuseWriteProtected` if
        new bits are asked of a write-disabled field, and :class:`EfuseError` for what
        espefuse refuses: a read-protected block, or adding bits to a Reed–Solomon block
        that already holds data (its parity cannot be re-burnt).
        """
        with self._lock:
            self._sync()
            f = field_definition(name)
            bits = self._encode(f, value)
            blk = BLOCKS[f.block]
            current = _words_to_int(self._array_block(f.block))
            wanted = bits << f.shift
            if current & wanted == wanted:
                return
            if self._write_protected_mask(f.block) & wanted:
                raise EfuseWriteProtected(f"{f.name} is write-protected (WR_DIS); its bits cannot change")
            rd_dis = self._array[BLOCKS[0].rd_offset // 4 + 1] & 0x7F
            if blk.rd_dis_bit is not None and rd_dis >> blk.rd_dis_bit & 1:
                raise EfuseError(f"{f.name} is in read-protected {blk.name}; a burn could damage what it holds")
            if blk.rs_coded and current:
                raise EfuseError(f"{blk.name} already holds data; its Reed-Solomon parity forbids burning more bits")
            pgm = _int_to_words(wanted, 8)
            self._program(f.block, pgm, rs_parity_words(pgm) if blk.rs_coded else [0, 0, 0])
            self._load()
            self._save()

    @staticmethod
    def _encode(f: Field, value: int | bytes | str) -> int:
        if isinstance(value, str):
            if not f.name.startswith("KEY_PURPOSE_") or value not in KEY_PURPOSES:
                raise ValueError(f"{value!r} is not a value for {f.name}")
            value = KEY_PURPOSES[value]
        if isinstance(value, bytes | bytearray):
            if f.kind != "bytes" or len(value) != f.bits // 8:
                raise ValueError(f"{f.name} takes {f.bits // 8 if f.kind == 'bytes' else 'an integer, not'} bytes")
            order = "big" if f.name in _ADDRESS_ORDER_FIELDS else "little"
            return int.from_bytes(value, order)
        value = int(value)
        if not 0 <= value < 1 << f.bits:
            raise ValueError(f"{value:#x} does not fit {f.name} ({f.bits} bits)")
        return value

    # ------------------------------------------------------------------ keys and the HMAC peripheral

    @staticmethod
    def _check_key_id(key_id: int) -> None:
        if not 0 <= key_id < KEY_BLOCK_COUNT:
            raise ValueError(f"key block {key_id} does not exist: the ESP32-C3 has BLOCK_KEY0..{KEY_BLOCK_COUNT - 1}")

    def _key_block_unused(self, key_id: int) -> bool:
        """ESP-IDF ``esp_efuse_key_block_unused``: purpose USER, neither the purpose nor
        the key write-protected, the key not read-protected, and the block reads all zero."""
        wr_dis = int(self.field("WR_DIS"))
        purpose = field_definition(f"KEY_PURPOSE_{key_id}")
        key = field_definition(f"BLOCK_KEY{key_id}")
        assert purpose.wr_dis is not None and key.wr_dis is not None and key.rd_dis is not None
        return (
            self.field(purpose.name) == KEY_PURPOSES["USER"]
            and not wr_dis >> purpose.wr_dis & 1
            and not int(self.field("RD_DIS")) >> key.rd_dis & 1
            and not wr_dis >> key.wr_dis & 1
            and self.field(key.name) == bytes(key.bits // 8)
        )

    def find_unused_key_block(self) -> int | None:
        """The first key block (0..5 for BLOCK_KEY0..5) nothing uses yet, as ESP-IDF
        ``esp_efuse_find_unused_key_block`` picks one (nvs_sec_provider burns its HMAC key
        there); None when all six are taken."""
        with self._lock:
            return next((n for n in range(KEY_BLOCK_COUNT) if self._key_block_unused(n)), None)

    def find_purpose(self, purpose: str) -> int | None:
        """The first key block (0..5) whose KEY_PURPOSE is *purpose* (a name such as
        "HMAC_UP"), as ESP-IDF ``esp_efuse_find_purpose`` answers; None when none has it."""
        if purpose not in KEY_PURPOSES:
            raise ValueError(f"{purpose!r} is not an ESP32-C3 key purpose ({', '.join(KEY_PURPOSES)})")
        with self._lock:
            purposes = self.key_purposes()[:KEY_BLOCK_COUNT]
            return purposes.index(KEY_PURPOSES[purpose]) if KEY_PURPOSES[purpose] in purposes else None

    def write_key(self, key_id: int, purpose: str, key: bytes) -> None:
        """Burn *key* into BLOCK_KEY<key_id> for *purpose*, as ESP-IDF ``esp_efuse_write_key``
        does: the key, then the key block's WR_DIS bit, its RD_DIS bit unless the purpose
        is a readable one (:data:`READ_PROTECTED_PURPOSES`), then KEY_PURPOSE_<key_id>
        and its WR_DIS bit. *key* is at most 32 bytes (shorter fills the block from its
        start; the rest stays zero); a read-protected key stays usable by
        :meth:`hmac_calculate` and across power cycles (the sidecar).

        Refused with :class:`EfuseError`, burning nothing, where ESP-IDF refuses: a block
        in use (ESP_ERR_INVALID_STATE: see :meth:`find_unused_key_block`), an XTS-AES key
        in BLOCK_KEY5 (ESP_ERR_NOT_SUPPORTED, the C3's BLOCK9 quirk), or a
        write-protected RD_DIS (:class:`EfuseWriteProtected`: the batch would not commit).
        ``ValueError`` for arguments ESP-IDF calls invalid (ESP_ERR_INVALID_ARG).
        """
        self._check_key_id(key_id)
        if purpose not in KEY_PURPOSES:
            raise ValueError(f"{purpose!r} is not an ESP32-C3 key purpose ({', '.join(KEY_PURPOSES)})")
        key = bytes(key)
        if len(key) > 32:
            raise ValueError(f"a key block holds 32 bytes, got {len(key)}")
        key_field = field_definition(f"BLOCK_KEY{key_id}")
        purpose_field = field_definition(f"KEY_PURPOSE_{key_id}")
        assert key_field.wr_dis is not None and key_field.rd_dis is not None and purpose_field.wr_dis is not None
        read_protect = purpose in READ_PROTECTED_PURPOSES
        with self._lock:
            if not self._key_block_unused(key_id):
                raise EfuseError(f"{key_field.name} is in use (a purpose, key or protection is burnt); esp_efuse_write_key refuses it")
            if key_id == _NO_XTS_KEY_BLOCK and purpose.startswith("XTS_AES"):
                raise EfuseError(f"{key_field.name} cannot hold an {purpose} key on the ESP32-C3 (SOC_EFUSE_BLOCK9_KEY_PURPOSE_QUIRK)")
            rd_dis_guard = field_definition("RD_DIS").wr_dis
            if read_protect and rd_dis_guard is not None and int(self.field("WR_DIS")) >> rd_dis_guard & 1:
                raise EfuseWriteProtected(f"RD_DIS is write-protected; {key_field.name} could not be read-protected")
            self.burn_field(key_field.name, key.ljust(32, b"\0"))
            self.burn_field("WR_DIS", 1 << key_field.wr_dis)
            if read_protect:
                self.burn_field("RD_DIS", 1 << key_field.rd_dis)
            self.burn_field(purpose_field.name, purpose)
            self.burn_field("WR_DIS", 1 << purpose_field.wr_dis)

    def hmac_calculate(self, key_id: int, message: bytes) -> bytes:
        """HMAC-SHA256 of *message* with the key in BLOCK_KEY<key_id>, by the HMAC
        peripheral in upstream mode, as ESP-IDF ``esp_hmac_calculate`` returns it.

        The peripheral reads the key from the fuse array, so a read-protected key works
        (software never sees it); the key bytes are those given to :meth:`write_key`
        (register byte order, as :meth:`field` shows a readable block). The hardware
        refuses a block whose KEY_PURPOSE is not HMAC_UP (``hmac_hal_configure`` reports a
        configuration error, ESP_FAIL): :class:`EfuseError`.
        """
        self._check_key_id(key_id)
        with self._lock:
            self._sync()
            purpose = int(self.field(f"KEY_PURPOSE_{key_id}"))
            if purpose != KEY_PURPOSES["HMAC_UP"]:
                name = next((n for n, v in KEY_PURPOSES.items() if v == purpose), str(purpose))
                raise EfuseError(f"HMAC refused: BLOCK_KEY{key_id} has purpose {name}, not HMAC_UP (esp_hmac_calculate: ESP_FAIL)")
            block = field_definition(f"BLOCK_KEY{key_id}").block
            key = _words_to_bytes(self._cells(block)) if self._read_protected(block) else self.field(f"BLOCK_KEY{key_id}")
            assert isinstance(key, bytes)
            return hmac.new(key, bytes(message), hashlib.sha256).digest()

    # ------------------------------------------------------------------ security properties

    @property
    def secure_version(self) -> int:
        """The anti-rollback version: SECURE_VERSION is a thermometer code, so its popcount."""
        return bin(int(self.field("SECURE_VERSION"))).count("1")

    def raise_secure_version(self, n: int) -> None:
        """Make :attr:`secure_version` at least *n* by burning the lowest unburnt bits, as
        ESP-IDF ``esp_efuse_update_secure_version`` (``esp_efuse_write_field_cnt``) does."""
        sec = field_definition("SECURE_VERSION")
        if not 0 <= n <= sec.bits:
            raise ValueError(f"secure version {n} is outside 0..{sec.bits}")
        with self._lock:
            current = int(self.field("SECURE_VERSION"))
            missing = n - bin(current).count("1")
            new = current
            for bit in range(sec.bits):
                if missing <= 0:
                    break
                if not new >> bit & 1:
                    new |= 1 << bit
                    missing -= 1
            if new != current:
                self.burn_field("SECURE_VERSION", new)

    @property
    def secure_boot_enabled(self) -> bool:
        return bool(self.field("SECURE_BOOT_EN"))

    def key_purposes(self) -> list[int]:
        """KEY_PURPOSE_0..5 and the 7th byte GET_SECURITY_INFO carries (12 on a C3)."""
        with self._lock:
            return [int(self.field(f"KEY_PURPOSE_{i}")) for i in range(KEY_BLOCK_COUNT)] + [NO_KEY_BLOCK_PURPOSE]

    def secure_boot_digests(self) -> list[bytes | None]:
        """SECURE_BOOT_DIGEST0..2: the content of the first key block whose purpose is
        9/10/11 (ESP-IDF ``esp_efuse_find_purpose``), or None when no block has it."""
        with self._lock:
            purposes = self.key_purposes()[:KEY_BLOCK_COUNT]
            digests: list[bytes | None] = []
            for purpose in SECURE_BOOT_DIGEST_PURPOSES:
                if purpose in purposes:
                    value = self.field(f"BLOCK_KEY{purposes.index(purpose)}")
                    assert isinstance(value, bytes)
                    digests.append(value)
                else:
                    digests.append(None)
            return digests

    @property
    def revoked_digest_slots(self) -> set[int]:
        """Digest slots i whose SECURE_BOOT_KEY_REVOKEi is burnt."""
        with self._lock:
            return {i for i in range(3) if self.field(f"SECURE_BOOT_KEY_REVOKE{i}")}

    @property
    def download_mode_disabled(self) -> bool:
        return bool(self.field("DIS_DOWNLOAD_MODE"))

    @property
    def secure_download_enabled(self) -> bool:
        """ENABLE_SECURITY_DOWNLOAD: the ROM then only accepts the secure-download subset."""
        return bool(self.field("ENABLE_SECURITY_DOWNLOAD"))

    def crypt_count(self) -> int:
        """SPI_BOOT_CRYPT_CNT as stored (3 bits), as GET_SECURITY_INFO reports it."""
        return int(self.field("SPI_BOOT_CRYPT_CNT"))

    @property
    def flash_encryption_enabled(self) -> bool:
        """Flash encryption is on when an odd number of SPI_BOOT_CRYPT_CNT bits is burnt."""
        return bin(self.crypt_count()).count("1") % 2 == 1

    @property
    def pad_jtag_disabled(self) -> bool:
        """JTAG on the MTMS/MTDI pads is off: DIS_PAD_JTAG, or SOFT_DIS_JTAG odd."""
        with self._lock:
            return bool(self.field("DIS_PAD_JTAG")) or bin(int(self.field("SOFT_DIS_JTAG"))).count("1") % 2 == 1

    @property
    def usb_jtag_disabled(self) -> bool:
        """JTAG over the USB-Serial-JTAG peripheral is off: DIS_USB_JTAG or DIS_USB_SERIAL_JTAG."""
        with self._lock:
            return bool(self.field("DIS_USB_JTAG")) or bool(self.field("DIS_USB_SERIAL_JTAG"))

    @property
    def jtag_disabled(self) -> bool:
        """No JTAG path is left: both the pad and the USB JTAG are disabled (ESP-IDF's
        Secure Boot "Disable hardware & software JTAG" burns both)."""
        with self._lock:
            return self.pad_jtag_disabled and self.usb_jtag_disabled

    @property
    def mac(self) -> bytes:
        """The factory base MAC (BLOCK1), most significant byte first."""
        value = self.field("MAC")
        assert isinstance(value, bytes)
        return value

    @property
    def chip_revision(self) -> tuple[int, int]:
        """(major, minor) wafer version, as esptool prints ``revision v<major>.<minor>``."""
        with self._lock:
            return int(self.field("WAFER_VERSION_MAJOR")), int(self.field(_WAFER_VERSION_MINOR))

    def security_flags(self) -> int:
        """The GET_SECURITY_INFO flags word (bit meanings: esptool loader.py)."""
        with self._lock:
            flags = 0
            for bit, name in _SECURITY_FLAG_FUSES:
                value = int(self.field(name))
                on = bin(value).count("1") % 2 == 1 if name == "SOFT_DIS_JTAG" else value != 0
                flags |= int(on) << bit
            return flags

    def security_info_payload(self) -> bytes:
        """The 20 data bytes of a GET_SECURITY_INFO reply (before the status bytes):
        flags, crypt count, 7 key purposes, chip id, ROM API version."""
        with self._lock:
            return struct.pack("<IB7BII", self.security_flags(), self.crypt_count(), *self.key_purposes(), CHIP_ID, ROM_API_VERSION)

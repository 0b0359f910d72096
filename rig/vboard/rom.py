"""ESP32-C3 serial download mode, as the ROM loader and the flasher stub answer it.

The board's UART hands every complete SLIP frame to :class:`DownloadMode`, which
answers exactly as the chip does: the C3 ROM first, then — once esptool has uploaded
its flasher stub with MEM_BEGIN/MEM_DATA/MEM_END and the image matches a stub that
esptool ships — the stub. The stub's code is never run: its behaviour is reproduced
here, down to the deferred ("double-buffered") error reporting.

Sources (cited next to each table): esptool 5.6 ``esptool/loader.py``, ``cmds.py``,
``targets/esp32c3.py``, ``util.py``; esp-flasher-stub ``src/command_handler.c`` and
``src/commands.h`` (the v2 stub esptool 5.6 uploads); shared/reference/
esptool-protocol.md (§ numbers below).

Fidelity details worth knowing: the ROM answers SYNC eight times; its status is four
bytes, the stub's two (big-endian code); the ROM's ``value`` field keeps the last value
it loaded (SYNC's 0x20120707, then each READ_REG result) in every later response, as
published ESP32 ROM traces show; the ROM's flash size is 2 MB until SPI_SET_PARAMS;
Secure Download Mode and DIS_DOWNLOAD_MODE are re-checked from the eFuse read registers
on every command.

Differences from silicon, all deliberate:

* Timing: erases and writes complete instantly; only protocol-visible timeouts exist.
* A RAM upload that is not a known flasher stub is "run" by going silent until the
  next reset (the emulator cannot execute RISC-V code).
* Encrypted writes (the fifth FLASH_BEGIN word) are refused: the virtual flash keeps
  plaintext only.
* In Secure Download Mode a refused command is answered with one "invalid message"
  response whose opcode byte is 0x00 — esptool reports exactly what it reports on a
  chip (``UnsupportedCommandError``); the real ROM's opcode byte is not documented.
"""

from __future__ import annotations

import enum
import hashlib
import json
import logging
import struct
import time
import zlib
from base64 import b64decode
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import ClassVar, Protocol

from rig.firmware.image import esp_checksum
from rig.vboard.flash import SECTOR_SIZE, FlashError, FlashStorage

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- wire format


class Op(enum.IntEnum):
    """Command opcodes [esptool:loader.py ``ESPLoader.ESP_CMDS``; stub:commands.h; §3]."""

    FLASH_BEGIN = 0x02
    FLASH_DATA = 0x03
    FLASH_END = 0x04
    MEM_BEGIN = 0x05
    MEM_END = 0x06
    MEM_DATA = 0x07
    SYNC = 0x08
    WRITE_REG = 0x09
    READ_REG = 0x0A
    SPI_SET_PARAMS = 0x0B
    SPI_ATTACH = 0x0D
    READ_FLASH_SLOW = 0x0E
    CHANGE_BAUDRATE = 0x0F
    FLASH_DEFL_BEGIN = 0x10
    FLASH_DEFL_DATA = 0x11
    FLASH_DEFL_END = 0x12
    SPI_FLASH_MD5 = 0x13
    GET_SECURITY_INFO = 0x14
    ERASE_FLASH = 0xD0
    ERASE_REGION = 0xD1
    READ_FLASH = 0xD2
    RUN_USER_CODE = 0xD3


DIRECTION_REQUEST = 0x00
DIRECTION_RESPONSE = 0x01
HEADER = struct.Struct("<BBHI")
"""direction, opcode, data size, checksum/value [§2; esptool:loader.py ``command``]."""
DATA_SUBHEADER = struct.Struct("<IIII")
"""FLASH_DATA / FLASH_DEFL_DATA / MEM_DATA: length, sequence, 0, 0 [§3]."""
CHECKSUM_SEED = 0xEF
"""XOR seed of the data checksum [esptool:loader.py ``ESP_CHECKSUM_MAGIC``]."""


class RomError(enum.IntEnum):
    """Second status byte of a failed ROM command [esptool:util.py ``FatalError.WithResult``, 0x1xx]."""

    INVALID_MESSAGE = 0x05
    FAILED_TO_ACT = 0x06
    BAD_CHECKSUM = 0x07
    FLASH_WRITE = 0x08
    FLASH_READ = 0x09
    READ_LENGTH = 0x0A
    DEFLATE = 0x0B
    RAM_SIZE = 0x0E
    RAM_ADDRESS = 0x0F


class StubStatus(enum.IntEnum):
    """The stub's 16-bit response code, sent big-endian [stub:commands.h ``esp_response_code``]."""

    SUCCESS = 0x0000
    BAD_DATA_LEN = 0xC000
    BAD_DATA_CHECKSUM = 0xC100
    BAD_BLOCKSIZE = 0xC200
    INVALID_COMMAND = 0xC300
    FAILED_SPI_OP = 0xC400
    FAILED_SPI_UNLOCK = 0xC500
    NOT_IN_FLASH_MODE = 0xC600
    INFLATE_ERROR = 0xC700
    NOT_ENOUGH_DATA = 0xC800
    TOO_MUCH_DATA = 0xC900
    CMD_NOT_IMPLEMENTED = 0xFF00


ROM_STATUS_LEN = 4
"""C3 ROM: status, error, reserved, reserved [§2]."""
STUB_STATUS_LEN = 2
"""Stub: 16-bit code, big-endian [stub:command_handler.c ``s_send_response``]."""

SYNC_PAYLOAD = b"\x07\x07\x12\x20" + b"\x55" * 32
"""The only SYNC request the ROM accepts [§3; esptool:loader.py ``sync``]."""
SYNC_ROM_VALUE = 0x20120707
"""``value`` of the ROM's SYNC replies (S3 ROM trace, espressif/esp-idf#10959); esptool only tests != 0."""
SYNC_REPLIES = 8
"""The ROM and the stub both answer one SYNC with eight responses [§3; stub ``s_sync``]."""
OHAI = b"OHAI"
"""The stub's greeting, its only unsolicited frame [§7; stub main.c]."""

# Sizes the stub insists on [stub:commands.h].
STUB_SIZES = {
    Op.SYNC: 36,
    Op.MEM_BEGIN: 16,
    Op.MEM_END: 8,
    Op.READ_REG: 4,
    Op.SPI_ATTACH: 4,
    Op.SPI_SET_PARAMS: 24,
    Op.CHANGE_BAUDRATE: 8,
    Op.FLASH_END: 4,
    Op.FLASH_DEFL_END: 4,
    Op.SPI_FLASH_MD5: 16,
    Op.GET_SECURITY_INFO: 0,
    Op.READ_FLASH: 16,
    Op.ERASE_REGION: 8,
}
FLASH_BEGIN_SIZES = (16, 20)
"""FLASH_BEGIN / FLASH_DEFL_BEGIN: four words, or five with the "encrypted" flag."""
WRITE_REG_ENTRY = struct.Struct("<IIII")
"""address, value, mask, delay_us [§3]."""

SECURE_DOWNLOAD_ALLOWED = frozenset(
    {
        Op.SYNC,
        Op.FLASH_BEGIN,
        Op.FLASH_DATA,
        Op.FLASH_END,
        Op.FLASH_DEFL_BEGIN,
        Op.FLASH_DEFL_DATA,
        Op.FLASH_DEFL_END,
        Op.SPI_SET_PARAMS,
        Op.SPI_ATTACH,
        Op.CHANGE_BAUDRATE,
        Op.GET_SECURITY_INFO,
    }
)
"""What the ROM still does in Secure Download Mode: flash writes, SPI configuration, baud
rate and the security summary (ESP-IDF Security Overview, "UART Download Mode";
esptool ``__init__.py`` allows only get-security-info, write-flash and erase-region there).
READ_REG, memory loads, MD5 and flash reads are refused."""

READ_FLASH_SLOW_BLOCK = 64
"""READ_FLASH_SLOW returns a 64-byte buffer whatever length was asked [§3; esptool esp32.py]."""
READ_FLASH_MAX_PACKET = 4096
"""The stub's read buffer; larger packets are refused [stub ``s_read_flash_post_process``]."""
ROM_DEFAULT_FLASH_SIZE = 2 * 1024 * 1024
"""The ROM's flash size until SPI_SET_PARAMS [esptool:cmds.py ``erase_region``: "The ROM defaults to 2MB"]."""

# --------------------------------------------------------------------------- chip identity

CHIP_DETECT_MAGIC_REG = 0x40001000
CHIP_DETECT_MAGIC_ECO3 = 0x1B31506F
"""What older tools read at ``CHIP_DETECT_MAGIC_REG_ADDR`` on a C3 ECO3 [§4]."""

# --------------------------------------------------------------------------- peripherals

UART0_BASE = 0x60000000
UART_CLKDIV_REG = UART0_BASE + 0x14
"""[esptool:targets/esp32c3.py ``UART_CLKDIV_REG``]."""
UART_DATE_REG = UART0_BASE + 0x7C
"""[esptool:targets/esp32c3.py ``UART_DATE_REG_ADDR``]; the dummy target of delayed WRITE_REGs."""
UART_DATE_VALUE = 0x2008270
"""UART_DATE reset value (a version stamp) as the ESP32-C3 TRM register summary gives it; no
tool reads it (esptool 5.6 only writes it, with mask 0, to get a delay), not checked on silicon."""
UART_CLOCK_HZ = 80_000_000
"""APB clock feeding UART0 in the ROM; CLKDIV = clock / baud."""

RTC_CNTL_BASE = 0x60008000
RTC_CNTL_WDTCONFIG0 = RTC_CNTL_BASE + 0x90
RTC_CNTL_WDTCONFIG1 = RTC_CNTL_BASE + 0x94
RTC_CNTL_WDTWPROTECT = RTC_CNTL_BASE + 0xA8
RTC_CNTL_WDT_WKEY = 0x50D83AA1
RTC_WDT_EN = 1 << 31
"""RTC watchdog registers and unlock key [esptool:targets/esp32c3.py ``watchdog_reset``]."""
RTC_SLOW_CLOCK_HZ = 136_000
"""Nominal RTC slow clock (internal 136 kHz RC, ESP32-C3 TRM "RTC clock") timing WDTCONFIG1."""

SPI1_BASE = 0x60002000
SPI_CMD_REG = SPI1_BASE + 0x00
SPI_ADDR_REG = SPI1_BASE + 0x04
SPI_USER_REG = SPI1_BASE + 0x18
SPI_USER1_REG = SPI1_BASE + 0x1C
SPI_USER2_REG = SPI1_BASE + 0x20
SPI_MOSI_DLEN_REG = SPI1_BASE + 0x24
SPI_MISO_DLEN_REG = SPI1_BASE + 0x28
SPI_W0_REG = SPI1_BASE + 0x58
SPI_W_REGS = 16
SPI_CMD_USR = 1 << 18
SPI_USR_MISO = 1 << 28
SPI_USR_MOSI = 1 << 27
"""SPI_MEM1 user-command registers [esptool:targets/esp32c3.py ``SPI_*_OFFS``; loader.py
``run_spiflash_command``; §6]."""

IRAM = (0x4037C000, 0x403E0000)
DRAM = (0x3FC80000, 0x3FD00000)
RTC_RAM = (0x50000000, 0x50002000)
"""Where MEM_BEGIN may load [esptool:targets/esp32c3.py ``MEMORY_MAP``]."""


class SpiFlashCommand(enum.IntEnum):
    """The SPI NOR commands esptool issues through the user-command registers [§6]."""

    WRSR = 0x01
    RDSR = 0x05
    WRDI = 0x04
    WREN = 0x06
    WRSR3 = 0x11
    RDSR3 = 0x15
    WRSR2 = 0x31
    RDSR2 = 0x35
    WEVSR = 0x50
    RDSFDP = 0x5A
    RSTEN = 0x66
    RDID = 0x9F
    RST = 0x99
    RDP = 0xAB
    DP = 0xB9


FLASH_JEDEC_ID = (0xC8, 0x40, 0x16)
"""GigaDevice GD25Q32C, a 4 MB part fitted to ESP32-C3-WROOM-02 modules: manufacturer,
memory type, capacity (0x16 = 4 MB in esptool's ``DETECTED_FLASH_SIZES``)."""


def _sfdp_image() -> bytes:
    """A JESD216 SFDP table for the flash: header, the JEDEC basic table's parameter header,
    a vendor parameter header (whose first byte esptool reads at 0x10 to spot XMC parts),
    and a 9-dword basic flash parameter table."""
    header = b"SFDP" + bytes([0x06, 0x01, 0x01, 0xFF])  # rev 1.6, two parameter headers
    bfpt_header = bytes([0x00, 0x06, 0x01, 0x09, 0x30, 0x00, 0x00, 0xFF])  # JEDEC BFPT at 0x30
    vendor_header = bytes([FLASH_JEDEC_ID[0], 0x00, 0x01, 0x03, 0x60, 0x00, 0x00, 0xFF])
    bfpt = struct.pack(
        "<9I",
        0xFFF120E5,  # 4 KB erase (0x20), 3-byte addressing, fast reads
        0x01FFFFFF,  # density: 32 Mbit - 1
        0x6B08EB44,
        0xBB423B08,
        0xFFFFFFFE,
        0xFF00FFFF,
        0xEB44FFFF,
        0x520F200C,
        0xFF00D810,
    )
    image = bytearray(b"\xff" * 0x100)
    image[0:8] = header
    image[8:16] = bfpt_header
    image[16:24] = vendor_header
    image[0x30 : 0x30 + len(bfpt)] = bfpt
    return bytes(image)


SFDP_IMAGE = _sfdp_image()


# --------------------------------------------------------------------------- collaborators


class EfuseBus(Protocol):
    """The eFuse controller as the download protocol sees it (``rig.vboard.efuse.EfuseController``)."""

    def handles(self, addr: int) -> bool: ...

    def read_reg(self, addr: int) -> int: ...

    def write_reg(self, addr: int, value: int, mask: int) -> None: ...

    def security_info_payload(self) -> bytes: ...

    @property
    def secure_download_enabled(self) -> bool: ...

    @property
    def download_mode_disabled(self) -> bool: ...


class Leave(enum.Enum):
    """Why download mode ended; the board turns each into a reset or a jump."""

    RUN_USER_CODE = "run_user_code"
    """FLASH_END/FLASH_DEFL_END with the "run" flag: boot from flash."""
    REBOOT = "reboot"
    """FLASH_END with the "reboot" flag: system reset, straps sampled again."""
    RAM_CODE = "ram_code"
    """MEM_END jumped into code that is not a flasher stub."""


@dataclass(frozen=True)
class StubImage:
    """A flasher stub esptool may upload: text segment, its load address and entry point."""

    name: str
    text_start: int
    text_sha256: bytes
    entry: int


@cache
def known_stubs() -> tuple[StubImage, ...]:
    """The ESP32-C3 flasher stubs shipped inside the installed esptool (v2, then legacy v1).

    The emulator recognises an upload by its code, not by trusting whoever sends it:
    only an image identical to Espressif's stub gets stub behaviour.
    """
    stubs: list[StubImage] = []
    try:
        root = resources.files("esptool") / "targets" / "stub_flasher"
    except ModuleNotFoundError:
        return ()
    for version in ("2", "1"):
        path = root / version / "esp32c3.json"
        if not path.is_file():
            continue
        desc = json.loads(path.read_text(encoding="utf-8"))
        text = b64decode(desc["text"])
        stubs.append(StubImage(f"esptool stub v{version}", desc["text_start"], hashlib.sha256(text).digest(), desc["entry"]))
    return tuple(stubs)


@dataclass
class _FlashOp:
    """An open FLASH_BEGIN / FLASH_DEFL_BEGIN."""

    compressed: bool
    offset: int
    """Next byte to write (stub) or start of the operation (ROM)."""
    total: int
    """Uncompressed bytes announced; the stub counts it down to zero."""
    block_size: int
    num_blocks: int
    erase_end: int
    next_erase: int
    inflater: zlib._Decompress | None = None
    written: int = 0


@dataclass
class _MemOp:
    """An open MEM_BEGIN."""

    addr: int
    size: int
    block_size: int
    data: bytearray = field(default_factory=bytearray)


@dataclass
class _ReadStream:
    """The stub's READ_FLASH transfer: data frames, each acknowledged by the host."""

    offset: int
    remaining: int
    total: int
    packet: int
    md5: hashlib._Hash
    sent_packets: int = 0
    acked_packets: int = 0
    acked_bytes: int = 0


class _Refused(Exception):
    """A command failed; carries the status the loader answers with."""

    def __init__(self, rom: RomError, stub: StubStatus):
        super().__init__(rom.name)
        self.rom = rom
        self.stub = stub


def data_checksum(data: bytes) -> int:
    """The XOR checksum of *_DATA payloads, seeded with 0xEF [esptool:loader.py ``checksum``] —
    the same fold as the image checksum."""
    return esp_checksum(data, CHECKSUM_SEED)


# --------------------------------------------------------------------------- SPI flash controller


class SpiFlashController:
    """SPI_MEM1's user-command registers and the NOR chip behind them (§6).

    esptool identifies the flash (RDID), checks the link (SFDP), resets it (0x66/0x99)
    and reads or writes its status registers by programming these registers with
    WRITE_REG, starting the command and reading W0 back. Commands complete instantly:
    the CMD register reads back with the USR bit already clear.
    """

    def __init__(self) -> None:
        self.regs: dict[int, int] = {}
        self.status = [0x00, 0x00, 0x00]
        self.write_enabled = False
        self.volatile_status_enabled = False

    @staticmethod
    def handles(addr: int) -> bool:
        return SPI1_BASE <= addr < SPI1_BASE + 0x100

    def read_reg(self, addr: int) -> int:
        return self.regs.get(addr, 0)

    def write_reg(self, addr: int, value: int) -> None:
        self.regs[addr] = value
        if addr == SPI_CMD_REG and value & SPI_CMD_USR:
            self._execute()
            self.regs[addr] = value & ~SPI_CMD_USR

    def _execute(self) -> None:
        user = self.regs.get(SPI_USER_REG, 0)
        opcode = self.regs.get(SPI_USER2_REG, 0) & 0xFF
        miso_bits = self.regs.get(SPI_MISO_DLEN_REG, 0) + 1 if user & SPI_USR_MISO else 0
        mosi_bits = self.regs.get(SPI_MOSI_DLEN_REG, 0) + 1 if user & SPI_USR_MOSI else 0
        mosi = b"".join(struct.pack("<I", self.regs.get(SPI_W0_REG + 4 * i, 0)) for i in range(SPI_W_REGS))
        mosi = mosi[: (mosi_bits + 7) // 8]
        addr = self.regs.get(SPI_ADDR_REG, 0)
        reply = self._command(opcode, addr, mosi)
        if miso_bits:
            reply = (reply + b"\xff" * 64)[: (miso_bits + 7) // 8]
            padded = reply + b"\x00" * (-len(reply) % 4)
            for i in range(0, len(padded), 4):
                self.regs[SPI_W0_REG + i] = struct.unpack_from("<I", padded, i)[0]

    def _command(self, opcode: int, addr: int, mosi: bytes) -> bytes:
        match opcode:
            case SpiFlashCommand.RDID:
                return bytes(FLASH_JEDEC_ID)
            case SpiFlashCommand.RDSFDP:
                start = addr & 0xFFFFFF
                return (SFDP_IMAGE[start:] + b"\xff" * 8)[:8]
            case SpiFlashCommand.RDSR:
                return bytes([self.status[0] | (0x02 if self.write_enabled else 0)])
            case SpiFlashCommand.RDSR2:
                return bytes([self.status[1]])
            case SpiFlashCommand.RDSR3:
                return bytes([self.status[2]])
            case SpiFlashCommand.WREN:
                self.write_enabled = True
            case SpiFlashCommand.WEVSR:
                self.volatile_status_enabled = True
            case SpiFlashCommand.WRDI:
                self.write_enabled = False
            case SpiFlashCommand.WRSR | SpiFlashCommand.WRSR2 | SpiFlashCommand.WRSR3:
                if self.write_enabled or self.volatile_status_enabled:
                    first = {SpiFlashCommand.WRSR: 0, SpiFlashCommand.WRSR2: 1, SpiFlashCommand.WRSR3: 2}[SpiFlashCommand(opcode)]
                    for i, b in enumerate(mosi[: 3 - first]):
                        self.status[first + i] = b & 0xFC if first + i == 0 else b
                self.write_enabled = False
                self.volatile_status_enabled = False
            case SpiFlashCommand.RSTEN | SpiFlashCommand.RST | SpiFlashCommand.DP | SpiFlashCommand.RDP:
                self.write_enabled = False
                self.volatile_status_enabled = False
        return b""


# --------------------------------------------------------------------------- the loader


class DownloadMode:
    """One session of UART download mode, from "waiting for download" to the next reset.

    :meth:`handle_frame` takes each SLIP payload the host sent and emits the chip's
    responses through *send* (one call per frame payload). A :class:`Leave` return
    value asks the board to leave download mode.
    """

    def __init__(
        self,
        flash: FlashStorage,
        efuse: EfuseBus,
        send: Callable[[bytes], None],
        set_baud: Callable[[int], None],
        baud: int,
    ) -> None:
        self.flash = flash
        self.efuse = efuse
        self._send = send
        self._set_baud = set_baud
        self.baud = baud
        self.stub: StubImage | None = None
        self.spi = SpiFlashController()
        self.ram_regs: dict[int, int] = {}
        self.rtc_regs: dict[int, int] = {}
        self.watchdog_deadline: float | None = None
        """``time.monotonic()`` at which the RTC watchdog armed over WRITE_REG resets the chip."""
        self.flash_size = ROM_DEFAULT_FLASH_SIZE
        self._rom_value = 0
        self._flash_op: _FlashOp | None = None
        self._mem_op: _MemOp | None = None
        self._ram: list[_MemOp] = []
        """Every MEM_BEGIN of this session, with the data it received (the chip's RAM, sparsely)."""
        self._read: _ReadStream | None = None
        self._deferred = StubStatus.SUCCESS
        self.commands = 0
        self.rejected = 0

    # ------------------------------------------------------------------ framing

    @property
    def stub_running(self) -> bool:
        return self.stub is not None

    @property
    def secure_download(self) -> bool:
        """The ROM re-reads ENABLE_SECURITY_DOWNLOAD as the eFuse read registers show it, so
        burning it through espefuse restricts the very next command."""
        return self.efuse.secure_download_enabled

    def handle_frame(self, frame: bytes) -> Leave | None:
        """Answer one request frame as the running loader would."""
        if self._read is not None:
            self._read_ack(frame)
            return None
        if len(frame) < HEADER.size:
            return None  # too short to carry an opcode: nothing to answer
        direction, op, size, checksum = HEADER.unpack_from(frame)
        data = frame[HEADER.size :]
        self.commands += 1
        log.debug("%s request op 0x%02x, %d data bytes", "stub" if self.stub else "ROM", op, len(data))
        if self.stub is not None:
            return self._stub_command(direction, op, size, checksum, data)
        if self.efuse.download_mode_disabled:
            return None  # DIS_DOWNLOAD_MODE just burnt: the ROM stops serving (espefuse reconnects)
        return self._rom_command(direction, op, size, checksum, data)

    def _frame(self, op: int, value: int, payload: bytes) -> None:
        self._send(HEADER.pack(DIRECTION_RESPONSE, op, len(payload), value) + payload)

    def _rom_reply(self, op: int, payload: bytes = b"", error: RomError | None = None) -> None:
        status = bytes([1, error, 0, 0]) if error is not None else bytes(ROM_STATUS_LEN)
        if error is not None:
            self.rejected += 1
        self._frame(op, self._rom_value, payload + status)

    def _stub_reply(self, op: int, code: StubStatus, payload: bytes = b"", value: int = 0) -> None:
        if code != StubStatus.SUCCESS:
            self.rejected += 1
            payload = b""
        self._frame(op, value, payload + struct.pack(">H", code))

    # ------------------------------------------------------------------ ROM

    def _rom_command(self, direction: int, op: int, size: int, checksum: int, data: bytes) -> Leave | None:
        if direction != DIRECTION_REQUEST or size != len(data):
            self._rom_reply(op, error=RomError.INVALID_MESSAGE)
            return None
        if self.secure_download and op not in SECURE_DOWNLOAD_ALLOWED:
            # Refused in Secure Download Mode: "invalid message" under another opcode, which
            # esptool turns into "This command (0x..) is not supported in Secure Download Mode".
            self.rejected += 1
            self._frame(0x00, self._rom_value, bytes([1, RomError.INVALID_MESSAGE, 0, 0]))
            return None
        handler = self._ROM_HANDLERS.get(op)
        if handler is None:
            self._rom_reply(op, error=RomError.INVALID_MESSAGE)
            return None
        try:
            return handler(self, op, data, checksum)
        except _Refused as exc:
            self._rom_reply(op, error=exc.rom)
            return None

    def _rom_sync(self, op: int, data: bytes, checksum: int) -> None:
        if data != SYNC_PAYLOAD:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.BAD_DATA_LEN)
        self._rom_value = SYNC_ROM_VALUE
        for _ in range(SYNC_REPLIES):
            self._rom_reply(op)

    def _rom_read_reg(self, op: int, data: bytes, checksum: int) -> None:
        if len(data) != 4:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.BAD_DATA_LEN)
        (addr,) = struct.unpack("<I", data)
        self._rom_value = self.read_reg(addr)
        self._rom_reply(op)

    def _rom_write_reg(self, op: int, data: bytes, checksum: int) -> None:
        if not data or len(data) % WRITE_REG_ENTRY.size:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.NOT_ENOUGH_DATA)
        self._write_reg_entries(data)
        self._rom_reply(op)

    def _rom_mem_begin(self, op: int, data: bytes, checksum: int) -> None:
        size, blocks, block_size, addr = self._words(data, 4)
        if not any(lo <= addr and addr + size <= hi for lo, hi in (IRAM, DRAM, RTC_RAM)):
            raise _Refused(RomError.RAM_ADDRESS, StubStatus.FAILED_SPI_OP)
        if blocks * block_size < size:
            raise _Refused(RomError.RAM_SIZE, StubStatus.BAD_DATA_LEN)
        self._mem_op = _MemOp(addr, size, block_size)
        self._ram.append(self._mem_op)
        self._rom_reply(op)

    def _rom_mem_data(self, op: int, data: bytes, checksum: int) -> None:
        payload, seq = self._data_block(data, checksum)
        mem = self._mem_op
        if mem is None:
            raise _Refused(RomError.FAILED_TO_ACT, StubStatus.NOT_IN_FLASH_MODE)
        start = seq * mem.block_size
        if start + len(payload) > mem.size:
            raise _Refused(RomError.RAM_SIZE, StubStatus.TOO_MUCH_DATA)
        if len(mem.data) < start:
            mem.data += bytes(start - len(mem.data))
        mem.data[start : start + len(payload)] = payload
        self._rom_reply(op)

    def _rom_mem_end(self, op: int, data: bytes, checksum: int) -> Leave | None:
        flag, entry = self._words(data, 2)
        self._close_mem_op()
        self._rom_reply(op)
        if flag != 0:
            return None
        stub = self._match_stub(entry)
        if stub is None:
            log.warning(
                "MEM_END jumps to 0x%08x; RAM holds %s: not a known flasher stub, going silent",
                entry,
                ", ".join(f"0x{m.addr:08x}+{len(m.data)}" for m in self._ram) or "nothing",
            )
            return Leave.RAM_CODE
        self._start_stub(stub)
        return None

    def _rom_flash_begin(self, op: int, data: bytes, checksum: int) -> None:
        self._begin_flash(data, compressed=op == Op.FLASH_DEFL_BEGIN, stub=False)
        self._rom_reply(op)

    def _rom_flash_data(self, op: int, data: bytes, checksum: int) -> None:
        payload, seq = self._data_block(data, checksum)
        fop = self._flash_op
        if fop is None or fop.compressed:
            raise _Refused(RomError.FAILED_TO_ACT, StubStatus.NOT_IN_FLASH_MODE)
        self._program(fop.offset + seq * fop.block_size, payload, fop.erase_end)
        self._rom_reply(op)

    def _rom_flash_defl_data(self, op: int, data: bytes, checksum: int) -> None:
        payload, _seq = self._data_block(data, checksum)
        fop = self._flash_op
        if fop is None or not fop.compressed or fop.inflater is None:
            raise _Refused(RomError.FAILED_TO_ACT, StubStatus.NOT_IN_FLASH_MODE)
        try:
            out = fop.inflater.decompress(payload)
        except zlib.error as exc:
            raise _Refused(RomError.DEFLATE, StubStatus.INFLATE_ERROR) from exc
        self._program(fop.offset + fop.written, out, fop.erase_end)
        fop.written += len(out)
        self._rom_reply(op)

    def _rom_flash_end(self, op: int, data: bytes, checksum: int) -> Leave:
        (flag,) = self._words(data, 1)
        self._flash_op = None
        self._rom_reply(op)
        return Leave.RUN_USER_CODE if flag else Leave.REBOOT

    def _rom_spi_set_params(self, op: int, data: bytes, checksum: int) -> None:
        _fl_id, total, _block, _sector, _page, _mask = self._words(data, 6)
        self.flash_size = total
        self._rom_reply(op)

    def _rom_spi_attach(self, op: int, data: bytes, checksum: int) -> None:
        if len(data) != 8:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.BAD_DATA_LEN)
        self._rom_reply(op)

    def _rom_change_baudrate(self, op: int, data: bytes, checksum: int) -> None:
        new, _old = self._words(data, 2)
        if new == 0:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.BAD_DATA_LEN)
        self._rom_reply(op)  # at the old rate, then the UART is re-programmed
        self.baud = new
        self._set_baud(new)

    def _rom_md5(self, op: int, data: bytes, checksum: int) -> None:
        addr, size, _z1, _z2 = self._words(data, 4)
        digest = self._md5(addr, size, RomError.FLASH_READ)
        self._rom_reply(op, digest.hexdigest().encode())

    def _rom_security_info(self, op: int, data: bytes, checksum: int) -> None:
        if data:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.BAD_DATA_LEN)
        self._rom_reply(op, self.security_info())

    def _rom_read_flash_slow(self, op: int, data: bytes, checksum: int) -> None:
        offset, length = self._words(data, 2)
        if length > READ_FLASH_SLOW_BLOCK:
            raise _Refused(RomError.READ_LENGTH, StubStatus.BAD_DATA_LEN)
        if offset + length > self.flash.size:
            raise _Refused(RomError.FLASH_READ, StubStatus.FAILED_SPI_OP)
        block = self.flash.read(offset, min(READ_FLASH_SLOW_BLOCK, self.flash.size - offset))
        self._rom_reply(op, block.ljust(READ_FLASH_SLOW_BLOCK, b"\xff"))

    _ROM_HANDLERS: ClassVar[dict[int, Callable[..., Leave | None]]] = {
        Op.SYNC: _rom_sync,
        Op.READ_REG: _rom_read_reg,
        Op.WRITE_REG: _rom_write_reg,
        Op.MEM_BEGIN: _rom_mem_begin,
        Op.MEM_DATA: _rom_mem_data,
        Op.MEM_END: _rom_mem_end,
        Op.FLASH_BEGIN: _rom_flash_begin,
        Op.FLASH_DEFL_BEGIN: _rom_flash_begin,
        Op.FLASH_DATA: _rom_flash_data,
        Op.FLASH_DEFL_DATA: _rom_flash_defl_data,
        Op.FLASH_END: _rom_flash_end,
        Op.FLASH_DEFL_END: _rom_flash_end,
        Op.SPI_SET_PARAMS: _rom_spi_set_params,
        Op.SPI_ATTACH: _rom_spi_attach,
        Op.CHANGE_BAUDRATE: _rom_change_baudrate,
        Op.SPI_FLASH_MD5: _rom_md5,
        Op.GET_SECURITY_INFO: _rom_security_info,
        Op.READ_FLASH_SLOW: _rom_read_flash_slow,
    }

    # ------------------------------------------------------------------ stub

    def _start_stub(self, stub: StubImage) -> None:
        """The stub has "booted": from now on, 2-byte status and stub semantics."""
        self.stub = stub
        self._flash_op = None
        self._mem_op = None
        self._deferred = StubStatus.SUCCESS
        self.flash_size = self.flash.size
        log.debug("%s running", stub.name)
        self._send(OHAI)

    def _stub_command(self, direction: int, op: int, size: int, checksum: int, data: bytes) -> Leave | None:
        # [stub:command_handler.c ``handle_command``]
        if direction != DIRECTION_REQUEST:
            self._stub_reply(op, StubStatus.INVALID_COMMAND)
            return None
        if size != len(data):
            self._stub_reply(op, StubStatus.BAD_DATA_LEN)
            return None
        if self._deferred != StubStatus.SUCCESS:
            # An error from the previous command's deferred work answers this one, unexecuted.
            code, self._deferred = self._deferred, StubStatus.SUCCESS
            self._stub_reply(op, code)
            return None
        if op == Op.RUN_USER_CODE:
            return None  # no response; the v2 stub does nothing yet ("TODO: WDT reset")
        expected = STUB_SIZES.get(op)
        if expected is not None and len(data) != expected:
            self._stub_reply(op, StubStatus.BAD_DATA_LEN)
            return None
        handler = self._STUB_HANDLERS.get(op)
        if handler is None:
            self._stub_reply(op, StubStatus.INVALID_COMMAND)
            return None
        try:
            handler(self, op, data, checksum)
        except _Refused as exc:
            self._stub_reply(op, exc.stub)
        return None

    def _defer(self, work: Callable[[], None]) -> None:
        """Run the work the stub does after acknowledging; an error waits for the next command."""
        try:
            work()
        except _Refused as exc:
            self._deferred = exc.stub

    def _stub_sync(self, op: int, data: bytes, checksum: int) -> None:
        for _ in range(SYNC_REPLIES):
            self._stub_reply(op, StubStatus.SUCCESS)

    def _stub_read_reg(self, op: int, data: bytes, checksum: int) -> None:
        (addr,) = struct.unpack("<I", data)
        self._stub_reply(op, StubStatus.SUCCESS, value=self.read_reg(addr))

    def _stub_write_reg(self, op: int, data: bytes, checksum: int) -> None:
        if not data or len(data) % WRITE_REG_ENTRY.size:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.NOT_ENOUGH_DATA)
        self._write_reg_entries(data)
        self._stub_reply(op, StubStatus.SUCCESS)

    def _stub_mem_begin(self, op: int, data: bytes, checksum: int) -> None:
        size, _blocks, block_size, addr = self._words(data, 4)
        self._mem_op = _MemOp(addr, size, block_size)
        self._ram.append(self._mem_op)
        self._stub_reply(op, StubStatus.SUCCESS)

    def _stub_mem_data(self, op: int, data: bytes, checksum: int) -> None:
        mem = self._mem_op
        if len(data) < DATA_SUBHEADER.size:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.NOT_ENOUGH_DATA)
        if mem is None:
            raise _Refused(RomError.FAILED_TO_ACT, StubStatus.NOT_IN_FLASH_MODE)
        length = DATA_SUBHEADER.unpack_from(data)[0]
        payload = data[DATA_SUBHEADER.size :]
        if len(mem.data) + length > mem.size or length != len(payload):
            raise _Refused(RomError.RAM_SIZE, StubStatus.TOO_MUCH_DATA)
        mem.data += payload
        self._stub_reply(op, StubStatus.SUCCESS)

    def _stub_mem_end(self, op: int, data: bytes, checksum: int) -> None:
        if self._mem_op is None:
            raise _Refused(RomError.FAILED_TO_ACT, StubStatus.NOT_IN_FLASH_MODE)
        self._close_mem_op()
        self._stub_reply(op, StubStatus.SUCCESS)
        # Jumping into other RAM code from the stub is not emulated; the stub keeps serving.

    def _stub_flash_begin(self, op: int, data: bytes, checksum: int) -> None:
        if len(data) not in FLASH_BEGIN_SIZES:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.BAD_DATA_LEN)
        self._begin_flash(data, compressed=op == Op.FLASH_DEFL_BEGIN, stub=True)
        self._stub_reply(op, StubStatus.SUCCESS)

    def _stub_flash_data(self, op: int, data: bytes, checksum: int) -> None:
        if len(data) < DATA_SUBHEADER.size:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.NOT_ENOUGH_DATA)
        fop = self._flash_op
        if fop is None or fop.compressed:
            raise _Refused(RomError.FAILED_TO_ACT, StubStatus.NOT_IN_FLASH_MODE)
        length = DATA_SUBHEADER.unpack_from(data)[0]
        payload = data[DATA_SUBHEADER.size :]
        if length != len(payload):
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.TOO_MUCH_DATA)
        if data_checksum(payload) != checksum:
            raise _Refused(RomError.BAD_CHECKSUM, StubStatus.BAD_DATA_CHECKSUM)
        self._stub_reply(op, StubStatus.SUCCESS)
        self._defer(lambda: self._stub_write(fop, payload[: fop.total]))

    def _stub_write(self, fop: _FlashOp, chunk: bytes) -> None:
        self._erase_ahead(fop, fop.offset + len(chunk))
        self._program(fop.offset, chunk, fop.erase_end)
        fop.offset += len(chunk)
        fop.total -= len(chunk)

    def _stub_flash_defl_data(self, op: int, data: bytes, checksum: int) -> None:
        if len(data) < DATA_SUBHEADER.size:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.BAD_DATA_LEN)
        fop = self._flash_op
        if fop is None or not fop.compressed:
            raise _Refused(RomError.FAILED_TO_ACT, StubStatus.NOT_IN_FLASH_MODE)
        if fop.total == 0 and len(data) > 4:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.TOO_MUCH_DATA)
        length = DATA_SUBHEADER.unpack_from(data)[0]
        payload = data[DATA_SUBHEADER.size :]
        if length != len(payload) or data_checksum(payload) != checksum:
            raise _Refused(RomError.BAD_CHECKSUM, StubStatus.BAD_DATA_CHECKSUM)
        self._stub_reply(op, StubStatus.SUCCESS)
        self._defer(lambda: self._stub_inflate(fop, payload))

    def _stub_inflate(self, fop: _FlashOp, payload: bytes) -> None:
        assert fop.inflater is not None
        try:
            out = fop.inflater.decompress(payload)
        except zlib.error as exc:
            raise _Refused(RomError.DEFLATE, StubStatus.INFLATE_ERROR) from exc
        if len(out) > fop.total:
            raise _Refused(RomError.FLASH_WRITE, StubStatus.TOO_MUCH_DATA)
        self._stub_write(fop, out)

    def _stub_flash_end(self, op: int, data: bytes, checksum: int) -> None:
        fop = self._flash_op
        if fop is None:
            raise _Refused(RomError.FAILED_TO_ACT, StubStatus.NOT_IN_FLASH_MODE)
        if fop.total != 0:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.BAD_DATA_LEN)
        self._flash_op = None
        self._stub_reply(op, StubStatus.SUCCESS)
        # The reboot flag is accepted and ignored, as by the v2 stub ("TODO: Implement reboot").

    def _stub_spi_set_params(self, op: int, data: bytes, checksum: int) -> None:
        self.flash_size = self._words(data, 6)[1]
        self._stub_reply(op, StubStatus.SUCCESS)

    def _stub_spi_attach(self, op: int, data: bytes, checksum: int) -> None:
        self._stub_reply(op, StubStatus.SUCCESS)

    def _stub_change_baudrate(self, op: int, data: bytes, checksum: int) -> None:
        new, _old = self._words(data, 2)
        self._stub_reply(op, StubStatus.SUCCESS)
        if new:
            self.baud = new
            self._set_baud(new)

    def _stub_md5(self, op: int, data: bytes, checksum: int) -> None:
        addr, size, _z1, _z2 = self._words(data, 4)
        digest = self._md5(addr, size, RomError.FLASH_READ)
        self._stub_reply(op, StubStatus.SUCCESS, digest.digest())

    def _stub_security_info(self, op: int, data: bytes, checksum: int) -> None:
        self._stub_reply(op, StubStatus.SUCCESS, self.security_info())

    def _stub_erase_flash(self, op: int, data: bytes, checksum: int) -> None:
        self.flash.erase_all()
        self._stub_reply(op, StubStatus.SUCCESS)

    def _stub_erase_region(self, op: int, data: bytes, checksum: int) -> None:
        addr, size = self._words(data, 2)
        if addr % SECTOR_SIZE or size % SECTOR_SIZE:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.BAD_DATA_LEN)
        try:
            self.flash.erase(addr, size)
        except FlashError as exc:
            raise _Refused(RomError.FLASH_WRITE, StubStatus.FAILED_SPI_OP) from exc
        self._stub_reply(op, StubStatus.SUCCESS)

    def _stub_read_flash(self, op: int, data: bytes, checksum: int) -> None:
        offset, length, packet, _in_flight = self._words(data, 4)
        self._stub_reply(op, StubStatus.SUCCESS)
        if packet > READ_FLASH_MAX_PACKET or packet == 0:
            self._deferred = StubStatus.BAD_DATA_LEN
            return
        self._read = _ReadStream(offset, length, length, packet, hashlib.md5())
        self._read_pump()

    def _read_pump(self) -> None:
        """Send data while fewer than one packet is unacknowledged; finish with the MD5 frame.

        The stub keeps at most one packet in flight whatever the host asks for
        [stub ``s_read_flash_post_process``: ``max_unacked_packets = 1``].
        """
        rs = self._read
        assert rs is not None
        if rs.remaining > 0 and rs.sent_packets - rs.acked_packets < 1:
            chunk_len = min(rs.remaining, rs.packet)
            try:
                chunk = self.flash.read(rs.offset, chunk_len)
            except FlashError:
                self._read = None
                self._deferred = StubStatus.FAILED_SPI_OP
                return
            rs.md5.update(chunk)
            self._send(chunk)
            rs.offset += chunk_len
            rs.remaining -= chunk_len
            rs.sent_packets += 1
        if rs.remaining == 0 and rs.acked_bytes >= rs.total:
            self._finish_read()

    def _read_ack(self, frame: bytes) -> None:
        rs = self._read
        assert rs is not None
        if len(frame) != 4:
            self._finish_read()  # the stub leaves its loop and sends the digest of what it sent
            return
        rs.acked_bytes = struct.unpack("<I", frame)[0]
        rs.acked_packets += 1
        self._read_pump()

    def _finish_read(self) -> None:
        rs = self._read
        assert rs is not None
        self._read = None
        self._send(rs.md5.digest())

    _STUB_HANDLERS: ClassVar[dict[int, Callable[..., None]]] = {
        Op.SYNC: _stub_sync,
        Op.READ_REG: _stub_read_reg,
        Op.WRITE_REG: _stub_write_reg,
        Op.MEM_BEGIN: _stub_mem_begin,
        Op.MEM_DATA: _stub_mem_data,
        Op.MEM_END: _stub_mem_end,
        Op.FLASH_BEGIN: _stub_flash_begin,
        Op.FLASH_DEFL_BEGIN: _stub_flash_begin,
        Op.FLASH_DATA: _stub_flash_data,
        Op.FLASH_DEFL_DATA: _stub_flash_defl_data,
        Op.FLASH_END: _stub_flash_end,
        Op.FLASH_DEFL_END: _stub_flash_end,
        Op.SPI_SET_PARAMS: _stub_spi_set_params,
        Op.SPI_ATTACH: _stub_spi_attach,
        Op.CHANGE_BAUDRATE: _stub_change_baudrate,
        Op.SPI_FLASH_MD5: _stub_md5,
        Op.GET_SECURITY_INFO: _stub_security_info,
        Op.ERASE_FLASH: _stub_erase_flash,
        Op.ERASE_REGION: _stub_erase_region,
        Op.READ_FLASH: _stub_read_flash,
    }

    # ------------------------------------------------------------------ shared

    @staticmethod
    def _words(data: bytes, count: int) -> tuple[int, ...]:
        if len(data) < 4 * count:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.BAD_DATA_LEN)
        return struct.unpack_from(f"<{count}I", data)

    @staticmethod
    def _data_block(data: bytes, checksum: int) -> tuple[bytes, int]:
        """Split a ROM *_DATA request into payload and sequence number, checking length and checksum."""
        if len(data) < DATA_SUBHEADER.size:
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.NOT_ENOUGH_DATA)
        length, seq, _z1, _z2 = DATA_SUBHEADER.unpack_from(data)
        payload = data[DATA_SUBHEADER.size :]
        if length != len(payload):
            raise _Refused(RomError.INVALID_MESSAGE, StubStatus.TOO_MUCH_DATA)
        if data_checksum(payload) != checksum:
            raise _Refused(RomError.BAD_CHECKSUM, StubStatus.BAD_DATA_CHECKSUM)
        return payload, seq

    def _begin_flash(self, data: bytes, *, compressed: bool, stub: bool) -> None:
        """FLASH_BEGIN / FLASH_DEFL_BEGIN: the ROM erases the whole region now, the stub as it goes."""
        size, num_blocks, block_size, offset = self._words(data, 4)
        encrypted = len(data) >= 20 and struct.unpack_from("<I", data, 16)[0] != 0
        if encrypted:
            raise _Refused(RomError.FAILED_TO_ACT, StubStatus.FAILED_SPI_OP)
        erase_start = offset - offset % SECTOR_SIZE
        erase_end = -(-(offset + size) // SECTOR_SIZE) * SECTOR_SIZE
        limit = min(self.flash_size, self.flash.size)
        if size and erase_end > limit:
            raise _Refused(RomError.FAILED_TO_ACT, StubStatus.FAILED_SPI_OP)
        fop = _FlashOp(compressed, offset, size, block_size, num_blocks, erase_end, erase_start)
        if compressed:
            fop.inflater = zlib.decompressobj()
        if not stub:
            if size:
                self.flash.erase(erase_start, erase_end - erase_start)
            fop.next_erase = erase_end
        self._flash_op = fop

    def _erase_ahead(self, fop: _FlashOp, upto: int) -> None:
        end = min(-(-upto // SECTOR_SIZE) * SECTOR_SIZE, fop.erase_end)
        if end > fop.next_erase:
            try:
                self.flash.erase(fop.next_erase, end - fop.next_erase)
            except FlashError as exc:
                raise _Refused(RomError.FLASH_WRITE, StubStatus.FAILED_SPI_OP) from exc
            fop.next_erase = end

    def _program(self, offset: int, data: bytes, limit: int) -> None:
        if not data:
            return
        end = offset + len(data)
        if end > limit:
            # Past the erased region the ROM only programs what fits; the 0xFF padding of
            # the last block is a no-op on NOR flash anyway.
            fits = data[: max(0, limit - offset)]
            if fits.rstrip(b"\xff") != fits or data[len(fits) :].strip(b"\xff"):
                raise _Refused(RomError.FLASH_WRITE, StubStatus.FAILED_SPI_OP)
            data = fits
            if not data:
                return
        try:
            self.flash.write(offset, data)
        except FlashError as exc:
            raise _Refused(RomError.FLASH_WRITE, StubStatus.FAILED_SPI_OP) from exc

    def _md5(self, addr: int, size: int, error: RomError) -> hashlib._Hash:
        try:
            return hashlib.md5(self.flash.read(addr, size))
        except FlashError as exc:
            raise _Refused(error, StubStatus.FAILED_SPI_OP) from exc

    def _close_mem_op(self) -> None:
        if self._mem_op is None:
            raise _Refused(RomError.FAILED_TO_ACT, StubStatus.NOT_IN_FLASH_MODE)
        self._mem_op = None

    def _match_stub(self, entry: int) -> StubImage | None:
        for stub in known_stubs():
            if stub.entry != entry:
                continue
            for mem in self._ram:
                if mem.addr == stub.text_start and hashlib.sha256(mem.data).digest() == stub.text_sha256:
                    return stub
        return None

    def security_info(self) -> bytes:
        """The 20-byte GET_SECURITY_INFO payload [§5]: the eFuse controller owns every
        field of it (flags, crypt count, key purposes, chip id, ROM API version)."""
        return self.efuse.security_info_payload()

    # ------------------------------------------------------------------ registers

    def read_reg(self, addr: int) -> int:
        """What READ_REG returns for *addr* on this chip."""
        if self.efuse.handles(addr):
            return self.efuse.read_reg(addr) & 0xFFFFFFFF
        if self.spi.handles(addr):
            return self.spi.read_reg(addr)
        if addr == UART_CLKDIV_REG:
            return UART_CLOCK_HZ // max(self.baud, 1)
        if addr == UART_DATE_REG:
            return UART_DATE_VALUE
        if addr == CHIP_DETECT_MAGIC_REG:
            return CHIP_DETECT_MAGIC_ECO3
        if RTC_CNTL_BASE <= addr < RTC_CNTL_BASE + 0x100:
            return self.rtc_regs.get(addr, 0)
        return self.ram_regs.get(addr, 0)

    def _write_reg_entries(self, data: bytes) -> None:
        for addr, value, mask, _delay_us in WRITE_REG_ENTRY.iter_unpack(data):
            if mask == 0:
                continue  # e.g. esptool's delay-only entry on UART_DATE_REG
            if self.efuse.handles(addr):
                self.efuse.write_reg(addr, value, mask)
                continue
            old = self.read_reg(addr)
            new = value if mask == 0xFFFFFFFF else (value & mask) | (old & ~mask & 0xFFFFFFFF)
            if self.spi.handles(addr):
                self.spi.write_reg(addr, new)
            elif RTC_CNTL_BASE <= addr < RTC_CNTL_BASE + 0x100:
                self._write_rtc(addr, new)
            elif addr not in (UART_DATE_REG, CHIP_DETECT_MAGIC_REG):
                self.ram_regs[addr] = new

    def _write_rtc(self, addr: int, value: int) -> None:
        """RTC_CNTL: only the watchdog matters, as esptool's ``--after watchdog-reset`` uses it."""
        unlocked = self.rtc_regs.get(RTC_CNTL_WDTWPROTECT, 0) == RTC_CNTL_WDT_WKEY
        if addr in (RTC_CNTL_WDTCONFIG0, RTC_CNTL_WDTCONFIG1) and not unlocked:
            return
        self.rtc_regs[addr] = value
        if addr == RTC_CNTL_WDTCONFIG0:
            if value & RTC_WDT_EN:
                cycles = self.rtc_regs.get(RTC_CNTL_WDTCONFIG1, 0) or 1
                self.watchdog_deadline = time.monotonic() + cycles / RTC_SLOW_CLOCK_HZ
            else:
                self.watchdog_deadline = None

"""The emulated ESP-IDF bootloader and app of the virtual ESP32-C3 (rig.vboard.bootloader, rig.vboard.app).

Every case runs on a real flash image made from the generated virtual firmware set
(written at its build directories' offsets, as esptool would) and the board's real
eFuse controller, with state set as a lab would through ``burn_field``. The console
is a recorder; timestamps are normalised away before comparing lines.
"""

from __future__ import annotations

import re
import threading
from collections import deque
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from rig.firmware.build_dir import IdfBuildDir
from rig.firmware.firmware_set import FirmwareSet
from rig.firmware.image import EspImage
from rig.firmware.otadata import OtaDataPartition, OtaSelectEntry, OtaState
from rig.firmware.partition_table import PartitionTable
from rig.firmware.secure_boot_v2 import public_key_digest
from rig.firmware.variants import bit_flipped, secure_version, unsigned, untrusted_signature, wrong_chip_id
from rig.firmware.virtual_set import build_virtual_set, ensure_signing_key
from rig.vboard.app import (
    AppExit,
    ConsoleCommands,
    OtaOpsError,
    mark_app_invalid_and_reboot,
    mark_app_valid,
    run_app,
    running_app_ota_state,
    split_argv,
)
from rig.vboard.bootloader import RESET_RTC_SW_CPU, RESET_RTC_SW_SYS, BootloaderConfig, BootOutcome, run_bootloader
from rig.vboard.console import LogLevel, format_log_line
from rig.vboard.efuse import EfuseController
from rig.vboard.flash import SECTOR_SIZE, FlashStorage
from tests.signing_keys import InProcessSigner, KeyPair, in_parallel

OTA_0, OTA_1, OTADATA = 0x20000, 0x200000, 0x16000
MAC = bytes.fromhex("58cf79a1b2c3")


# ------------------------------------------------------------------ console, board


class RecordingConsole:
    """A :class:`rig.vboard.console.BoardConsole` that records output and types scripted lines.

    When the script runs out, the next ``read_line`` stops the board (as pulling EN
    would), so an app under test always ends.
    """

    def __init__(self, typed: list[str] | None = None):
        self._stopping = threading.Event()
        self._typed = deque(typed or [])
        self._clock = 0
        self.text = ""

    @property
    def stopping(self) -> threading.Event:
        return self._stopping

    def write(self, text: str) -> None:
        self.text += text

    def read_line(self, timeout: float) -> str | None:
        if self._typed:
            return self._typed.popleft()
        self._stopping.set()
        return None

    def uptime_ms(self) -> int:
        self._clock += 3
        return self._clock

    def log(self, level: LogLevel, tag: str, text: str) -> None:
        self.write(format_log_line(level, self.uptime_ms(), tag, text))

    @property
    def lines(self) -> list[str]:
        """Output lines, log timestamps replaced by ``(t)``."""
        return [re.sub(r"^([EWIDV]) \(\d+\) ", r"\1 (t) ", line) for line in self.text.split("\n")]


class Board:
    """Flash + eFuses of one virtual board in a temporary folder."""

    def __init__(self, root: Path):
        self.flash = FlashStorage(root / "flash.bin")
        self.efuse = EfuseController.open(root / "efuse.bin", MAC)

    def write(self, offset: int, data: bytes) -> None:
        """As esptool write-flash: erase the sectors covered, then program."""
        self.flash.erase(offset, -(-len(data) // SECTOR_SIZE) * SECTOR_SIZE)
        self.flash.write(offset, data)

    def flash_build(self, build: IdfBuildDir) -> None:
        for offset, path in build.flash_files.items():
            self.write(offset, path.read_bytes())

    def otadata(self) -> OtaDataPartition:
        return OtaDataPartition.parse(self.flash.read(OTADATA, 0x2000))

    def set_otadata(self, sector: int, entry: OtaSelectEntry) -> None:
        self.write(OTADATA + sector * SECTOR_SIZE, entry.to_bytes())

    def enable_secure_boot(self, digest: bytes) -> None:
        self.efuse.burn_field("KEY_PURPOSE_0", "SECURE_BOOT_DIGEST0")
        self.efuse.burn_field("BLOCK_KEY0", digest)
        self.efuse.burn_field("SECURE_BOOT_EN", 1)

    def boot(self, config: BootloaderConfig | None = None) -> tuple[BootOutcome, RecordingConsole]:
        console = RecordingConsole()
        outcome = run_bootloader(self.flash, self.efuse, console, *(() if config is None else (config,)))
        return outcome, console


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(trusted key — signs the virtual set, untrusted key), generated once by espsecure."""
    root = tmp_path_factory.mktemp("keys")
    made = in_parallel({name: (lambda name=name: ensure_signing_key(root / f"{name}.pem"))
                        for name in ("trusted", "untrusted")})
    return made["trusted"], made["untrusted"]


@pytest.fixture(scope="module")
def vset(tmp_path_factory: pytest.TempPathFactory, keys: tuple[Path, Path]) -> FirmwareSet:
    return build_virtual_set(tmp_path_factory.mktemp("fw") / "virtual", keys[0])


def signer(key: Path) -> InProcessSigner:
    """Signs as ``espsecure sign-data --version 2`` does, in this process (fast re-signing of variants)."""
    private = serialization.load_pem_private_key(key.read_bytes(), password=None)
    public = key.with_suffix(".pub.pem")
    public.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    return InProcessSigner(KeyPair(key.stem, key, public))


@pytest.fixture
def board(tmp_path: Path, vset: FirmwareSet) -> Board:
    b = Board(tmp_path)
    b.flash_build(vset.build("base"))
    return b


def app_of(vset: FirmwareSet, role: str) -> bytes:
    return vset.build(role).read_app_image()


def in_order(lines: list[str], expected: list[str]) -> None:
    """Every expected line appears, in this order (other lines may come between)."""
    at = 0
    for want in expected:
        try:
            at = lines.index(want, at) + 1
        except ValueError:
            pytest.fail(f"missing (in order) {want!r}\n--- output ---\n" + "\n".join(lines))


def segment_lines(image: bytes, part_offset: int) -> list[str]:
    """The ``esp_image: segment N`` lines ESP-IDF prints for *image* at *part_offset*."""
    parsed = EspImage.parse(image)
    out = []
    for i, (at, seg) in enumerate(zip(parsed.segment_offsets(), parsed.segments, strict=True)):
        kind = {"DROM": "map", "IROM": "map", "RAM": "load", "PADDING": ""}[seg.memory_type()]
        size = len(seg.data)
        out.append(f"I (t) esp_image: segment {i}: paddr={part_offset + at + 8:08x} vaddr={seg.load_addr:08x} "
                   f"size={size:05x}h ({size:6d}) {kind}")
    return out


BOOT_HEAD = [
    "I (t) boot: ESP-IDF v5.4.1 2nd stage bootloader",
    "I (t) boot: compile time Nov 23 2026 12:00:00",
    "I (t) boot: chip revision: v0.4",
]
TABLE = [
    "I (t) boot.esp32c3: SPI Speed      : 80MHz",
    "I (t) boot.esp32c3: SPI Mode       : DIO",
    "I (t) boot.esp32c3: SPI Flash Size : 4MB",
    "I (t) boot: Enabling RNG early entropy source...",
    "I (t) boot: Partition Table:",
    "I (t) boot: ## Label            Usage          Type ST Offset   Length",
    "I (t) boot:  0 esp_secure_cert  unknown          3f 06 0000d000 00002000",
    "I (t) boot:  1 nvs_key          NVS keys         01 04 0000f000 00001000",
    "I (t) boot:  2 nvs              WiFi data        01 02 00010000 00006000",
    "I (t) boot:  3 otadata          OTA data         01 00 00016000 00002000",
    "I (t) boot:  4 phy_init         RF data          01 01 00018000 00001000",
    "I (t) boot:  5 ota_0            OTA app          00 10 00020000 001e0000",
    "I (t) boot:  6 ota_1            OTA app          00 11 00200000 001e0000",
    "I (t) boot:  7 reserved         unknown          06 06 003e0000 0001a000",
    "I (t) boot:  8 fctry            WiFi data        01 02 003fa000 00006000",
    "I (t) boot: End of partition table",
]


# ------------------------------------------------------------------ good boot


def test_good_image_boots_with_the_exact_esp_idf_lines(board: Board, vset: FirmwareSet) -> None:
    outcome, console = board.boot()
    image = app_of(vset, "base")
    block = board.efuse.field("BLK_VERSION_MAJOR"), board.efuse.field("BLK_VERSION_MINOR")
    assert console.lines == [
        *BOOT_HEAD,
        f"I (t) boot: efuse block revision: v{block[0]}.{block[1]}",
        *TABLE,
        "I (t) boot: Enabled a check secure version of app for anti rollback",
        "I (t) boot: Secure version (from eFuse) = 0",
        "I (t) boot: otadata[0..1] in initial state",
        *segment_lines(image, OTA_0),
        "I (t) boot: Loaded app from partition at offset 0x20000",
        "I (t) boot: Set actual ota_seq=1 in otadata[0]",
        "I (t) efuse: BURN BLOCK0",
        "I (t) efuse: BURN BLOCK0 - OK (write block == read block)",
        "I (t) efuse: Anti-rollback is set. eFuse field is updated(1).",
        "I (t) boot: Disabling RNG early entropy source...",
        "",
    ]
    assert not outcome.halted and outcome.reason == "booted" and outcome.reset is None
    assert (outcome.partition_name, outcome.partition_offset, outcome.table_offset) == ("ota_0", OTA_0, 0xC000)
    assert outcome.image == image[: len(outcome.image)] and outcome.app_desc == vset.app_desc("base")
    assert outcome.behaviour is not None and outcome.behaviour.boot == "ok"
    # set_actual_ota_seq wrote otadata[0] (seq 1, VALID) and raised the eFuse to the app's secure_version
    assert board.otadata().entries[0] == OtaSelectEntry.for_seq(1, OtaState.VALID)
    assert board.otadata() == outcome.otadata
    assert board.efuse.secure_version == 1 == int(board.efuse.field("SECURE_VERSION"))
    # the second boot finds a VALID entry: no otadata or eFuse writes
    again, console = board.boot()
    in_order(console.lines, ["I (t) boot: Secure version (from eFuse) = 1",
                             "I (t) boot: Loaded app from partition at offset 0x20000"])
    assert "efuse: BURN" not in console.text and again.partition_name == "ota_0"


def test_app_prints_esp_idf_startup_and_serves_the_rainmaker_console(board: Board, vset: FirmwareSet) -> None:
    outcome, _ = board.boot()
    desc = vset.app_desc("base")
    console = RecordingConsole(["up-time", "", "no-such-command", "help task-dump", "help nope", "reboot"])
    ended = run_app(outcome, board.flash, board.efuse, console)
    assert ended == AppExit("sw_reset", "console command: reboot") and ended.rom_reset == RESET_RTC_SW_CPU
    startup = [
        "I (t) cpu_start: Unicore app",
        "I (t) cpu_start: Pro cpu start user code",
        "I (t) cpu_start: cpu freq: 160000000 Hz",
        "I (t) app_init: Application information:",
        "I (t) app_init: Project name:     rig_rmaker_node",
        "I (t) app_init: App version:      1.0.0",
        "I (t) app_init: Secure version:   1",
        "I (t) app_init: Compile time:     Nov 23 2026 12:00:00",
        f"I (t) app_init: ELF file SHA256:  {desc.elf_sha256_hex[:9]}...",
        "I (t) app_init: ESP-IDF:          v5.4.1",
        "I (t) efuse_init: Min chip rev:     v0.3",
        "I (t) efuse_init: Max chip rev:     v1.99 ",
        "I (t) efuse_init: Chip rev:         v0.4",
        "I (t) heap_init: Initializing. RAM available for dynamic allocation:",
        "I (t) heap_init: At 3FC904E0 len 0002FB20 (190 KiB): RAM",
        "I (t) heap_init: At 3FCC0000 len 0001C710 (113 KiB): Retention RAM",
        "I (t) heap_init: At 3FCDC710 len 00002950 (10 KiB): Retention RAM",
        "I (t) heap_init: At 5000021C len 00001DCC (7 KiB): RTCRAM",
        "I (t) spi_flash: detected chip: generic",
        "I (t) spi_flash: flash io: dio",
        "I (t) sleep_gpio: Configure to isolate all GPIO pins in sleep state",
        "I (t) sleep_gpio: Enable automatic switching of GPIO sleep configuration",
        "I (t) main_task: Started on CPU0",
        "I (t) main_task: Calling app_main()",
        "I (t) rmaker_console: Initialising UART on port 0",
        *[f"I (t) rmaker_common_cmds: Registering command: {name}"
          for name in ("reboot", "up-time", "mem-dump", "task-dump", "cpu-dump", "sock-dump", "heap-trace")],
        "I (t) main_task: Returned from app_main()",
    ]
    assert console.lines[: len(startup)] == startup
    rest = console.text.split("Returned from app_main()\n", 1)[1]
    uptime = re.search(r"rmaker_common_cmds: Uptime of the device: (\d+) milliseconds\n", rest)
    assert uptime is not None
    # first line: no prompt; then "\n>> " before each line; "\n" after each; unknown/empty lines say nothing
    assert rest == (
        f"\n{uptime.group(0)}"
        "\n>> \n"
        "\n>> \n"
        "\n>> \ntask-dump \n  Get the list of all the running tasks.\n\n"
        "\n>> \nhelp: Unrecognized option 'nope'. Please use correct command as argument or type 'help' only to "
        "print help for all commands\nrmaker_console: Console command failed with error: 1\n"
        "\n>> \n\n"
    )


def test_help_lists_commands_as_esp_console_prints_them() -> None:
    console = RecordingConsole()
    commands = ConsoleCommands(console)
    assert commands.run("help") == 0
    assert console.text == (
        "help  [<string>]\n"
        "  Print the summary of all registered commands if no arguments are given,\n"
        "  otherwise print summary of given command.\n"
        "      <string>  Name of command\n\n"
    )
    assert commands.run("nothing") is None and commands.run("   ") is None
    assert split_argv('set-param "Light 1" Power\\ On a b c d e f g') == ["set-param", "Light 1", "Power On", "a",
                                                                          "b", "c", "d"]


# ------------------------------------------------------------------ refused images


def boot_with_slot1(board: Board, image: bytes) -> tuple[BootOutcome, RecordingConsole]:
    """ota_0: the good base app (booted once, VALID); ota_1: *image*, selected as NEW (an OTA)."""
    board.boot()
    board.write(OTA_1, image)
    board.set_otadata(1, OtaSelectEntry.for_seq(2, OtaState.NEW))
    return board.boot()


REFUSED_SLOT_1 = ["E (t) boot: OTA app partition slot 1 is not bootable",
                  "I (t) boot: Loaded app from partition at offset 0x20000"]


@pytest.mark.parametrize("secure_boot", [False, True], ids=["plain", "secure_boot"])
def test_bit_flipped_image_is_refused_and_the_other_slot_boots(
        board: Board, vset: FirmwareSet, keys: tuple[Path, Path], secure_boot: bool) -> None:
    if secure_boot:
        board.enable_secure_boot(public_key_digest(keys[0].read_bytes()))
    outcome, console = boot_with_slot1(board, bit_flipped(app_of(vset, "next")))
    in_order(console.lines, [*segment_lines(app_of(vset, "next"), OTA_1)[-1:], *REFUSED_SLOT_1])
    assert re.search(r"E \(\d+\) esp_image: Checksum failed\. Calculated 0x[0-9a-f]+ read 0x[0-9a-f]+\n", console.text)
    assert outcome.partition_name == "ota_0" and [r.code for r in outcome.rejected] == ["checksum"]
    # the bootloader made the NEW entry PENDING_VERIFY before the image failed; the app never confirmed it
    assert board.otadata().entries[1].state == OtaState.PENDING_VERIFY


def test_secure_boot_refuses_unsigned_and_untrusted_images(
        board: Board, vset: FirmwareSet, keys: tuple[Path, Path], tmp_path: Path) -> None:
    board.enable_secure_boot(public_key_digest(keys[0].read_bytes()))
    base = app_of(vset, "next")
    outcome, console = boot_with_slot1(board, unsigned(base))
    in_order(console.lines, [
        "I (t) esp_image: Verifying image signature...",
        "I (t) secure_boot_v2: Verifying with RSA-PSS...",
        "E (t) secure_boot_v2: No signature block generated for valid scheme",
        "E (t) secure_boot_v2: RSA signing scheme selected but no signature block for the selected scheme",
        "E (t) esp_image: Secure boot signature verification failed",
        "I (t) esp_image: Calculating simple hash to check for corruption...",
        "W (t) esp_image: image valid, signature bad",
        *REFUSED_SLOT_1,
        "I (t) secure_boot_v2: enabling secure boot v2...",
        "I (t) secure_boot_v2: secure boot v2 is already enabled, continuing..",
        "I (t) boot: Disabling RNG early entropy source...",
    ])
    assert outcome.partition_name == "ota_0" and outcome.secure_boot_verified
    assert [r.code for r in outcome.rejected] == ["signature"]

    board.write(OTA_1, untrusted_signature(base, signer(keys[1])))
    board.set_otadata(1, OtaSelectEntry.for_seq(2, OtaState.NEW))
    outcome, console = board.boot()
    in_order(console.lines, [
        "I (t) secure_boot_v2: Verifying with RSA-PSS...",
        "E (t) secure_boot_v2: Secure Boot V2 verification failed.",
        "E (t) esp_image: Secure boot signature verification failed",
        "W (t) esp_image: image valid, signature bad",
        *REFUSED_SLOT_1,
    ])
    assert outcome.partition_name == "ota_0"
    # the good image verified against SECURE_BOOT_DIGEST0
    in_order(console.lines, ["I (t) secure_boot_v2: Signature verified successfully!", REFUSED_SLOT_1[1]])
    # a revoked digest trusts nothing: every slot is refused and the chip resets into a boot loop
    board.efuse.burn_field("SECURE_BOOT_KEY_REVOKE0", 1)
    outcome, console = board.boot()
    assert "E (t) secure_boot_v2: Could not read eFuse secure boot digests!" in console.lines
    assert outcome.halted and outcome.reset == RESET_RTC_SW_SYS
    assert console.lines[-2:] == ["E (t) boot: No bootable app partitions in the partition table", ""]


def test_wrong_chip_image_is_refused(board: Board, vset: FirmwareSet, keys: tuple[Path, Path]) -> None:
    board.enable_secure_boot(public_key_digest(keys[0].read_bytes()))
    outcome, console = boot_with_slot1(board, wrong_chip_id(app_of(vset, "next"), signer=signer(keys[0])))
    in_order(console.lines, ["E (t) boot_comm: mismatch chip ID, expected 5, found 9", *REFUSED_SLOT_1])
    assert outcome.partition_name == "ota_0" and [r.code for r in outcome.rejected] == ["chip_id"]


def test_nothing_bootable_halts_in_a_boot_loop(board: Board, vset: FirmwareSet) -> None:
    board.write(OTA_0, bit_flipped(app_of(vset, "base")))
    outcome, console = board.boot()
    in_order(console.lines, [
        "I (t) boot: otadata[0..1] in initial state",
        "E (t) boot: OTA app partition slot 0 is not bootable",
        "E (t) boot: Failed to get partition description 261",
        "E (t) boot: OTA app partition slot 1 is not bootable",
        "E (t) boot: Failed to get partition description 258",
        "E (t) boot: No bootable app partitions in the partition table",
    ])
    assert outcome.halted and outcome.partition is None and outcome.reset == RESET_RTC_SW_SYS
    assert outcome.reset.banner_text() == "rst:0x3 (RTC_SW_SYS_RST)"
    assert board.otadata().active_entry() is None  # nothing booted, nothing written
    with pytest.raises(ValueError, match="started no app"):
        run_app(outcome, board.flash, board.efuse, RecordingConsole())


# ------------------------------------------------------------------ rollback


def test_unconfirmed_app_rolls_back_on_the_next_boot(board: Board, vset: FirmwareSet) -> None:
    board.boot()  # base in ota_0, otadata[0] = seq 1 VALID
    board.write(OTA_1, app_of(vset, "next"))
    ota = board.otadata()
    assert ota.set_boot_slot(1, 2) == (1,)  # what esp_ota_set_boot_partition(ota_1) writes
    board.set_otadata(1, ota.entries[1])
    assert board.otadata().entries[1] == OtaSelectEntry.for_seq(2, OtaState.NEW)

    outcome, console = board.boot()  # NEW → PENDING_VERIFY, the new app boots
    assert outcome.partition_name == "ota_1" and outcome.app_desc is not None and outcome.app_desc.version == "1.1.0"
    assert [e.state for e in board.otadata().entries] == [OtaState.VALID, OtaState.PENDING_VERIFY]
    assert running_app_ota_state(outcome, board.flash) == OtaState.PENDING_VERIFY
    ended = run_app(outcome, board.flash, board.efuse, RecordingConsole(["reboot"]))  # never confirms itself
    assert ended.reset == "sw_reset"

    outcome, console = board.boot()  # PENDING_VERIFY → ABORTED: back to the old app
    assert outcome.partition_name == "ota_0"
    assert [e.state for e in board.otadata().entries] == [OtaState.VALID, OtaState.ABORTED]
    assert board.otadata().entries[1].crc_ok  # the state changes, the CRC (over ota_seq) does not
    assert "OTA app partition slot 1 is not bootable" not in console.text  # rollback is silent


def test_confirmed_app_stays_and_rejected_app_rolls_back(board: Board, vset: FirmwareSet) -> None:
    board.boot()
    board.write(OTA_1, app_of(vset, "next_secure"))
    board.set_otadata(1, OtaSelectEntry.for_seq(2, OtaState.NEW))
    outcome, _ = board.boot()
    console = RecordingConsole()
    mark_app_valid(outcome, board.flash, board.efuse, console)  # what RainMaker does after MQTT connects
    assert board.otadata().entries[1].state == OtaState.VALID and board.efuse.secure_version == 2
    assert console.lines == ["I (t) efuse: BURN BLOCK0", "I (t) efuse: BURN BLOCK0 - OK (all write block bits are set)",
                             "I (t) efuse: Anti-rollback is set. eFuse field is updated(2).", ""]
    assert board.boot()[0].partition_name == "ota_1"



def test_rollback_needs_another_bootable_app(board: Board) -> None:
    outcome, _ = board.boot()  # only ota_0 holds an app; otadata[1] is blank
    console = RecordingConsole()
    with pytest.raises(OtaOpsError) as err:
        mark_app_invalid_and_reboot(outcome, board.flash, board.efuse, console)
    assert err.value.err == "ESP_ERR_OTA_ROLLBACK_FAILED"
    assert console.lines == ["E (t) esp_ota_ops: Rollback is not possible, do not have any suitable apps in slots", ""]
    assert board.otadata().entries[0].state == OtaState.VALID  # untouched
    mark_app_valid(outcome, board.flash, board.efuse, console)  # already VALID: nothing written, nothing printed
    assert len(console.lines) == 2


def test_rejecting_a_new_app_rolls_back_to_the_previous_one(board: Board, vset: FirmwareSet) -> None:
    board.boot()
    board.write(OTA_1, app_of(vset, "next"))
    board.set_otadata(1, OtaSelectEntry.for_seq(2, OtaState.NEW))
    outcome, _ = board.boot()
    console = RecordingConsole()
    ended = mark_app_invalid_and_reboot(outcome, board.flash, board.efuse, console)
    assert ended.rom_reset == RESET_RTC_SW_CPU
    assert console.lines == ["I (t) esp_ota_ops: Rollback to previously worked partition. Restart.", ""]
    assert [e.state for e in board.otadata().entries] == [OtaState.VALID, OtaState.INVALID]
    assert board.boot()[0].partition_name == "ota_0"


# ------------------------------------------------------------------ anti-rollback


def test_valid_entry_raises_secure_version_then_lower_images_are_refused(
        board: Board, vset: FirmwareSet, keys: tuple[Path, Path]) -> None:
    board.enable_secure_boot(public_key_digest(keys[0].read_bytes()))
    board.boot()  # base (secure_version 1) VALID in ota_0; eFuse 1
    board.write(OTA_1, app_of(vset, "next_secure"))  # secure_version 2, selected and already VALID
    board.set_otadata(1, OtaSelectEntry.for_seq(2, OtaState.VALID))
    outcome, console = board.boot()
    in_order(console.lines, [
        "I (t) boot: Secure version (from eFuse) = 1",
        "I (t) efuse: Anti-rollback is set. eFuse field is updated(2).",
        "I (t) esp_image: Verifying image signature...",
        "I (t) boot: Loaded app from partition at offset 0x200000",
    ])
    assert outcome.partition_name == "ota_1" and board.efuse.secure_version == 2

    # an OTA of a secure_version-1 build into ota_0: the bootloader never selects it
    board.write(OTA_0, secure_version(app_of(vset, "next_secure"), 1, signer=signer(keys[0])))
    board.set_otadata(0, OtaSelectEntry.for_seq(3, OtaState.NEW))
    outcome, console = board.boot()
    assert outcome.partition_name == "ota_1" and board.efuse.secure_version == 2
    assert board.otadata().entries[0].state == OtaState.NEW  # not active, so not made PENDING_VERIFY

    # with ota_1 erased, the lower version is all that is left: refused, boot loop
    board.flash.erase(OTA_1, 0x10000)
    outcome, console = board.boot()
    in_order(console.lines, [
        "I (t) boot: Secure version (from eFuse) = 2",
        "E (t) boot: Failed to get partition description 261",
        "E (t) boot: ota data partition invalid and no factory, will try all partitions",
        "E (t) boot: OTA app partition slot 0 is not bootable",
        "E (t) boot: OTA app partition slot 1 is not bootable",
        "E (t) boot: No bootable app partitions in the partition table",
    ])
    assert outcome.halted and [r.code for r in outcome.rejected][:1] == ["anti_rollback"]


def test_write_protected_secure_version_is_not_raised(board: Board) -> None:
    board.efuse.burn_field("WR_DIS", 1 << 18)  # WR_DIS bit 18 covers SECURE_VERSION (and DIS_DOWNLOAD_MODE …)
    outcome, console = board.boot()
    in_order(console.lines, ["I (t) efuse: BURN BLOCK0", "E (t) efuse: BURN BLOCK0 - ERROR (written bits != read bits)",
                             "I (t) efuse: Anti-rollback is set. eFuse field is updated(1).",
                             "I (t) boot: Disabling RNG early entropy source..."])
    assert outcome.partition_name == "ota_0" and board.efuse.secure_version == 0


# ------------------------------------------------------------------ crash, layouts


def test_crash_on_boot_panics_and_asks_for_a_software_reset(board: Board, vset: FirmwareSet) -> None:
    board.write(OTA_0, app_of(vset, "crash_on_boot"))
    outcome, _ = board.boot()
    console = RecordingConsole()
    ended = run_app(outcome, board.flash, board.efuse, console)
    assert ended.reset == "panic" and ended.rom_reset == RESET_RTC_SW_CPU
    assert ended.rom_reset.banner_text() == "rst:0xc (RTC_SW_CPU_RST)"
    lines = console.lines
    start = lines.index("Guru Meditation Error: Core  0 panic'ed (Load access fault). Exception was unhandled.")
    assert lines[start - 1] == "I (t) main_task: Calling app_main()"
    panic = lines[start:]
    assert panic[1:3] == ["", "Core  0 register dump:"]
    registers = panic[3:13]
    assert registers[0].startswith("MEPC    : 0x420") and registers[-1] == "MHARTID : 0x00000000  "
    assert all(re.fullmatch(r"(\S+ *: 0x[0-9a-f]{8}  ){1,4}", row) for row in registers)
    assert "MCAUSE  : 0x00000005  " in registers[8]
    assert panic[13:15] == ["", "Stack memory:"]
    stack = panic[15:47]
    assert all(re.fullmatch(r"[0-9a-f]{8}: (0x[0-9a-f]{8} ){7}0x[0-9a-f]{8}", row) for row in stack)
    sha = vset.app_desc("crash_on_boot").elf_sha256_hex[:9]
    assert panic[47:] == ["", "", f"ELF file SHA256: {sha}", "", "Rebooting...", ""]
    assert "rmaker_console" not in console.text


def test_factory_layout_at_the_default_table_offset(tmp_path: Path, vset: FirmwareSet) -> None:
    table = PartitionTable.from_csv("nvs, data, nvs, , 0x6000\nphy_init, data, phy, , 0x1000\n"
                                    "factory, app, factory, , 1M\n", offset=0x8000)
    board = Board(tmp_path)
    build = vset.build("base")
    board.write(0, build.bootloader_bin.read_bytes())
    board.write(0x8000, table.to_bytes())
    board.write(0x10000, build.read_app_image())
    outcome, console = board.boot(BootloaderConfig(anti_rollback=False))
    assert outcome.table_offset == 0x8000 and outcome.partition_name == "factory"
    in_order(console.lines, ["I (t) boot:  2 factory          factory app      00 00 00010000 00100000",
                             "I (t) boot: End of partition table",
                             "I (t) boot: Loaded app from partition at offset 0x10000"])
    assert "anti rollback" not in console.text and outcome.otadata is None


def test_no_partition_table_halts(tmp_path: Path, vset: FirmwareSet) -> None:
    board = Board(tmp_path)
    board.write(0, vset.build("base").bootloader_bin.read_bytes())
    # an erased table sector passes esp_partition_table_verify as an empty table
    outcome, console = board.boot()
    in_order(console.lines, ["I (t) boot: Partition Table:",
                             "I (t) boot: ## Label            Usage          Type ST Offset   Length",
                             "I (t) boot: End of partition table",
                             "E (t) boot: Failed to get partition description 258",
                             "E (t) boot: No bootable app partitions in the partition table"])
    assert outcome.halted and outcome.reset == RESET_RTC_SW_SYS and outcome.partitions == ()
    # garbage there is refused before any partition is looked at
    board.write(0xC000, bytes(32))
    outcome, console = board.boot()
    assert console.lines[-4:] == ["E (t) flash_parts: partition 0 invalid magic number 0x0",
                                  "E (t) boot: Failed to verify partition table",
                                  "E (t) boot: load partition table error!", ""]
    assert outcome.halted and outcome.reason == "partition table not valid"
    # an erased chip: the ROM never starts a bootloader, and this prints nothing
    outcome, console = Board(tmp_path / "blank").boot()
    assert outcome.halted and console.text == ""

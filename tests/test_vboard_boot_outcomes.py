"""Boot outcomes of a running virtual board, observed only through its doors.

A lab sets the board up as it would a real one: esptool writes the virtual firmware set,
espefuse burns the Secure Boot V2 key digest and ``SECURE_BOOT_EN``. Each case then
writes an image into ``ota_1`` and selects it as an OTA would (otadata entry NEW), resets
the board through the RFC 2217 control lines, expects ESP-IDF's own console lines, and
reads otadata back through esptool. The images come from ``rig.firmware.variants``
(``CATALOGUE``), derived from the set's ``next`` role and signed with espsecure.

ESP-IDF sources of the expected lines: shared/reference/idf-console.md §3–§4
(``bootloader_utility.c``, ``esp_image_format.c``, ``bootloader_common.c``
``bootloader_common_check_chip_validity``, ``secure_boot_signatures_bootloader.c``).
The tools run through the rig's own runner (``rig.boards.board.Board``), so this
module also exercises the path the suites use.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from rig.boards.board import Board
from rig.firmware.build_dir import IdfBuildDir
from rig.firmware.firmware_set import FirmwareSet
from rig.firmware.otadata import OtaDataPartition, OtaSelectEntry, OtaState
from rig.firmware.variants import KeyFileSigner, VariantSigners, variant
from rig.firmware.virtual_set import build_virtual_set
from rig.lab import BoardSpec
from tests.signing_keys import generate_keys
from tests.vboard_process import BoardFactory, SerialMonitor, vboard_factory  # noqa: F401  (fixture)

BOOT_TIMEOUT_S = 60.0
OTA_0, OTA_1, OTADATA, OTADATA_SIZE = 0x20000, 0x200000, 0x16000, 0x2000


def log_line(level: str, tag: str, text: str) -> str:
    """An ESP-IDF log line as a regex: ``L (<ms>) tag: text`` (esp_log_write), text matched literally."""
    return rf"{level} \(\d+\) {re.escape(tag)}: {re.escape(text)}\r?\n"


def rom_reset_line(code: int, name: str) -> str:
    return rf"rst:0x{code:x} \({re.escape(name)}\),boot:0x[0-9a-f]+ \(SPI_FAST_FLASH_BOOT\)"


APP_STARTED = [log_line("I", "main_task", "Calling app_main()")]
REFUSED_SLOT_1 = [log_line("E", "boot", "OTA app partition slot 1 is not bootable"),
                  log_line("I", "boot", f"Loaded app from partition at offset 0x{OTA_0:x}")]


def app_version(version: str) -> str:
    return rf"I \(\d+\) app_init: App version: +{re.escape(version)}\r?\n"


@dataclass
class Lab:
    """The board under test, its firmware set and the keys a lab would hold."""

    board: Board
    firmware: FirmwareSet
    signers: VariantSigners
    work: Path

    @property
    def base(self) -> IdfBuildDir:
        return self.firmware.build("base")

    @property
    def span(self) -> int:
        """Bytes an image write covers: the set's longest app image and one more sector."""
        return max(len(self.firmware.build(r).read_app_image()) for r in self.firmware.roles) + 0x1000

    def write_app(self, offset: int, image: bytes, otadata: bytes) -> None:
        """An OTA as the device does it: the slot (as far as any test image reaches) erased and
        written, then otadata."""
        self.write((offset, erased_after(image, self.span)), (OTADATA, otadata))

    def write(self, *pairs: tuple[int, bytes | Path]) -> None:
        """esptool write-flash, staying in download mode (the next reset is the test's)."""
        args: list[str] = []
        for offset, data in pairs:
            if isinstance(data, bytes):
                path = self.work / f"write-{offset:x}.bin"
                path.write_bytes(data)
                data = path
            args += [hex(offset), str(data)]
        self.board.esptool("--after", "no-reset", "write-flash", *args)

    def otadata(self) -> OtaDataPartition:
        """otadata as esptool reads it back from the board."""
        out = self.work / "otadata-read.bin"
        self.board.esptool("--after", "no-reset", "read-flash", hex(OTADATA), hex(OTADATA_SIZE), str(out))
        return OtaDataPartition.parse(out.read_bytes())

    def boot(self, expected: Sequence[str]) -> str:
        """Reset into the app and expect *expected* (regexes) on the console in this order; the text seen."""
        with SerialMonitor(self.board.require_port()) as mon:
            mon.hard_reset()
            expect_in_order(mon, expected, BOOT_TIMEOUT_S)
            return mon.text


def expect_in_order(mon: SerialMonitor, patterns: Sequence[str], timeout: float) -> None:
    """Each pattern must match after the previous one's match, within *timeout* in all."""
    deadline = time.monotonic() + timeout
    at = 0
    for pattern in patterns:
        regex = re.compile(pattern)
        while (m := regex.search(mon.text, at)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {pattern!r} on the console (in order) within {timeout} s; after the previous "
                                   f"match it printed:\n{mon.text[at:][-3000:]}")
            mon.text += mon.port.read(4096).decode("utf-8", "replace")  # returns within the port timeout
        at = m.end()


def erased_after(image: bytes, span: int) -> bytes:
    """*image* padded with 0xFF to *span* bytes, so that writing it erases what an earlier, longer
    image left behind, as ``esp_ota_begin`` erases the slot: a previous image's signature sector
    behind a shorter new image would otherwise be read as the new image's (an ``unsigned``
    variant of the same content would then verify). Not the whole 1.9 MB slot: with Secure Boot
    on, esptool runs the ROM loader on a C3 (no stub, no compression), as on hardware."""
    if len(image) > span:
        raise ValueError(f"image of {len(image)} bytes is longer than the {span}-byte span the test erases")
    return image.ljust(span, b"\xff")


def selected(slot1_state: OtaState) -> bytes:
    """otadata with ota_0 confirmed (seq 1, VALID) and ota_1 chosen by an OTA (seq 2)."""
    return OtaDataPartition([OtaSelectEntry.for_seq(1, OtaState.VALID), OtaSelectEntry.for_seq(2, slot1_state)]).to_bytes()


@dataclass(frozen=True)
class Kit:
    """What the lab holds: the firmware set, the trusted and an untrusted key, the trusted public key."""

    firmware: FirmwareSet
    signers: VariantSigners
    trusted_public: Path
    work: Path


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> Kit:
    work = tmp_path_factory.mktemp("boot-outcomes")
    keys = generate_keys(work, ("trusted", "untrusted"))
    trusted, untrusted = keys["trusted"], keys["untrusted"]
    return Kit(build_virtual_set(work / "virtual", trusted.private),
               VariantSigners(KeyFileSigner(trusted.private), KeyFileSigner(untrusted.private)), trusted.public, work)


def set_up(factory: BoardFactory, kit: Kit, name: str) -> Lab:
    """A new board with the base build flashed and Secure Boot V2 enabled, never booted from flash yet."""
    proc = factory(name)
    board = Board(BoardSpec(name=proc.name, kind="virtual", chip="esp32c3"), port=proc.url,
                  log=logging.getLogger("test.boot_outcomes"))
    work = kit.work / name
    work.mkdir()
    lab = Lab(board, kit.firmware, kit.signers, work)
    lab.write(*sorted(lab.base.flash_files.items()))
    # as a lab enables Secure Boot V2 before shipping: the key digest, then the enable bit
    board.espefuse("--do-not-confirm", "burn-key-digest", "BLOCK_KEY0", str(kit.trusted_public), "SECURE_BOOT_DIGEST0")
    board.espefuse("--do-not-confirm", "burn-efuse", "SECURE_BOOT_EN", "1")
    return lab


@pytest.fixture(scope="module")
def lab(vboard_factory: BoardFactory, kit: Kit) -> Lab:  # noqa: F811
    """One board for the refused images: each case writes its own ota_1 and otadata."""
    return set_up(vboard_factory, kit, "refusals")


def efuse_value(board: Board, name: str) -> object:
    return board.efuse_summary()[name]["value"]


# ------------------------------------------------------------------ good image


def test_good_signed_image_boots_and_confirms_otadata(vboard_factory: BoardFactory, kit: Kit) -> None:  # noqa: F811
    lab = set_up(vboard_factory, kit, "good")
    assert efuse_value(lab.board, "SECURE_BOOT_EN") is True
    assert efuse_value(lab.board, "KEY_PURPOSE_0") == "SECURE_BOOT_DIGEST0"
    text = lab.boot([
        log_line("I", "boot", "Enabled a check secure version of app for anti rollback"),
        log_line("I", "boot", "Secure version (from eFuse) = 0"),
        log_line("I", "boot", "otadata[0..1] in initial state"),
        log_line("I", "esp_image", "Verifying image signature..."),
        log_line("I", "secure_boot_v2", "Verifying with RSA-PSS..."),
        log_line("I", "secure_boot_v2", "Signature verified successfully!"),
        log_line("I", "boot", f"Loaded app from partition at offset 0x{OTA_0:x}"),
        log_line("I", "boot", "Set actual ota_seq=1 in otadata[0]"),
        log_line("I", "efuse", "Anti-rollback is set. eFuse field is updated(1)."),
        log_line("I", "secure_boot_v2", "secure boot v2 is already enabled, continuing.."),
        app_version("1.0.0"),
        *APP_STARTED,
    ])
    assert "not bootable" not in text
    ota = lab.otadata()
    assert ota.entries[0] == OtaSelectEntry.for_seq(1, OtaState.VALID) and ota.entries[1].is_blank


# ------------------------------------------------------------------ refused images

REFUSALS = {
    "bit_flipped": [r"E \(\d+\) esp_image: Checksum failed\. Calculated 0x[0-9a-f]+ read 0x[0-9a-f]+\r?\n"],
    "unsigned": [
        log_line("I", "esp_image", "Verifying image signature..."),
        log_line("E", "secure_boot_v2", "No signature block generated for valid scheme"),
        log_line("E", "secure_boot_v2", "RSA signing scheme selected but no signature block for the selected scheme"),
        log_line("E", "esp_image", "Secure boot signature verification failed"),
        log_line("W", "esp_image", "image valid, signature bad"),
    ],
    "untrusted_signature": [
        log_line("I", "secure_boot_v2", "Verifying with RSA-PSS..."),
        log_line("E", "secure_boot_v2", "Secure Boot V2 verification failed."),
        log_line("E", "esp_image", "Secure boot signature verification failed"),
        log_line("W", "esp_image", "image valid, signature bad"),
    ],
    "wrong_chip_id": [log_line("E", "boot_comm", "mismatch chip ID, expected 5, found 9")],
}


@pytest.mark.parametrize("name", list(REFUSALS))
def test_refused_image_falls_back_to_the_running_app(lab: Lab, name: str) -> None:
    image = variant(name)(lab.firmware.build("next").read_app_image(), lab.signers)
    lab.write_app(OTA_1, image, selected(OtaState.NEW))

    # first boot: NEW becomes PENDING_VERIFY, the image is refused, ota_0 runs
    lab.boot([*REFUSALS[name], *REFUSED_SLOT_1,
              app_version("1.0.0"), *APP_STARTED])
    ota = lab.otadata()
    assert ota.entries[0] == OtaSelectEntry.for_seq(1, OtaState.VALID)
    assert ota.entries[1] == OtaSelectEntry.for_seq(2, OtaState.PENDING_VERIFY)

    # next boot: the pending entry is aborted (silently, as ESP-IDF does) and ota_0 boots without trying slot 1
    text = lab.boot([log_line("I", "boot", f"Loaded app from partition at offset 0x{OTA_0:x}"), app_version("1.0.0"),
                     *APP_STARTED])
    assert "slot 1 is not bootable" not in text
    ota = lab.otadata()
    assert ota.entries[1] == OtaSelectEntry.for_seq(2, OtaState.ABORTED) and ota.boot_slot(2) == 0


# ------------------------------------------------------------------ anti-rollback


def test_lower_secure_version_is_never_booted(vboard_factory: BoardFactory, kit: Kit) -> None:  # noqa: F811
    lab = set_up(vboard_factory, kit, "antirollback")
    higher = lab.firmware.build("next_secure").read_app_image()  # secure_version 2
    lab.write_app(OTA_1, higher, selected(OtaState.VALID))  # an OTA the app has confirmed
    lab.boot([log_line("I", "boot", "Secure version (from eFuse) = 0"),
              log_line("I", "efuse", "Anti-rollback is set. eFuse field is updated(2)."),
              log_line("I", "boot", f"Loaded app from partition at offset 0x{OTA_1:x}"), app_version("1.2.0"), *APP_STARTED])
    assert bin(int(str(efuse_value(lab.board, "SECURE_VERSION")), 0)).count("1") == 2  # a thermometer code

    # an OTA of a build one secure_version lower into ota_0, selected as NEW: the bootloader skips it
    lower = variant("secure_version_lower")(higher, lab.signers)
    new_entry = OtaSelectEntry.for_seq(3, OtaState.NEW)
    lab.write_app(OTA_0, lower, OtaDataPartition([new_entry, OtaSelectEntry.for_seq(2, OtaState.VALID)]).to_bytes())
    text = lab.boot([log_line("I", "boot", "Secure version (from eFuse) = 2"),
                     log_line("I", "boot", f"Loaded app from partition at offset 0x{OTA_1:x}"), app_version("1.2.0"),
                     *APP_STARTED])
    assert not re.search(rf"offset 0x{OTA_0:x}\b", text) and "not bootable" not in text  # skipped, silently
    ota = lab.otadata()
    assert ota.entries[0] == new_entry, "never active, so never made PENDING_VERIFY"
    assert ota.entries[1] == OtaSelectEntry.for_seq(2, OtaState.VALID)

    # with ota_1 erased the lower build is all there is: refused, and the chip resets into a boot loop
    lab.write((OTA_1, erased_after(b"", lab.span)))  # esptool refuses erase-region with Secure Boot on
    lab.boot([log_line("I", "boot", "Secure version (from eFuse) = 2"),
              log_line("E", "boot", "OTA app partition slot 0 is not bootable"),
              log_line("E", "boot", "OTA app partition slot 1 is not bootable"),
              log_line("E", "boot", "No bootable app partitions in the partition table"),
              rom_reset_line(0x3, "RTC_SW_SYS_RST")])
    assert lab.otadata() == OtaDataPartition([new_entry, OtaSelectEntry.for_seq(2, OtaState.VALID)])

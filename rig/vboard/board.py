"""One virtual ESP32-C3 DevKit: chip, flash, eFuses, UART0 and the USB-UART bridge's
auto-reset circuit, served on ``rfc2217://127.0.0.1:<port>``.

What a host sees is what an ESP32-C3-DevKitC-02 on a CP2102 shows:

* **Auto-reset circuit** (two transistors, DTR -> GPIO9, RTS -> EN). In pyserial terms
  (asserted = True = electrically low): the chip is held in reset while
  ``rts and not dtr``; GPIO9 is low while ``dtr and not rts`` (esptool-protocol.md §8).
  The strap is sampled when EN has risen and settled; a real board's EN RC delay is
  what lets esptool's sequential ("classic") reset pass through the transient (T,T)
  state and still catch GPIO9 low. Here the settle window is widened to
  :data:`STRAP_SETTLE_S` because every SET_CONTROL crosses RFC 2217 with a round trip
  (pyserial waits 50 ms to 100 ms for each acknowledgement).
* **BOOT button**: GPIO9 is also the DevKit's BOOT button, and the running app reads it
  (RainMaker's examples hold it for a Wi-Fi or factory reset, :mod:`rig.vboard.node.app_reset`).
  The circuit pulls it low while the host holds DTR asserted and RTS released, with EN
  high — the same host action presses it on a real DevKitC (:mod:`rig.boards.boot_button`).
  :class:`GpioInput` hands its level and edges to the firmware.
* **ROM**: the banner lines of the real C3 ROM for each reset reason and boot mode
  (esptool-protocol.md §9; idf-console.md §2), then download mode
  (:mod:`rig.vboard.rom`) or a flash boot: the ``SPIWP``/``mode``/``load``/``entry``
  lines of the 2nd-stage bootloader image at 0x0, then the emulated bootloader and app.
* **UART0**: 8N1 at the chip's rate. Bytes pass only while host and chip rates agree
  (the ROM's download mode auto-bauds until CHANGE_BAUDRATE), so forgetting to follow a
  baud change loses data as on a real board. Console text is paced at the chip's baud
  rate (a UART FIFO drains no faster), so boot output takes as long as on silicon;
  download-mode frames are not paced, which is what makes a virtual board faster to
  flash than a real one.

A hung or vanished client costs nothing but its own session: the chip runs on its own
thread and never waits for the host.
"""

from __future__ import annotations

import enum
import fcntl
import hashlib
import logging
import os
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rig.boards.address_lease import AddressInUseError, lease_address
from rig.boards.virtual_ports import address_file, board_state_dir, check_virtual_address, default_board_address, port_file, radio_file
from rig.vboard import slip
from rig.vboard.app import AppContext, AppExit, AppMain, run_app
from rig.vboard.bootloader import BootOutcome, run_bootloader
from rig.vboard.console import LogLevel, format_log_line
from rig.vboard.efuse import EfuseController, read_protected_file
from rig.vboard.flash import FlashStorage
from rig.vboard.node import NodePlatform, RainMakerFirmware, delay_trace
from rig.vboard.rfc2217_server import Rfc2217Server
from rig.vboard.rom import DownloadMode, Leave, known_stubs

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- identity

ESPRESSIF_OUI = bytes.fromhex("6055F9")
"""An Espressif OUI (IEEE MA-L 60:55:F9, Espressif Inc.); the low three bytes come from the name."""


def board_mac(name: str) -> bytes:
    """The factory MAC of the virtual board *name*: stable across runs, distinct per name."""
    return ESPRESSIF_OUI + hashlib.sha256(f"rig-vboard:{name}".encode()).digest()[:3]


# --------------------------------------------------------------------------- ROM text

ROM_BANNER = ("ESP-ROM:esp32c3-api1-20210207", "Build:Feb  7 2021")
"""First two lines the C3 ROM prints after any reset (two spaces: C ``__DATE__``) [§9]."""
ROM_BAUD = 115200
"""UART0 rate of the ROM (and of ESP-IDF's console by default)."""


class ResetReason(enum.Enum):
    """``rst:`` codes the C3 ROM prints [esp-idf esp32c3/rom/rtc.h; esptool-protocol.md §9]."""

    POWERON = (0x1, "POWERON")
    """EN pin or power-up."""
    RTC_SW_SYS_RST = (0x3, "RTC_SW_SYS_RST")
    """Software system reset: the ROM's own (download modes disabled, run/reboot from download)."""
    RTC_SW_CPU_RST = (0xC, "RTC_SW_CPU_RST")
    """``esp_restart()`` and the panic handler (``esp_rom_software_reset_cpu``)."""
    RTCWDT_RTC_RST = (0x10, "RTCWDT_RTC_RST")
    """RTC watchdog (esptool ``--after watchdog-reset``)."""

    @property
    def code(self) -> int:
        return self.value[0]

    @property
    def label(self) -> str:
        return self.value[1]

    @property
    def resamples_straps(self) -> bool:
        """A CPU-only reset keeps the latched boot mode; chip/system resets sample GPIO9 again."""
        return self is not ResetReason.RTC_SW_CPU_RST


SAVED_PC = {
    ResetReason.RTC_SW_SYS_RST: 0x40048B82,
    ResetReason.RTCWDT_RTC_RST: 0x40048B82,
    ResetReason.RTC_SW_CPU_RST: 0x403839B0,
}
"""``Saved PC:`` after a non-power-on reset: a ROM address for resets the ROM causes
(esp32.io t=42351 log), an IRAM address for the app's restart (esp-idf #18222 log)."""


class BootMode(enum.Enum):
    """``boot:`` value (GPIO_STRAP: 0x8 GPIO9, 0x4 GPIO8, 0x1 GPIO2) and its name [§9]."""

    SPI_FAST_FLASH_BOOT = 0xD
    DOWNLOAD = 0x5

    @property
    def label(self) -> str:
        return "SPI_FAST_FLASH_BOOT" if self is BootMode.SPI_FAST_FLASH_BOOT else "DOWNLOAD(USB/UART0/1)"


SPI_MODE_NAMES = {0: "QIO", 1: "QOUT", 2: "DIO", 3: "DOUT", 4: "FAST_READ", 5: "SLOW_READ"}
"""``mode:`` names for esp_image_header_t.spi_mode."""
SPI_CLOCK_DIV = {0xF: 1, 0x0: 2, 0x1: 3, 0x2: 4}
"""``clock div:`` = 80 MHz / flash clock for the header's speed nibble (80m, 40m, 26m, 20m)."""
INVALID_HEADER_RETRY_S = 0.05
"""Pause between the ROM's ``invalid header`` retries. Silicon retries back to back (a
line every ~2 ms at 115200); slowed down here so an erased board does not flood logs."""

# --------------------------------------------------------------------------- timing

STRAP_SETTLE_S = 0.25
"""EN release to strap sampling: the DevKit's RC delay, widened to absorb RFC 2217 round
trips between esptool's sequential DTR/RTS writes (ClassicReset holds the transient
(T,T) state for one acknowledged SET_CONTROL, ~50 ms, or 100 ms with ``ign_set_control``)."""
UART_FIFO_BYTES = 128
"""ESP32-C3 UART TX FIFO depth: how far console output may run ahead of the wire."""
BAUD_TOLERANCE = 0.03
"""Relative rate mismatch a UART still decodes (8N1 sampling mid-bit)."""
SHUTDOWN_TIMEOUT_S = 10.0
"""How long power-off waits for the firmware to notice ``stopping`` before giving up on it."""
RX_BUFFER_LIMIT = 64 * 1024
"""Host bytes held for the chip before further ones are dropped (FIFO plus a driver buffer)."""


# --------------------------------------------------------------------------- GPIO9


GpioWatcher = Callable[[bool], None]
"""Called with the pin's new level (True = low) on each edge."""


class GpioInput:
    """An input pin as the firmware reads it: GPIO9, the BOOT button and the circuit's DTR line.

    The board drives it (:meth:`drive`) whenever the reset circuit's output changes; the
    firmware reads :attr:`low` or watches its edges (:meth:`watch`, its GPIO interrupt)
    instead of polling. A watcher runs on the thread that moved the line (the RFC 2217
    session's), in edge order, with the board's line lock held: it must return at once and
    must not call back into the board — it hands the work to a task or a timer.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._low = False
        self._watchers: list[GpioWatcher] = []

    @property
    def low(self) -> bool:
        with self._lock:
            return self._low

    def watch(self, on_edge: GpioWatcher) -> Callable[[], None]:
        """Call *on_edge* on every later edge; returns the function that stops it."""
        with self._lock:
            self._watchers.append(on_edge)

        def unwatch() -> None:
            with self._lock:
                if on_edge in self._watchers:
                    self._watchers.remove(on_edge)

        return unwatch

    def drive(self, low: bool) -> None:
        """The circuit's output is now *low* (or high); watchers see only real edges."""
        with self._lock:
            if low == self._low:
                return
            self._low = low
            watchers = list(self._watchers)
        for on_edge in watchers:
            try:
                on_edge(low)
            except Exception:
                log.exception("a GPIO9 watcher failed on the %s edge", "falling" if low else "rising")


# --------------------------------------------------------------------------- UART


class VirtualUart:
    """UART0 and the bridge in front of it; thread-safe."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sink: Callable[[bytes], None] | None = None
        self._rx = bytearray()
        self._rx_enabled = False
        self._skip_lf = False
        self._wire_free_at = 0.0
        self.host_baud = ROM_BAUD
        self.chip_baud = ROM_BAUD
        self.autobaud = False
        self.dropped_rx = 0
        self.dropped_tx = 0
        self.trace_name = ""
        """The board's name in :mod:`~rig.vboard.node.delay_trace` records."""

    # -- host side

    def attach(self, sink: Callable[[bytes], None] | None) -> None:
        with self._cond:
            self._sink = sink

    def set_host_baud(self, baud: int) -> None:
        with self._cond:
            self.host_baud = baud
            if self.autobaud:
                self.chip_baud = baud

    def _rates_agree(self) -> bool:
        return abs(self.host_baud - self.chip_baud) <= BAUD_TOLERANCE * self.chip_baud

    def host_write(self, data: bytes) -> None:
        with self._cond:
            if self.autobaud:
                self.chip_baud = self.host_baud
            if not self._rx_enabled or not self._rates_agree() or len(self._rx) + len(data) > RX_BUFFER_LIMIT:
                self.dropped_rx += len(data)
                return
            self._rx += data
            self._cond.notify_all()

    def purge_rx(self) -> None:
        with self._cond:
            self._rx.clear()

    # -- chip side

    def chip_reset(self, powered: bool) -> None:
        """Reset: FIFOs cleared, ROM rate restored; *powered* says whether the chip now runs."""
        with self._cond:
            self._rx.clear()
            self._skip_lf = False
            self._rx_enabled = powered
            self.chip_baud = ROM_BAUD
            self.autobaud = False
            self._cond.notify_all()

    def start_autobaud(self) -> None:
        """The ROM's download mode measures the host's rate from its SYNC bytes and follows
        it until CHANGE_BAUDRATE sets one."""
        with self._cond:
            self.autobaud = True
            self.chip_baud = self.host_baud

    def set_chip_baud(self, baud: int) -> None:
        with self._cond:
            self.chip_baud = baud
            self.autobaud = False

    def wake(self) -> None:
        """Wake readers so they notice a stop request."""
        with self._cond:
            self._cond.notify_all()

    def transmit(self, data: bytes, stopping: threading.Event | None = None) -> None:
        """Send *data* to the host; with *stopping* given, pace it at the chip's rate
        (returning early if the chip is reset meanwhile)."""
        with self._cond:
            sink = self._sink if self._rates_agree() else None
            if sink is None:
                self.dropped_tx += len(data)
            wait = 0.0
            if stopping is not None:
                now = time.monotonic()
                start = max(now, self._wire_free_at)
                self._wire_free_at = start + len(data) * 10 / self.chip_baud
                wait = self._wire_free_at - now - UART_FIFO_BYTES * 10 / self.chip_baud
        if sink is not None:
            sink(data)
        if wait > 0 and stopping is not None:
            if delay_trace.SINK is None:
                stopping.wait(wait)
                return
            start = time.monotonic()
            cut = stopping.wait(wait)
            delay_trace.record(self.trace_name, "uart_tx_pacing", "uart", start, wait, time.monotonic() - start, cut)

    def read(self, stopping: threading.Event, timeout: float | None = None) -> bytes:
        """Everything the host sent so far, waiting for at least one byte (or stop/timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self._rx and not stopping.is_set():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    break
                self._cond.wait(remaining)
            data = bytes(self._rx)
            self._rx.clear()
            return data

    def read_line(self, stopping: threading.Event, timeout: float, interrupt: threading.Event | None = None) -> str | None:
        """One line typed at the console (CR, LF or CRLF ends it), or None on timeout/stop, or
        once *interrupt* is set (and :meth:`wake` called)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not stopping.is_set() and not (interrupt is not None and interrupt.is_set()):
                if self._skip_lf and self._rx[:1] == b"\n":
                    del self._rx[:1]
                    self._skip_lf = False
                ends = [i for i in (self._rx.find(b"\r"), self._rx.find(b"\n")) if i >= 0]
                if ends:
                    end = min(ends)
                    line = bytes(self._rx[:end])
                    self._skip_lf = self._rx[end] == 0x0D
                    del self._rx[: end + 1]
                    return line.decode("utf-8", "replace")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return None
                self._cond.wait(remaining)
            return None


class UartConsole:
    """:class:`rig.vboard.console.BoardConsole` on this UART for one boot of the chip."""

    def __init__(self, uart: VirtualUart, stopping: threading.Event, started: float) -> None:
        self._uart = uart
        self._stopping = stopping
        self._started = started
        self._interrupted = threading.Event()

    @property
    def stopping(self) -> threading.Event:
        return self._stopping

    def write(self, text: str) -> None:
        """ESP-IDF's stdout turns LF into CRLF (CONFIG_NEWLIB_STDOUT_LINE_ENDING_CRLF)."""
        if self._stopping.is_set():
            return
        data = text.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8", "replace")
        self._uart.transmit(data, self._stopping)

    def read_line(self, timeout: float) -> str | None:
        return self._uart.read_line(self._stopping, timeout, self._interrupted)

    def interrupt(self) -> None:
        """The app is ending: a pending :meth:`read_line` returns None now, and every later one at
        once, so the console task sees the restart without waiting out its poll (``CONSOLE_POLL_S``)."""
        self._interrupted.set()
        self._uart.wake()

    def uptime_ms(self) -> int:
        return int((time.monotonic() - self._started) * 1000)

    def log(self, level: LogLevel, tag: str, text: str) -> None:
        self.write(format_log_line(level, self.uptime_ms(), tag, text))


# --------------------------------------------------------------------------- firmware hook

FirmwareRunner = Callable[["VirtualBoard", UartConsole], "ResetReason | None"]
"""Runs the 2nd-stage bootloader and app on a flash boot. Returns the reset that ends the
run (``None`` when it ended because the chip was stopped from outside)."""


def reset_reason_for(code: int) -> ResetReason:
    """The :class:`ResetReason` the ROM prints for reset *code* (unknown codes as a system reset)."""
    return next((r for r in ResetReason if r.code == code), ResetReason.RTC_SW_SYS_RST)


class IdfFirmware:
    """The emulated ESP-IDF bootloader (:mod:`rig.vboard.bootloader`) and app
    (:mod:`rig.vboard.app`); *app_main* is the next layer's firmware (the board's default is
    the RainMaker node, :class:`rig.vboard.node.RainMakerFirmware`)."""

    def __init__(self, app_main: AppMain | None = None) -> None:
        self.app_main = app_main

    def __call__(self, board: VirtualBoard, console: UartConsole) -> ResetReason | None:
        outcome = run_bootloader(board.flash, board.efuse, console)
        board.last_outcome = outcome
        if console.stopping.is_set():
            return None
        if outcome.halted:
            reset = outcome.reset
            return reset_reason_for(reset.code) if reset is not None else ResetReason.RTC_SW_SYS_RST
        ended = run_app(outcome, board.flash, board.efuse, console, app_main=self._app_main_for(console))
        reset = ended.rom_reset
        return None if reset is None else reset_reason_for(reset.code)

    def _app_main_for(self, console: UartConsole) -> AppMain | None:
        """:attr:`app_main`, with the console's read ended as soon as the app is asked to end
        (``esp_restart`` from a timer, a panic in a task): the console task returns the restart
        at once instead of at its next poll, as a chip restarts the moment it is asked to."""
        app_main = self.app_main
        if app_main is None:
            return None

        def main(ctx: AppContext) -> AppExit | None:
            ctx.add_exit_hook(lambda _ended: console.interrupt())
            return app_main(ctx)

        return main


# --------------------------------------------------------------------------- the board


@dataclass(frozen=True)
class BoardPaths:
    """Where a virtual board keeps its state: ``<state_dir>/boards/<name>/``.

    ``efuse_read_protected`` is the eFuse file's sidecar (:func:`rig.vboard.efuse.read_protected_file`):
    the content of read-protected key blocks, which the chip keeps and the file cannot."""

    root: Path
    flash: Path
    efuse: Path
    efuse_read_protected: Path
    lock: Path

    @classmethod
    def of(cls, state_dir: Path, name: str) -> BoardPaths:
        root = board_state_dir(Path(state_dir), name)
        efuse = root / "efuse.bin"
        return cls(root, root / "flash.bin", efuse, read_protected_file(efuse), root / "lock")


class BoardBusyError(RuntimeError):
    """Another process already runs this board (its flash and eFuses are in use)."""


class VirtualBoard:
    """A virtual DevKit named *name* whose flash and eFuses live under *state_dir*.

    ``start()`` powers it on and opens its serial port; ``close()`` powers it off.
    It implements :class:`rig.vboard.rfc2217_server.SerialLine` for the server.
    *address* is the ``127.0.1.N`` its firmware binds every socket to (default: derived
    from the name, or the next free one when another running board holds that); the
    firmware's Wi-Fi sees the lab's ``<state_dir>/radio.json``.
    """

    def __init__(self, name: str, state_dir: Path, firmware: FirmwareRunner | None = None, address: str | None = None) -> None:
        self.name = name
        self.state_dir = Path(state_dir)
        wanted = check_virtual_address(address) if address is not None else default_board_address(name)
        self.paths = BoardPaths.of(self.state_dir, name)
        self.paths.root.mkdir(parents=True, exist_ok=True)
        self._lock_fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise BoardBusyError(f"virtual board {name!r} is already running (lock {self.paths.lock})") from None
        try:  # a derived address another lab's board holds moves on; a chosen one is an error
            self._lease = lease_address(wanted, movable=address is None, holder=f"{name!r} of {self.state_dir}")
        except AddressInUseError:
            os.close(self._lock_fd)
            raise
        self.address = self._lease.address
        """The ``127.0.1.N`` the board leased (:mod:`rig.boards.address_lease`) and publishes."""
        self.mac = board_mac(name)
        known_stubs()  # read esptool's stub images now, not while esptool waits 50 ms for "OHAI"
        self.flash = FlashStorage(self.paths.flash)
        self.efuse = EfuseController.open(self.paths.efuse, self.mac)
        self.uart = VirtualUart()
        self.uart.trace_name = name
        self.gpio9 = GpioInput()
        """GPIO9 as the running firmware reads it: low while the BOOT button is held (DTR, RTS released)."""
        if firmware is None:
            platform = NodePlatform(name, self.address, self.mac, radio_file(self.state_dir), boot_button=self.gpio9)
            firmware = IdfFirmware(app_main=RainMakerFirmware(platform))
        self.firmware: FirmwareRunner = firmware
        self._cond = threading.Condition()
        self._dtr = False
        self._rts = False
        self._en = True
        self._en_rise = time.monotonic()
        self._strap_low = False
        self._shutdown = False
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._chip_main, name=f"vboard {name}", daemon=True)
        self.server: Rfc2217Server | None = None
        self.boots = 0
        self.last_boot: tuple[ResetReason, BootMode] | None = None
        self.download: DownloadMode | None = None
        self.last_outcome: BootOutcome | None = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def url(self) -> str:
        if self.server is None:
            raise RuntimeError("the board is not started")
        return self.server.url

    def start(self, port: int = 0) -> VirtualBoard:
        """Power on, listen on 127.0.0.1:*port* (0 = any free port), publish the URL and the address."""
        self._thread.start()
        self.server = Rfc2217Server(self, port).start()
        address_file(self.state_dir, self.name).write_text(self.address + "\n", encoding="utf-8")
        port_file(self.state_dir, self.name).write_text(self.server.url + "\n", encoding="utf-8")
        log.info("virtual board %s on %s", self.name, self.server.url)
        return self

    def close(self) -> None:
        """Power off: stop serving, stop the chip, flush flash and eFuses, unpublish."""
        pf = port_file(self.state_dir, self.name)
        if self.server is not None and pf.exists() and pf.read_text(encoding="utf-8").strip() == self.server.url:
            pf.unlink()
            address_file(self.state_dir, self.name).unlink(missing_ok=True)
        if self.server is not None:
            self.server.close()
        with self._cond:
            self._shutdown = True
            self._stopping.set()
            self._cond.notify_all()
        self.uart.wake()
        if self._thread.is_alive():
            self._thread.join(SHUTDOWN_TIMEOUT_S)
            if self._thread.is_alive():
                log.error("virtual board %s: the chip thread ignored the stop request", self.name)
        self.flash.close()
        self._lease.release()
        os.close(self._lock_fd)

    def __enter__(self) -> VirtualBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ SerialLine (the bridge)

    def attach(self, sink: Callable[[bytes], None]) -> None:
        self.uart.attach(sink)

    def detach(self) -> None:
        """Port closed: the bridge releases DTR and RTS (HUPCL), output goes nowhere."""
        self.uart.attach(None)
        self._set_lines(dtr=False, rts=False)

    def host_write(self, data: bytes) -> None:
        self.uart.host_write(data)

    def set_dtr(self, asserted: bool) -> None:
        self._set_lines(dtr=asserted)

    def set_rts(self, asserted: bool) -> None:
        self._set_lines(rts=asserted)

    def set_host_baudrate(self, baud: int) -> None:
        self.uart.set_host_baud(baud)

    def purge_host_input(self) -> None:
        self.uart.purge_rx()

    # ------------------------------------------------------------------ reset circuit

    @property
    def lines(self) -> tuple[bool, bool]:
        """(DTR, RTS) as the host last set them (True = asserted)."""
        with self._cond:
            return self._dtr, self._rts

    def _gpio9_low(self) -> bool:
        return self._dtr and not self._rts

    def _set_lines(self, dtr: bool | None = None, rts: bool | None = None) -> None:
        with self._cond:
            if dtr is not None:
                self._dtr = dtr
            if rts is not None:
                self._rts = rts
            en = not (self._rts and not self._dtr)
            now = time.monotonic()
            if self._en and not en:
                self._stopping.set()  # EN low: whatever runs must stop now
                self.uart.chip_reset(powered=False)
            elif en and not self._en:
                self._en_rise = now
                self._strap_low = False
            if en and self._gpio9_low() and now - self._en_rise <= STRAP_SETTLE_S:
                self._strap_low = True  # latched: GPIO9 was low while EN settled
            self._en = en
            self.gpio9.drive(self._gpio9_low())  # under the lock, so watchers see edges in order
            self._cond.notify_all()

    # ------------------------------------------------------------------ the chip

    def _chip_main(self) -> None:
        reason = ResetReason.POWERON
        mode = BootMode.SPI_FAST_FLASH_BOOT
        while True:
            with self._cond:
                while not self._en and not self._shutdown:
                    self._cond.wait()
                if self._shutdown:
                    return
                stopping = threading.Event()
                self._stopping = stopping
            if reason is ResetReason.POWERON:
                settle_from = time.monotonic()
                sampled = self._settle_strap(stopping)
                if delay_trace.SINK is not None:
                    delay_trace.record(self.name, "strap_settle", "board", settle_from, STRAP_SETTLE_S, time.monotonic() - settle_from,
                                       sampled is not BootMode.SPI_FAST_FLASH_BOOT)  # fmt: skip
                if sampled is None:
                    continue
                mode = sampled
            elif reason.resamples_straps:
                with self._cond:
                    mode = BootMode.DOWNLOAD if self._gpio9_low() else BootMode.SPI_FAST_FLASH_BOOT
            self.uart.chip_reset(powered=True)
            try:
                next_reason = self._boot(reason, mode, stopping)
            except Exception:
                # Never let a bug in one boot kill the board: report it as a crash would
                # show up (the chip goes quiet) and wait for the next reset.
                log.exception("virtual board %s: boot failed", self.name)
                stopping.wait()
                next_reason = None
            reason = next_reason or ResetReason.POWERON

    def _settle_strap(self, stopping: threading.Event) -> BootMode | None:
        """The boot mode once EN has settled after its last rise; ``None`` if EN fell again
        (or the board shuts down) first. GPIO9 low at any moment of the settle window
        counts (the strap is latched by :meth:`_set_lines`), so a chip thread that comes
        back late from the previous run still sees what the host did."""
        with self._cond:
            while True:
                if stopping.is_set() or self._shutdown or not self._en:
                    return None
                if self._strap_low:
                    return BootMode.DOWNLOAD
                remaining = self._en_rise + STRAP_SETTLE_S - time.monotonic()
                if remaining <= 0:
                    return BootMode.SPI_FAST_FLASH_BOOT
                self._cond.wait(remaining)

    def _rom_print(self, stopping: threading.Event, *lines: str) -> None:
        self.uart.transmit("".join(f"{line}\r\n" for line in lines).encode(), stopping)

    def _boot(self, reason: ResetReason, mode: BootMode, stopping: threading.Event) -> ResetReason | None:
        started = time.monotonic()
        self.boots += 1
        self.last_boot = (reason, mode)
        lines = [*ROM_BANNER, f"rst:0x{reason.code:x} ({reason.label}),boot:0x{mode.value:x} ({mode.label})"]
        if reason in SAVED_PC:
            lines.append(f"Saved PC:0x{SAVED_PC[reason]:08x}")
        if mode is BootMode.DOWNLOAD:
            if self.efuse.download_mode_disabled:
                self._rom_print(stopping, *lines, "Download boot modes disabled")
                return None if stopping.is_set() else ResetReason.RTC_SW_SYS_RST
            self._rom_print(stopping, *lines, "waiting for download")
            return self._download_mode(stopping)
        self._rom_print(stopping, *lines)
        if not self._rom_load_bootloader(stopping):
            return None
        return self.firmware(self, UartConsole(self.uart, stopping, started))

    def _download_mode(self, stopping: threading.Event) -> ResetReason | None:
        self.uart.start_autobaud()
        decoder = slip.SlipDecoder()
        loader = DownloadMode(
            self.flash,
            self.efuse,
            send=lambda payload: self.uart.transmit(slip.encode(payload)),
            set_baud=self.uart.set_chip_baud,
            baud=self.uart.chip_baud,
        )
        self.download = loader
        while not stopping.is_set():
            deadline = loader.watchdog_deadline
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            data = self.uart.read(stopping, timeout)
            if deadline is not None and time.monotonic() >= deadline:
                return ResetReason.RTCWDT_RTC_RST
            for frame in decoder.feed(data):
                leave = loader.handle_frame(frame)
                if leave is Leave.RAM_CODE:
                    stopping.wait()  # running code the emulator cannot execute: silence
                    return None
                if leave is not None:
                    self.flash.flush()
                    return ResetReason.RTC_SW_SYS_RST
        self.flash.flush()
        return None

    def _rom_load_bootloader(self, stopping: threading.Event) -> bool:
        """The ROM's flash boot: the 2nd-stage image at 0x0, its segments echoed as ``load:``.

        Returns False when there is nothing to run (the ROM then retries until reset).
        """
        header = self.flash.read(0, 24)
        magic = struct.unpack_from("<I", header)[0]
        if header[0] != 0xE9:
            while not stopping.is_set():
                self._rom_print(stopping, f"invalid header: 0x{magic:08x}")
                start = time.monotonic()
                cut = stopping.wait(INVALID_HEADER_RETRY_S)
                if delay_trace.SINK is not None:
                    delay_trace.record(self.name, "rom_invalid_header_retry", "board", start, INVALID_HEADER_RETRY_S,
                                       time.monotonic() - start, cut)  # fmt: skip
            return False
        count, spi_mode, speed_size, entry, wp_pin = struct.unpack_from("<BBBIB", header, 1)
        lines = [
            f"SPIWP:0x{wp_pin:02x}",
            f"mode:{SPI_MODE_NAMES.get(spi_mode, 'DIO')}, clock div:{SPI_CLOCK_DIV.get(speed_size & 0xF, 1)}",
        ]
        pos = 24
        for _ in range(min(count, 16)):
            load_addr, length = struct.unpack("<II", self.flash.read(pos, 8))
            lines.append(f"load:0x{load_addr:08x},len:0x{length:x}")
            pos += 8 + length
            if pos >= self.flash.size:
                break
        lines.append(f"entry 0x{entry:08x}")
        self._rom_print(stopping, *lines)
        return not stopping.is_set()

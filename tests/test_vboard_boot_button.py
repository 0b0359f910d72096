"""The BOOT button: RainMaker's ``app_reset`` on the virtual node, GPIO9 on the virtual board, and
the host's press through DTR/RTS (:mod:`rig.boards.boot_button`) that must never reset the chip.

The button's timing runs on a fake clock and fake timers; the board's circuit is the real one
(a :class:`VirtualBoard` that is never powered on); the node wiring runs a real node boot
without an identity, its press times shortened."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import serial

from rig.boards.boot_button import BootButtonError, boot_button_pressed, hold_boot_button
from rig.firmware.behaviour import BehaviourManifest
from rig.firmware.partition_table import RAINMAKER_4MB
from rig.vboard.app import AppContext, AppExit, ConsoleCommands
from rig.vboard.board import GpioInput, VirtualBoard
from rig.vboard.bootloader import BootOutcome, LogMessage, PartitionEntry
from rig.vboard.efuse import EfuseController
from rig.vboard.flash import FlashStorage
from rig.vboard.node import app_reset
from rig.vboard.node.app_reset import (
    FACTORY_RESET_INDICATION,
    RESET_DELAY_S,
    WIFI_RESET_INDICATION,
    LongPress,
    ResetButton,
    register_reset_button,
)
from rig.vboard.node.node import NodePlatform, RainMakerNode

# --------------------------------------------------------------------------- a fake clock and its timers


@dataclass
class FakeTimer:
    due: float
    name: str
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class FakeTimers:
    """``NodeRuntime.after`` on a clock that moves only when told (:meth:`advance`).

    *honour_cancel* False lets a cancelled timer run anyway, as one whose wait had already
    ended when the cancel came; *halted* makes every request fail, as after a reset."""

    now: float = 0.0
    pending: list[FakeTimer] = field(default_factory=list)
    fired: list[tuple[float, str]] = field(default_factory=list)
    honour_cancel: bool = True
    halted: bool = False

    def after(self, delay_s: float, name: str, callback: Callable[[], None]) -> FakeTimer | None:
        if self.halted:
            return None
        timer = FakeTimer(self.now + delay_s, name, callback)
        self.pending.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        """Move the clock, running every timer that falls due on the way, in time order."""
        end = self.now + seconds
        while True:
            due = sorted((t for t in self.pending if t.due <= end), key=lambda t: t.due)
            if not due:
                break
            timer = due[0]
            self.pending.remove(timer)
            self.now = max(self.now, timer.due)
            if timer.cancelled and self.honour_cancel:
                continue
            self.fired.append((self.now, timer.name))
            timer.callback()
        self.now = end

    def live(self) -> list[FakeTimer]:
        return [t for t in self.pending if not t.cancelled]


@dataclass
class Recorder:
    logged: list[str] = field(default_factory=list)
    triggered: list[tuple[str, float]] = field(default_factory=list)

    def log(self, line: LogMessage, **values: object) -> None:
        self.logged.append(line.format(**values))


def button(timers: FakeTimers, rec: Recorder) -> ResetButton:
    """app_reset_button_register(btn, 3, 10) whose triggers only record when they ran."""
    return ResetButton(
        (
            LongPress(10, FACTORY_RESET_INDICATION, lambda: rec.triggered.append(("factory", timers.now))),
            LongPress(3, WIFI_RESET_INDICATION, lambda: rec.triggered.append(("wifi", timers.now))),
        ),
        schedule=timers.after,
        log=rec.log,
    )


WIFI_LINE = WIFI_RESET_INDICATION.text
FACTORY_LINE = FACTORY_RESET_INDICATION.text


# --------------------------------------------------------------------------- the button's timing


def test_a_tap_does_nothing() -> None:
    timers, rec = FakeTimers(), Recorder()
    btn = button(timers, rec)
    btn.edge(True)
    timers.advance(2.9)
    btn.edge(False)
    timers.advance(30)
    assert rec.logged == [] and rec.triggered == [] and not btn.held
    assert timers.live() == []  # the release cancelled both press-time timers


def test_held_past_3_s_and_released_before_10_s_is_a_wifi_reset_on_release() -> None:
    timers, rec = FakeTimers(), Recorder()
    btn = button(timers, rec)
    btn.edge(True)
    timers.advance(3.0)
    assert rec.logged == [WIFI_LINE]  # indicated while still held …
    timers.advance(5.0)
    assert rec.triggered == []  # … but nothing happens until the release
    btn.edge(False)
    timers.advance(0)
    assert rec.triggered == [("wifi", 8.0)]
    timers.advance(30)
    assert rec.logged == [WIFI_LINE] and rec.triggered == [("wifi", 8.0)]


def test_held_past_10_s_is_a_factory_reset_only() -> None:
    timers, rec = FakeTimers(), Recorder()
    btn = button(timers, rec)
    btn.edge(True)
    timers.advance(9.99)
    assert rec.logged == [WIFI_LINE]
    timers.advance(0.01)
    assert rec.logged == [WIFI_LINE, FACTORY_LINE]
    timers.advance(20)
    assert rec.triggered == []  # held on and on: still nothing
    btn.edge(False)
    timers.advance(0)
    assert rec.triggered == [("factory", 30.0)]  # the longest press time reached, not both
    assert "button_timer" in [name for _, name in timers.fired]


def test_a_timer_left_over_from_an_earlier_press_does_not_count_for_the_next() -> None:
    timers, rec = FakeTimers(honour_cancel=False), Recorder()
    btn = button(timers, rec)
    btn.edge(True)
    timers.advance(1.0)
    btn.edge(False)  # a tap …
    timers.advance(0.5)
    btn.edge(True)  # … then a new press at 1.5 s
    timers.advance(2.0)  # the first press's 3 s timer runs out now (at 3.0 s), its cancel too late
    assert rec.logged == []
    btn.edge(False)  # 2 s into the second press: a tap again
    timers.advance(30)
    assert rec.logged == [] and rec.triggered == []


def test_repeated_levels_are_no_edges() -> None:
    timers, rec = FakeTimers(), Recorder()
    btn = button(timers, rec)
    btn.edge(False)  # a release without a press
    btn.edge(True)
    timers.advance(2.0)
    btn.edge(True)  # the same level again must not restart the hold
    timers.advance(1.0)
    assert rec.logged == [WIFI_LINE]
    btn.edge(False)
    btn.edge(False)
    timers.advance(0)
    assert rec.triggered == [("wifi", 3.0)]


def test_a_halted_node_ignores_the_button() -> None:
    timers, rec = FakeTimers(halted=True), Recorder()
    btn = button(timers, rec)
    btn.edge(True)
    btn.edge(False)
    assert rec.logged == [] and rec.triggered == [] and timers.pending == []


# --------------------------------------------------------------------------- the node's registration


@dataclass
class FakeNode:
    """What :func:`register_reset_button` uses of a :class:`RainMakerNode`."""

    pin: GpioInput | None
    timers: FakeTimers
    rec: Recorder
    hooks: list[Callable[[Any], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.platform = SimpleNamespace(boot_button=self.pin)
        self.runtime = SimpleNamespace(after=self.timers.after, log=self.rec.log)
        self.ctx = SimpleNamespace(add_exit_hook=self.hooks.append)

    def wifi_reset(self) -> None:
        self.rec.triggered.append(("wifi", self.timers.now))

    def factory_reset(self) -> None:
        self.rec.triggered.append(("factory", self.timers.now))


def test_the_node_resets_wifi_after_rainmakers_reset_delay_and_factory_at_once() -> None:
    pin = GpioInput()
    node = FakeNode(pin, FakeTimers(), Recorder())
    assert register_reset_button(node) is not None  # type: ignore[arg-type]
    pin.drive(True)
    node.timers.advance(4.0)
    pin.drive(False)
    node.timers.advance(RESET_DELAY_S - 0.01)
    assert node.rec.triggered == []  # esp_rmaker_wifi_reset(2, 2): the reset timer first
    node.timers.advance(0.01)
    assert node.rec.triggered == [("wifi", 4.0 + RESET_DELAY_S)]
    assert "rmaker_reset_tm" in [name for _, name in node.timers.fired]

    pin.drive(True)
    node.timers.advance(10.0)
    pin.drive(False)
    node.timers.advance(0)
    assert node.rec.triggered[1:] == [("factory", 16.0)]  # node.factory_reset keeps its own 2 s delays


def test_the_watch_ends_with_the_app_and_a_button_held_at_start_counts() -> None:
    pin = GpioInput()
    pin.drive(True)  # held while the app starts
    node = FakeNode(pin, FakeTimers(), Recorder())
    btn = register_reset_button(node)  # type: ignore[arg-type]
    assert btn is not None and btn.held
    (hook,) = node.hooks
    hook(AppExit("sw_reset", "esp_restart()"))
    pin.drive(False)  # after the reset nobody listens any more
    node.timers.advance(30)
    assert node.rec.triggered == [] and btn.held
    assert register_reset_button(FakeNode(None, FakeTimers(), Recorder())) is None  # type: ignore[arg-type]


def partitions() -> tuple[PartitionEntry, ...]:
    return tuple(PartitionEntry(i, p.name, p.type, p.subtype, p.offset, p.size) for i, p in enumerate(RAINMAKER_4MB.partitions))


class QuietConsole:
    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.lines: list[str] = []
        self.seen = threading.Condition()

    def write(self, text: str) -> None:
        with self.seen:
            self.lines.append(text)
            self.seen.notify_all()

    def read_line(self, timeout: float) -> str | None:
        return None

    def uptime_ms(self) -> int:
        return 0

    def log(self, level: str, tag: str, text: str) -> None:
        self.write(f"{level} {tag}: {text}")

    def wait_for(self, text: str, timeout: float = 5.0) -> bool:
        with self.seen:
            return self.seen.wait_for(lambda: any(text in line for line in self.lines), timeout)


def test_a_node_boot_registers_the_boot_button(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The wiring in ``app_main``: the board's GPIO9 reaches the node's reset button, with the
    node's own timers (press times shortened for the test) and its own reset methods."""
    monkeypatch.setattr(app_reset, "WIFI_RESET_BUTTON_TIMEOUT_S", 0.05)
    monkeypatch.setattr(app_reset, "FACTORY_RESET_BUTTON_TIMEOUT_S", 0.2)
    monkeypatch.setattr(app_reset, "RESET_DELAY_S", 0.01)
    console = QuietConsole()
    boot = BootOutcome(partition=None, image=b"", app_desc=None, behaviour=BehaviourManifest(), otadata=None, halted=False,
                       reason="", partitions=partitions())  # fmt: skip
    flash = FlashStorage(tmp_path / "flash.bin")
    efuse = EfuseController.open(tmp_path / "efuse.bin", bytes(6))  # NVS encryption burns its HMAC key here
    ctx = AppContext(boot, flash, efuse, console, ConsoleCommands(console))
    pin = GpioInput()
    node = RainMakerNode(ctx, NodePlatform("unit", "127.0.1.97", bytes(6), tmp_path / "radio.json", boot_button=pin))
    resets: dict[str, threading.Event] = {"wifi": threading.Event(), "factory": threading.Event()}
    node.wifi_reset = resets["wifi"].set  # type: ignore[method-assign]
    node.factory_reset = resets["factory"].set  # type: ignore[method-assign]
    try:
        assert node.app_main() is None  # no fctry: the node stays a console, the button is registered all the same
        pin.drive(True)
        assert console.wait_for(WIFI_LINE)
        pin.drive(False)
        assert resets["wifi"].wait(5.0) and not resets["factory"].is_set()
        pin.drive(True)
        assert console.wait_for(FACTORY_LINE)
        pin.drive(False)
        assert resets["factory"].wait(5.0)
    finally:
        ctx.request_exit(AppExit("stopped", "test over"))
        assert node.runtime.join() == []
        flash.close()


# --------------------------------------------------------------------------- the board's circuit


def test_gpio9_follows_the_auto_reset_circuit(tmp_path: Path) -> None:
    board = VirtualBoard("bb1", tmp_path, firmware=lambda _board, _console: None)
    edges: list[bool] = []
    try:
        unwatch = board.gpio9.watch(edges.append)
        board.set_dtr(True)  # (T, F): BOOT held
        assert board.gpio9.low
        board.set_rts(True)  # (T, T): released, EN still high
        board.set_rts(True)  # no edge
        board.set_dtr(False)  # (F, T): EN low, GPIO9 high — no edge either
        board.set_rts(False)
        unwatch()
        board.set_dtr(True)
        assert edges == [True, False] and board.gpio9.low
    finally:
        board.close()


# --------------------------------------------------------------------------- the host's press


class RecordingPort:
    """pyserial's ``dtr``/``rts`` properties, recording the circuit's state after every change."""

    def __init__(self, dtr: bool, rts: bool) -> None:
        self._dtr, self._rts = dtr, rts
        self.states: list[tuple[bool, bool]] = []

    @property
    def dtr(self) -> bool:
        return self._dtr

    @dtr.setter
    def dtr(self, value: bool) -> None:
        self._dtr = value
        self.states.append((self._dtr, self._rts))

    @property
    def rts(self) -> bool:
        return self._rts

    @rts.setter
    def rts(self, value: bool) -> None:
        self._rts = value
        self.states.append((self._dtr, self._rts))


def en_high(state: tuple[bool, bool]) -> bool:
    dtr, rts = state
    return not (rts and not dtr)


def gpio9_low(state: tuple[bool, bool]) -> bool:
    dtr, rts = state
    return dtr and not rts


@pytest.mark.parametrize("idle", [(False, False), (True, True)], ids=["lines-released", "lines-asserted"])
def test_a_press_changes_one_line_and_never_drops_en(idle: tuple[bool, bool]) -> None:
    port = RecordingPort(*idle)
    held: list[bool] = []
    hold_boot_button(port, 11.0, wait=lambda s: held.append(gpio9_low((port.dtr, port.rts)) and s == 11.0))
    assert held == [True]
    assert port.states == [(True, False), idle]  # pressed, then back where it was
    assert all(en_high(s) for s in [idle, *port.states])


def test_the_button_is_released_when_the_block_fails() -> None:
    port = RecordingPort(False, False)
    with pytest.raises(TimeoutError), boot_button_pressed(port):
        raise TimeoutError("the node never said to let go")
    assert port.states == [(True, False), (False, False)]


@pytest.mark.parametrize("lines", [(True, False), (False, True)], ids=["already-pressed", "in-reset"])
def test_a_press_from_a_non_idle_state_is_refused_untouched(lines: tuple[bool, bool]) -> None:
    port = RecordingPort(*lines)
    with pytest.raises(BootButtonError), boot_button_pressed(port):
        pass
    assert port.states == []
    with pytest.raises(ValueError):
        hold_boot_button(RecordingPort(False, False), -1.0)


@pytest.mark.parametrize("idle", [(False, False), (True, True)], ids=["lines-released", "lines-asserted"])
def test_the_virtual_boards_chip_never_sees_en_low_during_a_press(tmp_path: Path, idle: tuple[bool, bool]) -> None:
    board = VirtualBoard("bb2", tmp_path, firmware=lambda _board, _console: None)
    try:
        board.set_dtr(idle[0])
        board.set_rts(idle[1])
        circuit: list[tuple[bool, bool]] = []
        edges: list[bool] = []
        board.gpio9.watch(edges.append)

        class BoardPort:
            @property
            def dtr(self) -> bool:
                return board.lines[0]

            @dtr.setter
            def dtr(self, value: bool) -> None:
                board.set_dtr(value)
                circuit.append(board.lines)

            @property
            def rts(self) -> bool:
                return board.lines[1]

            @rts.setter
            def rts(self, value: bool) -> None:
                board.set_rts(value)
                circuit.append(board.lines)

        with boot_button_pressed(BoardPort()):
            assert board.gpio9.low
        assert edges == [True, False]
        assert circuit and all(en_high(s) for s in circuit)
    finally:
        board.close()


def test_pyserials_own_port_object_takes_the_press() -> None:
    port = serial.serial_for_url("loop://", do_not_open=False)
    try:
        with boot_button_pressed(port):
            assert (port.dtr, port.rts) == (True, False)
        assert (port.dtr, port.rts) == (True, True)  # pyserial opens with both asserted: RTS is what moved
    finally:
        port.close()

"""The reset button of RainMaker's examples, on the DevKit's BOOT button (GPIO9).

Every esp-rainmaker example's ``app_driver_init`` creates a button on
``CONFIG_EXAMPLE_BOARD_BUTTON_GPIO`` (GPIO9 on an ESP32-C3, active low) and registers it
with ``app_reset_button_register(btn, WIFI_RESET_BUTTON_TIMEOUT, FACTORY_RESET_BUTTON_TIMEOUT)``,
3 s and 10 s (esp-rainmaker ``examples/switch/main/app_driver.c``,
``examples/common/app_reset/app_reset.c``). That helper puts two callbacks on each of the
espressif ``button`` component's long-press events:

* ``BUTTON_LONG_PRESS_START`` at 3 s and at 10 s, while the button is still held: an
  indication only (tag ``app_reset``: first "release now for a Wi-Fi reset, keep pressed for
  a factory reset", then "release to trigger a factory reset");
* ``BUTTON_LONG_PRESS_UP`` for 3 s and for 10 s: on **release**, the component calls the
  callbacks of the longest press time the hold reached (esp-iot-solution
  ``components/button/iot_button.c``), so a release between 3 s and 10 s is a Wi-Fi reset,
  a release after 10 s a factory reset and only that, a release before 3 s nothing (the
  switch example uses such a tap to toggle its power, which the virtual node does not model).

Holding the button never resets anything by itself: the reset starts when it is let go.
The triggers are esp-rainmaker-common's (``src/utils.c``), both with ``RESET_DELAY`` and
``REBOOT_DELAY`` of 2 s:

* ``esp_rmaker_wifi_reset(2, 2)``: ``RMAKER_EVENT_WIFI_RESET`` at once (the example logs
  ``Wi-Fi credentials reset.``; RainMaker's core disconnects MQTT), then after 2 s
  ``esp_wifi_restore`` — the station credentials in ``nvs.net80211`` go, the rest of NVS (user
  mapping, params) stays — and ``esp_rmaker_reboot(2)``. Here: the node's
  :meth:`~rig.vboard.node.node.RainMakerNode.wifi_reset` (the console ``wifi-reset``'s
  ``esp_rmaker_wifi_reset(0, 2)``) run after the 2 s reset delay, so the event's line comes
  with the erase rather than at the release, and MQTT stays up until the reboot.
* ``esp_rmaker_factory_reset(2, 2)``: exactly the console ``reset-to-factory``'s call, so the
  node's :meth:`~rig.vboard.node.node.RainMakerNode.factory_reset` (``Node reset to factory
  defaults.``, the mapping reset, the ``nvs`` erase after 2 s, the reboot 2 s later) — flaws
  and all.

The board's :class:`~rig.vboard.board.GpioInput` reports GPIO9's edges (no polling; the
component's 5 ms scan and debounce have nothing to filter on a virtual line); the hold times
are node timers (:meth:`~rig.vboard.node.runtime.NodeRuntime.after`) started on the press.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from rig.vboard.bootloader import LogMessage

if TYPE_CHECKING:
    from rig.vboard.node.node import RainMakerNode

TAG_APP_RESET = "app_reset"
WIFI_RESET_BUTTON_TIMEOUT_S = 3
FACTORY_RESET_BUTTON_TIMEOUT_S = 10
"""``WIFI_RESET_BUTTON_TIMEOUT`` / ``FACTORY_RESET_BUTTON_TIMEOUT`` of the examples' ``app_driver.c``."""
RESET_DELAY_S = 2
"""``RESET_DELAY`` of ``app_reset.c``: how long after the release the reset itself runs."""

WIFI_RESET_INDICATION = LogMessage("I", TAG_APP_RESET, "Release button now for Wi-Fi reset. Keep pressed for factory reset.")
FACTORY_RESET_INDICATION = LogMessage("I", TAG_APP_RESET, "Release button to trigger factory reset.")
"""What ``app_reset.c`` logs when the hold reaches each press time (the firmware's own lines, matched by suites)."""

BUTTON_TASK = "button_timer"
"""The ``esp_timer`` the button component runs its scan and callbacks on."""


class ButtonPin(Protocol):
    """The GPIO the button is on, as the board gives it (:class:`rig.vboard.board.GpioInput`)."""

    @property
    def low(self) -> bool: ...

    def watch(self, on_edge: Callable[[bool], None]) -> Callable[[], None]: ...


class Cancellable(Protocol):
    def cancel(self) -> None: ...


Schedule = Callable[[float, str, Callable[[], None]], "Cancellable | None"]
"""``NodeRuntime.after``: a one-shot timer (None once the chip is halting)."""


@dataclass(frozen=True)
class LongPress:
    """One press time of the button: reached while held, *indication* is logged; released after
    it (and before the next one), *trigger* runs."""

    hold_s: float
    indication: LogMessage
    trigger: Callable[[], None]


class ResetButton:
    """``app_reset_button_register`` on one active-low button, over ``button``'s long-press events.

    :meth:`edge` is the GPIO interrupt (True = the pin went low = pressed). A press starts one
    timer per :class:`LongPress`; each that runs out while the same press is still held marks
    its press time reached and logs its indication. The release cancels what is left and runs
    the trigger of the longest press time reached, on a timer task of its own (the caller's
    thread is the board's, which must not wait). The indication and the release decide under
    one lock, so what the node said last is what the release does.
    """

    def __init__(self, presses: Sequence[LongPress], schedule: Schedule, log: Callable[[LogMessage], None]):
        self._presses = tuple(sorted(presses, key=lambda p: p.hold_s))
        self._schedule = schedule
        self._log = log
        self._lock = threading.Lock()
        self._press = 0
        """Counts presses: a timer left over from an earlier press finds it changed and does nothing."""
        self._held = False
        self._reached: LongPress | None = None
        self._timers: list[Cancellable] = []

    @property
    def held(self) -> bool:
        with self._lock:
            return self._held

    def edge(self, low: bool) -> None:
        """GPIO9 went low (pressed) or high (released); a repeated level is no edge and is ignored."""
        if low:
            self._pressed()
        else:
            self._released()

    def _pressed(self) -> None:
        with self._lock:
            if self._held:
                return
            self._held = True
            self._press += 1
            self._reached = None
            press = self._press
            for long_press in self._presses:
                timer = self._schedule(long_press.hold_s, BUTTON_TASK, functools.partial(self._hold_reached, press, long_press))
                if timer is not None:
                    self._timers.append(timer)

    def _hold_reached(self, press: int, long_press: LongPress) -> None:
        """``BUTTON_LONG_PRESS_START`` for *long_press*, if *press* is still the one held."""
        with self._lock:
            if press != self._press or not self._held:
                return
            self._reached = long_press
        self._log(long_press.indication)

    def _released(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
            self._press += 1
            timers, self._timers = self._timers, []
            reached, self._reached = self._reached, None
        for timer in timers:
            timer.cancel()
        if reached is not None:
            self._schedule(0.0, BUTTON_TASK, reached.trigger)  # BUTTON_LONG_PRESS_UP


def register_reset_button(node: RainMakerNode) -> ResetButton | None:
    """``app_reset_button_register(btn, 3, 10)`` on the board's BOOT button, for this boot of
    *node* (the watch ends when the app does); None on a board without one."""
    pin = node.platform.boot_button
    if pin is None:
        return None
    runtime = node.runtime

    def wifi_reset() -> None:  # esp_rmaker_wifi_reset(RESET_DELAY, REBOOT_DELAY)
        runtime.after(RESET_DELAY_S, "rmaker_reset_tm", node.wifi_reset)

    button = ResetButton(
        (
            LongPress(WIFI_RESET_BUTTON_TIMEOUT_S, WIFI_RESET_INDICATION, wifi_reset),
            LongPress(FACTORY_RESET_BUTTON_TIMEOUT_S, FACTORY_RESET_INDICATION, node.factory_reset),
        ),
        schedule=runtime.after,
        log=runtime.log,
    )
    unwatch = pin.watch(button.edge)
    node.ctx.add_exit_hook(lambda _ended: unwatch())
    if pin.low:
        button.edge(True)  # held as the app started: the button component sees a press at its first scan
    return button


__all__ = [
    "FACTORY_RESET_BUTTON_TIMEOUT_S",
    "FACTORY_RESET_INDICATION",
    "RESET_DELAY_S",
    "WIFI_RESET_BUTTON_TIMEOUT_S",
    "WIFI_RESET_INDICATION",
    "ButtonPin",
    "LongPress",
    "ResetButton",
    "register_reset_button",
]

"""The DevKit's BOOT button, pressed from the host through the USB-UART bridge's auto-reset circuit.

An ESP32-C3-DevKitC (like every Espressif DevKit with a CP210x/CH34x bridge) drives EN and
GPIO9 — the pin the BOOT button pulls low — from the bridge's DTR and RTS through two
transistors (shared/reference/esptool-protocol.md §8; True = asserted, as pyserial says it):

=====  =====  ==================  ==================
 DTR    RTS    EN                  GPIO9
=====  =====  ==================  ==================
 F      F      high: running       high
 T      T      high: running       high
 F      T      low: held in reset  high
 T      F      high: running       low: BOOT held
=====  =====  ==================  ==================

Sampled at reset, GPIO9 low picks download mode (esptool's reset sequences); while the app
runs it is simply the BOOT button, which RainMaker's examples hold for a Wi-Fi reset (3 s) or
a factory reset (10 s). So DTR asserted with RTS released, held, *is* a finger on the button:
the same host action on a real DevKitC and on a virtual board (whose circuit is emulated).

The order of the line changes matters. pyserial changes DTR and RTS one at a time (over RFC
2217 each is its own acknowledged SET_CONTROL, 50 ms to 100 ms apart), so moving both lines
passes through an intermediate state; the one to avoid is (DTR F, RTS T): EN low resets the
chip, which ends the press and the running app with it. Both idle states are one line away
from the pressed one, so a press changes exactly one line and the release changes it back:

* from (F, F) assert DTR — (T, F) — and release it again;
* from (T, T) (pyserial's state after opening a port) release RTS — (T, F) — and assert it again.

Neither path touches (F, T). The port must be idle when the press starts: (T, F) means the
button is already held, (F, T) that the chip is held in reset — both are refused.

Anything with pyserial's ``dtr``/``rts`` properties works: ``serial.Serial``, the
``rfc2217://`` client (a virtual board, or ``esp_rfc2217_server`` in front of a real one) and
pytest-embedded's ``dut.serial.proc`` (the pyserial object its ``Serial`` owns; with the
``esp`` service, esptool's own port). Boards without the two-transistor circuit — the C3's
built-in USB-Serial/JTAG port decodes DTR/RTS inside the chip — cannot be pressed this way.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol


class BootButtonError(RuntimeError):
    """The port's control lines are not idle, so a press could not be made safely."""


class ControlLines(Protocol):
    """pyserial's modem-control properties (True = asserted)."""

    dtr: bool
    rts: bool


@contextmanager
def boot_button_pressed(port: ControlLines) -> Iterator[None]:
    """Hold the BOOT button for the ``with`` block, released on the way out (also on an error).

    Raises :class:`BootButtonError` when the lines are not idle ((F, F) or (T, T))."""
    dtr, rts = bool(port.dtr), bool(port.rts)
    if dtr and not rts:
        raise BootButtonError("DTR is asserted and RTS released: GPIO9 is already held low (the BOOT button is pressed)")
    if rts and not dtr:
        raise BootButtonError("RTS is asserted and DTR released: the chip is held in reset (EN low), nothing runs to see the button")
    if dtr:  # (T, T) -> (T, F): release RTS; EN stays high because DTR stays asserted
        port.rts = False
        try:
            yield
        finally:
            port.rts = True
    else:  # (F, F) -> (T, F): assert DTR; EN stays high because RTS stays released
        port.dtr = True
        try:
            yield
        finally:
            port.dtr = False


def hold_boot_button(port: ControlLines, seconds: float, *, wait: Callable[[float], object] = time.sleep) -> None:
    """Press the BOOT button, hold it *seconds*, let it go (:func:`boot_button_pressed`).

    The hold is the stimulus itself (RainMaker's app_reset acts on how long the button was
    held), not a wait for the device; to hold until the device says so, use
    :func:`boot_button_pressed` and expect its log line inside the block."""
    if seconds < 0:
        raise ValueError(f"a button is held for a non-negative time, not {seconds} s")
    with boot_button_pressed(port):
        wait(seconds)


__all__ = ["BootButtonError", "ControlLines", "boot_button_pressed", "hold_boot_button"]

"""Read a node's provisioning QR payload from its serial console, after a reset.

A bench engineer provisions a board by scanning the QR code its firmware prints at
boot; ``rig provision`` does the same through the board's port: pulse EN with RTS
(the DevKit auto-reset circuit, esptool's "hard reset"), then read lines until
``QRCODE: {json}`` (idf-console.md §6.2). Real and virtual boards alike.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import serial

QR_LINE = re.compile(rb"QRCODE: (\{[^\r\n]*\})")
CONSOLE_BAUD = 115200
RESET_PULSE_S = 0.1
"""esptool's ``HardReset`` holds EN low for 100 ms."""


@dataclass(frozen=True)
class QrPayload:
    """The provisioning QR payload: service name, PoP, sec2 user name, transport
    (``app_network_print_qr``'s JSON, rainmaker-protocol.md §4.1)."""

    name: str
    pop: str | None
    username: str | None
    transport: str
    raw: dict[str, Any]

    @classmethod
    def parse(cls, text: str | bytes) -> QrPayload:
        try:
            raw = json.loads(text)
            return cls(raw["name"], raw.get("pop"), raw.get("username"), raw.get("transport", ""), raw)
        except (ValueError, KeyError, TypeError) as exc:
            raise ConsoleQrError(f"the QR payload {text!r} is not RainMaker's JSON ({exc})") from exc


class ConsoleQrError(RuntimeError):
    """The console showed no QR payload; the message says what it showed instead."""


def read_qr_payload(port: str, timeout: float = 30.0) -> QrPayload:
    """Reset the board on *port* into its app and return the first QR payload it prints."""
    try:
        conn = serial.serial_for_url(port, baudrate=CONSOLE_BAUD, timeout=0.5, do_not_open=True)
        conn.dtr = False
        conn.rts = False
        conn.open()
    except serial.SerialException as exc:
        raise ConsoleQrError(f"cannot open {port}: {exc}. Fix: is another program (a monitor, pytest) holding the port?") from exc
    try:
        conn.rts = True  # EN low
        time.sleep(RESET_PULSE_S)  # the reset pulse itself, not a synchronisation wait
        conn.rts = False
        seen = bytearray()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen += conn.read(1024)
            match = QR_LINE.search(seen)
            if match:
                return QrPayload.parse(match.group(1))
        tail = bytes(seen[-400:]).decode("utf-8", "replace")
        raise ConsoleQrError(
            f"no QRCODE line within {timeout:.0f} s of a reset on {port}. The console ended with:\n{tail}\n"
            "Fix: an already provisioned node prints no QR (factory-reset it: console `reset-to-factory`), "
            "and a node without identity waits for `rig board claim`"
        )
    finally:
        conn.close()

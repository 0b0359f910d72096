"""The board's UART0 as the emulated bootloader and app see it.

The serial side (RFC 2217 server, reset circuit) implements :class:`BoardConsole`;
the bootloader and app only write text, read command lines and watch ``stopping``
(set when EN is pulled low or the board shuts down), so they run the same whether a
test, esptool or a person is on the other end.

Log lines use ESP-IDF's format (esp-idf ``components/log``): ``I (123) tag: text``,
with the level letter E/W/I/D/V and milliseconds since boot.
"""

from __future__ import annotations

import threading
from typing import Literal, Protocol

LogLevel = Literal["E", "W", "I", "D", "V"]


def format_log_line(level: LogLevel, uptime_ms: int, tag: str, text: str) -> str:
    """One ESP-IDF log line, without colour codes (CONFIG_LOG_COLORS is off in release builds)."""
    return f"{level} ({uptime_ms}) {tag}: {text}\n"


class BoardConsole(Protocol):
    """UART0 of a running board."""

    @property
    def stopping(self) -> threading.Event:
        """Set when the chip is reset or powered off: code must return promptly."""
        ...

    def write(self, text: str) -> None:
        """Send *text* (``\\n`` line ends, as ESP-IDF's stdout sends them)."""
        ...

    def read_line(self, timeout: float) -> str | None:
        """The next line typed at the console (without its line end), or ``None`` on timeout/stop."""
        ...

    def uptime_ms(self) -> int:
        """Milliseconds since the chip came out of reset (the timestamp in log lines)."""
        ...

    def log(self, level: LogLevel, tag: str, text: str) -> None:
        """Write one ESP-IDF log line stamped with the current uptime."""
        ...

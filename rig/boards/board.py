"""A board as the rig sees it, real or virtual: a serial port and Espressif's tools.

``Board`` is the top layer suites talk to (labgrid's "strategy" level): it knows the
board's name, chip, port and firmware set, and does everything through esptool /
espefuse over that port, exactly as a lab engineer at the bench would. Whether the
port leads to silicon on USB, a remote board behind ``esp_rfc2217_server``, or a
virtual board, is invisible from here.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rig.espressif_tools import EspressifToolError, ToolRun, run_tool
from rig.lab import BoardSpec

_MAC_LINE = re.compile(r"^MAC:\s*([0-9a-f]{2}(?::[0-9a-f]{2}){5})", re.MULTILINE | re.IGNORECASE)


class BoardError(RuntimeError):
    """A board could not be used; the message names the board and the fix."""


def usb_serial_number(port: str) -> str | None:
    """The USB serial number of the device behind *port* (a /dev path or a by-id symlink)."""
    from serial.tools import list_ports

    real = os.path.realpath(port)
    for info in list_ports.comports():
        if os.path.realpath(info.device) == real:
            return info.serial_number
    return None


@dataclass
class Board:
    """One leased board: its declaration, its live port, and a log of what the rig did to it."""

    spec: BoardSpec
    port: str | None
    firmware_dir: Path | None = None
    log: logging.Logger = field(default_factory=lambda: logging.getLogger("rig.board"))
    baud: int = 460800
    connect: Callable[[], str] | None = None
    """Brings a not-yet-running board up and returns its port (the farm starts virtual boards lazily)."""
    address: str | None = None
    """Where the host reaches the board on the network for provisioning and local control: a real
    board's SoftAP address (``address:`` in boards.yaml), a virtual board's own ``127.0.1.N``."""
    find_address: Callable[[], str | None] | None = None
    """Where the board is once :attr:`connect` brought it up (a virtual board publishes the address
    it leased, which is not the derived one when another lab's board holds that)."""

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def chip(self) -> str:
        return self.spec.chip

    @property
    def kind(self) -> str:
        return self.spec.kind

    # ------------------------------------------------------------------ tools

    def require_port(self) -> str:
        if self.port is None and self.connect is not None:
            self.port = self.connect()
            if self.find_address is not None:
                self.address = self.find_address() or self.address
        if self.port is None:
            hint = (
                "start it with `rig vboard serve " + self.name + "` or `rig up`"
                if self.kind == "virtual"
                else "set port: in boards.yaml"
            )
            raise BoardError(f"board '{self.name}' has no serial port yet. Fix: {hint}")
        return self.port

    def _tool(self, name: str, *args: str, timeout: float = 120.0) -> ToolRun:
        port = self.require_port()
        argv = ["--chip", self.chip, "--port", port, *args]
        self.log.info("%s %s", name, " ".join(argv))
        try:
            run = run_tool(name, argv, timeout=timeout)
        except EspressifToolError as exc:
            self.log.error("%s", exc)
            raise BoardError(f"board '{self.name}' on {port}: {exc}") from exc
        self.log.debug("%s", run.output)
        return run

    def esptool(self, *args: str, timeout: float = 120.0) -> ToolRun:
        """Run esptool against this board (``--chip`` and ``--port`` are supplied)."""
        return self._tool("esptool", "--baud", str(self.baud), *args, timeout=timeout)

    def espefuse(self, *args: str, timeout: float = 120.0) -> ToolRun:
        """Run espefuse against this board; burns need ``--do-not-confirm`` in *args*."""
        return self._tool("espefuse", *args, timeout=timeout)

    # ------------------------------------------------------------------ identity

    def read_mac(self) -> str:
        out = self.esptool("read-mac").output
        m = _MAC_LINE.search(out)
        if not m:
            raise BoardError(f"board '{self.name}': esptool read-mac printed no MAC line. Output ends: {out[-200:]!r}")
        return m.group(1).lower()

    def verify_identity(self) -> str:
        """Check the board on the port is the one ``boards.yaml`` names (as pytest-embedded checks MACs)."""
        mac = self.read_mac()
        if self.spec.mac and mac != self.spec.mac:
            raise BoardError(
                f"board '{self.name}': the board on {self.port} has MAC {mac}, boards.yaml says {self.spec.mac}. "
                "Fix: a board was swapped or the port moved; correct port: or mac: in boards.yaml"
            )
        return mac

    def verify_usb_serial(self) -> None:
        """Check the USB serial number of a local port against ``usb_serial:`` (udev's view).

        Remote (RFC 2217) ports carry no USB descriptor; for those only the MAC can be checked.
        """
        if not self.spec.usb_serial or not self.port or not self.port.startswith("/dev/"):
            return
        found = usb_serial_number(self.port)
        if found != self.spec.usb_serial:
            raise BoardError(
                f"board '{self.name}': the USB device on {self.port} has serial number {found or '(none)'}, "
                f"boards.yaml says {self.spec.usb_serial}. Fix: a board was swapped or the port moved; "
                "correct port: or usb_serial: in boards.yaml"
            )

    # ------------------------------------------------------------------ flash

    def flash(self, flash_files: Mapping[int, Path], extra_args: tuple[str, ...] = ()) -> None:
        """Write several images at their offsets in one esptool run, verifying each."""
        pairs: list[str] = []
        for offset, path in sorted(flash_files.items()):
            pairs += [hex(offset), str(path)]
        self.esptool("write-flash", *extra_args, *pairs)

    def read_flash(self, offset: int, size: int) -> bytes:
        with tempfile.TemporaryDirectory(prefix="rig-read-") as tmp:
            out = Path(tmp) / "flash.bin"
            self.esptool("read-flash", hex(offset), hex(size), str(out))
            return out.read_bytes()

    def hard_reset(self) -> None:
        """Reset into the application, through the auto-reset circuit (RTS on EN)."""
        self.esptool("--after", "hard-reset", "chip-id")

    # ------------------------------------------------------------------ security state

    def efuse_summary(self) -> dict[str, Any]:
        """``espefuse summary --format json`` as a dict (eFuse name → value record)."""
        with tempfile.TemporaryDirectory(prefix="rig-efuse-") as tmp:
            out = Path(tmp) / "summary.json"
            self.espefuse("summary", "--format", "json", "--file", str(out))
            try:
                return json.loads(out.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise BoardError(f"board '{self.name}': espefuse summary wrote no readable JSON ({exc})") from exc

    def secure_version(self, summary: dict[str, Any] | None = None) -> int:
        """The anti-rollback version burned in eFuse: ``SECURE_VERSION`` (from *summary* or a fresh
        :meth:`efuse_summary`) is a thermometer code, so the count of its set bits (ESP-IDF
        ``esp_efuse_read_secure_version``)."""
        return secure_version_of(summary if summary is not None else self.efuse_summary(), self.name)

    def security_info(self) -> str:
        """``esptool get-security-info`` output (flags, key purposes, crypt count, chip id)."""
        return self.esptool("get-security-info").output


def secure_version_of(summary: dict[str, Any], board: str) -> int:
    """:meth:`Board.secure_version` of an ``espefuse summary --format json`` dict."""
    field = summary.get("SECURE_VERSION")
    value = field.get("value") if isinstance(field, dict) else None
    try:
        bits = int(value, 0) if isinstance(value, str) else int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise BoardError(f"board '{board}': espefuse summary has no readable SECURE_VERSION ({value!r}); "
                         "Fix: check the chip in boards.yaml supports anti-rollback") from None
    return bin(bits).count("1")

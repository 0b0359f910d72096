"""``rfc2217://`` for the rig's tool runs: pyserial's RFC 2217 client, minus its waiting.

Why. pyserial 3.5's client (``serial/rfc2217.py``) spends most of an esptool run asleep:

* a port timeout is the client's business — it bounds how long ``read()`` waits on the
  client's own receive queue and is never sent (RFC 2217 has no option for it) — yet
  every ``timeout``, ``inter_byte_timeout`` or ``exclusive`` assignment goes through
  ``_reconfigure_port``, which re-sends SET_BAUDRATE, SET_DATASIZE, SET_PARITY,
  SET_STOPSIZE and a flow-control SET_CONTROL and waits for their acknowledgements.
  esptool assigns a timeout around most commands (``esptool/loader.py``
  ``ESPLoader.command``), so most commands pay for a full renegotiation;
* every acknowledged request (those settings, each DTR/RTS change of a reset sequence,
  PURGE_DATA) is awaited by polling with a 50 ms sleep (``TelnetSubnegotiation.wait``,
  ``Serial._reconfigure_port``), so each costs at least 50 ms however fast the answer.

What changes. :class:`Serial` negotiates the line as pyserial does — at ``open()``, and
whenever a setting the far end's UART needs (baud rate, data bits, parity, stop bits,
flow control) differs from what this connection last agreed — and skips it when only
a timeout changed. Acknowledgements are awaited on a condition the reader thread
signals when an answer arrives, with pyserial's network timeout and error messages.
Requests, their order and their values on the wire are pyserial's; data, BREAK and the
modem-state handling are untouched. The server side is not involved, so this is as
right for a real board behind Espressif's ``esp_rfc2217_server`` as for a virtual one.
The ``?ign_set_control`` URL option keeps pyserial's fixed pause instead of waiting.

Wire values: RFC 2217 §3 (COM-PORT-OPTION sub-options and SET_CONTROL values), taken
from ``serial.rfc2217``'s constants.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable, Collection
from typing import Any

from serial import SerialException, rfc2217

LineSettings = tuple[int, int, str, float, bool, bool]


class Serial(rfc2217.Serial):
    """pyserial's RFC 2217 client whose timeout changes stay in this process and whose
    acknowledged requests return as soon as the server answers."""

    _negotiated: LineSettings | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._answers = threading.Condition()  # before the base class, which may open the port
        super().__init__(*args, **kwargs)

    def line_settings(self) -> LineSettings:
        """What the server must be told: baud rate, data bits, parity, stop bits, RTS/CTS, XON/XOFF."""
        return (self._baudrate, self._bytesize, self._parity, self._stopbits, self._rtscts, self._xonxoff)

    @property
    def negotiated(self) -> LineSettings | None:
        """The line settings the server acknowledged on this connection (``None`` when closed)."""
        return self._negotiated

    def open(self) -> None:
        self._negotiated = None  # a new connection starts with nothing agreed
        super().open()

    def close(self) -> None:
        super().close()
        self._negotiated = None

    # ------------------------------------------------------------------ acknowledgements

    def _telnet_process_subnegotiation(self, suboption: bytes) -> None:
        """Reader thread: an answer (or notification) arrived; wake whoever awaits one."""
        super()._telnet_process_subnegotiation(suboption)
        with self._answers:
            self._answers.notify_all()

    def _await(self, items: Collection[Any], failure: Callable[[], str]) -> None:
        """Block until every request in *items* is acknowledged (pyserial's ``is_ready``, which
        raises ValueError when the server answered with another value), at most the network timeout."""
        with self._answers:
            if not self._answers.wait_for(lambda: all(item.is_ready() for item in items), self._network_timeout):
                raise SerialException(failure())

    def _request(self, name: str, value: bytes) -> None:
        item = self._rfc2217_options[name]
        item.set(value)
        self._await([item], lambda: f"timeout while waiting for option {item.name!r}")

    def rfc2217_set_control(self, value: bytes) -> None:
        """SET_CONTROL (DTR, RTS, BREAK, flow control), acknowledged by the server."""
        if self._ignore_set_control_answer:
            super().rfc2217_set_control(value)  # a server that answers wrongly or not at all
            return
        self._request("control", value)

    def rfc2217_send_purge(self, value: bytes) -> None:
        """PURGE_DATA, acknowledged by the server."""
        self._request("purge", value)

    # ------------------------------------------------------------------ line settings

    def _reconfigure_port(self) -> None:
        if self._socket is None:
            raise SerialException("Can only operate on open ports")
        if self._write_timeout is not None:
            raise NotImplementedError("write_timeout is currently not supported")  # as pyserial's client
        wanted = self.line_settings()
        if wanted == self._negotiated:
            return  # only a timeout changed: nothing for the server to know
        if not 0 < self._baudrate < 2**32:
            raise ValueError(f"invalid baudrate: {self._baudrate!r}")
        if self._rtscts and self._xonxoff:
            raise ValueError("xonxoff and rtscts together are not supported")
        settings = self._rfc2217_port_settings
        # all four requests first, then one wait for their answers
        settings["baudrate"].set(struct.pack("!I", self._baudrate))
        settings["datasize"].set(struct.pack("!B", self._bytesize))
        settings["parity"].set(struct.pack("!B", rfc2217.RFC2217_PARITY_MAP[self._parity]))
        settings["stopsize"].set(struct.pack("!B", rfc2217.RFC2217_STOPBIT_MAP[self._stopbits]))
        items = list(settings.values())
        self._await(items, lambda: f"Remote does not accept parameter change (RFC2217): {items!r}")
        if self._rtscts:
            self.rfc2217_set_control(rfc2217.SET_CONTROL_USE_HW_FLOW_CONTROL)
        elif self._xonxoff:
            self.rfc2217_set_control(rfc2217.SET_CONTROL_USE_SW_FLOW_CONTROL)
        else:
            self.rfc2217_set_control(rfc2217.SET_CONTROL_USE_NO_FLOW_CONTROL)
        self._negotiated = wanted

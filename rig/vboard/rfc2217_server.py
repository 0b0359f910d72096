"""An RFC 2217 (Telnet COM-PORT-OPTION) server for one virtual serial line.

pyserial's ``rfc2217://`` client — and through it esptool, espefuse and
pytest-embedded — talks to this server exactly as to ``esp_rfc2217_server`` in front
of a USB-UART bridge, except that the control lines are *forwarded*, not replaced by a
canned reset: every SET_CONTROL DTR/RTS reaches the board's auto-reset circuit as it
would reach a CP2102's pins, and SET_BAUDRATE reaches its UART.

Telnet negotiation and the COM-PORT-OPTION state machine come from pyserial's
:class:`serial.rfc2217.PortManager` (the server half of the client we must satisfy);
this module adds the line semantics, a fast path for the data stream (the stock
filter walks every byte through a generator), one client at a time, and a writer
thread per client so that a client that stops reading can stall only itself.

Sources: RFC 2217; pyserial 3.5 ``serial/rfc2217.py`` (what the client sends and waits
for); esptool ``esp_rfc2217_server`` (how a real board is exported);
shared/reference/esptool-protocol.md §10.
"""

from __future__ import annotations

import logging
import selectors
import socket
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

import serial
from serial import rfc2217

log = logging.getLogger(__name__)

LISTEN_HOST = "127.0.0.1"
HANDOVER_TIMEOUT_S = 1.0
"""How long a new client waits for the previous one's disconnect to be processed. pyserial
sleeps 0.3 s after closing "in case of quick reconnects"; this covers it with margin."""
MAX_PENDING_TX = 4 * 1024 * 1024
"""Bytes queued for a client that is not reading before further chip output is dropped,
as a UART with no flow control drops what nobody takes."""
RECV_CHUNK = 65536


class SerialLine(Protocol):
    """The device end of the port: what a USB-UART bridge would be wired to."""

    def attach(self, sink: Callable[[bytes], None]) -> None:
        """A client opened the port; chip output goes to *sink* from now on."""
        ...

    def detach(self) -> None:
        """The client closed the port (or vanished): lines released, output discarded."""
        ...

    def host_write(self, data: bytes) -> None:
        """Bytes the client transmitted."""
        ...

    def set_dtr(self, asserted: bool) -> None: ...

    def set_rts(self, asserted: bool) -> None: ...

    def set_host_baudrate(self, baud: int) -> None:
        """The client's UART rate (SET_BAUDRATE)."""
        ...

    def purge_host_input(self) -> None:
        """Drop bytes from the client not yet taken by the device (PURGE transmit buffer)."""
        ...


class _PortModel:
    """The serial-port object pyserial's PortManager reads and writes, backed by a SerialLine.

    DTR, RTS and the baud rate are forwarded; frame format and flow control are kept
    for the acknowledgements (the virtual UART is 8N1 whatever is asked, as the C3 ROM).
    """

    def __init__(self, line: SerialLine) -> None:
        self._line = line
        self._baudrate = 115200
        self._dtr = False
        self._rts = False
        self.bytesize = serial.EIGHTBITS
        self.parity = serial.PARITY_NONE
        self.stopbits = serial.STOPBITS_ONE
        self.xonxoff = False
        self.rtscts = False
        self.break_condition = False
        # Modem inputs of the bridge: nothing drives CTS/DSR/RI/CD on a DevKit.
        self.cts = self.dsr = self.ri = self.cd = False

    @property
    def baudrate(self) -> int:
        return self._baudrate

    @baudrate.setter
    def baudrate(self, value: int) -> None:
        self._baudrate = int(value)
        self._line.set_host_baudrate(self._baudrate)

    @property
    def dtr(self) -> bool:
        return self._dtr

    @dtr.setter
    def dtr(self, value: bool) -> None:
        self._dtr = bool(value)
        self._line.set_dtr(self._dtr)

    @property
    def rts(self) -> bool:
        return self._rts

    @rts.setter
    def rts(self, value: bool) -> None:
        self._rts = bool(value)
        self._line.set_rts(self._rts)

    def reset_input_buffer(self) -> None:
        """PURGE receive buffer: chip output not yet sent to the client. The session's
        writer forwards output as it comes, so nothing is held back here."""

    def reset_output_buffer(self) -> None:
        self._line.purge_host_input()


class _FastPortManager(rfc2217.PortManager):
    """PortManager with the data stream handled in runs instead of byte by byte."""

    def escape(self, data: bytes) -> Iterator[bytes]:  # type: ignore[override]
        yield data.replace(rfc2217.IAC, rfc2217.IAC_DOUBLED)

    def feed(self, data: bytes, deliver: Callable[[bytes], None]) -> None:
        """Split *data* into payload (passed to *deliver* in order) and Telnet commands
        (processed in place), so a DTR change sent after some bytes acts after them.

        Payload between two commands reaches *deliver* as one run, escaped 0xFF bytes
        (``IAC IAC``) included: random flash data carries one 0xFF in 256 bytes, and a
        delivery per run would wake the chip thread that often.
        """
        payload: list[bytes] = []
        i, n = 0, len(data)
        while i < n:
            if self.mode == rfc2217.M_NORMAL and self.suboption is None:
                j = data.find(rfc2217.IAC, i)
                if j < 0:
                    payload.append(data[i:])
                    break
                if j > i:
                    payload.append(data[i:j])
                if data[j + 1 : j + 2] == rfc2217.IAC:
                    payload.append(rfc2217.IAC)  # IAC IAC: a 0xFF data byte
                    i = j + 2
                    continue
                i = j
            # A command (or a split IAC IAC): what came before it acts first. IAC sequences
            # and subnegotiation bodies are short: the stock state machine, byte by byte.
            if payload:
                deliver(b"".join(payload))
                payload.clear()
            payload.extend(super().filter(data[i : i + 1]))
            i += 1
        if payload:
            deliver(b"".join(payload))


class _Session:
    """One connected client: a reader (socket -> line) and a writer (queue -> socket)."""

    def __init__(self, sock: socket.socket, line: SerialLine, on_end: Callable[[_Session], None]) -> None:
        self.sock = sock
        self.line = line
        self.peer = sock.getpeername()
        self._on_end = on_end
        self._cond = threading.Condition()
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._sending = False
        self._closed = False
        self.dropped_bytes = 0
        self.ended = threading.Event()
        self._writer = threading.Thread(target=self._write_loop, name=f"rfc2217-tx {self.peer}", daemon=True)
        self._reader = threading.Thread(target=self._read_loop, name=f"rfc2217-rx {self.peer}", daemon=True)
        self.manager = _FastPortManager(_PortModel(line), self)

    # PortManager's "connection": raw Telnet bytes, already escaped where needed.
    def write(self, raw: bytes) -> None:
        """Queue *raw* for the client. When nothing is queued or being sent, try a
        non-blocking send first: a reply then leaves without waking the writer thread
        (one scheduling hop less per command, which matters on a loaded host)."""
        with self._cond:
            if self._closed:
                return
            if not self._pending and not self._sending:
                try:
                    sent = self.sock.send(raw, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    sent = 0
                except OSError:
                    sent = len(raw)  # the peer is gone; the reader will notice and close
                raw = raw[sent:]
                if not raw:
                    return
            if self._pending_bytes + len(raw) > MAX_PENDING_TX:
                self.dropped_bytes += len(raw)
                return
            self._pending.append(raw)
            self._pending_bytes += len(raw)
            self._cond.notify()

    def send_data(self, data: bytes) -> None:
        """Chip output for this client (IAC doubled)."""
        self.write(data.replace(rfc2217.IAC, rfc2217.IAC_DOUBLED))

    def start(self) -> None:
        self.line.attach(self.send_data)
        self._writer.start()
        self._reader.start()

    def _read_loop(self) -> None:
        try:
            while True:
                try:
                    data = self.sock.recv(RECV_CHUNK)
                except OSError:
                    break
                if not data:
                    break
                try:
                    self.manager.feed(data, self.line.host_write)
                except (ValueError, KeyError, IndexError, struct.error) as exc:
                    # A malformed subnegotiation (PortManager unpacks values unchecked):
                    # the client broke the protocol, so its session ends; the board does not.
                    log.warning("client %s sent a malformed Telnet/RFC 2217 command (%s); closing", self.peer, exc)
                    break
        finally:
            self.close()

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                self._sending = False
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                chunks = list(self._pending)
                self._pending.clear()
                self._pending_bytes = 0
                self._sending = True
            try:
                self.sock.sendall(b"".join(chunks))
            except OSError:
                self.close()
                return

    def close(self) -> None:
        """End the session (idempotent): release the lines first, then the socket."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self.line.detach()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass  # the peer is already gone
        self.sock.close()
        self.ended.set()
        self._on_end(self)


class Rfc2217Server:
    """Serves one :class:`SerialLine` on ``rfc2217://127.0.0.1:<port>``, one client at a time.

    A second client is accepted only after the first has gone (its disconnect being
    processed within :data:`HANDOVER_TIMEOUT_S`); otherwise it is closed at once, as a
    serial port that is already open refuses a second opener.
    """

    def __init__(self, line: SerialLine, port: int = 0, host: str = LISTEN_HOST) -> None:
        self.line = line
        self._listener = socket.create_server((host, port), backlog=4)
        self.host, self.port = self._listener.getsockname()[:2]
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._lock = threading.Lock()
        self._session: _Session | None = None
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._accept_loop, name=f"rfc2217-accept :{self.port}", daemon=True)
        self.sessions_served = 0

    @property
    def url(self) -> str:
        return f"rfc2217://{self.host}:{self.port}"

    def start(self) -> Rfc2217Server:
        self._thread.start()
        return self

    @property
    def session(self) -> _Session | None:
        with self._lock:
            return self._session

    def _session_ended(self, session: _Session) -> None:
        with self._lock:
            if self._session is session:
                self._session = None
        log.info("client %s disconnected", session.peer)

    def _accept_loop(self) -> None:
        self._selector.register(self._listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in self._selector.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        sock, _addr = self._listener.accept()
                    except OSError:
                        continue
                    self._admit(sock)
        finally:
            self._selector.close()

    def _admit(self, sock: socket.socket) -> None:
        current = self.session
        if current is not None and not current.ended.wait(HANDOVER_TIMEOUT_S):
            log.warning("refusing a second client: the port is open by %s", current.peer)
            sock.close()
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            session = _Session(sock, self.line, self._session_ended)
        except OSError:
            sock.close()  # the client left before we got to it
            return
        with self._lock:
            self._session = session
            self.sessions_served += 1
        log.info("client %s connected", session.peer)
        session.start()

    def close(self) -> None:
        """Stop accepting, drop the client, free the port."""
        self._stopping.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # already closed
        if self._thread.is_alive():
            self._thread.join()
        session = self.session
        if session is not None:
            session.close()
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> Rfc2217Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

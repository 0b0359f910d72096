"""The console transport, client side: protocomm requests typed on a board's serial console.

For real boards without radio access. A device that runs ESP-IDF's ``protocomm_console``
(esp-idf ``components/protocomm/src/transports/protocomm_console.c``; the provisioning managers'
console scheme, ``components/wifi_provisioning/src/scheme_console.c``) has one console command
per protocomm endpoint. The conversation, byte for byte:

* **Request**: ``<endpoint> <session id> <payload hex>`` and CR (``\\r``, what ends a line on an
  ESP-IDF console; a LF would become the first character of the *next* line). The session id is
  decimal, the payload lower-case hex, two digits per byte; a payload is never empty (the device
  needs three arguments). Example: ``proto-ver 0 2d2d2d`` asks the version endpoint with ``---``.
* **Answer**: ``\\r\\n<answer hex>\\r\\n`` (the chip's newlib turns each LF into CRLF, so a real
  board sends ``\\r\\r\\n``): one line of nothing but hex. The device may echo the request first
  and prints its prompt (``>> ``) and log lines around it; those are never all-hex.
* **Failure**: protocomm prints nothing. RainMaker's console task, when it dispatches the
  command, then prints ``rmaker_console: Console command failed with error: <esp_err_t>``
  (``-1`` ESP_FAIL: a wrong PoP, a message that does not decrypt; ``259``
  ESP_ERR_INVALID_STATE: no session; ``258`` ESP_ERR_INVALID_ARG); protocomm_console's own
  task prints nothing at all, and the request times out.
* **Session**: the device opens a new protocomm session whenever the id differs from the one
  its console last used, and keeps one live session for all transports. Espressif's esp_prov
  console transport (``tools/esp_prov/transport/transport_console.py``) always sends 0;
  :class:`ConsoleTransport` draws a random id per instance (:meth:`ConsoleTransport.forget_session`
  draws a new one), as the HTTP transport's cookie does, so two clients never continue each
  other's session.
* **Line length**: ESP-IDF's console tasks read into a 256-byte buffer (RainMaker's
  ``rmaker_console.c`` keeps 254 characters before the CR, protocomm_console's task 255); a
  longer line is cut and the device answers something else or nothing. The transport refuses
  to send a line longer than ``max_line`` (default :data:`DEFAULT_MAX_LINE`). Security 1 fits;
  security 2 cannot cross an unmodified ESP-IDF console (``S2SessionCmd0`` holds the 384-byte
  SRP6a public key: about 800 hex digits) — pass ``max_line`` for firmware with a longer line.

**The link** (:class:`ConsoleLink`) is the narrowest interface both a pyserial port and a
pytest-embedded ``dut`` serve: ``write_line(line)`` types a line and its CR;
``read_line_matching(pattern, timeout)`` consumes console output until a complete line (line
end and CRs stripped) that ``pattern.fullmatch``-es, returning the match, or returns None at the
timeout. :class:`SerialLink` implements it on anything with pyserial's ``read`` / ``write`` /
``in_waiting`` / ``timeout`` (``serial.serial_for_url("rfc2217://…")``, the rig's fast RFC 2217
client included) and keeps a transcript of everything read; :class:`DutLink` on anything with
``write(bytes)`` and a pexpect-style ``expect(pattern, timeout=…)`` that consumes up to the match
and raises pexpect's ``TIMEOUT`` (pytest-embedded's ``dut``). :class:`ConsoleTransport` takes
either object as is, or any :class:`ConsoleLink`.

Errors are :class:`ConsoleTransportError`, a :class:`rig.prov.transport_http.TransportError`
(``status`` None) naming the endpoint, the device's ``esp_err_t`` when it printed one, and a fix.
"""

from __future__ import annotations

import re
import secrets
import time
from typing import Any, Protocol, runtime_checkable

from rig.protocomm.errors import EspErr, ProtocommError
from rig.prov.console_qr import CONSOLE_BAUD
from rig.prov.transport_http import TransportError

LINE_END = b"\r"
"""What ends a line on an ESP-IDF console (``rmaker_console.c``, ``protocomm_console.c``)."""
DEFAULT_MAX_LINE = 254
"""The longest request line an ESP-IDF RainMaker console keeps whole (characters before the CR)."""
DEFAULT_TIMEOUT = 10.0
READ_SLICE_S = 0.05
"""How long one serial ``read`` may block while a deadline is pending."""
SESSION_ID_MAX = 2**31 - 1
"""``atoi`` on the device: a larger id does not survive the trip."""
RESPONSE_LINE = re.compile(r"(?P<hex>[0-9a-fA-F]+)|.*?Console command failed with error: (?P<err>-?\d+)")
"""An answer line (all hex) or the console's failure report, whichever comes first."""

_FIXES = {
    int(EspErr.ESP_FAIL): "the device refused the request: a wrong PoP in the prov-session handshake, or a message that "
                          "does not decrypt with this session (out of step, tampered) — redo the handshake with the PoP from the QR line",
    int(EspErr.ESP_ERR_INVALID_STATE): "no secure session for this session id on the device (another transport or client "
                                       "replaced it, or the handshake never finished): run the prov-session handshake again",
    int(EspErr.ESP_ERR_INVALID_ARG): "the device could not use the request (too few arguments, bytes the endpoint cannot "
                                     "decode, or a line the console cut short): check the message and the line length",
    int(EspErr.ESP_ERR_NOT_FOUND): "the device has no such endpoint; compare with the endpoints proto-ver announces",
}


def _esp_err_name(code: int) -> str:
    try:
        return EspErr(code).name
    except ValueError:
        return f"0x{code & 0xFFFFFFFF:x}" if code < 0 else f"0x{code:x}"


class ConsoleTransportError(TransportError):
    """A console request failed. ``status`` is always None (no HTTP); ``esp_err`` is the error the
    device's console printed, when it printed one; ``line`` the offending line, for a malformed answer."""

    def __init__(self, endpoint: str, problem: str, fix: str, *, target: str = "console",
                 esp_err: int | None = None, line: str | None = None) -> None:  # fmt: skip
        self.endpoint = endpoint
        self.status = None
        self.problem = problem
        self.fix = fix
        self.esp_err = esp_err
        self.line = line
        # TransportError's own message is HTTP's ("POST /…"); this one names the console and the endpoint.
        ProtocommError.__init__(self, f"{target} {endpoint}: {problem}. Fix: {fix}")


# ------------------------------------------------------------------------------------------ links


@runtime_checkable
class ConsoleLink(Protocol):
    """A board's console as the transport needs it: type a line, wait for a line."""

    def write_line(self, line: str) -> None:
        """Send *line* and the CR that ends it."""
        ...

    def read_line_matching(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        """Consume output up to and including the first complete line that *pattern* fullmatches
        (CRs and the LF stripped); that match, or None when none came within *timeout* seconds."""
        ...


class SerialPort(Protocol):
    """What :class:`SerialLink` uses of a pyserial port."""

    timeout: float | None

    @property
    def in_waiting(self) -> int: ...

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes, /) -> int | None: ...


class ExpectingDut(Protocol):
    """What :class:`DutLink` uses of a pytest-embedded ``dut``."""

    def write(self, data: bytes, /) -> Any: ...

    def expect(self, pattern: re.Pattern[bytes], **kwargs: Any) -> Any: ...


def console_line(raw: bytes) -> str:
    """One console line's text: decoded, the CRs around it stripped (a chip ends lines with
    ``\r\r\n`` when its newlib adds a CR to the CRLF the code printed)."""
    return bytes(raw).decode("utf-8", "replace").strip("\r")


class SerialLink:
    """:class:`ConsoleLink` on a pyserial port; :attr:`transcript` holds every byte read from it.

    Before each line it writes, whatever the board printed and nobody read yet is skipped
    (kept in the transcript): it cannot be the answer to a request not sent yet.
    """

    def __init__(self, port: SerialPort) -> None:
        self.port = port
        self.transcript = bytearray()
        self._pending = bytearray()
        if port.timeout is None or port.timeout > READ_SLICE_S:
            port.timeout = READ_SLICE_S  # one assignment; a read then never outlives a deadline by much

    def write_line(self, line: str) -> None:
        self._skip_unread()
        self.port.write(line.encode("utf-8") + LINE_END)

    def read_line_matching(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        deadline = time.monotonic() + timeout
        while True:
            end = self._pending.find(b"\n")
            while end >= 0:
                raw = bytes(self._pending[:end])
                del self._pending[: end + 1]
                match = pattern.fullmatch(console_line(raw))
                if match is not None:
                    return match
                end = self._pending.find(b"\n")
            if time.monotonic() >= deadline:
                return None
            self._read_some()

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float, start: int = 0) -> re.Match[str]:
        """The first match of *pattern* in the transcript (decoded) from byte *start* on, reading
        more as needed; :class:`TimeoutError` naming the pattern when none came within *timeout*."""
        regex = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(bytes(self.transcript[start:]).decode("utf-8", "replace"))
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                tail = bytes(self.transcript[-1500:]).decode("utf-8", "replace")
                raise TimeoutError(f"no {regex.pattern!r} on the console within {timeout} s; it ended with:\n{tail}")
            self._read_some()

    def text(self, start: int = 0) -> str:
        """The transcript from byte *start* on, decoded."""
        return bytes(self.transcript[start:]).decode("utf-8", "replace")

    def _read_some(self) -> None:
        data = self.port.read(max(1, self.port.in_waiting))
        self.transcript += data
        self._pending += data

    def _skip_unread(self) -> None:
        waiting = self.port.in_waiting
        if waiting:
            self.transcript += self.port.read(waiting)
        self._pending.clear()


class DutLink:
    """:class:`ConsoleLink` on a pytest-embedded ``dut`` (or anything with its ``write`` / ``expect``).

    Lines go out as bytes, so the dut adds no LF of its own (``SerialDut.write`` appends ``\\n`` to
    a ``str`` only). Waiting is one ``expect`` of *pattern* anchored as a whole line; the dut's
    buffer is consumed up to that line's end, as pexpect does.
    """

    GROUP = "rig_console_line"

    def __init__(self, dut: ExpectingDut) -> None:
        self.dut = dut

    def write_line(self, line: str) -> None:
        self.dut.write(line.encode("utf-8") + LINE_END)

    def read_line_matching(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str] | None:
        body = pattern.pattern.encode("utf-8")
        regex = re.compile(rb"^\r*(?P<" + self.GROUP.encode() + rb">" + body + rb")\r*\n", re.MULTILINE)
        try:
            found = self.dut.expect(regex, timeout=timeout)
        except Exception as exc:
            if _is_timeout(exc):
                return None
            raise
        line = found.group(self.GROUP)
        return pattern.fullmatch(line.decode("utf-8", "replace") if isinstance(line, bytes) else line)


def _is_timeout(exc: BaseException) -> bool:
    """pexpect's ``TIMEOUT`` (pytest-embedded re-raises it with its own message) or a builtin timeout."""
    return isinstance(exc, TimeoutError) or any(cls.__name__ == "TIMEOUT" for cls in type(exc).__mro__)


def as_link(console: object) -> ConsoleLink:
    """*console* as a :class:`ConsoleLink`: a link as is, a dut (``expect``) through :class:`DutLink`,
    a serial port (``read`` / ``write`` / ``in_waiting``) through :class:`SerialLink`."""
    if isinstance(console, ConsoleLink):
        return console
    if callable(getattr(console, "expect", None)) and callable(getattr(console, "write", None)):
        return DutLink(console)  # type: ignore[arg-type]
    if all(hasattr(console, name) for name in ("read", "write", "in_waiting")):
        return SerialLink(console)  # type: ignore[arg-type]
    raise TypeError(
        f"{type(console).__name__} is no console: pass a pyserial port (serial.serial_for_url(...)), a pytest-embedded "
        "dut (write + expect), or a ConsoleLink (write_line + read_line_matching)"
    )


# ------------------------------------------------------------------------------------------ transport


def request_line(endpoint: str, session_id: int, data: bytes) -> str:
    """The console line (without its CR) that sends *data* to *endpoint* in session *session_id*."""
    return f"{endpoint} {session_id} {bytes(data).hex()}"


def parse_response(endpoint: str, line: str) -> bytes:
    """The bytes of an answer line; :class:`ConsoleTransportError` for a line that is not whole bytes of hex."""
    if not line or len(line) % 2 or not all(c in "0123456789abcdefABCDEF" for c in line):
        shown = line if len(line) <= 80 else f"{line[:40]}…{line[-20:]} ({len(line)} characters)"
        why = f"{len(line)} hex digits are not whole bytes" if line and len(line) % 2 else "it is not hex"
        raise ConsoleTransportError(endpoint, f"malformed response line {shown!r}: {why}",
                                    "the answer was cut or mixed with other output on the port: keep other programs "
                                    "(monitors, log readers) off the console and retry", line=line)  # fmt: skip
    return bytes.fromhex(line)


class ConsoleTransport:
    """Protocomm over a board's serial console (:class:`rig.prov.session.Transport`).

    *console* is a pyserial port, a pytest-embedded ``dut`` or a :class:`ConsoleLink`
    (:func:`as_link`). *session_id* pins the id (esp_prov uses 0); by default a random one.
    *max_line* is the longest request line sent (None: no limit, for firmware whose console
    keeps long lines).
    """

    def __init__(self, console: object, *, timeout: float = DEFAULT_TIMEOUT, session_id: int | None = None,
                 max_line: int | None = DEFAULT_MAX_LINE, target: str = "console") -> None:  # fmt: skip
        self.link = as_link(console)
        self.timeout = timeout
        self.max_line = max_line
        self.target = target
        if session_id is not None and not 0 <= session_id <= SESSION_ID_MAX:
            raise ValueError(f"session id {session_id} is outside 0..{SESSION_ID_MAX} (the device reads it with atoi)")
        self.session_id = _new_session_id() if session_id is None else session_id
        self._owned: Any = None

    @classmethod
    def open(cls, url: str, *, baudrate: int = CONSOLE_BAUD, **kwargs: Any) -> ConsoleTransport:
        """Open the board's port *url* (a device path or ``rfc2217://host:port``, through the rig's
        RFC 2217 client) with DTR and RTS released — opening never resets the board — and return a
        transport owning it (:meth:`close` closes it)."""
        import serial

        from rig.boards import serial_url_handlers

        serial_url_handlers.install()
        try:
            port = serial.serial_for_url(url, do_not_open=True, baudrate=baudrate, timeout=READ_SLICE_S)
            port.dtr = False
            port.rts = False
            port.open()
        except serial.SerialException as exc:
            raise ConsoleTransportError("(open)", f"cannot open {url}: {exc}",
                                        "is another program (a monitor, esptool, pytest-embedded) holding the port?",
                                        target=f"console {url}") from exc  # fmt: skip
        kwargs.setdefault("target", f"console {url}")
        transport = cls(port, **kwargs)
        transport._owned = port
        return transport

    def send(self, endpoint: str, data: bytes) -> bytes:
        """Type the request for *endpoint* and return the answer's bytes, else :class:`ConsoleTransportError`."""
        if not endpoint or any(c.isspace() or c in '"\\' for c in endpoint):
            raise ConsoleTransportError(endpoint, "an endpoint name must be one console word (no spaces, quotes or backslashes)",
                                        "use the protocomm endpoint name, e.g. 'prov-session'", target=self.target)  # fmt: skip
        if not data:
            raise ConsoleTransportError(endpoint, "an empty payload cannot be sent: the device needs three arguments "
                                        "(endpoint, session id, hex) and refuses two with ESP_ERR_INVALID_ARG",
                                        "send at least one byte (esp_prov sends '---' to proto-ver)", target=self.target)  # fmt: skip
        line = request_line(endpoint, self.session_id, data)
        if self.max_line is not None and len(line) > self.max_line:
            raise ConsoleTransportError(
                endpoint, f"the request line is {len(line)} characters ({len(data)} bytes of payload); an ESP-IDF console "
                f"keeps {self.max_line} and would cut it",
                "provision this board over SoftAP or BLE (security 2's handshake alone is ~800 hex digits), or, for firmware "
                "whose console reads longer lines, pass max_line", target=self.target,
            )  # fmt: skip
        self.link.write_line(line)
        found = self.link.read_line_matching(RESPONSE_LINE, self.timeout)
        if found is None:
            raise ConsoleTransportError(
                endpoint, f"no answer within {self.timeout} s",
                "is the board in provisioning with the console transport on (ESP-IDF protocomm_console; RainMaker images do "
                "not start it by default)? A request the device refused prints nothing on protocomm_console's own task: "
                "check the PoP and the session", target=self.target,
            )  # fmt: skip
        if found.group("err") is not None:
            code = int(found.group("err"))
            raise ConsoleTransportError(endpoint, f"the device's console reported error {code} ({_esp_err_name(code)}) "
                                        "and no answer", _FIXES.get(code, "see the device's log lines around the request"),
                                        target=self.target, esp_err=code)  # fmt: skip
        return parse_response(endpoint, found.group("hex"))

    def forget_session(self) -> None:
        """Use a new session id: the next request opens a new protocomm session on the device."""
        self.session_id = _new_session_id()

    def close(self) -> None:
        """Close the port if :meth:`open` opened it (a port or dut handed in stays open)."""
        if self._owned is not None:
            self._owned.close()
            self._owned = None

    def __enter__(self) -> ConsoleTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _new_session_id() -> int:
    return secrets.randbelow(SESSION_ID_MAX) + 1


__all__ = [
    "DEFAULT_MAX_LINE",
    "RESPONSE_LINE",
    "ConsoleLink",
    "ConsoleTransport",
    "ConsoleTransportError",
    "DutLink",
    "SerialLink",
    "TransportError",
    "as_link",
    "console_line",
    "parse_response",
    "request_line",
]

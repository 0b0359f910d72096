"""The provisioning protocomm over the serial console: ESP-IDF's ``protocomm_console`` transport.

What ESP-IDF does (esp-idf ``components/protocomm/src/transports/protocomm_console.c``,
``include/transports/protocomm_console.h``; the provisioning managers' console scheme,
``components/wifi_provisioning/src/scheme_console.c`` and idf-extra-components
``network_provisioning/src/scheme_console.c``):

* every protocomm endpoint becomes a console command of the same name
  (``protocomm_console_add_endpoint`` → ``esp_console_cmd_register``, help text ``""``); one
  handler serves them all;
* a request is one console line ``<endpoint> <session id> <payload hex>``, ended by CR. The
  session id goes through ``atoi`` and is used as a ``uint32_t``; the payload is read two hex
  digits at a time (``hex2bin``: ``sscanf("%2hhx")``, an odd last digit is ignored);
* fewer than three arguments: the handler returns ``ESP_ERR_INVALID_ARG`` without touching
  protocomm;
* a session id other than the one the console last used opens a new protocomm session with it
  (``new_transport_session``); the console starts with none (``PROTOCOMM_NO_SESSION_ID``), and
  the security scheme keeps one live session, shared with every other transport of the instance;
* the request goes to ``protocomm_req_handle``. On success the answer is printed as
  ``printf("\\r\\n")``, ``%02x`` per byte (lower case), ``printf("\\r\\n")`` — one line of hex
  between two line ends, nothing else — and the handler returns ``ESP_OK``. On failure nothing
  is printed and the handler returns protocomm's ``esp_err_t``;
* ``protocomm_console_stop`` logs ``I protocomm_console: Stopping console...``; the console task
  then logs ``I protocomm_console: Console stopped``.

Esp_prov's console transport (esp-idf ``tools/esp_prov/transport/transport_console.py``) is the
other end done by hand: it prints ``Client->Device msg : <endpoint> <session id> <hex>`` (session
id 0), the user types that text after the device's prompt, and pastes the hex line the device
printed back at ``Enter device->client msg :``. :mod:`rig.prov.transport_console` does the same
without the user.

On the virtual node the endpoint commands are registered on the node's one console — RainMaker's
``console_task`` (esp-rainmaker-common ``components/rmaker_console/src/rmaker_console.c``,
:mod:`rig.vboard.app`) — as ``esp_console_cmd_register`` would put them in the command list that
console dispatches. That console reads lines into a 256-byte buffer and keeps at most
:data:`DEFAULT_LINE_MAX` characters of a line (protocomm_console's own task: ``LINE_BUF_SIZE``
256, at most 255); a longer line is cut there, the rest spills into the next "line" (a hex run
that names no command). The handler applies that cut, so an over-long request reaches protocomm
truncated, as on the chip — which is why security 2 (whose ``S2SessionCmd0`` carries the 384-byte
SRP6a public key, about 800 hex digits) cannot cross an ESP-IDF console. A handler's non-zero
return makes that console print ``rmaker_console: Console command failed with error: <n>``
(protocomm_console's own task prints nothing). After the transport stopped, the commands stay
registered (``protocomm_console_remove_endpoint`` deletes nothing) but answer nothing, like an
unknown command. Two differences on the wire stay with the virtual UART (:mod:`rig.vboard.board`):
it does not echo what is typed, and it sends the answer's line ends as CRLF where a chip's newlib
turns ``printf("\r\n")`` into CR CR LF; clients must accept both, as ESP-IDF's own do.

Off by default: RainMaker's ``app_network`` offers only the SoftAP and BLE schemes
(``CONFIG_APP_NETWORK_PROV_TRANSPORT``, esp-rainmaker ``examples/common/rmaker_app_network/
Kconfig.projbuild``), so a RainMaker image runs the console transport only when its behaviour
manifest says so: ``extra.prov_console: true`` (beside SoftAP, on the same protocomm instance),
and ``extra.prov_console_line_max`` for a firmware whose console keeps longer lines.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

from rig.protocomm.endpoints import Protocomm
from rig.protocomm.errors import EndpointFailure, EspErr, ProtocommError
from rig.protocomm.httpd import NO_SESSION_ID  # PROTOCOMM_NO_SESSION_ID: the console's session before its first request
from rig.vboard.app import CommandResult, ConsoleCommand, ConsoleCommands, split_argv
from rig.vboard.node.messages import NodeMsg
from rig.vboard.node.runtime import NodeRuntime

log = logging.getLogger(__name__)

ENABLE_KEY = "prov_console"
"""Behaviour-manifest ``extra`` key: ``true`` runs protocomm_console beside the SoftAP transport."""
LINE_MAX_KEY = "prov_console_line_max"
"""Behaviour-manifest ``extra`` key: the longest console line (characters before CR) the image keeps."""
DEFAULT_LINE_MAX = 254
"""rmaker_console.c stops reading at 255 bytes and drops the last one as the CR: 254 characters."""
LINE_MAX_RANGE = (16, 65536)
INT_MIN, INT_MAX = -(2**31), 2**31 - 1
"""``atoi`` is newlib's ``(int) strtol``: it clamps to the 32-bit ``long`` range."""
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def console_enabled(extra: Mapping[str, object]) -> bool:
    """Whether an image's manifest turns the console transport on (only a JSON ``true`` does)."""
    return extra.get(ENABLE_KEY) is True


def console_line_max(extra: Mapping[str, object]) -> int:
    """The image's console line limit: ``extra.prov_console_line_max`` when it is a sane int, else
    :data:`DEFAULT_LINE_MAX`."""
    value = extra.get(LINE_MAX_KEY)
    if isinstance(value, int) and not isinstance(value, bool) and LINE_MAX_RANGE[0] <= value <= LINE_MAX_RANGE[1]:
        return value
    return DEFAULT_LINE_MAX


def parse_session_id(text: str) -> int:
    """``(uint32_t) atoi(text)``: optional blanks and sign, then decimal digits up to the first
    other character (none: 0), clamped to ``int``, then taken modulo 2**32 (``-1`` is
    ``PROTOCOMM_NO_SESSION_ID``)."""
    rest = text.lstrip(" \t\n\v\f\r")
    sign = 1
    if rest[:1] in ("+", "-"):
        sign = -1 if rest[0] == "-" else 1
        rest = rest[1:]
    digits = ""
    for char in rest:
        if not "0" <= char <= "9":
            break
        digits += char
    value = sign * int(digits) if digits else 0
    return min(max(value, INT_MIN), INT_MAX) & 0xFFFFFFFF


def hex_to_bytes(text: str) -> bytes:
    """``hex2bin``: ``len // 2`` bytes, each from ``sscanf(pair, "%2hhx")``. A pair that starts
    with a hex digit gives the value of its leading hex digits; a pair that does not leaves the
    byte as ``malloc`` returned it — 0 here, as the emulator has no heap garbage to show."""
    out = bytearray()
    for i in range(0, len(text) - 1, 2):
        high, low = text[i], text[i + 1]
        if high not in _HEX_DIGITS:
            out.append(0)
        else:
            out.append(int(high + low, 16) if low in _HEX_DIGITS else int(high, 16))
    return bytes(out)


def response_text(answer: bytes) -> str:
    """What ``common_cmd_handler`` prints for a successful request: CRLF, the hex, CRLF."""
    return "\r\n" + answer.hex() + "\r\n"


class ProtocommConsole:
    """``protocomm_console_start`` for one protocomm instance on the node's console.

    :meth:`start` registers one command per endpoint in *endpoints*; :meth:`stop` ends the
    transport (the commands then answer nothing). Thread-safe: requests arrive on the console
    task, stop on whichever task ends provisioning.
    """

    def __init__(self, runtime: NodeRuntime, commands: ConsoleCommands, protocomm: Protocomm,
                 endpoints: Sequence[str], line_max: int = DEFAULT_LINE_MAX) -> None:  # fmt: skip
        self.runtime = runtime
        self.commands = commands
        self.protocomm = protocomm
        self.endpoints = tuple(endpoints)
        self.line_max = line_max
        self.session_id = NO_SESSION_ID
        """The session the console last used (protocomm_console.c's static ``session_id``)."""
        self._lock = threading.Lock()
        self._active = False

    @property
    def active(self) -> bool:
        with self._lock:
            return self._active

    def start(self) -> None:
        """Register the endpoints as console commands (help ``""``: ``help`` lists them, blank)."""
        with self._lock:
            self._active = True
            self.session_id = NO_SESSION_ID
        for name in self.endpoints:
            self.commands.register(ConsoleCommand(name, "", self._handle))

    def stop(self) -> None:
        """``protocomm_console_stop``, then the console task's exit line."""
        with self._lock:
            if not self._active:
                return
            self._active = False
        self.runtime.log(NodeMsg.PROTOCOMM_CONSOLE_STOPPING)
        self.runtime.log(NodeMsg.PROTOCOMM_CONSOLE_STOPPED)

    def _handle(self, argv: list[str]) -> CommandResult:
        """``common_cmd_handler``."""
        if not self.active:
            return int(EspErr.ESP_OK)  # the transport is gone: as an unknown command, nothing at all
        line = " ".join(argv)
        if len(line) > self.line_max:  # the console kept only the start of the line
            argv = split_argv(line[: self.line_max])
        if len(argv) < 3:
            return int(EspErr.ESP_ERR_INVALID_ARG)
        session_id = parse_session_id(argv[1])
        payload = hex_to_bytes(argv[2])
        with self._lock:
            if session_id != self.session_id:
                self.protocomm.open_session(session_id)
                self.session_id = session_id
        try:
            answer = self.protocomm.handle(argv[0], session_id, payload)
        except EndpointFailure as failure:
            log.info("protocomm console: %s", failure)
            return int(failure.esp_err)
        except ProtocommError as exc:  # a decoding error the scheme did not turn into a refusal
            log.info("protocomm console: endpoint %r failed: %s", argv[0], exc)
            return int(EspErr.ESP_FAIL)
        self.runtime.write(response_text(answer))
        return int(EspErr.ESP_OK)


__all__ = [
    "DEFAULT_LINE_MAX",
    "ENABLE_KEY",
    "LINE_MAX_KEY",
    "NO_SESSION_ID",
    "ProtocommConsole",
    "console_enabled",
    "console_line_max",
    "hex_to_bytes",
    "parse_session_id",
    "response_text",
]

"""What the first bytes of a stream direction look like: a TLS record, HTTP, or MQTT CONNECT/CONNACK.

A look at the framing only (record header, request line, fixed header and protocol name), as
Wireshark's heuristics do: enough to tell an encrypted channel from a cleartext one in a flow
report, not a parser.
"""

from __future__ import annotations

import re

TLS_CONTENT_TYPES = {20: "ChangeCipherSpec", 21: "Alert", 22: "Handshake", 23: "ApplicationData"}
TLS_HANDSHAKES = {1: "ClientHello", 2: "ServerHello"}
TLS_MAX_RECORD = (1 << 14) + 2048
TLS_VERSIONS = {0: "SSL 3.0", 1: "TLS 1.0", 2: "TLS 1.1", 3: "TLS 1.2", 4: "TLS 1.3"}
HTTP_REQUEST = re.compile(rb"^(GET|POST|PUT|HEAD|DELETE|OPTIONS|PATCH|CONNECT|TRACE) [!-~]")
HTTP_RESPONSE = re.compile(rb"^HTTP/[0-9]\.[0-9] [0-9]{3}")
MQTT_NAMES = {b"\x00\x04MQTT": "MQTT", b"\x00\x06MQIsdp": "MQIsdp"}
MQTT_LEVELS = {3: "3.1", 4: "3.1.1", 5: "5.0"}

TLS, HTTP, MQTT, UNKNOWN, EMPTY = "TLS", "HTTP", "MQTT", "unknown", "no payload"


def tls_record(data: bytes) -> str | None:
    """``TLS 1.2 record: Handshake (ClientHello)`` for bytes that start a TLS record, else None."""
    if len(data) < 5 or data[0] not in TLS_CONTENT_TYPES or data[1] != 3 or data[2] not in TLS_VERSIONS:
        return None
    length = int.from_bytes(data[3:5], "big")
    if not 0 < length <= TLS_MAX_RECORD:
        return None
    what = TLS_CONTENT_TYPES[data[0]]
    if data[0] == 22 and len(data) > 5 and data[5] in TLS_HANDSHAKES:
        what += f" ({TLS_HANDSHAKES[data[5]]})"
    return f"{TLS_VERSIONS[data[2]]} record: {what}"


def http_message(data: bytes) -> str | None:
    if HTTP_REQUEST.match(data):
        return "HTTP request " + data.split(b" ", 1)[0].decode()
    if HTTP_RESPONSE.match(data):
        return "HTTP response " + data[9:12].decode()
    return None


def _remaining_length(data: bytes) -> tuple[int, int] | None:
    """MQTT's variable-length "remaining length": (value, bytes it took), from data[1:]."""
    value, shift = 0, 0
    for i in range(1, min(len(data), 5)):
        value |= (data[i] & 0x7F) << shift
        if not data[i] & 0x80:
            return value, i
        shift += 7
    return None


def mqtt_packet(data: bytes) -> str | None:
    """``MQTT CONNECT (3.1.1)`` or ``MQTT CONNACK`` for bytes that start one, else None."""
    if not data:
        return None
    header = _remaining_length(data)
    if header is None:
        return None
    length, used = header
    if data[0] == 0x10 and length >= 10:
        start = used + 1
        for name, proto in MQTT_NAMES.items():
            if data[start:start + len(name)] == name and len(data) > start + len(name):
                level = data[start + len(name)]
                return f"MQTT CONNECT ({proto} {MQTT_LEVELS.get(level, level)})"
    if data[0] == 0x20 and 2 <= length <= 64 and len(data) >= used + 3 and data[used + 1] in (0, 1):
        return "MQTT CONNACK"
    return None


def looks_like(data: bytes, from_start: bool = True) -> tuple[str, str]:
    """``(kind, detail)``: kind is ``TLS``, ``HTTP``, ``MQTT``, ``unknown`` or ``no payload``.

    *from_start* False means the capture missed the direction's first bytes: nothing is claimed."""
    if not data:
        return EMPTY, ""
    if not from_start:
        return UNKNOWN, "the capture does not hold the direction's first bytes"
    for kind, check in ((TLS, tls_record), (HTTP, http_message), (MQTT, mqtt_packet)):
        detail = check(data)
        if detail:
            return kind, detail
    return UNKNOWN, ""

"""Plaintext canaries: which secrets crossed the wire readable, in which flow, at which offset.

A secret an app sends is rarely only its raw bytes: it may be hex, base64 inside a larger
base64 blob, a JSON string with escapes, or a form field. :func:`encodings` lists the forms
searched — UTF-8 (the raw bytes), UTF-16-LE, hex (both cases), base64 and base64url at each of
the three alignments a secret can have inside a longer encoded message, JSON-escaped, and
URL-encoded (``%XX`` and ``+`` for space) — without duplicates: a plain alphanumeric secret's
JSON and URL forms are its raw bytes, reported as ``utf-8``.

:func:`cleartext_hits` searches every reassembled TCP direction (so a secret split across two
segments is found), every UDP datagram, every other IP payload and every non-IP frame.
A hit names the canary by its label, never by its value.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote, quote_plus

from rig.capture.pcapfile import PcapFile
from rig.capture.streams import Chunk, FlowKey, Traffic, analyze

MIN_CANARY_LEN = 4
"""A shorter secret matches ordinary bytes by chance (the same floor as the evidence redaction)."""
MIN_DERIVED_LEN = 6
"""Derived patterns shorter than this (base64 of a short secret at an awkward alignment) are not searched."""

Canaries = Mapping[str, str | bytes] | Iterable[str | bytes]


@dataclass(frozen=True)
class Encoding:
    name: str
    pattern: bytes


def _base64_inner(raw: bytes, shift: int, alphabet: str) -> bytes:
    """The base64 characters that depend on *raw* alone when it starts *shift* bytes into a 3-byte group."""
    encode = base64.urlsafe_b64encode if alphabet == "url" else base64.b64encode
    text = encode(b"\0" * shift + raw)
    first = -(-8 * shift // 6)
    last = 8 * (shift + len(raw)) // 6
    return text[first:last]


def encodings(secret: str | bytes) -> list[Encoding]:
    """The forms of *secret* :func:`cleartext_hits` looks for, most literal first, duplicates removed."""
    raw = secret.encode() if isinstance(secret, str) else bytes(secret)
    text = raw.decode("utf-8", errors="surrogateescape")
    forms: list[tuple[str, bytes]] = [("utf-8", raw)]
    try:
        forms.append(("utf-16-le", text.encode("utf-16-le")))
    except UnicodeEncodeError:
        pass
    forms += [("hex", raw.hex().encode()), ("hex", raw.hex().upper().encode())]
    for alphabet, name in (("std", "base64"), ("url", "base64url")):
        forms += [(name, _base64_inner(raw, shift, alphabet)) for shift in range(3)]
    try:
        forms += [
            ("JSON-escaped", json.dumps(text)[1:-1].encode()),
            ("JSON-escaped", json.dumps(text, ensure_ascii=False)[1:-1].encode()),
            ("JSON-escaped", json.dumps(text)[1:-1].replace("/", "\\/").encode()),
        ]
    except UnicodeEncodeError:
        pass
    forms += [
        ("URL-encoded", quote(raw, safe="").encode()),
        ("URL-encoded", quote_plus(raw, safe="").encode()),
        ("URL-encoded", quote(raw, safe="/").encode()),
    ]
    result: list[Encoding] = []
    seen: set[bytes] = set()
    for name, pattern in forms:
        if pattern in seen or (pattern != raw and len(pattern) < MIN_DERIVED_LEN):
            continue
        seen.add(pattern)
        result.append(Encoding(name, pattern))
    return result


@dataclass(frozen=True)
class CanaryHit:
    """One place a canary was found readable."""

    canary: str
    """The canary's label (``Wi-Fi passphrase``), never its value."""
    encoding: str
    flow: FlowKey | None
    """``None`` for a frame without IP."""
    direction: str
    """``client→server``, ``server→client``, or for a non-IP frame ``frame``."""
    offset: int
    """Byte offset of the hit in that direction's stream (TCP), in the direction's datagram bytes (UDP), or in the frame."""
    length: int
    frames: tuple[int, ...]
    """Wireshark frame numbers (1-based) holding the hit's bytes; two when it is split across segments."""
    spans: tuple[tuple[int, int, int], ...]
    """``(record index, start, end)``: the hit's bytes in each frame (for :func:`rig.capture.redact.redact_pcap`)."""
    note: str = ""

    def describe(self) -> str:
        where = f"{self.flow} {self.direction}" if self.flow is not None else "a non-IP frame"
        frames = ", ".join(str(f) for f in self.frames)
        extra = f", {self.note}" if self.note else ""
        return (f"{self.canary} in clear ({self.encoding}) in {where} at offset {self.offset}"
                f" (frame{'s' if len(self.frames) > 1 else ''} {frames}{extra})")


def labelled(canaries: Canaries) -> list[tuple[str, bytes]]:
    """``(label, raw bytes)`` of each canary (bare ones labelled ``canary N``); a missing or too short one is a ValueError."""
    items = list(canaries.items()) if isinstance(canaries, Mapping) else [(f"canary {i + 1}", c) for i, c in enumerate(canaries)]
    result = []
    for label, value in items:
        if value is None:
            raise ValueError(f"canary {label!r} has no value. Fix: leave out a secret the device does not have")
        raw = value.encode() if isinstance(value, str) else bytes(value)
        if len(raw) < MIN_CANARY_LEN:
            raise ValueError(f"canary {label!r} is {len(raw)} bytes: too short to tell from chance matches (at least {MIN_CANARY_LEN})")
        result.append((label, raw))
    return result


Patterns = list[tuple[str, Encoding]]


def patterns(canaries: Canaries) -> Patterns:
    """Every ``(label, encoding)`` searched for *canaries*."""
    return [(label, enc) for label, raw in labelled(canaries) for enc in encodings(raw)]


def search(data: bytes | bytearray, compiled: Patterns) -> list[tuple[str, str, int, int]]:
    """``(label, encoding, offset, length)`` of every pattern (:func:`patterns`) in *data*, in offset order."""
    found = []
    for label, enc in compiled:
        start = data.find(enc.pattern)
        while start >= 0:
            found.append((label, enc.name, start, len(enc.pattern)))
            start = data.find(enc.pattern, start + 1)
    return sorted(found, key=lambda f: (f[2], f[0]))


def cleartext_hits(pcap: str | Path | PcapFile | Traffic, canaries: Canaries) -> list[CanaryHit]:
    """Every place a canary (``{label: secret}``, or bare secrets labelled ``canary N``) appears readable in *pcap*.

    An unreadable capture raises :class:`~rig.capture.errors.PcapError` (never an empty answer)."""
    compiled = patterns(canaries)  # a bad canary is refused before the capture is read
    traffic = pcap if isinstance(pcap, Traffic) else analyze(pcap)
    hits: list[CanaryHit] = []
    for flow in traffic.flows:
        for direction, half in flow.directions():
            for chunk in half.chunks:
                hits += _chunk_hits(chunk, compiled, flow.key, direction)
    for chunk in traffic.non_ip:
        hits += _chunk_hits(chunk, compiled, None, "frame")
    return hits


def _chunk_hits(chunk: Chunk, compiled: Patterns, flow: FlowKey | None, direction: str) -> list[CanaryHit]:
    hits = []
    for label, encoding, start, length in search(chunk.data, compiled):
        spans = tuple(chunk.frame_spans(start, start + length))
        frames = tuple(sorted({frame + 1 for frame, _, _ in spans}))
        hits.append(CanaryHit(label, encoding, flow, direction, chunk.offset + start, length, frames, spans, chunk.note))
    return hits


def describe_hits(hits: list[CanaryHit], limit: int = 8) -> str:
    """One line per hit (at most *limit*, then how many more)."""
    lines = [h.describe() for h in hits[:limit]]
    if len(hits) > limit:
        lines.append(f"… and {len(hits) - limit} more")
    return "\n".join(lines)

"""A capture's conversations: TCP streams reassembled per direction, UDP datagrams, other payloads.

A TCP direction's bytes are placed by sequence number relative to its SYN (or, with no SYN
in the capture, to the lowest sequence number seen — wrap-around included), so segments
captured out of order land where they belong, and a retransmission adds nothing. Where the
stream has a hole (a segment the capture missed), the data on either side becomes two
:class:`Chunk`\\ s — searched apart, never glued across the hole. A retransmission whose bytes
*differ* from what was first sent is kept as a chunk of its own: both versions crossed the wire.

Every chunk knows which frame each of its bytes came from (:class:`Piece`), so a finding in a
stream points at frame numbers and can be blanked out of the pcap it was found in.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from rig.capture.packets import TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN, Packet, decode
from rig.capture.pcapfile import PcapFile, read_pcap

SEQ_MOD = 1 << 32
WELL_KNOWN_PORT_LIMIT = 1024
TO_SERVER, TO_CLIENT = "client→server", "server→client"


@dataclass(frozen=True)
class Endpoint:
    address: str
    port: int = 0

    def __str__(self) -> str:
        host = f"[{self.address}]" if ":" in self.address else self.address
        return f"{host}:{self.port}" if self.port else host


@dataclass(frozen=True)
class FlowKey:
    """A conversation: protocol, the side that opened it (``client``), the side it talked to."""

    proto: str
    client: Endpoint
    server: Endpoint

    def __str__(self) -> str:
        return f"{self.proto} {self.client} → {self.server}"

    def involves(self, address: str, port: int | None = None) -> bool:
        return any(e.address == address and (port is None or e.port == port) for e in (self.client, self.server))


@dataclass(frozen=True)
class Piece:
    """*length* bytes at *offset* in a chunk came from frame *frame*, at *frame_offset* in its bytes."""

    offset: int
    frame: int
    frame_offset: int
    length: int


@dataclass
class Chunk:
    """Contiguous payload bytes of one direction, starting at stream offset *offset*."""

    offset: int
    data: bytearray = field(default_factory=bytearray)
    pieces: list[Piece] = field(default_factory=list)
    note: str = ""
    """Why this chunk stands apart: ``""`` for stream data, else e.g. ``differing retransmission``."""

    def add(self, data: bytes, frame: int, frame_offset: int) -> None:
        if data:
            self.pieces.append(Piece(len(self.data), frame, frame_offset, len(data)))
            self.data += data

    @property
    def end(self) -> int:
        return self.offset + len(self.data)

    def frame_spans(self, start: int, end: int) -> list[tuple[int, int, int]]:
        """The frames bytes ``[start, end)`` of this chunk came from: ``(frame, first byte, end byte)`` in each frame."""
        spans = []
        for p in self.pieces:
            lo, hi = max(start, p.offset), min(end, p.offset + p.length)
            if lo < hi:
                spans.append((p.frame, p.frame_offset + lo - p.offset, p.frame_offset + hi - p.offset))
        return spans


@dataclass
class HalfStream:
    """One direction of a flow."""

    chunks: list[Chunk] = field(default_factory=list)
    packets: int = 0
    retransmitted: int = 0
    """Payload bytes sent again (already placed in the stream)."""
    gaps: int = 0
    """Holes: stream bytes the capture does not hold."""
    truncated: int = 0
    """Packets the capture cut short (snap length)."""

    @property
    def bytes(self) -> int:
        return sum(len(c.data) for c in self.chunks if not c.note)

    @property
    def first_bytes(self) -> bytes:
        """The first payload bytes of the direction (what tells TLS from HTTP from MQTT)."""
        stream = [c for c in self.chunks if not c.note]
        return bytes(stream[0].data[:64]) if stream else b""


@dataclass
class Flow:
    key: FlowKey
    index: int
    """How many earlier flows had the same key (a client port reused after the connection closed)."""
    first_frame: int
    first_seen: float
    last_seen: float
    to_server: HalfStream = field(default_factory=HalfStream)
    to_client: HalfStream = field(default_factory=HalfStream)

    @property
    def packets(self) -> int:
        return self.to_server.packets + self.to_client.packets

    def directions(self) -> Iterator[tuple[str, HalfStream]]:
        yield TO_SERVER, self.to_server
        yield TO_CLIENT, self.to_client

    def __str__(self) -> str:
        return str(self.key) + (f" (#{self.index + 1})" if self.index else "")


@dataclass(frozen=True)
class Traffic:
    """Everything a capture file holds, as conversations."""

    path: Path
    frames: int
    linktypes: tuple[int, ...]
    flows: tuple[Flow, ...]
    non_ip: tuple[Chunk, ...]
    """Frames with no IP packet (ARP, 802.11 management, EAPOL …), each a chunk: searched as raw bytes."""

    def flows_with(self, address: str, port: int | None = None) -> list[Flow]:
        return [f for f in self.flows if f.key.involves(address, port)]


def analyze(pcap: str | Path | PcapFile) -> Traffic:
    """The flows of *pcap* (a path or a file already read). An unreadable file raises :class:`PcapError`."""
    capture = pcap if isinstance(pcap, PcapFile) else read_pcap(pcap)
    builder = _Builder()
    non_ip: list[Chunk] = []
    for record in capture.records:
        packet = decode(record)
        if packet is None:
            chunk = Chunk(0, note=f"non-IP frame {record.index + 1}")
            chunk.add(record.data, record.index, 0)
            non_ip.append(chunk)
        else:
            builder.add(packet)
    return Traffic(capture.path, len(capture.records), capture.linktypes, tuple(builder.finish()), tuple(non_ip))


# --------------------------------------------------------------------------- building flows


@dataclass
class _Segment:
    frame: int
    seq: int
    """The sequence number of the payload's first byte."""
    payload: bytes
    payload_offset: int


@dataclass
class _TcpSide:
    isn: int | None = None
    segments: list[_Segment] = field(default_factory=list)
    closed: bool = False


@dataclass
class _Open:
    flow: Flow
    client: tuple[str, int]
    sides: dict[bool, _TcpSide] = field(default_factory=lambda: {True: _TcpSide(), False: _TcpSide()})
    udp: dict[bool, list[Packet]] = field(default_factory=lambda: {True: [], False: []})


class _Builder:
    def __init__(self) -> None:
        self.open: dict[tuple[str, frozenset[tuple[str, int]]], _Open] = {}
        self.done: list[_Open] = []
        self.seen: dict[FlowKey, int] = {}

    def add(self, p: Packet) -> None:
        ident = (p.proto, frozenset({(p.src, p.sport), (p.dst, p.dport)}))
        current = self.open.get(ident)
        syn_only = p.proto == "tcp" and p.has(TCP_SYN) and not p.has(TCP_ACK)
        if current is not None and syn_only and self._new_connection(current, p):
            self.done.append(self.open.pop(ident))
            current = None
        if current is None:
            current = self.open[ident] = self._start(p, syn_only)
        flow = current.flow
        flow.last_seen = max(flow.last_seen, p.timestamp)
        to_server = (p.src, p.sport) == current.client
        half = flow.to_server if to_server else flow.to_client
        half.packets += 1
        half.truncated += p.truncated
        if p.proto == "tcp":
            side = current.sides[to_server]
            if p.has(TCP_SYN):
                side.isn = p.seq
            if p.has(TCP_FIN) or p.has(TCP_RST):
                side.closed = True
            if p.payload:
                start = (p.seq + 1) % SEQ_MOD if p.has(TCP_SYN) else p.seq
                side.segments.append(_Segment(p.frame, start, p.payload, p.payload_offset))
        else:
            current.udp[to_server].append(p)

    @staticmethod
    def _new_connection(current: _Open, p: Packet) -> bool:
        """A SYN on a key already seen opens a new connection once the old one closed, or with a new ISN."""
        side = current.sides[(p.src, p.sport) == current.client]
        return (p.src, p.sport) != current.client or (side.isn is not None and side.isn != p.seq) or side.closed

    def _start(self, p: Packet, syn_only: bool) -> _Open:
        a, b = (p.src, p.sport), (p.dst, p.dport)
        if not syn_only and p.proto in ("tcp", "udp") and (p.sport < WELL_KNOWN_PORT_LIMIT <= p.dport):
            a, b = b, a  # mid-connection: the well-known port is the server's
        key = FlowKey(p.proto, Endpoint(*a), Endpoint(*b))
        index = self.seen.get(key, 0)
        self.seen[key] = index + 1
        return _Open(Flow(key, index, p.frame, p.timestamp, p.timestamp), a)

    def finish(self) -> list[Flow]:
        flows = []
        for item in [*self.done, *self.open.values()]:
            for to_server in (True, False):
                half = item.flow.to_server if to_server else item.flow.to_client
                if item.flow.key.proto == "tcp":
                    _reassemble(item.sides[to_server], half)
                else:
                    _datagrams(item.udp[to_server], half)
            flows.append(item.flow)
        return sorted(flows, key=lambda f: f.first_frame)


def _signed(delta: int) -> int:
    delta %= SEQ_MOD
    return delta - SEQ_MOD if delta >= SEQ_MOD // 2 else delta


def _reassemble(side: _TcpSide, half: HalfStream) -> None:
    """Place each segment at its stream offset; overlaps keep the first bytes placed, differing ones stand apart."""
    if not side.segments:
        return
    if side.isn is not None:
        base = (side.isn + 1) % SEQ_MOD
    else:
        first = side.segments[0].seq
        base = (first + min(_signed(s.seq - first) for s in side.segments)) % SEQ_MOD
    placed = sorted(((_signed(s.seq - base), s) for s in side.segments), key=lambda item: (item[0], item[1].frame))
    current: Chunk | None = None
    for offset, seg in placed:
        data, frame_offset = seg.payload, seg.payload_offset
        if offset < 0:  # bytes before the SYN's sequence: keep them apart rather than lose them
            half.chunks.append(_apart(offset, seg, "data before the connection's first byte"))
            continue
        if current is None or offset > current.end:
            if current is not None:
                half.gaps += 1
            current = Chunk(offset)
            half.chunks.append(current)
        overlap = min(current.end - offset, len(data))
        if overlap > 0:
            if current.data[offset - current.offset:offset - current.offset + overlap] != data[:overlap]:
                half.chunks.append(_apart(offset, seg, "differing retransmission"))
            half.retransmitted += overlap
        current.add(data[overlap:], seg.frame, frame_offset + overlap)


def _apart(offset: int, seg: _Segment, note: str) -> Chunk:
    chunk = Chunk(offset, note=note)
    chunk.add(seg.payload, seg.frame, seg.payload_offset)
    return chunk


def _datagrams(packets: list[Packet], half: HalfStream) -> None:
    """Each datagram (or other IP payload) is a chunk of its own; offsets count the direction's bytes so far."""
    offset = 0
    for p in packets:
        if p.payload:
            chunk = Chunk(offset)
            chunk.add(p.payload, p.frame, p.payload_offset)
            half.chunks.append(chunk)
            offset += len(p.payload)

"""One captured frame → the IP conversation it belongs to and its payload, with exact byte offsets.

scapy finds where the IP packet starts behind whatever link layer the capture has (Ethernet
— what Linux gives for ``lo`` —, Linux cooked SLL/SLL2, BSD loopback, 802.11 with radiotap …);
the IPv4/IPv6, TCP and UDP headers are then read here from the frame's own bytes, so a payload
is exactly what the headers' lengths say (no Ethernet padding, no rebuilt fields) and its
offset in the frame is known — a hit can be pointed at, and blanked in, the frame it came from.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from scapy.config import conf
from scapy.layers import inet, inet6, l2  # noqa: F401  (registers the link layers with conf.l2types)
from scapy.layers.inet import IP
from scapy.layers.inet6 import IPv6

from rig.capture.pcapfile import Record

RAW_IP_LINKTYPES = {12, 14, 101, 228, 229}
"""DLT_RAW and LINKTYPE_IPV4/IPV6: the frame is the IP packet."""
IPV6_EXTENSION_HEADERS = {0, 43, 60}  # hop-by-hop, routing, destination options
IPV6_FRAGMENT, IPV6_AH = 44, 51
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6"}
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10


@dataclass(frozen=True)
class Packet:
    """What an IP frame carried: addresses, ports (0 outside TCP/UDP), TCP sequencing, payload."""

    frame: int
    """The record's index in the capture (Wireshark's frame number is ``frame + 1``)."""
    timestamp: float
    proto: str
    """``tcp``, ``udp``, ``icmp``, ``icmpv6``, ``ip-N``, or ``ip-fragment`` (not reassembled; searched as is)."""
    src: str
    dst: str
    sport: int
    dport: int
    payload: bytes
    payload_offset: int
    """Where :attr:`payload` starts in the frame's bytes."""
    seq: int = 0
    flags: int = 0
    truncated: bool = False
    """The capture cut the packet short (snap length): the payload is what was kept."""

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)


def ip_offset(record: Record) -> int | None:
    """Where the IP (v4 or v6) packet starts in *record*'s frame; ``None`` for a frame without one (ARP …)."""
    if record.linktype in RAW_IP_LINKTYPES:
        return 0 if record.data and record.data[0] >> 4 in (4, 6) else None
    layer_class = conf.l2types.num2layer.get(record.linktype)
    if layer_class is None:
        return None
    try:
        frame = layer_class(record.data)
    except Exception:  # scapy keeps undecodable bytes as Raw; anything it raises is a frame it cannot read
        return None
    layer = frame.getlayer(IP) or frame.getlayer(IPv6)
    original = getattr(layer, "original", None)
    if not original:
        return None
    start = len(record.data) - len(original)
    return start if start >= 0 and record.data[start:] == original else None


def decode(record: Record) -> Packet | None:
    """The :class:`Packet` in *record*, or ``None`` when it holds no IP packet whose header could be read."""
    start = ip_offset(record)
    if start is None:
        return None
    data = record.data
    version = data[start] >> 4
    header = _ipv4(data, start) if version == 4 else _ipv6(data, start) if version == 6 else None
    if header is None:
        return None
    src, dst, proto, transport, end, fragment = header
    truncated = end > len(data) or record.truncated
    end = min(end, len(data))
    if fragment:
        return Packet(record.index, record.timestamp, "ip-fragment", src, dst, 0, 0, data[transport:end], transport,
                      truncated=truncated)
    if proto == 6 and transport + 20 <= end:
        sport, dport, seq = struct.unpack_from("!HHI", data, transport)
        data_offset = (data[transport + 12] >> 4) * 4
        flags = data[transport + 13] | (data[transport + 12] & 0x01) << 8
        body = min(max(transport + data_offset, transport + 20), end)
        return Packet(record.index, record.timestamp, "tcp", src, dst, sport, dport, data[body:end], body, seq, flags, truncated)
    if proto == 17 and transport + 8 <= end:
        sport, dport, length = struct.unpack_from("!HHH", data, transport)
        stop = min(end, transport + length) if length >= 8 else end
        return Packet(record.index, record.timestamp, "udp", src, dst, sport, dport, data[transport + 8:stop], transport + 8,
                      truncated=truncated)
    name = PROTO_NAMES.get(proto, f"ip-{proto}") if proto not in (6, 17) else f"{PROTO_NAMES[proto]}-short"
    return Packet(record.index, record.timestamp, name, src, dst, 0, 0, data[transport:end], transport, truncated=truncated)


def _ipv4(data: bytes, start: int) -> tuple[str, str, int, int, int, bool] | None:
    if start + 20 > len(data):
        return None
    ihl = (data[start] & 0x0F) * 4
    total, frag = struct.unpack_from("!H2xH", data, start + 2)
    if ihl < 20:
        return None
    end = start + total if total else len(data)  # 0: a segmentation-offloaded packet captured before the NIC split it
    src = str(ipaddress.IPv4Address(data[start + 12:start + 16]))
    dst = str(ipaddress.IPv4Address(data[start + 16:start + 20]))
    return src, dst, data[start + 9], start + ihl, end, bool(frag & 0x3FFF)


def _ipv6(data: bytes, start: int) -> tuple[str, str, int, int, int, bool] | None:
    if start + 40 > len(data):
        return None
    length, proto = struct.unpack_from("!HB", data, start + 4)
    src = str(ipaddress.IPv6Address(data[start + 8:start + 24]))
    dst = str(ipaddress.IPv6Address(data[start + 24:start + 40]))
    end = start + 40 + length if length else len(data)
    pos = start + 40
    fragment = False
    while pos + 8 <= min(end, len(data)):
        if proto in IPV6_EXTENSION_HEADERS:
            proto, size = data[pos], (data[pos + 1] + 1) * 8
        elif proto == IPV6_AH:
            proto, size = data[pos], (data[pos + 1] + 2) * 4
        elif proto == IPV6_FRAGMENT:
            offset_flags = struct.unpack_from("!H", data, pos + 2)[0]
            fragment = fragment or bool(offset_flags & 0xFFF9)
            proto, size = data[pos], 8
        else:
            break
        pos += size
    return src, dst, proto, pos, end, fragment

"""The flow report kept as evidence: every conversation a capture holds and what it looked like.

One entry per flow: protocol, client and server (address:port), packets and payload bytes each
way, what each direction's first bytes look like (TLS record / HTTP / MQTT CONNECT …), and how
whole the capture of it is (retransmitted bytes, holes, packets cut by the snap length). The
canary hits, if any, by label, encoding, flow, offset and frame — never by value.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rig.capture.canaries import CanaryHit
from rig.capture.protocols import EMPTY, looks_like
from rig.capture.streams import Flow, HalfStream, Traffic


def _half(half: HalfStream) -> dict[str, Any]:
    stream = [c for c in half.chunks if not c.note]
    kind, detail = looks_like(half.first_bytes, from_start=not stream or stream[0].offset == 0)
    return {
        "packets": half.packets,
        "bytes": half.bytes,
        "looks_like": kind,
        "detail": detail,
        "retransmitted_bytes": half.retransmitted,
        "gaps": half.gaps,
        "truncated_packets": half.truncated,
    }


def flow_entry(flow: Flow) -> dict[str, Any]:
    to_server, to_client = _half(flow.to_server), _half(flow.to_client)
    kinds = {h["looks_like"] for h in (to_server, to_client)} - {EMPTY}
    return {
        "flow": str(flow),
        "proto": flow.key.proto,
        "client": str(flow.key.client),
        "server": str(flow.key.server),
        "first_frame": flow.first_frame + 1,
        "duration_s": round(flow.last_seen - flow.first_seen, 6),
        "packets": flow.packets,
        "bytes_to_server": to_server["bytes"],
        "bytes_to_client": to_client["bytes"],
        "looks_like": "/".join(sorted(kinds)) if kinds else EMPTY,
        "to_server": to_server,
        "to_client": to_client,
    }


def hit_entry(hit: CanaryHit) -> dict[str, Any]:
    return {
        "canary": hit.canary,
        "encoding": hit.encoding,
        "flow": str(hit.flow) if hit.flow is not None else None,
        "direction": hit.direction,
        "offset": hit.offset,
        "length": hit.length,
        "frames": list(hit.frames),
        "note": hit.note,
    }


def flow_report(traffic: Traffic, hits: Iterable[CanaryHit] = (), **extra: Any) -> dict[str, Any]:
    """The report as a JSON-ready dict; *extra* (the capture's own facts: interface, filter, drops) is added as is."""
    return {
        "pcap": traffic.path.name,
        "frames": traffic.frames,
        "linktypes": list(traffic.linktypes),
        "flows": [flow_entry(f) for f in traffic.flows],
        "non_ip_frames": len(traffic.non_ip),
        "cleartext_hits": [hit_entry(h) for h in hits],
        **extra,
    }


def render_text(report: dict[str, Any]) -> str:
    """The report as lines a person reads: one per flow, then the hits."""
    lines = [f"{report['pcap']}: {report['frames']} frames, {len(report['flows'])} flows"]
    for f in report["flows"]:
        detail = f["to_server"]["detail"] or f["to_client"]["detail"]
        lines.append(f"  {f['flow']}: {f['packets']} packets, {f['bytes_to_server']} B →, {f['bytes_to_client']} B ←, "
                     f"{f['looks_like']}" + (f" ({detail})" if detail else ""))
    for h in report["cleartext_hits"]:
        lines.append(f"  HIT {h['canary']} ({h['encoding']}) in {h['flow'] or 'a non-IP frame'} {h['direction']} "
                     f"at offset {h['offset']}, frames {h['frames']}")
    return "\n".join(lines)

"""Blanking canary hits out of a capture before it is kept as evidence.

A secret found in clear is a finding; the evidence says where (frame, offset, encoding) and
keeps the capture, but not the secret itself (DESIGN: nothing secret in the report). Each hit's
bytes are overwritten in place with ``*`` in every frame they span, so frame numbers, lengths,
TCP sequencing and the flow report stay as they were (the checksums of those frames no longer
match, which Wireshark only reports when asked to validate them).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from pathlib import Path

from rig.capture.canaries import CanaryHit
from rig.capture.pcapfile import PcapFile, read_pcap, write_pcap

REDACTION_BYTE = b"*"


def redact_pcap(source: str | Path | PcapFile, target: str | Path, hits: Iterable[CanaryHit]) -> int:
    """Write *source* to *target* (classic pcap) with every hit's bytes blanked; returns how many bytes were."""
    capture = source if isinstance(source, PcapFile) else read_pcap(source)
    spans: dict[int, list[tuple[int, int]]] = {}
    for hit in hits:
        for frame, start, end in hit.spans:
            spans.setdefault(frame, []).append((start, end))
    blanked = 0
    records = []
    for record in capture.records:
        if record.index in spans:
            data = bytearray(record.data)
            for start, end in spans[record.index]:
                blanked += sum(1 for b in data[start:end] if b != REDACTION_BYTE[0])
                data[start:end] = REDACTION_BYTE * (end - start)
            record = replace(record, data=bytes(data))
        records.append(record)
    write_pcap(target, records, None if records else capture.linktype)
    return blanked

"""Capturing a board's traffic and judging it: flows, TLS or not, plaintext canaries.

* :mod:`rig.capture.live` — :class:`BoardCapture`: tcpdump on the lab's capture interface,
  filtered on one board's address, for a ``with`` block; :class:`CaptureError` when impossible;
* :mod:`rig.capture.pcapfile` — strict pcap/pcapng reading (:class:`PcapError` naming the file), pcap writing;
* :mod:`rig.capture.packets` — a frame → its IP packet, ports, TCP sequencing and exact payload offsets;
* :mod:`rig.capture.streams` — :func:`analyze`: flows, TCP reassembled per direction, UDP datagrams;
* :mod:`rig.capture.canaries` — :func:`cleartext_hits`: which secrets appear readable, in which
  encoding, flow, offset and frame;
* :mod:`rig.capture.protocols` — TLS record / HTTP / MQTT CONNECT by their first bytes;
* :mod:`rig.capture.report` — :func:`flow_report`, the evidence JSON;
* :mod:`rig.capture.redact` — :func:`redact_pcap`: the hits blanked before a capture is kept.
"""

from rig.capture.canaries import CanaryHit, cleartext_hits, describe_hits, encodings
from rig.capture.errors import CaptureError, PcapError
from rig.capture.live import BoardCapture, CaptureStats
from rig.capture.pcapfile import read_pcap, write_pcap
from rig.capture.redact import redact_pcap
from rig.capture.report import flow_report, render_text
from rig.capture.streams import Flow, FlowKey, Traffic, analyze

__all__ = [
    "BoardCapture",
    "CanaryHit",
    "CaptureError",
    "CaptureStats",
    "Flow",
    "FlowKey",
    "PcapError",
    "Traffic",
    "analyze",
    "cleartext_hits",
    "describe_hits",
    "encodings",
    "flow_report",
    "read_pcap",
    "redact_pcap",
    "render_text",
    "write_pcap",
]

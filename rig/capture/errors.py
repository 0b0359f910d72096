"""What the capture layer raises: each message names the file or interface and the fix."""

from __future__ import annotations


class CaptureError(RuntimeError):
    """A live capture is impossible or broke (no tcpdump, no libpcap, no such interface, not root).

    For a test this is INCONCLUSIVE: the rig could not look, so nothing was proved either way."""


class PcapError(ValueError):
    """A capture file that cannot be read whole: not a pcap, corrupt, or truncated. The message names the file."""

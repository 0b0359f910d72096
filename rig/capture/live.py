"""Recording a board's traffic while a test acts: ``with BoardCapture("lo", "127.0.1.7", path) as cap:``.

The capture is tcpdump, run as a subprocess on the lab's capture interface with the BPF filter
``host <board address>`` and written to a pcap file. scapy's ``AsyncSniffer`` was measured first
on ``lo`` and dropped out: it dissects every packet in Python as it reads, and ``stop()``
discards whatever is still queued — a 20-round-trip exchange kept 3 to 7 of its 40 payload
segments — and it sees every loopback packet twice (its listen socket keeps the outgoing copy).
tcpdump (libpcap, ``--immediate-mode``, ``-U``) kept 1008 of 1008 packets of a 500-round-trip
exchange, no duplicates, ~20 ms to start and to stop.

Starting waits for tcpdump's "listening on" line (the filter is attached by then). Stopping
sends a *barrier* — one UDP datagram to the board's discard port (9) carrying a random token —
and waits until tcpdump has written it, so everything sent before the block ended is in the
file; then tcpdump is interrupted (it writes whole records) and the barrier's frames (the
datagram, and the ICMP port-unreachable quoting it) are removed from the pcap. A capture that
lost packets (kernel drops, barrier never seen) says so in :attr:`CaptureStats.problems`.

Every reason a capture cannot run is a :class:`CaptureError` naming the fix: tcpdump or libpcap
missing, the interface missing, no permission to capture. For a test that is INCONCLUSIVE.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from rig.capture.canaries import Canaries, CanaryHit, cleartext_hits
from rig.capture.errors import CaptureError
from rig.capture.pcapfile import read_pcap, write_pcap
from rig.capture.streams import Traffic, analyze

START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 10.0
BARRIER_TIMEOUT_S = 3.0
BARRIER_PORT = 9  # discard
BARRIER_PREFIX = b"rig-capture-barrier "
_POLL_S = 0.01
_STATS = {
    "captured": re.compile(r"(\d+) packets? captured"),
    "dropped_kernel": re.compile(r"(\d+) packets? dropped by kernel"),
    "dropped_interface": re.compile(r"(\d+) packets? dropped by interface"),
}
INSTALL_FIX = "apt-get install tcpdump (make install does it)"


@dataclass
class CaptureStats:
    """What tcpdump and the barrier said about one capture."""

    interface: str
    bpf_filter: str
    command: list[str]
    started: float = 0.0
    stopped: float = 0.0
    packets: int | None = None
    dropped: int = 0
    barrier_seen: bool = False
    tcpdump_stderr: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """Why the capture may miss traffic of the block (empty: it holds all of it)."""
        found = []
        if self.dropped:
            found.append(f"tcpdump reported {self.dropped} packets dropped")
        if not self.barrier_seen:
            found.append(f"the end-of-block marker datagram never reached the capture within {BARRIER_TIMEOUT_S:.0f} s: "
                         "the last packets of the block may be missing")
        return found

    @property
    def complete(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {"interface": self.interface, "filter": self.bpf_filter, "packets": self.packets, "dropped": self.dropped,
                "barrier_seen": self.barrier_seen, "duration_s": round(self.stopped - self.started, 3),
                "complete": self.complete, "problems": self.problems}


def find_tcpdump(tcpdump: str = "tcpdump") -> str:
    """The tcpdump executable, or a :class:`CaptureError` saying how to install it."""
    found = shutil.which(tcpdump) or next((p for p in (f"/usr/sbin/{tcpdump}", f"/usr/bin/{tcpdump}") if os.access(p, os.X_OK)), None)
    if found is None:
        raise CaptureError(f"cannot capture: {tcpdump} is not installed (or not on PATH). Fix: {INSTALL_FIX}")
    return found


def check_interface(interface: str) -> None:
    """*interface* exists on this host (libpcap's ``any`` always does)."""
    if interface == "any":
        return
    names = [name for _, name in socket.if_nameindex()]
    if interface not in names:
        raise CaptureError(
            f"cannot capture: there is no network interface '{interface}' on this host (it has: {', '.join(names)}). "
            "Fix: set capture: interface: in boards.yaml to the interface that carries the boards' traffic (lo for virtual boards)"
        )


def bpf_for(address: str) -> str:
    """The filter that selects one board's traffic; the address is checked, so nothing else reaches tcpdump's parser."""
    try:
        return f"host {ipaddress.ip_address(address)}"
    except ValueError:
        raise CaptureError(f"cannot capture: '{address}' is not an IP address. Fix: give the board's address "
                           "(boards.yaml address:, 127.0.1.N for a virtual board)") from None


def explain_failure(interface: str, stderr: str) -> str:
    """tcpdump's complaint, turned into what to do about it."""
    text = stderr.strip().replace("\n", " / ") or "(no output)"
    if "error while loading shared libraries" in stderr and "pcap" in stderr:
        return f"cannot capture: libpcap is missing ({text}). Fix: apt-get install libpcap0.8, or {INSTALL_FIX}"
    if re.search(r"[Pp]ermission|not permitted", stderr):
        return (f"cannot capture on {interface}: no permission ({text}). Fix: run the rig as root (make run does), or let "
                "tcpdump capture: setcap cap_net_raw,cap_net_admin=eip $(command -v tcpdump)")
    if "No such device" in stderr or "doesn't exist" in stderr:
        return (f"cannot capture: no interface '{interface}' ({text}). "
                "Fix: set capture: interface: in boards.yaml to an interface of this host (lo for virtual boards)")
    return f"cannot capture on {interface}: tcpdump failed ({text})"


class BoardCapture:
    """tcpdump on *interface*, filtered on *address*, into *pcap*, for the duration of a ``with`` block."""

    def __init__(self, interface: str, address: str, pcap: str | Path, *, tcpdump: str = "tcpdump",
                 start_timeout: float = START_TIMEOUT_S, stop_timeout: float = STOP_TIMEOUT_S,
                 barrier_timeout: float = BARRIER_TIMEOUT_S):  # fmt: skip
        self.interface = interface
        self.address = address
        self.pcap = Path(pcap)
        self.tcpdump = tcpdump
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.barrier_timeout = barrier_timeout
        self.stats: CaptureStats | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: list[str] = []
        self._listening = threading.Event()
        """Set when tcpdump said it listens, or its stderr ended (it exited)."""
        self._is_listening = False
        self._reader: threading.Thread | None = None
        self._traffic: Traffic | None = None

    # ------------------------------------------------------------------ start / stop

    def start(self) -> BoardCapture:
        bpf = bpf_for(self.address)
        check_interface(self.interface)
        binary = find_tcpdump(self.tcpdump)
        self.pcap.parent.mkdir(parents=True, exist_ok=True)
        self.pcap.unlink(missing_ok=True)
        command = [binary, "-i", self.interface, "-w", str(self.pcap), "-U", "--immediate-mode", "-s", "0", "-n"]
        if os.geteuid() == 0:
            command += ["-Z", "root"]  # keep the file root's: tcpdump would hand it to its own user
        command += [bpf]
        self.stats = CaptureStats(self.interface, bpf, command)
        self._stderr, self._is_listening, self._traffic = [], False, None
        self._listening.clear()
        try:
            self._proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        except OSError as exc:
            raise CaptureError(f"cannot capture: {binary} did not start ({exc}). Fix: {INSTALL_FIX}") from exc
        self._reader = threading.Thread(target=self._read_stderr, name=f"tcpdump-{self.interface}", daemon=True)
        self._reader.start()
        timed_out = not self._listening.wait(self.start_timeout)
        if not self._is_listening or self._proc.poll() is not None:
            if not timed_out:  # its stderr ended: let it finish exiting, so its last words are read
                try:
                    self._proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    pass
            self._kill()
            if self._reader is not None:
                self._reader.join(self.stop_timeout)
            self._proc = None
            if timed_out:
                raise CaptureError(f"cannot capture on {self.interface}: tcpdump did not start listening within "
                                   f"{self.start_timeout:.0f} s ({' / '.join(self._stderr) or 'no output'})")
            raise CaptureError(explain_failure(self.interface, "\n".join(self._stderr)))
        self.stats.started = time.time()
        return self

    def _read_stderr(self) -> None:
        assert self._proc is not None and self._proc.stderr is not None
        for raw in self._proc.stderr:
            line = raw.decode(errors="replace").rstrip()
            self._stderr.append(line)
            if "listening on" in line:
                self._is_listening = True
                self._listening.set()
        self._listening.set()  # EOF: tcpdump exited; start() looks at why

    def stop(self) -> CaptureStats:
        """End the capture once everything sent so far is in the file; strip the barrier; return the stats."""
        if self._proc is None or self.stats is None:
            raise CaptureError("the capture was never started. Fix: use it as `with BoardCapture(...) as cap:`")
        proc, stats = self._proc, self.stats
        token = BARRIER_PREFIX + secrets.token_hex(8).encode()
        if proc.poll() is None:
            stats.barrier_seen = self._send_barrier(token) and self._wait_for(token)
        died = proc.poll() is not None
        if not died:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            self._kill()
        if self._reader is not None:
            self._reader.join(self.stop_timeout)
        stats.stopped = time.time()
        stats.tcpdump_stderr = list(self._stderr)
        self._proc = None
        if died:
            raise CaptureError("tcpdump exited during the block, the capture is partial: "
                               + explain_failure(self.interface, "\n".join(self._stderr)))
        text = "\n".join(self._stderr)
        counts = {name: int(m.group(1)) for name, rx in _STATS.items() if (m := rx.search(text))}
        stats.dropped = counts.get("dropped_kernel", 0) + counts.get("dropped_interface", 0)
        if not self.pcap.is_file():
            raise CaptureError(f"the capture wrote no file {self.pcap} ({text or 'tcpdump said nothing'})")
        stats.packets = self._strip_barrier(token)
        return stats

    def _send_barrier(self, token: bytes) -> bool:
        family = socket.AF_INET6 if ":" in self.address else socket.AF_INET
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.sendto(token, (self.address, BARRIER_PORT))
        except OSError:
            return False  # no route to the board from here: the capture can only stop blind
        return True

    def _wait_for(self, token: bytes) -> bool:
        """Until tcpdump has written *token* to the file (it writes each packet as it comes, ``-U``)."""
        deadline = time.monotonic() + self.barrier_timeout
        seen = 0
        tail = b""
        while time.monotonic() < deadline:
            try:
                with self.pcap.open("rb") as f:
                    f.seek(seen)
                    new = f.read()
            except FileNotFoundError:
                new = b""
            seen += len(new)
            if token in tail + new:
                return True
            tail = (tail + new)[-len(token):]
            time.sleep(_POLL_S)  # tcpdump has no way to tell us it wrote a packet; the file is the event
        return False

    def _strip_barrier(self, token: bytes) -> int:
        capture = read_pcap(self.pcap)
        kept = [r for r in capture.records if token not in r.data]
        if len(kept) != len(capture.records):
            write_pcap(self.pcap, kept, None if kept else capture.linktype)
        return len(kept)

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(self.stop_timeout)

    def __enter__(self) -> BoardCapture:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.stop()
        except Exception:
            if exc_type is None:
                raise
            # the block's own exception says more; the capture is stopped either way

    # ------------------------------------------------------------------ what it holds

    def traffic(self) -> Traffic:
        """The capture's flows (read once, after the block)."""
        if self._proc is not None:
            raise CaptureError("the capture is still running. Fix: read its traffic after the `with` block")
        if self._traffic is None:
            self._traffic = analyze(self.pcap)
        return self._traffic

    def cleartext_hits(self, canaries: Canaries) -> list[CanaryHit]:
        return cleartext_hits(self.traffic(), canaries)

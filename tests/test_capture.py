"""The capture layer (rig.capture): known-answer pcaps built with scapy, broken pcaps, a live capture on lo."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import struct
import threading
from pathlib import Path
from urllib.parse import quote_plus

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import CookedLinux, Ether
from scapy.packet import Packet, Raw
from scapy.utils import wrpcap, wrpcapng

from rig.capture import (
    BoardCapture,
    CaptureError,
    PcapError,
    analyze,
    cleartext_hits,
    describe_hits,
    encodings,
    flow_report,
    read_pcap,
    redact_pcap,
)
from rig.capture.live import bpf_for, explain_failure
from rig.capture.protocols import looks_like

SECRET = "virtual-lab-passphrase"
CLIENT, SERVER = ("127.0.0.1", 40000), ("127.0.1.9", 80)
LIVE_ADDRESS = "127.0.1.1"
"""Loopback, outside the 127.0.1.2–254 virtual boards take, so a live test never captures a board."""


class TcpConversation:
    """Frames of one TCP connection with chosen sequence numbers, for known-answer captures."""

    def __init__(self, client: tuple[str, int] = CLIENT, server: tuple[str, int] = SERVER,
                 client_isn: int = 1000, server_isn: int = 5000):  # fmt: skip
        self.client, self.server = client, server
        self.isn = {True: client_isn, False: server_isn}

    def _frame(self, to_server: bool, flags: str, seq: int, payload: bytes = b"") -> Packet:
        src, dst = (self.client, self.server) if to_server else (self.server, self.client)
        segment = TCP(sport=src[1], dport=dst[1], flags=flags, seq=seq % (1 << 32), ack=0)
        return Ether() / IP(src=src[0], dst=dst[0]) / segment / (Raw(payload) if payload else b"")

    def handshake(self) -> list[Packet]:
        return [self._frame(True, "S", self.isn[True]), self._frame(False, "SA", self.isn[False]),
                self._frame(True, "A", self.isn[True] + 1)]

    def data(self, to_server: bool, offset: int, payload: bytes) -> Packet:
        """A segment carrying *payload* at stream *offset* of that direction."""
        return self._frame(to_server, "PA", self.isn[to_server] + 1 + offset, payload)


def write(path: Path, frames: list[Packet]) -> Path:
    wrpcap(str(path), frames)
    return path


# --------------------------------------------------------------------------- TCP reassembly


def test_secret_split_across_out_of_order_and_retransmitted_segments_is_found(tmp_path: Path) -> None:
    tcp = TcpConversation()
    stream = b'POST /prov-config HTTP/1.1\r\n\r\n{"ssid":"lab","passphrase":"' + SECRET.encode() + b'"}'
    cut = stream.index(SECRET.encode()) + 7  # the secret straddles the two segments
    first, second = tcp.data(True, 0, stream[:cut]), tcp.data(True, cut, stream[cut:])
    pcap = write(tmp_path / "split.pcap", [*tcp.handshake(), second, first, first, tcp.data(False, 0, b"HTTP/1.1 200 OK\r\n\r\n")])

    hits = cleartext_hits(pcap, {"Wi-Fi passphrase": SECRET})

    assert len(hits) == 1, describe_hits(hits)
    hit = hits[0]
    where = stream.index(SECRET.encode())
    assert (hit.canary, hit.encoding, hit.direction, hit.offset) == ("Wi-Fi passphrase", "utf-8", "client→server", where)
    assert str(hit.flow) == "tcp 127.0.0.1:40000 → 127.0.1.9:80"
    assert hit.frames == (4, 5), "frame 5 (first in stream order, captured second) and frame 4 hold the two halves"
    flow = analyze(pcap).flows[0]
    assert bytes(flow.to_server.chunks[0].data) == stream and len(flow.to_server.chunks) == 1
    assert flow.to_server.retransmitted == cut and flow.to_server.gaps == 0
    assert "Wi-Fi passphrase in clear (utf-8) in tcp 127.0.0.1:40000 → 127.0.1.9:80 client→server" in hit.describe()


def test_a_hole_in_the_stream_is_not_glued_over(tmp_path: Path) -> None:
    tcp = TcpConversation()
    pcap = write(tmp_path / "hole.pcap", [*tcp.handshake(), tcp.data(True, 0, b"virtual-lab-"), tcp.data(True, 20, b"passphrase")])
    flow = analyze(pcap).flows[0]
    assert [c.offset for c in flow.to_server.chunks] == [0, 20] and flow.to_server.gaps == 1
    assert cleartext_hits(pcap, [SECRET]) == []


def test_a_retransmission_with_other_bytes_is_searched_too(tmp_path: Path) -> None:
    tcp = TcpConversation()
    pcap = write(tmp_path / "differ.pcap", [*tcp.handshake(), tcp.data(True, 0, b"x" * len(SECRET)), tcp.data(True, 0, SECRET.encode())])
    hits = cleartext_hits(pcap, {"pass": SECRET})
    assert [(h.frames, h.note) for h in hits] == [((5,), "differing retransmission")]


def test_sequence_numbers_wrap_around_and_a_capture_may_start_mid_connection(tmp_path: Path) -> None:
    tcp = TcpConversation(client_isn=(1 << 32) - 10)  # the secret's second half lies past 2**32
    middle = [tcp.data(True, 0, b"abcdefghijklmnop" + SECRET[:5].encode()), tcp.data(True, 21, SECRET[5:].encode())]
    whole = write(tmp_path / "wrap.pcap", [*tcp.handshake(), *middle])
    no_syn = write(tmp_path / "mid.pcap", list(reversed(middle)))
    assert [(h.offset, h.frames) for h in cleartext_hits(whole, {"pass": SECRET})] == [(16, (4, 5))]
    mid = cleartext_hits(no_syn, {"pass": SECRET})
    assert [(h.offset, h.frames, str(h.flow)) for h in mid] == [(16, (1, 2), "tcp 127.0.0.1:40000 → 127.0.1.9:80")]


def test_ethernet_padding_is_not_payload(tmp_path: Path) -> None:
    tcp = TcpConversation()
    ack = Ether(bytes(tcp.handshake()[2]) + b"\x00" * 6)  # a bare ACK, padded to Ethernet's 60 bytes
    pcap = write(tmp_path / "pad.pcap", [*tcp.handshake()[:2], ack])
    assert analyze(pcap).flows[0].to_server.bytes == 0


# --------------------------------------------------------------------------- encodings


def _embedded(encoding: str) -> bytes:
    raw = SECRET.encode()
    if encoding == "hex":
        return b"cfg=" + (b"ab" + raw).hex().encode() + b"&"
    if encoding == "base64":
        return b'{"blob":"' + base64.b64encode(b"\x01\x02" + raw + b"\x03") + b'"}'  # inside a longer base64 blob
    if encoding == "base64url":
        return base64.urlsafe_b64encode(b"\xfb\xff" + URLSAFE.encode() + b"?>")
    if encoding == "JSON-escaped":
        return json.dumps({"passphrase": QUOTED}).encode()
    if encoding == "URL-encoded":
        return b"ssid=lab&passphrase=" + quote_plus(QUOTED).encode()
    if encoding == "utf-16-le":
        return b"\xff\xfe" + SECRET.encode("utf-16-le")
    raise AssertionError(encoding)


QUOTED = 'pass "word"/with spaces & more'
URLSAFE = "lab>>>pass???word"
"""Its base64 holds ``+`` and ``/``, which base64url writes ``-`` and ``_``."""


@pytest.mark.parametrize("encoding", ["hex", "base64", "base64url", "JSON-escaped", "URL-encoded", "utf-16-le"])
def test_encoded_canaries_are_found_in_udp_datagrams(tmp_path: Path, encoding: str) -> None:
    secret = QUOTED if encoding in ("JSON-escaped", "URL-encoded") else URLSAFE if encoding == "base64url" else SECRET
    datagram = _embedded(encoding)
    assert secret.encode() not in datagram
    frames = [Ether() / IP(src="127.0.1.9", dst="127.0.0.1") / UDP(sport=5353, dport=40001) / Raw(b"lead-in datagram"),
              Ether() / IP(src="127.0.1.9", dst="127.0.0.1") / UDP(sport=5353, dport=40001) / Raw(datagram)]
    hits = cleartext_hits(write(tmp_path / "udp.pcap", frames), {"secret": secret})
    assert [(h.encoding, h.frames, h.direction, str(h.flow)) for h in hits] == [
        (encoding, (2,), "client→server", "udp 127.0.1.9:5353 → 127.0.0.1:40001")
    ]
    assert hits[0].offset >= len(b"lead-in datagram"), "UDP offsets count the direction's datagram bytes"


def test_encodings_are_listed_once_each() -> None:
    forms = encodings("abcd1234")
    assert [f.name for f in forms].count("utf-8") == 1
    assert "JSON-escaped" not in {f.name for f in forms} and "URL-encoded" not in {f.name for f in forms}, "same bytes as utf-8"
    assert len({f.pattern for f in forms}) == len(forms)


def test_a_canary_too_short_to_mean_anything_is_refused(tmp_path: Path) -> None:
    pcap = write(tmp_path / "x.pcap", [Ether() / IP() / UDP() / Raw(b"abc")])
    with pytest.raises(ValueError, match="too short"):
        cleartext_hits(pcap, {"pin": "abc"})


def test_ipv6_cooked_capture_and_non_ip_frames_are_searched(tmp_path: Path) -> None:
    v6 = CookedLinux(proto=0x86DD) / IPv6(src="fd00::9", dst="fd00::1") / UDP(sport=1234, dport=5678) / Raw(b"k=" + SECRET.encode())
    cooked = write(tmp_path / "cooked.pcap", [v6])
    hits = cleartext_hits(cooked, {"pass": SECRET})
    assert [(str(h.flow), h.offset) for h in hits] == [("udp [fd00::9]:1234 → [fd00::1]:5678", 2)]
    odd = Ether(type=0x88B5) / Raw(b"local experimental ethertype " + SECRET.encode())
    hits = cleartext_hits(write(tmp_path / "l2.pcap", [odd]), {"pass": SECRET})
    assert [(h.flow, h.direction, h.frames) for h in hits] == [(None, "frame", (1,))]


# --------------------------------------------------------------------------- flow report, TLS, redaction


def tls_record(content_type: int, body: bytes) -> bytes:
    return bytes([content_type, 3, 3]) + len(body).to_bytes(2, "big") + body


def test_tls_flows_without_hits_and_an_mqtt_connect_are_reported(tmp_path: Path) -> None:
    tls = TcpConversation(server=("127.0.1.9", 8883))
    client_hello = tls_record(22, b"\x01\x00\x00\x2a" + os.urandom(42))
    app_data = tls_record(23, os.urandom(300))
    mqtt = TcpConversation(client=("127.0.1.9", 40100), server=("127.0.0.1", 1883))
    connect = b"\x10\x18\x00\x04MQTT\x04\x02\x00\x3c\x00\x0cnode-abc1234"
    frames = [*tls.handshake(), tls.data(True, 0, client_hello), tls.data(False, 0, tls_record(22, b"\x02" + os.urandom(60))),
              tls.data(True, len(client_hello), app_data), *mqtt.handshake(), mqtt.data(True, 0, connect),
              mqtt.data(False, 0, b"\x20\x02\x00\x00")]
    pcap = write(tmp_path / "tls.pcap", frames)
    traffic = analyze(pcap)

    assert cleartext_hits(traffic, {"pass": SECRET, "pop": "156c782d"}) == []
    report = flow_report(traffic, interface="lo")
    assert report["interface"] == "lo" and report["frames"] == len(frames) and report["cleartext_hits"] == []
    first, second = report["flows"]
    assert (first["proto"], first["client"], first["server"]) == ("tcp", "127.0.0.1:40000", "127.0.1.9:8883")
    assert (first["bytes_to_server"], first["bytes_to_client"]) == (len(client_hello) + len(app_data), 5 + 61)
    assert first["looks_like"] == "TLS" and first["to_server"]["detail"] == "TLS 1.2 record: Handshake (ClientHello)"
    assert second["looks_like"] == "MQTT" and second["to_server"]["detail"] == "MQTT CONNECT (MQTT 3.1.1)"
    assert second["to_client"]["detail"] == "MQTT CONNACK"
    json.dumps(report)


def test_first_bytes_are_told_apart() -> None:
    assert looks_like(b"POST /prov-session HTTP/1.1\r\n")[1] == "HTTP request POST"
    assert looks_like(b"HTTP/1.1 200 OK\r\n")[1] == "HTTP response 200"
    assert looks_like(b"\x08\x02\x12\x04abcd") == ("unknown", "")
    assert looks_like(b"") == ("no payload", "")
    assert looks_like(tls_record(22, b"\x01abc"), from_start=False)[0] == "unknown"


def test_redaction_blanks_every_byte_of_a_hit_and_nothing_else(tmp_path: Path) -> None:
    tcp = TcpConversation()
    stream = b"passphrase=" + SECRET.encode() + b"&hex=" + SECRET.encode().hex().encode()
    cut = 20
    source = write(tmp_path / "raw.pcap", [*tcp.handshake(), tcp.data(True, 0, stream[:cut]), tcp.data(True, cut, stream[cut:])])
    hits = cleartext_hits(source, {"pass": SECRET})
    assert sorted(h.encoding for h in hits) == ["hex", "utf-8"]

    kept = tmp_path / "kept.pcap"
    blanked = redact_pcap(source, kept, hits)

    assert blanked == len(SECRET) * 3
    assert cleartext_hits(kept, {"pass": SECRET}) == []
    before, after = read_pcap(source).records, read_pcap(kept).records
    assert [len(r.data) for r in before] == [len(r.data) for r in after]
    stars = b"*" * len(SECRET)
    assert bytes(analyze(kept).flows[0].to_server.chunks[0].data) == b"passphrase=" + stars + b"&hex=" + stars * 2


def test_a_kept_block_holds_neither_the_tests_canaries_nor_the_labs_passphrases(tmp_path: Path) -> None:
    from types import SimpleNamespace
    from typing import Any, cast

    from fixtures.capture import BoardCaptures, CaptureBlock
    from fixtures.evidence import Evidence

    pop, wifi = "keep-test-pop-7f3a", "keep-test-wifi-91c2"
    tcp = TcpConversation()
    raw = tmp_path / "raw" / "prov.pcap"
    raw.parent.mkdir()
    write(raw, [*tcp.handshake(), tcp.data(True, 0, b"pop=" + pop.encode() + b"&wifi=" + base64.b64encode(wifi.encode()))])
    block = CaptureBlock(BoardCaptures(cast(Any, SimpleNamespace(name="vb1")), "lo", raw.parent), "prov",
                         BoardCapture("lo", SERVER[0], raw))
    block.started = True
    assert [h.canary for h in block.cleartext_hits({"the PoP": pop})] == ["the PoP"]
    with pytest.raises(ValueError, match="too short"):
        block.cleartext_hits({"pin": "123"})
    assert list(block.canaries) == ["the PoP"], "a refused canary is not kept for the evidence's redaction"

    kept = tmp_path / "pcaps"
    block.keep(kept, Evidence(tmp_path / "evidence"), {"Wi-Fi passphrase (lab)": wifi.encode()})

    for pcap in (kept / "prov.pcap", tmp_path / "evidence" / "prov.pcap"):
        assert cleartext_hits(pcap, {"pop": pop, "wifi": wifi}) == [], pcap
    report = json.loads((kept / "prov.flows.json").read_text())
    assert [h["canary"] for h in report["cleartext_hits"]] == ["the PoP"] and report["redacted_hits"] == 2
    assert pop not in (kept / "prov.flows.json").read_text()


# --------------------------------------------------------------------------- broken files


@pytest.fixture
def good_pcap(tmp_path: Path) -> Path:
    tcp = TcpConversation()
    return write(tmp_path / "good.pcap", [*tcp.handshake(), tcp.data(True, 0, b"hello " + SECRET.encode())])


@pytest.mark.parametrize(("cut", "problem"), [(-7, "truncated pcap: record 4 at byte"), (-60, "truncated pcap: record 4's header"),
                                              (10, "truncated pcap: the file header")])
def test_a_truncated_pcap_is_one_clear_error_naming_the_file(good_pcap: Path, tmp_path: Path, cut: int, problem: str) -> None:
    blob = good_pcap.read_bytes()
    broken = tmp_path / "broken.pcap"
    if cut == -60:  # end inside the 4th record's 16-byte header
        records = read_pcap(good_pcap).records
        header_at = 24 + sum(16 + len(r.data) for r in records[:3])
        broken.write_bytes(blob[:header_at + 9])
    else:
        broken.write_bytes(blob[:cut])
    for call in (read_pcap, analyze, lambda p: cleartext_hits(p, [SECRET])):
        with pytest.raises(PcapError) as caught:
            call(broken)
        assert str(broken) in str(caught.value) and problem in str(caught.value) and "Fix:" in str(caught.value)


@pytest.mark.parametrize("content", [b"", b"not a capture at all", struct.pack("<IIII", 0xA1B2C3D4, 0, 0, 0)[:12]])
def test_something_that_is_no_pcap_is_one_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.pcap"
    path.write_bytes(content)
    with pytest.raises(PcapError, match=str(path)):
        cleartext_hits(path, [SECRET])
    with pytest.raises(PcapError, match="cannot be read"):
        read_pcap(tmp_path / "missing.pcap")


def test_a_corrupt_record_length_is_an_error_not_a_huge_read(good_pcap: Path, tmp_path: Path) -> None:
    blob = bytearray(good_pcap.read_bytes())
    struct.pack_into("<I", blob, 24 + 8, 0x7FFFFFFF)
    (tmp_path / "corrupt.pcap").write_bytes(bytes(blob))
    with pytest.raises(PcapError, match="corrupt pcap: record 1 at byte 24 claims"):
        read_pcap(tmp_path / "corrupt.pcap")


def test_pcapng_reads_the_same_and_its_truncation_is_an_error(tmp_path: Path) -> None:
    tcp = TcpConversation()
    frames = [*tcp.handshake(), tcp.data(True, 0, b"hello " + SECRET.encode())]
    ng = tmp_path / "same.pcapng"
    wrpcapng(str(ng), frames)
    assert read_pcap(ng).format == "pcapng" and [r.data for r in read_pcap(ng).records] == [bytes(f) for f in frames]
    assert [h.frames for h in cleartext_hits(ng, {"pass": SECRET})] == [(4,)]
    cut = tmp_path / "cut.pcapng"
    cut.write_bytes(ng.read_bytes()[:-10])
    with pytest.raises(PcapError, match=r"cut\.pcapng: truncated pcapng"):
        cleartext_hits(cut, [SECRET])


# --------------------------------------------------------------------------- live capture on lo

needs_capture = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("tcpdump") is None,
                                   reason="a live capture needs root and tcpdump (make install)")


def serve_once(address: str, reply: bytes) -> tuple[int, threading.Thread, list[bytes]]:
    server = socket.create_server((address, 0))
    received: list[bytes] = []

    def run() -> None:
        with server:
            conn, _ = server.accept()
            with conn:
                while chunk := conn.recv(4096):
                    received.append(chunk)
                    if b"\n\n" in b"".join(received):
                        break
                conn.sendall(reply)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return server.getsockname()[1], thread, received


@needs_capture
def test_a_live_capture_on_lo_finds_the_canary_a_local_exchange_sent(tmp_path: Path) -> None:
    port, thread, _ = serve_once(LIVE_ADDRESS, b'{"status":"ok"}')
    wire = b'{"ssid":"lab","passphrase":"' + base64.b64encode(SECRET.encode()) + b'"}'
    with BoardCapture("lo", LIVE_ADDRESS, tmp_path / "live.pcap") as cap:
        with socket.create_connection((LIVE_ADDRESS, port), timeout=10) as client:
            client.sendall(wire[:20])
            client.sendall(wire[20:] + b"\n\n")
            assert client.recv(100) == b'{"status":"ok"}'
        thread.join(10)

    assert cap.stats is not None and cap.stats.complete, cap.stats
    hits = cap.cleartext_hits({"Wi-Fi passphrase": SECRET})
    assert [(h.encoding, h.direction, h.flow.server.port if h.flow else None) for h in hits] == [("base64", "client→server", port)]
    flows = cap.traffic().flows_with(LIVE_ADDRESS, port)
    assert len(flows) == 1 and flows[0].to_server.bytes == len(wire) + 2 and flows[0].to_client.bytes == 15
    assert all(f.key.proto == "tcp" for f in cap.traffic().flows), "the end-of-capture marker is stripped from the pcap"


@needs_capture
def test_capture_problems_name_their_fix(tmp_path: Path) -> None:
    with pytest.raises(CaptureError, match=r"no network interface 'rig-nosuch0'.*Fix: set capture: interface:"):
        BoardCapture("rig-nosuch0", LIVE_ADDRESS, tmp_path / "a.pcap").start()
    with pytest.raises(CaptureError, match=r"not installed.*Fix: apt-get install tcpdump"):
        BoardCapture("lo", LIVE_ADDRESS, tmp_path / "b.pcap", tcpdump="rig-no-tcpdump").start()
    with pytest.raises(CaptureError, match="not an IP address"):
        bpf_for("127.0.1.1 or port 22")
    setpriv = shutil.which("setpriv")
    if setpriv is not None:  # tcpdump as nobody: the kernel refuses the capture socket
        wrapper = tmp_path / "tcpdump-as-nobody"
        wrapper.write_text(f'#!/bin/sh\nexec {setpriv} --reuid=nobody --regid=nogroup --clear-groups {shutil.which("tcpdump")} "$@"\n')
        wrapper.chmod(0o755)
        with pytest.raises(CaptureError, match=r"no permission.*Fix: run the rig as root"):
            BoardCapture("lo", LIVE_ADDRESS, tmp_path / "c.pcap", tcpdump=str(wrapper)).start()


def test_libpcap_missing_is_explained() -> None:
    stderr = "tcpdump: error while loading shared libraries: libpcap.so.0.8: cannot open shared object file"
    assert "libpcap is missing" in explain_failure("lo", stderr) and "Fix: apt-get install libpcap0.8" in explain_failure("lo", stderr)


# --------------------------------------------------------------------------- rig pcap analyze


def test_rig_pcap_analyze_prints_flows_and_hits_by_label_and_exits_by_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from rig.cli import app

    tcp = TcpConversation()
    request = b"POST /prov-config HTTP/1.1\r\n\r\npass=" + SECRET.encode()
    pcap = write(tmp_path / "prov.pcap", [*tcp.handshake(), tcp.data(True, 0, request)])
    monkeypatch.setenv("RIG_TEST_CANARY", SECRET)
    runner = CliRunner()
    found = runner.invoke(app, ["pcap", "analyze", str(pcap), "--canary", "wifi=env:RIG_TEST_CANARY"])
    assert found.exit_code == 1, found.output
    assert "127.0.0.1:40000" in found.output and "HIT wifi (utf-8)" in found.output and SECRET not in found.output
    clean = runner.invoke(app, ["pcap", "analyze", str(pcap), "--json"])
    assert clean.exit_code == 0 and json.loads(clean.output)["cleartext_hits"] == []
    (tmp_path / "cut.pcap").write_bytes(pcap.read_bytes()[:-7])
    cut = runner.invoke(app, ["pcap", "analyze", str(tmp_path / "cut.pcap")])
    assert cut.exit_code == 2 and "cut.pcap" in cut.output
    bad = runner.invoke(app, ["pcap", "analyze", str(pcap), "--canary", "novalue"])
    assert bad.exit_code == 2 and "LABEL=VALUE" in bad.output

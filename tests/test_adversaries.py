"""Device-Advisor-style adversaries (rig.cloud.adversaries) against real TLS clients.

* TLS listeners: a client that verifies against the lab CA (Python's ssl, and paho)
  refuses ``unknown_ca``, ``wrong_subject`` and ``expired`` and the listener records the
  refusal and the client's alert; the same client completes ``oversized_chain``; a
  client that does not verify completes every one of them and the listener records
  what it sent (the positive control: the listeners do accept a careless node).
* Opaque fault proxy between a raw TLS client and a small TLS MQTT server: pass,
  drop after N bytes, drop after the server's first flight, withhold after the
  handshake, delay; connection timestamps.
* TLS-terminating proxy: withholds exactly one ack type, connects upstream as the node
  (the upstream sees the node's CN), refuses nodes it holds no identity for.
"""

from __future__ import annotations

import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from rig.cloud.adversaries import (
    FAULT_MODES,
    TLS_CASES,
    AdversaryError,
    MqttFaultProxy,
    MqttTerminatingProxy,
    TlsAdversary,
    parse_mqtt_connect,
)
from rig.cloud.pki import LabPki

NODE = "node-7f3a"
TLS_VERSIONS = pytest.mark.parametrize("tls_max", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls12", "tls13"])
WAIT_S = 10.0


def connect_packet(client_id: str, *, keepalive: int = 120, username: str | None = None, level: int = 4) -> bytes:
    """An MQTT CONNECT (3.1.1, or 5.0 with empty properties), clean session."""
    def s(text: str) -> bytes:
        raw = text.encode()
        return len(raw).to_bytes(2, "big") + raw

    flags = 0x02 | (0x80 if username is not None else 0)
    variable = s("MQTT") + bytes([level, flags]) + keepalive.to_bytes(2, "big") + (b"\x00" if level == 5 else b"")
    payload = s(client_id) + (s(username) if username is not None else b"")
    body = variable + payload
    assert len(body) < 128
    return bytes([0x10, len(body)]) + body


CONNACK = b"\x20\x02\x00\x00"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return LabPki(tmp_path_factory.mktemp("pki"))


def verifying_context(pki: LabPki, alpn: bool = True, tls_max: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert_path))
    if tls_max is not None:
        ctx.maximum_version = tls_max
    if alpn:
        ctx.set_alpn_protocols(["x-amzn-mqtt-ca"])
    return ctx


def careless_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def tls_connect(port: int, ctx: ssl.SSLContext, timeout: float = WAIT_S) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        return ctx.wrap_socket(raw, server_hostname="localhost")
    except BaseException:
        raw.close()
        raise


def tls_attempt(port: int, ctx: ssl.SSLContext) -> tuple[str, ssl.SSLSocket | ssl.SSLError]:
    """Connect; return the client's address as a listener records it, and the TLS socket or the error."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    client = f"127.0.0.1:{raw.getsockname()[1]}"
    try:
        return client, ctx.wrap_socket(raw, server_hostname="localhost")
    except ssl.SSLError as exc:
        raw.close()
        return client, exc


# ------------------------------------------------------------------ TLS adversaries


@pytest.fixture(scope="module")
def adversaries(pki: LabPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, TlsAdversary]]:
    state = tmp_path_factory.mktemp("adversaries")
    started = {kind: TlsAdversary(kind, state, pki.ca_cert_path, pki.ca_key_path) for kind in TLS_CASES}
    for adversary in started.values():
        adversary.start()
    yield started
    for adversary in started.values():
        adversary.stop()


@pytest.mark.parametrize("kind", ["unknown_ca", "wrong_subject", "expired"])
def test_verifying_client_refuses_bad_server(adversaries: dict[str, TlsAdversary], pki: LabPki, kind: str) -> None:
    adversary = adversaries[kind]
    client, outcome = tls_attempt(adversary.port, verifying_context(pki))
    assert isinstance(outcome, ssl.SSLCertVerificationError), outcome
    attempt = adversary.wait_for_attempt(lambda a: a.client == client, WAIT_S)
    assert not attempt.handshake_completed and attempt.received == b""
    assert attempt.client_alert is not None, attempt.failure  # OpenSSL clients say why they hang up
    assert attempt.sni == "localhost"
    expected_reason = {"unknown_ca": "certificate signature failure", "wrong_subject": "Hostname mismatch",
                       "expired": "certificate has expired"}[kind]
    assert expected_reason in str(outcome)
    if kind == "expired":
        assert "EXPIRED" in attempt.client_alert


@pytest.mark.parametrize("kind", list(TLS_CASES))
def test_careless_client_completes_and_its_connect_is_recorded(adversaries: dict[str, TlsAdversary], kind: str) -> None:
    adversary = adversaries[kind]
    packet = connect_packet(NODE, username="?Platform=APN3|A0|RM|EX00|RMDev|1x0")
    client, sock = tls_attempt(adversary.port, careless_context())
    assert isinstance(sock, ssl.SSLSocket), sock
    with sock:
        sock.sendall(packet)
        attempt = adversary.wait_for_attempt(lambda a: a.client == client, WAIT_S)
    assert attempt.handshake_completed and attempt.failure is None
    assert attempt.received == packet and attempt.tls_version in {"TLSv1.2", "TLSv1.3"}
    assert attempt.mqtt_connect is not None and attempt.mqtt_connect.client_id == NODE
    assert attempt.mqtt_connect.keepalive_s == 120 and not attempt.mqtt_connect.password_present


def test_oversized_chain_is_valid_and_large(adversaries: dict[str, TlsAdversary], pki: LabPki) -> None:
    adversary = adversaries["oversized_chain"]
    chain = x509.load_pem_x509_certificates(adversary.cert_path.read_bytes())
    assert sum(len(c.public_bytes(Encoding.DER)) for c in chain) >= adversary.chain_bytes
    client, sock = tls_attempt(adversary.port, verifying_context(pki))  # a verifying client accepts it
    assert isinstance(sock, ssl.SSLSocket), sock
    with sock:
        assert sock.selected_alpn_protocol() == "x-amzn-mqtt-ca"
        sock.sendall(connect_packet(NODE))
        attempt = adversary.wait_for_attempt(lambda a: a.client == client, WAIT_S)
    assert attempt.handshake_completed and attempt.alpn == "x-amzn-mqtt-ca"
    assert TLS_CASES["oversized_chain"].test_id == "TLS_Large_Size_Server_Cert"


def test_paho_refuses_unknown_ca_and_connects_when_careless(adversaries: dict[str, TlsAdversary], pki: LabPki) -> None:
    adversary = adversaries["unknown_ca"]
    strict = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=NODE)
    strict.tls_set(ca_certs=str(pki.ca_cert_path))
    with pytest.raises(ssl.SSLCertVerificationError):
        strict.connect("127.0.0.1", adversary.port)
    careless = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=NODE)
    careless.tls_set(cert_reqs=ssl.CERT_NONE)
    careless.tls_insecure_set(True)
    careless.connect("127.0.0.1", adversary.port, keepalive=30)
    sock = careless.socket()
    assert sock is not None
    client = f"127.0.0.1:{sock.getsockname()[1]}"
    careless.loop_start()
    try:
        attempt = adversary.wait_for_attempt(lambda a: a.client == client, WAIT_S)
    finally:
        careless.disconnect()
        careless.loop_stop()
    assert attempt.handshake_completed and attempt.mqtt_connect is not None
    assert (attempt.mqtt_connect.client_id, attempt.mqtt_connect.keepalive_s) == (NODE, 30)


def test_adversary_names_and_evidence_files(adversaries: dict[str, TlsAdversary]) -> None:
    assert {k: c.test_id for k, c in TLS_CASES.items()} == {
        "unknown_ca": "TLS_Unsecure_Server_Cert",
        "wrong_subject": "TLS_Incorrect_Subject_Name_Server_Cert",
        "expired": "TLS_Expired_Server_Cert",
        "oversized_chain": "TLS_Large_Size_Server_Cert",
    }
    for adversary in adversaries.values():
        assert adversary.cert_path.is_file() and adversary.key_path.stat().st_mode & 0o077 == 0
    assert (adversaries["unknown_ca"].state_dir / "rogue-ca.pem").is_file()


def test_rogue_ca_copies_the_lab_ca_name(adversaries: dict[str, TlsAdversary], pki: LabPki) -> None:
    rogue = x509.load_pem_x509_certificate((adversaries["unknown_ca"].state_dir / "rogue-ca.pem").read_bytes())
    assert rogue.subject == pki.ca_cert.subject and rogue.public_key() != pki.ca_cert.public_key()


def test_lab_ca_key_needed_for_lab_issued_kinds(pki: LabPki, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="ca_key_path"):
        TlsAdversary("expired", tmp_path, pki.ca_cert_path)


def test_taken_port_gives_a_clear_error(pki: LabPki, tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        with pytest.raises(AdversaryError, match=f"127.0.0.1:{port} is already in use"):
            TlsAdversary("unknown_ca", tmp_path, pki.ca_cert_path, port=port).start()


@pytest.mark.parametrize("level", [4, 5])
def test_parse_mqtt_connect(level: int) -> None:
    parsed = parse_mqtt_connect(connect_packet(NODE, keepalive=60, username="u", level=level))
    assert parsed is not None
    assert (parsed.protocol_name, parsed.protocol_level, parsed.client_id, parsed.keepalive_s) == ("MQTT", level, NODE, 60)
    assert parsed.username == "u" and parsed.clean_start and not parsed.password_present
    assert parse_mqtt_connect(connect_packet(NODE)[:-3]) is None
    assert parse_mqtt_connect(b"\x16\x03\x01\x00\x05hello") is None


# ------------------------------------------------------------------ a small TLS MQTT server for the proxies


def read_packet(sock: ssl.SSLSocket) -> bytes | None:
    """One whole MQTT packet, or None at EOF."""
    head = sock.recv(1)
    if not head:
        return None
    length, shift, raw_len = 0, 0, b""
    while True:
        b = sock.recv(1)
        if not b:
            return None
        raw_len += b
        length |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    return head + raw_len + body


class MiniBroker(socketserver.ThreadingTCPServer):
    """Answers CONNECT, SUBSCRIBE, QoS 1 PUBLISH and PINGREQ; records client CNs."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, ctx: ssl.SSLContext):
        self.ctx = ctx
        self.client_cns: list[str | None] = []
        super().__init__(("127.0.0.1", 0), MiniBrokerHandler)
        self.thread = threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def close(self) -> None:
        self.shutdown()
        self.server_close()


class MiniBrokerHandler(socketserver.BaseRequestHandler):
    server: MiniBroker

    def handle(self) -> None:
        self.request.settimeout(WAIT_S)
        try:
            sock = self.server.ctx.wrap_socket(self.request, server_side=True)
        except OSError:
            return
        cert = sock.getpeercert() or {}
        self.server.client_cns.append(next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None))
        with sock:
            while (packet := read_packet(sock)) is not None:
                kind = packet[0] >> 4
                if kind == 1:
                    sock.sendall(CONNACK)
                elif kind == 8:  # SUBSCRIBE: packet id follows the 2-byte fixed header (short packets)
                    sock.sendall(b"\x90\x03" + packet[2:4] + b"\x01")
                elif kind == 3 and (packet[0] >> 1) & 3 == 1:
                    n = int.from_bytes(packet[2:4], "big")
                    sock.sendall(b"\x40\x02" + packet[4 + n:6 + n])
                elif kind == 12:
                    sock.sendall(b"\xd0\x00")


@pytest.fixture(scope="module")
def broker(pki: LabPki) -> Iterator[MiniBroker]:
    pair = pki.server_cert("mini-broker")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pair.cert_path, pair.key_path)
    ctx.load_verify_locations(cafile=str(pki.ca_cert_path))
    ctx.verify_mode = ssl.CERT_OPTIONAL  # the opaque-proxy tests connect without a client certificate
    server = MiniBroker(ctx)
    yield server
    server.close()


# ------------------------------------------------------------------ opaque fault proxy


@TLS_VERSIONS
def test_pass_mode_forwards_and_records_times(broker: MiniBroker, pki: LabPki, tls_max: ssl.TLSVersion) -> None:
    with MqttFaultProxy("127.0.0.1", broker.port, "pass") as proxy:
        for _ in range(3):
            with tls_connect(proxy.port, verifying_context(pki, alpn=False, tls_max=tls_max)) as sock:
                sock.sendall(connect_packet(NODE))
                assert read_packet(sock) == CONNACK
        conns = proxy.wait_for_closed(3, WAIT_S)
    assert all(c.tls and c.handshake_at is not None and c.closed_by == "client" for c in conns)
    assert all(c.bytes_up > 0 and c.bytes_down > 0 and c.bytes_withheld == 0 for c in conns)
    times = proxy.attempt_times()
    assert times == sorted(times) and len(proxy.attempt_intervals()) == 2
    assert all(i > 0 for i in proxy.attempt_intervals())
    assert FAULT_MODES["pass"][0].test_id == "MQTT_Connect"


@TLS_VERSIONS
def test_withhold_after_handshake_swallows_connack(broker: MiniBroker, pki: LabPki, tls_max: ssl.TLSVersion) -> None:
    with MqttFaultProxy("127.0.0.1", broker.port, "withhold_after_handshake") as proxy:
        with tls_connect(proxy.port, verifying_context(pki, alpn=False, tls_max=tls_max)) as sock:  # the handshake itself passes
            sock.sendall(connect_packet(NODE))
            conn = proxy.wait_for(lambda cs: bool(cs) and cs[0].bytes_withheld >= len(CONNACK), WAIT_S,
                                  "the broker's CONNACK to reach the proxy")[0]
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):  # already swallowed: nothing is on its way
                sock.recv(1)
        closed = proxy.wait_for_closed(1, WAIT_S)[0]
    assert conn.handshake_at is not None and conn.withholding_since is not None
    assert closed.closed_by == "client"
    assert {c.test_id for c in proxy.cases} >= {"MQTT_Connect_Jitter_Backoff_Retries", "MQTT_No_Ack_PingResp"}


def test_withhold_later_lets_connack_through_then_goes_silent(broker: MiniBroker, pki: LabPki) -> None:
    with MqttFaultProxy("127.0.0.1", broker.port, "withhold_after_handshake", withhold_after_s=0.4) as proxy:
        with tls_connect(proxy.port, verifying_context(pki, alpn=False)) as sock:
            sock.sendall(connect_packet(NODE))
            assert read_packet(sock) == CONNACK  # within the first 0.4 s: passed on
            silent = proxy.wait_for(lambda cs: cs[0].withholding_since is not None, WAIT_S, "the broker to go silent")[0]
            sock.sendall(b"\xc0\x00")  # PINGREQ
            proxy.wait_for(lambda cs: cs[0].bytes_withheld > 0, WAIT_S, "the PINGRESP to be withheld")
            sock.settimeout(0.3)
            with pytest.raises(TimeoutError):  # already swallowed: nothing is on its way
                sock.recv(1)
    assert silent.handshake_at is not None and silent.withholding_since is not None
    assert silent.withholding_since - silent.handshake_at >= 0.4


@pytest.mark.parametrize("direction", ["client_to_server", "server_to_client"])
def test_drop_after_bytes(broker: MiniBroker, pki: LabPki, direction: str) -> None:
    with MqttFaultProxy("127.0.0.1", broker.port, "drop_after_bytes", drop_after_bytes=40,
                        direction=direction) as proxy:  # type: ignore[arg-type]
        with pytest.raises((ssl.SSLError, ConnectionError)):
            tls_connect(proxy.port, verifying_context(pki, alpn=False))
        conn = proxy.wait_for_closed(1, WAIT_S)[0]
    assert conn.closed_by == "proxy" and conn.handshake_at is None
    assert (conn.bytes_up if direction == "client_to_server" else conn.bytes_down) == 40


@TLS_VERSIONS
def test_drop_after_server_flight(broker: MiniBroker, pki: LabPki, tls_max: ssl.TLSVersion) -> None:
    with MqttFaultProxy("127.0.0.1", broker.port, "drop_after_server_flight") as proxy:
        try:
            sock = tls_connect(proxy.port, verifying_context(pki, alpn=False, tls_max=tls_max))
        except (ssl.SSLError, ConnectionError):
            pass  # TLS 1.2: the server's Finished never comes
        else:  # TLS 1.3: the client is done after its second flight, which the proxy dropped
            with sock, pytest.raises((ssl.SSLError, ConnectionError)):
                sock.sendall(connect_packet(NODE))
                assert sock.recv(1) == b""
                raise ConnectionError("closed")
        conn = proxy.wait_for_closed(1, WAIT_S)[0]
    assert conn.closed_by == "proxy" and conn.bytes_down > 0 and conn.handshake_at is None


def test_delay(broker: MiniBroker, pki: LabPki) -> None:
    with MqttFaultProxy("127.0.0.1", broker.port, "delay", delay_s=0.3) as proxy:
        with tls_connect(proxy.port, verifying_context(pki, alpn=False)) as sock:
            sock.sendall(connect_packet(NODE))
            start = time.monotonic()
            assert read_packet(sock) == CONNACK
            assert time.monotonic() - start >= 0.3


def test_unreachable_upstream_is_recorded(pki: LabPki) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]  # bound, not listening: connections are refused
        with MqttFaultProxy("127.0.0.1", port, "pass") as proxy:
            with pytest.raises((ssl.SSLError, ConnectionError)):
                tls_connect(proxy.port, verifying_context(pki, alpn=False))
            conn = proxy.wait_for_closed(1, WAIT_S)[0]
    assert not conn.upstream_connected and "cannot reach the broker" in (conn.error or "")


# ------------------------------------------------------------------ TLS-terminating proxy


@pytest.fixture
def terminating(broker: MiniBroker, pki: LabPki, request: pytest.FixtureRequest) -> Iterator[MqttTerminatingProxy]:
    node = pki.node_cert(NODE)
    server = pki.server_cert("mqtt-proxy")
    options = getattr(request, "param", {})
    proxy = MqttTerminatingProxy(
        "127.0.0.1", broker.port, server_cert_path=server.cert_path, server_key_path=server.key_path,
        ca_cert_path=pki.ca_cert_path, client_identities={NODE: (node.cert_path, node.key_path)},
        upstream_server_hostname="localhost", **options,
    )
    with proxy:
        yield proxy


@pytest.mark.parametrize("terminating", [{"withhold": {"SUBACK"}}], indirect=True)
def test_terminating_proxy_withholds_only_suback(terminating: MqttTerminatingProxy, pki: LabPki,
                                                 broker: MiniBroker) -> None:
    node = pki.node_cert(NODE)
    subscribed, published, connected = threading.Event(), threading.Event(), threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=NODE)
    client.tls_set(ca_certs=str(pki.ca_cert_path), certfile=str(node.cert_path), keyfile=str(node.key_path))
    client.on_connect = lambda *a: connected.set()
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_publish = lambda *a: published.set()
    client.connect("localhost", terminating.port)
    client.loop_start()
    try:
        assert connected.wait(WAIT_S), "no CONNACK through the proxy"
        _, sub_mid = client.subscribe(f"node/{NODE}/params/remote", qos=1)
        client.publish(f"node/{NODE}/params/local", b"{}", qos=1)
        assert published.wait(WAIT_S), "no PUBACK through the proxy"
        assert not subscribed.is_set()  # SUBACK came before PUBACK on the same stream and was swallowed
    finally:
        client.disconnect()
        client.loop_stop()
    packets = terminating.packets()
    withheld = [p for p in packets if p.action == "withheld"]
    assert [(p.type, p.packet_id) for p in withheld] == [("SUBACK", sub_mid)]
    assert {p.type for p in packets if p.action == "forwarded"} >= {"CONNECT", "CONNACK", "SUBSCRIBE", "PUBLISH", "PUBACK"}
    assert next(p for p in packets if p.type == "CONNECT").client_id == NODE
    assert terminating.connections()[0].node_id == NODE and NODE in broker.client_cns  # upstream saw the node's CN
    assert [c.test_id for c in terminating.cases] == ["MQTT_Subscribe_Retry_No_Suback"]


@pytest.mark.parametrize("terminating", [{"disconnect_after_connack": True}], indirect=True)
def test_terminating_proxy_disconnects_after_connack(terminating: MqttTerminatingProxy, pki: LabPki) -> None:
    node = pki.node_cert(NODE)
    ctx = verifying_context(pki)
    ctx.load_cert_chain(node.cert_path, node.key_path)
    with tls_connect(terminating.port, ctx) as sock:
        sock.sendall(connect_packet(NODE))
        assert read_packet(sock) == CONNACK
        assert read_packet(sock) is None  # then the server side hangs up
    conn = terminating.wait_for_closed(1, WAIT_S)[0]
    assert conn.closed_by == "proxy"


def test_terminating_proxy_refuses_unknown_identity(terminating: MqttTerminatingProxy, pki: LabPki) -> None:
    stranger = pki.node_cert("node-stranger")
    ctx = verifying_context(pki)
    ctx.load_cert_chain(stranger.cert_path, stranger.key_path)
    with tls_connect(terminating.port, ctx) as sock:
        sock.sendall(connect_packet("node-stranger"))
        assert read_packet(sock) is None
    conn = terminating.wait_for_closed(1, WAIT_S)[0]
    assert conn.node_id == "node-stranger" and "not an identity" in (conn.error or "")


def test_terminating_proxy_rejects_non_ack_withholding(pki: LabPki) -> None:
    with pytest.raises(ValueError, match="cannot withhold"):
        MqttTerminatingProxy("127.0.0.1", 1, server_cert_path=Path("x"), server_key_path=Path("y"),
                             ca_cert_path=pki.ca_cert_path, client_identities={}, withhold={"PUBLISH"})

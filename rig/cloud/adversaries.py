"""Device-Advisor-style adversaries: listeners that test how a node treats its server.

DESIGN.md "Cloud" → Adversaries: "extra listeners that present a certificate from an
unknown CA, a wrong subject name, an expired one, an oversized chain; an MQTT fault
proxy that withholds CONNACK/PUBACK/SUBACK/PINGRESP or drops the connection — for
device-side TLS and backoff tests, named after their AWS IoT Device Advisor
equivalents." Test ids and pass criteria: shared/reference/anchors-and-catalogues.md
§(d) (awsdocs/aws-iot-docs ``developerguide/device-advisor-tests-tls.md``,
``device-advisor-tests-mqtt.md``).

Three kinds of adversary, each a real server on loopback with its own port:

:class:`TlsAdversary`
    A TLS server presenting a deliberately bad (or deliberately large) certificate
    chain; it records every connection attempt: whether the client completed the
    handshake, the TLS alert the client sent if it refused, SNI and ALPN, and what it
    sent afterwards (parsed as an MQTT CONNECT when it is one). A node that verifies
    its server refuses ``unknown_ca``, ``wrong_subject`` and ``expired`` and completes
    ``oversized_chain``. See :data:`TLS_CASES`.

:class:`MqttFaultProxy`
    A TCP proxy between a node and the real broker that never terminates TLS. It sees
    only TLS records (5-byte plaintext headers, encrypted bodies), so it can drop the
    connection after N bytes or after the server's first handshake flight, withhold
    every server→client byte from the first application-data record on (≈ no CONNACK),
    or from some seconds later (≈ the broker stops answering: no PUBACK/SUBACK/PINGRESP
    at all), and delay server→client bytes; it records each connection's timestamps so
    a backoff test can measure the intervals. See :data:`FAULT_MODES`.

:class:`MqttTerminatingProxy`
    Withholding *one* MQTT packet type (only PUBACK, only SUBACK, only PINGRESP) needs
    the plaintext, so this proxy terminates the node's TLS with a lab-CA server
    certificate and opens its own mutual-TLS connection to the broker **as that node**,
    with the node's certificate and key. That is sound only where the lab issued the
    node's identity (the rig's PKI generated the key that went into the node's ``fctry``
    partition), never for a board whose key was generated on-device or by Espressif's
    claiming service: there the key is not available and only :class:`MqttFaultProxy`
    applies. Guards: the node must present a client certificate from the lab CA, and
    the proxy connects upstream only with the identity whose CN equals that
    certificate's CN (so a node cannot become another node through the proxy); the
    CONNECT passes unchanged, so the broker still checks client id == CN; the broker's
    certificate is verified against the lab CA. What it cannot stand for: any TLS-level
    test (the node's TLS peer is the proxy) — use :class:`TlsAdversary` for those.

Nothing recorded holds a password or an MQTT payload: CONNECT keeps the client id,
username (RainMaker's is a public "PPI" string), flags and keepalive; other packets
keep type, packet id, QoS, DUP, topic and length.
"""

from __future__ import annotations

import copy
import datetime as dt
import errno
import ipaddress
import itertools
import logging
import os
import selectors
import socket
import ssl
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Literal, Self, TypeVar, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

__all__ = [
    "FAULT_MODES",
    "TERMINATING_CASES",
    "TLS_CASES",
    "AdversaryError",
    "AdversaryKind",
    "DeviceAdvisorCase",
    "FaultMode",
    "MqttConnect",
    "MqttFaultProxy",
    "MqttPacket",
    "MqttTerminatingProxy",
    "ProxyConnection",
    "RogueServerCertificate",
    "TerminatedConnection",
    "TlsAdversary",
    "TlsAttempt",
    "issue_unknown_ca_certificate",
    "parse_mqtt_connect",
]

log = logging.getLogger(__name__)

AdversaryKind = Literal["unknown_ca", "wrong_subject", "expired", "oversized_chain"]
FaultMode = Literal["pass", "drop_after_bytes", "drop_after_server_flight", "withhold_after_handshake", "delay"]
T = TypeVar("T")

_IO_TIMEOUT_S = 30.0
_DEFAULT_ALPN = ("x-amzn-mqtt-ca", "mqtt")  # RainMaker on 443 offers x-amzn-mqtt-ca (rainmaker-protocol.md §1.1)
_WRONG_NAME = "wrong-subject.invalid"  # RFC 6761 .invalid: never resolves, never a real server name
_WRONG_IP = "192.0.2.1"  # RFC 5737 TEST-NET-1


class AdversaryError(RuntimeError):
    """An adversary could not start (port taken, CA unreadable …)."""


@dataclass(frozen=True)
class DeviceAdvisorCase:
    """An AWS IoT Device Advisor test case an adversary stands for."""

    test_id: str
    display_name: str
    device_should: str
    """What a conforming node does, in Device Advisor's terms."""
    approximation: str = ""
    """How the rig's version differs from Device Advisor's, if it does."""


TLS_CASES: dict[AdversaryKind, DeviceAdvisorCase] = {
    "unknown_ca": DeviceAdvisorCase(
        "TLS_Unsecure_Server_Cert",
        "Not Signed By Recognized CA",
        "refuse the handshake (close the connection)",
        "the rogue CA copies the lab CA's subject name, so a client that matches issuers by name only is caught too "
        "(OpenSSL then reports 'certificate signature failure' rather than 'unable to get local issuer certificate')",
    ),
    "wrong_subject": DeviceAdvisorCase(
        "TLS_Incorrect_Subject_Name_Server_Cert",
        "Incorrect Subject CN / SAN",
        "refuse the handshake (close the connection)",
        f"the certificate is issued by the lab CA for {_WRONG_NAME} / {_WRONG_IP} only",
    ),
    "expired": DeviceAdvisorCase(
        "TLS_Expired_Server_Cert",
        "Expired server certificate",
        "refuse the handshake and send a TLS alert (closing without an alert is 'pass with warnings')",
        "issued by the lab CA, expired one day before it was made (by real time: the node needs SNTP time)",
    ),
    "oversized_chain": DeviceAdvisorCase(
        "TLS_Large_Size_Server_Cert",
        "TLS large Size Server Certificate",
        "complete the handshake",
        "a valid leaf issued by the lab CA, padded to chain_bytes DER bytes with a non-critical private extension",
    ),
}

FAULT_MODES: dict[FaultMode, tuple[DeviceAdvisorCase, ...]] = {
    "pass": (DeviceAdvisorCase("MQTT_Connect", "MQTT Connect", "send CONNECT; the proxy records when"),),
    "withhold_after_handshake": (
        DeviceAdvisorCase(
            "MQTT_Connect_Jitter_Backoff_Retries",
            "MQTT Connect Jitter Backoff Retries",
            "retry with jittered exponential backoff while CONNACK never comes",
            "with withhold_after_s=0 every server byte after the TLS handshake is withheld: CONNACK and, in TLS 1.3, "
            "the NewSessionTicket records. Device Advisor grants CONNACK on some attempts; this proxy withholds on all",
        ),
        DeviceAdvisorCase(
            "MQTT_Connect_Exponential_Backoff_Retries",
            "MQTT Connect Exponential Backoff Retries",
            "retry with growing intervals while CONNACK never comes",
            "as above",
        ),
        DeviceAdvisorCase(
            "MQTT_No_Ack_PingResp",
            "MQTT No Ack PingResp",
            "drop the connection when the broker stops answering (within 1.5 × keepalive)",
            "with withhold_after_s > 0 the server goes silent that long after the handshake: CONNACK and early acks "
            "pass, then nothing does — PINGRESP, PUBACK and SUBACK alike",
        ),
    ),
    "drop_after_bytes": (
        DeviceAdvisorCase(
            "MQTT_Long_Duration",
            "MQTT Long Duration (intermittent connectivity phase)",
            "reconnect after the connection breaks",
            "a cut after N bytes in one direction; the proxy cannot tell which MQTT packet the byte belongs to",
        ),
    ),
    "drop_after_server_flight": (
        DeviceAdvisorCase(
            "MQTT_Reconnect_Backoff_Retries_On_Server_Disconnect",
            "MQTT Reconnect Backoff Retries On Server Disconnect",
            "back off between reconnects (linear or constant backoff fails)",
            "the server side disconnects during the TLS handshake (after its first flight; a TLS 1.3 client sees it "
            "just after its handshake), never after an MQTT session was up",
        ),
    ),
    "delay": (),
}
"""Which Device Advisor cases each :class:`MqttFaultProxy` mode stands for. ``delay``
stands for none: it is latency injection for keepalive and timeout tests.

Not possible without terminating TLS (see :class:`MqttTerminatingProxy`):
``MQTT_Publish_Retry_No_Puback``, ``MQTT_Subscribe_Retry_No_Suback``,
``MQTT_ReconnectionAfterSuccessfulConnection`` (disconnect right after CONNACK), and
``MQTT_No_Ack_PingResp`` with PINGRESP alone withheld."""

TERMINATING_CASES: dict[str, DeviceAdvisorCase] = {
    "CONNACK": DeviceAdvisorCase(
        "MQTT_Connect_Jitter_Backoff_Retries",
        "MQTT Connect Jitter Backoff Retries",
        "retry with jittered exponential backoff while CONNACK never comes",
    ),
    "PUBACK": DeviceAdvisorCase(
        "MQTT_Publish_Retry_No_Puback", "MQTT Publish Retry No Puback", "republish with the same packet id (DUP set) without disconnecting"
    ),
    "SUBACK": DeviceAdvisorCase("MQTT_Subscribe_Retry_No_Suback", "MQTT Subscribe Retry No Suback", "re-subscribe with the same packet id"),
    "PINGRESP": DeviceAdvisorCase("MQTT_No_Ack_PingResp", "MQTT No Ack PingResp", "drop the connection within 1.5 × keepalive"),
    "disconnect_after_connack": DeviceAdvisorCase(
        "MQTT_ReconnectionAfterSuccessfulConnection",
        "MQTT Reconnection After Successful Connection",
        "wait at least 1 s before reconnecting",
    ),
}
"""Which case each withheld packet type (or ``disconnect_after_connack``) of
:class:`MqttTerminatingProxy` stands for."""


# --------------------------------------------------------------------------- MQTT parsing

_PACKET_TYPES = {
    1: "CONNECT",
    2: "CONNACK",
    3: "PUBLISH",
    4: "PUBACK",
    5: "PUBREC",
    6: "PUBREL",
    7: "PUBCOMP",
    8: "SUBSCRIBE",
    9: "SUBACK",
    10: "UNSUBSCRIBE",
    11: "UNSUBACK",
    12: "PINGREQ",
    13: "PINGRESP",
    14: "DISCONNECT",
    15: "AUTH",
}
_WITHHOLDABLE = frozenset({"CONNACK", "PUBACK", "PUBREC", "PUBCOMP", "SUBACK", "UNSUBACK", "PINGRESP"})
_MAX_PACKET = 256 * 1024 + 5  # AWS IoT's payload limit is 128 KB (MQTT_Client_Puback_QoS1 PAYLOAD_SIZE); room to spare


@dataclass(frozen=True)
class MqttConnect:
    """What a CONNECT packet says (MQTT 3.1.1 §3.1, MQTT 5.0 §3.1); no password."""

    protocol_name: str
    protocol_level: int
    client_id: str
    keepalive_s: int
    clean_start: bool
    username: str | None
    password_present: bool
    will_topic: str | None


def _varint(data: bytes, pos: int) -> tuple[int, int] | None:
    """An MQTT Variable Byte Integer at *pos* → (value, next pos); None if incomplete."""
    value, shift = 0, 0
    for i in range(4):
        if pos + i >= len(data):
            return None
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos + i + 1
        shift += 7
    raise ValueError("MQTT remaining length longer than 4 bytes")


def _mqtt_packet_length(data: bytes) -> int | None:
    """Bytes in the first complete MQTT packet at the start of *data*; None if incomplete."""
    if len(data) < 2:
        return None
    parsed = _varint(data, 1)
    if parsed is None:
        return None
    remaining, start = parsed
    return start + remaining if len(data) >= start + remaining else None


def parse_mqtt_connect(data: bytes) -> MqttConnect | None:
    """The CONNECT at the start of *data*, or None if *data* does not start with a
    complete, well-formed CONNECT (MQTT 3.1 ``MQIsdp``, 3.1.1 and 5.0)."""
    try:
        if not data or data[0] != 0x10:
            return None
        parsed = _varint(data, 1)
        if parsed is None:
            return None
        remaining, pos = parsed
        end = pos + remaining
        if len(data) < end:
            return None

        def u16(at: int) -> int:
            if at + 2 > end:
                raise ValueError("truncated")
            return int.from_bytes(data[at : at + 2], "big")

        def string(at: int) -> tuple[str, int]:
            n = u16(at)
            if at + 2 + n > end:
                raise ValueError("truncated")
            return data[at + 2 : at + 2 + n].decode("utf-8"), at + 2 + n

        name, pos = string(pos)
        level, flags = data[pos], data[pos + 1]
        keepalive = u16(pos + 2)
        pos += 4
        if level == 5:  # MQTT 5: CONNECT properties
            props = _varint(data, pos)
            if props is None:
                return None
            pos = props[1] + props[0]
        client_id, pos = string(pos)
        will_topic = None
        if flags & 0x04:
            if level == 5:
                props = _varint(data, pos)
                if props is None:
                    return None
                pos = props[1] + props[0]
            will_topic, pos = string(pos)
            pos += 2 + u16(pos)  # will payload
        username = None
        if flags & 0x80:
            username, pos = string(pos)
        return MqttConnect(name, level, client_id, keepalive, bool(flags & 0x02), username, bool(flags & 0x40), will_topic)
    except (ValueError, IndexError, UnicodeDecodeError):
        return None


@dataclass(frozen=True)
class MqttPacket:
    """One MQTT control packet seen by :class:`MqttTerminatingProxy` (no payload)."""

    at: float
    """``time.monotonic()`` when the proxy read it."""
    direction: Literal["node_to_broker", "broker_to_node"]
    type: str
    length: int
    action: Literal["forwarded", "withheld"]
    packet_id: int | None = None
    qos: int | None = None
    dup: bool = False
    topic: str | None = None
    client_id: str | None = None


def _describe_packet(
    raw: bytes, direction: Literal["node_to_broker", "broker_to_node"], action: Literal["forwarded", "withheld"]
) -> MqttPacket:
    kind = _PACKET_TYPES.get(raw[0] >> 4, f"type{raw[0] >> 4}")
    flags = raw[0] & 0x0F
    parsed = _varint(raw, 1)
    body = raw[parsed[1] :] if parsed else b""
    packet_id = qos = topic = client_id = None
    dup = False
    try:
        if kind == "PUBLISH":
            qos, dup = (flags >> 1) & 0x03, bool(flags & 0x08)
            n = int.from_bytes(body[:2], "big")
            topic = body[2 : 2 + n].decode("utf-8", errors="replace")
            if qos:
                packet_id = int.from_bytes(body[2 + n : 4 + n], "big")
        elif kind in {"PUBACK", "PUBREC", "PUBREL", "PUBCOMP", "SUBSCRIBE", "SUBACK", "UNSUBSCRIBE", "UNSUBACK"}:
            packet_id = int.from_bytes(body[:2], "big") if len(body) >= 2 else None
        elif kind == "CONNECT":
            connect = parse_mqtt_connect(raw)
            client_id = connect.client_id if connect else None
    except (ValueError, IndexError):
        pass  # a malformed packet is still forwarded; the broker judges it
    return MqttPacket(time.monotonic(), direction, kind, len(raw), action, packet_id, qos, dup, topic, client_id)


# --------------------------------------------------------------------------- certificates


def _load_ca(cert_path: Path, key_path: Path | None) -> tuple[x509.Certificate, object | None]:
    try:
        cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
        key = serialization.load_pem_private_key(Path(key_path).read_bytes(), password=None) if key_path else None
    except (OSError, ValueError, TypeError) as exc:
        raise AdversaryError(f"cannot read the lab CA ({cert_path}, {key_path}): {exc}") from None
    return cert, key


def _names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in hosts:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            out.append(x509.DNSName(host))
    return out


def _der_octet_string(content: bytes) -> bytes:
    n = len(content)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return b"\x04" + length + content


_PADDING_OID = x509.ObjectIdentifier(f"2.25.{uuid.uuid5(uuid.NAMESPACE_URL, 'rig:adversaries:padding').int}")


def _issue(
    subject: x509.Name,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Name,
    issuer_key: object,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    hosts: Sequence[str] = (),
    ca: bool = False,
    padding: int = 0,
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    builder = builder.add_extension(
        x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=not ca,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=ca,
            crl_sign=ca,
            encipher_only=False,
            decipher_only=False,
        ),
        critical=True,
    )
    if not ca:
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(_names(hosts)), critical=False)
    if padding > 0:
        builder = builder.add_extension(x509.UnrecognizedExtension(_PADDING_OID, _der_octet_string(b"\xa5" * padding)), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())  # type: ignore[arg-type]


def _cn(name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rig adversary"), x509.NameAttribute(NameOID.COMMON_NAME, name)])


def _write_private(path: Path, data: bytes) -> None:
    """Write a private key readable by its owner only."""
    path.unlink(missing_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(data)


_ROGUE_CA_FILE = "rogue-ca.pem"
_CHAIN_FILE = "server-chain.pem"
_KEY_FILE = "server.key"


@dataclass(frozen=True)
class RogueServerCertificate:
    """A server certificate from a CA nodes do not trust (Device Advisor's
    ``TLS_Unsecure_Server_Cert``), by path. ``repr`` shows paths only."""

    cert_path: Path
    """The server certificate (a chain of one), PEM."""
    key_path: Path
    """Its private key, PEM, mode 0600."""
    rogue_ca_path: Path
    """The rogue CA certificate, PEM: a client trusting it (and only it) verifies the server."""


def issue_unknown_ca_certificate(
    ca_cert_path: Path, out_dir: Path, hosts: Sequence[str], *, subject: x509.Name | None = None
) -> RogueServerCertificate:
    """A server certificate for *hosts* (DNS or IP SANs) issued by a fresh rogue CA that
    copies the lab CA's subject name, so the issuer is wrong only by its key — what
    :class:`TlsAdversary` ``unknown_ca`` presents. *subject* defaults to ``CN = hosts[0]``.
    Writes ``rogue-ca.pem``, ``server-chain.pem`` and ``server.key`` into *out_dir*."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ca_cert, _ = _load_ca(Path(ca_cert_path), None)
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    leaf_subject = subject if subject is not None else _cn(hosts[0] if hosts else "localhost")
    return _write_unknown_ca_chain(ca_cert, out, hosts, leaf_subject, leaf_key, dt.datetime.now(dt.UTC))


def _write_unknown_ca_chain(
    ca_cert: x509.Certificate,
    out: Path,
    hosts: Sequence[str],
    leaf_subject: x509.Name,
    leaf_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
) -> RogueServerCertificate:
    year = dt.timedelta(days=365)
    rogue_key = ec.generate_private_key(ec.SECP256R1())
    rogue = _issue(
        ca_cert.subject,
        rogue_key.public_key(),
        ca_cert.subject,
        rogue_key,
        not_before=now - dt.timedelta(days=1),
        not_after=now + year,
        ca=True,
    )
    result = RogueServerCertificate(out / _CHAIN_FILE, out / _KEY_FILE, out / _ROGUE_CA_FILE)
    result.rogue_ca_path.write_bytes(rogue.public_bytes(serialization.Encoding.PEM))
    leaf = _issue(
        leaf_subject,
        leaf_key.public_key(),
        rogue.subject,
        rogue_key,
        not_before=now - dt.timedelta(days=1),
        not_after=now + year,
        hosts=hosts,
    )
    _write_private(
        result.key_path, leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    result.cert_path.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    return result


# --------------------------------------------------------------------------- listener plumbing


class _Listener:
    """A listening socket served by one thread; each accepted connection gets its own
    thread running *handle*. ``stop`` wakes the accept loop through a socket pair,
    shuts every open connection down and joins the threads."""

    def __init__(self, what: str, host: str, port: int, handle: Callable[[socket.socket, tuple[str, int]], None]):
        self.what = what
        self.host = host
        self.requested_port = port
        self._handle = handle
        self._sock: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._open: set[socket.socket] = set()
        self._workers: list[threading.Thread] = []
        self._lock = threading.Lock()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def port(self) -> int:
        if self._sock is None:
            raise AdversaryError(f"{self.what} is not running; call start() first")
        return int(self._sock.getsockname()[1])

    def start(self) -> None:
        if self._sock is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.bind((self.host, self.requested_port))
            sock.listen(64)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise AdversaryError(
                    f"cannot start {self.what}: {self.host}:{self.requested_port} is already in use — stop what holds it "
                    f"(`ss -ltnp 'sport = :{self.requested_port}'`) or use another port (0 picks a free one)"
                ) from None
            raise AdversaryError(f"cannot start {self.what} on {self.host}:{self.requested_port}: {exc}") from None
        sock.setblocking(False)
        self._sock = sock
        self._wake_r, self._wake_w = socket.socketpair()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._accept_loop, name=f"{self.what}-accept", daemon=True)
        self._thread.start()

    def _accept_loop(self) -> None:
        assert self._sock is not None and self._wake_r is not None
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            sel.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        conn, addr = self._sock.accept()
                    except BlockingIOError:
                        continue
                    conn.setblocking(True)
                    worker = threading.Thread(target=self._run, args=(conn, addr), name=f"{self.what}-conn", daemon=True)
                    with self._lock:
                        self._open.add(conn)
                        self._workers = [w for w in self._workers if w.is_alive()]
                        self._workers.append(worker)
                    worker.start()

    def _run(self, conn: socket.socket, addr: tuple[str, int]) -> None:
        try:
            self._handle(conn, addr)
        except OSError as exc:  # a peer vanished mid-way; the handler recorded what it could
            log.debug("%s: connection from %s ended: %s", self.what, addr, exc)
        finally:
            self.forget(conn)
            conn.close()

    def adopt(self, sock: socket.socket) -> None:
        """Shut *sock* (e.g. an upstream connection) down too when stopping."""
        with self._lock:
            self._open.add(sock)

    def forget(self, sock: socket.socket) -> None:
        with self._lock:
            self._open.discard(sock)

    def stop(self) -> None:
        if self._sock is None:
            return
        self._stopping.set()
        assert self._wake_w is not None and self._wake_r is not None
        self._wake_w.send(b"x")
        if self._thread is not None:
            self._thread.join()
        self._sock.close()
        self._sock = None
        with self._lock:
            open_socks, workers = list(self._open), list(self._workers)
        for s in open_socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected any more
        for w in workers:
            w.join(timeout=_IO_TIMEOUT_S)
        self._wake_r.close()
        self._wake_w.close()


class _Served:
    """Lifecycle shared by the adversaries that serve through one :class:`_Listener`
    (set as ``self._listener``): start/stop, a context manager, host and port."""

    _listener: _Listener

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def host(self) -> str:
        return self._listener.host

    @property
    def port(self) -> int:
        return self._listener.port

    def start(self) -> None:
        self._listener.start()

    def stop(self) -> None:
        self._listener.stop()


class _Recorder(Generic[T]):
    """A list of records that threads append to and tests wait on."""

    def __init__(self) -> None:
        self._items: list[T] = []
        self._cond = threading.Condition()

    def add(self, item: T) -> int:
        with self._cond:
            self._items.append(item)
            self._cond.notify_all()
            return len(self._items) - 1

    def update(self, index: int, item: T) -> None:
        with self._cond:
            self._items[index] = item
            self._cond.notify_all()

    def snapshot(self) -> list[T]:
        with self._cond:
            return [copy.copy(i) for i in self._items]

    def wait(self, predicate: Callable[[list[T]], bool], timeout: float, what: str) -> list[T]:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(self._items):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"waited {timeout:.1f} s for {what}; recorded so far: {self._items[-5:]}")
                self._cond.wait(remaining)
            return [copy.copy(i) for i in self._items]


def _intervals(times: Sequence[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


# --------------------------------------------------------------------------- TLS adversary


@dataclass(frozen=True)
class TlsAttempt:
    """One connection to a :class:`TlsAdversary`."""

    client: str
    started_at: float
    """``time.time()`` of the accept."""
    started_monotonic: float
    handshake_completed: bool
    failure: str | None = None
    """Why the handshake did not complete: OpenSSL's reason or ``timeout`` / ``closed``."""
    client_alert: str | None = None
    """The TLS alert the client sent when it refused (e.g. ``TLSV1_ALERT_UNKNOWN_CA``);
    None if it just closed — Device Advisor's expired-cert case wants an alert."""
    tls_version: str | None = None
    cipher: str | None = None
    sni: str | None = None
    alpn: str | None = None
    received: bytes = b""
    """Application data the client sent after the handshake (up to the first complete
    MQTT packet, ``max_receive`` bytes or ``read_timeout_s``)."""
    mqtt_connect: MqttConnect | None = None
    ended_at: float | None = None


class TlsAdversary(_Served):
    """A TLS listener presenting a bad (or large) certificate chain; see :data:`TLS_CASES`.

    *ca_cert_path* / *ca_key_path*: the lab CA that nodes trust (``LabPki``). The
    ``wrong_subject``, ``expired`` and ``oversized_chain`` chains are issued by it, so
    the only thing wrong with them is the one thing under test; ``unknown_ca`` is
    issued by a fresh rogue CA that copies the lab CA's subject name (the lab CA key
    is not needed for it). *hosts* are the names a good certificate would carry (the
    names nodes dial). *chain_bytes* sizes the ``oversized_chain`` certificate (DER
    bytes; one padded leaf, see :meth:`_oversized_chain`): Device Advisor asks for
    ~20 % more than the production chain; the default 8 KiB is about twice AWS IoT
    Core's and fits ESP-IDF's default 16 KiB mbedTLS input buffer — set it from the
    product's own chain.

    The certificate, key and (for ``unknown_ca``) the rogue CA are written to
    ``<state_dir>/<kind>/`` as evidence of what was presented.
    """

    def __init__(
        self,
        kind: AdversaryKind,
        state_dir: Path,
        ca_cert_path: Path,
        ca_key_path: Path | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        hosts: Sequence[str] = ("localhost", "127.0.0.1"),
        chain_bytes: int = 8192,
        alpn: Sequence[str] = _DEFAULT_ALPN,
        read_timeout_s: float = 5.0,
        max_receive: int = 64 * 1024,
    ):
        if kind not in TLS_CASES:
            raise ValueError(f"unknown TLS adversary kind {kind!r}; one of {', '.join(TLS_CASES)}")
        if kind != "unknown_ca" and ca_key_path is None:
            raise ValueError(f"the {kind} adversary's chain is issued by the lab CA: pass ca_key_path")
        self.kind = kind
        self.case = TLS_CASES[kind]
        self.state_dir = Path(state_dir) / kind
        self.ca_cert_path = Path(ca_cert_path)
        self.ca_key_path = Path(ca_key_path) if ca_key_path else None
        self.hosts = tuple(hosts)
        self.chain_bytes = chain_bytes
        self.alpn = tuple(alpn)
        self.read_timeout_s = read_timeout_s
        self.max_receive = max_receive
        self.cert_path = self.state_dir / _CHAIN_FILE
        self.key_path = self.state_dir / _KEY_FILE
        self._listener = _Listener(f"tls-adversary-{kind}", host, port, self._handle)
        self._attempts: _Recorder[TlsAttempt] = _Recorder()
        self._sni: dict[int, str] = {}
        self._sni_lock = threading.Lock()
        self._context: ssl.SSLContext | None = None

    def __repr__(self) -> str:
        return f"TlsAdversary({self.kind}, {self.case.test_id})"

    def start(self) -> None:
        """Make the chain (first start only) and listen."""
        if self._context is None:
            self._make_chain()
            self._context = self._tls_context()
        self._listener.start()
        log.info("TLS adversary %s (%s) on %s:%d", self.kind, self.case.test_id, self.host, self.port)

    def attempts(self) -> list[TlsAttempt]:
        """Every finished connection attempt so far, oldest first."""
        return self._attempts.snapshot()

    def wait_for_attempts(self, count: int = 1, timeout: float = 10.0) -> list[TlsAttempt]:
        """Block until *count* connection attempts have finished; return all of them."""
        return self._attempts.wait(
            lambda items: len(items) >= count, timeout, f"{count} finished connection(s) to the {self.kind} adversary"
        )

    def wait_for_attempt(self, predicate: Callable[[TlsAttempt], bool], timeout: float = 10.0) -> TlsAttempt:
        """Block until a finished attempt satisfies *predicate* (e.g. ``a.client == "127.0.1.3:50123"``)."""
        found = self._attempts.wait(
            lambda items: any(predicate(a) for a in items), timeout, f"a matching connection to the {self.kind} adversary"
        )
        return next(a for a in found if predicate(a))

    def attempt_intervals(self) -> list[float]:
        """Seconds between consecutive connection attempts (for backoff checks)."""
        return _intervals([a.started_monotonic for a in self.attempts()])

    # ------------------------------------------------------------------ internals

    def _make_chain(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        ca_cert, ca_key = _load_ca(self.ca_cert_path, self.ca_key_path)
        now = dt.datetime.now(dt.UTC)
        year = dt.timedelta(days=365)
        leaf_key = ec.generate_private_key(ec.SECP256R1())
        leaf_subject = _cn(self.hosts[0] if self.hosts else "localhost")
        chain: list[x509.Certificate]
        if self.kind == "unknown_ca":
            _write_unknown_ca_chain(ca_cert, self.state_dir, self.hosts, leaf_subject, leaf_key, now)
            return
        if self.kind == "wrong_subject":
            chain = [
                _issue(
                    _cn(_WRONG_NAME),
                    leaf_key.public_key(),
                    ca_cert.subject,
                    ca_key,
                    not_before=now - dt.timedelta(days=1),
                    not_after=now + year,
                    hosts=(_WRONG_NAME, _WRONG_IP),
                )
            ]
        elif self.kind == "expired":
            chain = [
                _issue(
                    leaf_subject,
                    leaf_key.public_key(),
                    ca_cert.subject,
                    ca_key,
                    not_before=now - dt.timedelta(days=31),
                    not_after=now - dt.timedelta(days=1),
                    hosts=self.hosts,
                )
            ]
        else:
            chain = self._oversized_chain(ca_cert, ca_key, leaf_key, leaf_subject, now)
        _write_private(
            self.key_path,
            leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        )
        self.cert_path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain))

    def _oversized_chain(
        self, ca_cert: x509.Certificate, ca_key: object, leaf_key: ec.EllipticCurvePrivateKey, leaf_subject: x509.Name, now: dt.datetime
    ) -> list[x509.Certificate]:
        """One leaf issued by the lab CA, padded to ``chain_bytes`` DER bytes. A single
        certificate, not a longer chain: the lab CA carries pathLenConstraint 0
        (rig.cloud.pki), so an intermediate under it would be refused for that reason
        instead of being a test of size — and Device Advisor's case is one large
        server certificate."""
        padding = 0
        for _ in range(4):  # DER length fields grow by a byte or two as the padding grows
            leaf = _issue(
                leaf_subject,
                leaf_key.public_key(),
                ca_cert.subject,
                ca_key,
                hosts=self.hosts,
                padding=padding,
                not_before=now - dt.timedelta(days=1),
                not_after=now + dt.timedelta(days=365),
            )
            size = len(leaf.public_bytes(serialization.Encoding.DER))
            if size >= self.chain_bytes:
                break
            padding += self.chain_bytes - size
        return [leaf]

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(self.cert_path, self.key_path)
        if self.alpn:
            context.set_alpn_protocols(list(self.alpn))

        def remember_sni(sock: ssl.SSLObject | ssl.SSLSocket, name: str | None, _ctx: ssl.SSLContext) -> None:
            if name:
                with self._sni_lock:
                    self._sni[id(sock)] = name

        context.sni_callback = remember_sni
        return context

    def _handle(self, raw: socket.socket, addr: tuple[str, int]) -> None:
        assert self._context is not None
        started, mono = time.time(), time.monotonic()
        client = f"{addr[0]}:{addr[1]}"
        raw.settimeout(self.read_timeout_s)
        sock = self._context.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        self._listener.adopt(sock)
        try:
            try:
                sock.do_handshake()
            except (TimeoutError, ssl.SSLError, OSError) as exc:
                reason = "timeout" if isinstance(exc, TimeoutError) else (getattr(exc, "reason", None) or type(exc).__name__)
                alert = reason if isinstance(reason, str) and "ALERT" in reason else None
                with self._sni_lock:
                    sni = self._sni.pop(id(sock), None)
                self._attempts.add(
                    TlsAttempt(client, started, mono, False, failure=str(reason), client_alert=alert, sni=sni, ended_at=time.monotonic())
                )
                return
            with self._sni_lock:
                sni = self._sni.pop(id(sock), None)
            received = self._read_first_packet(sock)
            cipher = sock.cipher()
            self._attempts.add(
                TlsAttempt(
                    client,
                    started,
                    mono,
                    True,
                    tls_version=sock.version(),
                    cipher=cipher[0] if cipher else None,
                    sni=sni,
                    alpn=sock.selected_alpn_protocol(),
                    received=received,
                    mqtt_connect=parse_mqtt_connect(received),
                    ended_at=time.monotonic(),
                )
            )
        finally:
            self._listener.forget(sock)
            sock.close()

    def _read_first_packet(self, sock: ssl.SSLSocket) -> bytes:
        data = b""
        while len(data) < self.max_receive:
            try:
                chunk = sock.recv(min(16384, self.max_receive - len(data)))
            except (TimeoutError, ssl.SSLError, OSError):
                break
            if not chunk:
                break
            data += chunk
            try:
                if _mqtt_packet_length(data) is not None:
                    break
            except ValueError:
                continue  # not MQTT: keep reading until timeout, EOF or max_receive
        return data


# --------------------------------------------------------------------------- opaque fault proxy


@dataclass
class ProxyConnection:
    """One node connection through :class:`MqttFaultProxy` (times are ``time.monotonic()``)."""

    index: int
    client: str
    accepted_at: float
    accepted_wall: float
    upstream_connected: bool = False
    tls: bool | None = None
    """Whether the client spoke TLS records (None until it sent something)."""
    handshake_at: float | None = None
    """When the client sent its first application-data record: the TLS handshake is over."""
    withholding_since: float | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    bytes_withheld: int = 0
    upstream_closed_at: float | None = None
    closed_at: float | None = None
    closed_by: Literal["client", "upstream", "proxy"] | None = None
    error: str | None = None


class _TlsRecords:
    """Splits one direction of an opaque TLS stream into records by their plaintext
    5-byte headers (RFC 8446 §5.1: type, legacy version 0x03xx, length)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self.is_tls: bool | None = None

    def feed(self, data: bytes) -> Iterator[int]:
        """Yield the content type of every record completed by *data*."""
        if self.is_tls is False:
            return
        self._buf += data
        while len(self._buf) >= 5:
            kind, major, length = self._buf[0], self._buf[1], int.from_bytes(self._buf[3:5], "big")
            if kind not in (20, 21, 22, 23, 24) or major != 3:
                self.is_tls = False
                self._buf.clear()
                return
            self.is_tls = True
            if len(self._buf) < 5 + length:
                return
            del self._buf[: 5 + length]
            yield kind


class MqttFaultProxy(_Served):
    """A TCP proxy from a node to the real broker that injects faults without
    terminating TLS; see :data:`FAULT_MODES` for what each *mode* stands for.

    * ``pass`` — forward everything; records connection times.
    * ``drop_after_bytes`` — forward the first *drop_after_bytes* bytes in *direction*,
      then close both sides.
    * ``drop_after_server_flight`` — forward the client's first flight and the server's
      reply; when the client sends again (its second handshake flight) close both
      sides without forwarding it. In TLS 1.2 the client's handshake then fails; in
      TLS 1.3 the client counts its handshake as done once it has sent that flight, so
      it sees the connection close right after the handshake.
    * ``withhold_after_handshake`` — once the client has sent its first TLS
      application-data record (type 23: in TLS 1.2 the first one after the handshake,
      in TLS 1.3 its encrypted Finished; 0-RTT early data would confuse this and is not
      used by ESP-IDF or paho), plus *withhold_after_s*, swallow every server→client
      byte (including the broker closing) while still forwarding the client's bytes;
      the connection stays open until the client gives up. For a non-TLS stream the
      client's first bytes mark the point.
    * ``delay`` — hold every server→client chunk *delay_s* before sending it on.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        mode: FaultMode = "pass",
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        drop_after_bytes: int = 0,
        direction: Literal["client_to_server", "server_to_client"] = "client_to_server",
        withhold_after_s: float = 0.0,
        delay_s: float = 0.0,
        connect_timeout_s: float = 5.0,
    ):
        if mode not in get_args(FaultMode):
            raise ValueError(f"unknown fault mode {mode!r}; one of {', '.join(get_args(FaultMode))}")
        if mode == "drop_after_bytes" and drop_after_bytes <= 0:
            raise ValueError("drop_after_bytes mode needs drop_after_bytes > 0")
        if mode == "delay" and delay_s <= 0:
            raise ValueError("delay mode needs delay_s > 0")
        if withhold_after_s < 0:
            raise ValueError("withhold_after_s must not be negative")
        self.upstream = (upstream_host, upstream_port)
        self.mode: FaultMode = mode
        self.cases = FAULT_MODES[mode]
        self.drop_after_bytes = drop_after_bytes
        self.direction = direction
        self.withhold_after_s = withhold_after_s
        self.delay_s = delay_s
        self.connect_timeout_s = connect_timeout_s
        self._listener = _Listener(f"mqtt-fault-proxy-{mode}", host, port, self._handle)
        self._connections: _Recorder[ProxyConnection] = _Recorder()

    def __repr__(self) -> str:
        return f"MqttFaultProxy({self.mode} → {self.upstream[0]}:{self.upstream[1]})"

    def start(self) -> None:
        self._listener.start()
        log.info("MQTT fault proxy (%s) on %s:%d → %s:%d", self.mode, self.host, self.port, *self.upstream)

    def connections(self) -> list[ProxyConnection]:
        """Every connection so far (open ones too), oldest first; copies."""
        return self._connections.snapshot()

    def attempt_times(self) -> list[float]:
        """``time.monotonic()`` of every accepted connection, in order."""
        return [c.accepted_at for c in self.connections()]

    def attempt_intervals(self) -> list[float]:
        """Seconds between consecutive connection attempts — the node's backoff."""
        return _intervals(self.attempt_times())

    def wait_for(self, predicate: Callable[[list[ProxyConnection]], bool], timeout: float, what: str) -> list[ProxyConnection]:
        """Block until *predicate* holds for the connection list; TimeoutError names *what*."""
        return self._connections.wait(predicate, timeout, what)

    def wait_for_connections(self, count: int, timeout: float) -> list[ProxyConnection]:
        return self.wait_for(lambda cs: len(cs) >= count, timeout, f"{count} connection(s) through the proxy")

    def wait_for_closed(self, count: int, timeout: float) -> list[ProxyConnection]:
        return self.wait_for(
            lambda cs: sum(c.closed_at is not None for c in cs) >= count, timeout, f"{count} closed connection(s) through the proxy"
        )

    # ------------------------------------------------------------------ internals

    def _handle(self, client: socket.socket, addr: tuple[str, int]) -> None:
        conn = ProxyConnection(index=-1, client=f"{addr[0]}:{addr[1]}", accepted_at=time.monotonic(), accepted_wall=time.time())
        conn.index = self._connections.add(copy.copy(conn))

        def publish() -> None:
            self._connections.update(conn.index, copy.copy(conn))

        try:
            upstream = socket.create_connection(self.upstream, timeout=self.connect_timeout_s)
        except OSError as exc:
            conn.error = f"cannot reach the broker at {self.upstream[0]}:{self.upstream[1]}: {exc}"
            conn.closed_at, conn.closed_by = time.monotonic(), "proxy"
            publish()
            return
        self._listener.adopt(upstream)
        conn.upstream_connected = True
        publish()
        try:
            self._pump(conn, client, upstream, publish)
        finally:
            self._listener.forget(upstream)
            upstream.close()
            if conn.closed_at is None:
                conn.closed_at, conn.closed_by = time.monotonic(), conn.closed_by or "proxy"
            publish()

    def _pump(self, conn: ProxyConnection, client: socket.socket, upstream: socket.socket, publish: Callable[[], None]) -> None:
        for s in (client, upstream):
            s.settimeout(_IO_TIMEOUT_S)  # bounds a blocked sendall; reads only happen when ready
        side: dict[socket.socket, Literal["client", "upstream"]] = {client: "client", upstream: "upstream"}
        up_records, down_seen = _TlsRecords(), False
        budget = self.drop_after_bytes
        withhold_from: float | None = None
        delayed: deque[tuple[float, bytes]] = deque()
        upstream_open, close_when_flushed = True, False

        def close(by: Literal["client", "upstream", "proxy"], error: str | None = None) -> None:
            conn.closed_at = time.monotonic()
            conn.closed_by = "proxy" if self._listener.stopping else by
            conn.error = error

        def recv(sock: socket.socket) -> bytes:
            try:
                return sock.recv(65536)
            except OSError as exc:  # a reset is a close by that side
                conn.error = f"{side[sock]}: {exc}"
                return b""

        def send(sock: socket.socket, data: bytes) -> bool:
            try:
                sock.sendall(data)
            except OSError as exc:
                close(side[sock], f"sending to the {side[sock]}: {exc}")
                return False
            return True

        with selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ, "client")
            sel.register(upstream, selectors.EVENT_READ, "upstream")
            while True:
                deadlines = [delayed[0][0]] if delayed else []
                if withhold_from is not None and conn.withholding_since is None:
                    deadlines.append(withhold_from)
                events = sel.select(max(0.0, min(deadlines) - time.monotonic()) if deadlines else None)
                now = time.monotonic()
                if withhold_from is not None and conn.withholding_since is None and now >= withhold_from:
                    conn.withholding_since = now  # the broker "goes silent" now, whether or not it speaks
                    publish()
                while delayed and delayed[0][0] <= now:
                    chunk = delayed.popleft()[1]
                    if not send(client, chunk):
                        return
                    conn.bytes_down += len(chunk)
                if close_when_flushed and not delayed:
                    close("upstream")
                    return
                for key, _ in events:
                    if key.data == "client":
                        data = recv(client)
                        if not data:
                            close("client", conn.error)
                            return
                        if self.mode == "drop_after_server_flight" and down_seen:
                            close("proxy")
                            return
                        for kind in up_records.feed(data):
                            if kind == 23 and conn.handshake_at is None:
                                conn.handshake_at = time.monotonic()
                        conn.tls = up_records.is_tls
                        if conn.tls is False and conn.handshake_at is None:
                            conn.handshake_at = time.monotonic()
                        if self.mode == "withhold_after_handshake" and withhold_from is None and conn.handshake_at is not None:
                            withhold_from = conn.handshake_at + self.withhold_after_s
                            if self.withhold_after_s == 0:
                                # every server byte read from now on was sent after the handshake:
                                # the client sent this record only after the server's last flight
                                conn.withholding_since = conn.handshake_at
                        if self.mode == "drop_after_bytes" and self.direction == "client_to_server":
                            data = data[:budget]
                            budget -= len(data)
                        if upstream_open:
                            if not send(upstream, data):
                                return
                            conn.bytes_up += len(data)
                        publish()
                        if self.mode == "drop_after_bytes" and self.direction == "client_to_server" and budget <= 0:
                            close("proxy")
                            return
                        continue
                    data = recv(upstream)
                    withholding = conn.withholding_since is not None
                    if not data:
                        if withholding or (self.mode == "delay" and delayed):
                            # withholding: keep the node waiting, it must give up on its own;
                            # delaying: deliver what is still held, then close
                            conn.upstream_closed_at = time.monotonic()
                            sel.unregister(upstream)
                            upstream_open = False
                            close_when_flushed = not withholding
                            publish()
                            continue
                        close("upstream", conn.error)
                        return
                    down_seen = True
                    if withholding:
                        conn.bytes_withheld += len(data)
                    elif self.mode == "delay":
                        delayed.append((time.monotonic() + self.delay_s, data))
                    else:
                        if self.mode == "drop_after_bytes" and self.direction == "server_to_client":
                            data = data[:budget]
                            budget -= len(data)
                        if not send(client, data):
                            return
                        conn.bytes_down += len(data)
                        if self.mode == "drop_after_bytes" and self.direction == "server_to_client" and budget <= 0:
                            publish()
                            close("proxy")
                            return
                    publish()


# --------------------------------------------------------------------------- TLS-terminating proxy


@dataclass
class TerminatedConnection:
    """One node connection through :class:`MqttTerminatingProxy` (times ``time.monotonic()``)."""

    index: int
    client: str
    accepted_at: float
    accepted_wall: float
    node_id: str | None = None
    """CN of the node's verified client certificate."""
    packets: list[MqttPacket] = field(default_factory=list)
    closed_at: float | None = None
    closed_by: Literal["node", "broker", "proxy"] | None = None
    error: str | None = None


class MqttTerminatingProxy(_Served):
    """An MQTT-aware proxy that terminates the node's TLS and reconnects to the broker
    as the node, so it can withhold single packet types; see the module docstring for
    when that is sound and :data:`TERMINATING_CASES` for the Device Advisor cases.

    *server_cert_path* / *server_key_path*: a lab-CA server certificate for the names
    the node dials (e.g. ``LabPki.server_cert("mqtt-proxy", hosts)``). *ca_cert_path*:
    the lab CA — verifies the node's client certificate and the broker's server
    certificate. *client_identities*: node id (certificate CN) → (certificate, key)
    paths of identities the lab issued. *withhold*: broker→node packet types to
    swallow (``CONNACK``, ``PUBACK``, ``SUBACK``, ``UNSUBACK``, ``PINGRESP``, …);
    *disconnect_after_connack* closes both sides right after forwarding CONNACK.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        *,
        server_cert_path: Path,
        server_key_path: Path,
        ca_cert_path: Path,
        client_identities: Mapping[str, tuple[Path, Path]],
        withhold: Collection[str] = (),
        disconnect_after_connack: bool = False,
        host: str = "127.0.0.1",
        port: int = 0,
        upstream_server_hostname: str | None = None,
        alpn: Sequence[str] = _DEFAULT_ALPN,
        connect_timeout_s: float = 5.0,
    ):
        bad = sorted(set(withhold) - _WITHHOLDABLE)
        if bad:
            raise ValueError(f"cannot withhold {bad}: only broker→node acks {sorted(_WITHHOLDABLE)}")
        self.upstream = (upstream_host, upstream_port)
        self.upstream_server_hostname = upstream_server_hostname or upstream_host
        self.withhold = frozenset(withhold)
        self.disconnect_after_connack = disconnect_after_connack
        self.cases = tuple(TERMINATING_CASES[k] for k in sorted(self.withhold) if k in TERMINATING_CASES) + (
            (TERMINATING_CASES["disconnect_after_connack"],) if disconnect_after_connack else ()
        )
        self.identities = {node: (Path(c), Path(k)) for node, (c, k) in client_identities.items()}
        self.connect_timeout_s = connect_timeout_s
        try:
            self._server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._server_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._server_ctx.load_cert_chain(server_cert_path, server_key_path)
            self._server_ctx.load_verify_locations(cafile=str(ca_cert_path))
        except (OSError, ssl.SSLError) as exc:
            raise AdversaryError(f"cannot load the proxy's certificate or the lab CA: {exc}") from None
        self._server_ctx.verify_mode = ssl.CERT_REQUIRED
        if alpn:
            self._server_ctx.set_alpn_protocols(list(alpn))
        self.ca_cert_path = Path(ca_cert_path)
        self._listener = _Listener("mqtt-terminating-proxy", host, port, self._handle)
        self._connections: _Recorder[TerminatedConnection] = _Recorder()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MqttTerminatingProxy(withhold={sorted(self.withhold)} → {self.upstream[0]}:{self.upstream[1]})"

    def connections(self) -> list[TerminatedConnection]:
        return self._connections.snapshot()

    def packets(self) -> list[MqttPacket]:
        """Every packet seen, over all connections, in order of reading."""
        return sorted((p for c in self.connections() for p in c.packets), key=lambda p: p.at)

    def attempt_intervals(self) -> list[float]:
        return _intervals([c.accepted_at for c in self.connections()])

    def wait_for_packet(self, predicate: Callable[[MqttPacket], bool], timeout: float, what: str) -> MqttPacket:
        """Block until a packet satisfying *predicate* has been seen."""
        found = self._connections.wait(lambda cs: any(predicate(p) for c in cs for p in c.packets), timeout, what)
        return next(p for c in found for p in c.packets if predicate(p))

    def wait_for_closed(self, count: int, timeout: float) -> list[TerminatedConnection]:
        return self._connections.wait(
            lambda cs: sum(c.closed_at is not None for c in cs) >= count,
            timeout,
            f"{count} closed connection(s) through the terminating proxy",
        )

    # ------------------------------------------------------------------ internals

    def _handle(self, raw: socket.socket, addr: tuple[str, int]) -> None:
        conn = TerminatedConnection(index=-1, client=f"{addr[0]}:{addr[1]}", accepted_at=time.monotonic(), accepted_wall=time.time())
        conn.index = self._connections.add(copy.copy(conn))
        raw.settimeout(_IO_TIMEOUT_S)
        node = self._server_ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False)
        self._listener.adopt(node)
        upstream: ssl.SSLSocket | None = None
        try:
            try:
                node.do_handshake()
            except OSError as exc:
                self._finish(conn, "node", f"TLS handshake with the node failed: {_reason(exc)}")
                return
            cert = node.getpeercert() or {}
            conn.node_id = next((v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"), None)
            if conn.node_id not in self.identities:
                self._finish(conn, "proxy", f"the node's certificate CN {conn.node_id!r} is not an identity this proxy holds a key for")
                return
            try:
                upstream = self._connect_upstream(conn.node_id, node.selected_alpn_protocol())
            except OSError as exc:
                self._finish(conn, "proxy", f"cannot connect to the broker as {conn.node_id}: {_reason(exc)}")
                return
            self._listener.adopt(upstream)
            self._publish(conn)
            self._relay(conn, node, upstream)
        finally:
            for s in (upstream, node):
                if s is not None:
                    self._listener.forget(s)
                    s.close()

    def _publish(self, conn: TerminatedConnection) -> None:
        snapshot = copy.copy(conn)
        snapshot.packets = list(conn.packets)
        self._connections.update(conn.index, snapshot)

    def _finish(self, conn: TerminatedConnection, by: Literal["node", "broker", "proxy"], error: str | None = None) -> None:
        if conn.closed_at is None:
            conn.closed_at = time.monotonic()
            conn.closed_by = "proxy" if self._listener.stopping else by
            conn.error = error
        self._publish(conn)

    def _connect_upstream(self, node_id: str, alpn: str | None) -> ssl.SSLSocket:
        cert, key = self.identities[node_id]
        ctx = ssl.create_default_context(cafile=str(self.ca_cert_path))
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(cert, key)
        if alpn:
            ctx.set_alpn_protocols([alpn])
        sock = socket.create_connection(self.upstream, timeout=self.connect_timeout_s)
        try:
            return ctx.wrap_socket(sock, server_hostname=self.upstream_server_hostname)
        except OSError:
            sock.close()
            raise

    def _relay(self, conn: TerminatedConnection, node: ssl.SSLSocket, upstream: ssl.SSLSocket) -> None:
        """Move whole MQTT packets both ways in this one thread (an OpenSSL connection
        must not be used by two threads at once), non-blocking so that a TLS record
        carrying no application data (a TLS 1.3 NewSessionTicket) cannot stall it."""
        sides: dict[ssl.SSLSocket, tuple[Literal["node_to_broker", "broker_to_node"], Literal["node", "broker"], ssl.SSLSocket]]
        sides = {node: ("node_to_broker", "node", upstream), upstream: ("broker_to_node", "broker", node)}
        bufs = {node: b"", upstream: b""}
        for s in sides:
            s.setblocking(False)
        with selectors.DefaultSelector() as sel:
            for s in sides:
                sel.register(s, selectors.EVENT_READ)
            while True:
                for key, _ in sel.select():
                    src: ssl.SSLSocket = key.fileobj  # type: ignore[assignment]
                    direction, who, dst = sides[src]
                    try:
                        data, eof = _drain(src)
                        bufs[src] += data
                        while (length := _mqtt_packet_length(bufs[src])) is not None:
                            raw, bufs[src] = bufs[src][:length], bufs[src][length:]
                            kind = _PACKET_TYPES.get(raw[0] >> 4)
                            withheld = direction == "broker_to_node" and kind in self.withhold
                            conn.packets.append(_describe_packet(raw, direction, "withheld" if withheld else "forwarded"))
                            self._publish(conn)  # recorded before the peer can see it
                            if not withheld:
                                _send_all(dst, raw)
                            if kind == "CONNACK" and self.disconnect_after_connack and not withheld:
                                self._finish(conn, "proxy")
                                return
                    except (OSError, ValueError) as exc:
                        self._finish(conn, who, f"{direction}: {_reason(exc)}")
                        return
                    if eof:
                        self._finish(conn, who)
                        return
                    if len(bufs[src]) > _MAX_PACKET:
                        self._finish(conn, "proxy", f"{direction}: packet larger than {_MAX_PACKET} bytes")
                        return


def _reason(exc: BaseException) -> str:
    return str(getattr(exc, "reason", None) or exc or type(exc).__name__)


def _drain(sock: ssl.SSLSocket) -> tuple[bytes, bool]:
    """Everything a non-blocking TLS socket has decrypted so far, and whether the peer closed."""
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError, BlockingIOError):
            return data, False
        except ssl.SSLZeroReturnError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def _send_all(sock: ssl.SSLSocket, data: bytes, timeout: float = _IO_TIMEOUT_S) -> None:
    """``sendall`` for a non-blocking TLS socket: wait (select) whenever OpenSSL wants I/O."""
    view = memoryview(data)
    deadline = time.monotonic() + timeout
    while view:
        try:
            view = view[sock.send(view) :]
            continue
        except ssl.SSLWantReadError:
            event = selectors.EVENT_READ
        except (ssl.SSLWantWriteError, BlockingIOError):
            event = selectors.EVENT_WRITE
        remaining = deadline - time.monotonic()
        with selectors.DefaultSelector() as sel:
            sel.register(sock, event)
            if remaining <= 0 or not sel.select(remaining):
                raise TimeoutError(f"peer did not take {len(view)} more bytes within {timeout:.0f} s")

"""The node's MQTT connection to the cloud (RainMaker's ``esp_mqtt_glue`` over esp-mqtt).

Connection parameters are RainMaker's (rainmaker-protocol.md §1.1; esp-rainmaker-common
``src/esp-mqtt/esp-mqtt-glue.c``, esp-rainmaker ``src/core/esp_rmaker_client_data.c``,
``src/core/esp_rmaker_connectivity.c``):

* MQTT 3.1.1, client id = node id, clean session, keepalive 120 s, username the AWS PPI
  string (``CONFIG_ESP_RMAKER_MQTT_SEND_USERNAME``), QoS 1 everywhere;
* TLS 1.2 or newer with the node's certificate and key from ``fctry``; the broker is
  verified against ``fctry``'s ``server_cert`` (the lab CA) with host-name checking —
  the firmware's compiled-in root CA in real RainMaker; the key is handed to OpenSSL
  through an anonymous in-memory file, never written to disk;
* Last Will ``{"Connectivity":{"Connected":false}}`` on ``node/<id>/params/local``, QoS 1,
  not retained;
* node→cloud topics in basic-ingest form ``$aws/rules/<rule>/node/<id>/<suffix>``
  (``CONFIG_ESP_RMAKER_MQTT_USE_BASIC_INGEST_TOPICS``, default y), subscriptions plain;
* every socket bound to the board's own address.

Reconnecting: esp-mqtt retries after a fixed ``reconnect_timeout_ms``; this firmware backs
off exponentially with jitter instead (:func:`backoff_delay`: base :data:`BACKOFF_BASE_S`
doubling to :data:`BACKOFF_MAX_S`, a uniformly random 50–100 % of it), which is what
EN 303 645 5.9-3 and AWS IoT Device Advisor's backoff cases expect. Failures print
the esp-tls → tcp_transport → mqtt_client → esp_mqtt_glue chain a real node prints,
then ``MQTT Disconnected. Will try reconnecting in a while...``.

Flaws (``rig.vboard.flaws``): ``no_server_cert_check`` (any certificate, no host-name
check), ``plaintext_mqtt`` (plain MQTT to port :data:`PLAINTEXT_PORT` of the broker host
first, used if it answers), ``no_reconnect_backoff`` (retry after :data:`STORM_DELAY_S`,
forever). A ``no_cloud`` image never opens a socket: every attempt fails as a refused
connection would.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from rig.cloud.service import RULES  # the basic-ingest rule table, declared once for both ends
from rig.vboard.bootloader import LogMessage
from rig.vboard.node.identity import NodeIdentity
from rig.vboard.node.messages import (
    MBEDTLS_SSL_FATAL_ALERT,
    MBEDTLS_X509_CERT_VERIFY_FAILED,
    TLS_CONNECT_FAILED,
    TLS_HANDSHAKE_FAILED,
    NodeMsg,
)
from rig.vboard.node.runtime import NodeRuntime

log = logging.getLogger(__name__)

KEEPALIVE_S = 120
"""``CONFIG_ESP_RMAKER_MQTT_KEEP_ALIVE_INTERVAL``."""
CONNECT_TIMEOUT_S = 4.0
"""TCP connect + TLS handshake + CONNACK; below the reset's join timeout, so a reset
during a connection attempt still ends the task."""
BACKOFF_BASE_S = 2.0
BACKOFF_MAX_S = 120.0
STORM_DELAY_S = 0.1
"""``no_reconnect_backoff``: the pause between attempts (a reconnection storm)."""
PLAINTEXT_PORT = 1883
LWT_MESSAGE = '{"Connectivity":{"Connected":false}}'
LWIP_FIRST_FD = 54
"""``LWIP_SOCKET_OFFSET`` on ESP-IDF (FD_SETSIZE 64 - CONFIG_LWIP_MAX_SOCKETS 10): the fd esp-tls prints."""
PPI_SKU, PPI_NAME, PPI_VERSION = "EX00", "RMDev", "1x0"
"""``CONFIG_ESP_RMAKER_MQTT_PRODUCT_SKU`` / ``_NAME`` / ``_VERSION`` defaults."""


def backoff_delay(attempt: int, rng: random.Random | None = None) -> float:
    """Seconds before reconnection attempt *attempt* (0-based): exponential, with jitter."""
    ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * (2 ** min(attempt, 16)))
    return (rng or random).uniform(0.5, 1.0) * ceiling


def aws_ppi(mac: bytes) -> str:
    """``esp_get_aws_ppi``: the APN3 PPI string RainMaker sends as the MQTT username."""
    return f"?Platform=APN3|A0|RM|{PPI_SKU}|{PPI_NAME}|{PPI_VERSION}|{mac.hex().upper()}"


def node_topic(node_id: str, suffix: str, basic_ingest: bool = True) -> str:
    """``esp_rmaker_create_mqtt_topic``."""
    if basic_ingest and suffix in RULES:
        return f"$aws/rules/{RULES[suffix]}/node/{node_id}/{suffix}"
    return f"node/{node_id}/{suffix}"


LOOP_TURN_S = 0.5
"""How long one turn of the node's MQTT network loop may wait in ``select`` (a publish from
another task wakes it at once)."""


@dataclass(frozen=True)
class LinkSettings:
    """What the link needs beyond the identity: where it lives and how it is flawed."""

    address: str
    mac: bytes
    no_server_cert_check: bool = False
    plaintext_mqtt: bool = False
    plaintext_port: int = PLAINTEXT_PORT
    no_reconnect_backoff: bool = False
    no_cloud: bool = False


class _MemoryFile:
    """PEM bytes behind a path OpenSSL can open, without touching the disk (``memfd_create``)."""

    def __init__(self, name: str, data: bytes):
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.write(self.fd, data)

    @property
    def path(self) -> str:
        return f"/proc/self/fd/{self.fd}"

    def close(self) -> None:
        os.close(self.fd)


def server_verifying_context(server_cert: bytes | None, verify_server: bool = True) -> ssl.SSLContext:
    """A TLS ≥ 1.2 client context that verifies the server against *server_cert* (fctry's lab CA)
    with host-name checking — or verifies nothing when *verify_server* is off (the
    ``no_server_cert_check`` / ``accepts_http_ota`` flaws). The broker and the OTA host both use it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify_server:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif server_cert:
        context.load_verify_locations(cadata=server_cert.decode("ascii", "replace"))
    return context


def tls_context(identity: NodeIdentity, verify_server: bool = True) -> ssl.SSLContext:
    """The node's MQTT TLS context: :func:`server_verifying_context` plus its certificate and key."""
    context = server_verifying_context(identity.server_cert, verify_server)
    cert, key = _MemoryFile("node-cert", identity.client_cert), _MemoryFile("node-key", identity.client_key)
    try:
        context.load_cert_chain(cert.path, key.path)
    finally:
        cert.close()
        key.close()
    return context


class _Refused(Exception):
    """One connection attempt failed; :attr:`lines` is what the firmware logs for it."""

    def __init__(self, lines: list[tuple[LogMessage, dict[str, object]]]):
        super().__init__("connection attempt failed")
        self.lines = lines


def _tcp_failure(error: OSError) -> _Refused:
    reason = os.strerror(error.errno) if error.errno else str(error)
    return _Refused(
        [
            (NodeMsg.TLS_DELAYED_CONNECT, {"fd": LWIP_FIRST_FD, "error": reason}),
            (NodeMsg.TLS_OPEN_FAILED, {}),
            (NodeMsg.TRANSPORT_OPEN_FAILED, {"code": TLS_CONNECT_FAILED}),
            (NodeMsg.MQTT_TRANSPORT_ERROR, {}),
        ]
    )


def _tls_failure(error: ssl.SSLError) -> _Refused:
    verify = isinstance(error, ssl.SSLCertVerificationError)
    lines: list[tuple[LogMessage, dict[str, object]]] = [
        (NodeMsg.TLS_HANDSHAKE, {"code": MBEDTLS_X509_CERT_VERIFY_FAILED if verify else MBEDTLS_SSL_FATAL_ALERT})
    ]
    if verify:
        lines.append((NodeMsg.TLS_VERIFY_FAILED, {}))
    lines += [
        (NodeMsg.TLS_OPEN_FAILED, {}),
        (NodeMsg.TRANSPORT_OPEN_FAILED, {"code": TLS_HANDSHAKE_FAILED}),
        (NodeMsg.MQTT_TRANSPORT_ERROR, {}),
    ]
    return _Refused(lines)


class CloudLink:
    """One node's MQTT session, kept up by a connection task until the chip resets.

    The node reacts through callbacks, all called on the MQTT task (keep them short, hand
    work to the work queue): *on_connected()*, *on_disconnected()*, *on_message(topic,
    payload)*, *on_published(mid)*.
    """

    def __init__(
        self,
        runtime: NodeRuntime,
        identity: NodeIdentity,
        settings: LinkSettings,
        *,
        on_connected: Callable[[], None],
        on_disconnected: Callable[[], None],
        on_message: Callable[[str, bytes], None],
        on_published: Callable[[int], None],
    ):
        self.runtime = runtime
        self.identity = identity
        self.settings = settings
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self._on_message = on_message
        self._on_published = on_published
        self._client: mqtt.Client | None = None
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._subscriptions: list[str] = []
        self._rng = random.Random()
        self._connack_code: ReasonCode | None = None
        self.attempts = 0
        """Connection attempts so far (for diagnostics)."""
        self.transport: str | None = None
        """``"mqtts"`` or ``"mqtt"`` (plaintext) while connected."""

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """``esp_mqtt_glue_connect``: start the connection task."""
        self.runtime.log(NodeMsg.MQTT_CONNECTING, host=self.identity.mqtt_host)
        self.runtime.spawn("mqtt_task", self._run)

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _run(self) -> None:
        failures = 0
        while not self.runtime.halted.is_set():
            self.attempts += 1
            try:
                client = self._open()
            except _Refused as refused:
                for message, values in refused.lines:
                    self.runtime.log(message, **values)
                self._report_disconnect()
                delay = STORM_DELAY_S if self.settings.no_reconnect_backoff else backoff_delay(failures, self._rng)
                failures += 1
                if not self.runtime.sleep(delay, "mqtt_reconnect_backoff"):
                    return
                continue
            failures = 0
            self._serve(client)
            if self.runtime.halted.is_set():
                return
            self._report_disconnect()
            delay = STORM_DELAY_S if self.settings.no_reconnect_backoff else backoff_delay(0, self._rng)
            if not self.runtime.sleep(delay, "mqtt_reconnect_backoff"):
                return

    def _report_disconnect(self) -> None:
        self.runtime.log(NodeMsg.MQTT_EVENT_ERROR)
        self.runtime.log(NodeMsg.MQTT_DISCONNECTED)
        self._on_disconnected()

    # ------------------------------------------------------------------ connecting

    def _client_for(self, context: ssl.SSLContext | None) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.identity.node_id, protocol=mqtt.MQTTv311,
                             clean_session=True, reconnect_on_failure=False)  # fmt: skip
        client.connect_timeout = CONNECT_TIMEOUT_S
        client.username_pw_set(aws_ppi(self.settings.mac))
        client.will_set(f"node/{self.identity.node_id}/params/local", LWT_MESSAGE, qos=1, retain=False)
        if context is not None:
            client.tls_set_context(context)
        client.on_connect = self._connack
        client.on_message = lambda _c, _u, message: self._on_message(message.topic, bytes(message.payload))
        client.on_publish = lambda _c, _u, mid, _rc, _p: self._on_published(mid)
        # Only the network loop writes to the socket. Without this hook paho's publish/subscribe
        # send on the calling task's thread while the loop may be sending too (``loop_write`` pops
        # a packet under its mutex but sends outside it): two packets interleave on the TLS
        # socket, the broker drops the connection ("Protocol error") and the message is lost.
        # With it they only queue and wake the loop's select; esp-mqtt's outbox works the same way.
        client.on_socket_register_write = lambda _c, _u, _sock: None
        return client

    def _open(self) -> mqtt.Client:
        """One attempt: the client with CONNACK accepted, or :class:`_Refused`."""
        if self.settings.no_cloud:
            raise _tcp_failure(OSError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED)))
        if self.settings.plaintext_mqtt:
            try:
                client = self._connect(self._client_for(None), self.settings.plaintext_port)
                self.transport = "mqtt"
                return client
            except _Refused as refused:
                for message, values in refused.lines[:1]:  # esp-tls' plain TCP connect error only
                    self.runtime.log(message, **values)
        try:
            context = tls_context(self.identity, verify_server=not self.settings.no_server_cert_check)
        except (ssl.SSLError, ValueError) as exc:
            log.error("the node's fctry certificate or key is unusable: %s", exc)
            raise _tls_failure(ssl.SSLError(str(exc))) from None
        client = self._connect(self._client_for(context), self.identity.mqtt_port)
        self.transport = "mqtts"
        return client

    def _connect(self, client: mqtt.Client, port: int) -> mqtt.Client:
        self._connack_code = None
        try:
            client.connect(self.identity.mqtt_host, port, keepalive=KEEPALIVE_S, bind_address=self.settings.address)
        except ssl.SSLError as exc:
            raise _tls_failure(exc) from None
        except TimeoutError:
            raise _tcp_failure(OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))) from None
        except OSError as exc:
            raise _tcp_failure(exc) from None
        sock = client.socket()
        if sock is not None:
            self.runtime.track(sock)
        with self._lock:
            self._client = client
        # Until CONNACK, run the network loop here; the link counts only once accepted.
        waited = 0.0
        while self._connack_code is None and not self.runtime.halted.is_set() and waited < CONNECT_TIMEOUT_S:
            if client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS:
                break
            waited += 0.1
        code = self._connack_code
        if code is None or code.is_failure:
            self._drop(client)
            reason = NodeMsg.CONNACK_REASONS.get(code.value, str(code)) if code is not None else None
            lines: list[tuple[LogMessage, dict[str, object]]] = []
            if reason is not None:
                lines.append((NodeMsg.MQTT_CONNACK_REFUSED, {"reason": reason}))
            else:
                lines += _tcp_failure(OSError(errno.ECONNRESET, os.strerror(errno.ECONNRESET))).lines
            raise _Refused(lines)
        return client

    def _connack(self, client: mqtt.Client, userdata: object, flags: object, reason: ReasonCode, properties: object) -> None:
        self._connack_code = reason

    def _drop(self, client: mqtt.Client) -> None:
        with self._lock:
            if self._client is client:
                self._client = None
        sock = client.socket()
        if sock is not None:
            self.runtime.untrack(sock)
            try:
                sock.close()
            except OSError:
                pass

    # ------------------------------------------------------------------ connected

    def _serve(self, client: mqtt.Client) -> None:
        self._connected.set()
        self.runtime.log(NodeMsg.MQTT_CONNECTED)
        with self._lock:
            topics = list(self._subscriptions)
        for topic in topics:  # esp_mqtt_glue re-subscribes on every connection
            client.subscribe(topic, qos=1)
        self._on_connected()
        try:
            while not self.runtime.halted.is_set():
                if client.loop(timeout=LOOP_TURN_S) != mqtt.MQTT_ERR_SUCCESS:
                    break
        finally:
            self._connected.clear()
            self.transport = None
            self._drop(client)

    def publish(self, suffix: str, payload: str | bytes, basic_ingest: bool = True) -> int | None:
        """QoS 1 publish on the node's topic for *suffix*; the message id, or None when not connected."""
        with self._lock:
            client = self._client
        if client is None or not self.connected:
            return None
        info = client.publish(node_topic(self.identity.node_id, suffix, basic_ingest), payload, qos=1)
        return info.mid if info.rc == mqtt.MQTT_ERR_SUCCESS else None

    def subscribe(self, topic: str) -> None:
        """QoS 1 subscription, kept across reconnections (``esp_mqtt_glue_subscribe``)."""
        with self._lock:
            if topic not in self._subscriptions:
                self._subscriptions.append(topic)
            client = self._client
        if client is not None and self.connected:
            client.subscribe(topic, qos=1)

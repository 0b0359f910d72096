"""Reusable pieces for tests against the real local cloud: a lab PKI, a running mosquitto, MQTT probes.

A test module picks up the fixtures by binding them to module names (an assignment, so
linters see no shadowed import and pytest collects them as the module's own)::

    from tests import cloud_fixtures
    lab_pki = cloud_fixtures.lab_pki          # module-scoped LabPki
    mqtt_broker = cloud_fixtures.mqtt_broker  # module-scoped running MosquittoBroker
    mqtt_probe = cloud_fixtures.mqtt_probe    # factory of MqttProbe clients, closed after each test

and imports :class:`MqttProbe` and :func:`tls_context` directly. To check *why* the broker
did something, use ``broker.log_mark()`` before and ``broker.wait_for_log(line, mark)`` after.

Every wait here is on a paho callback (an ``Event`` or a ``Condition``) with a timeout
that names what was awaited — never a bare sleep. "Nothing was delivered" is proven
with a sentinel: after the forbidden publish, publish on an allowed topic, wait for
that, then assert the forbidden message is not among what arrived (mosquitto handles
one client's packets in order and queues deliveries in order).
"""

from __future__ import annotations

import ssl
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from rig.cloud.broker import MosquittoBroker
from rig.cloud.pki import CertPair, LabPki

WAIT_S = 5.0


def tls_context(
    ca_cert: Path | None,
    pair: CertPair | None = None,
    *,
    version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context trusting *ca_cert*, presenting *pair* (if any), pinned to *version* (if given).

    Pinning an old version also drops OpenSSL's security level to 0 so that the client
    really offers it — the refusal must come from the broker, not from this side.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_cert is not None:
        ctx.load_verify_locations(cafile=str(ca_cert))
    if pair is not None:
        ctx.load_cert_chain(str(pair.cert_path), str(pair.key_path))
    if version is not None:
        with warnings.catch_warnings():  # pinning TLS 1.1 is deprecated, and exactly what the test means to do
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = version
            ctx.maximum_version = version
        if version < ssl.TLSVersion.TLSv1_2:
            ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes


@dataclass(frozen=True)
class ConnectOutcome:
    """How a connection attempt ended: CONNACK success, or the refusal as the client saw it."""

    accepted: bool
    detail: str


class MqttProbe:
    """One paho client for a test: its connect outcome and every message it receives, as events."""

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext | None,
        client_id: str,
        *,
        username: str | None = None,
        protocol: mqtt.MQTTProtocolVersion = mqtt.MQTTv311,
        connect_properties: Properties | None = None,
    ):
        self.host, self.port, self.client_id = host, port, client_id
        self._connect_properties = connect_properties
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
        if context is not None:
            self.client.tls_set_context(context)
        if username is not None:
            self.client.username_pw_set(username)
        self._changed = threading.Condition()
        self._connack: ReasonCode | None = None
        self._dropped: str | None = None
        self._errors: list[str] = []
        self._subacks: dict[int, list[ReasonCode]] = {}
        self._pubacks: set[int] = set()
        self.received: list[Received] = []
        self.client.on_connect = self._on_connect
        self.client.on_connect_fail = self._on_connect_fail
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.on_log = self._on_log

    # -- paho callbacks (network thread) ---------------------------------------------

    def _notify(self, update: Callable[[], None]) -> None:
        with self._changed:
            update()
            self._changed.notify_all()

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, rc: ReasonCode, props: object) -> None:
        self._notify(lambda: setattr(self, "_connack", rc))

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self._notify(lambda: setattr(self, "_dropped", "connect failed"))

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, rc: ReasonCode, props: object) -> None:
        self._notify(lambda: setattr(self, "_dropped", f"disconnected: {rc}"))

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, codes: list[ReasonCode], props: object) -> None:
        self._notify(lambda: self._subacks.__setitem__(mid, codes))

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, rc: ReasonCode, props: object) -> None:
        self._notify(lambda: self._pubacks.add(mid))

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        self._notify(lambda: self.received.append(Received(message.topic, bytes(message.payload))))

    def _on_log(self, client: mqtt.Client, userdata: object, level: int, text: str) -> None:
        if level == mqtt.MQTT_LOG_ERR:  # "failed to receive on socket: …": the connection is gone
            self._notify(lambda: self._errors.append(text))

    # -- waiting ----------------------------------------------------------------------

    def _wait(self, ready: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
        with self._changed:
            if not self._changed.wait_for(ready, timeout):
                raise AssertionError(f"{self.client_id}: no {what} within {timeout} s (received so far: {self.topics()})")

    # -- actions ---------------------------------------------------------------------------

    def connect(self, timeout: float = WAIT_S) -> ConnectOutcome:
        """Open the connection and wait for CONNACK or for the connection to drop.

        Until CONNACK the network I/O runs on this thread (``loop()`` waits in ``select`` on
        the socket), so a refused client never enters paho's reconnect back-off; the
        background loop starts only once the broker has accepted.
        """
        try:
            self.client.connect(self.host, self.port, keepalive=30, properties=self._connect_properties)
        except (ssl.SSLError, OSError) as exc:
            return ConnectOutcome(False, f"{type(exc).__name__}: {exc}")
        deadline = time.monotonic() + timeout
        while self._connack is None and self._dropped is None and not self._errors:
            if time.monotonic() > deadline:
                self.client.disconnect()
                raise AssertionError(f"{self.client_id}: neither CONNACK nor disconnect within {timeout} s")
            if self.client.loop(timeout=0.1) != mqtt.MQTT_ERR_SUCCESS and self._connack is None:
                self._dropped = self._dropped or "connection lost"
        if self._connack is not None and not self._connack.is_failure:
            self.client.loop_start()
            return ConnectOutcome(True, str(self._connack))
        detail = f"CONNACK {self._connack}" if self._connack is not None else str(self._dropped or "connection lost")
        self.client.disconnect()
        return ConnectOutcome(False, "; ".join([detail, *self._errors]))

    def subscribe(self, *filters: str) -> None:
        """Subscribe at QoS 1 and wait for the SUBACK (whose codes prove nothing in mosquitto 2.0)."""
        for topic in filters:
            result, mid = self.client.subscribe(topic, qos=1)
            assert result == mqtt.MQTT_ERR_SUCCESS, f"{self.client_id}: SUBSCRIBE {topic} not sent ({result})"
            self._wait(lambda mid=mid: mid in self._subacks, f"SUBACK for {topic}")

    def publish(self, topic: str, payload: bytes = b"") -> None:
        """Publish at QoS 1 and wait for the PUBACK (mosquitto acknowledges denied publishes too)."""
        info = self.client.publish(topic, payload, qos=1)
        self._wait(lambda: info.mid in self._pubacks, f"PUBACK for {topic}")

    def wait_for(self, topic: str, payload: bytes | None = None, timeout: float = WAIT_S) -> Received:
        def match() -> bool:
            return any(m.topic == topic and (payload is None or m.payload == payload) for m in self.received)

        self._wait(match, f"message on {topic}", timeout)
        return next(m for m in self.received if m.topic == topic and (payload is None or m.payload == payload))

    def topics(self) -> list[str]:
        with self._changed:
            return [m.topic for m in self.received]

    @property
    def dropped(self) -> str | None:
        with self._changed:
            return self._dropped

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


ProbeFactory = Callable[..., MqttProbe]


@pytest.fixture(scope="module")
def lab_pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return LabPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mqtt_broker(lab_pki: LabPki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A real mosquitto with the rig's policy on a free loopback port, for one test module."""
    broker = MosquittoBroker(tmp_path_factory.mktemp("broker"), lab_pki)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def mqtt_probe(mqtt_broker: MosquittoBroker) -> Iterator[ProbeFactory]:
    """``mqtt_probe(pair, client_id, **kw)`` → an :class:`MqttProbe` on the broker, closed after the test.

    *pair* is a :class:`CertPair` (trusting the lab CA) or a ready ``ssl.SSLContext``.
    """
    probes: list[MqttProbe] = []

    def make(pair: CertPair | ssl.SSLContext | None, client_id: str, **kwargs: object) -> MqttProbe:
        context = pair if isinstance(pair, ssl.SSLContext) else tls_context(mqtt_broker.ca_cert_path, pair)
        probe = MqttProbe(mqtt_broker.host, mqtt_broker.port, context, client_id, **kwargs)  # type: ignore[arg-type]
        probes.append(probe)
        return probe

    yield make
    for probe in probes:
        probe.close()

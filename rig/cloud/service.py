"""The cloud service: the bridge between the broker and the store.

It connects to the lab broker with the service identity from :class:`~rig.cloud.pki.LabPki`
(client id = certificate CN, broker verified against the lab CA), subscribes to every
node→cloud topic in both forms a RainMaker node uses — plain ``node/<id>/<suffix>`` and
basic-ingest ``$aws/rules/<rule>/node/<id>/<suffix>`` (esp-rainmaker
``src/mqtt/esp_rmaker_mqtt.c`` ``esp_rmaker_create_mqtt_topic``; rule names from
``src/core/esp_rmaker_mqtt_topics.h``) — and keeps the store up to date. Towards nodes it
publishes only on plain ``node/<id>/params/remote`` and ``node/<id>/otaurl`` — JSON it built,
except what the REST API's test control ``POST /test/mqtt/to-node`` asks it to send as given
(:meth:`CloudMqtt.publish_raw_to_node`, test mode only).

The node id of a message is the one in the topic: the broker lets a node publish only
under its own id (client id = certificate CN), so the topic is authenticated and a
payload's ``node_id`` that disagrees with it is refused.

Waiting is done on events (CONNACK, SUBACK, PUBACK, :meth:`CloudMqtt.wait_handled`), never
on sleeps. Payloads are never logged: a ``user/mapping`` message carries a secret.
"""

from __future__ import annotations

import json
import logging
import secrets
import ssl
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from rig.cloud.clock import Clock
from rig.cloud.pki import SERVICE_IDENTITY, LabPki
from rig.cloud.store import CloudStore, OtaNodeStatus, StoreError

log = logging.getLogger("rig.cloud.service")


RULES: dict[str, str] = {
    "config": "esp_node_config",
    "params/local": "esp_set_params",
    "params/local/init": "esp_init_params",
    "alert": "esp_node_alert",
    "user/mapping": "esp_user_node_mapping",
    "otafetch": "esp_node_otafetch",
    "otastatus": "esp_node_otastatus",
}
"""Node→cloud suffix → basic-ingest rule (esp-rainmaker ``src/core/esp_rmaker_mqtt_topics.h``)."""

SUBSCRIPTIONS: tuple[str, ...] = tuple(f"node/+/{s}" for s in RULES) + tuple(f"$aws/rules/{r}/node/+/{s}" for s, r in RULES.items())

PUBLISH_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10.0


class NodeUnreachable(Exception):
    """A message for a node could not be handed to the broker (not connected, no PUBACK)."""


class OtaPublishError(Exception):
    """The OTA host could not publish an image for a node; the message says why (e.g. no
    signing key matches the node's ``secure_boot_digest``) and becomes the job's reason."""


class MqttServiceError(Exception):
    """The service could not connect or subscribe; the message names what failed."""


class PublishedImage(Protocol):
    """Where the OTA host serves a job's image for one node, and what it serves
    (``rig.cloud.ota_host.PublishedImage`` has these and more)."""

    @property
    def url(self) -> str: ...

    @property
    def file_size(self) -> int: ...

    @property
    def sha256(self) -> str: ...


class OtaImagePublisher(Protocol):
    """The OTA image host seen from the cloud (``rig.cloud.ota_host`` implements it).

    ``publish`` signs *image* for *node_id* as the lab requires (the node's reported
    ``info.secure_boot_digest`` is in its stored config: ``store.get_node(node_id).config``)
    and serves it under a per-job HTTPS URL. Failures it may raise — :class:`OtaPublishError`,
    or the signer's ``NoMatchingKey`` (a ``LookupError``), the host's ``OtaHostError`` (a
    ``RuntimeError``), ``ValueError``, ``OSError`` — fail the node's part of the job with
    that reason.
    """

    def publish(self, job_id: str, node_id: str, image: bytes) -> PublishedImage: ...


class NodeChannel(Protocol):
    """How the REST API reaches a node: a QoS 1 publish on ``node/<node_id>/<suffix>`` of JSON it
    built, or (the test control ``POST /test/mqtt/to-node`` only) of bytes as they are."""

    def publish_to_node(self, node_id: str, suffix: str, payload: dict[str, Any]) -> None: ...

    def publish_raw_to_node(self, node_id: str, suffix: str, payload: bytes) -> None: ...


@dataclass(frozen=True)
class NodeTopic:
    node_id: str
    suffix: str
    form: Literal["plain", "basic-ingest"]


@dataclass(frozen=True)
class HandledMessage:
    """One node→cloud message the service processed (``accepted`` False: refused as malformed)."""

    seq: int
    node_id: str
    suffix: str
    form: str
    accepted: bool
    detail: str = ""


def _valid_node_id(node_id: str) -> bool:
    return bool(node_id) and not any(ch in node_id for ch in "/+#\0")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_node_topic(topic: str) -> NodeTopic | None:
    """``node/<id>/<suffix>`` or ``$aws/rules/<rule>/node/<id>/<suffix>`` with the suffix's own rule, else ``None``."""
    form: Literal["plain", "basic-ingest"] = "plain"
    rest = topic
    if topic.startswith("$aws/rules/"):
        rule, _, rest = topic[len("$aws/rules/"):].partition("/")
        form = "basic-ingest"
    else:
        rule = ""
    if not rest.startswith("node/"):
        return None
    node_id, _, suffix = rest[len("node/"):].partition("/")
    if not _valid_node_id(node_id) or suffix not in RULES:
        return None
    if form == "basic-ingest" and RULES[suffix] != rule:
        return None
    return NodeTopic(node_id, suffix, form)


def dispatch_ota(
    store: CloudStore, clock: Clock, ota: OtaImagePublisher, channel: NodeChannel, job_id: str, node_id: str
) -> OtaNodeStatus:
    """Publish the job's image for the node on the OTA host and tell the node on ``otaurl``.

    The ``otaurl`` payload carries the keys the node parses (esp-rainmaker
    ``src/ota/esp_rmaker_ota_using_topics.c``): ``ota_job_id``, ``url``, ``file_size`` (not
    ``filesize``) and ``fw_version``, plus ``file_md5`` when the host offers an ``md5``.

    A publisher failure (e.g. no signing key matches the node) fails the node's part of the
    job with that reason. A broker failure raises :class:`NodeUnreachable` and leaves the job
    as it was: the node gets a fresh URL on its next ``otafetch``.
    """
    job = store.ota_job_node(job_id, node_id)
    if job is None:
        raise StoreError(f"OTA job {job_id} does not include node {node_id}")
    image = store.ota_image(job.image_id)
    if image is None:
        raise StoreError(f"OTA image {job.image_id} not found")
    try:
        published = ota.publish(job_id, node_id, store.ota_image_data(job.image_id))
    except (OtaPublishError, LookupError, ValueError, RuntimeError, OSError) as exc:
        reason = str(exc) if isinstance(exc, OtaPublishError) else f"{type(exc).__name__}: {exc}"
        log.warning("OTA job %s for node %s failed to start: %s", job_id, node_id, reason)
        store.mark_ota_failed(job_id, node_id, reason, clock.now())
        return OtaNodeStatus.FAILED
    payload: dict[str, Any] = {
        "ota_job_id": job_id,
        "url": published.url,
        "file_size": published.file_size,
        "fw_version": image.fw_version,
    }
    md5 = getattr(published, "md5", None)
    if isinstance(md5, str):
        payload["file_md5"] = md5
    channel.publish_to_node(node_id, "otaurl", payload)
    store.mark_ota_triggered(job_id, node_id, published.url, clock.now())
    return OtaNodeStatus.TRIGGERED


class CloudMqtt:
    """The cloud side of MQTT. Construct, then :meth:`start` to connect; :meth:`handle_message`
    works without a connection (tests feed it messages directly)."""

    def __init__(
        self,
        store: CloudStore,
        clock: Clock,
        *,
        pki: LabPki | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        ota: OtaImagePublisher | None = None,
        identity: str = SERVICE_IDENTITY,
        client_id: str | None = None,
    ):
        self.store = store
        self.clock = clock
        self.pki = pki
        self.host = host
        self.port = port
        self.ota = ota
        self.identity = identity
        # The broker lets the service identity use any client id; a unique one keeps two
        # stacks (or a test probe) on one broker from taking each other's session over.
        self.client_id = client_id or f"{identity}-{secrets.token_hex(4)}"
        self._client: mqtt.Client | None = None
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self._settled = threading.Event()  # the connect attempt ended: subscribed, refused or dropped
        self._connect_error: str | None = None
        self._sub_mid: int | None = None
        self._handled: list[HandledMessage] = []
        self._cond = threading.Condition()
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rig-cloud-ota")

    # ---- lifecycle

    def start(self, timeout: float = CONNECT_TIMEOUT_S) -> None:
        """Connect with the service certificate, subscribe to every node→cloud topic, wait for the SUBACK."""
        if self.pki is None or self.port is None:
            raise MqttServiceError("CloudMqtt.start needs the lab PKI and the broker port")
        if self._client is not None:
            return
        cert = self.pki.service_cert(self.identity)
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv311, clean_session=True)
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.pki.ca_cert_path))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(cert.cert_path), str(cert.key_path))
        client.tls_set_context(context)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        self._client = client
        try:
            client.connect(self.host, self.port, keepalive=60)
        except (OSError, ssl.SSLError) as exc:
            self._client = None
            raise MqttServiceError(f"cloud service could not connect to the broker at {self.host}:{self.port}: {exc}") from exc
        client.loop_start()
        self._settled.wait(timeout)
        if not self._subscribed.is_set():
            reason = self._connect_error or f"no CONNACK/SUBACK within {timeout:g} s"
            self.stop()
            raise MqttServiceError(
                f"cloud service could not connect and subscribe at {self.host}:{self.port}: {reason}"
            )

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._worker.shutdown(wait=True, cancel_futures=False)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rig-cloud-ota")
        self._connected.clear()
        self._subscribed.clear()
        self._settled.clear()

    def __enter__(self) -> CloudMqtt:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    # ---- paho callbacks (network thread)

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        if reason.is_failure:
            self._connect_error = f"CONNACK refused: {reason}"
            self._settled.set()
            return
        self._connected.set()
        result, mid = client.subscribe([(t, 1) for t in SUBSCRIPTIONS])
        if result != mqtt.MQTT_ERR_SUCCESS:
            self._connect_error = f"SUBSCRIBE failed: {mqtt.error_string(result)}"
            self._settled.set()
            return
        self._sub_mid = mid

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: ReasonCode, properties: Any) -> None:
        self._connected.clear()
        self._subscribed.clear()
        if reason.is_failure:
            self._connect_error = f"disconnected: {reason}"
        self._settled.set()

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[ReasonCode], properties: Any) -> None:
        if mid != self._sub_mid:
            return
        refused = [t for t, r in zip(SUBSCRIPTIONS, reasons, strict=False) if r.is_failure]
        if refused:
            self._connect_error = f"broker refused subscriptions {refused}"
        else:
            self._subscribed.set()
        self._settled.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.handle_message(message.topic, message.payload)

    # ---- towards nodes

    def publish_to_node(self, node_id: str, suffix: str, payload: dict[str, Any], timeout: float = PUBLISH_TIMEOUT_S) -> None:
        """QoS 1 publish of *payload* as JSON on plain ``node/<node_id>/<suffix>``; returns after the broker's PUBACK."""
        self.publish_raw_to_node(node_id, suffix, json.dumps(payload).encode(), timeout)

    def publish_raw_to_node(self, node_id: str, suffix: str, payload: bytes, timeout: float = PUBLISH_TIMEOUT_S) -> None:
        """QoS 1 publish of *payload* byte for byte on plain ``node/<node_id>/<suffix>``; returns after the broker's PUBACK.

        RainMaker's cloud only ever sends a node JSON it built itself; raw bytes are how the
        test-mode control ``POST /test/mqtt/to-node`` plays a buggy or compromised cloud, so
        suites can check that a node survives input it cannot parse (EN 303 645 5.13-1).
        Raises :class:`NodeUnreachable` when the broker does not take the message.
        """
        if not _valid_node_id(node_id):
            raise NodeUnreachable(f"invalid node id {node_id!r}")
        client = self._client
        if client is None or not self._connected.is_set():
            raise NodeUnreachable("the cloud service is not connected to the broker")
        info = client.publish(f"node/{node_id}/{suffix}", payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise NodeUnreachable(f"publish to node/{node_id}/{suffix} failed: {mqtt.error_string(info.rc)}")
        try:
            info.wait_for_publish(timeout)
        except RuntimeError as exc:
            raise NodeUnreachable(f"publish to node/{node_id}/{suffix} failed: {exc}") from exc
        if not info.is_published():
            raise NodeUnreachable(f"no PUBACK from the broker for node/{node_id}/{suffix} within {timeout:g} s")

    # ---- from nodes

    def handle_message(self, topic: str, payload: bytes) -> HandledMessage | None:
        """Process one node→cloud message; ``None`` if the topic is not a node→cloud topic."""
        parsed = parse_node_topic(topic)
        if parsed is None:
            log.warning("ignoring message on unexpected topic %r", topic)
            return None
        handler = self._HANDLERS[parsed.suffix]
        try:
            body = json.loads(payload, parse_constant=_reject_constant)
            detail = handler(self, parsed.node_id, body)
            accepted = True
        except (ValueError, TypeError, KeyError, StoreError) as exc:
            detail = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError | TypeError) else "malformed payload"
            accepted = False
            log.warning("refused %s message from node %s (%s form): %s", parsed.suffix, parsed.node_id, parsed.form, detail)
        with self._cond:
            record = HandledMessage(len(self._handled) + 1, parsed.node_id, parsed.suffix, parsed.form, accepted, detail or "")
            self._handled.append(record)
            self._cond.notify_all()
        return record

    def mark(self) -> int:
        """The sequence number of the last handled message, for :meth:`wait_handled`'s ``after``."""
        with self._cond:
            return len(self._handled)

    def wait_handled(
        self, node_id: str, suffix: str, *, after: int = 0, timeout: float = 10.0, predicate: Callable[[HandledMessage], bool] | None = None
    ) -> HandledMessage:
        """Block until a message from *node_id* on *suffix* numbered above *after* has been handled."""

        def find() -> HandledMessage | None:
            return next(
                (m for m in self._handled[after:] if m.node_id == node_id and m.suffix == suffix and (predicate is None or predicate(m))),
                None,
            )

        with self._cond:
            found = self._cond.wait_for(find, timeout)
            if found is not None:
                return found
            seen = [f"{m.suffix}: {m.detail}" for m in self._handled[after:] if m.node_id == node_id][-8:]
        wanted = f"matching '{suffix}'" if predicate is not None else f"'{suffix}'"
        raise TimeoutError(
            f"cloud service handled no {wanted} message from node {node_id} within {timeout:g} s "
            f"(from it since then: {'; '.join(seen) or 'nothing'})"
        )

    @staticmethod
    def _object(body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise TypeError("payload is not a JSON object")
        return body

    @staticmethod
    def _check_payload_node(node_id: str, body: dict[str, Any]) -> None:
        claimed = body.get("node_id")
        if claimed is not None and claimed != node_id:
            raise StoreError(f"payload node_id {claimed!r} differs from the publishing node {node_id!r}")

    def _on_config(self, node_id: str, body: Any) -> str:
        body = self._object(body)
        self._check_payload_node(node_id, body)
        now = self.clock.now()
        self.store.set_node_config(node_id, body, now)
        self.store.set_connectivity(node_id, True, now)
        return ""

    def _on_params(self, node_id: str, body: Any, *, replace: bool) -> str:
        body = self._object(body)
        now = self.clock.now()
        connectivity = body.get("Connectivity")
        connected = connectivity.get("Connected") if isinstance(connectivity, dict) else None
        self.store.update_node_params(node_id, body, now, replace=replace)
        # The Last Will is {"Connectivity":{"Connected":false}} on params/local
        # (esp-rainmaker src/core/esp_rmaker_connectivity.c); anything else proves the node is up.
        self.store.set_connectivity(node_id, connected if isinstance(connected, bool) else True, now)
        return ""

    def _on_params_local(self, node_id: str, body: Any) -> str:
        return self._on_params(node_id, body, replace=False)

    def _on_params_init(self, node_id: str, body: Any) -> str:
        return self._on_params(node_id, body, replace=True)

    def _on_user_mapping(self, node_id: str, body: Any) -> str:
        body = self._object(body)
        self._check_payload_node(node_id, body)
        user_id, secret, reset = body["user_id"], body["secret_key"], body.get("reset", False)
        if not isinstance(user_id, str) or not isinstance(secret, str) or not isinstance(reset, bool):
            raise TypeError("user_id and secret_key must be strings, reset a boolean")
        request = self.store.mapping_node_half(node_id, user_id, secret, reset, self.clock.now())
        return "factory reset" if request is None else f"mapping request {request.request_id} {request.status.value}"

    def _on_otafetch(self, node_id: str, body: Any) -> str:
        body = self._object(body)
        self._check_payload_node(node_id, body)
        job = self.store.latest_ota_job_node(node_id, open_only=True)
        if job is None:
            return "no OTA job"
        if self.ota is None:
            return f"OTA job {job.job_id} waiting: no OTA host configured"
        # Signing may take seconds (HSM): off the network thread, which must keep acking.
        self._worker.submit(self._dispatch_logged, job.job_id, node_id)
        return f"OTA job {job.job_id} dispatched"

    def _dispatch_logged(self, job_id: str, node_id: str) -> None:
        assert self.ota is not None
        try:
            status = dispatch_ota(self.store, self.clock, self.ota, self, job_id, node_id)
        except (StoreError, NodeUnreachable) as exc:
            log.warning("OTA job %s for node %s not dispatched: %s", job_id, node_id, exc)
            return
        log.info("OTA job %s for node %s: %s", job_id, node_id, status.value)

    def _on_otastatus(self, node_id: str, body: Any) -> str:
        body = self._object(body)
        job_id, status = body["ota_job_id"], body["status"]
        info, ts = body.get("additional_info", ""), body.get("ts")
        if not isinstance(job_id, str) or not isinstance(status, str) or not isinstance(info, str):
            raise TypeError("ota_job_id, status and additional_info must be strings")
        node_ts = float(ts) if isinstance(ts, int | float) and not isinstance(ts, bool) else None
        if not self.store.record_ota_status(node_id, job_id, status, info, node_ts, self.clock.now()):
            raise StoreError(f"OTA job {job_id} does not include node {node_id}")
        return f"OTA job {job_id}: {status}"

    def _on_alert(self, node_id: str, body: Any) -> str:
        self.store.add_alert(node_id, body, self.clock.now())
        return ""

    _HANDLERS: ClassVar[dict[str, Callable[[CloudMqtt, str, Any], str]]] = {
        "config": _on_config,
        "params/local": _on_params_local,
        "params/local/init": _on_params_init,
        "user/mapping": _on_user_mapping,
        "otafetch": _on_otafetch,
        "otastatus": _on_otastatus,
        "alert": _on_alert,
    }

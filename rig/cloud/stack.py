"""The local cloud stack, assembled: PKI → broker → store → HSM signer → OTA host → MQTT
service → REST API, started in that order and stopped in reverse.

This is the one place that knows how the parts fit (DESIGN.md "Cloud"); `rig up` runs it
in a background process, the ``cloud`` session fixture runs it in-process. Every part is
a real server on loopback; its files (logs, database, access log) stay in the stack's
state folder as evidence.

In test mode only, the stack also runs what the OTA delivery faults need
(:mod:`rig.cloud.ota_delivery`): the OTA host's plain-HTTP listener, a second HTTPS
image host whose certificate comes from a rogue CA (same names as the real host, wrong
issuer), and the plan registry and delivery log behind ``/test/ota/*``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from rig.cloud.adversaries import RogueServerCertificate, issue_unknown_ca_certificate
from rig.cloud.api import create_app
from rig.cloud.api_server import ApiServer
from rig.cloud.broker import MosquittoBroker
from rig.cloud.clock import Clock, ManualClock, SystemClock
from rig.cloud.ota_delivery import DeliveryControl, HostLabel
from rig.cloud.ota_host import OtaImageHost, PublishedImage
from rig.cloud.pki import CertPair, LabPki
from rig.cloud.service import CloudMqtt, OtaPublishError
from rig.cloud.signer import CloudSigner
from rig.cloud.store import CloudStore
from rig.firmware.variants import signed_content
from rig.lab import Lab

log = logging.getLogger("rig.cloud")

OTA_CERT_NAME = "ota-host"
UNKNOWN_CA_DIR = "ota-unknown-ca"
PINS_FILE = "hsm-pins.json"


@dataclass(frozen=True)
class StackPorts:
    """0 = pick a free port. `rig up` uses the lab's fixed ports so boards can be told them."""

    mqtt: int = 0
    api: int = 0
    ota: int = 0


@dataclass(frozen=True)
class StackEndpoints:
    """What a client (a suite, a node, `rig status`) needs to reach the stack."""

    api_url: str
    mqtt_host: str
    mqtt_port: int
    ota_url: str
    ca_cert: str
    state_dir: str
    test_mode: bool

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> StackEndpoints:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class HsmPins:
    pin: str
    so_pin: str

    @classmethod
    def for_lab(cls, state_dir: Path, pin: str | None = None, so_pin: str | None = None) -> HsmPins:
        """The lab's HSM PINs: from the lab config when given, else generated once and kept
        beside the token (0600) — acceptable for a virtual lab, which has nothing to protect."""
        if pin and so_pin:
            return cls(pin, so_pin)
        path = state_dir / PINS_FILE
        if path.exists():
            data = json.loads(path.read_text())
            return cls(data["pin"], data["so_pin"])
        state_dir.mkdir(parents=True, exist_ok=True)
        pins = cls(secrets.token_hex(8), secrets.token_hex(8))
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"pin": pins.pin, "so_pin": pins.so_pin}, f)
        return pins


class SigningOtaPublisher:
    """The cloud's OTA step: sign the uploaded image in the HSM with the key the node trusts
    (its reported ``info.secure_boot_digest``, "auto select key"), then serve it at a
    per-job URL. An already-signed upload is stripped to its content first, so the node
    gets exactly one signature, the HSM's.

    With *delivery* (test mode) a plan armed for the node changes its next publish — served
    unsigned as uploaded, over plain HTTP or from *unknown_ca_host*, cut or stalled — and
    every publish is recorded in the delivery log. Without it nothing changes."""

    def __init__(
        self,
        store: CloudStore,
        signer: CloudSigner,
        host: OtaImageHost,
        *,
        delivery: DeliveryControl | None = None,
        unknown_ca_host: OtaImageHost | None = None,
    ):
        self.store = store
        self.signer = signer
        self.host = host
        self.delivery = delivery
        self.unknown_ca_host = unknown_ca_host

    def publish(self, job_id: str, node_id: str, image: bytes) -> PublishedImage:
        plan = self.delivery.plans.take(node_id) if self.delivery is not None else None
        if plan is not None:
            log.warning("OTA job %s for %s: test delivery plan %s", job_id, node_id, plan)
        signed_by: str | None = None
        if plan is None or plan.sign:
            node = self.store.get_node(node_id)
            reported = None
            if node is not None and isinstance(node.config, dict):
                reported = (node.config.get("info") or {}).get("secure_boot_digest")
            signed = self.signer.sign_for_node(signed_content(image), reported)
            log.info("OTA job %s for %s signed with HSM key %s", job_id, node_id, signed.key_label)
            data, signed_by = signed.data, signed.key_label
        else:
            data = image
        transport = plan.transport if plan is not None else "https"
        label: HostLabel = "unknown_ca" if transport == "unknown_ca" else "lab"
        host = self.unknown_ca_host if label == "unknown_ca" else self.host
        if host is None:
            raise OtaPublishError("the unknown_ca OTA transport needs the unknown-CA image host, which the stack runs in test mode only")
        mark = len(host.access_log()) if self.delivery is not None else 0  # where this publish's evidence starts
        published = host.publish(
            job_id,
            node_id,
            data,
            scheme="http" if transport == "http" else "https",
            cut_after=plan.cut_after if plan is not None else None,
            stall_after=plan.stall_after if plan is not None else None,
        )
        if self.delivery is not None:
            self.delivery.log.record(published, label, host, signed_by, mark)
        return published


def _san_hosts(pair: CertPair) -> list[str]:
    """The DNS names and IP addresses a server certificate is valid for."""
    san = pair.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in san if isinstance(name, x509.DNSName | x509.IPAddress)]


class LocalStack:
    """The whole local stand-in. Use as a context manager or call start()/stop()."""

    def __init__(
        self,
        state_dir: Path,
        *,
        test_mode: bool = False,
        ports: StackPorts = StackPorts(),
        pins: HsmPins | None = None,
        host: str = "127.0.0.1",
    ):
        self.state_dir = Path(state_dir).resolve()
        self.test_mode = test_mode
        self.ports = ports
        self.host = host
        self.clock: Clock = ManualClock() if test_mode else SystemClock()
        self.pins = pins or HsmPins.for_lab(self.state_dir / "hsm")
        self.pki = LabPki(self.state_dir / "pki")
        self.broker: MosquittoBroker | None = None
        self.store: CloudStore | None = None
        self.signer: CloudSigner | None = None
        self.ota_host: OtaImageHost | None = None
        self.unknown_ca_host: OtaImageHost | None = None
        """Test mode: the second HTTPS image host, with a certificate from a rogue CA."""
        self.unknown_ca_cert: RogueServerCertificate | None = None
        self.delivery: DeliveryControl | None = None
        """Test mode: OTA delivery plans and the delivery log (``/test/ota/*``)."""
        self.mqtt: CloudMqtt | None = None
        self.api: ApiServer | None = None

    @classmethod
    def for_lab(cls, lab: Lab, **kwargs: Any) -> LocalStack:
        """The lab's stack: state in ``<lab state>/cloud``, HSM PINs from boards.yaml ``hsm:`` when
        given (else generated once and kept beside the token, see :class:`HsmPins`)."""
        pins = HsmPins(lab.hsm.pin.get_secret_value(), lab.hsm.so_pin.get_secret_value()) if lab.hsm else None
        return cls(lab.state_dir / "cloud", pins=pins, **kwargs)

    def open_signer(self) -> CloudSigner:
        """The stack's Secure Boot V2 signer (SoftHSM2 token in ``<state>/hsm``), not yet set up."""
        return CloudSigner(self.state_dir / "hsm", self.pins.pin, self.pins.so_pin)

    def start(self) -> StackEndpoints:
        try:
            self.broker = MosquittoBroker(self.state_dir / "broker", self.pki, host=self.host, port=self.ports.mqtt)
            self.broker.start()
            self.store = CloudStore.open(self.state_dir / "store")
            self.signer = self.open_signer()
            self.signer.setup()
            ota_cert = self.pki.server_cert(OTA_CERT_NAME)
            self.ota_host = OtaImageHost(
                self.state_dir / "ota",
                ota_cert.cert_path,
                ota_cert.key_path,
                self.clock,
                host=self.host,
                port=self.ports.ota,
                plain_http=self.test_mode,
            )
            self.ota_host.start()
            if self.test_mode:
                self._start_delivery_faults(ota_cert)
            publisher = SigningOtaPublisher(
                self.store, self.signer, self.ota_host, delivery=self.delivery, unknown_ca_host=self.unknown_ca_host
            )
            self.mqtt = CloudMqtt(self.store, self.clock, pki=self.pki, host=self.host, port=self.broker.port, ota=publisher)
            self.mqtt.start()
            app = create_app(
                self.store,
                self.clock,
                self.mqtt,
                publisher,
                self.test_mode,
                mqtt_host=self.host,
                mqtt_port=self.broker.port,
                ota_delivery=self.delivery,
            )
            self.api = ApiServer(app, self.pki, host=self.host, port=self.ports.api)
            self.api.start()
        except BaseException:
            self.stop()
            raise
        return self.endpoints

    def _start_delivery_faults(self, ota_cert: CertPair) -> None:
        """Test mode: the unknown-CA image host (a fresh rogue CA each start, the real host's
        subject and SANs) and the delivery controls."""
        state = self.state_dir / UNKNOWN_CA_DIR
        self.unknown_ca_cert = issue_unknown_ca_certificate(
            self.pki.ca_cert_path, state / "cert", _san_hosts(ota_cert), subject=ota_cert.certificate.subject
        )
        self.unknown_ca_host = OtaImageHost(
            state, self.unknown_ca_cert.cert_path, self.unknown_ca_cert.key_path, self.clock, host=self.host
        )
        self.unknown_ca_host.start()
        self.delivery = DeliveryControl.create()

    @property
    def endpoints(self) -> StackEndpoints:
        if not (self.api and self.broker and self.ota_host):
            raise RuntimeError("the stack is not running")
        return StackEndpoints(
            api_url=self.api.url,
            mqtt_host=self.host,
            mqtt_port=self.broker.port,
            ota_url=self.ota_host.url,
            ca_cert=str(self.pki.ca_cert_path),
            state_dir=str(self.state_dir),
            test_mode=self.test_mode,
        )

    def add_user(self, email: str, password: str) -> str:
        """A cloud user (``rig user add``, fixtures); returns its user id."""
        store = self.store or CloudStore.open(self.state_dir / "store")
        return store.add_user(email, password, self.clock.now(), user_id=str(uuid.uuid4())).user_id

    def stop(self) -> None:
        """Stop what was started, newest first; one part failing to stop does not keep the rest running."""
        for name in ("api", "mqtt", "unknown_ca_host", "ota_host", "broker"):
            part = getattr(self, name)
            if part is None:
                continue
            try:
                part.stop()
            except Exception as exc:  # a lab must get every other part stopped regardless
                log.error("stopping %s failed: %s", name, exc)
            setattr(self, name, None)

    def __enter__(self) -> LocalStack:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

"""Test-mode OTA delivery faults: how the next OTA image for a node is delivered, and what was delivered.

The negative OTA cases of the AWS IoT Device Tester OTA test group and of ESP-IDF's OTA
example tests (``examples/system/ota/*/pytest_*.py``) need the cloud to deliver an
image the wrong way: over plain HTTP, from a server whose certificate comes from an
unknown CA, unsigned or signed with a key the node does not trust, cut off mid-download
(a connection cut), or frozen mid-download so the board can be hard-reset during the
flash write (a power cut). Suites arm a :class:`DeliveryPlan` for a node
(``POST /test/ota/delivery``, test mode only), then create the OTA job through the
normal REST API; the stack's OTA publisher takes the plan on the node's next publish.

:class:`DeliveryLog` keeps one :class:`Delivery` per publish with the OTA host's access
records for its URL — the evidence of exactly which bytes went to the device
(``GET /test/ota/deliveries``). Tokens never appear in it: access records carry
redacted paths only.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal, Protocol, get_args

from rig.cloud.ota_host import AccessRecord, OtaFault, PublishedImage, delivery_fault

__all__ = [
    "AccessSource",
    "Delivery",
    "DeliveryControl",
    "DeliveryLog",
    "DeliveryPlan",
    "DeliveryPlans",
    "HostLabel",
    "Transport",
]

Transport = Literal["https", "http", "unknown_ca"]
"""``https``: the lab OTA host; ``http``: its plain-HTTP listener; ``unknown_ca``: a second
HTTPS host whose certificate is issued by a CA the node does not trust."""
HostLabel = Literal["lab", "unknown_ca"]


@dataclass(frozen=True)
class DeliveryPlan:
    """How the next OTA image for *node_id* is delivered (consumed by that publish).

    *sign* False serves the upload byte for byte (no HSM strip and re-sign): the way an
    unsigned image, or one signed with an untrusted key, reaches a node when the cloud
    has no signing step. *cut_after* / *stall_after* N: every GET of the URL gets the
    full response headers but only the body bytes at file offsets below N, then the
    connection is closed (cut) or held open silently (stall).
    """

    node_id: str
    sign: bool = True
    transport: Transport = "https"
    cut_after: int | None = None
    stall_after: int | None = None

    def __post_init__(self) -> None:
        if not self.node_id:
            raise ValueError("a delivery plan needs a node id")
        if self.transport not in get_args(Transport):
            raise ValueError(f"transport must be one of {', '.join(get_args(Transport))}, got {self.transport!r}")
        delivery_fault(self.cut_after, self.stall_after)  # the image size is checked at publish


class DeliveryPlans:
    """Armed plans, at most one per node; thread-safe (the API arms, the OTA worker takes)."""

    def __init__(self) -> None:
        self._plans: dict[str, DeliveryPlan] = {}
        self._lock = threading.Lock()

    def arm(self, plan: DeliveryPlan) -> DeliveryPlan | None:
        """Arm *plan* for its node; returns the plan it replaced, if any."""
        with self._lock:
            previous = self._plans.get(plan.node_id)
            self._plans[plan.node_id] = plan
        return previous

    def take(self, node_id: str) -> DeliveryPlan | None:
        """The node's armed plan, removed (one-shot), or ``None``."""
        with self._lock:
            return self._plans.pop(node_id, None)

    def disarm(self, node_id: str) -> bool:
        """Drop the node's armed plan; False if none was armed."""
        with self._lock:
            return self._plans.pop(node_id, None) is not None

    def armed(self, node_id: str) -> DeliveryPlan | None:
        """The node's armed plan, left in place."""
        with self._lock:
            return self._plans.get(node_id)


class AccessSource(Protocol):
    """What :class:`DeliveryLog` reads from an OTA host (``rig.cloud.ota_host.OtaImageHost``)."""

    def access_log(self) -> list[AccessRecord]: ...

    def requests_for(self, url: str) -> list[AccessRecord]: ...


@dataclass(frozen=True)
class Delivery:
    """One publish of an OTA job's image for one node, and what its URL served so far."""

    job_id: str
    node_id: str
    sha256: str
    file_size: int
    url_scheme: str
    host: HostLabel
    signed_by: str | None
    """The HSM key label, or ``None`` when the upload was served unsigned-as-uploaded."""
    fault: OtaFault | None
    fault_at: int | None
    requests: tuple[AccessRecord, ...]
    """Every request for this publish's URL, oldest first."""
    tls_failures: tuple[AccessRecord, ...]
    """Failed TLS handshakes on the same listener from this publish until the next one
    there. A failed handshake carries no URL, so this is by order, not by token: with
    several nodes downloading at once it may hold another node's failures."""


@dataclass(frozen=True)
class _Published:
    published: PublishedImage
    host: HostLabel
    source: AccessSource
    signed_by: str | None
    mark: int


class DeliveryLog:
    """Every publish made while the stack runs in test mode, by job."""

    def __init__(self) -> None:
        self._items: list[_Published] = []
        self._lock = threading.Lock()

    def record(self, published: PublishedImage, host: HostLabel, source: AccessSource, signed_by: str | None, mark: int) -> None:
        """Remember a publish. *mark* is ``len(source.access_log())`` just before it."""
        with self._lock:
            self._items.append(_Published(published, host, source, signed_by, mark))

    def deliveries(self, job_id: str) -> list[Delivery]:
        """The job's publishes, oldest first, each with its requests as of now."""
        with self._lock:
            items = list(self._items)
        out = []
        for i, item in enumerate(items):
            if item.published.job_id != job_id:
                continue
            scheme = item.published.url.partition(":")[0]
            later = [x.mark for x in items[i + 1 :] if x.source is item.source and x.published.url.partition(":")[0] == scheme]
            window = item.source.access_log()[item.mark : later[0] if later else None]
            pub = item.published
            out.append(
                Delivery(
                    job_id=pub.job_id,
                    node_id=pub.node_id,
                    sha256=pub.sha256,
                    file_size=pub.file_size,
                    url_scheme=scheme,
                    host=item.host,
                    signed_by=item.signed_by,
                    fault=pub.fault,
                    fault_at=pub.fault_at,
                    requests=tuple(item.source.requests_for(pub.url)),
                    tls_failures=tuple(r for r in window if r.status == 0 and r.scheme == scheme and r.error),
                )
            )
        return out


@dataclass(frozen=True)
class DeliveryControl:
    """The test-mode OTA delivery controls the REST API's ``/test/ota/*`` endpoints use."""

    plans: DeliveryPlans
    log: DeliveryLog

    @classmethod
    def create(cls) -> DeliveryControl:
        return cls(DeliveryPlans(), DeliveryLog())

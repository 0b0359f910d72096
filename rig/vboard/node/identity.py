"""The node's identity, read from its flash: the ``fctry`` partition RainMaker claims into.

RainMaker reads its identity with ``esp_rmaker_factory_get`` from namespace
``rmaker_creds`` of the NVS partition named ``fctry`` (esp-rainmaker-common
``src/factory.c``; rainmaker-protocol.md §8.2), located through the partition table the
bootloader read at 0xC000 (``BootOutcome.partitions``). What happens when it is not
there follows ``esp_rmaker_init`` (esp-rainmaker ``src/core/esp_rmaker_core.c``) and
``esp_rmaker_get_mqtt_conn_params`` (``esp_rmaker_client_data.c``), for firmware built
without claiming (a lab node is claimed by the rig, never by Espressif's service):

* no ``fctry`` partition: ``nvs_flash_init_partition`` fails — ``NVS Flash init failed``,
  ``Failed to initialise storage`` (:attr:`IdentityProblem.STORAGE`);
* no ``node_id`` (blank, erased or unreadable partition): ``Failed to initialise Node Id``
  (:attr:`IdentityProblem.NODE_ID`) — an NVS page that fails its CRC is dropped by
  ESP-IDF's NVS, so a broken partition looks like an empty one;
* ``node_id`` but no client key, certificate or MQTT host: ``Failed to initialise MQTT
  Params`` (:attr:`IdentityProblem.MQTT_PARAMS`).

``random`` (64 bytes) gives the provisioning service name (its last 3 bytes) and PoP
(its first 4), ``examples/common/app_network/app_network.c``; ``server_cert`` is the
rig's addition, the lab CA the node trusts (``rig.cloud.fctry``).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field

from rig.cloud.fctry import FCTRY_NAMESPACE, FCTRY_PARTITION_NAME, SERVER_CERT_KEY, read_nvs
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.partition_table import DataSubtype, PartitionType
from rig.vboard.bootloader import PartitionEntry
from rig.vboard.flash import FlashStorage

log = logging.getLogger(__name__)

NVS_PARTITION_NAME = "nvs"
"""``NVS_DEFAULT_PART_NAME`` / ``ESP_RMAKER_NVS_PART_NAME``: where Wi-Fi, mapping and params live."""
DEFAULT_MQTT_PORT = 8883
"""``CONFIG_ESP_RMAKER_MQTT_PORT_8883``: the virtual firmware's port when ``mqtt_host`` has none."""
PROV_NAME_PREFIX = "PROV"
"""``CONFIG_APP_NETWORK_PROV_NAME_PREFIX``."""


class IdentityProblem(enum.Enum):
    STORAGE = "storage"
    NODE_ID = "node_id"
    MQTT_PARAMS = "mqtt_params"


class IdentityError(Exception):
    """The node cannot become a RainMaker node; :attr:`problem` selects what it logs."""

    def __init__(self, problem: IdentityProblem, detail: str):
        super().__init__(detail)
        self.problem = problem


@dataclass(frozen=True)
class NodeIdentity:
    """What ``fctry`` holds. Secrets (the client key) stay out of ``repr``."""

    node_id: str
    mqtt_host: str
    mqtt_port: int
    client_cert: bytes = field(repr=False)
    client_key: bytes = field(repr=False)
    random: bytes | None = field(repr=False)
    server_cert: bytes | None = field(repr=False)

    @property
    def pop(self) -> str | None:
        """``POP_TYPE_RANDOM``: the first 4 ``random`` bytes as 8 lower-case hex digits."""
        if self.random is None or len(self.random) < 4:
            return None
        return self.random[:4].hex()

    def service_name(self, mac: bytes) -> str:
        """``PROV_`` + the last 3 ``random`` bytes in hex (else the last 3 MAC bytes)."""
        tail = self.random[-3:] if self.random is not None and len(self.random) >= 3 else mac[3:6]
        return f"{PROV_NAME_PREFIX}_{tail.hex()}"


def find_partition(partitions: tuple[PartitionEntry, ...], label: str) -> PartitionEntry | None:
    """The data/nvs partition named *label* (``esp_partition_find_first(DATA, NVS, label)``)."""
    return next((p for p in partitions if p.label == label and p.type == PartitionType.DATA and p.subtype == DataSubtype.NVS), None)


def split_mqtt_host(value: str) -> tuple[str, int]:
    """``host`` or ``host:port`` (the rig's fctry may carry a port; RainMaker's never does)."""
    host, sep, port = value.rpartition(":")
    if sep and port.isdigit() and host and "]" not in port:
        return host, int(port)
    return value, DEFAULT_MQTT_PORT


def _text(value: bytes) -> str:
    """A blob read as ``esp_rmaker_factory_get`` returns it: NUL-terminated text."""
    return value.split(b"\0", 1)[0].decode("utf-8", "replace").strip()


def read_identity(flash: FlashStorage, partitions: tuple[PartitionEntry, ...]) -> NodeIdentity:
    """The node identity from ``fctry``, or :class:`IdentityError` saying why there is none."""
    part = find_partition(partitions, FCTRY_PARTITION_NAME)
    if part is None:
        raise IdentityError(IdentityProblem.STORAGE, "the partition table has no data/nvs partition named 'fctry'")
    image = flash.read(part.offset, part.size)
    try:
        creds = read_nvs(image, what=f"{FCTRY_PARTITION_NAME} partition").get(FCTRY_NAMESPACE, {})
    except FirmwareFormatError as exc:
        log.warning("fctry partition at 0x%x is unreadable, as ESP-IDF's NVS would drop it: %s", part.offset, exc)
        creds = {}
    node_id = _text(creds.get("node_id", b""))
    if not node_id:
        raise IdentityError(IdentityProblem.NODE_ID, f"fctry at 0x{part.offset:x} has no {FCTRY_NAMESPACE}/node_id")
    missing = [k for k in ("client_key", "client_cert", "mqtt_host") if not creds.get(k)]
    if missing:
        raise IdentityError(IdentityProblem.MQTT_PARAMS, f"fctry lacks {', '.join(missing)}")
    host, port = split_mqtt_host(_text(creds["mqtt_host"]))
    return NodeIdentity(
        node_id=node_id,
        mqtt_host=host,
        mqtt_port=port,
        client_cert=creds["client_cert"].rstrip(b"\0"),
        client_key=creds["client_key"].rstrip(b"\0"),
        random=creds.get("random"),
        server_cert=creds[SERVER_CERT_KEY].rstrip(b"\0") if SERVER_CERT_KEY in creds else None,
    )

"""The node's local control: ``esp_local_ctrl`` over HTTP, as RainMaker runs it on the LAN.

What esp-rainmaker ``components/esp_rainmaker/src/core/esp_rmaker_local_ctrl.c`` builds on
esp-idf ``components/esp_local_ctrl`` (rainmaker-protocol.md §4.7, last bullet):

* **when**: once the station has its address, before MQTT connects (``esp_rmaker_task``
  calls ``esp_rmaker_start_local_ctrl_service(node_id)``), on every boot that joins Wi-Fi;
* **where**: ``CONFIG_ESP_RMAKER_LOCAL_CTRL_HTTP_PORT`` (8080) on the node's address, an
  ``esp_https_server`` in insecure (plain HTTP) mode with ``HTTPD_SSL_CONFIG_DEFAULT``'s
  four sockets and LRU purge; endpoints ``esp_local_ctrl/version``, ``…/session``,
  ``…/control`` (protocomm, :mod:`rig.protocomm.httpd`). The mDNS ``_esp_local_ctrl._tcp``
  record is not emulated: the rig reaches a board by its address;
* **security**: ``CONFIG_ESP_RMAKER_LOCAL_CTRL_SECURITY``, default 1 (``SECURITY_1`` is the
  Kconfig default and what every RainMaker example sets); an image may select 2 with
  ``extra: {local_ctrl_security: 2}`` (RainMaker's newer local control: SRP6a user
  ``wifiprov``, password = the PoP). The version endpoint answers
  ``{"local_ctrl":{"ver":"v1.0","sec_ver":N,"sec_patch_ver":P}}`` (``esp_local_ctrl.c``
  ``ESP_LOCAL_CTRL_VER_FMT_STR``);
* **the PoP**: 8 lower-case hex digits from 4 random bytes (``esp_fill_random``), kept as a
  blob (no NUL) under key ``pop`` of NVS namespace ``local_ctrl`` in the ``nvs`` partition:
  read back on every boot, so it survives a reboot; a factory reset erases ``nvs``, so the
  next boot generates a new one (``esp_rmaker_local_ctrl_get_pop``);
* **the Local Control service** (``esp_rmaker_create_local_control_service``, type
  ``esp.service.local_control``): params ``POP`` (``esp.param.local_control_pop``, string,
  read-only) and ``Type`` (``esp.param.local_control_type``, int, read-only) — plus
  ``Username`` for security 2 — reported to the cloud with the other params, which is how
  the mapped user's phone app learns the PoP. The service has no write callback: writes to it
  change nothing;
* **properties** (``esp_local_ctrl_add_property``): index 0 ``config`` (type 1
  ``PROP_TYPE_NODE_CONFIG``, flag ``LOCAL_CTRL_PROP_FLAG_READONLY``) = the node config JSON, index 1
  ``params`` (type 2 ``PROP_TYPE_NODE_PARAMS``, flags 0) = the params JSON; setting
  ``params`` is ``esp_rmaker_handle_set_params(…, ESP_RMAKER_REQ_SRC_LOCAL)``: applied like a
  cloud write (source ``Local``) and reported on ``params/local``.

Statuses follow ``esp_local_ctrl_handler.c`` / ``esp_local_ctrl.c``: an index past the last
property, an empty index list or a read-only property in a set → ``InvalidArgument`` (nothing
applied); a params value that is not a JSON object → ``InternalError`` (``ESP_FAIL``); a
message that does not decode or names no command → no response at all (the handler fails and
protocomm_httpd closes the socket).

Flaw ``local_ctrl_no_pop``: security 1 without a proof of possession (``sec_params`` NULL, as a
build with the PoP switched off runs it) — the service reports an empty ``POP`` and anyone on
the LAN gets a session.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

from rig.protocomm.messages import (
    LOCAL_CTRL_CONTROL_EP,
    LOCAL_CTRL_DEFAULT_SECURITY,
    LOCAL_CTRL_PORT,
    LOCAL_CTRL_PROP_FLAG_READONLY,
    LOCAL_CTRL_SESSION_EP,
    LOCAL_CTRL_VERSION_EP,
    LocalCtrlMessage,
    LocalCtrlMsgType,
    PropertyInfo,
    RespGetPropertyCount,
    RespGetPropertyValues,
    RespSetPropertyValues,
    Status,
)
from rig.protocomm.security import DEFAULT_SEC2_USERNAME, DeviceSecurity, DeviceSecurity1, DeviceSecurity2
from rig.vboard.bootloader import LogMessage
from rig.vboard.node.data_model import SOURCE_LOCAL, local_control_service
from rig.vboard.node.messages import TAG_APP
from rig.vboard.node.protocomm_server import SEC2_PATCH_VERSION, ProtocommServer

if TYPE_CHECKING:
    from rig.vboard.node.node import RainMakerNode

MAX_OPEN_SOCKETS = 4
"""``HTTPD_SSL_CONFIG_DEFAULT``: four sockets, ``lru_purge_enable = true``."""
SECURITY_EXTRA_KEY = "local_ctrl_security"
"""Behaviour-manifest ``extra`` key an image sets to run security 2 instead."""
NVS_NAMESPACE, NVS_POP_KEY = "local_ctrl", "pop"
"""``ESP_RMAKER_NVS_LOCAL_CTRL_NAMESPACE`` / ``ESP_RMAKER_NVS_LOCAL_CTRL_POP``."""
POP_RANDOM_BYTES = 4
"""``esp_rmaker_local_ctrl_get_pop``: ``%02x`` of the first four random bytes (``ESP_RMAKER_POP_LEN`` 9 with the NUL)."""
LOCAL_CTRL_VERSION = "v1.0"

TAG_LOCAL = "esp_rmaker_local"
POP_GENERATED = LogMessage("I", TAG_LOCAL, "Couldn't find POP in NVS. Generating a new one.")
SERVICE_ENABLED = LogMessage("I", TAG_LOCAL, "Local Control Service Enabled")
STARTING = LogMessage("I", TAG_LOCAL, "Starting ESP Local control with HTTP Transport and security version: {security}")
STARTED = LogMessage("I", TAG_LOCAL, "esp_local_ctrl service started with name : {name}")
APP_STARTED = LogMessage("I", TAG_APP, "Local Control Started.")
"""The switch example's echo of ``RMAKER_EVENT_LOCAL_CTRL_STARTED`` (idf-console.md §6.1)."""


class PropertyType(IntEnum):
    """``enum property_types`` of esp_rmaker_local_ctrl.c."""

    NODE_CONFIG = 1
    NODE_PARAMS = 2




@dataclass(frozen=True)
class LocalCtrlProperty:
    """One ``esp_local_ctrl_prop_t`` (``size`` 0: variable length, so no size check)."""

    name: str
    type: PropertyType
    flags: int


PROPERTIES: tuple[LocalCtrlProperty, ...] = (
    LocalCtrlProperty("config", PropertyType.NODE_CONFIG, LOCAL_CTRL_PROP_FLAG_READONLY),
    LocalCtrlProperty("params", PropertyType.NODE_PARAMS, 0),
)
"""Registered in this order by ``__esp_rmaker_start_local_ctrl_service``: indices 0 and 1."""


def version_json(security: int, patch_version: int) -> str:
    """The version endpoint's answer (``ESP_LOCAL_CTRL_VER_FMT_STR``, no spaces)."""
    return json.dumps({"local_ctrl": {"ver": LOCAL_CTRL_VERSION, "sec_ver": security, "sec_patch_ver": patch_version}},
                      separators=(",", ":"))  # fmt: skip


def new_pop() -> str:
    return secrets.token_bytes(POP_RANDOM_BYTES).hex()


class UnsupportedCommand(ValueError):
    """A ``LocalCtrlMessage`` naming no command: ``esp_local_ctrl_command_dispatcher`` fails, protocomm answers nothing."""


class LocalControlEndpoints:
    """The ``esp_local_ctrl/control`` handler over one node."""

    def __init__(self, node: RainMakerNode, properties: tuple[LocalCtrlProperty, ...] = PROPERTIES):
        self.node = node
        self.properties = properties

    def control(self, data: bytes) -> bytes:
        request = LocalCtrlMessage.decode(data)  # undecodable: raises, protocomm fails the request
        msg = int(request.msg)
        if msg == LocalCtrlMsgType.TypeCmdGetPropertyCount:
            payload = {"resp_get_prop_count": RespGetPropertyCount(status=Status.Success, count=len(self.properties))}
        elif msg == LocalCtrlMsgType.TypeCmdGetPropertyValues:
            indices = list(request.cmd_get_prop_vals.indices) if request.cmd_get_prop_vals is not None else []
            payload = {"resp_get_prop_vals": self._get_values(indices)}
        elif msg == LocalCtrlMsgType.TypeCmdSetPropertyValues:
            props = list(request.cmd_set_prop_vals.props) if request.cmd_set_prop_vals is not None else []
            payload = {"resp_set_prop_vals": RespSetPropertyValues(status=self._set_values([(p.index, bytes(p.value)) for p in props]))}
        else:
            raise UnsupportedCommand(f"local control message type {msg} is not a command (Invalid command handler lookup)")
        return LocalCtrlMessage(msg=msg + 1, **payload).encode()  # "Response is request + 1"

    def _get_values(self, indices: list[int]) -> RespGetPropertyValues:
        if not indices or any(i >= len(self.properties) for i in indices):
            return RespGetPropertyValues(status=Status.InvalidArgument)
        props = []
        for index in indices:
            prop = self.properties[index]
            props.append(PropertyInfo(status=Status.Success, name=prop.name, type=int(prop.type), flags=prop.flags,
                                      value=self._value(prop).encode()))  # fmt: skip
        return RespGetPropertyValues(status=Status.Success, props=props)

    def _value(self, prop: LocalCtrlProperty) -> str:
        """``esp_rmaker_get_node_config`` / ``esp_rmaker_get_node_params``."""
        if prop.type is PropertyType.NODE_CONFIG:
            return self.node.config_json()
        assert self.node.model is not None
        return self.node.model.params_json()

    def _set_values(self, values: list[tuple[int, bytes]]) -> Status:
        if not values or any(index >= len(self.properties) for index, _ in values):
            return Status.InvalidArgument
        if any(self.properties[index].flags & LOCAL_CTRL_PROP_FLAG_READONLY for index, _ in values):
            return Status.InvalidArgument  # "%s is read-only": nothing is applied
        for index, value in values:
            if self.properties[index].type is PropertyType.NODE_PARAMS and not self.node.handle_set_params(value, SOURCE_LOCAL):
                return Status.InternalError
        return Status.Success



class LocalControl(ProtocommServer):
    """esp_local_ctrl of one boot: the PoP, the protocomm instance and its HTTP server."""

    what = "local control"

    def __init__(self, node: RainMakerNode, pop: str, security: int, port: int = LOCAL_CTRL_PORT):
        super().__init__(node.runtime, node.address, port, max_open_sockets=MAX_OPEN_SOCKETS)
        self.node = node
        self.pop = pop
        self.security = security
        self.no_pop = "local_ctrl_no_pop" in node.flaws
        self.endpoints = LocalControlEndpoints(node)
        device_security = self._device_security()
        self.protocomm.set_version(LOCAL_CTRL_VERSION_EP, version_json(security, device_security.patch_version))
        self.protocomm.set_security(LOCAL_CTRL_SESSION_EP, device_security)
        self.protocomm.add_endpoint(LOCAL_CTRL_CONTROL_EP, self.endpoints.control)

    @property
    def reported_pop(self) -> str:
        """What the Local Control service's ``POP`` param says (empty when no PoP is in use)."""
        return "" if self.no_pop else self.pop

    def _device_security(self) -> DeviceSecurity:
        if self.security == 2:
            return DeviceSecurity2.from_pop(self.pop, DEFAULT_SEC2_USERNAME, patch_version=SEC2_PATCH_VERSION)
        return DeviceSecurity1("" if self.no_pop else self.pop)


def stored_pop(node: RainMakerNode) -> str:
    """``esp_rmaker_local_ctrl_get_pop``: the PoP in NVS, or a new one generated and stored."""
    assert node.nvs is not None
    raw = node.nvs.get(NVS_NAMESPACE, NVS_POP_KEY)
    if raw:
        return raw.decode("ascii", "replace")
    node.runtime.log(POP_GENERATED)
    pop = new_pop()
    node.nvs.set_blob(NVS_NAMESPACE, NVS_POP_KEY, pop.encode("ascii"))
    node.nvs.commit()
    return pop


def image_security(node: RainMakerNode) -> int:
    """The image's local-control scheme: 2 when its manifest asks for it, else RainMaker's default 1."""
    return 2 if node.behaviour.extra.get(SECURITY_EXTRA_KEY) == 2 else LOCAL_CTRL_DEFAULT_SECURITY


def start_local_control(node: RainMakerNode, port: int = LOCAL_CTRL_PORT) -> LocalControl | None:
    """``esp_rmaker_start_local_ctrl_service(node_id)``: add the Local Control service to the
    node, start the server on the node's address, log as RainMaker does. The runtime tracks the
    server, so a reset closes it. None (and a log line on stderr) when it cannot listen."""
    assert node.model is not None and node.node_id is not None
    security = image_security(node)
    pop = stored_pop(node)
    control = LocalControl(node, pop, security, port)
    node.model.add_device(local_control_service(control.reported_pop, security, DEFAULT_SEC2_USERNAME if security == 2 else None))
    node.runtime.log(SERVICE_ENABLED)
    node.runtime.log(STARTING, security=security)
    if not control.start():
        return None
    node.runtime.log(STARTED, name=node.node_id)
    node.runtime.log(APP_STARTED)
    return control


__all__ = [
    "LOCAL_CTRL_PORT",
    "PROPERTIES",
    "LocalControl",
    "LocalControlEndpoints",
    "LocalCtrlProperty",
    "PropertyType",
    "start_local_control",
    "stored_pop",
    "version_json",
]

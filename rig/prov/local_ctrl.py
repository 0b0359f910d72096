"""The phone app's local-control role: esp_local_ctrl over HTTP on the LAN, with the node's PoP.

What the RainMaker app and esp-rainmaker-cli (``rmaker_tools/rmaker_local_ctrl``:
``esp_rainmaker_ctrl.py``, ``proto/proto_lc.py``) do with a node's local control
(rainmaker-protocol.md §4.7; esp-idf ``components/esp_local_ctrl``; esp-rainmaker
``src/core/esp_rmaker_local_ctrl.c``):

1. learn the PoP and the scheme from the node's **Local Control** service params in the cloud
   (``POP``, ``Type``; :func:`local_control_service`) — only the mapped user can read them;
2. ``POST /esp_local_ctrl/version`` (plaintext; JSON ``{"local_ctrl":{"ver","sec_ver","sec_patch_ver"}}``
   on current ESP-IDF, a bare ``v1.0`` on old ones), then the ``/esp_local_ctrl/session``
   handshake (security 1: X25519 + PoP; security 2: SRP6a, user ``wifiprov``, password = PoP);
3. ``/esp_local_ctrl/control``: ``LocalCtrlMessage`` get property count / get values / set
   values, encrypted with the session. RainMaker's properties are ``config`` (read-only node
   config JSON) and ``params`` (the params JSON; setting it is a params write, source Local).

Every step is its own method so a suite can leave the happy path anywhere (no session, wrong
PoP, plaintext to the control endpoint, an index past the end, a write to the read-only
``config``): :meth:`LocalControlClient.call` returns whatever status the node answers and
:meth:`LocalControlClient.send_control` sends any bytes. Status failures on the convenience
methods raise :class:`LocalControlError`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from rig.evidence.redaction import SECRETS
from rig.protocomm.errors import ProtobufDecodeError
from rig.protocomm.messages import (
    LOCAL_CTRL_CONTROL_EP,
    LOCAL_CTRL_DEFAULT_SECURITY,
    LOCAL_CTRL_PORT,
    LOCAL_CTRL_PROP_FLAG_READONLY,
    LOCAL_CTRL_SESSION_EP,
    LOCAL_CTRL_VERSION_EP,
    CmdGetPropertyCount,
    CmdGetPropertyValues,
    CmdSetPropertyValues,
    LocalCtrlMessage,
    LocalCtrlMsgType,
    PropertyValue,
    Status,
)
from rig.protocomm.security import ClientSecurity
from rig.prov.polling import poll_until
from rig.prov.rainmaker_api import CLOUD_POLL_S, RainMakerUser
from rig.prov.session import SessionClient, status_name

CONFIG_PROPERTY, PARAMS_PROPERTY = "config", "params"
SERVICE_TYPE = "esp.service.local_control"
POP_PARAM_TYPE, TYPE_PARAM_TYPE = "esp.param.local_control_pop", "esp.param.local_control_type"
SERVICE_NAME, POP_PARAM, TYPE_PARAM, USERNAME_PARAM = "Local Control", "POP", "Type", "Username"
"""RainMaker's names (``ESP_RMAKER_LOCAL_CTRL_DEVICE_NAME``, ``ESP_RMAKER_DEF_LOCAL_CONTROL_POP``/``_TYPE``);
:func:`local_control_service` finds the service by type first, so a renamed one is found too."""


class LocalControlError(RuntimeError):
    """A local-control request the node answered with a failure status (``status``), or whose answer did not make sense."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


@dataclass(frozen=True)
class LocalCtrlVersion:
    """What ``esp_local_ctrl/version`` answered."""

    raw: str
    ver: str
    sec_ver: int | None
    """None when the node answered a bare version string (ESP-IDF before the JSON form)."""
    sec_patch_ver: int = 0

    @classmethod
    def parse(cls, raw: bytes) -> LocalCtrlVersion:
        text = raw.decode("latin-1")
        try:
            info = json.loads(text)
        except ValueError:
            return cls(text, text.strip(), None)
        ctrl = info.get("local_ctrl", {}) if isinstance(info, dict) else {}
        if not isinstance(ctrl, dict):
            raise LocalControlError(f"esp_local_ctrl/version answered {text[:120]!r}: 'local_ctrl' is not an object")
        sec_ver = ctrl.get("sec_ver")
        return cls(text, str(ctrl.get("ver", "")), int(sec_ver) if isinstance(sec_ver, int) else None,
                   int(ctrl.get("sec_patch_ver", 0) or 0))  # fmt: skip


@dataclass(frozen=True)
class Property:
    """One ``PropertyInfo`` the node returned, with the index it was asked for."""

    index: int
    name: str
    type: int
    flags: int
    value: bytes

    @property
    def readonly(self) -> bool:
        return bool(self.flags & LOCAL_CTRL_PROP_FLAG_READONLY)

    def json(self) -> Any:
        try:
            return json.loads(self.value)
        except ValueError as exc:
            raise LocalControlError(f"property {self.name!r} is not JSON ({exc}): {self.value[:80]!r}") from exc


@dataclass(frozen=True)
class LocalControlService:
    """The node's Local Control service as the cloud reports it: what the app needs to connect."""

    pop: str
    security: int
    username: str | None = None


def local_control_service(config: dict[str, Any], params: dict[str, Any]) -> LocalControlService | None:
    """The Local Control service in a node's cloud config and params (found by service and param
    types, as the app does), or None when the node reports none (security 0, or no local control)."""
    service_name, pop_name, type_name = SERVICE_NAME, POP_PARAM, TYPE_PARAM
    for service in config.get("services", []):
        if isinstance(service, dict) and service.get("type") == SERVICE_TYPE:
            service_name = str(service.get("name"))
            for param in service.get("params", []):
                if isinstance(param, dict) and param.get("type") == POP_PARAM_TYPE:
                    pop_name = str(param.get("name"))
                elif isinstance(param, dict) and param.get("type") == TYPE_PARAM_TYPE:
                    type_name = str(param.get("name"))
            break
    values = params.get(service_name)
    if not isinstance(values, dict) or type_name not in values:
        return None
    pop = values.get(pop_name)
    username = values.get(USERNAME_PARAM)
    SECRETS.add(pop if isinstance(pop, str) else None)
    return LocalControlService(pop if isinstance(pop, str) else "", int(values[type_name]), str(username) if username else None)


def wait_local_control_service(user: RainMakerUser, node_id: str, timeout: float = 30.0) -> LocalControlService | None:
    """Poll the cloud until the node's params carry its Local Control service (the node reports
    them on ``params/local/init`` once mapped); None if they never do within *timeout*."""
    return poll_until(lambda: local_control_service(user.node_config(node_id), user.params(node_id)),
                      lambda found: found is not None, timeout, CLOUD_POLL_S)  # fmt: skip


@dataclass
class LocalControlClient(SessionClient):
    """One local-control conversation with one node over *transport* (an HTTP transport on port 8080)."""

    version: LocalCtrlVersion | None = None

    session_endpoint: ClassVar[str] = LOCAL_CTRL_SESSION_EP
    error: ClassVar[type[Exception]] = LocalControlError

    # ------------------------------------------------------------------ plaintext endpoints

    def get_version(self) -> LocalCtrlVersion:
        self.version = LocalCtrlVersion.parse(self.transport.send(LOCAL_CTRL_VERSION_EP, b"---"))
        return self.version

    def open_session(self, sec_ver: int | None = None) -> ClientSecurity:
        """The ``esp_local_ctrl/session`` handshake with scheme *sec_ver* (default: what the version
        endpoint announces, else security 1). ``SessionError`` or a transport error when refused."""
        version = self.version or self.get_version()
        chosen = sec_ver if sec_ver is not None else (version.sec_ver if version.sec_ver is not None else LOCAL_CTRL_DEFAULT_SECURITY)
        return self._handshake(chosen, version.sec_patch_ver)

    # ------------------------------------------------------------------ the control endpoint

    def send_control(self, plaintext: bytes) -> bytes:
        """*plaintext* to ``esp_local_ctrl/control`` through the session (as is without one); the plaintext answer."""
        if self.security is None:
            return self.transport.send(LOCAL_CTRL_CONTROL_EP, plaintext)
        return self.security.decrypt(self.transport.send(LOCAL_CTRL_CONTROL_EP, self.security.encrypt(plaintext)))

    def call(self, request: LocalCtrlMessage) -> LocalCtrlMessage:
        """Send *request* through the session, decode the answer; the caller judges its status."""
        answer = self._exchange(LOCAL_CTRL_CONTROL_EP, request.encode())
        try:
            reply = LocalCtrlMessage.decode(answer)
        except ProtobufDecodeError as exc:
            raise LocalControlError(f"{LOCAL_CTRL_CONTROL_EP}: the node's answer is not a LocalCtrlMessage ({exc})") from exc
        if int(reply.msg) != int(request.msg) + 1:
            asked = LocalCtrlMsgType(request.msg).name
            raise LocalControlError(f"{LOCAL_CTRL_CONTROL_EP}: asked {asked}, the node answered message type {int(reply.msg)}")
        return reply

    def property_count(self) -> int:
        reply = self.call(LocalCtrlMessage(msg=LocalCtrlMsgType.TypeCmdGetPropertyCount, cmd_get_prop_count=CmdGetPropertyCount()))
        resp = reply.resp_get_prop_count
        _check(resp.status if resp is not None else None, "get property count")
        return int(resp.count)

    def property_values(self, indices: list[int]) -> list[Property]:
        reply = self.call(LocalCtrlMessage(msg=LocalCtrlMsgType.TypeCmdGetPropertyValues,
                                           cmd_get_prop_vals=CmdGetPropertyValues(indices=list(indices))))  # fmt: skip
        resp = reply.resp_get_prop_vals
        _check(resp.status if resp is not None else None, f"get property values {indices}")
        props = list(resp.props)
        if len(props) != len(indices):
            raise LocalControlError(f"asked for {len(indices)} properties, the node returned {len(props)}")
        return [Property(i, str(p.name), int(p.type), int(p.flags), bytes(p.value)) for i, p in zip(indices, props, strict=True)]

    def properties(self) -> list[Property]:
        """Every property, one request per index (as esp_rainmaker_ctrl reads them)."""
        return [self.property_values([i])[0] for i in range(self.property_count())]

    def find_property(self, name: str) -> Property:
        for prop in self.properties():
            if prop.name == name:
                return prop
        raise LocalControlError(f"the node has no local-control property {name!r}")

    def set_property_values(self, values: dict[int, bytes]) -> Status | int:
        """``CmdSetPropertyValues``; returns the node's status (an int when it is not a known Status)."""
        request = CmdSetPropertyValues(props=[PropertyValue(index=i, value=v) for i, v in values.items()])
        reply = self.call(LocalCtrlMessage(msg=LocalCtrlMsgType.TypeCmdSetPropertyValues, cmd_set_prop_vals=request))
        resp = reply.resp_set_prop_vals
        if resp is None:
            raise LocalControlError("set property values: the node answered without a RespSetPropertyValues")
        return resp.status  # decoded as the open enum: a Status, or the int the node sent when Status lacks it

    # ------------------------------------------------------------------ RainMaker's properties

    def get_config(self) -> dict[str, Any]:
        return dict(self.find_property(CONFIG_PROPERTY).json())

    def get_params(self) -> dict[str, Any]:
        return dict(self.find_property(PARAMS_PROPERTY).json())

    def set_params(self, payload: dict[str, Any]) -> None:
        """Write params as the app does locally: the ``params`` property, the JSON as its value."""
        prop = self.find_property(PARAMS_PROPERTY)
        if prop.readonly:
            raise LocalControlError(f"the node marks '{PARAMS_PROPERTY}' read-only (flags {prop.flags:#x})")
        _check(self.set_property_values({prop.index: json.dumps(payload, separators=(",", ":")).encode()}), "set params")


def _check(status: int | None, step: str) -> None:
    if status is None:
        raise LocalControlError(f"{step}: the node answered without a status")
    if status != Status.Success:
        raise LocalControlError(f"{step}: the node answered {status_name(status)}", status=int(status))


__all__ = [
    "LOCAL_CTRL_PORT",
    "LocalControlClient",
    "LocalControlError",
    "LocalControlService",
    "LocalCtrlVersion",
    "Property",
    "local_control_service",
    "wait_local_control_service",
]

"""The node's devices, services and params, and the JSON RainMaker builds from them.

The virtual firmware is RainMaker's switch example (esp-rainmaker
``examples/switch/main/app_main.c``): node ``"ESP RainMaker Device"`` of type
``"Switch"``, one device ``"Switch"`` (``esp.device.switch``) with the standard ``Name``
(``esp.param.name``) and ``Power`` (``esp.param.power``, primary, toggle) params, plus
the standard services: ``OTA`` (``esp.service.ota``: ``Status``, ``Info``, ``URL``),
``Time`` (``esp.service.time``: ``TZ``, ``TZ-POSIX``) and ``Connectivity``
(``esp.service.connectivity``: ``Connected``) (``include/esp_rmaker_standard_*.h``,
``src/standard_types``, ``src/core/esp_rmaker_connectivity.c``).

JSON follows ``src/core/esp_rmaker_node_config.c`` (node config, key order included:
``node_id``, ``config_version``, ``info``, [``attributes``], ``devices``, ``services``)
and ``src/core/esp_rmaker_param.c`` (``{"<Device>":{"<Param>":value}}``; a write request
whose JSON does not parse is dropped, a value of the wrong JSON type is ignored, as
``json_obj_get_bool``/``_int``/``_float``/``_string`` fail on it). Compact separators, as
``json_generator`` writes.
"""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

CONFIG_VERSION = "2020-03-20"
"""``ESP_RMAKER_CONFIG_VERSION`` (``include/esp_rmaker_core.h``)."""
PLATFORM = "esp32c3"
"""``CONFIG_IDF_TARGET``."""
NODE_NAME = "ESP RainMaker Device"
NODE_TYPE = "Switch"
SWITCH_DEVICE = "Switch"
POWER_PARAM = "Power"
NAME_PARAM = "Name"
CONNECTIVITY_SERVICE = "Connectivity"
CONNECTED_PARAM = "Connected"
NAME_PARAM_TYPE = "esp.param.name"
SOURCE_INIT, SOURCE_CLOUD, SOURCE_LOCAL = "Init", "Cloud", "Local"
"""Who wrote a param (``esp_rmaker_req_src_t``), as ``esp_rmaker_device_cb_src_to_str`` prints it."""


class ValType(enum.IntEnum):
    """``esp_rmaker_val_type_t``."""

    BOOLEAN = 1
    INTEGER = 2
    FLOAT = 3
    STRING = 4
    OBJECT = 5
    ARRAY = 6


DATA_TYPES = {
    ValType.BOOLEAN: "bool", ValType.INTEGER: "int", ValType.FLOAT: "float",
    ValType.STRING: "string", ValType.OBJECT: "object", ValType.ARRAY: "array",
}  # fmt: skip


class MalformedParams(ValueError):
    """A ``params/remote`` payload that is not a JSON object (``json_parse_start`` fails)."""


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


@dataclass
class Param:
    """One ``esp_rmaker_param_t``."""

    name: str
    type: str | None
    val_type: ValType
    value: Any
    properties: tuple[str, ...] = ("read", "write")
    persist: bool = False
    ui_type: str | None = None

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        if self.type:
            out["type"] = self.type
        out["data_type"] = DATA_TYPES[self.val_type]
        out["properties"] = list(self.properties)
        if self.ui_type:
            out["ui_type"] = self.ui_type
        return out

    def accepts(self, raw: Any) -> bool:
        """Whether *raw* (decoded JSON) is a value ``esp_rmaker_device_set_params`` would take."""
        if self.val_type is ValType.BOOLEAN:
            return isinstance(raw, bool)
        if self.val_type is ValType.INTEGER:
            return isinstance(raw, int) and not isinstance(raw, bool)
        if self.val_type is ValType.FLOAT:
            return isinstance(raw, int | float) and not isinstance(raw, bool)
        if self.val_type is ValType.STRING:
            return isinstance(raw, str)
        if self.val_type is ValType.OBJECT:
            return isinstance(raw, dict)
        return isinstance(raw, list)

    def parse_console(self, text: str) -> Any:
        """A console argument as this param's value (``set-param``/``update-param``); ValueError if it is not one."""
        if self.val_type is ValType.BOOLEAN:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        if self.val_type is ValType.INTEGER:
            return int(text)
        if self.val_type is ValType.FLOAT:
            return float(text)
        if self.val_type is ValType.STRING:
            return text
        value = json.loads(text)
        if not self.accepts(value):
            raise ValueError(text)
        return value

    def text(self) -> str:
        """The value as the console prints it (bools as ``true``/``false``)."""
        if self.val_type is ValType.BOOLEAN:
            return "true" if self.value else "false"
        if self.val_type in (ValType.OBJECT, ValType.ARRAY):
            return _dumps(self.value)
        return str(self.value)


@dataclass
class Device:
    """One ``esp_rmaker_device_t`` (a device, or a service when ``is_service``)."""

    name: str
    type: str
    params: list[Param]
    primary: str | None = None
    is_service: bool = False
    accepts_writes: bool = True
    """False for a service RainMaker creates without a write callback (Local Control): a write
    request naming it finds its params but nothing applies them (``esp_rmaker_device_set_params``)."""

    def config(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "type": self.type}
        if self.primary:
            out["primary"] = self.primary
        out["params"] = [p.config() for p in self.params]
        return out

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


@dataclass(frozen=True)
class NodeInfo:
    name: str
    type: str
    fw_version: str
    model: str
    project_name: str


@dataclass
class NodeModel:
    """The node's devices and services with their current values. Thread-safe."""

    info: NodeInfo
    devices: list[Device]
    _lock: threading.RLock = field(default_factory=threading.RLock, repr=False)

    def device(self, name: str) -> Device | None:
        return next((d for d in self.devices if d.name == name), None)

    def find(self, device: str, param: str) -> Param | None:
        found = self.device(device)
        return None if found is None else found.param(param)

    def params(self) -> Iterator[tuple[Device, Param]]:
        for device in self.devices:
            for param in device.params:
                yield device, param

    # ------------------------------------------------------------------ JSON

    def config_json(self, node_id: str, secure_boot_digest: dict[str, str | None] | None) -> str:
        """The ``config`` payload (``__esp_rmaker_get_node_config``)."""
        info: dict[str, Any] = {
            "name": self.info.name,
            "fw_version": self.info.fw_version,
            "type": self.info.type,
            "model": self.info.model,
            "project_name": self.info.project_name,
            "platform": PLATFORM,
        }
        if secure_boot_digest is not None:
            info["secure_boot_digest"] = secure_boot_digest
        config: dict[str, Any] = {"node_id": node_id, "config_version": CONFIG_VERSION, "info": info}
        config["devices"] = [d.config() for d in self.devices if not d.is_service]
        config["services"] = [d.config() for d in self.devices if d.is_service]
        return _dumps(config)

    def params_json(self, only: set[tuple[str, str]] | None = None) -> str:
        """``esp_rmaker_populate_params``: every param, or only the (device, param) pairs in *only*."""
        with self._lock:
            out: dict[str, dict[str, Any]] = {}
            for device, param in self.params():
                if only is None or (device.name, param.name) in only:
                    out.setdefault(device.name, {})[param.name] = param.value
            return _dumps(out)

    def parse_set_params(self, payload: bytes) -> list[tuple[Device, Param, Any]]:
        """The writes a ``params/remote`` payload asks for, in the node's device/param order;
        :class:`MalformedParams` if it is not a JSON object."""
        try:
            body = json.loads(payload)
        except (ValueError, UnicodeDecodeError) as exc:
            raise MalformedParams(f"params payload is not JSON ({exc})") from None
        if not isinstance(body, dict):
            raise MalformedParams("params payload is not a JSON object")
        writes: list[tuple[Device, Param, Any]] = []
        for device in list(self.devices):
            values = body.get(device.name)
            if not isinstance(values, dict) or not device.accepts_writes:
                continue
            for param in device.params:
                if param.name in values and param.accepts(values[param.name]):
                    writes.append((device, param, values[param.name]))
        return writes

    def add_device(self, device: Device) -> None:
        """``esp_rmaker_node_add_device``: a service added after init (Local Control), last in the node."""
        with self._lock:
            if self.device(device.name) is not None:
                raise ValueError(f"the node already has a device or service named {device.name!r}")
            self.devices.append(device)

    def set_value(self, param: Param, value: Any) -> bool:
        """Store *value*; whether it changed."""
        with self._lock:
            changed = param.value != value or type(param.value) is not type(value)
            param.value = value
            return changed


def switch_node(fw_version: str, project_name: str) -> NodeModel:
    """RainMaker's switch example as this virtual firmware builds it (``DEFAULT_POWER`` off)."""
    switch = Device(
        SWITCH_DEVICE,
        "esp.device.switch",
        [
            Param(NAME_PARAM, NAME_PARAM_TYPE, ValType.STRING, SWITCH_DEVICE, persist=True),
            Param(POWER_PARAM, "esp.param.power", ValType.BOOLEAN, False, persist=True, ui_type="esp.ui.toggle"),
        ],
        primary=POWER_PARAM,
    )
    ota = Device(
        "OTA",
        "esp.service.ota",
        [
            Param("Status", "esp.param.ota_status", ValType.STRING, "", properties=("read",)),
            Param("Info", "esp.param.ota_info", ValType.STRING, "", properties=("read",)),
            Param("URL", "esp.param.ota_url", ValType.STRING, "", properties=("write",)),
        ],
        is_service=True,
    )
    time_service = Device(
        "Time",
        "esp.service.time",
        [
            Param("TZ", "esp.param.tz", ValType.STRING, "", persist=True),
            Param("TZ-POSIX", "esp.param.tz_posix", ValType.STRING, "", persist=True),
        ],
        is_service=True,
    )
    connectivity = Device(
        CONNECTIVITY_SERVICE,
        "esp.service.connectivity",
        [Param(CONNECTED_PARAM, "esp.param.connected", ValType.BOOLEAN, False, properties=("read",))],
        is_service=True,
    )
    info = NodeInfo(NODE_NAME, NODE_TYPE, fw_version, project_name, project_name)
    return NodeModel(info, [switch, ota, time_service, connectivity])


LOCAL_CONTROL_SERVICE = "Local Control"
"""``ESP_RMAKER_LOCAL_CTRL_DEVICE_NAME``; params ``ESP_RMAKER_DEF_LOCAL_CONTROL_POP`` / ``_TYPE``."""
LOCAL_CONTROL_POP, LOCAL_CONTROL_TYPE, LOCAL_CONTROL_USERNAME = "POP", "Type", "Username"


def local_control_service(pop: str, security: int, username: str | None = None) -> Device:
    """``esp_rmaker_create_local_control_service`` (``esp_rmaker_standard_services.c``): read-only
    ``POP`` and ``Type`` (the protocomm security scheme), and ``Username`` when security 2 needs one
    (RainMaker's newer local control). No write callback. The username param's type string is the
    rig's guess after the other two (``esp.param.local_control_*``)."""
    params = [
        Param(LOCAL_CONTROL_POP, "esp.param.local_control_pop", ValType.STRING, pop, properties=("read",)),
        Param(LOCAL_CONTROL_TYPE, "esp.param.local_control_type", ValType.INTEGER, security, properties=("read",)),
    ]
    if username is not None:
        params.append(Param(LOCAL_CONTROL_USERNAME, "esp.param.local_control_username", ValType.STRING, username, properties=("read",)))
    return Device(LOCAL_CONTROL_SERVICE, "esp.service.local_control", params, is_service=True, accepts_writes=False)

"""The RainMaker node: what the virtual firmware's ``app_main`` builds and runs.

The boot follows esp-rainmaker's switch example (``examples/switch/main/app_main.c``)
and the core it calls (``src/core/esp_rmaker_core.c``; rainmaker-protocol.md §1.3, §2):

1. console commands registered (``esp_rmaker_console_init``), NVS opened;
2. ``esp_rmaker_node_init``: identity from ``fctry`` (:mod:`.identity`) — without one the
   node logs why and stays a plain console (the switch example would ``abort()`` after
   5 s and boot-loop; the virtual firmware waits, so a lab can flash ``fctry`` in peace),
   ``Node ID ----- <id>``, the Switch device and the standard services;
3. ``esp_rmaker_start``; ``app_network_start``: with Wi-Fi credentials in NVS
   ``Already provisioned, starting Wi-Fi STA``, else the provisioning service;
   ``app_main`` returns once the station has an IP address (the console runs meanwhile);
4. on the IP address the RainMaker task connects MQTT (:mod:`.cloud_link`); on the first
   connection it publishes ``config``, then the pending ``user/mapping``; once the mapping
   is done it subscribes ``node/<id>/params/remote`` and publishes ``params/local/init``.

Writes from the cloud (``params/remote``) go through the device's write callback
(``Received write request via : Cloud``) and are reported back on ``params/local``. A
payload that is not a JSON object is dropped (``json_parse_start`` fails) — or, with the
``panics_on_bad_params`` flaw, panics the chip.

OTA: on the first connection :mod:`.ota_client` subscribes ``node/<id>/otaurl`` and sends
``otafetch``; an ``otaurl`` is installed into the passive slot on the work queue; a new image
is confirmed once MQTT connects, or rolled back, by :mod:`.boot_confirm`.

Everything the node starts is on :attr:`RainMakerNode.runtime`, so a reset stops it.
"""

from __future__ import annotations

import logging
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rig.cloud.fctry import NvsType
from rig.firmware.behaviour import BehaviourManifest
from rig.protocomm.messages import WifiConnectFailedReason, WifiStationState
from rig.vboard.app import AppContext, AppExit, panic_report
from rig.vboard.flaws import UnknownFlawError, check_flaws
from rig.vboard.node.app_reset import ButtonPin, register_reset_button
from rig.vboard.node.boot_confirm import BootConfirmation
from rig.vboard.node.cloud_link import LWT_MESSAGE, PLAINTEXT_PORT, CloudLink, LinkSettings, aws_ppi
from rig.vboard.node.data_model import (
    CONNECTED_PARAM,
    CONNECTIVITY_SERVICE,
    NAME_PARAM_TYPE,
    POWER_PARAM,
    SOURCE_CLOUD,
    SOURCE_INIT,
    SOURCE_LOCAL,
    Device,
    MalformedParams,
    NodeModel,
    Param,
    ValType,
    switch_node,
)
from rig.vboard.node.debug_port import DebugPort
from rig.vboard.node.identity import (
    NVS_PARTITION_NAME,
    IdentityError,
    IdentityProblem,
    NodeIdentity,
    find_partition,
    read_identity,
)
from rig.vboard.node.local_ctrl import LocalControl, start_local_control
from rig.vboard.node.messages import NodeMsg
from rig.vboard.node.nvs_keys import NvsKeyError, nvs_keys_for
from rig.vboard.node.nvs_store import PARAM_VAL_LAYOUT, NvsStore
from rig.vboard.node.ota_client import OTA_FETCH_DELAY_S, OtaClient, OtaSettings, ota_reboot_delay
from rig.vboard.node.ota_status import OtaReporter
from rig.vboard.node.prov_transport import EXAMPLE_POP
from rig.vboard.node.provisioning import ProvisioningService
from rig.vboard.node.runtime import NodeRuntime, WorkQueue
from rig.vboard.node.user_mapping import MappingState, UserMapping
from rig.vboard.node.wifi_station import NETMASK, PASSPHRASE_MAX, SSID_MAX, StationStatus, WifiStation

log = logging.getLogger(__name__)

WIFI_NAMESPACE = "nvs.net80211"
WIFI_SSID_KEY, WIFI_PSWD_KEY = "sta.ssid", "sta.pswd"
WIFI_RETRY_S = 5.0
"""Between a failed join and ``Disconnected. Connecting to the AP again...`` (a scan and an
authentication attempt on the chip)."""
CONNECTIVITY_REPORT_DELAY_S = 5
"""``CONFIG_ESP_RMAKER_CONNECTIVITY_REPORT_DELAY``."""
RESET_DELAY_S = 2
REBOOT_DELAY_S = 2
"""``reset-to-factory``: ``esp_rmaker_factory_reset(2, 2)`` (rmaker_common_cmds.c); ``wifi-reset``
uses ``esp_rmaker_wifi_reset(0, 2)`` as the examples' reset button does."""


@dataclass(frozen=True)
class NodePlatform:
    """What the board gives its firmware beyond the chip: its network identity and its air."""

    board: str
    address: str
    mac: bytes
    radio_path: Path
    boot_button: ButtonPin | None = None
    """GPIO9, the DevKit's BOOT button (None: a node run without a board)."""


WIFI_DRIVER_KEYS: tuple[tuple[str, bytes], ...] = (
    ("sta.apinfo", b"\xff" * 140),
    ("sta.pmk", b"\0" * 32),
    ("sta.apsw", b"\0" * 2),
)
"""What the Wi-Fi driver keeps beside the SSID before a first connection (AP info, cached PMK,
AP switch state), as Espressif's nvs_partition_gen writes them after ``sta.ssid``."""


def wifi_blobs(ssid: bytes, passphrase: bytes) -> tuple[bytes, bytes]:
    """``sta.ssid`` (u32 length + 32 bytes) and ``sta.pswd`` (64 bytes), zero padded, as
    ``esp_wifi_set_config`` stores them (``blob_sz_fill(32;0x00)``, ``blob_fill(64;0x00)``)."""
    return struct.pack("<I", len(ssid)) + ssid.ljust(SSID_MAX, b"\0"), passphrase.ljust(PASSPHRASE_MAX, b"\0")


def wifi_nvs_items(ssid: bytes, passphrase: bytes) -> list[tuple[str, NvsType, bytes]]:
    """The ``nvs.net80211`` keys of a station config, in the order they are written."""
    ssid_blob, pswd_blob = wifi_blobs(ssid, passphrase)
    return [
        ("opmode", NvsType.U8, b"\x01"),
        (WIFI_SSID_KEY, NvsType.BLOB_DATA, ssid_blob),
        *((key, NvsType.BLOB_DATA, value) for key, value in WIFI_DRIVER_KEYS),
        (WIFI_PSWD_KEY, NvsType.BLOB_DATA, pswd_blob),
        ("bssid.set", NvsType.U8, b"\x00"),
    ]


def stored_wifi(nvs: NvsStore) -> tuple[bytes, bytes] | None:
    """The station SSID and passphrase in NVS, or None when the node is not provisioned."""
    raw_ssid = nvs.get(WIFI_NAMESPACE, WIFI_SSID_KEY)
    if raw_ssid is None or len(raw_ssid) < 4:
        return None
    length = min(struct.unpack_from("<I", raw_ssid)[0], SSID_MAX)
    ssid = raw_ssid[4 : 4 + length]
    if not ssid:
        return None
    passphrase = (nvs.get(WIFI_NAMESPACE, WIFI_PSWD_KEY) or b"").split(b"\0", 1)[0]
    return ssid, passphrase


class RainMakerNode:
    """One boot of the RainMaker node firmware on a virtual board."""

    def __init__(self, ctx: AppContext, platform: NodePlatform):
        self.ctx = ctx
        self.platform = platform
        self.behaviour: BehaviourManifest = ctx.boot.behaviour or BehaviourManifest()
        self.flaws: frozenset[str] = frozenset()
        self.runtime = NodeRuntime(ctx.console, platform.board)
        self._wake = threading.Event()
        """Ends ``app_main``'s wait: the station got its address, or the chip is resetting."""
        ctx.add_exit_hook(self._halt)
        ctx.add_cleanup(self.runtime.join)
        self.address = platform.address
        self.wifi = WifiStation(self.runtime, platform.radio_path, platform.address)
        self.wifi.add_listener(self._join_outcome)
        self.identity: NodeIdentity | None = None
        self.nvs: NvsStore | None = None
        self.model: NodeModel | None = None
        self.provisioning: ProvisioningService | None = None
        self.mapping: UserMapping | None = None
        self.link: CloudLink | None = None
        self.work: WorkQueue | None = None
        self.confirmation: BootConfirmation | None = None
        self.ota: OtaClient | None = None
        self._lock = threading.Lock()
        self._failed_config: object = None
        self._cloud_started = False
        self._first_connection_done = False
        self._params_ready = False
        self._changed: set[tuple[str, str]] = set()
        self.local_ctrl: LocalControl | None = None

    # ------------------------------------------------------------------ what provisioning uses

    @property
    def node_id(self) -> str | None:
        return None if self.identity is None else self.identity.node_id

    @property
    def pop(self) -> str | None:
        """``POP_TYPE_RANDOM`` from fctry; the flaws ``static_pop`` (Espressif's example PoP on
        every device) and ``pop_from_mac`` (``POP_TYPE_MAC``: MAC bytes 2..5) replace it."""
        if "static_pop" in self.flaws:
            return EXAMPLE_POP
        if "pop_from_mac" in self.flaws:
            return self.platform.mac[2:6].hex()
        return None if self.identity is None else self.identity.pop

    @property
    def service_name(self) -> str:
        if self.identity is None:
            return f"PROV_{self.platform.mac[3:6].hex()}"
        return self.identity.service_name(self.platform.mac)

    def start_user_mapping(self, user_id: str, secret_key: str, *, from_provisioning: bool = True) -> bool:
        """``cloud_user_assoc`` (or ``add-user``): start mapping the node to *user_id*; False
        when the node has no identity (``Sending status Invalid Param``)."""
        if self.mapping is None:
            return False
        if from_provisioning:
            self.runtime.log(NodeMsg.MAPPING_NODE_DETAILS)
            self.runtime.log(NodeMsg.MAPPING_GOT, user_id=user_id, secret_key=secret_key)
            self.runtime.log(NodeMsg.MAPPING_SUCCESS)
        self.mapping.start(user_id, secret_key)
        return True

    def on_provisioned(self) -> None:
        """The credentials from provisioning joined: keep them, close the provisioning window,
        go to the cloud (the IP event already started the RainMaker task)."""
        config = self.wifi.config
        if config is not None:
            self.save_wifi(config.ssid, config.passphrase)
        if self.provisioning is not None and self.provisioning.active:
            self.runtime.log(NodeMsg.PROVISIONING_SUCCESSFUL)
            self.provisioning.stop_after_connect()

    # ------------------------------------------------------------------ app_main

    def app_main(self) -> AppExit | None:
        """The switch example's ``app_main``; returns when the station has an IP address
        (or at once when the node cannot start), as ``app_network_start`` does."""
        from rig.vboard.node.commands import register_node_commands  # the console depends on the node

        try:
            self.flaws = check_flaws(self.behaviour.flaws)
        except UnknownFlawError as exc:
            log.error("virtual board %s: %s", self.platform.board, exc)
            self.runtime.log(NodeMsg.UNKNOWN_FLAWS, names=", ".join(exc.unknown))
            return None
        register_node_commands(self)
        register_reset_button(self)  # app_driver_init: the BOOT button's Wi-Fi and factory reset
        nvs_part = find_partition(self.ctx.boot.partitions, NVS_PARTITION_NAME)
        if nvs_part is not None:
            try:
                keys = nvs_keys_for(self.ctx.efuse, self.flaws)  # type: ignore[arg-type]  # the board's EfuseController
            except NvsKeyError as exc:
                self.runtime.log(NodeMsg.NVS_KEYS_FAILED, reason=str(exc))
                return None
            self.nvs = NvsStore(self.ctx.flash, nvs_part, keys)
            if self.nvs.recovered_from:
                log.warning("virtual board %s: nvs partition unreadable, erased as app_main does: %s",
                            self.platform.board, self.nvs.recovered_from)  # fmt: skip
        if not self._node_init():
            return None
        self._start()
        self._wake.wait()  # app_network_start: xEventGroupWaitBits(NETWORK_CONNECTED_EVENT)
        return None

    def _halt(self, _ended: AppExit) -> None:
        self.runtime.halt()
        self._wake.set()

    def _node_init(self) -> bool:
        """``esp_rmaker_node_init`` and the services the example enables."""
        try:
            self.identity = read_identity(self.ctx.flash, self.ctx.boot.partitions)
        except IdentityError as exc:
            log.warning("virtual board %s: no RainMaker identity: %s", self.platform.board, exc)
            if exc.problem is IdentityProblem.STORAGE:
                self.runtime.log(NodeMsg.FCTRY_INIT_FAILED)
                self.runtime.log(NodeMsg.STORAGE_FAILED)
            elif exc.problem is IdentityProblem.NODE_ID:
                self.runtime.log(NodeMsg.NO_NODE_ID)
            else:
                self.runtime.log(NodeMsg.NO_MQTT_PARAMS)
            return False
        if self.nvs is None:
            log.error("virtual board %s: the partition table has no 'nvs' partition", self.platform.board)
            return False
        identity = self.identity
        self.work = WorkQueue(self.runtime)
        self.runtime.log(NodeMsg.WORK_QUEUE_CREATED)
        self.runtime.log(NodeMsg.MQTT_PPI, ppi=aws_ppi(self.platform.mac))
        self.runtime.log(NodeMsg.MQTT_INIT)
        self.runtime.log(NodeMsg.APP_INITIALISED)
        desc = self.ctx.boot.app_desc
        self.model = switch_node(desc.version if desc else "", desc.project_name if desc else "")
        self.runtime.log(NodeMsg.NODE_ID, node_id=identity.node_id)
        self._load_persisted()
        self.runtime.log(NodeMsg.OTA_ENABLED)
        self.runtime.log(NodeMsg.LWT_TOPIC, topic=f"node/{identity.node_id}/params/local")
        self.runtime.log(NodeMsg.LWT_MESSAGE, message=LWT_MESSAGE)
        self.runtime.log(NodeMsg.CONNECTIVITY_ENABLED)
        self.mapping = UserMapping(self.runtime, self.nvs, identity.node_id, self._publish, self._mapping_done)
        settings = LinkSettings(
            address=self.address,
            mac=self.platform.mac,
            no_server_cert_check="no_server_cert_check" in self.flaws,
            plaintext_mqtt="plaintext_mqtt" in self.flaws,
            plaintext_port=_port(self.behaviour.extra.get("plaintext_mqtt_port"), PLAINTEXT_PORT),
            no_reconnect_backoff="no_reconnect_backoff" in self.flaws,
            no_cloud=self.behaviour.boot == "no_cloud",
        )
        self.link = CloudLink(self.runtime, identity, settings, on_connected=self._mqtt_connected,
                              on_disconnected=self._mqtt_disconnected, on_message=self._mqtt_message,
                              on_published=self._mqtt_published)  # fmt: skip
        reporter = OtaReporter(self.runtime, self.nvs, self._publish)
        self.confirmation = BootConfirmation(self.ctx, self.runtime, reporter, self.behaviour.rollback_wait_s,
                                             confirm_at_boot="confirms_before_cloud" in self.flaws,
                                             on_verified=lambda: self.ota.fetch_later(OTA_FETCH_DELAY_S) if self.ota else None)  # fmt: skip
        ota = OtaSettings(identity.node_id, desc.version if desc else "", self.address, identity.server_cert, self.flaws,
                          ota_reboot_delay(self.behaviour.extra))  # fmt: skip
        link = self.link
        self.ota = OtaClient(self.ctx, self.runtime, self.work, reporter, ota, publish=self._publish, subscribe=link.subscribe,
                             connected=lambda: link.connected, reboot=self.reboot, busy=lambda: self.confirmation is not None
                             and self.confirmation.awaiting)  # fmt: skip
        return True

    def _start(self) -> None:
        """``esp_rmaker_start`` and ``app_network_start``."""
        self.runtime.log(NodeMsg.WORK_QUEUE_STARTING)
        self.runtime.log(NodeMsg.WORK_QUEUE_STARTED)
        assert self.confirmation is not None and self.nvs is not None
        self.confirmation.check_at_boot()
        if "open_debug_port" in self.flaws:
            try:
                DebugPort(self.runtime, self.address)
            except OSError as exc:
                log.error("virtual board %s: debug port flaw could not listen: %s", self.platform.board, exc)
        stored = stored_wifi(self.nvs)
        if stored is not None:
            self.runtime.log(NodeMsg.ALREADY_PROVISIONED)
            self.wifi.set_config(*stored)
            self.wifi.apply()
            return
        self.provisioning = ProvisioningService(self)
        self.provisioning.start()

    # ------------------------------------------------------------------ persistence

    def _load_persisted(self) -> None:
        """``esp_rmaker_device_add_param`` for persistent params: a stored value wins, and the
        device callback sees it once (source ``Init``), except for the name param."""
        assert self.model is not None and self.nvs is not None
        for device, param in list(self.model.params()):
            if not param.persist:
                continue
            raw = self.nvs.get(device.name, param.name)
            if raw is None:
                self._store_param(device, param)
                continue
            value = _decode_param(param, raw)
            if value is None:
                continue
            self.model.set_value(param, value)
            if _has_write_callback(device, param):
                self._write_callback(device, param, value, SOURCE_INIT, report=False)
        self.nvs.commit()

    def _store_param(self, device: Device, param: Param) -> None:
        assert self.nvs is not None
        if param.val_type in (ValType.STRING, ValType.OBJECT, ValType.ARRAY):
            text = param.value if isinstance(param.value, str) else param.text()
            if text:
                self.nvs.set_blob(device.name, param.name, text.encode())
            return
        self.nvs.set_blob(device.name, param.name, _encode_param(param))

    def save_wifi(self, ssid: bytes, passphrase: bytes) -> None:
        """``esp_wifi_set_config`` with ``WIFI_STORAGE_FLASH``."""
        assert self.nvs is not None
        for key, item_type, value in wifi_nvs_items(ssid, passphrase):
            self.nvs.set(WIFI_NAMESPACE, key, item_type, value)
        self.nvs.commit()

    def erase_wifi(self) -> None:
        """``esp_wifi_restore``: the station config back to defaults."""
        if self.nvs is not None:
            self.nvs.erase_namespace(WIFI_NAMESPACE)
            self.nvs.commit()

    # ------------------------------------------------------------------ Wi-Fi events

    def _join_outcome(self, status: StationStatus) -> None:
        """``WIFI_EVENT_STA_DISCONNECTED`` / ``IP_EVENT_STA_GOT_IP`` (on the station task)."""
        if status.state is WifiStationState.Connected:
            self.runtime.log(NodeMsg.STA_IP, ip=self.address, mask=NETMASK, gw=self.wifi.gateway)
            self.runtime.log(NodeMsg.CONNECTED_IP, ip=self.address)
            if self.provisioning is not None and self.provisioning.active:
                self.on_provisioned()
            self._wake.set()
            self._start_cloud()
            return
        config = self.wifi.config
        if self.provisioning is not None and self.provisioning.active and config is not self._failed_config:
            self._failed_config = config  # the manager reports a failure once per set of credentials
            reason = NodeMsg.FAIL_REASON_AUTH if status.fail_reason is WifiConnectFailedReason.AuthError else NodeMsg.FAIL_REASON_NOT_FOUND
            self.runtime.log(NodeMsg.PROVISIONING_FAILED, reason=reason)
        self.runtime.after(WIFI_RETRY_S, "wifi_retry", lambda: self._retry_join(config))

    def _retry_join(self, config: object) -> None:
        if self.wifi.config is config and not self.wifi.connected:
            self.runtime.log(NodeMsg.RECONNECTING_AP)
            self.wifi.apply()

    # ------------------------------------------------------------------ the cloud

    def _start_cloud(self) -> None:
        with self._lock:
            if self._cloud_started or self.link is None:
                return
            self._cloud_started = True
        self.local_ctrl = start_local_control(self)  # esp_rmaker_task: local control once on Wi-Fi, before MQTT
        self.link.start()
        self.runtime.log(NodeMsg.WAITING_MQTT)

    def _publish(self, suffix: str, payload: str) -> int | None:
        return None if self.link is None else self.link.publish(suffix, payload)

    def _mqtt_connected(self) -> None:
        assert self.work is not None
        self.work.submit(self._after_connect)

    def _after_connect(self) -> None:
        """``RMAKER_MQTT_EVENT_CONNECTED``: the app's echo, the connectivity timer, the OTA
        confirmation, and on the first connection ``esp_rmaker_task``'s reporting."""
        assert self.model is not None and self.mapping is not None and self.identity is not None
        self.runtime.log(NodeMsg.APP_MQTT_CONNECTED)
        self.runtime.log(NodeMsg.CONNECTIVITY_DELAY, seconds=CONNECTIVITY_REPORT_DELAY_S)
        self.runtime.after(CONNECTIVITY_REPORT_DELAY_S, "connectivity_timer", self._report_connected)
        if self.confirmation is not None:
            self.confirmation.mqtt_connected()
        if self.ota is not None:
            self.ota.mqtt_connected()
        if self._first_connection_done:
            self.mapping.config_reported()
            return
        self._first_connection_done = True
        secure_boot = self._secure_boot_digest()
        self._publish("config", self.model.config_json(self.identity.node_id, secure_boot))
        self.mapping.config_reported()
        if self.mapping.state is MappingState.DONE and not self.mapping.pending:
            self._params_mqtt_init()
            return
        if not self.mapping.pending:
            self.mapping.reset()  # nobody started a mapping: tell the cloud the node has no user
        self.runtime.log(NodeMsg.WAITING_MAPPING)

    def config_json(self) -> str:
        """``esp_rmaker_get_node_config``: what the node reports on ``config`` (and local control reads)."""
        assert self.model is not None and self.identity is not None
        return self.model.config_json(self.identity.node_id, self._secure_boot_digest())

    def _secure_boot_digest(self) -> dict[str, str | None]:
        """``info.secure_boot_digest``: the virtual images are built with
        ``CONFIG_SECURE_BOOT_V2_ENABLED``, so RainMaker always reports it, each eFuse digest
        in lower-case hex or null (``esp_rmaker_secure_boot_digest.c``)."""
        digests = self.ctx.efuse.secure_boot_digests()
        return {f"k{i}": (d.hex() if d is not None else None) for i, d in enumerate(digests[:3])}

    def _mqtt_disconnected(self) -> None:
        self.runtime.log(NodeMsg.APP_MQTT_DISCONNECTED)
        if self.mapping is not None:
            self.mapping.disconnected()

    def _mqtt_published(self, mid: int) -> None:
        assert self.work is not None
        self.work.submit(lambda: self._after_published(mid))

    def _after_published(self, mid: int) -> None:
        self.runtime.log(NodeMsg.APP_MQTT_PUBLISHED, mid=mid)
        if self.mapping is not None:
            self.mapping.published(mid)

    def _mapping_done(self, reset: bool) -> None:
        self._params_mqtt_init()

    def _params_mqtt_init(self) -> None:
        """``esp_rmaker_params_mqtt_init``: subscribe to writes, report every value once."""
        assert self.link is not None and self.model is not None and self.identity is not None
        with self._lock:
            if self._params_ready:
                return
            self._params_ready = True
        self.link.subscribe(f"node/{self.identity.node_id}/params/remote")
        self._publish("params/local/init", self.model.params_json())
        self._flush_reports()

    def _mqtt_message(self, topic: str, payload: bytes) -> None:
        assert self.work is not None and self.identity is not None
        if topic == f"node/{self.identity.node_id}/params/remote":
            self.work.submit(lambda: self.handle_set_params(payload, SOURCE_CLOUD))
        elif self.ota is not None and topic == self.ota.topic:
            self.ota.handle_otaurl(payload)

    # ------------------------------------------------------------------ params

    def handle_set_params(self, payload: bytes, source: str) -> bool:
        """``esp_rmaker_handle_set_params``; False (``ESP_FAIL``) when the payload is not a JSON object."""
        assert self.model is not None
        self.runtime.log(NodeMsg.PARAMS_RECEIVED, payload=payload.decode("utf-8", "replace"))
        try:
            writes = self.model.parse_set_params(payload)
        except MalformedParams as exc:
            if "panics_on_bad_params" in self.flaws:
                self.panic()
                return False
            log.info("virtual board %s: dropped params write: %s", self.platform.board, exc)
            return False
        for device, param, value in writes:
            if _has_write_callback(device, param):
                self._write_callback(device, param, value, source, report=False)
            else:
                self.update_param(device, param, value, report=False)
        self._flush_reports()
        return True

    def set_param_locally(self, device: Device, param: Param, value: Any) -> None:
        """A write from the node itself (console ``set-param``): through the device callback,
        source ``Local``, then reported."""
        if _has_write_callback(device, param):
            self._write_callback(device, param, value, SOURCE_LOCAL)
        else:
            self.update_param(device, param, value)

    def _write_callback(self, device: Device, param: Param, value: Any, source: str, *, report: bool = True) -> None:
        """The switch example's ``write_cb``."""
        self.runtime.log(NodeMsg.APP_WRITE_REQUEST, source=source)
        if param.name == POWER_PARAM:
            self.runtime.log(NodeMsg.APP_RECEIVED_VALUE, value=_text(value), device=device.name, param=param.name)
            self.update_param(device, param, value, report=report)

    def update_param(self, device: Device, param: Param, value: Any, *, report: bool = True) -> None:
        """``esp_rmaker_param_update`` (+ ``_and_report``): store, persist, queue the report."""
        assert self.model is not None
        self.model.set_value(param, value)
        if param.persist and self.nvs is not None:
            self._store_param(device, param)
            self.nvs.commit()
        with self._lock:
            self._changed.add((device.name, param.name))
        if report:
            self._flush_reports()

    def _flush_reports(self) -> None:
        """``esp_rmaker_report_param``: every changed value in one ``params/local`` message."""
        assert self.model is not None
        with self._lock:
            if not self._params_ready or not self._changed:
                return
            changed, self._changed = self._changed, set()
        payload = self.model.params_json(only=changed)
        self.runtime.log(NodeMsg.PARAMS_REPORTING, payload=payload)
        self._publish("params/local", payload)

    def _report_connected(self) -> None:
        assert self.model is not None
        if self.link is None or not self.link.connected:
            return
        param = self.model.find(CONNECTIVITY_SERVICE, CONNECTED_PARAM)
        device = self.model.device(CONNECTIVITY_SERVICE)
        if param is None or device is None:
            return
        self.runtime.log(NodeMsg.CONNECTIVITY_REPORT)
        self.update_param(device, param, True)

    # ------------------------------------------------------------------ resets

    def panic(self, reason: str = "Load access fault") -> None:
        """A fault in a node task: the panic handler's report, then the chip resets."""
        self.runtime.halt()
        ended = panic_report(self.ctx.boot, self.ctx.console, reason)
        self.ctx.request_exit(ended)

    def factory_reset(self) -> None:
        """``esp_rmaker_factory_reset(RESET_DELAY_S, REBOOT_DELAY_S)``."""
        self.runtime.log(NodeMsg.APP_FACTORY_RESET)
        if self.mapping is not None:
            self.mapping.reset()

        def erase() -> None:
            if self.nvs is not None and "factory_reset_keeps_wifi" in self.flaws:
                # the flaw: a hand-written reset that erases the app's namespaces one by one
                # and forgets the Wi-Fi driver's, whose entries stay where they are
                for namespace in sorted({item.namespace for item in self.nvs.items()} - {WIFI_NAMESPACE}):
                    self.nvs.erase_namespace(namespace)
                self.nvs.commit()
            elif self.nvs is not None:
                self.nvs.erase_partition()
            self.reboot(REBOOT_DELAY_S)

        self.runtime.after(RESET_DELAY_S, "rmaker_reset_tm", erase)

    def wifi_reset(self) -> None:
        """``esp_rmaker_wifi_reset(0, REBOOT_DELAY_S)``."""
        self.erase_wifi()
        self.reboot(REBOOT_DELAY_S)
        self.runtime.log(NodeMsg.APP_WIFI_RESET)

    def reboot(self, seconds: int) -> None:
        """``esp_rmaker_reboot``."""
        self.runtime.log(NodeMsg.APP_REBOOTING, seconds=seconds)
        self.runtime.after(seconds, "rmaker_reboot_tm", lambda: self.ctx.esp_restart("esp_rmaker_reboot"))


def _port(value: object, default: int) -> int:
    """A TCP port from the behaviour manifest's ``extra`` (an image's own setting), else *default*."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536 else default


def _has_write_callback(device: Device, param: Param) -> bool:
    """Whether a write goes through the switch example's ``write_cb``; a service's params and the
    name param are applied by RainMaker's core, which the node models as store and report."""
    return not device.is_service and param.type != NAME_PARAM_TYPE


def _text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def _encode_param(param: Param) -> bytes:
    """A non-string value as ``esp_rmaker_param_val_t`` bytes."""
    if param.val_type is ValType.BOOLEAN:
        raw = bytes([1 if param.value else 0]) + b"\0\0\0"
    elif param.val_type is ValType.INTEGER:
        raw = struct.pack("<i", int(param.value))
    else:
        raw = struct.pack("<f", float(param.value))
    return PARAM_VAL_LAYOUT.pack({"type": int(param.val_type), "val": raw})


def _decode_param(param: Param, raw: bytes) -> Any:
    """A stored value back, or None when it does not fit the param (ignored, as a failed read)."""
    if param.val_type in (ValType.STRING, ValType.OBJECT, ValType.ARRAY):
        text = raw.decode("utf-8", "replace")
        if param.val_type is ValType.STRING:
            return text
        try:
            return param.parse_console(text)
        except ValueError:
            return None
    if len(raw) < PARAM_VAL_LAYOUT.size:
        return None
    fields = PARAM_VAL_LAYOUT.unpack(raw)
    if fields["type"] != int(param.val_type):
        return None
    if param.val_type is ValType.BOOLEAN:
        return bool(fields["val"][0])
    if param.val_type is ValType.INTEGER:
        return struct.unpack("<i", fields["val"])[0]
    return struct.unpack("<f", fields["val"])[0]


__all__ = ["NodePlatform", "RainMakerNode", "stored_wifi", "wifi_blobs", "wifi_nvs_items"]

"""The node's provisioning endpoints over protocomm on its SoftAP HTTP server.

What ``network_prov_mgr`` / ``wifi_prov_mgr`` registers for a SoftAP RainMaker node
(rainmaker-protocol.md §4.2–§4.7, §2.1; esp-idf v5.4 ``components/wifi_provisioning/src/
manager.c``, ``handlers.c``, ``wifi_config.c``, ``wifi_scan.c``, ``wifi_ctrl.c``;
esp-rainmaker ``src/core/esp_rmaker_user_mapping.c``):

* ``proto-ver`` — ``{"prov":{"ver":"v1.1","sec_ver":2,"sec_patch_ver":1,"cap":["wifi_scan"]},
  "rmaker":{"ver":"1.0","cap":["wifi_scan"]}}``-style JSON;
* ``prov-session`` — the image's security scheme with the node's PoP;
* ``prov-config`` — get status / set config / apply config; apply is where the manager
  posts ``WIFI_PROV_CRED_RECV`` (the "Received Wi-Fi credentials" line) and connects;
* ``prov-scan`` — blocking scan, status, results in chunks;
* ``prov-ctrl`` — reset (forget the attempt so the user can retry) and reprov;
* ``cloud_user_assoc`` — user id + secret for the cloud mapping.

The node's flaws in this area are decided here: ``sec0_provisioning`` (the image runs
security 0 whatever it declares) and ``wrong_pop_accepted`` (security 1 that, after a
PoP mismatch, also accepts no PoP and Espressif's example PoP ``abcd1234`` — a
debugging fallback left in firmware).
"""

from __future__ import annotations

import hashlib
import logging
import threading
from typing import TYPE_CHECKING

from rig.protocomm.endpoints import provisioning_version
from rig.protocomm.errors import SecurityRefusal
from rig.protocomm.messages import (
    RespApplyConfig,
    RespCtrlReprov,
    RespCtrlReset,
    RespGetStatus,
    RespScanResult,
    RespScanStart,
    RespScanStatus,
    RespSetConfig,
    RespSetUserMapping,
    RMakerConfigMsgType,
    RMakerConfigPayload,
    RMakerConfigStatus,
    Sec1Payload,
    Status,
    WiFiConfigMsgType,
    WiFiConfigPayload,
    WifiConnectedState,
    WiFiCtrlMsgType,
    WiFiCtrlPayload,
    WiFiScanMsgType,
    WiFiScanPayload,
    WiFiScanResult,
    WifiStationState,
)
from rig.protocomm.security import DeviceSecurity, DeviceSecurity0, DeviceSecurity1, DeviceSecurity2, SecurityEvent
from rig.vboard.node.protocomm_server import SEC2_PATCH_VERSION, ProtocommServer
from rig.vboard.node.wifi_station import PASSPHRASE_MAX, SSID_MAX

if TYPE_CHECKING:
    from rig.vboard.node.provisioning import ProvisioningService

log = logging.getLogger(__name__)

PROV_VERSION = "v1.1"
"""``wifi_prov_mgr``'s version string (IDF v5.4 ``manager.c``)."""
RMAKER_APP_INFO = {"rmaker": {"ver": "1.0", "cap": ["wifi_scan"]}}
"""``wifi_prov_mgr_set_app_info("rmaker", "1.0", …)`` as RainMaker's app_network sets it."""
EXAMPLE_POP = "abcd1234"
"""The PoP in ESP-IDF's and RainMaker's example code, the one a leftover fallback accepts (and
the ``static_pop`` flaw ships)."""


class FallbackPopSecurity1(DeviceSecurity1):
    """Flaw ``wrong_pop_accepted``: security 1 that, when the client's verify data does not
    match the real PoP, retries with no PoP and with :data:`EXAMPLE_POP` before refusing."""

    FALLBACK_POPS = (b"", EXAMPLE_POP.encode())

    def _command1(self, payload: Sec1Payload) -> bytes:
        key, counter = self._sym_key, self._counter
        try:
            return super()._command1(payload)
        except SecurityRefusal as refusal:
            raw = bytes(a ^ b for a, b in zip(key, hashlib.sha256(self._pop).digest(), strict=True)) if self._pop else key
            for candidate in self.FALLBACK_POPS:
                self._sym_key = bytes(a ^ b for a, b in zip(raw, hashlib.sha256(candidate).digest(), strict=True)) if candidate else raw
                self._counter = counter
                try:
                    return super()._command1(payload)
                except SecurityRefusal:
                    continue
            raise refusal


def device_security(service: ProvisioningService, on_event: object) -> tuple[int, DeviceSecurity]:
    """The scheme this image runs and its device side, flaws included."""
    flaws = service.node.flaws
    security = 0 if "sec0_provisioning" in flaws else service.security
    pop = service.pop or ""
    if security == 0:
        return 0, DeviceSecurity0(on_event=on_event)  # type: ignore[arg-type]
    if security == 1 or "wrong_pop_accepted" in flaws:
        cls = FallbackPopSecurity1 if "wrong_pop_accepted" in flaws else DeviceSecurity1
        return 1, cls(pop, on_event=on_event)  # type: ignore[arg-type]
    return 2, DeviceSecurity2.from_pop(pop, patch_version=SEC2_PATCH_VERSION, on_event=on_event)  # type: ignore[arg-type]


class ProvisioningEndpoints:
    """The handlers behind the endpoints, on one :class:`ProvisioningService`."""

    def __init__(self, service: ProvisioningService):
        self.service = service
        self.node = service.node
        self._lock = threading.Lock()
        self._pending: tuple[bytes, bytes] | None = None
        self._scan: list[WiFiScanResult] = []

    # ------------------------------------------------------------------ prov-config

    def prov_config(self, data: bytes) -> bytes:
        req = WiFiConfigPayload.decode(data)
        if req.msg == WiFiConfigMsgType.TypeCmdGetStatus:
            return WiFiConfigPayload(msg=WiFiConfigMsgType.TypeRespGetStatus, resp_get_status=self._status()).encode()
        if req.msg == WiFiConfigMsgType.TypeCmdSetConfig and req.cmd_set_config is not None:
            cmd = req.cmd_set_config
            ok = 0 < len(cmd.ssid) <= SSID_MAX and len(cmd.passphrase) <= PASSPHRASE_MAX
            if ok:
                with self._lock:
                    self._pending = (bytes(cmd.ssid), bytes(cmd.passphrase))
            status = Status.Success if ok else Status.InvalidArgument
            return WiFiConfigPayload(msg=WiFiConfigMsgType.TypeRespSetConfig, resp_set_config=RespSetConfig(status=status)).encode()
        if req.msg == WiFiConfigMsgType.TypeCmdApplyConfig:
            with self._lock:
                pending, self._pending = self._pending, None
            if pending is not None:
                self.service.credentials_received(*pending)
            status = Status.Success if pending is not None else Status.InvalidArgument
            return WiFiConfigPayload(msg=WiFiConfigMsgType.TypeRespApplyConfig, resp_apply_config=RespApplyConfig(status=status)).encode()
        raise ValueError(f"prov-config message type {int(req.msg)} is not a command")

    def _status(self) -> RespGetStatus:
        """``get_status_handler``: once it reports Connected it calls ``wifi_prov_mgr_done()``,
        which stops the service after the cleanup delay (esp-idf ``wifi_provisioning/src/handlers.c``):
        the client that read Connected ends provisioning, not the join itself."""
        status = self.node.wifi.status()
        if status.state is WifiStationState.Connected and status.connected is not None:
            info = status.connected
            connected = WifiConnectedState(ip4_addr=info.ip4_addr, auth_mode=int(info.auth_mode), ssid=info.ssid,
                                           bssid=info.bssid, channel=info.channel)  # fmt: skip
            if self.service.active:
                self.service.stop_later()
            return RespGetStatus(status=Status.Success, sta_state=int(status.state), connected=connected)
        if status.fail_reason is not None:
            return RespGetStatus(status=Status.Success, sta_state=int(status.state), fail_reason=int(status.fail_reason))
        return RespGetStatus(status=Status.Success, sta_state=int(status.state))

    # ------------------------------------------------------------------ prov-scan

    def prov_scan(self, data: bytes) -> bytes:
        req = WiFiScanPayload.decode(data)
        if req.msg == WiFiScanMsgType.TypeCmdScanStart:
            found = [
                WiFiScanResult(ssid=r.ssid, channel=r.channel, rssi=r.rssi, bssid=r.bssid, auth=int(r.auth))
                for r in self.node.wifi.scan()
            ]
            with self._lock:
                self._scan = found
            return WiFiScanPayload(msg=WiFiScanMsgType.TypeRespScanStart, status=Status.Success, resp_scan_start=RespScanStart()).encode()
        if req.msg == WiFiScanMsgType.TypeCmdScanStatus:
            with self._lock:
                count = len(self._scan)
            return WiFiScanPayload(msg=WiFiScanMsgType.TypeRespScanStatus, status=Status.Success,
                                   resp_scan_status=RespScanStatus(scan_finished=True, result_count=count)).encode()  # fmt: skip
        if req.msg == WiFiScanMsgType.TypeCmdScanResult and req.cmd_scan_result is not None:
            start, count = req.cmd_scan_result.start_index, req.cmd_scan_result.count
            with self._lock:
                entries = self._scan[start : start + count]
            status = Status.Success if start + count <= len(self._scan) else Status.InvalidArgument
            return WiFiScanPayload(msg=WiFiScanMsgType.TypeRespScanResult, status=status,
                                   resp_scan_result=RespScanResult(entries=entries)).encode()  # fmt: skip
        raise ValueError(f"prov-scan message type {int(req.msg)} is not a command")

    # ------------------------------------------------------------------ prov-ctrl

    def prov_ctrl(self, data: bytes) -> bytes:
        req = WiFiCtrlPayload.decode(data)
        if req.msg == WiFiCtrlMsgType.TypeCmdCtrlReset:
            # wifi_ctrl reset: only allowed while not connected; forget the attempt
            if self.node.wifi.connected:
                return WiFiCtrlPayload(msg=WiFiCtrlMsgType.TypeRespCtrlReset, status=Status.InvalidArgument,
                                       resp_ctrl_reset=RespCtrlReset()).encode()  # fmt: skip
            self.node.wifi.disconnect()
            return WiFiCtrlPayload(msg=WiFiCtrlMsgType.TypeRespCtrlReset, status=Status.Success, resp_ctrl_reset=RespCtrlReset()).encode()
        if req.msg == WiFiCtrlMsgType.TypeCmdCtrlReprov:
            reply = WiFiCtrlPayload(msg=WiFiCtrlMsgType.TypeRespCtrlReprov, status=Status.Success, resp_ctrl_reprov=RespCtrlReprov())
            return reply.encode()
        raise ValueError(f"prov-ctrl message type {int(req.msg)} is not a command")

    # ------------------------------------------------------------------ cloud_user_assoc

    def cloud_user_assoc(self, data: bytes) -> bytes:
        req = RMakerConfigPayload.decode(data)
        cmd = req.cmd_set_user_mapping
        if req.msg != RMakerConfigMsgType.TypeCmdSetUserMapping or cmd is None:
            resp = RespSetUserMapping(Status=RMakerConfigStatus.InvalidParam)
        elif self.node.start_user_mapping(cmd.UserID, cmd.SecretKey):
            resp = RespSetUserMapping(Status=RMakerConfigStatus.Success, NodeId=self.node.node_id or "")
        else:
            resp = RespSetUserMapping(Status=RMakerConfigStatus.InvalidParam)
        return RMakerConfigPayload(msg=RMakerConfigMsgType.TypeRespSetUserMapping, resp_set_user_mapping=resp).encode()


class ProvisioningTransport(ProtocommServer):
    """Protocomm with the provisioning endpoints, served over HTTP on the node's address."""

    what = "provisioning"

    def __init__(self, service: ProvisioningService, port: int):
        super().__init__(service.node.runtime, service.node.address, port)
        self.service = service
        self.endpoints = ProvisioningEndpoints(service)
        self.security_version, security = device_security(service, self._on_event)
        caps = ["wifi_scan"] if self.security_version else ["no_sec", "wifi_scan"]
        self.protocomm.set_version("proto-ver", provisioning_version(
            PROV_VERSION, self.security_version, security.patch_version if self.security_version == 2 else None, caps, RMAKER_APP_INFO,
        ))  # fmt: skip
        self.protocomm.set_security("prov-session", security)
        requests = (
            ("prov-config", self.endpoints.prov_config),
            ("prov-scan", self.endpoints.prov_scan),
            ("prov-ctrl", self.endpoints.prov_ctrl),
            ("cloud_user_assoc", self.endpoints.cloud_user_assoc),
        )
        for name, handler in requests:
            self.protocomm.add_endpoint(name, handler)
        self.endpoint_names: tuple[str, ...] = ("proto-ver", "prov-session", *(name for name, _ in requests))
        """Every endpoint of :attr:`protocomm`, in registration order: what another transport of the
        same instance serves (:mod:`.prov_console`)."""

    def _on_event(self, event: SecurityEvent) -> None:
        if event is SecurityEvent.SETUP_OK:
            self.service.session_established()
        elif event is SecurityEvent.CREDENTIALS_MISMATCH:
            self.service.pop_mismatch(2)
        elif event is SecurityEvent.INVALID_SECURITY_PARAMS:
            self.service.pop_mismatch(1)

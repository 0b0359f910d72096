"""The phone app's provisioning role over protocomm: version, session, scan, Wi-Fi, user mapping.

The order and messages follow Espressif's clients (esp-rainmaker-cli
``rmaker_tools/rmaker_prov/esp_rainmaker_prov.py``, esp_prov; rainmaker-protocol.md
§2.4, §4): ``proto-ver`` → ``prov-session`` handshake → ``cloud_user_assoc`` (user id +
secret) → ``prov-config`` set / apply / poll status → the REST mapping request.

Each step is its own method so suites can leave the happy path anywhere (skip the
session, send before the handshake, give a wrong PoP, replay a step through
:attr:`security`); :func:`provision_wifi` is the happy path.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

from rig.evidence.redaction import SECRETS
from rig.protocomm.errors import ProtobufDecodeError, SessionError
from rig.protocomm.messages import (
    CmdApplyConfig,
    CmdCtrlReset,
    CmdGetStatus,
    CmdScanResult,
    CmdScanStart,
    CmdScanStatus,
    CmdSetConfig,
    CmdSetUserMapping,
    RespGetStatus,
    RMakerConfigMsgType,
    RMakerConfigPayload,
    RMakerConfigStatus,
    Status,
    WiFiConfigMsgType,
    WiFiConfigPayload,
    WifiConnectFailedReason,
    WiFiCtrlMsgType,
    WiFiCtrlPayload,
    WiFiScanMsgType,
    WiFiScanPayload,
    WiFiScanResult,
    WifiStationState,
)
from rig.protocomm.proto import Message
from rig.protocomm.security import ClientSecurity
from rig.prov.polling import poll_until
from rig.prov.session import SessionClient, status_name

STATUS_POLL_S = 0.5
"""The CLI polls every 5 s; a local device answers at once, so the rig polls faster."""
SCAN_RESULTS_PER_CALL = 4
"""esp_prov asks for scan results four at a time."""


class ProvisioningError(RuntimeError):
    """A provisioning step failed; the message says which step and what the device answered."""


@dataclass(frozen=True)
class ProtoVersion:
    """``proto-ver``'s JSON (rainmaker-protocol.md §4.3)."""

    raw: dict[str, Any]

    @property
    def sec_ver(self) -> int:
        return int(self.raw.get("prov", {}).get("sec_ver", 0))

    @property
    def sec_patch_ver(self) -> int:
        return int(self.raw.get("prov", {}).get("sec_patch_ver", 0))

    @property
    def capabilities(self) -> list[str]:
        return list(self.raw.get("prov", {}).get("cap", []))


@dataclass(frozen=True)
class WifiOutcome:
    """Where ``prov-config`` status polling ended."""

    state: WifiStationState
    fail_reason: WifiConnectFailedReason | None = None
    ip4_addr: str | None = None

    @property
    def connected(self) -> bool:
        return self.state == WifiStationState.Connected


@dataclass
class ProvisioningClient(SessionClient):
    """One provisioning conversation with one device over *transport*."""

    version: ProtoVersion | None = None
    node_id: str | None = None
    """What the node answered to ``cloud_user_assoc``."""

    session_endpoint: ClassVar[str] = "prov-session"
    error: ClassVar[type[Exception]] = ProvisioningError

    # ------------------------------------------------------------------ plaintext endpoints

    def proto_version(self) -> ProtoVersion:
        raw = self.transport.send("proto-ver", b"---")
        try:
            self.version = ProtoVersion(json.loads(raw))
        except ValueError as exc:
            raise ProvisioningError(f"proto-ver answered {raw[:80]!r}, not JSON ({exc})") from exc
        return self.version

    def open_session(self, sec_ver: int | None = None) -> ClientSecurity:
        """Run the ``prov-session`` handshake with the scheme *sec_ver* (default: what proto-ver offers)."""
        version = self.version or self.proto_version()
        return self._handshake(version.sec_ver if sec_ver is None else sec_ver, version.sec_patch_ver)

    # ------------------------------------------------------------------ encrypted endpoints

    def call(self, endpoint: str, request: Message, reply_type: type[Message]) -> Any:
        """Encrypt *request* for *endpoint*, send it, decrypt and decode the reply."""
        reply = self._exchange(endpoint, request.encode())
        try:
            return reply_type.decode(reply)
        except ProtobufDecodeError as exc:
            raise ProvisioningError(f"{endpoint}: the device's reply is not a {reply_type.__name__} ({exc})") from exc

    def associate_user(self, user_id: str, secret_key: str) -> str:
        """``cloud_user_assoc``: hand the node the user id and mapping secret; returns the node id it reports."""
        SECRETS.add(secret_key)
        reply = self.call(
            "cloud_user_assoc",
            RMakerConfigPayload(
                msg=RMakerConfigMsgType.TypeCmdSetUserMapping,
                cmd_set_user_mapping=CmdSetUserMapping(UserID=user_id, SecretKey=secret_key),
            ),
            RMakerConfigPayload,
        )
        resp = reply.resp_set_user_mapping
        if resp is None or resp.Status != RMakerConfigStatus.Success:
            status = "no response" if resp is None else status_name(resp.Status)
            raise ProvisioningError(f"cloud_user_assoc: the node answered {status}")
        self.node_id = str(resp.NodeId)
        return self.node_id

    def scan(self) -> list[WiFiScanResult]:
        """``prov-scan``: start a blocking scan, read the count, fetch results in chunks (esp_prov's order)."""
        self._scan(WiFiScanPayload(msg=WiFiScanMsgType.TypeCmdScanStart, cmd_scan_start=CmdScanStart(blocking=True)))
        status = self._scan(WiFiScanPayload(msg=WiFiScanMsgType.TypeCmdScanStatus, cmd_scan_status=CmdScanStatus()))
        count = status.resp_scan_status.result_count if status.resp_scan_status else 0
        results: list[WiFiScanResult] = []
        while len(results) < count:
            chunk = self._scan(
                WiFiScanPayload(
                    msg=WiFiScanMsgType.TypeCmdScanResult,
                    cmd_scan_result=CmdScanResult(start_index=len(results), count=min(SCAN_RESULTS_PER_CALL, count - len(results))),
                )
            )
            entries = list(chunk.resp_scan_result.entries) if chunk.resp_scan_result else []
            if not entries:
                break
            results += entries
        return results

    def _scan(self, request: WiFiScanPayload) -> WiFiScanPayload:
        reply = self.call("prov-scan", request, WiFiScanPayload)
        if reply.status != Status.Success:
            raise ProvisioningError(f"prov-scan: {WiFiScanMsgType(request.msg).name} answered {status_name(reply.status)}")
        return reply

    def set_wifi_config(self, ssid: str, passphrase: str) -> None:
        SECRETS.add(passphrase)
        request = CmdSetConfig(ssid=ssid.encode(), passphrase=passphrase.encode())
        reply = self._config(WiFiConfigPayload(msg=WiFiConfigMsgType.TypeCmdSetConfig, cmd_set_config=request))
        self._expect_ok(reply.resp_set_config, "set config")

    def apply_wifi_config(self) -> None:
        reply = self._config(WiFiConfigPayload(msg=WiFiConfigMsgType.TypeCmdApplyConfig, cmd_apply_config=CmdApplyConfig()))
        self._expect_ok(reply.resp_apply_config, "apply config")

    def wifi_status(self) -> RespGetStatus:
        reply = self._config(WiFiConfigPayload(msg=WiFiConfigMsgType.TypeCmdGetStatus, cmd_get_status=CmdGetStatus()))
        if reply.resp_get_status is None:
            raise ProvisioningError("prov-config: get status answered without a status")
        return reply.resp_get_status

    def _config(self, request: WiFiConfigPayload) -> WiFiConfigPayload:
        return self.call("prov-config", request, WiFiConfigPayload)

    def wait_wifi(self, timeout: float = 30.0) -> WifiOutcome:
        """Poll Wi-Fi status until connected or failed (the device has no push channel)."""
        status = poll_until(self.wifi_status, _wifi_settled, timeout, STATUS_POLL_S)
        state = WifiStationState(status.sta_state)
        if state == WifiStationState.Connected:
            return WifiOutcome(state, ip4_addr=status.connected.ip4_addr if status.connected is not None else None)
        if _wifi_settled(status):  # failed, and the device said why
            return WifiOutcome(state, WifiConnectFailedReason(status.fail_reason))
        return WifiOutcome(state)

    def reset_wifi(self) -> None:
        """``prov-ctrl`` reset: lets the user retry after a failed attempt."""
        request = WiFiCtrlPayload(msg=WiFiCtrlMsgType.TypeCmdCtrlReset, cmd_ctrl_reset=CmdCtrlReset())
        reply = self.call("prov-ctrl", request, WiFiCtrlPayload)
        if reply.status != Status.Success:
            raise ProvisioningError(f"prov-ctrl reset answered {status_name(reply.status)}")

    @staticmethod
    def _expect_ok(resp: Any, step: str) -> None:
        if resp is None or resp.status != Status.Success:
            raise ProvisioningError(f"prov-config {step}: the device answered {'nothing' if resp is None else status_name(resp.status)}")


def _wifi_settled(status: RespGetStatus) -> bool:
    """Connected, or failed with a reason (esp_prov stops polling there too); Connecting and a bare Disconnected go on."""
    if status.sta_state == WifiStationState.Connected:
        return True
    return status.sta_state in (WifiStationState.ConnectionFailed, WifiStationState.Disconnected) and status.has("fail_reason")


def provision_wifi(client: ProvisioningClient, ssid: str, passphrase: str, user_id: str, secret_key: str,
                   timeout: float = 30.0) -> WifiOutcome:
    """The app's happy path: version, session, user association, Wi-Fi credentials, wait."""
    client.proto_version()
    try:
        client.open_session()
    except SessionError as exc:
        raise ProvisioningError(f"prov-session: no secure session ({exc}). Fix: check the PoP printed in the QR line") from exc
    client.associate_user(user_id, secret_key)
    client.set_wifi_config(ssid, passphrase)
    client.apply_wifi_config()
    return client.wait_wifi(timeout)

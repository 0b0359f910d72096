"""Every protobuf message of the provisioning link, declared once as field lists.

Sources (field numbers and enum values; see shared/reference/rainmaker-protocol.md §2.1, §4.4–§4.7):

* esp-idf ``components/protocomm/proto/``: ``constants.proto``, ``session.proto``, ``sec0.proto``,
  ``sec1.proto``, ``sec2.proto``;
* esp-idf v5.4 ``components/wifi_provisioning/proto/``: ``wifi_constants.proto``,
  ``wifi_config.proto``, ``wifi_scan.proto``, ``wifi_ctrl.proto``. ``RespGetStatus`` carries the
  ``attempt_failed = 12`` member (``WifiAttemptFailed{uint32 attempts_remaining = 1}``) that
  idf-extra-components ``network_provisioning/proto/network_config.proto`` also has; the Wi-Fi
  part of ``NetworkConfigPayload`` is wire-identical to ``WiFiConfigPayload``;
* esp-rainmaker ``components/esp_rainmaker/src/core/esp_rmaker_user_mapping.proto`` (package
  ``rainmaker``), the ``cloud_user_assoc`` endpoint's payload;
* esp-idf ``components/esp_local_ctrl/proto/esp_local_ctrl.proto`` (field numbers as in the
  descriptor of esp-rainmaker-cli's ``rmaker_local_ctrl/esp_local_ctrl_pb2.py``).

Proto names are kept so a message reads like its .proto; Python enum classes stand in for
proto enums (proto3 enums are open: unknown numbers decode to plain ints).
"""

from __future__ import annotations

from enum import IntEnum

from rig.protocomm.proto import Bool, Bytes, Enum_, Int32, Message, Msg, Oneof, Repeated, String, UInt32

# --- constants.proto -------------------------------------------------------------------------------


class Status(IntEnum):
    """``Status`` (esp-idf protocomm ``constants.proto``)."""

    Success = 0
    InvalidSecScheme = 1
    InvalidProto = 2
    TooManySessions = 3
    InvalidArgument = 4
    InternalError = 5
    CryptoError = 6
    InvalidSession = 7


# --- sec0.proto ------------------------------------------------------------------------------------


class Sec0MsgType(IntEnum):
    S0_Session_Command = 0
    S0_Session_Response = 1


class S0SessionCmd(Message):
    """``S0SessionCmd {}`` (sec0.proto)."""


class S0SessionResp(Message):
    """``S0SessionResp`` (sec0.proto)."""

    FIELDS = (Enum_("status", 1, Status),)


class Sec0Payload(Message):
    """``Sec0Payload`` (sec0.proto)."""

    FIELDS = (
        Enum_("msg", 1, Sec0MsgType),
        *Oneof("payload", Msg("sc", 20, S0SessionCmd), Msg("sr", 21, S0SessionResp)),
    )


# --- sec1.proto ------------------------------------------------------------------------------------


class Sec1MsgType(IntEnum):
    Session_Command0 = 0
    Session_Response0 = 1
    Session_Command1 = 2
    Session_Response1 = 3


class SessionCmd0(Message):
    """``SessionCmd0`` (sec1.proto): the client's X25519 public key."""

    FIELDS = (Bytes("client_pubkey", 1),)


class SessionResp0(Message):
    """``SessionResp0`` (sec1.proto)."""

    FIELDS = (Enum_("status", 1, Status), Bytes("device_pubkey", 2), Bytes("device_random", 3))


class SessionCmd1(Message):
    """``SessionCmd1`` (sec1.proto); field number 2 is the .proto's, there is no field 1."""

    FIELDS = (Bytes("client_verify_data", 2),)


class SessionResp1(Message):
    """``SessionResp1`` (sec1.proto); field 2 is unused in the .proto."""

    FIELDS = (Enum_("status", 1, Status), Bytes("device_verify_data", 3))


class Sec1Payload(Message):
    """``Sec1Payload`` (sec1.proto)."""

    FIELDS = (
        Enum_("msg", 1, Sec1MsgType),
        *Oneof(
            "payload",
            Msg("sc0", 20, SessionCmd0),
            Msg("sr0", 21, SessionResp0),
            Msg("sc1", 22, SessionCmd1),
            Msg("sr1", 23, SessionResp1),
        ),
    )


# --- sec2.proto ------------------------------------------------------------------------------------


class Sec2MsgType(IntEnum):
    S2Session_Command0 = 0
    S2Session_Response0 = 1
    S2Session_Command1 = 2
    S2Session_Response1 = 3


class S2SessionCmd0(Message):
    """``S2SessionCmd0`` (sec2.proto): SRP6a username and public key A."""

    FIELDS = (Bytes("client_username", 1), Bytes("client_pubkey", 2))


class S2SessionResp0(Message):
    """``S2SessionResp0`` (sec2.proto): public key B and the salt."""

    FIELDS = (Enum_("status", 1, Status), Bytes("device_pubkey", 2), Bytes("device_salt", 3))


class S2SessionCmd1(Message):
    """``S2SessionCmd1`` (sec2.proto): the client proof M."""

    FIELDS = (Bytes("client_proof", 1),)


class S2SessionResp1(Message):
    """``S2SessionResp1`` (sec2.proto): the device proof H(A|M|K) and the AES-GCM nonce."""

    FIELDS = (Enum_("status", 1, Status), Bytes("device_proof", 2), Bytes("device_nonce", 3))


class Sec2Payload(Message):
    """``Sec2Payload`` (sec2.proto)."""

    FIELDS = (
        Enum_("msg", 1, Sec2MsgType),
        *Oneof(
            "payload",
            Msg("sc0", 20, S2SessionCmd0),
            Msg("sr0", 21, S2SessionResp0),
            Msg("sc1", 22, S2SessionCmd1),
            Msg("sr1", 23, S2SessionResp1),
        ),
    )


# --- session.proto ---------------------------------------------------------------------------------


class SecSchemeVersion(IntEnum):
    SecScheme0 = 0
    SecScheme1 = 1
    SecScheme2 = 2


class SessionData(Message):
    """``SessionData`` (session.proto): what the ``prov-session`` endpoint carries; no field 1."""

    FIELDS = (
        Enum_("sec_ver", 2, SecSchemeVersion),
        *Oneof("proto", Msg("sec0", 10, Sec0Payload), Msg("sec1", 11, Sec1Payload), Msg("sec2", 12, Sec2Payload)),
    )


# --- wifi_constants.proto --------------------------------------------------------------------------


class WifiStationState(IntEnum):
    Connected = 0
    Connecting = 1
    Disconnected = 2
    ConnectionFailed = 3


class WifiConnectFailedReason(IntEnum):
    AuthError = 0
    NetworkNotFound = 1


class WifiAuthMode(IntEnum):
    Open = 0
    WEP = 1
    WPA_PSK = 2
    WPA2_PSK = 3
    WPA_WPA2_PSK = 4
    WPA2_ENTERPRISE = 5
    WPA3_PSK = 6
    WPA2_WPA3_PSK = 7


class WifiConnectedState(Message):
    """``WifiConnectedState`` (wifi_constants.proto)."""

    FIELDS = (
        String("ip4_addr", 1),
        Enum_("auth_mode", 2, WifiAuthMode),
        Bytes("ssid", 3),
        Bytes("bssid", 4),
        Int32("channel", 5),
    )


class WifiAttemptFailed(Message):
    """``WifiAttemptFailed`` (wifi_constants.proto / network_constants.proto)."""

    FIELDS = (UInt32("attempts_remaining", 1),)


# --- wifi_config.proto -----------------------------------------------------------------------------


class WiFiConfigMsgType(IntEnum):
    TypeCmdGetStatus = 0
    TypeRespGetStatus = 1
    TypeCmdSetConfig = 2
    TypeRespSetConfig = 3
    TypeCmdApplyConfig = 4
    TypeRespApplyConfig = 5


class CmdGetStatus(Message):
    """``CmdGetStatus {}`` (wifi_config.proto)."""


class RespGetStatus(Message):
    """``RespGetStatus`` (wifi_config.proto, v5.4 form with ``attempt_failed``)."""

    FIELDS = (
        Enum_("status", 1, Status),
        Enum_("sta_state", 2, WifiStationState),
        *Oneof(
            "state",
            Enum_("fail_reason", 10, WifiConnectFailedReason),
            Msg("connected", 11, WifiConnectedState),
            Msg("attempt_failed", 12, WifiAttemptFailed),
        ),
    )


class CmdSetConfig(Message):
    """``CmdSetConfig`` (wifi_config.proto). The passphrase is a secret: ``repr`` hides it."""

    FIELDS = (Bytes("ssid", 1), Bytes("passphrase", 2, secret=True), Bytes("bssid", 3), Int32("channel", 4))


class RespSetConfig(Message):
    """``RespSetConfig`` (wifi_config.proto)."""

    FIELDS = (Enum_("status", 1, Status),)


class CmdApplyConfig(Message):
    """``CmdApplyConfig {}`` (wifi_config.proto)."""


class RespApplyConfig(Message):
    """``RespApplyConfig`` (wifi_config.proto)."""

    FIELDS = (Enum_("status", 1, Status),)


class WiFiConfigPayload(Message):
    """``WiFiConfigPayload`` (wifi_config.proto): the ``prov-config`` endpoint."""

    FIELDS = (
        Enum_("msg", 1, WiFiConfigMsgType),
        *Oneof(
            "payload",
            Msg("cmd_get_status", 10, CmdGetStatus),
            Msg("resp_get_status", 11, RespGetStatus),
            Msg("cmd_set_config", 12, CmdSetConfig),
            Msg("resp_set_config", 13, RespSetConfig),
            Msg("cmd_apply_config", 14, CmdApplyConfig),
            Msg("resp_apply_config", 15, RespApplyConfig),
        ),
    )


# --- wifi_scan.proto -------------------------------------------------------------------------------


class WiFiScanMsgType(IntEnum):
    TypeCmdScanStart = 0
    TypeRespScanStart = 1
    TypeCmdScanStatus = 2
    TypeRespScanStatus = 3
    TypeCmdScanResult = 4
    TypeRespScanResult = 5


class CmdScanStart(Message):
    """``CmdScanStart`` (wifi_scan.proto)."""

    FIELDS = (Bool("blocking", 1), Bool("passive", 2), UInt32("group_channels", 3), UInt32("period_ms", 4))


class RespScanStart(Message):
    """``RespScanStart {}`` (wifi_scan.proto)."""


class CmdScanStatus(Message):
    """``CmdScanStatus {}`` (wifi_scan.proto)."""


class RespScanStatus(Message):
    """``RespScanStatus`` (wifi_scan.proto)."""

    FIELDS = (Bool("scan_finished", 1), UInt32("result_count", 2))


class CmdScanResult(Message):
    """``CmdScanResult`` (wifi_scan.proto)."""

    FIELDS = (UInt32("start_index", 1), UInt32("count", 2))


class WiFiScanResult(Message):
    """``WiFiScanResult`` (wifi_scan.proto)."""

    FIELDS = (Bytes("ssid", 1), UInt32("channel", 2), Int32("rssi", 3), Bytes("bssid", 4), Enum_("auth", 5, WifiAuthMode))


class RespScanResult(Message):
    """``RespScanResult`` (wifi_scan.proto)."""

    FIELDS = (Repeated(Msg("entries", 1, WiFiScanResult)),)


class WiFiScanPayload(Message):
    """``WiFiScanPayload`` (wifi_scan.proto): the ``prov-scan`` endpoint."""

    FIELDS = (
        Enum_("msg", 1, WiFiScanMsgType),
        Enum_("status", 2, Status),
        *Oneof(
            "payload",
            Msg("cmd_scan_start", 10, CmdScanStart),
            Msg("resp_scan_start", 11, RespScanStart),
            Msg("cmd_scan_status", 12, CmdScanStatus),
            Msg("resp_scan_status", 13, RespScanStatus),
            Msg("cmd_scan_result", 14, CmdScanResult),
            Msg("resp_scan_result", 15, RespScanResult),
        ),
    )


# --- wifi_ctrl.proto -------------------------------------------------------------------------------


class WiFiCtrlMsgType(IntEnum):
    TypeCtrlReserved = 0
    TypeCmdCtrlReset = 1
    TypeRespCtrlReset = 2
    TypeCmdCtrlReprov = 3
    TypeRespCtrlReprov = 4


class CmdCtrlReset(Message):
    """``CmdCtrlReset {}`` (wifi_ctrl.proto)."""


class RespCtrlReset(Message):
    """``RespCtrlReset {}`` (wifi_ctrl.proto)."""


class CmdCtrlReprov(Message):
    """``CmdCtrlReprov {}`` (wifi_ctrl.proto)."""


class RespCtrlReprov(Message):
    """``RespCtrlReprov {}`` (wifi_ctrl.proto)."""


class WiFiCtrlPayload(Message):
    """``WiFiCtrlPayload`` (wifi_ctrl.proto): the ``prov-ctrl`` endpoint; the oneof starts at 11."""

    FIELDS = (
        Enum_("msg", 1, WiFiCtrlMsgType),
        Enum_("status", 2, Status),
        *Oneof(
            "payload",
            Msg("cmd_ctrl_reset", 11, CmdCtrlReset),
            Msg("resp_ctrl_reset", 12, RespCtrlReset),
            Msg("cmd_ctrl_reprov", 13, CmdCtrlReprov),
            Msg("resp_ctrl_reprov", 14, RespCtrlReprov),
        ),
    )


# --- esp_rmaker_user_mapping.proto (package rainmaker) ---------------------------------------------


class RMakerConfigStatus(IntEnum):
    Success = 0
    InvalidParam = 1
    InvalidState = 2


class RMakerConfigMsgType(IntEnum):
    TypeCmdSetUserMapping = 0
    TypeRespSetUserMapping = 1


class CmdSetUserMapping(Message):
    """``rainmaker.CmdSetUserMapping``: user id and the mapping secret (hidden in ``repr``)."""

    FIELDS = (String("UserID", 1), String("SecretKey", 2, secret=True))


class RespSetUserMapping(Message):
    """``rainmaker.RespSetUserMapping``."""

    FIELDS = (Enum_("Status", 1, RMakerConfigStatus), String("NodeId", 2))


class RMakerConfigPayload(Message):
    """``rainmaker.RMakerConfigPayload``: the ``cloud_user_assoc`` endpoint (rainmaker-protocol.md §2.1)."""

    FIELDS = (
        Enum_("msg", 1, RMakerConfigMsgType),
        *Oneof("payload", Msg("cmd_set_user_mapping", 10, CmdSetUserMapping), Msg("resp_set_user_mapping", 11, RespSetUserMapping)),
    )


# --- esp_local_ctrl.proto --------------------------------------------------------------------------

LOCAL_CTRL_PORT = 8080
"""``CONFIG_ESP_RMAKER_LOCAL_CTRL_HTTP_PORT`` default (and esp_rainmaker_ctrl's ``--port``)."""
LOCAL_CTRL_VERSION_EP = "esp_local_ctrl/version"
LOCAL_CTRL_SESSION_EP = "esp_local_ctrl/session"
LOCAL_CTRL_CONTROL_EP = "esp_local_ctrl/control"
"""esp-idf ``components/esp_local_ctrl/src/esp_local_ctrl.c``: the protocomm endpoint names."""
LOCAL_CTRL_PROP_FLAG_READONLY = 1 << 0
"""esp_rmaker_local_ctrl.c ``enum property_flags``: RainMaker sets it on the ``config`` property."""
LOCAL_CTRL_DEFAULT_SECURITY = 1
"""``CONFIG_ESP_RMAKER_LOCAL_CTRL_SECURITY`` default (security 1), also what a client assumes when
the version endpoint does not say."""


class LocalCtrlMsgType(IntEnum):
    TypeCmdGetPropertyCount = 0
    TypeRespGetPropertyCount = 1
    TypeCmdGetPropertyValues = 4
    TypeRespGetPropertyValues = 5
    TypeCmdSetPropertyValues = 6
    TypeRespSetPropertyValues = 7


class CmdGetPropertyCount(Message):
    """``CmdGetPropertyCount {}`` (esp_local_ctrl.proto)."""


class RespGetPropertyCount(Message):
    """``RespGetPropertyCount`` (esp_local_ctrl.proto)."""

    FIELDS = (Enum_("status", 1, Status), UInt32("count", 2))


class PropertyInfo(Message):
    """``PropertyInfo`` (esp_local_ctrl.proto)."""

    FIELDS = (Enum_("status", 1, Status), String("name", 2), UInt32("type", 3), UInt32("flags", 4), Bytes("value", 5))


class CmdGetPropertyValues(Message):
    """``CmdGetPropertyValues`` (esp_local_ctrl.proto); ``indices`` is packed on the wire."""

    FIELDS = (Repeated(UInt32("indices", 1)),)


class RespGetPropertyValues(Message):
    """``RespGetPropertyValues`` (esp_local_ctrl.proto)."""

    FIELDS = (Enum_("status", 1, Status), Repeated(Msg("props", 2, PropertyInfo)))


class PropertyValue(Message):
    """``PropertyValue`` (esp_local_ctrl.proto)."""

    FIELDS = (UInt32("index", 1), Bytes("value", 2))


class CmdSetPropertyValues(Message):
    """``CmdSetPropertyValues`` (esp_local_ctrl.proto)."""

    FIELDS = (Repeated(Msg("props", 1, PropertyValue)),)


class RespSetPropertyValues(Message):
    """``RespSetPropertyValues`` (esp_local_ctrl.proto)."""

    FIELDS = (Enum_("status", 1, Status),)


class LocalCtrlMessage(Message):
    """``LocalCtrlMessage`` (esp_local_ctrl.proto): the ``esp_local_ctrl/control`` endpoint."""

    FIELDS = (
        Enum_("msg", 1, LocalCtrlMsgType),
        *Oneof(
            "payload",
            Msg("cmd_get_prop_count", 10, CmdGetPropertyCount),
            Msg("resp_get_prop_count", 11, RespGetPropertyCount),
            Msg("cmd_get_prop_vals", 12, CmdGetPropertyValues),
            Msg("resp_get_prop_vals", 13, RespGetPropertyValues),
            Msg("cmd_set_prop_vals", 14, CmdSetPropertyValues),
            Msg("resp_set_prop_vals", 15, RespSetPropertyValues),
        ),
    )

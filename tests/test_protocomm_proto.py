"""rig.protocomm.proto / messages against Espressif's generated protobuf modules (the reference).

For every message of the provisioning link: our canonical bytes equal google.protobuf's
``SerializeToString()`` for representative values (defaults omitted, oneof members and empty
sub-messages present, negative int32, packed repeated), we parse theirs back to the same fields,
unknown fields survive a round trip, and malformed input raises ProtobufDecodeError naming the
message and byte offset.
"""

from __future__ import annotations

from typing import Any

import pytest

from rig.protocomm import messages as m
from rig.protocomm.errors import ProtobufDecodeError
from rig.protocomm.proto import Message, encode_varint, raw_field
from tests import espressif_prov_client

espressif = espressif_prov_client.load()
espressif_local_ctrl = espressif_prov_client.module("rmaker_local_ctrl.esp_local_ctrl_pb2")


def _reference(module: Any, message_name: str, fields: dict[str, Any]) -> Any:
    """An Espressif pb2 message built from a plain dict (nested dicts for sub-messages)."""
    msg = getattr(module, message_name)()
    _fill(msg, fields)
    return msg


def _fill(msg: Any, fields: dict[str, Any]) -> None:
    for key, value in fields.items():
        if isinstance(value, dict):
            sub = getattr(msg, key)
            sub.SetInParent()
            _fill(sub, value)
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                _fill(getattr(msg, key).add(), item)
        elif isinstance(value, list):
            getattr(msg, key).extend(value)
        else:
            setattr(msg, key, value)


def _ours(cls: type[Message], fields: dict[str, Any]) -> Message:
    values = {}
    for key, value in fields.items():
        field = cls._by_name[key]
        if isinstance(value, dict):
            values[key] = _ours(field.message, value)  # type: ignore[arg-type]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            values[key] = [_ours(field.message, v) for v in value]  # type: ignore[arg-type]
        else:
            values[key] = value
    return cls(**values)


S, SEC0, SEC1, SEC2, SESSION = (espressif.constants_pb2, espressif.sec0_pb2, espressif.sec1_pb2, espressif.sec2_pb2,
                                espressif.session_pb2)
WC, WCONST, WSCAN, WCTRL = espressif.wifi_config_pb2, espressif.wifi_constants_pb2, espressif.wifi_scan_pb2, espressif.wifi_ctrl_pb2
UM = espressif.esp_rmaker_user_mapping_pb2
LC = espressif_local_ctrl

KEY32 = bytes(range(32))
KEY384 = bytes((i * 7) & 0xFF for i in range(384))

# (our class, Espressif module, Espressif name, field values) — every message of §2.1, §4.4–§4.7 and local ctrl
CASES: list[tuple[type[Message], Any, str, dict[str, Any]]] = [
    (m.S0SessionCmd, SEC0, "S0SessionCmd", {}),
    (m.S0SessionResp, SEC0, "S0SessionResp", {"status": 4}),
    (m.Sec0Payload, SEC0, "Sec0Payload", {"msg": 1, "sr": {"status": 0}}),
    (m.Sec0Payload, SEC0, "Sec0Payload", {"sc": {}}),
    (m.SessionCmd0, SEC1, "SessionCmd0", {"client_pubkey": KEY32}),
    (m.SessionResp0, SEC1, "SessionResp0", {"status": 7, "device_pubkey": KEY32, "device_random": KEY32[:16]}),
    (m.SessionCmd1, SEC1, "SessionCmd1", {"client_verify_data": KEY32}),
    (m.SessionResp1, SEC1, "SessionResp1", {"status": 6, "device_verify_data": KEY32}),
    (m.Sec1Payload, SEC1, "Sec1Payload", {"msg": 2, "sc1": {"client_verify_data": KEY32}}),
    (m.Sec1Payload, SEC1, "Sec1Payload", {"msg": 1, "sr0": {"device_pubkey": KEY32, "device_random": KEY32[:16]}}),
    (m.S2SessionCmd0, SEC2, "S2SessionCmd0", {"client_username": b"wifiprov", "client_pubkey": KEY384}),
    (m.S2SessionResp0, SEC2, "S2SessionResp0", {"status": 0, "device_pubkey": KEY384, "device_salt": KEY32[:16]}),
    (m.S2SessionCmd1, SEC2, "S2SessionCmd1", {"client_proof": KEY32 * 2}),
    (m.S2SessionResp1, SEC2, "S2SessionResp1", {"status": 5, "device_proof": KEY32 * 2, "device_nonce": KEY32[:12]}),
    (m.Sec2Payload, SEC2, "Sec2Payload", {"msg": 3, "sr1": {"device_proof": KEY32 * 2, "device_nonce": KEY32[:12]}}),
    (m.SessionData, SESSION, "SessionData", {"sec_ver": 0, "sec0": {"sc": {}}}),
    (m.SessionData, SESSION, "SessionData", {"sec_ver": 1, "sec1": {"sc0": {"client_pubkey": KEY32}}}),
    (m.SessionData, SESSION, "SessionData", {"sec_ver": 2, "sec2": {"msg": 2, "sc1": {"client_proof": KEY32 * 2}}}),
    (m.WifiConnectedState, WCONST, "WifiConnectedState",
     {"ip4_addr": "192.168.1.23", "auth_mode": 7, "ssid": b"lab-net", "bssid": b"\x02\x00\x00\x00\x00\x01", "channel": 11}),
    (m.CmdGetStatus, WC, "CmdGetStatus", {}),
    (m.RespGetStatus, WC, "RespGetStatus", {"status": 0, "sta_state": 3, "fail_reason": 1}),
    (m.RespGetStatus, WC, "RespGetStatus", {"sta_state": 3, "fail_reason": 0}),  # oneof scalar set to its default: still sent
    (m.RespGetStatus, WC, "RespGetStatus", {"sta_state": 0, "connected": {"ip4_addr": "10.0.0.2", "channel": 6}}),
    (m.CmdSetConfig, WC, "CmdSetConfig", {"ssid": b"lab-net", "passphrase": b"correct horse", "bssid": b"", "channel": -1}),
    (m.RespSetConfig, WC, "RespSetConfig", {"status": 4}),
    (m.CmdApplyConfig, WC, "CmdApplyConfig", {}),
    (m.RespApplyConfig, WC, "RespApplyConfig", {"status": 0}),
    (m.WiFiConfigPayload, WC, "WiFiConfigPayload", {"msg": 2, "cmd_set_config": {"ssid": b"n", "passphrase": b"p" * 63}}),
    (m.WiFiConfigPayload, WC, "WiFiConfigPayload", {"msg": 4, "cmd_apply_config": {}}),
    (m.WiFiConfigPayload, WC, "WiFiConfigPayload", {"msg": 1, "resp_get_status": {"sta_state": 1}}),
    (m.CmdScanStart, WSCAN, "CmdScanStart", {"blocking": True, "passive": False, "group_channels": 5, "period_ms": 120}),
    (m.RespScanStart, WSCAN, "RespScanStart", {}),
    (m.CmdScanStatus, WSCAN, "CmdScanStatus", {}),
    (m.RespScanStatus, WSCAN, "RespScanStatus", {"scan_finished": True, "result_count": 3}),
    (m.CmdScanResult, WSCAN, "CmdScanResult", {"start_index": 1, "count": 4}),
    (m.WiFiScanResult, WSCAN, "WiFiScanResult", {"ssid": b"a", "channel": 13, "rssi": -67, "bssid": b"\x01" * 6, "auth": 3}),
    (m.RespScanResult, WSCAN, "RespScanResult",
     {"entries": [{"ssid": b"a", "rssi": -40}, {"ssid": b"b", "channel": 1, "auth": 0}, {"ssid": b"c", "auth": 6}]}),
    (m.WiFiScanPayload, WSCAN, "WiFiScanPayload", {"msg": 5, "status": 0, "resp_scan_result": {"entries": [{"ssid": b"x"}]}}),
    (m.WiFiScanPayload, WSCAN, "WiFiScanPayload", {"msg": 0, "cmd_scan_start": {"blocking": True}}),
    (m.CmdCtrlReset, WCTRL, "CmdCtrlReset", {}),
    (m.RespCtrlReset, WCTRL, "RespCtrlReset", {}),
    (m.CmdCtrlReprov, WCTRL, "CmdCtrlReprov", {}),
    (m.RespCtrlReprov, WCTRL, "RespCtrlReprov", {}),
    (m.WiFiCtrlPayload, WCTRL, "WiFiCtrlPayload", {"msg": 1, "cmd_ctrl_reset": {}}),
    (m.WiFiCtrlPayload, WCTRL, "WiFiCtrlPayload", {"msg": 4, "status": 5, "resp_ctrl_reprov": {}}),
    (m.CmdSetUserMapping, UM, "CmdSetUserMapping", {"UserID": "b9c4a0e2-user", "SecretKey": "4f2a1b7c-0d3e-4c5b-9a8f-112233445566"}),
    (m.RespSetUserMapping, UM, "RespSetUserMapping", {"Status": 2, "NodeId": "58CF79DAC1E0"}),
    (m.RMakerConfigPayload, UM, "RMakerConfigPayload", {"msg": 0, "cmd_set_user_mapping": {"UserID": "u", "SecretKey": "k"}}),
    (m.RMakerConfigPayload, UM, "RMakerConfigPayload", {"msg": 1, "resp_set_user_mapping": {"Status": 0, "NodeId": "n"}}),
    (m.CmdGetPropertyCount, LC, "CmdGetPropertyCount", {}),
    (m.RespGetPropertyCount, LC, "RespGetPropertyCount", {"status": 0, "count": 300}),
    (m.PropertyInfo, LC, "PropertyInfo", {"status": 1, "name": "params", "type": 2, "flags": 1, "value": b'{"Light":{}}'}),
    (m.CmdGetPropertyValues, LC, "CmdGetPropertyValues", {"indices": [0, 1, 300, 70000]}),
    (m.RespGetPropertyValues, LC, "RespGetPropertyValues", {"status": 0, "props": [{"name": "config"}, {"name": "params", "type": 1}]}),
    (m.PropertyValue, LC, "PropertyValue", {"index": 1, "value": b"{}"}),
    (m.CmdSetPropertyValues, LC, "CmdSetPropertyValues", {"props": [{"index": 1, "value": b'{"a":1}'}, {"index": 0}]}),
    (m.RespSetPropertyValues, LC, "RespSetPropertyValues", {"status": 4}),
    (m.LocalCtrlMessage, LC, "LocalCtrlMessage", {"msg": 4, "cmd_get_prop_vals": {"indices": [2, 0]}}),
    (m.LocalCtrlMessage, LC, "LocalCtrlMessage", {"msg": 7, "resp_set_prop_vals": {"status": 0}}),
]


@pytest.mark.parametrize(("cls", "module", "name", "fields"), CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(CASES)])
def test_our_bytes_equal_google_protobuf(cls: type[Message], module: Any, name: str, fields: dict[str, Any]) -> None:
    reference = _reference(module, name, fields).SerializeToString()
    ours = _ours(cls, fields)
    assert ours.encode() == reference
    parsed = cls.decode(reference)
    assert parsed == ours
    assert parsed.encode() == reference
    theirs = getattr(module, name)()
    theirs.ParseFromString(ours.encode())
    assert theirs.SerializeToString() == reference


def test_field_numbers_and_names_match_the_descriptors() -> None:
    """Every declared field has the descriptor's number, and no descriptor field is missing."""
    for cls, module, name, _ in CASES:
        descriptor = getattr(module, name).DESCRIPTOR
        theirs = {f.name: f.number for f in descriptor.fields}
        ours = {f.name: f.number for f in cls.FIELDS}
        if cls is m.RespGetStatus:  # ours is the v5.4 form: attempt_failed = 12 is newer than the CLI's copy
            assert ours.pop("attempt_failed") == 12
        assert ours == theirs, name


def test_session_bytes_known_answer() -> None:
    """Espressif's sec0 Command0 is R 03 A2 01 00: field 10 holding field 20, empty; sec_ver 0 omitted."""
    assert m.SessionData(sec0=m.Sec0Payload(sc=m.S0SessionCmd())).encode() == bytes.fromhex("5203a20100")
    negative = m.CmdSetConfig(channel=-1).encode()
    assert negative == bytes.fromhex("20ffffffffffffffffff01")  # int32 -1: ten-byte varint


def test_attempt_failed_round_trips_and_is_unknown_to_the_old_schema() -> None:
    """IDF v5.4's RespGetStatus.attempt_failed (12); the CLI's older wifi_config_pb2 keeps it as an unknown field."""
    ours = m.RespGetStatus(sta_state=m.WifiStationState.Disconnected, attempt_failed=m.WifiAttemptFailed(attempts_remaining=2))
    data = ours.encode()
    assert data == bytes.fromhex("1002" + "6202" + "0802")
    assert m.RespGetStatus.decode(data).attempt_failed.attempts_remaining == 2
    old = WC.RespGetStatus()
    old.ParseFromString(data)
    assert old.sta_state == 2 and old.WhichOneof("state") is None
    assert old.SerializeToString() == data  # google keeps the unknown field too


def test_unknown_fields_are_kept_and_re_emitted_last() -> None:
    extra = raw_field(99, b"future") + raw_field(98, 7) + encode_varint((97 << 3) | 5) + b"\x01\x02\x03\x04"
    data = m.SessionCmd0(client_pubkey=KEY32).encode() + extra
    parsed = m.SessionCmd0.decode(data)
    assert parsed.client_pubkey == KEY32
    assert parsed.unknown_fields == extra
    assert parsed.encode() == data
    theirs = SEC1.SessionCmd0()
    theirs.ParseFromString(data)
    assert theirs.SerializeToString() == data


def test_unknown_group_is_skipped() -> None:
    group = encode_varint((50 << 3) | 3) + raw_field(1, 5) + encode_varint((50 << 3) | 4)
    parsed = m.SessionCmd0.decode(group + m.SessionCmd0(client_pubkey=b"k").encode())
    assert parsed.client_pubkey == b"k"


def test_decoding_follows_protobuf_merge_rules() -> None:
    # last oneof member wins
    two = raw_field(20, m.SessionCmd0(client_pubkey=b"a").encode()) + raw_field(22, m.SessionCmd1(client_verify_data=b"b").encode())
    parsed = m.Sec1Payload.decode(two)
    assert parsed.which("payload") == "sc1" and parsed.sc0 is None
    # a singular sub-message that appears twice is merged
    merged = m.Sec1Payload.decode(raw_field(21, raw_field(2, b"pub")) + raw_field(21, raw_field(3, b"rnd")))
    assert (merged.sr0.device_pubkey, merged.sr0.device_random) == (b"pub", b"rnd")
    # repeated scalars accept packed and unpacked encodings
    unpacked = raw_field(1, 3) + raw_field(1, 4)
    assert m.CmdGetPropertyValues.decode(unpacked).indices == [3, 4]
    assert m.CmdGetPropertyValues(indices=[3, 4]).encode() == bytes.fromhex("0a020304")
    # proto3 enums are open
    assert m.SessionResp0.decode(raw_field(1, 42)).status == 42
    # int32 reads the low 32 bits of a 64-bit varint
    assert m.WifiConnectedState.decode(raw_field(5, (1 << 40) - 1)).channel == -1


@pytest.mark.parametrize(
    ("cls", "data", "offset", "problem"),
    [
        (m.SessionCmd0, b"\x0a\x05abc", 0, "length 5 runs past the end"),
        (m.SessionCmd0, b"\x0a", 1, "truncated varint"),
        (m.SessionCmd0, b"\x0a\x80", 1, "truncated varint"),
        (m.SessionResp0, b"\x08\xff\xff", 1, "truncated varint"),
        (m.SessionResp0, b"\x08" + b"\xff" * 10 + b"\x01", 1, "varint longer than 10 bytes"),
        (m.SessionResp0, b"\x0a\x01\x00", 0, "arrived with wire type 2"),  # status (varint) sent length-delimited
        (m.SessionCmd0, b"\x08\x01", 0, "arrived with wire type 0"),  # client_pubkey (bytes) sent as a varint
        (m.SessionCmd0, b"\x00\x01", 0, "field number 0"),
        (m.SessionCmd0, b"\x16", 0, "invalid wire type 6"),  # unknown field 2 with wire type 6
        (m.SessionCmd0, b"\x4c", 0, "end-group"),
        (m.SessionCmd0, b"\x49\x01\x02", 0, "truncated 64-bit field"),
    ],
)
def test_malformed_input_names_message_and_offset(cls: type[Message], data: bytes, offset: int, problem: str) -> None:
    with pytest.raises(ProtobufDecodeError) as info:
        cls.decode(data)
    assert info.value.message_name == cls.__name__
    assert info.value.offset == offset
    assert problem in str(info.value)


def test_nested_error_offset_is_absolute() -> None:
    """A truncated length inside SessionData.sec1.sc0 reports the offset in the outer buffer."""
    inner = b"\x0a\x20" + b"\x00" * 5  # client_pubkey claims 32 bytes, 5 follow
    data = b"\x10\x01" + raw_field(11, raw_field(20, inner))
    with pytest.raises(ProtobufDecodeError) as info:
        m.SessionData.decode(data)
    assert info.value.message_name == "SessionCmd0"
    assert info.value.offset == 7  # 10 01 / 5a 0a / a2 01 07 / here: 0a 20


def test_strings_with_invalid_utf8_survive_like_protobuf_c() -> None:
    data = raw_field(1, b"\xffuser")
    parsed = m.CmdSetUserMapping.decode(data)
    assert parsed.encode() == data


def test_assignment_is_checked_and_oneof_is_exclusive() -> None:
    payload = m.Sec1Payload(sc0=m.SessionCmd0(client_pubkey=b"x"))
    payload.sc1 = m.SessionCmd1(client_verify_data=b"y")
    assert payload.which("payload") == "sc1" and payload.sc0 is None
    with pytest.raises(ValueError, match="oneof 'payload' takes one member"):
        m.Sec1Payload(sc0=m.SessionCmd0(), sc1=m.SessionCmd1())
    with pytest.raises(ValueError, match=r"outside \[0, 4294967295\]"):
        m.CmdScanResult(count=-1)
    with pytest.raises(TypeError, match="takes bytes"):
        m.SessionCmd0(client_pubkey="text")
    with pytest.raises(AttributeError, match="no field 'pubkey'"):
        m.SessionCmd0(pubkey=b"")


def test_repr_hides_secrets() -> None:
    text = repr(m.CmdSetConfig(ssid=b"lab", passphrase=b"hunter22"))
    assert "hunter22" not in text and "passphrase=***" in text
    assert "s3cr3t-key" not in repr(m.CmdSetUserMapping(UserID="u", SecretKey="s3cr3t-key"))

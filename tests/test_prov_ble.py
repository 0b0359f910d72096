"""rig.prov.transport_ble / fixtures.ble: protocomm over BLE GATT, and NOT_APPLICABLE without an adapter.

The GATT peer here is a fake built the way esp-idf ``protocomm_nimble.c`` builds its service — one
characteristic per endpoint, UUID = service UUID with bytes 12–13 replaced, a 0x2901 descriptor holding
the endpoint name, the request handled on write and its answer kept for the next read, the connection
handle as protocomm session id — in front of the rig's own device-side protocomm
(:class:`~rig.protocomm.endpoints.Protocomm`), so the rig's provisioning client runs a real security 1
handshake through :class:`BleTransport`'s framing. No radio is involved; the host's lack of one is
tested at the end.
"""

from __future__ import annotations

import asyncio
import os
import struct
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from bleak.exc import BleakBluetoothNotAvailableError, BleakBluetoothNotAvailableReason, BleakDBusError, BleakError, BleakGATTProtocolError

from fixtures.ble import require_ble
from rig.protocomm.endpoints import Protocomm, provisioning_version
from rig.protocomm.errors import EndpointFailure
from rig.protocomm.messages import (
    RespSetConfig,
    RespSetUserMapping,
    RMakerConfigMsgType,
    RMakerConfigPayload,
    RMakerConfigStatus,
    Status,
    WiFiConfigMsgType,
    WiFiConfigPayload,
)
from rig.protocomm.security import DeviceSecurity1
from rig.prov.provisioner import ProvisioningClient
from rig.prov.transport_ble import (
    MAX_ATTRIBUTE_LEN,
    RAINMAKER_SERVICE_UUID,
    USER_DESCRIPTION_UUID,
    WIFI_PROV_DEFAULT_SERVICE_UUID,
    BleTransport,
    BleTransportError,
    BleUnavailable,
    characteristic_uuid,
    device_endpoint_uuids,
    endpoint_uuid16,
    map_endpoints,
    unavailable_reason,
)
from rig.prov.transport_http import TransportError

POP = "abcd1234"
NAME = "PROV_1a2b3c"
ADDRESS = "24:0A:C4:1A:2B:3C"
NODE_ID = "ble-node-0001"

# esp-rainmaker examples/common/app_network/app_wifi_internal.c: custom_service_uuid, LSB first.
RAINMAKER_UUID_ARRAY = bytes([0xB4, 0xDF, 0x5A, 0x1C, 0x3F, 0x6B, 0xF4, 0xBF, 0xEA, 0x4A, 0x82, 0x03, 0x04, 0x90, 0x1A, 0x02])
# esp-idf components/wifi_provisioning/src/scheme_ble.c new_config(): the default, LSB first.
WIFI_PROV_UUID_ARRAY = bytes([0x07, 0xED, 0x9B, 0x2D, 0x0F, 0x06, 0x7C, 0x87, 0x9B, 0x43, 0x43, 0x6B, 0x4D, 0x24, 0x75, 0x17])


# ------------------------------------------------------------------------------------------ UUIDs


def test_service_uuid_strings_are_the_firmware_byte_arrays_reversed() -> None:
    assert uuid.UUID(bytes=RAINMAKER_UUID_ARRAY[::-1]) == uuid.UUID(RAINMAKER_SERVICE_UUID)
    assert uuid.UUID(bytes=WIFI_PROV_UUID_ARRAY[::-1]) == uuid.UUID(WIFI_PROV_DEFAULT_SERVICE_UUID)


def test_characteristic_uuid_known_answers() -> None:
    """ESP-IDF: copy the service's LSB-first uint8_t[16], memcpy the uint16_t endpoint UUID (little-endian) over [12..13]."""
    assert characteristic_uuid(RAINMAKER_SERVICE_UUID, 0xFF50) == "021aff50-0382-4aea-bff4-6b3f1c5adfb4"
    assert characteristic_uuid(RAINMAKER_SERVICE_UUID, 0xFF51) == "021aff51-0382-4aea-bff4-6b3f1c5adfb4"
    assert characteristic_uuid(RAINMAKER_SERVICE_UUID, 0xFF52) == "021aff52-0382-4aea-bff4-6b3f1c5adfb4"
    assert characteristic_uuid(RAINMAKER_SERVICE_UUID, 0xFF53) == "021aff53-0382-4aea-bff4-6b3f1c5adfb4"
    assert characteristic_uuid(RAINMAKER_SERVICE_UUID, 0xFF54) == "021aff54-0382-4aea-bff4-6b3f1c5adfb4"
    assert characteristic_uuid(WIFI_PROV_DEFAULT_SERVICE_UUID, 0xFF51) == "1775ff51-6b43-439b-877c-060f2d9bed07"
    # the same rule done on the firmware's array, independently of the implementation
    patched = bytearray(RAINMAKER_UUID_ARRAY)
    patched[12:14] = struct.pack("<H", 0xFF51)
    assert str(uuid.UUID(bytes=bytes(patched[::-1]))) == "021aff51-0382-4aea-bff4-6b3f1c5adfb4"
    assert endpoint_uuid16("021aff51-0382-4aea-bff4-6b3f1c5adfb4") == 0xFF51
    assert characteristic_uuid("021AFF51-0382-4AEA-BFF4-6B3F1C5ADFB4", 0xFF53) == "021aff53-0382-4aea-bff4-6b3f1c5adfb4"
    with pytest.raises(ValueError, match="not 16-bit"):
        characteristic_uuid(RAINMAKER_SERVICE_UUID, 0x1FF51)


def test_device_endpoint_table_numbers_custom_endpoints_after_proto_ver() -> None:
    table = device_endpoint_uuids(RAINMAKER_SERVICE_UUID, ["cloud_user_assoc", "ch_resp"])
    assert {name: endpoint_uuid16(u) for name, u in table.items()} == {
        "prov-ctrl": 0xFF4F, "prov-scan": 0xFF50, "prov-session": 0xFF51, "prov-config": 0xFF52, "proto-ver": 0xFF53,
        "cloud_user_assoc": 0xFF54, "ch_resp": 0xFF55,
    }


# ------------------------------------------------------------------------------------------ a fake ESP-IDF GATT peer


@dataclass
class FakeDescriptor:
    uuid: str
    handle: int
    value: bytes


@dataclass
class FakeCharacteristic:
    uuid: str
    handle: int
    descriptors: list[FakeDescriptor]
    properties: list[str] = field(default_factory=lambda: ["read", "write"])


@dataclass
class FakeService:
    uuid: str
    characteristics: list[FakeCharacteristic]


@dataclass
class FakeDevice:
    address: str
    name: str


class FakePeripheral:
    """A device's protocomm GATT server (protocomm_nimble.c layout) in front of a :class:`Protocomm`.

    ``stack="nimble"`` answers a failed request with ATT Invalid PDU and keeps the link;
    ``"bluedroid"`` drops the link (``esp_ble_gatts_close``). ``describe=False`` leaves out the 0x2901 descriptors.
    """

    def __init__(self, protocomm: Protocomm, custom: list[str], *, service_uuid: str = RAINMAKER_SERVICE_UUID,
                 stack: str = "nimble", describe: bool = True, extra_services: list[FakeService] | None = None):
        self.protocomm = protocomm
        self.stack = stack
        self.lookup = {endpoint_uuid16(u): name for name, u in device_endpoint_uuids(service_uuid, custom).items()}
        chars = []
        for index, (number, name) in enumerate(sorted(self.lookup.items())):
            descriptors = [FakeDescriptor(USER_DESCRIPTION_UUID, 100 + index, name.encode())] if describe else []
            chars.append(FakeCharacteristic(characteristic_uuid(service_uuid, number), 10 + index, descriptors))
        self.services = [*(extra_services or []), FakeService(service_uuid, chars)]
        self.values: dict[int, bytes] = {}
        self.conn_handle = 0
        self.connected = False
        self.sessions_opened: list[int] = []
        self.descriptor_reads: list[int] = []
        self.writes: list[tuple[str, int, bool]] = []  # (endpoint, length, with response)
        self.reads: list[str] = []
        self.client: FakeClient | None = None

    def connect(self) -> None:
        self.conn_handle += 1
        self.connected = True
        self.protocomm.open_session(self.conn_handle)  # transport_simple_ble_connect → new_transport_session
        self.sessions_opened.append(self.conn_handle)

    def disconnect(self) -> None:
        if self.connected:
            self.connected = False
            self.protocomm.close_session(self.conn_handle)
            if self.client is not None:
                self.client.on_disconnect()

    def write(self, char: FakeCharacteristic, data: bytes) -> None:
        name = self.lookup[endpoint_uuid16(char.uuid)]  # uuid128_to_handler
        if not data:
            return  # NimBLE: "Empty packet", nothing handled
        try:
            self.values[char.handle] = self.protocomm.handle(name, self.conn_handle, data)
        except EndpointFailure:
            if self.stack == "bluedroid":
                self.disconnect()
            raise BleakGATTProtocolError(0x04) from None

    def read(self, char: FakeCharacteristic) -> bytes:
        if char.handle not in self.values:
            raise BleakGATTProtocolError(0x0E)
        return self.values[char.handle]


class FakeClient:
    """What ``BleakClient`` offers the transport, talking to a :class:`FakePeripheral`."""

    def __init__(self, peripheral: FakePeripheral, device: FakeDevice, on_disconnect: Callable[[], None]):
        self.peripheral = peripheral
        self.device = device
        self.on_disconnect = on_disconnect
        peripheral.client = self

    @property
    def is_connected(self) -> bool:
        return self.peripheral.connected

    @property
    def services(self) -> list[FakeService]:
        return self.peripheral.services

    def _characteristics(self) -> dict[int, FakeCharacteristic]:
        return {c.handle: c for s in self.peripheral.services for c in s.characteristics}

    async def connect(self) -> None:
        self.peripheral.connect()

    async def disconnect(self) -> None:
        self.peripheral.disconnect()

    async def read_gatt_descriptor(self, handle: int) -> bytearray:
        self.peripheral.descriptor_reads.append(handle)
        for char in self._characteristics().values():
            for descriptor in char.descriptors:
                if descriptor.handle == handle:
                    return bytearray(descriptor.value)
        raise BleakError(f"descriptor {handle} was not found")

    async def write_gatt_char(self, char: FakeCharacteristic, data: bytes, response: bool) -> None:
        assert self.peripheral.connected, "write on a dropped link"
        self.peripheral.writes.append((self.peripheral.lookup[endpoint_uuid16(char.uuid)], len(data), response))
        self.peripheral.write(char, bytes(data))

    async def read_gatt_char(self, char: FakeCharacteristic) -> bytearray:
        assert self.peripheral.connected, "read on a dropped link"
        self.peripheral.reads.append(self.peripheral.lookup[endpoint_uuid16(char.uuid)])
        return bytearray(self.peripheral.read(char))


def _node_protocomm(seen: dict[str, Any]) -> Protocomm:
    """A RainMaker node's provisioning endpoints (security 1) with recording handlers."""
    pc = Protocomm()
    pc.set_version("proto-ver", provisioning_version(sec_ver=1, app_info={"rmaker": {"ver": "1.0", "cap": ["claim"]}}))
    pc.set_security("prov-session", DeviceSecurity1(POP))

    def config(request: bytes) -> bytes:
        seen["config"] = WiFiConfigPayload.decode(request)
        return WiFiConfigPayload(msg=WiFiConfigMsgType.TypeRespSetConfig, resp_set_config=RespSetConfig(status=Status.Success)).encode()

    def user_assoc(request: bytes) -> bytes:
        seen["assoc"] = RMakerConfigPayload.decode(request)
        return RMakerConfigPayload(
            msg=RMakerConfigMsgType.TypeRespSetUserMapping,
            resp_set_user_mapping=RespSetUserMapping(Status=RMakerConfigStatus.Success, NodeId=NODE_ID),
        ).encode()

    pc.add_endpoint("prov-config", config)
    pc.add_endpoint("cloud_user_assoc", user_assoc)
    return pc


def _transport(peripheral: FakePeripheral, advertised: list[str] | None = None, **kwargs: Any) -> BleTransport:
    """A transport whose scan finds *peripheral* as NAME / ADDRESS, advertising *advertised* (default: its service)."""

    async def finder(name: str | None, address: str | None, timeout: float) -> tuple[FakeDevice, list[str]] | None:
        if name == NAME or (address or "").upper() == ADDRESS:
            return FakeDevice(ADDRESS, NAME), [peripheral.services[-1].uuid] if advertised is None else advertised
        return None

    return BleTransport(name=kwargs.pop("name", NAME), client_factory=lambda device, gone: FakeClient(peripheral, device, gone),
                        finder=finder, **kwargs)


@pytest.fixture
def seen() -> dict[str, Any]:
    return {}


@pytest.fixture
def peripheral(seen: dict[str, Any]) -> FakePeripheral:
    return FakePeripheral(_node_protocomm(seen), ["cloud_user_assoc"])


# ------------------------------------------------------------------------------------------ name mapping


def test_map_endpoints_reads_each_user_description() -> None:
    base = RAINMAKER_SERVICE_UUID
    service = FakeService(base, [
        FakeCharacteristic(characteristic_uuid(base, 0xFF51), 3, [FakeDescriptor(USER_DESCRIPTION_UUID, 5, b"prov-session")]),
        # a CCCD first, then the description carrying a trailing NUL: the name is still found
        FakeCharacteristic(characteristic_uuid(base, 0xFF54), 6, [FakeDescriptor("2902", 8, b"\x00\x00"),
                                                                  FakeDescriptor("2901", 9, b"cloud_user_assoc\x00")]),
        FakeCharacteristic(characteristic_uuid(base, 0xFF53), 10, []),  # no description: not mapped
    ])
    read: list[int] = []

    async def read_descriptor(descriptor: Any) -> bytes:
        read.append(descriptor.handle)
        return descriptor.value

    table = asyncio.run(map_endpoints(service, read_descriptor))
    assert {name: char.uuid for name, char in table.items()} == {
        "prov-session": "021aff51-0382-4aea-bff4-6b3f1c5adfb4",
        "cloud_user_assoc": "021aff54-0382-4aea-bff4-6b3f1c5adfb4",
    }
    assert read == [5, 9]  # only 0x2901 descriptors are read


def test_connect_maps_names_from_descriptors_of_the_advertised_service(peripheral: FakePeripheral) -> None:
    decoy = FakeService("0000180a-0000-1000-8000-00805f9b34fb", [])  # Device Information: not ours
    peripheral.services.insert(0, decoy)
    transport = _transport(peripheral)
    endpoints = transport.connect()
    assert endpoints == device_endpoint_uuids(RAINMAKER_SERVICE_UUID, ["cloud_user_assoc"])
    assert len(peripheral.descriptor_reads) == len(endpoints)
    assert transport.connect() == endpoints and transport.connections == 1  # connected: no second connection
    transport.close()


# ------------------------------------------------------------------------------------------ full exchange


def test_security1_provisioning_runs_through_ble_framing(peripheral: FakePeripheral, seen: dict[str, Any]) -> None:
    with _transport(peripheral) as transport:
        client = ProvisioningClient(transport, pop=POP)
        assert client.proto_version().sec_ver == 1
        assert client.open_session().established
        assert client.associate_user("user-1", "mapping-secret") == NODE_ID
        client.set_wifi_config("lab-net", "lab-passphrase")
    assert seen["assoc"].cmd_set_user_mapping.UserID == "user-1"
    assert seen["config"].cmd_set_config.ssid == b"lab-net"
    # every request: one write *with response* of the whole message, then a read of the same characteristic
    endpoints = ["proto-ver", "prov-session", "prov-session", "cloud_user_assoc", "prov-config"]
    assert [(name, response) for name, _, response in peripheral.writes] == [(name, True) for name in endpoints]
    assert peripheral.reads == endpoints
    assert peripheral.writes[0][1] == 3  # proto-ver gets "---" as esp_prov sends it
    assert peripheral.sessions_opened == [1] and not peripheral.connected  # one connection, closed by the context manager


def test_one_connection_is_one_session(peripheral: FakePeripheral) -> None:
    transport = _transport(peripheral)
    client = ProvisioningClient(transport, pop=POP)
    client.open_session()
    transport.forget_session()  # disconnect: the device closes the session
    with pytest.raises(TransportError, match=r"BLE PROV_1a2b3c prov-config: the request failed: ATT error 0x04") as info:
        client.set_wifi_config("lab-net", "lab-passphrase")  # reconnected (new session), old keys: refused
    assert info.value.att_error == 0x04 and info.value.status is None
    assert transport.connections == 2 and peripheral.sessions_opened == [1, 2]
    fresh = ProvisioningClient(transport, pop=POP)
    fresh.open_session()  # a new handshake on the new connection works
    fresh.set_wifi_config("lab-net", "lab-passphrase")
    assert transport.connections == 2
    transport.close()


@pytest.mark.parametrize("stack", ["nimble", "bluedroid"])
def test_wrong_pop_fails_the_request_the_way_each_stack_does(seen: dict[str, Any], stack: str) -> None:
    peripheral = FakePeripheral(_node_protocomm(seen), ["cloud_user_assoc"], stack=stack)
    transport = _transport(peripheral)
    with pytest.raises(BleTransportError, match="prov-session: the request failed: ATT error 0x04") as info:
        ProvisioningClient(transport, pop="wrong-pop").open_session()
    assert "Fix: ESP-IDF's protocomm_ble answers a failed request" in str(info.value)
    if stack == "bluedroid":
        assert "dropped the connection" in str(info.value) and not transport.connected
        assert ProvisioningClient(transport, pop=POP).open_session().established  # next request: new connection, new session
        assert transport.connections == 2
    else:
        assert transport.connected and transport.connections == 1
    transport.close()


def test_without_descriptors_the_standard_endpoints_fall_back_to_derived_uuids(seen: dict[str, Any]) -> None:
    peripheral = FakePeripheral(_node_protocomm(seen), ["cloud_user_assoc"], describe=False)
    transport = _transport(peripheral)
    assert transport.connect() == {}
    client = ProvisioningClient(transport, pop=POP)
    assert client.proto_version().sec_ver == 1 and client.open_session().established
    with pytest.raises(BleTransportError, match=r"cloud_user_assoc: the device has no characteristic for this endpoint"):
        client.associate_user("user-1", "mapping-secret")  # custom numbers depend on the firmware: no guessing
    transport.close()


def test_a_message_longer_than_one_attribute_is_refused_before_writing(peripheral: FakePeripheral) -> None:
    transport = _transport(peripheral)
    with pytest.raises(BleTransportError, match=f"{MAX_ATTRIBUTE_LEN + 1} bytes exceed the 512-byte ATT attribute limit"):
        transport.send("prov-config", bytes(MAX_ATTRIBUTE_LEN + 1))
    assert peripheral.writes == []
    assert transport.send("proto-ver", b"x" * MAX_ATTRIBUTE_LEN).startswith(b'{"prov"')  # long writes are bleak's job
    transport.close()


def test_a_device_without_the_provisioning_service_is_reported(seen: dict[str, Any]) -> None:
    peripheral = FakePeripheral(_node_protocomm(seen), [], service_uuid="12345678-1234-5678-1234-567812345678")
    transport = _transport(peripheral, advertised=[])  # nothing advertised: only the configured (RainMaker) UUID is tried
    with pytest.raises(BleTransportError, match=r"no provisioning service 021a9004-0382-4aea-bff4-6b3f1c5adfb4; "
                       r"the device offers \['12345678-1234-5678-1234-567812345678'\]\. Fix: pass the firmware's"):
        transport.connect()
    assert not peripheral.connected
    # told the firmware's UUID, the same device works (and so does one that advertises it)
    configured = _transport(peripheral, advertised=[], service_uuid="12345678-1234-5678-1234-567812345678")
    assert configured.send("proto-ver", b"---").startswith(b'{"prov"')
    configured.close()
    with _transport(peripheral) as advertising:
        assert advertising.send("proto-ver", b"---").startswith(b'{"prov"')


def test_a_device_that_does_not_advertise_is_a_failure_not_not_applicable(peripheral: FakePeripheral) -> None:
    transport = _transport(peripheral, name="PROV_000000", scan_timeout=0.1)
    with pytest.raises(BleTransportError, match=r"no device named 'PROV_000000' advertised within 0.1 s") as info:
        transport.connect()
    assert not isinstance(info.value, BleUnavailable)
    with pytest.raises(BleTransportError):
        require_ble(transport.connect)  # only BleUnavailable becomes a skip


# ------------------------------------------------------------------------------------------ no adapter


def test_unavailable_reasons_are_recognised() -> None:
    no_adapter = BleakBluetoothNotAvailableError("No Bluetooth adapters found.", BleakBluetoothNotAvailableReason.NO_BLUETOOTH)
    assert unavailable_reason(no_adapter) == "no Bluetooth adapter (bleak: No Bluetooth adapters found.)"
    no_bluez = BleakDBusError("org.freedesktop.DBus.Error.ServiceUnknown", [])
    assert unavailable_reason(no_bluez) == (
        "no Bluetooth adapter: BlueZ (bluetoothd) is not running (bleak: org.freedesktop.DBus.Error.ServiceUnknown)")
    assert unavailable_reason(BleakError("adapter 'hci1' not found")) == "no Bluetooth adapter (bleak: adapter 'hci1' not found)"
    assert "no D-Bus system bus" in (unavailable_reason(FileNotFoundError(2, "No such file or directory")) or "")
    missing = ModuleNotFoundError("No module named 'bleak'")
    assert unavailable_reason(missing) == "bleak is not installed (ModuleNotFoundError: No module named 'bleak')"
    # about the device, not the host: a real failure
    assert unavailable_reason(BleakError("Device with address 24:0A:C4:1A:2B:3C was not found.")) is None
    assert unavailable_reason(BleakDBusError("org.bluez.Error.Failed", ["le-connection-abort-by-local"])) is None
    assert unavailable_reason(TimeoutError()) is None


def _assert_no_adapter(exc: BleUnavailable) -> None:
    text = str(exc)
    assert "\n" not in text
    assert text.startswith("no Bluetooth adapter")
    assert text.endswith(
        "Fix: plug in a BLE adapter (BlueZ: bluetoothd running, reachable on the D-Bus system bus) or provision over SoftAP/console")
    assert isinstance(exc, TransportError) and exc.status is None


@pytest.mark.skipif(sys.platform != "linux" or os.path.exists("/run/dbus/system_bus_socket") or "DBUS_SYSTEM_BUS_ADDRESS" in os.environ,
                    reason="this host has a D-Bus system bus; the forced case below covers it")
def test_this_host_has_no_ble_so_a_real_transport_is_unavailable() -> None:
    transport = BleTransport(name="PROV_000000", scan_timeout=1.0)  # bleak installed: constructing works
    with pytest.raises(BleUnavailable) as info:
        transport.connect()
    _assert_no_adapter(info.value)
    assert "no D-Bus system bus (FileNotFoundError" in str(info.value)
    with pytest.raises(BleUnavailable):
        transport.send("proto-ver", b"---")
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_ble()
    assert skipped.value.msg.startswith("NOT_APPLICABLE: no Bluetooth adapter")
    assert skipped.value.msg == f"NOT_APPLICABLE: {info.value}"


@pytest.mark.skipif(sys.platform != "linux", reason="BlueZ over D-Bus is the Linux backend")
def test_without_a_system_bus_connecting_is_unavailable_and_require_ble_skips(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path / 'no-such-bus'}")
    transport = BleTransport(name="PROV_000000", scan_timeout=1.0)
    with pytest.raises(BleUnavailable) as info:
        transport.connect()
    _assert_no_adapter(info.value)
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_ble(transport.connect)
    assert skipped.value.msg.startswith("NOT_APPLICABLE: no Bluetooth adapter")
    assert "Fix: plug in a BLE adapter" in skipped.value.msg


def test_without_bleak_constructing_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bleak", None)  # import bleak → ImportError
    with pytest.raises(BleUnavailable) as info:
        BleTransport(name=NAME)
    assert str(info.value).startswith("bleak is not installed (")
    assert str(info.value).endswith("Fix: `.venv/bin/pip install bleak` (or `make install`), or provision over SoftAP/console")
    with pytest.raises(pytest.skip.Exception) as skipped:
        require_ble()
    assert skipped.value.msg.startswith("NOT_APPLICABLE: bleak is not installed")


def test_require_ble_passes_through_what_the_probe_returns() -> None:
    assert require_ble(lambda: 42) == 42

    def unavailable() -> None:
        raise BleUnavailable("no Bluetooth adapter (bleak: powered off)")

    with pytest.raises(pytest.skip.Exception) as skipped:
        require_ble(unavailable)
    assert skipped.value.msg == ("NOT_APPLICABLE: no Bluetooth adapter (bleak: powered off). Fix: plug in a BLE adapter "
                                 "(BlueZ: bluetoothd running, reachable on the D-Bus system bus) or provision over SoftAP/console")


def test_a_transport_needs_a_name_or_an_address() -> None:
    with pytest.raises(ValueError, match="advertised name"):
        BleTransport()

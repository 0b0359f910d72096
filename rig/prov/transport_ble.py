"""The BLE provisioning transport, client side: protocomm over GATT, through bleak (real boards only).

What a device running ``wifi_prov_mgr`` / ``network_prov_mgr`` with the BLE scheme offers (esp-idf
``components/protocomm/src/transports/protocomm_nimble.c`` and ``protocomm_ble.c``,
``components/wifi_provisioning/src/scheme_ble.c`` and ``manager.c``), and what Espressif's client
does with it (esp_prov ``transport/transport_ble.py`` and ``ble_cli.py``):

* **Discovery.** The device advertises one complete list of 128-bit service UUIDs holding the
  provisioning service, and its name (RainMaker: ``PROV_xxxxxx``, the ``"name"`` of the QR payload
  whose ``"transport"`` is ``"ble"``) in the scan response. :class:`BleTransport` scans for that name
  (or a Bluetooth address) for ``scan_timeout`` seconds.
* **Service.** ``scheme_ble.c`` defaults to :data:`WIFI_PROV_DEFAULT_SERVICE_UUID`; RainMaker's
  ``app_network`` and ESP-IDF's provisioning example set :data:`RAINMAKER_SERVICE_UUID` (esp_prov's
  default too). The client takes the service whose UUID the device advertised (when it advertised
  exactly one), else the configured one.
* **Endpoints.** Each protocomm endpoint is one characteristic (properties read + write, no
  write-without-response). Its UUID is the service UUID with bytes 12–13 of ESP-IDF's
  least-significant-byte-first ``uint8_t[16]`` replaced by the endpoint's 16-bit UUID
  (:func:`characteristic_uuid`): ``prov-ctrl`` 0xFF4F (newer IDF), ``prov-scan`` 0xFF50,
  ``prov-session`` 0xFF51, ``prov-config`` 0xFF52, ``proto-ver`` 0xFF53, and the application's
  endpoints (``wifi_prov_mgr_endpoint_create``: RainMaker's ``cloud_user_assoc``, ``rmaker_claim``,
  ``ch_resp`` …) 0xFF54, 0xFF55 … in creation order. Which number a custom endpoint gets thus depends
  on the firmware, so the client learns names from the characteristics' **User Description
  descriptor (0x2901)**, whose value is the endpoint name (no terminating NUL)
  (:func:`map_endpoints`); the derived UUIDs of the standard endpoints are only the fallback for a
  characteristic without one, as in esp_prov (whose fallback ANDs the 16-bit value into the service
  UUID's digits, right only for a ``0000ffff-…`` service; the rig replaces them, as the device does).
* **Request.** One protocomm request is a GATT *write with response* of the whole message to the
  endpoint's characteristic, then a *read* of the same characteristic: the device runs
  ``protocomm_req_handle`` when the write completes and keeps the answer as that characteristic's
  value. A message longer than ATT_MTU − 3 goes as a long write (prepare + execute) and an answer
  longer than ATT_MTU − 1 comes back by read-blob; BlueZ does both inside ``WriteValue`` /
  ``ReadValue``, so the rig hands bleak the whole message. ATT caps an attribute value at
  :data:`MAX_ATTRIBUTE_LEN` (512) bytes; Bluedroid's prepare buffer is smaller (257 bytes, 481 with
  security 2 enabled) — a longer long write is refused with an ATT error. A failed request is
  answered with an ATT error (NimBLE: Invalid PDU) or a dropped link (Bluedroid); never with data.
  NimBLE ignores an empty write, so the following read returns the *previous* answer.
* **Session.** The connection handle is the protocomm session id: connecting opens a session,
  disconnecting closes it. One BLE connection is one protocomm session — there is no cookie, so after
  a disconnect (:meth:`BleTransport.forget_session`, or the device dropping the link) the next
  request reconnects and starts a *new* session, and a :class:`~rig.prov.session.SessionClient` must
  redo its handshake.

Threads and event loops: bleak is asyncio-only and the rest of the rig is synchronous. A bleak
connection (and BlueZ's D-Bus connection behind it) belongs to the event loop it was made on, and a
protocomm session lives exactly as long as that connection — so ``asyncio.run`` per call, which makes
a new loop each time, cannot keep a session across two requests. Every :class:`BleTransport`
therefore runs its coroutines on **one private event loop in a daemon thread** of this module
(started on first use, shared by all transports so bleak's per-loop BlueZ manager is made once) and
waits for each result with a timeout. That also works when the caller itself runs inside an event
loop, where ``asyncio.run`` would refuse.

Without a usable adapter — bleak not installed, no D-Bus system bus, BlueZ not running, no (powered)
adapter — connecting raises :class:`BleUnavailable`, a :class:`TransportError` whose one-line
message names the fix; ``fixtures.ble.require_ble`` turns it into NOT_APPLICABLE.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import threading
import uuid as uuidlib
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, Protocol, TypeVar

from rig.protocomm.errors import ProtocommError
from rig.prov.transport_http import TransportError

RAINMAKER_SERVICE_UUID = "021a9004-0382-4aea-bff4-6b3f1c5adfb4"
"""RainMaker's ``app_network`` (``{0xb4, 0xdf, 0x5a, 0x1c, …, 0x1a, 0x02}``, LSB first); esp_prov's default."""
WIFI_PROV_DEFAULT_SERVICE_UUID = "1775244d-6b43-439b-877c-060f2d9bed07"
"""``scheme_ble.c`` ``new_config()`` when the application sets no service UUID."""
USER_DESCRIPTION_UUID = "00002901-0000-1000-8000-00805f9b34fb"
"""Characteristic User Description: each endpoint characteristic's name."""

STANDARD_ENDPOINT_UUIDS: Mapping[str, int] = {
    "prov-ctrl": 0xFF4F,
    "prov-scan": 0xFF50,
    "prov-session": 0xFF51,
    "prov-config": 0xFF52,
    "proto-ver": 0xFF53,
}
"""What ``wifi_prov_mgr_init`` / ``network_prov_mgr_init`` give the manager's own endpoints."""
FIRST_CUSTOM_ENDPOINT_UUID = 0xFF54
"""``endpoint_uuid_used`` starts at 0xFF53; each ``*_prov_mgr_endpoint_create`` takes the next."""
MAX_ATTRIBUTE_LEN = 512
"""The longest attribute value ATT allows (Core spec Vol 3 Part F 3.2.9): the longest request over BLE."""

DEFAULT_SCAN_TIMEOUT = 10.0
DEFAULT_CONNECT_TIMEOUT = 20.0
DEFAULT_REQUEST_TIMEOUT = 10.0

_BLUETOOTH_BASE = "-0000-1000-8000-00805f9b34fb"
_NO_BLE_FIX = "plug in a BLE adapter (BlueZ: bluetoothd running, reachable on the D-Bus system bus) or provision over SoftAP/console"
_DROPPED_FIX = (
    "ESP-IDF's protocomm_ble answers a failed request with an ATT error (NimBLE) or drops the link (Bluedroid): "
    "check the PoP, the session (handshake done on this connection) and the message bytes"
)

T = TypeVar("T")


# ------------------------------------------------------------------------------------------ errors


class BleTransportError(TransportError):
    """A BLE request (or the connection it needed) failed. ``status`` is always None (no HTTP);
    ``att_error`` is the ATT error code when the device answered with one."""

    def __init__(self, endpoint: str | None, problem: str, fix: str, *, target: str = "", att_error: int | None = None):
        self.endpoint = endpoint or ""
        self.status = None
        self.problem = problem
        self.fix = fix
        self.att_error = att_error
        where = " ".join(part for part in ("BLE", target, endpoint) if part)
        # TransportError's own message is HTTP's ("POST /…: HTTP …"); this one names the BLE target instead.
        ProtocommError.__init__(self, f"{where}: {problem}. Fix: {fix}")


class BleUnavailable(BleTransportError):
    """This host cannot do BLE at all (bleak missing, no D-Bus / BlueZ, no adapter): NOT_APPLICABLE, not a failure.

    The message is one line: what is missing, then ``Fix: …``.
    """

    def __init__(self, problem: str, fix: str = _NO_BLE_FIX):
        problem = " ".join(problem.split())  # one line, whatever bleak's text was
        BleTransportError.__init__(self, None, problem, fix)
        ProtocommError.__init__(self, f"{problem}. Fix: {fix}")


def unavailable_reason(exc: BaseException) -> str | None:
    """What *exc* (raised while scanning or connecting) says about the host's BLE, or None when it is about something else."""
    name = type(exc).__name__
    if isinstance(exc, ImportError):
        return f"bleak is not installed ({name}: {exc})"
    if name == "BleakBluetoothNotAvailableError":  # bleak ≥ 2: no adapter / no central role / powered off / denied
        return f"no Bluetooth adapter (bleak: {exc.args[0] if exc.args else exc})"
    if name == "BleakDBusError":
        dbus_error = str(getattr(exc, "dbus_error", ""))
        if dbus_error in ("org.freedesktop.DBus.Error.ServiceUnknown", "org.freedesktop.DBus.Error.NameHasNoOwner"):
            return f"no Bluetooth adapter: BlueZ (bluetoothd) is not running (bleak: {dbus_error})"
        if dbus_error == "org.bluez.Error.NotReady":
            return f"no Bluetooth adapter: the adapter is not ready/powered (bleak: {dbus_error})"
        return None
    if name == "BleakError":
        text = str(exc)
        if "adapter" in text.lower() and ("not found" in text.lower() or "no bluetooth" in text.lower()):
            return f"no Bluetooth adapter (bleak: {text})"  # bleak < 2, or a named adapter (hci1) that does not exist
        return None
    if isinstance(exc, OSError) and exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.EACCES, errno.EPERM):
        return f"no Bluetooth adapter: bleak found no D-Bus system bus ({name}: {exc})"
    return None


def _failure(exc: BaseException, problem: str, fix: str, target: str = "") -> BleTransportError:
    """What *exc* (raised while scanning or connecting) means: :class:`BleUnavailable` when it is about the
    host's BLE, else a :class:`BleTransportError` saying *problem* (with *exc*) and *fix*."""
    reason = unavailable_reason(exc)
    if reason:
        return BleUnavailable(reason)
    return BleTransportError(None, f"{problem} ({type(exc).__name__}: {exc})", fix, target=target)


def require_bleak() -> None:
    """:class:`BleUnavailable` unless bleak imports."""
    try:
        import bleak  # noqa: F401
    except ImportError as exc:
        fix = "`.venv/bin/pip install bleak` (or `make install`), or provision over SoftAP/console"
        raise BleUnavailable(unavailable_reason(exc) or str(exc), fix) from exc


# ------------------------------------------------------------------------------------------ UUIDs


def full_uuid(value: str) -> str:
    """A UUID string as bleak prints it: lowercase, 128-bit (16-/32-bit SIG shorthands expanded)."""
    text = value.strip().lower()
    if len(text) <= 8:
        return f"{int(text, 16):08x}{_BLUETOOTH_BASE}"
    return str(uuidlib.UUID(text))


def characteristic_uuid(service_uuid: str, endpoint_uuid16: int) -> str:
    """The characteristic UUID ESP-IDF gives an endpoint: *service_uuid* with bytes 12–13 of its LSB-first array replaced.

    protocomm_nimble.c ``ble_gatt_add_characteristics`` copies the service's ``uint8_t[16]`` (least
    significant byte first) and memcpy's the ``uint16_t`` endpoint UUID over ``value[12]``, little-endian
    on every ESP chip. In the usual string form that is the 4th–8th hex digits.
    """
    if not 0 <= endpoint_uuid16 <= 0xFFFF:
        raise ValueError(f"endpoint UUID {endpoint_uuid16:#x} is not 16-bit")
    lsb_first = bytearray(uuidlib.UUID(full_uuid(service_uuid)).bytes[::-1])
    lsb_first[12:14] = endpoint_uuid16.to_bytes(2, "little")
    return str(uuidlib.UUID(bytes=bytes(lsb_first[::-1])))


def endpoint_uuid16(char_uuid: str) -> int:
    """The 16-bit endpoint UUID inside a characteristic UUID (protocomm_nimble.c ``uuid128_to_handler``)."""
    lsb_first = uuidlib.UUID(full_uuid(char_uuid)).bytes[::-1]
    return int.from_bytes(lsb_first[12:14], "little")


def device_endpoint_uuids(service_uuid: str, custom: Iterable[str] = ()) -> dict[str, str]:
    """Endpoint name → characteristic UUID for a device that created the *custom* endpoints in this order."""
    numbers = dict(STANDARD_ENDPOINT_UUIDS)
    for index, name in enumerate(custom):
        numbers[name] = FIRST_CUSTOM_ENDPOINT_UUID + index
    return {name: characteristic_uuid(service_uuid, number) for name, number in numbers.items()}


# ------------------------------------------------------------------------------------------ GATT


class GattDescriptor(Protocol):
    uuid: str
    handle: int


class GattCharacteristic(Protocol):
    uuid: str

    @property
    def descriptors(self) -> Iterable[GattDescriptor]: ...


class GattService(Protocol):
    uuid: str

    @property
    def characteristics(self) -> Iterable[GattCharacteristic]: ...


class GattClient(Protocol):
    """The part of :class:`bleak.BleakClient` the transport uses (what a fake must offer)."""

    @property
    def is_connected(self) -> bool: ...

    @property
    def services(self) -> Iterable[GattService]: ...

    async def connect(self) -> Any: ...

    async def disconnect(self) -> Any: ...

    async def read_gatt_descriptor(self, handle: int) -> bytes | bytearray: ...

    async def write_gatt_char(self, char: Any, data: bytes, response: bool) -> Any: ...

    async def read_gatt_char(self, char: Any) -> bytes | bytearray: ...


ClientFactory = Callable[[Any, Callable[[], None]], GattClient]
"""``(device, on_disconnect) -> client``: bleak's ``BleakClient(device, disconnected_callback=…)`` by default."""
DeviceFinder = Callable[[str | None, str | None, float], Awaitable["tuple[Any, list[str]] | None"]]
"""``(name, address, timeout) -> (device, advertised service UUIDs)`` or None when nothing matched in time."""


def _descriptor_name(value: bytes | bytearray) -> str:
    return bytes(value).split(b"\x00", 1)[0].decode("utf-8", "replace").strip()


async def map_endpoints(
    service: GattService, read_descriptor: Callable[[GattDescriptor], Awaitable[bytes | bytearray]]
) -> dict[str, GattCharacteristic]:
    """Endpoint name → characteristic, from each characteristic's User Description (0x2901) descriptor.

    A characteristic without one is left out (see :meth:`BleTransport.characteristic` for the fallback);
    when two carry the same name the first wins, as the device resolves requests by UUID anyway.
    """
    table: dict[str, GattCharacteristic] = {}
    for char in service.characteristics:
        for descriptor in char.descriptors:
            if full_uuid(descriptor.uuid) != USER_DESCRIPTION_UUID:
                continue
            name = _descriptor_name(await read_descriptor(descriptor))
            if name:
                table.setdefault(name, char)
            break
    return table


# ------------------------------------------------------------------------------------------ the loop thread


class _LoopThread:
    """One asyncio loop in a daemon thread; :meth:`run` executes a coroutine there and waits for it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None

    def _ensure(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or self._loop.is_closed():
                loop = asyncio.new_event_loop()
                ready = threading.Event()

                def main() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                threading.Thread(target=main, name="rig-ble-loop", daemon=True).start()
                ready.wait()
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run *coro* on the loop; ``TimeoutError`` (the coroutine cancelled) when it takes longer than *timeout*."""
        loop = self._ensure()
        if threading.current_thread().name == "rig-ble-loop":
            coro.close()
            raise RuntimeError("BleTransport called from its own event loop thread; call it from synchronous code")
        future = asyncio.run_coroutine_threadsafe(asyncio.wait_for(coro, timeout), loop)
        try:
            return future.result(timeout + 5.0)  # wait_for cancels on the loop; this only guards a wedged loop
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout} s") from None


_LOOP = _LoopThread()


# ------------------------------------------------------------------------------------------ the transport


async def _bleak_find(name: str | None, address: str | None, timeout: float, adapter: str | None) -> tuple[Any, list[str]] | None:
    from bleak import BleakScanner

    advertised: list[str] = []
    wanted = address.lower() if address else None

    def match(device: Any, adv: Any) -> bool:
        if wanted is not None:
            hit = str(device.address).lower() == wanted
        else:
            hit = name is not None and name in (adv.local_name, device.name)
        if hit:
            advertised[:] = list(adv.service_uuids or [])
        return hit

    kwargs: dict[str, Any] = {"bluez": {"adapter": adapter}} if adapter else {}
    device = await BleakScanner.find_device_by_filter(match, timeout=timeout, **kwargs)
    return None if device is None else (device, advertised)


class BleTransport:
    """A client of one device's protocomm GATT service, found by advertised *name* (``PROV_xxxxxx``) or *address*.

    ``send(endpoint, data) -> bytes`` like :class:`~rig.prov.transport_http.SoftApHttpTransport`; the
    first request (or :meth:`connect`) scans, connects and maps endpoint names to characteristics.
    *client_factory* and *finder* replace bleak (tests inject a fake GATT peer); *adapter* picks a
    BlueZ adapter (``hci1``).
    """

    def __init__(
        self,
        name: str | None = None,
        address: str | None = None,
        *,
        service_uuid: str = RAINMAKER_SERVICE_UUID,
        adapter: str | None = None,
        scan_timeout: float = DEFAULT_SCAN_TIMEOUT,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
        fallback_uuids: Mapping[str, int] = STANDARD_ENDPOINT_UUIDS,
        client_factory: ClientFactory | None = None,
        finder: DeviceFinder | None = None,
    ):
        if not name and not address:
            raise ValueError("BleTransport needs the device's advertised name (QR \"name\", e.g. PROV_1a2b3c) or its address")
        if client_factory is None or finder is None:
            require_bleak()
        self.name = name
        self.address = address
        self.service_uuid = full_uuid(service_uuid)
        self.adapter = adapter
        self.scan_timeout = scan_timeout
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.fallback_uuids = dict(fallback_uuids)
        self._client_factory = client_factory or self._bleak_client
        self._finder = finder or (lambda n, a, t: _bleak_find(n, a, t, adapter))
        self._lock = threading.RLock()
        self._client: GattClient | None = None
        self._link_up = False
        self.device: Any = None
        self.service: GattService | None = None
        self.endpoints: dict[str, GattCharacteristic] = {}
        """Endpoint name → characteristic, from the 0x2901 descriptors of the current connection."""
        self.connections = 0
        """Connections made so far — each one a new protocomm session on the device."""

    @property
    def target(self) -> str:
        return self.name or self.address or "?"

    @property
    def connected(self) -> bool:
        return self._client is not None and self._link_up

    def _bleak_client(self, device: Any, on_disconnect: Callable[[], None]) -> GattClient:
        from bleak import BleakClient

        kwargs: dict[str, Any] = {"bluez": {"adapter": self.adapter}} if self.adapter else {}
        return BleakClient(device, disconnected_callback=lambda _client: on_disconnect(), timeout=self.connect_timeout, **kwargs)

    def _on_disconnect(self) -> None:
        self._link_up = False

    # -------------------------------------------------------------------------------- connection

    def connect(self) -> dict[str, str]:
        """Scan, connect and map the endpoints (no-op while connected); endpoint name → characteristic UUID.

        :class:`BleUnavailable` when the host has no usable BLE; :class:`BleTransportError` when the
        device is not found, refuses the connection or offers no provisioning service.
        """
        with self._lock:
            self._ensure_connected()
            return {name: full_uuid(char.uuid) for name, char in self.endpoints.items()}

    def _ensure_connected(self) -> None:
        if not self.connected:
            self._drop()
            self._connect()

    def _connect(self) -> None:
        try:
            found = _LOOP.run(self._finder(self.name, self.address, self.scan_timeout), self.scan_timeout + 5.0)
        except TimeoutError as exc:
            raise BleTransportError(None, f"scanning did not finish within {self.scan_timeout} s", "check the adapter (btmon)",
                                    target=self.target) from exc
        except Exception as exc:
            raise _failure(exc, "scanning failed", "check the adapter (bluetoothctl show)", self.target) from exc
        if found is None:
            what = f"named {self.name!r}" if self.name and not self.address else f"with address {self.address}"
            raise BleTransportError(
                None, f"no device {what} advertised within {self.scan_timeout} s",
                "is the board in BLE provisioning mode (its console prints the QR with \"transport\":\"ble\") and in range?",
                target=self.target,
            )
        device, advertised = found
        client = self._client_factory(device, self._on_disconnect)
        try:
            _LOOP.run(self._open(client, advertised), self.connect_timeout)
        except BleTransportError:
            raise
        except TimeoutError as exc:
            raise BleTransportError(None, f"connecting took longer than {self.connect_timeout} s", "move the board closer or reset it",
                                    target=self.target) from exc
        except Exception as exc:
            raise _failure(exc, "could not connect", "a device takes one connection at a time: is a phone still connected?",
                           self.target) from exc
        self.device = device

    async def _open(self, client: GattClient, advertised: list[str]) -> None:
        await client.connect()
        self._client = client
        self._link_up = True
        self.connections += 1
        candidates = [full_uuid(advertised[0])] if len(advertised) == 1 else []  # esp_prov trusts a single advertised UUID
        candidates.append(self.service_uuid)
        services = {full_uuid(service.uuid): service for service in client.services}
        service = next((services[uuid] for uuid in candidates if uuid in services), None)
        if service is None:
            await self._close(client)
            raise BleTransportError(
                None, f"no provisioning service {' or '.join(dict.fromkeys(candidates))}; the device offers {sorted(services)}",
                "pass the firmware's service_uuid (wifi_prov_scheme_ble_set_service_uuid)", target=self.target,
            )
        self.service = service
        self.endpoints = await map_endpoints(service, lambda descriptor: client.read_gatt_descriptor(descriptor.handle))

    async def _close(self, client: GattClient) -> None:
        try:
            await client.disconnect()
        finally:
            self._link_up = False

    def _drop(self) -> None:
        client, self._client = self._client, None
        self._link_up = False
        self.service = None
        self.endpoints = {}
        if client is not None:
            try:
                _LOOP.run(self._close(client), self.connect_timeout)
            except Exception:  # the link is gone either way
                pass

    def forget_session(self) -> None:
        """Disconnect: the device closes the protocomm session; the next request connects again (a new session)."""
        with self._lock:
            self._drop()

    def close(self) -> None:
        self.forget_session()

    def __enter__(self) -> BleTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------------- requests

    def characteristic(self, endpoint: str) -> GattCharacteristic:
        """The characteristic for *endpoint*: by its 0x2901 name, else (esp_prov's fallback) by the derived UUID."""
        char = self.endpoints.get(endpoint)
        if char is None:
            char = next((c for name, c in self.endpoints.items() if name.lower() == endpoint.lower()), None)
        if char is None and endpoint in self.fallback_uuids and self.service is not None:
            wanted = characteristic_uuid(self.service.uuid, self.fallback_uuids[endpoint])
            char = next((c for c in self.service.characteristics if full_uuid(c.uuid) == wanted), None)
        if char is None:
            raise BleTransportError(
                endpoint, f"the device has no characteristic for this endpoint; its endpoints: {sorted(self.endpoints)}",
                "compare with proto-ver: custom endpoints exist only when the firmware creates them", target=self.target,
            )
        return char

    def send(self, endpoint: str, data: bytes) -> bytes:
        """Write *data* to *endpoint*'s characteristic (with response), read its answer back; :class:`BleTransportError` on failure."""
        data = bytes(data)
        if len(data) > MAX_ATTRIBUTE_LEN:
            raise BleTransportError(endpoint, f"{len(data)} bytes exceed the {MAX_ATTRIBUTE_LEN}-byte ATT attribute limit",
                                    "a protocomm message over BLE must fit one attribute value", target=self.target)
        with self._lock:
            self._ensure_connected()
            char = self.characteristic(endpoint)
            client = self._client
            assert client is not None
            try:
                return _LOOP.run(self._request(client, char, data), self.timeout)
            except TimeoutError as exc:
                raise BleTransportError(endpoint, f"no answer within {self.timeout} s", "is the board still in provisioning mode?",
                                        target=self.target) from exc
            except Exception as exc:
                code = _att_error(exc)
                shown = f"ATT error {code:#04x} ({exc})" if code is not None else f"{type(exc).__name__}: {exc}"
                if not client.is_connected:
                    self._link_up = False
                    shown += "; the device dropped the connection (its session is gone)"
                raise BleTransportError(endpoint, f"the request failed: {shown}", _DROPPED_FIX, target=self.target, att_error=code) from exc

    @staticmethod
    async def _request(client: GattClient, char: GattCharacteristic, data: bytes) -> bytes:
        await client.write_gatt_char(char, data, response=True)
        return bytes(await client.read_gatt_char(char))


def _att_error(exc: BaseException) -> int | None:
    """The ATT error code of bleak's ``BleakGATTProtocolError`` (bleak ≥ 3), else None."""
    if type(exc).__name__ == "BleakGATTProtocolError" and exc.args and isinstance(exc.args[0], int):
        return int(exc.args[0])
    return None


def probe_ble(adapter: str | None = None, timeout: float = 5.0) -> None:
    """:class:`BleUnavailable` unless bleak can start a scan on this host (on *adapter*, default the first powered one)."""
    require_bleak()

    async def start_and_stop() -> None:
        from bleak import BleakScanner

        kwargs: dict[str, Any] = {"bluez": {"adapter": adapter}} if adapter else {}
        async with BleakScanner(**kwargs):
            pass

    try:
        _LOOP.run(start_and_stop(), timeout)
    except Exception as exc:
        raise _failure(exc, "could not start a BLE scan", "check the adapter (bluetoothctl show)") from exc

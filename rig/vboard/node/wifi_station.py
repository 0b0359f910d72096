"""The virtual board's Wi-Fi station, joining the access points of the lab's radio file.

The air is ``<state>/radio.json`` (``rig.boards.virtual_ports.write_radio_file``, from the
lab's ``wifi:`` list); it is read again on every scan and join. A join succeeds when an
access point with the SSID exists and, unless it is open, the passphrase matches; the
station's IP address is then the board's own ``127.0.1.N``. States and failure reasons
are the provisioning protocol's (``wifi_constants.proto``, rainmaker-protocol.md §4.7):
``Connected 0, Connecting 1, Disconnected 2, ConnectionFailed 3`` and ``AuthError 0,
NetworkNotFound 1``; auth modes ``Open 0 … WPA2_WPA3_PSK 7``.

:meth:`WifiStation.apply` is ``esp_wifi_connect``: it returns at once and the join runs
on a station task that takes :data:`ASSOCIATION_S` (scan, 4-way handshake, DHCP), then
calls the listener with the outcome. The station itself never retries; RainMaker's
``app_wifi`` event handler reconnects after a disconnect (``Disconnected. Connecting to
the AP again...``), which :class:`rig.vboard.node.node.RainMakerNode` does.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from rig.boards.virtual_ports import RadioNetwork, read_radio_file
from rig.protocomm.messages import WifiAuthMode, WifiConnectFailedReason, WifiStationState  # wifi_constants.proto: declared once, there
from rig.vboard.node.runtime import NodeRuntime

ASSOCIATION_S = 0.3
"""Scan + association + 4-way handshake + DHCP on a quiet channel."""
SSID_MAX, PASSPHRASE_MAX = 32, 64
"""``wifi_sta_config_t``: ``uint8_t ssid[32]``, ``uint8_t password[64]``."""
NETMASK = "255.255.255.0"


AUTH_MODES = {
    "open": WifiAuthMode.Open,
    "wpa2_psk": WifiAuthMode.WPA2_PSK,
    "wpa3_psk": WifiAuthMode.WPA3_PSK,
    "wpa2_wpa3_psk": WifiAuthMode.WPA2_WPA3_PSK,
}


@dataclass(frozen=True)
class ScanResult:
    """``WiFiScanResult``: one access point a scan found."""

    ssid: bytes
    channel: int
    rssi: int
    bssid: bytes
    auth: WifiAuthMode


@dataclass(frozen=True)
class ConnectedInfo:
    """``WifiConnectedState``."""

    ip4_addr: str
    auth_mode: WifiAuthMode
    ssid: bytes
    bssid: bytes
    channel: int


@dataclass(frozen=True)
class StationStatus:
    """``RespGetStatus``: the state, and the failure reason or the connection."""

    state: WifiStationState
    fail_reason: WifiConnectFailedReason | None = None
    connected: ConnectedInfo | None = None


@dataclass(frozen=True)
class StationConfig:
    """``wifi_sta_config_t``'s SSID and password (as bytes, the way the chip holds them)."""

    ssid: bytes
    passphrase: bytes = field(repr=False, default=b"")
    bssid: bytes | None = None
    channel: int = 0

    def __post_init__(self) -> None:
        if not 0 < len(self.ssid) <= SSID_MAX:
            raise ValueError(f"an SSID is 1 to {SSID_MAX} bytes, got {len(self.ssid)}")
        if len(self.passphrase) > PASSPHRASE_MAX:
            raise ValueError(f"a passphrase is at most {PASSPHRASE_MAX} bytes, got {len(self.passphrase)}")


def _bssid_bytes(text: str) -> bytes:
    return bytes(int(part, 16) for part in text.split(":"))


JoinListener = Callable[[StationStatus], None]


class WifiStation:
    """``esp_wifi`` in station mode on the virtual air. Thread-safe."""

    def __init__(self, runtime: NodeRuntime, radio_path: Path, address: str):
        self.runtime = runtime
        self.radio_path = Path(radio_path)
        self.address = address
        self._lock = threading.Lock()
        self._config: StationConfig | None = None
        self._status = StationStatus(WifiStationState.Disconnected)
        self._attempt = 0
        self._listeners: list[JoinListener] = []

    # ------------------------------------------------------------------ the air

    def _air(self) -> list[RadioNetwork]:
        return read_radio_file(self.radio_path)

    def scan(self) -> list[ScanResult]:
        """``esp_wifi_scan_start`` (blocking): every access point on the air, strongest first."""
        found = [
            ScanResult(n.ssid.encode(), n.channel, n.rssi, _bssid_bytes(n.bssid), AUTH_MODES.get(n.auth, WifiAuthMode.WPA2_PSK))
            for n in self._air()
        ]
        return sorted(found, key=lambda r: r.rssi, reverse=True)

    # ------------------------------------------------------------------ config and join

    @property
    def config(self) -> StationConfig | None:
        with self._lock:
            return self._config

    def set_config(self, ssid: bytes | str, passphrase: bytes | str = b"", bssid: bytes | None = None, channel: int = 0) -> StationConfig:
        """``esp_wifi_set_config(WIFI_IF_STA)``; a join in progress is abandoned."""
        config = StationConfig(
            ssid.encode() if isinstance(ssid, str) else bytes(ssid),
            passphrase.encode() if isinstance(passphrase, str) else bytes(passphrase),
            bssid,
            channel,
        )
        with self._lock:
            self._config = config
            self._attempt += 1
            self._status = StationStatus(WifiStationState.Disconnected)
        return config

    def add_listener(self, listener: JoinListener) -> None:
        """Call *listener* with the outcome of every join (on the station task)."""
        with self._lock:
            self._listeners.append(listener)

    def apply(self) -> bool:
        """``esp_wifi_connect``: start joining with the current config; False without one."""
        with self._lock:
            config = self._config
            if config is None:
                return False
            self._attempt += 1
            attempt = self._attempt
            self._status = StationStatus(WifiStationState.Connecting)
        self.runtime.spawn("wifi_join", lambda: self._join(config, attempt))
        return True

    def disconnect(self) -> None:
        """``esp_wifi_disconnect`` / ``esp_wifi_stop``: drop the link, forget any join in progress."""
        with self._lock:
            self._attempt += 1
            self._status = StationStatus(WifiStationState.Disconnected)

    def status(self) -> StationStatus:
        with self._lock:
            return self._status

    @property
    def connected(self) -> bool:
        return self.status().state is WifiStationState.Connected

    def _join(self, config: StationConfig, attempt: int) -> None:
        if not self.runtime.sleep(ASSOCIATION_S, "wifi_association"):
            return
        outcome = self._outcome(config)
        with self._lock:
            if attempt != self._attempt:
                return  # reconfigured or disconnected meanwhile
            self._status = outcome
            listeners = list(self._listeners)
        for listener in listeners:
            listener(outcome)

    def _outcome(self, config: StationConfig) -> StationStatus:
        matches = [n for n in self._air() if n.ssid.encode() == config.ssid
                   and (config.bssid is None or _bssid_bytes(n.bssid) == config.bssid)]  # fmt: skip
        if not matches:
            return StationStatus(WifiStationState.ConnectionFailed, WifiConnectFailedReason.NetworkNotFound)
        ap = max(matches, key=lambda n: n.rssi)
        auth = AUTH_MODES.get(ap.auth, WifiAuthMode.WPA2_PSK)
        if auth is not WifiAuthMode.Open and ap.passphrase.encode() != config.passphrase:
            return StationStatus(WifiStationState.ConnectionFailed, WifiConnectFailedReason.AuthError)
        info = ConnectedInfo(self.address, auth, config.ssid, _bssid_bytes(ap.bssid), ap.channel)
        return StationStatus(WifiStationState.Connected, connected=info)

    @property
    def gateway(self) -> str:
        """The DHCP server's address the station reports (``x.y.z.1`` of its own /24)."""
        return self.address.rsplit(".", 1)[0] + ".1"

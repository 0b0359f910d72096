"""The node's provisioning service: RainMaker's ``app_network`` over a SoftAP transport.

:meth:`ProvisioningService.start` prints what an unprovisioned RainMaker node prints
(idf-console.md §6.2; esp-rainmaker ``examples/common/app_network/app_network.c``
``app_network_start`` / ``app_network_print_qr``, ``app_wifi_internal.c``;
idf-extra-components ``network_provisioning/src/manager.c``, ``qrcode/esp_qrcode_main.c``):
``Starting provisioning``, the manager's ``Provisioning started with service name : …``
(trailing space), ``Provisioning started``, the QR code text and URL, and the auto-stop
timer; then it starts the transport. The service name is ``PROV_`` + the last 3 bytes of
the ``fctry`` random, the PoP its first 4 (``POP_TYPE_RANDOM``), the QR payload the JSON
``app_network_print_qr`` builds for the image's ``prov_security`` (security 2 adds
``"username":"wifiprov"``; security 0 has no PoP) with ``"transport":"softap"``.

The QR code itself (drawn with Unicode half blocks by ``esp_qrcode_generate``) is not
drawn: the rig has no QR encoder, and nothing reads the drawing back.

The transport — protocomm over HTTP on the board's address, port 80, endpoints
``proto-ver``, ``prov-session``, ``prov-config``, ``prov-scan``, ``prov-ctrl`` and
``cloud_user_assoc`` — is started by :meth:`ProvisioningService.start_transport` (a seam
the protocomm server fills). An image whose behaviour manifest sets ``extra.prov_console``
also serves that same protocomm instance (endpoints, security session) on the serial
console, as ESP-IDF's ``protocomm_console`` does (:mod:`rig.vboard.node.prov_console`; off
by default, as RainMaker's ``app_network`` offers only SoftAP and BLE). What it calls on the node: :attr:`node` ``.wifi`` (scan,
set_config, apply, status), :meth:`credentials_received` (``NETWORK_PROV_WIFI_CRED_RECV``:
logs and applies), ``node.start_user_mapping(user_id, secret_key)`` for
``cloud_user_assoc``, and :meth:`session_established` / :meth:`pop_mismatch` for the
session events. When the station connects the node calls ``on_provisioned()``, which
saves the credentials; this service then stops :data:`AUTOSTOP_AFTER_CONNECT_S` after the
join, or :data:`STOP_DELAY_S` after a client read the Connected status (``wifi_prov_mgr_done``).
"""

from __future__ import annotations

import json
import threading
from typing import TYPE_CHECKING

from rig.protocomm.security import DEFAULT_SEC2_USERNAME
from rig.vboard.bootloader import LogMessage
from rig.vboard.node.messages import TAG_NETWORK, NodeMsg

if TYPE_CHECKING:
    from rig.vboard.node.node import RainMakerNode
    from rig.vboard.node.prov_console import ProtocommConsole
    from rig.vboard.node.prov_transport import ProvisioningTransport

TRANSPORT = "softap"
PROV_QR_VERSION = "v1"
QR_ECC_LEVEL = 0
QR_MAX_VERSION = 5
"""``esp_qrcode_config_t``: ECC low, ``max_qrcode_version = 5`` in ``qrcode_display``."""
AUTO_STOP_MINUTES = 30
"""``CONFIG_APP_NETWORK_PROV_TIMEOUT_PERIOD``."""
MAX_POP_MISMATCH = 5
"""``CONFIG_APP_NETWORK_PROV_MAX_POP_MISMATCH``: wrong-PoP sessions before provisioning stops."""
STOP_DELAY_S = 1.0
"""``wifi_prov_mgr_done()``'s cleanup delay: once a client has read the Connected status
(esp-idf v5.4 ``wifi_provisioning/src/handlers.c``) the manager stops 1 s later."""
AUTOSTOP_AFTER_CONNECT_S = 30.0
"""The manager's auto-stop after the station got its IP when no client reads the status
(``manager.c`` "Starting 30s timer for stop_prov_timer_cb()",
``CONFIG_NETWORK_PROV_AUTOSTOP_TIMEOUT``): a phone polling every 5 s still reads Connected."""
HTTP_PORT = 80
"""``PROTOCOMM_HTTPD_DEFAULT_CONFIG`` port."""

MISMATCH = LogMessage("E", TAG_NETWORK, "Received incorrect PoP or invalid security params! event: {event}")
MAX_MISMATCH = LogMessage(
    "W", TAG_NETWORK,
    "Max PoP attempts reached! Provisioning disabled for security reasons. Please reboot device to restart provisioning",
)
SESSION_OK = LogMessage("I", TAG_NETWORK, "Secured session established!")


def qr_payload(service_name: str, pop: str | None, security: int, transport: str = TRANSPORT) -> str:
    """``app_network_print_qr``'s JSON, exact key order, no spaces."""
    payload: dict[str, str] = {"ver": PROV_QR_VERSION, "name": service_name}
    if security == 2:
        payload["username"] = DEFAULT_SEC2_USERNAME  # the SRP6a user of RainMaker's security 2 (§4.6)
    if pop is not None and security != 0:
        payload["pop"] = pop
    payload["transport"] = transport
    return json.dumps(payload, separators=(",", ":"))


class ProvisioningService:
    """The provisioning window of one boot: started when the node has no Wi-Fi
    credentials, stopped when it has joined (or after :data:`AUTO_STOP_MINUTES`)."""

    def __init__(self, node: RainMakerNode):
        self.node = node
        self.security = 0 if "sec0_provisioning" in node.flaws else node.behaviour.prov_security
        """Protocomm security scheme 0/1/2: the image's ``prov_security``, 0 with the ``sec0_provisioning`` flaw."""
        self._lock = threading.Lock()
        self._active = False
        self._mismatches = 0
        self._transport: ProvisioningTransport | None = None
        self._console: ProtocommConsole | None = None

    @property
    def active(self) -> bool:
        with self._lock:
            return self._active

    @property
    def service_name(self) -> str:
        return self.node.service_name

    @property
    def pop(self) -> str | None:
        """The proof of possession, None under security 0."""
        return None if self.security == 0 else self.node.pop

    def qr_payload(self) -> str:
        return qr_payload(self.service_name, self.pop, self.security)

    # ------------------------------------------------------------------ start / stop

    def start(self) -> bool:
        """``app_network_start`` for an unprovisioned node; False when there is no PoP to offer."""
        runtime = self.node.runtime
        if self.security != 0 and self.node.pop is None:
            runtime.log(NodeMsg.POP_FAILED)
            return False
        runtime.log(NodeMsg.STARTING_PROVISIONING)
        with self._lock:
            self._active = True
            self._mismatches = 0
        self.start_transport()  # the manager starts protocomm before it logs "started" and the app prints the QR
        runtime.log(NodeMsg.PROV_MGR_STARTED, name=self.service_name)
        runtime.log(NodeMsg.PROVISIONING_STARTED)
        payload = self.qr_payload()
        runtime.log(NodeMsg.SCAN_QR)
        runtime.log(NodeMsg.QR_ENCODING, ecc=QR_ECC_LEVEL, version=QR_MAX_VERSION)
        runtime.log(NodeMsg.QR_TEXT, payload=payload)
        runtime.log(NodeMsg.QR_URL, base=NodeMsg.QR_BASE_URL, payload=payload)
        runtime.log(NodeMsg.APP_PROV_QR, payload=payload)
        runtime.log(NodeMsg.PROV_AUTO_STOP, minutes=AUTO_STOP_MINUTES)
        runtime.after(AUTO_STOP_MINUTES * 60, "app_wifi_prov_stop_tm", self._timed_out)
        return True

    def _timed_out(self) -> None:
        if self.active:
            self.node.runtime.log(NodeMsg.PROV_TIMED_OUT)
            self.stop()

    def stop(self) -> None:
        """``network_prov_mgr_stop_provisioning``."""
        with self._lock:
            if not self._active:
                return
            self._active = False
        self.stop_transport()
        self.node.runtime.log(NodeMsg.PROV_MGR_STOPPED)

    def stop_later(self) -> None:
        """Stop after :data:`STOP_DELAY_S`: a client read Connected (``wifi_prov_mgr_done``)."""
        self.node.runtime.after(STOP_DELAY_S, "prov_stop", self.stop)

    def stop_after_connect(self) -> None:
        """The manager's auto-stop timer, armed when the station got its address."""
        self.node.runtime.after(AUTOSTOP_AFTER_CONNECT_S, "wifi_prov_mgr_tm", self.stop)

    # ------------------------------------------------------------------ the transport (seam)

    def start_transport(self) -> None:
        """Start the protocomm HTTP server on ``(node.address, HTTP_PORT)`` with the
        provisioning endpoints (:mod:`rig.vboard.node.prov_transport`); the runtime tracks
        it, so a reset closes it and drops every client. One that cannot listen is logged
        (:class:`rig.vboard.node.protocomm_server.ProtocommServer`) and provisioning runs on
        without it. With ``extra.prov_console`` in the manifest the same protocomm instance is
        also served on the console (:class:`rig.vboard.node.prov_console.ProtocommConsole`)."""
        from rig.vboard.node.prov_console import ProtocommConsole, console_enabled, console_line_max
        from rig.vboard.node.prov_transport import ProvisioningTransport

        transport = ProvisioningTransport(self, HTTP_PORT)
        served = transport.start()
        console = None
        extra = self.node.behaviour.extra
        if console_enabled(extra):
            console = ProtocommConsole(self.node.runtime, self.node.ctx.commands, transport.protocomm,
                                       transport.endpoint_names, console_line_max(extra))  # fmt: skip
            console.start()
        with self._lock:
            self._transport = transport if served else None
            self._console = console

    def stop_transport(self) -> None:
        """Stop what :meth:`start_transport` started."""
        with self._lock:
            transport, self._transport = self._transport, None
            console, self._console = self._console, None
        if transport is not None:
            self.node.runtime.untrack(transport)
            transport.close()
        if console is not None:
            console.stop()

    # ------------------------------------------------------------------ events the transport reports

    def credentials_received(self, ssid: bytes | str, passphrase: bytes | str = b"") -> None:
        """``NETWORK_PROV_WIFI_CRED_RECV``: log them (the SSID only, unless the image has the
        ``logs_wifi_password`` flaw, which prints the passphrase as RainMaker's example
        does) and join with them."""
        ssid_text = ssid.decode("utf-8", "replace") if isinstance(ssid, bytes) else ssid
        if "logs_wifi_password" in self.node.flaws:
            secret = passphrase.decode("utf-8", "replace") if isinstance(passphrase, bytes) else passphrase
            self.node.runtime.log(NodeMsg.CREDENTIALS_RECEIVED_WITH_PASSWORD, ssid=ssid_text, password=secret)
        else:
            self.node.runtime.log(NodeMsg.CREDENTIALS_RECEIVED, ssid=ssid_text)
        self.node.wifi.set_config(ssid, passphrase)
        self.node.wifi.apply()

    def session_established(self) -> None:
        """``PROTOCOMM_SECURITY_SESSION_SETUP_OK``."""
        self.node.runtime.log(SESSION_OK)

    def pop_mismatch(self, event: int = 2) -> bool:
        """``PROTOCOMM_SECURITY_SESSION_CREDENTIALS_MISMATCH`` (event 2) or invalid params (1);
        True while provisioning goes on, False once it stopped after :data:`MAX_POP_MISMATCH`."""
        self.node.runtime.log(MISMATCH, event=event)
        with self._lock:
            self._mismatches += 1
            exhausted = self._mismatches >= MAX_POP_MISMATCH
        if exhausted:
            self.stop()
            self.node.runtime.log(MAX_MISMATCH)
            return False
        return True

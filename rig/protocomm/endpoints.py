"""The device-side protocomm core: a registry of named endpoints and how a request reaches them.

Semantics of esp-idf ``components/protocomm/src/common/protocomm.c`` (rainmaker-protocol.md §4.2):

* the **version** endpoint (``protocomm_set_version``, ``proto-ver``) answers its fixed string to
  any request body, in plaintext;
* the **security** endpoint (``protocomm_set_security``, ``prov-session``) hands the body to the
  security scheme's handshake handler, in plaintext;
* every other endpoint (``protocomm_add_endpoint``: ``prov-config``, ``cloud_user_assoc`` …) is a
  request endpoint: the body is decrypted with the session, given to the handler, and the answer
  encrypted (security 0 has no crypto, so plaintext passes through).

Whatever fails — an unknown endpoint, a security refusal, decryption before the handshake is done,
a handler error — comes back as :class:`EndpointFailure` carrying the ``esp_err_t``; protocomm
itself answers nothing in that case. What the peer then sees is the transport's business: ESP-IDF's
HTTP transport closes the socket without a response (:mod:`rig.protocomm.httpd`).

Security state is per transport session: :meth:`Protocomm.open_session` / :meth:`close_session`
are ``protocomm_open_session`` / ``protocomm_close_session``, and the security scheme keeps exactly
one live session (a new one replaces the old), as every ESP-IDF scheme does.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from rig.protocomm.errors import EndpointFailure, EspErr, SecurityRefusal
from rig.protocomm.security import DeviceSecurity

log = logging.getLogger(__name__)

Handler = Callable[[bytes], bytes]
"""A request endpoint's handler: plaintext request in, plaintext response out. Raising fails the request."""


class EndpointKind(Enum):
    """``VER_EP`` / ``SEC_EP`` / ``REQ_EP`` (esp-idf ``protocomm_priv.h``)."""

    VERSION = "version"
    SECURITY = "security"
    REQUEST = "request"


@dataclass(frozen=True)
class Endpoint:
    name: str
    kind: EndpointKind
    handler: Handler | None = None


class Protocomm:
    """One protocomm instance: endpoints, the version string and the security scheme.

    Thread-safe; requests are handled one at a time, as ESP-IDF's single HTTP server task does.
    """

    def __init__(self) -> None:
        self._endpoints: dict[str, Endpoint] = {}
        self._version: bytes | None = None
        self.security: DeviceSecurity | None = None
        self._lock = threading.RLock()

    # registry -------------------------------------------------------------------------------------
    def _add(self, endpoint: Endpoint) -> None:
        name = endpoint.name
        if not name or name.startswith("/") or any(c.isspace() or c in "?#" for c in name):
            raise ValueError(f"endpoint name {name!r} is not usable as a URI path; names look like 'prov-config' (no leading '/')")
        with self._lock:
            if endpoint.name in self._endpoints:
                raise ValueError(f"endpoint {endpoint.name!r} already exists (protocomm refuses duplicates); remove it first")
            self._endpoints[endpoint.name] = endpoint

    def set_version(self, name: str, version: str | bytes) -> None:
        """Register the version endpoint answering *version* (a JSON string for provisioning)."""
        with self._lock:
            if self._version is not None:
                raise ValueError("the version is already set; protocomm allows one version endpoint")
            self._add(Endpoint(name, EndpointKind.VERSION))
            self._version = version.encode("utf-8") if isinstance(version, str) else bytes(version)

    def set_security(self, name: str, security: DeviceSecurity) -> None:
        """Register the security endpoint and the scheme every request endpoint is protected with."""
        with self._lock:
            if self.security is not None:
                raise ValueError("security is already set; protocomm allows one scheme per instance")
            self._add(Endpoint(name, EndpointKind.SECURITY))
            self.security = security

    def add_endpoint(self, name: str, handler: Handler) -> None:
        """Register a request endpoint (encrypted with the session unless the scheme is security 0)."""
        self._add(Endpoint(name, EndpointKind.REQUEST, handler))

    def remove_endpoint(self, name: str) -> bool:
        """Unregister *name*; False when it was not registered (``ESP_ERR_NOT_FOUND``)."""
        with self._lock:
            endpoint = self._endpoints.pop(name, None)
            if endpoint is None:
                return False
            if endpoint.kind is EndpointKind.VERSION:
                self._version = None
            if endpoint.kind is EndpointKind.SECURITY:
                self.security = None
            return True

    def has_endpoint(self, name: str) -> bool:
        with self._lock:
            return name in self._endpoints

    # sessions -------------------------------------------------------------------------------------
    def open_session(self, session_id: int) -> None:
        with self._lock:
            if self.security is not None:
                self.security.new_session(session_id)

    def close_session(self, session_id: int) -> None:
        with self._lock:
            if self.security is not None:
                try:
                    self.security.close_session(session_id)
                except SecurityRefusal as refusal:
                    log.warning("Error closing session with ID: %d (%s)", session_id, refusal.reason)

    # requests -------------------------------------------------------------------------------------
    def handle(self, name: str, session_id: int, data: bytes) -> bytes:
        """``protocomm_req_handle``: the response bytes for *data* sent to endpoint *name*, or :class:`EndpointFailure`."""
        with self._lock:
            endpoint = self._endpoints.get(name)
            if endpoint is None:
                raise EndpointFailure(name, EspErr.ESP_ERR_NOT_FOUND, f"no registered endpoint {name!r}")
            if endpoint.kind is EndpointKind.VERSION:
                return self._version or b""
            if endpoint.kind is EndpointKind.SECURITY:
                if self.security is None:
                    return b""
                try:
                    return self.security.handle_session(data, session_id)
                except SecurityRefusal as refusal:
                    raise EndpointFailure(name, refusal.esp_err, refusal.reason) from refusal
            return self._request(endpoint, session_id, bytes(data))

    def _request(self, endpoint: Endpoint, session_id: int, data: bytes) -> bytes:
        security = self.security
        crypto = security is not None and security.encrypts
        if crypto:
            try:
                data = security.decrypt(data, session_id)  # type: ignore[union-attr]
            except SecurityRefusal as refusal:
                raise EndpointFailure(endpoint.name, refusal.esp_err, f"decrypting the request: {refusal.reason}") from refusal
        try:
            answer = endpoint.handler(data)  # type: ignore[misc]
        except Exception as exc:  # a handler bug must fail one request like ESP_FAIL, not the server
            log.error("Request handler for %s failed: %s", endpoint.name, exc)
            raise EndpointFailure(endpoint.name, EspErr.ESP_FAIL, f"handler raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(answer, bytes | bytearray):
            raise EndpointFailure(endpoint.name, EspErr.ESP_FAIL, f"handler returned {type(answer).__name__}, not bytes")
        if crypto:
            try:
                return security.encrypt(bytes(answer), session_id)  # type: ignore[union-attr]
            except SecurityRefusal as refusal:
                raise EndpointFailure(endpoint.name, refusal.esp_err, f"encrypting the response: {refusal.reason}") from refusal
        return bytes(answer)


def provisioning_version(
    ver: str = "v1.1",
    sec_ver: int = 2,
    sec_patch_ver: int | None = None,
    capabilities: Iterable[str] = ("wifi_scan",),
    app_info: Mapping[str, Mapping[str, Any]] | None = None,
) -> str:
    """The ``proto-ver`` JSON (rainmaker-protocol.md §4.3).

    ``sec_patch_ver`` is left out when None (firmware built without
    ``CONFIG_ESP_PROTOCOMM_SUPPORT_SECURITY_PATCH_VERSION``; readers then assume 0). *app_info* adds
    labels such as ``{"rmaker": {"ver": "1.0", "cap": ["claim"]}}``.
    """
    prov: dict[str, Any] = {"ver": ver, "sec_ver": sec_ver}
    if sec_patch_ver is not None:
        prov["sec_patch_ver"] = sec_patch_ver
    prov["cap"] = list(capabilities)
    document: dict[str, Any] = {"prov": prov}
    for label, info in (app_info or {}).items():
        document[label] = dict(info)
    return json.dumps(document, separators=(",", ":"))

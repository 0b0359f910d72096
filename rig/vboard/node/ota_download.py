"""Fetching an OTA image: the HTTP(S) side of esp-idf's ``esp_https_ota`` as RainMaker configures it.

esp-rainmaker ``src/ota/esp_rmaker_https_ota.c`` gives ``esp_http_client`` the OTA URL,
the server certificate to verify against (here the lab CA from ``fctry``'s
``server_cert``, as the MQTT link uses — real firmware compiles RainMaker's OTA server
CA in), a 5 s timeout and a 1 KB receive buffer; the common name is checked
(``CONFIG_ESP_RMAKER_SKIP_COMMON_NAME_CHECK`` off). ``esp_https_ota_begin`` connects and
sends the GET (``_http_connect``), ``esp_https_ota_get_img_desc`` then reads the first
:data:`IMAGE_HEADER_SIZE` bytes, ``esp_https_ota_perform`` the rest in buffer-sized reads
(esp-idf ``components/esp_https_ota/src/esp_https_ota.c``).

The connection leaves from the board's own address and is registered with the node
runtime, so a reset cuts it as it would on the chip. Every failure is a
:class:`DownloadError` carrying the ``esp_err_t`` name and ``errno`` RainMaker puts into
its ``otastatus`` text (``OTA Begin failed: ESP_ERR_HTTP_CONNECT (errno=111: Connection
refused)``) and the lines the ESP-IDF layers log on the way.

Plain ``http://``: the clean virtual firmware has no way to authenticate such a server
and refuses at ``esp_https_ota_begin`` (ESP-IDF's line for an unverifiable transport);
the ``accepts_http_ota`` flaw is firmware built with ``CONFIG_ESP_HTTPS_OTA_ALLOW_HTTP``
and, for ``https://``, without server verification — it downloads from anyone.
"""

from __future__ import annotations

import errno
import http.client
import os
import socket
import ssl
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from rig.firmware.app_desc import APP_DESC_LAYOUT
from rig.firmware.image import IMAGE_HEADER_LAYOUT, SEGMENT_HEADER_LAYOUT
from rig.vboard.bootloader import LogMessage
from rig.vboard.node.cloud_link import server_verifying_context
from rig.vboard.node.messages import (
    MBEDTLS_SSL_FATAL_ALERT,
    MBEDTLS_X509_CERT_VERIFY_FAILED,
    NodeMsg,
)
from rig.vboard.node.runtime import NodeRuntime

__all__ = ["HTTP_RX_BUFFER_SIZE", "IMAGE_HEADER_SIZE", "DownloadError", "DownloadSettings", "ImageDownload"]

HTTP_TIMEOUT_S = 5.0
"""``ESP_RMAKER_HTTPS_OTA_TIMEOUT_MS``."""
HTTP_RX_BUFFER_SIZE = 1024
"""``CONFIG_ESP_RMAKER_OTA_HTTP_RX_BUFFER_SIZE`` default: the size of each ``esp_http_client_read``."""
IMAGE_HEADER_SIZE = IMAGE_HEADER_LAYOUT.size + SEGMENT_HEADER_LAYOUT.size + APP_DESC_LAYOUT.size + 1
"""``IMAGE_HEADER_SIZE`` in esp_https_ota.c: image header, first segment header, ``esp_app_desc_t``, + 1."""
USER_AGENT = "ESP32 HTTP Client/1.0"
"""``DEFAULT_HTTP_USER_AGENT`` of esp_http_client."""


@dataclass(frozen=True)
class DownloadSettings:
    """Where the node fetches from and whom it trusts."""

    address: str
    """The board's own address: every connection leaves from it."""
    server_cert: bytes | None = field(repr=False)
    """PEM of the CA the OTA server must chain to (``fctry`` ``server_cert``)."""
    verify_server: bool = True
    allow_http: bool = False


class DownloadError(Exception):
    """The download failed as ``esp_https_ota`` reports it: *err* (an ``esp_err_t`` name), the
    socket ``errno`` at the time (0 when none), and the lines the layers below logged."""

    def __init__(self, err: str, problem: str, *, errno_value: int = 0,
                 lines: tuple[tuple[LogMessage, dict[str, object]], ...] = ()):  # fmt: skip
        super().__init__(f"{err}: {problem}")
        self.err = err
        self.errno = errno_value
        self.lines = lines

    def describe(self) -> str:
        """``%s (errno=%d: %s)`` as RainMaker formats ``esp_err_to_name(err)``, ``errno``, ``strerror``."""
        return f"{self.err} (errno={self.errno}: {os.strerror(self.errno) if self.errno else 'Invalid'})"


def _tls_lines(exc: ssl.SSLError) -> tuple[tuple[LogMessage, dict[str, object]], ...]:
    verify = isinstance(exc, ssl.SSLCertVerificationError)
    lines: list[tuple[LogMessage, dict[str, object]]] = [
        (NodeMsg.TLS_HANDSHAKE, {"code": MBEDTLS_X509_CERT_VERIFY_FAILED if verify else MBEDTLS_SSL_FATAL_ALERT})]
    if verify:
        lines.append((NodeMsg.TLS_VERIFY_FAILED, {}))
    lines += [(NodeMsg.TLS_OPEN_FAILED, {}), (NodeMsg.HTTPS_OTA_CONNECT_FAILED, {})]
    return tuple(lines)


class ImageDownload:
    """One GET of an OTA image, opened by :meth:`open` (``esp_https_ota_begin``)."""

    def __init__(self, runtime: NodeRuntime, connection: http.client.HTTPConnection, response: http.client.HTTPResponse,
                 sock: socket.socket | None):  # fmt: skip
        self.runtime = runtime
        self._connection = connection
        self._response = response
        self._sock = sock
        self.content_length: int | None = response.length
        self.received = 0

    @classmethod
    def open(cls, runtime: NodeRuntime, url: str, settings: DownloadSettings) -> ImageDownload:
        """Connect from the board's address, verify the server, send the GET; a 200 answer or :class:`DownloadError`."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        insecure = scheme == "http" or not settings.verify_server
        if scheme not in ("http", "https") or not parts.hostname:
            raise DownloadError("ESP_ERR_INVALID_ARG", f"{url!r} is not an http(s) URL")
        if insecure and not settings.allow_http:
            raise DownloadError("ESP_ERR_INVALID_ARG", "plain HTTP cannot authenticate the server",
                                lines=((NodeMsg.HTTPS_OTA_NO_VERIFICATION, {}),))
        if insecure:
            runtime.log(NodeMsg.HTTPS_OTA_INSECURE)
        port = parts.port or (443 if scheme == "https" else 80)
        connection: http.client.HTTPConnection
        if scheme == "https":
            try:
                context = server_verifying_context(settings.server_cert, settings.verify_server)
            except (ssl.SSLError, ValueError) as exc:
                raise DownloadError("ESP_ERR_HTTP_CONNECT", f"the server certificate from fctry is unusable: {exc}",
                                    lines=((NodeMsg.HTTPS_OTA_CONNECT_FAILED, {}),)) from None  # fmt: skip
            connection = http.client.HTTPSConnection(parts.hostname, port, timeout=HTTP_TIMEOUT_S,
                                                     source_address=(settings.address, 0), context=context)  # fmt: skip
        else:
            connection = http.client.HTTPConnection(parts.hostname, port, timeout=HTTP_TIMEOUT_S,
                                                    source_address=(settings.address, 0))  # fmt: skip
        try:
            connection.connect()
        except ssl.SSLError as exc:
            connection.close()
            raise DownloadError("ESP_ERR_HTTP_CONNECT", f"TLS handshake with {parts.hostname}:{port} failed: {exc}",
                                lines=_tls_lines(exc)) from None  # fmt: skip
        except OSError as exc:
            connection.close()
            code = exc.errno or errno.ETIMEDOUT
            raise DownloadError("ESP_ERR_HTTP_CONNECT", f"cannot connect to {parts.hostname}:{port}: {exc}", errno_value=code,
                                lines=((NodeMsg.TLS_DELAYED_CONNECT, {"fd": 54, "error": os.strerror(code)}),
                                       (NodeMsg.HTTPS_OTA_CONNECT_FAILED, {}))) from None  # fmt: skip
        sock = connection.sock
        if sock is not None:
            runtime.track(sock)
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        try:
            connection.request("GET", target, headers={"User-Agent": USER_AGENT})
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            _close(runtime, connection, sock)
            raise DownloadError("ESP_FAIL", f"GET {parts.hostname}:{port} failed: {exc}",
                                errno_value=getattr(exc, "errno", 0) or 0,
                                lines=((NodeMsg.HTTPS_OTA_CONNECT_FAILED, {}),)) from None  # fmt: skip
        if response.status != 200:
            _close(runtime, connection, sock)
            raise DownloadError("ESP_FAIL", f"the server answered HTTP {response.status} {response.reason}",
                                lines=((NodeMsg.HTTPS_OTA_CONNECT_FAILED, {}),))  # fmt: skip
        return cls(runtime, connection, response, sock)

    def read(self, size: int) -> bytes:
        """Up to *size* bytes; ``b""`` at the end of the body. A broken connection is a :class:`DownloadError`."""
        try:
            data = self._response.read(size)
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise DownloadError("ESP_FAIL", f"reading the image failed: {exc}", errno_value=getattr(exc, "errno", 0) or 0) from None
        self.received += len(data)
        return data

    def read_header(self) -> bytes:
        """``read_header``: the first :data:`IMAGE_HEADER_SIZE` bytes (fewer only when the body is shorter)."""
        data = b""
        while len(data) < IMAGE_HEADER_SIZE:
            chunk = self.read(IMAGE_HEADER_SIZE - len(data))
            if not chunk:
                break
            data += chunk
        return data

    @property
    def complete(self) -> bool:
        """``esp_http_client_is_complete_data_received``: the whole announced body arrived."""
        return self.content_length is None or self.received >= self.content_length

    def close(self) -> None:
        _close(self.runtime, self._connection, self._sock)


def _close(runtime: NodeRuntime, connection: http.client.HTTPConnection, sock: socket.socket | None) -> None:
    if sock is not None:
        runtime.untrack(sock)
    connection.close()

"""The SoftAP HTTP transport, client side: ``POST /<endpoint>`` with the session cookie.

Requests look like esp-rainmaker-cli's ``Transport_HTTP`` (idf-extra-components
``network_provisioning/tool/esp_prov/transport/transport_http.py``; rainmaker-protocol.md §4.1):
one persistent HTTP/1.1 connection, headers ``Content-type: application/x-www-form-urlencoded`` and
``Accept: text/plain``, and once the device answered with ``Set-Cookie``, that value sent back as
``Cookie`` on every later request — so the session survives a reconnect.

An ESP-IDF device answers a failed protocomm request (wrong PoP, malformed protobuf, no session)
by closing the socket without any HTTP response; :class:`TransportError` then has ``status`` None
and says so. The next :meth:`SoftApHttpTransport.send` reconnects and keeps the cookie, as
Espressif's client does.
"""

from __future__ import annotations

import http.client

from rig.protocomm.errors import ProtocommError

REQUEST_HEADERS = {"Content-type": "application/x-www-form-urlencoded", "Accept": "text/plain"}


class TransportError(ProtocommError):
    """An endpoint request failed at the HTTP level. ``status`` is the HTTP status, None when there was no response."""

    def __init__(self, endpoint: str, status: int | None, problem: str, fix: str):
        self.endpoint = endpoint
        self.status = status
        self.problem = problem
        self.fix = fix
        shown = f"HTTP {status}" if status is not None else "no HTTP response"
        super().__init__(f"POST /{endpoint}: {shown}: {problem}. Fix: {fix}")


class SoftApHttpTransport:
    """A client of one device's provisioning HTTP server (``host``, by default port 80)."""

    def __init__(self, host: str, port: int = 80, timeout: float = 10.0, source_address: str | None = None):
        self.host = host
        self.port = port
        self.timeout = timeout
        self.source_address = source_address
        self.cookie: str | None = None
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            source = (self.source_address, 0) if self.source_address else None
            self._conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout, source_address=source)
        return self._conn

    def send(self, endpoint: str, data: bytes) -> bytes:
        """POST *data* to ``/<endpoint>`` and return the response body (200 only), else :class:`TransportError`."""
        headers = dict(REQUEST_HEADERS)
        if self.cookie:
            headers["Cookie"] = self.cookie
        conn = self._connection()
        where = f"http://{self.host}:{self.port}/{endpoint}"
        try:
            conn.request("POST", "/" + endpoint, body=bytes(data), headers=headers)
            response = conn.getresponse()
            body = response.read()
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, http.client.BadStatusLine) as exc:
            self.reset_connection()
            raise TransportError(
                endpoint, None, f"the device closed the connection without answering ({type(exc).__name__})",
                "ESP-IDF's protocomm drops a request whose handler failed: check the PoP, the session "
                "(handshake done, cookie sent) and the message bytes",
            ) from exc
        except TimeoutError as exc:
            self.reset_connection()
            raise TransportError(endpoint, None, f"no response from {where} within {self.timeout} s",
                                 "is the board still in provisioning mode and reachable?") from exc
        except ConnectionRefusedError as exc:
            self.reset_connection()
            raise TransportError(endpoint, None, f"nothing listens on {self.host}:{self.port}",
                                 "start provisioning on the board (SoftAP HTTP server) or check the address") from exc
        except OSError as exc:
            self.reset_connection()
            raise TransportError(endpoint, None, f"{where}: {exc}", "check that the rig can reach the board's address") from exc
        cookie = response.getheader("Set-Cookie")
        if cookie:
            self.cookie = cookie
        if response.status != 200:
            text = body.decode("latin-1", "replace")[:200]
            raise TransportError(endpoint, response.status, f"{response.reason}: {text}",
                                 "the device has no such endpoint or refused the request; compare with proto-ver")
        return body

    def reset_connection(self) -> None:
        """Close the TCP connection; the next request opens a new one (the cookie is kept)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def forget_session(self) -> None:
        """Drop the cookie and the connection: the next request starts a new session on the device."""
        self.cookie = None
        self.reset_connection()

    def close(self) -> None:
        self.reset_connection()

    def __enter__(self) -> SoftApHttpTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

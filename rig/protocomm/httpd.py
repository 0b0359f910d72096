"""The device-side SoftAP HTTP transport: protocomm behind an HTTP server, as ESP-IDF runs it.

What a client sees is what esp-idf ``components/protocomm/src/transports/protocomm_httpd.c`` on top
of ``components/esp_http_server`` shows (rainmaker-protocol.md §4.1):

* every protocomm endpoint is ``POST /<endpoint>``; any other path is ``404 Not Found`` ("This URI
  does not exist"), another method on an endpoint ``405``; a request line or header block the parser
  rejects is ``400``, a too-long URI ``414``, a too-large header block ``431``, chunked bodies
  ``411``, then the socket is closed (``httpd_req_handle_err``);
* sessions: a request whose ``Cookie`` header is exactly ``session=<current id>`` continues the
  session; without a ``Cookie`` header, a request on the socket that opened the session continues
  it; anything else closes the current protocomm session and opens a new one with a random 32-bit
  id, announced as ``Set-Cookie: session=<id>`` on that request's (successful) response. The
  header is read into a 20-byte buffer, so a ``Cookie`` of 20 bytes or more counts as absent;
* a body of 0 or more than 4096 bytes, a protocomm failure (wrong PoP, malformed protobuf, no
  session, unknown endpoint) or a handler error gets **no HTTP response**: the URI handler returns
  ``ESP_FAIL`` and esp_http_server closes the socket (``httpd_uri``: "uri handler execution failed");
* ``max_open_sockets`` is 1 with LRU purge: a new connection closes the least recently used one;
* responses are ``HTTP/1.1 200 OK``, ``Content-Type: text/html`` (esp_http_server's default),
  ``Content-Length``, then ``Set-Cookie`` when a session was opened; the connection stays open.

The server binds the board's own address (``127.0.1.N`` for a virtual board, port 80 by default),
serves each connection on its own thread, never dies on bad input, and :meth:`ProtocommHttpd.stop`
closes the listening socket and every client socket and returns promptly (a board reset drops all
clients). Bodies are never logged: security 0 carries the Wi-Fi passphrase in plaintext.
"""

from __future__ import annotations

import errno
import itertools
import logging
import secrets
import selectors
import socket
import threading
from dataclasses import dataclass, field
from typing import NoReturn

from rig.protocomm.endpoints import Protocomm
from rig.protocomm.errors import EndpointFailure, ProtocommError

log = logging.getLogger(__name__)

MAX_REQ_BODY_LEN = 4096  # protocomm_httpd.c MAX_REQ_BODY_LEN
COOKIE_BUF_LEN = 20  # protocomm_httpd.c cookie_buf[20]
NO_SESSION_ID = 0xFFFFFFFF  # PROTOCOMM_NO_SESSION_ID (-1 as uint32_t)
MAX_URI_LEN = 512  # CONFIG_HTTPD_MAX_URI_LEN default
MAX_REQ_HDR_LEN = 1024  # CONFIG_HTTPD_MAX_REQ_HDR_LEN (esp-idf v5.x default)
RECV_TIMEOUT_S = 5.0  # HTTPD_DEFAULT_CONFIG recv_wait_timeout
_STOP_JOIN_S = 2.0

# esp_http_server httpd_resp_send_err status lines and default messages (httpd_txrx.c)
_ERRORS = {
    400: ("400 Bad Request", "Server unable to understand request due to invalid syntax"),
    404: ("404 Not Found", "This URI does not exist"),
    405: ("405 Method Not Allowed", "Request method for this URI is not handled by server"),
    408: ("408 Request Timeout", "Server closed this connection"),
    411: ("411 Length Required", "Chunked encoding not supported by server"),
    414: ("414 URI Too Long", "URI is too long for server to interpret"),
    431: ("431 Request Header Fields Too Large", "Header fields are too long for server to interpret"),
    505: ("505 Version Not Supported", "HTTP version not supported by server"),
}
# methods http_parser knows; anything else is a parse error (400)
_METHODS = frozenset(
    "DELETE GET HEAD POST PUT CONNECT OPTIONS TRACE COPY LOCK MKCOL MOVE PROPFIND PROPPATCH SEARCH UNLOCK BIND REBIND "
    "UNBIND ACL REPORT MKACTIVITY CHECKOUT MERGE M-SEARCH NOTIFY SUBSCRIBE UNSUBSCRIBE PATCH PURGE MKCALENDAR LINK UNLINK".split()
)


class HttpdError(ProtocommError):
    """The server could not start (the address or port is not available)."""


class _Drop(Exception):
    """Close the connection without an HTTP response (a URI handler returned ESP_FAIL)."""


@dataclass
class _Request:
    method: str
    path: str
    headers: list[tuple[str, str]]
    content_length: int

    def header(self, name: str) -> str | None:
        """The first header called *name* (case-insensitive), as esp_http_server looks it up."""
        for key, value in self.headers:
            if key.lower() == name.lower():
                return value
        return None


@dataclass(eq=False)
class _Connection:
    sock: socket.socket
    peer: tuple[str, int]
    number: int  # stands in for the lwIP socket number protocomm_httpd uses as sock_session_id
    last_used: int = 0
    frees_socket_session: bool = False  # req->free_ctx = protocomm_httpd_session_close was set on it
    buffer: bytearray = field(default_factory=bytearray)
    thread: threading.Thread | None = None


class ProtocommHttpd:
    """protocomm_httpd: serves a :class:`~rig.protocomm.endpoints.Protocomm` on ``address:port``.

    ``port=0`` picks a free port (see :attr:`port` after :meth:`start`).
    """

    def __init__(
        self,
        protocomm: Protocomm,
        address: str,
        port: int = 80,
        *,
        max_open_sockets: int = 1,
        recv_timeout: float = RECV_TIMEOUT_S,
    ):
        if max_open_sockets < 1:
            raise ValueError("max_open_sockets must be at least 1")
        self.protocomm = protocomm
        self.address = address
        self.port = port
        self.max_open_sockets = max_open_sockets
        self.recv_timeout = recv_timeout
        self._listener: socket.socket | None = None
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._connections: list[_Connection] = []
        self._conn_lock = threading.Lock()
        # one request at a time, like the single httpd task; re-entrant so a handler may stop() the server
        self._session_lock = threading.RLock()
        self._stopping = threading.Event()
        self._numbers = itertools.count(54)  # lwIP hands out socket numbers from LWIP_SOCKET_OFFSET upwards
        self._clock = itertools.count(1)
        self.cookie_session_id: int | None = None
        self._sock_session: int | None = None

    # lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Bind and listen; serving starts on a background thread. Raises :class:`HttpdError` when it cannot."""
        if self._accept_thread is not None:
            raise HttpdError(f"the provisioning HTTP server on {self.address}:{self.port} is already running")
        listener = socket.socket(socket.AF_INET6 if ":" in self.address else socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.address, self.port))
            listener.listen(8)
        except OSError as exc:
            listener.close()
            raise HttpdError(self._bind_advice(exc)) from exc
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector = selectors.DefaultSelector()
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wake_r, selectors.EVENT_READ)
        self._stopping.clear()
        self.cookie_session_id = None
        self._sock_session = None
        self._accept_thread = threading.Thread(target=self._accept_loop, name=f"httpd-{self.address}:{self.port}", daemon=True)
        self._accept_thread.start()
        log.info("Started provisioning HTTP server on %s:%d", self.address, self.port)

    def _bind_advice(self, exc: OSError) -> str:
        where = f"{self.address}:{self.port}"
        if exc.errno == errno.EADDRINUSE:
            fix = "another server (a previous board that was not stopped?) holds it; stop it or use another address"
        elif exc.errno == errno.EADDRNOTAVAIL:
            fix = "the address is not on this host; virtual boards use loopback addresses 127.0.1.N"
        elif exc.errno == errno.EACCES:
            fix = "ports below 1024 need root or CAP_NET_BIND_SERVICE; run as root or pass another port"
        else:
            fix = "check the address and port in the board's configuration"
        return f"cannot listen on {where}: {exc.strerror or exc}. Fix: {fix}"

    def stop(self) -> None:
        """Close the listener and every client socket; returns once the threads are gone (or after 2 s each)."""
        if self._accept_thread is None:
            return
        self._stopping.set()
        if self._wake_w is not None:
            try:
                self._wake_w.send(b"x")
            except OSError:
                pass
        self._accept_thread.join(_STOP_JOIN_S)
        with self._conn_lock:
            connections = list(self._connections)
        for conn in connections:
            self._close(conn)
        for conn in connections:
            if conn.thread is not None and conn.thread is not threading.current_thread():
                conn.thread.join(_STOP_JOIN_S)
        for sock in (self._listener, self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        if self._selector is not None:
            self._selector.close()
        self._listener = self._wake_r = self._wake_w = None
        self._selector = None
        self._accept_thread = None
        with self._session_lock:
            if self.cookie_session_id is not None:
                self.protocomm.close_session(self.cookie_session_id)
            self.cookie_session_id = None
            self._sock_session = None
        log.info("Stopped provisioning HTTP server on %s:%d", self.address, self.port)

    def __enter__(self) -> ProtocommHttpd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self._accept_thread is not None

    @property
    def open_connections(self) -> int:
        with self._conn_lock:
            return len(self._connections)

    # accepting ------------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        assert self._selector is not None and self._listener is not None
        while not self._stopping.is_set():
            for key, _ in self._selector.select():
                if key.fileobj is self._wake_r or self._stopping.is_set():
                    return
                try:
                    sock, peer = self._listener.accept()
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError as exc:
                    log.warning("accept failed: %s", exc)
                    continue
                self._admit(sock, peer)

    def _admit(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        sock.setblocking(True)
        sock.settimeout(self.recv_timeout)
        conn = _Connection(sock, peer, next(self._numbers), last_used=next(self._clock))
        with self._conn_lock:
            excess = len(self._connections) + 1 - self.max_open_sockets
            victims = sorted(self._connections, key=lambda c: c.last_used)[: max(excess, 0)]
            self._connections.append(conn)
        for victim in victims:
            log.debug("LRU purge: closing socket %d to admit a new connection", victim.number)
            self._close(victim)
        conn.thread = threading.Thread(target=self._serve, args=(conn,), name=f"httpd-conn-{conn.number}", daemon=True)
        conn.thread.start()

    def _close(self, conn: _Connection) -> None:
        try:
            conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        conn.sock.close()

    def _forget(self, conn: _Connection) -> None:
        self._close(conn)
        with self._conn_lock:
            if conn in self._connections:
                self._connections.remove(conn)
        if conn.frees_socket_session:
            with self._session_lock:
                # protocomm_httpd_session_close: "Resetting socket session id as socket ... was closed"
                self._sock_session = None

    # serving --------------------------------------------------------------------------------------
    def _serve(self, conn: _Connection) -> None:
        try:
            while not self._stopping.is_set():
                request = self._read_request(conn)
                if request is None:
                    return
                conn.last_used = next(self._clock)
                keep = self._dispatch(conn, request)
                if not keep:
                    return
        except _Drop:
            return
        except OSError:
            return  # peer reset, or stop()/LRU purge closed the socket under us
        except Exception:  # never let one connection take the server down
            log.exception("provisioning HTTP server: unexpected error on socket %d; closing it", conn.number)
        finally:
            self._forget(conn)

    def _recv(self, conn: _Connection, idle_ok: bool) -> bytes:
        while True:
            try:
                return conn.sock.recv(4096)
            except TimeoutError:
                if idle_ok and not conn.buffer and not self._stopping.is_set():
                    continue  # an idle keep-alive connection just waits, as esp_http_server's select() does
                raise

    def _read_request(self, conn: _Connection) -> _Request | None:
        """The next request's line and headers (the body stays in ``conn.buffer``), or None at EOF."""
        while True:
            end = conn.buffer.find(b"\r\n\r\n")
            sep = 4
            if end < 0:
                end = conn.buffer.find(b"\n\n")
                sep = 2
            if end >= 0:
                break
            if len(conn.buffer) > MAX_REQ_HDR_LEN + MAX_URI_LEN:
                self._send_error(conn, self._oversize_code(conn.buffer))
            try:
                chunk = self._recv(conn, idle_ok=True)
            except TimeoutError:
                self._send_error(conn, 408)
            if not chunk:
                return None
            conn.buffer += chunk
        head = bytes(conn.buffer[:end])
        del conn.buffer[: end + sep]
        return self._parse_head(conn, head)

    @staticmethod
    def _oversize_code(buffer: bytes) -> int:
        first_line = bytes(buffer).split(b"\n", 1)[0]
        return 414 if len(first_line) > MAX_URI_LEN or b"\n" not in bytes(buffer) else 431

    def _parse_head(self, conn: _Connection, head: bytes) -> _Request:
        lines = head.replace(b"\r\n", b"\n").split(b"\n")
        try:
            request_line = lines[0].decode("ascii")
        except UnicodeDecodeError:
            self._send_error(conn, 400)
        parts = request_line.split(" ")
        if len(parts) != 3 or parts[0] not in _METHODS or not parts[2].startswith("HTTP/"):
            self._send_error(conn, 400)
        method, uri, version = parts
        if len(uri) > MAX_URI_LEN:
            self._send_error(conn, 414)
        try:
            major, minor = (int(x) for x in version[5:].split("."))
        except ValueError:
            self._send_error(conn, 400)
        if major != 1 and minor != 1:  # esp_http_server's own (lenient) check
            self._send_error(conn, 505)
        if len(head) - len(lines[0]) > MAX_REQ_HDR_LEN:
            self._send_error(conn, 431)
        headers: list[tuple[str, str]] = []
        for raw in lines[1:]:
            name, colon, value = raw.partition(b":")
            if not colon or not name or name != name.strip():
                self._send_error(conn, 400)
            headers.append((name.decode("latin-1"), value.strip().decode("latin-1")))
        request = _Request(method, uri.split("?", 1)[0].split("#", 1)[0], headers, 0)
        encoding = request.header("Transfer-Encoding")
        if encoding is not None and "chunked" in encoding.lower():
            self._send_error(conn, 411)
        length = request.header("Content-Length")
        if length is not None:
            if not length.isdigit():
                self._send_error(conn, 400)
            request.content_length = int(length)
        return request

    def _send_error(self, conn: _Connection, code: int) -> NoReturn:
        """``httpd_resp_send_err`` then close the socket (``httpd_req_handle_err`` returns ESP_FAIL)."""
        status, message = _ERRORS[code]
        body = message.encode("ascii")
        head = f"HTTP/1.1 {status}\r\nContent-Type: text/html\r\nContent-Length: {len(body)}\r\n\r\n".encode("ascii")
        try:
            conn.sock.sendall(head + body)
        except OSError:
            pass
        log.warning("httpd: %s", status)
        raise _Drop

    def _discard_body(self, conn: _Connection, length: int) -> None:
        """Read (up to 64 KB of) a body we will not use, so the error response is not lost to a TCP reset."""
        try:
            self._read_body(conn, min(length, 1 << 16))
        except _Drop:
            pass

    def _read_body(self, conn: _Connection, length: int) -> bytes:
        while len(conn.buffer) < length:
            try:
                chunk = self._recv(conn, idle_ok=False)
            except TimeoutError as exc:
                raise _Drop from exc
            if not chunk:
                raise _Drop
            conn.buffer += chunk
        body = bytes(conn.buffer[:length])
        del conn.buffer[:length]
        return body

    def _dispatch(self, conn: _Connection, request: _Request) -> bool:
        endpoint = request.path[1:] if request.path.startswith("/") else request.path
        if not self.protocomm.has_endpoint(endpoint):
            self._discard_body(conn, request.content_length)
            self._send_error(conn, 404)
        if request.method != "POST":
            self._discard_body(conn, request.content_length)
            self._send_error(conn, 405)
        with self._session_lock:
            new_session = self._pick_session(conn, request)
            if request.content_length <= 0:
                log.error("protocomm_httpd: Content length not found")
                raise _Drop
            if request.content_length > MAX_REQ_BODY_LEN:
                log.error("protocomm_httpd: Request content length should be less than 4kb")
                raise _Drop
            body = self._read_body(conn, request.content_length)
            session_id = self.cookie_session_id if self.cookie_session_id is not None else NO_SESSION_ID
            try:
                answer = self.protocomm.handle(endpoint, session_id, body)
            except EndpointFailure as failure:
                log.error("protocomm_httpd: Data handler failed (%s)", failure)
                raise _Drop from failure
            extra = f"Set-Cookie: session={self.cookie_session_id}\r\n" if new_session else ""
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\nContent-Length: {len(answer)}\r\n{extra}\r\n".encode("ascii")
        conn.sock.sendall(head + answer)
        return True

    def _pick_session(self, conn: _Connection, request: _Request) -> bool:
        """protocomm_httpd.c's cookie / socket rule; returns True when a new session was opened."""
        cookie = request.header("Cookie")
        current = self.cookie_session_id if self.cookie_session_id is not None else NO_SESSION_ID
        same = False
        if cookie is not None and len(cookie.encode("latin-1")) < COOKIE_BUF_LEN:
            if cookie == f"session={current}":
                self._sock_session = None  # the client does cookies: the socket no longer identifies it
                same = True
        elif conn.number == self._sock_session:
            same = True
        if same:
            return False
        if self.cookie_session_id is not None:
            log.warning("protocomm_httpd: Closing session with ID: %d", self.cookie_session_id)
            self.protocomm.close_session(self.cookie_session_id)
            self.cookie_session_id = None
            self._sock_session = None
        new_id = secrets.randbits(32)
        while new_id == NO_SESSION_ID:
            new_id = secrets.randbits(32)
        self.protocomm.open_session(new_id)
        self.cookie_session_id = new_id
        self._sock_session = conn.number
        conn.frees_socket_session = True
        return True

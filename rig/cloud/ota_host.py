"""The OTA image host: signed firmware images over HTTPS at per-job URLs that expire.

DESIGN.md "Cloud" → OTA host: "images over HTTPS; the node is told the URL on
``node/<id>/otaurl``". Issue 4: "HTTPS file server for signed images (server cert from
the lab CA), range requests supported, per-job URL that expires."

What a node sees (shared/reference/rainmaker-protocol.md §1.5): the cloud publishes
``otaurl`` with ``url``, ``ota_job_id``, ``file_size``, ``fw_version`` (and optionally
``file_md5``); the node's ``esp_https_ota`` fetches ``url``. ESP-IDF's HTTPS OTA client
may send ``HEAD`` and ``Range: bytes=<from>-`` / ``bytes=<from>-<to>`` requests (partial
download and download resumption, esp-idf ``components/esp_https_ota``), so both are
served; the ranges follow RFC 9110 §14 (one range per request).

* :meth:`OtaImageHost.publish` stores the image under ``<state_dir>/ota-images/`` and
  returns a :class:`PublishedImage` with ``https://host:port/ota/<token>/<name>.bin``:
  ``<token>`` is 256 random bits (``secrets.token_urlsafe(32)``) per publish, so a URL is
  per job and per node and cannot be guessed.
* A URL expires ``url_lifetime_s`` after publishing by the injected :class:`Clock`
  (suites move a ``ManualClock`` instead of waiting an hour): then ``410 Gone``. An
  unknown token or name is ``404``.
* Every request (and every failed TLS handshake) is appended to
  ``<state_dir>/ota-access.jsonl`` — time, client address, scheme, TLS version, method,
  redacted path, status, range, bytes sent, whether the body was sent in full, the job,
  node and image SHA-256 — the evidence of who downloaded what. Tokens are never
  written out in full (only a 6-character prefix).
* TLS 1.2 or later only, with a certificate from the lab CA. ``plain_http=True`` adds a
  second, plain-HTTP listener serving the same URLs, for the negative test that a node
  refuses an ``http://`` OTA URL (``accepts_http_ota``); it is off by default.
* Delivery faults (test mode, :mod:`rig.cloud.ota_delivery`): a URL published with
  ``cut_after=N`` or ``stall_after=N`` answers every GET with the full response headers
  (Content-Length / Content-Range as usual) but only the body bytes at file offsets
  below N; then it closes the connection (a connection cut mid-download) or sends
  nothing more and holds it open (a download frozen mid-write, so a test can cut the
  board's power during the write) until the client goes away, the host stops or
  ``stall_hold_s`` passes. The access record says ``fault`` "cut" / "stall" when a
  response was cut short; a stalled one is logged when the stall begins (its
  ``bytes_sent`` is final then), so a suite can wait for it.

Stdlib ``http.server`` + ``ssl`` in threads: the TLS handshake runs in the connection's
own thread (not in ``accept``), so a slow or hostile client cannot stall the listener.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import select
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from rig.cloud.clock import Clock
from rig.evidence.redaction import redact_url_tokens

__all__ = [
    "AccessRecord",
    "OtaFault",
    "OtaHostError",
    "OtaImageHost",
    "PublishedImage",
    "RangeNotSatisfiable",
    "delivery_fault",
    "parse_byte_range",
]

OtaFault = Literal["cut", "stall"]

log = logging.getLogger(__name__)

_PATH = re.compile(r"^/ota/(?P<token>[A-Za-z0-9_-]{16,128})/(?P<name>[A-Za-z0-9._-]{1,80}\.bin)$")
_NAME_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_CHUNK = 64 * 1024
_IO_TIMEOUT_S = 30.0
_POLL_S = 0.1  # serve_forever's shutdown-check interval; a stalled connection's too
STALL_HOLD_S = 300.0
"""How long a stalled download is held open at most (a test resets the board well before)."""


class OtaHostError(RuntimeError):
    """The OTA host could not start (port taken, certificate unreadable …)."""


class RangeNotSatisfiable(ValueError):
    """A syntactically valid ``Range`` none of whose ranges overlaps the file (→ 416)."""


@dataclass(frozen=True)
class PublishedImage:
    """One image at one URL: what the cloud puts into ``otaurl``."""

    url: str
    file_size: int
    sha256: str
    """Lower-case hex SHA-256 of the served bytes."""
    md5: str
    """Lower-case hex MD5 (RainMaker's optional ``file_md5``)."""
    job_id: str
    node_id: str
    expires_at: float
    """Clock time after which the URL answers 410."""
    plain_url: str | None = None
    """The same image over plain HTTP, when the host runs with ``plain_http=True``."""
    fault: OtaFault | None = None
    """``cut`` / ``stall``: every GET is cut short at file offset :attr:`fault_at`."""
    fault_at: int | None = None


@dataclass(frozen=True)
class AccessRecord:
    """One line of the access log."""

    time: float
    client: str
    scheme: str
    tls_version: str | None
    method: str
    path: str
    status: int
    range: str | None = None
    bytes_sent: int = 0
    complete: bool = False
    job_id: str | None = None
    node_id: str | None = None
    sha256: str | None = None
    user_agent: str | None = None
    error: str | None = None
    fault: OtaFault | None = None
    """``cut`` / ``stall`` when this response was cut short on purpose (a delivery fault)."""


@dataclass(frozen=True)
class _Entry:
    published: PublishedImage
    path: Path
    name: str


def parse_byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The inclusive ``(first, last)`` byte positions a ``Range`` header asks for in a
    *size*-byte file, or ``None`` to send the whole file (RFC 9110 §14.1.2, §14.2).

    ``bytes=a-b``, ``bytes=a-`` and ``bytes=-n`` are served; ``b`` past the end is cut
    to the end. No header, another unit, a malformed value (``b < a``, not numbers) or
    several ranges → ``None``: RFC 9110 lets a server ignore such a ``Range`` and send
    200 with the whole file. A valid single range that starts at or past the end (or
    ``bytes=-0``) raises :class:`RangeNotSatisfiable` (→ 416).
    """
    if header is None:
        return None
    unit, sep, spec = header.strip().partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) != 1:
        return None
    m = re.fullmatch(r"(\d*)-(\d*)", parts[0])
    if not m or (not m.group(1) and not m.group(2)):
        return None
    first_s, last_s = m.groups()
    if not first_s:  # suffix range: the last n bytes
        suffix = int(last_s)
        if suffix == 0 or size == 0:
            raise RangeNotSatisfiable(f"bytes=-{suffix} of a {size}-byte file")
        return max(0, size - suffix), size - 1
    first = int(first_s)
    last = int(last_s) if last_s else size - 1
    if last_s and last < first:
        return None
    if first >= size:
        raise RangeNotSatisfiable(f"bytes={first}-{last_s} starts at or past the end of a {size}-byte file")
    return first, min(last, size - 1)


def delivery_fault(cut_after: int | None, stall_after: int | None, size: int | None = None) -> tuple[OtaFault | None, int | None]:
    """Check a delivery fault's arguments (at most one, a byte offset ≥ 0, below *size* when
    given) and return ``(fault, fault_at)``; ``(None, None)`` for none."""
    if cut_after is not None and stall_after is not None:
        raise ValueError("give at most one of cut_after and stall_after")
    fault: OtaFault = "cut" if cut_after is not None else "stall"
    at = cut_after if cut_after is not None else stall_after
    if at is None:
        return None, None
    if isinstance(at, bool) or not isinstance(at, int) or at < 0:
        raise ValueError(f"{fault}_after must be a byte offset ≥ 0, got {at!r}")
    if size is not None and at >= size:
        raise ValueError(
            f"{fault}_after={at!r} is not a byte offset inside the {size}-byte image; "
            f"give 0 ≤ N < {size} (the served image's size, after signing)"
        )
    return fault, at


def _redact_path(path: str) -> str:
    m = _PATH.match(urlsplit(path).path)
    if m:
        return f"/ota/{m['token'][:6]}…/{m['name']}"
    return path[:200]


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "rig-ota-host"
    sys_version = ""
    timeout = _IO_TIMEOUT_S
    server: _Server

    def do_GET(self) -> None:
        self.server.owner._serve(self, head=False)

    def do_HEAD(self) -> None:
        self.server.owner._serve(self, head=True)

    def log_message(self, format: str, *args: Any) -> None:
        # http.server's own lines (request line, errors) carry the URL token: redact it.
        text = redact_url_tokens(format % args)
        log.debug("ota-host %s: %s", self.address_string(), text)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = True

    def __init__(self, address: tuple[str, int], owner: OtaImageHost, context: ssl.SSLContext | None):
        self.owner = owner
        self.context = context
        self.scheme = "https" if context else "http"
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        sock: socket.socket = request
        with self._open_lock:
            self._open.add(sock)
        try:
            sock.settimeout(_IO_TIMEOUT_S)
            if isinstance(sock, ssl.SSLSocket):
                try:
                    sock.do_handshake()
                except OSError as exc:  # ssl.SSLError included
                    self.owner._record(
                        AccessRecord(
                            time=self.owner.clock.now(),
                            client=f"{client_address[0]}:{client_address[1]}",
                            scheme=self.scheme,
                            tls_version=None,
                            method="-",
                            path="-",
                            status=0,
                            error=f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}",
                        )
                    )
                    return
            super().finish_request(request, client_address)
        finally:
            with self._open_lock:
                self._open.discard(sock)

    def server_bind(self) -> None:
        # HTTPServer.server_bind would call socket.getfqdn() (a reverse DNS lookup); not needed.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, addr = self.socket.accept()
        if self.context is not None:
            sock = self.context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, addr

    def close_open_connections(self) -> None:
        with self._open_lock:
            socks = list(self._open)
        for sock in socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed by the peer


class OtaImageHost:
    """HTTPS server for signed OTA images; see the module docstring.

    *cert_path* / *key_path*: the host's server certificate (from the lab CA, SAN
    covering *host* or *url_host*) and key. *port* 0 picks a free port. *url_host* is
    the host name put into URLs when nodes reach this machine by another name.
    """

    def __init__(
        self,
        state_dir: Path,
        cert_path: Path,
        key_path: Path,
        clock: Clock,
        host: str = "127.0.0.1",
        port: int = 0,
        url_lifetime_s: float = 3600,
        *,
        plain_http: bool = False,
        plain_http_port: int = 0,
        url_host: str | None = None,
        stall_hold_s: float = STALL_HOLD_S,
    ):
        if url_lifetime_s <= 0:
            raise ValueError(f"url_lifetime_s must be positive, got {url_lifetime_s}")
        if stall_hold_s <= 0:
            raise ValueError(f"stall_hold_s must be positive, got {stall_hold_s}")
        self.state_dir = Path(state_dir)
        self.cert_path = Path(cert_path)
        self.key_path = Path(key_path)
        self.clock = clock
        self.host = host
        self.port = port
        self.url_lifetime_s = url_lifetime_s
        self.plain_http = plain_http
        self.plain_http_port = plain_http_port
        self.url_host = url_host or host
        self.stall_hold_s = stall_hold_s
        self.access_log_path = self.state_dir / "ota-access.jsonl"
        self.published_log_path = self.state_dir / "ota-published.jsonl"
        self.images_dir = self.state_dir / "ota-images"
        self._entries: dict[str, _Entry] = {}
        self._records: list[AccessRecord] = []
        self._record_tokens: list[str | None] = []  # the URL token of each record, never written out
        self._cond = threading.Condition()
        self._stopping = threading.Event()
        self._log_lock = threading.Lock()
        self._servers: list[_Server] = []
        self._threads: dict[_Server, threading.Thread] = {}

    def __repr__(self) -> str:
        state = self.url if self._servers else "stopped"
        return f"OtaImageHost({state}, state_dir={str(self.state_dir)!r})"

    def __enter__(self) -> OtaImageHost:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind and serve in background threads. Raises :class:`OtaHostError` with the
        reason when the port is taken or the certificate cannot be loaded."""
        if self._servers:
            return
        self._stopping.clear()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.images_dir.mkdir(parents=True, exist_ok=True)
        context = self._tls_context()
        listeners = [(self.port, context)]
        if self.plain_http:
            listeners.append((self.plain_http_port, None))
        try:
            for port, ctx in listeners:
                self._servers.append(self._bind(port, ctx))
        except OtaHostError:
            self.stop()
            raise
        for server in self._servers:
            thread = threading.Thread(
                target=server.serve_forever, kwargs={"poll_interval": _POLL_S}, name=f"ota-host-{server.scheme}", daemon=True
            )
            thread.start()
            self._threads[server] = thread
        log.info("OTA host serving on %s%s", self.url, f" and {self.plain_url}" if self.plain_http else "")

    def stop(self) -> None:
        """Stop serving and cut open connections, stalled ones included (their daemon
        threads then end). Idempotent."""
        self._stopping.set()
        servers, self._servers = self._servers, []
        threads, self._threads = self._threads, {}
        for server in servers:
            thread = threads.get(server)
            if thread is not None:
                server.shutdown()  # returns once serve_forever has left its loop
                thread.join()
            server.close_open_connections()
            server.server_close()  # joins the connection threads (block_on_close)

    @property
    def url(self) -> str:
        """``https://host:port`` of the running host."""
        return f"https://{self._netloc(self._server('https'))}"

    @property
    def plain_url(self) -> str:
        """``http://host:port`` of the plain-HTTP listener (``plain_http=True`` only)."""
        return f"http://{self._netloc(self._server('http'))}"

    # ------------------------------------------------------------------ publishing

    def publish(
        self,
        job_id: str,
        node_id: str,
        image: bytes,
        *,
        scheme: Literal["https", "http"] = "https",
        cut_after: int | None = None,
        stall_after: int | None = None,
    ) -> PublishedImage:
        """Serve *image* for *node_id*'s part of OTA job *job_id* at a fresh unguessable
        URL that expires ``url_lifetime_s`` from now (by the host's clock).

        *scheme* ``http`` makes ``url`` the plain-HTTP listener's (``plain_http=True``
        only). *cut_after* / *stall_after* N (at most one, 0 ≤ N < image size) cut every
        GET of this URL short at file offset N; see the module docstring."""
        if not job_id or not node_id:
            raise ValueError("publish needs a job id and a node id")
        if not image:
            raise ValueError("refusing to publish an empty image")
        if scheme not in ("https", "http"):
            raise ValueError(f"scheme must be https or http, got {scheme!r}")
        fault, fault_at = delivery_fault(cut_after, stall_after, len(image))
        https_base = self.url  # raises if not started
        if scheme == "http" and not self.plain_http:
            raise OtaHostError(
                "cannot publish a plain-HTTP OTA URL: this OTA host runs without its plain-HTTP listener "
                "(plain_http=False; the local stack starts it in test mode only)"
            )
        sha256 = hashlib.sha256(image).hexdigest()
        path = self.images_dir / f"{sha256}.bin"
        if not path.is_file():
            tmp = path.with_suffix(f".tmp{os.getpid()}-{threading.get_ident()}")
            tmp.write_bytes(image)
            tmp.replace(path)
        token = secrets.token_urlsafe(32)
        name = (_NAME_CHARS.sub("-", job_id).strip(".-") or "image")[:60] + ".bin"
        suffix = f"/ota/{token}/{name}"
        plain_url = self.plain_url + suffix if self.plain_http else None
        published = PublishedImage(
            url=plain_url if scheme == "http" and plain_url else https_base + suffix,
            file_size=len(image),
            sha256=sha256,
            md5=hashlib.md5(image, usedforsecurity=False).hexdigest(),
            job_id=job_id,
            node_id=node_id,
            expires_at=self.clock.now() + self.url_lifetime_s,
            plain_url=plain_url,
            fault=fault,
            fault_at=fault_at,
        )
        with self._cond:
            self._entries[token] = _Entry(published, path, name)
        self._append(
            self.published_log_path,
            {
                "time": self.clock.now(),
                "job_id": job_id,
                "node_id": node_id,
                "url": _redact_path(suffix),
                "file_size": published.file_size,
                "sha256": sha256,
                "expires_at": published.expires_at,
                "scheme": scheme,
                "fault": fault,
                "fault_at": fault_at,
            },
        )
        log.info(
            "OTA job %s for node %s: %d bytes, sha256 %s, expires at %.0f%s",
            job_id,
            node_id,
            len(image),
            sha256,
            published.expires_at,
            f", {fault} after {fault_at} bytes" if fault else "",
        )
        return published

    def revoke(self, url: str) -> bool:
        """Stop serving *url* at once (404 from now on); False if it was not published."""
        m = _PATH.match(urlsplit(url).path)
        with self._cond:
            return bool(m) and self._entries.pop(m["token"], None) is not None

    # ------------------------------------------------------------------ evidence

    def access_log(self) -> list[AccessRecord]:
        """Every request (and failed TLS handshake) so far, oldest first."""
        with self._cond:
            return list(self._records)

    def requests_for(self, url: str) -> list[AccessRecord]:
        """The logged requests for *url* (its token, on any listener of this host), oldest first."""
        m = _PATH.match(urlsplit(url).path)
        if m is None:
            return []
        with self._cond:
            return [r for r, t in zip(self._records, self._record_tokens, strict=True) if t == m["token"]]

    def wait_for_access(self, predicate: Callable[[AccessRecord], bool], timeout: float) -> AccessRecord:
        """Block until a logged request satisfies *predicate*; TimeoutError names what
        was awaited and what was seen."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for record in self._records:
                    if predicate(record):
                        return record
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [f"{r.method} {r.path} {r.status}" for r in self._records[-5:]]
                    raise TimeoutError(f"no matching OTA download within {timeout:.1f} s; last requests: {seen}")
                self._cond.wait(remaining)

    # ------------------------------------------------------------------ internals

    def _tls_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert_path, self.key_path)
        except (OSError, ssl.SSLError) as exc:
            raise OtaHostError(
                f"cannot load the OTA host certificate {self.cert_path} / key {self.key_path}: {exc} — "
                "issue one from the lab CA (LabPki.server_cert) and check both files are readable PEM"
            ) from None
        return context

    def _bind(self, port: int, context: ssl.SSLContext | None) -> _Server:
        try:
            return _Server((self.host, port), self, context)
        except OSError as exc:
            scheme = "HTTPS" if context else "plain HTTP"
            if exc.errno == errno.EADDRINUSE:
                raise OtaHostError(
                    f"cannot start the OTA host's {scheme} listener: {self.host}:{port} is already in use — "
                    f"stop what holds it (`ss -ltnp 'sport = :{port}'`) or configure another port (0 picks a free one)"
                ) from None
            raise OtaHostError(f"cannot start the OTA host's {scheme} listener on {self.host}:{port}: {exc}") from None

    def _server(self, scheme: str) -> _Server:
        for server in self._servers:
            if server.scheme == scheme:
                return server
        if scheme == "http" and not self.plain_http:
            raise OtaHostError("the OTA host runs without a plain-HTTP listener (plain_http=False)")
        raise OtaHostError("the OTA host is not running; call start() first")

    def _netloc(self, server: _Server) -> str:
        port = server.server_address[1]
        host = f"[{self.url_host}]" if ":" in self.url_host else self.url_host
        return f"{host}:{port}"

    def _append(self, path: Path, record: dict[str, Any]) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._log_lock, open(path, "a", encoding="utf-8") as f:
            f.write(line)

    def _record(self, record: AccessRecord, token: str | None = None) -> None:
        self._append(self.access_log_path, asdict(record))
        with self._cond:
            self._records.append(record)
            self._record_tokens.append(token)
            self._cond.notify_all()

    def _serve(self, req: _Handler, *, head: bool) -> None:
        server = req.server
        sock = req.connection
        tls_version = sock.version() if isinstance(sock, ssl.SSLSocket) else None
        range_header = req.headers.get("Range")
        base = {
            "time": self.clock.now(),
            "client": f"{req.client_address[0]}:{req.client_address[1]}",
            "scheme": server.scheme,
            "tls_version": tls_version,
            "method": req.command,
            "path": _redact_path(req.path),
            "range": range_header,
            "user_agent": req.headers.get("User-Agent"),
        }
        m = _PATH.match(urlsplit(req.path).path)
        token = m["token"] if m else None
        with self._cond:
            entry = self._entries.get(token) if token else None
        if entry is None or (m is not None and m["name"] != entry.name):
            self._reply(req, HTTPStatus.NOT_FOUND, b"no such image\n", head=head)
            self._record(AccessRecord(**base, status=404), token)
            return
        pub = entry.published
        ids = {"job_id": pub.job_id, "node_id": pub.node_id, "sha256": pub.sha256}
        if self.clock.now() >= pub.expires_at:
            self._reply(req, HTTPStatus.GONE, b"this OTA URL has expired\n", head=head)
            self._record(AccessRecord(**base, **ids, status=410), token)
            return
        size = pub.file_size
        try:
            wanted = parse_byte_range(range_header, size)
        except RangeNotSatisfiable as exc:
            self._reply(
                req, HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, f"{exc}\n".encode(), head=head, extra={"Content-Range": f"bytes */{size}"}
            )
            self._record(AccessRecord(**base, **ids, status=416), token)
            return
        first, last = wanted if wanted is not None else (0, size - 1)
        length = last - first + 1
        # A delivery fault cuts the body at file offset fault_at; ranges ending before it are served whole.
        fault = pub.fault if not head and pub.fault_at is not None and pub.fault_at <= last else None
        to_send = max(0, pub.fault_at - first) if fault and pub.fault_at is not None else length
        status = HTTPStatus.PARTIAL_CONTENT if wanted is not None else HTTPStatus.OK
        req.send_response(status)
        req.send_header("Content-Type", "application/octet-stream")
        req.send_header("Content-Length", str(length))
        req.send_header("Accept-Ranges", "bytes")
        req.send_header("ETag", f'"{pub.sha256}"')
        req.send_header("Cache-Control", "no-store")
        if wanted is not None:
            req.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        sent = 0
        error = None
        try:
            req.end_headers()
            if not head:
                with open(entry.path, "rb") as f:
                    f.seek(first)
                    while sent < to_send:
                        chunk = f.read(min(_CHUNK, to_send - sent))
                        if not chunk:
                            raise OSError(f"{entry.path} is shorter than published ({first + sent} of {size} bytes)")
                        req.wfile.write(chunk)
                        sent += len(chunk)
                req.wfile.flush()
        except OSError as exc:  # the client went away mid-transfer (ssl.SSLError is an OSError)
            error = f"transfer ended after {sent} of {length} bytes: {exc}"
            req.close_connection = True
            fault = None  # it ended before the fault point
        if fault is not None:
            req.close_connection = True  # cut: closed once this returns; stall: after the hold
        record = AccessRecord(
            **base, **ids, status=int(status), bytes_sent=sent, complete=(sent == length and not head), error=error, fault=fault
        )
        self._record(record, token)
        if fault == "stall":
            why = self._hold(sock)
            log.info(
                "stalled OTA download of job %s for node %s (%d of %d bytes sent) released: %s", pub.job_id, pub.node_id, sent, length, why
            )

    def _hold(self, sock: socket.socket) -> str:
        """Keep a stalled connection open, sending nothing, until the client goes away, the
        host stops or ``stall_hold_s`` passes; say which. Reads the raw socket, below TLS:
        the connection is only ever closed afterwards, and stop() may shut it down meanwhile."""
        deadline = time.monotonic() + self.stall_hold_s
        while not self._stopping.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return f"held for stall_hold_s={self.stall_hold_s:g} s"
            try:
                readable, _, _ = select.select([sock], [], [], min(_POLL_S, remaining))
                if readable and not socket.socket.recv(sock, _CHUNK, socket.MSG_DONTWAIT):
                    return "the client closed the connection"
            except BlockingIOError:
                continue
            except (OSError, ValueError) as exc:  # reset by the client, or shut down by stop()
                return f"the connection ended: {exc}"
        return "the OTA host stopped"

    @staticmethod
    def _reply(req: _Handler, status: HTTPStatus, body: bytes, *, head: bool, extra: dict[str, str] | None = None) -> None:
        try:
            req.send_response(status)
            req.send_header("Content-Type", "text/plain; charset=utf-8")
            req.send_header("Content-Length", str(len(body)))
            req.send_header("Cache-Control", "no-store")
            for key, value in (extra or {}).items():
                req.send_header(key, value)
            req.end_headers()
            if not head:
                req.wfile.write(body)
        except OSError:
            req.close_connection = True

"""The cloud REST API served over HTTPS by uvicorn, in a thread of this process.

The listening socket is bound here, before uvicorn starts, so a taken port is a clear
:class:`ApiServerError` at :meth:`ApiServer.start` (not a log line in a thread), and
``port=0`` gets a free port whose number is known at once. TLS 1.2 or newer only, with a
server certificate from the lab CA for ``localhost`` and ``127.0.0.1``.

uvicorn is told not to configure logging (``log_config=None``): its ``uvicorn.error`` and
``uvicorn.access`` loggers propagate to whatever the rig set up, and this module never
installs handlers of its own. Tokens travel in headers, which uvicorn does not log.
"""

from __future__ import annotations

import errno
import socket
import ssl
import threading
from collections.abc import Callable
from types import TracebackType

import uvicorn
from fastapi import FastAPI

from rig.cloud.pki import CertPair, LabPki

API_CERT_NAME = "rig-cloud-api"


class ApiServerError(RuntimeError):
    """The API server could not start or stop; the message says why and what to do."""


class _Server(uvicorn.Server):
    """uvicorn's server with a start-up event instead of a polled ``started`` flag."""

    def __init__(self, config: uvicorn.Config, ready: threading.Event):
        super().__init__(config)
        self._ready = ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets=sockets)
        finally:
            self._ready.set()


def _tls12_factory(config: uvicorn.Config, default: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
    context = default()
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ApiServer:
    """``start()`` / ``stop()`` / ``url`` around one uvicorn server for *app*.

    ``port=0`` picks a free port on *host*; a given port that is taken raises
    :class:`ApiServerError` naming it.
    """

    def __init__(self, app: FastAPI, pki: LabPki, host: str = "127.0.0.1", port: int = 0, *, cert_name: str = API_CERT_NAME):
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not a TCP port")
        self.app = app
        self.pki = pki
        self.host = host
        self.requested_port = port
        self.cert_name = cert_name
        self._socket: socket.socket | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._error: Exception | SystemExit | None = None

    @property
    def cert(self) -> CertPair:
        hosts = [] if self.host in ("127.0.0.1", "localhost") else [self.host]
        return self.pki.server_cert(self.cert_name, hosts)

    @property
    def ca_cert_path(self) -> str:
        """What a client must trust to reach :attr:`url`."""
        return str(self.pki.ca_cert_path)

    @property
    def port(self) -> int:
        if self._socket is None:
            raise ApiServerError("the API server has no port yet; call start() first")
        return int(self._socket.getsockname()[1])

    @property
    def url(self) -> str:
        """``https://<host>:<port>`` — RainMaker clients append ``/v1/``."""
        return f"https://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._server is not None and self._server.started

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.requested_port))
            sock.listen(128)
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise ApiServerError(
                    f"port {self.requested_port} on {self.host} is already in use, so the cloud API cannot listen there. "
                    "Fix: stop whatever holds it (`rig status` shows a running stack; `ss -ltnp` shows the process), "
                    "or use port 0 to pick a free one"
                ) from exc
            raise ApiServerError(f"cannot listen on {self.host}:{self.requested_port}: {exc}") from exc
        sock.setblocking(False)
        return sock

    def start(self, timeout: float = 10.0) -> None:
        """Bind, start uvicorn in a thread, and return once it serves (or raise why not)."""
        if self._thread is not None:
            return
        cert = self.cert
        sock = self._bind()
        config = uvicorn.Config(
            self.app,
            ssl_certfile=str(cert.cert_path),
            ssl_keyfile=str(cert.key_path),
            ssl_context_factory=_tls12_factory,
            log_config=None,
            lifespan="off",
            server_header=False,
            timeout_graceful_shutdown=5,
        )
        ready = threading.Event()
        server = _Server(config, ready)

        def run() -> None:
            try:
                server.run(sockets=[sock])
            except (Exception, SystemExit) as exc:  # uvicorn sys.exit()s on a failed start-up; report it to start()
                self._error = exc
            finally:
                ready.set()

        self._socket, self._server = sock, server
        self._thread = threading.Thread(target=run, name=f"rig-cloud-api-{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or not server.started:
            reason = repr(self._error) if self._error is not None else f"not serving within {timeout:g} s"
            self.stop()
            raise ApiServerError(f"the cloud API on {self.host}:{self.requested_port} did not start: {reason}")

    def stop(self, timeout: float = 10.0) -> None:
        """Ask uvicorn to finish (in-flight requests get a few seconds) and join its thread."""
        server, thread, sock = self._server, self._thread, self._socket
        if server is not None:
            server.should_exit = True
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive() and server is not None:
                server.force_exit = True
                thread.join(timeout)
            if thread.is_alive():
                raise ApiServerError(f"the cloud API thread did not stop within {2 * timeout:g} s")
        if sock is not None:
            sock.close()
        self._server = self._thread = None
        self._socket = None

    def __enter__(self) -> ApiServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

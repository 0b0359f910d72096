"""The local MQTT broker: a real mosquitto 2.0 supervised by the rig, with RainMaker's node policy.

The policy (DESIGN.md "Cloud", rainmaker-protocol.md §1.1–1.2, §9.1):

- TLS 1.2 or newer only, a client certificate from the lab CA required and checked
  against the lab CRL, no plaintext listener, no anonymous access;
- a node may publish and subscribe under ``node/<node_id>/#`` and publish under
  ``$aws/rules/<rule>/node/<node_id>/#`` (the basic-ingest form RainMaker firmware uses
  by default), nothing else;
- a node's MQTT client id must be its certificate CN (= node id);
- the cloud's own service identity reaches every node's topics.

How mosquitto 2.0.11 is made to do that, and why each piece:

``mosquitto.conf`` (written per run; see mosquitto.conf(5) of 2.0.11)
    one ``listener`` on the given host and port with ``cafile``/``certfile``/``keyfile``,
    ``require_certificate true``, ``crlfile`` (the lab CRL), ``tls_version tlsv1.2``. In
    2.0 ``tls_version`` is a *minimum* ("In Mosquitto version 1.6.x and earlier, this
    option set the only TLS protocol version that was allowed"); checked here: 1.2 and
    1.3 connect, 1.1 gets a ``protocol version`` alert. Left unset, 2.0.11 itself would
    accept TLS 1.1 — only OpenSSL 3's default security level refuses it (with
    ``ciphers DEFAULT:@SECLEVEL=0`` a 1.1 client gets in) — so the line is not optional.
    ``allow_anonymous false``, ``allow_zero_length_clientid false``, ``persistence
    false``, ``per_listener_settings false``. No other listener exists, so nothing
    listens in plaintext. ``user`` is the rig's own user: run as root, mosquitto 2.0
    otherwise drops to the ``mosquitto`` user and cannot read the 0600 keys in the state
    directory.

``acl_file``
    ``pattern readwrite node/%u/#`` and ``pattern write $aws/rules/+/node/%u/#`` for
    everyone; ``user <service>`` with ``topic readwrite #``, ``topic readwrite $aws/#`` and
    ``topic read $SYS/#`` (broker statistics).
    ``%u`` is the username, which the plugin below sets to the certificate CN. A ``#``
    in an ACL does not cover topics that start with ``$`` (MQTT 3.1.1 §4.7.2, which
    mosquitto applies to ACL matching too), hence the separate ``$aws/#`` line; a pattern
    that *starts* with the literal ``$aws`` level matches ``$aws/…`` topics normally —
    both proven by data flow in ``tests/test_cloud_broker.py``. mosquitto 2.0 answers a
    SUBSCRIBE to a forbidden filter with a granted SUBACK and then delivers nothing, so
    the policy is judged by what arrives, never by SUBACK codes.

``rig_clientid`` plugin (``mosquitto_plugin/rig_clientid.c``, built by :func:`build_plugin`)
    An ACL cannot refuse a connection, and mosquitto has no "client id must equal CN"
    option: ``use_username_as_clientid`` silently *replaces* the client id instead of
    refusing it, which would hide exactly the device bug a test must catch. The
    documented hook for deciding whether a CONNECT is accepted is a plugin's
    ``MOSQ_EVT_BASIC_AUTH`` callback (mosquitto_broker.h). But with
    ``use_identity_as_username true`` mosquitto 2.0.11 skips ``mosquitto_unpwd_check``
    and so never calls ``MOSQ_EVT_BASIC_AUTH`` (checked with a probe plugin: no
    callback, and a client id ≠ CN connected). So that option is left off and the
    plugin does the identity step itself: it reads the verified peer certificate
    (``mosquitto_client_certificate``), refuses a client id ≠ CN (except the service
    identity), and sets the username to the CN (``mosquitto_set_username``) — the same
    ``%u`` that ``use_identity_as_username`` would give, whatever username the client
    sent. A plugin, not another broker: mosquitto is the Debian-packaged broker the
    design names, and the plugin is under 150 lines of C against its public plugin API.

Start and stop: :meth:`MosquittoBroker.start` writes the files, launches
``mosquitto -c``, and waits until the port accepts a TCP connection, pacing on the
process itself (``Popen.wait`` with a short timeout), so a broker that dies is reported
at once with its log. :meth:`~MosquittoBroker.stop` sends SIGTERM and waits.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO

from rig.cloud.pki import SERVICE_IDENTITY, CertPair, LabPki

__all__ = [
    "MOSQUITTO",
    "PLUGIN_SOURCE",
    "BrokerError",
    "MosquittoBroker",
    "build_plugin",
]

MOSQUITTO = "/usr/sbin/mosquitto"
PLUGIN_SOURCE = Path(__file__).with_name("mosquitto_plugin") / "rig_clientid.c"
PLUGIN_CFLAGS = ("-shared", "-fPIC", "-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror")
PLUGIN_LIBS = ("-lcrypto",)
BUILD_PACKAGES = "gcc libc6-dev mosquitto-dev libmosquitto-dev libssl-dev"
SERVER_CERT_NAME = "mqtt-broker"


class BrokerError(RuntimeError):
    """The broker could not be built, started or stopped; the message says why and what to do."""


def build_plugin(dest: Path) -> Path:
    """Compile ``rig_clientid.c`` into ``dest/rig_clientid-<hash>.so`` and return its path.

    The hash covers the source and the compiler flags, so an unchanged plugin is built
    once per state directory and a changed one is rebuilt. Headers come from Debian's
    ``mosquitto-dev`` (mosquitto_broker.h, mosquitto_plugin.h), ``libmosquitto-dev``
    (mosquitto.h: the ``MOSQ_ERR_*`` and ``MOSQ_LOG_*`` constants) and ``libssl-dev``.
    """
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BrokerError(f"gcc is not installed, so the broker's client-id plugin cannot be built. Fix: apt-get install {BUILD_PACKAGES}")
    source = PLUGIN_SOURCE.read_bytes()
    digest = hashlib.sha256(source + "\0".join(PLUGIN_CFLAGS + PLUGIN_LIBS).encode()).hexdigest()[:16]
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / f"rig_clientid-{digest}.so"
    if target.exists():
        return target
    fd, tmp = tempfile.mkstemp(dir=dest, prefix=".rig_clientid-", suffix=".so")
    os.close(fd)
    try:
        run = subprocess.run(
            [gcc, *PLUGIN_CFLAGS, "-o", tmp, str(PLUGIN_SOURCE), *PLUGIN_LIBS],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if run.returncode != 0:
            hint = f"install the build dependencies: apt-get install {BUILD_PACKAGES}"
            detail = run.stderr.strip()[-2000:]
            raise BrokerError(f"building {PLUGIN_SOURCE.name} failed (gcc exit {run.returncode}): {detail}\nFix: {hint}")
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return target


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _port_in_use_error(host: str, port: int) -> BrokerError:
    return BrokerError(
        f"{host}:{port} is already in use, so the MQTT broker cannot listen there. "
        f"Fix: stop whatever holds it (a stack from an earlier `rig up`? then `rig down`; "
        f"otherwise find it with `ss -ltnp 'sport = :{port}'`), or choose another port (port 0 picks a free one)"
    )


def _check_bindable(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise _port_in_use_error(host, port) from exc
            raise BrokerError(f"cannot listen on {host}:{port}: {exc.strerror}") from exc


def _conf_path(path: Path) -> str:
    text = str(path)
    if "\n" in text or "\r" in text:
        raise BrokerError(f"path {text!r} cannot appear in mosquitto.conf (line break)")
    return text


class MosquittoBroker:
    """One mosquitto process with the rig's per-node policy, its files under *state_dir*.

    ``port=0`` picks a free port at :meth:`start`; a given port that is taken is a
    :class:`BrokerError` naming the port and the fix. Use as a context manager or call
    :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        state_dir: Path,
        pki: LabPki,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        service_identity: str = SERVICE_IDENTITY,
        executable: str = MOSQUITTO,
    ):
        if not 0 <= port <= 65535:
            raise ValueError(f"port {port} is not a TCP port")
        self.state_dir = Path(state_dir)
        self.pki = pki
        self.host = host
        self.service_identity = service_identity
        self.executable = executable
        self._requested_port = port
        self._port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: IO[bytes] | None = None

    # -- files -----------------------------------------------------------------

    @property
    def conf_path(self) -> Path:
        return self.state_dir / "mosquitto.conf"

    @property
    def acl_path(self) -> Path:
        return self.state_dir / "mosquitto.acl"

    @property
    def log_path(self) -> Path:
        """mosquitto's own log (``log_type all``: connections, CONNACK codes, packets; never payloads)."""
        return self.state_dir / "mosquitto.log"

    @property
    def stderr_path(self) -> Path:
        """What mosquitto printed before its log file was open (config errors)."""
        return self.state_dir / "mosquitto.stderr"

    @property
    def pid_path(self) -> Path:
        return self.state_dir / "mosquitto.pid"

    @property
    def ca_cert_path(self) -> Path:
        """The CA that issued the broker's certificate: what a node or client trusts."""
        return self.pki.ca_cert_path

    @property
    def server_cert(self) -> CertPair:
        hosts = [] if self.host in ("127.0.0.1", "localhost") else [self.host]
        return self.pki.server_cert(SERVER_CERT_NAME, hosts)

    # -- state -------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise BrokerError("the broker has no port yet; call start() first")
        return self._port

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def service_cert(self) -> CertPair:
        """The cloud service's client certificate (full access, any client id)."""
        return self.pki.service_cert(self.service_identity)

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 15.0) -> None:
        """Build the plugin, write the config, launch mosquitto and wait until it accepts connections."""
        if self.running:
            raise BrokerError(f"the broker is already running (pid {self.pid}, port {self._port})")
        if not Path(self.executable).exists():
            raise BrokerError(f"{self.executable} not found. Fix: apt-get install mosquitto")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        plugin = build_plugin(self.state_dir / "plugin")
        self.service_cert()  # the identity the ACL names must exist before the first client
        attempts = 1 if self._requested_port else 3
        for attempt in range(attempts):
            port = self._requested_port or _free_port(self.host)
            if self._requested_port:
                _check_bindable(self.host, port)
            self._write_config(port, plugin)
            log_offset = self.log_mark()
            self._launch()
            try:
                self._wait_listening(port, timeout, log_offset)
            except _PortTaken as exc:
                if attempt + 1 < attempts:
                    continue  # another process took the free port between our check and mosquitto's bind
                raise _port_in_use_error(self.host, port) from exc
            self._port = port
            return

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM and wait; SIGKILL only if mosquitto ignores SIGTERM for *timeout* seconds."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=timeout)
                    raise BrokerError(f"mosquitto (pid {proc.pid}) ignored SIGTERM for {timeout} s and was killed") from None
        finally:
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None

    def reload(self, timeout: float = 10.0) -> None:
        """SIGHUP: mosquitto re-reads the ACL file and its TLS files (certificates, CRL).

        Returns once the log shows ``Reloading config.``. mosquitto handles the reload in
        its single-threaded main loop, so a connection opened after that line is
        accepted with the reloaded settings.
        """
        if not self.running or self._proc is None:
            raise BrokerError("the broker is not running; nothing to reload")
        mark = self.log_mark()
        self._proc.send_signal(signal.SIGHUP)
        self.wait_for_log("Reloading config.", mark, timeout)

    def log_mark(self) -> int:
        """The log's current end; hand it to :meth:`wait_for_log` to look only at what follows."""
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def wait_for_log(self, needle: str, since: int = 0, timeout: float = 10.0) -> str:
        """Wait until the log, from byte *since*, contains *needle*; returns that part of the log.

        mosquitto sometimes acts before it logs (a TLS alert reaches the client before the
        broker logs the OpenSSL error), so a test reading the log must wait for the line.
        """
        text = ""
        for _ in self._paced(timeout):
            text = self._log_from(since)
            if needle in text:
                return text
        raise BrokerError(f"mosquitto did not log {needle!r} within {timeout} s; it logged:\n{text.strip()[-2000:]}")

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------------

    def _write_config(self, port: int, plugin: Path) -> None:
        server = self.server_cert
        acl = "\n".join(
            [
                "# rig: RainMaker node policy (rainmaker-protocol.md §1.1-1.2). %u is the certificate CN,",
                "# set by the rig_clientid plugin. '#' does not cover '$'-topics, hence the $aws/# line.",
                f"user {self.service_identity}",
                "topic readwrite #",
                "topic readwrite $aws/#",
                "topic read $SYS/#",
                "",
                "pattern readwrite node/%u/#",
                "pattern write $aws/rules/+/node/%u/#",
                "",
            ]
        )
        self.acl_path.write_text(acl)
        conf = "\n".join(
            [
                "# Written by rig.cloud.broker for one run; see that module for why each line is here.",
                "per_listener_settings false",
                "allow_anonymous false",
                "allow_zero_length_clientid false",
                "persistence false",
                f"user {pwd.getpwuid(os.geteuid()).pw_name}",
                f"pid_file {_conf_path(self.pid_path)}",
                f"log_dest file {_conf_path(self.log_path)}",
                "log_type all",
                "log_timestamp true",
                "log_timestamp_format %Y-%m-%dT%H:%M:%S",
                "connection_messages true",
                f"acl_file {_conf_path(self.acl_path)}",
                f"plugin {_conf_path(plugin)}",
                f"plugin_opt_service_identity {self.service_identity}",
                "",
                f"listener {port} {self.host}",
                "protocol mqtt",
                f"cafile {_conf_path(self.pki.ca_cert_path)}",
                f"certfile {_conf_path(server.cert_path)}",
                f"keyfile {_conf_path(server.key_path)}",
                f"crlfile {_conf_path(self.pki.crl_path)}",
                "require_certificate true",
                "tls_version tlsv1.2",
                "",
            ]
        )
        self.conf_path.write_text(conf)

    def _launch(self) -> None:
        if self._stderr is not None:
            self._stderr.close()
        self._stderr = open(self.stderr_path, "wb")  # lives as long as the process; one launch per file
        self._proc = subprocess.Popen(
            [self.executable, "-c", str(self.conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C at the terminal reaches the rig, which stops the broker cleanly
        )

    def _log_from(self, offset: int) -> str:
        if not self.log_path.exists():
            return ""
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def _paced(self, timeout: float) -> Iterator[None]:
        """Yield until *timeout*, pacing on the broker process (returns at once if it exits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            yield
            if self._proc is None or self._proc.poll() is not None:
                return
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=0.05)

    def _wait_listening(self, port: int, timeout: float, log_offset: int) -> None:
        listening = False
        for _ in self._paced(timeout):
            if not listening:
                try:
                    # A bare TCP connect: mosquitto logs it as a failed TLS client ("unexpected eof"); that
                    # first log line after start is this readiness probe.
                    with socket.create_connection((self.host, port), timeout=1.0):
                        listening = True
                except ConnectionRefusedError:
                    continue
            # The kernel accepts connections as soon as the socket listens; mosquitto installs its
            # signal handlers after that and then logs "mosquitto version … running" — until then
            # a SIGTERM kills it without its clean shutdown.
            if MOSQUITTO_RUNNING in self._log_from(log_offset):
                return
        if self._proc is not None and self._proc.poll() is not None:
            code = self._proc.returncode
            self._proc = None
            log = self._log_from(log_offset) + self.stderr_path.read_text(errors="replace")
            if "Address already in use" in log:
                raise _PortTaken(port)
            raise BrokerError(f"mosquitto exited with status {code} while starting; its log:\n{log.strip()[-3000:]}")
        self.stop()
        raise BrokerError(f"mosquitto did not accept connections on {self.host}:{port} within {timeout} s; see {self.log_path}")


MOSQUITTO_RUNNING = " running"
"""The tail of mosquitto's ``mosquitto version X running`` line (``src/mosquitto.c``), logged once
its listeners and signal handlers are set up."""


class _PortTaken(Exception):
    def __init__(self, port: int):
        super().__init__(port)
        self.port = port

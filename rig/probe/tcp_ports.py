"""A TCP connect scan of a board's address: which ports accept a connection, and whose they are.

EN 303 645 5.6-1 wants every unused network interface disabled and 5.6-2 the unauthenticated
exposure minimised; ETSI TS 103 701 tests it by scanning the device and comparing what answers
with the interfaces the supplier's IXIT documents (``product/ixit.yaml``). A RainMaker node
legitimately listens on TCP 80 while it is being provisioned (ESP-IDF ``protocomm_httpd``,
stopped when provisioning ends) and on TCP 8080 once provisioned when it runs local control
(``esp_local_ctrl``, esp-rainmaker ``src/core/esp_rmaker_local_ctrl.c``); anything else that
accepts a connection is attack surface nobody declared.

The scan is a plain ``connect()`` per port from an asyncio loop (what ``nmap -sT`` does): no raw
sockets, no root, no nmap. A port *accepts* (open), *refuses* (an RST: closed) or stays silent
(no answer within the timeout: dropped on the way, or filtered); silent ports are tried once
more, because a lost SYN must not pass for a closed port. An address that answered on no port
at all cannot be judged, and is an error rather than an empty result.

Virtual boards own one loopback address each, ``127.0.1.N`` (``rig.boards.virtual_ports``). On
the host's loopback network a socket bound to ``0.0.0.0`` (or a dual-stack ``::``) answers on
*every* ``127.x`` address, so a port open on a virtual board's address may be the host's: the
cloud stack, another test's server, a developer's tool. :func:`scan_board` checks every port it
finds against :data:`LOOPBACK_REFERENCE`, a loopback address no board ever owns: a port that
also accepts there is the host's wildcard listener, not the board's. Listeners come and go while
other tests run, so the reference is asked at once when a port is found, and each port left
over is checked once more (the board's address and the reference again) before it is reported.
Two limits follow from looking from outside: a board port shadowed by a host wildcard listener
on the same port number cannot be seen, and a real board's LAN address has no reference (the
host's own listeners do not answer there, so none is needed).

The scan runs its own event loop (:func:`asyncio.run`); call it from synchronous code.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import resource
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

ALL_PORTS = range(1, 65536)
"""Every TCP port a listener can have (port 0 is not one)."""
LOOPBACK_REFERENCE = "127.0.1.1"
"""The loopback address no virtual board owns (``rig.boards.virtual_ports.check_virtual_address``
allows ``127.0.1.2`` … ``.254``): what a host wildcard listener answers on and a board never does."""
BANNER_MAX = 128
"""How much of a service's greeting :func:`banner` keeps: enough to recognise a shell prompt."""
DEFAULT_CONCURRENCY = 512
"""Connections in flight at once: a full loopback scan then takes a few seconds."""
FD_RESERVE = 64
"""File descriptors left to the rest of the process when the concurrency is capped to ``RLIMIT_NOFILE``."""
_SWEEP_TICK_S = 0.05
"""How often the scan closes connections past their deadline."""
_PENDING = {errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK, errno.EALREADY}


class PortScanError(RuntimeError):
    """The scan cannot judge the address (unresolvable, unreachable, no answer at all, out of
    file descriptors); the message says what to check."""


@dataclass
class _Sweep:
    """What one pass over a set of ports saw."""

    accepted: list[int] = field(default_factory=list)
    refused: int = 0
    unanswered: dict[int, str] = field(default_factory=dict)
    """Port → why it gave no verdict (silent past the timeout, or the errno the connect ended with)."""


@dataclass(frozen=True)
class PortScan:
    """One scan of a board's address, every port accounted for.

    ``open`` is every port that accepted on the address; it splits into ``host_wildcard`` (also
    accepted on the loopback reference: the host's listener), ``board_owned`` (the board's,
    confirmed by a second look) and ``vanished`` (closed again by the second look: a listener
    that came and went). ``unanswered`` gave no verdict twice: filtered, or lost."""

    address: str
    """The address as given (a name or an IP)."""
    ip: str
    """What it resolved to, and what was scanned."""
    reference: str | None
    """The loopback reference the open ports were checked against; None off loopback."""
    ports_scanned: int
    open: tuple[int, ...]
    host_wildcard: tuple[int, ...]
    board_owned: tuple[int, ...]
    vanished: tuple[int, ...]
    unanswered: tuple[int, ...]
    duration_s: float

    def record(self, unanswered_listed: int = 32) -> dict[str, object]:
        """The scan as evidence JSON (at most *unanswered_listed* silent ports by number)."""
        return {
            "address": self.address,
            "ip": self.ip,
            "loopback_reference": self.reference,
            "ports_scanned": self.ports_scanned,
            "open": list(self.open),
            "host_wildcard": list(self.host_wildcard),
            "board_owned": list(self.board_owned),
            "vanished": list(self.vanished),
            "unanswered_count": len(self.unanswered),
            "unanswered": list(self.unanswered[:unanswered_listed]),
            "duration_s": round(self.duration_s, 3),
        }


# --------------------------------------------------------------------------- addresses


def resolve(address: str) -> str:
    """*address* as an IP literal (a name is looked up once, IPv4 first, so a scan never hops
    between the addresses of one name)."""
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(address, None, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise PortScanError(f"cannot resolve board address {address!r}: {exc}. Fix: set address: in boards.yaml to its IP") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return str(infos[0][4][0])


def loopback_reference(address: str) -> str | None:
    """The address a host wildcard listener also answers on, for a board at *address*:
    :data:`LOOPBACK_REFERENCE` for an IPv4 loopback address, None for any other (a LAN address
    sees no host listener; on ``::1`` there is no second address to compare with)."""
    ip = ipaddress.ip_address(resolve(address))
    if ip.version != 4 or not ip.is_loopback:
        return None
    if str(ip) == LOOPBACK_REFERENCE:
        raise PortScanError(
            f"{LOOPBACK_REFERENCE} is the scanner's loopback reference (what only host wildcard listeners answer on), "
            "not a board address. Fix: give the virtual board 127.0.1.N with N in 2..254"
        )
    return LOOPBACK_REFERENCE


def _family(ip: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _checked_ports(ports: Iterable[int]) -> list[int]:
    """*ports* in order, once each, all in 1..65535 (else a ValueError naming the first bad one)."""
    seen: dict[int, None] = {}
    for port in ports:
        if not isinstance(port, int) or not 1 <= port <= 65535:
            raise ValueError(f"{port!r} is not a TCP port (1..65535)")
        seen[port] = None
    return list(seen)


def _capped(concurrency: int) -> int:
    """*concurrency*, no more than the process may open beside what it already holds."""
    if concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return concurrency
    in_use = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else FD_RESERVE
    return max(1, min(concurrency, soft - in_use - FD_RESERVE))


# --------------------------------------------------------------------------- the sweep


class _ConnectSweep:
    """Non-blocking ``connect()`` to each port, at most *concurrency* in flight; the loop's
    writer callbacks collect each outcome (``SO_ERROR``) and start the next port, a periodic
    sweep closes the connections past their deadline. One callback per socket rather than one
    task per port keeps a 65535-port loopback scan to a few seconds."""

    def __init__(self, ip: str, ports: list[int], concurrency: int, timeout_s: float, on_open: Callable[[int], None] | None):
        self.loop = asyncio.get_running_loop()
        self.ip = ip
        self.family = _family(ip)
        self.ports = iter(ports)
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.on_open = on_open
        self.in_flight: dict[int, tuple[int, socket.socket, float]] = {}
        """fd → (port, socket, deadline on the loop's clock)."""
        self.result = _Sweep()
        self.finished: asyncio.Future[None] = self.loop.create_future()
        self.sweeper: asyncio.TimerHandle | None = None
        self.refill_due = False

    async def run(self) -> _Sweep:
        try:
            self._fill()
            if not self.finished.done():
                self.sweeper = self.loop.call_later(_SWEEP_TICK_S, self._expire)
            await self.finished
        finally:
            if self.sweeper is not None:
                self.sweeper.cancel()
            for fd, (_port, sock, _deadline) in list(self.in_flight.items()):
                self.loop.remove_writer(fd)
                sock.close()
            self.in_flight.clear()
        return self.result

    def _fill(self) -> None:
        """Start ports until *concurrency* are in flight; finish when none are left."""
        if self.finished.done():
            return
        try:
            while len(self.in_flight) < self.concurrency:
                port = next(self.ports, None)
                if port is None:
                    break
                self._start(port)
        except OSError as exc:  # socket() itself failed: descriptors, memory
            self.finished.set_exception(
                PortScanError(
                    f"the scan of {self.ip} could not open a socket ({exc}) with {len(self.in_flight)} connections in flight. "
                    "Fix: scan with a lower concurrency, or raise the open-files limit (ulimit -n)"
                )
            )
            return
        if not self.in_flight:
            self.finished.set_result(None)

    def _start(self, port: int) -> None:
        sock = socket.socket(self.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        code = sock.connect_ex((self.ip, port))
        if code in _PENDING:
            fd = sock.fileno()
            self.in_flight[fd] = (port, sock, self.loop.time() + self.timeout_s)
            self.loop.add_writer(fd, self._writable, fd)
            return
        sock.close()
        self._record(port, code)

    def _writable(self, fd: int) -> None:
        entry = self.in_flight.pop(fd, None)
        self.loop.remove_writer(fd)
        if entry is None:
            return
        port, sock, _deadline = entry
        code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        sock.close()
        self._record(port, code)
        if not self.refill_due:  # one refill per loop iteration, after every socket that became ready
            self.refill_due = True
            self.loop.call_soon(self._refill)

    def _refill(self) -> None:
        self.refill_due = False
        self._fill()

    def _expire(self) -> None:
        now = self.loop.time()
        for fd, (port, sock, deadline) in list(self.in_flight.items()):
            if deadline <= now:
                del self.in_flight[fd]
                self.loop.remove_writer(fd)
                sock.close()
                self.result.unanswered[port] = f"no answer within {self.timeout_s:g} s"
        self._fill()
        if not self.finished.done():
            self.sweeper = self.loop.call_later(_SWEEP_TICK_S, self._expire)

    def _record(self, port: int, code: int) -> None:
        if code == 0:
            self.result.accepted.append(port)
            if self.on_open is not None:
                self.on_open(port)
        elif code == errno.ECONNREFUSED:
            self.result.refused += 1
        else:
            self.result.unanswered[port] = os.strerror(code)


async def _sweep(ip: str, ports: list[int], concurrency: int, timeout_s: float, on_open: Callable[[int], None] | None = None) -> _Sweep:
    """One pass, then one more over the ports that gave no verdict (a SYN or its answer lost
    must not pass for a closed port); raises when the address answered on no port at all."""
    first = await _ConnectSweep(ip, ports, concurrency, timeout_s, on_open).run()
    if first.unanswered:
        again = await _ConnectSweep(ip, sorted(first.unanswered), concurrency, timeout_s, on_open).run()
        first.accepted += again.accepted
        first.refused += again.refused
        first.unanswered = again.unanswered
    first.accepted.sort()
    if ports and not first.accepted and not first.refused:
        port, why = next(iter(first.unanswered.items()))
        raise PortScanError(
            f"{ip} answered on none of the {len(ports)} TCP ports scanned (port {port}: {why}): it is unreachable from this "
            "host or drops every connection attempt, so no port can be judged closed. Fix: check the board is up and on the "
            "lab network (ping it), and that no firewall sits between the host and the board"
        )
    return first


async def _accepts(ip: str, port: int, timeout_s: float) -> bool:
    """Whether *ip*:*port* accepts a TCP connection within *timeout_s* (closed politely at once)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(_family(ip), socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout_s):
            await loop.sock_connect(sock, (ip, port))
    except (OSError, TimeoutError):
        return False
    finally:
        sock.close()
    return True


# --------------------------------------------------------------------------- the public scans


async def _owner(ip: str, reference: str | None, port: int, timeout_s: float) -> str:
    """Whose *port* is, looked at now: ``board`` (it accepts on *ip* and, on loopback, not on the
    *reference* address, where only host wildcard listeners answer), ``host``, or ``vanished``."""
    if not await _accepts(ip, port, timeout_s):
        return "vanished"
    if reference is not None and await _accepts(reference, port, timeout_s):
        return "host"
    return "board"


def board_owned(address: str, port: int, *, timeout_s: float = 1.0) -> bool:
    """Whether *port* is open on the board at *address* itself, not a host wildcard listener."""
    ip = resolve(address)
    return asyncio.run(_owner(ip, loopback_reference(ip), port, timeout_s)) == "board"


def scan_board(
    address: str, ports: Iterable[int] = ALL_PORTS, *, concurrency: int = DEFAULT_CONCURRENCY, timeout_s: float = 1.0
) -> PortScan:
    """Scan *address* and sort every open port into the host's wildcard listeners, the board's
    own (seen twice) and the ones that vanished; see the module docstring for why."""
    ip = resolve(address)
    reference = loopback_reference(ip)
    checked = _checked_ports(ports)
    started = time.monotonic()

    async def scan() -> PortScan:
        at_once: dict[int, asyncio.Task[bool]] = {}

        def ask_reference(port: int) -> None:  # while the listener that answered is most likely still there
            if reference is not None:
                at_once[port] = asyncio.create_task(_accepts(reference, port, timeout_s))

        try:
            sweep = await _sweep(ip, checked, _capped(concurrency), timeout_s, ask_reference)
        finally:
            done = await asyncio.gather(*at_once.values(), return_exceptions=True)
        host = {port for port, yes in zip(at_once, done, strict=True) if yes is True}
        candidates = [port for port in sweep.accepted if port not in host]

        looks = dict(zip(candidates, await asyncio.gather(*(_owner(ip, reference, p, timeout_s) for p in candidates)), strict=True))
        host |= {port for port, seen in looks.items() if seen == "host"}
        return PortScan(
            address=address,
            ip=ip,
            reference=reference,
            ports_scanned=len(checked),
            open=tuple(sweep.accepted),
            host_wildcard=tuple(sorted(host)),
            board_owned=tuple(port for port, seen in looks.items() if seen == "board"),
            vanished=tuple(port for port, seen in looks.items() if seen == "vanished"),
            unanswered=tuple(sorted(sweep.unanswered)),
            duration_s=time.monotonic() - started,
        )

    return asyncio.run(scan())


def banner(address: str, port: int, timeout_s: float = 1.0) -> bytes:
    """What the service on *address*:*port* says first, before it is spoken to: up to
    :data:`BANNER_MAX` bytes, read until it stops, closes or *timeout_s* passes; ``b""`` for a
    service that waits for the client (HTTP). :class:`PortScanError` if the port does not accept."""
    ip = resolve(address)

    async def greet() -> bytes:
        try:
            async with asyncio.timeout(timeout_s):
                reader, writer = await asyncio.open_connection(ip, port)
        except (OSError, TimeoutError) as exc:
            raise PortScanError(f"{ip}:{port} did not accept a connection to read its greeting: {str(exc) or 'timed out'}") from None
        data = b""
        try:
            async with asyncio.timeout(timeout_s):
                while len(data) < BANNER_MAX:
                    chunk = await reader.read(BANNER_MAX - len(data))
                    if not chunk:
                        break
                    data += chunk
        except (OSError, TimeoutError):
            pass  # silent, or reset right after its greeting: what it said is what counts
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass
        return data

    return asyncio.run(greet())


def banner_text(data: bytes, limit: int = 40) -> str:
    """A greeting as one short printable line for a message: control bytes escaped (``\\r\\n``),
    cut to *limit* characters with an ellipsis."""
    text = data.decode("utf-8", "replace")
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


__all__ = [
    "ALL_PORTS",
    "BANNER_MAX",
    "DEFAULT_CONCURRENCY",
    "LOOPBACK_REFERENCE",
    "PortScan",
    "PortScanError",
    "banner",
    "banner_text",
    "board_owned",
    "loopback_reference",
    "resolve",
    "scan_board",
]

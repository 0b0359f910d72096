"""rig.probe.tcp_ports against real listeners on loopback addresses bound here.

The addresses are 127.0.1.240–250, away from where virtual boards usually sit, and every port is
an ephemeral one the kernel handed out, so other tests' boards and servers running at the same
time cannot collide with them. Whatever else the host runs on ``0.0.0.0`` shows up in a full scan
too, which is the point of the wildcard checks: it must land in ``host_wildcard``, never in
``board_owned``.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest

from rig.probe.tcp_ports import (
    BANNER_MAX,
    LOOPBACK_REFERENCE,
    PortScanError,
    banner,
    banner_text,
    board_owned,
    loopback_reference,
    scan_board,
)

BOARD = "127.0.1.241"
OTHER_BOARD = "127.0.1.242"
GREETER = "127.0.1.243"


def listener(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((address, 0))
    sock.listen(16)
    return sock


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def closed_port(address: str) -> int:
    """A port nothing listens on: one the kernel just handed out, then released."""
    sock = listener(address)
    port = port_of(sock)
    sock.close()
    return port


@pytest.fixture
def listeners() -> Iterator[list[socket.socket]]:
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


class Greeter:
    """A service that says *greeting* to each client and hangs up (or says nothing and waits)."""

    def __init__(self, address: str, greeting: bytes):
        self.sock = listener(address)
        self.sock.settimeout(0.05)  # so the thread sees the stop flag: closing a socket does not wake accept()
        self.port = port_of(self.sock)
        self.greeting = greeting
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _peer = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                if self.greeting:
                    conn.sendall(self.greeting)
                else:
                    conn.recv(1)  # waits for the client, as an HTTP server does

    def close(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)
        self.sock.close()


def silent_port(address: str, listeners: list[socket.socket]) -> int:
    """A port that drops new connections: a listener whose accept queue is full (backlog 0, one
    client queued and never accepted), so further SYNs go unanswered, as behind a firewall."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((address, 0))
    sock.listen(0)
    listeners.append(sock)
    for _ in range(4):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        client.settimeout(0.3)
        listeners.append(client)
        try:
            client.connect((address, port_of(sock)))
        except TimeoutError:
            return port_of(sock)
    pytest.fail("a listener with a full accept queue still answers: this host cannot make a silent port")


def test_a_full_scan_finds_exactly_the_boards_ports_and_sets_the_hosts_aside(listeners: list[socket.socket]) -> None:
    mine = [listener(BOARD), listener(BOARD)]
    wildcard = listener("0.0.0.0")
    elsewhere = listener(OTHER_BOARD)  # another board's port: not on this address at all
    listeners += [*mine, wildcard, elsewhere]
    scan = scan_board(BOARD)
    assert scan.ports_scanned == 65535
    assert set(scan.board_owned) == {port_of(s) for s in mine}
    assert port_of(wildcard) in scan.open
    assert port_of(wildcard) in scan.host_wildcard
    assert port_of(elsewhere) not in scan.open
    assert not scan.unanswered
    assert set(scan.board_owned) | set(scan.host_wildcard) | set(scan.vanished) == set(scan.open)
    assert scan.reference == LOOPBACK_REFERENCE
    assert scan.record()["board_owned"] == sorted(port_of(s) for s in mine)


def test_a_scan_reports_exactly_the_listening_ports(listeners: list[socket.socket]) -> None:
    listeners += [listener(BOARD), listener(BOARD)]
    closed = [closed_port(BOARD), closed_port(BOARD)]
    ports = sorted(port_of(s) for s in listeners)
    assert scan_board(BOARD, [*closed, *reversed(ports)], concurrency=2).open == tuple(ports)


def test_a_closed_port_is_not_reported() -> None:
    port = closed_port(BOARD)
    assert not board_owned(BOARD, port)
    assert scan_board(BOARD, [port]).open == ()


def test_a_wildcard_listener_is_the_hosts(listeners: list[socket.socket]) -> None:
    wildcard, mine = listener("0.0.0.0"), listener(BOARD)
    listeners += [wildcard, mine]
    assert not board_owned(BOARD, port_of(wildcard))
    assert board_owned(BOARD, port_of(mine))
    scan = scan_board(BOARD, [port_of(wildcard), port_of(mine)])
    assert (scan.host_wildcard, scan.board_owned) == ((port_of(wildcard),), (port_of(mine),))


def test_off_loopback_there_is_no_reference() -> None:
    assert loopback_reference("192.168.4.1") is None
    assert loopback_reference(BOARD) == LOOPBACK_REFERENCE
    with pytest.raises(PortScanError, match=r"127\.0\.1\.N"):
        loopback_reference(LOOPBACK_REFERENCE)


def test_banner_reads_the_greeting() -> None:
    greeter = Greeter(GREETER, b"debug> ")
    try:
        assert banner(GREETER, greeter.port) == b"debug> "
    finally:
        greeter.close()


def test_banner_keeps_the_start_of_a_long_greeting_and_is_empty_for_a_silent_service() -> None:
    chatty, silent = Greeter(GREETER, b"x" * 1000), Greeter(GREETER, b"")
    try:
        assert banner(GREETER, chatty.port) == b"x" * BANNER_MAX
        assert banner(GREETER, silent.port, timeout_s=0.2) == b""
    finally:
        chatty.close()
        silent.close()


def test_banner_of_a_closed_port_says_so() -> None:
    with pytest.raises(PortScanError, match="did not accept"):
        banner(BOARD, closed_port(BOARD), timeout_s=0.5)


def test_banner_text_is_one_short_printable_line() -> None:
    assert banner_text(b"esp32c3 debug console\r\n# ") == "esp32c3 debug console\\r\\n# "
    assert banner_text(b"a" * 100, limit=10) == "a" * 9 + "…"
    assert banner_text(b"") == ""


def test_a_silent_port_is_tried_again_and_left_unjudged(listeners: list[socket.socket]) -> None:
    silent, closed = silent_port(BOARD, listeners), closed_port(BOARD)
    scan = scan_board(BOARD, [silent, closed], timeout_s=0.3)
    assert (scan.open, scan.unanswered) == ((), (silent,))


def test_an_address_that_answers_on_no_port_cannot_be_judged(listeners: list[socket.socket]) -> None:
    silent = silent_port(BOARD, listeners)
    with pytest.raises(PortScanError, match="answered on none"):
        scan_board(BOARD, [silent], timeout_s=0.3)


def test_ports_outside_the_tcp_range_are_refused() -> None:
    with pytest.raises(ValueError, match="not a TCP port"):
        scan_board(BOARD, [0])
    with pytest.raises(ValueError, match="not a TCP port"):
        scan_board(BOARD, [65536])

"""rig.protocomm.httpd (+ the protocomm core and rig.prov.transport_http) against Espressif's Transport_HTTP.

Espressif's client talks to the rig's server: proto-ver, the prov-session handshake with its
Security2 and Security1, an encrypted echo endpoint. Session rules are those of esp-idf
protocomm_httpd.c (cookie, socket, new-session-closes-old); failures look like ESP-IDF's: HTTP
errors from esp_http_server for bad HTTP, a closed socket without a response when protocomm fails.
The server survives all of it and stop() closes every client.
"""

from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from rig.protocomm.endpoints import Protocomm, provisioning_version
from rig.protocomm.errors import EndpointFailure, EspErr
from rig.protocomm.httpd import HttpdError, ProtocommHttpd
from rig.protocomm.security import ClientSecurity1, ClientSecurity2, DeviceSecurity, DeviceSecurity0, DeviceSecurity1, DeviceSecurity2
from rig.protocomm.srp6a import SrpCredentials
from rig.prov.transport_http import SoftApHttpTransport, TransportError
from tests import espressif_prov_client

transport_http = espressif_prov_client.module("common.transport.transport_http")
espressif_sec1 = espressif_prov_client.module("common.security.security1")

ADDRESS = "127.0.1.201"
POP = "abcd1234"
CREDENTIALS = SrpCredentials.derive("wifiprov", POP)
VERSION = provisioning_version(sec_ver=2, sec_patch_ver=1, capabilities=["wifi_scan"], app_info={"rmaker": {"ver": "1.0", "cap": []}})


def _protocomm(security: DeviceSecurity) -> Protocomm:
    pc = Protocomm()
    pc.set_version("proto-ver", VERSION)
    pc.set_security("prov-session", security)
    pc.add_endpoint("echo", lambda data: b"echo:" + data)

    def broken(data: bytes) -> bytes:
        raise RuntimeError("handler bug")

    pc.add_endpoint("broken", broken)
    return pc


@pytest.fixture
def served() -> Iterator[tuple[ProtocommHttpd, DeviceSecurity2]]:
    security = DeviceSecurity2(CREDENTIALS, patch_version=1)
    server = ProtocommHttpd(_protocomm(security), ADDRESS, 0)
    server.start()
    yield server, security
    server.stop()


def _espressif_handshake(security: Any, transport: Any) -> None:
    response = None
    while True:
        request = security.security_session(response)
        if request is None:
            return
        response = transport.send_data("prov-session", request)


def _raw(port: int, request: bytes, sock: socket.socket | None = None) -> tuple[bytes, socket.socket]:
    """Send raw bytes; return everything up to the end of one response (or EOF) and the socket."""
    if sock is None:
        sock = socket.create_connection((ADDRESS, port), timeout=5)
    sock.sendall(request)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data, sock
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body, sock


def _post(endpoint: str, body: bytes, headers: str = "") -> bytes:
    return f"POST /{endpoint} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n{headers}\r\n".encode() + body


def _eof(sock: socket.socket) -> bool:
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


# --- Espressif's client against the rig's server ------------------------------------------------------


def test_espressif_transport_and_security2_against_rig_httpd(served: tuple[ProtocommHttpd, DeviceSecurity2]) -> None:
    server, device = served
    transport = transport_http.Transport_HTTP(f"{ADDRESS}:{server.port}")
    assert transport.send_data("proto-ver", "---") == VERSION
    security = espressif_prov_client.security2(1, "wifiprov", POP)
    _espressif_handshake(security, transport)
    assert device.established
    assert transport.get_cookie() == f"session={server.cookie_session_id}"
    for i in range(4):
        reply = transport.send_data("echo", security.encrypt_data(b"ping %d" % i).decode("latin-1"))
        assert security.decrypt_data(reply.encode("latin-1")) == b"echo:ping %d" % i


def test_espressif_transport_and_security1_against_rig_httpd() -> None:
    device = DeviceSecurity1(POP)
    with ProtocommHttpd(_protocomm(device), ADDRESS, 0) as server:
        transport = transport_http.Transport_HTTP(f"{ADDRESS}:{server.port}")
        security = espressif_sec1.Security1(POP, False)
        _espressif_handshake(security, transport)
        for i in range(3):
            reply = transport.send_data("echo", security.encrypt_data(b"x" * (i + 15)).decode("latin-1"))
            assert security.decrypt_data(reply.encode("latin-1")) == b"echo:" + b"x" * (i + 15)


def test_espressif_client_with_wrong_pop_sees_a_dropped_connection(served: tuple[ProtocommHttpd, DeviceSecurity2]) -> None:
    server, device = served
    transport = transport_http.Transport_HTTP(f"{ADDRESS}:{server.port}")
    with pytest.raises(RuntimeError, match="Connection Failure"):
        _espressif_handshake(espressif_prov_client.security2(1, "wifiprov", "abcd1235"), transport)
    assert not device.established and device.failure is not None and device.failure.esp_err is EspErr.ESP_FAIL
    assert transport.send_data("proto-ver", "---") == VERSION  # the server is still there


# --- the rig's own transport ---------------------------------------------------------------------


def test_rig_transport_handshake_echo_and_reconnect_with_cookie(served: tuple[ProtocommHttpd, DeviceSecurity2]) -> None:
    server, device = served
    with SoftApHttpTransport(ADDRESS, server.port, timeout=5) as transport:
        client = ClientSecurity2(POP)
        client.handshake(lambda b: transport.send("prov-session", b))
        assert transport.cookie == f"session={server.cookie_session_id}"
        transport.reset_connection()  # a new TCP connection carrying the cookie continues the session
        assert client.decrypt(transport.send("echo", client.encrypt(b"after reconnect"))) == b"echo:after reconnect"
        assert device.established


def test_rig_transport_errors_name_endpoint_and_status(served: tuple[ProtocommHttpd, DeviceSecurity2]) -> None:
    server, _ = served
    transport = SoftApHttpTransport(ADDRESS, server.port, timeout=5)
    with pytest.raises(TransportError) as missing:
        transport.send("no-such-endpoint", b"x")
    assert missing.value.status == 404 and missing.value.endpoint == "no-such-endpoint"
    assert "This URI does not exist" in str(missing.value)
    with pytest.raises(TransportError) as dropped:
        transport.send("echo", b"ciphertext before any handshake")
    assert dropped.value.status is None and "closed the connection without answering" in str(dropped.value)
    assert transport.send("proto-ver", b"---").decode() == VERSION
    transport.close()


def test_rig_transport_to_a_closed_port_says_nothing_listens() -> None:
    with socket.socket() as probe:
        probe.bind((ADDRESS, 0))
        port = probe.getsockname()[1]
    with pytest.raises(TransportError, match="nothing listens"):
        SoftApHttpTransport(ADDRESS, port, timeout=2).send("proto-ver", b"---")


# --- session rules (protocomm_httpd.c) -------------------------------------------------------------


def test_set_cookie_only_on_the_request_that_opened_the_session(served: tuple[ProtocommHttpd, DeviceSecurity2]) -> None:
    server, _ = served
    first, sock = _raw(server.port, _post("proto-ver", b"---"))
    assert first.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: text/html\r\n")
    assert f"Set-Cookie: session={server.cookie_session_id}\r\n".encode() in first
    assert first.endswith(VERSION.encode())
    second, _ = _raw(server.port, _post("proto-ver", b"---"), sock)  # same socket, no cookie: same session
    assert b"Set-Cookie" not in second
    third, _ = _raw(server.port, _post("proto-ver", b"---", f"Cookie: session={server.cookie_session_id}\r\n"), sock)
    assert b"Set-Cookie" not in third
    sock.close()


def test_new_socket_without_cookie_starts_a_new_session_and_closes_the_old(served: tuple[ProtocommHttpd, DeviceSecurity2]) -> None:
    server, device = served
    transport = SoftApHttpTransport(ADDRESS, server.port, timeout=5)
    ClientSecurity2(POP).handshake(lambda b: transport.send("prov-session", b))
    old = server.cookie_session_id
    assert device.established and device.session_id == old
    answer, sock = _raw(server.port, _post("proto-ver", b"---"))
    sock.close()
    assert server.cookie_session_id != old and device.session_id == server.cookie_session_id
    assert not device.established  # the old session's keys are gone
    assert f"Set-Cookie: session={server.cookie_session_id}".encode() in answer


def test_wrong_cookie_on_the_same_socket_starts_a_new_session(served: tuple[ProtocommHttpd, DeviceSecurity2]) -> None:
    server, _ = served
    _, sock = _raw(server.port, _post("proto-ver", b"---"))
    first = server.cookie_session_id
    answer, _ = _raw(server.port, _post("proto-ver", b"---", "Cookie: session=1\r\n"), sock)
    assert server.cookie_session_id != first and b"Set-Cookie" in answer
    sock.close()


def test_a_cookie_of_20_bytes_or_more_counts_as_absent(served: tuple[ProtocommHttpd, DeviceSecurity2]) -> None:
    """protocomm_httpd reads the header into char[20]: a longer value fails, and the socket rule decides."""
    server, _ = served
    _, sock = _raw(server.port, _post("proto-ver", b"---"))
    first = server.cookie_session_id
    answer, _ = _raw(server.port, _post("proto-ver", b"---", "Cookie: session=123; theme=dark\r\n"), sock)
    assert server.cookie_session_id == first and b"Set-Cookie" not in answer
    sock.close()


def test_a_new_connection_purges_the_least_recently_used_one(served: tuple[ProtocommHttpd, DeviceSecurity2]) -> None:
    """max_open_sockets = 1 with LRU purge, as protocomm_httpd configures esp_http_server."""
    server, _ = served
    _, first = _raw(server.port, _post("proto-ver", b"---"))
    answer, second = _raw(server.port, _post("proto-ver", b"---"))
    assert answer.endswith(VERSION.encode())
    first.settimeout(5)
    assert _eof(first)
    first.close()
    second.close()


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "message"),
    [
        (_post("nope", b"x"), b"404 Not Found", b"This URI does not exist"),
        (b"GET /prov-session HTTP/1.1\r\nHost: x\r\n\r\n", b"405 Method Not Allowed", b"not handled by server"),
        (b"BREW /prov-session HTTP/1.1\r\n\r\n", b"400 Bad Request", b"invalid syntax"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"400 Bad Request", b"invalid syntax"),
        (b"POST /echo HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"411 Length Required", b"Chunked"),
        (b"POST /" + b"a" * 600 + b" HTTP/1.1\r\n\r\n", b"414 URI Too Long", b"too long"),
        (b"POST /echo HTTP/1.1\r\nX-Big: " + b"b" * 1100 + b"\r\n\r\n", b"431 Request Header Fields Too Large", b"too long"),
        (b"POST /echo HTTP/2.0\r\nContent-Length: 1\r\n\r\nx", b"505 Version Not Supported", b"not supported"),
    ],
)
def test_bad_http_gets_esp_http_server_errors_and_the_server_survives(
    served: tuple[ProtocommHttpd, DeviceSecurity2], request_bytes: bytes, status: bytes, message: bytes
) -> None:
    server, _ = served
    answer, sock = _raw(server.port, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status + b"\r\n")
    assert message in answer
    assert _eof(sock)  # esp_http_server closes the socket after an error response
    sock.close()
    assert SoftApHttpTransport(ADDRESS, server.port, timeout=5).send("proto-ver", b"---").decode() == VERSION


@pytest.mark.parametrize(
    ("request_bytes", "why"),
    [
        (_post("echo", b"x" * 4097), "body over 4096 bytes"),
        (_post("proto-ver", b""), "no body (Content length not found)"),
        (_post("prov-session", b"\xff\xfe garbage"), "malformed protobuf"),
        (_post("echo", b"\x00" * 40), "encrypted endpoint before the handshake"),
        (_post("broken", b"x"), "handler raised"),
    ],
)
def test_protocomm_failures_close_the_socket_without_a_response(
    served: tuple[ProtocommHttpd, DeviceSecurity2], request_bytes: bytes, why: str
) -> None:
    server, _ = served
    answer, sock = _raw(server.port, request_bytes)
    assert answer == b"", why
    sock.close()
    assert SoftApHttpTransport(ADDRESS, server.port, timeout=5).send("proto-ver", b"---").decode() == VERSION


def test_truncated_body_times_out_and_server_keeps_running() -> None:
    with ProtocommHttpd(_protocomm(DeviceSecurity0()), ADDRESS, 0, recv_timeout=0.3) as server:
        sock = socket.create_connection((ADDRESS, server.port), timeout=5)
        sock.sendall(b"POST /echo HTTP/1.1\r\nContent-Length: 100\r\n\r\nonly-a-bit")
        assert _eof(sock)
        sock.close()
        assert SoftApHttpTransport(ADDRESS, server.port, timeout=5).send("echo", b"plain").decode() == "echo:plain"


# --- lifecycle -----------------------------------------------------------------------------------


def test_stop_closes_every_client_promptly() -> None:
    server = ProtocommHttpd(_protocomm(DeviceSecurity2(CREDENTIALS)), ADDRESS, 0)
    server.start()
    _, idle = _raw(server.port, _post("proto-ver", b"---"))  # a keep-alive client waiting on the server
    idle.settimeout(5)
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 1.5
    assert _eof(idle)
    idle.close()
    assert not server.running and server.open_connections == 0
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((ADDRESS, server.port), timeout=2).close()
    server.start()  # a board that resets serves again on the same port
    assert SoftApHttpTransport(ADDRESS, server.port, timeout=5).send("proto-ver", b"---").decode() == VERSION
    server.stop()


def test_binding_a_taken_port_says_how_to_fix_it(served: tuple[ProtocommHttpd, DeviceSecurity2]) -> None:
    server, _ = served
    with pytest.raises(HttpdError, match="Fix: another server"):
        ProtocommHttpd(Protocomm(), ADDRESS, server.port).start()


def test_python_http_client_keeps_alive_across_requests(served: tuple[ProtocommHttpd, DeviceSecurity2]) -> None:
    server, _ = served
    conn = http.client.HTTPConnection(ADDRESS, server.port, timeout=5)
    for _ in range(3):
        conn.request("POST", "/proto-ver", body=b"---")
        response = conn.getresponse()
        assert (response.status, response.read().decode()) == (200, VERSION)
    assert server.open_connections == 1
    conn.close()


# --- protocomm core ------------------------------------------------------------------------------


def test_protocomm_core_routes_by_endpoint_kind() -> None:
    pc = _protocomm(DeviceSecurity0())
    assert pc.handle("proto-ver", 1, b"anything at all") == VERSION.encode()
    assert pc.handle("echo", 1, b"plain") == b"echo:plain"  # security 0: no crypto on request endpoints
    with pytest.raises(EndpointFailure) as missing:
        pc.handle("nope", 1, b"")
    assert missing.value.esp_err is EspErr.ESP_ERR_NOT_FOUND
    with pytest.raises(EndpointFailure, match="handler raised RuntimeError"):
        pc.handle("broken", 1, b"x")
    with pytest.raises(ValueError, match="already exists"):
        pc.add_endpoint("echo", lambda b: b)
    pc.add_endpoint("not-bytes", lambda b: "text")  # type: ignore[arg-type,return-value]
    with pytest.raises(EndpointFailure, match="not bytes"):
        pc.handle("not-bytes", 1, b"x")
    assert pc.remove_endpoint("echo") and not pc.has_endpoint("echo") and not pc.remove_endpoint("echo")


def test_protocomm_core_encrypts_request_endpoints_with_the_session() -> None:
    device = DeviceSecurity1(POP)
    pc = _protocomm(device)
    pc.open_session(7)
    client = ClientSecurity1(POP)
    client.handshake(lambda b: pc.handle("prov-session", 7, b))
    assert client.decrypt(pc.handle("echo", 7, client.encrypt(b"hi"))) == b"echo:hi"
    with pytest.raises(EndpointFailure) as wrong_session:
        pc.handle("echo", 8, client.encrypt(b"hi"))
    assert wrong_session.value.esp_err is EspErr.ESP_ERR_INVALID_STATE


def test_provisioning_version_json_shape() -> None:
    no_pop = provisioning_version(sec_ver=1, capabilities=["no_pop", "wifi_scan"])
    assert no_pop == '{"prov":{"ver":"v1.1","sec_ver":1,"cap":["no_pop","wifi_scan"]}}'
    assert VERSION == '{"prov":{"ver":"v1.1","sec_ver":2,"sec_patch_ver":1,"cap":["wifi_scan"]},"rmaker":{"ver":"1.0","cap":[]}}'

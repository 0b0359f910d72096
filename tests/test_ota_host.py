"""The OTA image host (rig.cloud.ota_host) over real HTTPS, verified against the lab CA.

Downloads go through ``http.client`` with an SSL context that trusts only the lab CA
(as a node does); ranges follow RFC 9110 §14 as ESP-IDF's HTTPS OTA client uses them;
expiry is driven by a ManualClock, never by waiting. Delivery faults (cut, stall) are
read with a raw TLS socket, so the bytes on the wire are what is checked.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path

import pytest

from rig.cloud.clock import ManualClock
from rig.cloud.ota_delivery import DeliveryPlan, DeliveryPlans
from rig.cloud.ota_host import OtaHostError, OtaImageHost, PublishedImage, RangeNotSatisfiable, parse_byte_range
from rig.cloud.pki import LabPki

IMAGE = bytes(range(256)) * 40 + b"tail"  # 10244 bytes, every offset distinguishable
LIFETIME_S = 600


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return LabPki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def host(pki: LabPki, clock: ManualClock, tmp_path: Path) -> Iterator[OtaImageHost]:
    pair = pki.server_cert("ota-host")
    with OtaImageHost(tmp_path / "ota", pair.cert_path, pair.key_path, clock, url_lifetime_s=LIFETIME_S) as h:
        yield h


def _lab_context(pki: LabPki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_cert_path))


def _get(
    pki: LabPki, url: str, *, method: str = "GET", headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
) -> tuple[int, dict[str, str], bytes]:
    parts = http.client.urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, context=context or _lab_context(pki), timeout=10)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        conn.request(method, parts.path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_download_over_https_verifying_the_lab_ca(host: OtaImageHost, pki: LabPki) -> None:
    pub = host.publish("job-1", "node-a", IMAGE)
    assert isinstance(pub, PublishedImage)
    assert pub.url.startswith(host.url + "/ota/") and pub.url.endswith("/job-1.bin")
    assert pub.file_size == len(IMAGE) and pub.sha256 == hashlib.sha256(IMAGE).hexdigest()
    status, headers, body = _get(pki, pub.url)
    assert status == 200 and body == IMAGE
    assert headers["content-length"] == str(len(IMAGE)) and headers["accept-ranges"] == "bytes"
    record = host.wait_for_access(lambda r: r.status == 200, timeout=5)
    assert (record.job_id, record.node_id, record.sha256) == ("job-1", "node-a", pub.sha256)
    assert record.complete and record.bytes_sent == len(IMAGE) and record.scheme == "https"
    assert record.tls_version in {"TLSv1.2", "TLSv1.3"} and record.client.startswith("127.0.0.1:")


def test_urls_are_per_publish_and_unguessable(host: OtaImageHost) -> None:
    a, b = host.publish("job-2", "node-a", IMAGE), host.publish("job-2", "node-b", IMAGE)
    token_a, token_b = a.url.split("/")[-2], b.url.split("/")[-2]
    assert token_a != token_b and len(token_a) >= 43  # 256 bits, base64url


def test_range_requests(host: OtaImageHost, pki: LabPki) -> None:
    url = host.publish("job-3", "node-a", IMAGE).url
    size = len(IMAGE)
    status, headers, body = _get(pki, url, headers={"Range": "bytes=100-199"})
    assert (status, body, headers["content-range"]) == (206, IMAGE[100:200], f"bytes 100-199/{size}")
    status, headers, body = _get(pki, url, headers={"Range": "bytes=4096-"})  # esp_https_ota resumption
    assert (status, body, headers["content-range"]) == (206, IMAGE[4096:], f"bytes 4096-{size - 1}/{size}")
    status, _, body = _get(pki, url, headers={"Range": "bytes=-4"})
    assert (status, body) == (206, b"tail")
    status, headers, _ = _get(pki, url, headers={"Range": f"bytes={size}-"})
    assert (status, headers["content-range"]) == (416, f"bytes */{size}")
    status, _, body = _get(pki, url, headers={"Range": "bytes=0-1,5-6"})  # several ranges: ignored (RFC 9110)
    assert (status, body) == (200, IMAGE)
    status, headers, body = _get(pki, url, method="HEAD", headers={"Range": "bytes=10-19"})
    assert (status, headers["content-length"], body) == (206, "10", b"")


def test_expired_url_is_gone(host: OtaImageHost, pki: LabPki, clock: ManualClock) -> None:
    pub = host.publish("job-4", "node-a", IMAGE)
    clock.advance(LIFETIME_S - 1)
    assert _get(pki, pub.url)[0] == 200
    clock.advance(2)
    status, _, body = _get(pki, pub.url)
    assert status == 410 and IMAGE not in body
    assert host.wait_for_access(lambda r: r.status == 410, timeout=5).job_id == "job-4"


def test_wrong_token_or_name_is_not_found(host: OtaImageHost, pki: LabPki) -> None:
    pub = host.publish("job-5", "node-a", IMAGE)
    token = pub.url.split("/")[-2]
    assert _get(pki, f"{host.url}/ota/{'A' * len(token)}/job-5.bin")[0] == 404
    assert _get(pki, f"{host.url}/ota/{token}/other.bin")[0] == 404
    assert _get(pki, f"{host.url}/")[0] == 404
    assert host.revoke(pub.url) and _get(pki, pub.url)[0] == 404


def test_access_log_file_is_evidence_without_tokens(host: OtaImageHost, pki: LabPki) -> None:
    pub = host.publish("job-6", "node-a", IMAGE)
    _get(pki, pub.url, headers={"Range": "bytes=0-9", "User-Agent": "ESP32 HTTP Client/1.0"})
    host.wait_for_access(lambda r: r.job_id == "job-6", timeout=5)
    token = pub.url.split("/")[-2]
    text = host.access_log_path.read_text()
    assert token not in text and token not in host.published_log_path.read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    row = next(r for r in rows if r["job_id"] == "job-6")
    assert row["status"] == 206 and row["range"] == "bytes=0-9" and row["bytes_sent"] == 10
    assert row["user_agent"] == "ESP32 HTTP Client/1.0" and row["path"].startswith(f"/ota/{token[:6]}…/")


def test_client_not_trusting_the_server_is_logged(host: OtaImageHost, pki: LabPki, tmp_path: Path) -> None:
    pub = host.publish("job-7", "node-a", IMAGE)
    other_ca = LabPki(tmp_path / "other-pki")
    with pytest.raises(ssl.SSLCertVerificationError):
        _get(pki, pub.url, context=_lab_context(other_ca))
    record = host.wait_for_access(lambda r: r.error is not None, timeout=5)
    assert record.status == 0 and "handshake failed" in record.error


def test_plain_http_only_when_asked(host: OtaImageHost, pki: LabPki, clock: ManualClock, tmp_path: Path) -> None:
    with pytest.raises(OtaHostError, match="plain_http=False"):
        _ = host.plain_url
    assert host.publish("job-8", "node-a", IMAGE).plain_url is None
    pair = pki.server_cert("ota-host")
    with OtaImageHost(tmp_path / "plain", pair.cert_path, pair.key_path, clock, plain_http=True) as both:
        pub = both.publish("job-8", "node-a", IMAGE)
        assert pub.plain_url is not None and pub.plain_url.startswith("http://127.0.0.1:")
        assert _get(pki, pub.plain_url)[2] == IMAGE
        record = both.wait_for_access(lambda r: r.job_id == "job-8", timeout=5)
        assert record.scheme == "http" and record.tls_version is None and record.complete


def test_taken_port_gives_a_clear_error(pki: LabPki, clock: ManualClock, tmp_path: Path) -> None:
    pair = pki.server_cert("ota-host")
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen(1)
        port = squatter.getsockname()[1]
        with pytest.raises(OtaHostError, match=f"127.0.0.1:{port} is already in use"):
            OtaImageHost(tmp_path, pair.cert_path, pair.key_path, clock, port=port).start()


def test_publish_before_start_is_refused(pki: LabPki, clock: ManualClock, tmp_path: Path) -> None:
    pair = pki.server_cert("ota-host")
    with pytest.raises(OtaHostError, match="not running"):
        OtaImageHost(tmp_path, pair.cert_path, pair.key_path, clock).publish("j", "n", IMAGE)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("bytes=0-0", (0, 0)),
        ("bytes=5-", (5, 99)),
        ("bytes=90-500", (90, 99)),
        ("bytes=-30", (70, 99)),
        ("bytes=-500", (0, 99)),
        ("bytes = 1-2", (1, 2)),
        ("items=0-1", None),
        ("bytes=5-1", None),
        ("bytes=abc", None),
        ("bytes=-", None),
        ("bytes=0-1,3-4", None),
    ],
)
def test_parse_byte_range(header: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_byte_range(header, 100) == expected


@pytest.mark.parametrize("header", ["bytes=100-", "bytes=150-160", "bytes=-0"])
def test_unsatisfiable_ranges(header: str) -> None:
    with pytest.raises(RangeNotSatisfiable):
        parse_byte_range(header, 100)


# --------------------------------------------------------------------------- delivery faults


def _raw_get(pki: LabPki, url: str, headers: dict[str, str] | None = None, *, method: str = "GET") -> socket.socket:
    """A connection with one request sent; the caller reads the raw response."""
    parts = http.client.urlsplit(url)
    assert parts.hostname is not None and parts.port is not None
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    if parts.scheme == "https":
        sock = _lab_context(pki).wrap_socket(sock, server_hostname=parts.hostname)
    lines = [f"{method} {parts.path} HTTP/1.1", f"Host: {parts.hostname}:{parts.port}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
    return sock


def _read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and the body bytes that came with them."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before the end of the headers: {buf!r}"
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def _read_to_eof(sock: socket.socket, body: bytes) -> bytes:
    while chunk := sock.recv(65536):
        body += chunk
    return body


def _fetch_raw(pki: LabPki, url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    with _raw_get(pki, url, headers) as sock:
        status, head, body = _read_head(sock)
        return status, head, _read_to_eof(sock, body)


def test_cut_after_sends_n_body_bytes_then_closes(host: OtaImageHost, pki: LabPki) -> None:
    size, n = len(IMAGE), 1000
    pub = host.publish("job-cut", "node-a", IMAGE, cut_after=n)
    assert (pub.fault, pub.fault_at) == ("cut", n)
    status, headers, body = _fetch_raw(pki, pub.url)
    assert (status, headers["content-length"], body) == (200, str(size), IMAGE[:n])
    status, headers, body = _fetch_raw(pki, pub.url, {"Range": "bytes=600-"})  # resumption before the cut
    assert (status, headers["content-range"], headers["content-length"]) == (206, f"bytes 600-{size - 1}/{size}", str(size - 600))
    assert body == IMAGE[600:n]
    status, headers, body = _fetch_raw(pki, pub.url, {"Range": f"bytes={n}-"})  # at the cut: headers, then close
    assert (status, headers["content-length"], body) == (206, str(size - n), b"")
    status, _, body = _get(pki, pub.url, headers={"Range": "bytes=0-99"})  # wholly before the cut: served
    assert (status, body) == (206, IMAGE[:100])
    status, headers, body = _get(pki, pub.url, method="HEAD")
    assert (status, headers["content-length"], body) == (200, str(size), b"")

    records = host.requests_for(pub.url)
    assert [(r.method, r.status, r.bytes_sent, r.complete, r.fault) for r in records] == [
        ("GET", 200, n, False, "cut"),
        ("GET", 206, n - 600, False, "cut"),
        ("GET", 206, 0, False, "cut"),
        ("GET", 206, 100, True, None),
        ("HEAD", 200, 0, False, None),
    ]
    published = [json.loads(line) for line in host.published_log_path.read_text().splitlines()]
    assert [(p["fault"], p["fault_at"], p["scheme"]) for p in published if p["job_id"] == "job-cut"] == [("cut", n, "https")]
    logged = [json.loads(line) for line in host.access_log_path.read_text().splitlines()]
    assert [r["fault"] for r in logged if r["job_id"] == "job-cut"] == ["cut", "cut", "cut", None, None]


def test_stall_after_sends_n_bytes_then_holds_the_connection_open(host: OtaImageHost, pki: LabPki) -> None:
    n = 4096
    pub = host.publish("job-stall", "node-a", IMAGE, stall_after=n)
    sock = _raw_get(pki, pub.url)
    with sock:
        status, headers, body = _read_head(sock)
        assert (status, headers["content-length"]) == (200, str(len(IMAGE)))
        while len(body) < n:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed after {len(body)} body bytes"
            body += chunk
        assert body == IMAGE[:n]
        record = host.wait_for_access(lambda r: r.fault == "stall", timeout=5)  # logged when the stall begins
        assert (record.job_id, record.bytes_sent, record.complete) == ("job-stall", n, False)
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # no byte, and no EOF: the connection is held open
            sock.recv(1)
        host.stop()  # returns although a stalled connection is open, and closes it
        sock.settimeout(10)
        try:
            tail = sock.recv(1)
        except OSError:  # reset rather than closed: gone either way
            tail = b""
        assert tail == b""


def test_stall_is_held_at_most_stall_hold_s(pki: LabPki, clock: ManualClock, tmp_path: Path) -> None:
    pair = pki.server_cert("ota-host")
    with OtaImageHost(tmp_path / "ota", pair.cert_path, pair.key_path, clock, stall_hold_s=0.2) as short:
        pub = short.publish("job-hold", "node-a", IMAGE, stall_after=10)
        status, _, body = _fetch_raw(pki, pub.url)  # EOF once the hold time has passed
        assert (status, body) == (200, IMAGE[:10])


def test_plain_http_publish_serves_the_same_bytes(pki: LabPki, clock: ManualClock, tmp_path: Path) -> None:
    pair = pki.server_cert("ota-host")
    with OtaImageHost(tmp_path / "ota", pair.cert_path, pair.key_path, clock, plain_http=True) as both:
        pub = both.publish("job-http", "node-a", IMAGE, scheme="http")
        assert pub.url == pub.plain_url and pub.url.startswith(both.plain_url + "/ota/")
        assert _get(pki, pub.url)[2] == IMAGE
        cut = both.publish("job-http", "node-a", IMAGE, scheme="http", cut_after=7)
        status, headers, body = _fetch_raw(pki, cut.url)
        assert (status, headers["content-length"], body) == (200, str(len(IMAGE)), IMAGE[:7])
        assert [(r.scheme, r.tls_version, r.fault) for r in both.requests_for(cut.url)] == [("http", None, "cut")]
        assert [r.complete for r in both.requests_for(pub.url)] == [True]


def test_delivery_fault_arguments_are_checked(host: OtaImageHost) -> None:
    with pytest.raises(ValueError, match="at most one"):
        host.publish("j", "n", IMAGE, cut_after=1, stall_after=2)
    with pytest.raises(ValueError, match=f"inside the {len(IMAGE)}-byte image"):
        host.publish("j", "n", IMAGE, cut_after=len(IMAGE))
    with pytest.raises(ValueError, match="byte offset"):
        host.publish("j", "n", IMAGE, stall_after=-1)
    with pytest.raises(OtaHostError, match="plain-HTTP listener"):
        host.publish("j", "n", IMAGE, scheme="http")


def test_delivery_plans_are_one_shot() -> None:
    plans = DeliveryPlans()
    assert plans.arm(DeliveryPlan("node-a", sign=False)) is None
    assert plans.arm(DeliveryPlan("node-a", cut_after=5)) == DeliveryPlan("node-a", sign=False)  # replaced
    assert plans.take("node-b") is None
    plan = plans.take("node-a")
    assert plan == DeliveryPlan("node-a", cut_after=5)
    assert plans.take("node-a") is None
    plans.arm(DeliveryPlan("node-a", transport="http"))
    assert plans.disarm("node-a") and not plans.disarm("node-a") and plans.take("node-a") is None


@pytest.mark.parametrize(
    "kwargs",
    [{"cut_after": 1, "stall_after": 1}, {"cut_after": -1}, {"stall_after": True}, {"transport": "ftp"}, {"node_id": ""}],
)
def test_delivery_plan_validation(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DeliveryPlan(**{"node_id": "node-a", **kwargs})  # type: ignore[arg-type]

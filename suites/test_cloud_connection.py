"""The node's connection to its cloud: authenticated, encrypted, and orderly.

* **The broker must prove who it is** (EN 303 645 5.5-1; AWS IoT Device Advisor's TLS cases):
  the board is claimed onto an impostor on the broker's own host and name
  (:mod:`fixtures.impostor`) presenting a certificate from an unknown CA, one for another name,
  or an expired one. A node that completes that handshake would hand its MQTT session — its
  params, OTA URLs, user mapping — to whoever sits on the network path.
* **Nothing in clear** (5.5-1, 5.8-1; etsi-en-303-645.md 5.5-1 row: "every flow to the broker
  … is TLS … and no plaintext MQTT"): the board's traffic from provisioning until it is on the
  cloud is captured; no TCP connection may go to the plaintext MQTT port, and every connection
  that carries bytes to the broker must open with a TLS handshake.
* **No reconnection storm** (5.9-3, Device Advisor ``MQTT_Connect_Exponential_Backoff_Retries``):
  with a broker that never lets it in, the node's attempts must thin out — a bounded number in
  the first seconds, and growing intervals. A fleet retrying at once after a cloud outage is a
  denial of service on the cloud's return.

Everything goes through the port (esptool claims the board), the provisioning client and the
network, so the same tests run on a real board whose broker host the lab can stand in for.
"""

from __future__ import annotations

import itertools
import time
import uuid
from dataclasses import asdict
from typing import Any

import pytest

from fixtures.capture import BoardCaptures
from fixtures.evidence import Evidence
from fixtures.impostor import IMPOSTOR_KINDS, ImpostorBroker
from fixtures.node import FreshNode, provision, read_qr
from rig.capture.streams import Flow
from rig.cloud.adversaries import TlsAttempt, parse_mqtt_connect
from rig.lab import Lab
from rig.prov.rainmaker_api import RainMakerUser

PLAINTEXT_MQTT_PORTS = (1883,)
"""IANA's MQTT port (8883 is MQTT over TLS)."""
FIRST_ATTEMPTS = 2
ATTEMPT_TIMEOUT_S = 60.0
"""From joining Wi-Fi to the node's second try: room for its first backoff delays."""
CLOUD_TIMEOUT_S = 60.0
BACKOFF_ATTEMPTS = 4
BACKOFF_TIMEOUT_S = 90.0
STORM_WINDOW_S = 10.0
STORM_MAX_ATTEMPTS = 6
"""A node that backs off from a 1–2 s first delay tries at most 4 times in the first 10 s; one
that retries at once tries dozens. The bound leaves room for a shorter first delay."""
GROWTH = 1.5
"""The third interval must be this much longer than the first: exponential backoff doubles it
(jitter can take up to half of that away); a constant or linear backoff does not."""
TLS_HANDSHAKE = 0x16
TLS_MAJOR = 0x03


def attempt_record(attempt: TlsAttempt) -> dict[str, Any]:
    """An attempt as evidence: what the impostor saw, without the bytes the node sent after it."""
    record = asdict(attempt)
    record.pop("received", None)
    return record


def from_board(attempts: list[TlsAttempt], address: str | None) -> list[TlsAttempt]:
    """The attempts that came from the board (all of them when the board's address is unknown)."""
    return [a for a in attempts if address is None or a.client.rsplit(":", 1)[0] == address]


def join_wifi(node: FreshNode, dut: Any, lab: Lab, user: RainMakerUser) -> None:
    """Provision the node onto the lab's Wi-Fi (it then dials the broker its identity names)."""
    provision(node, lab, user, read_qr(dut), str(uuid.uuid4()))


@pytest.mark.etsi("5.5-1")
@pytest.mark.parametrize("impostor_broker", IMPOSTOR_KINDS, indirect=True)
def test_node_refuses_a_broker_it_cannot_authenticate(impostor_broker: ImpostorBroker, dut: Any, lab: Lab,
                                                      cloud_user: RainMakerUser, evidence: Evidence) -> None:  # fmt: skip
    impostor = impostor_broker
    join_wifi(impostor.fresh, dut, lab, cloud_user)
    try:
        impostor.adversary.wait_for_attempts(FIRST_ATTEMPTS, ATTEMPT_TIMEOUT_S)
    except TimeoutError:
        pass
    attempts = from_board(impostor.adversary.attempts(), impostor.fresh.board.address)
    evidence.attach_json(f"impostor-{impostor.kind}.json", {"case": impostor.describe(), "attempts": [attempt_record(a) for a in attempts]})
    if not attempts:
        pytest.fail(f"INCONCLUSIVE: the node never dialled the broker named in its identity within {ATTEMPT_TIMEOUT_S:.0f} s "
                    "after joining Wi-Fi", pytrace=False)  # fmt: skip
    trusted = [a for a in attempts if a.handshake_completed]
    if trusted:
        sent = next((a.mqtt_connect for a in trusted if a.mqtt_connect is not None), None)
        session = f" and sent its MQTT CONNECT (client id {sent.client_id})" if sent is not None else ""
        pytest.fail(f"the node completed a TLS handshake with an impostor broker presenting {impostor.describe()}{session}: "
                    "it does not authenticate its cloud (5.5-1)")  # fmt: skip


def plaintext_flows(flows: list[Flow], address: str) -> list[str]:
    """Why each of the board's outgoing TCP connections was not TLS: to a plaintext MQTT port, or
    bytes to the server that do not open with a TLS handshake record (an MQTT CONNECT named as such)."""
    found = []
    for flow in flows:
        if flow.key.proto != "tcp" or flow.key.client.address != address:
            continue  # the board's own servers (provisioning, local control) are judged elsewhere
        if flow.key.server.port in PLAINTEXT_MQTT_PORTS:
            found.append(f"a TCP connection to {flow.key.server} (plaintext MQTT port)")
            continue
        first = flow.to_server.first_bytes
        if first and not (first[0] == TLS_HANDSHAKE and len(first) > 1 and first[1] == TLS_MAJOR):
            connect = parse_mqtt_connect(first)
            what = f"an MQTT CONNECT in clear (client id {connect.client_id})" if connect else f"bytes in clear ({first[:8].hex()}…)"
            found.append(f"{what} to {flow.key.server}")
    return found


@pytest.mark.etsi("5.5-1", "5.8-1")
def test_node_reaches_the_cloud_only_over_tls(board_capture: BoardCaptures, fresh_node: FreshNode, dut: Any, lab: Lab,
                                              cloud_user: RainMakerUser) -> None:  # fmt: skip
    qr = read_qr(dut)
    with board_capture("to-cloud") as cap:
        provision(fresh_node, lab, cloud_user, qr, str(uuid.uuid4()))
        dut.expect_exact("MQTT Connected", timeout=CLOUD_TIMEOUT_S)
    cap.require_complete()
    address = cap.address
    outgoing = [f for f in cap.traffic.flows if f.key.proto == "tcp" and f.key.client.address == address]
    if not any(f.to_server.bytes and f.to_client.bytes for f in outgoing):
        pytest.fail("INCONCLUSIVE: the capture holds no connection from the node to its cloud", pytrace=False)
    found = plaintext_flows(outgoing, address)
    assert not found, "the node reached for its cloud without TLS (5.5-1, 5.8-1): " + "; ".join(found)


@pytest.mark.etsi("5.9-3")
def test_node_backs_off_while_it_cannot_connect(refusing_broker: ImpostorBroker, dut: Any, lab: Lab,
                                                cloud_user: RainMakerUser, evidence: Evidence) -> None:  # fmt: skip
    join_wifi(refusing_broker.fresh, dut, lab, cloud_user)
    adversary = refusing_broker.adversary
    try:
        adversary.wait_for_attempts(BACKOFF_ATTEMPTS, BACKOFF_TIMEOUT_S)
    except TimeoutError:
        pass
    attempts = from_board(adversary.attempts(), refusing_broker.fresh.board.address)
    if attempts:  # judge the whole first window: a storm reaches BACKOFF_ATTEMPTS in a fraction of it
        time.sleep(max(0.0, attempts[0].started_monotonic + STORM_WINDOW_S - time.monotonic()))
        attempts = from_board(adversary.attempts(), refusing_broker.fresh.board.address)
    times = [a.started_monotonic for a in attempts]
    intervals = [round(b - a, 3) for a, b in itertools.pairwise(times)]
    evidence.attach_json("reconnect-attempts.json", {"intervals_s": intervals, "attempts": [attempt_record(a) for a in attempts]})
    if len(attempts) < BACKOFF_ATTEMPTS:
        pytest.fail(f"INCONCLUSIVE: the node tried {len(attempts)} time(s) in {BACKOFF_TIMEOUT_S:.0f} s; "
                    f"{BACKOFF_ATTEMPTS} are needed to judge its backoff", pytrace=False)  # fmt: skip
    early = sum(1 for t in times if t - times[0] <= STORM_WINDOW_S)
    assert early <= STORM_MAX_ATTEMPTS, (
        f"reconnection storm: the node tried {early} times within {STORM_WINDOW_S:.0f} s of its first attempt "
        f"(intervals {intervals[:8]} s) instead of backing off (5.9-3)"
    )
    assert intervals[2] >= GROWTH * intervals[0], (
        f"the node's retry intervals do not grow ({intervals[:4]} s): constant or linear backoff (5.9-3)"
    )

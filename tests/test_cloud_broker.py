"""The lab broker's node policy, proven by data flow against a real mosquitto 2.0.

What the policy is and how mosquitto is made to enforce it: ``rig/cloud/broker.py``.
mosquitto 2.0 grants a SUBACK even for a filter the ACL forbids and then delivers
nothing, and acknowledges a denied PUBLISH with a normal PUBACK, so no test here looks
at SUBACK or PUBACK codes: each one checks what arrives where, with a sentinel on an
allowed topic published *after* the forbidden traffic to show that the forbidden
message would have arrived by then (``tests/cloud_fixtures.py``).
"""

from __future__ import annotations

import os
import socket
import ssl
import struct
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from rig.cloud.broker import BrokerError, MosquittoBroker, build_plugin
from rig.cloud.pki import SERVICE_IDENTITY, LabPki
from tests import cloud_fixtures
from tests.cloud_fixtures import MqttProbe, ProbeFactory, tls_context

lab_pki = cloud_fixtures.lab_pki
mqtt_broker = cloud_fixtures.mqtt_broker
mqtt_probe = cloud_fixtures.mqtt_probe

NODE_A = "nodeA7f3c1"
NODE_B = "nodeB92d04"

# rainmaker-protocol.md §1.2: node→cloud suffixes and their basic-ingest rule names.
BASIC_INGEST = [
    ("esp_node_config", "config"),
    ("esp_set_params", "params/local"),
    ("esp_init_params", "params/local/init"),
    ("esp_user_node_mapping", "user/mapping"),
    ("esp_node_otafetch", "otafetch"),
    ("esp_node_otastatus", "otastatus"),
    ("esp_node_alert", "alert"),
]


def log_text(broker: MosquittoBroker) -> str:
    """The whole broker log. Safe to read right after a CONNACK or PUBACK: mosquitto logs a
    plugin refusal before sending the CONNACK, and a ``Denied PUBLISH`` before the PUBACK."""
    return broker.log_path.read_text(errors="replace")


@pytest.fixture
def service(mqtt_probe: ProbeFactory, mqtt_broker: MosquittoBroker) -> MqttProbe:
    """The cloud's own client, listening to every node topic in both forms."""
    probe = mqtt_probe(mqtt_broker.service_cert(), "rig-cloud-service-test")
    assert probe.connect().accepted
    probe.subscribe("node/#", "$aws/rules/+/node/+/#")
    return probe


@pytest.fixture
def node_a(mqtt_probe: ProbeFactory, lab_pki: LabPki) -> MqttProbe:
    probe = mqtt_probe(lab_pki.node_cert(NODE_A), NODE_A)
    outcome = probe.connect()
    assert outcome.accepted, outcome.detail
    return probe


@pytest.fixture
def node_b(mqtt_probe: ProbeFactory, lab_pki: LabPki) -> MqttProbe:
    probe = mqtt_probe(lab_pki.node_cert(NODE_B, key_type="rsa"), NODE_B)
    outcome = probe.connect()
    assert outcome.accepted, outcome.detail
    return probe


# -- what a node may do ----------------------------------------------------------------


def test_node_uses_its_own_plain_topics(service: MqttProbe, node_a: MqttProbe) -> None:
    node_a.subscribe(f"node/{NODE_A}/params/remote", f"node/{NODE_A}/otaurl")
    service.publish(f"node/{NODE_A}/params/remote", b'{"Switch":{"Power":true}}')
    service.publish(f"node/{NODE_A}/otaurl", b'{"ota_job_id":"j1"}')
    assert node_a.wait_for(f"node/{NODE_A}/params/remote").payload == b'{"Switch":{"Power":true}}'
    node_a.wait_for(f"node/{NODE_A}/otaurl")

    node_a.publish(f"node/{NODE_A}/params/local", b'{"Switch":{"Power":false}}')
    assert service.wait_for(f"node/{NODE_A}/params/local").payload == b'{"Switch":{"Power":false}}'


def test_rsa_node_connects_too(service: MqttProbe, node_b: MqttProbe) -> None:
    node_b.publish(f"node/{NODE_B}/config", b"{}")
    service.wait_for(f"node/{NODE_B}/config")


@pytest.mark.parametrize(("rule", "suffix"), BASIC_INGEST)
def test_basic_ingest_publish_reaches_the_service(service: MqttProbe, node_a: MqttProbe, rule: str, suffix: str) -> None:
    topic = f"$aws/rules/{rule}/node/{NODE_A}/{suffix}"
    node_a.publish(topic, suffix.encode())
    assert service.wait_for(topic).payload == suffix.encode()


def test_basic_ingest_topics_are_write_only_for_the_node(service: MqttProbe, node_a: MqttProbe) -> None:
    node_a.subscribe(f"$aws/rules/+/node/{NODE_A}/#", f"node/{NODE_A}/sentinel")
    node_a.publish(f"$aws/rules/esp_set_params/node/{NODE_A}/params/local", b"1")
    service.wait_for(f"$aws/rules/esp_set_params/node/{NODE_A}/params/local")
    service.publish(f"node/{NODE_A}/sentinel", b"s")
    node_a.wait_for(f"node/{NODE_A}/sentinel")
    assert node_a.topics() == [f"node/{NODE_A}/sentinel"]


def test_wildcard_subscription_delivers_only_the_nodes_own_topics(service: MqttProbe, node_a: MqttProbe, node_b: MqttProbe) -> None:
    node_a.subscribe("node/+/params/local")
    node_b.publish(f"node/{NODE_B}/params/local", b"b")
    node_a.publish(f"node/{NODE_A}/params/local", b"a")
    service.wait_for(f"node/{NODE_B}/params/local")
    node_a.wait_for(f"node/{NODE_A}/params/local")
    service.publish(f"node/{NODE_A}/params/local", b"sentinel")
    node_a.wait_for(f"node/{NODE_A}/params/local", b"sentinel")
    assert f"node/{NODE_B}/params/local" not in node_a.topics()


# -- what a node may not see -----------------------------------------------------------------


@pytest.mark.parametrize("forbidden", [f"node/{NODE_B}/#", "#", "node/+/params/remote", f"node/{NODE_B}/params/remote", "$aws/#", "+/+/+"])
def test_other_nodes_traffic_is_not_delivered(
    service: MqttProbe, node_a: MqttProbe, node_b: MqttProbe, forbidden: str
) -> None:
    node_a.subscribe(forbidden, f"node/{NODE_A}/sentinel")
    node_b.subscribe(f"node/{NODE_B}/params/remote")
    service.publish(f"node/{NODE_B}/params/remote", b"for B only")
    node_b.publish(f"node/{NODE_B}/params/local", b"from B")
    node_b.publish(f"$aws/rules/esp_set_params/node/{NODE_B}/params/local", b"from B")
    node_b.wait_for(f"node/{NODE_B}/params/remote")  # control: it was delivered where allowed
    service.wait_for(f"$aws/rules/esp_set_params/node/{NODE_B}/params/local")
    service.publish(f"node/{NODE_A}/sentinel", b"s")
    node_a.wait_for(f"node/{NODE_A}/sentinel")
    assert [t for t in node_a.topics() if NODE_B in t] == []


def test_sys_topics_are_not_delivered_to_a_node(service: MqttProbe, node_a: MqttProbe) -> None:
    # Control: mosquitto keeps $SYS/broker/version retained, and the service may read it.
    service.subscribe("$SYS/broker/version")
    assert service.wait_for("$SYS/broker/version").payload.startswith(b"mosquitto version 2.")
    node_a.subscribe("$SYS/#", "$SYS/broker/version", f"node/{NODE_A}/sentinel")
    service.publish(f"node/{NODE_A}/sentinel", b"s")
    node_a.wait_for(f"node/{NODE_A}/sentinel")
    assert [t for t in node_a.topics() if t.startswith("$SYS")] == []


def test_publishes_to_other_nodes_never_arrive(
    mqtt_broker: MosquittoBroker, service: MqttProbe, node_a: MqttProbe, node_b: MqttProbe
) -> None:
    service.subscribe("$aws/#")
    node_b.subscribe(f"node/{NODE_B}/#")
    forbidden = [
        f"node/{NODE_B}/params/remote",
        f"node/{NODE_B}/otaurl",
        f"node/{NODE_B}/params/local",
        f"$aws/rules/esp_set_params/node/{NODE_B}/params/local",
        f"$aws/rules/esp_set_params/node/{NODE_A}x/params/local",
        "$aws/things/shadow/update",
        "$SYS/broker/version",
        "unrelated/topic",
    ]
    for topic in forbidden:
        node_a.publish(topic, b"forged by A")
    node_a.publish(f"node/{NODE_A}/sentinel", b"s")
    service.wait_for(f"node/{NODE_A}/sentinel")  # A's earlier publishes have all been handled
    service.publish(f"node/{NODE_B}/sentinel", b"s")
    node_b.wait_for(f"node/{NODE_B}/sentinel")
    assert [m for m in node_b.received if m.payload == b"forged by A"] == []
    assert [m for m in service.received if m.payload == b"forged by A"] == []
    denied = [line for line in log_text(mqtt_broker).splitlines() if f"Denied PUBLISH from {NODE_A} " in line]
    assert [t for t in forbidden if not any(f"'{t}'" in line for line in denied)] == []  # the broker's own record


def test_username_cannot_choose_the_identity(mqtt_probe: ProbeFactory, lab_pki: LabPki, service: MqttProbe, node_b: MqttProbe) -> None:
    """A node sending another node's id as MQTT username still gets only its own topics (username := CN)."""
    spoof = mqtt_probe(lab_pki.node_cert(NODE_A), NODE_A, username=NODE_B)
    assert spoof.connect().accepted
    spoof.subscribe(f"node/{NODE_B}/#", f"node/{NODE_A}/sentinel")
    service.publish(f"node/{NODE_B}/params/remote", b"for B only")
    node_b.subscribe(f"node/{NODE_B}/sentinel")
    spoof.publish(f"node/{NODE_B}/params/local", b"forged")
    service.publish(f"node/{NODE_A}/sentinel", b"s")
    spoof.wait_for(f"node/{NODE_A}/sentinel")
    service.wait_for(f"node/{NODE_A}/sentinel")
    assert [t for t in spoof.topics() if NODE_B in t] == []
    assert [m for m in service.received if m.payload == b"forged"] == []


# -- who may connect -------------------------------------------------------------------------


@pytest.mark.parametrize("client_id", [NODE_B, f"{NODE_A}x", NODE_A.upper(), "rig-cloud-service"])
def test_client_id_other_than_the_certificate_cn_is_refused(
    mqtt_probe: ProbeFactory, mqtt_broker: MosquittoBroker, lab_pki: LabPki, node_b: MqttProbe, client_id: str
) -> None:
    outcome = mqtt_probe(lab_pki.node_cert(NODE_A), client_id).connect()
    assert not outcome.accepted
    assert "Not authorized" in outcome.detail, outcome.detail
    assert f"client id '{client_id}' is not the certificate CN '{NODE_A}'" in log_text(mqtt_broker)
    # The refused impostor did not take over node B's session (takeover happens only after auth).
    assert node_b.dropped is None
    node_b.subscribe(f"node/{NODE_B}/sentinel")
    node_b.publish(f"node/{NODE_B}/sentinel", b"still here")
    node_b.wait_for(f"node/{NODE_B}/sentinel")


@pytest.mark.parametrize("protocol", [mqtt.MQTTv31, mqtt.MQTTv311, mqtt.MQTTv5], ids=["mqtt3.1", "mqtt3.1.1", "mqtt5"])
def test_client_id_check_holds_for_every_mqtt_version(mqtt_probe: ProbeFactory, lab_pki: LabPki, protocol: int) -> None:
    pair = lab_pki.node_cert(NODE_A)
    assert not mqtt_probe(pair, NODE_B, protocol=protocol).connect().accepted
    right = mqtt_probe(pair, NODE_A, protocol=protocol).connect()
    assert right.accepted, right.detail


def test_empty_client_id_is_refused(mqtt_probe: ProbeFactory, lab_pki: LabPki) -> None:
    assert not mqtt_probe(lab_pki.node_cert(NODE_A), "").connect().accepted


@pytest.mark.parametrize("client_id", [NODE_A, NODE_B])
def test_mqtt5_enhanced_auth_cannot_bypass_the_check(mqtt_probe: ProbeFactory, lab_pki: LabPki, client_id: str) -> None:
    """MQTT 5 enhanced auth skips MOSQ_EVT_BASIC_AUTH; with no plugin for it mosquitto refuses the method."""
    props = Properties(PacketTypes.CONNECT)
    props.AuthenticationMethod = "SCRAM-SHA-1"
    outcome = mqtt_probe(lab_pki.node_cert(NODE_A), client_id, protocol=mqtt.MQTTv5, connect_properties=props).connect()
    assert not outcome.accepted
    assert "Bad authentication method" in outcome.detail, outcome.detail


def test_service_identity_may_use_any_client_id(mqtt_probe: ProbeFactory, mqtt_broker: MosquittoBroker) -> None:
    assert mqtt_probe(mqtt_broker.service_cert(), "cloud-worker-7").connect().accepted
    assert mqtt_broker.service_identity == SERVICE_IDENTITY


# With TLS 1.2 the broker checks the client certificate inside the handshake, so its alert
# reaches the client deterministically and names the reason. With TLS 1.3 the client has
# finished its side before the broker checks, and the alert may arrive or the socket just
# close; there the reason is taken from the broker's log.
TLS_BOTH = pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])


@TLS_BOTH
def test_certificate_from_an_unknown_ca_is_refused(
    mqtt_probe: ProbeFactory, mqtt_broker: MosquittoBroker, tmp_path: Path, version: ssl.TLSVersion
) -> None:
    rogue = LabPki(tmp_path / "rogue").node_cert(NODE_A)  # same CN, different CA
    mark = mqtt_broker.log_mark()
    outcome = mqtt_probe(tls_context(mqtt_broker.ca_cert_path, rogue, version=version), NODE_A).connect()
    assert not outcome.accepted, outcome.detail
    mqtt_broker.wait_for_log("certificate verify failed", mark)
    if version is ssl.TLSVersion.TLSv1_2:
        assert "alert unknown ca" in outcome.detail.lower(), outcome.detail


@TLS_BOTH
def test_no_client_certificate_is_refused(mqtt_probe: ProbeFactory, mqtt_broker: MosquittoBroker, version: ssl.TLSVersion) -> None:
    mark = mqtt_broker.log_mark()
    outcome = mqtt_probe(tls_context(mqtt_broker.ca_cert_path, None, version=version), NODE_A).connect()
    assert not outcome.accepted, outcome.detail
    mqtt_broker.wait_for_log("peer did not return a certificate", mark)


def test_revoked_certificate_is_refused_after_reload(
    mqtt_probe: ProbeFactory, mqtt_broker: MosquittoBroker, lab_pki: LabPki
) -> None:
    node = "nodeRevoked01"
    pair = lab_pki.node_cert(node)
    before = mqtt_probe(pair, node)
    assert before.connect().accepted  # control: the certificate worked
    before.close()
    lab_pki.revoke(node)
    assert not lab_pki.is_issued(pair.cert_pem)
    mqtt_broker.reload()

    tls12 = mqtt_probe(tls_context(mqtt_broker.ca_cert_path, pair, version=ssl.TLSVersion.TLSv1_2), node).connect()
    assert not tls12.accepted and "certificate revoked" in tls12.detail.lower(), tls12.detail
    mark = mqtt_broker.log_mark()
    tls13 = mqtt_probe(tls_context(mqtt_broker.ca_cert_path, pair, version=ssl.TLSVersion.TLSv1_3), node).connect()
    assert not tls13.accepted, tls13.detail
    mqtt_broker.wait_for_log("certificate verify failed", mark)


@pytest.mark.parametrize(
    ("version", "accepted"),
    [(ssl.TLSVersion.TLSv1_1, False), (ssl.TLSVersion.TLSv1_2, True), (ssl.TLSVersion.TLSv1_3, True)],
    ids=["tls1.1-refused", "tls1.2-accepted", "tls1.3-accepted"],
)
def test_tls_1_2_is_the_minimum(
    mqtt_probe: ProbeFactory, mqtt_broker: MosquittoBroker, lab_pki: LabPki, version: ssl.TLSVersion, accepted: bool
) -> None:
    context = tls_context(mqtt_broker.ca_cert_path, lab_pki.node_cert(NODE_A), version=version)
    outcome = mqtt_probe(context, NODE_A).connect()
    assert outcome.accepted is accepted, outcome.detail
    if not accepted:
        assert "protocol version" in outcome.detail.lower(), outcome.detail  # the broker's alert, not a local refusal


def test_plaintext_mqtt_gets_no_connack(mqtt_broker: MosquittoBroker) -> None:
    """An MQTT 3.1.1 CONNECT in the clear, on the broker's only port: the connection is closed, no CONNACK."""
    client_id = NODE_A.encode()
    variable = b"\x00\x04MQTT\x04\x02\x00\x1e"
    payload = struct.pack(">H", len(client_id)) + client_id
    connect = bytes([0x10, len(variable) + len(payload)]) + variable + payload
    with socket.create_connection((mqtt_broker.host, mqtt_broker.port), timeout=5) as sock:
        sock.sendall(connect)
        reply = b""
        try:
            while chunk := sock.recv(64):
                reply += chunk
        except ConnectionResetError:
            pass
    assert not reply.startswith(b"\x20"), f"got what looks like a CONNACK: {reply!r}"


def _listening_sockets(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process *pid* listens on (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # TCP_LISTEN
                addr_hex, port_hex = local.split(":")
                raw = bytes.fromhex(addr_hex)
                packed = raw[::-1] if family == socket.AF_INET else b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
                found.append((socket.inet_ntop(family, packed), int(port_hex, 16)))
    return found


def test_the_tls_port_is_the_only_listener(mqtt_broker: MosquittoBroker) -> None:
    assert mqtt_broker.pid is not None
    assert _listening_sockets(mqtt_broker.pid) == [(mqtt_broker.host, mqtt_broker.port)]


# -- lifecycle --------------------------------------------------------------------------------------


def test_port_in_use_is_a_clear_error(mqtt_broker: MosquittoBroker, lab_pki: LabPki, tmp_path: Path) -> None:
    second = MosquittoBroker(tmp_path / "second", lab_pki, port=mqtt_broker.port)
    with pytest.raises(BrokerError) as err:
        second.start()
    message = str(err.value)
    assert f"127.0.0.1:{mqtt_broker.port} is already in use" in message
    assert "rig down" in message and "port 0" in message
    assert not second.running


def test_stop_terminates_cleanly_and_frees_the_port(lab_pki: LabPki, tmp_path: Path) -> None:
    broker = MosquittoBroker(tmp_path / "own", lab_pki)
    broker.start()
    port = broker.port
    broker.stop()
    assert not broker.running
    log = broker.log_path.read_text()
    assert "terminating" in log and "PRIVATE KEY" not in log
    assert not broker.pid_path.exists()  # mosquitto removes its pid file on a clean exit
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_plugin_is_built_once_per_source(tmp_path: Path) -> None:
    first = build_plugin(tmp_path)
    stamp = first.stat().st_mtime_ns
    again = build_plugin(tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert first.name.startswith("rig_clientid-") and first.suffix == ".so"


def test_a_broker_that_dies_at_start_is_reported_with_its_output(lab_pki: LabPki, tmp_path: Path) -> None:
    fake = tmp_path / "fake-mosquitto"
    fake.write_text("#!/bin/sh\necho 'Error: Unable to load server key file' >&2\nexit 3\n")
    fake.chmod(0o755)
    broker = MosquittoBroker(tmp_path / "dies", lab_pki, executable=str(fake))
    with pytest.raises(BrokerError, match="exited with status 3") as err:
        broker.start()
    assert "Unable to load server key file" in str(err.value)
    assert not broker.running


def test_missing_mosquitto_is_a_clear_error(lab_pki: LabPki, tmp_path: Path) -> None:
    with pytest.raises(BrokerError, match="apt-get install mosquitto"):
        MosquittoBroker(tmp_path / "none", lab_pki, executable=str(tmp_path / "no-such-mosquitto")).start()

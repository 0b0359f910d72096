"""The local cloud's REST API, store and MQTT bridge, in process (httpx TestClient, ManualClock).

The node's side of every exchange is fed to :meth:`CloudMqtt.handle_message` exactly as
the broker would deliver it (topic + payload bytes); the end-to-end cases at the bottom
go through a real mosquitto with node certificates instead.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
import socket
import sqlite3
import ssl
import string
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from rig.cloud.api import MAX_RAW_TO_NODE_BYTES, ErrorCode, create_app
from rig.cloud.api_server import ApiServer, ApiServerError
from rig.cloud.auth import ACCESS_TOKEN_TTL_S, TokenAuthority, cli_safe_json, decode_jwt, encode_jwt
from rig.cloud.broker import MosquittoBroker
from rig.cloud.clock import ManualClock, SystemClock
from rig.cloud.ota_delivery import DeliveryControl, DeliveryPlan
from rig.cloud.pki import LabPki
from rig.cloud.service import CloudMqtt, MqttServiceError, NodeUnreachable, parse_node_topic
from rig.cloud.store import DB_FILENAME, MIGRATIONS, SCHEMA_VERSION, CloudStore, Role, SchemaTooNew
from rig.firmware.image import build_app_image
from tests import cloud_fixtures
from tests.cloud_fixtures import MqttProbe, ProbeFactory, tls_context
from tests.firmware_samples import DESC

ALICE, BOB, CAROL = "alice@example.com", "bob@example.com", "carol@example.com"
PASSWORD = "correct horse battery staple"
NODE = "N7FXSyMjeYFhWcRyDig7t3"
OTHER_NODE = "aabbccddeeff"


# --------------------------------------------------------------------------- doubles and fixtures


@dataclass
class RecordingChannel:
    """The API's way to a node, recorded: (topic, payload) per publish."""

    published: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    raw: list[tuple[str, bytes]] = field(default_factory=list)
    fail: bool = False

    def publish_to_node(self, node_id: str, suffix: str, payload: dict[str, Any]) -> None:
        if self.fail:
            raise NodeUnreachable("broker down (test)")
        self.published.append((f"node/{node_id}/{suffix}", payload))

    def publish_raw_to_node(self, node_id: str, suffix: str, payload: bytes) -> None:
        if self.fail:
            raise NodeUnreachable("broker down (test)")
        self.raw.append((f"node/{node_id}/{suffix}", payload))


@dataclass(frozen=True)
class FakePublished:
    url: str
    file_size: int
    sha256: str


@dataclass
class FakeOtaHost:
    calls: list[tuple[str, str, int]] = field(default_factory=list)
    refuse: str | None = None

    def publish(self, job_id: str, node_id: str, image: bytes) -> FakePublished:
        if self.refuse:
            raise LookupError(self.refuse)
        self.calls.append((job_id, node_id, len(image)))
        return FakePublished(f"https://127.0.0.1:1/ota/tok/{job_id}.bin", len(image), "00" * 32)


class RecordingService(CloudMqtt):
    """The real service with its broker publishes recorded (for otafetch → otaurl in process)."""

    def __init__(self, *args: Any, channel: RecordingChannel, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.channel = channel

    def publish_to_node(self, node_id: str, suffix: str, payload: dict[str, Any], timeout: float = 5.0) -> None:
        self.channel.publish_to_node(node_id, suffix, payload)


@dataclass
class Stack:
    store: CloudStore
    clock: ManualClock
    channel: RecordingChannel
    ota: FakeOtaHost
    service: RecordingService
    client: TestClient
    delivery: DeliveryControl = field(default_factory=DeliveryControl.create)
    _tokens: dict[str, str] = field(default_factory=dict)

    def login(self, email: str, password: str = PASSWORD) -> dict[str, Any]:
        r = self.client.post("/v1/login2", json={"user_name": email, "password": password})
        assert r.status_code == 200, r.text
        return r.json()

    def auth(self, email: str) -> dict[str, str]:
        """A valid access token for *email* (logging in again only when the cached one expired: scrypt is slow)."""
        token = self._tokens.get(email)
        if token is None or cli_token_attribute(token, "exp") <= self.clock.now() + 1:
            token = self._tokens[email] = self.login(email)["accesstoken"]
        return {"Authorization": token}

    def node_says(self, node_id: str, suffix: str, payload: Any, *, basic_ingest: bool = True) -> None:
        rule = {
            "user/mapping": "esp_user_node_mapping",
            "params/local": "esp_set_params",
            "config": "esp_node_config",
            "params/local/init": "esp_init_params",
            "otastatus": "esp_node_otastatus",
            "otafetch": "esp_node_otafetch",
            "alert": "esp_node_alert",
        }[suffix]
        topic = f"$aws/rules/{rule}/node/{node_id}/{suffix}" if basic_ingest else f"node/{node_id}/{suffix}"
        handled = self.service.handle_message(topic, json.dumps(payload).encode())
        assert handled is not None

    def user_id(self, email: str) -> str:
        user = self.store.user_by_email(email)
        assert user is not None
        return user.user_id

    def map(self, email: str, node_id: str = NODE, role: Role = Role.PRIMARY) -> None:
        self.store.map_node(node_id, self.user_id(email), role, self.clock.now())


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    clock = ManualClock()
    store = CloudStore.open(tmp_path)
    for email in (ALICE, BOB, CAROL):
        store.add_user(email, PASSWORD, clock.now())
    channel, ota, delivery = RecordingChannel(), FakeOtaHost(), DeliveryControl.create()
    service = RecordingService(store, clock, ota=ota, channel=channel)
    app = create_app(store, clock, channel, ota, test_mode=True, mqtt_host="localhost", mqtt_port=8883, ota_delivery=delivery)
    with TestClient(app) as client:
        yield Stack(store, clock, channel, ota, service, client, delivery)
    service.stop()
    store.close()


def cli_token_attribute(token: str, name: str) -> Any:
    """esp-rainmaker-cli ``rmaker_lib/configmanager.py`` ``get_token_attribute``, step by step."""
    payload = token.split(".")[1]
    if len(payload) % 4:
        payload += "=" * (4 - len(payload) % 4)
    return json.loads(base64.b64decode(payload).decode("utf-8"))[name]


def assert_failure(r: Any, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["status"] == "failure" and body["description"] and isinstance(body["error_code"], int), body
    return body


# --------------------------------------------------------------------------- store


def test_store_is_wal_versioned_and_reopens(tmp_path: Path) -> None:
    store = CloudStore.open(tmp_path)
    assert store.journal_mode().lower() == "wal"
    assert store.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
    store.add_user(ALICE, PASSWORD, 1.0)
    store.close()
    again = CloudStore.open(tmp_path)
    assert again.authenticate(ALICE, PASSWORD) is not None
    assert again.schema_version == SCHEMA_VERSION
    again.close()


def test_store_refuses_a_newer_schema(tmp_path: Path) -> None:
    CloudStore.open(tmp_path).close()
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    conn.execute("INSERT INTO schema_version(version, applied_at) VALUES (?, 0)", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(SchemaTooNew, match="newer than this rig"):
        CloudStore.open(tmp_path)


def test_passwords_and_refresh_tokens_are_not_stored_in_the_clear(stack: Stack, tmp_path: Path) -> None:
    tokens = stack.login(ALICE)
    stack.store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob(DB_FILENAME + "*"))
    assert PASSWORD.encode() not in raw
    assert tokens["refreshtoken"].encode() not in raw


def test_wrong_password_and_unknown_user_fail_alike(stack: Stack) -> None:
    assert stack.store.authenticate(ALICE, "nope") is None
    assert stack.store.authenticate("nobody@example.com", PASSWORD) is None
    a = assert_failure(stack.client.post("/v1/login2", json={"user_name": ALICE, "password": "nope"}), 401)
    b = assert_failure(stack.client.post("/v1/login2", json={"user_name": "x@example.com", "password": "nope"}), 401)
    assert a == b and a["error_code"] == ErrorCode.LOGIN_FAILED


# --------------------------------------------------------------------------- tokens


def test_login_returns_the_three_tokens_the_cli_reads(stack: Stack) -> None:
    tokens = stack.login(ALICE)
    assert tokens["status"] == "success"
    assert {"idtoken", "accesstoken", "refreshtoken"} <= tokens.keys()
    assert cli_token_attribute(tokens["idtoken"], "custom:user_id") == stack.user_id(ALICE)
    assert cli_token_attribute(tokens["idtoken"], "email") == ALICE
    exp = cli_token_attribute(tokens["accesstoken"], "exp")
    assert exp == int(stack.clock.now()) + ACCESS_TOKEN_TTL_S or exp == int(stack.clock.now()) + ACCESS_TOKEN_TTL_S - 1


def test_refresh_gives_new_access_and_id_tokens(stack: Stack) -> None:
    tokens = stack.login(ALICE)
    stack.clock.advance(10)
    r = stack.client.post("/v1/login2", json={"refreshtoken": tokens["refreshtoken"]})
    assert r.status_code == 200, r.text
    fresh = r.json()
    assert {"idtoken", "accesstoken"} <= fresh.keys() and "refreshtoken" not in fresh
    assert cli_token_attribute(fresh["accesstoken"], "exp") > cli_token_attribute(tokens["accesstoken"], "exp")
    assert stack.client.get("/v1/user/nodes", headers={"Authorization": fresh["accesstoken"]}).status_code == 200
    assert_failure(stack.client.post("/v1/login2", json={"refreshtoken": "not-a-token"}), 401)


def test_access_token_expires_after_one_hour_of_clock(stack: Stack) -> None:
    tokens = stack.login(ALICE)
    headers = {"Authorization": tokens["accesstoken"]}
    stack.clock.advance(ACCESS_TOKEN_TTL_S - 2)
    assert stack.client.get("/v1/user/nodes", headers=headers).status_code == 200
    stack.clock.advance(3)
    body = assert_failure(stack.client.get("/v1/user/nodes", headers=headers), 401)
    assert "expired" in body["description"]
    fresh = stack.client.post("/v1/login2", json={"refreshtoken": tokens["refreshtoken"]}).json()
    assert stack.client.get("/v1/user/nodes", headers={"Authorization": fresh["accesstoken"]}).status_code == 200


def test_authorization_is_the_raw_access_token(stack: Stack) -> None:
    tokens = stack.login(ALICE)
    nodes = "/v1/user/nodes"
    assert stack.client.get(nodes, headers={"Authorization": tokens["accesstoken"]}).status_code == 200
    assert assert_failure(stack.client.get(nodes), 401)["error_code"] == ErrorCode.UNAUTHENTICATED
    assert_failure(stack.client.get(nodes, headers={"Authorization": "Bearer " + tokens["accesstoken"]}), 401)
    assert_failure(stack.client.get(nodes, headers={"Authorization": tokens["idtoken"]}), 401)
    assert_failure(stack.client.get(nodes, headers={"Authorization": tokens["refreshtoken"]}), 401)
    header, payload, sig = tokens["accesstoken"].split(".")
    tampered = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
    assert_failure(stack.client.get(nodes, headers={"Authorization": f"{header}.{tampered}.{sig}"}), 401)
    unsigned = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    assert_failure(stack.client.get(nodes, headers={"Authorization": f"{unsigned}.{payload}."}), 401)
    other_key = encode_jwt(cli_token_attribute_claims(tokens["accesstoken"]), b"k" * 32)
    assert_failure(stack.client.get(nodes, headers={"Authorization": other_key}), 401)


def cli_token_attribute_claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.b64decode(payload + "=" * (-len(payload) % 4)))


def test_jwt_payloads_never_contain_base64url_only_characters() -> None:
    """The CLI decodes with standard base64, which drops ``-``/``_``: every payload must avoid them."""
    key = b"x" * 32
    rng = random.Random(4)
    samples: list[dict[str, Any]] = []
    for ch in string.printable + "\x7f\u00e9\u2603":
        for pad in range(3):  # the character at each offset mod 3
            samples.append({"email": "a" * pad + ch * 3 + "@x.io", "custom:user_id": ch, "exp": 1})
    for _ in range(300):
        text = "".join(rng.choice(string.printable) for _ in range(rng.randrange(1, 40)))
        samples.append({"email": text, "custom:user_id": text[::-1], "exp": rng.randrange(2**40), "iat": 3})
    for claims in samples:
        token = encode_jwt(claims, key)
        payload = token.split(".")[1]
        assert "-" not in payload and "_" not in payload, claims
        assert cli_token_attribute(token, "email") == claims["email"]
        assert decode_jwt(token, key) == claims
    # the escape really is needed: plain JSON of these claims would have produced '-' or '_'
    plain = json.dumps({"email": "a?>~b"}, separators=(",", ":")).encode()
    assert set(base64.urlsafe_b64encode(plain).decode()) & {"-", "_"}
    assert not set(base64.urlsafe_b64encode(cli_safe_json({"email": "a?>~b"})).decode()) & {"-", "_"}


def test_issued_tokens_are_cli_safe_for_awkward_emails(tmp_path: Path) -> None:
    store = CloudStore.open(tmp_path)
    clock = ManualClock()
    authority = TokenAuthority(store, clock)
    for email in ("a?b@x.io", "~~~@x.io", ">>>@x.io", "x@y.io"):
        store.add_user(email, PASSWORD, clock.now())
        for _ in range(5):
            tokens = authority.login(email, PASSWORD)
            for token in (tokens.idtoken, tokens.accesstoken):
                assert not set(token.split(".")[1]) & {"-", "_"}
            assert cli_token_attribute(tokens.idtoken, "email") == email
    store.close()


def test_apiversions_and_mqtt_host(stack: Stack) -> None:
    assert "v1" in stack.client.get("/apiversions").json()["supported_versions"]
    host = stack.client.get("/mqtt_host").json()
    assert host["mqtt_host"] == "localhost" and host["mqtt_cred_host"] == "localhost" and host["mqtt_port"] == 8883


# --------------------------------------------------------------------------- nodes and params

CONFIG = {
    "node_id": NODE,
    "config_version": "2020-03-20",
    "info": {"name": "Switch", "fw_version": "1.0", "type": "Switch", "project_name": "rmaker_switch", "platform": "esp32c3"},
    "devices": [{"name": "Switch", "type": "esp.device.switch", "params": [{"name": "Power", "data_type": "bool"}]}],
}


def test_node_list_config_status_params(stack: Stack) -> None:
    stack.map(ALICE)
    stack.node_says(NODE, "config", CONFIG)
    stack.node_says(NODE, "params/local/init", {"Switch": {"Power": False, "Name": "Switch"}})
    stack.node_says(NODE, "params/local", {"Switch": {"Power": True}}, basic_ingest=False)
    h = stack.auth(ALICE)
    assert stack.client.get("/v1/user/nodes", headers=h).json()["nodes"] == [NODE]
    details = stack.client.get("/v1/user/nodes", params={"node_details": "true"}, headers=h).json()["node_details"]
    assert len(details) == 1
    d = details[0]
    assert d["id"] == NODE and d["role"] == "primary" and d["config"] == CONFIG
    assert d["params"] == {"Switch": {"Power": True, "Name": "Switch"}}
    assert d["status"]["connectivity"]["connected"] is True
    for key in ("nodeid", "node_id"):
        q = {key: NODE}
        assert stack.client.get("/v1/user/nodes/config", params=q, headers=h).json() == CONFIG
        assert stack.client.get("/v1/user/nodes/params", params=q, headers=h).json() == {"Switch": {"Power": True, "Name": "Switch"}}
        assert stack.client.get("/v1/user/nodes/status", params=q, headers=h).json()["connectivity"]["connected"] is True
    one = stack.client.get("/v1/user/nodes", params={"node_details": "true", "node_id": NODE}, headers=h).json()
    assert [n["id"] for n in one["node_details"]] == [NODE]
    assert_failure(stack.client.get("/v1/user/nodes/params", headers=h), 400)


def test_last_will_marks_the_node_offline(stack: Stack) -> None:
    stack.map(ALICE)
    stack.node_says(NODE, "params/local/init", {"Switch": {"Power": False}})
    t_online = stack.store.get_node(NODE).connectivity_ts  # type: ignore[union-attr]
    stack.clock.advance(30)
    stack.node_says(NODE, "params/local", {"Connectivity": {"Connected": False}}, basic_ingest=False)
    status = stack.client.get("/v1/user/nodes/status", params={"node_id": NODE}, headers=stack.auth(ALICE)).json()
    assert status["connectivity"]["connected"] is False
    assert status["connectivity"]["timestamp"] >= int((t_online + 30) * 1000)  # type: ignore[operator]


def test_node_list_pages_with_next_id(stack: Stack) -> None:
    ids = [f"node{i:02d}" for i in range(5)]
    for nid in ids:
        stack.map(ALICE, nid)
    h = stack.auth(ALICE)
    seen: list[str] = []
    start: str | None = None
    while True:
        params: dict[str, Any] = {"num_records": 2} | ({"start_id": start} if start else {})
        page = stack.client.get("/v1/user/nodes", params=params, headers=h).json()
        seen += page["nodes"]
        start = page.get("next_id")
        if not start:
            break
    assert seen == ids


def test_params_put_multi_node_publishes_params_remote(stack: Stack) -> None:
    stack.map(ALICE)
    stack.map(ALICE, OTHER_NODE)
    body = [
        {"node_id": NODE, "payload": {"Switch": {"Power": True}}},
        {"node_id": OTHER_NODE, "payload": {"Light": {"Brightness": 40}}},
        {"node_id": "someoneelses", "payload": {"Switch": {"Power": True}}},
    ]
    r = stack.client.put("/v1/user/nodes/params", json=body, headers=stack.auth(ALICE))
    assert r.status_code == 200, r.text
    assert [(x["node_id"], x["status"]) for x in r.json()] == [(NODE, "success"), (OTHER_NODE, "success"), ("someoneelses", "failure")]
    assert stack.channel.published == [
        (f"node/{NODE}/params/remote", {"Switch": {"Power": True}}),
        (f"node/{OTHER_NODE}/params/remote", {"Light": {"Brightness": 40}}),
    ]


def test_params_put_single_node_form(stack: Stack) -> None:
    stack.map(ALICE)
    h = stack.auth(ALICE)
    r = stack.client.put("/v1/user/nodes/params", params={"node_id": NODE}, json={"Switch": {"Power": False}}, headers=h)
    assert r.status_code == 200 and r.json()["status"] == "success", r.text
    assert stack.channel.published == [(f"node/{NODE}/params/remote", {"Switch": {"Power": False}})]
    assert_failure(stack.client.put("/v1/user/nodes/params", json={"Switch": {"Power": False}}, headers=h), 400)
    stack.channel.fail = True
    r = stack.client.put("/v1/user/nodes/params", params={"node_id": NODE}, json={"Switch": {"Power": 1}}, headers=h)
    body = assert_failure(r, 503)
    assert "broker down" in body["description"]


# --------------------------------------------------------------------------- mapping


def mapping_put(stack: Stack, email: str, secret: str, node_id: str = NODE) -> str:
    r = stack.client.put(
        "/v1/user/nodes/mapping",
        json={"node_id": node_id, "secret_key": secret, "operation": "add", "user_id": "ignored"},
        headers=stack.auth(email),
    )
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def mapping_status(stack: Stack, email: str, request_id: str) -> str:
    # the CLI's literal "mapping?&request_id=" (esp-rainmaker-cli rmaker_cmd/provision.py)
    r = stack.client.get(f"/v1/user/nodes/mapping?&request_id={request_id}", headers=stack.auth(email))
    assert r.status_code == 200, r.text
    return str(r.json()["request_status"])


def node_half(stack: Stack, email: str, secret: str, node_id: str = NODE, **extra: Any) -> None:
    user_id = extra.pop("user_id", None) or stack.user_id(email)
    stack.node_says(node_id, "user/mapping", {"node_id": node_id, "user_id": user_id, "secret_key": secret, "reset": True, **extra})


def test_mapping_user_first_then_node(stack: Stack) -> None:
    rid = mapping_put(stack, ALICE, "s3cret")
    assert mapping_status(stack, ALICE, rid) == "requested"
    assert stack.store.role_of(stack.user_id(ALICE), NODE) is None
    stack.clock.advance(55)  # near the end of the 60 s window; the test clock also runs in real time, so leave slack
    node_half(stack, ALICE, "s3cret")
    assert mapping_status(stack, ALICE, rid) == "confirmed"
    assert stack.store.role_of(stack.user_id(ALICE), NODE) is Role.PRIMARY


def test_mapping_node_first_then_user(stack: Stack) -> None:
    node_half(stack, ALICE, "s3cret")
    stack.clock.advance(55)  # near the end of the 60 s window; the test clock also runs in real time, so leave slack
    rid = mapping_put(stack, ALICE, "s3cret")
    assert mapping_status(stack, ALICE, rid) == "confirmed"
    assert stack.client.get("/v1/user/nodes", headers=stack.auth(ALICE)).json()["nodes"] == [NODE]


def test_mapping_times_out_after_60_s_of_clock(stack: Stack) -> None:
    rid = mapping_put(stack, ALICE, "s3cret")
    stack.clock.advance(61)
    assert mapping_status(stack, ALICE, rid) == "timedout"
    node_half(stack, ALICE, "s3cret")
    assert mapping_status(stack, ALICE, rid) == "timedout"
    assert stack.store.role_of(stack.user_id(ALICE), NODE) is None


def test_mapping_node_half_expires_too(stack: Stack) -> None:
    node_half(stack, ALICE, "s3cret")
    stack.clock.advance(61)
    rid = mapping_put(stack, ALICE, "s3cret")
    assert mapping_status(stack, ALICE, rid) == "requested"
    stack.clock.advance(61)
    assert mapping_status(stack, ALICE, rid) == "timedout"
    assert stack.store.role_of(stack.user_id(ALICE), NODE) is None


@pytest.mark.parametrize("node_first", [False, True])
def test_wrong_secret_never_confirms(stack: Stack, node_first: bool) -> None:
    if node_first:
        node_half(stack, ALICE, "node-secret")
        rid = mapping_put(stack, ALICE, "user-secret")
    else:
        rid = mapping_put(stack, ALICE, "user-secret")
        node_half(stack, ALICE, "node-secret")
    assert mapping_status(stack, ALICE, rid) == "requested"
    stack.clock.advance(61)
    assert mapping_status(stack, ALICE, rid) == "timedout"
    assert stack.store.role_of(stack.user_id(ALICE), NODE) is None


def test_node_half_for_another_user_never_confirms(stack: Stack) -> None:
    """Bob knowing the node id and even the secret cannot take a node Alice provisioned."""
    node_half(stack, ALICE, "s3cret")
    rid = mapping_put(stack, BOB, "s3cret")
    assert mapping_status(stack, BOB, rid) == "requested"
    assert stack.store.role_of(stack.user_id(BOB), NODE) is None
    assert_failure(stack.client.get("/v1/user/nodes/mapping", params={"request_id": rid}, headers=stack.auth(ALICE)), 404)


def test_node_half_with_foreign_node_id_in_payload_is_refused(stack: Stack) -> None:
    rid = mapping_put(stack, ALICE, "s3cret", node_id=OTHER_NODE)
    handled = stack.service.handle_message(
        f"node/{NODE}/user/mapping",
        json.dumps({"node_id": OTHER_NODE, "user_id": stack.user_id(ALICE), "secret_key": "s3cret"}).encode(),
    )
    assert handled is not None and not handled.accepted
    assert mapping_status(stack, ALICE, rid) == "requested"


def test_newer_request_discards_the_older(stack: Stack) -> None:
    first = mapping_put(stack, ALICE, "one")
    second = mapping_put(stack, ALICE, "two")
    assert mapping_status(stack, ALICE, first) == "discarded"
    node_half(stack, ALICE, "two")
    assert mapping_status(stack, ALICE, second) == "confirmed"


def test_remapping_by_a_new_owner_drops_the_old_users(stack: Stack) -> None:
    stack.map(ALICE)
    stack.map(CAROL, role=Role.SECONDARY)
    node_half(stack, BOB, "b0b")
    rid = mapping_put(stack, BOB, "b0b")
    assert mapping_status(stack, BOB, rid) == "confirmed"
    assert stack.store.role_of(stack.user_id(BOB), NODE) is Role.PRIMARY
    assert stack.store.role_of(stack.user_id(ALICE), NODE) is None
    assert stack.store.role_of(stack.user_id(CAROL), NODE) is None


def test_factory_reset_report_drops_the_mapping(stack: Stack) -> None:
    stack.map(ALICE)
    stack.node_says(NODE, "user/mapping", {"node_id": NODE, "user_id": "esp-rmaker", "secret_key": "failed", "reset": True})
    assert stack.store.role_of(stack.user_id(ALICE), NODE) is None


def test_mapping_remove(stack: Stack) -> None:
    stack.map(ALICE)
    stack.map(BOB, role=Role.SECONDARY)
    h = stack.auth(ALICE)
    body = {"node_id": NODE, "secret_key": "", "operation": "remove"}
    r = stack.client.put("/v1/user/nodes/mapping", json=body, headers=h)
    assert r.status_code == 200 and r.json()["request_id"], r.text
    assert stack.store.role_of(stack.user_id(ALICE), NODE) is None
    assert stack.store.role_of(stack.user_id(BOB), NODE) is None
    assert_failure(stack.client.put("/v1/user/nodes/mapping", json=body, headers=h), 403)


def test_mapping_add_needs_a_secret(stack: Stack) -> None:
    r = stack.client.put("/v1/user/nodes/mapping", json={"node_id": NODE, "operation": "add"}, headers=stack.auth(ALICE))
    assert "secret_key" in assert_failure(r, 400)["description"]


# --------------------------------------------------------------------------- sharing


def node_calls(stack: Stack, email: str) -> dict[str, int]:
    h = stack.auth(email)
    q = {"node_id": NODE}
    return {
        "params": stack.client.get("/v1/user/nodes/params", params=q, headers=h).status_code,
        "config": stack.client.get("/v1/user/nodes/config", params={"nodeid": NODE}, headers=h).status_code,
        "status": stack.client.get("/v1/user/nodes/status", params=q, headers=h).status_code,
        "set": stack.client.put("/v1/user/nodes/params", params=q, json={"Switch": {"Power": True}}, headers=h).status_code,
        "details": stack.client.get("/v1/user/nodes", params={"node_details": "true", "node_id": NODE}, headers=h).status_code,
    }


DENIED = {"params": 403, "config": 403, "status": 403, "set": 403, "details": 403}
ALLOWED = {"params": 200, "config": 200, "status": 200, "set": 200, "details": 200}


def share(stack: Stack, owner: str, to: str) -> str:
    r = stack.client.put("/v1/user/nodes/sharing", json={"nodes": [NODE], "user_name": to}, headers=stack.auth(owner))
    assert r.status_code == 200, r.text
    return str(r.json()["request_id"])


def answer(stack: Stack, email: str, request_id: str, accept: bool) -> Any:
    return stack.client.put("/v1/user/nodes/sharing/requests", json={"accept": accept, "request_id": request_id}, headers=stack.auth(email))


def test_share_is_effective_only_after_acceptance(stack: Stack) -> None:
    stack.map(ALICE)
    stack.node_says(NODE, "config", CONFIG)
    assert node_calls(stack, BOB) == DENIED
    rid = share(stack, ALICE, BOB)
    assert node_calls(stack, BOB) == DENIED
    pending = stack.client.get("/v1/user/nodes/sharing/requests", params={"primary_user": "false"}, headers=stack.auth(BOB)).json()
    [req] = pending["sharing_requests"]
    assert req["request_id"] == rid and req["request_status"] == "pending"
    assert req["node_ids"] == [NODE] and req["primary_user_name"] == ALICE and req["user_name"] == BOB
    assert answer(stack, BOB, rid, True).status_code == 200
    stack.channel.published.clear()
    assert node_calls(stack, BOB) == ALLOWED
    assert stack.channel.published == [(f"node/{NODE}/params/remote", {"Switch": {"Power": True}})]
    sharing = stack.client.get("/v1/user/nodes/sharing", params={"node_id": NODE}, headers=stack.auth(ALICE)).json()
    assert sharing == {"node_sharing": [{"node_id": NODE, "users": {"primary": [ALICE], "secondary": [BOB]}}]}
    # the secondary cannot share on, nor take OTA; the primary can take the share back
    assert_failure(stack.client.put("/v1/user/nodes/sharing", json={"nodes": [NODE], "user_name": CAROL}, headers=stack.auth(BOB)), 403)
    r = stack.client.delete("/v1/user/nodes/sharing", params={"nodes": NODE, "user_name": BOB}, headers=stack.auth(ALICE))
    assert r.status_code == 200, r.text
    assert node_calls(stack, BOB) == DENIED


def test_declined_share_is_never_effective(stack: Stack) -> None:
    stack.map(ALICE)
    stack.node_says(NODE, "config", CONFIG)
    rid = share(stack, ALICE, BOB)
    assert answer(stack, BOB, rid, False).status_code == 200
    assert node_calls(stack, BOB) == DENIED
    assert_failure(answer(stack, BOB, rid, True), 409)
    assert node_calls(stack, BOB) == DENIED
    sent = stack.client.get("/v1/user/nodes/sharing/requests", params={"primary_user": "true"}, headers=stack.auth(ALICE)).json()
    assert [r["request_status"] for r in sent["sharing_requests"]] == ["declined"]


def test_only_the_recipient_answers_and_only_the_sender_cancels(stack: Stack) -> None:
    stack.map(ALICE)
    rid = share(stack, ALICE, BOB)
    assert_failure(answer(stack, CAROL, rid, True), 404)
    assert_failure(answer(stack, ALICE, rid, True), 404)
    assert_failure(stack.client.delete("/v1/user/nodes/sharing/requests", params={"request_id": rid}, headers=stack.auth(BOB)), 404)
    r = stack.client.delete("/v1/user/nodes/sharing/requests", params={"request_id": rid}, headers=stack.auth(ALICE))
    assert r.status_code == 200, r.text
    assert_failure(answer(stack, BOB, rid, True), 409)
    assert node_calls(stack, BOB) == {**DENIED}


def test_sharing_someone_elses_node_or_with_unknown_user(stack: Stack) -> None:
    stack.map(ALICE)

    def attempt(actor: str, to: str) -> Any:
        return stack.client.put("/v1/user/nodes/sharing", json={"nodes": [NODE], "user_name": to}, headers=stack.auth(actor))

    assert_failure(attempt(BOB, CAROL), 403)
    assert_failure(attempt(ALICE, "who@x.io"), 404)
    assert_failure(attempt(ALICE, ALICE), 400)


def test_sharing_requests_expire_after_7_days(stack: Stack) -> None:
    stack.map(ALICE)
    rid = share(stack, ALICE, BOB)
    stack.clock.advance(7 * 24 * 3600 + 1)
    assert_failure(answer(stack, BOB, rid, True), 409)
    assert node_calls(stack, BOB) == DENIED


# --------------------------------------------------------------------------- malformed requests


def test_malformed_json_is_400_with_description(stack: Stack) -> None:
    h = {**stack.auth(ALICE), "Content-Type": "application/json"}
    for path in ("/v1/user/nodes/mapping", "/v1/user/nodes/params", "/v1/user/nodes/sharing"):
        body = assert_failure(stack.client.put(path, content=b'{"node_id": ', headers=h), 400)
        assert "JSON" in body["description"] or "json" in body["description"]
    assert_failure(stack.client.post("/v1/login2", content=b"{nope", headers={"Content-Type": "application/json"}), 400)
    assert_failure(stack.client.post("/v1/login2", content=b"user_name=a", headers={"Content-Type": "text/plain"}), 400)


def test_missing_and_wrong_fields_are_400_naming_the_field(stack: Stack) -> None:
    h = stack.auth(ALICE)
    body = assert_failure(stack.client.post("/v1/login2", json={"user_name": ALICE}), 400)
    assert "password" in body["description"] and PASSWORD not in body["description"]
    body = assert_failure(stack.client.put("/v1/user/nodes/mapping", json={"secret_key": "x", "operation": "add"}, headers=h), 400)
    assert "node_id" in body["description"]
    body = assert_failure(stack.client.put("/v1/user/nodes/mapping", json={"node_id": NODE, "operation": "steal"}, headers=h), 400)
    assert "operation" in body["description"]
    topic_injection = {"node_id": "a/b/#", "secret_key": "x", "operation": "add"}
    assert_failure(stack.client.put("/v1/user/nodes/mapping", json=topic_injection, headers=h), 400)
    assert_failure(stack.client.put("/v1/user/nodes/sharing/requests", json={"accept": "maybe", "request_id": "x"}, headers=h), 400)
    assert_failure(stack.client.put("/v1/user/nodes/params", json=[{"node_id": NODE}], headers=h), 400)
    assert_failure(stack.client.put("/v1/user/nodes/params", json=[], headers=h), 400)
    assert_failure(stack.client.get("/v1/user/nodes/params", params={"node_id": "x" * 500}, headers=h), 400)
    assert_failure(stack.client.get("/v1/user/nodes", params={"num_records": "-1"}, headers=h), 400)


def test_non_finite_numbers_are_refused(stack: Stack) -> None:
    stack.map(ALICE)
    h = {**stack.auth(ALICE), "Content-Type": "application/json"}
    r = stack.client.put("/v1/user/nodes/params", params={"node_id": NODE}, content=b'{"Switch": {"Power": NaN}}', headers=h)
    assert_failure(r, 400)
    handled = stack.service.handle_message(f"node/{NODE}/params/local", b'{"Switch": {"Power": Infinity}}')
    assert handled is not None and not handled.accepted
    assert stack.channel.published == []


def test_oversized_bodies_are_413_with_description(stack: Stack) -> None:
    h = {**stack.auth(ALICE), "Content-Type": "application/json"}
    big = json.dumps({"node_id": NODE, "secret_key": "x" * 100_000, "operation": "add"}).encode()
    body = assert_failure(stack.client.put("/v1/user/nodes/mapping", content=big, headers=h), 413)
    assert "larger than" in body["description"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b'{"node_id": "' + NODE.encode() + b'", "secret_key": "'
        for _ in range(100):
            yield b"y" * 1024
        yield b'", "operation": "add"}'

    assert_failure(stack.client.put("/v1/user/nodes/mapping", content=chunks(), headers=h), 413)


def test_unknown_paths_and_methods_use_the_failure_shape(stack: Stack) -> None:
    assert_failure(stack.client.get("/v1/nope"), 404)
    assert_failure(stack.client.delete("/v1/login2"), 405)


def test_clock_advance_only_in_test_mode(stack: Stack, tmp_path: Path) -> None:
    before = stack.clock.now()
    r = stack.client.post("/test/clock/advance", json={"seconds": 120})
    assert r.status_code == 200 and r.json()["now"] >= before + 120
    assert_failure(stack.client.post("/test/clock/advance", json={"seconds": -1}), 400)
    prod = create_app(stack.store, SystemClock(), None, None, test_mode=False)
    with TestClient(prod) as client:
        assert_failure(client.post("/test/clock/advance", json={"seconds": 120}), 404)
        assert "/test/clock/advance" not in client.get("/openapi.json").json()["paths"]
    not_manual = create_app(stack.store, SystemClock(), None, None, test_mode=True)
    with TestClient(not_manual) as client:
        assert_failure(client.post("/test/clock/advance", json={"seconds": 1}), 403)


def test_openapi_is_published(stack: Stack) -> None:
    spec = stack.client.get("/openapi.json").json()
    assert {"/v1/login2", "/v1/user/nodes", "/v1/user/nodes/mapping", "/v1/user/nodes/sharing/requests"} <= spec["paths"].keys()
    assert spec["components"]["securitySchemes"]["AccessToken"] == {
        "type": "apiKey",
        "in": "header",
        "name": "Authorization",
        "description": "the raw access token (a JWT), no 'Bearer' prefix",
    }


# --------------------------------------------------------------------------- OTA

IMAGE = build_app_image(DESC, b'{"behaviour": "boot_ok"}')


def upload(stack: Stack, email: str = ALICE, data: bytes = IMAGE, **extra: Any) -> dict[str, Any]:
    r = stack.client.post(
        "/v1/user/otaimage",
        json={"image_name": "switch", "base64_fwimage": base64.b64encode(data).decode(), **extra},
        headers=stack.auth(email),
    )
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_ota_upload_reads_the_app_descriptor(stack: Stack) -> None:
    img = upload(stack)
    assert (img["fw_version"], img["project_name"], img["secure_version"], img["file_size"]) == (
        DESC.version,
        DESC.project_name,
        DESC.secure_version,
        len(IMAGE),
    )
    h = stack.auth(ALICE)
    junk = base64.b64encode(b"\x00" * 64).decode()
    assert_failure(stack.client.post("/v1/user/otaimage", json={"image_name": "x", "base64_fwimage": junk}, headers=h), 400)
    assert upload(stack, data=b"\x00" * 64, fw_version="9.9")["fw_version"] == "9.9"
    assert_failure(stack.client.post("/v1/user/otaimage", json={"image_name": "x", "base64_fwimage": "@@@"}, headers=h), 400)


def test_ota_job_publishes_otaurl_and_tracks_otastatus(stack: Stack) -> None:
    stack.map(ALICE)
    img = upload(stack)
    h = stack.auth(ALICE)
    r = stack.client.post("/v1/user/otajob", json={"ota_image_id": img["ota_image_id"], "nodes": [NODE]}, headers=h)
    assert r.status_code == 200, r.text
    job = r.json()
    job_id = job["ota_job_id"]
    assert [(n["node_id"], n["status"]) for n in job["nodes"]] == [(NODE, "triggered")]
    assert stack.ota.calls == [(job_id, NODE, len(IMAGE))]
    [(topic, payload)] = stack.channel.published
    assert topic == f"node/{NODE}/otaurl"
    assert payload == {
        "ota_job_id": job_id,
        "url": f"https://127.0.0.1:1/ota/tok/{job_id}.bin",
        "file_size": len(IMAGE),
        "fw_version": DESC.version,
    }
    info = stack.client.get("/v1/user/nodes/ota_update", params={"node_id": NODE}, headers=h).json()
    assert info["ota_available"] is True and info["ota_job_id"] == job_id and info["fw_version"] == DESC.version

    stack.node_says(NODE, "otastatus", {"ota_job_id": job_id, "status": "in-progress", "additional_info": "Downloading", "ts": 1})
    stack.node_says(
        NODE, "otastatus", {"ota_job_id": job_id, "status": "success", "additional_info": "OTA Upgrade finished"}, basic_ingest=False
    )
    status = stack.client.get("/v1/user/nodes/ota_status", params={"node_id": NODE, "ota_job_id": job_id}, headers=h).json()
    assert status["status"] == "success" and status["additional_info"] == "OTA Upgrade finished"
    assert [x["status"] for x in status["history"]] == ["in-progress", "success"]
    assert stack.client.get("/v1/user/nodes/ota_update", params={"node_id": NODE}, headers=h).json()["ota_available"] is False
    # another node cannot report on this job
    handled = stack.service.handle_message(f"node/{OTHER_NODE}/otastatus", json.dumps({"ota_job_id": job_id, "status": "failed"}).encode())
    assert handled is not None and not handled.accepted


def test_otafetch_resends_the_open_job(stack: Stack) -> None:
    stack.map(ALICE)
    img = upload(stack)
    job_id = stack.client.post(
        "/v1/user/otajob", json={"ota_image_id": img["ota_image_id"], "node_id": NODE}, headers=stack.auth(ALICE)
    ).json()["ota_job_id"]
    stack.channel.published.clear()
    stack.node_says(NODE, "otafetch", {"node_id": NODE, "fw_version": "1.0"})
    stack.service.stop()  # joins the dispatch worker
    assert [(t, p["ota_job_id"]) for t, p in stack.channel.published] == [(f"node/{NODE}/otaurl", job_id)]


def test_ota_job_waits_for_otafetch_when_the_broker_is_down(stack: Stack) -> None:
    stack.map(ALICE)
    img = upload(stack)
    stack.channel.fail = True
    body = {"ota_image_id": img["ota_image_id"], "nodes": [NODE]}
    job = stack.client.post("/v1/user/otajob", json=body, headers=stack.auth(ALICE)).json()
    assert [n["status"] for n in job["nodes"]] == ["pending"] and "next otafetch" in job["description"]
    r = stack.client.post("/v1/user/nodes/ota_update", json={"node_id": NODE, "ota_job_id": job["ota_job_id"]}, headers=stack.auth(ALICE))
    assert_failure(r, 503)
    stack.channel.fail = False
    stack.node_says(NODE, "otafetch", {"node_id": NODE, "fw_version": "1.0"})
    stack.service.stop()
    assert [t for t, _ in stack.channel.published] == [f"node/{NODE}/otaurl"]
    assert stack.store.ota_job_node(job["ota_job_id"], NODE).status == "triggered"  # type: ignore[union-attr]


def test_ota_job_failure_reason_is_kept(stack: Stack) -> None:
    stack.map(ALICE)
    img = upload(stack)
    stack.ota.refuse = "no signing key matches the node's secure_boot_digest"
    body = {"ota_image_id": img["ota_image_id"], "nodes": [NODE]}
    job = stack.client.post("/v1/user/otajob", json=body, headers=stack.auth(ALICE)).json()
    [node] = job["nodes"]
    assert node["status"] == "failed" and "no signing key matches" in node["additional_info"]
    assert stack.channel.published == []


def test_ota_needs_the_primary_user_and_own_image(stack: Stack) -> None:
    stack.map(ALICE)
    stack.map(BOB, OTHER_NODE)
    img = upload(stack)
    stack.store.map_node(NODE, stack.user_id(CAROL), Role.SECONDARY, stack.clock.now())
    assert_failure(
        stack.client.post("/v1/user/otajob", json={"ota_image_id": img["ota_image_id"], "nodes": [NODE]}, headers=stack.auth(CAROL)), 404
    )
    bob_img = upload(stack, BOB)
    assert_failure(
        stack.client.post("/v1/user/otajob", json={"ota_image_id": bob_img["ota_image_id"], "nodes": [NODE]}, headers=stack.auth(BOB)), 403
    )
    assert_failure(stack.client.post("/v1/user/otajob", json={"ota_image_id": img["ota_image_id"]}, headers=stack.auth(ALICE)), 400)


# --------------------------------------------------------------------------- test-mode OTA delivery plans

DELIVERY_PATHS = ("/test/ota/delivery", "/test/ota/deliveries")


def test_ota_delivery_plan_is_armed_echoed_and_disarmed(stack: Stack) -> None:
    stack.map(ALICE)
    r = stack.client.post("/test/ota/delivery", json={"node_id": NODE, "sign": False, "transport": "http", "cut_after": 0})
    assert r.status_code == 200, r.text
    assert r.json() == {"node_id": NODE, "sign": False, "transport": "http", "cut_after": 0, "stall_after": None, "replaced": False}
    assert stack.delivery.plans.armed(NODE) == DeliveryPlan(NODE, sign=False, transport="http", cut_after=0)
    r = stack.client.post("/test/ota/delivery", json={"node_id": NODE, "stall_after": 4096})
    assert r.json()["replaced"] is True and r.json()["sign"] is True and r.json()["transport"] == "https"
    assert stack.delivery.plans.armed(NODE) == DeliveryPlan(NODE, stall_after=4096)
    assert stack.client.delete("/test/ota/delivery", params={"node_id": NODE}).json() == {"node_id": NODE, "disarmed": True}
    assert stack.client.delete("/test/ota/delivery", params={"node_id": NODE}).json() == {"node_id": NODE, "disarmed": False}
    assert stack.delivery.plans.armed(NODE) is None


def test_ota_delivery_plan_for_an_unknown_node_is_404(stack: Stack) -> None:
    body = assert_failure(stack.client.post("/test/ota/delivery", json={"node_id": OTHER_NODE}), 404)
    assert OTHER_NODE in body["description"] and body["error_code"] == ErrorCode.NOT_FOUND
    assert stack.delivery.plans.armed(OTHER_NODE) is None


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"cut_after": 10, "stall_after": 20}, "at most one"),
        ({"cut_after": -1}, "cut_after"),
        ({"stall_after": "5"}, "stall_after"),
        ({"cut_after": 1.5}, "cut_after"),
        ({"sign": "yes"}, "sign"),
        ({"transport": "ftp"}, "transport"),
        ({"node_id": "a/b/#"}, "node_id"),
        ({"retries": 3}, "retries"),
    ],
)
def test_ota_delivery_plan_validation_is_400(stack: Stack, extra: dict[str, Any], named: str) -> None:
    stack.map(ALICE)
    body = assert_failure(stack.client.post("/test/ota/delivery", json={"node_id": NODE, **extra}), 400)
    assert named in body["description"] and body["error_code"] == ErrorCode.BAD_REQUEST
    assert stack.delivery.plans.armed(NODE) is None


def test_ota_deliveries_need_the_jobs_owner(stack: Stack) -> None:
    stack.map(ALICE)
    img = upload(stack)
    job = stack.client.post("/v1/user/otajob", json={"ota_image_id": img["ota_image_id"], "node_id": NODE}, headers=stack.auth(ALICE))
    job_id = job.json()["ota_job_id"]
    r = stack.client.get("/test/ota/deliveries", params={"ota_job_id": job_id}, headers=stack.auth(ALICE))
    assert r.status_code == 200 and r.json() == []  # the fake OTA host records nothing; the stack's publisher does
    assert_failure(stack.client.get("/test/ota/deliveries", params={"ota_job_id": job_id}), 401)
    assert_failure(stack.client.get("/test/ota/deliveries", params={"ota_job_id": job_id}, headers=stack.auth(BOB)), 404)
    assert_failure(stack.client.get("/test/ota/deliveries", params={"ota_job_id": "nope"}, headers=stack.auth(ALICE)), 404)
    assert_failure(stack.client.get("/test/ota/deliveries", headers=stack.auth(ALICE)), 400)


def test_ota_delivery_endpoints_only_in_test_mode(stack: Stack) -> None:
    stack.map(ALICE)
    prod = create_app(stack.store, SystemClock(), None, None, test_mode=False, ota_delivery=DeliveryControl.create())
    with TestClient(prod) as client:
        assert_failure(client.post("/test/ota/delivery", json={"node_id": NODE}), 404)
        assert_failure(client.delete("/test/ota/delivery", params={"node_id": NODE}), 404)
        assert_failure(client.get("/test/ota/deliveries", params={"ota_job_id": "x"}, headers=stack.auth(ALICE)), 404)
        assert not set(DELIVERY_PATHS) & client.get("/openapi.json").json()["paths"].keys()
    assert set(DELIVERY_PATHS) <= stack.client.get("/openapi.json").json()["paths"].keys()
    without_host = create_app(stack.store, ManualClock(), None, None, test_mode=True)
    with TestClient(without_host) as client:
        body = assert_failure(client.post("/test/ota/delivery", json={"node_id": NODE}), 503)
        assert "OTA delivery control is not available" in body["description"]


# --------------------------------------------------------------------------- topics


def test_topic_forms() -> None:
    assert parse_node_topic("node/n1/params/local") is not None
    t = parse_node_topic("$aws/rules/esp_user_node_mapping/node/n1/user/mapping")
    assert t is not None and (t.node_id, t.suffix, t.form) == ("n1", "user/mapping", "basic-ingest")
    assert parse_node_topic("$aws/rules/esp_set_params/node/n1/user/mapping") is None  # wrong rule for the suffix
    assert parse_node_topic("node/n1/params/remote") is None  # cloud→node
    assert parse_node_topic("node//config") is None
    assert parse_node_topic("node/+/config") is None


# --------------------------------------------------------------------------- end to end through mosquitto

lab_pki = cloud_fixtures.lab_pki
mqtt_broker = cloud_fixtures.mqtt_broker
mqtt_probe = cloud_fixtures.mqtt_probe

E2E_NODE = "e2eNode4c1d"


@dataclass
class LiveStack:
    store: CloudStore
    clock: ManualClock
    service: CloudMqtt
    client: TestClient
    ota: FakeOtaHost

    def auth(self, email: str) -> dict[str, str]:
        r = self.client.post("/v1/login2", json={"user_name": email, "password": PASSWORD})
        assert r.status_code == 200, r.text
        return {"Authorization": r.json()["accesstoken"]}


@pytest.fixture
def live(tmp_path: Path, lab_pki: LabPki, mqtt_broker: MosquittoBroker) -> Iterator[LiveStack]:
    """The store, the real cloud service on the real broker, and the API in process."""
    clock = ManualClock()
    store = CloudStore.open(tmp_path)
    store.add_user(ALICE, PASSWORD, clock.now())
    ota = FakeOtaHost()
    service = CloudMqtt(store, clock, pki=lab_pki, host=mqtt_broker.host, port=mqtt_broker.port, ota=ota)
    service.start()
    app = create_app(store, clock, service, ota, test_mode=True, mqtt_host=mqtt_broker.host, mqtt_port=mqtt_broker.port)
    try:
        with TestClient(app) as client:
            yield LiveStack(store, clock, service, client, ota)
    finally:
        service.stop()
        store.close()


@pytest.fixture
def node(mqtt_probe: ProbeFactory, lab_pki: LabPki) -> MqttProbe:
    probe = mqtt_probe(lab_pki.node_cert(E2E_NODE), E2E_NODE)
    outcome = probe.connect()
    assert outcome.accepted, outcome.detail
    return probe


def test_e2e_mapping_through_mosquitto(live: LiveStack, node: MqttProbe) -> None:
    h = live.auth(ALICE)
    r = live.client.put("/v1/user/nodes/mapping", json={"node_id": E2E_NODE, "secret_key": "e2e-secret", "operation": "add"}, headers=h)
    rid = r.json()["request_id"]
    user = live.store.user_by_email(ALICE)
    assert user is not None
    mark = live.service.mark()
    node.publish(
        f"$aws/rules/esp_user_node_mapping/node/{E2E_NODE}/user/mapping",
        json.dumps({"node_id": E2E_NODE, "user_id": user.user_id, "secret_key": "e2e-secret", "reset": True}).encode(),
    )
    handled = live.service.wait_handled(E2E_NODE, "user/mapping", after=mark)
    assert handled.accepted and handled.form == "basic-ingest", handled
    status = live.client.get("/v1/user/nodes/mapping", params={"request_id": rid}, headers=h).json()
    assert status["request_status"] == "confirmed"
    assert live.client.get("/v1/user/nodes", headers=h).json()["nodes"] == [E2E_NODE]


def test_e2e_params_put_reaches_the_node_and_reports_come_back(live: LiveStack, node: MqttProbe) -> None:
    user = live.store.user_by_email(ALICE)
    assert user is not None
    live.store.map_node(E2E_NODE, user.user_id, Role.PRIMARY, live.clock.now())
    node.subscribe(f"node/{E2E_NODE}/params/remote")
    h = live.auth(ALICE)
    r = live.client.put("/v1/user/nodes/params", json=[{"node_id": E2E_NODE, "payload": {"Switch": {"Power": True}}}], headers=h)
    assert r.json() == [{"node_id": E2E_NODE, "status": "success", "description": "Successfully set params"}]
    got = node.wait_for(f"node/{E2E_NODE}/params/remote")
    assert json.loads(got.payload) == {"Switch": {"Power": True}}

    mark = live.service.mark()
    node.publish(f"$aws/rules/esp_set_params/node/{E2E_NODE}/params/local", b'{"Switch": {"Power": true}}')
    live.service.wait_handled(E2E_NODE, "params/local", after=mark)
    assert live.client.get("/v1/user/nodes/params", params={"nodeid": E2E_NODE}, headers=h).json() == {"Switch": {"Power": True}}


def test_e2e_last_will_marks_the_node_offline(live: LiveStack, mqtt_probe: ProbeFactory, lab_pki: LabPki) -> None:
    user = live.store.user_by_email(ALICE)
    assert user is not None
    live.store.map_node(E2E_NODE, user.user_id, Role.PRIMARY, live.clock.now())
    node = mqtt_probe(lab_pki.node_cert(E2E_NODE), E2E_NODE)
    # esp-rainmaker src/core/esp_rmaker_connectivity.c: LWT on params/local, QoS 1, not retained
    node.client.will_set(f"node/{E2E_NODE}/params/local", b'{"Connectivity":{"Connected":false}}', qos=1)
    assert node.connect().accepted
    mark = live.service.mark()
    node.publish(f"$aws/rules/esp_init_params/node/{E2E_NODE}/params/local/init", b'{"Switch":{"Power":false}}')
    live.service.wait_handled(E2E_NODE, "params/local/init", after=mark)
    h = live.auth(ALICE)
    assert live.client.get("/v1/user/nodes/status", params={"node_id": E2E_NODE}, headers=h).json()["connectivity"]["connected"]
    mark = live.service.mark()
    sock = node.client.socket()
    assert sock is not None
    sock.shutdown(socket.SHUT_RDWR)  # the node vanishes without DISCONNECT: the broker sends its will
    live.service.wait_handled(E2E_NODE, "params/local", after=mark)
    node.close()
    status = live.client.get("/v1/user/nodes/status", params={"node_id": E2E_NODE}, headers=h).json()
    assert status["connectivity"]["connected"] is False


def test_e2e_ota_job_otaurl_reaches_the_node(live: LiveStack, node: MqttProbe) -> None:
    user = live.store.user_by_email(ALICE)
    assert user is not None
    live.store.map_node(E2E_NODE, user.user_id, Role.PRIMARY, live.clock.now())
    node.subscribe(f"node/{E2E_NODE}/otaurl")
    h = live.auth(ALICE)
    img = live.client.post(
        "/v1/user/otaimage", json={"image_name": "sw", "base64_fwimage": base64.b64encode(IMAGE).decode()}, headers=h
    ).json()
    job = live.client.post("/v1/user/otajob", json={"ota_image_id": img["ota_image_id"], "node_id": E2E_NODE}, headers=h).json()
    got = json.loads(node.wait_for(f"node/{E2E_NODE}/otaurl").payload)
    assert got["ota_job_id"] == job["ota_job_id"] and got["file_size"] == len(IMAGE) and got["fw_version"] == DESC.version
    assert got["url"].startswith("https://")
    mark = live.service.mark()
    status = {"ota_job_id": job["ota_job_id"], "status": "in-progress", "additional_info": "Downloading Firmware Image"}
    node.publish(f"$aws/rules/esp_node_otastatus/node/{E2E_NODE}/otastatus", json.dumps(status).encode())
    live.service.wait_handled(E2E_NODE, "otastatus", after=mark)
    # the node asks again (as after a reboot): the service re-sends the open job with a fresh URL
    node.received.clear()
    node.publish(f"node/{E2E_NODE}/otafetch", json.dumps({"node_id": E2E_NODE, "fw_version": "1.0"}).encode())
    again = json.loads(node.wait_for(f"node/{E2E_NODE}/otaurl").payload)
    assert again["ota_job_id"] == job["ota_job_id"]
    answer = live.client.get("/v1/user/nodes/ota_status", params={"node_id": E2E_NODE}, headers=h).json()
    assert answer["status"] == "in-progress" and [x["status"] for x in answer["history"]] == ["in-progress"]


def test_e2e_service_needs_the_broker(lab_pki: LabPki, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: connection refused
        service = CloudMqtt(CloudStore.in_memory(), ManualClock(), pki=lab_pki, port=port)
        with pytest.raises(MqttServiceError, match=f"127.0.0.1:{port}"):
            service.start(timeout=2)
    with pytest.raises(NodeUnreachable, match="not connected"):
        service.publish_to_node(E2E_NODE, "params/remote", {})


def test_e2e_service_refused_without_the_service_identity(lab_pki: LabPki, mqtt_broker: MosquittoBroker) -> None:
    """Another lab certificate is not the service: the broker refuses it (client id ≠ CN), and start() says so at once."""
    service = CloudMqtt(
        CloudStore.in_memory(), ManualClock(), pki=lab_pki, host=mqtt_broker.host, port=mqtt_broker.port, identity="not-the-cloud"
    )
    started = time.monotonic()
    with pytest.raises(MqttServiceError, match=r"(?i)refused|disconnected|not authori[sz]ed"):
        service.start(timeout=8)
    assert time.monotonic() - started < 5


# --------------------------------------------------------------------------- the HTTPS server


def test_api_server_over_https(tmp_path: Path, lab_pki: LabPki) -> None:
    clock = ManualClock()
    store = CloudStore.open(tmp_path)
    store.add_user(ALICE, PASSWORD, clock.now())
    app = create_app(store, clock, None, None, test_mode=False)
    with ApiServer(app, lab_pki) as server:
        assert server.url.startswith("https://127.0.0.1:") and server.port > 0
        with httpx.Client(base_url=server.url, verify=ssl.create_default_context(cafile=server.ca_cert_path)) as http:
            assert "v1" in http.get("/apiversions").json()["supported_versions"]
            tokens = http.post("/v1/login2", json={"user_name": ALICE, "password": PASSWORD}).json()
            assert http.get("/v1/user/nodes", headers={"Authorization": tokens["accesstoken"]}).json()["nodes"] == []
            assert http.post("/v1/login2", content=b"{", headers={"Content-Type": "application/json"}).status_code == 400
        ca = Path(server.ca_cert_path)
        with httpx.Client(base_url=server.url, verify=tls_context(ca, version=ssl.TLSVersion.TLSv1_2)) as http:
            assert http.get("/apiversions").status_code == 200
        with pytest.raises(httpx.ConnectError, match=r"(?i)protocol|alert|EOF"):
            with httpx.Client(base_url=server.url, verify=tls_context(ca, version=ssl.TLSVersion.TLSv1_1)) as http:
                http.get("/apiversions")
        with pytest.raises(ApiServerError, match=f"port {server.port} on 127.0.0.1 is already in use"):
            ApiServer(app, lab_pki, port=server.port).start()
    assert not server.running
    store.close()


# --------------------------------------------------------------------------- test-mode raw messages to nodes

RAW_PATH = "/test/mqtt/to-node"


def raw_body(payload: bytes, node_id: str = NODE, suffix: str = "params/remote") -> dict[str, str]:
    return {"node_id": node_id, "suffix": suffix, "payload_base64": base64.b64encode(payload).decode()}


@pytest.mark.parametrize(
    ("payload", "suffix"),
    [(b'{"Switch": {"Power": tr', "params/remote"), (b"\xff\x00\xfe", "otaurl"), (b"", "to-node"), (b"\x00" * 1024, "params/remote")],
)
def test_raw_bytes_reach_the_node_unchanged(stack: Stack, payload: bytes, suffix: str) -> None:
    stack.map(ALICE)
    r = stack.client.post(RAW_PATH, json=raw_body(payload, suffix=suffix))
    assert r.status_code == 200, r.text
    topic = f"node/{NODE}/{suffix}"
    assert stack.channel.raw == [(topic, payload)] and stack.channel.published == []
    assert r.json() == {"node_id": NODE, "topic": topic, "size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def test_raw_message_answer_never_echoes_the_payload(stack: Stack) -> None:
    stack.map(ALICE)
    payload = b"canary-8d1f0c " * 8
    r = stack.client.post(RAW_PATH, json=raw_body(payload))
    assert r.status_code == 200 and b"canary" not in r.content and base64.b64encode(payload) not in r.content


def test_raw_message_to_an_unknown_node_is_404(stack: Stack) -> None:
    body = assert_failure(stack.client.post(RAW_PATH, json=raw_body(b"{}", node_id=OTHER_NODE)), 404)
    assert OTHER_NODE in body["description"] and body["error_code"] == ErrorCode.NOT_FOUND
    assert stack.channel.raw == []


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"node_id": NODE, "suffix": "params/remote", "payload_base64": "not base64!"}, "base64"),
        ({"node_id": NODE, "suffix": "params/remote", "payload_base64": "QUJD"[:3]}, "base64"),
        ({"node_id": NODE, "suffix": "params/remote", "payload_base64": "ü"}, "base64"),
        ({"node_id": NODE, "suffix": "params/local", "payload_base64": ""}, "suffix"),
        ({"node_id": NODE, "suffix": "../config", "payload_base64": ""}, "suffix"),
        ({"node_id": "a/b/#", "suffix": "params/remote", "payload_base64": ""}, "node_id"),
        ({"node_id": NODE, "suffix": "params/remote"}, "payload_base64"),
        ({"node_id": NODE, "suffix": "params/remote", "payload_base64": "", "qos": 0}, "qos"),
        ({"node_id": NODE, "suffix": "params/remote", "payload_base64": 5}, "payload_base64"),
    ],
)
def test_raw_message_validation_is_400(stack: Stack, body: dict[str, Any], named: str) -> None:
    stack.map(ALICE)
    failure_body = assert_failure(stack.client.post(RAW_PATH, json=body), 400)
    assert named in failure_body["description"] and failure_body["error_code"] == ErrorCode.BAD_REQUEST
    assert stack.channel.raw == []


def test_raw_message_size_is_capped_with_413(stack: Stack) -> None:
    stack.map(ALICE)
    at_cap = b"A" * MAX_RAW_TO_NODE_BYTES
    assert stack.client.post(RAW_PATH, json=raw_body(at_cap)).json()["size"] == MAX_RAW_TO_NODE_BYTES
    body = assert_failure(stack.client.post(RAW_PATH, json=raw_body(at_cap + b"A")), 413)
    assert "larger than" in body["description"] and body["error_code"] == ErrorCode.BODY_TOO_LARGE
    body = assert_failure(stack.client.post(RAW_PATH, json=raw_body(b"A" * 100_000)), 413)  # refused before it is parsed
    assert "larger than" in body["description"]
    assert stack.channel.raw == [(f"node/{NODE}/params/remote", at_cap)]


def test_raw_message_without_a_way_to_the_node_is_503(stack: Stack) -> None:
    stack.map(ALICE)
    stack.channel.fail = True
    body = assert_failure(stack.client.post(RAW_PATH, json=raw_body(b"{}")), 503)
    assert "broker down (test)" in body["description"] and body["error_code"] == ErrorCode.SERVICE_UNAVAILABLE

    with TestClient(create_app(stack.store, ManualClock(), None, None, test_mode=True)) as client:
        body = assert_failure(client.post(RAW_PATH, json=raw_body(b"{}")), 503)
        assert "cloud MQTT service" in body["description"]


def test_raw_message_endpoint_only_in_test_mode(stack: Stack) -> None:
    stack.map(ALICE)
    prod = create_app(stack.store, SystemClock(), stack.channel, None, test_mode=False)
    with TestClient(prod) as client:
        assert_failure(client.post(RAW_PATH, json=raw_body(b"{}")), 404)
        assert RAW_PATH not in client.get("/openapi.json").json()["paths"]
    assert stack.channel.raw == []
    assert RAW_PATH in stack.client.get("/openapi.json").json()["paths"]


def test_e2e_raw_bytes_reach_the_node_through_mosquitto(live: LiveStack, node: MqttProbe) -> None:
    user = live.store.user_by_email(ALICE)
    assert user is not None
    live.store.map_node(E2E_NODE, user.user_id, Role.PRIMARY, live.clock.now())
    node.subscribe(f"node/{E2E_NODE}/params/remote")
    payload = b'{"Switch":\x00{"Power": \xff'
    r = live.client.post(RAW_PATH, json=raw_body(payload, node_id=E2E_NODE))
    assert r.status_code == 200, r.text
    assert node.wait_for(f"node/{E2E_NODE}/params/remote").payload == payload
    # publish_to_node is the JSON form of the same path
    node.received.clear()
    live.service.publish_to_node(E2E_NODE, "params/remote", {"Switch": {"Power": False}})
    assert json.loads(node.wait_for(f"node/{E2E_NODE}/params/remote").payload) == {"Switch": {"Power": False}}


def test_e2e_raw_publish_needs_a_connected_service(lab_pki: LabPki) -> None:
    service = CloudMqtt(CloudStore.in_memory(), ManualClock(), pki=lab_pki, port=1)
    with pytest.raises(NodeUnreachable, match="not connected"):
        service.publish_raw_to_node(E2E_NODE, "params/remote", b"x")
    with pytest.raises(NodeUnreachable, match="invalid node id"):
        service.publish_raw_to_node("a/#", "params/remote", b"x")

"""Local control, server and client, in this process: the node's ``esp_local_ctrl`` endpoints
(:mod:`rig.vboard.node.local_ctrl`) served over real HTTP on 127.0.0.1, judged with the rig's
client (:mod:`rig.prov.local_ctrl`) and with Espressif's (esp-rainmaker-cli
``rmaker_tools/rmaker_local_ctrl``: ``esp_rainmaker_ctrl.py``, ``proto/proto_lc.py``,
``esp_local_ctrl_pb2``, ``common/security``, ``common/transport/transport_http.py``).

The node behind the server is a stand-in holding the real switch data model
(:func:`rig.vboard.node.data_model.switch_node`); what a real node does with a params write
(callback, NVS, report) is judged on a virtual board in tests/test_local_ctrl_board.py.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import pytest

from rig.firmware.behaviour import BehaviourManifest
from rig.protocomm.errors import SessionError
from rig.protocomm.messages import LocalCtrlMessage, LocalCtrlMsgType, Status
from rig.protocomm.security import ClientSecurity2
from rig.prov.local_ctrl import LocalControlClient, LocalControlError, LocalControlService, LocalCtrlVersion, local_control_service
from rig.prov.transport_http import SoftApHttpTransport, TransportError
from rig.vboard.bootloader import LogMessage
from rig.vboard.node.data_model import MalformedParams, NodeModel, switch_node
from rig.vboard.node.data_model import local_control_service as service_device
from rig.vboard.node.local_ctrl import (
    NVS_NAMESPACE,
    NVS_POP_KEY,
    POP_GENERATED,
    LocalControl,
    LocalControlEndpoints,
    stored_pop,
    version_json,
)
from tests import espressif_prov_client

espressif_ctrl: ModuleType = espressif_prov_client.module("rmaker_local_ctrl.esp_rainmaker_ctrl")
proto_lc: ModuleType = espressif_prov_client.module("rmaker_local_ctrl.proto.proto_lc")
espressif_security1: ModuleType = espressif_prov_client.module("common.security.security1")
espressif_http: ModuleType = espressif_prov_client.module("common.transport.transport_http")

POP = "8c1f04d2"
NODE_ID = "lc-node-0001"


@dataclass
class FakeNvs:
    values: dict[tuple[str, str], bytes] = field(default_factory=dict)
    commits: int = 0

    def get(self, namespace: str, key: str) -> bytes | None:
        return self.values.get((namespace, key))

    def set_blob(self, namespace: str, key: str, value: bytes) -> None:
        self.values[(namespace, key)] = value

    def commit(self) -> None:
        self.commits += 1


@dataclass
class FakeRuntime:
    lines: list[str] = field(default_factory=list)
    tracked: list[object] = field(default_factory=list)

    def log(self, line: LogMessage, **values: object) -> None:
        self.lines.append(f"{line.level} {line.tag}: {line.format(**values)}")

    def track(self, item: object) -> object:
        self.tracked.append(item)
        return item


@dataclass
class StandInNode:
    """What :class:`LocalControl` uses of :class:`rig.vboard.node.node.RainMakerNode`."""

    flaws: frozenset[str] = frozenset()
    extra: dict[str, object] = field(default_factory=dict)
    address: str = "127.0.0.1"
    node_id: str = NODE_ID
    model: NodeModel = field(default_factory=lambda: switch_node("1.0.0", "rig_switch"))
    nvs: FakeNvs = field(default_factory=FakeNvs)
    runtime: FakeRuntime = field(default_factory=FakeRuntime)
    writes: list[bytes] = field(default_factory=list)

    @property
    def behaviour(self) -> BehaviourManifest:
        return BehaviourManifest(extra=self.extra)

    def config_json(self) -> str:
        return self.model.config_json(self.node_id, None)

    def handle_set_params(self, payload: bytes, source: str) -> bool:
        assert source == "Local"
        self.writes.append(payload)
        try:
            writes = self.model.parse_set_params(payload)
        except MalformedParams:
            return False
        for _device, param, value in writes:
            self.model.set_value(param, value)
        return True


def serve(node: StandInNode, pop: str = POP, security: int = 1) -> LocalControl:
    control = LocalControl(node, pop, security, port=0)  # type: ignore[arg-type]
    node.model.add_device(service_device(control.reported_pop, security))
    control.start()
    return control


@pytest.fixture
def node() -> StandInNode:
    return StandInNode()


@pytest.fixture
def server(node: StandInNode) -> Iterator[LocalControl]:
    control = serve(node)
    yield control
    control.close()


def client(control: LocalControl, pop: str = POP) -> LocalControlClient:
    return LocalControlClient(SoftApHttpTransport(control.httpd.address, control.httpd.port, timeout=5), pop=pop)


# --------------------------------------------------------------------------- known answers


def test_version_answer_is_esp_local_ctrls_json() -> None:
    assert version_json(1, 0) == '{"local_ctrl":{"ver":"v1.0","sec_ver":1,"sec_patch_ver":0}}'
    assert LocalCtrlVersion.parse(b"v1.0") == LocalCtrlVersion("v1.0", "v1.0", None)  # ESP-IDF before the JSON form
    assert LocalCtrlVersion.parse(version_json(2, 1).encode()).sec_ver == 2


def test_pop_is_generated_once_and_kept_in_nvs(node: StandInNode) -> None:
    pop = stored_pop(node)  # type: ignore[arg-type]
    assert re.fullmatch(r"[0-9a-f]{8}", pop)
    assert node.nvs.values == {(NVS_NAMESPACE, NVS_POP_KEY): pop.encode()}  # a blob of the 8 characters, no NUL
    assert node.runtime.lines == [f"I esp_rmaker_local: {POP_GENERATED.text}"]
    assert stored_pop(node) == pop and len(node.runtime.lines) == 1  # read back, not regenerated
    assert stored_pop(StandInNode()) != pop  # another device (or after a factory reset)


def test_local_control_service_is_read_only_and_found_by_the_client() -> None:
    model = switch_node("1.0.0", "rig_switch")
    model.add_device(service_device(POP, 1))
    config = json.loads(model.config_json(NODE_ID, None))
    assert config["services"][-1] == {
        "name": "Local Control", "type": "esp.service.local_control",
        "params": [{"name": "POP", "type": "esp.param.local_control_pop", "data_type": "string", "properties": ["read"]},
                   {"name": "Type", "type": "esp.param.local_control_type", "data_type": "int", "properties": ["read"]}],
    }  # fmt: skip
    params = json.loads(model.params_json())
    assert params["Local Control"] == {"POP": POP, "Type": 1}
    assert model.parse_set_params(b'{"Local Control":{"POP":"00000000","Type":0},"Switch":{"Power":true}}')[0][1].name == "Power"
    assert len(model.parse_set_params(b'{"Local Control":{"POP":"00000000"}}')) == 0  # no write callback: nothing applies
    assert local_control_service(config, params) == local_control_service({}, params) == LocalControlService(POP, 1)
    config["services"][-1]["name"] = "LAN"  # found by type, as the app does
    assert local_control_service(config, {"LAN": {"POP": POP, "Type": 1}}) is not None
    assert local_control_service(config, {"Switch": {}}) is None


def test_control_answers_match_espressifs_protobuf(node: StandInNode) -> None:
    """Requests built by Espressif's proto_lc decode on the node; the node's answers parse with their pb2."""
    node.model.add_device(service_device(POP, 1))
    endpoints = LocalControlEndpoints(node)  # type: ignore[arg-type]

    class Plain:
        def encrypt_data(self, data: bytes) -> bytes:
            return data

        def decrypt_data(self, data: bytes) -> bytes:
            return data

    plain = Plain()
    answer = endpoints.control(proto_lc.get_prop_count_request(plain).encode("latin-1"))
    assert answer == bytes.fromhex("0801" "5a02" "1002")  # msg 1; resp_get_prop_count (field 11) {count 2}; status 0 omitted
    assert proto_lc.get_prop_count_response(plain, answer.decode("latin-1")) == 2
    props = proto_lc.get_prop_vals_response(plain, endpoints.control(proto_lc.get_prop_vals_request(plain, [0, 1]).encode("latin-1"))
                                            .decode("latin-1"))  # fmt: skip
    assert [(p["name"], p["type"], p["flags"]) for p in props] == [("config", 1, 1), ("params", 2, 0)]
    assert json.loads(props[0]["value"]) == json.loads(node.config_json())
    assert json.loads(props[1]["value"])["Local Control"] == {"POP": POP, "Type": 1}
    request = proto_lc.set_prop_vals_request(plain, [1], [b'{"Switch":{"Power":true}}']).encode("latin-1")
    assert proto_lc.set_prop_vals_response(plain, endpoints.control(request).decode("latin-1")) is True
    assert node.writes == [b'{"Switch":{"Power":true}}'] and node.model.find("Switch", "Power").value is True  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="not a command"):
        endpoints.control(LocalCtrlMessage(msg=LocalCtrlMsgType.TypeRespGetPropertyCount).encode())


# --------------------------------------------------------------------------- over HTTP, the rig's client


def test_session_with_the_pop_reads_and_writes_properties(node: StandInNode, server: LocalControl) -> None:
    lc = client(server)
    version = lc.get_version()
    assert (version.ver, version.sec_ver, version.sec_patch_ver) == ("v1.0", 1, 0)
    lc.open_session()
    assert lc.property_count() == 2
    config, params = lc.property_values([0, 1])
    assert (config.name, config.type, config.readonly, params.name, params.type, params.readonly) == ("config", 1, True, "params", 2, False)
    assert lc.get_config()["node_id"] == NODE_ID
    assert lc.get_params()["Switch"] == {"Name": "Switch", "Power": False}
    lc.set_params({"Switch": {"Power": True}})
    assert node.writes == [b'{"Switch":{"Power":true}}']
    assert lc.get_params()["Switch"]["Power"] is True


def test_statuses_follow_esp_local_ctrl(node: StandInNode, server: LocalControl) -> None:
    lc = client(server)
    lc.open_session()
    for indices in ([2], [0, 7], []):
        with pytest.raises(LocalControlError) as err:
            lc.property_values(indices)
        assert err.value.status == Status.InvalidArgument, indices
    assert lc.set_property_values({0: b'{"node_id":"other"}'}) == Status.InvalidArgument  # config is read-only
    assert lc.set_property_values({1: b'{"Switch":{"Power":true}}', 0: b"{}"}) == Status.InvalidArgument  # checked before any is set
    assert lc.set_property_values({5: b"{}"}) == Status.InvalidArgument
    assert lc.set_property_values({}) == Status.InvalidArgument
    assert node.writes == []  # nothing of the refused requests reached the params
    assert lc.set_property_values({1: b'{"Switch":{"Power":tru'}) == Status.InternalError  # esp_rmaker_handle_set_params: ESP_FAIL
    assert lc.set_property_values({1: b'{"Switch":{"Power":true}}'}) == Status.Success
    with pytest.raises(TransportError):  # a message naming no command: the handler fails, no answer
        lc.send_control(LocalCtrlMessage(msg=LocalCtrlMsgType.TypeRespSetPropertyValues).encode())


@pytest.mark.parametrize("pop", ["8c1f04d3", "", "abcd1234"])
def test_no_session_without_the_pop(server: LocalControl, pop: str) -> None:
    with pytest.raises((SessionError, TransportError)):
        client(server, pop).open_session()
    plaintext = LocalControlClient(SoftApHttpTransport(server.httpd.address, server.httpd.port, timeout=5))
    with pytest.raises(TransportError):  # no session: protocomm cannot decrypt, the node answers nothing
        plaintext.send_control(LocalCtrlMessage(msg=LocalCtrlMsgType.TypeCmdGetPropertyCount).encode())
    client(server).open_session()  # the right PoP still works afterwards


def test_flaw_local_ctrl_no_pop_gives_anyone_a_session() -> None:
    node = StandInNode(flaws=frozenset({"local_ctrl_no_pop"}))
    control = serve(node)
    try:
        assert control.reported_pop == "" and json.loads(node.model.params_json())["Local Control"] == {"POP": "", "Type": 1}
        lc = client(control, "")
        lc.open_session()
        assert lc.get_config()["node_id"] == NODE_ID
    finally:
        control.close()


def test_security_2_when_the_image_asks_for_it() -> None:
    node = StandInNode(extra={"local_ctrl_security": 2})
    control = serve(node, security=2)
    try:
        lc = client(control)
        assert lc.get_version().sec_ver == 2 and lc.version is not None and lc.version.sec_patch_ver == 1
        assert isinstance(lc.open_session(), ClientSecurity2)
        assert lc.property_count() == 2
        with pytest.raises((SessionError, TransportError)):
            client(control, "wrong-pop").open_session()
    finally:
        control.close()


# --------------------------------------------------------------------------- Espressif's client


def test_espressifs_client_reads_config_and_params_and_sets_a_param(node: StandInNode, server: LocalControl) -> None:
    async def session() -> tuple[Any, Any, bool, Any]:
        transport = espressif_http.Transport_HTTP(f"{server.httpd.address}:{server.httpd.port}", None, timeout=10)
        security = espressif_ctrl.get_security(1, 0, "", "", POP)
        assert await espressif_ctrl.establish_session(transport, security) is True
        config = await espressif_ctrl.get_rainmaker_config(transport, security)
        params = await espressif_ctrl.get_rainmaker_params(transport, security)
        ok = await espressif_ctrl.set_rainmaker_params(transport, security, {"Switch": {"Power": True}})
        return config, params, ok, await espressif_ctrl.get_rainmaker_params(transport, security)

    config, params, ok, after = asyncio.run(session())
    assert config == json.loads(node.config_json())
    assert params["Switch"]["Power"] is False and ok is True and after["Switch"]["Power"] is True
    assert node.writes == [b'{"Switch": {"Power": true}}']  # their json.dumps, spaces and all


def test_espressifs_client_gets_no_session_with_a_wrong_pop(server: LocalControl) -> None:
    async def session() -> bool:
        transport = espressif_http.Transport_HTTP(f"{server.httpd.address}:{server.httpd.port}", None, timeout=10)
        return bool(await espressif_ctrl.establish_session(transport, espressif_security1.Security1("00000000", False)))

    assert asyncio.run(session()) is False

"""Local control on a virtual board, through the real doors only: a ``rig.vboard.serve``
process, esptool writing the virtual set, a ``fctry`` and reading ``nvs`` back, the serial
console, and Espressif's local-control client (esp-rainmaker-cli ``rmaker_tools/rmaker_local_ctrl``
``esp_rainmaker_ctrl.py`` on ``common/transport/transport_http.py`` and
``common/security/security1.py``) as the reference the node must satisfy.

One board walks a node's life in order (the tests share it): Wi-Fi from the console, local
control started with a PoP generated and kept in NVS (``local_ctrl``/``pop``), a reboot that
keeps it, Espressif's client reading ``config``/``params`` and setting a param, the rig's
client refused without the PoP, and a factory reset after which the PoP is a new one. The
``fctry`` points MQTT at a closed port: local control starts before MQTT and needs no cloud.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from rig.boards.virtual_ports import radio_network, write_radio_file
from rig.cloud.pki import LabPki
from rig.firmware.virtual_set import ensure_virtual_set
from rig.protocomm.errors import SessionError
from rig.prov.local_ctrl import LOCAL_CTRL_PORT, LocalControlClient
from rig.prov.transport_http import SoftApHttpTransport, TransportError
from tests import espressif_prov_client
from tests.node_process import BOOT_S, FCTRY_AT, NVS, STEP_S, UNREACHABLE_MQTT, Node, erased_nvs, flash_files, node_fctry, running_node
from tests.vboard_process import SerialMonitor, start_board

espressif_ctrl: ModuleType = espressif_prov_client.module("rmaker_local_ctrl.esp_rainmaker_ctrl")
espressif_http: ModuleType = espressif_prov_client.module("common.transport.transport_http")

BOARD = "local-ctrl"
SSID, PASSPHRASE = "lc-lab", "lc-lab-passphrase"
RANDOM = bytes(range(0x20, 0x60))
"""fctry ``random``: provisioning PoP ``20212223``; the local-control PoP is the node's own."""
STARTED = (
    "esp_rmaker_local: Local Control Service Enabled",
    "esp_rmaker_local: Starting ESP Local control with HTTP Transport and security version: 1",
    "esp_rmaker_local: esp_local_ctrl service started with name : {node_id}",
    "app_main: Local Control Started.",
)
"""What ``esp_rmaker_start_local_ctrl_service`` and the switch example print, in this order (other
tasks' lines, such as ``main_task: Returned from app_main()``, may come between them)."""
GENERATED = "esp_rmaker_local: Couldn't find POP in NVS. Generating a new one."


@dataclass
class LocalCtrlNode(Node):
    pops: list[str] = field(default_factory=list)
    """Every PoP the node stored, in order (read back from its nvs partition)."""

    def stored_pop(self, dest: Path) -> str:
        """The ``local_ctrl``/``pop`` blob of the nvs partition, read with esptool."""
        blob = self.read_nvs(dest).get("local_ctrl", {}).get("pop")
        assert blob is not None, "the node keeps no local_ctrl/pop in its nvs partition"
        return blob.decode("ascii")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCtrlNode]:
    state = tmp_path_factory.mktemp("local-ctrl-lab")
    write_radio_file(state, [radio_network(SSID, PASSPHRASE)])
    base = ensure_virtual_set(state / "virtual", state / "sbv2.pem").build("base")
    node_id = f"local-ctrl-{uuid.uuid4().hex[:8]}"
    fctry = node_fctry(state / "fctry", node_id, UNREACHABLE_MQTT, LabPki(state / "pki"), RANDOM)
    with running_node(LocalCtrlNode(start_board(BOARD, state), node_id), *flash_files(base), hex(FCTRY_AT), fctry,
                      hex(NVS.offset), erased_nvs(state)) as virtual:  # fmt: skip
        yield virtual


def expect_started(node: LocalCtrlNode, mon: SerialMonitor, timeout: float) -> None:
    lines = [line.format(node_id=node.node_id) for line in STARTED]
    mon.expect(re.escape(lines[-1]) + r"\r\n", timeout)
    positions = [mon.text.find(line + "\r\n") for line in lines]
    assert -1 not in positions and positions == sorted(positions), positions


def join_wifi(node: LocalCtrlNode) -> SerialMonitor:
    mon = node.command(f"wifi-prov {SSID} {PASSPHRASE}")
    mon.expect(rf"app_network: Connected with IP Address:{re.escape(node.address)}\r\n", STEP_S)
    expect_started(node, mon, STEP_S)
    return mon


def espressif_session(node: LocalCtrlNode, pop: str, work: Any) -> Any:
    """Their HTTP transport on the node's address and port 8080, their security 1 with *pop*, then *work*."""

    async def run() -> Any:
        transport = espressif_http.Transport_HTTP(f"{node.address}:{LOCAL_CTRL_PORT}", None, timeout=10)
        security = espressif_ctrl.get_security(1, 0, "", "", pop)
        if not await espressif_ctrl.establish_session(transport, security):
            return None
        return await work(transport, security)

    return asyncio.run(run())


def rig_client(node: LocalCtrlNode, pop: str) -> LocalControlClient:
    return LocalControlClient(SoftApHttpTransport(node.address, LOCAL_CTRL_PORT, timeout=10), pop=pop)


# --------------------------------------------------------------------------- in order


def test_local_control_starts_on_wifi_with_a_pop_generated_into_nvs(node: LocalCtrlNode, tmp_path: Path) -> None:
    mon = node.boot()
    mon.expect(r"Provisioning will auto stop after \d+ minute\(s\)\.", BOOT_S)
    assert "esp_rmaker_local" not in mon.text  # nothing before the station has an address
    mon = join_wifi(node)
    assert GENERATED in mon.text and mon.text.index(GENERATED) < mon.text.index("Local Control Service Enabled")
    assert mon.text.index("Local Control Started.") < mon.text.index("esp_rmaker_core: Waiting for MQTT connection")
    pop = node.stored_pop(tmp_path / "nvs.bin")
    assert re.fullmatch(r"[0-9a-f]{8}", pop), pop
    assert pop not in mon.text and pop != "20212223"  # never printed; not the provisioning PoP
    node.pops.append(pop)


def test_the_pop_survives_a_reboot(node: LocalCtrlNode) -> None:
    mon = node.boot()
    mon.expect(r"app_wifi: Already provisioned, starting Wi-Fi STA\r\n", BOOT_S)
    expect_started(node, mon, STEP_S)
    assert GENERATED not in mon.text
    lc = rig_client(node, node.pops[-1])
    lc.open_session()
    assert lc.get_config()["node_id"] == node.node_id


def test_espressifs_client_reads_config_and_params_and_sets_a_param(node: LocalCtrlNode) -> None:
    async def work(transport: Any, security: Any) -> tuple[Any, Any, bool]:
        config = await espressif_ctrl.get_rainmaker_config(transport, security)
        params = await espressif_ctrl.get_rainmaker_params(transport, security)
        return config, params, await espressif_ctrl.set_rainmaker_params(transport, security, {"Switch": {"Power": True}})

    mon = node.command("")
    result = espressif_session(node, node.pops[-1], work)
    assert result is not None, "Espressif's client got no session with the PoP the node stored"
    config, params, ok = result
    assert config["node_id"] == node.node_id and [d["name"] for d in config["devices"]] == ["Switch"]
    service = next(s for s in config["services"] if s["type"] == "esp.service.local_control")
    assert [(p["name"], p["type"], p["properties"]) for p in service["params"]] == [
        ("POP", "esp.param.local_control_pop", ["read"]), ("Type", "esp.param.local_control_type", ["read"])]
    assert params[service["name"]] == {"POP": node.pops[-1], "Type": 1}
    assert params["Switch"]["Power"] is False and ok is True
    mon.expect(r'esp_rmaker_param: Received params: \{"Switch": \{"Power": true\}\}\r\n', STEP_S)
    mon.expect(r"app_main: Received write request via : Local\r\n", STEP_S)
    mon.expect(r"app_main: Received value = true for Switch - Power\r\n", STEP_S)
    node.command("get-param Switch Power").expect(r"esp_rmaker_commands: Switch\.Power = true\r\n", STEP_S)
    lc = rig_client(node, node.pops[-1])  # the rig's client sees the same state
    lc.open_session()
    assert lc.get_params()["Switch"]["Power"] is True


def test_without_the_pop_there_is_no_session(node: LocalCtrlNode) -> None:
    assert espressif_session(node, "00000000", lambda *_: asyncio.sleep(0, result=True)) is None
    for pop in ("", "abcd1234", "20212223"):  # none, Espressif's example, the provisioning PoP
        with pytest.raises((SessionError, TransportError)):
            rig_client(node, pop).open_session()


def test_factory_reset_gives_a_new_pop(node: LocalCtrlNode, tmp_path: Path) -> None:
    mon = node.command("reset-to-factory")
    mon.expect(r"(?s)rst:0xc \(RTC_SW_CPU_RST\).*Provisioning will auto stop after \d+ minute\(s\)\.", BOOT_S)
    mon = join_wifi(node)
    assert GENERATED in mon.text
    pop = node.stored_pop(tmp_path / "nvs.bin")
    assert re.fullmatch(r"[0-9a-f]{8}", pop) and pop != node.pops[-1], (pop, node.pops)
    node.pops.append(pop)
    mon = node.boot()
    expect_started(node, mon, BOOT_S)
    with pytest.raises((SessionError, TransportError)):
        rig_client(node, node.pops[0]).open_session()  # the old PoP stopped working
    lc = rig_client(node, pop)
    lc.open_session()
    assert lc.get_params()["Local Control"]["POP"] == pop

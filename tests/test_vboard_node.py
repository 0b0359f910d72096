"""The virtual board as a RainMaker node, through the real doors only: a ``rig.vboard.serve``
process, esptool writing the virtual set and a ``fctry`` made as ``rmaker claim`` makes it,
a serial console, the local cloud stack (mosquitto, the REST API) in this process, and
esptool reading the flash back.

One board (``node-a``) walks a node's life in order — provisioning with a wrong then the
right passphrase, cloud, user mapping, a params write from REST, a reboot, a factory
reset — so the tests below run in file order and share it; a second board (``node-b``)
has no ``fctry`` at all.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from rig.boards.virtual_ports import published_address, radio_network, write_radio_file
from rig.cloud.fctry import FCTRY_PARTITION_SIZE, read_fctry
from rig.cloud.stack import LocalStack
from rig.firmware.firmware_set import FirmwareSet
from rig.firmware.virtual_set import PROJECT_NAME, ensure_virtual_set
from tests import node_process
from tests.node_process import (
    BOOT_S,
    FCTRY_AT,
    RANDOM,
    STEP_S,
    Node,
    Owner,
    cloud_fctry,
    flash_files,
    publish_as_cloud,
    read_flash,
    running_node,
)
from tests.vboard_process import start_board

SSID, PASSPHRASE = "rig-lab-2g", "virtual-lab-passphrase"


stack = node_process.stack
owner = node_process.owner


@pytest.fixture(scope="module")
def firmware(tmp_path_factory: pytest.TempPathFactory) -> FirmwareSet:
    root = tmp_path_factory.mktemp("node-set")
    return ensure_virtual_set(root / "virtual", root / "sbv2.pem")


@pytest.fixture(scope="module")
def state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("lab-state")
    write_radio_file(state, [radio_network(SSID, PASSPHRASE), radio_network("neighbour", "", "open", 11)])
    return state


@pytest.fixture(scope="module")
def node_a(stack: LocalStack, firmware: FirmwareSet, state_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    node_id = f"node-a-{uuid.uuid4().hex[:8]}"
    fctry = cloud_fctry(stack, tmp_path_factory.mktemp("fctry-a"), node_id)
    with running_node(Node(start_board("node-a", state_dir), node_id), *flash_files(firmware.build("base")), hex(FCTRY_AT), fctry) as node:
        yield node


# --------------------------------------------------------------------------- node-a, in order


def test_boot_prints_node_id_and_the_provisioning_qr(node_a: Node, state_dir: Path) -> None:
    mon = node_a.boot()
    mon.expect(rf"I \(\d+\) esp_rmaker_node: Node ID ----- {node_a.node_id}\r\n", BOOT_S)
    qr = '{"ver":"v1","name":"PROV_3d3e3f","username":"wifiprov","pop":"00010203","transport":"softap"}'
    mon.expect(r"Provisioning will auto stop after 30 minute\(s\)\.", STEP_S)
    assert "I (" in mon.text and "app_wifi: Starting provisioning\r\n" in mon.text
    assert "network_prov_mgr: Provisioning started with service name : PROV_3d3e3f \r\n" in mon.text
    assert f"QRCODE: {qr}\r\n" in mon.text
    assert f"app_network: If QR code is not visible, copy paste the below URL in a browser.\r\n" \
           f"https://rainmaker.espressif.com/qrcode.html?data={qr}\r\n" in mon.text  # fmt: skip
    assert "Returned from app_main()" not in mon.text  # app_main waits for the network, the console serves meanwhile
    assert published_address(state_dir, "node-a") is not None  # the derived address, unless another lab's board held it


def test_wrong_passphrase_is_an_auth_failure_and_the_passphrase_is_never_printed(node_a: Node) -> None:
    mon = node_a.command(f"wifi-prov {SSID} not-the-passphrase")
    mon.expect(r"E \(\d+\) app_wifi: Provisioning failed!\r\n\tReason : Wi-Fi station authentication failed\r\n", STEP_S)
    assert f"Received Wi-Fi credentials\r\n\tSSID     : {SSID}\r\n" in mon.text
    assert "not-the-passphrase" not in mon.text.replace(f"wifi-prov {SSID} not-the-passphrase", "")  # only the echo
    assert "Password" not in mon.text


def test_right_passphrase_connects_and_the_cloud_gets_the_config(node_a: Node, stack: LocalStack) -> None:
    assert stack.mqtt is not None and stack.broker is not None and stack.store is not None
    mark, log_mark = stack.mqtt.mark(), stack.broker.log_mark()
    mon = node_a.command(f"wifi-prov {SSID} {PASSPHRASE}")
    address = node_a.address
    mon.expect(rf"app_network: Connected with IP Address:{re.escape(address)}\r\n", STEP_S)
    mon.expect(r"esp_mqtt_glue: MQTT Connected\r\n", STEP_S)
    mon.expect(r"main_task: Returned from app_main\(\)", STEP_S)
    assert "app_wifi: Provisioning successful" in mon.text and PASSPHRASE not in mon.text.replace(f"wifi-prov {SSID} {PASSPHRASE}", "")
    handled = stack.mqtt.wait_handled(node_a.node_id, "config", after=mark, timeout=STEP_S)
    assert handled.accepted and handled.form == "basic-ingest"
    node = stack.store.get_node(node_a.node_id)
    assert node is not None and isinstance(node.config, dict)
    info = node.config["info"]
    assert (info["platform"], info["project_name"], info["fw_version"]) == ("esp32c3", PROJECT_NAME, "1.0.0")
    assert info["secure_boot_digest"] == {"k0": None, "k1": None, "k2": None}  # nothing burnt on this board
    assert [d["name"] for d in node.config["devices"]] == ["Switch"]
    # the broker saw the node come from its own address, as itself, with RainMaker's session settings
    seen = stack.broker.wait_for_log(f"New client connected from {address}:", log_mark, timeout=STEP_S)
    line = next(x for x in seen.splitlines() if f"New client connected from {address}:" in x)
    assert f" as {node_a.node_id} (p2, c1, k120, " in line  # MQTT 3.1.1, clean session, keepalive 120 s


def test_user_mapping_from_the_console_and_rest_is_confirmed(node_a: Node, stack: LocalStack, owner: Owner) -> None:
    client, user_id = owner.client, owner.user_id
    assert stack.mqtt is not None
    secret = str(uuid.uuid4())
    put = client.put("/v1/user/nodes/mapping", json={"node_id": node_a.node_id, "secret_key": secret, "operation": "add"})
    assert put.status_code == 200, put.text
    mark = stack.mqtt.mark()
    mon = node_a.command(f"add-user {user_id} {secret}")
    mon.expect(r"esp_rmaker_user_mapping: User Node association message published successfully\.", STEP_S)
    assert "esp_rmaker_commands: Starting user-node mapping\r\n" in mon.text
    assert "User Node mapping reset detected." in mon.text  # a new user: reset, so the cloud drops earlier ones
    handled = stack.mqtt.wait_handled(node_a.node_id, "user/mapping", after=mark, timeout=STEP_S)
    assert handled.accepted and "confirmed" in handled.detail
    status = client.get("/v1/user/nodes/mapping", params={"request_id": put.json()["request_id"]}).json()
    assert status["request_status"] == "confirmed"
    config = client.get("/v1/user/nodes/config", params={"nodeid": node_a.node_id})
    assert config.status_code == 200 and config.json()["node_id"] == node_a.node_id


def test_a_params_write_from_rest_is_applied_and_reported(node_a: Node, stack: LocalStack, owner: Owner) -> None:
    client = owner.client
    assert stack.mqtt is not None
    mark = stack.mqtt.mark()
    node_a.command("")  # clear the console text
    put = client.put("/v1/user/nodes/params", params={"node_id": node_a.node_id}, json={"Switch": {"Power": True}})
    assert put.status_code == 200, put.text
    mon = node_a.console()
    mon.expect(r'esp_rmaker_param: Reporting params: \{"Switch":\{"Power":true\}\}', STEP_S)
    assert "app_main: Received write request via : Cloud" in mon.text
    assert "app_main: Received value = true for Switch - Power" in mon.text
    stack.mqtt.wait_handled(node_a.node_id, "params/local", after=mark, timeout=STEP_S,
                            predicate=lambda m: m.accepted)  # fmt: skip
    assert client.get("/v1/user/nodes/params", params={"nodeid": node_a.node_id}).json()["Switch"]["Power"] is True
    node_a.command("get-param Switch Power").expect(r"esp_rmaker_commands: Switch\.Power = true\r\n", STEP_S)


def test_malformed_params_are_dropped_without_harm(node_a: Node, stack: LocalStack) -> None:
    mon = node_a.command("")
    publish_as_cloud(stack, f"node/{node_a.node_id}/params/remote", b'{"Switch":{"Power":fals')
    mon.expect(r'esp_rmaker_param: Received params: \{"Switch":\{"Power":fals\r\n', STEP_S)
    node_a.command("get-param Switch Power").expect(r"esp_rmaker_commands: Switch\.Power = true\r\n", STEP_S)
    assert "Guru Meditation" not in mon.text and "rst:" not in mon.text


def test_nvs_keeps_wifi_user_and_params_across_a_reboot(node_a: Node, stack: LocalStack, owner: Owner,
                                                        tmp_path: Path) -> None:  # fmt: skip
    user_id = owner.user_id
    assert stack.mqtt is not None
    nvs = node_a.read_nvs(tmp_path / "nvs.bin")
    wifi = nvs["nvs.net80211"]
    assert wifi["sta.ssid"] == len(SSID).to_bytes(4, "little") + SSID.encode().ljust(32, b"\0")
    assert wifi["sta.pswd"] == PASSPHRASE.encode().ljust(64, b"\0")
    assert nvs["user_mapping"]["user_id"] == user_id.encode()
    assert nvs["Switch"]["Power"] == bytes([1, 0, 0, 0, 1, 0, 0, 0])  # esp_rmaker_param_val_t: BOOLEAN, true
    mark = stack.mqtt.mark()
    mon = node_a.boot()
    mon.expect(r"app_wifi: Already provisioned, starting Wi-Fi STA\r\n", BOOT_S)
    mon.expect(r"esp_mqtt_glue: MQTT Connected\r\n", STEP_S)
    init = stack.mqtt.wait_handled(node_a.node_id, "params/local/init", after=mark, timeout=STEP_S)
    assert init.accepted
    assert "Starting provisioning" not in mon.text and "Waiting for User Node Association" not in mon.text
    assert "app_main: Received value = true for Switch - Power" in mon.text  # the persisted value, source Init


def test_factory_reset_erases_nvs_and_keeps_fctry(node_a: Node, stack: LocalStack, tmp_path: Path) -> None:
    assert stack.mqtt is not None
    mark = stack.mqtt.mark()
    mon = node_a.command("reset-to-factory")
    mon.expect(r"rmaker_common_cmds: Resetting to Factory Defaults\.\.\.\r\n", STEP_S)
    mon.expect(r"app_main: Rebooting in 2 seconds\.", STEP_S)
    mon.expect(r"rst:0xc \(RTC_SW_CPU_RST\)", STEP_S)
    mon.expect(r"app_wifi: Starting provisioning", BOOT_S)
    text = mon.text
    assert text.index("Node reset to factory defaults.") < text.index("Rebooting in 2 seconds.") < text.index("rst:0xc")
    reset = stack.mqtt.wait_handled(node_a.node_id, "user/mapping", after=mark, timeout=STEP_S)
    assert reset.detail == "factory reset"  # the dummy esp-rmaker/failed mapping told the cloud
    nvs = node_a.read_nvs(tmp_path / "nvs.bin")
    assert "nvs.net80211" not in nvs and "user_mapping" not in nvs  # erased; the new boot stored only defaults
    assert nvs["Switch"]["Power"] == bytes([1, 0, 0, 0, 0, 0, 0, 0])
    fctry = read_fctry(read_flash(node_a.board, FCTRY_AT, FCTRY_PARTITION_SIZE, tmp_path / "fctry.bin"))
    assert fctry["node_id"] == node_a.node_id.encode() and fctry["random"] == RANDOM


def test_wifi_reset_forgets_the_network_and_reprovisions(node_a: Node, tmp_path: Path) -> None:
    mon = node_a.boot()
    mon.expect(r"Provisioning will auto stop", BOOT_S)  # the factory reset left it unprovisioned
    mon = node_a.command(f"wifi-prov {SSID} {PASSPHRASE}")
    mon.expect(r"esp_mqtt_glue: MQTT Connected\r\n", STEP_S)
    node_a.command("local-time").expect(
        r"rmaker_common_cmds: Current local time: \w{3} \w{3} [ \d]\d \d\d:\d\d:\d\d \d{4} \+0000\[UTC\], DST: No\r\n", STEP_S)
    mon = node_a.command("wifi-reset")
    mon.expect(r"app_main: Wi-Fi credentials reset\.\r\n", STEP_S)
    mon.expect(r"(?s)rst:0xc \(RTC_SW_CPU_RST\).*app_wifi: Starting provisioning", BOOT_S)
    assert mon.text.index("Rebooting in 2 seconds.") < mon.text.index("rst:0xc")
    assert "nvs.net80211" not in node_a.read_nvs(tmp_path / "nvs.bin")


# --------------------------------------------------------------------------- node-b: no fctry


def test_without_fctry_the_node_says_why_and_the_console_works(firmware: FirmwareSet, state_dir: Path) -> None:
    with running_node(Node(start_board("node-b", state_dir), ""), *flash_files(firmware.build("base"))) as node:
        mon = node.boot()
        mon.expect(r"E \(\d+\) esp_rmaker_core: Failed to initialise Node Id\. "
                   r'Please perform "claiming" using RainMaker CLI\.\r\n', BOOT_S)  # fmt: skip
        mon.expect(r"main_task: Returned from app_main\(\)", STEP_S)
        mon.write_line("get-node-id")  # on the same text: the boot's lines stay in view
        mon.expect(r"esp_rmaker_commands: Node ID: \(null\)\r\n", STEP_S)
        assert "Node ID -----" not in mon.text and "Starting provisioning" not in mon.text
    assert published_address(state_dir, "node-b") is None  # unpublished when the board stops
    assert json.loads((state_dir / "radio.json").read_text())["networks"][0]["ssid"] == SSID

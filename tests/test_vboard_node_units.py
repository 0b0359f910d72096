"""The RainMaker node firmware's parts, without a board process: NVS bytes against Espressif's
generator, the radio and the station, identity from ``fctry``, the node config and params
JSON, the QR payloads, addresses, the flaw catalogue and flawed images."""

from __future__ import annotations

import io
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from esp_idf_nvs_partition_gen import nvs_partition_gen as nvs_gen

from rig.boards.virtual_ports import (
    check_virtual_address,
    default_board_address,
    launch_virtual_board,
    published_address,
    radio_network,
    read_radio_file,
    stop_virtual_board,
    write_radio_file,
)
from rig.cloud.fctry import NvsType, build_fctry, read_nvs
from rig.cloud.pki import LabPki
from rig.evidence.en303645 import PROVISIONS
from rig.firmware.app_desc import APP_DESC_OFFSET, AppDescriptor
from rig.firmware.behaviour import BehaviourManifest
from rig.firmware.flawed_set import write_flawed_build
from rig.firmware.partition_table import RAINMAKER_4MB
from rig.firmware.secure_boot_v2 import parse_signature_sector, split_signed_image
from rig.firmware.virtual_set import VIRTUAL_ROLES, virtual_app_image
from rig.protocomm.messages import WifiConnectFailedReason, WifiStationState
from rig.vboard.app import AppContext, ConsoleCommands
from rig.vboard.bootloader import BootOutcome, PartitionEntry
from rig.vboard.flash import FlashStorage
from rig.vboard.flaws import FLAWS, UnknownFlawError, check_flaws
from rig.vboard.node import provisioning
from rig.vboard.node.cloud_link import BACKOFF_BASE_S, BACKOFF_MAX_S, backoff_delay, node_topic, tls_context
from rig.vboard.node.data_model import MalformedParams, switch_node
from rig.vboard.node.identity import IdentityError, IdentityProblem, read_identity
from rig.vboard.node.messages import NodeMsg
from rig.vboard.node.node import NodePlatform, RainMakerNode, wifi_nvs_items
from rig.vboard.node.nvs_store import NvsStore, NvsValue, build_nvs_image
from rig.vboard.node.provisioning import qr_payload
from rig.vboard.node.runtime import NodeRuntime
from rig.vboard.node.wifi_station import StationStatus, WifiAuthMode, WifiStation

PAGE = 0x1000
NVS_SIZE = 0x6000


# --------------------------------------------------------------------------- NVS


def generator_image(rows: list[tuple[str, str, str, str]], size: int = NVS_SIZE) -> bytes:
    """``esp-idf-nvs-partition-gen`` through its API, reserving the last page as its CLI does."""
    out = io.BytesIO()
    nvs = nvs_gen.nvs_open(out, size - PAGE, nvs_gen.Page.VERSION2)
    for key, kind, encoding, value in rows:
        nvs_gen.write_entry(nvs, key, kind, encoding, value)
    nvs_gen.nvs_close(nvs)
    return out.getvalue()


def test_nvs_writer_is_byte_identical_to_espressifs_generator() -> None:
    big = bytes((i * 13) % 251 for i in range(6000))  # spans two pages: a multi-chunk v2 blob
    rows = [
        ("nvs.net80211", "namespace", "", ""),
        ("opmode", "data", "u8", "1"),
        ("sta.ssid", "data", "blob_sz_fill(32;0x00)", "rig-lab-2g"),
        ("sta.pswd", "data", "blob_fill(64;0x00)", "virtual-lab-passphrase"),
        ("bssid.set", "data", "u8", "0"),
        ("user_mapping", "namespace", "", ""),
        ("user_id", "data", "hex2bin", b"0d9a6b9c-user".hex()),
        ("Switch", "namespace", "", ""),
        ("Name", "data", "string", "Kitchen"),
        ("big", "data", "hex2bin", big.hex()),
        ("count", "data", "u32", "4000000000"),
    ]
    # the generator adds the Wi-Fi driver's sta.apinfo/sta.pmk/sta.apsw after sta.ssid, as the node does
    items = [
        *(NvsValue("nvs.net80211", key, kind, value) for key, kind, value in wifi_nvs_items(b"rig-lab-2g", b"virtual-lab-passphrase")),
        NvsValue("user_mapping", "user_id", NvsType.BLOB_DATA, b"0d9a6b9c-user"),
        NvsValue("Switch", "Name", NvsType.SZ, b"Kitchen"),
        NvsValue("Switch", "big", NvsType.BLOB_DATA, big),
        NvsValue("Switch", "count", NvsType.U32, (4000000000).to_bytes(4, "little")),
    ]
    ours = build_nvs_image(items, NVS_SIZE)
    assert ours == generator_image(rows)
    assert read_nvs(ours)["nvs.net80211"]["sta.ssid"] == b"\x0a\0\0\0rig-lab-2g" + b"\0" * 22


def test_nvs_store_persists_on_flash_and_recovers_from_garbage(tmp_path: Path) -> None:
    flash = FlashStorage(tmp_path / "flash.bin")
    part = PartitionEntry(2, "nvs", 0x01, 0x02, 0x10000, NVS_SIZE)
    store = NvsStore(flash, part)
    assert store.items() == [] and store.recovered_from is None
    store.set_blob("user_mapping", "user_id", b"u-1")
    store.set_u8("nvs.net80211", "opmode", 1)
    store.commit()
    store.set_blob("user_mapping", "user_id", b"u-2")  # a rewrite moves the key to the end
    store.commit()
    assert read_nvs(flash.read(part.offset, part.size)) == {"user_mapping": {"user_id": b"u-2"}, "nvs.net80211": {"opmode": b"\x01"}}
    assert NvsStore(flash, part).get("user_mapping", "user_id") == b"u-2"

    store.erase_partition()
    assert flash.read(part.offset, part.size) == b"\xff" * part.size
    flash.write(part.offset, b"\xfe\xff\xff\xff" + b"\x00" * 60)  # an active page with a broken header
    recovered = NvsStore(flash, part)
    assert recovered.recovered_from is not None and "CRC32" in recovered.recovered_from
    assert flash.read(part.offset, part.size) == b"\xff" * part.size  # erased, as nvs_flash_erase would
    flash.close()


# --------------------------------------------------------------------------- radio, station, addresses


class QuietConsole:
    """A console that records log lines (the station only logs through the node)."""

    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.lines: list[str] = []

    def write(self, text: str) -> None:
        self.lines.append(text)

    def read_line(self, timeout: float) -> str | None:
        return None

    def uptime_ms(self) -> int:
        return 0

    def log(self, level: str, tag: str, text: str) -> None:
        self.lines.append(f"{level} {tag}: {text}")


def test_radio_file_is_private_and_stable(tmp_path: Path) -> None:
    nets = [radio_network("rig-lab-2g", "virtual-lab-passphrase"), radio_network("guest", "", "open", 11)]
    path = write_radio_file(tmp_path, nets)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_radio_file(path) == nets
    assert radio_network("rig-lab-2g", "x").bssid == nets[0].bssid  # derived from the SSID only
    assert int(nets[0].bssid[:2], 16) & 0x03 == 0x02  # locally administered unicast
    assert -75 < nets[0].rssi <= -35
    assert "virtual-lab-passphrase" not in repr(nets[0])
    assert read_radio_file(tmp_path / "missing.json") == []


def test_station_joins_only_with_the_right_passphrase(tmp_path: Path) -> None:
    write_radio_file(tmp_path, [radio_network("rig-lab-2g", "virtual-lab-passphrase", channel=6)])
    runtime = NodeRuntime(QuietConsole(), "unit")
    station = WifiStation(runtime, tmp_path / "radio.json", "127.0.1.77")
    outcomes: list[StationStatus] = []
    done = threading.Condition()

    def seen(status: StationStatus) -> None:
        with done:
            outcomes.append(status)
            done.notify_all()

    station.add_listener(seen)

    def join(ssid: str, passphrase: str) -> StationStatus:
        station.set_config(ssid, passphrase)
        assert station.apply()
        assert station.status().state is WifiStationState.Connecting
        with done:
            assert done.wait_for(lambda: len(outcomes) >= count + 1, 5), "no join outcome within 5 s"
        return outcomes[-1]

    count = 0
    assert [(r.ssid, r.channel, r.auth) for r in station.scan()] == [(b"rig-lab-2g", 6, WifiAuthMode.WPA2_PSK)]
    assert join("rig-lab-2g", "wrong-passphrase") == StationStatus(WifiStationState.ConnectionFailed, WifiConnectFailedReason.AuthError)
    count = 1
    assert join("nowhere", "whatever1").fail_reason is WifiConnectFailedReason.NetworkNotFound
    count = 2
    ok = join("rig-lab-2g", "virtual-lab-passphrase")
    assert ok.state is WifiStationState.Connected and ok.connected is not None
    assert ok.connected.ip4_addr == "127.0.1.77" and ok.connected.channel == 6 and ok.connected.ssid == b"rig-lab-2g"
    runtime.halt()
    assert runtime.join() == []


def test_board_addresses() -> None:
    assert default_board_address("vb1") == default_board_address("vb1")
    assert all(2 <= int(default_board_address(f"b{i}").rsplit(".", 1)[1]) <= 254 for i in range(200))
    assert default_board_address("vb1") != default_board_address("vb2")
    assert check_virtual_address("127.0.1.9") == "127.0.1.9"
    for bad in ("127.0.1.1", "127.0.0.5", "10.0.0.1", "not-an-ip"):
        with pytest.raises(ValueError, match="Fix:"):
            check_virtual_address(bad)


# --------------------------------------------------------------------------- identity and TLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return LabPki(tmp_path_factory.mktemp("pki"))


def flash_with(tmp_path: Path, at: int, data: bytes) -> FlashStorage:
    flash = FlashStorage(tmp_path / "flash.bin")
    flash.write(at, data)
    return flash


def partitions() -> tuple[PartitionEntry, ...]:
    return tuple(PartitionEntry(i, p.name, p.type, p.subtype, p.offset, p.size) for i, p in enumerate(RAINMAKER_4MB.partitions))


def test_identity_from_fctry(tmp_path: Path, pki: LabPki) -> None:
    pair = pki.node_cert("node-unit-1")
    fctry = build_fctry(tmp_path / "f", "node-unit-1", "127.0.0.1:18883", pair, bytes(range(64)), server_cert=pki.ca_cert_path)
    flash = flash_with(tmp_path, RAINMAKER_4MB["fctry"].offset, fctry.data)
    identity = read_identity(flash, partitions())
    assert (identity.node_id, identity.mqtt_host, identity.mqtt_port) == ("node-unit-1", "127.0.0.1", 18883)
    assert identity.pop == "00010203" and identity.service_name(b"\0" * 6) == "PROV_3d3e3f"
    assert identity.server_cert == pki.ca_cert_path.read_bytes()
    assert "PRIVATE KEY" not in repr(identity)

    context = tls_context(identity)
    assert context.verify_mode is ssl.CERT_REQUIRED and context.check_hostname
    assert context.minimum_version is ssl.TLSVersion.TLSv1_2
    flawed = tls_context(identity, verify_server=False)
    assert flawed.verify_mode is ssl.CERT_NONE and not flawed.check_hostname
    assert not any("node-key" in name for name in os.listdir("/proc/self/fd"))  # the memfd is closed again
    flash.close()


def test_identity_problems(tmp_path: Path) -> None:
    flash = FlashStorage(tmp_path / "flash.bin")
    with pytest.raises(IdentityError) as blank:
        read_identity(flash, partitions())
    assert blank.value.problem is IdentityProblem.NODE_ID
    no_fctry = tuple(p for p in partitions() if p.label != "fctry")
    with pytest.raises(IdentityError) as missing:
        read_identity(flash, no_fctry)
    assert missing.value.problem is IdentityProblem.STORAGE
    fctry = RAINMAKER_4MB["fctry"]
    flash.write(fctry.offset, build_nvs_image([NvsValue("rmaker_creds", "node_id", NvsType.BLOB_DATA, b"lonely")], fctry.size))
    with pytest.raises(IdentityError) as partial:
        read_identity(flash, partitions())
    assert partial.value.problem is IdentityProblem.MQTT_PARAMS
    flash.close()


# --------------------------------------------------------------------------- data model, topics, QR


def test_node_config_is_the_switch_example() -> None:
    model = switch_node("1.0.0", "rig_rmaker_node")
    config = json.loads(model.config_json("n1", {"k0": "ab" * 32, "k1": None, "k2": None}))
    assert list(config) == ["node_id", "config_version", "info", "devices", "services"]
    assert config["info"] == {"name": "ESP RainMaker Device", "fw_version": "1.0.0", "type": "Switch", "model": "rig_rmaker_node",
                              "project_name": "rig_rmaker_node", "platform": "esp32c3",
                              "secure_boot_digest": {"k0": "ab" * 32, "k1": None, "k2": None}}  # fmt: skip
    (switch,) = config["devices"]
    assert switch == {
        "name": "Switch", "type": "esp.device.switch", "primary": "Power",
        "params": [
            {"name": "Name", "type": "esp.param.name", "data_type": "string", "properties": ["read", "write"]},
            {"name": "Power", "type": "esp.param.power", "data_type": "bool", "properties": ["read", "write"],
             "ui_type": "esp.ui.toggle"},
        ],
    }  # fmt: skip
    assert [(s["name"], s["type"]) for s in config["services"]] == [
        ("OTA", "esp.service.ota"), ("Time", "esp.service.time"), ("Connectivity", "esp.service.connectivity")]
    assert model.params_json() == ('{"Switch":{"Name":"Switch","Power":false},"OTA":{"Status":"","Info":"","URL":""},'
                                   '"Time":{"TZ":"","TZ-POSIX":""},"Connectivity":{"Connected":false}}')  # fmt: skip


def test_params_writes_are_filtered_by_type() -> None:
    model = switch_node("1.0.0", "p")
    writes = model.parse_set_params(b'{"Switch":{"Power":1,"Name":"Lamp"},"Nope":{"x":1},"Time":{"TZ":"Europe/Paris"}}')
    assert [(d.name, p.name, v) for d, p, v in writes] == [("Switch", "Name", "Lamp"), ("Time", "TZ", "Europe/Paris")]
    for bad in (b"{not json", b"[1,2]", b"\xff\xfe"):
        with pytest.raises(MalformedParams):
            model.parse_set_params(bad)


def test_topics_and_backoff() -> None:
    assert node_topic("n1", "config") == "$aws/rules/esp_node_config/node/n1/config"
    assert node_topic("n1", "user/mapping") == "$aws/rules/esp_user_node_mapping/node/n1/user/mapping"
    assert node_topic("n1", "params/local", basic_ingest=False) == "node/n1/params/local"
    for attempt in range(12):
        ceiling = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt)
        assert [0.5 * ceiling <= backoff_delay(attempt) <= ceiling for _ in range(20)] == [True] * 20


def test_qr_payloads_per_security() -> None:
    assert qr_payload("PROV_3d3e3f", "00010203", 2) == (
        '{"ver":"v1","name":"PROV_3d3e3f","username":"wifiprov","pop":"00010203","transport":"softap"}')
    assert qr_payload("PROV_3d3e3f", "00010203", 1) == '{"ver":"v1","name":"PROV_3d3e3f","pop":"00010203","transport":"softap"}'
    assert qr_payload("PROV_3d3e3f", None, 0) == '{"ver":"v1","name":"PROV_3d3e3f","transport":"softap"}'


# --------------------------------------------------------------------------- flaws


def test_flaw_catalogue() -> None:
    ids = {p.id for p in PROVISIONS}
    for flaw in FLAWS.values():
        assert flaw.provisions and set(flaw.provisions) <= ids, flaw.name
        if flaw.implemented_in:
            __import__(flaw.implemented_in)
    assert check_flaws(["open_debug_port"]) == {"open_debug_port"}
    with pytest.raises(UnknownFlawError, match=r"'no_such_flaw'.*Fix:") as exc:
        check_flaws(["open_debug_port", "no_such_flaw"])
    assert exc.value.unknown == ["no_such_flaw"]


def test_flawed_build_is_base_with_flaws_signed_by_the_same_key(tmp_path: Path) -> None:
    key = tmp_path / "sbv2.pem"
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    key.write_bytes(rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                          serialization.NoEncryption()))  # fmt: skip
    build = write_flawed_build(tmp_path / "flawed", ["logs_wifi_password", "open_debug_port"], key, extra={"x": 1})
    image = build.read_app_image()
    manifest = BehaviourManifest.from_image(image)
    assert manifest is not None and manifest.flaws == ("logs_wifi_password", "open_debug_port") and manifest.extra == {"x": 1}
    base = virtual_app_image(next(r for r in VIRTUAL_ROLES if r.role == "base"), key)
    ours, theirs = AppDescriptor.parse(image, APP_DESC_OFFSET), AppDescriptor.parse(base, APP_DESC_OFFSET)
    assert (ours.version, ours.secure_version, ours.project_name) == (theirs.version, theirs.secure_version, theirs.project_name)
    assert ours.app_elf_sha256 != theirs.app_elf_sha256  # a different build: the manifest differs
    digests = [[b.key_digest() for b in parse_signature_sector(split_signed_image(i)[1]) if b] for i in (image, base)]
    assert digests[0] == digests[1] and digests[0]
    assert build.read_partition_table().to_bytes() == RAINMAKER_4MB.to_bytes()


# --------------------------------------------------------------------------- runtime, boot refusal, the board process


def test_a_reset_wakes_blocked_tasks_and_closes_their_sockets() -> None:
    runtime = NodeRuntime(QuietConsole(), "unit")
    listener = runtime.bound_socket("127.0.1.99")
    listener.listen(1)
    accepted: list[str] = []

    def serve() -> None:
        try:
            listener.accept()
        except OSError as exc:
            accepted.append(type(exc).__name__)

    runtime.spawn("acceptor", serve)
    fired: list[bool] = []
    runtime.after(60, "late_timer", lambda: fired.append(True))
    assert listener.getsockname()[0] == "127.0.1.99"
    runtime.halt()
    assert runtime.join(timeout=2.0) == []  # the blocked accept and the pending timer both ended
    assert accepted and not fired and listener.fileno() == -1
    assert runtime.spawn("after-reset", lambda: None) is None
    runtime.log(NodeMsg.NODE_ID, node_id="x")  # nothing reaches the UART after a reset
    assert runtime.console.lines == []  # type: ignore[attr-defined]


def test_an_image_naming_an_unknown_flaw_is_refused_at_boot(tmp_path: Path) -> None:
    console = QuietConsole()
    boot = BootOutcome(partition=None, image=b"", app_desc=None, behaviour=BehaviourManifest(flaws=("open_debug_port", "typo_flaw")),
                       otadata=None, halted=False, reason="", partitions=partitions())  # fmt: skip
    flash = FlashStorage(tmp_path / "flash.bin")
    ctx = AppContext(boot, flash, None, console, ConsoleCommands(console))  # type: ignore[arg-type]
    node = RainMakerNode(ctx, NodePlatform("unit", "127.0.1.99", bytes(6), tmp_path / "radio.json"))
    assert node.app_main() is None
    (line,) = [x for x in console.lines if " rig_vboard: " in x]
    assert line.startswith("E rig_vboard: behaviour manifest names unknown flaw(s) typo_flaw; the node does not start. Fix:")
    assert "get-node-id" not in ctx.commands.names and node.link is None
    flash.close()


def test_a_provisioning_server_that_cannot_listen_is_logged_and_the_node_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)  # another server holds the port
    blocker.bind(("127.0.1.98", 0))
    blocker.listen(1)
    monkeypatch.setattr(provisioning, "HTTP_PORT", blocker.getsockname()[1])
    console = QuietConsole()
    boot = BootOutcome(partition=None, image=b"", app_desc=None, behaviour=BehaviourManifest(), otadata=None, halted=False,
                       reason="", partitions=partitions())  # fmt: skip
    flash = FlashStorage(tmp_path / "flash.bin")
    ctx = AppContext(boot, flash, None, console, ConsoleCommands(console))  # type: ignore[arg-type]
    node = RainMakerNode(ctx, NodePlatform("unit", "127.0.1.98", bytes(6), tmp_path / "radio.json"))
    node.flaws = frozenset({"static_pop"})  # a PoP without a fctry partition
    try:
        assert provisioning.ProvisioningService(node).start()  # the boot goes on: no HttpdError out of app_main
        assert "provisioning server of the virtual board at 127.0.1.98: cannot listen on" in caplog.text
        assert any("Provisioning started with service name" in line for line in console.lines)
    finally:
        node.runtime.halt()
        assert node.runtime.join() == []
        blocker.close()
        flash.close()


def test_serve_refuses_an_address_that_is_not_a_virtual_boards(tmp_path: Path) -> None:
    run = subprocess.run([sys.executable, "-m", "rig.vboard.serve", "vb9", "--state-dir", str(tmp_path), "--address", "10.1.2.3"],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert run.returncode == 2 and "must be 127.0.1.N" in run.stderr and "Fix:" in run.stderr and not run.stdout


def test_launched_board_publishes_its_address(tmp_path: Path) -> None:
    proc, url = launch_virtual_board("vb-addr", tmp_path, tmp_path / "vb.log", address="127.0.1.33")
    try:
        assert url.startswith("rfc2217://127.0.0.1:")
        assert published_address(tmp_path, "vb-addr") == "127.0.1.33"
    finally:
        stop_virtual_board(proc)
    assert published_address(tmp_path, "vb-addr") is None

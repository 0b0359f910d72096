"""boards.yaml → Lab: the default file loads, and each kind of bad input is one clear message."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from rig.boards.virtual_ports import default_board_address
from rig.lab import Lab, LabConfigError, load_lab

REPO = Path(__file__).resolve().parents[1]

GOOD = """\
lab: bench
wifi:
  - ssid: lab-ap
    passphrase: env:RIG_TEST_WIFI_PASS
boards:
  - name: bench-01
    kind: esp
    port: /dev/serial/by-id/usb-Espressif_USB_JTAG_serial_debug_unit_84:F7:03:00:00:01-if00
    mac: 84-F7-03-00-00-01
    tags: [c3, devkit]
  - name: remote-02
    kind: esp
    port: rfc2217://10.0.0.7:4000
  - name: vb1
    kind: virtual
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "boards.yaml"
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(LabConfigError) as exc:
        load_lab(write(tmp_path, text))
    return exc.value.problems


def test_repo_default_is_two_virtual_c3_boards() -> None:
    lab = load_lab(REPO / "boards.yaml")
    assert [(b.name, b.kind, b.chip) for b in lab.boards] == [("vb1", "virtual", "esp32c3"), ("vb2", "virtual", "esp32c3")]
    assert lab.stack.kind == "local"
    assert lab.capture.interface == "lo"
    assert all(b.sacrificial for b in lab.boards)
    assert lab.firmware_dir(lab.boards[0]) == REPO / ".rig" / "firmware" / "virtual"


def test_real_lab_resolves_env_secret_and_normalises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RIG_TEST_WIFI_PASS", "correct horse battery")
    lab = load_lab(write(tmp_path, GOOD))
    assert isinstance(lab, Lab)
    b = lab.board("bench-01")
    assert b.mac == "84:f7:03:00:00:01"
    assert b.sacrificial is False  # real boards keep their eFuses unless told otherwise
    assert lab.board("vb1").sacrificial is True
    assert lab.wifi[0].passphrase.get_secret_value() == "correct horse battery"
    # the secret never prints, and the evidence form hides it
    assert "correct horse" not in repr(lab) and "correct horse" not in str(lab.redacted())
    assert lab.redacted()["wifi"][0]["passphrase"] == "***"
    assert [b.name for b in lab.select(["vb1", "bench-01"])] == ["bench-01", "vb1"]


def test_missing_env_var_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RIG_TEST_WIFI_PASS", raising=False)
    (msg,) = problems(tmp_path, GOOD)
    assert msg.startswith(f"{tmp_path / 'boards.yaml'}:3: wifi[0]:")
    assert "RIG_TEST_WIFI_PASS" in msg and "export RIG_TEST_WIFI_PASS" in msg


def test_unknown_key_lists_allowed_keys(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, "lab: x\nboards:\n  - name: a\n    kind: virtual\n    colour: red\n")
    assert ":5: boards[0] (a).colour: unknown key 'colour'" in msg
    assert "allowed here: name, kind, chip, port, mac, usb_serial, firmware, tags, efuse" in msg


def test_nested_unknown_key(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, "lab: x\nboards:\n  - name: a\n    kind: virtual\n    efuse: {sacrifical: true}\n")
    assert "efuse.sacrifical: unknown key 'sacrifical'" in msg and "allowed here: sacrificial" in msg


def test_duplicate_board_names_point_at_second(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, "lab: x\nboards:\n  - name: a\n    kind: virtual\n  - name: a\n    kind: virtual\n")
    assert ":5: boards[1] (a).name:" in msg and "both named 'a'" in msg and "Fix:" in msg


def test_duplicate_ports(tmp_path: Path) -> None:
    text = "lab: x\nboards:\n" + "".join(f"  - name: {n}\n    kind: esp\n    port: /dev/ttyUSB0\n" for n in ("a", "b"))
    (msg,) = problems(tmp_path, text)
    assert ":8: boards[1] (b).port:" in msg and "share port /dev/ttyUSB0" in msg


def test_esp_board_without_port(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, "lab: x\nboards:\n  - name: a\n    kind: esp\n")
    assert ":3: boards[0] (a):" in msg and "without a port" in msg and "Fix: add port:" in msg


def test_virtual_board_with_port(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, "lab: x\nboards:\n  - name: a\n    kind: virtual\n    port: rfc2217://localhost:4000\n")
    assert "get their port when started" in msg


@pytest.mark.parametrize(
    ("field", "value", "expect"),
    [
        ("chip", "esp32s3", "chip 'esp32s3' is not supported yet. Fix: use chip: esp32c3"),
        ("kind", "vm", "'vm' is not allowed. Fix: use one of 'virtual' or 'esp'"),
        ("port", "COM3", "not a serial port the rig can open"),
        ("port", "rfc2217://host", "not an RFC 2217 URL"),
        ("mac", "84:f7:03", "is not a MAC address"),
        ("name", "Bench 01", "cannot be used in test ids"),
    ],
)
def test_field_rules(tmp_path: Path, field: str, value: str, expect: str) -> None:
    board = {"name": "a", "kind": "esp", "port": "/dev/ttyACM0", field: value}
    text = "lab: x\nboards:\n  - " + "\n    ".join(f"{k}: {v!r}" if k != "kind" else f"{k}: {v}" for k, v in board.items())
    msgs = problems(tmp_path, text + "\n")
    assert any(expect in m for m in msgs), msgs


def test_yaml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, "lab: x\nboards:\n  - name: a\n   kind: virtual\n")
    assert msg.startswith(f"{tmp_path / 'boards.yaml'}:4:4: YAML syntax error:") and "Fix:" in msg


def test_duplicate_yaml_key(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, "lab: x\nlab: y\nboards: []\n")
    assert ":2:1: key 'lab' appears twice (first on line 1)" in msg


def test_literal_passphrase_refused_in_real_lab(tmp_path: Path) -> None:
    text = GOOD.replace("env:RIG_TEST_WIFI_PASS", "literal-secret-123")
    (msg,) = problems(tmp_path, text)
    assert ":4: wifi[0].passphrase:" in msg and "env:VAR" in msg
    assert "literal-secret-123" not in msg


def test_remote_stack_needs_endpoints(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, "lab: x\nstack: {kind: remote}\nboards:\n  - name: a\n    kind: virtual\n")
    assert "stack:" in msg and "needs api_url and mqtt_host" in msg


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("", "the file is empty"),
        ("- a\n- b\n", "the top level must be a mapping"),
        ("lab: x\nboards: []\n", "the farm has no boards"),
        ("boards:\n  - name: a\n    kind: virtual\n", "required key 'lab' is missing"),
    ],
)
def test_shape_errors(tmp_path: Path, text: str, expect: str) -> None:
    assert any(expect in m for m in problems(tmp_path, text))


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(LabConfigError, match=re.escape("file not found. Fix: pass --boards FILE")):
        load_lab(tmp_path / "nope.yaml")


def test_unknown_board_selection(tmp_path: Path) -> None:
    lab = load_lab(REPO / "boards.yaml")
    with pytest.raises(LabConfigError, match=re.escape("no board named 'vb9'. Fix: use one of vb1, vb2")):
        lab.select(["vb9"])


# --------------------------------------------------------------------------- board addresses and the virtual air

VIRTUAL_PAIR = "lab: t\nwifi:\n  - ssid: air\n    passphrase: \"a-long-passphrase\"\nboards:\n"


def test_virtual_board_address_is_declared_or_derived_and_wifi_is_the_air(tmp_path: Path) -> None:
    lab = load_lab(write(tmp_path, VIRTUAL_PAIR + "  - name: vb1\n    kind: virtual\n  - name: vb2\n    kind: virtual\n"
                                                  "    address: 127.0.1.40\n"))
    assert lab.board("vb1").address is None and lab.board("vb1").network_address == default_board_address("vb1")
    assert lab.board("vb2").network_address == "127.0.1.40"
    (net,) = lab.radio_networks()
    assert (net.ssid, net.passphrase, net.auth, net.channel) == ("air", "a-long-passphrase", "wpa2_psk", 6)
    assert "a-long-passphrase" not in repr(net)


def test_two_virtual_boards_cannot_share_an_address(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, VIRTUAL_PAIR + "  - name: vb1\n    kind: virtual\n    address: 127.0.1.40\n"
                                               "  - name: vb2\n    kind: virtual\n    address: 127.0.1.40\n")
    assert msg.startswith(f"{tmp_path / 'boards.yaml'}:11: boards[1] (vb2).address:")
    assert "'vb1' and 'vb2' would share address 127.0.1.40" in msg and "Fix: give one of them address: 127.0.1.N" in msg
    derived = default_board_address("vb1")
    (msg,) = problems(tmp_path, VIRTUAL_PAIR + f"  - name: vb1\n    kind: virtual\n  - name: vb2\n    kind: virtual\n"
                                               f"    address: {derived}\n")
    assert f"share address {derived} (derived from the name where not given)" in msg


def test_board_address_rules(tmp_path: Path) -> None:
    (msg,) = problems(tmp_path, "lab: t\nboards:\n  - name: vb1\n    kind: virtual\n    address: 192.168.4.1\n")
    assert ":5: boards[0] (vb1).address:" in msg and "must be 127.0.1.N" in msg and "Fix:" in msg
    (msg,) = problems(tmp_path, "lab: t\nboards:\n  - name: vb1\n    kind: virtual\n    address: 127.0.1.x\n")
    assert ":5: boards[0] (vb1).address:" in msg and "is not an IPv4 address" in msg
    real = load_lab(write(tmp_path, "lab: t\nboards:\n  - name: bench\n    kind: esp\n    port: /dev/ttyUSB0\n"
                                    "    address: 192.168.4.1\n"))
    assert real.board("bench").network_address == "192.168.4.1"
    assert load_lab(write(tmp_path, "lab: t\nboards:\n  - name: b2\n    kind: esp\n    port: /dev/ttyUSB0\n")).board(
        "b2").network_address is None

"""`rig up` / `rig status` / `rig down` against the real stack, as an engineer runs them."""

from __future__ import annotations

import json
import socket
import ssl
import urllib.request
from pathlib import Path

import pytest

from tests.test_cli import rig


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture
def lab_file(tmp_path: Path) -> Path:
    mqtt, api, ota = free_ports(3)
    path = tmp_path / "boards.yaml"
    path.write_text(
        f"lab: services\nstack: {{kind: local, mqtt_port: {mqtt}, api_port: {api}, ota_port: {ota}}}\n"
        "boards:\n  - name: bench\n    kind: esp\n    port: /dev/rig-not-plugged\n"
    )
    yield path
    rig("down", "--boards", str(path))


def test_up_status_down(lab_file: Path) -> None:
    up = rig("up", "--boards", str(lab_file))
    assert up.returncode == 0, up.stderr
    assert "started lab services" in up.stdout
    state = json.loads((lab_file.parent / ".rig" / "up.json").read_text())
    api = state["stack"]["api_url"]
    # the API answers over TLS with a certificate from the lab CA
    ctx = ssl.create_default_context(cafile=state["stack"]["ca_cert"])
    with urllib.request.urlopen(f"{api}/apiversions", context=ctx, timeout=10) as resp:
        assert "v1" in json.loads(resp.read())["supported_versions"]

    again = rig("up", "--boards", str(lab_file))
    assert again.returncode == 0 and "already running" in again.stdout and str(state["pid"]) in again.stdout

    status = rig("status", "--boards", str(lab_file))
    assert status.returncode == 0
    assert status.stdout.count(" yes ") == 3  # API, OTA host and broker all answer

    down = rig("down", "--boards", str(lab_file))
    assert down.returncode == 0 and "stopped" in down.stdout
    assert not (lab_file.parent / ".rig" / "up.json").exists()
    assert rig("status", "--boards", str(lab_file)).returncode == 3
    assert "was not running" in rig("down", "--boards", str(lab_file)).stdout


def test_taken_port_is_one_clear_error(lab_file: Path) -> None:
    api_port = int(lab_file.read_text().split("api_port: ")[1].split(",")[0])
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", api_port))
        holder.listen()
        res = rig("up", "--boards", str(lab_file))
    assert res.returncode == 2
    assert f"port {api_port} on 127.0.0.1 is already in use" in res.stderr and "Fix:" in res.stderr
    assert "Traceback" not in res.stderr
    assert rig("status", "--boards", str(lab_file)).returncode == 3  # nothing half-started is left running


def test_user_add(tmp_path: Path, lab_file: Path) -> None:
    res = rig("user", "add", "alice@example.com", "--boards", str(lab_file), "--password", "correct-horse-1")
    assert res.returncode == 0 and "user alice@example.com added" in res.stdout
    dup = rig("user", "add", "alice@example.com", "--boards", str(lab_file), "--password", "x-horse-2")
    assert dup.returncode == 2 and "cannot add user alice@example.com" in dup.stderr

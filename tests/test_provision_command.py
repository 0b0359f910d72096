"""`rig board claim` and `rig provision` at the bench: a virtual board onboarded end to end by the CLI."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from rig.boards.board import Board
from rig.boards.virtual_ports import published_port
from rig.firmware.virtual_set import VIRTUAL_SIGNING_KEY, ensure_signing_key, ensure_virtual_set
from rig.lab import load_lab
from tests.test_cli import rig
from tests.test_lab_services import free_ports

PASSWORD = "bench-user-password-1"


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("bench")
    mqtt, api, ota = free_ports(3)
    lab = root / "boards.yaml"
    lab.write_text(
        f"lab: bench\nstack: {{kind: local, mqtt_port: {mqtt}, api_port: {api}, ota_port: {ota}}}\n"
        "wifi:\n  - ssid: bench-ap\n    passphrase: bench-ap-passphrase\n"
        "boards:\n  - name: vbench\n    kind: virtual\n"
    )
    up = rig("up", "--boards", str(lab))
    assert up.returncode == 0, up.stdout + up.stderr
    try:
        yield lab
    finally:
        rig("down", "--boards", str(lab))


def test_claim_and_provision_onboard_a_board(bench: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RIG_USER_PASSWORD", PASSWORD)  # as a lab engineer keeps it out of the command line
    lab = load_lab(bench)
    spec = lab.board("vbench")
    fw = ensure_virtual_set(lab.firmware_dir(spec), ensure_signing_key(lab.state_dir / VIRTUAL_SIGNING_KEY))
    board = Board(spec=spec, port=published_port(lab.state_dir, "vbench"), log=logging.getLogger("test.bench"))
    board.flash(fw.build("base").flash_files)

    added = rig("user", "add", "bench@rig.test", "--boards", str(bench))
    assert added.returncode == 0, added.stderr
    claimed = rig("board", "claim", "vbench", "--boards", str(bench))
    assert claimed.returncode == 0, claimed.stderr
    record = json.loads((lab.state_dir / "boards" / "vbench" / "claim.json").read_text())
    assert f"node {record['node_id']}" in claimed.stdout and "written" in claimed.stdout

    provisioned = rig("provision", "vbench", "--user", "bench@rig.test", "--boards", str(bench))
    assert provisioned.returncode == 0, provisioned.stdout + provisioned.stderr
    assert "joined bench-ap" in provisioned.stdout and "mapped to bench@rig.test" in provisioned.stdout
    assert PASSWORD not in provisioned.stdout + provisioned.stderr

    again = rig("provision", "vbench", "--user", "bench@rig.test", "--boards", str(bench))
    assert again.returncode == 2
    assert "already provisioned node prints no QR" in again.stderr and "Traceback" not in again.stderr

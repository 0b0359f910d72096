"""The `rig` command as a lab engineer runs it: output, exit codes, the run folder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def rig(*args: str, cwd: Path = REPO, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "rig.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def test_boards_shows_the_default_farm() -> None:
    res = rig("boards")
    assert res.returncode == 0, res.stderr
    assert "lab virtual-desk — 2 board(s), stack: local" in res.stdout
    for cell in ("vb1", "vb2", "virtual", "esp32c3", "generated", "sacrificial"):
        assert cell in res.stdout


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        ("lab: x\nboards:\n  - name: a\n    kind: esp\n", "boards.yaml:3: boards[0] (a): board 'a' is a real board"),
        ("lab: x\nboards:\n  - name: a\n   kind: virtual\n", "boards.yaml:4:4: YAML syntax error"),
        ("lab: x\nboards:\n  - name: a\n    kind: virtual\n    chip: esp8266\n", "chip 'esp8266' is not supported yet"),
    ],
)
def test_boards_rejects_bad_file_with_one_clear_message(tmp_path: Path, text: str, expect: str) -> None:
    bad = tmp_path / "boards.yaml"
    bad.write_text(text)
    res = rig("boards", "--boards", str(bad))
    assert res.returncode == 2
    assert expect in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


def test_boards_missing_file(tmp_path: Path) -> None:
    res = rig("boards", "--boards", str(tmp_path / "none.yaml"))
    assert res.returncode == 2 and "file not found. Fix: pass --boards FILE" in res.stderr


def test_run_unknown_board(tmp_path: Path) -> None:
    res = rig("run", "--board", "vb9")
    assert res.returncode == 2 and "no board named 'vb9'" in res.stderr

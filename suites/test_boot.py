"""The board boots what the farm flashes, and answers as the chip boards.yaml declares.

Every later suite starts from "the board runs the base firmware of its set"; this suite
proves that start on each board, through the same doors a lab engineer uses: esptool
over the port, then pytest-embedded flashing the base build and watching the console.
"""

from __future__ import annotations

import re
from typing import Any

import allure
import pytest

from rig.boards.board import Board
from rig.firmware.firmware_set import FirmwareSet


def test_board_answers_as_the_declared_chip(board: Board) -> None:
    mac = board.verify_identity()
    info = board.security_info()
    allure.attach(info, name="get-security-info.txt", attachment_type=allure.attachment_type.TEXT)
    assert re.search(r"Chip ID:\s*5\b", info), "the board is not an ESP32-C3 (image chip id 5)"
    assert re.fullmatch(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}", mac)


@pytest.mark.usefixtures("board", "factory_new")
def test_base_firmware_boots(dut: Any, firmware_set: FirmwareSet) -> None:
    desc = firmware_set.app_desc("base")
    dut.expect_exact(f"Project name:     {desc.project_name}", timeout=60)
    dut.expect_exact(f"App version:      {desc.version}", timeout=10)
    dut.expect_exact("Calling app_main()", timeout=10)

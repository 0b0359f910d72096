"""``rig board claim``: a node identity from the lab PKI written into a board's fctry through esptool."""

from __future__ import annotations

import logging

import pytest

from rig.boards.board import Board, BoardError
from rig.boards.claim import claim_board, find_fctry_partition, mqtt_host_value, node_id_for_mac
from rig.cloud.fctry import SERVER_CERT_KEY, read_fctry
from rig.cloud.pki import LabPki
from rig.firmware.partition_table import RAINMAKER_4MB
from rig.firmware.virtual_set import ensure_signing_key, ensure_virtual_set
from rig.lab import BoardSpec
from tests.vboard_process import BoardFactory, vboard_factory  # noqa: F401  (fixture)


def test_node_id_is_the_base_mac_in_upper_hex() -> None:
    assert node_id_for_mac("60:55:f9:0a:1b:2c") == "6055F90A1B2C"
    with pytest.raises(ValueError, match="not a MAC"):
        node_id_for_mac("60:55:f9")


def test_mqtt_host_carries_a_port_only_off_rainmakers_port() -> None:
    assert mqtt_host_value("mqtt.lab", 8883) == "mqtt.lab"
    assert mqtt_host_value("127.0.0.1", 18883) == "127.0.0.1:18883"


@pytest.fixture(scope="module")
def board(vboard_factory: BoardFactory) -> Board:  # noqa: F811
    """A new virtual board, driven through the rig's own Board; stopped with the module's boards."""
    proc = vboard_factory("claimb")
    return Board(spec=BoardSpec(name=proc.name, kind="virtual", chip="esp32c3"), port=proc.url, log=logging.getLogger("test.claim"))


def test_claim_needs_a_partition_table_on_the_board(board: Board) -> None:
    board.esptool("erase-region", "0x8000", "0x5000")
    with pytest.raises(BoardError, match=r"no partition table at 0xc000.*Fix: flash the board's firmware set"):
        find_fctry_partition(board)


def test_claim_writes_fctry_once_and_keeps_it(board: Board, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.mktemp("claim")
    fw = ensure_virtual_set(root / "fw", ensure_signing_key(root / "key.pem"))
    board.flash(fw.build("base").flash_files)
    pki = LabPki(root / "pki")

    first = claim_board(board, pki, "127.0.0.1", 18883, root / "board")
    assert first.written and first.fctry_offset == RAINMAKER_4MB["fctry"].offset
    assert first.node_id == node_id_for_mac(board.read_mac())
    creds = read_fctry(board.read_flash(first.fctry_offset, RAINMAKER_4MB["fctry"].size))
    assert creds["node_id"] == first.node_id.encode()
    assert creds["mqtt_host"] == b"127.0.0.1:18883"
    assert creds[SERVER_CERT_KEY] == pki.ca_cert_path.read_bytes()
    assert (root / "board" / "claim.json").is_file()

    again = claim_board(board, pki, "127.0.0.1", 18883, root / "board")
    assert not again.written, "a matching fctry must be kept (its random, hence the PoP, survives)"
    assert read_fctry(board.read_flash(first.fctry_offset, RAINMAKER_4MB["fctry"].size))["random"] == creds["random"]

    moved = claim_board(board, pki, "127.0.0.1", 28883, root / "board")
    assert moved.written and moved.mqtt_host == "127.0.0.1:28883"

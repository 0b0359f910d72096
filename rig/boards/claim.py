"""Give a board its cloud identity: the ``fctry`` partition, written through esptool.

This is ``rig board claim NAME`` — what ``esp-rainmaker-cli claim`` does for a real
node (rainmaker-protocol.md §8.2), against the lab's own PKI instead of Espressif's
claiming service, and by the same path for real and virtual boards: read the MAC
over the serial port, issue a node certificate with ``CN = node_id``, generate the
``fctry`` NVS image (:func:`rig.cloud.fctry.build_fctry`) and ``write-flash`` it at
the ``fctry`` partition's offset.

The node id is the board's base MAC as 12 upper-case hex digits, which is what
RainMaker itself uses for self-claimed nodes (idf-console.md §6.1,
``esp_rmaker_populate_node_id``), so a board keeps its node id across re-claims and
the id names the silicon in evidence.

Where ``fctry`` lives comes from the board's partition table, read back from the
board at the offsets ESP-IDF builds use (RainMaker's 0xC000, IDF's default 0x8000):
the table the board will actually boot with, not the one a build folder claims.

Claiming is idempotent: when the board's ``fctry`` already holds this node id, this
broker address and this lab CA, nothing is written (a re-run keeps the node's PoP).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes

from rig.boards.board import Board, BoardError
from rig.cloud.fctry import FCTRY_PARTITION_NAME, SERVER_CERT_KEY, build_fctry, read_fctry
from rig.cloud.pki import LabPki
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.partition_table import Partition, PartitionTable

TABLE_OFFSETS = (0xC000, 0x8000)
"""Where to look for the partition table: RainMaker's ``CONFIG_PARTITION_TABLE_OFFSET``
(rainmaker-protocol.md §8.1), then ESP-IDF's default."""
TABLE_READ_SIZE = 0xC00
DEFAULT_MQTT_PORT = 8883
"""``CONFIG_ESP_RMAKER_MQTT_PORT_8883``: a broker on this port needs no port in ``mqtt_host``."""


@dataclass(frozen=True)
class ClaimRecord:
    """What a claim did; kept as ``.rig/boards/<name>/claim.json`` (nothing secret in it)."""

    board: str
    node_id: str
    mac: str
    mqtt_host: str
    fctry_offset: int
    written: bool
    cert_fingerprint: str


def node_id_for_mac(mac: str) -> str:
    """RainMaker's self-claim node id: the base MAC, 12 upper-case hex digits."""
    digits = mac.replace(":", "").replace("-", "").upper()
    if len(digits) != 12 or any(c not in "0123456789ABCDEF" for c in digits):
        raise ValueError(f"{mac!r} is not a MAC address")
    return digits


def mqtt_host_value(host: str, port: int) -> str:
    """The ``mqtt_host`` fctry value: ``host`` on RainMaker's port, else ``host:port``."""
    return host if port == DEFAULT_MQTT_PORT else f"{host}:{port}"


def find_fctry_partition(board: Board) -> Partition:
    """The ``fctry`` partition of the table the board boots with (read over its port)."""
    problems: list[str] = []
    for offset in TABLE_OFFSETS:
        raw = board.read_flash(offset, TABLE_READ_SIZE)
        if raw[:2] != b"\xaa\x50":
            problems.append(f"no partition table at {offset:#x}")
            continue
        try:
            table = PartitionTable.parse(raw, offset)
        except FirmwareFormatError as exc:
            problems.append(f"table at {offset:#x}: {exc}")
            continue
        part = table.find(FCTRY_PARTITION_NAME)
        if part is None:
            raise BoardError(
                f"board '{board.name}': its partition table at {offset:#x} has no '{FCTRY_PARTITION_NAME}' partition. "
                "Fix: flash firmware built with RainMaker's partitions (partitions_4mb_optimised.csv)"
            )
        return part
    raise BoardError(
        f"board '{board.name}': {'; '.join(problems)}. Fix: flash the board's firmware set first "
        "(pytest-embedded flashes it, or `esptool write-flash @flasher_args`)"
    )


def _already_claimed(board: Board, part: Partition, node_id: str, mqtt_host: str, ca_pem: bytes) -> bool:
    try:
        creds = read_fctry(board.read_flash(part.offset, part.size))
    except FirmwareFormatError:
        return False
    return (
        creds.get("node_id") == node_id.encode()
        and creds.get("mqtt_host") == mqtt_host.encode()
        and creds.get(SERVER_CERT_KEY) == ca_pem
    )


def claim_board(board: Board, pki: LabPki, mqtt_host: str, mqtt_port: int, work_dir: Path, *, force: bool = False) -> ClaimRecord:
    """Issue *board* a node identity from *pki* and write its ``fctry`` partition.

    *work_dir* is the board's state folder; the claim inputs go to ``work_dir/claim/``
    and the record to ``work_dir/claim.json``. *force* rewrites ``fctry`` (a new
    ``random``, so a new PoP) even when it already matches.
    """
    mac = board.read_mac()
    node_id = node_id_for_mac(mac)
    host_value = mqtt_host_value(mqtt_host, mqtt_port)
    pair = pki.node_cert(node_id)
    ca_pem = pki.ca_cert_path.read_bytes()
    part = find_fctry_partition(board)
    written = False
    if force or not _already_claimed(board, part, node_id, host_value, ca_pem):
        image = build_fctry(work_dir / "claim", node_id, host_value, pair, server_cert=pki.ca_cert_path)
        if len(image.data) > part.size:
            raise BoardError(f"board '{board.name}': the fctry image ({len(image.data)} bytes) exceeds its partition ({part.size})")
        board.flash({part.offset: image.bin_path})
        written = True
    fingerprint = pair.certificate.fingerprint(hashes.SHA256())
    record = ClaimRecord(board.name, node_id, mac, host_value, part.offset, written, fingerprint.hex())
    work_dir.mkdir(parents=True, exist_ok=True)
    (work_dir / "claim.json").write_text(json.dumps(asdict(record), indent=2) + "\n", encoding="utf-8")
    return record

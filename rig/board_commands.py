"""``rig board …``: bench operations on one board of the lab, through its serial port.

Kept apart from :mod:`rig.cli` so each command group stays small; the CLI mounts it.
Every command resolves the board as the farm does (a real board's declared port, a
virtual board's published URL) and talks to it only through esptool.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rig.boards.board import Board, BoardError
from rig.boards.claim import claim_board
from rig.boards.virtual_ports import board_state_dir
from rig.cli_lab import BoardsOption, load_lab_or_exit
from rig.cloud.pki import LabPki
from rig.cloud.stack import StackEndpoints
from rig.lab import DEFAULT_BOARDS_FILE, Lab, LabConfigError
from rig.lab_services import running_state

board_app = typer.Typer(no_args_is_help=True, help="Operations on one board (identity, claim).")
console = Console()
err_console = Console(stderr=True)

def _fail(message: str) -> typer.Exit:
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)
    return typer.Exit(2)


def board_for(lab: Lab, name: str) -> Board:
    """The named board with its live port, or a readable exit naming the fix."""
    try:
        spec = lab.board(name)
    except LabConfigError as exc:
        raise _fail("\n".join(exc.problems)) from None
    port = lab.live_port(spec)
    if port is None:
        raise _fail(f"virtual board {name!r} is not running. Fix: `rig up` (or `rig vboard serve {name}`)")
    return Board(spec=spec, port=port, firmware_dir=lab.firmware_dir(spec), log=logging.getLogger(f"rig.board.{name}"))


def running_stack(lab: Lab) -> StackEndpoints:
    """The endpoints of the lab's running local stack (started by `rig up`)."""
    state = running_state(lab)
    if state is None or state.stack is None:
        raise _fail("the lab's cloud stack is not running. Fix: `rig up` first")
    return state.stack


@board_app.command("claim")
def claim(
    name: str,
    boards_file: BoardsOption = Path(DEFAULT_BOARDS_FILE),
    force: Annotated[bool, typer.Option(help="write a new fctry (new random, new PoP) even if it matches")] = False,
) -> None:
    """Give a board its cloud identity: a node certificate from the lab PKI in its fctry partition."""
    lab = load_lab_or_exit(boards_file)
    board = board_for(lab, name)
    stack = running_stack(lab)
    try:
        pki = LabPki(Path(stack.state_dir) / "pki")
        record = claim_board(board, pki, stack.mqtt_host, stack.mqtt_port, board_state_dir(lab.state_dir, name), force=force)
    except BoardError as exc:
        raise _fail(str(exc)) from None
    action = "written" if record.written else "already in place"
    console.print(f"board {name}: node {record.node_id} (MAC {record.mac}), fctry at {record.fctry_offset:#x} {action}")


def provision(
    name: str,
    user: Annotated[str, typer.Option(help="the cloud user (email) the node is mapped to; `rig user add` makes one")],
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, envvar="RIG_USER_PASSWORD", help="the user's password")],
    ssid: Annotated[str | None, typer.Option(help="access point from boards.yaml wifi: (default: the first)")] = None,
    boards_file: BoardsOption = Path(DEFAULT_BOARDS_FILE),
) -> None:
    """Provision a claimed, unprovisioned board onto the lab's Wi-Fi and map it to a user, as the phone app does.

    Reads the QR payload (PoP) from the board's console after a reset, runs protocomm over
    SoftAP HTTP to the board's address, then confirms the cloud mapping through the REST API.
    """
    import ssl
    import uuid

    import httpx

    from rig.protocomm.errors import SessionError
    from rig.prov.console_qr import ConsoleQrError, read_qr_payload
    from rig.prov.provisioner import ProvisioningClient, ProvisioningError, provision_wifi
    from rig.prov.rainmaker_api import RainMakerApiError, RainMakerUser
    from rig.prov.transport_http import SoftApHttpTransport, TransportError

    lab = load_lab_or_exit(boards_file)
    board = board_for(lab, name)
    stack = running_stack(lab)
    aps = [w for w in lab.wifi if ssid is None or w.ssid == ssid]
    if not aps:
        raise _fail(f"boards.yaml has no wifi: access point {ssid or ''}. Fix: add one under wifi:")
    ap = aps[0]
    address = lab.live_address(board.spec)
    if address is None:
        raise _fail(f"board {name!r} has no address: for provisioning. Fix: set address: (its SoftAP IP, e.g. 192.168.4.1)")
    try:
        qr = read_qr_payload(board.require_port())
        address = lab.live_address(board.spec) or address  # a virtual board started just now publishes where it is
        console.print(f"board {name}: service {qr.name}, security {'2' if qr.username else '1'}, transport {qr.transport}")
        with httpx.Client(base_url=stack.api_url, verify=ssl.create_default_context(cafile=stack.ca_cert), timeout=30) as http:
            cloud_user = RainMakerUser(http, user, password)
            secret = str(uuid.uuid4())
            client = ProvisioningClient(SoftApHttpTransport(address), pop=qr.pop or "", username=qr.username or "")
            outcome = provision_wifi(client, ap.ssid, ap.passphrase.get_secret_value(), cloud_user.user_id, secret)
            if not outcome.connected:
                reason = outcome.fail_reason.name if outcome.fail_reason is not None else outcome.state.name
                raise _fail(f"board {name} did not join {ap.ssid}: {reason}")
            console.print(f"board {name}: joined {ap.ssid} ({outcome.ip4_addr})")
            request = cloud_user.request_mapping(client.node_id or "", secret)
            status = cloud_user.wait_mapping(request.request_id)
    except (ConsoleQrError, ProvisioningError, SessionError, TransportError, RainMakerApiError) as exc:
        raise _fail(f"provisioning board {name} failed: {exc}") from None
    if status != "confirmed":
        raise _fail(f"board {name}: the cloud mapping ended '{status}'. Fix: check the node reached the broker (`rig status`, its console)")
    console.print(f"board {name}: mapped to {user} (request {request.request_id} confirmed)")


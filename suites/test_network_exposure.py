"""Network exposure: the board listens on nothing but the interfaces its supplier documents.

EN 303 645 5.6-1 wants every unused network and logical interface disabled, and 5.6-2 the
security-relevant exposure before authentication minimised. ETSI TS 103 701 tests them the way
a lab does: scan the device from the network and compare every port that accepts a connection
with the interfaces the IXIT declares (``product/ixit.yaml``: an undocumented open port is a
FAIL). A RainMaker node legitimately listens on

* TCP 80 while it is being provisioned — ESP-IDF's ``network_prov_mgr`` / ``wifi_prov_mgr`` on
  ``protocomm_httpd`` (SoftAP transport), stopped when provisioning ends (1 s after the app read
  the Connected status, at the latest RainMaker's auto-stop 30 s after the station joined);
* TCP 8080 once provisioned, when it runs local control — ``esp_local_ctrl`` on
  ``esp_https_server`` in plain-HTTP mode (esp-rainmaker ``src/core/esp_rmaker_local_ctrl.c``),
  which it announces to its mapped user as its Local Control service.

Its cloud connection (MQTT over TLS to 8883) is outbound and listens on nothing. So after
onboarding the documented set is {8080} when the node reports a Local Control service, else
empty; during provisioning it is {80}. Every TCP port 1–65535 of the board's address is scanned
with plain ``connect()`` (:mod:`rig.probe.tcp_ports`); a port open on the board and not documented
fails the test, named with what the service says first (a shell prompt is a debug backdoor).

A virtual board's address is on the host's loopback network, where a host listener bound to
``0.0.0.0`` answers too: such ports are recognised against a loopback address no board owns and
set aside as the host's, never blamed on the board. The evidence lists the open, documented and
host-wildcard ports. UDP is out of scope here (RainMaker's mDNS is optional and outbound-first).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from fixtures.evidence import Evidence
from fixtures.farm import NOT_APPLICABLE
from fixtures.node import FreshNode, ProvisionedNode, read_qr
from rig.boards.board import Board
from rig.evidence.redaction import SECRETS
from rig.probe.tcp_ports import PortScan, PortScanError, banner, banner_text, board_owned, resolve, scan_board
from rig.prov.local_ctrl import LOCAL_CTRL_PORT, wait_local_control_service
from rig.prov.polling import poll_until

PROVISIONING_PORT = 80
"""``protocomm_httpd``'s default port (ESP-IDF ``protocomm_httpd.h``, ``PROTOCOMM_HTTPD_DEFAULT_CONFIG``)."""
PROVISIONING_STOP_TIMEOUT_S = 45.0
"""ESP-IDF stops the provisioning server 1 s after the app read Connected; RainMaker's app_network
stops it 30 s after the join at the latest."""
PROVISIONING_POLL_S = 0.5
LOCAL_CTRL_TIMEOUT_S = 15.0
LOOPBACK_SCAN = {"concurrency": 512, "timeout_s": 1.0}
"""A virtual board answers every SYN at once: the whole range takes a few seconds."""
LAN_SCAN = {"concurrency": 64, "timeout_s": 3.0}
"""A real board's lwIP stack over Wi-Fi: fewer SYNs at once, time for a retransmitted SYN."""
WHAT_IT_IS = {
    PROVISIONING_PORT: "the SoftAP provisioning server, which ESP-IDF stops when provisioning ends",
    LOCAL_CTRL_PORT: "esp_local_ctrl's port, yet the node reports no Local Control service to its user",
}
"""Hints for ports a RainMaker node opens, when they are open where they should not be."""


@pytest.fixture
def scan_address(board: Board) -> str:
    """The board's address, before anything is flashed: a board the host cannot reach by address
    has no network surface this suite can scan. (Scan ``board.address`` once the board runs: a
    virtual board may have leased another address than the one derived from its name.)"""
    if not board.address:
        pytest.skip(
            f"{NOT_APPLICABLE}: board '{board.name}' has no network address to scan "
            "(set address: in boards.yaml to the address the host reaches it on, e.g. its SoftAP's 192.168.4.1, "
            "with the host joined to that AP)"
        )
    return board.address


def scan_settings(address: str) -> dict[str, Any]:
    """Loopback (a virtual board) or a real board on the lab network."""
    try:
        loopback = ipaddress.ip_address(resolve(address)).is_loopback
    except PortScanError as exc:
        pytest.fail(f"INCONCLUSIVE: {exc}", pytrace=False)
    return LOOPBACK_SCAN if loopback else LAN_SCAN


def greeting(address: str, port: int) -> str:
    """What the service says on connect, short and redacted, for the failure message."""
    try:
        said = banner(address, port)
    except PortScanError:
        return "it closed again before its greeting was read"
    if not said:
        return "it says nothing until spoken to"
    return f"it answers '{SECRETS.scrub(banner_text(said))}'"


def finding(address: str, port: int) -> str:
    hint = f"; {WHAT_IT_IS[port]}" if port in WHAT_IT_IS else ""
    return f"TCP port {port} is open on the board and not documented ({greeting(address, port)}{hint})"


def judge_exposure(board: Board, address: str, documented: dict[int, str], state: str, evidence: Evidence,
                   facts: dict[str, object]) -> PortScan:  # fmt: skip
    """Scan every TCP port of *address*, keep the scan as evidence, and fail on a board-owned port
    that is not in *documented* (port → what the IXIT calls it) for the node's *state*."""
    try:
        scan = scan_board(address, **scan_settings(address))
    except PortScanError as exc:
        pytest.fail(f"INCONCLUSIVE: the port scan of board '{board.name}' could not be judged: {exc}", pytrace=False)
    undocumented = [port for port in scan.board_owned if port not in documented]
    findings = [finding(address, port) for port in undocumented]
    evidence.attach_json(
        "tcp-ports.json",
        {
            "board": board.name,
            "state": state,
            "documented": {str(port): what for port, what in documented.items()},
            **facts,
            **scan.record(),
            "undocumented": undocumented,
            "findings": findings,
        },
    )
    if findings:
        allowed = ", ".join(f"{port} ({what})" for port, what in documented.items()) or "none"
        pytest.fail(
            f"{'; '.join(findings)}. Documented TCP ports in the {state} state: {allowed}. Fix: disable the listener in the "
            "firmware (EN 303 645 5.6-1), or document it in product/ixit.yaml if the product needs it"
        )
    return scan


def provisioning_stopped(address: str) -> bool:
    """Wait until the board's provisioning server is gone (a port that stays open is a finding of
    the scan, not a reason to stop here); whether it went."""
    still_open = poll_until(lambda: board_owned(address, PROVISIONING_PORT), lambda is_open: not is_open,
                            PROVISIONING_STOP_TIMEOUT_S, PROVISIONING_POLL_S)  # fmt: skip
    return not still_open


@pytest.mark.etsi("5.6-1", "5.6-2")
def test_only_documented_ports_are_open(scan_address: str, provisioned_node: ProvisionedNode, board: Board, evidence: Evidence) -> None:
    node = provisioned_node
    service = wait_local_control_service(node.user, node.node_id, LOCAL_CTRL_TIMEOUT_S)
    documented = {LOCAL_CTRL_PORT: "esp_local_ctrl (RainMaker Local Control)"} if service is not None else {}
    address = board.address or scan_address  # where the running board is (a virtual board publishes it)
    stopped = provisioning_stopped(address)
    judge_exposure(board, address, documented, "provisioned", evidence,
                   {"local_control_service": service is not None, "provisioning_server_stopped": stopped})  # fmt: skip


@pytest.mark.etsi("5.6-1", "5.6-2")
def test_only_the_provisioning_port_is_open_before_onboarding(
    scan_address: str, fresh_node: FreshNode, dut: Any, board: Board, evidence: Evidence
) -> None:
    read_qr(dut)  # the provisioning manager starts protocomm before the app prints the QR
    documented = {PROVISIONING_PORT: "SoftAP provisioning (protocomm_httpd)"}
    judge_exposure(board, board.address or scan_address, documented, "provisioning", evidence, {"node_id": fresh_node.node_id})

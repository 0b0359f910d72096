"""Local control: on the LAN only the holder of the node's local-control PoP controls it.

A provisioned, mapped RainMaker node runs ``esp_local_ctrl`` on HTTP port 8080 (esp-rainmaker
``src/core/esp_rmaker_local_ctrl.c``; rainmaker-protocol.md §4.7): protocomm security 1 or 2
with a random PoP the node generates and keeps in NVS, which it reports to its mapped user
through the cloud as the ``POP`` param of its Local Control service (``Type`` is the scheme).
The phone-app role (``rig.prov.local_ctrl``) reads that PoP as the mapped user and talks to
the node directly. What must hold (EN 303 645):

* 5.5-4 / 5.5-5 / 5.1-3 — with the PoP a session works, the node's config and params read
  back, and a params write is applied and reported: the cloud sees the change;
* 5.1-1 / 5.5-1 / 5.5-4 / 5.5-5 — without it nothing: no session with no PoP, a near miss,
  Espressif's example PoP or the provisioning PoP; no security-0 downgrade; the control
  endpoint answers nothing in plaintext;
* 5.1-1 / 5.1-2 — the PoP is the node's own secret: present, not the provisioning PoP (which
  the QR label shows to anyone holding the box), not an example value, not the MAC address.

The node is reached at the board's address (a virtual board's own loopback address; for a
real board, the address boards.yaml gives it on the lab network) on port 8080.
"""

from __future__ import annotations

from typing import Any

import pytest

from fixtures.node import EXAMPLE_POPS, POWER, SWITCH, ProvisionedNode, console_value, near_miss, pop_weakness
from rig.protocomm.errors import SessionError
from rig.protocomm.messages import CmdGetPropertyCount, LocalCtrlMessage, LocalCtrlMsgType
from rig.protocomm.security import DEFAULT_SEC2_USERNAME
from rig.prov.local_ctrl import LOCAL_CTRL_PORT, LocalControlClient, LocalControlService, wait_local_control_service
from rig.prov.transport_http import SoftApHttpTransport, TransportError

CLOUD_TIMEOUT_S = 60.0
MIN_POP_LEN = 8
"""RainMaker's local-control PoP: 8 hex digits from 4 random bytes (32 bits)."""


def local_service(node: ProvisionedNode) -> LocalControlService:
    """The PoP and scheme as the mapped user's app learns them: the node's Local Control service in the cloud."""
    service = wait_local_control_service(node.user, node.node_id, CLOUD_TIMEOUT_S)
    if service is None:
        pytest.fail(
            f"node {node.node_id} reports no Local Control service (esp.service.local_control) to its mapped user within "
            f"{CLOUD_TIMEOUT_S:.0f} s: local control is off, or runs security 0 (RainMaker adds the service only with a PoP). "
            "If the product has no local control, declare that in product/ics.yaml and deselect this suite"
        )
    return service


def client(node: ProvisionedNode, pop: str, username: str | None = None) -> LocalControlClient:
    transport = SoftApHttpTransport(node.fresh.address(), LOCAL_CTRL_PORT, timeout=10)
    return LocalControlClient(transport, pop=pop, username=username or DEFAULT_SEC2_USERNAME)


def wrong_pops(pop: str, provisioning_pop: str | None) -> list[str]:
    """What an attacker on the LAN tries: no PoP, the PoP one digit off, the example PoPs, and the
    provisioning PoP printed on the device's QR label."""
    guesses = [""]
    if pop:
        guesses.append(near_miss(pop))
    guesses += [p for p in (*EXAMPLE_POPS, provisioning_pop or "") if p and p != pop]
    return guesses


@pytest.mark.etsi("5.1-3", "5.5-4", "5.5-5")
def test_the_mapped_user_controls_the_node_locally(provisioned_node: ProvisionedNode, dut: Any) -> None:
    node = provisioned_node
    service = local_service(node)
    assert service.security in (1, 2), f"the node's Local Control service says security {service.security}; RainMaker runs 1 or 2"
    lc = client(node, service.pop, service.username)
    version = lc.get_version()
    if version.sec_ver is not None:
        assert version.sec_ver == service.security, (
            f"esp_local_ctrl/version announces security {version.sec_ver}, the cloud's Local Control service says {service.security}"
        )
    try:
        lc.open_session()
    except (SessionError, TransportError) as exc:
        pytest.fail(f"no local-control session with the PoP the node reported to its mapped user: {exc}")
    config = lc.get_config()
    assert config.get("node_id") == node.node_id, f"local control serves the config of node {config.get('node_id')!r}, not {node.node_id}"
    current = lc.get_params().get(SWITCH, {}).get(POWER)
    assert isinstance(current, bool), f"the local params have no boolean {SWITCH}.{POWER}: {current!r}"
    target = not current
    lc.set_params({SWITCH: {POWER: target}})
    applied = console_value(dut, SWITCH, POWER)
    assert applied == ("true" if target else "false"), f"the node did not apply the local write {POWER} = {target} (it holds {applied})"
    assert lc.get_params()[SWITCH][POWER] is target, "local control reads back a value other than the one it just wrote"
    seen = node.user.wait_param(node.node_id, SWITCH, POWER, target, CLOUD_TIMEOUT_S)
    assert seen == target, f"the node applied the local write {POWER} = {target} but the cloud shows {seen}: it was not reported"


@pytest.mark.etsi("5.1-1", "5.1-3", "5.5-1", "5.5-4", "5.5-5")
def test_local_control_needs_the_pop(provisioned_node: ProvisionedNode) -> None:
    node = provisioned_node
    service = local_service(node)
    for pop in wrong_pops(service.pop, node.qr.pop):
        try:
            client(node, pop, service.username).open_session()
        except (SessionError, TransportError):
            continue
        if not pop:
            pytest.fail("a local-control session was established without a PoP: anyone on the LAN controls the node")
        which = "the provisioning PoP" if pop == node.qr.pop else f"PoP {pop!r}"
        pytest.fail(f"a local-control session was established with {which}, not the node's local-control PoP")
    with pytest.raises((SessionError, TransportError)):  # no downgrade to security 0
        client(node, "").open_session(sec_ver=0)
    plaintext = LocalCtrlMessage(msg=LocalCtrlMsgType.TypeCmdGetPropertyCount, cmd_get_prop_count=CmdGetPropertyCount()).encode()
    with pytest.raises(TransportError):  # without a session the control endpoint answers nothing
        client(node, "").send_control(plaintext)
    good = client(node, service.pop, service.username)  # the PoP still works after every failed attempt
    good.open_session()
    assert good.property_count() >= 2, "local control lists fewer than RainMaker's two properties (config, params)"


@pytest.mark.etsi("5.1-1", "5.1-2")
def test_local_control_pop_is_the_nodes_own_secret(provisioned_node: ProvisionedNode) -> None:
    node = provisioned_node
    pop = local_service(node).pop
    assert pop, "the node's Local Control service reports no PoP: local control runs without proof of possession (5.1-1)"
    assert pop != node.qr.pop, "the local-control PoP is the provisioning PoP printed on the QR label: one secret for two doors"
    weakness = pop_weakness(pop, node.fresh.claim.mac)
    assert weakness is None, f"the local-control PoP is no per-device secret: {weakness}"
    assert len(pop) >= MIN_POP_LEN, f"the local-control PoP has {len(pop)} characters; RainMaker's has {MIN_POP_LEN} random hex digits"

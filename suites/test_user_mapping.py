"""User ⇄ node mapping, and who may control a node: only the user who provisioned it, and
users that user shared it with once they accepted (EN 303 645 5.5-4, 5.5-5).

RainMaker binds a node to a user only when both sides report the same secret within one
minute (rainmaker-protocol.md §2.3–2.4; https://rainmaker.espressif.com/docs/user-node-mapping):
the phone app hands its user id and a fresh secret to the node inside the encrypted
provisioning session (``cloud_user_assoc``), the node publishes them on ``user/mapping``
once it is on the cloud, and the app sends the same pair with ``PUT v1/user/nodes/mapping``.
The cloud then lets that user read and set the node's params, and nobody else until the
primary user shares the node and the other user accepts (§3.4). What must hold:

* the user who provisioned the node gets it mapped as its primary user, config included;
* a mapping request with a different secret is never confirmed, even while the node's own
  half waits in the cloud — the secret is what ties the request to the provisioning session;
* a request the node never answers is ``timedout`` once the one-minute window has passed,
  so knowing a node id is not enough to take the node;
* the mapped user's writes reach the node; another user can neither read the node's params
  nor have a write reach it — not before a share, not while the share is pending — and can
  once the share is accepted.

The node is judged through its console (the ``Received params`` log of
``esp_rmaker_param.c`` and ``get-param`` of ``esp_rmaker_commands.c``), the cloud through
its REST API as the phone app sees it. Tests that move the mapping window need the local
stack's test clock; against a remote cloud they are NOT_APPLICABLE.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from fixtures.cloud import Cloud
from fixtures.node import POWER, SWITCH, FreshNode, ProvisionedNode, console_value, provision, read_qr
from rig.evidence.redaction import SECRETS
from rig.lab import Lab
from rig.prov.rainmaker_api import RainMakerApiError, RainMakerUser

MAPPING_WINDOW_S = 60.0
"""RainMaker's user-node mapping window: "Timed Out" one minute after the first half without
the matching other half (rainmaker-protocol.md §2.4)."""
PAST_THE_WINDOW_S = MAPPING_WINDOW_S + 1.0
CLOUD_TIMEOUT_S = 60.0
WRITE_TIMEOUT_S = 45.0

NAME = "Name"
"""The switch example's device and params (esp-rainmaker ``examples/switch``), which the
rig's RainMaker firmware sets are built from."""

MAPPING_SENT = "User Node association message published successfully."
"""``esp_rmaker_user_mapping.c`` logs this on the PUBACK of the node's ``user/mapping`` message."""
RECEIVED_PARAMS = re.compile(rb"Received params: ([^\r\n]*)")
"""``esp_rmaker_param.c`` logs every ``params/remote`` write the node gets, before applying it."""
HTTP_CLIENT_ERROR = re.compile(r"HTTP 4\d\d")


def require_test_clock(cloud: Cloud) -> None:
    """NOT_APPLICABLE before a board is spent when the cloud's clock cannot be moved (moving it by zero is the probe)."""
    cloud.advance_clock(0.0)


def mapping_secret() -> str:
    """A fresh secret as the app makes one (``str(uuid.uuid4())``, rainmaker-protocol.md §2.4), kept out of logs."""
    secret = str(uuid.uuid4())
    SECRETS.add(secret)
    return secret


def next_write_on_node(dut: Any) -> str:
    """The payload of the next cloud write the node receives, as its log shows it."""
    return dut.expect(RECEIVED_PARAMS, timeout=WRITE_TIMEOUT_S).group(1).decode("utf-8", "replace")


def console_text(value: bool) -> str:
    return "true" if value else "false"


def refusal(call: Callable[[], object]) -> str | None:
    """The cloud's refusal of *call* (an HTTP 4xx), or ``None`` when the call went through.
    Anything else (the cloud unreachable, a 5xx) is the lab's problem and propagates."""
    try:
        call()
    except RainMakerApiError as exc:
        if not HTTP_CLIENT_ERROR.search(str(exc)):
            raise
        return str(exc)
    return None


def write_refusal(user: RainMakerUser, node_id: str, payload: dict[str, Any]) -> str | None:
    """The multi-node ``PUT v1/user/nodes/params`` answers per node: a refusal is an HTTP 4xx
    or a ``failure`` entry for the node; ``None`` when the cloud accepted the write."""
    results: list[dict[str, Any]] = []
    refused = refusal(lambda: results.extend(user.set_params(node_id, payload)))
    if refused is not None:
        return refused
    mine = [r for r in results if r.get("node_id") == node_id]
    if mine and all(r.get("status") != "success" for r in mine):
        return str(mine[0].get("description", "failure"))
    return None


def provision_with_secret(fresh_node: FreshNode, dut: Any, lab: Lab, user: RainMakerUser, secret: str) -> None:
    """The app's onboarding up to the node's half of the mapping; the user's half is the test's."""
    provision(fresh_node, lab, user, read_qr(dut), secret)
    dut.expect_exact(MAPPING_SENT, timeout=CLOUD_TIMEOUT_S)


@pytest.mark.etsi("5.5-4", "5.5-5")
def test_mapping_is_confirmed_for_the_provisioning_user(provisioned_node: ProvisionedNode) -> None:
    user, node_id = provisioned_node.user, provisioned_node.node_id
    assert node_id in user.nodes(), f"the mapping was confirmed but node {node_id} is not among the user's nodes"
    primary, secondary = user.node_sharing(node_id)
    assert primary == [user.email] and not secondary, (
        f"after its first mapping node {node_id} should have the provisioning user as its only user; "
        f"the cloud lists primary {primary}, secondary {secondary}"
    )
    config = user.node_config(node_id)
    assert config.get("node_id") == node_id, f"the config the user gets is for node {config.get('node_id')!r}, not {node_id}"
    devices = [d.get("name") for d in config.get("devices", [])]
    assert SWITCH in devices, f"the node's config lists devices {devices}; the switch firmware reports '{SWITCH}'"


@pytest.mark.etsi("5.5-4", "5.5-5")
def test_wrong_secret_never_confirms(fresh_node: FreshNode, dut: Any, lab: Lab, cloud: Cloud, cloud_user: RainMakerUser) -> None:
    require_test_clock(cloud)
    node_secret = mapping_secret()
    provision_with_secret(fresh_node, dut, lab, cloud_user, node_secret)
    node_id = fresh_node.node_id
    # The wrong secret goes first, while the node's half waits in the cloud; the right one
    # second, as the positive control that the node's half is there and live.
    wrong = cloud_user.request_mapping(node_id, mapping_secret())
    right = cloud_user.request_mapping(node_id, node_secret)
    states = cloud_user.wait_any_mapping([wrong.request_id, right.request_id], CLOUD_TIMEOUT_S)
    assert states[wrong.request_id] != "confirmed", (
        f"the cloud confirmed a mapping of node {node_id} whose secret_key differs from the one the node was given "
        "in provisioning: the secret does not tie the request to the provisioning session"
    )
    if states[right.request_id] != "confirmed":
        pytest.fail(
            f"INCONCLUSIVE: the request with the node's own secret ended '{states[right.request_id]}' within "
            f"{CLOUD_TIMEOUT_S:.0f} s, so the node's half never met the wrong one",
            pytrace=False,
        )
    cloud.advance_clock(PAST_THE_WINDOW_S)
    final = cloud_user.mapping_status(wrong.request_id)
    if final == "discarded":
        pytest.fail(
            "INCONCLUSIVE: the wrong-secret request was discarded by the right one before the node's half reached "
            "the cloud, so it was never matched against it",
            pytrace=False,
        )
    assert final == "timedout", f"a mapping request with the wrong secret should be timedout {MAPPING_WINDOW_S:.0f} s on; it is '{final}'"
    primary, secondary = cloud_user.node_sharing(node_id)
    assert primary == [cloud_user.email] and not secondary, (
        f"node {node_id} users after the mapping: primary {primary}, secondary {secondary}"
    )


@pytest.mark.etsi("5.5-4", "5.5-5")
def test_mapping_without_the_node_times_out(fresh_node: FreshNode, dut: Any, cloud: Cloud, cloud_user: RainMakerUser) -> None:
    require_test_clock(cloud)
    read_qr(dut)  # the node waits to be provisioned: it has no Wi-Fi, so it sends no user/mapping message
    node_id = fresh_node.node_id
    request = cloud_user.request_mapping(node_id, mapping_secret())
    status = cloud_user.mapping_status(request.request_id)
    assert status != "confirmed", (
        f"the cloud confirmed a mapping of node {node_id} that the node never sent its half of: "
        "whoever knows a node id (it is printed on labels and in QR payloads) can take the node"
    )
    assert status == "requested", f"a fresh mapping request should be 'requested' until the node answers; it is '{status}'"
    cloud.advance_clock(PAST_THE_WINDOW_S)
    status = cloud_user.mapping_status(request.request_id)
    assert status == "timedout", f"no node message within {MAPPING_WINDOW_S:.0f} s should make the request 'timedout'; it is '{status}'"
    assert node_id not in cloud_user.nodes(), f"node {node_id} is among the user's nodes although the mapping timed out"
    assert refusal(lambda: cloud_user.params(node_id)) is not None, f"the user reads node {node_id}'s params without a mapping"


@pytest.mark.etsi("5.5-4", "5.5-5")
def test_only_the_mapped_user_and_accepted_shares_control_the_node(provisioned_node: ProvisionedNode, dut: Any, cloud: Cloud) -> None:
    owner, node_id = provisioned_node.user, provisioned_node.node_id
    current = console_value(dut, SWITCH, POWER) == "true"
    # The node reports its params once it subscribed to params/remote: only then can a write reach it.
    if owner.wait_param(node_id, SWITCH, POWER, current, CLOUD_TIMEOUT_S) != current:
        pytest.fail(f"INCONCLUSIVE: node {node_id} never reported {SWITCH}.{POWER} = {console_text(current)} to the cloud", pytrace=False)

    # the mapped user controls the node
    target = not current
    results = owner.set_params(node_id, {SWITCH: {POWER: target}})
    assert all(r.get("status") == "success" for r in results), f"the cloud refused the mapped user's write: {results}"
    write = next_write_on_node(dut)
    assert f'"{POWER}"' in write, f"the node received {write}, not the mapped user's {POWER} write"
    assert console_value(dut, SWITCH, POWER) == console_text(target), f"the node did not apply {SWITCH}.{POWER} = {target}"
    seen = owner.wait_param(node_id, SWITCH, POWER, target, CLOUD_TIMEOUT_S)
    assert seen == target, f"the node applied {POWER} = {target} but the cloud shows {seen}"

    email, password = cloud.add_user()
    with cloud.client() as http:
        other = RainMakerUser(http, email, password)
        assert refusal(lambda: other.params(node_id)) is not None, (
            f"a user who is neither mapped to nor shared node {node_id} read its params"
        )
        assert write_refusal(other, node_id, {SWITCH: {POWER: current}}) is not None, (
            f"the cloud accepted a write to node {node_id} from a user who is neither mapped to nor shared it"
        )

        request_id = owner.share_nodes([node_id], other.email)
        pending = [r for r in other.sharing_requests() if r.request_id == request_id]
        assert pending and pending[0].status == "pending" and node_id in pending[0].node_ids, (
            f"the other user does not see the sharing request {request_id} as pending: {pending}"
        )
        assert refusal(lambda: other.params(node_id)) is not None, (
            f"a user read node {node_id}'s params while the share was only offered, not accepted"
        )
        assert write_refusal(other, node_id, {SWITCH: {POWER: current}}) is not None, (
            f"the cloud accepted a write to node {node_id} while the share was only offered, not accepted"
        )

        # Neither refused write may have reached the node: the owner's marker write, published
        # after them, must be the next write the node receives (one cloud publisher, QoS 1, in order).
        marker = f"rig-{uuid.uuid4().hex[:8]}"
        owner.set_params(node_id, {SWITCH: {NAME: marker}})
        write = next_write_on_node(dut)
        assert marker in write, f"the node received a write the cloud had refused: {write}"
        assert console_value(dut, SWITCH, POWER) == console_text(target), (
            f"the node's {POWER} changed although every write but the owner's was refused"
        )

        other.answer_sharing_request(request_id, accept=True)
        primary, secondary = owner.node_sharing(node_id)
        assert primary == [owner.email] and secondary == [other.email], (
            f"after the share was accepted node {node_id} lists primary {primary}, secondary {secondary}"
        )
        shared_view = other.params(node_id).get(SWITCH, {}).get(POWER)
        assert shared_view == target, f"the accepted secondary user sees {SWITCH}.{POWER} = {shared_view}, the node holds {target}"
        results = other.set_params(node_id, {SWITCH: {POWER: current}})
        assert all(r.get("status") == "success" for r in results), f"the cloud refused the accepted secondary user's write: {results}"
        write = next_write_on_node(dut)
        assert f'"{POWER}"' in write, f"the node received {write}, not the secondary user's {POWER} write"
        assert console_value(dut, SWITCH, POWER) == console_text(current), f"the node did not apply the secondary user's {POWER} write"

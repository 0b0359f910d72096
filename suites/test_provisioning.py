"""Wi-Fi provisioning: only the holder of the device's PoP gets a session, and secrets stay secret.

The phone-app role (``rig.prov``) provisions a factory-fresh node over protocomm on its
SoftAP HTTP server, as the RainMaker app and esp-rainmaker-cli do: proto-ver, a
security 2 (or 1) session with the PoP from the node's QR line, the user association,
the Wi-Fi credentials, then the cloud mapping. What must hold (EN 303 645):

* 5.1-1 / 5.1-3 / 5.5-4 / 5.5-5 — no session, and so no configuration, without the PoP;
  the scheme is the best-practice one (sec2: SRP6a + AES-GCM), never security 0;
* 5.5-6 / 5.5-7 / 5.8-1 — the Wi-Fi passphrase and the PoP never appear on the UART
  after the node printed its QR payload;
* 5.5-1 / 5.5-6 / 5.5-7 — nor in clear on the wire: a capture of the node's traffic while it is
  provisioned (with whatever scheme it offers) and reaches the cloud holds neither, in any
  common encoding;
* the node then reaches the cloud and its user mapping is confirmed.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

import pytest

from fixtures.capture import BoardCaptures
from fixtures.node import EXAMPLE_POPS, FreshNode, lab_ap, near_miss, pop_weakness, read_qr
from rig.capture import describe_hits
from rig.lab import Lab
from rig.protocomm.errors import SessionError
from rig.protocomm.messages import CmdSetConfig, WiFiConfigMsgType, WiFiConfigPayload, WifiStationState
from rig.prov.provisioner import ProvisioningClient, provision_wifi
from rig.prov.rainmaker_api import RainMakerUser
from rig.prov.transport_http import SoftApHttpTransport, TransportError

WIFI_TIMEOUT_S = 30.0
CLOUD_TIMEOUT_S = 60.0




def wrong_pops(pop: str) -> list[str]:
    """Guesses an attacker tries first: the PoP one digit off, no PoP, the example PoPs."""
    return [near_miss(pop), "", *(p for p in EXAMPLE_POPS if p != pop)]


@pytest.mark.etsi("5.1-1", "5.1-3", "5.5-1", "5.5-4", "5.5-5", "5.5-6", "5.5-7", "5.8-1")
def test_provisioning_with_the_pop_reaches_the_cloud(
    fresh_node: FreshNode, dut: Any, lab: Lab, cloud_user: RainMakerUser
) -> None:
    qr = read_qr(dut)
    ap = lab_ap(lab)
    passphrase = ap.passphrase.get_secret_value()
    client = ProvisioningClient(SoftApHttpTransport(fresh_node.address()), pop=qr.pop or "", username=qr.username or "")
    version = client.proto_version()
    assert version.sec_ver == 2, f"the node offers security {version.sec_ver}; RainMaker's default and best practice is 2"
    secret = str(uuid.uuid4())
    outcome = provision_wifi(client, ap.ssid, passphrase, cloud_user.user_id, secret, timeout=WIFI_TIMEOUT_S)
    assert outcome.connected, f"Wi-Fi did not connect: {outcome}"
    secrets = [re.escape(passphrase)] + ([re.escape(qr.pop)] if qr.pop else [])
    dut.expect("MQTT Connected", timeout=CLOUD_TIMEOUT_S, not_matching=secrets)
    request = cloud_user.request_mapping(fresh_node.node_id, secret)
    assert cloud_user.wait_mapping(request.request_id, CLOUD_TIMEOUT_S) == "confirmed"
    assert fresh_node.node_id in cloud_user.nodes()


@pytest.mark.etsi("5.1-1", "5.1-5", "5.5-4", "5.5-5")
def test_wrong_pop_never_yields_a_session(fresh_node: FreshNode, dut: Any, lab: Lab) -> None:
    qr = read_qr(dut)
    if not qr.pop:
        pytest.fail("the node's QR payload has no PoP: anyone in radio range can provision it (5.1-1)")
    ap = lab_ap(lab)
    for pop in wrong_pops(qr.pop):
        guess = ProvisioningClient(SoftApHttpTransport(fresh_node.address()), pop=pop, username=qr.username or "")
        try:
            guess.open_session()
        except (SessionError, TransportError):
            continue
        pytest.fail(f"a session was established with PoP {pop!r}, not the device's" if pop else "a session was established without a PoP")
    # without a session the device must not take configuration, not even in plaintext
    plaintext = WiFiConfigPayload(
        msg=WiFiConfigMsgType.TypeCmdSetConfig,
        cmd_set_config=CmdSetConfig(ssid=ap.ssid.encode(), passphrase=ap.passphrase.get_secret_value().encode()),
    ).encode()
    with pytest.raises(TransportError):
        guess.transport.send("prov-config", plaintext)
    # the right PoP still works afterwards, and nothing of the failed attempts was applied
    good = ProvisioningClient(SoftApHttpTransport(fresh_node.address()), pop=qr.pop, username=qr.username or "")
    good.open_session()
    status = good.wifi_status()
    assert status.sta_state != WifiStationState.Connected, "the node joined Wi-Fi although no one with the PoP configured it"


@pytest.mark.etsi("5.1-1", "5.1-2")
def test_pop_is_unique_and_not_derivable(fresh_node: FreshNode, dut: Any) -> None:
    """The PoP is the device's own random secret: not an example value, not computed from its MAC."""
    qr = read_qr(dut)
    assert qr.pop, "the node's QR payload has no PoP"
    weakness = pop_weakness(qr.pop, fresh_node.claim.mac)
    assert weakness is None, f"the provisioning PoP is no per-device secret: {weakness}"


@pytest.mark.etsi("5.1-3", "5.5-1", "5.5-4")
def test_security_0_is_refused(fresh_node: FreshNode, dut: Any) -> None:
    read_qr(dut)
    client = ProvisioningClient(SoftApHttpTransport(fresh_node.address()))
    version = client.proto_version()
    assert version.sec_ver != 0 and "no_sec" not in version.capabilities, (
        f"the node offers provisioning without security (proto-ver {version.raw})"
    )
    with pytest.raises((SessionError, TransportError)):
        client.open_session(sec_ver=0)


@pytest.mark.etsi("5.5-1", "5.5-6", "5.5-7")
def test_secrets_never_cross_the_wire_in_clear(
    board_capture: BoardCaptures, fresh_node: FreshNode, dut: Any, lab: Lab, cloud_user: RainMakerUser
) -> None:
    """Provisioned as the app would — with the scheme the node itself offers, security 0 included — and
    on to the cloud, under capture: the passphrase, the PoP and the mapping secret appear in no payload."""
    qr = read_qr(dut)
    ap = lab_ap(lab)
    passphrase = ap.passphrase.get_secret_value()
    secret = str(uuid.uuid4())
    client = ProvisioningClient(SoftApHttpTransport(fresh_node.address()), pop=qr.pop or "", username=qr.username or "")
    with board_capture("provisioning") as cap:
        offered = client.proto_version()  # open_session() runs this scheme: the one the node offers
        outcome = provision_wifi(client, ap.ssid, passphrase, cloud_user.user_id, secret, timeout=WIFI_TIMEOUT_S)
        if outcome.connected:
            dut.expect_exact("MQTT Connected", timeout=CLOUD_TIMEOUT_S)
    canaries = {"the Wi-Fi passphrase": passphrase, "the user-mapping secret": secret} | ({"the PoP": qr.pop} if qr.pop else {})
    hits = cap.cleartext_hits(canaries)
    assert not hits, f"with protocomm security {offered.sec_ver}, secrets crossed the wire in clear:\n{describe_hits(hits)}"
    cap.require_complete()
    cap.require_traffic(client.transport.port, "the provisioning exchange")
    if not outcome.connected:
        pytest.fail(f"INCONCLUSIVE: the node did not join {ap.ssid} ({outcome}), so its traffic after provisioning was not seen",
                    pytrace=False)

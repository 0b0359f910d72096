"""rig.prov.session / rig.prov.polling: what the provisioning and local-control clients share.

The clients talk to an in-process :class:`~rig.protocomm.endpoints.Protocomm` (no HTTP), so these
run in milliseconds; the clients against real servers are in test_local_ctrl.py and the suites.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest

from rig.protocomm.endpoints import Protocomm, provisioning_version
from rig.protocomm.messages import (
    LocalCtrlMessage,
    LocalCtrlMsgType,
    RespGetStatus,
    RespSetConfig,
    WiFiConfigMsgType,
    WiFiConfigPayload,
    WifiConnectedState,
    WifiConnectFailedReason,
    WifiStationState,
)
from rig.protocomm.security import DeviceSecurity1
from rig.prov import polling
from rig.prov.local_ctrl import LocalControlClient, LocalControlError
from rig.prov.polling import poll_until
from rig.prov.provisioner import ProvisioningClient, ProvisioningError

POP = "abcd1234"


class InProcess:
    """A transport straight into a Protocomm, as the HTTP server would hand it requests (one session, id 1)."""

    def __init__(self, protocomm: Protocomm):
        self.protocomm = protocomm
        protocomm.open_session(1)

    def send(self, endpoint: str, data: bytes) -> bytes:
        return self.protocomm.handle(endpoint, 1, data)


def _device(config_answer: bytes | Callable[[bytes], bytes]) -> Protocomm:
    pc = Protocomm()
    pc.set_version("proto-ver", provisioning_version(sec_ver=1))
    pc.set_security("prov-session", DeviceSecurity1(POP))
    pc.add_endpoint("prov-config", config_answer if callable(config_answer) else lambda _request: config_answer)
    return pc


def _statuses(*statuses: RespGetStatus) -> Callable[[bytes], bytes]:
    """A prov-config handler answering each get-status with the next of *statuses* (the last one repeats)."""
    answers = itertools.chain(statuses, itertools.repeat(statuses[-1]))

    def handler(_request: bytes) -> bytes:
        return WiFiConfigPayload(msg=WiFiConfigMsgType.TypeRespGetStatus, resp_get_status=next(answers)).encode()

    return handler


def test_each_client_refuses_requests_before_the_session_with_its_own_error() -> None:
    prov = ProvisioningClient(InProcess(_device(b"")), pop=POP)
    with pytest.raises(ProvisioningError, match="prov-config: no secure session yet"):
        prov.wifi_status()
    lc = LocalControlClient(InProcess(_device(b"")), pop=POP)
    with pytest.raises(LocalControlError, match="esp_local_ctrl/control: no secure session yet"):
        lc.call(LocalCtrlMessage(msg=LocalCtrlMsgType.TypeCmdGetPropertyCount))


def test_a_status_the_enum_lacks_is_reported_not_crashed_on() -> None:
    """proto3 enums are open: a device answering status 42 gets a ProvisioningError naming 42, not a ValueError."""
    answer = WiFiConfigPayload(msg=WiFiConfigMsgType.TypeRespSetConfig, resp_set_config=RespSetConfig(status=42)).encode()
    client = ProvisioningClient(InProcess(_device(answer)), pop=POP)
    assert client.open_session().established
    with pytest.raises(ProvisioningError, match="set config: the device answered 42"):
        client.set_wifi_config("lab-net", "lab-passphrase")


def test_poll_until_stops_when_done_and_returns_the_last_answer_at_the_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    sleeps: list[float] = []
    monkeypatch.setattr(polling.time, "sleep", sleeps.append)
    answers = itertools.count()
    assert poll_until(lambda: next(answers), lambda n: n == 3, timeout=60, interval=0.5) == 3
    assert sleeps == [0.5] * 3  # one sleep between fetches, none after the accepted answer
    clock = itertools.count(0, 10)  # every reading of the clock is 10 s later
    monkeypatch.setattr(polling.time, "monotonic", lambda: next(clock))
    assert poll_until(lambda: "pending", lambda s: s == "confirmed", timeout=25, interval=1) == "pending"
    assert len(sleeps) == 3 + 2  # deadline 25: checks at 10 and 20 go on, the one at 30 stops


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        ([RespGetStatus(sta_state=WifiStationState.Connecting),
          RespGetStatus(sta_state=WifiStationState.Connected, connected=WifiConnectedState(ip4_addr="10.0.0.7"))],
         (WifiStationState.Connected, None, "10.0.0.7")),
        ([RespGetStatus(sta_state=WifiStationState.Disconnected),  # no reason yet: esp_prov keeps polling
          RespGetStatus(sta_state=WifiStationState.ConnectionFailed, fail_reason=WifiConnectFailedReason.AuthError)],
         (WifiStationState.ConnectionFailed, WifiConnectFailedReason.AuthError, None)),
        ([RespGetStatus(sta_state=WifiStationState.Connecting)], (WifiStationState.Connecting, None, None)),  # timeout: last state
    ],
)  # fmt: skip
def test_wait_wifi_polls_until_connected_or_failed_with_a_reason(
    monkeypatch: pytest.MonkeyPatch, statuses: list[RespGetStatus], expected: tuple[object, object, object]
) -> None:
    monkeypatch.setattr(polling.time, "sleep", lambda _s: None)
    client = ProvisioningClient(InProcess(_device(_statuses(*statuses))), pop=POP)
    client.open_session()
    outcome = client.wait_wifi(timeout=0.2)
    assert (outcome.state, outcome.fail_reason, outcome.ip4_addr) == expected

"""Malformed cloud input: a node drops a ``params/remote`` message it cannot use and goes on.

A RainMaker node takes param writes on ``node/<node_id>/params/remote`` (rainmaker-protocol.md
§1.2; esp-rainmaker ``src/core/esp_rmaker_param.c`` ``esp_rmaker_handle_set_params``): it parses
the payload as JSON and applies each ``{"<Device>": {"<Param>": value}}`` it knows. What must hold:

* 5.13-1 — input received over a network interface is validated: a payload that is not JSON, not
  an object, truncated, not UTF-8, or names values the node does not have (wrong type, unknown
  device or param, absurd size or depth) is refused, not acted on or crashed over;
* 5.9-1 — the node stays up: a panic (ESP-IDF's "Guru Meditation Error") reboots the chip and drops
  it off the cloud, so one bad message would be an outage.

The real RainMaker REST API forwards only JSON it validated, so malformed bytes reach a node only
from a buggy or compromised cloud: the suite sends them through the local stack's test control
(``Cloud.send_raw_to_node``, ``POST /test/mqtt/to-node``) and is NOT_APPLICABLE without it. After
each malformed payload the mapped user sends a valid write through the REST API, as the phone app
does; the node proves it survived by applying it — the switch example's write callback prints
``Received value = true for Switch - Power`` (esp-rainmaker ``examples/switch/main/app_main.c``).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import asdict, dataclass
from typing import Any, Literal

import pexpect
import pytest

from fixtures.cloud import Cloud
from fixtures.evidence import Evidence
from fixtures.node import POWER, ROM_BANNER, SWITCH, ProvisionedNode
from rig.prov.rainmaker_api import RainMakerApiError

PARAMS_REMOTE = "params/remote"
ECHO_TIMEOUT_S = 30.0
"""How long the node may take to apply a valid write: one cloud round trip and a console line."""

GURU_MEDITATION = "Guru Meditation Error"
"""The head of ESP-IDF's panic handler report (``components/esp_system/panic.c``)."""
RESET_LINE = r"rst:0x[0-9a-fA-F]+ \("
"""The ROM's reset-reason line after ``ESP-ROM:`` (``rst:0xc (RTC_SW_CPU_RST)`` after a panic)."""
CRASH = f"{re.escape(GURU_MEDITATION)}|{re.escape(ROM_BANNER)}|{RESET_LINE}"

NESTING = 200
"""Levels of nesting in the deep case (two objects, then arrays): deep enough to overrun a recursive
parser on a small FreeRTOS task stack; esp-rainmaker parses with jsmn (``json_parser``), which keeps
one token per level and must refuse or hold them, never crash."""
LONG_STRING = 8 * 1024
"""Far beyond esp-mqtt's default 1 KiB receive buffer, so the node must reassemble or refuse it."""
UNKNOWN_PARAM = "NoSuchParam"
"""Garbage values go to a param the switch does not have (the parser still has to hold them): a
node that refuses them correctly is left as it was, with nothing odd persisted in its NVS."""


@dataclass(frozen=True)
class Malformed:
    """One malformed ``params/remote`` payload and the name a failure reports it by."""

    label: str
    payload: bytes


MALFORMED: tuple[Malformed, ...] = (
    Malformed("truncated JSON", b'{"Switch": {"Power": tr'),
    Malformed("not UTF-8", b'{"Switch": {"' + UNKNOWN_PARAM.encode() + b'": "\xff\xfe\xc3\x28"}}'),
    Malformed("not JSON", b"<Switch Power='true'/>"),
    Malformed("a JSON array", b'["Switch", "Power", true]'),
    Malformed("a bare JSON null", b"null"),
    Malformed("an empty payload", b""),
    Malformed("a string for the boolean Switch.Power", b'{"Switch": {"Power": "on"}}'),
    Malformed("a device that is not an object", b'{"Switch": 1}'),
    Malformed("an unknown device", b'{"NoSuchDevice": {"Power": true}}'),
    Malformed("an unknown param", b'{"Switch": {"' + UNKNOWN_PARAM.encode() + b'": 1}}'),
    Malformed(f"nesting {NESTING} levels deep", b'{"Switch": {"Power": ' + b"[" * (NESTING - 2) + b"]" * (NESTING - 2) + b"}}"),
    Malformed(f"a string of {LONG_STRING} characters", b'{"Switch": {"' + UNKNOWN_PARAM.encode() + b'": "' + b"A" * LONG_STRING + b'"}}'),
    Malformed("a number beyond double range", b'{"Switch": {"Power": 1e400}}'),
    Malformed("a 400-digit integer", b'{"Switch": {"Power": 1' + b"0" * 399 + b"}}"),
    Malformed("a NaN literal", b'{"Switch": {"Power": NaN}}'),
    Malformed("NUL bytes", b'{"Switch":\x00{"' + UNKNOWN_PARAM.encode() + b'": "\x00\x00"}}'),
)
"""What a buggy or hostile cloud could send. None of them writes a valid ``Switch.Power``, so the
echo the test waits for can only come from the valid write that follows."""


@dataclass
class Outcome:
    """One case as the evidence records it: ``survived`` (the node applied the valid write after
    it), ``crashed``, ``valid write not applied``, or ``not sent`` (the test ended before it)."""

    label: str
    sha256: str
    size: int
    outcome: str = "not sent"


def echo(value: bool) -> str:
    """The switch example's write callback line for a ``Power`` write (``app_main.c``)."""
    return f"Received value = {'true' if value else 'false'} for {SWITCH} - {POWER}"


def valid_write(node: ProvisionedNode, value: bool) -> None:
    """``PUT v1/user/nodes/params`` as the phone app sends it; the cloud failing is the lab's problem."""
    try:
        results = node.user.set_params(node.node_id, {SWITCH: {POWER: value}})
    except RainMakerApiError as exc:
        pytest.fail(f"INCONCLUSIVE: the cloud refused a valid write {SWITCH}.{POWER} = {value}: {exc}", pytrace=False)
    refused = [r for r in results if r.get("node_id") == node.node_id and r.get("status") != "success"]
    if refused:
        pytest.fail(f"INCONCLUSIVE: the cloud did not forward a valid write to node {node.node_id}: {refused[0]}", pytrace=False)


Answer = Literal["applied", "crashed", "silent"]


def node_answer(dut: Any, value: bool) -> tuple[Answer, str]:
    """How the node answered a valid write of *value*: ``("applied", echo)``, ``("crashed", the
    crash line it printed first)``, or ``("silent", "")`` when it did neither within the timeout.

    One pattern for both rather than ``expect(echo, not_matching=[...])``: a node that rebooted
    never echoes the write at all (its clean MQTT session is gone, and the broker drops the message
    with it), and the earliest match in the console wins, so a panic before the echo is what is found."""
    wanted = re.compile(f"(?P<echo>{re.escape(echo(value))})|(?P<crash>{CRASH})".encode())
    try:
        match = dut.expect(wanted, timeout=ECHO_TIMEOUT_S)
    except pexpect.TIMEOUT:
        return "silent", ""
    crash = match.group("crash")
    if crash is not None:
        return "crashed", crash.decode("utf-8", "replace")
    return "applied", match.group("echo").decode()


@pytest.mark.etsi("5.13-1", "5.9-1")
def test_malformed_params_do_not_crash_the_node(provisioned_node: ProvisionedNode, dut: Any, cloud: Cloud, evidence: Evidence) -> None:
    node = provisioned_node
    current = node.user.params(node.node_id).get(SWITCH, {}).get(POWER)
    value = not current if isinstance(current, bool) else True
    # The positive control: the node applies a valid write, and prints the echo this suite waits for.
    valid_write(node, value)
    answer, line = node_answer(dut, value)
    if answer != "applied":
        seen = f"printed {line!r}" if line else f"did not print '{echo(value)}' within {ECHO_TIMEOUT_S:.0f} s"
        pytest.fail(f"INCONCLUSIVE: before any malformed input, node {node.node_id} {seen} on a valid cloud write; "
                    "without that echo this suite cannot judge it", pytrace=False)  # fmt: skip

    outcomes = [Outcome(m.label, hashlib.sha256(m.payload).hexdigest(), len(m.payload)) for m in MALFORMED]
    try:
        for case, outcome in zip(MALFORMED, outcomes, strict=True):
            cloud.send_raw_to_node(node.node_id, PARAMS_REMOTE, case.payload)
            value = not value
            valid_write(node, value)
            answer, line = node_answer(dut, value)
            outcome.outcome = {"applied": "survived", "crashed": "crashed", "silent": "valid write not applied"}[answer]
            if answer == "crashed":
                pytest.fail(
                    f"the node crashed on malformed params/remote input ({case.label}): the console showed {line!r} instead "
                    f"of applying the valid write that followed (payload SHA-256 {outcome.sha256}); it must drop input it "
                    "cannot parse and go on (EN 303 645 5.13-1, 5.9-1)"
                )
            if answer == "silent":
                pytest.fail(
                    f"the node stopped applying cloud writes after malformed params/remote input ({case.label}): no "
                    f"'{echo(value)}' within {ECHO_TIMEOUT_S:.0f} s of the valid write that followed it (EN 303 645 5.9-1)"
                )
    finally:
        evidence.attach_json("malformed-params.json", {"node_id": node.node_id, "topic": f"node/{node.node_id}/{PARAMS_REMOTE}",
                                                       "cases": [asdict(o) for o in outcomes]})  # fmt: skip

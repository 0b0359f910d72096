"""suites/test_user_mapping.py catches a cloud that maps or shares a node it should not.

The suite's checks judge the cloud's half of RainMaker's user⇄node binding: a mapping needs
the node's own secret within the one-minute window, and control needs a mapping or an
accepted share. The node's part is to pass on the secret it got inside the provisioning
session and to apply the writes the cloud forwards; no node flaw can make the cloud accept
a wrong secret or an unshared user (a node that sent a wrong secret would fail closed: its
user's mapping never confirms). So the negatives here are flawed *clouds*: the rig's local
stack, started in this process with one store rule broken (:data:`CLOUD_FLAWS`), published
for the suite's own process as `rig up` publishes a running stack (``.rig/up.json``), so the
suite's ``cloud`` fixture uses it through the same REST API and broker as any other cloud.
The clean stack goes through the same door and must pass every test.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import rig.cloud.store as cloud_store
from rig.cloud.stack import LocalStack
from rig.cloud.store import MAPPING_WINDOW_S, CloudStore, MappingRequest, MappingStatus, Role, SharingRequest
from rig.firmware.virtual_set import build_virtual_set, ensure_signing_key
from rig.lab import load_lab
from rig.lab_services import LabServicesState, state_path
from tests.suite_runs import failure_excerpt, failure_report, run_suites, suite_tests, virtual_lab

SUITE = "suites/test_user_mapping.py"
BOARD = "um-vb"


def _ignore_secret(mp: pytest.MonkeyPatch) -> None:
    mp.setattr(cloud_store, "_same_secret", lambda a, b: a is not None and b is not None)


def _confirm_without_node(mp: pytest.MonkeyPatch) -> None:
    original = CloudStore.mapping_user_half

    def forged(self: CloudStore, node_id: str, user_id: str, secret: str, now: float, window: float = MAPPING_WINDOW_S) -> MappingRequest:
        request = original(self, node_id, user_id, secret, now, window)
        if request.status is not MappingStatus.REQUESTED:
            return request
        self.mapping_node_half(node_id, user_id, secret, False, now, window)  # the cloud answers for the node
        return self.mapping_request(request.request_id, user_id, now, window) or request

    mp.setattr(CloudStore, "mapping_user_half", forged)


def _anyone_controls(mp: pytest.MonkeyPatch) -> None:
    original = CloudStore.role_of

    def anyone(self: CloudStore, user_id: str, node_id: str) -> Role | None:
        return original(self, user_id, node_id) or (Role.SECONDARY if self.get_node(node_id) is not None else None)

    mp.setattr(CloudStore, "role_of", anyone)


def _share_before_accept(mp: pytest.MonkeyPatch) -> None:
    original = CloudStore.create_sharing_request

    def granting(self: CloudStore, primary_user_id: str, node_ids: list[str], user_email: str, now: float) -> SharingRequest:
        request = original(self, primary_user_id, node_ids, user_email, now)
        for node_id in request.node_ids:
            self.map_node(node_id, request.user_id, Role.SECONDARY, now)
        return request

    mp.setattr(CloudStore, "create_sharing_request", granting)


@dataclass(frozen=True)
class CloudFlaw:
    name: str
    bug_class: str
    test: str
    """The suite test that must FAIL against a cloud with this flaw."""
    message: str
    """A fragment of that test's failure message: it failed on the right check, not on the way there."""
    inject: Callable[[pytest.MonkeyPatch], None]


CLOUD_FLAWS = (
    CloudFlaw("mapping_ignores_secret", "improper authentication: the mapping secret is not compared",
              "test_wrong_secret_never_confirms", "secret_key differs from the one the node was given", _ignore_secret),
    CloudFlaw("mapping_without_node", "authentication bypass: the user's half alone maps the node",
              "test_mapping_without_the_node_times_out", "the node never sent its half of", _confirm_without_node),
    CloudFlaw("control_without_mapping", "missing authorisation (IDOR): any user reaches any node",
              "test_only_the_mapped_user_and_accepted_shares_control_the_node", "neither mapped to nor shared", _anyone_controls),
    CloudFlaw("share_before_accept", "authorisation granted early: a sharing offer maps the other user at once",
              "test_only_the_mapped_user_and_accepted_shares_control_the_node", "only offered, not accepted", _share_before_accept),
)  # fmt: skip
CLEAN = "clean"


@dataclass
class MappingLab:
    root: Path
    boards_file: Path


@pytest.fixture(scope="module")
def mapping_lab(tmp_path_factory: pytest.TempPathFactory) -> MappingLab:
    root = tmp_path_factory.mktemp("mappingsuite")
    key = ensure_signing_key(root / "key.pem")
    build_virtual_set(root / "set", key)
    return MappingLab(root, virtual_lab(root / "boards.yaml", "flawed-cloud-mapping", {BOARD: root / "set"}))


def run_against_cloud(lab: MappingLab, case: str, tests: list[str], inject: Callable[[pytest.MonkeyPatch], None] | None) -> str:
    """Start the local stack in test mode (with *inject*'s flaw), publish it as the lab's running
    stack, run *tests* of the suite on the board in their own pytest process; the output."""
    loaded = load_lab(lab.boards_file)
    with pytest.MonkeyPatch.context() as mp:
        if inject is not None:
            inject(mp)
        stack = LocalStack(loaded.state_dir / "cloud", test_mode=True)
        endpoints = stack.start()
        published = state_path(loaded)
        try:
            published.write_text(LabServicesState(os.getpid(), loaded.lab, time.time(), endpoints).to_json())
            res = run_suites([f"{SUITE}::{t}[{BOARD}]" for t in tests], lab.boards_file, lab.root / f"run-{case}", "--tb=short")
        finally:
            published.unlink(missing_ok=True)
            stack.stop()
    return res.stdout + res.stderr


@pytest.fixture(scope="module")
def suite_runs(mapping_lab: MappingLab) -> dict[str, str]:
    """One run per cloud, one after another (a flaw is a patch of this process, so one stack at a time)."""
    runs = {CLEAN: run_against_cloud(mapping_lab, CLEAN, suite_tests(SUITE), None)}
    for flaw in CLOUD_FLAWS:
        runs[flaw.name] = run_against_cloud(mapping_lab, flaw.name, [flaw.test], flaw.inject)
    return runs


def test_clean_cloud_passes_every_mapping_test(suite_runs: dict[str, str]) -> None:
    out = suite_runs[CLEAN]
    for name in suite_tests(SUITE):
        assert f"PASSED {SUITE}::{name}[{BOARD}]" in out, failure_excerpt(out)


@pytest.mark.parametrize("flaw", CLOUD_FLAWS, ids=[f.name for f in CLOUD_FLAWS])
def test_cloud_flaw_fails_its_check(suite_runs: dict[str, str], flaw: CloudFlaw) -> None:
    out = suite_runs[flaw.name]
    assert f"FAILED {SUITE}::{flaw.test}[{BOARD}]" in out, f"{flaw.name}: the suite did not fail\n{failure_excerpt(out)}"
    raised = failure_report(out, f"{flaw.test}[{BOARD}]")  # an INCONCLUSIVE (lab fault) raises no E line
    assert flaw.message in raised, f"{flaw.name}: the test failed, but not on its check ({flaw.message!r})\n{failure_excerpt(out)}"

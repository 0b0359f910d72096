"""Property-based checks of the cloud API against its own OpenAPI spec (schemathesis, in process over ASGI).

Two properties, each over every operation, positive and negative (schema-violating) data:

* with a valid access token, no request gets a 5xx, and what comes back matches the
  documented status codes, content types and response schemas;
* without one (no header, a garbage one, an expired one), no protected operation
  succeeds: each answers 401 (or 413/400 for a body the server refuses before it
  even looks at who is asking).

Examples are bounded (``max_examples``; the unauthenticated run skips the coverage phase)
so the module finishes well under a minute.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from rig.cloud.api import create_app
from rig.cloud.auth import ACCESS_TOKEN_TTL_S, TokenAuthority
from rig.cloud.clock import ManualClock
from rig.cloud.store import CloudStore, Role

NODE = "N7FXSyMjeYFhWcRyDig7t3"
PASSWORD = "correct horse battery staple"


class _Channel:
    def publish_to_node(self, node_id: str, suffix: str, payload: dict[str, object]) -> None:
        return None

    def publish_raw_to_node(self, node_id: str, suffix: str, payload: bytes) -> None:
        return None


class _Published:
    url, file_size, sha256 = "https://127.0.0.1:1/ota/x.bin", 1, "00" * 32


class _Ota:
    def publish(self, job_id: str, node_id: str, image: bytes) -> _Published:
        return _Published()


# The app must exist when pytest collects the module: schemathesis parametrizes from its spec.
CLOCK = ManualClock()
STORE = CloudStore.in_memory()
ALICE = STORE.add_user("alice@example.com", PASSWORD, CLOCK.now())
STORE.add_user("bob@example.com", PASSWORD, CLOCK.now())
STORE.map_node(NODE, ALICE.user_id, Role.PRIMARY, CLOCK.now())
APP = create_app(STORE, CLOCK, _Channel(), _Ota(), test_mode=False)
TOKENS = TokenAuthority(STORE, CLOCK).login(ALICE.email, PASSWORD)
EXPIRED = TokenAuthority(STORE, ManualClock(offset=-2 * ACCESS_TOKEN_TTL_S)).login(ALICE.email, PASSWORD).accesstoken

schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
"""All phases: explicit examples, coverage (every boundary and negative case the spec implies), fuzzing."""
auth_schema = schemathesis.openapi.from_asgi(
    "/openapi.json", APP, config=schemathesis.Config.from_dict({"phases": {"coverage": {"enabled": False}}})
)
"""Without the coverage phase: whether a token is checked does not depend on boundary values."""


def bounded(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck)
    )


REFUSED_BEFORE_AUTH = {400, 405, 413}


def _is_protected(case: schemathesis.Case) -> bool:
    return bool(case.operation.definition.raw.get("security"))


@schema.parametrize()
@bounded(10)
def test_no_server_errors_and_responses_match_the_spec(case: schemathesis.Case) -> None:
    case.call_and_validate(
        headers={"Authorization": TOKENS.accesstoken},
        checks=[not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance],
    )


@auth_schema.parametrize()
@bounded(5)
def test_no_unauthenticated_success(case: schemathesis.Case) -> None:
    if not _is_protected(case):
        return
    for token in (None, "not-a-jwt", EXPIRED, TOKENS.idtoken, TOKENS.refreshtoken):
        headers = dict(case.headers or {})
        headers.pop("Authorization", None)
        if token is not None:
            headers["Authorization"] = token
        case.headers = headers
        response = case.call()
        assert response.status_code < 500, f"{case.operation.label}: {response.status_code} {response.text}"
        # 401; or refused before the token is even looked at: a body FastAPI cannot parse
        # (400, it reads the body before running dependencies), too large (413), or a
        # method the path does not have (405).
        assert response.status_code in REFUSED_BEFORE_AUTH or response.status_code == 401, (
            f"{case.operation.label} {case.method} with Authorization={token and token[:12]!r}… "
            f"answered {response.status_code}: {response.text}"
        )


def test_every_user_operation_is_protected_in_the_spec() -> None:
    """The unauthenticated run above only means something if the spec marks the operations protected."""
    operations = [op.ok() for op in auth_schema.get_all_operations()]
    protected = {op.label for op in operations if op.definition.raw.get("security")}
    public = {op.label for op in operations} - protected
    assert public == {"GET /apiversions", "GET /mqtt_host", "POST /v1/login2"}
    assert len(protected) >= 18 and all(" /v1/user/" in label for label in protected)

"""The phone app's side of the RainMaker REST API: log in, map a node, read and set params.

What the official clients send (rainmaker-protocol.md §3, esp-rainmaker-cli
``rmaker_lib/session.py``, ``node.py``): ``Authorization: <access token>`` with no
"Bearer"; the user id is the id token's ``custom:user_id`` claim; mapping is
``PUT v1/user/nodes/mapping`` then polling ``GET …mapping?request_id=`` until the
request is ``confirmed`` (or ``timedout``/``discarded``). Suites use this class as the
user's phone would, against the local stack or a real private RainMaker deployment.
"""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from rig.evidence.redaction import SECRETS
from rig.prov.polling import poll_until

CLOUD_POLL_S = 1.0
"""How often the rig polls the REST API. The CLI polls every 5 s; the rig polls faster to keep suites short (the cloud is local)."""
FINAL_MAPPING_STATES = ("confirmed", "timedout", "discarded")


class RainMakerApiError(RuntimeError):
    """A REST call failed; the message names the call, the status and the cloud's description."""


def jwt_claims(token: str) -> dict[str, Any]:
    """The payload of a JWT (not verified: the client only reads its own token's claims)."""
    try:
        payload = token.split(".")[1]
        return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError) as exc:
        raise RainMakerApiError(f"the cloud returned a token that is not a JWT ({exc})") from exc


@dataclass
class MappingRequest:
    request_id: str
    secret_key: str


@dataclass(frozen=True)
class SharingRequest:
    """One entry of ``GET v1/user/nodes/sharing/requests`` (rainmaker-protocol.md §3.4)."""

    request_id: str
    status: str
    """``pending`` | ``accepted`` | ``declined`` | ``cancelled`` | ``timedout``."""
    node_ids: tuple[str, ...]
    user_name: str
    """The email of the user the nodes are offered to."""
    primary_user_name: str
    """The email of the primary user who offers them."""


class RainMakerUser:
    """One logged-in user of the cloud, over an ``httpx.Client`` whose base URL is the API root."""

    def __init__(self, http: httpx.Client, email: str, password: str):
        self.http = http
        self.email = email
        SECRETS.add(password)
        body = self._call("POST", "/v1/login2", json={"user_name": email, "password": password}, auth=False)
        self.access_token: str = body["accesstoken"]
        self.id_token: str = body["idtoken"]
        SECRETS.add(self.access_token)
        SECRETS.add(body.get("refreshtoken", ""))
        self.user_id: str = jwt_claims(self.id_token)["custom:user_id"]

    def _call(self, method: str, path: str, *, auth: bool = True, **kwargs: Any) -> Any:
        headers = {"Authorization": self.access_token} if auth else {}
        try:
            r = self.http.request(method, path, headers=headers, **kwargs)
        except httpx.HTTPError as exc:
            raise RainMakerApiError(f"{method} {path}: {exc}. Fix: is the cloud stack running (`rig status`)?") from exc
        try:
            body = r.json()
        except ValueError:
            body = {"description": r.text[:200]}
        if r.status_code >= 400:
            description = body.get("description", body) if isinstance(body, dict) else body
            raise RainMakerApiError(f"{method} {path} → HTTP {r.status_code}: {description}")
        return body

    # ------------------------------------------------------------------ mapping

    def request_mapping(self, node_id: str, secret_key: str | None = None) -> MappingRequest:
        """``PUT v1/user/nodes/mapping`` (operation add), as the app does after Wi-Fi provisioning."""
        secret = secret_key or str(uuid.uuid4())
        body = self._call("PUT", "/v1/user/nodes/mapping", json={"node_id": node_id, "secret_key": secret, "operation": "add"})
        return MappingRequest(body["request_id"], secret)

    def mapping_status(self, request_id: str) -> str:
        return str(self._call("GET", "/v1/user/nodes/mapping", params={"request_id": request_id})["request_status"])

    def wait_mapping(self, request_id: str, timeout: float = 60.0) -> str:
        """Poll the request until it is final; returns the final state (or the last seen one at *timeout*)."""
        return poll_until(lambda: self.mapping_status(request_id), lambda s: s in FINAL_MAPPING_STATES, timeout, CLOUD_POLL_S)

    def wait_any_mapping(self, request_ids: list[str], timeout: float = 60.0) -> dict[str, str]:
        """Poll several requests of this user until one of them is final (or *timeout* passes);
        returns every request's last seen state. A suite racing a wrong secret against the right
        one learns at once which of them the cloud confirmed, instead of waiting out the window."""
        return poll_until(lambda: {rid: self.mapping_status(rid) for rid in request_ids},
                          lambda states: any(s in FINAL_MAPPING_STATES for s in states.values()), timeout, CLOUD_POLL_S)  # fmt: skip

    # ------------------------------------------------------------------ nodes

    def nodes(self) -> list[str]:
        return list(self._call("GET", "/v1/user/nodes").get("nodes", []))

    def node_config(self, node_id: str) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/user/nodes/config", params={"node_id": node_id}))

    def params(self, node_id: str) -> dict[str, Any]:
        return dict(self._call("GET", "/v1/user/nodes/params", params={"node_id": node_id}))

    def set_params(self, node_id: str, payload: dict[str, Any]) -> list[dict[str, Any]]:
        """The multi-node form the CLI and app send; returns the per-node results."""
        return list(self._call("PUT", "/v1/user/nodes/params", json=[{"node_id": node_id, "payload": payload}]))

    def wait_param(self, node_id: str, device: str, param: str, value: Any, timeout: float = 30.0) -> Any:
        """Poll the node's reported params until ``device.param`` equals *value*; returns the last
        value seen (``None`` if never reported). The cloud learns a value only when the node
        reports it on ``params/local``, so this is the cloud's view of what the node applied."""
        return poll_until(lambda: self.params(node_id).get(device, {}).get(param), lambda seen: seen == value, timeout, CLOUD_POLL_S)

    # ------------------------------------------------------------------ sharing (rainmaker-protocol.md §3.4)

    def share_nodes(self, node_ids: list[str], user_name: str) -> str:
        """``PUT v1/user/nodes/sharing`` ``{"nodes", "user_name"}`` (esp-rainmaker-cli ``rmaker_lib/node.py``):
        offer the nodes to another user (by email) as secondary; nothing is shared until that user
        accepts. Returns the sharing request id."""
        body = self._call("PUT", "/v1/user/nodes/sharing", json={"nodes": list(node_ids), "user_name": user_name})
        return str(body["request_id"])

    def sharing_requests(self, *, sent: bool = False) -> list[SharingRequest]:
        """``GET v1/user/nodes/sharing/requests?primary_user=`` — the requests this user received,
        or with *sent* the ones it made."""
        body = self._call("GET", "/v1/user/nodes/sharing/requests", params={"primary_user": "true" if sent else "false"})
        return [
            SharingRequest(
                request_id=str(r["request_id"]),
                status=str(r["request_status"]),
                node_ids=tuple(r.get("node_ids", ())),
                user_name=str(r.get("user_name", "")),
                primary_user_name=str(r.get("primary_user_name", "")),
            )
            for r in body.get("sharing_requests", [])
        ]

    def answer_sharing_request(self, request_id: str, *, accept: bool) -> None:
        """``PUT v1/user/nodes/sharing/requests`` ``{"accept", "request_id"}`` by the user the nodes were offered to."""
        self._call("PUT", "/v1/user/nodes/sharing/requests", json={"accept": accept, "request_id": request_id})

    def node_sharing(self, node_id: str) -> tuple[list[str], list[str]]:
        """``GET v1/user/nodes/sharing?node_id=``: the node's (primary, secondary) users by email."""
        body = self._call("GET", "/v1/user/nodes/sharing", params={"node_id": node_id})
        entry = next((e for e in body.get("node_sharing", []) if e.get("node_id") == node_id), {"users": {}})
        users = entry.get("users", {})
        return list(users.get("primary", [])), list(users.get("secondary", []))

    # ------------------------------------------------------------------ OTA (rainmaker-protocol.md §1.5, §3)

    def upload_ota_image(self, name: str, image: bytes) -> dict[str, Any]:
        """``POST v1/user/otaimage`` ``{"image_name", "base64_fwimage"}`` (esp-rainmaker-cli
        ``rmaker_lib/service.py``); returns the cloud's record (``ota_image_id``, ``fw_version``,
        ``file_sha256`` …)."""
        return dict(self._call("POST", "/v1/user/otaimage",
                               json={"image_name": name, "base64_fwimage": base64.b64encode(image).decode()}))  # fmt: skip

    def create_ota_job(self, image_id: str, node_id: str, name: str | None = None) -> str:
        """``POST v1/user/otajob`` for one node (the cloud signs, publishes and sends ``otaurl``
        at once); returns the job id."""
        body = {"ota_image_id": image_id, "node_id": node_id, "ota_job_name": name or f"rig-{uuid.uuid4().hex[:8]}"}
        return str(self._call("POST", "/v1/user/otajob", json=body)["ota_job_id"])

    def ota_status(self, node_id: str, job_id: str) -> dict[str, Any]:
        """``GET v1/user/nodes/ota_status``: the job's status for the node, ``additional_info`` and
        the history of every ``otastatus`` the node reported."""
        return dict(self._call("GET", "/v1/user/nodes/ota_status", params={"node_id": node_id, "ota_job_id": job_id}))

    def wait_ota_status(self, node_id: str, job_id: str, done: Callable[[dict[str, Any]], bool],
                        timeout: float) -> dict[str, Any]:  # fmt: skip
        """Poll :meth:`ota_status` until *done* accepts it; returns the last status seen either way."""
        return poll_until(lambda: self.ota_status(node_id, job_id), done, timeout, CLOUD_POLL_S)

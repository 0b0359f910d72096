"""The REST API of the local cloud: the RainMaker v1 paths and JSON shapes clients use.

Paths, query keys and bodies follow what esp-rainmaker-cli and esp-rainmaker-android send
(fact sheet §3): ``POST v1/login2`` (password login and ``{"refreshtoken"}`` refresh,
``rmaker_lib/user.py``, ``configmanager.py``), a raw JWT in ``Authorization`` with no
``Bearer`` (``rmaker_lib/session.py``), ``GET apiversions`` / ``GET mqtt_host`` outside
``v1``, nodes/config/status/params taking ``nodeid`` (CLI) or ``node_id`` (Android),
user⇄node mapping with its one-minute window, sharing requests, and OTA.

Errors are RainMaker's ``{"status": "failure", "description", "error_code"}`` (Android
``ApiManager.processError``) with a 4xx status for anything a client got wrong —
malformed JSON, missing fields, oversized bodies (:class:`BodyLimitMiddleware`), unknown
paths. The ``error_code`` numbers are this stand-in's own (:class:`ErrorCode`); RainMaker's
are not public.

Every node-scoped call checks that the token's user is mapped to the node (primary) or
has accepted a share of it (secondary); an unknown node and somebody else's node give the
same answer, so the API is no oracle for node ids.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import math
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from rig.cloud.auth import AccessClaims, InvalidCredentials, TokenAuthority, TokenError
from rig.cloud.clock import Clock, ManualClock
from rig.cloud.ota_delivery import DeliveryControl, DeliveryPlan, HostLabel, Transport
from rig.cloud.ota_host import OtaFault
from rig.cloud.service import NodeChannel, NodeUnreachable, OtaImagePublisher, dispatch_ota
from rig.cloud.store import (
    CloudStore,
    Conflict,
    Forbidden,
    InvalidRequest,
    MappingStatus,
    Node,
    NotFound,
    OtaNodeStatus,
    Role,
    SharingStatus,
    StoreError,
    UserNode,
)
from rig.firmware.app_desc import APP_DESC_OFFSET, AppDescriptor
from rig.firmware.errors import FirmwareFormatError

log = logging.getLogger("rig.cloud.api")

API_VERSION = "v1"
MAX_BODY_BYTES = 64 * 1024
MAX_IMAGE_BODY_BYTES = 8 * 1024 * 1024
"""An ESP32-C3 app partition is at most a few MB; base64 adds a third."""
OTA_IMAGE_PATH = "/v1/user/otaimage"
MAX_NODES_PER_CALL = 100
"""RainMaker's limit for node lists in one call (admin OTA jobs: ≤ 100 nodes)."""

NODE_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
"""The lab PKI's node-id rule (``rig.cloud.pki.NODE_ID_RE``; written for pydantic's Rust regex engine,
where ``$`` is the very end): node ids go into MQTT topics, so no ``/``, ``+``, ``#`` or NUL gets through."""

NodeId = Annotated[str, Field(pattern=NODE_ID_PATTERN)]


class ErrorCode(IntEnum):
    """``error_code`` values of this stand-in (not RainMaker's, which are not published)."""

    BAD_REQUEST = 100001
    BODY_TOO_LARGE = 100002
    UNAUTHENTICATED = 100003
    LOGIN_FAILED = 100004
    NODE_ACCESS_DENIED = 100005
    NOT_FOUND = 100006
    CONFLICT = 100007
    FORBIDDEN = 100008
    METHOD_NOT_ALLOWED = 100009
    SERVICE_UNAVAILABLE = 100010
    INTERNAL = 100099


class ApiError(Exception):
    def __init__(self, status_code: int, description: str, error_code: ErrorCode):
        super().__init__(description)
        self.status_code = status_code
        self.description = description
        self.error_code = error_code


def failure(status_code: int, description: str, error_code: ErrorCode) -> JSONResponse:
    return JSONResponse(status_code=status_code, content={"status": "failure", "description": description, "error_code": int(error_code)})


# --------------------------------------------------------------------------- models


class _Body(BaseModel):
    """Request bodies: unknown keys are ignored, as RainMaker's clients send extras."""

    model_config = ConfigDict(extra="ignore")


def _check_finite(value: Any, where: str = "payload") -> Any:
    """JSON has no NaN/Infinity; Python's parser accepts them, so refuse them here."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} contains a non-finite number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite(item, f"{where}.{key}")
    elif isinstance(value, list):
        for item in value:
            _check_finite(item, where)
    return value


class Failure(BaseModel):
    status: Literal["failure"] = "failure"
    description: str
    error_code: int


class Success(BaseModel):
    status: Literal["success"] = "success"
    description: str = ""


class PasswordLogin(_Body):
    user_name: str = Field(min_length=1, max_length=256)
    password: str = Field(min_length=1, max_length=1024)


class RefreshLogin(_Body):
    refreshtoken: str = Field(min_length=1, max_length=4096)


class LoginResponse(BaseModel):
    status: Literal["success"] = "success"
    description: str = "Login successful"
    idtoken: str
    accesstoken: str
    refreshtoken: str | None = None


class ApiVersions(BaseModel):
    supported_versions: list[str]


class MqttHost(BaseModel):
    mqtt_host: str
    mqtt_cred_host: str
    mqtt_port: int | None = None


class Connectivity(BaseModel):
    connected: bool
    timestamp: int = Field(description="milliseconds since the epoch of the last change")


class NodeStatus(BaseModel):
    connectivity: Connectivity


class NodeDetail(BaseModel):
    id: str
    config: dict[str, Any] | None = Field(default=None, description="absent until the node has published its config")
    status: NodeStatus
    params: dict[str, Any]
    role: Role
    primary: bool
    is_matter: bool = False
    mapping_timestamp: int
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    node_type: str = ""


class NodeList(BaseModel):
    nodes: list[str] | None = None
    node_details: list[NodeDetail] | None = None
    next_id: str | None = None
    total: int


class NodeParamsUpdate(_Body):
    node_id: NodeId
    payload: dict[str, dict[str, Any]]

    @field_validator("payload")
    @classmethod
    def _finite(cls, v: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        return _check_finite(v)


class NodeResult(BaseModel):
    node_id: str
    status: Literal["success", "failure"]
    description: str


class MappingBody(_Body):
    node_id: NodeId
    secret_key: str = Field(default="", max_length=256)
    operation: Literal["add", "remove"]
    user_id: str | None = Field(default=None, description="ignored: the user is the token's (RainMaker takes it from the session)")
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None


class MappingResponse(BaseModel):
    status: Literal["success"] = "success"
    description: str
    request_id: str


class MappingStatusResponse(BaseModel):
    request_id: str
    request_status: MappingStatus
    node_id: str
    request_timestamp: int


class ShareBody(_Body):
    nodes: list[NodeId] = Field(min_length=1, max_length=MAX_NODES_PER_CALL)
    user_name: str = Field(min_length=1, max_length=256)
    primary: bool = False
    transfer: bool = False


class ShareResponse(BaseModel):
    status: Literal["success"] = "success"
    description: str
    request_id: str


class SharingUsers(BaseModel):
    primary: list[str]
    secondary: list[str]


class NodeSharingEntry(BaseModel):
    node_id: str
    users: SharingUsers


class NodeSharingList(BaseModel):
    node_sharing: list[NodeSharingEntry]


class SharingRequestView(BaseModel):
    request_id: str
    request_status: SharingStatus
    request_timestamp: int
    node_ids: list[str]
    user_name: str
    primary_user_name: str


class SharingRequestList(BaseModel):
    sharing_requests: list[SharingRequestView]


class SharingAnswer(_Body):
    accept: bool
    request_id: str = Field(min_length=1, max_length=64)


class OtaImageUpload(_Body):
    image_name: str = Field(min_length=1, max_length=128)
    base64_fwimage: str = Field(min_length=1)
    fw_version: str | None = Field(default=None, max_length=32, description="overrides the version read from the image's esp_app_desc_t")


class OtaImageResponse(BaseModel):
    status: Literal["success"] = "success"
    description: str = "OTA image uploaded"
    ota_image_id: str
    image_name: str
    fw_version: str
    project_name: str | None
    secure_version: int | None
    file_size: int
    file_sha256: str


class OtaJobBody(_Body):
    ota_image_id: str = Field(min_length=1, max_length=64)
    nodes: list[NodeId] | None = Field(default=None, min_length=1, max_length=MAX_NODES_PER_CALL)
    node_id: NodeId | None = None
    ota_job_name: str = Field(default="", max_length=128)

    @model_validator(mode="after")
    def _one_target(self) -> OtaJobBody:
        if (self.nodes is None) == (self.node_id is None):
            raise ValueError("give exactly one of nodes (a list of node ids) or node_id")
        return self

    @property
    def node_ids(self) -> list[str]:
        return list(self.nodes) if self.nodes is not None else [str(self.node_id)]


class OtaJobNodeView(BaseModel):
    node_id: str
    status: OtaNodeStatus
    additional_info: str
    timestamp: int


class OtaJobResponse(BaseModel):
    status: Literal["success"] = "success"
    description: str = "OTA job created"
    ota_job_id: str
    ota_image_id: str
    nodes: list[OtaJobNodeView]


class OtaUpdateInfo(BaseModel):
    ota_available: bool
    status: str
    ota_job_id: str | None = None
    description: str
    fw_version: str | None = None
    file_size: int | None = None


class OtaUpdateBody(_Body):
    node_id: NodeId
    ota_job_id: str = Field(min_length=1, max_length=64)


class OtaStatusReportView(BaseModel):
    status: str
    additional_info: str
    timestamp: int


class OtaStatusResponse(BaseModel):
    node_id: str
    ota_job_id: str
    status: OtaNodeStatus
    additional_info: str
    timestamp: int
    history: list[OtaStatusReportView]


class ClockAdvance(_Body):
    seconds: float = Field(ge=0, le=10 * 365 * 24 * 3600)


class ClockNow(BaseModel):
    now: float


class OtaDeliveryPlanBody(BaseModel):
    """A one-shot OTA delivery plan for a node (test mode); see :mod:`rig.cloud.ota_delivery`."""

    model_config = ConfigDict(extra="forbid")

    node_id: NodeId
    sign: StrictBool = Field(default=True, description="false: serve the upload byte for byte, no HSM strip and re-sign")
    transport: Transport = Field(
        default="https", description="https: the lab OTA host; http: its plain-HTTP listener; unknown_ca: a host with a rogue-CA cert"
    )
    cut_after: StrictInt | None = Field(default=None, ge=0, description="serve body bytes below this file offset, then close")
    stall_after: StrictInt | None = Field(default=None, ge=0, description="serve body bytes below this file offset, then hold silently")

    @model_validator(mode="after")
    def _one_fault(self) -> OtaDeliveryPlanBody:
        if self.cut_after is not None and self.stall_after is not None:
            raise ValueError("give at most one of cut_after and stall_after")
        return self


class OtaDeliveryPlanView(BaseModel):
    node_id: str
    sign: bool
    transport: Transport
    cut_after: int | None
    stall_after: int | None
    replaced: bool = Field(description="an earlier plan armed for the node was replaced")


class OtaDeliveryDisarmed(BaseModel):
    node_id: str
    disarmed: bool = Field(description="false: no plan was armed for the node")


class OtaDeliveryRequestView(BaseModel):
    """One OTA host access-log record (the path's token redacted to a prefix): the fields
    of :class:`~rig.cloud.ota_host.AccessRecord` the API shows, read from it by attribute."""

    time: float
    client: str
    scheme: str
    tls_version: str | None
    method: str
    path: str
    status: int = Field(description="0: the TLS handshake failed")
    range: str | None
    bytes_sent: int
    complete: bool
    fault: OtaFault | None
    error: str | None


class OtaDeliveryView(BaseModel):
    node_id: str
    sha256: str
    file_size: int
    url_scheme: str
    host: HostLabel
    signed_by: str | None = Field(description="the HSM key label; null when served as uploaded")
    fault: OtaFault | None
    fault_at: int | None
    requests: list[OtaDeliveryRequestView]
    tls_failures: list[OtaDeliveryRequestView] = Field(
        description="failed TLS handshakes on the same listener from this publish until the next there (by order: no URL is known yet)"
    )


MAX_RAW_TO_NODE_BYTES = 32 * 1024
"""The largest payload ``POST /test/mqtt/to-node`` sends: room for any malformed-input case a
suite needs, and, grown by a third in base64, still inside the API's 64 KiB body limit."""

ToNodeSuffix = Literal["params/remote", "otaurl", "to-node"]
"""The cloud→node topics a RainMaker node subscribes to (rainmaker-protocol.md §1.2; esp-rainmaker
``src/core/esp_rmaker_mqtt_topics.h``): params writes, OTA URLs, command-response TLV8."""


class RawToNodeBody(BaseModel):
    """Bytes the cloud sends a node as they are (test mode): the stand-in for a buggy or
    compromised cloud, since RainMaker's own REST API only forwards JSON it validated."""

    model_config = ConfigDict(extra="forbid")

    node_id: NodeId
    suffix: ToNodeSuffix = Field(description="the topic is node/<node_id>/<suffix>")
    payload_base64: str = Field(
        description=f"the payload in standard base64 (RFC 4648 §4), at most {MAX_RAW_TO_NODE_BYTES} bytes decoded; may be empty"
    )


class RawToNodeSent(BaseModel):
    """What went to the broker: never the payload itself (it may be anything), only its size and digest."""

    node_id: str
    topic: str
    size: int = Field(description="payload bytes")
    sha256: str = Field(description="SHA-256 of the payload, lower-case hex")


# --------------------------------------------------------------------------- context and dependencies


@dataclass
class CloudContext:
    store: CloudStore
    clock: Clock
    tokens: TokenAuthority
    mqtt: NodeChannel | None
    ota: OtaImagePublisher | None
    mqtt_host: str
    mqtt_port: int | None
    delivery: DeliveryControl | None = None


def _ctx(request: Request) -> CloudContext:
    ctx: CloudContext = request.app.state.cloud
    return ctx


_authorization = APIKeyHeader(
    name="Authorization", auto_error=False, scheme_name="AccessToken", description="the raw access token (a JWT), no 'Bearer' prefix"
)


def _user(request: Request, token: Annotated[str | None, Security(_authorization)]) -> AccessClaims:
    if not token:
        raise ApiError(401, "missing Authorization header (the access token from POST /v1/login2)", ErrorCode.UNAUTHENTICATED)
    try:
        return _ctx(request).tokens.verify_access(token)
    except TokenError as exc:
        raise ApiError(401, f"unauthorized: {exc}", ErrorCode.UNAUTHENTICATED) from exc


Ctx = Annotated[CloudContext, Depends(_ctx)]
User = Annotated[AccessClaims, Depends(_user)]
NodeIdQuery = Annotated[str | None, Query(pattern=NODE_ID_PATTERN)]


def _one_node_id(nodeid: str | None, node_id: str | None) -> str:
    """``nodeid`` (esp-rainmaker-cli) or ``node_id`` (esp-rainmaker-android); both accepted."""
    chosen = node_id if node_id is not None else nodeid
    if chosen is None:
        raise ApiError(400, "node_id (or nodeid) query parameter is required", ErrorCode.BAD_REQUEST)
    if nodeid is not None and node_id is not None and nodeid != node_id:
        raise ApiError(400, "nodeid and node_id disagree", ErrorCode.BAD_REQUEST)
    return chosen


def _require_access(ctx: CloudContext, user: AccessClaims, node_id: str) -> Role:
    role = ctx.store.role_of(user.user_id, node_id)
    if role is None:
        raise ApiError(403, f"node {node_id} is not associated with this user", ErrorCode.NODE_ACCESS_DENIED)
    return role


def _require_node(ctx: CloudContext, user: AccessClaims, node_id: str) -> Node:
    _require_access(ctx, user, node_id)
    node = ctx.store.get_node(node_id)
    if node is None:  # a mapping exists only for a known node; be defensive anyway
        raise ApiError(403, f"node {node_id} is not associated with this user", ErrorCode.NODE_ACCESS_DENIED)
    return node


def _status_of(node: Node) -> NodeStatus:
    ts = int((node.connectivity_ts or 0) * 1000)
    return NodeStatus(connectivity=Connectivity(connected=node.connected, timestamp=ts))


def _detail(un: UserNode) -> NodeDetail:
    return NodeDetail(
        id=un.node.node_id,
        config=un.node.config,
        status=_status_of(un.node),
        params=un.node.params,
        role=un.role,
        primary=un.role is Role.PRIMARY,
        mapping_timestamp=int(un.mapped_at),
    )


# --------------------------------------------------------------------------- routes

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": Failure, "description": "malformed request"},
    401: {"model": Failure, "description": "missing, invalid or expired access token"},
    403: {"model": Failure, "description": "node not associated with the user, or not allowed"},
    404: {"model": Failure, "description": "not found"},
    409: {"model": Failure, "description": "the request conflicts with the current state (e.g. an answered sharing request)"},
    413: {"model": Failure, "description": "request body too large"},
    503: {"model": Failure, "description": "the node or the OTA host cannot be reached (cloud MQTT service or OTA host down)"},
}

public = APIRouter(responses={400: _ERRORS[400], 413: _ERRORS[413]})
v1 = APIRouter(prefix=f"/{API_VERSION}", responses=_ERRORS)
test_only = APIRouter(prefix="/test", tags=["test"], responses={400: _ERRORS[400], 403: _ERRORS[403], 413: _ERRORS[413]})


@public.get("/apiversions", response_model=ApiVersions, tags=["meta"])
def apiversions() -> ApiVersions:
    """The CLI checks for ``"v1"`` here before every token refresh (``rmaker_lib/configmanager.py``)."""
    return ApiVersions(supported_versions=[API_VERSION])


@public.get("/mqtt_host", response_model=MqttHost, tags=["meta"])
def mqtt_host(ctx: Ctx) -> MqttHost:
    """Where nodes connect (``rmaker_lib/configmanager.py``: ``mqtt_host``, ``mqtt_cred_host``)."""
    return MqttHost(mqtt_host=ctx.mqtt_host, mqtt_cred_host=ctx.mqtt_host, mqtt_port=ctx.mqtt_port)


@v1.post("/login2", response_model=LoginResponse, response_model_exclude_none=True, tags=["user"])
def login2(ctx: Ctx, body: Annotated[PasswordLogin | RefreshLogin, Body()]) -> LoginResponse:
    """``{"user_name", "password"}`` → ``idtoken``, ``accesstoken``, ``refreshtoken``;
    ``{"refreshtoken"}`` → new ``accesstoken`` and ``idtoken`` (``rmaker_lib/user.py``, ``configmanager.py``)."""
    try:
        if isinstance(body, PasswordLogin):
            tokens = ctx.tokens.login(body.user_name, body.password)
        else:
            tokens = ctx.tokens.refresh(body.refreshtoken)
    except InvalidCredentials as exc:
        raise ApiError(401, str(exc), ErrorCode.LOGIN_FAILED) from exc
    return LoginResponse(idtoken=tokens.idtoken, accesstoken=tokens.accesstoken, refreshtoken=tokens.refreshtoken)


@v1.get("/user/nodes", response_model=NodeList, response_model_exclude_none=True, tags=["nodes"])
def user_nodes(
    ctx: Ctx,
    user: User,
    node_details: bool = False,
    node_id: NodeIdQuery = None,
    start_id: Annotated[str | None, Query(max_length=128)] = None,
    num_records: Annotated[int, Query(ge=1, le=MAX_NODES_PER_CALL)] = 25,
) -> NodeList:
    """Node ids (``nodes``), or with ``node_details=true`` the ``node_details`` list; paged by ``start_id``/``next_id``."""
    if node_id is not None:
        _require_access(ctx, user, node_id)
        page = [un for un in ctx.store.user_nodes(user.user_id, start_id=node_id, limit=1) if un.node.node_id == node_id]
        next_id = None
        total = len(page)
    else:
        rows = ctx.store.user_nodes(user.user_id, start_id=start_id, limit=num_records + 1)
        page, extra = rows[:num_records], rows[num_records:]
        next_id = extra[0].node.node_id if extra else None
        total = len(page)
    if node_details:
        return NodeList(node_details=[_detail(un) for un in page], next_id=next_id, total=total)
    return NodeList(nodes=[un.node.node_id for un in page], next_id=next_id, total=total)


@v1.get("/user/nodes/config", tags=["nodes"])
def node_config(ctx: Ctx, user: User, nodeid: NodeIdQuery = None, node_id: NodeIdQuery = None) -> dict[str, Any]:
    """The node config the node published on ``config`` (esp-rainmaker ``src/core/esp_rmaker_node_config.c``)."""
    node = _require_node(ctx, user, _one_node_id(nodeid, node_id))
    if node.config is None:
        raise ApiError(404, f"node {node.node_id} has not reported its config yet", ErrorCode.NOT_FOUND)
    return node.config


@v1.get("/user/nodes/status", response_model=NodeStatus, tags=["nodes"])
def node_status(ctx: Ctx, user: User, nodeid: NodeIdQuery = None, node_id: NodeIdQuery = None) -> NodeStatus:
    """``{"connectivity": {"connected", "timestamp" (ms)}}``, from the node's messages and its Last Will."""
    return _status_of(_require_node(ctx, user, _one_node_id(nodeid, node_id)))


@v1.get("/user/nodes/params", tags=["nodes"])
def node_params(ctx: Ctx, user: User, nodeid: NodeIdQuery = None, node_id: NodeIdQuery = None) -> dict[str, Any]:
    """The node's last reported params ``{"<Device>": {"<Param>": value}}``."""
    return _require_node(ctx, user, _one_node_id(nodeid, node_id)).params


def _publish_params(ctx: CloudContext, user: AccessClaims, node_id: str, payload: dict[str, Any]) -> NodeResult:
    if ctx.store.role_of(user.user_id, node_id) is None:
        return NodeResult(node_id=node_id, status="failure", description=f"node {node_id} is not associated with this user")
    if ctx.mqtt is None:
        return NodeResult(node_id=node_id, status="failure", description="the cloud MQTT service is not running")
    try:
        ctx.mqtt.publish_to_node(node_id, "params/remote", payload)
    except NodeUnreachable as exc:
        return NodeResult(node_id=node_id, status="failure", description=str(exc))
    return NodeResult(node_id=node_id, status="success", description="Successfully set params")


@v1.put("/user/nodes/params", response_model=list[NodeResult] | Success, tags=["nodes"])
def set_node_params(
    ctx: Ctx,
    user: User,
    body: Annotated[list[NodeParamsUpdate] | dict[str, dict[str, Any]], Body()],
    node_id: NodeIdQuery = None,
    nodeid: NodeIdQuery = None,
) -> list[NodeResult] | Success:
    """Multi-node ``[{"node_id", "payload"}]`` (CLI, Android) → per-node results; single-node
    ``?node_id=`` with ``{"<Device>": {...}}`` (Android). Each becomes a QoS 1 publish on
    ``node/<id>/params/remote``."""
    if isinstance(body, list):
        if node_id is not None or nodeid is not None:
            raise ApiError(400, "the multi-node list body takes no node_id query parameter", ErrorCode.BAD_REQUEST)
        if not 1 <= len(body) <= MAX_NODES_PER_CALL:
            raise ApiError(400, f"the node list must hold 1 to {MAX_NODES_PER_CALL} entries", ErrorCode.BAD_REQUEST)
        return [_publish_params(ctx, user, item.node_id, item.payload) for item in body]
    target = _one_node_id(nodeid, node_id)
    try:
        _check_finite(body)
    except ValueError as exc:
        raise ApiError(400, str(exc), ErrorCode.BAD_REQUEST) from exc
    _require_access(ctx, user, target)
    result = _publish_params(ctx, user, target, body)
    if result.status != "success":
        raise ApiError(503, result.description, ErrorCode.SERVICE_UNAVAILABLE)
    return Success(description=result.description)


@v1.put("/user/nodes/mapping", response_model=MappingResponse, tags=["mapping"])
def put_mapping(ctx: Ctx, user: User, body: MappingBody) -> MappingResponse:
    """Add (the user's half of a mapping, matched with the node's ``user/mapping`` within 60 s,
    either order, same secret) or remove (``rmaker_lib/node.py`` ``__user_node_mapping``)."""
    now = ctx.clock.now()
    if body.operation == "remove":
        request = ctx.store.remove_mapping(body.node_id, user.user_id, now)
        return MappingResponse(description="User node mapping removed", request_id=request.request_id)
    if not body.secret_key:
        raise ApiError(400, "secret_key is required for operation add", ErrorCode.BAD_REQUEST)
    request = ctx.store.mapping_user_half(body.node_id, user.user_id, body.secret_key, now)
    return MappingResponse(description=f"User node mapping {request.status.value}", request_id=request.request_id)


@v1.get("/user/nodes/mapping", response_model=MappingStatusResponse, tags=["mapping"])
def get_mapping(
    ctx: Ctx,
    user: User,
    request_id: Annotated[str, Query(min_length=1, max_length=64)],
    user_request: Annotated[bool, Query(description="sent by esp-rainmaker-android; accepted and ignored")] = False,
) -> MappingStatusResponse:
    """``request_status``: ``requested`` | ``confirmed`` | ``timedout`` | ``discarded``."""
    request = ctx.store.mapping_request(request_id, user.user_id, ctx.clock.now())
    if request is None:
        raise ApiError(404, "mapping request not found", ErrorCode.NOT_FOUND)
    return MappingStatusResponse(
        request_id=request.request_id,
        request_status=request.status,
        node_id=request.node_id,
        request_timestamp=int(request.created_at),
    )


@v1.put("/user/nodes/sharing", response_model=ShareResponse, tags=["sharing"])
def share_nodes(ctx: Ctx, user: User, body: ShareBody) -> ShareResponse:
    """A sharing request ``{"nodes", "user_name"}``; nothing is shared until that user accepts."""
    if body.primary or body.transfer:
        raise ApiError(400, "sharing the primary role or transferring a node is not supported", ErrorCode.BAD_REQUEST)
    request = ctx.store.create_sharing_request(user.user_id, body.nodes, body.user_name, ctx.clock.now())
    return ShareResponse(description="Sharing request sent", request_id=request.request_id)


@v1.delete("/user/nodes/sharing", response_model=Success, tags=["sharing"])
def unshare_nodes(
    ctx: Ctx,
    user: User,
    nodes: Annotated[str, Query(min_length=1, max_length=4096, description="comma-separated node ids")],
    user_name: Annotated[str, Query(min_length=1, max_length=256)],
) -> Success:
    node_ids = [n for n in nodes.split(",") if n]
    if not node_ids or len(node_ids) > MAX_NODES_PER_CALL:
        raise ApiError(400, f"nodes must list 1 to {MAX_NODES_PER_CALL} node ids", ErrorCode.BAD_REQUEST)
    ctx.store.unshare(user.user_id, node_ids, user_name)
    return Success(description="Nodes unshared")


@v1.get("/user/nodes/sharing", response_model=NodeSharingList, tags=["sharing"])
def node_sharing(ctx: Ctx, user: User, node_id: NodeIdQuery = None) -> NodeSharingList:
    if node_id is not None:
        _require_access(ctx, user, node_id)
        node_ids = [node_id]
    else:
        node_ids = [un.node.node_id for un in ctx.store.user_nodes(user.user_id)]
    entries = []
    for nid in node_ids:
        sharing = ctx.store.node_sharing(nid)
        entries.append(NodeSharingEntry(node_id=nid, users=SharingUsers(primary=list(sharing.primary), secondary=list(sharing.secondary))))
    return NodeSharingList(node_sharing=entries)


@v1.get("/user/nodes/sharing/requests", response_model=SharingRequestList, tags=["sharing"])
def sharing_requests(
    ctx: Ctx,
    user: User,
    primary_user: bool = False,
    request_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
) -> SharingRequestList:
    """Requests the user sent (``primary_user=true``) or received (``false``)."""
    found = ctx.store.sharing_requests(user.user_id, as_primary=primary_user, now=ctx.clock.now(), request_id=request_id)
    return SharingRequestList(
        sharing_requests=[
            SharingRequestView(
                request_id=r.request_id,
                request_status=r.status,
                request_timestamp=int(r.created_at),
                node_ids=list(r.node_ids),
                user_name=r.user_email,
                primary_user_name=r.primary_email,
            )
            for r in found
        ]
    )


@v1.put("/user/nodes/sharing/requests", response_model=Success, tags=["sharing"])
def answer_sharing_request(ctx: Ctx, user: User, body: SharingAnswer) -> Success:
    """``{"accept": true|false, "request_id"}`` by the user the request was sent to; a decline is final."""
    request = ctx.store.respond_sharing_request(body.request_id, user.user_id, body.accept, ctx.clock.now())
    return Success(description=f"Sharing request {request.status.value}")


@v1.delete("/user/nodes/sharing/requests", response_model=Success, tags=["sharing"])
def cancel_sharing_request(ctx: Ctx, user: User, request_id: Annotated[str, Query(min_length=1, max_length=64)]) -> Success:
    ctx.store.cancel_sharing_request(request_id, user.user_id, ctx.clock.now())
    return Success(description="Sharing request cancelled")


@v1.post("/user/otaimage", response_model=OtaImageResponse, tags=["ota"])
def upload_ota_image(ctx: Ctx, user: User, body: OtaImageUpload) -> OtaImageResponse:
    """``{"image_name", "base64_fwimage"}`` (esp-rainmaker-cli ``rmaker_lib/service.py`` ``upload_ota_image``).

    ``fw_version``, ``project_name`` and ``secure_version`` are read from the image's
    ``esp_app_desc_t`` at 0x20; a body ``fw_version`` overrides (for deliberately broken images).
    """
    try:
        data = base64.b64decode(body.base64_fwimage, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "base64_fwimage is not valid base64", ErrorCode.BAD_REQUEST) from exc
    if not data:
        raise ApiError(400, "base64_fwimage is empty", ErrorCode.BAD_REQUEST)
    try:
        desc: AppDescriptor | None = AppDescriptor.parse(data, APP_DESC_OFFSET, what="OTA image")
    except FirmwareFormatError:
        desc = None
    fw_version = body.fw_version if body.fw_version is not None else desc.version if desc is not None else None
    if fw_version is None:
        raise ApiError(400, "the image has no esp_app_desc_t at offset 0x20; give fw_version to upload it anyway", ErrorCode.BAD_REQUEST)
    image = ctx.store.add_ota_image(
        user.user_id,
        body.image_name,
        data,
        fw_version,
        ctx.clock.now(),
        project_name=desc.project_name if desc else None,
        secure_version=desc.secure_version if desc else None,
    )
    return OtaImageResponse(
        ota_image_id=image.image_id,
        image_name=image.image_name,
        fw_version=image.fw_version,
        project_name=image.project_name,
        secure_version=image.secure_version,
        file_size=image.file_size,
        file_sha256=image.sha256,
    )


def _job_view(ctx: CloudContext, job_id: str) -> OtaJobResponse:
    nodes = ctx.store.ota_job_nodes(job_id)
    return OtaJobResponse(
        ota_job_id=job_id,
        ota_image_id=nodes[0].image_id,
        nodes=[
            OtaJobNodeView(node_id=n.node_id, status=n.status, additional_info=n.additional_info, timestamp=int(n.updated_at))
            for n in nodes
        ],
    )


@v1.post("/user/otajob", response_model=OtaJobResponse, tags=["ota"])
def create_ota_job(ctx: Ctx, user: User, body: OtaJobBody) -> OtaJobResponse:
    """An OTA job for one node or a list (shape after RainMaker's admin ``POST v1/admin/otajob``,
    pushed at once): per node the OTA host publishes the image and the node gets ``otaurl``
    with ``url``, ``ota_job_id``, ``file_size``, ``fw_version``; progress comes back on ``otastatus``."""
    if ctx.ota is None or ctx.mqtt is None:
        raise ApiError(503, "OTA needs the OTA image host and the cloud MQTT service", ErrorCode.SERVICE_UNAVAILABLE)
    job_id = ctx.store.create_ota_job(user.user_id, body.ota_image_id, body.node_ids, body.ota_job_name, ctx.clock.now())
    unreachable = []
    for node_id in dict.fromkeys(body.node_ids):
        try:
            dispatch_ota(ctx.store, ctx.clock, ctx.ota, ctx.mqtt, job_id, node_id)
        except NodeUnreachable:
            unreachable.append(node_id)
    view = _job_view(ctx, job_id)
    if unreachable:
        view.description = f"OTA job created; {', '.join(unreachable)} will get it on their next otafetch (broker not reachable now)"
    return view


@v1.get("/user/otajob", response_model=OtaJobResponse, tags=["ota"])
def get_ota_job(ctx: Ctx, user: User, ota_job_id: Annotated[str, Query(min_length=1, max_length=64)]) -> OtaJobResponse:
    nodes = ctx.store.ota_job_nodes(ota_job_id)
    if not nodes or nodes[0].user_id != user.user_id:
        raise ApiError(404, "OTA job not found", ErrorCode.NOT_FOUND)
    return _job_view(ctx, ota_job_id)


@v1.get("/user/nodes/ota_update", response_model=OtaUpdateInfo, response_model_exclude_none=True, tags=["ota"])
def ota_update_info(ctx: Ctx, user: User, node_id: Annotated[str, Query(pattern=NODE_ID_PATTERN)]) -> OtaUpdateInfo:
    """Whether an unfinished OTA job exists for the node (esp-rainmaker-android ``ApiManager`` ``checkUpdate``)."""
    _require_access(ctx, user, node_id)
    job = ctx.store.latest_ota_job_node(node_id, open_only=True)
    if job is None:
        return OtaUpdateInfo(ota_available=False, status="", description="No update available")
    image = ctx.store.ota_image(job.image_id)
    return OtaUpdateInfo(
        ota_available=True,
        status=job.status.value,
        ota_job_id=job.job_id,
        description="Update available",
        fw_version=image.fw_version if image else None,
        file_size=image.file_size if image else None,
    )


@v1.post("/user/nodes/ota_update", response_model=Success, tags=["ota"])
def push_ota_update(ctx: Ctx, user: User, body: OtaUpdateBody) -> Success:
    """(Re)send a job's ``otaurl`` to the node (esp-rainmaker-android ``pushUpdate``)."""
    if _require_access(ctx, user, body.node_id) is not Role.PRIMARY:
        raise ApiError(403, "only the primary user can update a node's firmware", ErrorCode.FORBIDDEN)
    if ctx.store.ota_job_node(body.ota_job_id, body.node_id) is None:
        raise ApiError(404, "OTA job not found for this node", ErrorCode.NOT_FOUND)
    if ctx.ota is None or ctx.mqtt is None:
        raise ApiError(503, "OTA needs the OTA image host and the cloud MQTT service", ErrorCode.SERVICE_UNAVAILABLE)
    try:
        status = dispatch_ota(ctx.store, ctx.clock, ctx.ota, ctx.mqtt, body.ota_job_id, body.node_id)
    except NodeUnreachable as exc:
        raise ApiError(503, str(exc), ErrorCode.SERVICE_UNAVAILABLE) from exc
    job = ctx.store.ota_job_node(body.ota_job_id, body.node_id)
    if status is OtaNodeStatus.FAILED and job is not None:
        raise ApiError(409, f"OTA could not be started: {job.additional_info}", ErrorCode.CONFLICT)
    return Success(description="OTA update triggered")


@v1.get("/user/nodes/ota_status", response_model=OtaStatusResponse, tags=["ota"])
def ota_status(
    ctx: Ctx,
    user: User,
    node_id: Annotated[str, Query(pattern=NODE_ID_PATTERN)],
    ota_job_id: Annotated[str | None, Query(min_length=1, max_length=64)] = None,
) -> OtaStatusResponse:
    """The node's job status ``{status, additional_info, timestamp}`` (esp-rainmaker-android
    ``getOTAStatus``) and the history of its ``otastatus`` reports; newest job if no id given."""
    _require_access(ctx, user, node_id)
    job = ctx.store.ota_job_node(ota_job_id, node_id) if ota_job_id else ctx.store.latest_ota_job_node(node_id)
    if job is None:
        raise ApiError(404, "no OTA job for this node", ErrorCode.NOT_FOUND)
    history = ctx.store.ota_status_history(job.job_id, node_id)
    return OtaStatusResponse(
        node_id=node_id,
        ota_job_id=job.job_id,
        status=job.status,
        additional_info=job.additional_info,
        timestamp=int(job.updated_at),
        history=[OtaStatusReportView(status=h.status, additional_info=h.additional_info, timestamp=int(h.received_at)) for h in history],
    )


@test_only.post("/clock/advance", response_model=ClockNow)
def advance_clock(ctx: Ctx, body: ClockAdvance) -> ClockNow:
    """Move the stack's clock forward (test mode only): suites never sleep through a mapping window."""
    if not isinstance(ctx.clock, ManualClock):
        raise ApiError(403, "the stack's clock is not a test clock", ErrorCode.FORBIDDEN)
    return ClockNow(now=ctx.clock.advance(body.seconds))


def _delivery(ctx: CloudContext) -> DeliveryControl:
    if ctx.delivery is None:
        raise ApiError(
            503, "OTA delivery control is not available: this API runs without the local stack's OTA host", ErrorCode.SERVICE_UNAVAILABLE
        )
    return ctx.delivery


def _require_known_node(ctx: CloudContext, node_id: str) -> None:
    """404 for a node the store has never heard of (the test controls act only on real nodes)."""
    if ctx.store.get_node(node_id) is None:
        raise ApiError(
            404,
            f"node {node_id} is not known to the cloud: it has not reported its config or params nor been mapped yet",
            ErrorCode.NOT_FOUND,
        )


@test_only.post("/ota/delivery", response_model=OtaDeliveryPlanView, responses={404: _ERRORS[404], 503: _ERRORS[503]})
def arm_ota_delivery(ctx: Ctx, body: OtaDeliveryPlanBody) -> OtaDeliveryPlanView:
    """Arm a one-shot delivery plan for the node's next OTA publish (test mode only): served
    unsigned, over plain HTTP or from a rogue-CA host, cut or stalled after N bytes. Replaces
    a plan already armed for the node."""
    control = _delivery(ctx)
    _require_known_node(ctx, body.node_id)
    fields = body.model_dump()
    previous = control.plans.arm(DeliveryPlan(**fields))
    return OtaDeliveryPlanView(**fields, replaced=previous is not None)


@test_only.delete("/ota/delivery", response_model=OtaDeliveryDisarmed, responses={503: _ERRORS[503]})
def disarm_ota_delivery(ctx: Ctx, node_id: Annotated[str, Query(pattern=NODE_ID_PATTERN)]) -> OtaDeliveryDisarmed:
    """Drop the node's armed delivery plan (test mode only)."""
    return OtaDeliveryDisarmed(node_id=node_id, disarmed=_delivery(ctx).plans.disarm(node_id))


@test_only.get(
    "/ota/deliveries",
    response_model=list[OtaDeliveryView],
    responses={401: _ERRORS[401], 404: _ERRORS[404], 503: _ERRORS[503]},
)
def ota_deliveries(ctx: Ctx, user: User, ota_job_id: Annotated[str, Query(min_length=1, max_length=64)]) -> list[OtaDeliveryView]:
    """Every publish of the user's OTA job (test mode only), with the OTA host's records of
    what its URL served: the evidence of exactly which bytes went to the device."""
    control = _delivery(ctx)
    nodes = ctx.store.ota_job_nodes(ota_job_id)
    if not nodes or nodes[0].user_id != user.user_id:
        raise ApiError(404, "OTA job not found", ErrorCode.NOT_FOUND)
    return [OtaDeliveryView.model_validate(d, from_attributes=True) for d in control.log.deliveries(ota_job_id)]


@test_only.post("/mqtt/to-node", response_model=RawToNodeSent, responses={404: _ERRORS[404], 503: _ERRORS[503]})
def send_raw_to_node(ctx: Ctx, body: RawToNodeBody) -> RawToNodeSent:
    """Publish raw bytes to a node on ``node/<node_id>/<suffix>``, QoS 1, as they are (test mode only).

    The malformed-input suites' way to a node (EN 303 645 5.13-1, 5.9-1): a node must drop a
    message it cannot parse and go on, whatever the cloud sends. The answer names the topic,
    size and SHA-256 of what the broker took; the payload is never echoed or logged."""
    try:
        payload = base64.b64decode(body.payload_base64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(400, "payload_base64 is not valid base64 (RFC 4648 §4: A-Z a-z 0-9 + /, = padding)", ErrorCode.BAD_REQUEST) from exc
    if len(payload) > MAX_RAW_TO_NODE_BYTES:
        raise ApiError(
            413,
            f"the payload of {len(payload)} bytes is larger than the {MAX_RAW_TO_NODE_BYTES} bytes this control sends",
            ErrorCode.BODY_TOO_LARGE,
        )
    _require_known_node(ctx, body.node_id)
    if ctx.mqtt is None:
        raise ApiError(
            503,
            "raw messages to nodes need the cloud MQTT service (rig.cloud.service.CloudMqtt), and this API runs without it",
            ErrorCode.SERVICE_UNAVAILABLE,
        )
    topic = f"node/{body.node_id}/{body.suffix}"
    try:
        ctx.mqtt.publish_raw_to_node(body.node_id, body.suffix, payload)
    except NodeUnreachable as exc:
        raise ApiError(503, f"the broker did not take the message for {topic}: {exc} (is the stack running? `rig status`)",
                       ErrorCode.SERVICE_UNAVAILABLE) from exc  # fmt: skip
    digest = hashlib.sha256(payload).hexdigest()
    log.info("test mode: sent %d raw bytes (sha256 %s) on %s", len(payload), digest, topic)
    return RawToNodeSent(node_id=body.node_id, topic=topic, size=len(payload), sha256=digest)


# --------------------------------------------------------------------------- error handling and limits


_STORE_ERRORS: dict[type[StoreError], tuple[int, ErrorCode]] = {
    NotFound: (404, ErrorCode.NOT_FOUND),
    Forbidden: (403, ErrorCode.FORBIDDEN),
    Conflict: (409, ErrorCode.CONFLICT),
    InvalidRequest: (400, ErrorCode.BAD_REQUEST),
}


def _describe_validation(exc: RequestValidationError) -> str:
    """Location and message of each problem — never the input, which may be a password."""
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body") or "body"
        parts.append(f"{loc}: {err.get('msg', 'invalid')}")
    return "invalid request: " + "; ".join(parts)


def _install_error_handlers(app: FastAPI) -> None:
    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return failure(exc.status_code, exc.description, exc.error_code)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return failure(400, _describe_validation(exc), ErrorCode.BAD_REQUEST)

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}.get(exc.status_code, ErrorCode.BAD_REQUEST)
        response = failure(exc.status_code, str(exc.detail), code)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    async def store_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StoreError)
        status, code = next((v for t, v in _STORE_ERRORS.items() if isinstance(exc, t)), (400, ErrorCode.BAD_REQUEST))
        return failure(status, str(exc), code)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
        return failure(500, "internal error", ErrorCode.INTERNAL)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(StoreError, store_error)
    app.add_exception_handler(Exception, unexpected)


Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class BodyLimitMiddleware:
    """Refuse request bodies over a per-path limit with 413 before the app sees them.

    Checks ``Content-Length`` first, then counts what actually arrives (chunked bodies
    have no length), buffering at most the limit.
    """

    def __init__(self, app: ASGIApp, default_limit: int, limits: dict[str, int] | None = None):
        self.app = app
        self.default_limit = default_limit
        self.limits = limits or {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limits.get(scope.get("path", ""), self.default_limit)
        declared = next((v for k, v in scope.get("headers", ()) if k == b"content-length"), None)
        if declared is not None:
            try:
                too_big = int(declared) > limit
            except ValueError:
                await failure(400, "invalid Content-Length header", ErrorCode.BAD_REQUEST)(scope, receive, send)
                return
            if too_big:
                await self._refuse(limit, scope, receive, send)
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break  # http.disconnect: nothing to serve
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(limit, scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    @staticmethod
    async def _refuse(limit: int, scope: Scope, receive: Receive, send: Send) -> None:
        await failure(413, f"request body larger than {limit} bytes", ErrorCode.BODY_TOO_LARGE)(scope, receive, send)


# --------------------------------------------------------------------------- the app


def create_app(
    store: CloudStore,
    clock: Clock,
    mqtt: NodeChannel | None,
    ota: OtaImagePublisher | None,
    test_mode: bool,
    *,
    mqtt_host: str = "localhost",
    mqtt_port: int | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_image_body_bytes: int = MAX_IMAGE_BODY_BYTES,
    ota_delivery: DeliveryControl | None = None,
) -> FastAPI:
    """The cloud REST API over *store*.

    *mqtt* is the cloud service (:class:`~rig.cloud.service.CloudMqtt`, or anything with its
    ``publish_to_node``); *ota* the OTA image host. The ``/test/*`` paths exist only with
    *test_mode*: ``POST /test/clock/advance`` (moves only a :class:`~rig.cloud.clock.ManualClock`),
    ``/test/ota/delivery`` / ``/test/ota/deliveries`` (answer 503 without *ota_delivery*,
    the plans and log *ota*'s publisher uses) and ``POST /test/mqtt/to-node`` (raw bytes to a
    node, as a buggy or compromised cloud would send them). OpenAPI is served at ``/openapi.json``.
    """
    app = FastAPI(
        title="rig local cloud (ESP RainMaker v1 stand-in)",
        version="1.0",
        description="The RainMaker v1 REST paths that esp-rainmaker-cli and the phone apps use, served by the rig's local cloud.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.cloud = CloudContext(
        store=store,
        clock=clock,
        tokens=TokenAuthority(store, clock),
        mqtt=mqtt,
        ota=ota,
        mqtt_host=mqtt_host,
        mqtt_port=mqtt_port,
        delivery=ota_delivery if test_mode else None,
    )
    app.include_router(public)
    app.include_router(v1)
    if test_mode:
        app.include_router(test_only)
    _install_error_handlers(app)

    def openapi() -> dict[str, Any]:
        """FastAPI's schema minus its 422 responses: validation errors are answered 400 here."""
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path_item in schema.get("paths", {}).values():
                for operation in path_item.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(BodyLimitMiddleware, default_limit=max_body_bytes, limits={OTA_IMAGE_PATH: max_image_body_bytes})
    return app

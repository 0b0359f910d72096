"""The cloud stand-in's persistent state: one SQLite file in the run's state directory.

WAL mode (the REST threads read while the MQTT thread writes), a versioned schema with
forward-only migrations (``schema_version`` table), and every multi-step rule that must
be atomic — pairing the two halves of a user⇄node mapping, accepting a share, recording
an OTA status — done inside one ``BEGIN IMMEDIATE`` transaction under a process lock.

Times are Unix seconds from the injected clock (:mod:`rig.cloud.clock`); the store owns
no clock, callers pass ``now``.

Secrets are never stored in the clear: passwords as scrypt hashes, refresh tokens and
mapping secrets as SHA-256 digests (they are high-entropy random strings, so a plain
digest is enough to make a leaked database useless for replay).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

DB_FILENAME = "cloud.sqlite3"

MAPPING_WINDOW_S = 60.0
"""Both halves of a user⇄node mapping must arrive within one minute of the first one
(doc page https://rainmaker.espressif.com/docs/user-node-mapping: "Timed Out" after one
minute without matching information from the other side)."""

SHARING_REQUEST_TTL_S = 7 * 24 * 3600.0
"""A pending sharing request expires after 7 days (esp-rainmaker-cli ``rmaker_cmd/node.py``
shows the expiry as request time + 7 days)."""

REFRESH_TOKEN_TTL_S = 30 * 24 * 3600.0
"""Cognito's default refresh-token validity, which RainMaker's user pool uses."""

FACTORY_RESET_USER_ID = "esp-rmaker"
FACTORY_RESET_SECRET = "failed"
"""The dummy mapping a node publishes with ``CONFIG_ESP_RMAKER_FACTORY_RESET_REPORTING``
(esp-rainmaker ``src/core/esp_rmaker_user_mapping.c``): the node was reset, so the cloud
drops its user mappings."""

_SCRYPT_N, _SCRYPT_R, _SCRYPT_P, _SCRYPT_DKLEN = 2**14, 8, 1, 32


class StoreError(Exception):
    """A request the store refuses; the message is safe to show to the API client."""


class NotFound(StoreError):
    pass


class Forbidden(StoreError):
    pass


class Conflict(StoreError):
    pass


class InvalidRequest(StoreError):
    pass


class SchemaTooNew(StoreError):
    pass


class Role(StrEnum):
    PRIMARY = "primary"
    SECONDARY = "secondary"


class MappingStatus(StrEnum):
    """``request_status`` of ``GET v1/user/nodes/mapping`` (esp-rainmaker-cli ``rmaker_cmd/provision.py``)."""

    REQUESTED = "requested"
    CONFIRMED = "confirmed"
    TIMEDOUT = "timedout"
    DISCARDED = "discarded"


class SharingStatus(StrEnum):
    PENDING = "pending"
    ACCEPTED = "accepted"
    DECLINED = "declined"
    CANCELLED = "cancelled"
    TIMEDOUT = "timedout"


class OtaNodeStatus(StrEnum):
    """Per-node OTA job state: the cloud's two states, then what the node reports on ``otastatus``
    (esp-rainmaker ``src/ota/esp_rmaker_ota.c`` ``esp_rmaker_ota_status_to_string``)."""

    PENDING = "pending"
    TRIGGERED = "triggered"
    IN_PROGRESS = "in-progress"
    SUCCESS = "success"
    FAILED = "failed"
    DELAYED = "delayed"
    REJECTED = "rejected"


NODE_REPORTED_OTA_STATUSES = frozenset(
    {OtaNodeStatus.IN_PROGRESS, OtaNodeStatus.SUCCESS, OtaNodeStatus.FAILED, OtaNodeStatus.DELAYED, OtaNodeStatus.REJECTED}
)
TERMINAL_OTA_STATUSES = frozenset({OtaNodeStatus.SUCCESS, OtaNodeStatus.FAILED, OtaNodeStatus.REJECTED})


# --------------------------------------------------------------------------- schema

_V1: tuple[str, ...] = (
    """CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)""",
    """CREATE TABLE users (
        user_id TEXT PRIMARY KEY,
        email TEXT NOT NULL UNIQUE COLLATE NOCASE,
        password_hash TEXT NOT NULL,
        created_at REAL NOT NULL)""",
    """CREATE TABLE refresh_tokens (
        token_hash TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
        issued_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        revoked_at REAL)""",
    """CREATE TABLE nodes (
        node_id TEXT PRIMARY KEY,
        config TEXT,
        params TEXT NOT NULL DEFAULT '{}',
        connected INTEGER NOT NULL DEFAULT 0,
        connectivity_ts REAL,
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL)""",
    """CREATE TABLE mappings (
        node_id TEXT NOT NULL REFERENCES nodes(node_id) ON DELETE CASCADE,
        user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
        role TEXT NOT NULL CHECK (role IN ('primary', 'secondary')),
        mapped_at REAL NOT NULL,
        PRIMARY KEY (node_id, user_id))""",
    """CREATE INDEX mappings_by_user ON mappings(user_id)""",
    """CREATE TABLE mapping_requests (
        request_id TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        operation TEXT NOT NULL CHECK (operation IN ('add', 'remove')),
        user_secret_hash TEXT,
        user_at REAL,
        node_secret_hash TEXT,
        node_at REAL,
        node_reset INTEGER NOT NULL DEFAULT 0,
        status TEXT NOT NULL CHECK (status IN ('requested', 'confirmed', 'timedout', 'discarded')),
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL)""",
    """CREATE INDEX mapping_requests_open ON mapping_requests(node_id, user_id, status)""",
    """CREATE TABLE sharing_requests (
        request_id TEXT PRIMARY KEY,
        primary_user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
        user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
        node_ids TEXT NOT NULL,
        status TEXT NOT NULL CHECK (status IN ('pending', 'accepted', 'declined', 'cancelled', 'timedout')),
        created_at REAL NOT NULL,
        updated_at REAL NOT NULL)""",
    """CREATE TABLE node_alerts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        node_id TEXT NOT NULL,
        payload TEXT NOT NULL,
        received_at REAL NOT NULL)""",
    """CREATE TABLE ota_images (
        image_id TEXT PRIMARY KEY,
        user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
        image_name TEXT NOT NULL,
        fw_version TEXT NOT NULL,
        project_name TEXT,
        secure_version INTEGER,
        file_size INTEGER NOT NULL,
        sha256 TEXT NOT NULL,
        data BLOB NOT NULL,
        created_at REAL NOT NULL)""",
    """CREATE TABLE ota_jobs (
        job_id TEXT PRIMARY KEY,
        image_id TEXT NOT NULL REFERENCES ota_images(image_id),
        user_id TEXT NOT NULL REFERENCES users(user_id) ON DELETE CASCADE,
        job_name TEXT NOT NULL,
        created_at REAL NOT NULL)""",
    """CREATE TABLE ota_job_nodes (
        job_id TEXT NOT NULL REFERENCES ota_jobs(job_id) ON DELETE CASCADE,
        node_id TEXT NOT NULL,
        status TEXT NOT NULL,
        additional_info TEXT NOT NULL DEFAULT '',
        url TEXT,
        updated_at REAL NOT NULL,
        PRIMARY KEY (job_id, node_id))""",
    """CREATE TABLE ota_status_history (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        job_id TEXT NOT NULL,
        node_id TEXT NOT NULL,
        status TEXT NOT NULL,
        additional_info TEXT NOT NULL,
        node_ts REAL,
        received_at REAL NOT NULL)""",
)

MIGRATIONS: tuple[tuple[str, ...], ...] = (_V1,)
"""Forward migrations; ``MIGRATIONS[i]`` takes the schema from version ``i`` to ``i + 1``.
Never edit a released entry: append a new one."""

SCHEMA_VERSION = len(MIGRATIONS)


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class User:
    user_id: str
    email: str
    created_at: float


@dataclass(frozen=True)
class Node:
    node_id: str
    config: dict[str, Any] | None
    params: dict[str, Any]
    connected: bool
    connectivity_ts: float | None
    created_at: float
    updated_at: float

    @property
    def fw_version(self) -> str | None:
        info = (self.config or {}).get("info")
        version = info.get("fw_version") if isinstance(info, dict) else None
        return version if isinstance(version, str) else None


@dataclass(frozen=True)
class UserNode:
    """A node as one user sees it: the node and that user's mapping."""

    node: Node
    role: Role
    mapped_at: float


@dataclass(frozen=True)
class MappingRequest:
    request_id: str
    node_id: str
    user_id: str
    operation: str
    status: MappingStatus
    user_at: float | None
    node_at: float | None
    node_reset: bool
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class SharingRequest:
    request_id: str
    primary_user_id: str
    primary_email: str
    user_id: str
    user_email: str
    node_ids: tuple[str, ...]
    status: SharingStatus
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class NodeSharing:
    node_id: str
    primary: tuple[str, ...]
    secondary: tuple[str, ...]


@dataclass(frozen=True)
class OtaImage:
    image_id: str
    user_id: str
    image_name: str
    fw_version: str
    project_name: str | None
    secure_version: int | None
    file_size: int
    sha256: str
    created_at: float


@dataclass(frozen=True)
class OtaJobNode:
    job_id: str
    node_id: str
    image_id: str
    user_id: str
    status: OtaNodeStatus
    additional_info: str
    url: str | None
    updated_at: float


@dataclass(frozen=True)
class OtaStatusReport:
    job_id: str
    node_id: str
    status: str
    additional_info: str
    node_ts: float | None
    received_at: float


# --------------------------------------------------------------------------- secrets


def hash_password(password: str, salt: bytes | None = None) -> str:
    """scrypt (RFC 7914) with N=2^14, r=8, p=1 and a 16-byte random salt, self-describing."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    key = hashlib.scrypt(password.encode(), salt=salt, n=_SCRYPT_N, r=_SCRYPT_R, p=_SCRYPT_P, dklen=_SCRYPT_DKLEN)
    b64 = base64.b64encode
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${b64(salt).decode()}${b64(key).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    try:
        scheme, n, r, p, salt_b64, key_b64 = encoded.split("$")
        if scheme != "scrypt":
            return False
        salt, expected = base64.b64decode(salt_b64), base64.b64decode(key_b64)
        key = hashlib.scrypt(password.encode(), salt=salt, n=int(n), r=int(r), p=int(p), dklen=len(expected))
    except ValueError:
        return False
    return hmac.compare_digest(key, expected)


_DUMMY_PASSWORD_HASH = hash_password("not a real password", salt=b"\0" * 16)


def digest_secret(secret: str) -> str:
    """SHA-256 of a high-entropy secret (refresh token, mapping secret), hex."""
    return hashlib.sha256(secret.encode()).hexdigest()


def _same_secret(digest_a: str | None, digest_b: str | None) -> bool:
    return digest_a is not None and digest_b is not None and hmac.compare_digest(digest_a, digest_b)


def _new_id() -> str:
    """Request/job/image ids: 22 URL-safe characters, like RainMaker's."""
    return secrets.token_urlsafe(16)[:22]


# --------------------------------------------------------------------------- the store


class CloudStore:
    """All cloud state. Thread-safe: one connection, every operation under one lock.

    Open with :meth:`open`; the schema is created or migrated forward on open, and a
    database written by a newer rig is refused rather than guessed at.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path | None):
        self._conn = conn
        self._lock = threading.RLock()
        self.path = path

    # ---- lifecycle

    @classmethod
    def open(cls, state_dir: Path | str) -> CloudStore:
        """Open (creating if needed) ``<state_dir>/cloud.sqlite3`` in WAL mode, migrated to :data:`SCHEMA_VERSION`."""
        state_dir = Path(state_dir)
        state_dir.mkdir(parents=True, exist_ok=True)
        path = state_dir / DB_FILENAME
        conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=10.0)
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.close()
            raise StoreError(f"SQLite refused WAL mode for {path} (got {mode!r})")
        store = cls(conn, path)
        store._setup()
        return store

    @classmethod
    def in_memory(cls) -> CloudStore:
        """A throwaway store (no WAL: SQLite keeps in-memory databases in memory journal mode)."""
        store = cls(sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None), None)
        store._setup()
        return store

    def _setup(self) -> None:
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA foreign_keys=ON")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._migrate()

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> CloudStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def schema_version(self) -> int:
        with self._lock:
            row = self._conn.execute("SELECT MAX(version) FROM schema_version").fetchone()
        return int(row[0] or 0)

    def journal_mode(self) -> str:
        with self._lock:
            return str(self._conn.execute("PRAGMA journal_mode").fetchone()[0])

    def _migrate(self) -> None:
        with self._tx() as c:
            c.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL PRIMARY KEY, applied_at REAL NOT NULL)")
            current = int(c.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()[0])
            if current > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"the cloud database has schema version {current}, newer than this rig's {SCHEMA_VERSION}. "
                    "Fix: use the rig version that wrote it, or start with a fresh state directory"
                )
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[version - 1]:
                    c.execute(statement)
                c.execute("INSERT INTO schema_version(version, applied_at) VALUES (?, ?)", (version, time.time()))

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; rolled back on any exception."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            yield self._conn

    # ---- meta

    def secret(self, name: str, nbytes: int = 32) -> bytes:
        """A per-stack random secret (e.g. the JWT signing key), created on first use and kept."""
        key = f"secret:{name}"
        with self._tx() as c:
            row = c.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
            if row:
                return bytes.fromhex(row["value"])
            value = secrets.token_bytes(nbytes)
            c.execute("INSERT INTO meta(key, value) VALUES (?, ?)", (key, value.hex()))
            return value

    # ---- users

    def add_user(self, email: str, password: str, now: float, user_id: str | None = None) -> User:
        """A new user; the password is stored as a scrypt hash."""
        if not email or "@" not in email:
            raise InvalidRequest("user name must be an e-mail address")
        if not password:
            raise InvalidRequest("password must not be empty")
        user_id = user_id or str(uuid.uuid4())
        pw_hash = hash_password(password)
        with self._tx() as c:
            if c.execute("SELECT 1 FROM users WHERE email = ?", (email,)).fetchone():
                raise Conflict(f"user {email} already exists")
            c.execute(
                "INSERT INTO users(user_id, email, password_hash, created_at) VALUES (?, ?, ?, ?)", (user_id, email, pw_hash, now)
            )
        return User(user_id, email, now)

    def authenticate(self, email: str, password: str) -> User | None:
        """The user if the password matches; the same scrypt cost is paid for unknown users."""
        with self._read() as c:
            row = c.execute("SELECT * FROM users WHERE email = ?", (email,)).fetchone()
        if row is None:
            verify_password(password, _DUMMY_PASSWORD_HASH)
            return None
        if not verify_password(password, row["password_hash"]):
            return None
        return User(row["user_id"], row["email"], row["created_at"])

    def user_by_id(self, user_id: str) -> User | None:
        with self._read() as c:
            row = c.execute("SELECT user_id, email, created_at FROM users WHERE user_id = ?", (user_id,)).fetchone()
        return User(row["user_id"], row["email"], row["created_at"]) if row else None

    def user_by_email(self, email: str) -> User | None:
        with self._read() as c:
            row = c.execute("SELECT user_id, email, created_at FROM users WHERE email = ?", (email,)).fetchone()
        return User(row["user_id"], row["email"], row["created_at"]) if row else None

    # ---- refresh tokens

    def add_refresh_token(self, token: str, user_id: str, now: float, ttl: float = REFRESH_TOKEN_TTL_S) -> None:
        with self._tx() as c:
            c.execute(
                "INSERT INTO refresh_tokens(token_hash, user_id, issued_at, expires_at) VALUES (?, ?, ?, ?)",
                (digest_secret(token), user_id, now, now + ttl),
            )

    def refresh_token_user(self, token: str, now: float) -> User | None:
        """The user a valid (known, unexpired, unrevoked) refresh token belongs to."""
        with self._read() as c:
            row = c.execute(
                "SELECT u.user_id, u.email, u.created_at FROM refresh_tokens t JOIN users u USING (user_id) "
                "WHERE t.token_hash = ? AND t.revoked_at IS NULL AND t.expires_at > ?",
                (digest_secret(token), now),
            ).fetchone()
        return User(row["user_id"], row["email"], row["created_at"]) if row else None

    def revoke_refresh_tokens(self, user_id: str, now: float) -> int:
        with self._tx() as c:
            return c.execute(
                "UPDATE refresh_tokens SET revoked_at = ? WHERE user_id = ? AND revoked_at IS NULL", (now, user_id)
            ).rowcount

    # ---- nodes

    @staticmethod
    def _node(row: sqlite3.Row) -> Node:
        return Node(
            node_id=row["node_id"],
            config=json.loads(row["config"]) if row["config"] else None,
            params=json.loads(row["params"]),
            connected=bool(row["connected"]),
            connectivity_ts=row["connectivity_ts"],
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    @staticmethod
    def _ensure_node(c: sqlite3.Connection, node_id: str, now: float) -> None:
        c.execute("INSERT OR IGNORE INTO nodes(node_id, created_at, updated_at) VALUES (?, ?, ?)", (node_id, now, now))

    def get_node(self, node_id: str) -> Node | None:
        with self._read() as c:
            row = c.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
        return self._node(row) if row else None

    def set_node_config(self, node_id: str, config: dict[str, Any], now: float) -> None:
        with self._tx() as c:
            self._ensure_node(c, node_id, now)
            c.execute("UPDATE nodes SET config = ?, updated_at = ? WHERE node_id = ?", (json.dumps(config), now, node_id))

    def update_node_params(self, node_id: str, params: dict[str, Any], now: float, *, replace: bool) -> dict[str, Any]:
        """Apply a ``params/local`` delta (merged per device) or a ``params/local/init`` full state (*replace*)."""
        with self._tx() as c:
            self._ensure_node(c, node_id, now)
            current = json.loads(c.execute("SELECT params FROM nodes WHERE node_id = ?", (node_id,)).fetchone()[0])
            if replace:
                current = dict(params)
            else:
                for device, values in params.items():
                    if isinstance(values, dict) and isinstance(current.get(device), dict):
                        current[device] = {**current[device], **values}
                    else:
                        current[device] = values
            c.execute("UPDATE nodes SET params = ?, updated_at = ? WHERE node_id = ?", (json.dumps(current), now, node_id))
            return current

    def set_connectivity(self, node_id: str, connected: bool, now: float) -> None:
        """Record a connectivity change; the timestamp moves only when the state changes."""
        with self._tx() as c:
            self._ensure_node(c, node_id, now)
            c.execute(
                "UPDATE nodes SET connectivity_ts = CASE WHEN connected = ? AND connectivity_ts IS NOT NULL "
                "THEN connectivity_ts ELSE ? END, connected = ?, updated_at = ? WHERE node_id = ?",
                (int(connected), now, int(connected), now, node_id),
            )

    def add_alert(self, node_id: str, payload: Any, now: float) -> None:
        with self._tx() as c:
            self._ensure_node(c, node_id, now)
            c.execute("INSERT INTO node_alerts(node_id, payload, received_at) VALUES (?, ?, ?)", (node_id, json.dumps(payload), now))

    def alerts(self, node_id: str) -> list[tuple[float, Any]]:
        with self._read() as c:
            rows = c.execute("SELECT payload, received_at FROM node_alerts WHERE node_id = ? ORDER BY id", (node_id,)).fetchall()
        return [(r["received_at"], json.loads(r["payload"])) for r in rows]

    # ---- mappings and access

    def role_of(self, user_id: str, node_id: str) -> Role | None:
        """The user's role on the node, or ``None``: the one access check every node-scoped call makes."""
        with self._read() as c:
            row = c.execute("SELECT role FROM mappings WHERE user_id = ? AND node_id = ?", (user_id, node_id)).fetchone()
        return Role(row["role"]) if row else None

    def user_nodes(self, user_id: str, start_id: str | None = None, limit: int | None = None) -> list[UserNode]:
        """The user's nodes ordered by node id, from *start_id* (inclusive) on."""
        sql = (
            "SELECT n.*, m.role, m.mapped_at FROM mappings m JOIN nodes n USING (node_id) "
            "WHERE m.user_id = ? AND n.node_id >= ? ORDER BY n.node_id"
        )
        args: list[Any] = [user_id, start_id or ""]
        if limit is not None:
            sql += " LIMIT ?"
            args.append(limit)
        with self._read() as c:
            rows = c.execute(sql, args).fetchall()
        return [UserNode(self._node(r), Role(r["role"]), r["mapped_at"]) for r in rows]

    def map_node(self, node_id: str, user_id: str, role: Role, now: float) -> None:
        """Map directly (fixtures and ``rig`` commands; clients go through mapping requests)."""
        with self._tx() as c:
            self._ensure_node(c, node_id, now)
            if role is Role.PRIMARY:
                c.execute("DELETE FROM mappings WHERE node_id = ?", (node_id,))
            c.execute(
                "INSERT OR REPLACE INTO mappings(node_id, user_id, role, mapped_at) VALUES (?, ?, ?, ?)", (node_id, user_id, role, now)
            )

    @staticmethod
    def _mapping_request(row: sqlite3.Row) -> MappingRequest:
        return MappingRequest(
            request_id=row["request_id"],
            node_id=row["node_id"],
            user_id=row["user_id"],
            operation=row["operation"],
            status=MappingStatus(row["status"]),
            user_at=row["user_at"],
            node_at=row["node_at"],
            node_reset=bool(row["node_reset"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    @staticmethod
    def _expire_mapping_requests(c: sqlite3.Connection, now: float, window: float) -> None:
        c.execute(
            "UPDATE mapping_requests SET status = 'timedout', updated_at = ? WHERE status = 'requested' AND created_at < ?",
            (now, now - window),
        )

    @staticmethod
    def _confirm_add(c: sqlite3.Connection, node_id: str, user_id: str, now: float) -> None:
        """A confirmed add makes the user the node's only primary.

        Both halves agreeing proves the user provisioned the node (the node learnt user id and
        secret over the encrypted ``cloud_user_assoc`` endpoint), so earlier users and their
        shares are dropped, as when a RainMaker node is re-provisioned by a new owner.
        """
        CloudStore._ensure_node(c, node_id, now)
        c.execute("DELETE FROM mappings WHERE node_id = ?", (node_id,))
        c.execute("INSERT INTO mappings(node_id, user_id, role, mapped_at) VALUES (?, ?, 'primary', ?)", (node_id, user_id, now))

    def mapping_user_half(
        self, node_id: str, user_id: str, secret: str, now: float, window: float = MAPPING_WINDOW_S
    ) -> MappingRequest:
        """The client's ``PUT v1/user/nodes/mapping`` ``operation: add`` (esp-rainmaker-cli ``rmaker_lib/node.py``).

        Confirms at once if the node's half (same node, same user id, same secret) arrived in
        the last *window* seconds; otherwise records a ``requested`` request that the node's
        half may confirm later. A newer request by the same user for the same node discards
        the older open one.
        """
        if not secret:
            raise InvalidRequest("secret_key must not be empty for operation add")
        digest = digest_secret(secret)
        with self._tx() as c:
            self._expire_mapping_requests(c, now, window)
            if c.execute("SELECT 1 FROM users WHERE user_id = ?", (user_id,)).fetchone() is None:
                raise NotFound("user not found")
            candidates = c.execute(
                "SELECT * FROM mapping_requests WHERE node_id = ? AND user_id = ? AND status = 'requested' "
                "AND user_at IS NULL AND operation = 'add' ORDER BY node_at DESC",
                (node_id, user_id),
            ).fetchall()
            match = next((r for r in candidates if _same_secret(r["node_secret_hash"], digest)), None)
            if match is not None:
                c.execute(
                    "UPDATE mapping_requests SET user_secret_hash = ?, user_at = ?, status = 'confirmed', updated_at = ? "
                    "WHERE request_id = ?",
                    (digest, now, now, match["request_id"]),
                )
                self._confirm_add(c, node_id, user_id, now)
                request_id = match["request_id"]
            else:
                c.execute(
                    "UPDATE mapping_requests SET status = 'discarded', updated_at = ? WHERE node_id = ? AND user_id = ? "
                    "AND status = 'requested' AND user_at IS NOT NULL",
                    (now, node_id, user_id),
                )
                request_id = _new_id()
                c.execute(
                    "INSERT INTO mapping_requests(request_id, node_id, user_id, operation, user_secret_hash, user_at, status, "
                    "created_at, updated_at) VALUES (?, ?, ?, 'add', ?, ?, 'requested', ?, ?)",
                    (request_id, node_id, user_id, digest, now, now, now),
                )
            row = c.execute("SELECT * FROM mapping_requests WHERE request_id = ?", (request_id,)).fetchone()
        return self._mapping_request(row)

    def mapping_node_half(
        self, node_id: str, user_id: str, secret: str, reset: bool, now: float, window: float = MAPPING_WINDOW_S
    ) -> MappingRequest | None:
        """The node's ``user/mapping`` message ``{node_id, user_id, secret_key[, reset]}`` (esp-rainmaker
        ``src/core/esp_rmaker_user_mapping.c``); *node_id* is the one the broker authenticated.

        Confirms the user's open request with the same secret if there is one; otherwise
        waits *window* seconds for it. The factory-reset report (user ``esp-rmaker``, secret
        ``failed``) drops the node's mappings instead and returns ``None``.
        """
        digest = digest_secret(secret)
        with self._tx() as c:
            self._expire_mapping_requests(c, now, window)
            self._ensure_node(c, node_id, now)
            if user_id == FACTORY_RESET_USER_ID and secret == FACTORY_RESET_SECRET:
                c.execute("DELETE FROM mappings WHERE node_id = ?", (node_id,))
                c.execute(
                    "UPDATE mapping_requests SET status = 'discarded', updated_at = ? WHERE node_id = ? AND status = 'requested'",
                    (now, node_id),
                )
                return None
            candidates = c.execute(
                "SELECT * FROM mapping_requests WHERE node_id = ? AND user_id = ? AND status = 'requested' "
                "AND node_at IS NULL AND operation = 'add' ORDER BY user_at DESC",
                (node_id, user_id),
            ).fetchall()
            match = next((r for r in candidates if _same_secret(r["user_secret_hash"], digest)), None)
            if match is not None:
                request_id = match["request_id"]
                c.execute(
                    "UPDATE mapping_requests SET node_secret_hash = ?, node_at = ?, node_reset = ?, status = 'confirmed', "
                    "updated_at = ? WHERE request_id = ?",
                    (digest, now, int(reset), now, request_id),
                )
                self._confirm_add(c, node_id, user_id, now)
            else:
                # A newer node half replaces this node's earlier unanswered ones (it was re-provisioned).
                c.execute(
                    "UPDATE mapping_requests SET status = 'discarded', updated_at = ? WHERE node_id = ? "
                    "AND status = 'requested' AND user_at IS NULL",
                    (now, node_id),
                )
                request_id = _new_id()
                c.execute(
                    "INSERT INTO mapping_requests(request_id, node_id, user_id, operation, node_secret_hash, node_at, node_reset, "
                    "status, created_at, updated_at) VALUES (?, ?, ?, 'add', ?, ?, ?, 'requested', ?, ?)",
                    (request_id, node_id, user_id, digest, now, int(reset), now, now),
                )
            row = c.execute("SELECT * FROM mapping_requests WHERE request_id = ?", (request_id,)).fetchone()
        return self._mapping_request(row)

    def remove_mapping(self, node_id: str, user_id: str, now: float) -> MappingRequest:
        """``operation: remove``: a primary user's removal drops every mapping of the node, a secondary's only its own."""
        with self._tx() as c:
            row = c.execute("SELECT role FROM mappings WHERE node_id = ? AND user_id = ?", (node_id, user_id)).fetchone()
            if row is None:
                raise Forbidden(f"node {node_id} is not associated with this user")
            if row["role"] == Role.PRIMARY:
                c.execute("DELETE FROM mappings WHERE node_id = ?", (node_id,))
            else:
                c.execute("DELETE FROM mappings WHERE node_id = ? AND user_id = ?", (node_id, user_id))
            request_id = _new_id()
            c.execute(
                "INSERT INTO mapping_requests(request_id, node_id, user_id, operation, user_at, status, created_at, updated_at) "
                "VALUES (?, ?, ?, 'remove', ?, 'confirmed', ?, ?)",
                (request_id, node_id, user_id, now, now, now),
            )
            out = c.execute("SELECT * FROM mapping_requests WHERE request_id = ?", (request_id,)).fetchone()
        return self._mapping_request(out)

    def mapping_request(self, request_id: str, user_id: str, now: float, window: float = MAPPING_WINDOW_S) -> MappingRequest | None:
        """A request the user made (``GET v1/user/nodes/mapping?request_id=``), with timeouts applied."""
        with self._tx() as c:
            self._expire_mapping_requests(c, now, window)
            row = c.execute(
                "SELECT * FROM mapping_requests WHERE request_id = ? AND user_id = ? AND user_at IS NOT NULL", (request_id, user_id)
            ).fetchone()
        return self._mapping_request(row) if row else None

    # ---- sharing

    def _sharing_request(self, c: sqlite3.Connection, request_id: str) -> SharingRequest | None:
        row = c.execute(
            "SELECT s.*, p.email AS primary_email, u.email AS user_email FROM sharing_requests s "
            "JOIN users p ON p.user_id = s.primary_user_id JOIN users u ON u.user_id = s.user_id WHERE s.request_id = ?",
            (request_id,),
        ).fetchone()
        if row is None:
            return None
        return SharingRequest(
            request_id=row["request_id"],
            primary_user_id=row["primary_user_id"],
            primary_email=row["primary_email"],
            user_id=row["user_id"],
            user_email=row["user_email"],
            node_ids=tuple(json.loads(row["node_ids"])),
            status=SharingStatus(row["status"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    @staticmethod
    def _expire_sharing(c: sqlite3.Connection, now: float) -> None:
        c.execute(
            "UPDATE sharing_requests SET status = 'timedout', updated_at = ? WHERE status = 'pending' AND created_at < ?",
            (now, now - SHARING_REQUEST_TTL_S),
        )

    def create_sharing_request(self, primary_user_id: str, node_ids: Sequence[str], user_email: str, now: float) -> SharingRequest:
        """``PUT v1/user/nodes/sharing``: only the primary user of every listed node may share it.

        Nothing changes until the other user accepts (:meth:`respond_sharing_request`).
        """
        if not node_ids:
            raise InvalidRequest("nodes must list at least one node id")
        with self._tx() as c:
            target = c.execute("SELECT user_id FROM users WHERE email = ?", (user_email,)).fetchone()
            if target is None:
                raise NotFound(f"user {user_email} not found")
            if target["user_id"] == primary_user_id:
                raise InvalidRequest("a node cannot be shared with its own primary user")
            for node_id in node_ids:
                row = c.execute("SELECT role FROM mappings WHERE node_id = ? AND user_id = ?", (node_id, primary_user_id)).fetchone()
                if row is None or row["role"] != Role.PRIMARY:
                    raise Forbidden(f"only the primary user of node {node_id} can share it")
            request_id = _new_id()
            c.execute(
                "INSERT INTO sharing_requests(request_id, primary_user_id, user_id, node_ids, status, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, 'pending', ?, ?)",
                (request_id, primary_user_id, target["user_id"], json.dumps(list(dict.fromkeys(node_ids))), now, now),
            )
            out = self._sharing_request(c, request_id)
        assert out is not None
        return out

    def respond_sharing_request(self, request_id: str, user_id: str, accept: bool, now: float) -> SharingRequest:
        """``PUT v1/user/nodes/sharing/requests {"accept", "request_id"}`` by the user it was sent to.

        Accepting maps the user as ``secondary`` on every node the sender is still primary of;
        declining is final.
        """
        with self._tx() as c:
            self._expire_sharing(c, now)
            req = self._sharing_request(c, request_id)
            if req is None or req.user_id != user_id:
                raise NotFound("sharing request not found")
            if req.status is not SharingStatus.PENDING:
                raise Conflict(f"sharing request is {req.status.value}, not pending")
            if accept:
                for node_id in req.node_ids:
                    owner = c.execute(
                        "SELECT 1 FROM mappings WHERE node_id = ? AND user_id = ? AND role = 'primary'", (node_id, req.primary_user_id)
                    ).fetchone()
                    if owner is not None:
                        c.execute(
                            "INSERT OR IGNORE INTO mappings(node_id, user_id, role, mapped_at) VALUES (?, ?, 'secondary', ?)",
                            (node_id, user_id, now),
                        )
            status = SharingStatus.ACCEPTED if accept else SharingStatus.DECLINED
            c.execute("UPDATE sharing_requests SET status = ?, updated_at = ? WHERE request_id = ?", (status, now, request_id))
            out = self._sharing_request(c, request_id)
        assert out is not None
        return out

    def cancel_sharing_request(self, request_id: str, primary_user_id: str, now: float) -> SharingRequest:
        """``DELETE v1/user/nodes/sharing/requests?request_id=`` by the user who sent it."""
        with self._tx() as c:
            self._expire_sharing(c, now)
            req = self._sharing_request(c, request_id)
            if req is None or req.primary_user_id != primary_user_id:
                raise NotFound("sharing request not found")
            if req.status is not SharingStatus.PENDING:
                raise Conflict(f"sharing request is {req.status.value}, not pending")
            c.execute("UPDATE sharing_requests SET status = 'cancelled', updated_at = ? WHERE request_id = ?", (now, request_id))
            out = self._sharing_request(c, request_id)
        assert out is not None
        return out

    def sharing_requests(self, user_id: str, *, as_primary: bool, now: float, request_id: str | None = None) -> list[SharingRequest]:
        """Requests the user sent (*as_primary*) or received, newest first."""
        column = "primary_user_id" if as_primary else "user_id"
        sql = f"SELECT request_id FROM sharing_requests WHERE {column} = ?"
        args: list[Any] = [user_id]
        if request_id is not None:
            sql += " AND request_id = ?"
            args.append(request_id)
        with self._tx() as c:
            self._expire_sharing(c, now)
            ids = [r[0] for r in c.execute(sql + " ORDER BY created_at DESC, request_id", args).fetchall()]
            out = [self._sharing_request(c, i) for i in ids]
        return [r for r in out if r is not None]

    def unshare(self, actor_user_id: str, node_ids: Sequence[str], user_email: str) -> None:
        """``DELETE v1/user/nodes/sharing?nodes=&user_name=``: the primary removes a secondary, or a secondary leaves."""
        with self._tx() as c:
            target = c.execute("SELECT user_id FROM users WHERE email = ?", (user_email,)).fetchone()
            if target is None:
                raise NotFound(f"user {user_email} not found")
            for node_id in node_ids:
                actor = c.execute("SELECT role FROM mappings WHERE node_id = ? AND user_id = ?", (node_id, actor_user_id)).fetchone()
                if actor is None:
                    raise Forbidden(f"node {node_id} is not associated with this user")
                if actor["role"] != Role.PRIMARY and target["user_id"] != actor_user_id:
                    raise Forbidden(f"only the primary user of node {node_id} can remove other users")
                removed = c.execute(
                    "DELETE FROM mappings WHERE node_id = ? AND user_id = ? AND role = 'secondary'", (node_id, target["user_id"])
                ).rowcount
                if not removed:
                    raise NotFound(f"node {node_id} is not shared with {user_email}")

    def node_sharing(self, node_id: str) -> NodeSharing:
        with self._read() as c:
            rows = c.execute(
                "SELECT m.role, u.email FROM mappings m JOIN users u USING (user_id) WHERE m.node_id = ? ORDER BY m.mapped_at, u.email",
                (node_id,),
            ).fetchall()
        return NodeSharing(
            node_id,
            tuple(r["email"] for r in rows if r["role"] == Role.PRIMARY),
            tuple(r["email"] for r in rows if r["role"] == Role.SECONDARY),
        )

    # ---- OTA

    @staticmethod
    def _ota_image(row: sqlite3.Row) -> OtaImage:
        return OtaImage(
            image_id=row["image_id"],
            user_id=row["user_id"],
            image_name=row["image_name"],
            fw_version=row["fw_version"],
            project_name=row["project_name"],
            secure_version=row["secure_version"],
            file_size=row["file_size"],
            sha256=row["sha256"],
            created_at=row["created_at"],
        )

    def add_ota_image(
        self,
        user_id: str,
        image_name: str,
        data: bytes,
        fw_version: str,
        now: float,
        project_name: str | None = None,
        secure_version: int | None = None,
    ) -> OtaImage:
        image_id = _new_id()
        with self._tx() as c:
            c.execute(
                "INSERT INTO ota_images(image_id, user_id, image_name, fw_version, project_name, secure_version, file_size, sha256, "
                "data, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (image_id, user_id, image_name, fw_version, project_name, secure_version, len(data),
                 hashlib.sha256(data).hexdigest(), data, now),
            )
            row = c.execute("SELECT * FROM ota_images WHERE image_id = ?", (image_id,)).fetchone()
        return self._ota_image(row)

    def ota_image(self, image_id: str, user_id: str | None = None) -> OtaImage | None:
        """An image, optionally only if *user_id* uploaded it."""
        with self._read() as c:
            row = c.execute("SELECT * FROM ota_images WHERE image_id = ?", (image_id,)).fetchone()
        if row is None or (user_id is not None and row["user_id"] != user_id):
            return None
        return self._ota_image(row)

    def ota_image_data(self, image_id: str) -> bytes:
        with self._read() as c:
            row = c.execute("SELECT data FROM ota_images WHERE image_id = ?", (image_id,)).fetchone()
        if row is None:
            raise NotFound("OTA image not found")
        return bytes(row["data"])

    def ota_images(self, user_id: str) -> list[OtaImage]:
        with self._read() as c:
            rows = c.execute("SELECT * FROM ota_images WHERE user_id = ? ORDER BY created_at, image_id", (user_id,)).fetchall()
        return [self._ota_image(r) for r in rows]

    def create_ota_job(self, user_id: str, image_id: str, node_ids: Sequence[str], job_name: str, now: float) -> str:
        """An OTA job of one image for nodes the user is primary of; each node starts ``pending``."""
        if not node_ids:
            raise InvalidRequest("node_ids must list at least one node id")
        with self._tx() as c:
            img = c.execute("SELECT user_id FROM ota_images WHERE image_id = ?", (image_id,)).fetchone()
            if img is None or img["user_id"] != user_id:
                raise NotFound("OTA image not found")
            for node_id in node_ids:
                role = c.execute("SELECT role FROM mappings WHERE node_id = ? AND user_id = ?", (node_id, user_id)).fetchone()
                if role is None or role["role"] != Role.PRIMARY:
                    raise Forbidden(f"only the primary user of node {node_id} can update its firmware")
            job_id = _new_id()
            c.execute(
                "INSERT INTO ota_jobs(job_id, image_id, user_id, job_name, created_at) VALUES (?, ?, ?, ?, ?)",
                (job_id, image_id, user_id, job_name, now),
            )
            for node_id in dict.fromkeys(node_ids):
                c.execute(
                    "INSERT INTO ota_job_nodes(job_id, node_id, status, updated_at) VALUES (?, ?, 'pending', ?)", (job_id, node_id, now)
                )
        return job_id

    @staticmethod
    def _job_node(row: sqlite3.Row) -> OtaJobNode:
        return OtaJobNode(
            job_id=row["job_id"],
            node_id=row["node_id"],
            image_id=row["image_id"],
            user_id=row["user_id"],
            status=OtaNodeStatus(row["status"]),
            additional_info=row["additional_info"],
            url=row["url"],
            updated_at=row["updated_at"],
        )

    _JOB_NODE_SQL = "SELECT jn.*, j.image_id, j.user_id FROM ota_job_nodes jn JOIN ota_jobs j USING (job_id)"

    def ota_job_nodes(self, job_id: str) -> list[OtaJobNode]:
        with self._read() as c:
            rows = c.execute(self._JOB_NODE_SQL + " WHERE jn.job_id = ? ORDER BY jn.node_id", (job_id,)).fetchall()
        return [self._job_node(r) for r in rows]

    def ota_job_node(self, job_id: str, node_id: str) -> OtaJobNode | None:
        with self._read() as c:
            row = c.execute(self._JOB_NODE_SQL + " WHERE jn.job_id = ? AND jn.node_id = ?", (job_id, node_id)).fetchone()
        return self._job_node(row) if row else None

    def latest_ota_job_node(self, node_id: str, *, open_only: bool = False) -> OtaJobNode | None:
        """The node's newest job (optionally only one not finished: not success/failed/rejected)."""
        sql = self._JOB_NODE_SQL + " WHERE jn.node_id = ?"
        if open_only:
            sql += " AND jn.status NOT IN ('success', 'failed', 'rejected')"
        with self._read() as c:
            row = c.execute(sql + " ORDER BY j.created_at DESC, j.rowid DESC LIMIT 1", (node_id,)).fetchone()
        return self._job_node(row) if row else None

    def mark_ota_triggered(self, job_id: str, node_id: str, url: str, now: float) -> None:
        """The ``otaurl`` for this job was published to the node."""
        with self._tx() as c:
            c.execute(
                "UPDATE ota_job_nodes SET url = ?, updated_at = ?, status = CASE WHEN status = 'pending' THEN 'triggered' "
                "ELSE status END WHERE job_id = ? AND node_id = ?",
                (url, now, job_id, node_id),
            )

    def mark_ota_failed(self, job_id: str, node_id: str, reason: str, now: float) -> None:
        """The cloud could not start the job on this node (e.g. no signing key matches the node)."""
        with self._tx() as c:
            c.execute(
                "UPDATE ota_job_nodes SET status = 'failed', additional_info = ?, updated_at = ? WHERE job_id = ? AND node_id = ?",
                (reason, now, job_id, node_id),
            )
            c.execute(
                "INSERT INTO ota_status_history(job_id, node_id, status, additional_info, node_ts, received_at) "
                "VALUES (?, ?, 'failed', ?, NULL, ?)",
                (job_id, node_id, reason, now),
            )

    def record_ota_status(
        self, node_id: str, job_id: str, status: str, additional_info: str, node_ts: float | None, now: float
    ) -> bool:
        """An ``otastatus`` report; ignored (``False``) unless the job includes this node."""
        with self._tx() as c:
            if c.execute("SELECT 1 FROM ota_job_nodes WHERE job_id = ? AND node_id = ?", (job_id, node_id)).fetchone() is None:
                return False
            c.execute(
                "INSERT INTO ota_status_history(job_id, node_id, status, additional_info, node_ts, received_at) VALUES (?, ?, ?, ?, ?, ?)",
                (job_id, node_id, status, additional_info, node_ts, now),
            )
            if status in NODE_REPORTED_OTA_STATUSES:
                c.execute(
                    "UPDATE ota_job_nodes SET status = ?, additional_info = ?, updated_at = ? WHERE job_id = ? AND node_id = ?",
                    (status, additional_info, now, job_id, node_id),
                )
        return True

    def ota_status_history(self, job_id: str, node_id: str) -> list[OtaStatusReport]:
        with self._read() as c:
            rows = c.execute(
                "SELECT * FROM ota_status_history WHERE job_id = ? AND node_id = ? ORDER BY id", (job_id, node_id)
            ).fetchall()
        return [
            OtaStatusReport(r["job_id"], r["node_id"], r["status"], r["additional_info"], r["node_ts"], r["received_at"]) for r in rows
        ]

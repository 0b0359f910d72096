"""Tokens of the local cloud, shaped like RainMaker's Cognito tokens.

``POST v1/login2`` returns ``idtoken``, ``accesstoken`` (JWTs) and ``refreshtoken``
(opaque); ``{"refreshtoken"}`` returns a new ``accesstoken`` and ``idtoken``
(esp-rainmaker-cli ``rmaker_lib/user.py``, ``rmaker_lib/configmanager.py``). Clients send
the access token raw in ``Authorization`` (no ``Bearer``, ``rmaker_lib/session.py``).

What the CLI reads from the tokens (``configmanager.get_token_attribute``): the access
token's ``exp`` (it refreshes when ``exp <= now``), the id token's ``custom:user_id`` and
``email``. It decodes the payload with ``base64.b64decode`` — the *standard* alphabet,
which silently drops the base64url characters ``-`` and ``_`` and yields garbage. So every
payload this module signs is encoded to contain neither (see :func:`cli_safe_json`).

Tokens are HS256 with a per-stack key kept in the store; lifetimes follow the injected
:class:`~rig.cloud.clock.Clock`, so a test moves past the 1-hour access-token lifetime by
advancing the clock.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

from rig.cloud.clock import Clock
from rig.cloud.store import CloudStore, User

ACCESS_TOKEN_TTL_S = 3600
"""Access and id tokens are valid one hour, as RainMaker's (Cognito's default)."""

ISSUER = "rig-cloud"
JWT_KEY_NAME = "jwt-hs256"

_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_HEADER = {"alg": "HS256", "typ": "JWT"}
_CLI_UNSAFE = {">": "\\u003e", "?": "\\u003f", "~": "\\u007e", "\x7f": "\\u007f"}


class TokenError(Exception):
    """A token that is malformed, forged, expired or of the wrong kind. The message is safe to return."""


class InvalidCredentials(Exception):
    """Wrong user name or password, or an unknown/expired refresh token."""


@dataclass(frozen=True)
class TokenSet:
    idtoken: str
    accesstoken: str
    refreshtoken: str | None = None


@dataclass(frozen=True)
class AccessClaims:
    user_id: str
    email: str
    issued_at: int
    expires_at: int


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    if len(text) % 4 == 1 or not _B64URL.fullmatch(text):
        raise TokenError("malformed token")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def cli_safe_json(claims: dict[str, Any]) -> bytes:
    """JSON whose base64url encoding never contains ``-`` or ``_``.

    For ASCII bytes ``b0 b1 b2`` the four base64 digits are ``b0>>2`` (≤ 31),
    ``(b0&3)<<4 | b1>>4`` (≤ 55), ``(b1&15)<<2 | b2>>6`` (≤ 61) and ``b2&63``; only the last
    can reach 62 (``-``) or 63 (``_``), exactly when ``b2`` is ``>``, ``?``, ``~`` or DEL
    (a 1- or 2-byte tail ends in a digit ≤ 60). ``ensure_ascii`` keeps the JSON ASCII, and
    those four characters — which JSON only allows inside strings — are written as
    ``\\u00XX`` escapes, which decode to the same values. Deterministic: no claim is padded
    or re-rolled.
    """
    text = json.dumps(claims, ensure_ascii=True, separators=(",", ":"), sort_keys=True)
    for char, escape in _CLI_UNSAFE.items():
        text = text.replace(char, escape)
    return text.encode("ascii")


def encode_jwt(claims: dict[str, Any], key: bytes) -> str:
    """A compact HS256 JWS (RFC 7515/7519) with a CLI-safe payload."""
    signing_input = f"{b64url(cli_safe_json(_HEADER))}.{b64url(cli_safe_json(claims))}"
    signature = hmac.new(key, signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def decode_jwt(token: str, key: bytes) -> dict[str, Any]:
    """The verified claims of an HS256 JWT signed with *key*; no other algorithm is accepted."""
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError("malformed token")
    header_b64, payload_b64, signature_b64 = parts
    try:
        header = json.loads(b64url_decode(header_b64))
    except (ValueError, binascii.Error) as exc:
        raise TokenError("malformed token") from exc
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise TokenError("unsupported token algorithm")
    expected = hmac.new(key, f"{header_b64}.{payload_b64}".encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, b64url_decode(signature_b64)):
        raise TokenError("invalid token signature")
    try:
        claims = json.loads(b64url_decode(payload_b64))
    except (ValueError, binascii.Error) as exc:
        raise TokenError("malformed token") from exc
    if not isinstance(claims, dict):
        raise TokenError("malformed token")
    return claims


class TokenAuthority:
    """Issues and checks the stack's tokens against the store's users and refresh tokens."""

    def __init__(self, store: CloudStore, clock: Clock, key: bytes | None = None):
        self._store = store
        self._clock = clock
        self._key = key if key is not None else store.secret(JWT_KEY_NAME)

    def _now(self) -> int:
        return int(self._clock.now())

    def _issue(self, user: User) -> tuple[str, str]:
        now = self._now()
        common = {"iss": ISSUER, "sub": user.user_id, "custom:user_id": user.user_id, "iat": now, "exp": now + ACCESS_TOKEN_TTL_S}
        access = encode_jwt({**common, "token_use": "access", "jti": secrets.token_hex(8)}, self._key)
        ident = encode_jwt(
            {**common, "token_use": "id", "aud": ISSUER, "email": user.email, "email_verified": True, "jti": secrets.token_hex(8)},
            self._key,
        )
        return ident, access

    def login(self, email: str, password: str) -> TokenSet:
        """``POST v1/login2 {"user_name", "password"}`` → id, access and refresh token."""
        user = self._store.authenticate(email, password)
        if user is None:
            raise InvalidCredentials("incorrect user name or password")
        ident, access = self._issue(user)
        refresh = secrets.token_urlsafe(48)
        self._store.add_refresh_token(refresh, user.user_id, self._clock.now())
        return TokenSet(idtoken=ident, accesstoken=access, refreshtoken=refresh)

    def refresh(self, refreshtoken: str) -> TokenSet:
        """``POST v1/login2 {"refreshtoken"}`` → new access and id token (Cognito keeps the refresh token)."""
        user = self._store.refresh_token_user(refreshtoken, self._clock.now())
        if user is None:
            raise InvalidCredentials("invalid or expired refresh token")
        ident, access = self._issue(user)
        return TokenSet(idtoken=ident, accesstoken=access)

    def verify_access(self, token: str) -> AccessClaims:
        """The claims of a valid, unexpired access token of an existing user."""
        claims = decode_jwt(token.strip(), self._key)
        if claims.get("token_use") != "access" or claims.get("iss") != ISSUER:
            raise TokenError("not an access token")
        exp, iat, user_id = claims.get("exp"), claims.get("iat"), claims.get("custom:user_id")
        if not isinstance(exp, int) or not isinstance(iat, int) or not isinstance(user_id, str):
            raise TokenError("malformed token")
        if exp <= self._now():
            raise TokenError("token expired")
        user = self._store.user_by_id(user_id)
        if user is None:
            raise TokenError("unknown user")
        return AccessClaims(user_id=user.user_id, email=user.email, issued_at=iat, expires_at=exp)

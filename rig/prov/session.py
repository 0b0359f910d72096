"""What the phone app's two protocomm clients share: a transport, the PoP, and one security session.

Provisioning (:mod:`rig.prov.provisioner`: ``proto-ver`` / ``prov-session``) and local control
(:mod:`rig.prov.local_ctrl`: ``esp_local_ctrl/version`` / ``esp_local_ctrl/session``) run the same
protocomm conversation once the scheme is known (rainmaker-protocol.md §4.2, §4.4–§4.7; esp-idf
``components/protocomm``): the handshake on the session endpoint, then every request on another
endpoint encrypted with that session. :class:`SessionClient` is that part; each client adds its
version endpoint (whose JSON differs) and its messages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from rig.evidence.redaction import SECRETS
from rig.protocomm.security import DEFAULT_SEC2_USERNAME, ClientSecurity, client_security


class Transport(Protocol):
    """``POST /<endpoint>`` with *data*, the device's answer back (:class:`rig.prov.transport_http.SoftApHttpTransport`)."""

    def send(self, endpoint: str, data: bytes) -> bytes: ...


@dataclass
class SessionClient:
    """One protocomm conversation with one device over *transport*, authenticated with *pop* (and *username* for security 2)."""

    transport: Transport
    pop: str = ""
    username: str = DEFAULT_SEC2_USERNAME
    security: ClientSecurity | None = None

    session_endpoint: ClassVar[str]
    error: ClassVar[type[Exception]] = RuntimeError
    """What a request without a session raises (each client's own error type)."""

    def __post_init__(self) -> None:
        SECRETS.add(self.pop)

    def _handshake(self, sec_ver: int, patch_version: int) -> ClientSecurity:
        """The handshake on :attr:`session_endpoint` with scheme *sec_ver*; ``SessionError`` or a transport error when refused."""
        self.security = client_security(sec_ver, self.pop, self.username, patch_version)
        self.security.handshake(lambda data: self.transport.send(self.session_endpoint, data))
        return self.security

    def _exchange(self, endpoint: str, plaintext: bytes) -> bytes:
        """*plaintext* to *endpoint* encrypted with the session; the decrypted answer."""
        if self.security is None or not self.security.established:
            raise self.error(f"{endpoint}: no secure session yet. Fix: open_session() first")
        return self.security.decrypt(self.transport.send(endpoint, self.security.encrypt(plaintext)))


def status_name(status: int) -> str:
    """A decoded status field's name; proto3 enums are open, so a number the enum lacks stays an int and shows as one."""
    return getattr(status, "name", str(status))

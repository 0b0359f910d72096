"""Protocomm security 0/1/2 sessions, device side and client side (rainmaker-protocol.md §4.4–§4.6).

Device side (what a virtual board runs) follows esp-idf ``components/protocomm/src/security/
security0.c``, ``security1.c``, ``security2.c`` decision by decision:

* one session at a time, keyed by the transport's session id; a new one closes the old;
* a Command0 in any state restarts the handshake; a Command1 outside the "Command0 done" state
  fails with ``ESP_ERR_INVALID_STATE``, a malformed step with ``ESP_ERR_INVALID_ARG`` — as the
  refusal's ``cause``: the request handler hands every handshake-step error to protocomm as
  ``ESP_FAIL``; only an undecodable ``SessionData`` or the wrong scheme is ``ESP_ERR_INVALID_ARG`` itself;
* **a wrong PoP gets no answer at all**: security1.c ("Key mismatch") and security2.c
  ("Failed to authenticate client proof!") return ``ESP_FAIL`` from the request handler instead of
  a ``SessionResp1`` with a status, and the HTTP transport then closes the socket without a
  response. :meth:`DeviceSecurity.handle_session` raises :class:`SecurityRefusal` for that (and for
  every other refusal) and keeps it in :attr:`DeviceSecurity.failure`; the session stays in the
  "Command0 done" state, so — as on the device — another Command1 may be tried;
* security 1: X25519, key = shared secret XOR SHA-256(PoP) (when a PoP is set), AES-256-CTR with the
  16-byte device random as the initial counter block. The CTR state (counter block, stream block,
  offset) is kept the way ``mbedtls_aes_crypt_ctr`` keeps it: one stream per session for both
  directions, and the counter block is *not* reset between Command1 attempts;
* security 2: SRP6a (:mod:`rig.protocomm.srp6a`) then AES-256-GCM with key ``K[0:32]``, 16-byte tag,
  no AAD. ``patch_version`` 0 (ESP-IDF before v5.1.7 / v5.2.6 / v5.3.3 / v5.4.1) reuses the 12-byte
  random nonce for every message; 1 uses an 8-byte random session id ‖ a big-endian 32-bit counter
  starting at 1, bumped after every successful encrypt *and* decrypt (one counter for both
  directions); a counter that wrapped to 0 refuses further crypto.

Client side (the rig's phone-app role) exposes every handshake step on its own —
``command0() / handle_response0() / command1() / handle_response1()`` — so a suite can replay,
truncate or reorder them; :meth:`ClientSecurity.handshake` runs them in order. The bytes a step
returns are fixed per object (asking twice gives the same bytes, for replays).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import Enum
from typing import ClassVar

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rig.protocomm.errors import EspErr, ProtobufDecodeError, SecurityRefusal, SessionError
from rig.protocomm.messages import (
    S0SessionCmd,
    S0SessionResp,
    S2SessionCmd0,
    S2SessionCmd1,
    S2SessionResp0,
    S2SessionResp1,
    Sec0MsgType,
    Sec0Payload,
    Sec1MsgType,
    Sec1Payload,
    Sec2MsgType,
    Sec2Payload,
    SecSchemeVersion,
    SessionCmd0,
    SessionCmd1,
    SessionData,
    SessionResp0,
    SessionResp1,
    Status,
)
from rig.protocomm.srp6a import N_LEN, PROOF_LEN, SrpClient, SrpCredentials, SrpError, SrpVerifier

SEC1_KEY_LEN = 32  # X25519 public key / AES-256 key (security1.c PUBLIC_KEY_LEN)
SEC1_RANDOM_LEN = 16  # security1.c SZ_RANDOM
GCM_NONCE_LEN = 12  # security2.c AES_GCM_IV_SIZE
GCM_SESSION_ID_LEN = 8  # security2.c SESSION_ID_LEN
GCM_TAG_LEN = 16
DEFAULT_SEC2_USERNAME = "wifiprov"  # esp-rainmaker examples/common/app_network (rainmaker-protocol.md §4.1)
_SESSION_ID_MASK = 0xFFFFFFFF

_CMD0, _CMD1, _DONE = 0, 1, 2  # SESSION_STATE_CMD0 / _CMD1 / _DONE in security1.c and security2.c


class SecurityEvent(Enum):
    """``PROTOCOMM_SECURITY_SESSION_*`` events the device posts (esp-idf ``protocomm_security.h``)."""

    SETUP_OK = "PROTOCOMM_SECURITY_SESSION_SETUP_OK"
    INVALID_SECURITY_PARAMS = "PROTOCOMM_SECURITY_SESSION_INVALID_SECURITY_PARAMS"
    CREDENTIALS_MISMATCH = "PROTOCOMM_SECURITY_SESSION_CREDENTIALS_MISMATCH"


class AesCtrStream:
    """AES-CTR run the way ``mbedtls_aes_crypt_ctr`` runs it over several calls.

    State is the 128-bit big-endian counter block (advanced once per keystream block), the current
    stream block and the offset into it. Encryption and decryption are the same operation, and both
    directions of a security 1 session draw from this one stream in call order.
    """

    def __init__(self, key: bytes, counter_block: bytes | int):
        self._ecb = Cipher(algorithms.AES(key), modes.ECB()).encryptor()
        self.counter = counter_block if isinstance(counter_block, int) else int.from_bytes(counter_block, "big")
        self._block = b""
        self._offset = 0  # 0: the next byte needs a fresh stream block

    def apply(self, data: bytes) -> bytes:
        keystream = bytearray()
        if self._offset:
            keystream += self._block[self._offset : self._offset + len(data)]
            self._offset = (self._offset + len(keystream)) % 16
        remaining = len(data) - len(keystream)
        if remaining:
            blocks = -(-remaining // 16)
            counters = b"".join(((self.counter + i) & ((1 << 128) - 1)).to_bytes(16, "big") for i in range(blocks))
            stream = self._ecb.update(counters)
            self.counter = (self.counter + blocks) & ((1 << 128) - 1)
            keystream += stream[:remaining]
            self._block = stream[-16:]
            self._offset = remaining % 16
        return bytes(a ^ b for a, b in zip(data, keystream, strict=True))


def _refuse(err: EspErr, reason: str, tag: str, log: str) -> SecurityRefusal:
    return SecurityRefusal(err, reason, (tag, log))


def _sec1_key(shared: bytes, pop: bytes) -> bytes:
    """Security 1's AES key: the X25519 shared secret, XORed with SHA-256(PoP) when there is a PoP (security1.c, esp_prov)."""
    if not pop:
        return shared
    return bytes(a ^ b for a, b in zip(shared, hashlib.sha256(pop).digest(), strict=True))


@contextmanager
def _session_setup() -> Iterator[None]:
    """``secN_session_setup`` errors reach protocomm as ESP_FAIL ("Session setup error %d"), the step's code kept as cause."""
    try:
        yield
    except SecurityRefusal as refusal:
        raise SecurityRefusal(EspErr.ESP_FAIL, refusal.reason, refusal.device_log, cause=refusal.esp_err) from refusal


def _decode_session_data(request: bytes, tag: str) -> SessionData:
    try:
        return SessionData.decode(request)
    except ProtobufDecodeError as exc:
        raise _refuse(EspErr.ESP_ERR_INVALID_ARG, f"request is not a SessionData ({exc.problem} at byte {exc.offset})", tag,
                      "Unable to unpack setup_req") from exc


# =====================================================================================================
# device side
# =====================================================================================================


class DeviceSecurity(ABC):
    """One protocomm security scheme as the device runs it (``protocomm_security_t``).

    Thread-safe: the HTTP server may call it from several connection threads.
    """

    version: ClassVar[int]
    encrypts: ClassVar[bool] = True  # security 0 has no encrypt/decrypt: protocomm passes plaintext
    _tag: ClassVar[str]

    def __init__(self, on_event: Callable[[SecurityEvent], None] | None = None):
        self.session_id: int | None = None
        self.events: list[SecurityEvent] = []
        self.failure: SecurityRefusal | None = None
        self._on_event = on_event
        self._lock = threading.RLock()

    @property
    def patch_version(self) -> int:
        return 0

    @property
    @abstractmethod
    def established(self) -> bool:
        """Whether the current session finished its handshake (so payloads can be encrypted)."""

    # sessions -------------------------------------------------------------------------------------
    def new_session(self, session_id: int) -> None:
        """``new_transport_session``: only one session at a time; an open one is closed first."""
        with self._lock:
            if self.session_id is not None:
                self._reset()
            self.session_id = session_id & _SESSION_ID_MASK

    def close_session(self, session_id: int) -> None:
        """``close_transport_session``; closing a session that is not the current one is refused."""
        with self._lock:
            if self.session_id != session_id & _SESSION_ID_MASK:
                raise _refuse(EspErr.ESP_ERR_INVALID_STATE, f"session {session_id} is not open", self._tag,
                              "Attempt to close invalid session")
            self._reset()
            self.session_id = None

    def _resolve(self, session_id: int | None) -> int:
        if session_id is None:
            if self.session_id is None:
                self.new_session(0)
            return self.session_id  # type: ignore[return-value]
        if self.session_id != session_id & _SESSION_ID_MASK:
            raise _refuse(EspErr.ESP_ERR_INVALID_STATE, f"no session {session_id} (current: {self.session_id})", self._tag,
                          f"Invalid session ID : {session_id} (expected {self.session_id})")
        return self.session_id  # type: ignore[return-value]

    def _post(self, event: SecurityEvent) -> None:
        self.events.append(event)
        if self._on_event is not None:
            self._on_event(event)

    # operations -----------------------------------------------------------------------------------
    def handle_session(self, request: bytes, session_id: int | None = None) -> bytes:
        """The ``prov-session`` endpoint: one handshake request in, the response out, or :class:`SecurityRefusal`."""
        return self._in_session(self._handle, request, session_id)

    def encrypt(self, data: bytes, session_id: int | None = None) -> bytes:
        return self._in_session(self._encrypt, data, session_id)

    def decrypt(self, data: bytes, session_id: int | None = None) -> bytes:
        return self._in_session(self._decrypt, data, session_id)

    def _in_session(self, operation: Callable[[bytes], bytes], data: bytes, session_id: int | None) -> bytes:
        """*operation* on *data* in session *session_id*; a refusal is kept in :attr:`failure` before it propagates."""
        with self._lock:
            try:
                self._resolve(session_id)
                return operation(bytes(data))
            except SecurityRefusal as refusal:
                self.failure = refusal
                raise

    @abstractmethod
    def _handle(self, request: bytes) -> bytes: ...

    @abstractmethod
    def _encrypt(self, data: bytes) -> bytes: ...

    @abstractmethod
    def _decrypt(self, data: bytes) -> bytes: ...

    @abstractmethod
    def _reset(self) -> None: ...

    def _require_done(self, done: bool) -> None:
        if not done:
            raise _refuse(EspErr.ESP_ERR_INVALID_STATE, "secure session not established (handshake incomplete)", self._tag,
                          "Secure session not established")

    def _restart_handshake(self) -> None:
        """A Command0 outside the Command0 state: "Invalid state of session ... Restarting session." (same session id)."""
        session_id = self.session_id
        self._reset()
        self.session_id = session_id


class DeviceSecurity0(DeviceSecurity):
    """Security 0 (security0.c): any ``SessionData`` with ``sec_ver`` 0 gets ``S0SessionResp{Success}``; no crypto.

    There is nothing to establish, so :attr:`established` is always True and encrypted endpoints
    work without a handshake — which is why a device offering sec0 fails EN 303 645 5.5-1.
    """

    version = 0
    encrypts = False
    _tag = "security0"

    @property
    def established(self) -> bool:
        return True

    def new_session(self, session_id: int) -> None:
        with self._lock:
            self.session_id = session_id & _SESSION_ID_MASK

    def close_session(self, session_id: int) -> None:
        with self._lock:
            self.session_id = None

    def _resolve(self, session_id: int | None) -> int:
        return 0 if session_id is None else session_id  # security0 has no session bookkeeping

    def _handle(self, request: bytes) -> bytes:
        req = _decode_session_data(request, self._tag)
        if req.sec_ver != SecSchemeVersion.SecScheme0:
            raise _refuse(EspErr.ESP_ERR_INVALID_ARG, f"request is for security {int(req.sec_ver)}, this device runs security 0",
                          self._tag, "Security version mismatch. Closing connection")
        self._post(SecurityEvent.SETUP_OK)
        return SessionData(
            sec_ver=SecSchemeVersion.SecScheme0,
            sec0=Sec0Payload(msg=Sec0MsgType.S0_Session_Response, sr=S0SessionResp(status=Status.Success)),
        ).encode()

    def _encrypt(self, data: bytes) -> bytes:
        return data

    def _decrypt(self, data: bytes) -> bytes:
        return data

    def _reset(self) -> None:
        pass


class DeviceSecurity1(DeviceSecurity):
    """Security 1 (security1.c): X25519 + optional PoP + AES-256-CTR. ``pop=b""`` is sec1 without PoP ("no_pop")."""

    version = 1
    _tag = "security1"

    def __init__(self, pop: str | bytes = b"", on_event: Callable[[SecurityEvent], None] | None = None):
        super().__init__(on_event)
        self._pop = pop.encode("utf-8") if isinstance(pop, str) else bytes(pop)
        self._reset()

    def _reset(self) -> None:
        self._state = _CMD0
        self._device_pubkey = b""
        self._client_pubkey = b""
        self._sym_key = b""
        self._counter = 0  # security1.c's cur_session->rand, advanced in place by every CTR call
        self._stream: AesCtrStream | None = None

    @property
    def established(self) -> bool:
        return self._state == _DONE

    def _handle(self, request: bytes) -> bytes:
        req = _decode_session_data(request, self._tag)
        if req.sec_ver != SecSchemeVersion.SecScheme1:
            raise _refuse(EspErr.ESP_ERR_INVALID_ARG, f"request is for security {int(req.sec_ver)}, this device runs security 1",
                          self._tag, "Security version mismatch. Closing connection")
        with _session_setup():
            payload = req.sec1
            if payload is None:
                raise _refuse(EspErr.ESP_ERR_INVALID_ARG, "SessionData carries no sec1 payload", self._tag, "Empty session data")
            if payload.msg == Sec1MsgType.Session_Command0:
                return self._command0(payload)
            if payload.msg == Sec1MsgType.Session_Command1:
                return self._command1(payload)
            raise _refuse(EspErr.ESP_ERR_INVALID_ARG, f"sec1 message type {int(payload.msg)} is not a command", self._tag,
                          "Invalid security message type")

    def _command0(self, payload: Sec1Payload) -> bytes:
        if self._state != _CMD0:
            self._restart_handshake()
        if payload.sc0 is None:
            # security1.c reads in->sc0 without a check; a real device faults here.
            raise _refuse(EspErr.ESP_ERR_INVALID_ARG, "Session_Command0 without its sc0 body (ESP-IDF dereferences it unchecked)",
                          self._tag, "Invalid public key length")
        client_pubkey = payload.sc0.client_pubkey
        if len(client_pubkey) != SEC1_KEY_LEN:
            raise _refuse(EspErr.ESP_ERR_INVALID_ARG, f"client public key is {len(client_pubkey)} bytes, not {SEC1_KEY_LEN}",
                          self._tag, "Invalid public key length")
        private = X25519PrivateKey.generate()
        try:
            shared = private.exchange(X25519PublicKey.from_public_bytes(client_pubkey))
        except ValueError as exc:  # a low-order point gives an all-zero secret
            raise _refuse(EspErr.ESP_FAIL, f"X25519 with the client key failed ({exc})", self._tag,
                          "Failed at mbedtls_ecdh_compute_shared") from exc
        device_random = secrets.token_bytes(SEC1_RANDOM_LEN)
        self._device_pubkey = private.public_key().public_bytes_raw()
        self._client_pubkey = bytes(client_pubkey)
        self._sym_key = _sec1_key(shared, self._pop)
        self._counter = int.from_bytes(device_random, "big")
        self._state = _CMD1
        return SessionData(
            sec_ver=SecSchemeVersion.SecScheme1,
            sec1=Sec1Payload(
                msg=Sec1MsgType.Session_Response0,
                sr0=SessionResp0(status=Status.Success, device_pubkey=self._device_pubkey, device_random=device_random),
            ),
        ).encode()

    def _command1(self, payload: Sec1Payload) -> bytes:
        if self._state != _CMD1:
            raise _refuse(EspErr.ESP_ERR_INVALID_STATE, "Session_Command1 before Session_Command0 (or after the handshake)",
                          self._tag, f"Invalid state of session {_CMD1} (expected {self._state})")
        if payload.sc1 is None:
            raise _refuse(EspErr.ESP_ERR_INVALID_ARG, "Session_Command1 without its sc1 body (ESP-IDF dereferences it unchecked)",
                          self._tag, "Key mismatch. Close connection")
        stream = AesCtrStream(self._sym_key, self._counter)  # mbedtls ctx re-keyed, nc_off = 0, counter kept
        verify = payload.sc1.client_verify_data
        # security1.c always decrypts 32 bytes from the buffer; a shorter field can only mismatch.
        check = stream.apply(verify[:SEC1_KEY_LEN].ljust(SEC1_KEY_LEN, b"\0"))
        self._counter = stream.counter
        if len(verify) != SEC1_KEY_LEN or not hmac.compare_digest(check, self._device_pubkey):
            self._post(SecurityEvent.CREDENTIALS_MISMATCH)
            raise _refuse(EspErr.ESP_FAIL, "client verify data does not decrypt to the device public key: wrong PoP", self._tag,
                          "Key mismatch. Close connection")
        device_verify = stream.apply(self._client_pubkey)
        self._stream = stream
        self._state = _DONE
        self._post(SecurityEvent.SETUP_OK)
        return SessionData(
            sec_ver=SecSchemeVersion.SecScheme1,
            sec1=Sec1Payload(msg=Sec1MsgType.Session_Response1, sr1=SessionResp1(status=Status.Success, device_verify_data=device_verify)),
        ).encode()

    def _encrypt(self, data: bytes) -> bytes:
        self._require_done(self._state == _DONE)
        return self._stream.apply(data)  # type: ignore[union-attr]

    _decrypt = _encrypt  # AES-CTR: encrypt == decrypt, same stream (security1.c .encrypt = .decrypt = sec1_decrypt)


class DeviceSecurity2(DeviceSecurity):
    """Security 2 (security2.c): SRP6a with the stored salt + verifier, then AES-256-GCM.

    ``patch_version`` is what the device announces as ``sec_patch_ver`` (0 or 1, see module docstring).
    """

    version = 2
    _tag = "security2"

    def __init__(
        self,
        credentials: SrpCredentials,
        patch_version: int = 1,
        on_event: Callable[[SecurityEvent], None] | None = None,
    ):
        if patch_version not in (0, 1):
            raise ValueError(f"security 2 patch version {patch_version} does not exist; ESP-IDF has 0 and 1")
        super().__init__(on_event)
        self.credentials = credentials
        self._patch = patch_version
        self._reset()

    @classmethod
    def from_pop(
        cls,
        pop: str | bytes,
        username: str | bytes = DEFAULT_SEC2_USERNAME,
        patch_version: int = 1,
        salt: bytes | None = None,
        on_event: Callable[[SecurityEvent], None] | None = None,
    ) -> DeviceSecurity2:
        """Salt + verifier derived from (username, PoP) at start-up, as RainMaker nodes do."""
        return cls(SrpCredentials.derive(username, pop, salt), patch_version, on_event)

    @property
    def patch_version(self) -> int:
        return self._patch

    def _reset(self) -> None:
        self._state = _CMD0
        self._srp: SrpVerifier | None = None
        self._username = b""
        self._nonce = bytearray()
        self._gcm: AESGCM | None = None

    @property
    def established(self) -> bool:
        return self._state == _DONE

    @property
    def nonce(self) -> bytes:
        """The current AES-GCM IV (for tests and evidence; it is not secret)."""
        return bytes(self._nonce)

    def _handle(self, request: bytes) -> bytes:
        req = _decode_session_data(request, self._tag)
        if req.sec_ver != SecSchemeVersion.SecScheme2:
            raise _refuse(EspErr.ESP_ERR_INVALID_ARG, f"request is for security {int(req.sec_ver)}, this device runs security 2",
                          self._tag, "Security version mismatch. Closing connection")
        if req.which("proto") != "sec2":
            raise _refuse(EspErr.ESP_ERR_INVALID_ARG, f"SessionData carries {req.which('proto')}, not sec2", self._tag,
                          "Security scheme mismatch. Closing connection")
        payload: Sec2Payload = req.sec2
        with _session_setup():
            if payload.msg == Sec2MsgType.S2Session_Command0:
                return self._command0(payload)
            if payload.msg == Sec2MsgType.S2Session_Command1:
                return self._command1(payload)
            raise _refuse(EspErr.ESP_ERR_INVALID_ARG, f"sec2 message type {int(payload.msg)} is not a command", self._tag,
                          "Invalid security message type")

    def _command0(self, payload: Sec2Payload) -> bytes:
        if payload.which("payload") != "sc0":
            raise _refuse(EspErr.ESP_ERR_INVALID_ARG, f"S2Session_Command0 carries {payload.which('payload')}, not sc0", self._tag,
                          "Missing or mismatched sc0 payload in session command0")
        if self._state != _CMD0:
            self._restart_handshake()
        sc0: S2SessionCmd0 = payload.sc0
        if len(sc0.client_pubkey) != N_LEN:
            self._post(SecurityEvent.INVALID_SECURITY_PARAMS)
            raise _refuse(EspErr.ESP_ERR_INVALID_ARG, f"client public key A is {len(sc0.client_pubkey)} bytes, not {N_LEN}",
                          self._tag, "Invalid public key length")
        if not 0 < len(sc0.client_username) <= 0xFFFF:
            self._post(SecurityEvent.INVALID_SECURITY_PARAMS)
            raise _refuse(EspErr.ESP_ERR_INVALID_ARG, f"username length {len(sc0.client_username)} is not 1..65535", self._tag,
                          f"Invalid username length ({len(sc0.client_username)})")
        srp = SrpVerifier(self.credentials)
        try:
            srp.accept_client_key(sc0.client_pubkey)
        except SrpError as exc:
            raise _refuse(EspErr.ESP_FAIL, str(exc), self._tag, "Failed to generate device session key!") from exc
        self._srp = srp
        self._username = bytes(sc0.client_username)
        self._state = _CMD1
        return SessionData(
            sec_ver=SecSchemeVersion.SecScheme2,
            sec2=Sec2Payload(
                msg=Sec2MsgType.S2Session_Response0,
                sr0=S2SessionResp0(status=Status.Success, device_pubkey=srp.public_key, device_salt=self.credentials.salt),
            ),
        ).encode()

    def _command1(self, payload: Sec2Payload) -> bytes:
        if payload.which("payload") != "sc1":
            raise _refuse(EspErr.ESP_ERR_INVALID_ARG, f"S2Session_Command1 carries {payload.which('payload')}, not sc1", self._tag,
                          "Missing or mismatched sc1 payload in session command1")
        if self._state != _CMD1 or self._srp is None:
            raise _refuse(EspErr.ESP_ERR_INVALID_STATE, "S2Session_Command1 before S2Session_Command0 (or after the handshake)",
                          self._tag, f"Invalid state of session {_CMD1} (expected {self._state})")
        proof = payload.sc1.client_proof
        if len(proof) != PROOF_LEN:
            raise _refuse(EspErr.ESP_FAIL, f"client proof is {len(proof)} bytes, not {PROOF_LEN}", self._tag,
                          "The client proof length does not match")
        try:
            device_proof = self._srp.verify_client_proof(self._username, proof)
        except SrpError as exc:
            self._post(SecurityEvent.CREDENTIALS_MISMATCH)
            raise _refuse(EspErr.ESP_FAIL, "client proof M does not verify: wrong PoP (or username)", self._tag,
                          "Failed to authenticate client proof!") from exc
        if self._patch == 1:
            self._nonce = bytearray(secrets.token_bytes(GCM_SESSION_ID_LEN) + (1).to_bytes(4, "big"))
        else:
            self._nonce = bytearray(secrets.token_bytes(GCM_NONCE_LEN))
        self._gcm = AESGCM(self._srp.session_key[:32])  # type: ignore[index]
        nonce = bytes(self._nonce)
        self._state = _DONE
        self._post(SecurityEvent.SETUP_OK)
        return SessionData(
            sec_ver=SecSchemeVersion.SecScheme2,
            sec2=Sec2Payload(
                msg=Sec2MsgType.S2Session_Response1,
                sr1=S2SessionResp1(status=Status.Success, device_proof=device_proof, device_nonce=nonce),
            ),
        ).encode()

    def _check_counter(self) -> None:
        if self._patch == 1 and int.from_bytes(self._nonce[GCM_SESSION_ID_LEN:], "big") == 0:
            raise _refuse(EspErr.ESP_ERR_INVALID_STATE, "AES-GCM IV counter wrapped to 0; a new session is needed", self._tag,
                          "Invalid counter value, restart session")

    def _bump(self) -> None:
        if self._patch == 1:
            counter = (int.from_bytes(self._nonce[GCM_SESSION_ID_LEN:], "big") + 1) & 0xFFFFFFFF
            self._nonce[GCM_SESSION_ID_LEN:] = counter.to_bytes(4, "big")

    def _encrypt(self, data: bytes) -> bytes:
        self._require_done(self._state == _DONE)
        self._check_counter()
        out = self._gcm.encrypt(bytes(self._nonce), data, None)  # type: ignore[union-attr]
        self._bump()
        return out

    def _decrypt(self, data: bytes) -> bytes:
        self._require_done(self._state == _DONE)
        self._check_counter()
        if len(data) < GCM_TAG_LEN:
            raise _refuse(EspErr.ESP_FAIL, f"ciphertext of {len(data)} bytes cannot hold the {GCM_TAG_LEN}-byte tag", self._tag,
                          "psa_aead_decrypt failed")
        try:
            out = self._gcm.decrypt(bytes(self._nonce), data, None)  # type: ignore[union-attr]
        except InvalidTag as exc:
            raise _refuse(EspErr.ESP_FAIL, "AES-GCM tag check failed (tampered, replayed or out-of-order message)", self._tag,
                          "psa_aead_decrypt failed") from exc
        self._bump()
        return out


# =====================================================================================================
# client side
# =====================================================================================================


class ClientSecurity(ABC):
    """The client half of a security scheme, one handshake step per method."""

    version: ClassVar[int]
    rounds: ClassVar[int] = 2

    def __init__(self) -> None:
        self.established = False

    @abstractmethod
    def command0(self) -> bytes: ...

    @abstractmethod
    def handle_response0(self, data: bytes) -> None: ...

    def command1(self) -> bytes:
        raise SessionError(f"security {self.version} has no second handshake round")

    def handle_response1(self, data: bytes) -> None:
        raise SessionError(f"security {self.version} has no second handshake round")

    @abstractmethod
    def encrypt(self, data: bytes) -> bytes: ...

    @abstractmethod
    def decrypt(self, data: bytes) -> bytes: ...

    def handshake(self, exchange: Callable[[bytes], bytes]) -> None:
        """Run every step through *exchange* (request bytes → response bytes, e.g. a transport's ``prov-session``)."""
        self.handle_response0(exchange(self.command0()))
        if self.rounds > 1:
            self.handle_response1(exchange(self.command1()))

    def _parse(self, data: bytes, step: str) -> SessionData:
        try:
            response = SessionData.decode(data)
        except ProtobufDecodeError as exc:
            raise SessionError(f"{step} from the device is not a SessionData ({exc.problem} at byte {exc.offset})",
                               fix="capture the exchange; the device is not speaking protocomm on this endpoint") from exc
        if response.sec_ver != self.version:
            raise SessionError(
                f"{step}: the device answered with security {int(response.sec_ver)}, the client runs security {self.version}",
                fix="read proto-ver's sec_ver and use that scheme",
            )
        return response

    @staticmethod
    def _check_status(status: int, step: str) -> None:
        if status != Status.Success:
            raise SessionError(f"{step}: the device reported failure", status=int(status))


class ClientSecurity0(ClientSecurity):
    """Security 0: one round trip, no crypto."""

    version = 0
    rounds = 1

    def command0(self) -> bytes:
        return SessionData(
            sec_ver=SecSchemeVersion.SecScheme0, sec0=Sec0Payload(msg=Sec0MsgType.S0_Session_Command, sc=S0SessionCmd())
        ).encode()

    def handle_response0(self, data: bytes) -> None:
        response = self._parse(data, "response 0")
        if response.sec0 is None or response.sec0.sr is None:
            raise SessionError("response 0 carries no S0SessionResp")
        self._check_status(response.sec0.sr.status, "response 0")
        self.established = True

    def encrypt(self, data: bytes) -> bytes:
        return bytes(data)

    def decrypt(self, data: bytes) -> bytes:
        return bytes(data)


class ClientSecurity1(ClientSecurity):
    """Security 1 client. ``private_key`` (32 raw bytes) may be given for known-answer tests."""

    version = 1

    def __init__(self, pop: str | bytes = b"", private_key: bytes | None = None):
        super().__init__()
        self._pop = pop.encode("utf-8") if isinstance(pop, str) else bytes(pop)
        self._private = X25519PrivateKey.from_private_bytes(private_key) if private_key else X25519PrivateKey.generate()
        self.client_pubkey = self._private.public_key().public_bytes_raw()
        self.device_pubkey: bytes | None = None
        self._stream: AesCtrStream | None = None
        self._command1: bytes | None = None

    def command0(self) -> bytes:
        return SessionData(
            sec_ver=SecSchemeVersion.SecScheme1,
            sec1=Sec1Payload(msg=Sec1MsgType.Session_Command0, sc0=SessionCmd0(client_pubkey=self.client_pubkey)),
        ).encode()

    def handle_response0(self, data: bytes) -> None:
        response = self._parse(data, "response 0")
        sr0 = response.sec1.sr0 if response.sec1 is not None else None
        if sr0 is None:
            raise SessionError("response 0 carries no SessionResp0")
        self._check_status(sr0.status, "response 0")
        if len(sr0.device_pubkey) != SEC1_KEY_LEN or len(sr0.device_random) != SEC1_RANDOM_LEN:
            raise SessionError(f"response 0 has a {len(sr0.device_pubkey)}-byte public key and a {len(sr0.device_random)}-byte "
                               f"random; security 1 needs {SEC1_KEY_LEN} and {SEC1_RANDOM_LEN}")
        try:
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(sr0.device_pubkey))
        except ValueError as exc:
            raise SessionError(f"X25519 with the device's public key failed ({exc})") from exc
        self.device_pubkey = bytes(sr0.device_pubkey)
        self._stream = AesCtrStream(_sec1_key(shared, self._pop), sr0.device_random)
        self._command1 = None

    def command1(self) -> bytes:
        if self._stream is None or self.device_pubkey is None:
            raise SessionError("command 1 needs response 0 first (the device public key and random)")
        if self._command1 is None:
            verify = self._stream.apply(self.device_pubkey)
            self._command1 = SessionData(
                sec_ver=SecSchemeVersion.SecScheme1,
                sec1=Sec1Payload(msg=Sec1MsgType.Session_Command1, sc1=SessionCmd1(client_verify_data=verify)),
            ).encode()
        return self._command1

    def handle_response1(self, data: bytes) -> None:
        if self._command1 is None or self._stream is None:
            raise SessionError("response 1 arrived before command 1 was built")
        response = self._parse(data, "response 1")
        sr1 = response.sec1.sr1 if response.sec1 is not None else None
        if sr1 is None:
            raise SessionError("response 1 carries no SessionResp1")
        self._check_status(sr1.status, "response 1")
        if self._stream.apply(sr1.device_verify_data) != self.client_pubkey:
            raise SessionError("the device's verify data does not decrypt to our public key",
                               fix="the PoP is wrong, or the peer is not the device it claims to be")
        self.established = True

    def _crypt(self, data: bytes) -> bytes:
        if not self.established or self._stream is None:
            raise SessionError("no security 1 session yet; run the handshake first")
        return self._stream.apply(bytes(data))

    def encrypt(self, data: bytes) -> bytes:
        return self._crypt(data)

    def decrypt(self, data: bytes) -> bytes:
        return self._crypt(data)


class ClientSecurity2(ClientSecurity):
    """Security 2 client: SRP6a as (*username*, *pop*), then AES-GCM with the device's nonce rule for *patch_version*."""

    version = 2

    def __init__(self, pop: str | bytes, username: str | bytes = DEFAULT_SEC2_USERNAME, patch_version: int = 1, a: int | None = None):
        super().__init__()
        if patch_version not in (0, 1):
            raise ValueError(f"security 2 patch version {patch_version} does not exist; ESP-IDF has 0 and 1")
        self.patch_version = patch_version
        self._srp = SrpClient(username, pop, a=a)
        self._proof: bytes | None = None
        self._nonce = bytearray()
        self._gcm: AESGCM | None = None

    @property
    def nonce(self) -> bytes:
        return bytes(self._nonce)

    def command0(self) -> bytes:
        return SessionData(
            sec_ver=SecSchemeVersion.SecScheme2,
            sec2=Sec2Payload(
                msg=Sec2MsgType.S2Session_Command0,
                sc0=S2SessionCmd0(client_username=self._srp.username, client_pubkey=self._srp.public_key),
            ),
        ).encode()

    def handle_response0(self, data: bytes) -> None:
        response = self._parse(data, "response 0")
        sr0 = response.sec2.sr0 if response.sec2 is not None else None
        if sr0 is None:
            raise SessionError("response 0 carries no S2SessionResp0")
        self._check_status(sr0.status, "response 0")
        try:
            self._proof = self._srp.process_challenge(sr0.device_salt, sr0.device_pubkey)
        except SrpError as exc:
            raise SessionError(f"response 0 is unsafe: {exc}") from exc

    def command1(self) -> bytes:
        if self._proof is None:
            raise SessionError("command 1 needs response 0 first (the salt and B)")
        return SessionData(
            sec_ver=SecSchemeVersion.SecScheme2,
            sec2=Sec2Payload(msg=Sec2MsgType.S2Session_Command1, sc1=S2SessionCmd1(client_proof=self._proof)),
        ).encode()

    def handle_response1(self, data: bytes) -> None:
        if self._proof is None:
            raise SessionError("response 1 arrived before command 1 was built")
        response = self._parse(data, "response 1")
        sr1: S2SessionResp1 | None = response.sec2.sr1 if response.sec2 is not None else None
        if sr1 is None:
            raise SessionError("response 1 carries no S2SessionResp1")
        self._check_status(sr1.status, "response 1")
        try:
            self._srp.verify_device_proof(sr1.device_proof)
        except SrpError as exc:
            raise SessionError(str(exc), fix="the device does not know this PoP: wrong device, or a man in the middle") from exc
        if len(sr1.device_nonce) != GCM_NONCE_LEN:
            raise SessionError(f"device nonce is {len(sr1.device_nonce)} bytes, AES-GCM here needs {GCM_NONCE_LEN}")
        self._nonce = bytearray(sr1.device_nonce)
        self._gcm = AESGCM(self._srp.session_key[:32])  # type: ignore[index]
        self.established = True

    def _bump(self) -> None:
        if self.patch_version == 1:
            counter = int.from_bytes(self._nonce[GCM_SESSION_ID_LEN:], "big") + 1
            if counter > 0xFFFFFFFF:
                raise SessionError("AES-GCM IV counter overflow", fix="start a new session")
            self._nonce[GCM_SESSION_ID_LEN:] = counter.to_bytes(4, "big")

    def encrypt(self, data: bytes) -> bytes:
        if self._gcm is None:
            raise SessionError("no security 2 session yet; run the handshake first")
        out = self._gcm.encrypt(bytes(self._nonce), bytes(data), None)
        self._bump()
        return out

    def decrypt(self, data: bytes) -> bytes:
        if self._gcm is None:
            raise SessionError("no security 2 session yet; run the handshake first")
        try:
            out = self._gcm.decrypt(bytes(self._nonce), bytes(data), None)
        except InvalidTag as exc:
            raise SessionError("the device's response fails AES-GCM authentication",
                               fix="check sec_patch_ver (nonce rule) and that requests and responses stay in order") from exc
        self._bump()
        return out


def client_security(
    sec_ver: int, pop: str | bytes = b"", username: str | bytes = DEFAULT_SEC2_USERNAME, patch_version: int = 0
) -> ClientSecurity:
    """The client for what proto-ver announced (``sec_ver``, ``sec_patch_ver``)."""
    if sec_ver == 0:
        return ClientSecurity0()
    if sec_ver == 1:
        return ClientSecurity1(pop)
    if sec_ver == 2:
        return ClientSecurity2(pop, username, patch_version)
    raise SessionError(f"security scheme {sec_ver} does not exist", fix="protocomm has security 0, 1 and 2")

"""SRP6a as protocomm's security 2 uses it (rainmaker-protocol.md §4.6).

Parameters and byte rules are those of esp-idf ``components/protocomm/src/crypto/srp6a/esp_srp.c``
(the device) and esp-idf-provisioning's ``security/srp6a.py`` (the client):

* group: RFC 5054 appendix A, 3072-bit N, generator g = 5; hash SHA-512;
* ``x = H(s | H(I | ":" | P))`` and ``v = g^x mod N``;
* ``k = H(N | PAD(g))`` and ``u = H(PAD(A) | PAD(B))``, PAD = left zero-padding to len(N) = 384;
* device: ``B = (k·v + g^b) mod N`` with a 256-bit random b; ``S = (A·v^u)^b``; client:
  ``S = (B − k·v)^(a + u·x)``; ``K = H(S)`` (64 bytes; S as its minimal big-endian bytes);
* ``M = H(H(N) XOR H(PAD(g)) | H(I) | s | A | B | K)`` and the device proof ``H_AMK = H(A | M | K)``,
  with A and B as their minimal big-endian bytes and s as the salt bytes.

Two edge cases where the real implementations disagree, and what the rig does:

* esp_srp.c uses the salt bytes as stored, the Python client turns them into an integer and back
  (dropping a leading zero byte). :meth:`SrpCredentials.derive` therefore makes salts whose first
  byte is not zero, so both agree.
* The device accepts only a 384-byte A (``PUBLIC_KEY_LEN``, esp-idf ``security2.c``); an old client
  that sent a shorter A was refused. :class:`SrpClient` draws ``a`` until A is 384 bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from rig.protocomm.errors import ProtocommError

N_3072 = int(
    "FFFFFFFFFFFFFFFFC90FDAA22168C234C4C6628B80DC1CD129024E088A67CC74020BBEA63B139B22514A08798E3404DD"
    "EF9519B3CD3A431B302B0A6DF25F14374FE1356D6D51C245E485B576625E7EC6F44C42E9A637ED6B0BFF5CB6F406B7ED"
    "EE386BFB5A899FA5AE9F24117C4B1FE649286651ECE45B3DC2007CB8A163BF0598DA48361C55D39A69163FA8FD24CF5F"
    "83655D23DCA3AD961C62F356208552BB9ED529077096966D670C354E4ABC9804F1746C08CA18217C32905E462E36CE3B"
    "E39E772C180E86039B2783A2EC07A28FB5C55DF06F4C52C9DE2BCBF6955817183995497CEA956AE515D2261898FA0510"
    "15728E5A8AAAC42DAD33170D04507A33A85521ABDF1CBA64ECFB850458DBEF0A8AEA71575D060C7DB3970F85A6E1E4C7"
    "ABF5AE8CDB0933D71E8C94E04A25619DCEE3D2261AD2EE6BF12FFA06D98A0864D87602733EC86A64521F2B18177B200C"
    "BBE117577A615D6C770988C0BAD946E208E24FA074E5AB3143DB5BFCE0FD108E4B82D120A93AD2CAFFFFFFFFFFFFFFFF",
    16,
)
G = 5
N_LEN = 384  # bytes; also the length security2.c requires of the client's public key
SALT_LEN = 16  # esp-idf security2.c SALT_LEN; RainMaker derives a 16-byte salt at runtime
EPHEMERAL_BITS = 256  # esp_srp.c draws b with esp_mpi_get_rand(b, 256); the client draws a 256-bit a
PROOF_LEN = 64  # SHA-512 digest size: M, H_AMK and K


class SrpError(ProtocommError):
    """An SRP6a step failed: an unsafe public value, or a proof that does not verify."""


def _h(*parts: bytes) -> bytes:
    digest = hashlib.sha512()
    for part in parts:
        digest.update(part)
    return digest.digest()


def _minimal(n: int) -> bytes:
    """Minimal big-endian bytes of *n* (one zero byte for 0), as esp_mpi_to_bin / long_to_bytes give."""
    return n.to_bytes(max(1, (n.bit_length() + 7) // 8), "big")


def _pad(raw: bytes) -> bytes:
    return raw.rjust(N_LEN, b"\0")


def _as_bytes(value: str | bytes) -> bytes:
    return value.encode("utf-8") if isinstance(value, str) else bytes(value)


_N_BYTES = _minimal(N_3072)
_K = int.from_bytes(_h(_N_BYTES, _pad(_minimal(G))), "big")
_HN_XOR_HG = bytes(a ^ b for a, b in zip(_h(_N_BYTES), _h(_pad(_minimal(G))), strict=True))


def compute_x(salt: bytes, username: bytes, password: bytes) -> int:
    """``x = H(s | H(I ":" P))``."""
    return int.from_bytes(_h(salt, _h(username, b":", password)), "big")


def compute_u(a_pub: bytes, b_pub: bytes) -> int:
    """``u = H(PAD(A) | PAD(B))``."""
    return int.from_bytes(_h(_pad(a_pub), _pad(b_pub)), "big")


def compute_m(username: bytes, salt: bytes, a_pub: bytes, b_pub: bytes, key: bytes) -> bytes:
    """The client proof ``M = H(H(N) XOR H(PAD(g)) | H(I) | s | A | B | K)``."""
    return _h(_HN_XOR_HG, _h(username), salt, a_pub, b_pub, key)


def compute_h_amk(a_pub: bytes, m: bytes, key: bytes) -> bytes:
    """The device proof ``H(A | M | K)``."""
    return _h(a_pub, m, key)


@dataclass(frozen=True)
class SrpCredentials:
    """What a device stores for security 2: the salt and the verifier ``v = g^x mod N`` (big-endian)."""

    salt: bytes
    verifier: bytes

    @classmethod
    def derive(cls, username: str | bytes, password: str | bytes, salt: bytes | None = None) -> SrpCredentials:
        """Salt + verifier for (*username*, *password*), as RainMaker derives them from ("wifiprov", PoP).

        A fresh salt is 16 random bytes whose first byte is not zero (see the module docstring).
        """
        if salt is None:
            salt = secrets.token_bytes(SALT_LEN)
            while salt[0] == 0:
                salt = secrets.token_bytes(SALT_LEN)
        x = compute_x(salt, _as_bytes(username), _as_bytes(password))
        return cls(salt=bytes(salt), verifier=_minimal(pow(G, x, N_3072)))


class SrpVerifier:
    """The device role of one SRP6a exchange (esp_srp.c): B from the stored verifier, then check M.

    ``b`` may be given for known-answer tests; by default it is 256 random bits.
    """

    def __init__(self, credentials: SrpCredentials, b: int | None = None):
        self.credentials = credentials
        self._v = int.from_bytes(credentials.verifier, "big")
        self._b = b if b is not None else secrets.randbits(EPHEMERAL_BITS)
        self.public_key = _minimal((_K * self._v + pow(G, self._b, N_3072)) % N_3072)
        self.session_key: bytes | None = None
        self._client_public: bytes | None = None

    @classmethod
    def from_password(
        cls, username: str | bytes, password: str | bytes, salt: bytes | None = None, b: int | None = None
    ) -> SrpVerifier:
        return cls(SrpCredentials.derive(username, password, salt), b=b)

    @property
    def salt(self) -> bytes:
        return self.credentials.salt

    def accept_client_key(self, client_public: bytes) -> None:
        """Take A and derive K; ``A mod N == 0`` is refused (RFC 5054 §2.5.4; newer esp_srp.c)."""
        a = int.from_bytes(client_public, "big")
        if a % N_3072 == 0:
            raise SrpError("client public key A is 0 mod N, which would force the shared secret; refused")
        u = compute_u(client_public, self.public_key)
        s = pow(a * pow(self._v, u, N_3072) % N_3072, self._b, N_3072)
        self._client_public = bytes(client_public)
        self.session_key = _h(_minimal(s))

    def verify_client_proof(self, username: bytes, client_proof: bytes) -> bytes:
        """Check the client's M; returns the device proof H_AMK or raises :class:`SrpError`."""
        if self.session_key is None or self._client_public is None:
            raise SrpError("client proof arrived before the client public key")
        expected = compute_m(username, self.salt, self._client_public, self.public_key, self.session_key)
        if not hmac.compare_digest(expected, bytes(client_proof)):
            raise SrpError("client proof M does not match: the client does not know the password (PoP)")
        return compute_h_amk(self._client_public, expected, self.session_key)


class SrpClient:
    """The client role (phone app / esp-rainmaker-cli): A, then M from (salt, B), then check H_AMK.

    ``a`` may be given for known-answer tests; by default a 256-bit value with its top bit set is
    drawn until A is exactly 384 bytes long.
    """

    def __init__(self, username: str | bytes, password: str | bytes, a: int | None = None):
        self.username = _as_bytes(username)
        self._password = _as_bytes(password)
        while True:
            self._a = a if a is not None else secrets.randbits(EPHEMERAL_BITS) | (1 << (EPHEMERAL_BITS - 1))
            self.public_key = _minimal(pow(G, self._a, N_3072))
            if a is not None or len(self.public_key) == N_LEN:
                break
        self.session_key: bytes | None = None
        self._expected_h_amk: bytes | None = None
        self.authenticated = False

    def process_challenge(self, salt: bytes, server_public: bytes) -> bytes:
        """Compute K and the proof M from the device's salt and B; refuses B ≡ 0 (mod N) and u = 0."""
        b = int.from_bytes(server_public, "big")
        if b % N_3072 == 0:
            raise SrpError("device public key B is 0 mod N; refused (SRP-6a safety check)")
        b_bytes = _minimal(b)
        u = compute_u(self.public_key, b_bytes)
        if u == 0:
            raise SrpError("scrambling parameter u is 0; refused (SRP-6a safety check)")
        x = compute_x(salt, self.username, self._password)
        v = pow(G, x, N_3072)
        s = pow((b - _K * v) % N_3072, self._a + u * x, N_3072)
        self.session_key = _h(_minimal(s))
        proof = compute_m(self.username, salt, self.public_key, b_bytes, self.session_key)
        self._expected_h_amk = compute_h_amk(self.public_key, proof, self.session_key)
        return proof

    def verify_device_proof(self, h_amk: bytes) -> None:
        """Check the device's H_AMK; raises :class:`SrpError` when it does not prove knowledge of v."""
        if self._expected_h_amk is None:
            raise SrpError("device proof arrived before the challenge was processed")
        if not hmac.compare_digest(self._expected_h_amk, bytes(h_amk)):
            raise SrpError("device proof H(A|M|K) does not match: the device does not hold the verifier for this PoP")
        self.authenticated = True

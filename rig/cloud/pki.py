"""The lab PKI: one CA for the local cloud, its servers, its nodes and its own service identity.

What RainMaker's cloud does with AWS IoT, the rig does with a CA of its own:

- every node gets an X.509 client certificate with ``CN = node_id``; the node presents
  it to the MQTT broker, whose client id must equal that CN (DESIGN.md "Cloud";
  rainmaker-protocol.md §1.1, doc page https://rainmaker.espressif.com/docs/spec-node-cloud).
  ``rmaker claim`` makes RSA-2048 keys (esp-rainmaker-cli
  ``rmaker_tools/rmaker_claim/claim.py`` ``generate_private_key``); the rig issues
  ECDSA P-256 by default and RSA-2048 on request, so both key types reach the node's
  TLS stack.
- the broker, the REST API and the OTA host get server certificates for
  ``localhost`` / ``127.0.0.1`` (plus any names asked for);
- the cloud's own MQTT client uses a *service* identity that the broker lets reach
  every node's topics.

The node registry is the CA's own bookkeeping: a certificate counts as issued only if
this CA signed it, it is in the issue index (serial → SHA-256 fingerprint) and it is not
on the CRL. The CRL (``ca/crl.pem``) is rewritten on every revocation and refreshed
long before it expires, because mosquitto's ``crlfile`` makes OpenSSL refuse *every*
client once the CRL's ``nextUpdate`` has passed.

Files, under ``state_dir``: ``ca/ca.crt``, ``ca/ca.key`` (0600), ``ca/crl.pem``,
``ca/issued.json``, and ``<kind>/<name>/cert.pem`` + ``key.pem`` (0600) for each
issued certificate. Private keys are written once, with mode 0600, and never printed
or logged; :class:`CertPair` carries paths only. Several pytest-xdist workers may share
a state directory, so every change happens under an exclusive ``flock``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "SERVICE_IDENTITY",
    "CertPair",
    "KeyType",
    "LabPki",
    "PkiError",
]

KeyType = Literal["ec", "rsa"]

SERVICE_IDENTITY = "rig-cloud-service"
"""CN of the cloud's own MQTT client (the broker's plugin and ACL give it every node)."""

NODE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")  # \Z, not $: "$" would let a trailing newline through
"""A node id is one MQTT topic level and one client id: no ``/``, ``+``, ``#``, NUL or spaces.

RainMaker node ids are 12 hex digits (MAC) or 22 alphanumerics; the rig allows a little
more but nothing that could widen ``node/%u/#`` in the broker's ACL.
"""

CA_VALIDITY = dt.timedelta(days=3650)
LEAF_VALIDITY = dt.timedelta(days=825)
CRL_VALIDITY = dt.timedelta(days=30)
CRL_REFRESH_MARGIN = dt.timedelta(days=7)
BACKDATE = dt.timedelta(days=1)
"""Certificates start a day early so a board whose clock lags (no SNTP yet) accepts them."""


class PkiError(RuntimeError):
    """The lab PKI cannot do what was asked; the message says why and what to do."""


@dataclass(frozen=True)
class CertPair:
    """A certificate and its private key, by path. ``repr`` shows paths only, never the key."""

    cert_path: Path
    key_path: Path

    @property
    def cert_pem(self) -> bytes:
        return self.cert_path.read_bytes()

    @property
    def certificate(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.cert_pem)

    @property
    def common_name(self) -> str:
        return _common_name(self.certificate)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _common_name(cert: x509.Certificate) -> str:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(attrs) != 1:
        raise PkiError(f"certificate {cert.serial_number:x} has {len(attrs)} CN attributes; the rig issues exactly one")
    value = attrs[0].value
    return value.decode() if isinstance(value, bytes) else value


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _write_atomic(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write *data* to *path* via a temp file in the same directory and ``os.replace``.

    The temp file is created with *mode* from the start (``mkstemp`` makes it 0600, then
    ``fchmod``), so a private key is never readable by others, not even for a moment.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _private_pem(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    """Unencrypted traditional PEM (``EC PRIVATE KEY`` / ``RSA PRIVATE KEY``), as ``rmaker claim`` writes ``node.key``."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption())


def _new_key(key_type: KeyType) -> ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey:
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"key_type must be 'ec' (ECDSA P-256) or 'rsa' (RSA-2048), not {key_type!r}")


def _key_type_of(cert: x509.Certificate) -> KeyType:
    pub = cert.public_key()
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return "ec"
    if isinstance(pub, rsa.RSAPublicKey):
        return "rsa"
    raise PkiError(f"certificate {cert.serial_number:x} has an unexpected key type {type(pub).__name__}")


class LabPki:
    """The lab CA in *state_dir*: created on first use, reused afterwards.

    Every ``*_cert`` call is idempotent: asking again for the same identity returns the
    existing files (a server certificate is re-issued only if it lacks a requested host).
    """

    def __init__(self, state_dir: Path):
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._locked():
            self._ensure_ca()
            self._refresh_crl_if_due()

    # -- paths -----------------------------------------------------------------

    @property
    def ca_dir(self) -> Path:
        return self.state_dir / "ca"

    @property
    def ca_cert_path(self) -> Path:
        return self.ca_dir / "ca.crt"

    @property
    def ca_key_path(self) -> Path:
        """The CA's private key (0600): what issues node and server certificates — and what the
        Device-Advisor-style adversaries (``rig.cloud.adversaries``) sign their bad chains with."""
        return self.ca_dir / "ca.key"

    @property
    def crl_path(self) -> Path:
        """PEM CRL signed by the CA: mosquitto's ``crlfile``."""
        return self.ca_dir / "crl.pem"

    @property
    def _index_path(self) -> Path:
        return self.ca_dir / "issued.json"

    @property
    def ca_cert(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.ca_cert_path.read_bytes())

    # -- issuing -------------------------------------------------------------------

    def server_cert(self, name: str, hosts: list[str] | None = None) -> CertPair:
        """A TLS server certificate ``CN = name`` for ``localhost``, ``127.0.0.1`` and *hosts*.

        Each host that parses as an IP address becomes an IP SAN, anything else a DNS SAN.
        """
        _check_name(name, "server name")
        wanted = _san_entries(["localhost", "127.0.0.1", *(hosts or [])])
        with self._locked():
            pair = self._pair("servers", name)
            if pair.cert_path.exists():
                cert = pair.certificate
                have = set(cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value)
                if set(wanted) <= have and self._usable(cert):
                    return pair
            return self._issue("servers", name, "ec", server_hosts=wanted)

    def node_cert(self, node_id: str, key_type: KeyType = "ec") -> CertPair:
        """The node's MQTT client certificate, ``CN = node_id`` (ECDSA P-256, or RSA-2048).

        Asking again returns the same certificate, even after :meth:`revoke` — a revoked
        node keeps its (now useless) credentials, as a real device would. Asking for a
        different key type than the node already has is an error.
        """
        if not NODE_ID_RE.match(node_id):
            raise PkiError(f"node id {node_id!r} is not usable as an MQTT client id and topic level; use 1-64 of [A-Za-z0-9_-]")
        with self._locked():
            self._refuse_other_kind(node_id, "nodes")
            pair = self._pair("nodes", node_id)
            if pair.cert_path.exists():
                have = _key_type_of(pair.certificate)
                if have != key_type:
                    raise PkiError(
                        f"node {node_id} already has a {have.upper()} certificate; the rig does not re-key a node "
                        f"in place — use a new node id for a {key_type.upper()} node"
                    )
                return pair
            return self._issue("nodes", node_id, key_type)

    def service_cert(self, name: str = SERVICE_IDENTITY) -> CertPair:
        """The cloud service's own MQTT client certificate, ``CN = name``."""
        _check_name(name, "service identity")
        with self._locked():
            self._refuse_other_kind(name, "services")
            pair = self._pair("services", name)
            if pair.cert_path.exists():
                return pair
            return self._issue("services", name, "ec")

    # -- registry ------------------------------------------------------------------------

    def revoke(self, node_id: str) -> int:
        """Put the node's certificate on the CRL and rewrite ``crl.pem``; returns its serial.

        A running broker reads the new CRL only when told (see ``MosquittoBroker.reload``).
        """
        with self._locked():
            pair = self._pair("nodes", node_id)
            if not pair.cert_path.exists():
                raise PkiError(f"node {node_id} has no certificate from this CA; nothing to revoke")
            serial = pair.certificate.serial_number
            revoked = self._revoked_serials()
            if serial not in revoked:
                revoked[serial] = _now()
                self._write_crl(revoked)
            return serial

    def is_revoked(self, cert_pem: bytes) -> bool:
        cert = x509.load_pem_x509_certificate(cert_pem)
        return cert.serial_number in self._revoked_serials()

    def is_issued(self, cert_pem: bytes) -> bool:
        """True only for a certificate this CA signed, recorded as issued, valid now and not revoked."""
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            return False
        ca = self.ca_cert
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            return False
        record = self._index().get(f"{cert.serial_number:x}")
        if record is None or record.get("sha256") != _fingerprint(cert):
            return False
        return self._usable(cert) and cert.serial_number not in self._revoked_serials()

    # -- internals ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.state_dir / ".pki.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _pair(self, kind: str, name: str) -> CertPair:
        folder = self.state_dir / kind / name
        return CertPair(folder / "cert.pem", folder / "key.pem")

    def _index(self) -> dict[str, dict[str, str]]:
        if not self._index_path.exists():
            return {}
        return json.loads(self._index_path.read_text())

    def _refuse_other_kind(self, name: str, kind: str) -> None:
        for record in self._index().values():
            if record["cn"] == name and record["kind"] != kind:
                raise PkiError(f"{name!r} is already a {record['kind'][:-1]} identity of this CA; pick another name")

    @staticmethod
    def _usable(cert: x509.Certificate) -> bool:
        now = _now()
        return cert.not_valid_before_utc <= now < cert.not_valid_after_utc

    def _ensure_ca(self) -> None:
        if self.ca_cert_path.exists() and self.ca_key_path.exists():
            return
        if self.ca_cert_path.exists() != self.ca_key_path.exists():
            raise PkiError(
                f"{self.ca_dir} holds a CA certificate or key but not both; the CA cannot be used. "
                f"Remove {self.state_dir} to start a fresh lab PKI (every node then needs new credentials)"
            )
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "rig lab"),
                x509.NameAttribute(NameOID.COMMON_NAME, f"rig lab CA {os.urandom(4).hex()}"),
            ]
        )
        now = _now()
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        _write_atomic(self.ca_key_path, _private_pem(key), 0o600)
        _write_atomic(self.ca_cert_path, cert.public_bytes(serialization.Encoding.PEM))
        self._write_crl({})

    def _ca_key(self) -> ec.EllipticCurvePrivateKey:
        key = serialization.load_pem_private_key(self.ca_key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise PkiError(f"{self.ca_key_path} is not the ECDSA key the rig's CA uses")
        return key

    def _issue(self, kind: str, cn: str, key_type: KeyType, server_hosts: list[x509.GeneralName] | None = None) -> CertPair:
        key = _new_key(key_type)
        ca = self.ca_cert
        now = _now()
        is_server = server_hosts is not None
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now + LEAF_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=key_type == "rsa",
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if is_server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
                ),
                critical=False,
            )
        )
        if server_hosts is not None:
            builder = builder.add_extension(x509.SubjectAlternativeName(server_hosts), critical=False)
        cert = builder.sign(self._ca_key(), hashes.SHA256())
        pair = self._pair(kind, cn)
        _write_atomic(pair.key_path, _private_pem(key), 0o600)
        _write_atomic(pair.cert_path, cert.public_bytes(serialization.Encoding.PEM))
        index = self._index()
        index[f"{cert.serial_number:x}"] = {
            "cn": cn,
            "kind": kind,
            "sha256": _fingerprint(cert),
            "not_after": cert.not_valid_after_utc.isoformat(),
        }
        _write_atomic(self._index_path, json.dumps(index, indent=1, sort_keys=True).encode())
        return pair

    def _crl(self) -> x509.CertificateRevocationList | None:
        if not self.crl_path.exists():
            return None
        return x509.load_pem_x509_crl(self.crl_path.read_bytes())

    def _revoked_serials(self) -> dict[int, dt.datetime]:
        crl = self._crl()
        if crl is None:
            return {}
        return {r.serial_number: r.revocation_date_utc for r in crl}

    def _refresh_crl_if_due(self) -> None:
        crl = self._crl()
        if crl is None or crl.next_update_utc is None or crl.next_update_utc - _now() < CRL_REFRESH_MARGIN:
            self._write_crl(self._revoked_serials())

    def _write_crl(self, revoked: dict[int, dt.datetime]) -> None:
        """Sign a fresh CRL (RFC 5280 §5: CRL number grows by one each time)."""
        previous = self._crl()
        number = 1
        if previous is not None:
            with contextlib.suppress(x509.ExtensionNotFound):
                number = previous.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number + 1
        ca = self.ca_cert
        now = _now()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(ca.subject)
            .last_update(now - dt.timedelta(minutes=5))
            .next_update(now + CRL_VALIDITY)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                    ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
                ),
                critical=False,
            )
        )
        for serial, when in sorted(revoked.items()):
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(when).build()
            )
        crl = builder.sign(self._ca_key(), hashes.SHA256())
        _write_atomic(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))


def _check_name(name: str, what: str) -> None:
    if not NODE_ID_RE.match(name):
        raise PkiError(f"{what} {name!r} must be 1-64 of [A-Za-z0-9_-]")


def _san_entries(hosts: list[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # keep order, drop repeats
        try:
            entry: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            entry = x509.DNSName(host)
        out.append(entry)
    return out


"""The lab PKI (rig.cloud.pki): what it issues, the node registry, the CRL — checked with cryptography and ``openssl``.

The broker tests (``tests/test_cloud_broker.py``) show mosquitto honouring these
certificates and the CRL; here each artefact is checked on its own, and the CRL and
chain against ``openssl verify`` (the tool, not this module, decides what "revoked" means).
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import stat
import subprocess
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rig.cloud.pki import SERVICE_IDENTITY, CertPair, LabPki, PkiError


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> LabPki:
    return LabPki(tmp_path_factory.mktemp("pki"))


def openssl_verify(pki: LabPki, pair: CertPair, crl: bool = True) -> subprocess.CompletedProcess[str]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    args = ["openssl", "verify", "-CAfile", str(pki.ca_cert_path)]
    if crl:
        args += ["-crl_check", "-CRLfile", str(pki.crl_path)]
    return subprocess.run([*args, str(pair.cert_path)], capture_output=True, text=True, timeout=30, check=False)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_is_created_once_with_a_private_key_file(tmp_path: Path) -> None:
    first = LabPki(tmp_path)
    ca_pem = first.ca_cert_path.read_bytes()
    assert mode(tmp_path / "ca" / "ca.key") == 0o600
    ca = first.ca_cert
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey) and ca.public_key().curve.name == "secp256r1"
    assert LabPki(tmp_path).ca_cert_path.read_bytes() == ca_pem  # reused, not re-made


def test_half_a_ca_is_an_error_not_a_silent_new_ca(tmp_path: Path) -> None:
    LabPki(tmp_path)
    (tmp_path / "ca" / "ca.key").unlink()
    with pytest.raises(PkiError, match="not both"):
        LabPki(tmp_path)


def test_node_certificate_is_ecdsa_p256_with_cn_node_id(pki: LabPki) -> None:
    pair = pki.node_cert("58CF79DAC1E4")
    cert = pair.certificate
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "58CF79DAC1E4" == pair.common_name
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey) and cert.public_key().curve.name == "secp256r1"
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    cert.verify_directly_issued_by(pki.ca_cert)
    assert mode(pair.key_path) == 0o600
    key = serialization.load_pem_private_key(pair.key_path.read_bytes(), password=None)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert pair.key_path.read_bytes().startswith(b"-----BEGIN EC PRIVATE KEY-----")
    assert openssl_verify(pki, pair).returncode == 0


def test_rsa_node_certificate(pki: LabPki) -> None:
    pair = pki.node_cert("xEyeo7xxJTykc8uXFgxK8B", key_type="rsa")
    pub = pair.certificate.public_key()
    assert isinstance(pub, rsa.RSAPublicKey) and pub.key_size == 2048
    assert pair.key_path.read_bytes().startswith(b"-----BEGIN RSA PRIVATE KEY-----")  # as rmaker claim writes node.key
    assert openssl_verify(pki, pair).returncode == 0


def test_node_certificate_is_idempotent(pki: LabPki) -> None:
    first = pki.node_cert("nodeIdem01")
    pem, key = first.cert_pem, first.key_path.read_bytes()
    again = pki.node_cert("nodeIdem01")
    assert again == first and again.cert_pem == pem and again.key_path.read_bytes() == key
    with pytest.raises(PkiError, match="already has a EC certificate"):
        pki.node_cert("nodeIdem01", key_type="rsa")


def test_concurrent_requests_for_one_node_get_one_certificate(pki: LabPki) -> None:
    results: list[bytes] = []
    lock = threading.Lock()

    def ask() -> None:
        pem = LabPki(pki.state_dir).node_cert("nodeRace01").cert_pem
        with lock:
            results.append(pem)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 8 and len(set(results)) == 1
    index = json.loads((pki.state_dir / "ca" / "issued.json").read_text())
    assert [r["cn"] for r in index.values()].count("nodeRace01") == 1


@pytest.mark.parametrize("bad", ["", "node/1", "node\n", "node+", "node#", "with space", "nul\0id", "x" * 65, "ünï"])
def test_node_ids_that_would_break_the_acl_are_refused(pki: LabPki, bad: str) -> None:
    with pytest.raises(PkiError, match="MQTT client id"):
        pki.node_cert(bad)


def test_identity_names_do_not_cross_kinds(pki: LabPki) -> None:
    pki.service_cert()
    with pytest.raises(PkiError, match="already a service identity"):
        pki.node_cert(SERVICE_IDENTITY)
    pki.node_cert("nodeKind01")
    with pytest.raises(PkiError, match="already a node identity"):
        pki.service_cert("nodeKind01")


def test_server_certificate_names_localhost_and_loopback(pki: LabPki) -> None:
    pair = pki.server_cert("api-server", ["rig-lab.local", "10.0.0.7"])
    cert = pair.certificate
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "rig-lab.local"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "10.0.0.7"]
    assert ExtendedKeyUsageOID.SERVER_AUTH in cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert pki.server_cert("api-server", ["rig-lab.local"]) == pair and pair.cert_pem == cert.public_bytes(serialization.Encoding.PEM)
    wider = pki.server_cert("api-server", ["other.local"])  # a host it lacks → re-issued with it
    assert "other.local" in wider.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName
    )


def test_service_certificate(pki: LabPki) -> None:
    pair = pki.service_cert()
    assert pair.common_name == SERVICE_IDENTITY
    assert pki.is_issued(pair.cert_pem)


def test_registry_knows_only_what_this_ca_issued(pki: LabPki, tmp_path: Path) -> None:
    mine = pki.node_cert("nodeReg01")
    assert pki.is_issued(mine.cert_pem)
    stranger = LabPki(tmp_path / "other").node_cert("nodeReg01")  # same CN, another CA
    assert not pki.is_issued(stranger.cert_pem)
    assert not pki.is_issued(b"not a certificate")

    # Signed with this CA's key but never recorded: not a node the cloud knows.
    ca_key = serialization.load_pem_private_key((pki.state_dir / "ca" / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    unrecorded = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nodeGhost1")]))
        .issuer_name(pki.ca_cert.subject)
        .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(ca_key, hashes.SHA256())
    )
    assert not pki.is_issued(unrecorded.public_bytes(serialization.Encoding.PEM))


def test_revocation_updates_the_crl_that_openssl_reads(pki: LabPki) -> None:
    victim, bystander = pki.node_cert("nodeRevoke1"), pki.node_cert("nodeRevoke2")
    number_before = x509.load_pem_x509_crl(pki.crl_path.read_bytes()).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    assert openssl_verify(pki, victim).returncode == 0

    serial = pki.revoke("nodeRevoke1")
    assert pki.revoke("nodeRevoke1") == serial  # idempotent

    crl = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert crl.is_signature_valid(pki.ca_cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == number_before + 1
    assert crl.next_update_utc is not None and crl.next_update_utc > dt.datetime.now(dt.UTC) + dt.timedelta(days=7)
    assert not pki.is_issued(victim.cert_pem) and pki.is_revoked(victim.cert_pem)
    assert pki.is_issued(bystander.cert_pem)

    refused = openssl_verify(pki, victim)
    assert refused.returncode != 0 and "certificate revoked" in refused.stdout + refused.stderr
    assert openssl_verify(pki, bystander).returncode == 0
    assert pki.node_cert("nodeRevoke1") == victim  # the node keeps its (useless) credentials


def test_revoking_an_unknown_node_is_an_error(pki: LabPki) -> None:
    with pytest.raises(PkiError, match="nothing to revoke"):
        pki.revoke("nodeNeverIssued")


def test_crl_close_to_expiry_is_refreshed_and_keeps_its_entries(tmp_path: Path) -> None:
    """mosquitto refuses every client once the CRL's nextUpdate passes, so a stale CRL is re-signed on load."""
    pki = LabPki(tmp_path)
    pki.node_cert("nodeOld01")
    serial = pki.revoke("nodeOld01")
    ca_key = serialization.load_pem_private_key((tmp_path / "ca" / "ca.key").read_bytes(), password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = dt.datetime.now(dt.UTC)
    stale = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(pki.ca_cert.subject)
        .last_update(now - dt.timedelta(days=29))
        .next_update(now + dt.timedelta(hours=12))
        .add_revoked_certificate(x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build())
        .sign(ca_key, hashes.SHA256())
    )
    pki.crl_path.write_bytes(stale.public_bytes(serialization.Encoding.PEM))

    LabPki(tmp_path)
    fresh = x509.load_pem_x509_crl(pki.crl_path.read_bytes())
    assert fresh.next_update_utc is not None and fresh.next_update_utc > now + dt.timedelta(days=7)
    assert fresh.get_revoked_certificate_by_serial_number(serial) is not None


def test_no_private_key_in_reprs_or_errors(pki: LabPki) -> None:
    pair = pki.node_cert("nodeSecret1")
    key_text = pair.key_path.read_text()
    body = key_text.splitlines()[1]
    with pytest.raises(PkiError) as err:
        pki.node_cert("nodeSecret1", key_type="rsa")
    for text in (repr(pair), str(pair), str(err.value), repr(pki)):
        assert "PRIVATE KEY" not in text and body not in text

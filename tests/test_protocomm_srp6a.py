"""rig.protocomm.srp6a: rig client ↔ rig verifier, Espressif's srp6a client ↔ rig verifier, and a
known-answer vector computed once with Espressif's srp6a (esp-rainmaker-cli 1.14.1,
``rmaker_tools/common/security/srp6a.py``) from fixed salt, a and b.
"""

from __future__ import annotations

import hashlib

import pytest

from rig.protocomm.srp6a import N_3072, N_LEN, G, SrpClient, SrpCredentials, SrpError, SrpVerifier
from tests import espressif_prov_client

espressif_srp = espressif_prov_client.module("common.security.srp6a")

USER, POP = "wifiprov", "abcd1234"

# Known answer: Espressif's generate_salt_and_verifier (salt forced to KAT_SALT) and Srp6a (a forced
# to KAT_A) with B = (k·v + g^b) mod N for KAT_B; values printed by their code and pinned here.
KAT_SALT = bytes.fromhex("5a1c3e9f00112233445566778899aabb")
KAT_A = int("c0ffee" + "11" * 29, 16)
KAT_B = int("0badf00d" + "22" * 28, 16)
KAT_V_SHA256 = "fce0b1c979952e1ad010c6d5e3d5c7828f161acfc47b9ad2f1e9a7de8802cd0c"
KAT_PUB_A_SHA256 = "d3c2da5abbd6838d9ada93abfdd12b2880e64552041b78f7944108b19ffff75c"
KAT_PUB_B_SHA256 = "5a6e4f270f0e9609197d4ed437e38e515281eecad98f3cb11f77243c7f25971d"
KAT_K = bytes.fromhex(
    "c36b240afebfdd0585a608ee56872622c47bc1b4868a524cf98a7743f9f09e13444a8fdbc32867ad99e72c24e409db462bf71b7af7928e885324995bdde22865"
)
KAT_M = bytes.fromhex(
    "59aece60f22accfc7ff353b7fadf43d3ec30310209ca876a01636415e84cad693662dde30df2954dfbfc243450a5821fd0a2c40fabc85109ff738db281cbe580"
)
KAT_H_AMK = bytes.fromhex(
    "012a248ef6c8da4fa68a363c56a097be03d38ab7920d7e1da43a8499676cc473b81e11b7dde309f586c6bd47b693329c9aa8ac39f49e7538ec32bcd961a3ce43"
)


def test_group_is_rfc5054_3072_with_generator_5() -> None:
    n, g = espressif_srp.get_ng(espressif_srp.NG_3072)
    assert (N_3072, G) == (n, g)
    assert N_3072.bit_length() == 3072 and N_LEN == 384


def test_known_answer_vector() -> None:
    credentials = SrpCredentials.derive(USER, POP, salt=KAT_SALT)
    assert hashlib.sha256(credentials.verifier).hexdigest() == KAT_V_SHA256
    verifier = SrpVerifier(credentials, b=KAT_B)
    client = SrpClient(USER, POP, a=KAT_A)
    assert hashlib.sha256(client.public_key).hexdigest() == KAT_PUB_A_SHA256
    assert hashlib.sha256(verifier.public_key).hexdigest() == KAT_PUB_B_SHA256
    verifier.accept_client_key(client.public_key)
    proof = client.process_challenge(credentials.salt, verifier.public_key)
    assert (client.session_key, verifier.session_key, proof) == (KAT_K, KAT_K, KAT_M)
    assert verifier.verify_client_proof(USER.encode(), proof) == KAT_H_AMK
    client.verify_device_proof(KAT_H_AMK)
    assert client.authenticated


def test_known_answer_vector_still_matches_espressif_today(monkeypatch: pytest.MonkeyPatch) -> None:
    """Re-run Espressif's code with the same fixed randomness: the pinned values are what it computes."""
    monkeypatch.setattr(espressif_srp, "get_random", lambda n: int.from_bytes(KAT_SALT, "big"))
    monkeypatch.setattr(espressif_srp, "get_random_of_length", lambda n: KAT_A)
    salt, v = espressif_srp.generate_salt_and_verifier(USER, POP, len_s=16)
    assert (salt, hashlib.sha256(v).hexdigest()) == (KAT_SALT, KAT_V_SHA256)
    theirs = espressif_srp.Srp6a(USER, POP)
    rig_verifier = SrpVerifier(SrpCredentials(salt, v), b=KAT_B)
    assert theirs.process_challenge(salt, rig_verifier.public_key) == KAT_M
    assert theirs.H_AMK == KAT_H_AMK


def test_rig_client_and_rig_verifier_agree() -> None:
    for _ in range(3):
        verifier = SrpVerifier.from_password(USER, POP)
        client = SrpClient(USER, POP)
        assert len(client.public_key) == N_LEN
        verifier.accept_client_key(client.public_key)
        h_amk = verifier.verify_client_proof(USER.encode(), client.process_challenge(verifier.salt, verifier.public_key))
        client.verify_device_proof(h_amk)
        assert client.session_key == verifier.session_key and len(client.session_key) == 64


def test_espressif_client_and_rig_verifier_agree() -> None:
    for _ in range(3):
        verifier = SrpVerifier.from_password(USER, POP)
        theirs = espressif_srp.Srp6a(USER, POP)
        verifier.accept_client_key(espressif_srp.long_to_bytes(theirs.A))
        proof = theirs.process_challenge(verifier.salt, verifier.public_key)
        theirs.verify_session(verifier.verify_client_proof(USER.encode(), proof))
        assert theirs.authenticated()
        assert theirs.get_session_key() == verifier.session_key


def test_rig_verifier_accepts_espressif_salt_and_verifier() -> None:
    """A device provisioned with Espressif's sec2_gen_salt_verifier output works with the rig client."""
    salt, v = espressif_srp.generate_salt_and_verifier(USER, POP, len_s=16)
    verifier = SrpVerifier(SrpCredentials(salt, v))
    client = SrpClient(USER, POP)
    verifier.accept_client_key(client.public_key)
    client.verify_device_proof(verifier.verify_client_proof(USER.encode(), client.process_challenge(salt, verifier.public_key)))


def test_wrong_password_fails_on_both_sides() -> None:
    verifier = SrpVerifier.from_password(USER, POP)
    client = SrpClient(USER, "abcd1235")
    verifier.accept_client_key(client.public_key)
    proof = client.process_challenge(verifier.salt, verifier.public_key)
    with pytest.raises(SrpError, match="does not know the password"):
        verifier.verify_client_proof(USER.encode(), proof)
    with pytest.raises(SrpError, match="does not hold the verifier"):
        client.verify_device_proof(b"\0" * 64)
    assert not client.authenticated


def test_unsafe_public_keys_are_refused() -> None:
    verifier = SrpVerifier.from_password(USER, POP)
    for bad in (b"\0" * N_LEN, N_3072.to_bytes(N_LEN, "big")):
        with pytest.raises(SrpError, match="0 mod N"):
            verifier.accept_client_key(bad)
    with pytest.raises(SrpError, match="0 mod N"):
        SrpClient(USER, POP).process_challenge(verifier.salt, b"\0" * N_LEN)


def test_derived_salt_is_16_bytes_without_a_leading_zero() -> None:
    for _ in range(50):
        salt = SrpCredentials.derive(USER, POP).salt
        assert len(salt) == 16 and salt[0] != 0

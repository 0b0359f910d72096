"""rig.protocomm.security: security 0/1/2 sessions, device side and client side.

Cross-checked against Espressif's Security1 / Security2 client (esp-rainmaker-cli's rmaker_tools):
if it disagrees with the rig's device side, the device side is wrong. Adversarial cases follow
esp-idf security1.c / security2.c: a wrong PoP is answered with ESP_FAIL and no response message,
never with a session; truncated, replayed, reordered and malformed handshake messages are refused
with SecurityRefusal and nothing else escapes the device side.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from rig.protocomm import messages as m
from rig.protocomm.errors import EspErr, SecurityRefusal, SessionError
from rig.protocomm.proto import raw_field
from rig.protocomm.security import (
    AesCtrStream,
    ClientSecurity,
    ClientSecurity0,
    ClientSecurity1,
    ClientSecurity2,
    DeviceSecurity,
    DeviceSecurity0,
    DeviceSecurity1,
    DeviceSecurity2,
    SecurityEvent,
    client_security,
)
from rig.protocomm.srp6a import SrpCredentials
from tests import espressif_prov_client

espressif_sec1 = espressif_prov_client.module("common.security.security1")

POP = "abcd1234"
CREDENTIALS = SrpCredentials.derive("wifiprov", POP)  # derived once: SRP verifiers are slow to make


def _device(sec_ver: int, patch: int = 1) -> DeviceSecurity:
    if sec_ver == 0:
        return DeviceSecurity0()
    if sec_ver == 1:
        return DeviceSecurity1(POP)
    return DeviceSecurity2(CREDENTIALS, patch_version=patch)


def _espressif_handshake(client: Any, exchange: Callable[[bytes], bytes]) -> None:
    """Drive Espressif's security FSM (it speaks latin-1 str) against *exchange*."""
    response = None
    while True:
        request = client.security_session(response)
        if request is None:
            return
        response = exchange(request.encode("latin-1")).decode("latin-1")


def _round_trips(encrypt_c: Callable, decrypt_c: Callable, device: DeviceSecurity, count: int = 4) -> None:
    """Request/response pairs in both directions, sizes crossing AES block boundaries (CTR offset, GCM counter)."""
    for i in range(count):
        request = bytes([i]) * (5 + 13 * i)
        assert device.decrypt(encrypt_c(request)) == request
        response = b"resp-" + bytes([0x40 + i]) * (3 + 17 * i)
        assert decrypt_c(device.encrypt(response)) == response
    # two responses in a row (a device may answer twice before the next request) keep the shared state in step
    first, second = device.encrypt(b"one"), device.encrypt(b"two")
    assert (decrypt_c(first), decrypt_c(second)) == (b"one", b"two")


# --- rig ↔ rig -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("sec_ver", "patch"), [(0, 0), (1, 0), (2, 0), (2, 1)])
def test_rig_client_and_rig_device_handshake_and_round_trip(sec_ver: int, patch: int) -> None:
    device = _device(sec_ver, patch)
    client = client_security(sec_ver, POP, patch_version=patch)
    client.handshake(device.handle_session)
    assert client.established and device.established
    _round_trips(client.encrypt, client.decrypt, device)
    if sec_ver:
        assert SecurityEvent.SETUP_OK in device.events


def test_sec0_is_plaintext_and_always_established() -> None:
    device = DeviceSecurity0()
    assert device.established and not device.encrypts
    assert device.encrypt(b"wifi-passphrase") == b"wifi-passphrase"
    response = m.SessionData.decode(device.handle_session(ClientSecurity0().command0()))
    assert response.which("proto") == "sec0" and response.sec0.sr.status == m.Status.Success


# --- Espressif's client ↔ rig device ------------------------------------------------------------------


def test_espressif_security1_against_rig_device() -> None:
    device = DeviceSecurity1(POP)
    theirs = espressif_sec1.Security1(POP, False)
    _espressif_handshake(theirs, device.handle_session)
    assert device.established
    _round_trips(theirs.encrypt_data, theirs.decrypt_data, device, count=6)


def test_espressif_security1_without_pop_against_rig_device() -> None:
    device = DeviceSecurity1(b"")
    theirs = espressif_sec1.Security1("", False)
    _espressif_handshake(theirs, device.handle_session)
    _round_trips(theirs.encrypt_data, theirs.decrypt_data, device)


@pytest.mark.parametrize("patch", [0, 1])
def test_espressif_security2_against_rig_device(patch: int) -> None:
    device = DeviceSecurity2(CREDENTIALS, patch_version=patch)
    theirs = espressif_prov_client.security2(patch, "wifiprov", POP)
    _espressif_handshake(theirs, device.handle_session)
    assert device.established
    assert theirs.session_key == device._srp.session_key[:32]  # the device's K, read for the cross-check
    _round_trips(theirs.encrypt_data, theirs.decrypt_data, device, count=6)
    assert bytes(theirs.nonce) == device.nonce


def test_rig_client_against_espressif_derived_verifier() -> None:
    """A device whose salt/verifier came from Espressif's sec2_gen_salt_verifier (as firmware embeds them)."""
    salt, verifier = espressif_prov_client.module("common.security.srp6a").generate_salt_and_verifier("wifiprov", POP, len_s=16)
    device = DeviceSecurity2(SrpCredentials(salt, verifier))
    client = ClientSecurity2(POP)
    client.handshake(device.handle_session)
    _round_trips(client.encrypt, client.decrypt, device)


# --- sec2 nonce rules (sec_patch_ver) ---------------------------------------------------------------------


def test_sec2_patch1_counter_starts_at_1_and_counts_every_operation() -> None:
    device = DeviceSecurity2(CREDENTIALS, patch_version=1)
    client = ClientSecurity2(POP, patch_version=1)
    client.handshake(device.handle_session)
    session_id = device.nonce[:8]
    assert device.nonce[8:] == (1).to_bytes(4, "big") == client.nonce[8:]
    device.decrypt(client.encrypt(b"a"))
    client.decrypt(device.encrypt(b"b"))
    assert device.nonce == client.nonce == session_id + (3).to_bytes(4, "big")


def test_sec2_patch0_reuses_the_nonce_and_so_accepts_a_replay() -> None:
    """The flaw patch 1 fixed: with one fixed IV a captured request decrypts again (and GCM's keystream repeats)."""
    device = DeviceSecurity2(CREDENTIALS, patch_version=0)
    client = ClientSecurity2(POP, patch_version=0)
    client.handshake(device.handle_session)
    nonce = device.nonce
    captured = client.encrypt(b"apply-config")
    assert device.decrypt(captured) == b"apply-config"
    assert device.decrypt(captured) == b"apply-config"
    assert device.nonce == nonce


def test_sec2_patch1_refuses_a_replayed_request() -> None:
    device = DeviceSecurity2(CREDENTIALS, patch_version=1)
    client = ClientSecurity2(POP, patch_version=1)
    client.handshake(device.handle_session)
    captured = client.encrypt(b"apply-config")
    assert device.decrypt(captured) == b"apply-config"
    with pytest.raises(SecurityRefusal) as info:
        device.decrypt(captured)
    assert info.value.esp_err is EspErr.ESP_FAIL


def test_sec2_patch_mismatch_breaks_on_the_second_message() -> None:
    device = DeviceSecurity2(CREDENTIALS, patch_version=1)
    client = ClientSecurity2(POP, patch_version=0)
    client.handshake(device.handle_session)
    assert device.decrypt(client.encrypt(b"first")) == b"first"  # both used IV ‖ 1
    with pytest.raises(SessionError, match="AES-GCM"):
        client.decrypt(device.encrypt(b"reply"))  # device moved to counter 2, client stayed at 1


def test_sec2_counter_wrap_refuses_further_crypto() -> None:
    device = DeviceSecurity2(CREDENTIALS, patch_version=1)
    client = ClientSecurity2(POP, patch_version=1)
    client.handshake(device.handle_session)
    device._nonce[8:] = (0xFFFFFFFF).to_bytes(4, "big")  # fast-forward 4 billion messages
    device.encrypt(b"last")
    with pytest.raises(SecurityRefusal, match="wrapped"):
        device.encrypt(b"one too many")


def test_sec1_uses_one_ctr_stream_for_both_directions() -> None:
    """Handshake, request and response draw from one AES-CTR keystream in call order (rainmaker-protocol.md §9.5)."""
    device = DeviceSecurity1(POP)
    theirs = espressif_sec1.Security1(POP, False)
    _espressif_handshake(theirs, device.handle_session)
    stream = Cipher(algorithms.AES(theirs.shared_key), modes.CTR(theirs.device_random)).encryptor()
    keystream = stream.update(b"\0" * (32 + 32 + 20 + 12))  # client verify, device verify, request, response
    request, response = bytes(range(20)), b"twelve bytes"
    sent = theirs.encrypt_data(request)
    assert sent == bytes(a ^ b for a, b in zip(request, keystream[64:84], strict=True))
    assert device.decrypt(sent) == request
    assert device.encrypt(response) == bytes(a ^ b for a, b in zip(response, keystream[84:96], strict=True))


def test_aes_ctr_stream_is_continuous_across_calls() -> None:
    whole = AesCtrStream(b"k" * 32, b"\xff" * 16).apply(b"\0" * 50)  # counter block wraps at 2**128
    pieces = AesCtrStream(b"k" * 32, b"\xff" * 16)
    assert pieces.apply(b"\0" * 7) + pieces.apply(b"\0" * 9) + pieces.apply(b"\0" * 34) == whole
    reference = Cipher(algorithms.AES(b"k" * 32), modes.CTR(b"\xff" * 16)).encryptor().update(b"\0" * 50)
    assert whole == reference


# --- wrong PoP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("sec_ver", [1, 2])
def test_wrong_pop_with_espressif_client_fails_without_a_session(sec_ver: int) -> None:
    device = _device(sec_ver)
    theirs = espressif_sec1.Security1("abcd1235", False) if sec_ver == 1 else espressif_prov_client.security2(1, "wifiprov", "abcd1235")
    with pytest.raises(SecurityRefusal) as info:
        _espressif_handshake(theirs, device.handle_session)
    assert info.value.esp_err is EspErr.ESP_FAIL  # no SessionResp1 with a status: the request handler fails
    assert info.value.device_log == (
        ("security1", "Key mismatch. Close connection") if sec_ver == 1 else ("security2", "Failed to authenticate client proof!")
    )
    assert device.failure is info.value
    assert not device.established
    assert device.events[-1] is SecurityEvent.CREDENTIALS_MISMATCH
    for operation in (device.encrypt, device.decrypt):
        with pytest.raises(SecurityRefusal) as refused:
            operation(b"x" * 32)
        assert refused.value.esp_err is EspErr.ESP_ERR_INVALID_STATE


def test_sec2_wrong_pop_leaves_command1_open_for_another_guess() -> None:
    """As security2.c: after a failed proof the session stays in the Command0-done state with the same B."""
    device = DeviceSecurity2(CREDENTIALS)
    right = ClientSecurity2(POP, a=0xC0FFEE << 200)
    wrong = ClientSecurity2("abcd1235", a=0xC0FFEE << 200)  # same A, so the device's B/K fit both
    response0 = device.handle_session(right.command0())
    right.handle_response0(response0)
    wrong.handle_response0(response0)
    with pytest.raises(SecurityRefusal):
        device.handle_session(wrong.command1())
    right.handle_response1(device.handle_session(right.command1()))
    assert right.established and device.established


def test_sec1_failed_command1_advances_the_counter_like_mbedtls() -> None:
    """security1.c runs CTR on cur_session->rand in place: a retry after a mismatch starts further on, so it fails too."""
    device = DeviceSecurity1(POP)
    wrong = ClientSecurity1("abcd1235")
    response0 = device.handle_session(wrong.command0())
    wrong.handle_response0(response0)
    with pytest.raises(SecurityRefusal):
        device.handle_session(wrong.command1())
    right = ClientSecurity1(POP, private_key=wrong._private.private_bytes_raw())  # same key pair
    right.handle_response0(response0)
    with pytest.raises(SecurityRefusal) as info:
        device.handle_session(right.command1())
    assert info.value.esp_err is EspErr.ESP_FAIL


# --- adversarial handshake input -----------------------------------------------------------------------


def _refusal(device: DeviceSecurity, request: bytes) -> SecurityRefusal:
    with pytest.raises(SecurityRefusal) as info:
        device.handle_session(request)
    return info.value


def _codes(refusal: SecurityRefusal) -> tuple[EspErr, EspErr]:
    return refusal.esp_err, refusal.cause


INVALID_ARG, INVALID_STATE, FAIL = EspErr.ESP_ERR_INVALID_ARG, EspErr.ESP_ERR_INVALID_STATE, EspErr.ESP_FAIL


@pytest.mark.parametrize("sec_ver", [1, 2])
def test_malformed_truncated_reordered_and_downgraded_requests_are_refused(sec_ver: int) -> None:
    device = _device(sec_ver)
    client = client_security(sec_ver, POP, patch_version=1)
    command0 = client.command0()
    # refused by the request handler itself: ESP_ERR_INVALID_ARG
    assert _codes(_refusal(device, b"\xff\xff\xff")) == (INVALID_ARG, INVALID_ARG)  # not protobuf
    assert _codes(_refusal(device, command0[: len(command0) // 2])) == (INVALID_ARG, INVALID_ARG)  # truncated
    assert _codes(_refusal(device, ClientSecurity0().command0())) == (INVALID_ARG, INVALID_ARG)  # downgrade to sec0
    other = 2 if sec_ver == 1 else 1
    assert _codes(_refusal(device, client_security(other, POP).command0())) == (INVALID_ARG, INVALID_ARG)  # the other scheme
    # refused by a handshake step: ESP_FAIL with the step's code as cause (security2.c checks proto_case up front)
    no_payload = _refusal(device, m.SessionData(sec_ver=sec_ver).encode())
    assert _codes(no_payload) == ((FAIL, INVALID_ARG) if sec_ver == 1 else (INVALID_ARG, INVALID_ARG))
    bad_msg_type = m.SessionData(sec_ver=sec_ver).encode() + raw_field(10 + sec_ver, raw_field(1, 7))
    assert _codes(_refusal(device, bad_msg_type)) == (FAIL, INVALID_ARG)
    # Command1 before Command0
    response0 = device.handle_session(command0)
    client.handle_response0(response0)
    early = _device(sec_ver)
    assert _codes(_refusal(early, client.command1())) == (FAIL, INVALID_STATE)
    # complete, then replay both steps
    client.handle_response1(device.handle_session(client.command1()))
    assert device.established
    assert _codes(_refusal(device, client.command1())) == (FAIL, INVALID_STATE)  # replayed Command1
    device.handle_session(command0)  # replayed Command0 restarts the handshake, as ESP-IDF does
    assert not device.established


def test_wrong_key_lengths_are_invalid_arg() -> None:
    sec1 = m.SessionData(sec_ver=1, sec1=m.Sec1Payload(sc0=m.SessionCmd0(client_pubkey=b"\x09" * 31))).encode()
    assert _codes(_refusal(DeviceSecurity1(POP), sec1)) == (FAIL, INVALID_ARG)
    short_a = m.SessionData(sec_ver=2, sec2=m.Sec2Payload(sc0=m.S2SessionCmd0(client_username=b"wifiprov", client_pubkey=b"\x05" * 383)))
    device = DeviceSecurity2(CREDENTIALS)
    assert _codes(_refusal(device, short_a.encode())) == (FAIL, INVALID_ARG)
    assert device.events[-1] is SecurityEvent.INVALID_SECURITY_PARAMS
    zero_a = m.SessionData(sec_ver=2, sec2=m.Sec2Payload(sc0=m.S2SessionCmd0(client_username=b"wifiprov", client_pubkey=b"\0" * 384)))
    assert _codes(_refusal(device, zero_a.encode())) == (FAIL, FAIL)  # A ≡ 0 mod N (RFC 5054 §2.5.4)


@pytest.mark.parametrize("sec_ver", [0, 1, 2])
def test_fuzzed_handshake_bytes_never_escape_as_other_exceptions(sec_ver: int) -> None:
    """Bit flips, truncations and splices of real handshake messages: a response or a SecurityRefusal, nothing else."""
    rng = random.Random(5303645 + sec_ver)
    client = client_security(sec_ver, POP, patch_version=1)
    seeds = [client.command0()]
    device = _device(sec_ver)
    client.handle_response0(device.handle_session(seeds[0]))
    if client.rounds > 1:
        seeds.append(client.command1())
    for _ in range(120 if sec_ver != 2 else 40):
        data = bytearray(rng.choice(seeds))
        action = rng.randrange(3)
        if action == 0 and data:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif action == 1:
            data = data[: rng.randrange(len(data) + 1)]
        else:
            data += bytes(rng.randrange(256) for _ in range(rng.randrange(1, 6)))
        try:
            device.handle_session(bytes(data))
        except SecurityRefusal:
            pass


@pytest.mark.parametrize("sec_ver", [1, 2])
def test_tampered_or_garbage_payloads_are_refused(sec_ver: int) -> None:
    device = _device(sec_ver)
    client = client_security(sec_ver, POP, patch_version=1)
    client.handshake(device.handle_session)
    if sec_ver == 2:
        tampered = bytearray(client.encrypt(b"payload"))
        tampered[0] ^= 1
        with pytest.raises(SecurityRefusal):
            device.decrypt(bytes(tampered))
        with pytest.raises(SecurityRefusal, match="cannot hold"):
            device.decrypt(b"short")
    else:
        assert device.decrypt(b"anything") != b"anything"  # CTR has no integrity: the flaw sec2 fixes


# --- sessions --------------------------------------------------------------------------------------


def test_one_session_at_a_time_and_session_ids_are_checked() -> None:
    device = DeviceSecurity1(POP)
    client = ClientSecurity1(POP)
    device.new_session(11)
    client.handshake(lambda b: device.handle_session(b, session_id=11))
    assert device.established
    with pytest.raises(SecurityRefusal) as info:
        device.decrypt(b"x", session_id=12)
    assert info.value.esp_err is EspErr.ESP_ERR_INVALID_STATE
    device.new_session(12)  # a new transport session closes the old one
    assert not device.established and device.session_id == 12
    with pytest.raises(SecurityRefusal):
        device.close_session(11)
    device.close_session(12)
    assert device.session_id is None


# --- client side errors ------------------------------------------------------------------------------


def test_client_reports_device_status_and_scheme_mismatch() -> None:
    client = ClientSecurity1(POP)
    failed = m.SessionData(sec_ver=1, sec1=m.Sec1Payload(msg=1, sr0=m.SessionResp0(status=m.Status.CryptoError))).encode()
    with pytest.raises(SessionError) as info:
        client.handle_response0(failed)
    assert info.value.status == m.Status.CryptoError
    with pytest.raises(SessionError, match="answered with security 2"):
        client.handle_response0(m.SessionData(sec_ver=2).encode())
    with pytest.raises(SessionError, match="not a SessionData"):
        client.handle_response0(b"\x0a\x09")
    with pytest.raises(SessionError, match="needs response 0"):
        ClientSecurity2(POP).command1()
    with pytest.raises(SessionError, match="no second handshake round"):
        ClientSecurity0().command1()


def test_client_steps_are_replayable_bytes() -> None:
    client: ClientSecurity = ClientSecurity1(POP)
    assert client.command0() == client.command0()
    device = DeviceSecurity1(POP)
    client.handle_response0(device.handle_session(client.command0()))
    assert client.command1() == client.command1()


def test_client_rejects_forged_device_proofs() -> None:
    """A peer that does not know the PoP cannot finish the handshake in either direction."""
    impostor = DeviceSecurity2(SrpCredentials.derive("wifiprov", "not-the-pop"))
    client = ClientSecurity2(POP)
    client.handle_response0(impostor.handle_session(client.command0()))
    with pytest.raises(SecurityRefusal):
        impostor.handle_session(client.command1())  # the impostor cannot verify our proof …
    forged = m.SessionData(sec_ver=2, sec2=m.Sec2Payload(msg=3, sr1=m.S2SessionResp1(device_proof=b"\1" * 64, device_nonce=b"\2" * 12)))
    with pytest.raises(SessionError, match="does not hold the verifier"):
        client.handle_response1(forged.encode())  # … nor forge one we accept
    sec1 = ClientSecurity1(POP)
    sec1.handle_response0(DeviceSecurity1("not-the-pop").handle_session(sec1.command0()))
    sec1.command1()
    forged1 = m.SessionData(sec_ver=1, sec1=m.Sec1Payload(msg=3, sr1=m.SessionResp1(device_verify_data=b"\3" * 32)))
    with pytest.raises(SessionError, match="does not decrypt to our public key"):
        sec1.handle_response1(forged1.encode())
    assert not client.established and not sec1.established

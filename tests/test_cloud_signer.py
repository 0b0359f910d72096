"""The cloud's HSM signer (rig.cloud.signer), judged by the real tools.

* keys are made inside a SoftHSM2 token and an image signed through
  ``espsecure sign-data --hsm`` verifies with ``espsecure verify-signature`` against
  the HSM's public key — and not against the other key;
* "auto select key" picks the key whose digest a node reports in
  ``info.secure_boot_digest`` (shared/reference/rainmaker-protocol.md §1.3), falls back
  to the default key for a node without Secure Boot, and fails naming both sides when
  nothing matches;
* the PIN shows up in no argv, repr or error.
"""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from rig.cloud.signer import CloudSigner, NoMatchingKey
from rig.firmware.app_desc import AppDescriptor
from rig.firmware.image import build_app_image
from rig.firmware.secure_boot_v2 import verify_signed_image
from rig.firmware.softhsm import SoftHsmUnavailable, find_softhsm_library, find_softhsm_util
from tests.signing_keys import espsecure

PIN = "cloud-user-pin-4821"
SO_PIN = "cloud-so-pin-9317"
LABELS = ("sbv2-key-0", "sbv2-key-1")
IMAGE = build_app_image(AppDescriptor(version="2.0.0", project_name="rmaker_switch"), b"ota payload")


@pytest.fixture(scope="module")
def signer(tmp_path_factory: pytest.TempPathFactory) -> CloudSigner:
    try:
        find_softhsm_library()
        find_softhsm_util()
    except SoftHsmUnavailable as exc:
        pytest.skip(str(exc))
    signer = CloudSigner(tmp_path_factory.mktemp("hsm"), PIN, SO_PIN, LABELS)
    signer.setup()
    return signer


def _pub(signer: CloudSigner, label: str, directory: Path) -> Path:
    path = directory / f"{label}.pub.pem"
    path.write_bytes(signer.public_key_pem(label))
    return path


def test_two_keys_in_one_token(signer: CloudSigner) -> None:
    digests = signer.key_digests()
    assert list(digests) == list(LABELS)
    assert len(set(digests.values())) == 2 and all(len(d) == 32 for d in digests.values())
    assert len([p for p in (signer.state_dir / "tokens").iterdir() if p.is_dir()]) == 1


def test_hsm_signed_image_verifies_with_espsecure(
    signer: CloudSigner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    argvs: list[list[str]] = []
    real_run = subprocess.run

    def recording_run(cmd: list[str], *args: object, **kwargs: object) -> subprocess.CompletedProcess[str]:
        argvs.append(list(map(str, cmd)))
        return real_run(cmd, *args, **kwargs)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(subprocess, "run", recording_run)
    signed = signer.sign(IMAGE, "sbv2-key-1")
    monkeypatch.undo()

    assert any("--hsm" in argv and "sign-data" in argv for argv in argvs)
    assert not any(PIN in arg or SO_PIN in arg for argv in argvs for arg in argv)
    assert "sbv2-key-1" in caplog.text and PIN not in caplog.text and SO_PIN not in caplog.text
    assert signed[: len(IMAGE)] == IMAGE and len(signed) % 4096 == 0
    (tmp_path / "signed.bin").write_bytes(signed)
    ok = espsecure("verify-signature", "--version", "2", "--keyfile", _pub(signer, "sbv2-key-1", tmp_path),
                   tmp_path / "signed.bin")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    wrong = espsecure("verify-signature", "--version", "2", "--keyfile", _pub(signer, "sbv2-key-0", tmp_path),
                      tmp_path / "signed.bin")
    assert wrong.returncode != 0


def test_auto_select_picks_the_reported_key(signer: CloudSigner) -> None:
    d0, d1 = (signer.key_digests()[label].hex() for label in LABELS)
    assert signer.select_key({"k0": d1, "k1": None, "k2": None}) == "sbv2-key-1"
    assert signer.select_key({"k0": d0, "k1": d1, "k2": None}) == "sbv2-key-0"  # lowest slot wins
    assert signer.select_key({"k0": "ab" * 32, "k1": d1.upper(), "k2": None}) == "sbv2-key-1"


def test_sign_for_node_boots_on_that_node(signer: CloudSigner) -> None:
    d1 = signer.key_digests()["sbv2-key-1"]
    signed = signer.sign_for_node(IMAGE, {"k0": d1.hex(), "k1": None, "k2": None})
    assert signed.key_label == "sbv2-key-1" and signed.key_digest == d1
    assert verify_signed_image(signed.data, [d1]).ok
    assert not verify_signed_image(signed.data, [signer.key_digests()["sbv2-key-0"]]).ok


@pytest.mark.parametrize("reported", [None, {}, {"k0": None, "k1": None, "k2": None}])
def test_node_without_secure_boot_gets_the_default_key(signer: CloudSigner, reported: dict[str, str | None] | None) -> None:
    assert signer.select_key(reported) == "sbv2-key-0" == signer.default_key


def test_no_matching_key_names_both_sides(signer: CloudSigner) -> None:
    foreign = "5e" * 32
    with pytest.raises(NoMatchingKey) as err:
        signer.select_key({"k0": foreign, "k1": None, "k2": None})
    text = str(err.value)
    assert f"k0={foreign}" in text and "k1=null" in text
    for label, digest in signer.key_digests().items():
        assert f"{label}={digest.hex()}" in text
    assert PIN not in text and SO_PIN not in text and PIN not in repr(signer)


@pytest.mark.parametrize("reported", [{"k3": "00" * 32}, {"k0": "not hex"}, {"k0": 17}])
def test_malformed_report_is_refused(signer: CloudSigner, reported: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="secure_boot_digest"):
        signer.select_key(reported)  # type: ignore[arg-type]


def test_unknown_key_label(signer: CloudSigner) -> None:
    with pytest.raises(KeyError, match="sbv2-key-0, sbv2-key-1"):
        signer.sign(IMAGE, "nope")


def test_reopening_keeps_the_keys(signer: CloudSigner) -> None:
    again = CloudSigner(signer.state_dir, PIN, SO_PIN, LABELS)
    assert again.key_digests() == signer.key_digests()

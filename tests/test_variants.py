"""Negative image variants: each fails the real tools the way the bootloader would, and the rig agrees.

For one signed base image (``build_app_image`` signed by espsecure with key A):

* ``esptool image-info`` sees exactly the intended defect (truncated → fatal; bit
  flipped → checksum/hash invalid; wrong chip id → the other chip, checksum and hash
  valid; lower secure_version → the new "Secure version", checksum and hash valid);
* ``espsecure verify-signature --version 2 --keyfile A.pub`` and
  :func:`verify_signed_image` (eFuse trusting A) reach the same verdict, and
  :func:`verify_image` gives the expected reason code;
* a content-changing variant differs from its input only in the changed field, the
  checksum byte and the digest (padding and length kept);
* one HSM case: a lower secure_version re-signed through a SoftHSM2 token.

The catalogue sweep (every entry, signed and unsigned base) signs with an in-process
test double of the same key, to stay fast; the tool cross-checks use espsecure itself.
"""

from __future__ import annotations

import subprocess
from dataclasses import replace

import pytest

from rig.firmware.app_desc import APP_DESC_LAYOUT, APP_DESC_OFFSET, AppDescriptor
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.image import DIGEST_LEN, IMAGE_HEADER_LAYOUT, EspImage, build_app_image, verify_image
from rig.firmware.secure_boot_v2 import SECTOR_SIZE, SigningError, public_key_digest, sign_image_with_keyfile, verify_signed_image
from rig.firmware.softhsm import SoftHsmToken
from rig.firmware.variants import (
    CATALOGUE,
    ESP32S3_CHIP_ID,
    ImageParts,
    KeyFileSigner,
    Variant,
    VariantNotApplicable,
    VariantSigners,
    bit_flipped,
    default_flip_offset,
    next_version,
    project_name,
    secure_version,
    truncated,
    unsigned,
    untrusted_signature,
    variant,
    version,
    wrong_chip_id,
)
from tests.esptool_cli import ImageInfo, image_info
from tests.firmware_samples import DESC, MANIFEST_WITH_FLAWS
from tests.signing_keys import InProcessSigner, KeyPair, espsecure, generate_keys, in_parallel, softhsm_token

# ------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    """A: the key the device trusts. B: a key it does not."""
    return generate_keys(tmp_path_factory.mktemp("variant-keys"), "AB")


@pytest.fixture(scope="module")
def plain() -> bytes:
    """The unsigned base image."""
    return build_app_image(DESC, MANIFEST_WITH_FLAWS)


@pytest.fixture(scope="module")
def base(plain: bytes, keys: dict[str, KeyPair]) -> bytes:
    """The base image signed by espsecure with key A."""
    return sign_image_with_keyfile(plain, keys["A"].private)


@pytest.fixture(scope="module")
def real(base: bytes, keys: dict[str, KeyPair]) -> dict[str, bytes]:
    """Variants of *base*, re-signed (where they are) by the real espsecure."""
    a, b = keys["A"].private, keys["B"].private
    signed = in_parallel({
        "untrusted_signature": lambda: untrusted_signature(base, b),
        "wrong_chip_id": lambda: wrong_chip_id(base, signer=KeyFileSigner(a)),
        "secure_version_lower": lambda: secure_version(base, 1, signer=str(a)),
        "secure_version_lower_untrusted": lambda: secure_version(base, 1, signer=KeyFileSigner(b)),
    }, workers=2)
    return {"base": base, "truncated": truncated(base), "bit_flipped": bit_flipped(base), "unsigned": unsigned(base),
            **signed}


VERIFY_SIGNATURE = {
    # name → (espsecure verify-signature with A.pub passes, verify_signed_image reason, verify_image codes)
    "base": (True, "verified", []),
    "bit_flipped": (False, "digest_mismatch", ["checksum"]),
    "unsigned": (False, "no_signature", []),
    "untrusted_signature": (False, "untrusted_key", []),
    "secure_version_lower": (True, "verified", []),
    "secure_version_lower_untrusted": (False, "untrusted_key", []),
}
IMAGE_INFO = ["truncated", "bit_flipped", "wrong_chip_id", "secure_version_lower"]


@pytest.fixture(scope="module")
def tool_verdicts(
    real: dict[str, bytes], keys: dict[str, KeyPair], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, subprocess.CompletedProcess[str] | ImageInfo]:
    """``espsecure verify-signature`` and ``esptool image-info`` on the variants, all at once."""
    d = tmp_path_factory.mktemp("variants")
    for name, data in real.items():
        (d / f"{name}.bin").write_bytes(data)
    pub_a = keys["A"].public
    jobs: dict[str, object] = {
        f"verify:{name}": (lambda name=name: espsecure("verify-signature", "--version", "2", "--keyfile", pub_a,
                                                       d / f"{name}.bin"))
        for name in VERIFY_SIGNATURE
    }
    jobs |= {f"info:{name}": (lambda name=name: image_info(d / f"{name}.bin")) for name in IMAGE_INFO}
    return in_parallel(jobs)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def quick(keys: dict[str, KeyPair]) -> VariantSigners:
    """Signers for the catalogue sweep: key A trusted, key B untrusted, signing in-process."""
    return VariantSigners(trusted=InProcessSigner(keys["A"]), untrusted=InProcessSigner(keys["B"]))


def changed_offsets(a: bytes, b: bytes) -> set[int]:
    assert len(a) == len(b)
    return {i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y}


def field_range(name: str) -> set[int]:
    at = APP_DESC_OFFSET + APP_DESC_LAYOUT.offset_of(name)
    return set(range(at, at + APP_DESC_LAYOUT.field(name).size))


def checksum_and_digest(image: bytes) -> set[int]:
    """The checksum byte and the appended SHA-256 of an image with hash_appended."""
    end = EspImage.parse(image).image_length
    return set(range(end - DIGEST_LEN - 1, end))


# ------------------------------------------------------------------ the real tools


def test_image_info_sees_the_defect(
    tool_verdicts: dict[str, subprocess.CompletedProcess[str] | ImageInfo], base: bytes
) -> None:
    info = {name: tool_verdicts[f"info:{name}"] for name in IMAGE_INFO}
    assert all(isinstance(i, ImageInfo) for i in info.values())

    cut = info["truncated"]
    assert isinstance(cut, ImageInfo)
    assert cut.returncode != 0 and cut.fatal_error, cut.stdout + cut.stderr
    assert "End of file reading segment" in cut.fatal_error

    flipped = info["bit_flipped"]
    assert isinstance(flipped, ImageInfo)
    assert flipped.returncode == 0, flipped.stderr
    assert flipped.checksum_valid is False or flipped.hash_valid is False
    assert (flipped.checksum_valid, flipped.hash_valid) == (False, False)  # one bit of segment data: both

    chip = info["wrong_chip_id"]
    assert isinstance(chip, ImageInfo)
    assert (chip.returncode, chip.chip, chip.chip_id) == (0, "ESP32-S3", ESP32S3_CHIP_ID), chip.stdout
    assert (chip.checksum_valid, chip.hash_valid) == (True, True)

    lower = info["secure_version_lower"]
    assert isinstance(lower, ImageInfo)
    assert lower.returncode == 0 and lower.app["Secure version"] == "1", lower.stdout
    assert (lower.checksum_valid, lower.hash_valid) == (True, True)
    assert (lower.chip, lower.app["Project name"], lower.app["App version"]) == ("ESP32-C3", "rmaker_switch", "1.4.2")


@pytest.mark.parametrize("name", list(VERIFY_SIGNATURE))
def test_espsecure_and_rig_agree(
    name: str,
    real: dict[str, bytes],
    tool_verdicts: dict[str, subprocess.CompletedProcess[str] | ImageInfo],
    keys: dict[str, KeyPair],
) -> None:
    espsecure_ok, reason, codes = VERIFY_SIGNATURE[name]
    proc = tool_verdicts[f"verify:{name}"]
    assert isinstance(proc, subprocess.CompletedProcess)
    verdict = verify_signed_image(real[name], [keys["A"].digest])
    assert (proc.returncode == 0) == espsecure_ok, proc.stdout + proc.stderr
    assert verdict.ok == espsecure_ok and verdict.reason == reason, verdict.detail
    if espsecure_ok:
        assert "verification successful" in proc.stdout
    assert verify_image(real[name]).codes == codes


def test_rig_verdicts_for_the_other_real_variants(real: dict[str, bytes], keys: dict[str, KeyPair]) -> None:
    trusted = [keys["A"].digest]
    assert verify_image(real["truncated"]).codes == ["truncated"]
    assert verify_signed_image(real["truncated"], trusted).reason == "bad_length"
    chip = verify_image(real["wrong_chip_id"])
    assert chip.codes == ["chip_id"] and chip.problems[0].message == "mismatch chip ID, expected 5, found 9"
    assert verify_signed_image(real["wrong_chip_id"], trusted).ok  # re-signed: only the chip id is wrong
    assert verify_signed_image(real["untrusted_signature"], [keys["B"].digest]).ok


# ------------------------------------------------------------------ only the intended defect


def test_secure_version_changes_only_its_field(real: dict[str, bytes], base: bytes) -> None:
    out = real["secure_version_lower"]
    assert len(out) == len(base) and len(out) % SECTOR_SIZE == 0
    content, old_content = out[:-SECTOR_SIZE], base[:-SECTOR_SIZE]
    diff = changed_offsets(content, old_content)
    assert diff - field_range("secure_version") <= checksum_and_digest(base)
    assert diff & field_range("secure_version")
    assert ImageParts.parse(out).tail == ImageParts.parse(base).tail  # the 0xFF padding, as it was
    assert EspImage.parse(out).app_desc == replace(EspImage.parse(base).app_desc, secure_version=1)


def test_wrong_chip_id_changes_only_the_header_field_and_digest(real: dict[str, bytes], base: bytes) -> None:
    out = real["wrong_chip_id"]
    diff = changed_offsets(out[:-SECTOR_SIZE], base[:-SECTOR_SIZE])
    at = IMAGE_HEADER_LAYOUT.offset_of("chip_id")
    end = EspImage.parse(base).image_length
    assert diff - {at, at + 1} <= set(range(end - DIGEST_LEN, end))  # checksum covers segments only: unchanged
    assert at in diff


def test_partition_dump_keeps_its_tail_and_stays_unsigned(plain: bytes) -> None:
    dump = plain + b"\xff" * (3 * SECTOR_SIZE - len(plain) % SECTOR_SIZE)
    parts = ImageParts.parse(dump)
    assert not parts.signed and parts.tail == dump[len(plain):]
    out = project_name(dump, "other_product")
    assert len(out) == len(dump) and out[len(plain):] == dump[len(plain):]
    diff = changed_offsets(out, dump)
    assert diff - field_range("project_name") <= checksum_and_digest(plain)
    assert verify_image(out).ok and EspImage.parse(out).app_desc.project_name == "other_product"


# ------------------------------------------------------------------ the catalogue


SWEEP = {
    # name → (verify_image codes, verify_signed_image reason with A trusted)
    "truncated": (["truncated"], "bad_length"),
    "truncated_header": (["truncated"], "bad_length"),
    "bit_flipped": (["checksum"], "digest_mismatch"),
    "corrupted_before_signing": (["checksum"], "verified"),
    "unsigned": ([], "no_signature"),
    "untrusted_signature": ([], "untrusted_key"),
    "corrupt_signature": ([], "bad_signature"),
    "wrong_chip_id": (["chip_id"], "verified"),
    "secure_version_lower": ([], "verified"),
    "secure_version_higher": ([], "verified"),
    "same_version": ([], "verified"),
    "version": ([], "verified"),
    "project_name": ([], "verified"),
}
DESCRIPTOR_AFTER = {
    "secure_version_lower": {"secure_version": 1},
    "secure_version_higher": {"secure_version": 3},
    "version": {"version": "1.4.3"},
    "project_name": {"project_name": "rmaker_switch_other"},
}


def test_catalogue_is_covered() -> None:
    assert [v.name for v in CATALOGUE] == list(SWEEP)
    assert all(v.description for v in CATALOGUE)
    assert variant("wrong_chip_id") is CATALOGUE[7] and str(CATALOGUE[7]) == "wrong_chip_id"
    with pytest.raises(KeyError, match="known: truncated"):
        variant("nope")


@pytest.mark.parametrize("entry", CATALOGUE, ids=str)
def test_catalogue_on_a_signed_base(entry: Variant, base: bytes, quick: VariantSigners, keys: dict[str, KeyPair]) -> None:
    codes, reason = SWEEP[entry.name]
    out = entry(base, quick)
    assert verify_image(out).codes == codes
    verdict = verify_signed_image(out, [keys["A"].digest])
    assert verdict.reason == reason, verdict.detail
    if reason != "bad_length":
        assert len(out) == len(base) - (SECTOR_SIZE if entry.name == "unsigned" else 0)
    if entry.name in ("truncated", "truncated_header", "bit_flipped", "corrupted_before_signing"):
        return
    desc, old = EspImage.parse(out).app_desc, EspImage.parse(base).app_desc
    expected = {**old.__dict__, **DESCRIPTOR_AFTER.get(entry.name, {})}
    if entry.name == "same_version":
        assert desc.version == old.version and desc.app_elf_sha256 != old.app_elf_sha256
        expected["app_elf_sha256"] = desc.app_elf_sha256
    assert desc.__dict__ == expected


@pytest.mark.parametrize("entry", CATALOGUE, ids=str)
def test_catalogue_on_an_unsigned_base(entry: Variant, plain: bytes, quick: VariantSigners) -> None:
    """Unsigned in, unsigned out (no trusted signer needed); only untrusted_signature signs."""
    signers = VariantSigners(untrusted=quick.untrusted)
    if entry.needs_signed_input:
        with pytest.raises(VariantNotApplicable, match="no signature sector"):
            entry(plain, signers)
        return
    out = entry(plain, signers)
    codes, _ = SWEEP[entry.name]
    assert verify_image(out).codes == codes
    if entry.name.startswith("truncated"):
        return
    assert ImageParts.parse(out).signed == (entry.name == "untrusted_signature")
    if entry.name != "untrusted_signature":
        assert len(out) == len(plain)


@pytest.mark.parametrize("entry", CATALOGUE, ids=str)
def test_catalogue_refuses_what_is_not_an_esp_image(entry: Variant, quick: VariantSigners, base: bytes) -> None:
    with pytest.raises(FirmwareFormatError, match="0xe9"):
        entry(b"\x00" * 2 * SECTOR_SIZE, quick)
    with pytest.raises(FirmwareFormatError, match="needs 24 bytes"):
        entry(base[:10], quick)


# ------------------------------------------------------------------ refusals


def test_stripping_a_missing_signature_is_refused(plain: bytes) -> None:
    with pytest.raises(FirmwareFormatError, match="needs a Secure Boot V2 signed image") as err:
        unsigned(plain)
    assert isinstance(err.value, VariantNotApplicable)


def test_changing_a_signed_image_needs_a_signer(base: bytes) -> None:
    with pytest.raises(ValueError, match="re-sign"):
        secure_version(base, 1)
    with pytest.raises(ValueError, match="re-sign"):
        variant("wrong_chip_id")(base)


def test_untrusted_signature_needs_another_key(base: bytes, quick: VariantSigners) -> None:
    with pytest.raises(ValueError, match="already signed the input"):
        untrusted_signature(base, quick.trusted)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="untrusted="):
        variant("untrusted_signature")(base, VariantSigners(trusted=quick.trusted))


def test_corrupted_input_is_not_silently_repaired(plain: bytes) -> None:
    with pytest.raises(FirmwareFormatError, match="checksum byte") as err:
        secure_version(bit_flipped(plain), 1)
    assert err.value.offset == EspImage.parse(plain).image_length - DIGEST_LEN - 1


def test_bad_arguments_are_refused(plain: bytes) -> None:
    with pytest.raises(ValueError, match="not inside segment data"):
        bit_flipped(plain, offset=IMAGE_HEADER_LAYOUT.offset_of("chip_id"))
    with pytest.raises(ValueError, match=r"bit must be 0\.\.7"):
        bit_flipped(plain, bit=8)
    with pytest.raises(ValueError, match="length"):
        truncated(plain, len(plain))
    with pytest.raises(ValueError, match="already has chip id 5"):
        wrong_chip_id(plain, 5)
    with pytest.raises(ValueError, match=r"already '1\.4\.2'"):
        version(plain, "1.4.2")
    with pytest.raises(ValueError, match="at most 31"):
        version(plain, "v" * 32)
    zero = build_app_image(AppDescriptor(secure_version=0))
    with pytest.raises(VariantNotApplicable, match="no lower one"):
        variant("secure_version_lower")(zero)


def test_a_misbehaving_signer_is_caught(base: bytes) -> None:
    class Forgetful:
        def sign(self, data: bytes) -> bytes:
            return data

    with pytest.raises(SigningError, match="one 4096-byte signature sector"):
        secure_version(base, 1, signer=Forgetful())


def test_defaults_stay_clear_of_header_and_descriptor(plain: bytes) -> None:
    at = default_flip_offset(plain)
    assert at >= APP_DESC_OFFSET + APP_DESC_LAYOUT.size
    assert EspImage.parse(bit_flipped(plain)).app_desc == DESC
    assert (next_version("1.4.2"), next_version("v2-rc9"), next_version("dev")) == ("1.4.3", "v2-rc10", "dev.1")


# ------------------------------------------------------------------ HSM


@pytest.fixture(scope="module")
def hsm(tmp_path_factory: pytest.TempPathFactory) -> tuple[SoftHsmToken, bytes]:
    return softhsm_token(tmp_path_factory.mktemp("variants-hsm"), "rig-variants")


def test_lower_secure_version_resigned_in_the_hsm(
    hsm: tuple[SoftHsmToken, bytes], base: bytes, keys: dict[str, KeyPair]
) -> None:
    token, pem = hsm
    out = secure_version(base, 1, signer=token.signer())
    hsm_digest = public_key_digest(pem)
    verdict = verify_signed_image(out, [hsm_digest])
    assert verdict.ok, verdict.detail
    assert verify_signed_image(out, [keys["A"].digest]).reason == "untrusted_key"
    assert verify_image(out).ok and EspImage.parse(out).app_desc.secure_version == 1
    assert len(out) == len(base)

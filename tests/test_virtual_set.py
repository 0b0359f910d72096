"""The generated virtual firmware set, firmware-set loading and the behaviour manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from rig.espressif_tools import run_tool
from rig.firmware.app_desc import APP_DESC_LAYOUT, APP_DESC_OFFSET, AppDescriptor
from rig.firmware.behaviour import MANIFEST_MAGIC, BehaviourManifest
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.firmware_set import ROLES, FirmwareSet, FirmwareSetError, MissingRole
from rig.firmware.image import build_app_image
from rig.firmware.otadata import OtaDataPartition
from rig.firmware.secure_boot_v2 import SigningError, public_key_digest, verify_signed_image
from rig.firmware.softhsm import SoftHsmToken
from rig.firmware.virtual_set import (
    GENERATOR_VERSION,
    PROJECT_NAME,
    PUBLIC_KEY_FILE,
    SET_MANIFEST,
    SetSigner,
    build_virtual_set,
    ensure_signing_key,
    ensure_virtual_set,
    set_key_digest,
)
from tests.esptool_cli import image_info
from tests.signing_keys import USER_PIN, softhsm_token


@pytest.fixture(scope="module")
def vset(tmp_path_factory: pytest.TempPathFactory) -> tuple[FirmwareSet, Path]:
    root = tmp_path_factory.mktemp("vset")
    key = root / "keys" / "k.pem"
    return ensure_virtual_set(root / "virtual", key), key


def test_every_role_is_present_and_ordered(vset: tuple[FirmwareSet, Path]) -> None:
    fs, _ = vset
    assert fs.roles == list(ROLES) and fs.missing_roles == []
    descs = {r: fs.app_desc(r) for r in ROLES}
    assert {d.project_name for d in descs.values()} == {PROJECT_NAME}
    assert (descs["base"].version, descs["next"].version, descs["next_secure"].version) == ("1.0.0", "1.1.0", "1.2.0")
    assert [descs[r].secure_version for r in ROLES] == [1, 1, 2, 1, 1]
    assert BehaviourManifest.from_image(fs.build("crash_on_boot").read_app_image()) == BehaviourManifest(boot="crash")
    assert BehaviourManifest.from_image(fs.build("no_cloud").read_app_image()).boot == "no_cloud"
    assert BehaviourManifest.from_image(fs.build("base").read_app_image()) == BehaviourManifest()


def test_layout_matches_rainmaker(vset: tuple[FirmwareSet, Path]) -> None:
    build = vset[0].build("base")
    assert build.partition_table_offset == 0xC000 and build.app_offset == 0x20000 and build.bootloader_offset == 0
    assert build.otadata_offset == 0x16000
    assert OtaDataPartition.parse(build.ota_data_initial_bin.read_bytes()).active_entry() is None
    assert build.sdkconfig["BOOTLOADER_APP_ANTI_ROLLBACK"] is True
    manifest = json.loads((vset[0].root / SET_MANIFEST).read_text())
    assert manifest["generator"] == GENERATOR_VERSION and set(manifest["roles"]) == set(ROLES)


def test_esptool_and_espsecure_accept_the_images(vset: tuple[FirmwareSet, Path]) -> None:
    fs, key = vset
    app = fs.build("next_secure").app_bin
    info = image_info(app)
    assert info.checksum_valid and info.hash_valid
    assert info.app["Project name"] == PROJECT_NAME and info.app["Secure version"] == "2"
    out = run_tool("espsecure", ["verify-signature", "--version", "2", "--keyfile", str(key), str(app)]).output
    assert "verification successful" in out.lower()
    digest = public_key_digest(key.read_bytes())
    for role in ROLES:
        assert verify_signed_image(fs.build(role).read_app_image(), [digest]).ok
        assert verify_signed_image(fs.build(role).bootloader_bin.read_bytes(), [digest]).ok


def test_generation_is_deterministic_and_cached(vset: tuple[FirmwareSet, Path], tmp_path: Path) -> None:
    fs, key = vset
    before = fs.build("base").app_bin.stat().st_mtime_ns
    assert ensure_virtual_set(fs.root, key).build("base").app_bin.stat().st_mtime_ns == before  # not rebuilt
    again = ensure_virtual_set(tmp_path / "other", key)
    # RSA-PSS signatures are randomised: compare everything before the signature sector
    assert again.build("next").read_app_image()[:-4096] == fs.build("next").read_app_image()[:-4096]


def test_stale_set_is_regenerated(vset: tuple[FirmwareSet, Path], tmp_path: Path) -> None:
    fs, key = vset
    copy = tmp_path / "virtual"
    shutil.copytree(fs.root, copy)
    (copy / SET_MANIFEST).write_text('{"generator": 0}')
    shutil.rmtree(copy / "no_cloud")
    regenerated = ensure_virtual_set(copy, key)
    assert "no_cloud" in regenerated.roles
    assert json.loads((copy / SET_MANIFEST).read_text())["generator"] == GENERATOR_VERSION


def test_missing_role_and_missing_base(vset: tuple[FirmwareSet, Path], tmp_path: Path) -> None:
    fs, _ = vset
    partial = tmp_path / "farm-set"
    shutil.copytree(fs.root / "base", partial / "base")
    loaded = FirmwareSet.load(partial)
    assert loaded.roles == ["base"] and loaded.missing_roles == ["next", "next_secure", "crash_on_boot", "no_cloud"]
    with pytest.raises(MissingRole, match="has no 'crash_on_boot' build"):
        loaded.build("crash_on_boot")
    shutil.rmtree(partial / "base")
    with pytest.raises(FirmwareSetError, match=r"has no 'base' build\. Fix: add"):
        FirmwareSet.load(partial)
    with pytest.raises(FirmwareSetError, match=r"does not exist\. Fix: point firmware:"):
        FirmwareSet.load(tmp_path / "nowhere")


def test_broken_build_names_role_and_file(vset: tuple[FirmwareSet, Path], tmp_path: Path) -> None:
    broken = tmp_path / "set"
    shutil.copytree(vset[0].root / "base", broken / "base")
    (broken / "base" / "flasher_args.json").write_text("{not json")
    with pytest.raises(FirmwareSetError, match="role 'base'"):
        FirmwareSet.load(broken)


def test_behaviour_manifest_round_trip_and_errors() -> None:
    m = BehaviourManifest(boot="crash", flaws=("static_pop",), prov_security=1, rollback_wait_s=5)
    raw = m.to_bytes()
    assert raw.startswith(MANIFEST_MAGIC) and int.from_bytes(raw[8:12], "little") == len(raw) - 12
    assert BehaviourManifest.parse(raw) == m
    with pytest.raises(FirmwareFormatError, match="runs past the end"):
        BehaviourManifest.parse(raw[:-3])
    with pytest.raises(FirmwareFormatError, match="magic"):
        BehaviourManifest.parse(b"XXXXXXXX" + raw[8:])
    plain = build_app_image(AppDescriptor(version="1", project_name="real_idf_app"), b"\x00" * 64)
    assert plain[APP_DESC_OFFSET + APP_DESC_LAYOUT.size :][:8] != MANIFEST_MAGIC
    assert BehaviourManifest.from_image(plain) is None


# ------------------------------------------------------------------ who signed the set


def test_manifest_names_the_key_and_espsecure_agrees_on_its_digest(vset: tuple[FirmwareSet, Path], tmp_path: Path) -> None:
    fs, key = vset
    manifest = json.loads((fs.root / SET_MANIFEST).read_text())
    assert manifest["secure_boot"] == {"key_digest": public_key_digest(key.read_bytes()).hex(),
                                       "signed_by": f"key file {key}", "public_key": PUBLIC_KEY_FILE}
    assert set_key_digest(fs.root) == public_key_digest(key.read_bytes())
    out = tmp_path / "digest.bin"
    run_tool("espsecure", ["digest-sbv2-public-key", "--keyfile", str(fs.root / PUBLIC_KEY_FILE), "--output", str(out)])
    assert out.read_bytes() == set_key_digest(fs.root)  # what `espefuse burn-key-digest` would burn


def test_a_signer_whose_public_key_is_not_its_own_is_refused(vset: tuple[FirmwareSet, Path], tmp_path: Path) -> None:
    _, key = vset
    other = SetSigner.key_file(ensure_signing_key(tmp_path / "other.pem"))
    liar = SetSigner(SetSigner.key_file(key).sign, other.public_key_pem, "a mismatched signer")
    with pytest.raises(SigningError, match=r"the bootloader image signed by a mismatched signer does not verify"):
        build_virtual_set(tmp_path / "set", liar)
    assert not (tmp_path / "set").exists()
    with pytest.raises(SigningError, match=r"does not exist — generate one with `espsecure generate-signing-key"):
        SetSigner.key_file(tmp_path / "missing.pem")


@pytest.fixture(scope="module")
def hsm_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[FirmwareSet, SoftHsmToken]:
    root = tmp_path_factory.mktemp("hsm-set")
    token, _ = softhsm_token(root / "hsm", "virtual-set")
    return build_virtual_set(root / "virtual", SetSigner.hsm(token.signer())), token


def test_hsm_signed_set_verifies_against_the_hsm_key(hsm_set: tuple[FirmwareSet, SoftHsmToken]) -> None:
    fs, token = hsm_set
    digest = token.key_digest()
    assert set_key_digest(fs.root) == digest
    assert json.loads((fs.root / SET_MANIFEST).read_text())["secure_boot"]["signed_by"].startswith("HSM HsmSigner(")
    assert USER_PIN not in (fs.root / SET_MANIFEST).read_text()
    for role in ROLES:
        assert verify_signed_image(fs.build(role).read_app_image(), [digest]).ok
        assert verify_signed_image(fs.build(role).bootloader_bin.read_bytes(), [digest]).ok
    out = run_tool("espsecure", ["verify-signature", "--version", "2", "--keyfile", str(fs.root / PUBLIC_KEY_FILE),
                                 str(fs.build("next").app_bin)]).output
    assert "verification successful" in out.lower()


def test_a_board_boots_the_hsm_set_only_with_the_hsm_keys_digest_burned(
        hsm_set: tuple[FirmwareSet, SoftHsmToken], vset: tuple[FirmwareSet, Path], tmp_path: Path) -> None:
    """The eFuse setup a lab derives from the set (its public key's digest) is the one its bootloader needs."""
    from rig.vboard.bootloader import run_bootloader
    from rig.vboard.efuse import EfuseController
    from rig.vboard.flash import FlashStorage
    from tests.test_vboard_bootloader import RecordingConsole

    fs, _ = hsm_set
    for name, digest, boots in (("hsm", set_key_digest(fs.root), True), ("file", set_key_digest(vset[0].root), False)):
        with FlashStorage(tmp_path / name / "flash.bin") as flash:
            efuse = EfuseController.open(tmp_path / name / "efuse.bin", bytes.fromhex("58cf79a1b2c3"))
            for offset, path in fs.build("base").flash_files.items():
                flash.write(offset, path.read_bytes())
            efuse.burn_field("KEY_PURPOSE_0", "SECURE_BOOT_DIGEST0")
            efuse.burn_field("BLOCK_KEY0", digest)
            efuse.burn_field("SECURE_BOOT_EN", 1)
            console = RecordingConsole()
            outcome = run_bootloader(flash, efuse, console)
        if boots:
            assert outcome.partition_name == "ota_0" and outcome.secure_boot_verified, console.text
        else:
            assert outcome.halted and "Secure Boot V2 verification failed." in console.text

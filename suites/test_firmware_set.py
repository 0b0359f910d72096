"""The board's firmware set is what the other suites assume it is.

Every later suite flashes or serves these builds (OTA to ``next``, anti-rollback with
``next_secure``, rollback with ``crash_on_boot``/``no_cloud``); if a build is broken,
for the wrong chip, or its versions are not ordered, those suites would test the
supply, not the device. This suite checks the set the way the bootloader and the
RainMaker OTA client will read it, on real and virtual farms alike.
"""

from __future__ import annotations

import hashlib
import json

import allure
import pytest

from fixtures.firmware import require_role
from rig.boards.board import Board
from rig.firmware.firmware_set import FirmwareSet
from rig.firmware.image import EspImage, verify_image
from rig.firmware.otadata import OtaDataPartition
from rig.firmware.secure_boot_v2 import parse_signature_sector, split_signed_image, verify_signed_image
from rig.targets import target_for


@pytest.fixture
def firmware_set(supplied_firmware_set: FirmwareSet) -> FirmwareSet:
    """This suite judges the set as boards.yaml supplies it, not as lifted to a board's
    burned SECURE_VERSION (fixtures/firmware.py)."""
    return supplied_firmware_set


def attach_json(name: str, data: object) -> None:
    allure.attach(json.dumps(data, indent=2, default=str), name=name, attachment_type=allure.attachment_type.JSON)


def test_every_build_is_a_valid_image_for_the_board(board: Board, firmware_set: FirmwareSet) -> None:
    chip = target_for(board.chip)
    inventory = {}
    for role in firmware_set.roles:
        build = firmware_set.build(role)
        assert build.target == board.chip, f"{role}: built for {build.target}, board is {board.chip}"
        table = build.read_partition_table()
        slot = table.boot_default()
        assert slot is not None and slot.offset == build.app_offset, f"{role}: app not flashed to the boot partition"
        app = build.read_app_image()
        check = verify_image(app, chip, flash_offset=build.app_offset, partition_size=slot.size)
        assert check.ok, f"{role}: {check.problems[0].message}"
        boot = verify_image(build.bootloader_bin.read_bytes(), chip, flash_offset=build.bootloader_offset)
        assert boot.ok, f"{role} bootloader: {boot.problems[0].message}"
        desc = EspImage.parse(app).app_desc
        inventory[role] = {
            "version": desc.version,
            "secure_version": desc.secure_version,
            "project_name": desc.project_name,
            "idf_ver": desc.idf_ver,
            "elf_sha256": desc.elf_sha256_hex,
            "app_sha256": hashlib.sha256(app).hexdigest(),
        }
    attach_json("firmware-set.json", {"board": board.name, "root": str(firmware_set.root), "roles": inventory})
    projects = {v["project_name"] for v in inventory.values()}
    assert len(projects) == 1, f"roles are different projects {sorted(projects)}; OTA would reject them all"


def test_initial_otadata_is_blank(board: Board, firmware_set: FirmwareSet) -> None:
    """A fresh flash must boot ota_0 (ESP-IDF: both otadata entries invalid → first app slot)."""
    build = firmware_set.build("base")
    assert build.ota_data_initial_bin is not None, "base build has no ota_data_initial.bin but the table has OTA slots"
    otadata = OtaDataPartition.parse(build.ota_data_initial_bin.read_bytes())
    assert otadata.active_entry() is None
    assert otadata.boot_slot(len(build.read_partition_table().app_slots())) is None


def test_next_is_a_newer_version_of_the_same_project(firmware_set: FirmwareSet) -> None:
    require_role(firmware_set, "next")
    base, nxt = firmware_set.app_desc("base"), firmware_set.app_desc("next")
    assert nxt.project_name == base.project_name
    assert nxt.version != base.version, "RainMaker rejects an OTA with the same version"
    assert nxt.secure_version == base.secure_version, "next must not raise secure_version (that is next_secure's job)"


def test_next_secure_raises_secure_version(firmware_set: FirmwareSet) -> None:
    require_role(firmware_set, "next_secure")
    base, nxt = firmware_set.app_desc("base"), firmware_set.app_desc("next_secure")
    assert nxt.project_name == base.project_name
    assert nxt.secure_version > base.secure_version


@pytest.mark.parametrize("role", ["crash_on_boot", "no_cloud"])
def test_rollback_roles_are_updates(firmware_set: FirmwareSet, role: str) -> None:
    require_role(firmware_set, role)
    base, bad = firmware_set.app_desc("base"), firmware_set.app_desc(role)
    assert bad.project_name == base.project_name and bad.version != base.version
    assert bad.secure_version == base.secure_version, f"{role} must be installable without burning SECURE_VERSION"


def test_signed_builds_verify_with_one_key(firmware_set: FirmwareSet) -> None:
    """With CONFIG_SECURE_BOOT_V2_ENABLED every app and bootloader carries a valid signature
    block, all from the same key set, as the device's eFuse digests will demand."""
    base = firmware_set.build("base")
    if not base.sdkconfig.get("SECURE_BOOT_V2_ENABLED"):
        pytest.skip("NOT_APPLICABLE: the firmware set is built without CONFIG_SECURE_BOOT_V2_ENABLED")
    digests: set[bytes] = set()
    for role in firmware_set.roles:
        build = firmware_set.build(role)
        for what, data in (("app", build.read_app_image()), ("bootloader", build.bootloader_bin.read_bytes())):
            _, sector = split_signed_image(data)
            blocks = [b for b in parse_signature_sector(sector) if b is not None]
            assert blocks, f"{role} {what}: no valid Secure Boot V2 signature block"
            verdict = verify_signed_image(data, [b.key_digest() for b in blocks])
            assert verdict.ok, f"{role} {what}: {verdict.message}"
            digests |= {b.key_digest() for b in blocks}
    attach_json("signing-key-digests.json", sorted(d.hex() for d in digests))
    assert len(digests) <= 3, f"{len(digests)} different signing keys; a C3 has 3 eFuse digest slots"

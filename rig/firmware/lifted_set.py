"""A firmware set lifted to a board's burned anti-rollback floor.

Once a board's eFuse ``SECURE_VERSION`` has been raised (suites/test_anti_rollback.py
confirms ``next_secure``), its bootloader refuses every app whose ``secure_version`` is
lower (ESP-IDF ``bootloader_utility.c``, ``esp_efuse_check_secure_version``). The eFuse
cannot be lowered, so the board can never run the set's ``base`` again. A lab then
rebuilds its set with a higher ``CONFIG_BOOTLOADER_APP_SECURE_VERSION``; this module
does the same to a built set: every role's app descriptor ``secure_version`` is raised
by the same amount (``base`` to the floor, ``next_secure`` one above it — their order is
what the suites rely on), the checksum and SHA-256 recomputed and the image re-signed
(:func:`rig.firmware.variants.secure_version`). Nothing else changes: bootloader,
partition table, otadata and sdkconfig are the supplied build's.

So the same suites run again on the same board — "state such as eFuse SECURE_VERSION
is handled, not assumed" (issue 6).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from rig.firmware.firmware_set import FirmwareSet
from rig.firmware.variants import SignerLike
from rig.firmware.variants import secure_version as with_secure_version

__all__ = ["LIFT_MANIFEST", "lift_set", "lifted_secure_versions"]

LIFT_MANIFEST = "lifted-set.json"


def lifted_secure_versions(supplied: FirmwareSet, floor: int) -> dict[str, int]:
    """Role → ``secure_version`` after lifting *supplied* so that ``base`` runs on a chip whose
    eFuse holds *floor* (unchanged when ``base`` already does)."""
    raise_by = max(0, floor - supplied.app_desc("base").secure_version)
    return {role: supplied.app_desc(role).secure_version + raise_by for role in supplied.roles}


def _fingerprint(supplied: FirmwareSet) -> str:
    digest = hashlib.sha256()
    for role in supplied.roles:
        digest.update(role.encode() + hashlib.sha256(supplied.build(role).read_app_image()).digest())
    return digest.hexdigest()


def lift_set(supplied: FirmwareSet, floor: int, signer: SignerLike | None, dest: Path) -> FirmwareSet:
    """*supplied* lifted to *floor* at *dest* (reused when already made from the same builds),
    every changed image signed by *signer* — the key that signed the supplied set, or the
    board will not boot the result; ``None`` for an unsigned set."""
    versions = lifted_secure_versions(supplied, floor)
    fingerprint = _fingerprint(supplied)
    manifest = dest / LIFT_MANIFEST
    try:
        made = json.loads(manifest.read_text())
        if made.get("from") == fingerprint and made.get("secure_versions") == versions:
            return FirmwareSet.load(dest)
    except (OSError, ValueError):
        pass
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for role in supplied.roles:
        build = supplied.build(role)
        shutil.copytree(build.path, tmp / role)
        if versions[role] != supplied.app_desc(role).secure_version:
            lifted = with_secure_version(build.read_app_image(), versions[role], signer=signer)
            (tmp / role / build.app_bin.relative_to(build.path)).write_bytes(lifted)
    (tmp / LIFT_MANIFEST).write_text(json.dumps(
        {"from": fingerprint, "supplied": str(supplied.root), "floor": floor, "secure_versions": versions}, indent=2))  # fmt: skip
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return FirmwareSet.load(dest)

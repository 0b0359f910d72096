"""The firmware set the rig generates for virtual boards.

Every role of the firmware-set contract as an ESP-IDF-layout build directory (RainMaker's
``partitions_4mb_optimised.csv`` table at 0xC000, rollback and anti-rollback enabled,
Secure Boot V2 signed), made only with the firmware toolkit, so virtual boards run the
same kind of artefact a real farm flashes. Images are deterministic for a given key:
fixed build date/time, an ELF SHA-256 derived from the role's content.

The set is (re)generated when missing or made by an older generator; a lock file
keeps parallel workers (pytest-xdist) from writing it at the same time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rig.espressif_tools import run_tool
from rig.firmware.app_desc import AppDescriptor
from rig.firmware.behaviour import BehaviourManifest
from rig.firmware.build_dir import write_build_dir
from rig.firmware.firmware_set import FirmwareSet
from rig.firmware.image import ImageHeader, Segment, build_app_image, build_image
from rig.firmware.partition_table import RAINMAKER_4MB
from rig.firmware.secure_boot_v2 import sign_image_with_keyfile
from rig.targets import ESP32C3

GENERATOR_VERSION = 2  # 2: bootloader entry point in IRAM
PROJECT_NAME = "rig_rmaker_node"
IDF_VERSION = "v5.4.1"
SET_MANIFEST = "firmware-set.json"
VIRTUAL_SIGNING_KEY = "keys/virtual_sbv2_rsa3072.pem"  # under the lab's state folder

# What ESP RainMaker examples build with (esp-rainmaker examples/*/sdkconfig.defaults) plus
# Secure Boot V2 with externally signed images, as a production RainMaker node ships.
SDKCONFIG: dict[str, str | int | bool] = {
    "BOOTLOADER_APP_ROLLBACK_ENABLE": True,
    "BOOTLOADER_APP_ANTI_ROLLBACK": True,
    "BOOTLOADER_APP_SEC_VER_SIZE_EFUSE_FIELD": 16,
    "SECURE_BOOT": True,
    "SECURE_BOOT_V2_ENABLED": True,
    "SECURE_SIGNED_APPS_RSA_SCHEME": True,
    "SECURE_SIGNED_ON_BOOT": True,
    "SECURE_SIGNED_ON_UPDATE": True,
    "SECURE_BOOT_BUILD_SIGNED_BINARIES": False,
    "ESP_RMAKER_USER_ID_CHECK": True,
    "ESP_RMAKER_OTA_ROLLBACK_WAIT_PERIOD": 30,
    "ESP_PROTOCOMM_SUPPORT_SECURITY_VERSION_2": True,
    "ESP_PROTOCOMM_SUPPORT_SECURITY_PATCH_VERSION": True,
}


@dataclass(frozen=True)
class VirtualRole:
    role: str
    version: str
    secure_version: int
    behaviour: BehaviourManifest


VIRTUAL_ROLES: tuple[VirtualRole, ...] = (
    VirtualRole("base", "1.0.0", 1, BehaviourManifest()),
    VirtualRole("next", "1.1.0", 1, BehaviourManifest()),
    VirtualRole("next_secure", "1.2.0", 2, BehaviourManifest()),
    VirtualRole("crash_on_boot", "1.1.0-crash", 1, BehaviourManifest(boot="crash")),
    VirtualRole("no_cloud", "1.1.0-nocloud", 1, BehaviourManifest(boot="no_cloud")),
)


def ensure_signing_key(path: Path) -> Path:
    """The lab's file-based Secure Boot V2 key for virtual firmware, generated once (RSA-3072)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.parent.chmod(0o700)
        run_tool("espsecure", ["generate-signing-key", "--version", "2", "--scheme", "rsa3072", str(path)])
        path.chmod(0o600)
    return path


def virtual_app_image(role: VirtualRole, signing_key: Path) -> bytes:
    """One role's signed app image."""
    manifest = role.behaviour.to_bytes()
    elf_sha = hashlib.sha256(f"{PROJECT_NAME}/{role.version}".encode() + manifest).digest()
    desc = AppDescriptor(
        version=role.version,
        project_name=PROJECT_NAME,
        secure_version=role.secure_version,
        time="12:00:00",
        date="Nov 23 2026",
        idf_ver=IDF_VERSION,
        app_elf_sha256=elf_sha,
    )
    image = build_app_image(desc, manifest, secure_pad_v2=True)
    return sign_image_with_keyfile(image, signing_key)


def virtual_bootloader_image(signing_key: Path) -> bytes:
    """A signed 2nd-stage bootloader image (its logic is emulated; the bytes are a valid C3 image).

    Load addresses are the ESP-IDF C3 bootloader's ``iram_loader_seg`` / ``dram_seg``
    (components/bootloader/subproject/main/ld/esp32c3/bootloader.ld).
    """
    iram = Segment(0x403CE000, bytes.fromhex("6f000000") * 64)  # RISC-V `j .`: a spin loop
    dram = Segment(0x3FCD5000, b"rig virtual bootloader\0\0")
    image = build_image([dram, iram], header=ImageHeader(entry_addr=iram.load_addr))
    return sign_image_with_keyfile(image, signing_key)


@contextmanager
def _locked(dest: Path) -> Iterator[None]:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{dest.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _current(dest: Path) -> bool:
    try:
        return json.loads((dest / SET_MANIFEST).read_text())["generator"] == GENERATOR_VERSION
    except (OSError, ValueError, KeyError):
        return False


def build_virtual_set(dest: Path, signing_key: Path) -> FirmwareSet:
    """Write every role under *dest* (replacing what is there) and return the loaded set."""
    dest = dest.resolve()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bootloader = virtual_bootloader_image(signing_key)
    roles: dict[str, dict[str, object]] = {}
    for role in VIRTUAL_ROLES:
        app = virtual_app_image(role, signing_key)
        build = write_build_dir(tmp / role.role, PROJECT_NAME, app, bootloader, RAINMAKER_4MB, SDKCONFIG, ESP32C3.name)
        roles[role.role] = {
            "version": role.version,
            "secure_version": role.secure_version,
            "behaviour": json.loads(role.behaviour.to_bytes()[12:]),
            "app_sha256": hashlib.sha256(app).hexdigest(),
            "app_bin": str(build.app_bin.relative_to(tmp)),
        }
    (tmp / SET_MANIFEST).write_text(
        json.dumps({"generator": GENERATOR_VERSION, "project_name": PROJECT_NAME, "roles": roles}, indent=2) + "\n"
    )
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return FirmwareSet.load(dest)


def ensure_virtual_set(dest: Path, signing_key: Path) -> FirmwareSet:
    """The virtual set at *dest*, generated first if missing or stale. Safe across processes."""
    with _locked(dest):
        if _current(dest):
            return FirmwareSet.load(dest)
        return build_virtual_set(dest, ensure_signing_key(signing_key))

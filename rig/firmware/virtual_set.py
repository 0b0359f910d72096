"""The firmware set the rig generates for virtual boards.

Every role of the firmware-set contract as an ESP-IDF-layout build directory (RainMaker's
``partitions_4mb_optimised.csv`` table at 0xC000, rollback and anti-rollback enabled,
Secure Boot V2 signed), made only with the firmware toolkit, so virtual boards run the
same kind of artefact a real farm flashes. Images are deterministic for a given key:
fixed build date/time, an ELF SHA-256 derived from the role's content.

Signing. Every image — the bootloader and each role's app — is signed by one Secure Boot
V2 RSA-3072 key through the real espsecure: a key file (:meth:`SetSigner.key_file`, the
lab's virtual key by default) or a key that never leaves a PKCS#11 HSM
(:meth:`SetSigner.hsm`, or any ``sign`` callable: ``rig firmware build-virtual --hsm``
signs with the default key of the lab HSM the cloud's OTA signer uses, so boards that
trust the set also trust the cloud's OTA images). Each signed image is
verified against the key's digest before it is written, the set's manifest records
that digest and who signed, and the key's public half is written beside the roles
(:data:`PUBLIC_KEY_FILE`) so a lab can burn exactly that digest:
``espefuse burn-key-digest BLOCK_KEY0 <set>/sbv2_signing_key.pub.pem SECURE_BOOT_DIGEST0``
(ESP-IDF docs/en/security/secure-boot-v2.rst "Enabling Secure Boot V2 externally").

The set is (re)generated when missing or made by an older generator; a lock file keeps
parallel workers (pytest-xdist) from writing it at the same time.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from rig.espressif_tools import run_tool
from rig.firmware.app_desc import AppDescriptor
from rig.firmware.behaviour import BehaviourManifest
from rig.firmware.build_dir import write_build_dir
from rig.firmware.firmware_set import FirmwareSet, FirmwareSetError
from rig.firmware.image import ImageHeader, Segment, build_app_image, build_image
from rig.firmware.partition_table import RAINMAKER_4MB
from rig.firmware.secure_boot_v2 import HsmSigner, SigningError, public_key_digest, sign_image_with_keyfile, verify_signed_image
from rig.targets import ESP32C3

GENERATOR_VERSION = 3  # 2: bootloader entry point in IRAM; 3: signing key recorded, public key written
PROJECT_NAME = "rig_rmaker_node"
IDF_VERSION = "v5.4.1"
SET_MANIFEST = "firmware-set.json"
PUBLIC_KEY_FILE = "sbv2_signing_key.pub.pem"
"""The signing key's public half, in the set's root: what ``espefuse burn-key-digest`` takes."""
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


@dataclass(frozen=True)
class SetSigner:
    """Who signs a virtual set: ``sign(data)`` returns what ``espsecure sign-data --version 2``
    writes (content padded to 4 KB plus a signature sector), ``public_key_pem`` is the key's
    public half, ``source`` says where the key lives, for people and the manifest (never a secret)."""

    sign: Callable[[bytes], bytes]
    public_key_pem: bytes
    source: str

    @property
    def key_digest(self) -> bytes:
        """The eFuse ``SECURE_BOOT_DIGESTn`` value that makes a board trust this key."""
        return public_key_digest(self.public_key_pem)

    @classmethod
    def key_file(cls, path: Path) -> SetSigner:
        """An RSA-3072 PEM private key file, signing through espsecure ``--keyfile``."""
        path = Path(path)
        try:
            private = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except FileNotFoundError:
            raise SigningError(f"signing key {path} does not exist",
                               f"generate one with `espsecure generate-signing-key --version 2 --scheme rsa3072 {path}`") from None
        except (ValueError, TypeError) as exc:
            raise SigningError(f"signing key {path} is not an unencrypted PEM private key ({exc})",
                               "pass an RSA-3072 key made by `espsecure generate-signing-key --version 2`") from None
        public = private.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        return cls(lambda data: sign_image_with_keyfile(data, path), public, f"key file {path}")

    @classmethod
    def hsm(cls, signer: HsmSigner) -> SetSigner:
        """A key inside a PKCS#11 HSM, signing through espsecure ``--hsm`` (the private key never leaves it)."""
        return cls(signer.sign, signer.public_key_pem(), f"HSM {signer!r}")


SetSignerLike = SetSigner | str | os.PathLike[str]
"""A :class:`SetSigner`, or the path of a PEM private key file."""


def as_set_signer(signer: SetSignerLike) -> SetSigner:
    return signer if isinstance(signer, SetSigner) else SetSigner.key_file(Path(signer))


def _signed(image: bytes, signer: SetSigner, what: str) -> bytes:
    """*image* signed, and checked as the bootloader will check it against the key's eFuse digest."""
    signed = signer.sign(image)
    verdict = verify_signed_image(signed, [signer.key_digest])
    if not verdict.ok:
        raise SigningError(f"{what} signed by {signer.source} does not verify against that key's digest: {verdict.detail}",
                           "the signer's private key and the public key it reports do not belong together; check the key")
    return signed


def virtual_app_image(role: VirtualRole, signing_key: SetSignerLike) -> bytes:
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
    return _signed(image, as_set_signer(signing_key), f"the {role.role} app image")


def virtual_bootloader_image(signing_key: SetSignerLike) -> bytes:
    """A signed 2nd-stage bootloader image (its logic is emulated; the bytes are a valid C3 image).

    Load addresses are the ESP-IDF C3 bootloader's ``iram_loader_seg`` / ``dram_seg``
    (components/bootloader/subproject/main/ld/esp32c3/bootloader.ld).
    """
    iram = Segment(0x403CE000, bytes.fromhex("6f000000") * 64)  # RISC-V `j .`: a spin loop
    dram = Segment(0x3FCD5000, b"rig virtual bootloader\0\0")
    image = build_image([dram, iram], header=ImageHeader(entry_addr=iram.load_addr))
    return _signed(image, as_set_signer(signing_key), "the bootloader image")


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
    except (OSError, ValueError, KeyError, TypeError):
        return False


def set_key_digest(root: Path) -> bytes:
    """The Secure Boot V2 key digest a generated set at *root* was signed for (from its manifest)."""
    try:
        return bytes.fromhex(json.loads((Path(root) / SET_MANIFEST).read_text())["secure_boot"]["key_digest"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise FirmwareSetError(f"{root} has no readable {SET_MANIFEST} with a key digest ({exc}). "
                               "Fix: regenerate it with `rig firmware build-virtual`") from None


def build_virtual_set(dest: Path, signing_key: SetSignerLike) -> FirmwareSet:
    """Write every role under *dest* (replacing what is there), all signed by *signing_key*, and return the loaded set."""
    signer = as_set_signer(signing_key)
    dest = dest.resolve()
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    bootloader = virtual_bootloader_image(signer)
    roles: dict[str, dict[str, object]] = {}
    for role in VIRTUAL_ROLES:
        app = virtual_app_image(role, signer)
        build = write_build_dir(tmp / role.role, PROJECT_NAME, app, bootloader, RAINMAKER_4MB, SDKCONFIG, ESP32C3.name)
        roles[role.role] = {
            "version": role.version,
            "secure_version": role.secure_version,
            "behaviour": json.loads(role.behaviour.to_bytes()[12:]),
            "app_sha256": hashlib.sha256(app).hexdigest(),
            "app_bin": str(build.app_bin.relative_to(tmp)),
        }
    (tmp / PUBLIC_KEY_FILE).write_bytes(signer.public_key_pem)
    secure_boot = {"key_digest": signer.key_digest.hex(), "signed_by": signer.source, "public_key": PUBLIC_KEY_FILE}
    (tmp / SET_MANIFEST).write_text(json.dumps(
        {"generator": GENERATOR_VERSION, "project_name": PROJECT_NAME, "secure_boot": secure_boot, "roles": roles},
        indent=2) + "\n")  # fmt: skip
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return FirmwareSet.load(dest)


def ensure_virtual_set(dest: Path, signing_key: SetSignerLike, *, same_key: bool = False) -> FirmwareSet:
    """The virtual set at *dest*, generated first (a key file path is generated first when it
    does not exist) if missing or made by an older generator. A current set is kept whatever
    key signed it — one a lab built with ``--hsm`` stays; :func:`set_key_digest` says which
    key that was — unless *same_key* asks for a set signed by *signing_key* (a :class:`SetSigner`)
    and it was signed by another. Safe across processes."""
    with _locked(dest):
        if _current(dest) and not (same_key and isinstance(signing_key, SetSigner)
                                   and set_key_digest(dest) != signing_key.key_digest):  # fmt: skip
            return FirmwareSet.load(dest)
        if not isinstance(signing_key, SetSigner):
            signing_key = SetSigner.key_file(ensure_signing_key(Path(signing_key)))
        return build_virtual_set(dest, signing_key)

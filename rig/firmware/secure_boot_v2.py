"""Secure Boot V2 (RSA-3072): the signature sector, verification as the ESP-IDF
bootloader does it, and signing through the real ``espsecure`` (key file or HSM).

A signed image is the image content, padded with 0xFF to a 4096-byte multiple,
followed by one 4096-byte *signature sector*: up to three 1216-byte signature
blocks, the rest erased (0xFF). Sources:

- block layout: esp-idf ``components/esp_rom/include/<chip>/rom/secure_boot.h``
  (``struct ets_secure_boot_sig_block``, ``ets_rsa_pubkey_t`` in ``rom/rsa_pss.h``),
  ``docs/en/security/secure-boot-v2.rst`` ("Signature Block Format");
  esptool ``espsecure/__init__.py`` (``generate_rsa_signature_block``,
  ``validate_signature_block``, ``_get_sbv2_rsa_primitives``).
- verification: esp-idf
  ``components/bootloader_support/src/secure_boot_v2/secure_boot_signatures_bootloader.c``
  (``esp_secure_boot_verify_sbv2_signature_block``: eFuse digests, the RSA-scheme
  check, the log lines) and the ROM's ``ets_secure_boot_verify_signature`` as
  ``secure-boot-v2.rst`` "Verifying an Image" describes it (the ROM source is not
  public): a block is valid if its magic is 0xE7 and its CRC32 matches; a valid
  block verifies the image if (1) the SHA-256 of its public key is one of the
  trusted eFuse digests, (2) its image digest equals the SHA-256 of the content,
  (3) its RSA-PSS signature (SHA-256, MGF1-SHA-256, 32-byte salt) over that digest
  checks out. One verifying block is enough.
- HSM signing: esptool ``espsecure/esp_hsm_sign/__init__.py`` (``[hsm_config]``
  INI, ``RSA_PKCS_PSS`` mechanism).

Signing never re-implements espsecure: :func:`sign_image_with_keyfile` and
:class:`HsmSigner` run ``python -m espsecure sign-data --version 2`` and return what
it wrote. Verification is the rig's own, cross-checked against
``espsecure verify-signature`` in ``tests/test_secure_boot_v2.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from rig.espressif_tools import EspressifToolError, ToolRun, redact, run_tool
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.layout import Field, Layout
from rig.targets.esp32c3 import ESP32C3, ChipTarget

__all__ = [
    "BLOCK_SIZE",
    "SECTOR_SIZE",
    "SIGNATURE_BLOCK_LAYOUT",
    "BlockCheck",
    "BootLogLine",
    "HsmConfig",
    "HsmError",
    "HsmSigner",
    "SecureBootVerdict",
    "SignatureBlock",
    "SigningError",
    "parse_signature_sector",
    "public_key_digest",
    "sign_image_with_keyfile",
    "split_signed_image",
    "verify_signed_image",
]

SECTOR_SIZE = 4096          # FLASH_SECTOR_SIZE; the signature sector and the content padding
BLOCK_SIZE = 1216           # sizeof(ets_secure_boot_sig_block_t)
MAX_BLOCKS = 3              # SECURE_BOOT_NUM_BLOCKS (blocks in a sector; ESP32-C3 trusts 3 digests)
SIGNATURE_MAGIC = 0xE7      # ETS_SECURE_BOOT_V2_SIGNATURE_MAGIC
VERSION_RSA = 0x02          # ESP_SECURE_BOOT_V2_RSA
VERSION_ECDSA = 0x03        # ESP_SECURE_BOOT_V2_ECDSA
CRC_LEN = 1196              # CRC_SIGN_BLOCK_LEN: the CRC32 covers block bytes 0..1196
KEY_DIGEST_START = 36       # the key digest covers ets_rsa_pubkey_t: n, e, R, M' ...
KEY_DIGEST_END = 812        # ... block bytes 36..812 (776 bytes)
DIGEST_LEN = 32             # ESP_SECURE_BOOT_DIGEST_LEN (SHA-256)
RSA_BITS = 3072
RSA_BYTES = RSA_BITS // 8   # 384
PSS_SALT_LEN = 32

LOG_TAG = "secure_boot_v2"  # TAG in secure_boot_signatures_bootloader.c

SIGNATURE_BLOCK_LAYOUT = Layout(
    "ets_secure_boot_sig_block_t",
    [
        Field("magic_byte", "B", "0xE7 (ETS_SECURE_BOOT_V2_SIGNATURE_MAGIC)"),
        Field("version", "B", "0x02 RSA-3072 (0x03 is the ECDSA block, not used on ESP32-C3)"),
        Field("reserved", "2s", "_reserved1, _reserved2: zero"),
        Field("image_digest", "32s", "SHA-256 of everything before the signature sector"),
        Field("rsa_n", "384s", "ets_rsa_pubkey_t.n: modulus, little-endian"),
        Field("rsa_e", "I", "ets_rsa_pubkey_t.e: public exponent"),
        Field("rsa_r", "384s", "ets_rsa_pubkey_t.rinv: R = 2^6144 mod n, little-endian"),
        Field("rsa_m_prime", "I", "ets_rsa_pubkey_t.mdash: M' = -n^-1 mod 2^32"),
        Field("signature", "384s", "RSA-PSS signature, byte-reversed (little-endian)"),
        Field("block_crc", "I", "CRC32 (zlib / esp_rom_crc32_le(0, ...)) of bytes 0..1196"),
        Field("padding", "16s", "_padding: zero"),
    ],
    source="esp-idf components/esp_rom/include/esp32c3/rom/secure_boot.h, rom/rsa_pss.h; "
    "docs/en/security/secure-boot-v2.rst 'Signature Block Format'; "
    "esptool espsecure/__init__.py generate_rsa_signature_block ('<BBxx32s384sI384sI384s' + CRC + 16 zero bytes)",
)

assert SIGNATURE_BLOCK_LAYOUT.size == BLOCK_SIZE
assert SIGNATURE_BLOCK_LAYOUT.offset_of("rsa_n") == KEY_DIGEST_START
assert SIGNATURE_BLOCK_LAYOUT.offset_of("signature") == KEY_DIGEST_END
assert SIGNATURE_BLOCK_LAYOUT.offset_of("block_crc") == CRC_LEN


# --------------------------------------------------------------------------- keys


def _rsa_primitives(n: int) -> tuple[int, int]:
    """R = 2^6144 mod n and M' = -n^-1 mod 2^32, the Montgomery constants the ESP32-C3
    RSA peripheral takes from the block (espsecure ``_get_sbv2_rsa_primitives``)."""
    r = pow(2, 2 * RSA_BITS, n)
    m_prime = (-pow(n, -1, 1 << 32)) % (1 << 32)
    return r, m_prime


def _le(value: int) -> bytes:
    return value.to_bytes(RSA_BYTES, "little")


def _load_rsa_public_key(key: Any) -> rsa.RSAPublicKey:
    """An RSA-3072 public key from a key object or PEM text (public or unencrypted private)."""
    if isinstance(key, rsa.RSAPrivateKey):
        key = key.public_key()
    elif isinstance(key, str | bytes):
        pem = key.encode("ascii") if isinstance(key, str) else key
        if b"PRIVATE KEY" in pem:
            try:
                key = serialization.load_pem_private_key(pem, password=None).public_key()
            except (ValueError, TypeError) as exc:
                raise ValueError(f"cannot read the PEM private key ({exc}); pass an unencrypted key or its public key") from exc
        else:
            try:
                key = serialization.load_pem_public_key(pem)
            except ValueError as exc:
                raise ValueError(f"not a PEM public key ({exc})") from exc
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(
            f"Secure Boot V2 on ESP32-C3 uses RSA-3072 keys; got {type(key).__name__} — "
            "generate one with `espsecure generate-signing-key --version 2 --scheme rsa3072 key.pem`"
        )
    if key.key_size != RSA_BITS:
        raise ValueError(
            f"Secure Boot V2 needs an RSA-3072 key; this one is RSA-{key.key_size} — "
            "generate one with `espsecure generate-signing-key --version 2 --scheme rsa3072 key.pem`"
        )
    return key


def _key_material(n: int, e: int) -> bytes:
    """Block bytes 36..812 (``ets_rsa_pubkey_t``: n, e, R, M') for modulus *n* and exponent *e*."""
    r, m_prime = _rsa_primitives(n)
    block = SignatureBlock(bytes(DIGEST_LEN), n, e, r, m_prime, bytes(RSA_BYTES), block_crc=0)
    return block.to_bytes()[KEY_DIGEST_START:KEY_DIGEST_END]


def public_key_digest(public_key_or_pem: rsa.RSAPublicKey | rsa.RSAPrivateKey | bytes | str) -> bytes:
    """The 32-byte digest burned into eFuse (``SECURE_BOOT_DIGESTn``) for an RSA-3072 key.

    SHA-256 over n (LE), e, R = 2^6144 mod n (LE), M' = -n^-1 mod 2^32 — the same 776
    bytes as signature block bytes 36..812. Equals ``espsecure digest-sbv2-public-key``
    output. Accepts a key object or PEM (public key, or an unencrypted private key).
    """
    numbers = _load_rsa_public_key(public_key_or_pem).public_numbers()
    return hashlib.sha256(_key_material(numbers.n, numbers.e)).digest()


# --------------------------------------------------------------------------- blocks


@dataclass(frozen=True)
class SignatureBlock:
    """One ``ets_secure_boot_sig_block_t`` (RSA-3072), as stored in the signature sector.

    Big numbers are held as ints; ``signature`` is held big-endian, as RSA-PSS defines
    it (on flash it is byte-reversed). Every stored byte round-trips through
    :meth:`parse` / :meth:`to_bytes`, including a wrong CRC or non-zero padding, so
    negative variants can be built with :func:`dataclasses.replace`.
    """

    image_digest: bytes
    n: int
    e: int
    r: int
    m_prime: int
    signature: bytes
    block_crc: int
    magic: int = SIGNATURE_MAGIC
    version: int = VERSION_RSA
    reserved: bytes = b"\0\0"
    padding: bytes = b"\0" * 16

    @classmethod
    def parse(cls, raw: bytes | bytearray | memoryview, offset: int = 0) -> SignatureBlock:
        """Read a block at *offset* of *raw*. Parsing does not judge it: see :attr:`is_valid`."""
        v = SIGNATURE_BLOCK_LAYOUT.unpack(raw, offset, what="Secure Boot V2 signature block")
        return cls(
            image_digest=v["image_digest"],
            n=int.from_bytes(v["rsa_n"], "little"),
            e=v["rsa_e"],
            r=int.from_bytes(v["rsa_r"], "little"),
            m_prime=v["rsa_m_prime"],
            signature=v["signature"][::-1],
            block_crc=v["block_crc"],
            magic=v["magic_byte"],
            version=v["version"],
            reserved=v["reserved"],
            padding=v["padding"],
        )

    @classmethod
    def create(
        cls, image_digest: bytes, public_key: rsa.RSAPublicKey | bytes | str, signature: bytes
    ) -> SignatureBlock:
        """A well-formed block (R, M' and CRC computed) for *signature* (big-endian, 384
        bytes) over *image_digest* by the holder of *public_key*. Used to build test
        and negative images; real signing goes through espsecure."""
        if len(image_digest) != DIGEST_LEN:
            raise ValueError(f"image digest must be {DIGEST_LEN} bytes, got {len(image_digest)}")
        if len(signature) != RSA_BYTES:
            raise ValueError(f"an RSA-3072 signature is {RSA_BYTES} bytes, got {len(signature)}")
        numbers = _load_rsa_public_key(public_key).public_numbers()
        r, m_prime = _rsa_primitives(numbers.n)
        block = cls(image_digest, numbers.n, numbers.e, r, m_prime, bytes(signature), block_crc=0)
        return block.with_crc_fixed()

    def _fields(self) -> dict[str, Any]:
        return {
            "magic_byte": self.magic,
            "version": self.version,
            "reserved": self.reserved,
            "image_digest": self.image_digest,
            "rsa_n": _le(self.n),
            "rsa_e": self.e,
            "rsa_r": _le(self.r),
            "rsa_m_prime": self.m_prime,
            "signature": self.signature[::-1],
            "block_crc": self.block_crc,
            "padding": self.padding,
        }

    def to_bytes(self) -> bytes:
        return SIGNATURE_BLOCK_LAYOUT.pack(self._fields())

    @property
    def computed_crc(self) -> int:
        """CRC32 of bytes 0..1196 as the bootloader computes it (``esp_rom_crc32_le(0, ...)``)."""
        return zlib.crc32(self.to_bytes()[:CRC_LEN]) & 0xFFFFFFFF

    @property
    def crc_ok(self) -> bool:
        return self.block_crc == self.computed_crc

    @property
    def is_valid(self) -> bool:
        """What the bootloader calls a valid block: magic 0xE7 and a matching CRC."""
        return self.magic == SIGNATURE_MAGIC and self.crc_ok

    def with_crc_fixed(self) -> SignatureBlock:
        return replace(self, block_crc=self.computed_crc)

    def key_digest(self) -> bytes:
        """SHA-256 of block bytes 36..812 — what eFuse must hold to trust this block's key."""
        return hashlib.sha256(self.to_bytes()[KEY_DIGEST_START:KEY_DIGEST_END]).digest()

    def public_key(self) -> rsa.RSAPublicKey:
        """The block's RSA public key (n, e); R and M' are not checked here."""
        if self.version != VERSION_RSA:
            raise FirmwareFormatError(
                "Secure Boot V2 signature block",
                f"version 0x{self.version:02x} is not an RSA-3072 block (0x02)",
                SIGNATURE_BLOCK_LAYOUT.offset_of("version"),
                "ESP32-C3 only verifies RSA-3072 blocks; sign with an RSA-3072 key",
            )
        try:
            return rsa.RSAPublicNumbers(self.e, self.n).public_key()
        except ValueError as exc:
            raise FirmwareFormatError(
                "Secure Boot V2 signature block",
                f"the public key fields do not form an RSA key ({exc})",
                KEY_DIGEST_START,
                "the block is corrupt or was not written by espsecure",
            ) from exc

    def verify_digest(self, image_digest: bytes) -> bool:
        """RSA-PSS (SHA-256, MGF1-SHA-256, salt 32) check of this block's signature over
        *image_digest* with this block's key."""
        try:
            self.public_key().verify(
                self.signature,
                image_digest,
                padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=PSS_SALT_LEN),
                Prehashed(hashes.SHA256()),
            )
        except (InvalidSignature, FirmwareFormatError):
            return False
        return True


def split_signed_image(data: bytes) -> tuple[bytes, bytes]:
    """Split a signed image into (content, signature sector): the sector is the last
    4096 bytes, the content everything before it (what the image digest covers)."""
    size = len(data)
    if size < SECTOR_SIZE:
        raise FirmwareFormatError(
            "Secure Boot V2 signed image",
            f"is {size} bytes, shorter than the {SECTOR_SIZE}-byte signature sector",
            size,
            "the image is truncated or unsigned; sign it with `espsecure sign-data --version 2`",
        )
    if size % SECTOR_SIZE:
        raise FirmwareFormatError(
            "Secure Boot V2 signed image",
            f"is {size} bytes, not a multiple of {SECTOR_SIZE}, so there is no sector-aligned signature sector "
            f"({size % SECTOR_SIZE} bytes past the last sector boundary)",
            size - size % SECTOR_SIZE,
            "the image is truncated or was changed after signing; re-sign the unsigned image",
        )
    return data[:-SECTOR_SIZE], data[-SECTOR_SIZE:]


def parse_signature_sector(sector: bytes) -> list[SignatureBlock | None]:
    """The three block slots of a signature sector; ``None`` where the bootloader would
    see no valid block (magic not 0xE7, or CRC mismatch)."""
    if len(sector) != SECTOR_SIZE:
        raise FirmwareFormatError(
            "Secure Boot V2 signature sector",
            f"is {len(sector)} bytes; it must be exactly {SECTOR_SIZE}",
            0,
            "pass the last 4096 bytes of the signed image (see split_signed_image)",
        )
    slots: list[SignatureBlock | None] = []
    for i in range(MAX_BLOCKS):
        block = SignatureBlock.parse(sector, i * BLOCK_SIZE)
        slots.append(block if block.is_valid else None)
    return slots


# --------------------------------------------------------------------------- verification


class BootLogLine(NamedTuple):
    """One ESP-IDF log line without its timestamp: ``E (123) secure_boot_v2: text``."""

    level: str   # "E", "W", "I"
    tag: str
    text: str

    def render(self, timestamp_ms: int) -> str:
        return f"{self.level} ({timestamp_ms}) {self.tag}: {self.text}"


@dataclass(frozen=True)
class BlockCheck:
    """How one signature block fared.

    ``outcome``: ``empty`` (magic not 0xE7), ``bad_crc``, ``wrong_scheme`` (valid
    block, not RSA), ``untrusted_key``, ``revoked_key``, ``digest_mismatch``,
    ``bad_signature`` or ``verified``.
    """

    index: int
    outcome: str
    detail: str
    key_digest: bytes | None = None
    trusted_slot: int | None = None


@dataclass(frozen=True)
class SecureBootVerdict:
    """The bootloader's decision on one signed image.

    ``reason``: ``verified``; ``bad_length`` (no sector-aligned signature sector);
    ``no_trusted_keys`` (no usable eFuse digest); ``no_signature`` (no block with the
    0xE7 magic); ``bad_block`` (a block with the magic but a wrong CRC);
    ``wrong_scheme`` (valid blocks, none RSA); ``untrusted_key``; ``revoked_key``;
    ``digest_mismatch``; ``bad_signature``. When several blocks fail, the reason is
    that of the block that got furthest through the checks.

    ``log`` holds the ``secure_boot_v2`` lines the bootloader prints, ``message`` the
    decisive one; ``detail`` explains the verdict to an engineer.
    """

    ok: bool
    reason: str
    message: str
    detail: str
    log: tuple[BootLogLine, ...] = ()
    verified_block: int | None = None
    image_digest: bytes | None = None
    blocks: tuple[BlockCheck, ...] = ()


_OUTCOME_RANK = {"empty": 0, "bad_crc": 1, "wrong_scheme": 1, "untrusted_key": 2, "revoked_key": 2,
                 "digest_mismatch": 3, "bad_signature": 4}
_OUTCOME_REASON = {"empty": "no_signature", "bad_crc": "bad_block"}

_MSG_VERIFYING = "Verifying with RSA-PSS..."
_MSG_OK = "Signature verified successfully!"
_MSG_FAILED = "Secure Boot V2 verification failed."
_MSG_NO_DIGESTS = "Could not read eFuse secure boot digests!"
_MSG_NO_SCHEME = "No signature block generated for valid scheme"
_MSG_NO_SCHEME_2 = "RSA signing scheme selected but no signature block for the selected scheme"


def _short(digest: bytes) -> str:
    return digest.hex()[:16] + "…"


def _check_block(
    index: int,
    raw: bytes,
    image_digest: bytes,
    offered: Mapping[int, bytes],
    efuse: Sequence[bytes | None],
    revoked: Collection[int],
) -> BlockCheck:
    block = SignatureBlock.parse(raw)
    if block.magic != SIGNATURE_MAGIC:
        return BlockCheck(index, "empty", f"block {index}: no signature block (magic 0x{block.magic:02x}, not 0xe7)")
    if not block.crc_ok:
        return BlockCheck(
            index, "bad_crc",
            f"block {index}: CRC32 0x{block.block_crc:08x} stored, 0x{block.computed_crc:08x} computed — "
            "the block is corrupt, the bootloader ignores it",
        )
    if block.version != VERSION_RSA:
        return BlockCheck(index, "wrong_scheme",
                          f"block {index}: version 0x{block.version:02x} is not an RSA-3072 block (0x02)")
    key_digest = block.key_digest()
    slot = next((i for i, d in offered.items() if d == key_digest), None)
    if slot is None:
        known = [i for i, d in enumerate(efuse) if d == key_digest]
        if known and all(i in revoked for i in known):
            return BlockCheck(index, "revoked_key",
                              f"block {index}: key {_short(key_digest)} is SECURE_BOOT_DIGEST{known[0]}, "
                              f"which is revoked (SECURE_BOOT_KEY_REVOKE{known[0]})", key_digest)
        if known:
            return BlockCheck(
                index, "untrusted_key",
                f"block {index}: key {_short(key_digest)} is SECURE_BOOT_DIGEST{known[0]}, but ESP-IDF only hands "
                f"digest slot {known[0]} to the ROM when signature block {known[0]} is an RSA block — sign the image "
                f"with {known[0] + 1} blocks or burn the digest into slot 0",
                key_digest,
            )
        return BlockCheck(index, "untrusted_key",
                          f"block {index}: key {_short(key_digest)} is not among the eFuse key digests", key_digest)
    if block.image_digest != image_digest:
        return BlockCheck(
            index, "digest_mismatch",
            f"block {index}: image digest {_short(block.image_digest)} in the block, {_short(image_digest)} "
            "computed — the image changed after it was signed",
            key_digest, slot,
        )
    if not block.verify_digest(image_digest):
        return BlockCheck(index, "bad_signature",
                          f"block {index}: RSA-PSS signature does not verify with the trusted key "
                          f"(SECURE_BOOT_DIGEST{slot})", key_digest, slot)
    return BlockCheck(index, "verified", f"block {index}: verified with SECURE_BOOT_DIGEST{slot}", key_digest, slot)


def verify_signed_image(
    data: bytes,
    trusted_key_digests: Sequence[bytes | None],
    revoked: Collection[int] = (),
    *,
    target: type[ChipTarget] = ESP32C3,
) -> SecureBootVerdict:
    """Decide, as the ESP-IDF 2nd-stage bootloader with Secure Boot V2 enabled does,
    whether *data* (content + signature sector) may boot.

    *trusted_key_digests* are the eFuse key digests in slot order
    (``SECURE_BOOT_DIGEST0..2``; ``None`` for a slot with no key), *revoked* the slot
    indices whose ``SECURE_BOOT_KEY_REVOKEn`` bit is set.

    Order, from ``esp_secure_boot_verify_sbv2_signature_block`` and the ROM check:
    no unrevoked digest → "Could not read eFuse secure boot digests!"; no block whose
    version byte is RSA → "No signature block generated for valid scheme"; otherwise
    eFuse digest slot *i* is offered to the ROM only if block *i* is an RSA block (an
    ESP-IDF detail: a key burned in slot 1 does not verify an image with one block),
    and each block in turn is checked: magic and CRC, key digest among the offered
    digests, block digest equal to SHA-256 of the content, RSA-PSS. The first block
    that passes verifies the image.
    """
    max_blocks = target.sbv2_max_signature_blocks
    slots = list(trusted_key_digests)
    if len(slots) > max_blocks:
        raise ValueError(f"{target.display_name} has {max_blocks} key digest slots, {len(slots)} digests given")
    for i, d in enumerate(slots):
        if d is not None and len(d) != DIGEST_LEN:
            raise ValueError(f"SECURE_BOOT_DIGEST{i} must be {DIGEST_LEN} bytes (SHA-256), got {len(d)}")
    revoked_set = set(revoked)
    bad = sorted(i for i in revoked_set if not 0 <= i < max_blocks)
    if bad:
        raise ValueError(f"revoked slot index {bad[0]} out of range; {target.display_name} has slots 0..{max_blocks - 1}")
    slots += [None] * (max_blocks - len(slots))

    try:
        content, sector = split_signed_image(data)
    except FirmwareFormatError as exc:
        return SecureBootVerdict(False, "bad_length", "", str(exc))
    image_digest = hashlib.sha256(content).digest()

    efuse = [d if i not in revoked_set else None for i, d in enumerate(slots)]
    if not any(d is not None for d in efuse):
        why = "no key digest burned" if not any(slots) else "every burned key digest is revoked"
        return SecureBootVerdict(
            False, "no_trusted_keys", _MSG_NO_DIGESTS,
            f"Secure Boot is enabled but {why}: nothing can verify — burn a digest with "
            "`espefuse burn-key-digest BLOCK_KEYn key.pem SECURE_BOOT_DIGESTm`",
            (BootLogLine("E", LOG_TAG, _MSG_NO_DIGESTS),), None, image_digest,
        )

    log = [BootLogLine("I", LOG_TAG, _MSG_VERIFYING)]
    raws = [sector[i * BLOCK_SIZE : (i + 1) * BLOCK_SIZE] for i in range(max_blocks)]
    rsa_slots = [raw[1] == VERSION_RSA for raw in raws]
    offered = {i: d for i, d in enumerate(efuse) if d is not None and rsa_slots[i]}

    checks: list[BlockCheck] = []
    for i, raw in enumerate(raws):
        check = _check_block(i, raw, image_digest, offered, slots, revoked_set)
        checks.append(check)
        if check.outcome == "verified":
            log.append(BootLogLine("I", LOG_TAG, _MSG_OK))
            return SecureBootVerdict(True, "verified", _MSG_OK, check.detail, tuple(log), i, image_digest, tuple(checks))

    worst = max(checks, key=lambda c: _OUTCOME_RANK[c.outcome])
    reason = _OUTCOME_REASON.get(worst.outcome, worst.outcome)
    detail = "; ".join(c.detail for c in checks)
    if not any(rsa_slots):
        log += [BootLogLine("E", LOG_TAG, _MSG_NO_SCHEME), BootLogLine("E", LOG_TAG, _MSG_NO_SCHEME_2)]
        message = _MSG_NO_SCHEME
    else:
        log.append(BootLogLine("E", LOG_TAG, _MSG_FAILED))
        message = _MSG_FAILED
    return SecureBootVerdict(False, reason, message, detail, tuple(log), None, image_digest, tuple(checks))


# --------------------------------------------------------------------------- signing


class SigningError(RuntimeError):
    """espsecure could not sign. ``str()`` quotes espsecure's own error (secrets
    redacted) and names a fix; ``returncode`` and ``output`` keep the details."""

    def __init__(self, problem: str, fix: str, *, returncode: int | None = None, output: str = ""):
        self.problem = problem
        self.fix = fix
        self.returncode = returncode
        self.output = output
        super().__init__(f"{problem} — {fix}")


class HsmError(RuntimeError):
    """A PKCS#11 operation on the HSM failed (token, key or PIN); secrets redacted."""

    def __init__(self, problem: str, fix: str):
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem} — {fix}")


_ESPSECURE_TIMEOUT_S = 120.0


def _espsecure_error(output: str) -> str:
    """The lines of espsecure's output that say what went wrong."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    wanted = [ln for ln in lines if ln.startswith(("ERROR", "A fatal error", "Error")) or "rror:" in ln]
    picked = wanted or lines[-3:]
    return " | ".join(picked)[:1500] or "no output"


def _run_espsecure(
    args: Sequence[str],
    *,
    what: str,
    fix: str,
    env_extra: Mapping[str, str] | None = None,
    secrets: Sequence[str] = (),
    known_failures: Mapping[str, str] | None = None,
    timeout: float = _ESPSECURE_TIMEOUT_S,
) -> ToolRun:
    """Run ``espsecure *args`` through :func:`rig.espressif_tools.run_tool`; a failure is a SigningError.

    *known_failures* maps a text espsecure prints to the fix for that failure; *secrets*
    are redacted from everything the error carries."""
    env = {**os.environ, **(env_extra or {})}
    try:
        run = run_tool("espsecure", args, timeout=timeout, check=False, secrets=secrets, env=env)
    except EspressifToolError as exc:
        raise SigningError(f"{what}: {exc}", "check that the HSM / PKCS#11 library answers; " + fix) from None
    if run.returncode != 0:
        output = run.stderr + "\n" + run.stdout
        fix = next((f for text, f in (known_failures or {}).items() if text in output), fix)
        raise SigningError(
            f"{what}: espsecure exited with {run.returncode}: {_espsecure_error(run.stderr or output)}",
            fix, returncode=run.returncode, output=output,
        )
    return run


def sign_image_with_keyfile(
    data: bytes, key_pem_path: str | os.PathLike[str], *, append: bool = False
) -> bytes:
    """Sign *data* with the RSA-3072 private key in *key_pem_path* through
    ``espsecure sign-data --version 2`` and return the signed image.

    espsecure pads *data* with 0xFF to a 4096-byte multiple and appends a signature
    sector. With ``append=True`` *data* must already be signed: the new block is added
    after its valid blocks (``--append-signatures``, at most 3).
    """
    key = Path(key_pem_path)
    if not key.is_file():
        raise SigningError(
            f"signing key {key} does not exist",
            f"generate one with `espsecure generate-signing-key --version 2 --scheme rsa3072 {key}`",
        )
    with tempfile.TemporaryDirectory(prefix="rig-sbv2-") as tmp:
        src, out = Path(tmp, "unsigned.bin"), Path(tmp, "signed.bin")
        src.write_bytes(data)
        args = ["sign-data", "--version", "2", "--keyfile", str(key), "--output", str(out)]
        if append:
            args.append("--append-signatures")
        _run_espsecure(
            [*args, str(src)],
            what=f"signing {len(data)} bytes with {key}",
            fix="check that the key is an unencrypted RSA-3072 PEM private key"
            + (" and that the image has fewer than 3 signature blocks" if append else ""),
        )
        return out.read_bytes()


def _ini_value(text: str, what: str) -> str:
    """A value safe in espsecure's ConfigParser INI ('%' escaped; no newlines)."""
    if any(c in text for c in "\r\n\0") or text != text.strip():
        raise ValueError(f"the HSM {what} must not contain newlines or leading/trailing spaces")
    return text.replace("%", "%%")


@dataclass(frozen=True)
class HsmConfig:
    """Where the Secure Boot V2 key lives in a PKCS#11 HSM.

    ``slot`` is the PKCS#11 slot id espsecure needs; give ``token_label`` instead and
    the rig looks the slot up (SoftHSM2 moves a token to a new slot id when it is
    initialised). ``environment`` is added to the environment of every process that
    loads the PKCS#11 library (``SOFTHSM2_CONF`` for SoftHSM2). The PIN is never
    shown in ``repr()``.
    """

    pkcs11_lib: Path
    key_label: str
    pin: str = field(repr=False)
    slot: int | None = None
    token_label: str | None = None
    pubkey_label: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.slot is None and not self.token_label:
            raise ValueError("HsmConfig needs the PKCS#11 slot id or the token label")
        if not self.pin:
            raise ValueError("HsmConfig needs the token user PIN (espsecure would prompt for it)")
        _ini_value(self.pin, "PIN")
        _ini_value(self.key_label, "key label")


def _pkcs11_request(config: HsmConfig, op: str, **fields: Any) -> dict[str, Any]:
    """Run one PKCS#11 operation in a child interpreter (see :func:`_pkcs11_worker_main`).

    A child keeps the PKCS#11 library's process-wide state (``C_Initialize``, and
    SoftHSM2 reading ``SOFTHSM2_CONF`` once) out of this process, so tokens in
    different state directories never meet. The PIN travels on stdin, never in argv.
    """
    request = {"op": op, "lib": str(config.pkcs11_lib), "slot": config.slot,
               "token_label": config.token_label, **fields}
    env = {**os.environ, **config.environment}
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-c", "from rig.firmware.secure_boot_v2 import _pkcs11_worker_main; _pkcs11_worker_main()"]
    secrets = [config.pin]
    try:
        proc = subprocess.run(cmd, input=json.dumps(request), capture_output=True, text=True, env=env,
                              timeout=_ESPSECURE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        raise HsmError(f"PKCS#11 {op} on {config.pkcs11_lib} did not finish within {_ESPSECURE_TIMEOUT_S:.0f} s",
                       "check the HSM is reachable and its library responds") from None
    try:
        reply = json.loads(proc.stdout or "{}")
    except json.JSONDecodeError:
        reply = {}
    if proc.returncode != 0 or not reply.get("ok"):
        kind = reply.get("kind", "")
        problem = redact(reply.get("error") or (proc.stderr or "").strip()[-800:] or "no output", secrets)
        where = f"token {config.token_label!r}" if config.token_label else f"slot {config.slot}"
        fixes = {
            "PinIncorrect": "the user PIN is wrong for this token",
            "PinLenRange": "the user PIN has the wrong length for this token",
            "UserPinNotInitialized": "the token's user PIN was never set; re-initialise the token",
            "NoSuchToken": "no token with that label/slot; initialise it (SoftHsmToken.setup) or fix the label",
            "NoSuchKey": f"no key labelled {config.key_label!r} on the token; generate it first",
            "MultipleObjectsReturned": f"several objects are labelled {config.key_label!r}; delete the extras",
            "MultipleTokensReturned": "several tokens share that label; use the slot id",
        }
        fix = fixes.get(kind, "check the PKCS#11 library path, the token and the environment "
                              f"({', '.join(config.environment) or 'no extra variables'})")
        raise HsmError(f"PKCS#11 {op} on {where} via {config.pkcs11_lib} failed: {kind or 'error'}: {problem}", fix)
    return reply


def _pkcs11_worker_main() -> None:
    """Child side of :func:`_pkcs11_request`: one JSON request on stdin, one JSON reply
    on stdout. PKCS#11 errors become ``{"ok": false, "kind": <exception class>}``."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, MechanismFlag, ObjectClass

    request = json.loads(sys.stdin.read())
    op = request["op"]

    def token() -> Any:
        if request.get("slot") is not None:
            for s in lib.get_slots(token_present=True):
                if s.slot_id == int(request["slot"]):
                    return s.get_token()
            raise pkcs11.NoSuchToken(f"no token in slot {request['slot']}")
        return lib.get_token(token_label=request["token_label"])

    def rsa_numbers(key: Any) -> dict[str, Any]:
        if key.key_type != KeyType.RSA:
            raise pkcs11.exceptions.KeyTypeInconsistent(f"key {key.label!r} is {key.key_type.name}, not RSA")
        return {"n": key[Attribute.MODULUS].hex(), "e": key[Attribute.PUBLIC_EXPONENT].hex()}

    try:
        lib = pkcs11.lib(request["lib"])
        tok = token()
        reply: dict[str, Any] = {"slot_id": tok.slot.slot_id}
        if op == "public_key":
            with tok.open(user_pin=request["pin"]) as session:
                reply |= rsa_numbers(session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=request["label"]))
        elif op == "ensure_rsa_keypair":
            with tok.open(rw=True, user_pin=request["pin"]) as session:
                label = request["label"]
                try:
                    private = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
                    reply["created"] = False
                except pkcs11.NoSuchKey:
                    _, private = session.generate_keypair(
                        KeyType.RSA, request["bits"], label=label, store=True,
                        capabilities=MechanismFlag.SIGN | MechanismFlag.VERIFY,
                        public_template={Attribute.VERIFY: True},
                        private_template={Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
                                          Attribute.PRIVATE: True, Attribute.SIGN: True},
                    )
                    reply["created"] = True
                reply["sensitive"] = bool(private[Attribute.SENSITIVE])
                reply["extractable"] = bool(private[Attribute.EXTRACTABLE])
                reply |= rsa_numbers(session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label))
        elif op != "slot":
            raise ValueError(f"unknown PKCS#11 worker operation {op!r}")
        reply["ok"] = True
    except pkcs11.PKCS11Error as exc:
        reply = {"ok": False, "kind": type(exc).__name__, "error": str(exc) or type(exc).__name__}
    sys.stdout.write(json.dumps(reply))


def _pem_from_numbers(reply: Mapping[str, Any]) -> bytes:
    key = rsa.RSAPublicNumbers(int(reply["e"], 16), int(reply["n"], 16)).public_key()
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


_HSM_FAILURES = {
    "PinIncorrect": "the HSM rejected the user PIN (PinIncorrect); check the PIN for this token",
    "PinLenRange": "the HSM rejected the user PIN's length (PinLenRange); check the PIN for this token",
    "Failed to get the private key": "no private key with that label on the token; check the key label",
    "Failed to extract the public key": "no public key with that label on the token; check label_pubkey",
    "LIB file does not exist": "the PKCS#11 library path is wrong; for SoftHSM2 `apt-get install softhsm2`",
}


class HsmSigner:
    """Signs Secure Boot V2 images with a private key that never leaves a PKCS#11 HSM,
    through ``espsecure sign-data --version 2 --hsm --hsm-config <ini>``.

    The INI (``[hsm_config]``: pkcs11_lib, slot, label, label_pubkey, credentials)
    holds the PIN, so it is written to a fresh private directory with mode 0600 and
    deleted as soon as espsecure returns. The PIN is never put in argv, logs or
    exception text.
    """

    def __init__(self, config: HsmConfig):
        self.config = config
        self._slot: int | None = config.slot

    def __repr__(self) -> str:
        c = self.config
        return f"HsmSigner(lib={str(c.pkcs11_lib)!r}, token={c.token_label!r}, slot={c.slot}, key={c.key_label!r})"

    def slot_id(self) -> int:
        """The PKCS#11 slot id of the token (looked up by label when not configured)."""
        if self._slot is None:
            self._slot = int(_pkcs11_request(self.config, "slot")["slot_id"])
        return self._slot

    def public_key_pem(self) -> bytes:
        """The signing key's public half (SubjectPublicKeyInfo PEM), read from the HSM."""
        reply = _pkcs11_request(self.config, "public_key", pin=self.config.pin,
                                label=self.config.pubkey_label or self.config.key_label)
        self._slot = int(reply["slot_id"])
        return _pem_from_numbers(reply)

    def key_digest(self) -> bytes:
        """The eFuse digest of the HSM key (:func:`public_key_digest`)."""
        return public_key_digest(self.public_key_pem())

    def sign(self, data: bytes, *, append: bool = False) -> bytes:
        """Sign *data* in the HSM via espsecure; see :func:`sign_image_with_keyfile` for
        padding and ``append``."""
        c = self.config
        slot = self.slot_id()
        ini = (
            "[hsm_config]\n"
            f"pkcs11_lib = {_ini_value(str(c.pkcs11_lib), 'library path')}\n"
            f"slot = {slot}\n"
            f"label = {_ini_value(c.key_label, 'key label')}\n"
            f"label_pubkey = {_ini_value(c.pubkey_label or c.key_label, 'public key label')}\n"
            f"credentials = {_ini_value(c.pin, 'PIN')}\n"
        )
        tmp = tempfile.mkdtemp(prefix="rig-hsm-")  # 0700
        try:
            ini_path, src, out = Path(tmp, "hsm_config.ini"), Path(tmp, "unsigned.bin"), Path(tmp, "signed.bin")
            fd = os.open(ini_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(ini)
            src.write_bytes(data)
            args = ["sign-data", "--version", "2", "--hsm", "--hsm-config", str(ini_path), "--output", str(out)]
            if append:
                args.append("--append-signatures")
            _run_espsecure(
                [*args, str(src)],
                what=f"signing {len(data)} bytes with HSM key {c.key_label!r} (slot {slot}, {c.pkcs11_lib})",
                fix="check the PKCS#11 library path, the slot, the key label and the user PIN",
                env_extra=c.environment,
                secrets=[c.pin],
                known_failures=_HSM_FAILURES,
            )
            return out.read_bytes()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

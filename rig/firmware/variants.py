"""Negative (and a few positive-control) variants of an ESP app image, for the OTA and
Secure Boot suites.

Every variant takes the bytes of one app image — an ESP-IDF build's ``<project>.bin``
or a virtual board's image, signed with Secure Boot V2 or not — and returns new bytes
that carry exactly one intended defect:

* a variant that changes the image's content (header or app descriptor) recomputes
  the checksum byte and the appended SHA-256, so :func:`rig.firmware.image.verify_image`
  finds nothing but the intended defect;
* "signed in, signed out": when the input carries a signature sector, a variant that
  changes the content strips it and signs the new content again with the signer it is
  given (a :class:`KeyFileSigner`, an :class:`~rig.firmware.secure_boot_v2.HsmSigner`,
  anything with ``sign(data) -> bytes``); an unsigned input stays unsigned;
* the 0xFF padding between the image and the signature sector is kept as it was, so
  the content before the sector stays a 4096-byte multiple and only the bytes the
  defect needs differ from the input.

The variants, and the test cases they serve (each also listed in :data:`CATALOGUE`):

=========================  ===================================================================
``truncated``              esp-idf ``examples/system/ota/advanced_https_ota/pytest_advanced_ota.py``
                           ``..._truncated_bin`` ("Image validation failed, image is corrupted");
                           ``..._truncated_header`` (cut inside ``esp_app_desc_t``: "esp_https_ota_get_img_desc
                           failed"); amazon-freertos ``tools/ota_e2e_tests`` ``OtaTestSingleByteImage``
``bit_flipped``            ``OtaTestCorruptImageAfterSigning``; with a re-signing signer,
                           ``OtaTestCorruptImageBeforeSigning``
``unsigned``               ``OtaTestUnsignedImage``
``untrusted_signature``    ``OtaTestUntrustedCertificate``
``corrupt_signature``      ``OtaTestCorruptSignature``
``wrong_chip_id``          advanced_https_ota ``..._invalid_chip_id`` ("Mismatch chip id, expected %d,
                           found %d"); the bootloader's ``bootloader_common_check_chip_validity``
``secure_version``         advanced_https_ota ``..._anti_rollback`` ("New firmware security version is
                           less than eFuse programmed"); the firmware set's ``next_secure`` role
``version``                ``OtaTestGreaterVersion`` (the ``next`` role); with the running version,
                           ``OtaTestSameVersion`` / esp-rainmaker ``validate_image_header``
                           ("Same version received")
``project_name``           esp-rainmaker ``components/esp_rainmaker/src/ota/esp_rmaker_ota.c``
                           ``validate_image_header`` ("Project Name mismatch")
=========================  ===================================================================

Bad input — not an ESP image, an image too short to parse, asking to strip or corrupt a
signature that is not there — is a :class:`~rig.firmware.errors.FirmwareFormatError`
naming the offset; :class:`VariantNotApplicable` (a subclass) marks inputs that simply
cannot carry the defect (an unsigned input for ``unsigned``, ``secure_version`` 0 for
"lower"), which a suite reports as NOT_APPLICABLE. Bad arguments (an offset outside
segment data, a signed input and no signer to re-sign it) are a ``ValueError``.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Protocol, runtime_checkable

from rig.firmware.app_desc import APP_DESC_LAYOUT, APP_DESC_OFFSET, AppDescriptor
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.image import (
    IMAGE_HEADER_LAYOUT,
    LOADABLE_MIN_ADDR,
    SEGMENT_HEADER_LAYOUT,
    EspImage,
)
from rig.firmware.secure_boot_v2 import (
    BLOCK_SIZE,
    SECTOR_SIZE,
    SigningError,
    parse_signature_sector,
    sign_image_with_keyfile,
)

__all__ = [
    "CATALOGUE",
    "ESP32S3_CHIP_ID",
    "TRUNCATED_HEADER_LENGTH",
    "ImageParts",
    "KeyFileSigner",
    "Signer",
    "SignerLike",
    "Variant",
    "VariantNotApplicable",
    "VariantSigners",
    "as_signer",
    "bit_flipped",
    "corrupt_signature",
    "default_cut",
    "default_flip_offset",
    "next_version",
    "project_name",
    "same_version",
    "secure_version",
    "signed_content",
    "truncated",
    "unsigned",
    "untrusted_signature",
    "variant",
    "version",
    "with_app_descriptor",
    "wrong_chip_id",
]

ESP32S3_CHIP_ID = 0x0009
"""``ESP_CHIP_ID_ESP32S3`` (esp-idf ``esp_app_format.h``): the default "other chip" for
:func:`wrong_chip_id` — a real chip id that esptool recognises, not a made-up value."""

TRUNCATED_HEADER_LENGTH = APP_DESC_OFFSET + APP_DESC_LAYOUT.size // 2
"""160 bytes: the cut of the ``truncated_header`` catalogue entry, half-way through the
``esp_app_desc_t`` (advanced_https_ota's truncated_header test cuts below the 288 bytes
of image header + segment header + descriptor)."""

_SIGNATURE_MAGIC = 0xE7  # ETS_SECURE_BOOT_V2_SIGNATURE_MAGIC
_MAX_BLOCKS = SECTOR_SIZE // BLOCK_SIZE  # 3 block slots in a signature sector
_INPUT = "app image (variant input)"


class VariantNotApplicable(FirmwareFormatError):
    """The input cannot carry this defect (e.g. ``unsigned`` of an unsigned image).

    A suite parametrized over :data:`CATALOGUE` turns this into NOT_APPLICABLE rather
    than a failure; it is still a :class:`FirmwareFormatError` for callers that only
    catch that.
    """


# --------------------------------------------------------------------------- signers


@runtime_checkable
class Signer(Protocol):
    """Anything that turns content into a Secure Boot V2 signed image.

    ``sign(data)`` returns *data*, padded with 0xFF to a 4096-byte multiple, followed
    by one 4096-byte signature sector — what ``espsecure sign-data --version 2``
    writes. :class:`~rig.firmware.secure_boot_v2.HsmSigner` is one.
    """

    def sign(self, data: bytes) -> bytes: ...


class KeyFileSigner:
    """A :class:`Signer` for an RSA-3072 PEM private key file, through
    :func:`~rig.firmware.secure_boot_v2.sign_image_with_keyfile` (the real espsecure)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"KeyFileSigner({str(self.path)!r})"

    def sign(self, data: bytes) -> bytes:
        return sign_image_with_keyfile(data, self.path)


SignerLike = Signer | str | os.PathLike[str]
"""A :class:`Signer`, or the path of a PEM private key (made a :class:`KeyFileSigner`)."""


def as_signer(signer: SignerLike) -> Signer:
    """*signer* itself, or a :class:`KeyFileSigner` when it is a key file path."""
    if isinstance(signer, str | os.PathLike):
        return KeyFileSigner(signer)
    if not isinstance(signer, Signer):
        raise TypeError(
            f"a signer needs a sign(data) -> bytes method (KeyFileSigner, HsmSigner) or is a key file path; "
            f"got {type(signer).__name__}"
        )
    return signer


def _sign(content: bytes, signer: SignerLike, what: str) -> bytes:
    """Sign *content* and check that the signer only padded and appended a sector."""
    signed = as_signer(signer).sign(content)
    padded_len = -(-len(content) // SECTOR_SIZE) * SECTOR_SIZE
    if (
        len(signed) != padded_len + SECTOR_SIZE
        or signed[: len(content)] != content
        or signed[len(content) : padded_len] != b"\xff" * (padded_len - len(content))
    ):
        raise SigningError(
            f"{what}: the signer returned {len(signed)} bytes for {len(content)} bytes of content; expected the "
            f"content, 0xFF padding to 0x{padded_len:x} and one {SECTOR_SIZE}-byte signature sector",
            "use a signer that behaves like `espsecure sign-data --version 2` (KeyFileSigner, HsmSigner)",
        )
    return signed


def signed_content(data: bytes | bytearray | memoryview) -> bytes:
    """What a Secure Boot V2 signature over *data* covers, i.e. what a signer signs: a signed
    image without its signature sector; anything else as it is — an unsigned image, or bytes
    that are no well-formed app image at all (a truncated upload), which ``espsecure sign-data``
    signs all the same and a device must then refuse."""
    buf = bytes(data)
    try:
        return ImageParts.parse(buf).content
    except FirmwareFormatError:
        return buf


# --------------------------------------------------------------------------- taking the input apart


@dataclass(frozen=True)
class ImageParts:
    """A variant's input taken apart.

    ``content`` is what a Secure Boot V2 signature covers: everything before the
    signature sector, or all of the data when there is none. ``image`` is the app
    image parsed from its start; ``content[image.image_length:]`` (:attr:`tail`) is
    the padding after it (0xFF, or the rest of a partition dump), which variants keep.

    The input counts as signed when its length is a non-zero multiple of 4096, the
    last 4096 bytes lie past the image, and one of the sector's three block slots
    starts with the 0xE7 magic — espsecure's and the bootloader's notion of "there is
    a signature block" (a block with a broken CRC still counts: it is a corrupt
    signature, not a missing one).
    """

    image: EspImage
    content: bytes
    signature_sector: bytes | None

    @property
    def signed(self) -> bool:
        return self.signature_sector is not None

    @property
    def tail(self) -> bytes:
        return self.content[self.image.image_length :]

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> ImageParts:
        buf = bytes(data)
        image = EspImage.parse(buf, what=_INPUT)
        if len(buf) % SECTOR_SIZE == 0 and len(buf) - SECTOR_SIZE >= image.image_length:
            sector = buf[-SECTOR_SIZE:]
            if any(sector[i * BLOCK_SIZE] == _SIGNATURE_MAGIC for i in range(_MAX_BLOCKS)):
                return cls(image, buf[:-SECTOR_SIZE], sector)
        return cls(image, buf, None)

    def require_signed(self, what: str) -> bytes:
        """The signature sector, or :class:`VariantNotApplicable` naming the variant."""
        if self.signature_sector is None:
            end = len(self.content)
            raise VariantNotApplicable(
                _INPUT,
                f"{what} needs a Secure Boot V2 signed image, but this one ({end} bytes, image 0x{self.image.image_length:x} "
                "bytes) has no signature sector with a 0xE7 block after it",
                end,
                "sign the image first (`espsecure sign-data --version 2`), or skip this variant for unsigned images",
            )
        return self.signature_sector

    def require_intact(self, what: str) -> None:
        """Refuse an image whose checksum or SHA-256 is already wrong: recomputing them
        would silently repair it, and the variant would not be "the input plus one defect"."""
        img = self.image
        calculated = img.calculated_checksum()
        if img.checksum != calculated:
            raise FirmwareFormatError(
                _INPUT,
                f"{what}: the input's checksum byte is 0x{img.checksum:02x} but its segments give 0x{calculated:02x}",
                img.image_length - (len(img.digest) if img.digest else 0) - 1,
                "derive variants from an intact image, not from another corrupted variant",
            )
        if img.digest is not None and img.digest != img.calculated_digest():
            raise FirmwareFormatError(
                _INPUT,
                f"{what}: the input's appended SHA-256 does not match its content",
                img.image_length - len(img.digest),
                "derive variants from an intact image, not from another corrupted variant",
            )

    def finish(self, new_image: bytes, signer: SignerLike | None, what: str) -> bytes:
        """Put a changed image back together: its old padding after it, and — for a signed
        input — a fresh signature sector from *signer* over the padded content."""
        if len(new_image) != self.image.image_length:  # pragma: no cover - every variant keeps the length
            raise AssertionError(f"{what}: image length changed from {self.image.image_length} to {len(new_image)}")
        content = new_image + self.tail
        if not self.signed:
            return content
        if signer is None:
            raise ValueError(
                f"{what}: the input is signed and the change breaks its signature; give the key to re-sign with "
                "(signer=KeyFileSigner(path) or an HsmSigner), or take unsigned(image) first for an unsigned variant"
            )
        return _sign(content, signer, what)


def _rebuilt(image: EspImage) -> bytes:
    """*image* with its checksum and (if ``hash_appended``) SHA-256 computed afresh."""
    image = replace(image, checksum=image.calculated_checksum())
    if image.header.hash_appended:
        image = replace(image, digest=image.calculated_digest())
    return image.to_bytes()


def _segment_data_ranges(image: EspImage) -> list[tuple[int, int, int]]:
    """``(segment index, start, end)`` file ranges of every segment's data."""
    ranges = []
    for index, (offset, seg) in enumerate(zip(image.segment_offsets(), image.segments, strict=True)):
        start = offset + SEGMENT_HEADER_LAYOUT.size
        ranges.append((index, start, start + len(seg.data)))
    return ranges


def _has_app_desc(image: EspImage) -> bool:
    try:
        image.app_desc  # noqa: B018 - parsing is the check
    except FirmwareFormatError:
        return False
    return True


# --------------------------------------------------------------------------- truncated


def default_cut(data: bytes | bytearray | memoryview) -> int:
    """Where :func:`truncated` cuts by default: the middle of the last segment's data
    (rounded down to a 4-byte boundary, at least one byte into it)."""
    image = ImageParts.parse(data).image
    ranges = _segment_data_ranges(image)
    if not ranges:
        raise FirmwareFormatError(_INPUT, "the image has no segments to cut into", IMAGE_HEADER_LAYOUT.size)
    _, start, end = ranges[-1]
    return max(start + 1, start + ((end - start) // 2 & ~3))


def truncated(data: bytes | bytearray | memoryview, length: int | None = None) -> bytes:
    """The first *length* bytes of the input — an OTA download or a flash copy cut short.

    Default: the middle of the last segment (:func:`default_cut`), so the header and
    the app descriptor still read but the image ends inside its data: ESP-IDF's
    ``esp_image_verify`` runs off the end ("Image validation failed, image is
    corrupted" in advanced_https_ota's ``truncated_bin`` test), ``esptool image-info``
    gives up with a fatal error, and Secure Boot V2 finds no sector-aligned signature.
    ``length=TRUNCATED_HEADER_LENGTH`` cuts inside the app descriptor
    (``truncated_header``: "esp_https_ota_get_img_desc failed"); ``length=1`` is IDT's
    ``OtaTestSingleByteImage``. The input is parsed first, so it must be an ESP image.
    """
    buf = bytes(data)
    ImageParts.parse(buf)
    cut = default_cut(buf) if length is None else length
    if not 1 <= cut < len(buf):
        raise ValueError(f"truncated: length {cut} must be 1 to {len(buf) - 1} (the input is {len(buf)} bytes)")
    return buf[:cut]


# --------------------------------------------------------------------------- bit flipped


def default_flip_offset(data: bytes | bytearray | memoryview) -> int:
    """Where :func:`bit_flipped` flips by default: the middle of the largest stretch of
    segment data that is neither a padding segment (load address 0) nor the app
    descriptor — code or data the app runs, so the flip cannot be mistaken for a
    version or project-name change by an OTA client that reads the descriptor."""
    image = ImageParts.parse(data).image
    skip_desc = _has_app_desc(image)
    best: tuple[int, int] | None = None
    for index, start, end in _segment_data_ranges(image):
        if image.segments[index].load_addr < LOADABLE_MIN_ADDR:
            continue
        if index == 0 and skip_desc:
            start += APP_DESC_LAYOUT.size
        if end > start and (best is None or end - start > best[1] - best[0]):
            best = (start, end)
    if best is None:
        raise FirmwareFormatError(
            _INPUT,
            "no segment data outside padding segments and the app descriptor to flip a bit in",
            IMAGE_HEADER_LAYOUT.size,
            "pass offset= explicitly",
        )
    return best[0] + (best[1] - best[0]) // 2


def bit_flipped(
    data: bytes | bytearray | memoryview,
    offset: int | None = None,
    bit: int = 0,
    *,
    signer: SignerLike | None = None,
) -> bytes:
    """One bit flipped in a segment's data; checksum, SHA-256 and signature left alone.

    Models corruption in transit or in flash after signing (IDT
    ``OtaTestCorruptImageAfterSigning``): ESP-IDF reports "Checksum failed" (the XOR
    checksum catches any single-bit flip in segment data), the appended SHA-256 no
    longer matches, and the Secure Boot V2 block's image digest no longer matches.

    *offset* is a file offset inside some segment's data (never the image header, a
    segment header, the checksum block or the signature); default
    :func:`default_flip_offset`. With *signer*, a signed input is signed again after
    the flip, so the signature verifies and only the image's own checksum and hash
    catch the damage — IDT ``OtaTestCorruptImageBeforeSigning``. An unsigned input
    stays unsigned either way.
    """
    buf = bytes(data)
    parts = ImageParts.parse(buf)
    at = default_flip_offset(buf) if offset is None else offset
    if not 0 <= bit <= 7:
        raise ValueError(f"bit_flipped: bit must be 0..7, got {bit}")
    ranges = _segment_data_ranges(parts.image)
    if not any(start <= at < end for _, start, end in ranges):
        spans = ", ".join(f"segment {i}: 0x{s:x}..0x{e:x}" for i, s, e in ranges)
        raise ValueError(f"bit_flipped: offset 0x{at:x} is not inside segment data ({spans})")
    content = bytearray(parts.content)
    content[at] ^= 1 << bit
    if parts.signature_sector is None:
        return bytes(content)
    if signer is None:
        return bytes(content) + parts.signature_sector
    return _sign(bytes(content), signer, "bit_flipped")


# --------------------------------------------------------------------------- signature variants


def unsigned(data: bytes | bytearray | memoryview) -> bytes:
    """The signed input without its signature sector: the 0xFF-padded content, a
    4096-byte multiple — a correctly built image that was never signed (IDT
    ``OtaTestUnsignedImage``). A bootloader or OTA client with signature checking
    finds no signature block. An unsigned input is :class:`VariantNotApplicable`."""
    parts = ImageParts.parse(data)
    parts.require_signed("unsigned")
    return parts.content


def untrusted_signature(data: bytes | bytearray | memoryview, signer: SignerLike) -> bytes:
    """The content signed by another key: the signature sector replaced by one *signer*
    makes (IDT ``OtaTestUntrustedCertificate``). The image and its block are well formed
    and the RSA-PSS signature is valid; only the key's digest is not among the eFuse
    ``SECURE_BOOT_DIGESTn``. An unsigned input is signed by *signer*.

    Refuses a *signer* whose key already signed the input: that variant would be
    trusted wherever the input is.
    """
    parts = ImageParts.parse(data)
    signed = _sign(parts.content, signer, "untrusted_signature")
    if parts.signature_sector is not None:
        old = {b.key_digest() for b in parse_signature_sector(parts.signature_sector) if b is not None}
        new = {b.key_digest() for b in parse_signature_sector(signed[-SECTOR_SIZE:]) if b is not None}
        if old & new:
            raise ValueError(
                "untrusted_signature: the signer's key already signed the input, so the variant would be trusted "
                "wherever the input is; use a key that the device does not trust"
            )
    return signed


def corrupt_signature(data: bytes | bytearray | memoryview, bit: int = 0) -> bytes:
    """Every valid signature block's RSA-PSS signature with one bit flipped and the
    block's CRC32 fixed (IDT ``OtaTestCorruptSignature``): block, key and image digest
    all check out, only the RSA verification fails — not the cheaper "corrupt block"
    the bootloader skips on its CRC. An unsigned input, or one with no valid block, is
    :class:`VariantNotApplicable`."""
    parts = ImageParts.parse(data)
    sector = bytearray(parts.require_signed("corrupt_signature"))
    if not 0 <= bit <= 7:
        raise ValueError(f"corrupt_signature: bit must be 0..7, got {bit}")
    blocks = parse_signature_sector(bytes(sector))
    if not any(blocks):
        raise VariantNotApplicable(
            _INPUT,
            "corrupt_signature: the signature sector has no valid block (0xE7 magic and matching CRC) to corrupt",
            len(parts.content),
        )
    for index, block in enumerate(blocks):
        if block is None:
            continue
        signature = bytearray(block.signature)
        signature[len(signature) // 2] ^= 1 << bit
        bad = replace(block, signature=bytes(signature)).with_crc_fixed()
        sector[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE] = bad.to_bytes()
    return parts.content + bytes(sector)


# --------------------------------------------------------------------------- header and descriptor variants


def wrong_chip_id(
    data: bytes | bytearray | memoryview,
    chip_id: int = ESP32S3_CHIP_ID,
    *,
    signer: SignerLike | None = None,
) -> bytes:
    """The image header's ``chip_id`` set to another chip's (default ESP32-S3, 9); SHA-256
    recomputed (the checksum covers segment data only, so it stays valid), re-signed
    with *signer* when the input was signed — so the chip id is the only thing wrong.

    ESP-IDF refuses it in ``bootloader_common_check_chip_validity`` ("mismatch chip ID,
    expected 5, found 9") and in ``esp_https_ota`` before writing it (advanced_https_ota
    ``invalid_chip_id``); ``esptool image-info`` reports it as an image for the other chip.
    """
    parts = ImageParts.parse(data)
    parts.require_intact("wrong_chip_id")
    if not 0 <= chip_id <= 0xFFFF:
        raise ValueError(f"wrong_chip_id: chip_id is a uint16_t, got {chip_id}")
    if chip_id == parts.image.header.chip_id:
        raise ValueError(f"wrong_chip_id: the input already has chip id {chip_id}; pick another chip's id")
    image = replace(parts.image, header=replace(parts.image.header, chip_id=chip_id))
    return parts.finish(_rebuilt(image), signer, "wrong_chip_id")


_DESC_FIELDS = frozenset(f.name for f in fields(AppDescriptor)) & frozenset(f.name for f in APP_DESC_LAYOUT.fields)


def with_app_descriptor(
    data: bytes | bytearray | memoryview,
    changes: Mapping[str, object],
    *,
    signer: SignerLike | None = None,
    what: str = "with_app_descriptor",
) -> bytes:
    """The input with fields of its ``esp_app_desc_t`` (file offset 0x20) changed.

    Only the bytes of the named fields change (the rest of the descriptor is copied as
    read, even bytes after a string's NUL); the checksum and SHA-256 are recomputed and
    a signed input is re-signed with *signer*. *changes* uses :class:`AppDescriptor`'s
    field names (``secure_version``, ``version``, ``project_name``, ``app_elf_sha256``,
    ``time``, ``date``, ``idf_ver`` …) and is validated as :class:`AppDescriptor` does.
    """
    unknown = set(changes) - _DESC_FIELDS
    if unknown:
        raise ValueError(f"{what}: unknown app descriptor field(s) {', '.join(sorted(unknown))}; "
                         f"known: {', '.join(sorted(_DESC_FIELDS))}")
    if not changes:
        raise ValueError(f"{what}: no field to change")
    parts = ImageParts.parse(data)
    parts.require_intact(what)
    old = parts.image.app_desc
    new = replace(old, **changes)  # type: ignore[arg-type]  # AppDescriptor validates the values
    same = [name for name in changes if getattr(old, name) == getattr(new, name)]
    if same:
        raise ValueError(f"{what}: {', '.join(same)} already {', '.join(repr(getattr(old, n)) for n in same)}; "
                         "the variant would not differ there")
    first = parts.image.segments[0]
    raw = bytearray(first.data[: APP_DESC_LAYOUT.size])
    packed = new.to_bytes()
    for name in changes:
        at, size = APP_DESC_LAYOUT.offset_of(name), APP_DESC_LAYOUT.field(name).size
        raw[at : at + size] = packed[at : at + size]
    segment = replace(first, data=bytes(raw) + first.data[APP_DESC_LAYOUT.size :])
    image = replace(parts.image, segments=(segment, *parts.image.segments[1:]))
    return parts.finish(_rebuilt(image), signer, what)


def secure_version(
    data: bytes | bytearray | memoryview, value: int, *, signer: SignerLike | None = None
) -> bytes:
    """The app descriptor's ``secure_version`` set to *value*, lower or higher.

    Lower: the anti-rollback negative case — the bootloader will not boot it once the
    eFuse ``SECURE_VERSION`` is higher, and ``esp_https_ota`` refuses it ("New firmware
    security version is less than eFuse programmed", advanced_https_ota
    ``anti_rollback``). Higher: the firmware set's ``next_secure`` role. On ESP32-C3
    the eFuse field holds 16 (thermometer-coded) versions; a higher value can never be
    burned, so such an image never becomes anti-rollback-protected.
    """
    return with_app_descriptor(data, {"secure_version": value}, signer=signer, what="secure_version")


def version(data: bytes | bytearray | memoryview, value: str, *, signer: SignerLike | None = None) -> bytes:
    """The app descriptor's ``version`` (``PROJECT_VER``, at most 31 bytes) set to *value*.

    With a new version this is an otherwise identical app the device should accept
    (IDT ``OtaTestGreaterVersion``, the ``next`` role); with the version the device
    runs, an image it must refuse (IDT ``OtaTestSameVersion``; esp-rainmaker
    "Current running version is same as the new", unless
    ``CONFIG_ESP_RMAKER_SKIP_VERSION_CHECK``).
    """
    return with_app_descriptor(data, {"version": value}, signer=signer, what="version")


def project_name(data: bytes | bytearray | memoryview, value: str, *, signer: SignerLike | None = None) -> bytes:
    """The app descriptor's ``project_name`` set to *value* (at most 31 bytes): an image
    built for another product. esp-rainmaker's ``validate_image_header`` refuses it
    ("OTA Image built for Project: …", status "Project Name mismatch") unless
    ``CONFIG_ESP_RMAKER_SKIP_PROJECT_NAME_CHECK``."""
    return with_app_descriptor(data, {"project_name": value}, signer=signer, what="project_name")


def same_version(data: bytes | bytearray | memoryview, *, signer: SignerLike | None = None) -> bytes:
    """Another build carrying the same version string: ``app_elf_sha256`` changed (a
    different ELF), ``version`` untouched — IDT ``OtaTestSameVersion`` (rebuild, same
    version), refused by esp-rainmaker with "Same version received". Served to a
    device running the input, it tests the version check and not a byte-for-byte
    duplicate check."""
    parts = ImageParts.parse(data)
    elf = parts.image.app_desc.app_elf_sha256
    other = hashlib.sha256(b"rig.firmware.variants.same_version:" + elf).digest()
    return with_app_descriptor(data, {"app_elf_sha256": other}, signer=signer, what="same_version")


def next_version(current: str) -> str:
    """A version string that differs from *current* and sorts after it where that is
    obvious: the last run of digits incremented (``1.4.2`` → ``1.4.3``, ``v2-rc9`` →
    ``v2-rc10``), else ``.1`` appended. At most 31 bytes (``esp_app_desc_t.version``)."""
    match = re.search(r"(\d+)(?!.*\d)", current)
    if match:
        bumped = f"{current[: match.start()]}{int(match.group(1)) + 1}{current[match.end():]}"
    else:
        bumped = f"{current}.1"
    limit = APP_DESC_LAYOUT.field("version").size - 1
    if len(bumped.encode()) > limit:
        raise ValueError(f"next_version: {bumped!r} would not fit the {limit}-byte version field; pass a version")
    return bumped


def _other_project(current: str) -> str:
    limit = APP_DESC_LAYOUT.field("project_name").size - 1
    suffix = "_other"
    return current.encode()[: limit - len(suffix)].decode(errors="ignore") + suffix


# --------------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class VariantSigners:
    """The keys a catalogue entry may need: *trusted* re-signs content-changing variants
    of a signed input (the key the device trusts); *untrusted* signs
    ``untrusted_signature``. Key file paths or :class:`Signer` s."""

    trusted: SignerLike | None = None
    untrusted: SignerLike | None = None


def _need_untrusted(signers: VariantSigners) -> SignerLike:
    if signers.untrusted is None:
        raise ValueError("untrusted_signature needs VariantSigners(untrusted=...): a key the device does not trust")
    return signers.untrusted


def _lower_secure_version(data: bytes, signers: VariantSigners) -> bytes:
    current = ImageParts.parse(data).image.app_desc.secure_version
    if current == 0:
        raise VariantNotApplicable(
            _INPUT,
            "secure_version_lower: the input's secure_version is 0, there is no lower one",
            APP_DESC_OFFSET + APP_DESC_LAYOUT.offset_of("secure_version"),
            "derive it from an image with secure_version >= 1 (the firmware set's next_secure role)",
        )
    return secure_version(data, current - 1, signer=signers.trusted)


def _higher_secure_version(data: bytes, signers: VariantSigners) -> bytes:
    current = ImageParts.parse(data).image.app_desc.secure_version
    return secure_version(data, current + 1, signer=signers.trusted)


@dataclass(frozen=True)
class Variant:
    """One catalogue entry: ``make(image, signers)`` returns the variant's bytes.

    ``needs_signed_input``: the entry raises :class:`VariantNotApplicable` for an
    unsigned input. ``negative``: a device must refuse the result (``False`` for the
    positive controls ``secure_version_higher`` and ``version``).
    """

    name: str
    description: str
    make: Callable[[bytes, VariantSigners], bytes]
    needs_signed_input: bool = False
    negative: bool = True

    def __call__(self, data: bytes | bytearray | memoryview, signers: VariantSigners | None = None) -> bytes:
        return self.make(bytes(data), signers or VariantSigners())

    def __str__(self) -> str:  # pytest ids
        return self.name


CATALOGUE: tuple[Variant, ...] = (
    Variant(
        "truncated",
        "cut in the middle of the last segment (advanced_https_ota truncated_bin)",
        lambda data, _s: truncated(data),
    ),
    Variant(
        "truncated_header",
        "cut inside esp_app_desc_t, 160 bytes (advanced_https_ota truncated_header)",
        lambda data, _s: truncated(data, TRUNCATED_HEADER_LENGTH),
    ),
    Variant(
        "bit_flipped",
        "one bit of segment data flipped after signing (IDT OtaTestCorruptImageAfterSigning)",
        lambda data, _s: bit_flipped(data),
    ),
    Variant(
        "corrupted_before_signing",
        "one bit of segment data flipped, then signed by the trusted key (IDT OtaTestCorruptImageBeforeSigning)",
        lambda data, s: bit_flipped(data, signer=s.trusted),
    ),
    Variant(
        "unsigned",
        "signature sector removed (IDT OtaTestUnsignedImage)",
        lambda data, _s: unsigned(data),
        needs_signed_input=True,
    ),
    Variant(
        "untrusted_signature",
        "signed by a key the device does not trust (IDT OtaTestUntrustedCertificate)",
        lambda data, s: untrusted_signature(data, _need_untrusted(s)),
    ),
    Variant(
        "corrupt_signature",
        "RSA-PSS signature bit flipped, block CRC fixed (IDT OtaTestCorruptSignature)",
        lambda data, _s: corrupt_signature(data),
        needs_signed_input=True,
    ),
    Variant(
        "wrong_chip_id",
        "header chip id of ESP32-S3 (advanced_https_ota invalid_chip_id)",
        lambda data, s: wrong_chip_id(data, signer=s.trusted),
    ),
    Variant(
        "secure_version_lower",
        "app descriptor secure_version one lower (advanced_https_ota anti_rollback)",
        _lower_secure_version,
    ),
    Variant(
        "secure_version_higher",
        "app descriptor secure_version one higher (the next_secure role; positive control)",
        _higher_secure_version,
        negative=False,
    ),
    Variant(
        "same_version",
        "another build with the same version string (IDT OtaTestSameVersion)",
        lambda data, s: same_version(data, signer=s.trusted),
    ),
    Variant(
        "version",
        "the next version string (IDT OtaTestGreaterVersion, the next role; positive control)",
        lambda data, s: version(data, next_version(ImageParts.parse(data).image.app_desc.version), signer=s.trusted),
        negative=False,
    ),
    Variant(
        "project_name",
        "built for another project (esp-rainmaker 'Project Name mismatch')",
        lambda data, s: project_name(data, _other_project(ImageParts.parse(data).image.app_desc.project_name),
                                     signer=s.trusted),
    ),
)
"""Every variant, for ``@pytest.mark.parametrize("variant", CATALOGUE, ids=str)``."""

_BY_NAME = {v.name: v for v in CATALOGUE}
assert len(_BY_NAME) == len(CATALOGUE), "catalogue names must be unique"


def variant(name: str) -> Variant:
    """The catalogue entry called *name*."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise KeyError(f"no image variant {name!r}; known: {', '.join(_BY_NAME)}") from None

"""ESP-IDF NVS encryption: the XTS-AES keys, the ``nvs_keys`` partition, and the per-entry cipher.

Facts, and where they come from:

- NVS encryption is XTS-AES as in IEEE P1619 with a 512-bit key (AES-256-XTS): the
  64-byte ``nvs_sec_cfg_t`` is the XTS encryption key ``eky`` (32 bytes) followed by the
  XTS tweak key ``tky`` (32 bytes), handed as one key to ``xts_setkey_enc``/``_dec``
  (esp-idf ``components/nvs_flash/include/nvs_flash.h`` ``nvs_sec_cfg_t``;
  ``components/nvs_flash/src/nvs_encrypted_partition.cpp`` ``NVSEncryptedPartition::init``).
- Every 32-byte entry is its own XTS data unit; the data-unit number ("sector number")
  is the entry's address relative to the partition start, a ``uint32_t`` copied into a
  zeroed 16-byte buffer, i.e. a 16-byte little-endian number
  (``NVSEncryptedPartition::write``/``read``; ``docs/en/api-reference/storage/nvs_encryption.rst``
  "Overview"). Page headers and entry-state bitmaps are written and read raw
  (``nvs_page.cpp``: ``write_raw``/``read_raw``), so they are never encrypted.
- Flash-encryption scheme: the keys live in an ``nvs_keys`` partition (itself protected
  by flash encryption): ``eky`` ‖ ``tky`` ‖ CRC32 LE, ``esp_rom_crc32_le(0xFFFFFFFF, …)``
  over the 64 key bytes, the rest erased; all-0xFF means "not initialized", a bad CRC is
  ``ESP_ERR_NVS_CORRUPT_KEY_PART`` (esp-idf ``components/nvs_flash/src/nvs_api.cpp``
  ``nvs_flash_read_security_cfg``; esp-idf-nvs-partition-gen ``generate_key``, which
  writes a 4096-byte file of that form).
- HMAC scheme: no key partition; ``eky`` = HMAC-SHA256(eFuse HMAC key, 32-byte seed),
  ``tky`` likewise with a second seed (:data:`HMAC_EKEY_SEED`, :data:`HMAC_TKEY_SEED`).

The images here are plaintext views: :meth:`NvsXtsKeys.keys_partition` is what
``esp_partition_read`` returns for ``nvs_keys`` (on a device the flash holds it
flash-encrypted as well). Key bytes are secrets: :class:`NvsXtsKeys` never prints them.
"""

from __future__ import annotations

import hashlib
import hmac
import zlib
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from rig.firmware.errors import FirmwareFormatError
from rig.firmware.layout import Field, Layout

__all__ = [
    "HMAC_EKEY_SEED",
    "HMAC_TKEY_SEED",
    "NVS_ENCRYPT_BLOCK_SIZE",
    "NVS_KEYS_LAYOUT",
    "NVS_KEYS_PARTITION_SIZE",
    "NVS_KEY_SIZE",
    "NvsXtsKeys",
]

NVS_KEY_SIZE = 32
"""``NVS_KEY_SIZE`` (``nvs_flash.h``): each of ``eky`` and ``tky``."""
NVS_ENCRYPT_BLOCK_SIZE = 32
"""One XTS data unit: one NVS entry (``NVS_ENCRYPT_BLOCK_SIZE``, ``nvs_encrypted_partition.cpp``)."""
NVS_KEYS_PARTITION_SIZE = 0x1000
"""The ``nvs_keys`` partition's size in ESP-IDF's partition tables, and of the generator's key file."""

HMAC_EKEY_SEED = bytes.fromhex("5a5abeae") * 8
"""The message HMAC'd into ``eky`` under the HMAC scheme: the 32-bit word 0xAEBE5A5A eight
times, little-endian (esp-idf ``components/nvs_sec_provider/nvs_sec_provider.c``
``compute_nvs_keys_with_hmac``: ``ekey_seed[8]``; esp-idf-nvs-partition-gen
``generate_key``: ``HMAC_EKEY_SEED_ELEMENT = b'\\x5A\\x5A\\xBE\\xAE'`` × 8)."""
HMAC_TKEY_SEED = bytes.fromhex("a5a5dece") * 8
"""The message HMAC'd into ``tky``: 0xCEDEA5A5 eight times, little-endian (same sources,
``tkey_seed[8]`` / ``HMAC_TKEY_SEED_ELEMENT = b'\\xA5\\xA5\\xDE\\xCE'``)."""

NVS_KEYS_LAYOUT = Layout(
    "nvs_keys partition",
    [
        Field("eky", f"{NVS_KEY_SIZE}s", "XTS encryption key (data key)"),
        Field("tky", f"{NVS_KEY_SIZE}s", "XTS tweak key"),
        Field("crc32", "I", "esp_rom_crc32_le(0xFFFFFFFF) over eky ‖ tky"),
    ],
    source="esp-idf components/nvs_flash/src/nvs_api.cpp (nvs_flash_read_security_cfg)",
)
_ERASED_KEYS = b"\xff" * NVS_KEYS_LAYOUT.size
_MAX_REL_ADDR = 1 << 32  # the data unit is a uint32_t relAddr (nvs_encrypted_partition.cpp)


@dataclass(frozen=True, repr=False)
class NvsXtsKeys:
    """The two XTS-AES-256 keys of an encrypted NVS partition (``nvs_sec_cfg_t``).

    XTS needs two different keys (IEEE P1619; OpenSSL refuses equal halves), so equal
    halves are refused here rather than deep inside the cipher. ``repr`` shows a short
    SHA-256 fingerprint, never the key bytes: evidence may name which keys were used but
    must not carry them.
    """

    eky: bytes
    tky: bytes

    def __post_init__(self) -> None:
        for name, key in (("eky", self.eky), ("tky", self.tky)):
            if not isinstance(key, bytes):  # immutable, so a frozen instance stays what was checked
                raise TypeError(f"NVS XTS key {name} must be bytes, got {type(key).__name__}")
            if len(key) != NVS_KEY_SIZE:
                raise ValueError(f"NVS XTS key {name} must be {NVS_KEY_SIZE} bytes, got {len(key)}")
        if self.eky == self.tky:
            raise ValueError("NVS XTS keys eky and tky are equal; XTS-AES needs two different keys")

    def __repr__(self) -> str:
        return f"NvsXtsKeys(<{2 * NVS_KEY_SIZE}-byte XTS key redacted, sha256 {self.fingerprint}>)"

    @property
    def fingerprint(self) -> str:
        """The first 8 hex digits of SHA-256(eky ‖ tky): tells key sets apart without revealing them."""
        return hashlib.sha256(self.eky + self.tky).hexdigest()[:8]

    @property
    def xts_key(self) -> bytes:
        """``eky`` ‖ ``tky``: the 64-byte key as ``nvs_sec_cfg_t`` lays it out and XTS takes it."""
        return self.eky + self.tky

    @classmethod
    def from_hmac_key(cls, hmac_key: bytes) -> NvsXtsKeys:
        """The keys the HMAC scheme derives from the eFuse HMAC key (``CONFIG_NVS_SEC_KEY_PROTECT_USING_HMAC``).

        The device computes them with its HMAC peripheral at every boot and never stores
        them; a tester holding the eFuse key (a virtual board's, or a dev board's burned
        key file) derives the same keys here. See :data:`HMAC_EKEY_SEED`.
        """
        if not hmac_key:
            raise ValueError("the HMAC key is empty; the eFuse HMAC key block holds 32 bytes")
        eky = hmac.new(hmac_key, HMAC_EKEY_SEED, hashlib.sha256).digest()
        tky = hmac.new(hmac_key, HMAC_TKEY_SEED, hashlib.sha256).digest()
        return cls(eky, tky)

    @classmethod
    def from_keys_partition(cls, data: bytes, what: str = "nvs_keys partition") -> NvsXtsKeys:
        """The keys in a (decrypted) ``nvs_keys`` partition, checked as ``nvs_flash_read_security_cfg`` does.

        Only the first 68 bytes count, as on the device. An erased partition (keys never
        generated) and a CRC mismatch (``ESP_ERR_NVS_CORRUPT_KEY_PART``) are
        :class:`FirmwareFormatError` s.
        """
        fields = NVS_KEYS_LAYOUT.unpack(data, 0, what)
        if bytes(data[: NVS_KEYS_LAYOUT.size]) == _ERASED_KEYS:
            raise FirmwareFormatError(
                what,
                "is erased: no keys were ever generated (ESP_ERR_NVS_KEYS_NOT_INITIALIZED)",
                0,
                "the firmware generates them at first boot (nvs_flash_generate_keys); read the partition after that, "
                "or write one made by NvsXtsKeys.keys_partition() / esp-idf-nvs-partition-gen generate-key",
            )
        computed = zlib.crc32(fields["eky"] + fields["tky"], 0xFFFFFFFF)
        if computed != fields["crc32"]:
            raise FirmwareFormatError(
                what,
                f"CRC32 of eky ‖ tky mismatch (stored 0x{fields['crc32']:08x}, computed 0x{computed:08x}; "
                "the device would fail with ESP_ERR_NVS_CORRUPT_KEY_PART)",
                NVS_KEYS_LAYOUT.offset_of("crc32"),
                "pass the plaintext partition (a flash dump of it is still flash-encrypted: decrypt it first, "
                "e.g. espsecure decrypt-flash-data), or it is corrupt or tampered",
            )
        if fields["eky"] == fields["tky"]:
            raise FirmwareFormatError(
                what, "eky and tky are equal; XTS-AES needs two different keys", 0, "regenerate the keys (generate-key)"
            )
        return cls(fields["eky"], fields["tky"])

    def keys_partition(self) -> bytes:
        """The 4096-byte plaintext ``nvs_keys`` image: ``eky`` ‖ ``tky`` ‖ CRC32, the rest 0xFF.

        Byte-identical to esp-idf-nvs-partition-gen ``generate-key``'s key file for the same keys.
        """
        crc = zlib.crc32(self.xts_key, 0xFFFFFFFF)
        head = NVS_KEYS_LAYOUT.pack({"eky": self.eky, "tky": self.tky, "crc32": crc})
        return head.ljust(NVS_KEYS_PARTITION_SIZE, b"\xff")

    def encrypt(self, rel_addr: int, data: bytes) -> bytes:
        """Encrypt whole entries as ``NVSEncryptedPartition::write`` does.

        *rel_addr* is where *data* goes, relative to the partition start (a multiple of
        32); each 32-byte entry ``i`` is one data unit numbered ``rel_addr + 32 * i``.
        Plaintext for a short string/blob tail must already be padded (the generator and
        the reader use 0xFF): XTS here never pads.
        """
        return self._crypt(rel_addr, data, encrypt=True)

    def decrypt(self, rel_addr: int, data: bytes) -> bytes:
        """Decrypt whole entries read from *rel_addr* (the inverse of :meth:`encrypt`)."""
        return self._crypt(rel_addr, data, encrypt=False)

    def _crypt(self, rel_addr: int, data: bytes, *, encrypt: bool) -> bytes:
        if len(data) % NVS_ENCRYPT_BLOCK_SIZE:
            raise ValueError(f"NVS XTS works on whole {NVS_ENCRYPT_BLOCK_SIZE}-byte entries; got {len(data)} bytes")
        if rel_addr < 0 or rel_addr % NVS_ENCRYPT_BLOCK_SIZE:
            raise ValueError(f"entry address 0x{rel_addr:x} is not a non-negative multiple of {NVS_ENCRYPT_BLOCK_SIZE}")
        if rel_addr + len(data) > _MAX_REL_ADDR:
            raise ValueError(f"entry address 0x{rel_addr + len(data):x} does not fit the 32-bit data-unit number")
        key = algorithms.AES(self.xts_key)
        out = bytearray()
        for at in range(0, len(data), NVS_ENCRYPT_BLOCK_SIZE):
            tweak = (rel_addr + at).to_bytes(16, "little")
            cipher = Cipher(key, modes.XTS(tweak))
            context = cipher.encryptor() if encrypt else cipher.decryptor()
            out += context.update(bytes(data[at : at + NVS_ENCRYPT_BLOCK_SIZE])) + context.finalize()
        return bytes(out)

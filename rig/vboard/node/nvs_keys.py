"""NVS encryption keys of the virtual firmware: ESP-IDF's HMAC-based scheme.

The clean image is built with ``CONFIG_NVS_ENCRYPTION`` and
``CONFIG_NVS_SEC_KEY_PROTECT_USING_HMAC`` (esp-idf ``components/nvs_sec_provider``,
docs ``api-reference/storage/nvs_encryption.rst``): the XTS keys are never stored; each boot
derives them with the HMAC peripheral from an eFuse key of purpose ``HMAC_UP`` —
``eky = HMAC(key, 5A5ABEAE × 8)``, ``tky = HMAC(key, A5A5DECE × 8)``
(:data:`rig.firmware.nvs_encryption.HMAC_EKEY_SEED`). On the first boot no such key
exists: the firmware generates 32 random bytes and burns them with ``esp_efuse_write_key``,
which read-protects the block, so from then on the key is usable by the peripheral and
readable by nobody — espefuse included. A lab can therefore check the scheme from outside
(``espefuse summary``: a key block with purpose HMAC_UP, not readable) but never decrypt
the partition, exactly as on a production board.

Where ESP-IDF takes the block from ``CONFIG_NVS_SEC_HMAC_EFUSE_KEY_ID``, the virtual
firmware takes the first unused key block (the same choice a build would make for a chip
whose Secure Boot digests sit in the first blocks).

An image with the ``plaintext_nvs`` flaw is built without NVS encryption (:func:`nvs_keys_for`
returns None) and writes every entry in clear.
"""

from __future__ import annotations

import os
from typing import Protocol

from rig.firmware.nvs_encryption import HMAC_EKEY_SEED, HMAC_TKEY_SEED, NVS_KEY_SIZE, NvsXtsKeys
from rig.vboard.efuse import EfuseError

__all__ = ["HMAC_UP", "HmacKeyFuses", "NvsKeyError", "derived_nvs_keys", "nvs_keys_for"]

HMAC_UP = "HMAC_UP"
"""``ESP_EFUSE_KEY_PURPOSE_HMAC_UP``: the HMAC peripheral may use the key for upstream
(software-readable) results, as NVS key derivation needs."""


class HmacKeyFuses(Protocol):
    """What the scheme needs of the chip (``rig.vboard.efuse.EfuseController`` provides it):
    ESP-IDF's ``esp_efuse_find_purpose``, ``esp_efuse_find_unused_key_block``,
    ``esp_efuse_write_key`` and the HMAC peripheral's ``esp_hmac_calculate``."""

    def find_purpose(self, purpose: str) -> int | None: ...

    def find_unused_key_block(self) -> int | None: ...

    def write_key(self, key_id: int, purpose: str, key: bytes) -> None: ...

    def hmac_calculate(self, key_id: int, message: bytes) -> bytes: ...


class NvsKeyError(RuntimeError):
    """The firmware cannot get NVS keys (no key block left for the HMAC key); on a real
    board ``nvs_flash_init`` fails and ``app_main`` aborts."""


def nvs_keys_for(efuse: HmacKeyFuses, flaws: frozenset[str]) -> NvsXtsKeys | None:
    """The XTS keys this image encrypts NVS with, or None for an image without NVS
    encryption; burns the HMAC key on the chip's first boot (module doc)."""
    if "plaintext_nvs" in flaws:
        return None
    block = efuse.find_purpose(HMAC_UP)
    if block is None:
        block = efuse.find_unused_key_block()
        if block is None:
            raise NvsKeyError("no unused eFuse key block for the NVS HMAC key (all six are taken)")
        try:
            efuse.write_key(block, HMAC_UP, os.urandom(NVS_KEY_SIZE))
        except EfuseError as exc:
            raise NvsKeyError(f"could not burn the NVS HMAC key into BLOCK_KEY{block}: {exc}") from exc
    return derived_nvs_keys(efuse)


def derived_nvs_keys(efuse: HmacKeyFuses) -> NvsXtsKeys | None:
    """The keys the chip's HMAC key derives (``compute_nvs_keys_with_hmac``), or None while it
    has none; burns nothing. What the firmware computes at each boot — and what a rig test may
    compute from a virtual chip's files to look inside its encrypted NVS."""
    block = efuse.find_purpose(HMAC_UP)
    if block is None:
        return None
    return NvsXtsKeys(efuse.hmac_calculate(block, HMAC_EKEY_SEED), efuse.hmac_calculate(block, HMAC_TKEY_SEED))

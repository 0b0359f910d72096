"""The cloud's Secure Boot V2 signer: RSA-3072 keys inside one SoftHSM2 token per lab,
images signed through ``espsecure sign-data --version 2 --hsm``, and RainMaker's
"auto select key".

DESIGN.md "Cloud" → Signer: "Secure Boot V2 keys live in SoftHSM2 and sign through
PKCS#11 (``espsecure sign-data --hsm``); "auto select key" picks the key whose digest
the node reports. A private key never leaves the HSM."

* One token (label :data:`DEFAULT_TOKEN_LABEL`) in ``<state_dir>/tokens``, one
  RSA-3072 keypair per key label, generated inside the token as sensitive and
  non-extractable (:class:`rig.firmware.softhsm.SoftHsmToken`, one instance per key
  label sharing the token directory — ``SoftHsmToken`` holds one key label per
  instance, and its ``setup`` only initialises the token when none with the label
  exists, so the instances share one token).
* :meth:`CloudSigner.sign` runs ``espsecure sign-data --version 2 --hsm --hsm-config``
  (:class:`rig.firmware.secure_boot_v2.HsmSigner`) and checks the result with
  :func:`rig.firmware.secure_boot_v2.verify_signed_image` before returning it.
* :meth:`CloudSigner.select_key` implements "auto select key" from the node config's
  ``info.secure_boot_digest`` (``{"k0": "<hex>"|null, "k1": …, "k2": …}``; lower-case
  hex of each eFuse key digest, ``null`` for an empty or revoked slot — esp-rainmaker
  ``src/core/esp_rmaker_secure_boot_digest.c``, ``esp_secure_boot_read_key_digests``;
  shared/reference/rainmaker-protocol.md §1.3 and §5.3).

The PINs are handed to ``SoftHsmToken`` / ``HsmSigner``, which keep them out of argv,
logs and exception text; nothing here prints or formats them.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from rig.firmware.secure_boot_v2 import SigningError, public_key_digest, verify_signed_image
from rig.firmware.softhsm import SoftHsmToken
from rig.firmware.virtual_set import SetSigner

__all__ = ["DEFAULT_TOKEN_LABEL", "DIGEST_SLOTS", "CloudSigner", "NoMatchingKey", "SignedImage"]

log = logging.getLogger(__name__)

DEFAULT_TOKEN_LABEL = "rig-cloud-signer"
DIGEST_SLOTS = ("k0", "k1", "k2")
"""The keys of ``info.secure_boot_digest``: eFuse ``SECURE_BOOT_DIGEST0..2``."""

_HEX = re.compile(r"[0-9a-fA-F]+")
_KEY_LABEL = re.compile(r"[A-Za-z0-9._-]{1,64}")


class NoMatchingKey(LookupError):
    """No key in the HSM has a digest the node trusts, so any image the cloud signed
    would be refused by the node's bootloader. The message lists both sides."""

    def __init__(self, reported: Mapping[str, str | None], held: Mapping[str, bytes]):
        self.reported = dict(reported)
        self.held = {label: digest.hex() for label, digest in held.items()}
        node_side = ", ".join(f"{slot}={value if value is not None else 'null'}" for slot, value in self.reported.items())
        hsm_side = ", ".join(f"{label}={digest}" for label, digest in self.held.items())
        super().__init__(
            f"no HSM key matches the node's secure boot digests: the node reports {node_side}; "
            f"the HSM holds {hsm_side} — sign with the key whose digest is burned in the node's eFuse "
            "(add it to the HSM) or re-check which key the node was provisioned with"
        )


@dataclass(frozen=True)
class SignedImage:
    """An image signed in the HSM, with the key that signed it."""

    data: bytes
    key_label: str
    key_digest: bytes


def _normalise_reported(reported: Mapping[str, str | None] | None) -> dict[str, str | None]:
    """``info.secure_boot_digest`` with the hex lower-cased; rejects what RainMaker never sends."""
    if reported is None:
        return {}
    if not isinstance(reported, Mapping):
        raise ValueError(f"info.secure_boot_digest must be an object like {{'k0': '<hex>'|null, ...}}, got {reported!r}")
    out: dict[str, str | None] = {}
    for slot, value in reported.items():
        if slot not in DIGEST_SLOTS:
            raise ValueError(f"info.secure_boot_digest has key {slot!r}; RainMaker reports only {', '.join(DIGEST_SLOTS)}")
        if value is None:
            out[slot] = None
            continue
        if not isinstance(value, str) or not _HEX.fullmatch(value.strip()) or len(value.strip()) % 2:
            raise ValueError(f"info.secure_boot_digest.{slot} = {value!r} is not a hex digest or null")
        out[slot] = value.strip().lower()
    return out


class CloudSigner:
    """Secure Boot V2 signing keys in a SoftHSM2 token, for OTA jobs.

    *state_dir* holds the token (``tokens/``, ``softhsm2.conf``); *pin* and *so_pin*
    are the token's user and SO PINs (from the lab config or the environment, never
    logged). *key_labels* name the RSA-3072 keys; the first is the default key.

    Constructing does no I/O; :meth:`setup` creates (or reopens) the token and keys
    and is called by every method that needs them.
    """

    def __init__(
        self,
        state_dir: Path,
        pin: str,
        so_pin: str,
        key_labels: Sequence[str] = ("sbv2-key-0",),
        *,
        token_label: str = DEFAULT_TOKEN_LABEL,
        library: Path | str | None = None,
    ):
        labels = list(key_labels)
        if not labels:
            raise ValueError("CloudSigner needs at least one key label")
        if len(set(labels)) != len(labels):
            raise ValueError(f"key labels must be unique, got {labels}")
        for label in labels:
            if not _KEY_LABEL.fullmatch(label):
                raise ValueError(f"key label {label!r} must be 1 to 64 characters of A-Z a-z 0-9 . _ -")
        self.state_dir = Path(state_dir)
        self.key_labels: tuple[str, ...] = tuple(labels)
        self.token_label = token_label
        self._tokens = {
            label: SoftHsmToken(self.state_dir, token_label, user_pin=pin, so_pin=so_pin, key_label=label, library=library)
            for label in labels
        }
        self._public_pems: dict[str, bytes] = {}
        self._digests: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"CloudSigner(state_dir={str(self.state_dir)!r}, token={self.token_label!r}, keys={list(self.key_labels)})"

    @property
    def default_key(self) -> str:
        """The key used for nodes that run without Secure Boot (the first key label)."""
        return self.key_labels[0]

    @property
    def environment(self) -> dict[str, str]:
        """What a process needs in its environment to see the token (``SOFTHSM2_CONF``)."""
        return self._tokens[self.default_key].environment

    def setup(self) -> dict[str, bytes]:
        """Create (or reopen) the token and every key; return label → public key PEM.

        Idempotent and safe across processes (SoftHsmToken serialises on a lock file).
        """
        with self._lock:
            if len(self._public_pems) != len(self.key_labels):
                for label, token in self._tokens.items():
                    if label not in self._public_pems:
                        pem = token.setup()
                        self._public_pems[label] = pem
                        self._digests[label] = public_key_digest(pem)
                        log.info("HSM key %s on token %s: digest %s", label, self.token_label, self._digests[label].hex())
            return dict(self._public_pems)

    def public_key_pem(self, key_label: str) -> bytes:
        """The public half of *key_label* (SubjectPublicKeyInfo PEM), read from the token."""
        self._check_label(key_label)
        return self.setup()[key_label]

    def key_digests(self) -> dict[str, bytes]:
        """Label → the 32-byte eFuse ``SECURE_BOOT_DIGESTn`` value of that key."""
        self.setup()
        return dict(self._digests)

    def select_key(self, reported: Mapping[str, str | None] | None) -> str:
        """RainMaker's "auto select key": the label of the HSM key whose digest the node
        reports in its config's ``info.secure_boot_digest``.

        A node that reports no digests at all — the field absent (``None``), empty, or
        every slot ``null`` — runs without Secure Boot V2 (esp-rainmaker only adds the
        field with ``CONFIG_SECURE_BOOT_V2_ENABLED``), so it gets the default key
        (:attr:`default_key`). Otherwise the HSM key matching the lowest slot wins
        (``k0`` before ``k1`` before ``k2``); none matching raises
        :class:`NoMatchingKey` naming both sides.

        Note: the rig's bootloader model (:func:`verify_signed_image`) offers eFuse slot
        *i* only when signature block *i* is an RSA block, as recent ESP-IDF does, so a
        one-block image signed with a key that matches only ``k1``/``k2`` will still be
        refused by such a node; the match is reported, the consequence is the node's.
        """
        normalised = _normalise_reported(reported)
        if not any(v is not None for v in normalised.values()):
            return self.default_key
        by_digest = {digest.hex(): label for label, digest in self.key_digests().items()}
        for slot in DIGEST_SLOTS:
            value = normalised.get(slot)
            if value is not None and value in by_digest:
                return by_digest[value]
        raise NoMatchingKey(normalised, self._digests)

    def set_signer(self, key_label: str | None = None) -> SetSigner:
        """This HSM key as the signer of a virtual firmware set (``rig firmware build-virtual --hsm``);
        the private key stays in the token."""
        label = key_label or self.default_key
        return SetSigner(lambda data: self.sign(data, label), self.public_key_pem(label),
                         f"lab HSM key {label!r} (SoftHSM2 token {self.token_label!r} in {self.state_dir})")  # fmt: skip

    def sign(self, image: bytes, key_label: str) -> bytes:
        """Sign *image* (an unsigned app image) with *key_label* inside the HSM through
        ``espsecure sign-data --version 2 --hsm``; return the signed image (content padded
        to 4096 bytes + signature sector). The result is checked against the key's
        digest as the bootloader would check it; a mismatch raises :class:`SigningError`."""
        self._check_label(key_label)
        self.setup()
        signed = self._tokens[key_label].signer().sign(image)
        verdict = verify_signed_image(signed, [self._digests[key_label]])
        if not verdict.ok:
            raise SigningError(
                f"espsecure signed with HSM key {key_label!r} but the result does not verify: {verdict.detail}",
                "check that the token's private and public objects with this label belong together",
            )
        log.info("signed %d bytes with HSM key %s → %d bytes", len(image), key_label, len(signed))
        return signed

    def sign_for_node(self, image: bytes, reported: Mapping[str, str | None] | None) -> SignedImage:
        """:meth:`select_key` for the node's reported digests, then :meth:`sign`."""
        label = self.select_key(reported)
        return SignedImage(self.sign(image, label), label, self._digests[label])

    def _check_label(self, key_label: str) -> None:
        if key_label not in self._tokens:
            raise KeyError(f"no HSM key labelled {key_label!r}; this signer holds {', '.join(self.key_labels)}")

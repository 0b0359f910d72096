"""Secure Boot V2 signing keys for tests, and the helpers that go with them.

* :func:`generate_keys` makes RSA-3072 keys with ``espsecure generate-signing-key``
  (as a lab engineer would), in parallel — call it once per test module, from a
  module-scoped fixture: each key costs 1-3 s of CPU;
* :class:`KeyPair` holds a key's PEM files and its eFuse digest;
* :class:`InProcessSigner` is a test double for the :class:`rig.firmware.variants.Signer`
  protocol that signs in this process: the same block layout espsecure writes
  (``SignatureBlock.create``, checked byte for byte against espsecure in
  ``tests/test_secure_boot_v2.py``), for sweeps that would otherwise start espsecure
  dozens of times. Cross-checks against the real tools sign with espsecure;
* :func:`softhsm_token` sets up a SoftHSM2 token (PINs :data:`USER_PIN`,
  :data:`SO_PIN`) holding a signing key, or skips the test when SoftHSM2 is missing.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from rig.firmware.secure_boot_v2 import BLOCK_SIZE, SECTOR_SIZE, SignatureBlock, public_key_digest
from rig.firmware.softhsm import SoftHsmToken, SoftHsmUnavailable, find_softhsm_library, find_softhsm_util

ESPSECURE_TIMEOUT_S = 120
USER_PIN = "user-pin-4711"
SO_PIN = "so-pin-0815"
T = TypeVar("T")


def espsecure(*args: str | Path, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m espsecure ARGS`` with the interpreter running the tests; never raises on exit code."""
    return subprocess.run([sys.executable, "-m", "espsecure", *map(str, args)], capture_output=True, text=True,
                          timeout=ESPSECURE_TIMEOUT_S, check=False, env=dict(env) if env is not None else None)


def in_parallel(jobs: Mapping[str, Callable[[], T]], workers: int = 4) -> dict[str, T]:
    """Run *jobs* (mostly subprocesses) in a thread pool; name → result, re-raising the first failure."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {name: pool.submit(job) for name, job in jobs.items()}
        return {name: f.result() for name, f in futures.items()}


@dataclass(frozen=True)
class KeyPair:
    """One RSA-3072 key: its private PEM (what espsecure signs with) and public PEM
    (what ``espsecure verify-signature --keyfile`` takes)."""

    name: str
    private: Path
    public: Path

    @property
    def digest(self) -> bytes:
        """The eFuse ``SECURE_BOOT_DIGESTn`` value that makes a device trust this key."""
        return public_key_digest(self.public.read_bytes())


def generate_keys(directory: Path, names: Iterable[str]) -> dict[str, KeyPair]:
    """One key per name, made by ``espsecure generate-signing-key --version 2 --scheme rsa3072``."""

    def make(name: str) -> KeyPair:
        private = directory / f"{name}.pem"
        proc = espsecure("generate-signing-key", "--version", "2", "--scheme", "rsa3072", private)
        assert proc.returncode == 0, proc.stderr
        key = serialization.load_pem_private_key(private.read_bytes(), password=None)
        public = directory / f"{name}.pub.pem"
        public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                         serialization.PublicFormat.SubjectPublicKeyInfo))
        return KeyPair(name, private, public)

    return in_parallel({name: (lambda name=name: make(name)) for name in names})


class InProcessSigner:
    """Signs like ``espsecure sign-data --version 2`` (0xFF padding to 4096 bytes, one
    RSA-PSS block, the rest of the sector erased), without starting espsecure."""

    def __init__(self, key: KeyPair):
        loaded = serialization.load_pem_private_key(key.private.read_bytes(), password=None)
        assert isinstance(loaded, rsa.RSAPrivateKey)
        self.key = key
        self._private = loaded

    def __repr__(self) -> str:
        return f"InProcessSigner({self.key.name})"

    def sign(self, data: bytes) -> bytes:
        padded = data + b"\xff" * (-len(data) % SECTOR_SIZE)
        digest = hashlib.sha256(padded).digest()
        signature = self._private.sign(digest, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
                                       Prehashed(hashes.SHA256()))
        block = SignatureBlock.create(digest, self._private.public_key(), signature)
        return padded + block.to_bytes() + b"\xff" * (SECTOR_SIZE - BLOCK_SIZE)


def softhsm_token(directory: Path, label: str) -> tuple[SoftHsmToken, bytes]:
    """A SoftHSM2 token *label* in *directory*, set up with :data:`USER_PIN` / :data:`SO_PIN`,
    and its public key PEM; skips the calling test (or fixture) if SoftHSM2 is not installed."""
    try:
        find_softhsm_library()
        find_softhsm_util()
    except SoftHsmUnavailable as exc:
        pytest.skip(str(exc))
    token = SoftHsmToken(directory, label, user_pin=USER_PIN, so_pin=SO_PIN)
    return token, token.setup()

"""Keeping secrets out of evidence.

PoPs, Wi-Fi passphrases, tokens, HSM PINs and private keys must never reach a log,
an allure attachment or a report. Every secret the rig learns is registered with a
:class:`SecretRegistry`; :class:`RedactingFilter` rewrites log records through it, and
writers of evidence call :meth:`SecretRegistry.scrub` on text before it is saved.
PEM private-key blocks are removed whether registered or not, and so are the tokens of
OTA image URLs (``/ota/<token>/``: a pre-signed URL is a bearer credential for the image
until it expires; the devices print it on their console) down to a 6-character prefix.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

REDACTED = "***"
_PEM_PRIVATE_KEY = re.compile(
    r"-----BEGIN (?:[A-Z0-9 ]+ )?PRIVATE KEY-----.*?-----END (?:[A-Z0-9 ]+ )?PRIVATE KEY-----", re.DOTALL
)
_URL_TOKEN = re.compile(r"/ota/([A-Za-z0-9_-]{6})[A-Za-z0-9_-]{10,}/")
_MIN_SECRET_LEN = 4  # shorter values would redact ordinary words and numbers


class SecretRegistry:
    """The set of secret strings known to this process."""

    def __init__(self) -> None:
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add(self, secret: str | None) -> None:
        if secret and len(secret) >= _MIN_SECRET_LEN:
            with self._lock:
                self._secrets.add(secret)

    def scrub(self, text: str) -> str:
        text = redact_url_tokens(_PEM_PRIVATE_KEY.sub(f"-----{REDACTED} PRIVATE KEY-----", text))
        with self._lock:
            ordered = sorted(self._secrets, key=len, reverse=True)
        for s in ordered:
            text = text.replace(s, REDACTED)
        return text

    def __len__(self) -> int:
        return len(self._secrets)


SECRETS = SecretRegistry()


def redact_url_tokens(text: str) -> str:
    """*text* with every OTA URL token cut to its first 6 characters (``/ota/AbC12x…/``)."""
    return _URL_TOKEN.sub(lambda m: f"/ota/{m[1]}…/", text)


class RedactingFilter(logging.Filter):
    """A logging filter that renders each record and scrubs the result."""

    def __init__(self, registry: SecretRegistry = SECRETS):
        super().__init__()
        self.registry = registry

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        record.msg = self.registry.scrub(message)
        record.args = None
        return True


TEXT_SUFFIXES = frozenset({".xml", ".json", ".txt", ".log", ".html", ".csv", ".yaml", ".yml", ""})
"""What evidence writers produce as text: junit, allure results and attachments, logs."""


def scrub_tree(root: Path, registry: SecretRegistry = SECRETS) -> list[Path]:
    """Scrub every text file under *root* in place; returns the files that held a secret.

    The last line of defence for a run folder: pytest's JUnit writer and allure-pytest save
    captured console output (where a device prints its QR payload, or a flawed one its
    Wi-Fi passphrase) without going through :class:`RedactingFilter`. Binary files (pcaps,
    images) are left alone: a secret in a capture is a finding, not something to hide.
    """
    changed: list[Path] = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        clean = registry.scrub(text)
        if clean != text:
            path.write_text(clean, encoding="utf-8")
            changed.append(path)
    return changed

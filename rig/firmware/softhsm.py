"""A SoftHSM2 token holding a Secure Boot V2 signing key, in a state directory the rig owns.

The token lives in ``<state_dir>/tokens`` and is described by ``<state_dir>/softhsm2.conf``
(``directories.tokendir``), which reaches SoftHSM2 through ``SOFTHSM2_CONF`` in the
environment of every process that loads the library (``softhsm2-util``, the PKCS#11
worker, ``espsecure --hsm``). Nothing touches the system token directory
(``/var/lib/softhsm/tokens``).

:meth:`SoftHsmToken.setup` is idempotent: it initialises the token
(``softhsm2-util --init-token --free``) only if no token with the label exists, and
generates the RSA-3072 keypair (private key sensitive, never extractable) only if no
private key with the label exists. Signing goes through :class:`HsmSigner`, i.e.
``espsecure sign-data --hsm``; the private key never leaves the token.

Sources: SoftHSM2 ``softhsm2.conf(5)``, ``softhsm2-util(1)``; esptool
``espsecure/esp_hsm_sign/__init__.py`` (how espsecure finds the slot and keys).
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shutil
import subprocess
import termios
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rig.espressif_tools import redact
from rig.firmware.secure_boot_v2 import (
    RSA_BITS,
    HsmConfig,
    HsmError,
    HsmSigner,
    _pem_from_numbers,
    _pkcs11_request,
    public_key_digest,
)

__all__ = ["SoftHsmError", "SoftHsmToken", "SoftHsmUnavailable", "find_softhsm_library", "find_softhsm_util"]

INSTALL_FIX = "install SoftHSM2: `apt-get install softhsm2` (or `make install`, which does it)"

# Where distributions put the PKCS#11 module. Debian: /usr/lib/softhsm/libsofthsm2.so
# is a symlink to /usr/lib/<triplet>/softhsm/libsofthsm2.so.
LIBRARY_CANDIDATES = (
    Path("/usr/lib/softhsm/libsofthsm2.so"),
    Path("/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so"),
    Path("/usr/lib64/pkcs11/libsofthsm2.so"),
    Path("/usr/local/lib/softhsm/libsofthsm2.so"),
    Path("/opt/homebrew/lib/softhsm/libsofthsm2.so"),
)

_INIT_TIMEOUT_S = 60.0
_PROMPT = re.compile(rb"Please (?:re)?enter (SO|user) PIN:")


class SoftHsmUnavailable(RuntimeError):
    """SoftHSM2 (its PKCS#11 library or ``softhsm2-util``) is not installed."""


class SoftHsmError(RuntimeError):
    """Creating or opening the SoftHSM2 token failed; secrets redacted."""


def find_softhsm_library(explicit: Path | str | None = None) -> Path:
    """The SoftHSM2 PKCS#11 module: *explicit* if given, else the first installed candidate."""
    if explicit is not None:
        path = Path(explicit)
        if not path.is_file():
            raise SoftHsmUnavailable(f"SoftHSM2 PKCS#11 library {path} does not exist — {INSTALL_FIX}")
        return path
    for path in LIBRARY_CANDIDATES:
        if path.is_file():
            return path
    raise SoftHsmUnavailable(
        f"SoftHSM2 PKCS#11 library not found (looked in {', '.join(str(p) for p in LIBRARY_CANDIDATES)}) — "
        f"{INSTALL_FIX}"
    )


def find_softhsm_util() -> str:
    """Path of ``softhsm2-util``."""
    util = shutil.which("softhsm2-util")
    if util is None:
        raise SoftHsmUnavailable(f"softhsm2-util is not on PATH — {INSTALL_FIX}")
    return util


def _check_pin(pin: str, what: str) -> None:
    # softhsm2-util takes 4..255 characters; the PIN also goes into espsecure's INI.
    if not 4 <= len(pin) <= 255:
        raise ValueError(f"the {what} must be 4 to 255 characters (SoftHSM2), got {len(pin)}")
    if any(c in pin for c in "\r\n\0") or pin != pin.strip():
        raise ValueError(f"the {what} must not contain newlines or leading/trailing spaces")


class SoftHsmToken:
    """One SoftHSM2 token with one RSA-3072 Secure Boot V2 signing keypair.

    Constructing it does no I/O; :meth:`setup` creates or reopens the token and key.
    ``label`` is the token label (at most 32 characters), ``key_label`` the label of
    the keypair on it (espsecure's ``label`` / ``label_pubkey``).
    """

    def __init__(
        self,
        state_dir: Path | str,
        label: str,
        *,
        user_pin: str,
        so_pin: str,
        key_label: str = "secure-boot-v2",
        library: Path | str | None = None,
    ):
        if not 1 <= len(label.encode()) <= 32:
            raise ValueError(f"a PKCS#11 token label is 1 to 32 bytes, {label!r} is {len(label.encode())}")
        _check_pin(user_pin, "user PIN")
        _check_pin(so_pin, "SO PIN")
        self.state_dir = Path(state_dir).resolve()
        self.label = label
        self.key_label = key_label
        self._user_pin = user_pin
        self._so_pin = so_pin
        self._library = library
        self._slot: int | None = None

    def __repr__(self) -> str:
        return f"SoftHsmToken(state_dir={str(self.state_dir)!r}, label={self.label!r}, key_label={self.key_label!r})"

    @property
    def conf_path(self) -> Path:
        return self.state_dir / "softhsm2.conf"

    @property
    def token_dir(self) -> Path:
        return self.state_dir / "tokens"

    @property
    def environment(self) -> dict[str, str]:
        """What a process needs in its environment to see this token."""
        return {"SOFTHSM2_CONF": str(self.conf_path)}

    @property
    def library(self) -> Path:
        return find_softhsm_library(self._library)

    def hsm_config(self) -> HsmConfig:
        return HsmConfig(
            pkcs11_lib=self.library,
            key_label=self.key_label,
            pin=self._user_pin,
            slot=self._slot,
            token_label=self.label,
            environment=self.environment,
        )

    def signer(self) -> HsmSigner:
        """An :class:`HsmSigner` for this token's key (call :meth:`setup` first)."""
        return HsmSigner(self.hsm_config())

    def setup(self) -> bytes:
        """Create (or reopen) the token and its keypair; return the public key PEM.

        Safe to call again and from several processes at once (a lock file in the
        state directory serialises them).
        """
        library = self.library
        util = find_softhsm_util()
        self._write_conf()
        with self._locked():
            if not self._token_exists():
                self._init_token(util)
            reply = self._request("ensure_rsa_keypair", library, pin=self._user_pin, label=self.key_label,
                                  bits=RSA_BITS)
        if reply.get("sensitive") is not True or reply.get("extractable") is not False:
            raise SoftHsmError(
                f"key {self.key_label!r} on token {self.label!r} is not sensitive/non-extractable "
                f"(sensitive={reply.get('sensitive')}, extractable={reply.get('extractable')}) — "
                "it was not made by the rig; delete it or use another key label"
            )
        self._slot = int(reply["slot_id"])
        pem = _pem_from_numbers(reply)
        public_key_digest(pem)  # raises if the existing key is not RSA-3072
        return pem

    def public_key_pem(self) -> bytes:
        """The keypair's public key, read from the token."""
        return self.signer().public_key_pem()

    def key_digest(self) -> bytes:
        """The eFuse ``SECURE_BOOT_DIGESTn`` value for this token's key."""
        return public_key_digest(self.public_key_pem())

    def slot_id(self) -> int:
        if self._slot is None:
            self._slot = int(self._request("slot", self.library)["slot_id"])
        return self._slot

    # ------------------------------------------------------------------ internals

    def _request(self, op: str, library: Path, **fields: object) -> dict[str, object]:
        config = HsmConfig(pkcs11_lib=library, key_label=self.key_label, pin=self._user_pin,
                           token_label=self.label, environment=self.environment)
        try:
            return _pkcs11_request(config, op, **fields)
        except HsmError as exc:
            raise SoftHsmError(
                f"SoftHSM2 token {self.label!r} in {self.token_dir}: {exc.problem} — {exc.fix}"
            ) from None

    def _write_conf(self) -> None:
        self.token_dir.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state_dir, 0o700)
        os.chmod(self.token_dir, 0o700)
        text = (
            "# SoftHSM2 configuration written by rig.firmware.softhsm; see softhsm2.conf(5)\n"
            f"directories.tokendir = {self.token_dir}\n"
            "objectstore.backend = file\n"
            "log.level = ERROR\n"
            "slots.removable = false\n"
            "slots.mechanisms = ALL\n"
            "library.reset_on_fork = false\n"
        )
        if not self.conf_path.is_file() or self.conf_path.read_text() != text:
            tmp = self.conf_path.with_suffix(".tmp")
            tmp.write_text(text)
            tmp.replace(self.conf_path)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.state_dir / ".softhsm.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _token_exists(self) -> bool:
        try:
            self._request("slot", self.library)
        except SoftHsmError as exc:
            if "NoSuchToken" in str(exc):
                return False
            raise
        return True

    def _init_token(self, util: str) -> None:
        """``softhsm2-util --init-token --free --label L`` with both PINs typed at its
        prompts through a pseudo-terminal (softhsm2-util reads PINs from a terminal
        only; putting them in argv would show them to every user in ``ps``)."""
        secrets = [self._user_pin, self._so_pin]
        master, slave = pty.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[3] &= ~termios.ECHO  # lflag: never echo what we type
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        env = {**os.environ, **self.environment}
        try:
            proc = subprocess.Popen(
                [util, "--init-token", "--free", "--label", self.label],
                stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True, close_fds=True,
            )
        finally:
            os.close(slave)
        transcript = bytearray()
        answered = 0
        deadline = time.monotonic() + _INIT_TIMEOUT_S
        try:
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    proc.kill()
                    raise SoftHsmError(
                        f"softhsm2-util --init-token did not finish within {_INIT_TIMEOUT_S:.0f} s; it printed: "
                        f"{redact(transcript.decode(errors='replace'), secrets).strip()[-500:]}"
                    )
                ready, _, _ = select.select([master], [], [], remaining)
                if not ready:
                    continue
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                transcript += chunk
                prompts = _PROMPT.findall(bytes(transcript))
                for who in prompts[answered:]:
                    pin = self._so_pin if who == b"SO" else self._user_pin
                    os.write(master, pin.encode() + b"\n")
                answered = len(prompts)
            try:
                rc = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise SoftHsmError(
                    f"softhsm2-util --init-token did not exit within {_INIT_TIMEOUT_S:.0f} s after its prompts"
                ) from None
        finally:
            os.close(master)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if rc != 0:
            said = redact(transcript.decode(errors="replace"), secrets).replace("\r", "").strip()
            raise SoftHsmError(
                f"softhsm2-util --init-token --label {self.label!r} failed (exit {rc}) in {self.token_dir}: "
                f"{said[-500:]} — check that {self.conf_path} is readable and the token directory writable"
            )

"""Where a running virtual board publishes itself, and what its launcher gives it.

A virtual board is a separate process; when it listens it writes its
``rfc2217://127.0.0.1:<port>`` URL to ``.rig/boards/<name>/port`` and its network
address to ``.rig/boards/<name>/address`` in the lab's state folder, and removes both
when it stops. The farm reads those files — it never imports the emulator — so a suite
reaches a virtual board exactly as a real one.

Each virtual board owns one loopback address ``127.0.1.N`` (DESIGN.md "Each virtual
board owns one loopback address"): every socket its firmware opens or listens on is
bound there, so a capture filtered on that host is that board's traffic. Without an
explicit address the board takes one derived from its name (:func:`default_board_address`),
stable across runs; the lab refuses two virtual boards that would share one.

The air a virtual board sees is the lab's ``wifi:`` list, written by the launcher to
``.rig/radio.json`` (:func:`write_radio_file`, mode 0600: it holds passphrases). The
board's Wi-Fi station reads it on every scan and join, so editing ``boards.yaml`` and
re-launching changes the air without touching the boards' flash.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import select
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

VIRTUAL_SUBNET = "127.0.1."
FIRST_HOST, LAST_HOST = 2, 254
"""127.0.1.1 is the host's own name on Debian-family systems (/etc/hosts); .0 and .255 are not hosts."""
RADIO_FILE = "radio.json"
RADIO_FORMAT = 1
RadioAuth = Literal["open", "wpa2_psk", "wpa3_psk", "wpa2_wpa3_psk"]
"""The auth modes ``boards.yaml`` ``wifi:`` accepts (``rig.lab.WifiNetwork.auth``) and the radio file carries."""


def board_state_dir(state_dir: Path, name: str) -> Path:
    return state_dir / "boards" / name


def port_file(state_dir: Path, name: str) -> Path:
    return board_state_dir(state_dir, name) / "port"


def address_file(state_dir: Path, name: str) -> Path:
    return board_state_dir(state_dir, name) / "address"


def published_port(state_dir: Path, name: str) -> str | None:
    """The URL a running virtual board published, or ``None`` when it is not running."""
    try:
        url = port_file(state_dir, name).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return url or None


def published_address(state_dir: Path, name: str) -> str | None:
    """The IPv4 address a running virtual board's firmware uses, or ``None`` when it is not running."""
    try:
        address = address_file(state_dir, name).read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        return None
    return address or None


def default_board_address(name: str) -> str:
    """The loopback address of virtual board *name* when boards.yaml gives none:
    ``127.0.1.N`` with N in 2..254 from a hash of the name (stable across runs and hosts)."""
    digest = hashlib.sha256(f"rig-vboard-address:{name}".encode()).digest()
    host = FIRST_HOST + int.from_bytes(digest[:4], "big") % (LAST_HOST - FIRST_HOST + 1)
    return f"{VIRTUAL_SUBNET}{host}"


def check_virtual_address(address: str) -> str:
    """*address* if a virtual board may own it (``127.0.1.2`` … ``127.0.1.254``); else a
    ``ValueError`` saying what to write instead."""
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise ValueError(f"'{address}' is not an IPv4 address. Fix: write 127.0.1.N with N in {FIRST_HOST}..{LAST_HOST}") from None
    text = str(ip)
    if not text.startswith(VIRTUAL_SUBNET) or not FIRST_HOST <= int(text.rsplit(".", 1)[1]) <= LAST_HOST:
        raise ValueError(
            f"a virtual board's address must be 127.0.1.N with N in {FIRST_HOST}..{LAST_HOST} (loopback, one per board), "
            f"not {text}. Fix: choose a free 127.0.1.N or leave address out to derive one from the name"
        )
    return text


# --------------------------------------------------------------------------- the radio


@dataclass(frozen=True)
class RadioNetwork:
    """One access point on the virtual air: what a scan shows and what a join checks."""

    ssid: str
    passphrase: str
    auth: RadioAuth
    channel: int
    bssid: str
    """``aa:bb:cc:dd:ee:ff``, stable per SSID (:func:`radio_network`)."""
    rssi: int
    """dBm, stable per SSID."""

    def __repr__(self) -> str:  # the passphrase never prints
        return f"RadioNetwork(ssid={self.ssid!r}, auth={self.auth}, channel={self.channel}, bssid={self.bssid}, rssi={self.rssi})"


def radio_network(ssid: str, passphrase: str, auth: RadioAuth = "wpa2_psk", channel: int = 6) -> RadioNetwork:
    """An access point with a BSSID and RSSI derived from its SSID: a locally administered
    unicast MAC (first octet ``x2``) and -35..-74 dBm, the same on every run."""
    digest = hashlib.sha256(f"rig-radio:{ssid}".encode()).digest()
    octets = bytes([(digest[0] & 0xFC) | 0x02]) + digest[1:6]
    return RadioNetwork(ssid, passphrase, auth, channel, ":".join(f"{b:02x}" for b in octets), -35 - digest[6] % 40)


def radio_file(state_dir: Path) -> Path:
    return Path(state_dir) / RADIO_FILE


def write_radio_file(state_dir: Path, networks: Iterable[RadioNetwork]) -> Path:
    """Write the lab's air for its virtual boards, readable by this user only (0600), atomically."""
    path = radio_file(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    body = json.dumps({"format": RADIO_FORMAT, "networks": [asdict(n) for n in networks]}, indent=2) + "\n"
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(body)
    os.replace(tmp, path)
    return path


def read_radio_file(path: Path) -> list[RadioNetwork]:
    """The networks in a radio file; a missing file is an empty air (no access points)."""
    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except ValueError as exc:
        raise ValueError(f"{path} is not a radio file ({exc}). Fix: let the launcher rewrite it from boards.yaml wifi:") from None
    if not isinstance(raw, dict) or raw.get("format") != RADIO_FORMAT:
        raise ValueError(f"{path} is not a format-{RADIO_FORMAT} radio file. Fix: let the launcher rewrite it from boards.yaml wifi:")
    return [RadioNetwork(**n) for n in raw.get("networks", [])]


# --------------------------------------------------------------------------- launching


class VirtualBoardStartError(RuntimeError):
    """A virtual board process did not come up; the message names its log."""


def launch_virtual_board(
    name: str, state_dir: Path, log_path: Path, timeout: float = 30.0, address: str | None = None
) -> tuple[subprocess.Popen[bytes], str]:
    """Start ``python -m rig.vboard.serve NAME`` and wait (on its stdout, not a sleep) for its URL.

    *address* is the board's ``127.0.1.N`` (default: derived from the name). Used by
    `rig up`'s supervisor and by the farm; neither imports the emulator.
    """
    argv = [sys.executable, "-m", "rig.vboard.serve", name, "--state-dir", str(state_dir)]
    if address is not None:
        argv += ["--address", check_virtual_address(address)]
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=logf, stdin=subprocess.DEVNULL)
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    line = proc.stdout.readline().decode("utf-8", "replace").strip() if ready else ""
    if not line.startswith("rfc2217://"):
        stop_virtual_board(proc)
        said = [ln for ln in log_path.read_text(encoding="utf-8", errors="replace").splitlines() if ln.startswith("error:")]
        why = f": {said[-1]}" if said else f" (it printed {line!r})"
        raise VirtualBoardStartError(f"virtual board '{name}' did not start{why}. Fix: read {log_path}")
    return proc, line


def stop_virtual_board(proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    """SIGTERM (the board removes its port and address files), then SIGKILL if it does not exit in time."""
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()

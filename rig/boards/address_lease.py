"""Who owns a virtual board address on this machine: one lease per ``127.0.1.N``.

A virtual board's firmware binds every socket to its own loopback address (DESIGN.md "Each
virtual board owns one loopback address"), derived from its name unless boards.yaml gives
one. Names are per lab, addresses are per machine: two labs running at once — a nightly run
beside a bench session, two CI workers — can derive the same ``127.0.1.N`` from different
names, or from the same name. Both boards would then listen on one address; whichever bound
first answers for both, and a test talks to the wrong board without a word.

So a board process takes a lease on its address before its firmware runs: an exclusive
``flock`` on ``<lease dir>/<address>``, held for the life of the process (the kernel drops
it when the process dies, however it dies) and naming the holder inside the file. An
address the lab *chose* (``address:`` in boards.yaml) that is taken is an error naming the
holder and the fix; a *derived* address that is taken moves to the next free one, and the
board publishes where it went (``.rig/boards/<name>/address``, which the farm reads).
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["LEASE_DIR_ENV", "AddressInUseError", "AddressLease", "lease_address", "lease_dir"]

LEASE_DIR_ENV = "RIG_ADDRESS_LEASE_DIR"
DEFAULT_LEASE_DIR = Path("/tmp/rig-vboard-addresses")
"""Machine-wide: every lab on the host must see every other lab's leases."""
FIRST_HOST, LAST_HOST = 2, 254


class AddressInUseError(RuntimeError):
    """The address is leased by another running virtual board."""


def lease_dir() -> Path:
    """Where leases live: ``$RIG_ADDRESS_LEASE_DIR``, else ``/tmp/rig-vboard-addresses``."""
    return Path(os.environ.get(LEASE_DIR_ENV) or DEFAULT_LEASE_DIR)


@dataclass
class AddressLease:
    """A held lease; :meth:`release` (or the process's end) gives the address back."""

    address: str
    path: Path
    fd: int | None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def _try(path: Path, holder: str) -> int | None:
    """The locked file's descriptor, with *holder* written in it; None when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    os.ftruncate(fd, 0)
    os.write(fd, f"{holder} (pid {os.getpid()})\n".encode())
    return fd


def _holder(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip() or "another process"
    except OSError:
        return "another process"


def _candidates(wanted: str) -> list[str]:
    """*wanted*, then the following addresses of 127.0.1.2–254, wrapping around."""
    base = ipaddress.IPv4Address(wanted)
    prefix, host = str(base).rsplit(".", 1)
    span = LAST_HOST - FIRST_HOST + 1
    start = int(host) - FIRST_HOST
    return [f"{prefix}.{FIRST_HOST + (start + i) % span}" for i in range(span)]


def lease_address(wanted: str, *, movable: bool, holder: str, directory: Path | None = None) -> AddressLease:
    """Lease *wanted* for *holder* (a board name and its lab); if it is taken and *movable*
    (derived, not chosen), the next free address instead. Raises :class:`AddressInUseError`."""
    where = directory or lease_dir()
    where.mkdir(parents=True, exist_ok=True)
    try:
        os.chmod(where, 0o1777)  # every user's labs share it, as /tmp itself
    except PermissionError:
        pass
    for address in _candidates(wanted) if movable else [wanted]:
        path = where / address
        fd = _try(path, holder)
        if fd is not None:
            return AddressLease(address, path, fd)
    if movable:
        raise AddressInUseError(f"every virtual board address 127.0.1.{FIRST_HOST}-{LAST_HOST} is leased ({where}). "
                                "Fix: stop virtual boards that are no longer needed (`rig down`)")  # fmt: skip
    raise AddressInUseError(
        f"address {wanted} is in use by virtual board {_holder(where / wanted)}. Fix: give this board another "
        "address: in boards.yaml (or leave address out to derive a free one), or stop the other board"
    )

"""The board's SPI NOR flash, backed by a file in the board's state folder.

NOR semantics, as the real part: erased bytes read 0xFF, erase works on 4 KB sectors,
and programming can only clear bits (new = old AND data) — so a write to flash that
was not erased first corrupts it exactly as it would on silicon. The file is the
whole chip image (``.rig/boards/<name>/flash.bin``) and survives restarts.
"""

from __future__ import annotations

import mmap
import os
import threading
from pathlib import Path

SECTOR_SIZE = 0x1000
ERASED = 0xFF


class FlashError(ValueError):
    """An access outside the chip or not sector-aligned where the part requires it."""


class FlashStorage:
    """A memory-mapped flash image; thread-safe for the board's ROM, bootloader and app threads."""

    def __init__(self, path: Path, size: int = 4 * 1024 * 1024):
        self.path = Path(path)
        self.size = size
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not self.path.exists() or self.path.stat().st_size != size:
            existing = self.path.read_bytes()[:size] if self.path.exists() else b""
            self.path.write_bytes(existing + bytes([ERASED]) * (size - len(existing)))
        self._fd = os.open(self.path, os.O_RDWR)
        self._map = mmap.mmap(self._fd, size)
        self._lock = threading.RLock()

    def _check(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise FlashError(f"{what} 0x{offset:x}+0x{length:x} is outside the {self.size // 1024 // 1024} MB flash")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length, "read")
        with self._lock:
            return bytes(self._map[offset : offset + length])

    def write(self, offset: int, data: bytes) -> None:
        """Program *data* at *offset*: bits can only go from 1 to 0 (NOR page program)."""
        self._check(offset, len(data), "write")
        with self._lock:
            old = self._map[offset : offset + len(data)]
            if old.count(ERASED) == len(old):
                self._map[offset : offset + len(data)] = data
            else:
                # AND of the whole run at once (as one big integer), not byte by byte
                anded = int.from_bytes(old, "little") & int.from_bytes(data, "little")
                self._map[offset : offset + len(data)] = anded.to_bytes(len(data), "little")

    def erase(self, offset: int, length: int) -> None:
        """Erase whole 4 KB sectors."""
        self._check(offset, length, "erase")
        if offset % SECTOR_SIZE or length % SECTOR_SIZE:
            raise FlashError(f"erase 0x{offset:x}+0x{length:x} is not aligned to 4 KB sectors")
        with self._lock:
            self._map[offset : offset + length] = bytes([ERASED]) * length

    def erase_all(self) -> None:
        self.erase(0, self.size)

    def flush(self) -> None:
        with self._lock:
            self._map.flush()

    def close(self) -> None:
        with self._lock:
            if not self._map.closed:
                self._map.flush()
                self._map.close()
                os.close(self._fd)

    def __enter__(self) -> FlashStorage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

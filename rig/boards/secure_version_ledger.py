"""The per-board ledger of anti-rollback eFuse bits spent.

``SECURE_VERSION`` is a thermometer code in eFuse block 0 — 16 bits on the ESP32-C3
(:attr:`rig.targets.esp32c3.ESP32C3.secure_version_bits`) — and every confirmed app with a
higher ``secure_version`` burns more of them (ESP-IDF ``esp_efuse_update_secure_version``).
On silicon they never come back: once all are burned, no later anti-rollback test can run
on that board. The rig therefore records every burn a test made (who, when, from which
version to which) in ``<lab state>/boards/<board>/secure-version-ledger.json``, and refuses a
run whose destructive tests would need more bits than the board has left.

The eFuse itself is the truth for "how many are left" (:meth:`SecureVersionLedger.check` takes
what espefuse read); the ledger adds the history and a last-known value so a run can be
refused before it touches a board.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

__all__ = ["LEDGER_FILE", "LedgerEntry", "SecureVersionExhausted", "SecureVersionLedger"]

LEDGER_FILE = "secure-version-ledger.json"


class SecureVersionExhausted(RuntimeError):
    """A test would need more SECURE_VERSION bits than the board has left."""


@dataclass(frozen=True)
class LedgerEntry:
    time: str
    run_id: str
    test: str
    before: int
    after: int


@dataclass
class SecureVersionLedger:
    board: str
    path: Path
    capacity: int
    entries: list[LedgerEntry]

    @classmethod
    def load(cls, board: str, state_dir: Path, capacity: int) -> SecureVersionLedger:
        """The board's ledger in *state_dir* (the board's state folder); empty when none exists yet."""
        path = Path(state_dir) / LEDGER_FILE
        entries: list[LedgerEntry] = []
        if path.exists():
            try:
                entries = [LedgerEntry(**e) for e in json.loads(path.read_text())["entries"]]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise SecureVersionExhausted(
                    f"board '{board}': the SECURE_VERSION ledger {path} is unreadable ({exc}). Fix: restore it from "
                    "backup, or delete it only if you know how many bits the board has burned (espefuse summary)"
                ) from None
        return cls(board, path, capacity, entries)

    @property
    def last_known(self) -> int:
        """The eFuse value after the last recorded burn (0 when nothing was recorded)."""
        return self.entries[-1].after if self.entries else 0

    def check(self, current: int, needed: int, what: str) -> None:
        """Refuse *what* when raising the eFuse from *current* by *needed* would pass the board's capacity."""
        if current + needed > self.capacity:
            raise SecureVersionExhausted(
                f"board '{self.board}': {what} needs SECURE_VERSION {current + needed}, but the eFuse holds {current} of "
                f"{self.capacity} and cannot go higher. Fix: run anti-rollback tests on another sacrificial board "
                f"(efuse: {{sacrificial: true}}), or deselect them with -m 'not destructive'; history in {self.path}"
            )

    def record(self, run_id: str, test: str, before: int, after: int) -> LedgerEntry:
        """Append one burn and write the ledger atomically."""
        entry = LedgerEntry(datetime.now(UTC).isoformat(timespec="seconds"), run_id, test, before, after)
        self.entries.append(entry)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"board": self.board, "capacity": self.capacity,
                                   "entries": [asdict(e) for e in self.entries]}, indent=2) + "\n")  # fmt: skip
        tmp.replace(self.path)
        return entry

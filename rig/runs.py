"""A run's output folder: ``reports/<run-id>/`` and what lives in it.

The run id is the UTC start time plus a short random suffix, so ids sort by time and
two hosts starting at the same second do not collide (results merge by run id).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path


def new_run_id(now: datetime | None = None) -> str:
    """``20261123T233015Z-3fa9c1``: sortable UTC timestamp, then 6 random hex digits."""
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


@dataclass(frozen=True)
class RunDirectory:
    """The layout DESIGN.md fixes for one run's evidence."""

    root: Path

    @property
    def run_id(self) -> str:
        return self.root.name

    @property
    def junit(self) -> Path:
        return self.root / "junit.xml"

    @property
    def allure_results(self) -> Path:
        return self.root / "allure-results"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pcaps(self) -> Path:
        return self.root / "pcaps"

    @property
    def evidence(self) -> Path:
        """Per-test artefacts (``evidence/<test id>/<name>``), beside their allure attachments."""
        return self.root / "evidence"

    def board_log(self, board: str) -> Path:
        return self.logs / f"{board}.log"

    @classmethod
    def create(cls, reports_dir: Path, run_id: str | None = None) -> RunDirectory:
        """Make a fresh run folder; an existing one is never reused (evidence is not overwritten)."""
        run = cls(reports_dir / (run_id or new_run_id()))
        run.root.mkdir(parents=True, exist_ok=False)
        run.logs.mkdir()
        run.allure_results.mkdir()
        return run

    @classmethod
    def open(cls, root: Path) -> RunDirectory:
        run = cls(root)
        run.logs.mkdir(parents=True, exist_ok=True)
        run.allure_results.mkdir(parents=True, exist_ok=True)
        return run

"""One injectable clock for the cloud: token expiry, mapping windows, job timeouts, URL expiry.

Production uses :class:`SystemClock`. A stack started in test mode uses a
:class:`ManualClock` that suites move forward (``POST /test/clock/advance``) instead
of sleeping through a 60 s mapping window or a one-hour token lifetime.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the Unix epoch."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()


class ManualClock:
    """Wall-clock time plus an offset that only ever grows; thread-safe."""

    def __init__(self, offset: float = 0.0):
        self._offset = offset
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return time.time() + self._offset

    def advance(self, seconds: float) -> float:
        """Move time forward by *seconds* (never backwards) and return the new time."""
        if seconds < 0:
            raise ValueError("the clock only moves forward")
        with self._lock:
            self._offset += seconds
            return time.time() + self._offset

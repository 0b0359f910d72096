"""A record of every fixed delay a virtual board spends, for ``bench/ota_cycle.py``.

A fixed delay is a pause of a set length rather than a wait for something: a task's
``vTaskDelay`` (:meth:`rig.vboard.node.runtime.NodeRuntime.sleep`), a one-shot
``esp_timer`` (:meth:`~rig.vboard.node.runtime.NodeRuntime.after`), the UART pacing its
console output at the chip's baud rate, the ROM's and the reset circuit's own pauses
(:mod:`rig.vboard.board`). Each call site passes a name saying which delay it is.

Off unless the board process starts with :data:`ENV_VAR` naming a file: then every delay,
once over, is appended to that file as one JSON line::

    {"board": "bench", "name": "rmaker_reboot_tm", "kind": "timer", "start": 8123.41,
     "planned": 2.0, "waited": 2.0, "cut": false}

``start`` is ``time.monotonic()`` (one clock for every process of the host, so a bench
can set it against its own events), ``planned`` the delay asked for, ``waited`` what
passed, ``cut`` whether something ended it early (a reset, a cancelled timer). Off, a
call site costs one global lookup and a ``None`` test (:data:`SINK`).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Literal, TextIO

__all__ = ["ENV_VAR", "SINK", "DelayKind", "record"]

ENV_VAR = "RIG_VBOARD_DELAY_TRACE"
DelayKind = Literal["sleep", "timer", "uart", "board"]
"""``sleep``: a task blocked for a set time; ``timer``: a callback deferred by a set time;
``uart``: console output paced at the baud rate; ``board``: the ROM's or the DevKit's own pause."""


class _Sink:
    """The trace file, appended to by every thread of the board process."""

    def __init__(self, path: str):
        self._lock = threading.Lock()
        self._file: TextIO = open(path, "a", encoding="utf-8", buffering=1)  # open for the process's lifetime

    def write(self, entry: dict[str, object]) -> None:
        line = json.dumps(entry, separators=(",", ":")) + "\n"
        with self._lock:
            self._file.write(line)


def _from_env() -> _Sink | None:
    path = os.environ.get(ENV_VAR)
    return _Sink(path) if path else None


SINK: _Sink | None = _from_env()
"""The trace file, or None (the default): call sites test it before measuring anything."""


def record(board: str, name: str, kind: DelayKind, start: float, planned: float, waited: float, cut: bool = False) -> None:
    """Append one delay that is over (nothing when tracing is off)."""
    sink = SINK
    if sink is None:
        return
    sink.write({"board": board, "name": name, "kind": kind, "start": round(start, 6), "planned": round(planned, 6),
                "waited": round(waited, 6), "cut": cut})  # fmt: skip

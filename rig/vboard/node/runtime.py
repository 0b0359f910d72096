"""The node firmware's tasks, timers and sockets, stopped together when the chip resets.

A reset ends everything the firmware started: FreeRTOS tasks, ``esp_timer`` callbacks,
lwIP sockets. The emulated node runs its tasks as Python threads, so :class:`NodeRuntime`
keeps the list: :meth:`spawn` starts a task, :meth:`after` a one-shot timer, :meth:`track`
registers a socket (or anything closable) to be closed. :meth:`halt` — called from the
app's exit hook (``AppContext.add_exit_hook``), on whichever thread asked for the reset —
sets :attr:`halted`, ends every pending timer and closes every tracked socket at once (a
blocked ``recv`` or ``accept`` returns), then :meth:`join` on the chip's thread waits for
the tasks. A timer that became moot is cancelled (:meth:`Timer.cancel`, ``esp_timer_stop``)
rather than left to run out.

:meth:`sleep` and :meth:`after` are the firmware's fixed delays; each is recorded by
:mod:`.delay_trace` when the board process traces them (``bench/ota_cycle.py``).

After :meth:`halt` nothing reaches the UART: a reset silences the chip at once, and the
next boot's ROM banner must not be interleaved with the last boot's log lines.
"""

from __future__ import annotations

import logging
import queue
import socket
import threading
import time
from collections.abc import Callable
from typing import Protocol

from rig.vboard.bootloader import LogMessage
from rig.vboard.console import BoardConsole
from rig.vboard.node import delay_trace

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 5.0
"""How long :meth:`NodeRuntime.join` waits for all tasks together after a halt."""


class Closable(Protocol):
    def close(self) -> None: ...


class Timer:
    """A pending one-shot ``esp_timer`` (:meth:`NodeRuntime.after`)."""

    def __init__(self) -> None:
        self.wake = threading.Event()
        """Set when the timer must end before its time: cancelled, or the chip halted."""

    def cancel(self) -> None:
        """``esp_timer_stop``: the callback will not run; the timer's task ends now."""
        self.wake.set()


class NodeRuntime:
    """The running firmware's tasks (threads), timers and sockets for one boot."""

    def __init__(self, console: BoardConsole, board: str):
        self.console = console
        self.board = board
        self.halted = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._closables: list[Closable] = []
        self._timers: set[Timer] = set()
        self._closed = threading.Event()
        """Set once :meth:`halt` has closed every tracked socket and server."""

    # ------------------------------------------------------------------ output

    def log(self, line: LogMessage, **values: object) -> None:
        """One ESP-IDF log line, unless the chip has been reset."""
        if not self.halted.is_set():
            self.console.log(line.level, line.tag, line.format(**values))

    def write(self, text: str) -> None:
        """``printf`` text, unless the chip has been reset."""
        if not self.halted.is_set():
            self.console.write(text)

    # ------------------------------------------------------------------ tasks

    def spawn(self, name: str, target: Callable[[], None]) -> threading.Thread | None:
        """Start task *name*; None when the chip is already halting. A task that raises is
        reported on stderr and ends, as a crashed FreeRTOS task would not take the board down."""

        def run() -> None:
            try:
                target()
            except Exception:
                log.exception("virtual board %s: node task %r failed", self.board, name)

        thread = threading.Thread(target=run, name=f"{self.board}:{name}", daemon=True)
        with self._lock:
            if self.halted.is_set():
                return None
            self._threads.append(thread)
        thread.start()
        return thread

    def after(self, delay_s: float, name: str, callback: Callable[[], None]) -> Timer | None:
        """A one-shot ``esp_timer`` named *name*: *callback* after *delay_s* unless the timer is
        cancelled or the chip halts first; None when the chip is already halting."""
        timer = Timer()
        with self._lock:
            if self.halted.is_set():
                return None
            self._timers.add(timer)

        def run() -> None:
            start = time.monotonic() if delay_trace.SINK is not None else 0.0
            ended_early = timer.wake.wait(delay_s)
            with self._lock:
                self._timers.discard(timer)
            if delay_trace.SINK is not None:
                delay_trace.record(self.board, name, "timer", start, delay_s, time.monotonic() - start, ended_early)
            if not ended_early and not self.halted.is_set():
                callback()

        if self.spawn(name, run) is None:
            with self._lock:
                self._timers.discard(timer)
            return None
        return timer

    def sleep(self, seconds: float, name: str = "vTaskDelay") -> bool:
        """Wait *seconds* (a task's ``vTaskDelay``, *name* saying which); False when the chip halted meanwhile."""
        if delay_trace.SINK is None:
            return not self.halted.wait(seconds)
        start = time.monotonic()
        halted = self.halted.wait(seconds)
        delay_trace.record(self.board, name, "sleep", start, seconds, time.monotonic() - start, halted)
        return not halted

    # ------------------------------------------------------------------ sockets

    def track(self, item: Closable) -> Closable:
        """Close *item* when the chip halts (now, if it already has)."""
        with self._lock:
            if not self.halted.is_set():
                self._closables.append(item)
                return item
        _close(item)
        return item

    def untrack(self, item: Closable) -> None:
        with self._lock:
            if item in self._closables:
                self._closables.remove(item)

    def bound_socket(self, address: str, port: int = 0, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A tracked IPv4 socket bound to the board's *address* (*port* 0: any port): every
        connection the node opens leaves from its own address, and every service it runs
        listens there. ``SO_REUSEADDR`` lets the next boot listen on the same port at once."""
        sock = socket.socket(socket.AF_INET, kind)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address, port))
        except OSError:
            sock.close()
            raise
        self.track(sock)
        return sock

    # ------------------------------------------------------------------ reset

    def halt(self) -> None:
        """The chip resets: stop output, wake every task and timer, close every socket. Never blocks."""
        with self._lock:
            self.halted.set()
            closables, self._closables = self._closables, []
            timers, self._timers = self._timers, set()
        for timer in timers:
            timer.wake.set()
        try:
            for item in closables:
                _close(item)
        finally:
            self._closed.set()

    def join(self, timeout: float = JOIN_TIMEOUT_S) -> list[str]:
        """Wait for the tasks after :meth:`halt`, and for :meth:`halt` itself to have closed every
        socket (it may run on another thread, and the next boot binds the same addresses); the
        names of the tasks still running (logged)."""
        deadline = time.monotonic() + timeout
        if self.halted.is_set() and not self._closed.wait(timeout):
            log.error("virtual board %s: closing the node's sockets took over %.0f s", self.board, timeout)
        with self._lock:
            threads = [t for t in self._threads if t is not threading.current_thread()]
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in threads if t.is_alive()]
        if stuck:
            log.error("virtual board %s: node task(s) %s ignored the reset", self.board, ", ".join(stuck))
        return stuck


def _close(item: Closable) -> None:
    """Close a socket at reset: ``shutdown`` first, which wakes a task blocked on it; the peer
    sees the connection end without an MQTT DISCONNECT (so the broker sends the Last Will)."""
    try:
        if isinstance(item, socket.socket):
            try:
                item.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected (a listener) or already gone
        item.close()
    except OSError as exc:
        log.debug("closing %r at reset: %s", item, exc)


class WorkQueue:
    """RainMaker's work queue (esp-rainmaker-common ``rmaker_work_queue``): one task running
    submitted jobs in order, so MQTT callbacks never block the MQTT task. Closing it (at
    halt, through :meth:`NodeRuntime.track`) ends the task."""

    def __init__(self, runtime: NodeRuntime, name: str = "work_queue"):
        self.runtime = runtime
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        runtime.track(self)
        runtime.spawn(name, self._run)

    def submit(self, job: Callable[[], None]) -> None:
        if not self.runtime.halted.is_set():
            self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None or self.runtime.halted.is_set():
                return
            try:
                job()
            except Exception:
                log.exception("virtual board %s: work queue job failed", self.runtime.board)

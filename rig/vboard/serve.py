"""Run one virtual board in the foreground:
``python -m rig.vboard.serve NAME --state-dir DIR [--port N] [--address 127.0.1.N]``.

Prints ``rfc2217://127.0.0.1:<port>`` on stdout (one line, flushed) once the port
accepts clients, writes the same URL to ``<state-dir>/boards/<NAME>/port`` and the
board's network address (``--address``, default derived from the name) to
``<state-dir>/boards/<NAME>/address``, and runs until SIGTERM or SIGINT, when it powers
the board off and removes both files. Exit status 0 after a signal, 2 for bad arguments
(or an address this host cannot bind), 3 when the board is already running.

``kill -USR1 <pid>`` dumps every thread's stack to stderr (a hung board's diagnosis).
Signals are taken with :func:`signal.sigwait` after blocking them in every thread, so
no thread is ever interrupted mid-write to flash or eFuses.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import socket
import sys
from pathlib import Path

from rig.boards.address_lease import AddressInUseError
from rig.boards.virtual_ports import check_virtual_address, default_board_address
from rig.vboard.board import BoardBusyError, VirtualBoard

EXIT_USAGE = 2
EXIT_BUSY = 3
STOP_SIGNALS = {signal.SIGTERM, signal.SIGINT}


def address_problem(address: str) -> str | None:
    """Why *address* cannot be a virtual board's (not 127.0.1.N, or not bindable here), or None."""
    try:
        check_virtual_address(address)
    except ValueError as exc:
        return str(exc)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError as exc:
            return f"this host cannot bind {address} ({exc.strerror}). Fix: virtual boards need Linux, where all of 127.0.0.0/8 is local"
    return None


def run_foreground(name: str, state_dir: Path, port: int = 0, announce: bool = True, address: str | None = None) -> int:
    """Serve board *name* until SIGTERM/SIGINT; the exit status for the process."""
    problem = address_problem(address or default_board_address(name))
    if problem is not None:
        print(f"error: board {name!r}: {problem}", file=sys.stderr)
        return EXIT_USAGE
    # Block the stop signals before any thread exists, so that all threads inherit the mask
    # and only sigwait() below receives them.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 <pid>`: thread dump on stderr
    try:
        board = VirtualBoard(name, state_dir, address=address)
    except BoardBusyError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except AddressInUseError as exc:
        print(f"error: board {name!r}: {exc}", file=sys.stderr)
        return EXIT_BUSY
    try:
        try:
            board.start(port)
        except OSError as exc:
            print(f"error: cannot listen on 127.0.0.1:{port} for board {name!r}: {exc}", file=sys.stderr)
            return EXIT_USAGE
        if announce:
            print(board.url, flush=True)
        signal.sigwait(STOP_SIGNALS)
    finally:
        board.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rig.vboard.serve", description="Run one virtual ESP32-C3 board.")
    parser.add_argument("name", help="board name (its state lives in <state-dir>/boards/<name>/)")
    parser.add_argument("--state-dir", type=Path, required=True, help="the lab's state folder (.rig)")
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: any free port)")
    parser.add_argument("--address", help="the board's own 127.0.1.N (default: derived from the name)")
    parser.add_argument("--log-level", default="WARNING", help="Python logging level for diagnostics on stderr")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return run_foreground(args.name, args.state_dir, args.port, address=args.address)


if __name__ == "__main__":
    sys.exit(main())

"""``python -m rig.boards.tool_runner esptool|espefuse ARGS...``: the unmodified tool, over the rig's transport.

The rig drives boards through esptool and espefuse exactly as a lab engineer types them
(``rig.espressif_tools.run_tool``). This runner is that command line with one
difference below the tool: before the tool's own console entry point runs, pyserial is
told to take ``rfc2217://`` URLs from :mod:`rig.boards.serial_url_handlers`, whose client
keeps port-timeout changes local instead of renegotiating the whole line for each one
(see :mod:`rig.boards.serial_url_handlers.protocol_rfc2217` for why that matters).
Arguments, output, exit codes and error messages are the tool's own: the entry point is
the one its package registers as a console script, called with ``sys.argv`` set as
the console script would see it.

One more thing is left out when tracing is off: esptool 5.6 builds its trace messages
as f-strings (``esptool/loader.py``: ``ESPLoader.write``, ``command``, ``read``), so every
16 KB flash block is rendered as a hex dump twice and then dropped by ``trace()``,
which prints only with ``--trace``. :class:`esptool.loader.HexFormatter` is used for
nothing else, so without ``--trace`` its rendering is replaced by a placeholder; with
``--trace`` it is untouched. Measured in ``bench/flash_throughput.py``: about 95% of a
compressed write's client time.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points

from rig.boards import serial_url_handlers
from rig.espressif_tools import PORT_TOOLS

USAGE_EXIT = 2


class ToolNotInstalled(RuntimeError):
    """The tool's package is not installed in this interpreter's environment."""


def console_entry(tool: str) -> Callable[[], object]:
    """The function the tool's ``console_scripts`` entry point names (e.g. ``esptool:_main``)."""
    found = [ep for ep in entry_points(group="console_scripts", name=tool)]
    if not found:
        raise ToolNotInstalled(
            f"{tool} is not installed for {sys.executable}. Fix: run `make install` (it installs esptool>=5 into .venv)"
        )
    return found[0].load()


TRACE_OPTIONS = ("--trace", "-t")
UNRENDERED_HEX = "<hex dump: pass --trace to see it>"


def skip_unprinted_hex_dumps(args: Sequence[str]) -> bool:
    """Without ``--trace``, stop esptool rendering hex dumps that ``trace()`` then discards."""
    if any(a in TRACE_OPTIONS for a in args):
        return False
    from esptool.loader import HexFormatter

    HexFormatter.__str__ = lambda self: UNRENDERED_HEX  # type: ignore[method-assign]
    return True


def run(tool: str, args: Sequence[str]) -> int:
    """Run *tool* with *args* in this process over the rig's RFC 2217 client; its exit status."""
    if tool not in PORT_TOOLS:
        raise ValueError(f"rig.boards.tool_runner runs {' or '.join(PORT_TOOLS)}, not {tool!r}")
    entry = console_entry(tool)
    serial_url_handlers.install()
    skip_unprinted_hex_dumps(args)
    sys.argv = [tool, *args]
    try:
        status = entry()
    except SystemExit as exc:
        status = exc.code
    if status is None:
        return 0
    if isinstance(status, int):
        return status
    print(status, file=sys.stderr)  # SystemExit("message"), as the interpreter would report it
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in PORT_TOOLS:
        print(f"usage: python -m rig.boards.tool_runner {{{','.join(PORT_TOOLS)}}} ARGS...", file=sys.stderr)
        return USAGE_EXIT
    try:
        return run(argv[0], argv[1:])
    except ToolNotInstalled as exc:
        print(str(exc), file=sys.stderr)
        return USAGE_EXIT


if __name__ == "__main__":
    sys.exit(main())

"""The ``open_debug_port`` flaw: an undocumented TCP service on the board's address.

A port scan of a board's ``127.0.1.N`` is its network attack surface (DESIGN.md); a
board with this flaw listens on :data:`DEBUG_PORT` and greets every connection with a
shell prompt, which a suite's port scan must report as an undeclared interface
(EN 303 645 5.6-1). The clean firmware listens on nothing but what its IXIT declares.
"""

from __future__ import annotations

from rig.vboard.node.runtime import NodeRuntime

DEBUG_PORT = 2323
BANNER = b"esp32c3 debug console\r\n# "


class DebugPort:
    """The listener; closed with everything else when the chip resets."""

    def __init__(self, runtime: NodeRuntime, address: str, port: int = DEBUG_PORT):
        self.runtime = runtime
        self.listener = runtime.bound_socket(address, port)  # closed by the runtime at reset
        self.listener.listen(4)
        runtime.spawn("debug_port", self._serve)

    def _serve(self) -> None:
        while not self.runtime.halted.is_set():
            try:
                conn, _peer = self.listener.accept()
            except OSError:
                return  # closed at reset
            with conn:
                try:
                    conn.sendall(BANNER)
                except OSError:
                    continue

"""A protocomm instance served over HTTP on the board's address, closed when the chip resets.

Both protocomm services of a RainMaker node run this way (rainmaker-protocol.md §4.2, §4.7):
provisioning — ``network_prov_mgr`` on ``protocomm_httpd``, port 80 (:mod:`.prov_transport`) —
and local control — ``esp_local_ctrl`` on ``esp_https_server`` in plain-HTTP mode, port 8080
(:mod:`.local_ctrl`). A subclass registers its endpoints on :attr:`ProtocommServer.protocomm`;
:meth:`ProtocommServer.start` listens and hands the server to the node's runtime, so a reset
closes it and drops every client. A server that cannot listen (address taken, port 80 without
root) is logged on stderr and the node carries on without it instead of crashing its boot.
"""

from __future__ import annotations

import logging
from typing import ClassVar

from rig.protocomm.endpoints import Protocomm
from rig.protocomm.httpd import HttpdError, ProtocommHttpd
from rig.vboard.node.runtime import NodeRuntime

log = logging.getLogger(__name__)

SEC2_PATCH_VERSION = 1
"""The ``sec_patch_ver`` the node's protocomm security 2 announces (ESP-IDF with the nonce fix,
``rig.protocomm.security``), for provisioning and local control alike."""


class ProtocommServer:
    """``Protocomm`` behind ``ProtocommHttpd`` on ``address:port`` (``max_open_sockets`` as the
    service's httpd config says); :attr:`what` names the service in diagnostics."""

    what: ClassVar[str] = "protocomm"

    def __init__(self, runtime: NodeRuntime, address: str, port: int, *, max_open_sockets: int = 1) -> None:
        self.runtime = runtime
        self.protocomm = Protocomm()
        self.httpd = ProtocommHttpd(self.protocomm, address, port, max_open_sockets=max_open_sockets)

    def start(self) -> bool:
        """Listen, tracked by the runtime (a reset closes the server); False, logged on stderr,
        when it cannot listen."""
        try:
            self.httpd.start()
        except (HttpdError, OSError) as exc:
            log.error("%s server of the virtual board at %s: %s", self.what, self.httpd.address, exc)
            return False
        self.runtime.track(self)
        return True

    def close(self) -> None:
        self.httpd.stop()

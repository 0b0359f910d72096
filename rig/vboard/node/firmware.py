"""The virtual RainMaker firmware's entry point, as the board runs it (``IdfFirmware(app_main=...)``)."""

from __future__ import annotations

from rig.vboard.app import AppContext, AppExit
from rig.vboard.node.node import NodePlatform, RainMakerNode


class RainMakerFirmware:
    """``app_main`` of every image the virtual board runs: a new :class:`RainMakerNode` per boot.

    ``last_node`` is the node of the latest boot, for in-process tests.
    """

    def __init__(self, platform: NodePlatform):
        self.platform = platform
        self.last_node: RainMakerNode | None = None

    def __call__(self, ctx: AppContext) -> AppExit | None:
        node = RainMakerNode(ctx, self.platform)
        self.last_node = node
        return node.app_main()

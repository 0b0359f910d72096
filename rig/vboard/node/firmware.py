"""The virtual RainMaker firmware's entry point, as the board runs it (``IdfFirmware(app_main=...)``)."""

from __future__ import annotations

from rig.vboard.app import AppContext, AppExit
from rig.vboard.node.node import NodePlatform, RainMakerNode


class RainMakerFirmware:
    """``app_main`` of every image the virtual board runs: a new :class:`RainMakerNode` per boot."""

    def __init__(self, platform: NodePlatform):
        self.platform = platform

    def __call__(self, ctx: AppContext) -> AppExit | None:
        return RainMakerNode(ctx, self.platform).app_main()

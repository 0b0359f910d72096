"""The RainMaker node firmware of the virtual board: identity from ``fctry``, Wi-Fi on the
lab's virtual air, provisioning, MQTT to the cloud, params, console commands, and the
named flaws of ``rig.vboard.flaws``. See :mod:`rig.vboard.node.node` for the boot."""

from rig.vboard.node.firmware import RainMakerFirmware
from rig.vboard.node.node import NodePlatform, RainMakerNode

__all__ = ["NodePlatform", "RainMakerFirmware", "RainMakerNode"]

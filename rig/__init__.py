"""The rig: a hardware-in-the-loop security test rig for ESP RainMaker-class devices.

The package is layered as ``../shared/DESIGN.md`` describes: ``rig.lab`` turns
``boards.yaml`` into a validated model, ``rig.boards`` is a board as the rig sees
it, ``rig.firmware`` holds the byte formats, ``rig.evidence`` the verdict model.
"""

__version__ = "0.1.0"

"""Per-chip constants, one class per chip as esptool's ``targets/`` does.

Only ESP32-C3 is supported for now; :func:`target_for` is the one place that says so.
"""

from __future__ import annotations

from rig.targets.esp32c3 import ESP32C3, ChipTarget

SUPPORTED: dict[str, type[ChipTarget]] = {ESP32C3.name: ESP32C3}


KNOWN_FEATURES: frozenset[str] = frozenset().union(*(t.features for t in SUPPORTED.values()))


def target_for(chip: str) -> type[ChipTarget]:
    """The target class for *chip* (e.g. ``"esp32c3"``); unknown chips raise ``KeyError``."""
    return SUPPORTED[chip]


__all__ = ["ESP32C3", "KNOWN_FEATURES", "SUPPORTED", "ChipTarget", "target_for"]

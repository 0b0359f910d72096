"""Espressif's provisioning client (esp-rainmaker-cli's ``rmaker_tools``), loaded for cross-checks.

Its security modules put generated ``*_pb2`` modules on ``sys.path`` and import them through a
top-level ``proto`` package, so the import order matters; :func:`load` does it once. Used only by
tests, as the reference the rig's protocomm must agree with.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest


def load() -> ModuleType:
    """Espressif's ``proto`` package (``session_pb2``, ``sec1_pb2`` … ``wifi_config_pb2``, user mapping)."""
    pytest.importorskip("rmaker_tools", reason="esp-rainmaker-cli (rmaker_tools) is the cross-check reference; make dev installs it")
    importlib.import_module("rmaker_tools.common.security.security1")  # puts the pb2 modules on the path
    return importlib.import_module("proto")


def module(name: str) -> ModuleType:
    """A module of rmaker_tools (after :func:`load`), e.g. ``common.security.security2``."""
    load()
    return importlib.import_module(f"rmaker_tools.{name}")

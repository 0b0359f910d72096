"""Espressif's provisioning client (esp-rainmaker-cli's ``rmaker_tools``), loaded for cross-checks.

Its security modules put generated ``*_pb2`` modules on ``sys.path`` and import them through a
top-level ``proto`` package, so the import order matters; :func:`load` does it once. Used only by
tests, as the reference the rig's protocomm must agree with.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import pytest

from rig.protocomm.srp6a import N_LEN


def load() -> ModuleType:
    """Espressif's ``proto`` package (``session_pb2``, ``sec1_pb2`` … ``wifi_config_pb2``, user mapping)."""
    pytest.importorskip("rmaker_tools", reason="esp-rainmaker-cli (rmaker_tools) is the cross-check reference; make dev installs it")
    importlib.import_module("rmaker_tools.common.security.security1")  # puts the pb2 modules on the path
    return importlib.import_module("proto")


def module(name: str) -> ModuleType:
    """A module of rmaker_tools (after :func:`load`), e.g. ``common.security.security2``."""
    load()
    return importlib.import_module(f"rmaker_tools.{name}")


def security2(patch_version: int, username: str, pop: str) -> Any:
    """Espressif's ``Security2`` client whose SRP public key A is always the full 384 bytes.

    Their ``Srp6a`` sends A as ``long_to_bytes(A)``: about one time in 256 that is 383 bytes, which
    esp-idf security2.c (and so the rig's device) refuses as "Invalid public key length" before any
    PoP check (see :mod:`rig.protocomm.srp6a`). That is a real, rare failure of their client, and it
    would make every cross-check against it flaky; this one draws A again until it is full length.
    """

    class FullLengthA(module("common.security.security2").Security2):  # type: ignore[misc]
        def setup0_request(self) -> Any:
            request = super().setup0_request()
            while (self.srp6a_ctx.A.bit_length() + 7) // 8 != N_LEN:
                request = super().setup0_request()
            return request

    return FullLengthA(patch_version, username, pop, False)

"""Flawed variants of the virtual firmware set: the ``base`` build with named flaws.

DESIGN.md "Principles": every security check ships with the flaw that makes it fail.
A flawed variant is the virtual set's ``base`` role (same project, version, secure
version, partition table and sdkconfig, signed with the same Secure Boot V2 key) whose
behaviour manifest lists flaws from the virtual board's catalogue
(``rig.vboard.flaws.FLAWS``) — so a board flashed with it boots exactly as a clean one
and differs only where a flaw says. The builder does not check the names: the firmware
layer does not import the emulator, and the virtual board refuses an image naming an
unknown flaw loudly when it boots (validate first with ``rig.vboard.flaws.check_flaws``).

Images are built with :func:`rig.firmware.virtual_set.virtual_app_image` (deterministic
for a given key and manifest), so two builds with the same flaws are byte-identical.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from rig.firmware.behaviour import BehaviourManifest
from rig.firmware.build_dir import IdfBuildDir, write_build_dir
from rig.firmware.partition_table import RAINMAKER_4MB
from rig.firmware.virtual_set import (
    PROJECT_NAME,
    SDKCONFIG,
    VIRTUAL_ROLES,
    VirtualRole,
    virtual_app_image,
    virtual_bootloader_image,
)
from rig.targets import ESP32C3

__all__ = ["flawed_role", "write_flawed_build"]


def flawed_role(flaws: Sequence[str], *, base_role: str = "base", version: str | None = None,
                prov_security: int | None = None, extra: Mapping[str, object] | None = None) -> VirtualRole:  # fmt: skip
    """The virtual set's *base_role* with *flaws* (and optional manifest changes) in its manifest."""
    role = next((r for r in VIRTUAL_ROLES if r.role == base_role), None)
    if role is None:
        raise ValueError(f"the virtual set has no role {base_role!r}; roles are {', '.join(r.role for r in VIRTUAL_ROLES)}")
    if len(set(flaws)) != len(flaws):
        raise ValueError(f"flaws {list(flaws)} name one flaw twice")
    behaviour = BehaviourManifest(
        boot=role.behaviour.boot,
        flaws=tuple(flaws),
        prov_security=role.behaviour.prov_security if prov_security is None else prov_security,  # type: ignore[arg-type]
        rollback_wait_s=role.behaviour.rollback_wait_s,
        extra={**role.behaviour.extra, **(extra or {})},
    )
    return replace(role, version=version or role.version, behaviour=behaviour)


def write_flawed_build(dest: Path, flaws: Sequence[str], signing_key: Path, *, base_role: str = "base",
                       version: str | None = None, prov_security: int | None = None,
                       extra: Mapping[str, object] | None = None) -> IdfBuildDir:  # fmt: skip
    """Write an ESP-IDF build directory at *dest*: the virtual *base_role* with *flaws*,
    signed with *signing_key* (the virtual set's key, so boards that trust the set boot it)."""
    role = flawed_role(flaws, base_role=base_role, version=version, prov_security=prov_security, extra=extra)
    app = virtual_app_image(role, signing_key)
    bootloader = virtual_bootloader_image(signing_key)
    return write_build_dir(dest, PROJECT_NAME, app, bootloader, RAINMAKER_4MB, SDKCONFIG, ESP32C3.name)

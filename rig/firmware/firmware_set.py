"""A firmware set: one ESP-IDF build directory per role the suites need.

DESIGN.md "Firmware set": ``base`` (what a board normally runs), ``next`` (a higher
version), ``next_secure`` (a higher ``secure_version``), ``crash_on_boot`` and
``no_cloud`` (for rollback). Real farms point ``boards.yaml`` at builds made with
ESP-IDF; virtual boards get the set :mod:`rig.firmware.virtual_set` generates. A role
a farm does not supply makes the tests that need it NOT_APPLICABLE — never silently
passing — which is why :meth:`FirmwareSet.build` raises :class:`MissingRole` with the
role named.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rig.firmware.app_desc import AppDescriptor
from rig.firmware.build_dir import IdfBuildDir, read_build_dir
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.image import EspImage

ROLES: tuple[str, ...] = ("base", "next", "next_secure", "crash_on_boot", "no_cloud")
REQUIRED_ROLES: tuple[str, ...] = ("base",)


class FirmwareSetError(Exception):
    """The firmware set cannot be used at all (no folder, no ``base`` build, a broken build)."""


class MissingRole(LookupError):
    """A role the test needs is not in the set; the test is NOT_APPLICABLE on this board."""

    def __init__(self, root: Path, role: str):
        self.root = root
        self.role = role
        super().__init__(f"firmware set {root} has no '{role}' build (add {root / role}/ with an ESP-IDF build to run this test)")


@dataclass(frozen=True)
class FirmwareSet:
    root: Path
    builds: Mapping[str, IdfBuildDir]

    @classmethod
    def load(cls, root: Path) -> FirmwareSet:
        """Read every role folder present under *root*; ``base`` is required."""
        if not root.is_dir():
            raise FirmwareSetError(
                f"firmware set {root} does not exist. Fix: point firmware: in boards.yaml at a folder with "
                f"{'/, '.join(ROLES)}/ ESP-IDF build directories"
            )
        builds: dict[str, IdfBuildDir] = {}
        for role in ROLES:
            path = root / role
            if not path.is_dir():
                continue
            try:
                builds[role] = read_build_dir(path)
            except (FirmwareFormatError, FileNotFoundError, ValueError) as exc:
                raise FirmwareSetError(f"firmware set {root}, role '{role}': {exc}") from exc
        missing = [r for r in REQUIRED_ROLES if r not in builds]
        if missing:
            raise FirmwareSetError(
                f"firmware set {root} has no '{missing[0]}' build. Fix: add {root / missing[0]}/ "
                "(an ESP-IDF build directory with flasher_args.json) — every suite starts from it"
            )
        return cls(root, builds)

    @property
    def roles(self) -> list[str]:
        return [r for r in ROLES if r in self.builds]

    @property
    def missing_roles(self) -> list[str]:
        return [r for r in ROLES if r not in self.builds]

    def build(self, role: str) -> IdfBuildDir:
        if role not in ROLES:
            raise ValueError(f"unknown firmware role {role!r}; roles are {', '.join(ROLES)}")
        if role not in self.builds:
            raise MissingRole(self.root, role)
        return self.builds[role]

    def app_image(self, role: str) -> EspImage:
        build = self.build(role)
        return EspImage.parse(build.read_app_image(), what=f"{role} app {build.app_bin}")

    def app_desc(self, role: str) -> AppDescriptor:
        return self.app_image(role).app_desc

"""The behaviour manifest a virtual firmware image carries.

A virtual board boots real ESP app images; what the emulated app *does* (boot
normally, panic on boot, never reach the cloud, and which named flaws it has) is
selected by a small manifest the rig places in the image's DROM segment, right after
``esp_app_desc_t`` — where a real app keeps its read-only data. Real ESP-IDF images
have no manifest, and nothing but the virtual board reads it; it is covered by the
image checksum, SHA-256 and Secure Boot V2 signature like every other byte.

Wire form: ``b"RIGVBM01"`` ‖ ``u32 length`` (LE) ‖ UTF-8 JSON object.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Literal

from rig.firmware.app_desc import APP_DESC_LAYOUT, APP_DESC_OFFSET
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.layout import Field, Layout

MANIFEST_MAGIC = b"RIGVBM01"
MANIFEST_HEADER_LAYOUT = Layout(
    "rig behaviour manifest header",
    [Field("magic", "8s", "RIGVBM01"), Field("length", "I", "length of the JSON that follows")],
    source="rig-defined; lives in the DROM segment after esp_app_desc_t",
)
BootBehaviour = Literal["ok", "crash", "no_cloud"]


@dataclass(frozen=True)
class BehaviourManifest:
    boot: BootBehaviour = "ok"
    flaws: tuple[str, ...] = ()
    prov_security: Literal[0, 1, 2] = 2
    rollback_wait_s: int = 15
    extra: dict[str, object] = field(default_factory=dict)

    def to_bytes(self) -> bytes:
        body = json.dumps({**asdict(self), "flaws": list(self.flaws)}, sort_keys=True, separators=(",", ":")).encode()
        return MANIFEST_HEADER_LAYOUT.pack({"magic": MANIFEST_MAGIC, "length": len(body)}) + body

    @classmethod
    def parse(cls, data: bytes, offset: int = 0) -> BehaviourManifest:
        head = MANIFEST_HEADER_LAYOUT.unpack(data, offset, what="behaviour manifest")
        if head["magic"] != MANIFEST_MAGIC:
            raise FirmwareFormatError("behaviour manifest", f"magic {head['magic']!r} is not {MANIFEST_MAGIC!r}", offset)
        start = offset + MANIFEST_HEADER_LAYOUT.size
        body = data[start : start + head["length"]]
        if len(body) != head["length"]:
            raise FirmwareFormatError("behaviour manifest", f"JSON of {head['length']} bytes runs past the end", start)
        try:
            raw = json.loads(body)
            return cls(
                boot=raw.get("boot", "ok"),
                flaws=tuple(raw.get("flaws", ())),
                prov_security=raw.get("prov_security", 2),
                rollback_wait_s=int(raw.get("rollback_wait_s", 15)),
                extra=dict(raw.get("extra", {})),
            )
        except (ValueError, TypeError, AttributeError) as exc:
            raise FirmwareFormatError("behaviour manifest", f"JSON is not a manifest object ({exc})", start) from None

    @classmethod
    def from_image(cls, image: bytes) -> BehaviourManifest | None:
        """The manifest of an app image, or ``None`` for an image without one (e.g. real ESP-IDF firmware)."""
        at = APP_DESC_OFFSET + APP_DESC_LAYOUT.size
        if image[at : at + len(MANIFEST_MAGIC)] != MANIFEST_MAGIC:
            return None
        return cls.parse(image, at)

"""Byte layouts declared as data, scapy-style.

Every on-flash structure the rig reads or writes (image header, app descriptor,
partition entries, otadata, Secure Boot V2 blocks …) is declared once as a
:class:`Layout`: an ordered list of :class:`Field` s with their ``struct`` codes,
next to a citation of the ESP-IDF header it comes from. Parsing and building go
through the layout, so a field's offset and size exist in exactly one place, and a
short buffer becomes a :class:`FirmwareFormatError` naming the structure and offset
instead of a ``struct.error``.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rig.firmware.errors import FirmwareFormatError


@dataclass(frozen=True)
class Field:
    """One field of a little-endian C struct: its name and ``struct`` format code."""

    name: str
    fmt: str
    doc: str = ""

    @property
    def size(self) -> int:
        return struct.calcsize("<" + self.fmt)


class Layout:
    """A packed little-endian structure built from a list of :class:`Field` s."""

    def __init__(self, name: str, fields: Sequence[Field], source: str = ""):
        self.name = name
        self.fields = tuple(fields)
        self.source = source
        self._struct = struct.Struct("<" + "".join(f.fmt for f in self.fields))
        self._offsets: dict[str, int] = {}
        at = 0
        for f in self.fields:
            if f.name in self._offsets:
                raise ValueError(f"{name}: field {f.name!r} declared twice")
            self._offsets[f.name] = at
            at += f.size
        if at != self._struct.size:  # pragma: no cover - guards against alignment codes
            raise ValueError(f"{name}: field sizes do not add up to the struct size")

    @property
    def size(self) -> int:
        return self._struct.size

    def offset_of(self, name: str) -> int:
        """Byte offset of field *name* inside the structure."""
        return self._offsets[name]

    def field(self, name: str) -> Field:
        return self.fields[list(self._offsets).index(name)]

    def unpack(self, data: bytes | bytearray | memoryview, offset: int = 0, what: str | None = None) -> dict[str, Any]:
        """Read the structure at *offset*; a short buffer is a :class:`FirmwareFormatError`."""
        end = offset + self.size
        if offset < 0 or end > len(data):
            raise FirmwareFormatError(
                what or self.name,
                f"needs {self.size} bytes for {self.name} but only {max(0, len(data) - offset)} remain",
                offset,
                "the file is truncated or this is not the artefact you meant",
            )
        values = self._struct.unpack_from(data, offset)
        return {f.name: v for f, v in zip(self.fields, values, strict=True)}

    def pack(self, values: Mapping[str, Any]) -> bytes:
        """Build the structure from *values*; every field must be given."""
        missing = [f.name for f in self.fields if f.name not in values]
        if missing:
            raise ValueError(f"{self.name}: no value for {', '.join(missing)}")
        extra = set(values) - set(self._offsets)
        if extra:
            raise ValueError(f"{self.name}: unknown field(s) {', '.join(sorted(extra))}")
        return self._struct.pack(*(values[f.name] for f in self.fields))


def cstr(raw: bytes) -> str:
    """Decode a NUL-padded C char array as ESP-IDF prints it (up to the first NUL)."""
    return raw.split(b"\0", 1)[0].decode("utf-8", errors="replace")


def cstr_field(text: str, size: int, what: str) -> bytes:
    """Encode *text* for a ``char[size]`` field, refusing what would not fit with its NUL."""
    raw = text.encode("utf-8")
    if len(raw) >= size:
        raise ValueError(f"{what} {text!r} is {len(raw)} bytes; the field holds at most {size - 1}")
    return raw.ljust(size, b"\0")

"""The real esptool, driven as a lab engineer would drive it, for tests to judge the rig by.

* :func:`run_esptool` runs ``python -m esptool ...`` (the esptool installed next to the
  rig) in a subprocess;
* :func:`image_info` runs ``esptool image-info FILE`` and parses what it prints into an
  :class:`ImageInfo`;
* :func:`riscv_elf` writes a minimal 32-bit RISC-V ELF (sections only) and
  :func:`elf2image` turns one into an app image with ``esptool elf2image``, so tests
  have images made by the real tool to compare with.

Quirks of esptool 5.6 worth knowing when reading its verdicts:

* ``image-info`` exits 0 for an image whose checksum or digest is wrong; it only
  prints ``(invalid ...)``. It exits 2 (``A fatal error occurred``) for a bad magic
  byte or a segment running past the end of the file, and dies with a Python
  ``TypeError`` traceback (exit 1) when the file ends inside the checksum block.
* ``Validation hash:`` shows the digest esptool *calculates*, not the stored one.
* The chip is guessed from the header's chip id (low byte only); an image with
  another chip id is printed as that chip's image, with no complaint.
* ``image-info`` does not check that IROM/DROM segments are aligned to their flash
  offset modulo 64 KB; only ESP-IDF (and ``elf2image`` while building) cares.
* App strings are shown with every NUL removed (``sanitize_string``), not cut at the
  first NUL as ESP-IDF does, and non-UTF-8 bytes crash it.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ESPTOOL_TIMEOUT_S = 60


def run_esptool(*args: str | Path, timeout: float = ESPTOOL_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """Run ``python -m esptool ARGS`` with the interpreter running the tests; never raises on exit code."""
    return subprocess.run(
        [sys.executable, "-m", "esptool", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "200"},
        check=False,
    )


@dataclass(frozen=True)
class InfoSegment:
    """One row of image-info's "Segments Information" table."""

    index: int
    length: int
    load_addr: int
    file_offset: int
    memory_types: str


@dataclass
class ImageInfo:
    """What ``esptool image-info`` said about a file."""

    returncode: int
    stdout: str
    stderr: str
    chip: str | None = None
    entry: int | None = None
    segment_count: int | None = None
    flash_size: str | None = None
    flash_freq: str | None = None
    flash_mode: str | None = None
    chip_id: int | None = None
    min_rev: str | None = None
    max_rev: str | None = None
    segments: list[InfoSegment] = field(default_factory=list)
    checksum: int | None = None
    checksum_valid: bool | None = None
    calculated_checksum: int | None = None
    validation_hash: str | None = None
    hash_valid: bool | None = None
    app: dict[str, str] = field(default_factory=dict)
    """"Application Information" lines, keyed as printed ("Project name", "App version", …)."""

    @property
    def fatal_error(self) -> str | None:
        """The ``A fatal error occurred: ...`` text, if esptool gave up."""
        m = re.search(r"A fatal error occurred: (.*)", self.stdout + self.stderr)
        return m.group(1).strip() if m else None


def _int(text: str) -> int:
    return int(text, 0)


def parse_image_info(returncode: int, stdout: str, stderr: str) -> ImageInfo:
    """Parse ``esptool image-info`` output (esptool 5.x format)."""
    info = ImageInfo(returncode, stdout, stderr)
    section = ""
    lines = stdout.splitlines()
    for i, line in enumerate(lines):
        if i + 1 < len(lines) and lines[i + 1].startswith("===="):
            section = line.strip()
            continue
        if m := re.match(r"Detected image type: (\S+)", line):
            info.chip = m.group(1)
        elif m := re.match(r"Entry point: +(0x[0-9a-f]+)", line):
            info.entry = _int(m.group(1))
        elif m := re.match(r"Segments: (\d+)", line):
            info.segment_count = int(m.group(1))
        elif m := re.match(r"Flash size: (\S+)", line):
            info.flash_size = m.group(1)
        elif m := re.match(r"Flash freq: (\S+)", line):
            info.flash_freq = m.group(1)
        elif m := re.match(r"Flash mode: (\S+)", line):
            info.flash_mode = m.group(1)
        elif m := re.match(r"Chip ID: (\d+)", line):
            info.chip_id = int(m.group(1))
        elif m := re.match(r"Minimal chip revision: (v[\d.]+)", line):
            info.min_rev = m.group(1)
        elif m := re.match(r"Maximal chip revision: (v[\d.]+)", line):
            info.max_rev = m.group(1)
        elif section == "Segments Information" and (
            m := re.match(r"\s*(\d+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s+(0x[0-9a-f]+)\s*(.*)$", line)
        ):
            info.segments.append(
                InfoSegment(int(m.group(1)), _int(m.group(2)), _int(m.group(3)), _int(m.group(4)), m.group(5).strip())
            )
        elif m := re.match(r"Checksum: (0x[0-9a-f]+) \((valid|invalid - calculated (0x[0-9a-f]+))\)", line):
            info.checksum = _int(m.group(1))
            info.checksum_valid = m.group(2) == "valid"
            info.calculated_checksum = _int(m.group(3)) if m.group(3) else info.checksum
        elif m := re.match(r"Validation hash: ([0-9a-f]{64}) \((valid|invalid)\)", line):
            info.validation_hash = m.group(1)
            info.hash_valid = m.group(2) == "valid"
        elif section == "Application Information" and ": " in line:
            key, value = line.split(": ", 1)
            info.app[key] = value
    return info


def image_info(path: str | Path) -> ImageInfo:
    """Run ``esptool image-info PATH`` and parse its report."""
    proc = run_esptool("image-info", path)
    return parse_image_info(proc.returncode, proc.stdout, proc.stderr)


# --------------------------------------------------------------------------- ELF input for elf2image

EM_RISCV = 0xF3
SHT_PROGBITS, SHT_STRTAB = 1, 3
SHF_ALLOC, SHF_EXECINSTR = 2, 4


def riscv_elf(sections: Sequence[tuple[str, int, bytes]], entry: int) -> bytes:
    """A minimal little-endian ELF32 RISC-V executable with the given ``(name, addr, data)``
    PROGBITS sections (allocated; executable when the name ends in ``.text``), no
    program headers, and a section-name string table: enough for ``esptool elf2image``.
    """
    names = b"\0"
    name_offsets = []
    for name, _, _ in sections:
        name_offsets.append(len(names))
        names += name.encode() + b"\0"
    shstrtab_name = len(names)
    names += b".shstrtab\0"

    body = bytearray(52)  # ELF header, filled in last
    data_offsets = []
    for _, _, data in sections:
        body += bytes(-len(body) % 4)
        data_offsets.append(len(body))
        body += data
    body += bytes(-len(body) % 4)
    strtab_offset = len(body)
    body += names
    body += bytes(-len(body) % 4)
    shoff = len(body)

    def shdr(name: int, sh_type: int, flags: int, addr: int, offset: int, size: int, align: int) -> bytes:
        return struct.pack("<IIIIIIIIII", name, sh_type, flags, addr, offset, size, 0, 0, align, 0)

    body += shdr(0, 0, 0, 0, 0, 0, 0)
    for (name, addr, data), name_off, off in zip(sections, name_offsets, data_offsets, strict=True):
        flags = SHF_ALLOC | (SHF_EXECINSTR if name.endswith(".text") else 0)
        body += shdr(name_off, SHT_PROGBITS, flags, addr, off, len(data), 4)
    body += shdr(shstrtab_name, SHT_STRTAB, 0, 0, strtab_offset, len(names), 1)
    shnum = len(sections) + 2
    ident = b"\x7fELF" + bytes([1, 1, 1, 0]) + bytes(8)  # ELFCLASS32, ELFDATA2LSB, EV_CURRENT
    body[:52] = struct.pack(
        "<16sHHIIIIIHHHHHH", ident, 2, EM_RISCV, 1, entry, 0, shoff, 0, 52, 32, 0, 40, shnum, shnum - 1
    )
    return bytes(body)


def elf2image(elf: Path, out: Path, *options: str) -> bytes:
    """``esptool --chip esp32c3 elf2image`` with ESP-IDF's C3 defaults (DIO, 80m, 4MB, chip
    rev v0.3..v1.99) plus *options*; returns the image bytes or fails with esptool's output."""
    proc = run_esptool(
        "--chip", "esp32c3", "elf2image",
        "--flash-mode", "dio", "--flash-freq", "80m", "--flash-size", "4MB",
        "--min-rev-full", "3", "--max-rev-full", "199",
        *options, "-o", out, elf,
    )  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(f"esptool elf2image failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return out.read_bytes()

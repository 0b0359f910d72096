"""Sample firmware inputs shared by the image-format tests.

* :data:`DESC` is the app descriptor of the sample "rmaker_switch" images
  (``tests/test_image.py``, ``tests/test_variants.py``); :data:`MANIFEST` and
  :data:`MANIFEST_WITH_FLAWS` are the DROM payloads they carry;
* :data:`FULL_DESC` sets every descriptor field away from its default;
  ``tests/test_app_desc.py`` spells out its bytes as a known answer;
* :data:`SPIN` is a RISC-V instruction to fill code segments with.
"""

from __future__ import annotations

import hashlib

from rig.firmware.app_desc import AppDescriptor

DESC = AppDescriptor(
    version="1.4.2",
    project_name="rmaker_switch",
    secure_version=2,
    time="09:15:00",
    date="Feb 11 2025",
    idf_ver="v5.4.1",
    app_elf_sha256=hashlib.sha256(b"switch.elf").digest(),
)
FULL_DESC = AppDescriptor(
    version="2.3.1",
    project_name="rmaker_switch",
    secure_version=7,
    time="12:34:56",
    date="Mar  4 2025",
    idf_ver="v5.4.1-dirty",
    app_elf_sha256=bytes(range(32)),
    min_efuse_blk_rev_full=1,
    max_efuse_blk_rev_full=199,
    mmu_page_size=16,
)
MANIFEST = b'{"behaviour": "boot_ok"}'
MANIFEST_WITH_FLAWS = b'{"behaviour": "boot_ok", "flaws": []}'
SPIN = bytes.fromhex("6f000000")  # RISC-V "j ."

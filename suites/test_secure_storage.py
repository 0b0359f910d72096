"""Secure storage: what the user gives the device is not readable off its flash (EN 303 645 5.4-1).

A provisioned node keeps the Wi-Fi passphrase the app handed it (ESP-IDF's ``nvs.net80211``),
its local-control PoP (esp-rainmaker ``esp_rmaker_local_ctrl.c``) and the user mapping in its
``nvs`` partition. Anyone holding the board can read its flash with esptool while download
mode is enabled (or with a clip on the SPI chip), so those must be stored encrypted: ESP-IDF's
NVS encryption (``nvs_encryption.rst``), keyed from an eFuse HMAC key or from an ``nvs_keys``
partition under flash encryption.

The suite does what a test lab does for 5.4-1 (etsi-en-303-645.md, 5.4-1 row: dump the flash,
grep for the provisioned Wi-Fi credentials and PoPs, expect ciphertext): after onboarding it reads
every partition that is not an app slot — NVS, factory data, otadata, PHY data, custom data
partitions — with esptool over the console's own port, and searches them for each secret in
every encoding the wire check searches (:mod:`rig.capture.canaries`: raw, hex, base64, JSON,
URL, UTF-16). App slots hold the signed images the cloud served, not data the device wrote.
Then it checks that the key NVS encryption hangs on cannot be read out either (``espefuse
summary``).

Out of scope here: the node's own identity in ``fctry`` (its private key is stored in clear unless
the firmware enables ``CONFIG_ESP_RMAKER_ENCRYPT_FACTORY_PARTITION`` under flash encryption —
a 5.4-2 question), and flash encryption itself.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pytest

from fixtures.evidence import Evidence
from fixtures.node import FreshNode, ProvisionedNode, lab_ap, read_qr, read_range
from fixtures.ota import efuse_summary_through_console
from rig.capture.canaries import MIN_CANARY_LEN, patterns, search
from rig.firmware.firmware_set import FirmwareSet
from rig.firmware.partition_table import DataSubtype, Partition, PartitionTable, PartitionType
from rig.lab import Lab
from rig.prov.local_ctrl import wait_local_control_service

LOCAL_CTRL_TIMEOUT_S = 15.0
KEY_BLOCKS = 6
"""BLOCK_KEY0..5 of the ESP32-C3 (and of every chip with the HMAC peripheral)."""
HMAC_UP = "HMAC_UP"
"""The key purpose ESP-IDF's HMAC-based NVS scheme burns (``nvs_sec_provider``)."""


@dataclass(frozen=True)
class FlashRange:
    """Partitions that lie back to back, read with one esptool run."""

    partitions: tuple[Partition, ...]

    @property
    def offset(self) -> int:
        return self.partitions[0].offset

    @property
    def size(self) -> int:
        return self.partitions[-1].end - self.offset


def data_ranges(table: PartitionTable) -> list[FlashRange]:
    """Every partition that is not an app slot, grouped into contiguous runs (one read each)."""
    ranges: list[list[Partition]] = []
    for part in sorted((p for p in table.partitions if p.type != PartitionType.APP), key=lambda p: p.offset):
        if ranges and ranges[-1][-1].end == part.offset:
            ranges[-1].append(part)
        else:
            ranges.append([part])
    return [FlashRange(tuple(run)) for run in ranges]


def user_secrets(provisioned_node: ProvisionedNode, lab: Lab) -> dict[str, str]:
    """What the node was given or holds for its user, by label (what a finding names)."""
    ap = lab_ap(lab)
    secrets = {"the Wi-Fi passphrase": ap.passphrase.get_secret_value()}
    if len(ap.ssid.encode()) >= MIN_CANARY_LEN:
        secrets["the Wi-Fi SSID"] = ap.ssid
    if provisioned_node.qr.pop:
        secrets["the provisioning PoP"] = provisioned_node.qr.pop
    local_ctrl = wait_local_control_service(provisioned_node.user, provisioned_node.node_id, LOCAL_CTRL_TIMEOUT_S)
    if local_ctrl is not None and local_ctrl.pop:
        secrets["the local-control PoP"] = local_ctrl.pop
    return secrets


@pytest.mark.etsi("5.4-1")
def test_user_secrets_are_not_readable_in_flash(provisioned_node: ProvisionedNode, dut: Any, lab: Lab,
                                                firmware_set: FirmwareSet, evidence: Evidence) -> None:  # fmt: skip
    secrets = user_secrets(provisioned_node, lab)
    compiled = patterns(secrets)
    table = firmware_set.build("base").read_partition_table()
    findings: list[str] = []
    searched: dict[str, dict[str, object]] = {}
    for run in data_ranges(table):
        data = read_range(dut, run.offset, run.size)
        for part in run.partitions:
            start = part.offset - run.offset
            chunk = data[start : start + part.size]
            hits = search(chunk, compiled)
            searched[part.name] = {
                "offset": hex(part.offset), "size": part.size, "sha256": hashlib.sha256(chunk).hexdigest(),
                "hits": [{"secret": label, "encoding": enc, "offset": hex(at)} for label, enc, at, _ in hits],
            }  # fmt: skip
            findings += [f"{label} is readable in clear ({enc}) in partition '{part.name}' at offset 0x{at:x} "
                         f"(flash 0x{part.offset + at:x})" for label, enc, at, _ in hits]  # fmt: skip
    evidence.attach_json("flash-search.json", {"secrets": sorted(secrets), "partitions": searched})
    assert not findings, (
        "sensitive data is stored unencrypted (5.4-1): " + "; ".join(findings[:6])
        + (f"; and {len(findings) - 6} more" if len(findings) > 6 else "")
        + ". Enable NVS encryption (CONFIG_NVS_ENCRYPTION, HMAC- or flash-encryption-based)"
    )  # fmt: skip


def key_purpose(summary: dict[str, Any], block: int) -> str:
    """``KEY_PURPOSE_n`` as espefuse names it (``HMAC_UP``)."""
    return str(summary.get(f"KEY_PURPOSE_{block}", {}).get("value", "")).split(" ", 1)[0]


def key_readable(summary: dict[str, Any], block: int) -> bool:
    return bool(summary.get(f"BLOCK_KEY{block}", {}).get("readable", True))


def flash_encryption_on(summary: dict[str, Any]) -> bool:
    """``SPI_BOOT_CRYPT_CNT`` with an odd number of bits set (ESP-IDF ``esp_flash_encryption_enabled``)."""
    raw = summary.get("SPI_BOOT_CRYPT_CNT", {}).get("raw_value", "0x0")
    return bin(int(str(raw), 0)).count("1") % 2 == 1


@pytest.mark.etsi("5.4-1", "5.4-2")
def test_nvs_encryption_key_cannot_be_read_out(fresh_node: FreshNode, dut: Any, firmware_set: FirmwareSet,
                                               evidence: Evidence) -> None:  # fmt: skip
    """The key NVS encryption hangs on is on the chip and unreadable: an eFuse key of purpose
    HMAC_UP, read-protected (the HMAC scheme: the firmware burns it on its first boot), or an
    ``nvs_keys`` partition under flash encryption (the flash-encryption scheme)."""
    read_qr(dut)  # the app has initialised NVS (and, on a first boot, made its key)
    summary = efuse_summary_through_console(dut)
    blocks = {n: {"purpose": key_purpose(summary, n), "readable": key_readable(summary, n)} for n in range(KEY_BLOCKS)}
    table = firmware_set.build("base").read_partition_table()
    keys_partitions = [p.name for p in table.find_type(PartitionType.DATA, DataSubtype.NVS_KEYS)]
    evidence.attach_json("nvs-key-protection.json", {"key_blocks": blocks, "nvs_keys_partitions": keys_partitions,
                                                     "flash_encryption": flash_encryption_on(summary)})  # fmt: skip
    hmac_keys = [n for n, block in blocks.items() if block["purpose"] == HMAC_UP]
    if hmac_keys:
        readable = [n for n in hmac_keys if blocks[n]["readable"]]
        assert not readable, f"the NVS HMAC key in BLOCK_KEY{readable[0]} is readable (no RD_DIS): anyone can decrypt NVS (5.4-2)"
        return
    why = "flash encryption is off, so the nvs_keys partition is readable"
    if not keys_partitions:
        why = "the partition table has no nvs_keys partition"
    assert keys_partitions and flash_encryption_on(summary), (
        f"NVS encryption has no protected key: no eFuse key block has purpose HMAC_UP, and {why} (5.4-1). "
        "Enable CONFIG_NVS_ENCRYPTION with CONFIG_NVS_SEC_KEY_PROTECT_USING_HMAC, or flash encryption"
    )

"""Writing a new app into the passive OTA slot and selecting it: the app side of esp-idf's
``components/app_update/esp_ota_ops.c`` as ``esp_https_ota`` drives it.

* :meth:`OtaUpdate.begin` — ``esp_ota_get_next_update_partition(NULL)`` (the OTA slot after
  the running one; ``ota_0`` when a factory app runs) and ``esp_ota_begin(...,
  OTA_WITH_SEQUENTIAL_WRITES)``: refused while the running app is still
  ``PENDING_VERIFY`` (``ESP_ERR_OTA_ROLLBACK_INVALID_STATE``), nothing erased yet;
* :meth:`OtaUpdate.write` — ``esp_ota_write``: each 4 KB sector is erased as the data
  first reaches it; a first byte other than 0xE9 is ``ESP_ERR_OTA_VALIDATE_FAILED``;
* :meth:`OtaUpdate.end` — ``esp_ota_end`` → ``esp_image_verify``: the image in flash is
  checked **by the emulated bootloader's own code** (:func:`rig.vboard.bootloader.verify_app_partition`:
  header, chip id and revision, segments, checksum, SHA-256, and the Secure Boot V2
  signature against the eFuse digests when ``SECURE_BOOT_EN`` is burned). The virtual
  firmware is built with ``CONFIG_SECURE_SIGNED_ON_UPDATE`` (``rig.firmware.virtual_set.SDKCONFIG``):
  on a chip without Secure Boot enabled the new image must carry a signature by a key that
  signed the running app (``esp_secure_boot_verify_sbv2_signature_block`` taking its
  trusted digests from the running app's signature blocks), checked by the same
  bootloader code with those digests in place of the eFuse's (``signed_by``);
* :meth:`OtaUpdate.set_boot_partition` — ``esp_ota_set_boot_partition``: with
  anti-rollback a ``secure_version`` below the eFuse erases the slot
  (``ESP_ERR_OTA_SMALL_SEC_VER``); otherwise ``esp_rewrite_ota_data`` writes the other
  otadata sector with state NEW (``CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE``), through
  :meth:`rig.firmware.otadata.OtaDataPartition.set_boot_slot` (rainmaker-protocol.md §6.1).

Flaws (``rig.vboard.flaws``): ``accepts_unsigned_ota`` verifies everything but the
signature (an app built without ``CONFIG_SECURE_SIGNED_ON_UPDATE``);
``ignores_secure_version`` skips the anti-rollback check here (an app built without
``CONFIG_BOOTLOADER_APP_ANTI_ROLLBACK``) — the bootloader still applies its own at boot.

Not emulated: ``esp_ota_invalidate_inactive_ota_data_slot`` (newer than the virtual
firmware's ESP-IDF v5.4) and the second ``esp_image_verify`` inside
``esp_ota_set_boot_partition`` (same flash, same verdict).
"""

from __future__ import annotations

from dataclasses import dataclass

from rig.firmware.app_desc import APP_DESC_LAYOUT, APP_DESC_OFFSET, AppDescriptor
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.image import IMAGE_MAGIC, EspImage
from rig.firmware.otadata import OtaState
from rig.firmware.secure_boot_v2 import SECTOR_SIZE as SIGNATURE_SECTOR_SIZE
from rig.firmware.secure_boot_v2 import parse_signature_sector
from rig.vboard.app import AppContext, OtaOpsError, running_app_ota_state
from rig.vboard.bootloader import BootEfuses, PartitionEntry, read_otadata, verify_app_partition, write_otadata_entry
from rig.vboard.flash import SECTOR_SIZE
from rig.vboard.node.messages import NodeMsg
from rig.vboard.node.runtime import NodeRuntime

__all__ = ["OtaChecks", "OtaUpdate", "next_update_partition"]


@dataclass(frozen=True)
class OtaChecks:
    """Which of esp_ota_ops' checks the firmware was built with (flaws turn them off)."""

    signature: bool = True
    secure_version: bool = True


class _SignatureUnchecked:
    """The chip's eFuses as firmware without signature checking sees them: Secure Boot reads
    as off, so the bootloader's image checks run without the signature step."""

    def __init__(self, efuse: BootEfuses):
        self._efuse = efuse

    @property
    def secure_boot_enabled(self) -> bool:
        return False

    def __getattr__(self, name: str) -> object:
        return getattr(self._efuse, name)


def _align_up(value: int, align: int) -> int:
    return -(-value // align) * align


def next_update_partition(ctx: AppContext) -> PartitionEntry | None:
    """``esp_ota_get_next_update_partition(NULL)``: the OTA slot after the running one, wrapping
    around; the first OTA slot when the running app is not in one. None without OTA slots."""
    slots = [p for p in ctx.boot.app_slots if p is not None]
    if not slots:
        return None
    running = ctx.boot.partition
    if running is None or running.ota_slot is None:
        return slots[0]
    later = [p for p in slots if p.ota_slot is not None and p.ota_slot > running.ota_slot]
    candidate = later[0] if later else slots[0]
    return None if candidate == running else candidate


class OtaUpdate:
    """One ``esp_ota_begin`` … ``esp_ota_set_boot_partition`` on *partition*."""

    def __init__(self, ctx: AppContext, runtime: NodeRuntime, partition: PartitionEntry, checks: OtaChecks):
        self.ctx = ctx
        self.runtime = runtime
        self.partition = partition
        self.checks = checks
        self.written = 0

    @classmethod
    def begin(cls, ctx: AppContext, runtime: NodeRuntime, partition: PartitionEntry, checks: OtaChecks) -> OtaUpdate:
        """``esp_ota_begin(partition, OTA_WITH_SEQUENTIAL_WRITES)``."""
        if partition == ctx.boot.partition:
            raise OtaOpsError("ESP_ERR_OTA_PARTITION_CONFLICT", f"{partition.label} is the running app's partition")
        if ctx.config.rollback and running_app_ota_state(ctx.boot, ctx.flash) is OtaState.PENDING_VERIFY:
            runtime.log(NodeMsg.OTA_OPS_PENDING)
            raise OtaOpsError("ESP_ERR_OTA_ROLLBACK_INVALID_STATE", "the running app is not confirmed yet")
        return cls(ctx, runtime, partition, checks)

    def write(self, data: bytes) -> None:
        """``esp_ota_write``: erase each sector the data enters first, then program it."""
        if not data:
            return
        if self.written == 0 and data[0] != IMAGE_MAGIC:
            self.runtime.log(NodeMsg.OTA_OPS_BAD_MAGIC, byte=data[0])
            raise OtaOpsError("ESP_ERR_OTA_VALIDATE_FAILED", f"the image starts with 0x{data[0]:02x}, not 0xE9")
        end = self.written + len(data)
        if end > self.partition.size:
            raise OtaOpsError("ESP_ERR_INVALID_SIZE", f"the image is longer than {self.partition.label} (0x{self.partition.size:x})")
        first = _align_up(self.written, SECTOR_SIZE)
        last = _align_up(end, SECTOR_SIZE)
        if last > first:
            self.ctx.flash.erase(self.partition.offset + first, last - first)
        self.ctx.flash.write(self.partition.offset + self.written, data)
        self.written = end

    def end(self) -> None:
        """``esp_ota_end``: verify the image in flash as the bootloader will; ``ESP_ERR_OTA_VALIDATE_FAILED`` if not."""
        if self.written == 0:
            raise OtaOpsError("ESP_ERR_INVALID_ARG", "nothing was written")
        efuse = self.ctx.efuse
        if not self.checks.signature:
            ok = verify_app_partition(self.ctx.flash, self.partition, _SignatureUnchecked(efuse))  # type: ignore[arg-type]
        elif efuse.secure_boot_enabled:
            ok = verify_app_partition(self.ctx.flash, self.partition, efuse)
        else:  # CONFIG_SECURE_SIGNED_ON_UPDATE: signed by a key of the running app
            ok = verify_app_partition(self.ctx.flash, self.partition, efuse, signed_by=_running_app_key_digests(self.ctx))
        if not ok:
            self.runtime.log(NodeMsg.OTA_OPS_VERIFY_FAILED)
            raise OtaOpsError("ESP_ERR_OTA_VALIDATE_FAILED", f"the image in {self.partition.label} does not verify")

    def set_boot_partition(self) -> None:
        """``esp_ota_set_boot_partition``: the anti-rollback check, then otadata selects the slot (state NEW)."""
        if self.ctx.config.anti_rollback and self.checks.secure_version:
            desc = self._app_desc()
            if desc is not None and desc.secure_version < self.ctx.efuse.secure_version:
                self.runtime.log(NodeMsg.OTA_OPS_LOWER_SECURE_VERSION)
                self.ctx.flash.erase(self.partition.offset, self.partition.size)
                raise OtaOpsError("ESP_ERR_OTA_SMALL_SEC_VER",
                                  f"secure_version {desc.secure_version} < eFuse SECURE_VERSION {self.ctx.efuse.secure_version}")
        otadata_part = self.ctx.boot.otadata_partition
        slot = self.partition.ota_slot
        if otadata_part is None or slot is None:
            raise OtaOpsError("ESP_ERR_NOT_FOUND", "no otadata partition to select the new app with")
        otadata = read_otadata(self.ctx.flash, otadata_part)
        for sector in otadata.set_boot_slot(slot, len(self.ctx.boot.app_slots), rollback_enabled=self.ctx.config.rollback):
            write_otadata_entry(self.ctx.flash, otadata_part, sector, otadata.entries[sector])

    # ------------------------------------------------------------------ helpers

    def _app_desc(self) -> AppDescriptor | None:
        try:
            return AppDescriptor.parse(self.ctx.flash.read(self.partition.offset, APP_DESC_OFFSET + APP_DESC_LAYOUT.size), APP_DESC_OFFSET)
        except FirmwareFormatError:
            return None


def _running_app_key_digests(ctx: AppContext) -> list[bytes | None]:
    """``esp_secure_boot_get_signature_blocks_for_running_app``: the key digest of each valid
    signature block of the running app (its signature sector follows the image, 4 KB aligned)."""
    running = ctx.boot.partition
    if running is None:
        return []
    try:
        length = EspImage.parse(ctx.boot.image).image_length
    except FirmwareFormatError:
        return []
    at = running.offset + _align_up(length, SIGNATURE_SECTOR_SIZE)
    if at + SIGNATURE_SECTOR_SIZE > running.offset + running.size:
        return []
    blocks = parse_signature_sector(ctx.flash.read(at, SIGNATURE_SECTOR_SIZE))
    return [b.key_digest() if b is not None else None for b in blocks]

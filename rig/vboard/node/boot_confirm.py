"""Confirming a new firmware image only once it has reached the cloud, or rolling it back.

esp-rainmaker ``src/ota/esp_rmaker_ota.c`` ``esp_rmaker_ota_manage_rollback``,
``esp_rmaker_ota_mark_valid`` and ``esp_ota_rollback`` (rainmaker-protocol.md §1.5, §6.2):
at every boot the running image's otadata state is logged (``OTA state = N``). On the
first boot after an OTA it is ``PENDING_VERIFY``; RainMaker marks it valid
(``esp_ota_mark_app_valid_cancel_rollback``, which with anti-rollback also raises the eFuse
``SECURE_VERSION``, and stops the rollback timer) only after MQTT connects, erases the NVS ``ota_update`` flag and reports
``success`` ``OTA Upgrade finished and verified successfully`` for the job kept in NVS; if
MQTT does not connect within ``CONFIG_ESP_RMAKER_OTA_ROLLBACK_WAIT_PERIOD`` — here the
image's ``rollback_wait_s`` (behaviour manifest, short for virtual firmware) — it calls
``esp_ota_mark_app_invalid_rollback_and_reboot``. A boot that finds the ``ota_update`` flag
while its image is *not* pending verification runs the old firmware after a rollback (the
bootloader refused or aborted the new one): it reports ``rejected`` ``Firmware rolled back``
once MQTT connects.

Flaw ``confirms_before_cloud`` (``rig.vboard.flaws``): the image marks itself valid right at
boot, so it can never roll back; it still reports ``success`` when it reaches the cloud.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from rig.firmware.otadata import OtaState
from rig.vboard.app import AppContext, OtaOpsError, mark_app_invalid_and_reboot, mark_app_valid, running_app_ota_state
from rig.vboard.node.messages import NodeMsg
from rig.vboard.node.ota_status import OtaReporter, OtaStatus
from rig.vboard.node.runtime import NodeRuntime, Timer

log = logging.getLogger(__name__)

VERIFIED_INFO = "OTA Upgrade finished and verified successfully"
ROLLED_BACK_INFO = "Firmware rolled back"


class BootConfirmation:
    """The pending-verify watch of one boot.

    *on_verified()* runs after the image was confirmed and reported (RainMaker then fetches
    OTA details again); *confirm_at_boot* is the ``confirms_before_cloud`` flaw.
    """

    def __init__(self, ctx: AppContext, runtime: NodeRuntime, reporter: OtaReporter, wait_s: int, *,
                 confirm_at_boot: bool = False, on_verified: Callable[[], None] | None = None):  # fmt: skip
        self.ctx = ctx
        self.runtime = runtime
        self.reporter = reporter
        self.wait_s = wait_s
        self.confirm_at_boot = confirm_at_boot
        self.on_verified = on_verified
        self._lock = threading.Lock()
        self.pending = False
        """The image booted in ``PENDING_VERIFY`` (an update being verified)."""
        self.confirmed = False
        """Decided: confirmed, or the rollback started."""
        self.rolled_back = False
        """This boot runs the old firmware after a rollback; reported on the first connection."""
        self._report_success = False
        self._rollback_timer: Timer | None = None

    @property
    def awaiting(self) -> bool:
        """An update is still being verified (RainMaker's ``ota_in_progress`` at boot): no new OTA meanwhile."""
        with self._lock:
            return self.pending and not self.confirmed

    def check_at_boot(self) -> None:
        """``esp_rmaker_ota_manage_rollback``."""
        flag = self.reporter.update_flag()
        state = running_app_ota_state(self.ctx.boot, self.ctx.flash)
        if state is None:
            return
        self.runtime.log(NodeMsg.OTA_STATE, state=int(state))
        if state is not OtaState.PENDING_VERIFY:
            if flag:
                self.rolled_back = True
                self.reporter.clear_update_flag()
            return
        self.pending = True
        self.runtime.log(NodeMsg.OTA_FIRST_BOOT)
        self.runtime.log(NodeMsg.OTA_DIAGNOSTICS_OK)
        if self.confirm_at_boot:
            self._confirm()
            return
        self._rollback_timer = self.runtime.after(self.wait_s, "ota_rollback_tm", self._expired)

    def mqtt_connected(self) -> None:
        """Report a rollback (once), or confirm a pending image (once) and report it."""
        with self._lock:
            rolled_back, self.rolled_back = self.rolled_back, False
        if rolled_back:
            self.reporter.report(OtaStatus.REJECTED, ROLLED_BACK_INFO)
        if self.confirm_at_boot:
            with self._lock:
                report, self._report_success = self._report_success, False
            if report:
                self._verified()
            return
        if self._confirm():
            self._verified()

    def _confirm(self) -> bool:
        """``esp_rmaker_ota_mark_valid`` up to the report: True when this call confirmed the image."""
        with self._lock:
            if not self.pending or self.confirmed:
                return False
            self.confirmed = True
            timer, self._rollback_timer = self._rollback_timer, None
        if timer is not None:
            timer.cancel()  # esp_rmaker_ota_mark_valid stops and deletes the rollback timer
        try:
            mark_app_valid(self.ctx.boot, self.ctx.flash, self.ctx.efuse, self.ctx.console, self.ctx.config)
        except OtaOpsError as exc:
            log.warning("virtual board %s: could not confirm the running image: %s", self.runtime.board, exc)
            return False
        self.reporter.clear_update_flag()
        with self._lock:
            self._report_success = self.confirm_at_boot
        return True

    def _verified(self) -> None:
        self.reporter.report(OtaStatus.SUCCESS, VERIFIED_INFO)
        if self.on_verified is not None:
            self.on_verified()

    def _expired(self) -> None:
        with self._lock:
            if self.confirmed:
                return
            self.confirmed = True  # nothing confirms it any more
        self.runtime.log(NodeMsg.OTA_ROLLBACK, seconds=self.wait_s)
        try:
            ended = mark_app_invalid_and_reboot(self.ctx.boot, self.ctx.flash, self.ctx.efuse, self.ctx.console, self.ctx.config)
        except OtaOpsError as exc:
            log.warning("virtual board %s: rollback impossible: %s", self.runtime.board, exc)
            return
        self.ctx.request_exit(ended)

"""Confirming a new firmware image only once it has reached the cloud, or rolling it back.

esp-rainmaker ``src/ota/esp_rmaker_ota.c`` (rainmaker-protocol.md §1.5, §6.2): on the first
boot after an OTA the running image's otadata entry is ``PENDING_VERIFY``; RainMaker marks
it valid (``esp_ota_mark_app_valid_cancel_rollback``) only after MQTT connects, and if that
does not happen within ``CONFIG_ESP_RMAKER_OTA_ROLLBACK_WAIT_PERIOD`` it calls
``esp_ota_mark_app_invalid_rollback_and_reboot``. The wait is the image's
``rollback_wait_s`` (behaviour manifest). With a job id stored in NVS
(``rmaker_ota``/``rmaker_ota_id``) the verified image reports ``success`` on ``otastatus``.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable

from rig.firmware.otadata import OtaState
from rig.vboard.app import AppContext, OtaOpsError, mark_app_invalid_and_reboot, mark_app_valid, running_app_ota_state
from rig.vboard.bootloader import LogMessage
from rig.vboard.node.messages import TAG_OTA, NodeMsg
from rig.vboard.node.nvs_store import NvsStore
from rig.vboard.node.runtime import NodeRuntime

log = logging.getLogger(__name__)

OTA_NVS_NAMESPACE = "rmaker_ota"
OTA_JOB_KEY = "rmaker_ota_id"
VERIFIED_INFO = "OTA Upgrade finished and verified successfully"
REPORTING = LogMessage("I", TAG_OTA, "Reporting {status}: {info}")


class BootConfirmation:
    """The pending-verify watch of one boot."""

    def __init__(self, ctx: AppContext, runtime: NodeRuntime, nvs: NvsStore, wait_s: int,
                 publish: Callable[[str, str], int | None]):  # fmt: skip
        self.ctx = ctx
        self.runtime = runtime
        self.nvs = nvs
        self.wait_s = wait_s
        self.publish = publish
        self._lock = threading.Lock()
        self.pending = False
        self.confirmed = False

    def check_at_boot(self) -> None:
        """Start the rollback timer when the running image waits for verification."""
        state = running_app_ota_state(self.ctx.boot, self.ctx.flash)
        if state is not OtaState.PENDING_VERIFY:
            return
        self.pending = True
        self.runtime.log(NodeMsg.OTA_STATE, state=int(state))
        self.runtime.log(NodeMsg.OTA_FIRST_BOOT)
        self.runtime.after(self.wait_s, "ota_rollback_tm", self._expired)

    def mqtt_connected(self) -> None:
        """The image reached the cloud: confirm it (once) and report the job, if any."""
        with self._lock:
            if not self.pending or self.confirmed:
                return
            self.confirmed = True
        try:
            mark_app_valid(self.ctx.boot, self.ctx.flash, self.ctx.efuse, self.ctx.console, self.ctx.config)
        except OtaOpsError as exc:
            log.warning("virtual board %s: could not confirm the running image: %s", self.runtime.board, exc)
            return
        job = self.nvs.get(OTA_NVS_NAMESPACE, OTA_JOB_KEY)
        if job:
            self.runtime.log(REPORTING, status="success", info=VERIFIED_INFO)
            body = {"ota_job_id": job.decode("utf-8", "replace"), "status": "success", "additional_info": VERIFIED_INFO,
                    "ts": int(time.time())}  # fmt: skip
            self.publish("otastatus", json.dumps(body, separators=(",", ":")))

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

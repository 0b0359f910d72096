"""The node's OTA progress reports on ``otastatus``, and the NVS keys an update leaves behind.

esp-rainmaker ``src/ota/esp_rmaker_ota.c`` ``esp_rmaker_ota_report_status`` and
``esp_rmaker_ota_using_topics.c`` ``esp_rmaker_ota_report_status_using_topics``
(rainmaker-protocol.md §1.5): every report is logged as ``Reporting <status>: <info>``,
then published as ``{"ota_job_id", "status", "additional_info", "ts"}`` (keys in that
order) on the basic-ingest ``otastatus`` topic, the JSON echoed to the log first.

The job id comes from the update being worked on; after a reboot (the verified
``success``, or ``Firmware rolled back``) it comes from NVS ``rmaker_ota``/``rmaker_ota_id``
and is erased once used, so each job's outcome is reported once. With no job id at all
RainMaker warns and reports nothing.

Namespace ``rmaker_ota`` also holds ``ota_update`` (``RMAKER_OTA_UPDATE_FLAG_NVS_NAME``):
set with ``CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE`` just before rebooting into a new image,
erased when that image is confirmed; found on a boot whose image is *not* pending
verification, it means the update was rolled back (``esp_rmaker_ota_internal.h``).
"""

from __future__ import annotations

import enum
import json
import threading
import time
from collections.abc import Callable

from rig.vboard.node.messages import NodeMsg
from rig.vboard.node.nvs_store import NvsStore
from rig.vboard.node.runtime import NodeRuntime

__all__ = ["OTA_JOB_KEY", "OTA_NVS_NAMESPACE", "OTA_UPDATE_FLAG_KEY", "OtaReporter", "OtaStatus"]

OTA_NVS_NAMESPACE = "rmaker_ota"
OTA_JOB_KEY = "rmaker_ota_id"
OTA_UPDATE_FLAG_KEY = "ota_update"


class OtaStatus(enum.StrEnum):
    """``esp_rmaker_ota_status_to_string``."""

    IN_PROGRESS = "in-progress"
    SUCCESS = "success"
    FAILED = "failed"
    DELAYED = "delayed"
    REJECTED = "rejected"


class OtaReporter:
    """Reports one node's OTA progress; *publish(suffix, payload)* returns the message id or None."""

    def __init__(self, runtime: NodeRuntime, nvs: NvsStore, publish: Callable[[str, str], int | None]):
        self.runtime = runtime
        self.nvs = nvs
        self.publish = publish
        self._lock = threading.Lock()
        self._job_id: str | None = None

    # ------------------------------------------------------------------ the job being worked on

    def start_job(self, job_id: str) -> None:
        """``ota_url_handler``: keep the job id in NVS (for the report after the reboot) and in RAM."""
        self.nvs.set_blob(OTA_NVS_NAMESPACE, OTA_JOB_KEY, job_id.encode())
        self.nvs.commit()
        with self._lock:
            self._job_id = job_id

    def end_job(self) -> None:
        """``esp_rmaker_ota_finish_using_topics``: forget the in-RAM job id (NVS keeps it)."""
        with self._lock:
            self._job_id = None

    # ------------------------------------------------------------------ the rollback flag

    def set_update_flag(self) -> None:
        self.nvs.set_blob(OTA_NVS_NAMESPACE, OTA_UPDATE_FLAG_KEY, b"\x01")
        self.nvs.commit()

    def update_flag(self) -> bool:
        return self.nvs.get(OTA_NVS_NAMESPACE, OTA_UPDATE_FLAG_KEY) is not None

    def clear_update_flag(self) -> None:
        self.nvs.erase_key(OTA_NVS_NAMESPACE, OTA_UPDATE_FLAG_KEY)
        self.nvs.commit()

    # ------------------------------------------------------------------ reporting

    def report(self, status: OtaStatus, info: str) -> bool:
        """Log and publish one status; False when there was no job id or the publish failed."""
        self.runtime.log(NodeMsg.OTA_REPORTING, status=status.value, info=info)
        with self._lock:
            job_id = self._job_id
        if job_id is None:
            stored = self.nvs.get(OTA_NVS_NAMESPACE, OTA_JOB_KEY)
            if stored is None:
                self.runtime.log(NodeMsg.OTA_NO_JOB_TO_REPORT)
                return False
            job_id = stored.decode("utf-8", "replace")
            self.nvs.erase_key(OTA_NVS_NAMESPACE, OTA_JOB_KEY)
            self.nvs.commit()
        body = {"ota_job_id": job_id, "status": status.value, "additional_info": info, "ts": int(time.time())}
        payload = json.dumps(body, separators=(",", ":"))
        self.runtime.log(NodeMsg.OTA_STATUS_PAYLOAD, payload=payload)
        return self.publish("otastatus", payload) is not None

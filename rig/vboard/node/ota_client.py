"""The node's OTA client: RainMaker's OTA over topics, downloading over HTTPS.

What esp-rainmaker does (``src/ota/esp_rmaker_ota_using_topics.c``, ``esp_rmaker_ota.c``,
``esp_rmaker_https_ota.c``; rainmaker-protocol.md §1.3, §1.5; idf-console.md §6.4), and
this client with it:

1. after the first MQTT connection: subscribe ``node/<id>/otaurl``, and unless an update is
   still being verified, publish ``otafetch`` ``{"node_id", "fw_version"}``
   :data:`OTA_FETCH_DELAY_S` later (offline: retry after 30 s, doubling, at most 8 min);
2. ``otaurl``: one update at a time (``OTA already in progress. Please try later.``);
   ``ota_job_id`` (kept in NVS ``rmaker_ota``/``rmaker_ota_id``), ``url``, ``file_md5``,
   ``file_size``, ``fw_version`` parsed and logged; the work runs on the RainMaker work
   queue;
3. up to :data:`OTA_MAX_RETRIES` attempts, each reported ``in-progress`` ``Starting OTA Upgrade
   (HTTPS attempt i/n)``: connect and GET (:mod:`.ota_download`), read the image header,
   ``validate_image_header`` — project name equal to the running app's, version different,
   ``secure_version`` not below the eFuse (each a ``rejected`` with RainMaker's reason, no
   retry) — ``Downloading Firmware Image``, the chip id, stream into the passive slot
   (:mod:`.ota_update`), ``Firmware Image download complete``, ``esp_ota_end`` (the
   bootloader's verification) and ``esp_ota_set_boot_partition`` (otadata NEW); a failed
   attempt is reported ``failed`` ``OTA Attempt i/n failed: <why>`` and retried; after the
   last, a new ``otafetch`` is scheduled :data:`OTA_RETRY_DELAY_S` later;
4. success: NVS ``ota_update`` set, ``in-progress`` ``Rebooting into new firmware (after n
   HTTPS attempt[s])``, and ``esp_rmaker_reboot`` after the reboot delay — RainMaker's
   ``OTA_REBOOT_TIMER_SEC`` is 10 s; the virtual firmware reboots after
   :data:`VIRTUAL_REBOOT_DELAY_S` unless its behaviour manifest sets ``extra.ota_reboot_delay_s``.
   What happens after the reboot — confirmation once MQTT connects, or rollback — is
   :mod:`.boot_confirm`'s.

Flaws (``rig.vboard.flaws``): ``accepts_unsigned_ota`` (no signature check on the new
image), ``accepts_http_ota`` (``http://`` URLs followed, no server verification),
``ignores_secure_version`` (``CONFIG_ESP_RMAKER_SKIP_SECURE_VERSION_CHECK`` and no
anti-rollback check in ``esp_ota_set_boot_partition``).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from rig.firmware.app_desc import APP_DESC_OFFSET, AppDescriptor
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.image import IMAGE_HEADER_LAYOUT, ImageHeader
from rig.targets.esp32c3 import ESP32C3
from rig.vboard.app import AppContext, OtaOpsError
from rig.vboard.node.messages import NodeMsg
from rig.vboard.node.ota_download import HTTP_RX_BUFFER_SIZE, IMAGE_HEADER_SIZE, DownloadError, DownloadSettings, ImageDownload
from rig.vboard.node.ota_status import OtaReporter, OtaStatus
from rig.vboard.node.ota_update import OtaChecks, OtaUpdate, next_update_partition
from rig.vboard.node.runtime import NodeRuntime, WorkQueue

__all__ = [
    "OTA_FETCH_DELAY_S",
    "OTA_MAX_RETRIES",
    "VIRTUAL_REBOOT_DELAY_S",
    "OtaClient",
    "OtaRequest",
    "OtaSettings",
    "ota_reboot_delay",
]

PROTOCOL = "HTTPS"
OTA_FETCH_DELAY_S = 5
"""``RMAKER_OTA_FETCH_DELAY``."""
OTA_FETCH_RETRY_BASE_S = 30
OTA_FETCH_MAX_RETRIES = 5
"""``OTA_FETCH_RETRY_BASE_DELAY`` doubling up to ``OTA_FETCH_MAX_RETRIES`` (esp_rmaker_ota_using_topics.c)."""
OTA_MAX_RETRIES = 3
"""``CONFIG_ESP_RMAKER_OTA_MAX_RETRIES`` default."""
OTA_RETRY_DELAY_S = 5 * 60
"""``CONFIG_ESP_RMAKER_OTA_RETRY_DELAY_MINUTES`` as the virtual firmware sets it."""
VIRTUAL_REBOOT_DELAY_S = 2
"""The virtual firmware's reboot delay after a download (short, so labs wait less; RainMaker's
``OTA_REBOOT_TIMER_SEC`` is 10 s)."""
BYTES_READ_EVERY = 50
"""``Image bytes read`` is logged after every 50th read."""


def ota_reboot_delay(extra: dict[str, object]) -> int:
    """The reboot delay of an image: its manifest's ``extra.ota_reboot_delay_s`` (0..60), else :data:`VIRTUAL_REBOOT_DELAY_S`."""
    value = extra.get("ota_reboot_delay_s")
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 60:
        return value
    return VIRTUAL_REBOOT_DELAY_S


@dataclass(frozen=True)
class OtaSettings:
    """What the OTA client needs beyond the chip: who the node is, where it lives, how it is flawed."""

    node_id: str
    fw_version: str
    address: str
    server_cert: bytes | None = field(repr=False)
    flaws: frozenset[str] = frozenset()
    reboot_delay_s: int = VIRTUAL_REBOOT_DELAY_S

    @property
    def download(self) -> DownloadSettings:
        insecure = "accepts_http_ota" in self.flaws
        return DownloadSettings(self.address, self.server_cert, verify_server=not insecure, allow_http=insecure)

    @property
    def checks(self) -> OtaChecks:
        return OtaChecks(signature="accepts_unsigned_ota" not in self.flaws,
                         secure_version="ignores_secure_version" not in self.flaws)  # fmt: skip


@dataclass(frozen=True)
class OtaRequest:
    """One ``otaurl`` message, as ``ota_url_handler`` keeps it."""

    job_id: str
    url: str
    file_size: int = 0
    fw_version: str | None = None
    file_md5: str | None = None


class _Outcome(Enum):
    DONE = "done"
    REJECTED = "rejected"
    FAILED = "failed"


class _Rejected(Exception):
    """The update must not continue (already reported ``rejected``)."""


class OtaClient:
    """RainMaker's OTA-over-topics client of one node boot.

    *publish(suffix, payload)* and *subscribe(topic)* are the MQTT link's, *connected()*
    says whether it is up, *reboot(seconds)* is ``esp_rmaker_reboot``, *busy()* is true
    while the running image still awaits its verification (RainMaker's
    ``ota_in_progress`` at such a boot).
    """

    def __init__(self, ctx: AppContext, runtime: NodeRuntime, work: WorkQueue, reporter: OtaReporter, settings: OtaSettings,
                 *, publish: Callable[[str, str], int | None], subscribe: Callable[[str], None],
                 connected: Callable[[], bool], reboot: Callable[[int], None], busy: Callable[[], bool]):  # fmt: skip
        self.ctx = ctx
        self.runtime = runtime
        self.work = work
        self.reporter = reporter
        self.settings = settings
        self._publish = publish
        self._subscribe = subscribe
        self._connected = connected
        self._reboot = reboot
        self._busy = busy
        self._lock = threading.Lock()
        self._in_progress = False
        self.idle = threading.Event()
        """Set while no update is being worked on (RainMaker's ``ota_in_progress`` false)."""
        self.idle.set()
        self._started = False
        self._fetch_retries = 0

    @property
    def topic(self) -> str:
        return f"node/{self.settings.node_id}/otaurl"

    # ------------------------------------------------------------------ topics, otafetch

    def mqtt_connected(self) -> None:
        """``esp_rmaker_ota_work_fn`` on the first connection: subscribe, then fetch unless an update is being verified."""
        with self._lock:
            if self._started:
                return
            self._started = True
        self.runtime.log(NodeMsg.OTA_SUBSCRIBING, topic=self.topic)
        self._subscribe(self.topic)
        if not self._busy():
            self.fetch_later(OTA_FETCH_DELAY_S)

    def fetch_later(self, seconds: float) -> None:
        """``esp_rmaker_ota_fetch_with_delay``."""
        self.runtime.after(seconds, "ota_fetch_tm", self.fetch)

    def fetch(self) -> bool:
        """``esp_rmaker_ota_fetch``: publish ``otafetch``; offline, retry later with backoff."""
        if not self._connected():
            self.runtime.log(NodeMsg.OTA_FETCH_OFFLINE)
            self._fetch_retries += 1
            delay = OTA_FETCH_RETRY_BASE_S * (1 << (min(self._fetch_retries, OTA_FETCH_MAX_RETRIES) - 1))
            self.runtime.log(NodeMsg.OTA_FETCH_RETRY, retry=self._fetch_retries, seconds=delay)
            self.fetch_later(delay)
            return False
        self._fetch_retries = 0
        self.runtime.log(NodeMsg.OTA_FETCHING)
        body = {"node_id": self.settings.node_id, "fw_version": self.settings.fw_version}
        return self._publish("otafetch", json.dumps(body, separators=(",", ":"))) is not None

    # ------------------------------------------------------------------ otaurl

    def handle_otaurl(self, payload: bytes) -> None:
        """``ota_url_handler`` (on the MQTT task): parse, keep the job id, queue the update."""
        with self._lock:
            if self._in_progress or self._busy():
                self.runtime.log(NodeMsg.OTA_BUSY)
                return
            self._in_progress = True
            self.idle.clear()
        text = payload.decode("utf-8", "replace")
        self.runtime.log(NodeMsg.OTA_URL_RECEIVED, payload=text, topic=self.topic)
        try:
            request = self._parse(payload)
        except _Rejected:
            self._finish()
            return
        self.work.submit(lambda: self._run(request))

    def _parse(self, payload: bytes) -> OtaRequest:
        try:
            body = json.loads(payload)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            self.runtime.log(NodeMsg.OTA_BAD_JSON, payload=payload.decode("utf-8", "replace"))
            self.reporter.report(OtaStatus.FAILED, "Aborted. JSON Payload error")
            raise _Rejected
        job_id = body.get("ota_job_id")
        if not isinstance(job_id, str):
            self.runtime.log(NodeMsg.OTA_NO_JOB_ID)
            self.reporter.report(OtaStatus.FAILED, "Aborted. OTA Updated ID not found in JSON")
            raise _Rejected
        self.reporter.start_job(job_id)
        self.runtime.log(NodeMsg.OTA_JOB_ID, job_id=job_id)
        url = body.get("url")
        if not isinstance(url, str):
            self.runtime.log(NodeMsg.OTA_NO_URL)
            self.reporter.report(OtaStatus.FAILED, "Aborted. URL not found in JSON")
            raise _Rejected
        self.runtime.log(NodeMsg.OTA_URL, url=url)
        md5 = body.get("file_md5")
        md5 = md5 if isinstance(md5, str) else None
        if md5 is not None:
            self.runtime.log(NodeMsg.OTA_FILE_MD5, md5=md5)
        size = body.get("file_size")
        size = size if isinstance(size, int) and not isinstance(size, bool) else 0
        self.runtime.log(NodeMsg.OTA_FILE_SIZE, size=size)
        version = body.get("fw_version")
        version = version if isinstance(version, str) and version else None
        if version is not None:
            self.runtime.log(NodeMsg.OTA_FW_VERSION, version=version)
        return OtaRequest(job_id, url, size, version, md5)

    def _finish(self) -> None:
        """``esp_rmaker_ota_finish_using_topics``."""
        self.reporter.end_job()
        with self._lock:
            self._in_progress = False
            self.idle.set()

    # ------------------------------------------------------------------ the update (work queue)

    def _run(self, request: OtaRequest) -> None:
        """``esp_rmaker_ota_retry_loop`` and ``esp_rmaker_ota_success_reboot_sequence``."""
        try:
            for attempt in range(1, OTA_MAX_RETRIES + 1):
                if self.runtime.halted.is_set():
                    return
                self.reporter.report(OtaStatus.IN_PROGRESS, f"Starting OTA Upgrade ({PROTOCOL} attempt {attempt}/{OTA_MAX_RETRIES})")
                self.runtime.log(NodeMsg.OTA_ATTEMPT, protocol=PROTOCOL, attempt=attempt, attempts=OTA_MAX_RETRIES)
                outcome, reason = self._attempt(request)
                if outcome is _Outcome.DONE:
                    self._rebooting(attempt)
                    return
                if outcome is _Outcome.REJECTED:
                    return
                self.runtime.log(NodeMsg.OTA_ATTEMPT_FAILED, protocol=PROTOCOL, attempt=attempt, reason=reason)
                self.reporter.report(OtaStatus.FAILED, f"OTA Attempt {attempt}/{OTA_MAX_RETRIES} failed: {reason}")
            self.fetch_later(OTA_RETRY_DELAY_S)
        finally:
            self._finish()

    def _rebooting(self, attempts: int) -> None:
        plural = "" if attempts == 1 else "s"
        if self.ctx.config.rollback:
            self.reporter.set_update_flag()
            self.reporter.report(OtaStatus.IN_PROGRESS, f"Rebooting into new firmware (after {attempts} {PROTOCOL} attempt{plural})")
        else:
            self.reporter.report(OtaStatus.SUCCESS, f"{PROTOCOL} OTA Upgrade finished successfully (after {attempts} attempt{plural})")
        self.runtime.log(NodeMsg.OTA_UPGRADE_DONE, protocol=PROTOCOL, seconds=self.settings.reboot_delay_s)
        self._reboot(self.settings.reboot_delay_s)

    def _attempt(self, request: OtaRequest) -> tuple[_Outcome, str]:
        """``esp_rmaker_ota_use_https``: one download; the outcome and, when failed, RainMaker's description."""
        self.runtime.log(NodeMsg.OTA_HTTPS_STARTING)
        try:
            download = ImageDownload.open(self.runtime, request.url, self.settings.download)
        except DownloadError as exc:
            self._log_lines(exc)
            return _Outcome.FAILED, f"OTA Begin failed: {exc.describe()}"
        try:
            return self._install(download)
        finally:
            download.close()

    def _install(self, download: ImageDownload) -> tuple[_Outcome, str]:
        self.runtime.log(NodeMsg.HTTPS_OTA_STARTING)
        partition = next_update_partition(self.ctx)
        if partition is None:
            self.runtime.log(NodeMsg.HTTPS_OTA_NO_PASSIVE)
            return _Outcome.FAILED, "OTA Begin failed: ESP_FAIL (errno=0: Invalid)"
        self.runtime.log(NodeMsg.HTTPS_OTA_WRITING, subtype=partition.subtype, offset=partition.offset)
        try:
            header = download.read_header()
        except DownloadError as exc:
            return _Outcome.FAILED, f"Failed to read image description: {exc.describe()}"
        desc = self._image_desc(header)
        if desc is None:
            return _Outcome.FAILED, "Failed to read image description: ESP_FAIL (errno=0: Invalid)"
        try:
            self._validate(desc)
        except _Rejected:
            return _Outcome.REJECTED, "Image header verification failed"
        self.reporter.report(OtaStatus.IN_PROGRESS, "Downloading Firmware Image")
        try:
            update = OtaUpdate.begin(self.ctx, self.runtime, partition, self.settings.checks)
        except OtaOpsError as exc:
            return _Outcome.FAILED, f"OTA failed: {exc.err} (errno=0: Invalid)"
        chip_id = ImageHeader.parse(header[: IMAGE_HEADER_LAYOUT.size]).chip_id
        if chip_id != ESP32C3.image_chip_id:
            self.runtime.log(NodeMsg.HTTPS_OTA_CHIP_ID, expected=ESP32C3.image_chip_id, found=chip_id)
            self.reporter.report(OtaStatus.REJECTED, "Chip revision mismatch")
            return _Outcome.REJECTED, "Chip revision mismatch"
        try:
            self._stream(download, update, header)
        except OtaOpsError as exc:
            return _Outcome.FAILED, f"OTA failed: {exc.err} (errno=0: Invalid)"
        except DownloadError as exc:
            return _Outcome.FAILED, f"OTA failed: {exc.describe()}"
        if not download.complete:
            self.runtime.log(NodeMsg.HTTPS_OTA_CLOSED_EARLY)
            return _Outcome.FAILED, "Complete data was not received"
        self.reporter.report(OtaStatus.IN_PROGRESS, "Firmware Image download complete")
        try:
            update.end()
        except OtaOpsError as exc:
            if exc.err == "ESP_ERR_OTA_VALIDATE_FAILED":
                return _Outcome.FAILED, "Image validation failed"
            return _Outcome.FAILED, f"OTA finish failed: {exc.err} (errno=0: Invalid)"
        try:
            update.set_boot_partition()
        except OtaOpsError as exc:
            return _Outcome.FAILED, f"OTA finish failed: {exc.err} (errno=0: Invalid)"
        return _Outcome.DONE, ""

    def _stream(self, download: ImageDownload, update: OtaUpdate, header: bytes) -> None:
        """``esp_https_ota_perform`` until the body ends: the header already read, then 1 KB reads."""
        update.write(header)
        reads = 0
        while not self.runtime.halted.is_set():
            chunk = download.read(HTTP_RX_BUFFER_SIZE)
            if not chunk:
                return
            update.write(chunk)
            reads += 1
            if reads % BYTES_READ_EVERY == 0:
                self.runtime.log(NodeMsg.OTA_BYTES_READ, count=update.written)
        raise DownloadError("ESP_FAIL", "the chip is resetting")

    def _image_desc(self, header: bytes) -> AppDescriptor | None:
        """``esp_https_ota_get_img_desc``."""
        if len(header) < IMAGE_HEADER_SIZE:
            self.runtime.log(NodeMsg.HTTPS_OTA_SHORT_HEADER)
            return None
        try:
            return AppDescriptor.parse(header, APP_DESC_OFFSET)
        except FirmwareFormatError:
            self.runtime.log(NodeMsg.HTTPS_OTA_BAD_DESC)
            return None

    def _validate(self, new: AppDescriptor) -> None:
        """``validate_image_header``: project, version, secure version (each reported ``rejected``)."""
        running = self.ctx.boot.app_desc
        running_project = running.project_name if running is not None else ""
        running_version = running.version if running is not None else ""
        if new.project_name != running_project:
            self.runtime.log(NodeMsg.OTA_PROJECT_MISMATCH, new=new.project_name, running=running_project)
            self.reporter.report(OtaStatus.REJECTED, "Project Name mismatch")
            raise _Rejected
        if new.version == running_version:
            self.runtime.log(NodeMsg.OTA_SAME_VERSION)
            self.reporter.report(OtaStatus.REJECTED, "Same version received")
            raise _Rejected
        if self.settings.checks.secure_version and new.secure_version < self.ctx.efuse.secure_version:
            self.runtime.log(NodeMsg.OTA_LOWER_SECURE_VERSION)
            self.reporter.report(OtaStatus.REJECTED, "Lower secure version received")
            raise _Rejected

    def _log_lines(self, exc: DownloadError) -> None:
        for message, values in exc.lines:
            self.runtime.log(message, **values)

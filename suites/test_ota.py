"""Signed OTA through the cloud, end to end: what installs, what never boots, what rolls back.

Every update goes the real way (fixtures/ota.py): the image is uploaded to the cloud, an OTA
job signs it in the lab HSM and sends ``otaurl``; the device downloads over HTTPS, verifies,
reboots and reports ``otastatus``. Each test judges the console, the cloud's job status and
the flash read back with esptool. The cases follow AWS IoT Device Tester's OTA end-to-end
group and ESP-IDF's OTA example tests; the ``case`` in each test id names the entry of
those catalogues (shared/reference/anchors-and-catalogues.md).

Every board starts each test running ``base`` from the first app slot, freshly provisioned.
"""

from __future__ import annotations

import random
from typing import Any

import pexpect
import pytest

from fixtures.ota import BOOT_TIMEOUT_S, OTA_TIMEOUT_S, REBOOTED, OtaDriver, app_version, loaded_from, reporting
from rig.firmware.otadata import OtaState
from rig.firmware.variants import (
    bit_flipped,
    project_name,
    signed_content,
    truncated,
    unsigned,
    untrusted_signature,
    version,
    wrong_chip_id,
)
from rig.firmware.virtual_set import ensure_signing_key
from rig.prov.polling import poll_until

OTA_PROVISIONS = ("5.3-2", "5.3-7", "5.3-9", "5.3-10")


def catalogue(*names: str) -> pytest.MarkDecorator:
    """The catalogue case(s) a test implements, as the ``case`` part of its id."""
    return pytest.mark.parametrize("case", names)


def install(ota: OtaDriver, image: bytes, name: str, expected_version: str, slot_index: int) -> dict[str, Any]:
    """One update that must succeed: the new app boots from *slot_index* and is confirmed."""
    job = ota.send(image, name)
    slot = ota.slots[slot_index]
    ota.dut.expect(loaded_from(slot), timeout=OTA_TIMEOUT_S)
    ota.dut.expect(app_version(expected_version), timeout=BOOT_TIMEOUT_S)
    ota.dut.expect(reporting("success"), timeout=OTA_TIMEOUT_S)
    status = ota.wait(job)
    assert status["status"] == "success", f"job {name}: the cloud saw {status['status']} {status['additional_info']!r}"
    return status


def assert_old_app_kept(ota: OtaDriver, status: dict[str, Any], what: str) -> None:
    """The three views of a refused update: a final ``failed``/``rejected``, no restart on the console
    since the job, and the bootloader still selecting ``base`` in the first slot."""
    assert status["status"] in ("failed", "rejected"), (
        f"{what}: the device reported {status['status']} {status['additional_info']!r} instead of refusing the image"
    )
    ota.dut.expect(reporting(status["status"], status["additional_info"]), not_matching=[REBOOTED], timeout=BOOT_TIMEOUT_S)
    view = ota.flash("after")
    assert view.slot == ota.slots[0] and view.state in (None, OtaState.VALID), (
        f"{what}: otadata now selects {view.slot.name} ({view.state}); the refused image must never be selected"
    )
    assert view.app is not None and view.app.version == ota.version("base"), f"{what}: slot {view.slot.name} holds {view.app}"


# --------------------------------------------------------------------------- updates that must install


@pytest.mark.roles("next")
@pytest.mark.etsi(*OTA_PROVISIONS)
@catalogue("OTAE2EGreaterVersion")
def test_greater_version_installs_and_boots_from_the_other_slot(board: Any, ota: OtaDriver, case: str) -> None:
    status = install(ota, ota.image("next"), "next", ota.version("next"), 1)
    assert ("in-progress", "Downloading Firmware Image") in ota.reported(status["ota_job_id"])
    view = ota.flash("after")
    assert view.slot == ota.slots[1] and view.state is OtaState.VALID, f"otadata: {view.record()}"
    assert view.app is not None and view.app.version == ota.version("next")


@pytest.mark.roles("next")
@pytest.mark.etsi(*OTA_PROVISIONS)
@catalogue("OTAE2EBackToBackDownloads")
def test_three_updates_back_to_back(board: Any, ota: OtaDriver, case: str) -> None:
    """Three updates in a row alternate the slots, each confirmed before the next starts."""
    image, ver = signed_content(ota.image("next")), ota.version("next")
    for n, slot in enumerate((1, 0, 1), start=1):
        ver = f"{ota.version('next')}-b2b{n}"
        install(ota, version(image, ver), f"back-to-back-{n}", ver, slot)
    view = ota.flash("after")
    assert view.slot == ota.slots[1] and view.state is OtaState.VALID
    assert view.app is not None and view.app.version == ver


# --------------------------------------------------------------------------- refused at the header


@pytest.mark.etsi("5.3-2", "5.3-9")
@catalogue("OTAE2ESameVersion")
def test_same_version_is_rejected(board: Any, ota: OtaDriver, case: str) -> None:
    status = ota.wait(ota.send(ota.image("base"), "base-again"))
    assert (status["status"], status["additional_info"]) == ("rejected", "Same version received")
    assert ("in-progress", "Downloading Firmware Image") not in ota.reported(status["ota_job_id"])
    assert_old_app_kept(ota, status, "the same version")


@pytest.mark.roles("next")
@pytest.mark.etsi("5.3-2", "5.3-9")
@catalogue("rmaker_project_name_check")
def test_other_project_is_rejected(board: Any, ota: OtaDriver, case: str) -> None:
    status = ota.wait(ota.send(project_name(signed_content(ota.image("next")), "someone_elses_product"), "other-project"))
    assert (status["status"], status["additional_info"]) == ("rejected", "Project Name mismatch")
    assert_old_app_kept(ota, status, "another product's image")


# --------------------------------------------------------------------------- images that must never boot


def _untrusted(image: bytes, tmp: Any) -> bytes:
    return untrusted_signature(signed_content(image), ensure_signing_key(tmp / "untrusted-key.pem"))


BAD_IMAGES = {
    # case → (how the image is derived from `next`, whether the cloud signs it on the way)
    "OTAE2EUnsignedImage": (lambda img, tmp: unsigned(img) if img != signed_content(img) else img, False),
    "OTAE2EUntrustedCertificate": (_untrusted, False),
    "OtaTestCorruptImageBeforeSigning": (lambda img, tmp: bit_flipped(signed_content(img)), True),
    "advanced_https_ota_truncated_bin": (lambda img, tmp: truncated(signed_content(img)), True),
    "OtaTestIncorrectPlatform": (lambda img, tmp: wrong_chip_id(signed_content(img)), True),
}


@pytest.mark.roles("next")
@pytest.mark.etsi("5.3-7", "5.3-9", "5.3-10", "5.7-1")
@catalogue(*BAD_IMAGES)
def test_bad_image_is_never_booted(board: Any, ota: OtaDriver, case: str, tmp_path: Any) -> None:
    """Unsigned, signed by a key the device does not trust, one bit flipped under a valid signature,
    truncated, built for another chip: the device refuses each, keeps running ``base`` and says so."""
    derive, signed_by_cloud = BAD_IMAGES[case]
    job = ota.send(derive(ota.image("next"), tmp_path), case, delivery=None if signed_by_cloud else {"sign": False})
    assert_old_app_kept(ota, ota.wait(job), case)


UNAUTHENTICATED_CHANNELS = {
    # case → (how the cloud serves the signed image, what the device was offered)
    "esp_https_ota_plain_http": ("http", "an http:// OTA URL"),
    "device_advisor_tls_unknown_ca": ("unknown_ca", "a server with a certificate from an unknown CA"),
}


@pytest.mark.roles("next")
@pytest.mark.etsi("5.3-10", "5.5-1")
@catalogue(*UNAUTHENTICATED_CHANNELS)
def test_download_from_an_unauthenticated_server_is_refused(board: Any, ota: OtaDriver, case: str) -> None:
    """The same signed image, but the URL is ``http://`` or the host's certificate chains to a CA
    the device does not trust: no authenticated channel, no download."""
    transport, what = UNAUTHENTICATED_CHANNELS[case]
    job = ota.send(ota.image("next"), f"next-{transport}", delivery={"transport": transport})
    assert_old_app_kept(ota, ota.wait(job), what)


# --------------------------------------------------------------------------- interrupted updates


@pytest.mark.roles("next")
@pytest.mark.etsi("5.3-2")
@catalogue("OTAE2EDisconnectResume")
def test_connection_cut_keeps_old_app_then_update_succeeds(board: Any, ota: OtaDriver, case: str) -> None:
    image = ota.image("next")
    cut = random.Random(board.name).randrange(1024, len(image) - 1)
    ota.evidence.attach_json("cut.json", {"cut_after": cut, "image_size": len(image)})
    status = ota.wait(ota.send(image, "next-cut", delivery={"cut_after": cut}))
    assert status["status"] == "failed", f"a download cut at byte {cut} ended {status['status']} {status['additional_info']!r}"
    ota.dut.expect(reporting("failed", status["additional_info"]), not_matching=[REBOOTED], timeout=BOOT_TIMEOUT_S)
    install(ota, image, "next-after-cut", ota.version("next"), 1)
    view = ota.flash("after")
    assert view.slot == ota.slots[1] and view.state is OtaState.VALID


@pytest.mark.roles("next")
@pytest.mark.etsi("5.3-2")
@catalogue("advanced_https_ota_ota_resumption")
def test_power_cut_mid_write_keeps_old_app(board: Any, ota: OtaDriver, case: str) -> None:
    """The download freezes part-way through the slot; the board is hard-reset (a power cut). The
    bootloader must boot ``base`` again; the node's next ``otafetch`` gets the job afresh and
    this time it installs (RainMaker hands a node its unfinished job again)."""
    image = ota.image("next")
    stall = random.Random(board.name).randrange(8192, len(image) - 1)
    ota.evidence.attach_json("power-cut.json", {"stall_after": stall, "image_size": len(image)})
    job = ota.send(image, "next-power-cut", delivery={"stall_after": stall})

    def frozen(deliveries: list[dict[str, Any]]) -> bool:
        return any(r.get("bytes_sent", 0) >= stall for d in deliveries for r in d.get("requests", []))

    served = poll_until(lambda: ota.cloud.ota_deliveries(ota.user, job), frozen, OTA_TIMEOUT_S, 0.2)
    if not frozen(served):
        pytest.fail(f"INCONCLUSIVE: the node never downloaded {stall} bytes of the image: {served}", pytrace=False)
    ota.dut.serial.hard_reset()
    ota.dut.expect(loaded_from(ota.slots[0]), timeout=BOOT_TIMEOUT_S)
    ota.dut.expect(app_version(ota.version("base")), timeout=BOOT_TIMEOUT_S)
    ota.dut.expect(loaded_from(ota.slots[1]), timeout=OTA_TIMEOUT_S)
    ota.dut.expect(app_version(ota.version("next")), timeout=BOOT_TIMEOUT_S)
    status = ota.wait(job)
    assert status["status"] == "success", f"after the power cut the job ended {status['status']} {status['additional_info']!r}"
    view = ota.flash("after")
    assert view.slot == ota.slots[1] and view.state is OtaState.VALID


# --------------------------------------------------------------------------- rollback


@pytest.mark.roles("crash_on_boot")
@pytest.mark.etsi("5.3-2", "5.7-1")
@catalogue("OTAE2EImageCrashed")
def test_image_that_crashes_on_boot_is_rolled_back(board: Any, ota: OtaDriver, case: str) -> None:
    """The new app panics before it confirms itself: the bootloader finds it still pending
    verification, aborts it and boots the old app, which reports the rollback."""
    job = ota.send(ota.image("crash_on_boot"), "crash-on-boot")
    ota.dut.expect(loaded_from(ota.slots[1]), timeout=OTA_TIMEOUT_S)
    ota.dut.expect(app_version(ota.version("crash_on_boot")), timeout=BOOT_TIMEOUT_S)
    ota.dut.expect_exact("Guru Meditation Error", timeout=BOOT_TIMEOUT_S)
    ota.dut.expect(loaded_from(ota.slots[0]), timeout=BOOT_TIMEOUT_S)
    ota.dut.expect(app_version(ota.version("base")), timeout=BOOT_TIMEOUT_S)
    status = ota.wait(job)
    assert (status["status"], status["additional_info"]) == ("rejected", "Firmware rolled back"), f"job: {status}"
    view = ota.flash("after")
    assert view.slot == ota.slots[0] and OtaState.ABORTED in view.states, f"otadata: {view.record()}"


@pytest.mark.roles("no_cloud")
@pytest.mark.etsi("5.3-2", "5.7-1")
@catalogue("OTAE2ERollbackIfUnableToConnectAfterUpdate")
def test_image_that_cannot_reach_the_cloud_is_rolled_back(board: Any, ota: OtaDriver, case: str) -> None:
    """The new app boots but never connects to MQTT: after the rollback wait it marks itself invalid
    and the old app comes back and reports the rollback."""
    job = ota.send(ota.image("no_cloud"), "no-cloud")
    wait_s = float(ota.firmware_set.build("no_cloud").sdkconfig.get("ESP_RMAKER_OTA_ROLLBACK_WAIT_PERIOD", 90))  # type: ignore[arg-type]
    ota.dut.expect(loaded_from(ota.slots[1]), timeout=OTA_TIMEOUT_S)
    ota.dut.expect(app_version(ota.version("no_cloud")), timeout=BOOT_TIMEOUT_S)
    try:
        ota.dut.expect(loaded_from(ota.slots[0]), timeout=wait_s + BOOT_TIMEOUT_S)
    except pexpect.TIMEOUT:
        view = ota.flash("after")
        raise AssertionError(
            f"the new app never reached the cloud, yet {wait_s:.0f} s (CONFIG_ESP_RMAKER_OTA_ROLLBACK_WAIT_PERIOD) + "
            f"{BOOT_TIMEOUT_S:.0f} s later it still runs and otadata selects {view.slot.name} in state {view.state}: "
            "it confirmed itself without the cloud (no rollback protection)"
        ) from None
    ota.dut.expect(app_version(ota.version("base")), timeout=BOOT_TIMEOUT_S)
    status = ota.wait(job)
    assert (status["status"], status["additional_info"]) == ("rejected", "Firmware rolled back"), f"job: {status}"
    view = ota.flash("after")
    assert view.slot == ota.slots[0] and OtaState.INVALID in view.states, f"otadata: {view.record()}"

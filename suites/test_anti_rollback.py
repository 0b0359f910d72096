"""Anti-rollback: a confirmed update with a higher ``secure_version`` burns the eFuse, and from then
on an older image is refused — by the OTA client at download and by the bootloader at boot.

ESP-IDF ``CONFIG_BOOTLOADER_APP_ANTI_ROLLBACK``: the bootloader boots no app whose app
descriptor ``secure_version`` is below eFuse ``SECURE_VERSION``, and
``esp_ota_mark_app_valid_cancel_rollback`` raises the eFuse to the running app's version
once the app confirms itself (esp-rainmaker: after MQTT connects). ESP-IDF's own example
test is ``pytest_advanced_ota.py`` ``…_anti_rollback``.

The burn is irreversible on silicon: the test is ``destructive`` (sacrificial boards only)
and goes through the SECURE_VERSION ledger (fixtures/anti_rollback.py). On the next run the
board's set is lifted to the burned floor (fixtures/firmware.py), so the test runs again.
"""

from __future__ import annotations

from typing import Any

import pytest

from fixtures.anti_rollback import SecureVersionBurn
from fixtures.ota import (
    BOOT_TIMEOUT_S,
    OTA_TIMEOUT_S,
    REBOOTED,
    OtaDriver,
    app_version,
    efuse_summary_through_console,
    loaded_from,
    reporting,
    write_flash_through_console,
)
from rig.boards.board import secure_version_of
from rig.firmware.otadata import OtaDataPartition, OtaState


@pytest.mark.destructive
@pytest.mark.roles("next", "next_secure")
@pytest.mark.etsi("5.3-2", "5.3-9", "5.7-1")
@pytest.mark.parametrize("case", ["advanced_https_ota_anti_rollback"])
def test_secure_version_is_raised_and_older_images_are_refused(board: Any, secure_version_burn: SecureVersionBurn,
                                                                ota: OtaDriver, case: str) -> None:  # fmt: skip
    burn = secure_version_burn
    base, nxt = ota.firmware_set.app_desc("base"), ota.firmware_set.app_desc("next")
    assert base.secure_version >= burn.before, f"the set's base ({base.secure_version}) does not run on eFuse {burn.before}"
    assert burn.target > burn.before, f"next_secure ({burn.target}) would not raise SECURE_VERSION {burn.before}"

    # 1. next_secure installs; once it has confirmed itself the eFuse holds its secure_version
    job = ota.send(ota.image("next_secure"), "next_secure")
    ota.dut.expect(loaded_from(ota.slots[1]), timeout=OTA_TIMEOUT_S)
    ota.dut.expect(app_version(ota.version("next_secure")), timeout=BOOT_TIMEOUT_S)
    ota.dut.expect(reporting("success"), timeout=OTA_TIMEOUT_S)
    assert ota.wait(job)["status"] == "success"
    summary = efuse_summary_through_console(ota.dut)
    ota.evidence.attach_json("espefuse-summary-after-confirm.json", summary)
    burned = secure_version_of(summary, board.name)
    assert burned == burn.target, f"eFuse SECURE_VERSION is {burned} after next_secure ({burn.target}) was confirmed"
    ota.dut.expect_exact("MQTT Connected", timeout=BOOT_TIMEOUT_S)

    # 2. an image with a lower secure_version is rejected at download, nothing selected
    status = ota.wait(ota.send(ota.image("next"), "lower-secure-version"))
    assert (status["status"], status["additional_info"]) == ("rejected", "Lower secure version received"), (
        f"next (secure_version {nxt.secure_version} < eFuse {burned}) ended {status['status']} {status['additional_info']!r}"
    )
    ota.dut.expect(reporting("rejected", status["additional_info"]), not_matching=[REBOOTED], timeout=BOOT_TIMEOUT_S)
    view = ota.flash("after-lower-ota")
    assert view.slot == ota.slots[1] and view.state is OtaState.VALID, f"otadata: {view.record()}"

    # 3. written straight into the other slot with esptool and selected, the bootloader refuses it
    selected = OtaDataPartition.parse(view.otadata.to_bytes())
    selected.set_boot_slot(0, len(ota.slots))
    otadata = ota.firmware_set.build("base").read_partition_table().find("otadata")
    assert otadata is not None
    write_flash_through_console(ota.dut.serial, {ota.slots[0].offset: ota.image("base"), otadata.offset: selected.to_bytes()})
    #    (ESP-IDF bootloader_utility.c: with anti-rollback, an otadata entry whose app is below the
    #    eFuse is passed over without a word — the other slot boots although otadata selects this one)
    ota.dut.expect(loaded_from(ota.slots[1]), not_matching=[loaded_from(ota.slots[0])], timeout=BOOT_TIMEOUT_S)
    ota.dut.expect(app_version(ota.version("next_secure")), timeout=BOOT_TIMEOUT_S)

"""Factory reset: the user's data goes, the device's identity stays.

EN 303 645 5.11-1 asks for a simple way to erase user data from the device. RainMaker's
``reset-to-factory`` (console; the same ``esp_rmaker_factory_reset`` a button calls)
erases the ``nvs`` partition — Wi-Fi credentials (ESP-IDF's ``nvs.net80211``), the user
mapping (``user_mapping``), params — and keeps ``fctry``, the node's cloud identity. The
suite checks that on the flash itself, read back through esptool over the console's own
port (pytest-embedded's ``dump_flash``, :func:`fixtures.node.read_partition`) and parsed as NVS, then that the node is back in
provisioning and, onboarded again, reports a new local-control PoP (the old owner's is void).
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from fixtures.node import ROM_BANNER, ProvisionedNode, onboard, read_partition, read_qr
from rig.cloud.fctry import read_fctry, read_nvs
from rig.firmware.errors import FirmwareFormatError
from rig.lab import Lab
from rig.prov.console_qr import QR_LINE
from rig.prov.local_ctrl import wait_local_control_service

WIFI_NAMESPACE = "nvs.net80211"
"""ESP-IDF's Wi-Fi driver keeps the station SSID/password here (``sta.ssid``, ``sta.pswd``)."""
MAPPING_NAMESPACE = "user_mapping"
"""esp-rainmaker ``esp_rmaker_user_mapping.c`` keeps the mapped ``user_id`` here."""
USER_DATA_NAMESPACES = (WIFI_NAMESPACE, MAPPING_NAMESPACE)
BOOT_TIMEOUT_S = 60.0
LOCAL_CTRL_TIMEOUT_S = 15.0


def nvs_namespaces(dut: Any) -> set[str]:
    """The NVS namespaces that hold data in the board's ``nvs`` partition (read over the port)."""
    image = read_partition(dut, "nvs")
    if set(image) == {0xFF}:
        return set()
    try:
        return set(read_nvs(image, what="nvs partition"))
    except FirmwareFormatError as exc:
        pytest.fail(f"INCONCLUSIVE: the nvs partition is not readable NVS ({exc}); encrypted NVS needs its keys", pytrace=False)


@pytest.mark.etsi("5.11-1", "5.4-2", "5.1-1")
def test_factory_reset_erases_user_data_and_keeps_identity(provisioned_node: ProvisionedNode, dut: Any, lab: Lab) -> None:
    local_ctrl = wait_local_control_service(provisioned_node.user, provisioned_node.node_id, LOCAL_CTRL_TIMEOUT_S)
    before = nvs_namespaces(dut)
    missing = [ns for ns in USER_DATA_NAMESPACES if ns not in before]
    if missing:
        pytest.fail(f"INCONCLUSIVE: a provisioned, mapped node should hold {missing} in NVS before the reset", pytrace=False)
    dut.expect_exact("MQTT Connected", timeout=BOOT_TIMEOUT_S)  # the read reset the board; let it come back

    dut.write("reset-to-factory\r")
    dut.expect_exact("Resetting to Factory Defaults...", timeout=10)
    dut.expect_exact(ROM_BANNER, timeout=BOOT_TIMEOUT_S)
    came_back = dut.expect([QR_LINE, re.compile(rb"Already provisioned")], timeout=BOOT_TIMEOUT_S)

    left = nvs_namespaces(dut) & set(USER_DATA_NAMESPACES)
    assert not left, f"user data survived the factory reset: NVS still holds {sorted(left)} (5.11-1)"
    assert b"QRCODE" in came_back.group(0), "after the factory reset the node came back provisioned, not in provisioning"
    identity = read_fctry(read_partition(dut, "fctry"))
    assert identity["node_id"].decode() == provisioned_node.node_id, "the factory reset changed the node's fctry identity"

    if local_ctrl is None:
        return  # a node without local control has no local-control PoP to renew
    onboard(provisioned_node.fresh, dut, lab, provisioned_node.user, read_qr(dut, timeout=BOOT_TIMEOUT_S))
    renewed = wait_local_control_service(provisioned_node.user, provisioned_node.node_id, LOCAL_CTRL_TIMEOUT_S)
    assert renewed is not None, "after the factory reset and new onboarding the node reports no Local Control service"
    assert renewed.pop != local_ctrl.pop, "the local-control PoP survived the factory reset: the previous owner can still get in"

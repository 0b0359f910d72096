"""Factory reset: the user's data goes, the device's identity stays.

EN 303 645 5.11-1 asks for a simple way to erase user data from the device. RainMaker's
``reset-to-factory`` (console; the same ``esp_rmaker_factory_reset`` a button calls)
erases the ``nvs`` partition — Wi-Fi credentials (ESP-IDF's ``nvs.net80211``), the user
mapping (``user_mapping``), params — and keeps ``fctry``, the node's cloud identity. The
suite checks that on the flash itself, read back through esptool over the console's own
port (pytest-embedded's ``dump_flash``, :func:`fixtures.node.read_partition`) and parsed as NVS, then that the node is back in
provisioning and, onboarded again, reports a new local-control PoP (the old owner's is void).

A node with NVS encryption (the clean virtual firmware, and any production build) leaves only
ciphertext to read: page headers and entry-state bitmaps stay in clear, each 32-byte entry is
encrypted at its own address. The suite then reads the partition three times — factory-new, after
onboarding, after the reset — and judges the entries onboarding wrote (those not on the
factory-new node): ESP-IDF only ever appends entries and XTS is deterministic per address, so an
entry still on flash with the same bytes at the same offset is the same data, not erased.

It does so for each way the device offers (5.11-1: "run each erasure"): the console command,
and the BOOT button held past RainMaker's factory-reset time (the examples' ``app_reset``: a
press released after 10 s). The button is pressed from the host through the DevKit's
auto-reset circuit (DTR asserted, RTS released: :mod:`rig.boards.boot_button`), the same on a
real and a virtual board, and held until the node says to let go. A shorter press (released
between 3 s and 10 s) is a Wi-Fi reset: ``esp_wifi_restore`` forgets the network and nothing
else, so the node is back in provisioning still mapped to its user.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import pytest

from fixtures.node import ROM_BANNER, FreshNode, ProvisionedNode, onboard, read_partition, read_qr
from rig.boards.boot_button import boot_button_pressed
from rig.cloud.fctry import NvsEncryptedError, nvs_written_entries, read_fctry, read_nvs
from rig.firmware.errors import FirmwareFormatError
from rig.lab import Lab
from rig.prov.console_qr import QR_LINE
from rig.prov.local_ctrl import LocalControlService, local_control_service, wait_local_control_service
from rig.prov.polling import poll_until
from rig.prov.rainmaker_api import CLOUD_POLL_S, RainMakerUser

WIFI_NAMESPACE = "nvs.net80211"
"""ESP-IDF's Wi-Fi driver keeps the station SSID/password here (``sta.ssid``, ``sta.pswd``)."""
MAPPING_NAMESPACE = "user_mapping"
"""esp-rainmaker ``esp_rmaker_user_mapping.c`` keeps the mapped ``user_id`` here."""
USER_DATA_NAMESPACES = (WIFI_NAMESPACE, MAPPING_NAMESPACE)
WIFI_SSID_KEY = "sta.ssid"
"""The station SSID: u32 length + 32 bytes (ESP-IDF's ``wifi_sta_config_t`` as the driver stores it)."""
BOOT_TIMEOUT_S = 60.0
LOCAL_CTRL_TIMEOUT_S = 15.0

CONSOLE_FACTORY_RESET = "Resetting to Factory Defaults..."
"""``reset-to-factory``'s reply (esp-rainmaker-common ``rmaker_common_cmds.c``)."""
FACTORY_RESET_EVENT = "Node reset to factory defaults."
WIFI_RESET_EVENT = "Wi-Fi credentials reset."
"""The examples' ``app_main`` echo of ``RMAKER_EVENT_FACTORY_RESET`` / ``RMAKER_EVENT_WIFI_RESET``."""
WIFI_RESET_PRESSED = "Release button now for Wi-Fi reset. Keep pressed for factory reset."
FACTORY_RESET_PRESSED = "Release button to trigger factory reset."
"""What the examples' ``app_reset`` logs once the button has been held 3 s, then 10 s. The reset
itself starts on release: the one the last of these lines announced."""
WIFI_RESET_HOLD_S = 3.0
FACTORY_RESET_HOLD_S = 10.0
RESET_ANSWER_S = 15.0
"""From the request (command, or release) to its echo: RainMaker's reset delay is 2 s."""
RESET_WAYS = ("console", "boot_button")


@dataclass(frozen=True)
class NvsSnapshot:
    """The board's ``nvs`` partition as read over the port: ``entries`` (partition offset → the
    32 bytes of every entry marked written) always; ``contents`` (``{namespace: {key: value}}``)
    only when the entries are in clear — None under NVS encryption."""

    entries: dict[int, bytes]
    contents: dict[str, dict[str, bytes]] | None


def nvs_snapshot(dut: Any) -> NvsSnapshot:
    image = read_partition(dut, "nvs")
    if set(image) == {0xFF}:
        return NvsSnapshot({}, {})
    try:
        entries = nvs_written_entries(image, what="nvs partition")
        try:
            return NvsSnapshot(entries, read_nvs(image, what="nvs partition"))
        except NvsEncryptedError:
            return NvsSnapshot(entries, None)
    except FirmwareFormatError as exc:
        pytest.fail(f"INCONCLUSIVE: the nvs partition is not readable NVS ({exc})", pytrace=False)


def written_since(baseline: NvsSnapshot, later: NvsSnapshot) -> dict[int, bytes]:
    """The entries in *later* that *baseline* does not hold (same offset, same bytes)."""
    return {offset: raw for offset, raw in later.entries.items() if baseline.entries.get(offset) != raw}


def still_there(written: dict[int, bytes], after: NvsSnapshot) -> list[int]:
    """Offsets of *written* entries that *after* still holds, byte for byte."""
    return sorted(offset for offset, raw in written.items() if after.entries.get(offset) == raw)


def offsets(found: list[int], limit: int = 6) -> str:
    return ", ".join(f"0x{o:x}" for o in found[:limit]) + (", …" if len(found) > limit else "")


@dataclass(frozen=True)
class Onboarded:
    """A node onboarded by the suite, with its ``nvs`` as it was factory-new (in provisioning)."""

    node: ProvisionedNode
    factory_new: NvsSnapshot


@pytest.fixture
def onboarded(fresh_node: FreshNode, dut: Any, lab: Lab, cloud_user: RainMakerUser) -> Onboarded:
    read_qr(dut, timeout=BOOT_TIMEOUT_S)  # the app is up: whatever it writes to NVS at boot is written
    factory_new = nvs_snapshot(dut)
    qr = read_qr(dut, timeout=BOOT_TIMEOUT_S)
    onboard(fresh_node, dut, lab, cloud_user, qr)
    return Onboarded(ProvisionedNode(fresh_node, cloud_user, qr), factory_new)


def require_user_data(snapshot: NvsSnapshot, onboarding: dict[int, bytes]) -> None:
    """INCONCLUSIVE unless onboarding left user data in NVS to erase."""
    if snapshot.contents is not None:
        missing = [ns for ns in USER_DATA_NAMESPACES if ns not in snapshot.contents]
        if missing:
            pytest.fail(f"INCONCLUSIVE: a provisioned, mapped node should hold {missing} in NVS before the reset", pytrace=False)
    elif not onboarding:
        pytest.fail("INCONCLUSIVE: onboarding wrote no NVS entry to erase (encrypted NVS: compared entry by entry)", pytrace=False)


def station_ssid(nvs: dict[str, dict[str, bytes]]) -> bytes:
    """The SSID the Wi-Fi driver would join, empty when it has none."""
    raw = nvs.get(WIFI_NAMESPACE, {}).get(WIFI_SSID_KEY, b"")
    return raw[4 : 4 + min(int.from_bytes(raw[:4], "little"), 32)] if len(raw) >= 4 else b""


def renewed_local_control(user: RainMakerUser, node_id: str, old: LocalControlService) -> LocalControlService | None:
    """The node's Local Control service once the cloud reports a PoP other than *old*'s, or what
    it reports at the timeout. The cloud keeps a node's last params across its reset until the
    new ``params/local/init`` replaces them, so the first report after onboarding may be the old one."""
    return poll_until(lambda: local_control_service(user.node_config(node_id), user.params(node_id)),
                      lambda found: found is not None and found.pop != old.pop, LOCAL_CTRL_TIMEOUT_S, CLOUD_POLL_S)  # fmt: skip


def press_boot_button(dut: Any, until: str, hold_s: float) -> None:
    """Hold the BOOT button (through the port's DTR/RTS) until the node logs *until*, which
    it does after *hold_s* seconds held; then let go."""
    with boot_button_pressed(dut.serial.proc):
        dut.expect_exact(until, timeout=hold_s + RESET_ANSWER_S)


def ask_for_factory_reset(dut: Any, way: str) -> None:
    """Start a factory reset *way* and see the node take it."""
    if way == "console":
        dut.write("reset-to-factory\r")
        dut.expect_exact(CONSOLE_FACTORY_RESET, timeout=10)
    else:
        press_boot_button(dut, FACTORY_RESET_PRESSED, FACTORY_RESET_HOLD_S)
        dut.expect_exact(FACTORY_RESET_EVENT, not_matching=[WIFI_RESET_EVENT], timeout=RESET_ANSWER_S)


@pytest.mark.etsi("5.11-1", "5.4-2", "5.1-1")
@pytest.mark.parametrize("way", RESET_WAYS)
def test_factory_reset_erases_user_data_and_keeps_identity(onboarded: Onboarded, dut: Any, lab: Lab, way: str) -> None:
    provisioned_node = onboarded.node
    local_ctrl = wait_local_control_service(provisioned_node.user, provisioned_node.node_id, LOCAL_CTRL_TIMEOUT_S)
    before = nvs_snapshot(dut)
    onboarding = written_since(onboarded.factory_new, before)
    require_user_data(before, onboarding)
    dut.expect_exact("MQTT Connected", timeout=BOOT_TIMEOUT_S)  # the read reset the board; let it come back

    ask_for_factory_reset(dut, way)
    dut.expect_exact(ROM_BANNER, timeout=BOOT_TIMEOUT_S)
    came_back = dut.expect([QR_LINE, re.compile(rb"Already provisioned")], timeout=BOOT_TIMEOUT_S)

    after = nvs_snapshot(dut)
    if before.contents is not None and after.contents is not None:
        left = sorted(set(after.contents) & set(USER_DATA_NAMESPACES))
        assert not left, f"user data survived the factory reset: NVS still holds {left} (5.11-1)"
    else:
        kept = still_there(onboarding, after)
        assert not kept, (f"user data survived the factory reset: {len(kept)} of the {len(onboarding)} encrypted NVS entries "
                          f"onboarding wrote are still on flash, unchanged, at {offsets(kept)} (5.11-1)")  # fmt: skip
    assert b"QRCODE" in came_back.group(0), "after the factory reset the node came back provisioned, not in provisioning"
    identity = read_fctry(read_partition(dut, "fctry"))
    assert identity["node_id"].decode() == provisioned_node.node_id, "the factory reset changed the node's fctry identity"

    if local_ctrl is None:
        return  # a node without local control has no local-control PoP to renew
    onboard(provisioned_node.fresh, dut, lab, provisioned_node.user, read_qr(dut, timeout=BOOT_TIMEOUT_S))
    renewed = renewed_local_control(provisioned_node.user, provisioned_node.node_id, local_ctrl)
    assert renewed is not None, "after the factory reset and new onboarding the node reports no Local Control service"
    assert renewed.pop != local_ctrl.pop, "the local-control PoP survived the factory reset: the previous owner can still get in"


@pytest.mark.etsi("5.11-1")
def test_short_boot_button_press_resets_only_wifi(onboarded: Onboarded, dut: Any) -> None:
    """Released between 3 s and 10 s, the BOOT button is ``esp_rmaker_wifi_reset``: the station
    credentials go (``esp_wifi_restore``), the user mapping and every other namespace stay, and
    the node reboots into provisioning. Under NVS encryption the names are unreadable: then some
    of what onboarding wrote must be gone (the credentials) and some must stay (the mapping)."""
    before = nvs_snapshot(dut)
    onboarding = written_since(onboarded.factory_new, before)
    require_user_data(before, onboarding)
    if before.contents is not None and not station_ssid(before.contents):
        pytest.fail(f"INCONCLUSIVE: a provisioned node should hold {WIFI_SSID_KEY} in NVS before the reset", pytrace=False)
    dut.expect_exact("MQTT Connected", timeout=BOOT_TIMEOUT_S)  # the read reset the board; let it come back

    press_boot_button(dut, WIFI_RESET_PRESSED, WIFI_RESET_HOLD_S)  # let go at once: well before the 10 s of a factory reset
    dut.expect_exact(WIFI_RESET_EVENT, not_matching=[FACTORY_RESET_PRESSED, FACTORY_RESET_EVENT], timeout=RESET_ANSWER_S)
    dut.expect_exact(ROM_BANNER, timeout=BOOT_TIMEOUT_S)
    came_back = dut.expect([QR_LINE, re.compile(rb"Already provisioned")], timeout=BOOT_TIMEOUT_S)

    after = nvs_snapshot(dut)
    assert b"QRCODE" in came_back.group(0), "after the Wi-Fi reset the node came back provisioned, not in provisioning"
    if before.contents is None or after.contents is None:
        kept = still_there(onboarding, after)
        assert kept, ("the Wi-Fi reset erased every encrypted NVS entry onboarding wrote: the user mapping went with the "
                      "Wi-Fi credentials (only esp_wifi_restore should run)")  # fmt: skip
        assert len(kept) < len(onboarding), "the Wi-Fi reset left every NVS entry onboarding wrote in place: the credentials stay stored"
        return
    assert not station_ssid(after.contents), (f"the Wi-Fi reset kept the station credentials ({station_ssid(after.contents)!r} "
                                              f"in {WIFI_NAMESPACE})")  # fmt: skip
    lost = sorted(set(before.contents) - set(after.contents) - {WIFI_NAMESPACE})
    assert not lost, f"the Wi-Fi reset erased more than the Wi-Fi credentials: {lost} are gone (only esp_wifi_restore should run)"
    assert after.contents[MAPPING_NAMESPACE] == before.contents[MAPPING_NAMESPACE], "the Wi-Fi reset changed the user mapping; keep it"

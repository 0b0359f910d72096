"""The node's console commands (idf-console.md §8).

From esp-rainmaker-common ``src/console/rmaker_common_cmds.c``: ``reset-to-factory``,
``local-time``, ``tz-set``; from esp-rainmaker ``src/console/esp_rmaker_commands.c``:
``add-user``, ``get-node-id``, ``wifi-prov`` and, with
``CONFIG_ESP_RMAKER_CONSOLE_PARAM_CMDS_ENABLE`` (the switch example's), ``set-param``,
``update-param``, ``get-param``. ``wifi-reset`` is the virtual firmware's stand-in for the
examples' reset button (``esp_rmaker_wifi_reset(0, 2)``). Each registration is logged as
RainMaker logs it; replies are ``printf`` text, and a handler's non-zero return makes
the console print ``Console command failed with error: <n>``. The generic debug commands
(``reboot``, ``up-time`` …) are the console's own (``rig.vboard.app``).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import TYPE_CHECKING

from rig.vboard.app import CommandResult, ConsoleCommand
from rig.vboard.node.messages import TAG_COMMANDS, TAG_COMMON, NodeMsg
from rig.vboard.node.wifi_station import PASSPHRASE_MAX, SSID_MAX

if TYPE_CHECKING:
    from rig.vboard.node.data_model import Device, Param
    from rig.vboard.node.node import RainMakerNode

ESP_OK = 0
ESP_FAIL = -1
ESP_ERR_INVALID_ARG = 0x102
C_LOCALE_TIME = "%a %b %e %H:%M:%S %Y"
"""``%c`` in newlib's C locale."""


def local_time_text(now: dt.datetime | None = None) -> str:
    """``esp_rmaker_get_local_time_str``: ``strftime("%c %z[%Z]")`` plus ``, DST: Yes|No``,
    with the default (UTC) time zone."""
    now = now or dt.datetime.now(dt.UTC)
    return f"{now.strftime(C_LOCALE_TIME)} +0000[UTC], DST: No"


def register_node_commands(node: RainMakerNode) -> None:
    """Register the RainMaker commands on the node's console."""
    commands = node.ctx.commands
    write = node.runtime.write

    def register(tag: str, name: str, handler: Callable[[list[str]], CommandResult]) -> None:
        commands.register(ConsoleCommand(name, NodeMsg.HELP[name], handler), log_tag=tag)

    # --------------------------------------------------------------- rmaker_common_cmds.c

    def reset_to_factory(_argv: list[str]) -> CommandResult:
        write(NodeMsg.COMMON_FACTORY_RESET)
        node.factory_reset()
        return ESP_OK

    def local_time(_argv: list[str]) -> CommandResult:
        write(NodeMsg.COMMON_LOCAL_TIME.format(time=local_time_text()))
        return ESP_OK

    def tz_set(argv: list[str]) -> CommandResult:
        if len(argv) < 2 or (argv[1] == "posix" and len(argv) < 3):
            write(NodeMsg.COMMON_INVALID_USAGE)
            return ESP_ERR_INVALID_ARG
        name, value = ("TZ-POSIX", argv[2]) if argv[1] == "posix" else ("TZ", argv[1])
        found = _lookup(node, "Time", name)
        if found is not None:
            node.update_param(found[0], found[1], value)
        return ESP_OK

    register(TAG_COMMON, "reset-to-factory", reset_to_factory)
    register(TAG_COMMON, "local-time", local_time)
    register(TAG_COMMON, "tz-set", tz_set)

    # --------------------------------------------------------------- esp_rmaker_commands.c

    def add_user(argv: list[str]) -> CommandResult:
        if len(argv) != 3:
            write(NodeMsg.CMD_INVALID_USAGE)
            return ESP_ERR_INVALID_ARG
        write(NodeMsg.CMD_START_MAPPING)
        return ESP_OK if node.start_user_mapping(argv[1], argv[2], from_provisioning=False) else ESP_FAIL

    def get_node_id(_argv: list[str]) -> CommandResult:
        write(NodeMsg.CMD_NODE_ID.format(node_id=node.node_id or "(null)"))
        return ESP_OK

    def wifi_prov(argv: list[str]) -> CommandResult:
        if len(argv) < 2:
            write(NodeMsg.CMD_INVALID_USAGE)
            return ESP_ERR_INVALID_ARG
        ssid = argv[1].encode()
        passphrase = argv[2].encode() if len(argv) >= 3 else b""
        if len(ssid) > SSID_MAX or len(passphrase) > PASSPHRASE_MAX:
            write(NodeMsg.CMD_WIFI_CONFIG_FAILED)
            return ESP_FAIL
        if node.provisioning is not None and node.provisioning.active:
            node.provisioning.credentials_received(ssid, passphrase)  # wifi_prov_mgr_configure_sta
            return ESP_OK
        if node.nvs is None or node.identity is None:
            return ESP_OK  # no provisioning manager: wifi_prov_mgr_configure_sta has nothing to configure
        node.wifi.disconnect()
        node.save_wifi(ssid, passphrase)
        node.wifi.set_config(ssid, passphrase)
        node.wifi.apply()
        return ESP_OK

    def wifi_reset(_argv: list[str]) -> CommandResult:
        node.wifi_reset()
        return ESP_OK

    def param_command(argv: list[str], wanted: int) -> tuple[Device, Param] | CommandResult:
        if len(argv) != wanted:
            write(NodeMsg.CMD_INVALID_USAGE)
            return ESP_ERR_INVALID_ARG
        found = _lookup(node, argv[1], argv[2])
        if found is None:
            write(NodeMsg.CMD_PARAM_NOT_FOUND.format(device=argv[1], param=argv[2]))
            return ESP_ERR_INVALID_ARG
        return found

    def set_param(argv: list[str], callback: bool) -> CommandResult:
        found = param_command(argv, 4)
        if not isinstance(found, tuple):
            return found
        device, param = found
        try:
            value = param.parse_console(argv[3])
        except ValueError:
            write(NodeMsg.CMD_PARAM_BAD_VALUE.format(value=argv[3], device=device.name, param=param.name))
            return ESP_ERR_INVALID_ARG
        if callback:
            node.set_param_locally(device, param, value)
            write(NodeMsg.CMD_SET_PARAM.format(device=device.name, param=param.name, value=param.text()))
        else:
            node.update_param(device, param, value)
            write(NodeMsg.CMD_UPDATE_PARAM.format(device=device.name, param=param.name, value=param.text()))
        return ESP_OK

    def get_param(argv: list[str]) -> CommandResult:
        found = param_command(argv, 3)
        if not isinstance(found, tuple):
            return found
        device, param = found
        write(NodeMsg.CMD_GET_PARAM.format(device=device.name, param=param.name, value=param.text()))
        return ESP_OK

    register(TAG_COMMANDS, "add-user", add_user)
    register(TAG_COMMANDS, "get-node-id", get_node_id)
    register(TAG_COMMANDS, "wifi-prov", wifi_prov)
    register(TAG_COMMANDS, "wifi-reset", wifi_reset)
    register(TAG_COMMANDS, "set-param", lambda argv: set_param(argv, callback=True))
    register(TAG_COMMANDS, "update-param", lambda argv: set_param(argv, callback=False))
    register(TAG_COMMANDS, "get-param", get_param)


def _lookup(node: RainMakerNode, device: str, param: str) -> tuple[Device, Param] | None:
    if node.model is None:
        return None
    found_device = node.model.device(device)
    found_param = None if found_device is None else found_device.param(param)
    if found_device is None or found_param is None:
        return None
    return found_device, found_param

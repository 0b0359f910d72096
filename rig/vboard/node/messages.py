"""Every line the RainMaker node firmware prints, in one place.

Log lines are :class:`~rig.vboard.bootloader.LogMessage` (level, tag, ``str.format``
text); ``printf`` replies of console commands are plain format strings ending in ``\\n``.
Sources (shared/reference/idf-console.md §6, §8 and the files it cites):

* esp-rainmaker ``components/esp_rainmaker/src/core/esp_rmaker_core.c``, ``esp_rmaker_node.c``,
  ``esp_rmaker_user_mapping.c``, ``esp_rmaker_param.c``, ``esp_rmaker_connectivity.c``,
  ``src/console/esp_rmaker_commands.c``, ``src/ota/esp_rmaker_ota.c``, ``esp_rmaker_ota_using_topics.c``,
  ``esp_rmaker_https_ota.c``;
* esp-rainmaker ``examples/switch/main/app_main.c`` (tag ``app_main``) and
  ``examples/common/app_network/app_network.c`` / ``app_wifi_internal.c``;
* esp-rainmaker-common ``src/factory.c``, ``src/esp-mqtt/esp-mqtt-glue.c``,
  ``components/rmaker_work_queue``, ``src/console/rmaker_common_cmds.c``;
* idf-extra-components ``network_provisioning/src/manager.c``, ``qrcode/esp_qrcode_main.c``;
* esp-idf ``components/protocomm/src/transports/protocomm_console.c``;
* esp-idf ``components/esp_https_ota/src/esp_https_ota.c``, ``components/app_update/esp_ota_ops.c``;
* esp-idf ``components/esp_netif/esp_netif_handlers.c``, ``components/esp-tls``,
  ``components/tcp_transport/transport_ssl.c``, ``components/mqtt`` (``mqtt_client.c``).

The esp-tls / tcp_transport error codes printed on a failed connection are
``esp_tls_errors.h`` values: 0x8004 ``ESP_ERR_ESP_TLS_FAILED_CONNECT_TO_HOST`` (32772)
for a refused TCP connection, 0x801A (32794) for a failed TLS handshake.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

from rig.vboard.app import TAG_COMMON  # rmaker_common_cmds: the console's generic commands share it
from rig.vboard.app import TAG_OTA as TAG_OTA_OPS  # esp_ota_ops
from rig.vboard.bootloader import LogMessage

TAG_NODE = "esp_rmaker_node"
TAG_CORE = "esp_rmaker_core"
TAG_FCTRY = "esp_rmaker_fctry"
TAG_WORK_QUEUE = "esp_rmaker_work_queue"
TAG_APP = "app_main"
TAG_WIFI = "app_wifi"
TAG_NETWORK = "app_network"
TAG_PROV_MGR = "network_prov_mgr"
TAG_QR = "QRCODE"
TAG_NETIF = "esp_netif_handlers"
TAG_MQTT_GLUE = "esp_mqtt_glue"
TAG_TLS = "esp-tls"
TAG_TLS_MBEDTLS = "esp-tls-mbedtls"
TAG_TRANSPORT = "transport_base"
TAG_MQTT_CLIENT = "mqtt_client"
TAG_MAPPING = "esp_rmaker_user_mapping"
TAG_COMMANDS = "esp_rmaker_commands"
TAG_PARAM = "esp_rmaker_param"
TAG_CONNECTIVITY = "esp_rmaker_connectivity"
TAG_OTA = "esp_rmaker_ota"
TAG_OTA_TOPICS = "esp_rmaker_ota_using_topics"
TAG_RMAKER_HTTPS_OTA = "esp_rmaker_https_ota"
TAG_HTTPS_OTA = "esp_https_ota"
TAG_PROTOCOMM_CONSOLE = "protocomm_console"
TAG_RIG = "rig_vboard"
"""Lines only the virtual firmware prints (a manifest it refuses); never mistaken for ESP-IDF's."""

TLS_CONNECT_FAILED = 0x8004
TLS_HANDSHAKE_FAILED = 0x801A
MBEDTLS_X509_CERT_VERIFY_FAILED = 0x2700
"""``MBEDTLS_ERR_X509_CERT_VERIFY_FAILED``: what ``mbedtls_ssl_handshake`` returns when the
server's certificate does not verify."""
MBEDTLS_SSL_FATAL_ALERT = 0x7780
"""``MBEDTLS_ERR_SSL_FATAL_ALERT_MESSAGE``: the server refused the handshake with an alert."""


class NodeMsg:
    """The node's log lines and console replies."""

    # esp_rmaker_node.c / esp_rmaker_core.c / factory.c / work_queue.c
    NODE_ID = LogMessage("I", TAG_NODE, "Node ID ----- {node_id}")
    FCTRY_INIT_FAILED = LogMessage("E", TAG_FCTRY, "NVS Flash init failed")
    STORAGE_FAILED = LogMessage("E", TAG_CORE, "Failed to initialise storage")
    NO_NODE_ID = LogMessage("E", TAG_CORE, 'Failed to initialise Node Id. Please perform "claiming" using RainMaker CLI.')
    NO_MQTT_PARAMS = LogMessage("E", TAG_CORE, 'Failed to initialise MQTT Params. Please perform "claiming" using RainMaker CLI.')
    WORK_QUEUE_CREATED = LogMessage("I", TAG_WORK_QUEUE, "Work Queue created.")
    WORK_QUEUE_STARTING = LogMessage("I", TAG_CORE, "Starting RainMaker Work Queue task")
    WORK_QUEUE_STARTED = LogMessage("I", TAG_WORK_QUEUE, "RainMaker Work Queue task started.")
    WAITING_MQTT = LogMessage("I", TAG_CORE, "Waiting for MQTT connection")
    WAITING_MAPPING = LogMessage("I", TAG_CORE, "Waiting for User Node Association.")

    # examples/switch/main/app_main.c (event echoes, write callback)
    APP_INITIALISED = LogMessage("I", TAG_APP, "RainMaker Initialised.")
    APP_MQTT_CONNECTED = LogMessage("I", TAG_APP, "MQTT Connected.")
    APP_MQTT_DISCONNECTED = LogMessage("I", TAG_APP, "MQTT Disconnected.")
    APP_MQTT_PUBLISHED = LogMessage("I", TAG_APP, "MQTT Published. Msg id: {mid}.")
    APP_PROV_QR = LogMessage("I", TAG_APP, "Provisioning QR : {payload}")
    APP_REBOOTING = LogMessage("I", TAG_APP, "Rebooting in {seconds} seconds.")
    APP_WIFI_RESET = LogMessage("I", TAG_APP, "Wi-Fi credentials reset.")
    APP_FACTORY_RESET = LogMessage("I", TAG_APP, "Node reset to factory defaults.")
    APP_WRITE_REQUEST = LogMessage("I", TAG_APP, "Received write request via : {source}")
    APP_RECEIVED_VALUE = LogMessage("I", TAG_APP, "Received value = {value} for {device} - {param}")

    # app_wifi_internal.c
    STARTING_PROVISIONING = LogMessage("I", TAG_WIFI, "Starting provisioning")
    ALREADY_PROVISIONED = LogMessage("I", TAG_WIFI, "Already provisioned, starting Wi-Fi STA")
    PROVISIONING_STARTED = LogMessage("I", TAG_WIFI, "Provisioning started")
    CREDENTIALS_RECEIVED = LogMessage("I", TAG_WIFI, "Received Wi-Fi credentials\n\tSSID     : {ssid}")
    CREDENTIALS_RECEIVED_WITH_PASSWORD = LogMessage(
        "I", TAG_WIFI, "Received Wi-Fi credentials\n\tSSID     : {ssid}\n\tPassword : {password}"
    )
    PROVISIONING_FAILED = LogMessage(
        "E", TAG_WIFI, "Provisioning failed!\n\tReason : {reason}\n\tPlease reset to factory and retry provisioning"
    )
    PROVISIONING_SUCCESSFUL = LogMessage("I", TAG_WIFI, "Provisioning successful")
    RECONNECTING_AP = LogMessage("I", TAG_WIFI, "Disconnected. Connecting to the AP again...")
    FAIL_REASON_AUTH = "Wi-Fi station authentication failed"
    FAIL_REASON_NOT_FOUND = "Wi-Fi access-point not found"

    # network_provisioning manager.c (note the trailing space)
    PROV_MGR_STARTED = LogMessage("I", TAG_PROV_MGR, "Provisioning started with service name : {name} ")
    PROV_MGR_STOPPED = LogMessage("I", TAG_PROV_MGR, "Provisioning stopped")

    # esp-idf protocomm/src/transports/protocomm_console.c (protocomm_console_stop, then its task's exit)
    PROTOCOMM_CONSOLE_STOPPING = LogMessage("I", TAG_PROTOCOMM_CONSOLE, "Stopping console...")
    PROTOCOMM_CONSOLE_STOPPED = LogMessage("I", TAG_PROTOCOMM_CONSOLE, "Console stopped")

    # app_network.c, qrcode/esp_qrcode_main.c
    SCAN_QR = LogMessage("I", TAG_NETWORK, "Scan this QR code from the ESP RainMaker phone app for Provisioning.")
    QR_ENCODING = LogMessage("I", TAG_QR, "Encoding below text with ECC LVL {ecc} & QR Code Version {version}")
    QR_TEXT = LogMessage("I", TAG_QR, "{payload}")
    QR_URL = LogMessage("I", TAG_NETWORK, "If QR code is not visible, copy paste the below URL in a browser.\n{base}?data={payload}")
    PROV_AUTO_STOP = LogMessage("I", TAG_NETWORK, "Provisioning will auto stop after {minutes} minute(s).")
    PROV_TIMED_OUT = LogMessage("W", TAG_NETWORK, "Provisioning timed out. Please reboot device to restart provisioning.")
    POP_FAILED = LogMessage("E", TAG_NETWORK, "Failed to read random bytes from NVS to generate PoP.")
    CONNECTED_IP = LogMessage("I", TAG_NETWORK, "Connected with IP Address:{ip}")
    QR_BASE_URL = "https://rainmaker.espressif.com/qrcode.html"

    # esp_netif_handlers.c
    STA_IP = LogMessage("I", TAG_NETIF, "sta ip: {ip}, mask: {mask}, gw: {gw}")

    # esp-mqtt-glue.c and the esp-tls / transport / mqtt_client chain below it
    MQTT_PPI = LogMessage("I", TAG_MQTT_GLUE, "AWS PPI: {ppi}")
    MQTT_INIT = LogMessage("I", TAG_MQTT_GLUE, "Initialising MQTT")
    MQTT_CONNECTING = LogMessage("I", TAG_MQTT_GLUE, "Connecting to {host}")
    MQTT_CONNECTED = LogMessage("I", TAG_MQTT_GLUE, "MQTT Connected")
    MQTT_DISCONNECTED = LogMessage("W", TAG_MQTT_GLUE, "MQTT Disconnected. Will try reconnecting in a while...")
    MQTT_EVENT_ERROR = LogMessage("E", TAG_MQTT_GLUE, "MQTT_EVENT_ERROR")
    TLS_DELAYED_CONNECT = LogMessage("E", TAG_TLS, "[sock={fd}] delayed connect error: {error}")
    TLS_HANDSHAKE = LogMessage("E", TAG_TLS_MBEDTLS, "mbedtls_ssl_handshake returned -0x{code:x}")
    TLS_VERIFY_FAILED = LogMessage("E", TAG_TLS_MBEDTLS, "Failed to verify peer certificate!")
    TLS_OPEN_FAILED = LogMessage("E", TAG_TLS, "Failed to open new connection")
    TRANSPORT_OPEN_FAILED = LogMessage("E", TAG_TRANSPORT, "Failed to open a new connection: {code}")
    MQTT_TRANSPORT_ERROR = LogMessage("E", TAG_MQTT_CLIENT, "Error transport connect")
    MQTT_CONNACK_REFUSED = LogMessage("E", TAG_MQTT_CLIENT, "{reason}")
    CONNACK_REASONS: ClassVar[Mapping[int, str]] = MappingProxyType({
        1: "Connection refused, bad protocol",
        2: "Connection refused, identifier rejected",
        3: "Connection refused, Server unavailable",
        4: "Connection refused, bad username or password",
        5: "Connection refused, not authorized",
    })

    # esp_rmaker_connectivity.c
    LWT_TOPIC = LogMessage("I", TAG_CONNECTIVITY, "Configuring LWT topic: {topic}")
    LWT_MESSAGE = LogMessage("I", TAG_CONNECTIVITY, "LWT message: {message}")
    CONNECTIVITY_ENABLED = LogMessage("I", TAG_CONNECTIVITY, "Connectivity service enabled")
    CONNECTIVITY_DELAY = LogMessage("I", TAG_CONNECTIVITY, "MQTT Connected - will report Connected=true after {seconds} seconds")
    CONNECTIVITY_REPORT = LogMessage("I", TAG_CONNECTIVITY, "Reporting Connected=true")

    # esp_rmaker_user_mapping.c
    MAPPING_NODE_DETAILS = LogMessage("I", TAG_MAPPING, "Received request for node details")
    MAPPING_GOT = LogMessage("I", TAG_MAPPING, "Got user_id = {user_id}, secret_key = {secret_key}")
    MAPPING_SUCCESS = LogMessage("I", TAG_MAPPING, "Sending status SUCCESS")
    MAPPING_RESET_DETECTED = LogMessage("I", TAG_MAPPING, "User Node mapping reset detected.")
    MAPPING_QUEUED = LogMessage("I", TAG_MAPPING, "RainMaker config reported, queuing pending user mapping task.")
    MAPPING_PUBLISH = LogMessage("I", TAG_MAPPING, "MQTT Publish: {payload}")
    MAPPING_PUBLISHED = LogMessage("I", TAG_MAPPING, "User Node association message published successfully.")

    # esp_rmaker_param.c
    PARAMS_RECEIVED = LogMessage("I", TAG_PARAM, "Received params: {payload}")
    PARAMS_REPORTING = LogMessage("I", TAG_PARAM, "Reporting params: {payload}")

    # esp_rmaker_ota.c (first boot of an update: confirm after MQTT, or roll back; every status report)
    OTA_STATE = LogMessage("I", TAG_OTA, "OTA state = {state}")
    OTA_FIRST_BOOT = LogMessage("I", TAG_OTA, "First Boot after an OTA")
    OTA_DIAGNOSTICS_OK = LogMessage("I", TAG_OTA, "Diagnostics completed successfully! Continuing execution ...")
    OTA_VERIFIED = LogMessage("I", TAG_OTA, "OTA Upgrade finished and verified successfully")
    OTA_ROLLBACK = LogMessage("E", TAG_OTA, "Could not verify firmware even after {seconds} seconds since boot-up. Rolling back.")
    OTA_REPORTING = LogMessage("I", TAG_OTA, "Reporting {status}: {info}")
    OTA_ATTEMPT = LogMessage("W", TAG_OTA, "Starting {protocol} OTA attempt {attempt}/{attempts}. This may take time.")
    OTA_ATTEMPT_FAILED = LogMessage("E", TAG_OTA, "{protocol} OTA attempt {attempt} failed: {reason}")
    OTA_PROJECT_MISMATCH = LogMessage("W", TAG_OTA, "OTA Image built for Project: {new}. Expected: {running}")
    OTA_SAME_VERSION = LogMessage("W", TAG_OTA, "Current running version is same as the new. We will not continue the update.")
    OTA_LOWER_SECURE_VERSION = LogMessage(
        "W", TAG_OTA, "New secure version is lower than stored in efuse. We will not continue the update.")
    OTA_UPGRADE_DONE = LogMessage("I", TAG_OTA, "{protocol} OTA upgrade successful. Rebooting in {seconds} seconds...")

    # esp_rmaker_ota_using_topics.c (otaurl, otafetch, otastatus)
    OTA_ENABLED = LogMessage("I", TAG_OTA_TOPICS, "OTA enabled with Topics")
    OTA_SUBSCRIBING = LogMessage("I", TAG_OTA_TOPICS, "Subscribing to: {topic}")
    OTA_FETCHING = LogMessage("I", TAG_OTA_TOPICS, "Fetching OTA details, if any.")
    OTA_FETCH_OFFLINE = LogMessage("W", TAG_OTA_TOPICS, "MQTT not connected. Cannot fetch OTA.")
    OTA_FETCH_RETRY = LogMessage("I", TAG_OTA_TOPICS, "OTA fetch failed, retry {retry} in {seconds} seconds")
    OTA_URL_RECEIVED = LogMessage("I", TAG_OTA_TOPICS, "Upgrade Handler got:{payload} on {topic} topic\n")
    OTA_BUSY = LogMessage("E", TAG_OTA_TOPICS, "OTA already in progress. Please try later.")
    OTA_BAD_JSON = LogMessage("E", TAG_OTA_TOPICS, "Invalid JSON received: {payload}")
    OTA_NO_JOB_ID = LogMessage("E", TAG_OTA_TOPICS, "Aborted. OTA Job ID not found in JSON")
    OTA_NO_URL = LogMessage("E", TAG_OTA_TOPICS, "Aborted. URL not found in JSON")
    OTA_JOB_ID = LogMessage("I", TAG_OTA_TOPICS, "OTA Job ID: {job_id}")
    OTA_URL = LogMessage("I", TAG_OTA_TOPICS, "URL: {url}")
    OTA_FILE_MD5 = LogMessage("I", TAG_OTA_TOPICS, "File MD5: {md5}")
    OTA_FILE_SIZE = LogMessage("I", TAG_OTA_TOPICS, "File Size: {size}")
    OTA_FW_VERSION = LogMessage("I", TAG_OTA_TOPICS, "Firmware version: {version}")
    OTA_STATUS_PAYLOAD = LogMessage("I", TAG_OTA_TOPICS, "{payload}")
    OTA_NO_JOB_TO_REPORT = LogMessage("W", TAG_OTA_TOPICS, "Not reporting any status, since there is no Job ID available")

    # esp_rmaker_https_ota.c, then esp-idf esp_https_ota.c and esp_ota_ops.c below it
    OTA_HTTPS_STARTING = LogMessage("W", TAG_RMAKER_HTTPS_OTA, "Starting OTA. This may take time.")
    OTA_BYTES_READ = LogMessage("I", TAG_RMAKER_HTTPS_OTA, "Image bytes read: {count}")
    HTTPS_OTA_NO_VERIFICATION = LogMessage(
        "E", TAG_HTTPS_OTA, "No option for server verification is enabled in esp_http_client config.")
    HTTPS_OTA_INSECURE = LogMessage(
        "W", TAG_HTTPS_OTA, "Continuing with insecure option because CONFIG_ESP_HTTPS_OTA_ALLOW_HTTP is set.")
    HTTPS_OTA_CONNECT_FAILED = LogMessage("E", TAG_HTTPS_OTA, "Failed to establish HTTP connection")
    HTTPS_OTA_STARTING = LogMessage("I", TAG_HTTPS_OTA, "Starting OTA...")
    HTTPS_OTA_NO_PASSIVE = LogMessage("E", TAG_HTTPS_OTA, "Passive OTA partition not found")
    HTTPS_OTA_WRITING = LogMessage("I", TAG_HTTPS_OTA, "Writing to partition subtype {subtype} at offset 0x{offset:x}")
    HTTPS_OTA_SHORT_HEADER = LogMessage("E", TAG_HTTPS_OTA, "Complete headers were not received")
    HTTPS_OTA_BAD_DESC = LogMessage("E", TAG_HTTPS_OTA, "Incorrect app descriptor magic")
    HTTPS_OTA_CHIP_ID = LogMessage("E", TAG_HTTPS_OTA, "Mismatch chip id, expected {expected}, found {found}")
    HTTPS_OTA_CLOSED_EARLY = LogMessage("E", TAG_HTTPS_OTA, "Connection closed before complete data was received!")
    OTA_OPS_PENDING = LogMessage("E", TAG_OTA_OPS, "Running app has not confirmed state (ESP_OTA_IMG_PENDING_VERIFY)")
    OTA_OPS_BAD_MAGIC = LogMessage("E", TAG_OTA_OPS, "OTA image has invalid magic byte (expected 0xE9, saw 0x{byte:02x})")
    OTA_OPS_VERIFY_FAILED = LogMessage("E", TAG_OTA_OPS, "New image failed verification")
    OTA_OPS_LOWER_SECURE_VERSION = LogMessage(
        "E", TAG_OTA_OPS, "This a new partition can not be booted due to a secure version is lower than stored in efuse. "
        "Partition will be erased.")

    # console: esp_rmaker_commands.c and rmaker_common_cmds.c (printf replies; each registration's
    # "Registering command" line is rig.vboard.app's Msg.REGISTERING, logged by ConsoleCommands.register)
    CMD_NODE_ID = TAG_COMMANDS + ": Node ID: {node_id}\n"
    CMD_START_MAPPING = TAG_COMMANDS + ": Starting user-node mapping\n"
    CMD_INVALID_USAGE = TAG_COMMANDS + ": Invalid Usage.\n"
    CMD_WIFI_CONFIG_FAILED = TAG_COMMANDS + ": Failed to set WiFi configuration\n"
    CMD_SET_PARAM = TAG_COMMANDS + ": Successfully set {device}.{param} to {value} (with callback)\n"
    CMD_UPDATE_PARAM = TAG_COMMANDS + ": Successfully updated {device}.{param} to {value} (no callback)\n"
    CMD_GET_PARAM = TAG_COMMANDS + ": {device}.{param} = {value}\n"
    CMD_PARAM_NOT_FOUND = TAG_COMMANDS + ": Parameter {device}.{param} not found\n"
    CMD_PARAM_BAD_VALUE = TAG_COMMANDS + ": Invalid value {value} for {device}.{param}\n"
    COMMON_FACTORY_RESET = TAG_COMMON + ": Resetting to Factory Defaults...\n"
    COMMON_LOCAL_TIME = TAG_COMMON + ": Current local time: {time}\n"
    COMMON_INVALID_USAGE = TAG_COMMON + ": Invalid Usage.\n"
    HELP: ClassVar[Mapping[str, str]] = MappingProxyType({
        "add-user": "Initiate the User-Node mapping from the node. Usage: add-user <user_id> <secret_key>",
        "get-node-id": "Get the Node ID for this board",
        "wifi-prov": "Wi-Fi Provision the node. Usage: wifi-prov <ssid> [<passphrase>]",
        "wifi-reset": "Erase the Wi-Fi credentials and reboot into provisioning. Usage: wifi-reset",
        "set-param": "Set a parameter through the device callback. Usage: set-param <device> <param> <value>",
        "update-param": "Update and report a parameter without the callback. Usage: update-param <device> <param> <value>",
        "get-param": "Get the value of a parameter. Usage: get-param <device> <param>",
        "reset-to-factory": "Reset the board to factory defaults",
        "local-time": "Get the local time of device.",
        "tz-set": "Set Timezone. Usage: tz-set [posix] <tz_string>.",
    })

    # the virtual firmware's own (no ESP-IDF counterpart)
    NVS_KEYS_FAILED = LogMessage("E", TAG_RIG, "NVS encryption keys unavailable ({reason}); the node does not start")
    UNKNOWN_FLAWS = LogMessage(
        "E", TAG_RIG, "behaviour manifest names unknown flaw(s) {names}; the node does not start. "
        "Fix: rebuild the image with flaws from rig.vboard.flaws.FLAWS"
    )

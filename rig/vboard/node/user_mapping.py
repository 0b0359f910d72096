"""User–node mapping on the node (esp-rainmaker ``src/core/esp_rmaker_user_mapping.c``).

rainmaker-protocol.md §2.2–2.3: a mapping starts from provisioning (``cloud_user_assoc``)
or the console (``add-user``) with a user id and secret; with
``CONFIG_ESP_RMAKER_USER_ID_CHECK`` a user id different from the one stored in NVS
(``user_mapping``/``user_id``) is a reset (state STARTED, ``"reset":true`` in the
message). Once the node has reported its config over MQTT it publishes
``{"node_id","user_id","secret_key"[,"reset":true]}`` on ``user/mapping``; the PUBACK
makes the mapping DONE (or RESET for the factory-reset dummy ``esp-rmaker``/``failed``
of ``CONFIG_ESP_RMAKER_FACTORY_RESET_REPORTING``) and stores the user id. Then the node
initialises its params over MQTT (:attr:`UserMapping.on_done`).
"""

from __future__ import annotations

import enum
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from rig.vboard.node.messages import NodeMsg
from rig.vboard.node.nvs_store import NvsStore
from rig.vboard.node.runtime import NodeRuntime

NVS_NAMESPACE = "user_mapping"
NVS_KEY = "user_id"
RESET_USER_ID = "esp-rmaker"
RESET_SECRET = "failed"


class MappingState(enum.Enum):
    """``esp_rmaker_user_mapping_state_t``."""

    IDLE = 0
    STARTED = 1
    REQ_SENT = 2
    DONE = 3
    RESET = 4


@dataclass
class _Pending:
    user_id: str
    secret_key: str = field(repr=False)
    mid: int | None = None


class UserMapping:
    """The mapping state of one boot. *publish(suffix, payload)* returns the MQTT message
    id (None when not connected); *on_done(reset)* runs once a mapping's PUBACK came."""

    def __init__(self, runtime: NodeRuntime, nvs: NvsStore, node_id: str,
                 publish: Callable[[str, str], int | None], on_done: Callable[[bool], None]):  # fmt: skip
        self.runtime = runtime
        self.nvs = nvs
        self.node_id = node_id
        self.publish = publish
        self.on_done = on_done
        self._lock = threading.Lock()
        self._pending: _Pending | None = None
        self._config_reported = False
        self.state = MappingState.DONE if nvs.get(NVS_NAMESPACE, NVS_KEY) else MappingState.IDLE

    @property
    def stored_user_id(self) -> str | None:
        raw = self.nvs.get(NVS_NAMESPACE, NVS_KEY)
        return None if raw is None else raw.decode("utf-8", "replace")

    @property
    def pending(self) -> bool:
        with self._lock:
            return self._pending is not None

    def start(self, user_id: str, secret_key: str) -> None:
        """``esp_rmaker_start_user_node_mapping``."""
        stored = self.stored_user_id
        with self._lock:
            self._pending = _Pending(user_id, secret_key)
            if stored is not None and stored == user_id:
                self.state = MappingState.DONE
                reset = False
            else:
                if stored is not None:
                    self.nvs.erase_key(NVS_NAMESPACE, NVS_KEY)
                    self.nvs.commit()
                self.state = MappingState.STARTED
                reset = True
            ready = self._config_reported
        if reset:
            self.runtime.log(NodeMsg.MAPPING_RESET_DETECTED)
        if ready:
            self._send()

    def reset(self) -> None:
        """``esp_rmaker_reset_user_node_mapping`` (factory-reset reporting): a dummy mapping
        that tells the cloud the node's users are gone."""
        self.start(RESET_USER_ID, RESET_SECRET)

    def config_reported(self) -> None:
        """The node config went out on this connection: a pending mapping may go now."""
        with self._lock:
            self._config_reported = True
            send = self._pending is not None and self._pending.mid is None
        if send:
            self.runtime.log(NodeMsg.MAPPING_QUEUED)
            self._send()

    def disconnected(self) -> None:
        """The MQTT connection dropped: an unacknowledged mapping goes again after the next config report."""
        with self._lock:
            self._config_reported = False
            if self._pending is not None:
                self._pending.mid = None

    def _send(self) -> None:
        with self._lock:
            pending = self._pending
            if pending is None or pending.mid is not None:
                return
            body: dict[str, object] = {"node_id": self.node_id, "user_id": pending.user_id, "secret_key": pending.secret_key}
            if self.state is not MappingState.DONE:
                body["reset"] = True
            payload = json.dumps(body, separators=(",", ":"))
            mid = self.publish("user/mapping", payload)
            if mid is not None:
                pending.mid = mid
                self.state = MappingState.REQ_SENT
        self.runtime.log(NodeMsg.MAPPING_PUBLISH, payload=payload)

    def published(self, mid: int) -> bool:
        """A PUBACK arrived; True if it acknowledged the mapping message (which is then done)."""
        with self._lock:
            pending = self._pending
            if pending is None or pending.mid != mid:
                return False
            self._pending = None
            reset = pending.user_id == RESET_USER_ID
            self.state = MappingState.RESET if reset else MappingState.DONE
        self.runtime.log(NodeMsg.MAPPING_PUBLISHED)
        self.nvs.set_blob(NVS_NAMESPACE, NVS_KEY, pending.user_id.encode())
        self.nvs.commit()
        self.on_done(reset)
        return True

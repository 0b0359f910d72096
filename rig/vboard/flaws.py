"""The flaw catalogue: every bug a virtual board's firmware can be built with.

DESIGN.md "Principles": every security check ships with the flaw that makes it fail,
and a test proving the suite catches it. A firmware image names its flaws in its
behaviour manifest (``rig.firmware.behaviour.BehaviourManifest.flaws``); the virtual
board refuses an image naming a flaw that is not declared here (:func:`check_flaws`),
so a typo never yields a "clean" board that a suite then passes.

Each :class:`Flaw` says what goes wrong (``bug_class``), which ETSI EN 303 645
provisions a suite catches it under (ids from ``rig.evidence.en303645``), and which
module of the virtual board implements it (``implemented_in``; ``None`` while nobody
does yet — such a flaw is accepted in a manifest but changes nothing).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["FLAWS", "Flaw", "UnknownFlawError", "check_flaws"]


@dataclass(frozen=True)
class Flaw:
    name: str
    bug_class: str
    """What the flaw is, in the vocabulary of a vulnerability report."""
    provisions: tuple[str, ...]
    """EN 303 645 provisions whose tests must FAIL on a board with this flaw."""
    implemented_in: str | None
    """The module that makes the board misbehave, or None when not implemented yet."""
    behaviour: str
    """What the flawed board does differently from the clean one."""


_CATALOGUE: tuple[Flaw, ...] = (
    Flaw("sec0_provisioning", "provisioning without transport security (protocomm security 0)",
         ("5.5-1", "5.5-5", "5.5-7", "5.8-2"), "rig.vboard.node.prov_transport",
         "provisioning runs with security 0: Wi-Fi credentials and the mapping secret cross the air in plaintext"),
    Flaw("wrong_pop_accepted", "improper authentication (proof of possession not checked)",
         ("5.1-3", "5.5-5"), "rig.vboard.node.prov_transport",
         "after a PoP mismatch, security 1 retries with no PoP and Espressif's example PoP abcd1234 (a leftover debug fallback)"),
    Flaw("static_pop", "hard-coded credential (the same PoP on every device)",
         ("5.1-1", "5.4-3"), "rig.vboard.node.node",
         "the PoP is a constant of the firmware, not the per-device fctry random"),
    Flaw("pop_from_mac", "predictable credential (PoP derived from the MAC address)",
         ("5.1-1", "5.1-2"), "rig.vboard.node.node",
         "the PoP is the last four MAC bytes (RainMaker's POP_TYPE_MAC), readable by anyone in radio range"),
    Flaw("logs_wifi_password", "cleartext secret in logs (CWE-532)",
         ("5.4-1", "5.5-7"), "rig.vboard.node.provisioning",
         "the UART log prints the received Wi-Fi passphrase (\\tPassword : <pass>) as RainMaker's example does"),
    Flaw("plaintext_nvs", "sensitive data stored unencrypted",
         ("5.4-1",), "rig.vboard.node.nvs_keys",
         "the image is built without NVS encryption: the Wi-Fi passphrase, the user id and the local-control PoP "
         "lie in the nvs partition in clear, for anyone with esptool read-flash"),
    Flaw("no_server_cert_check", "improper certificate validation (CWE-295)",
         ("5.5-1", "5.5-2", "5.3-10"), "rig.vboard.node.cloud_link",
         "the MQTT TLS client accepts any server certificate and does not check the host name"),
    Flaw("plaintext_mqtt", "cleartext transmission (CWE-319)",
         ("5.5-1", "5.5-6", "5.8-1"), "rig.vboard.node.cloud_link",
         "before TLS the node tries plain MQTT to port 1883 of the broker host and uses it if it answers"),
    Flaw("accepts_unsigned_ota", "missing update signature check (CWE-347)",
         ("5.3-9", "5.3-10", "5.7-1"), "rig.vboard.node.ota_update",
         "an OTA image without a valid Secure Boot V2 signature is written and booted"),
    Flaw("accepts_http_ota", "update over an unauthenticated channel",
         ("5.3-7", "5.3-10", "5.5-1"), "rig.vboard.node.ota_download",
         "an otaurl with http:// is downloaded and installed"),
    Flaw("ignores_secure_version", "downgrade allowed (anti-rollback ignored)",
         ("5.3-2", "5.3-9"), "rig.vboard.node.ota_client",
         "an OTA image with a lower secure_version than the eFuse is accepted"),
    Flaw("confirms_before_cloud", "update confirmed before it is proven to work",
         ("5.3-2", "5.9-1"), "rig.vboard.node.boot_confirm",
         "a new image marks itself valid at boot instead of after MQTT connects, so it never rolls back"),
    Flaw("no_reconnect_backoff", "reconnection storm (no exponential backoff)",
         ("5.9-3",), "rig.vboard.node.cloud_link",
         "after a failed MQTT connection the node retries at once, forever, without backoff or jitter"),
    Flaw("panics_on_bad_params", "improper input validation leading to a crash (CWE-20)",
         ("5.13-1", "5.9-1"), "rig.vboard.node.node",
         "a malformed params/remote payload makes the firmware panic (Guru Meditation) and reboot"),
    Flaw("factory_reset_keeps_wifi", "incomplete data erasure on factory reset",
         ("5.11-1",), "rig.vboard.node.node",
         "reset-to-factory erases the app's NVS namespaces one by one and forgets the Wi-Fi driver's: the credentials stay on "
         "flash, in place, and the node rejoins"),
    Flaw("local_ctrl_no_pop", "missing authentication for a LAN control interface (CWE-306)",
         ("5.1-1", "5.5-4", "5.5-5"), "rig.vboard.node.local_ctrl",
         "local control runs protocomm security 1 without a proof of possession (the Local Control service reports "
         "an empty POP): anyone on the LAN gets a session, reads the node's config and params and sets params"),
    Flaw("open_debug_port", "undocumented open service (debug backdoor)",
         ("5.6-1", "5.6-2", "5.6-4"), "rig.vboard.node.debug_port",
         "an extra TCP listener on the board's address answers with a debug prompt"),
)

FLAWS: Mapping[str, Flaw] = MappingProxyType({flaw.name: flaw for flaw in _CATALOGUE})
"""Every flaw by name."""


class UnknownFlawError(ValueError):
    """A manifest names a flaw the catalogue does not declare."""

    def __init__(self, unknown: list[str]):
        self.unknown = unknown
        names = ", ".join(repr(n) for n in unknown)
        super().__init__(
            f"unknown flaw(s) {names}. Fix: use names from rig.vboard.flaws.FLAWS ({', '.join(FLAWS)})"
        )


def check_flaws(names: Iterable[str]) -> frozenset[str]:
    """The flaw names as a set, or :class:`UnknownFlawError` naming every unknown one."""
    names = list(names)
    unknown = [n for n in names if n not in FLAWS]
    if unknown:
        raise UnknownFlawError(unknown)
    return frozenset(names)

"""The ETSI EN 303 645 provision catalogue.

Titles are the rig's own short paraphrases (the standard's text is ETSI's), statuses
are EN 303 645 V2.1.1 Annex B (M mandatory, R recommended, C conditional on the
numbered condition). Provisions that exist only in V3.1.3 (splits such as 5.13-1A/B)
are listed with ``edition="V3"`` so a test may already name them.
Source: ``../shared/reference/etsi-en-303-645.md`` §1.

``@pytest.mark.etsi(...)`` ids are checked against this catalogue at collection.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Provision:
    id: str
    title: str
    status: str          # "M", "R", "MC", "RC" (V2.1.1); "" for V3-only provisions
    conditions: str      # V2.1.1 condition numbers, e.g. "11,12"
    edition: str = "V2.1.1"

    @property
    def mandatory(self) -> bool:
        return self.status.startswith("M")


PROVISIONS: tuple[Provision, ...] = (
    Provision("4-1", "Record a justification for every recommendation not applied", "M", ""),
    Provision("5.1-1", "Outside factory default, passwords are unique per device or user-chosen", "MC", "1"),
    Provision("5.1-2", "Pre-installed unique passwords cannot be derived automatically for a class of devices", "MC", "2"),
    Provision("5.1-3", "Authentication uses best-practice cryptography", "M", ""),
    Provision("5.1-4", "Simple way to change the authentication value", "MC", "8"),
    Provision("5.1-5", "Network brute force against authentication is impracticable", "MC", "5"),
    Provision("5.2-1", "Public vulnerability disclosure policy (contact point, timelines)", "M", ""),
    Provision("5.2-2", "Disclosed vulnerabilities acted on in a timely way", "R", ""),
    Provision("5.2-3", "Vulnerabilities monitored, found and fixed throughout the support period", "R", ""),
    Provision("5.3-1", "All software components securely updatable", "R", ""),
    Provision("5.3-2", "A secure update-installation mechanism exists", "MC", "5"),
    Provision("5.3-3", "Updates are simple for the user to apply", "MC", "12"),
    Provision("5.3-4", "Updates are automatic", "RC", "12"),
    Provision("5.3-5", "Device checks for security updates after start-up and then periodically", "RC", "12"),
    Provision("5.3-6", "Automatic updates and notifications on by default; user can enable, disable or postpone", "RC", "9,12"),
    Provision("5.3-7", "Update mechanism uses best-practice cryptography", "MC", "12"),
    Provision("5.3-8", "Security updates are timely", "MC", "12"),
    Provision("5.3-9", "Device verifies authenticity and integrity of updates", "RC", "12"),
    Provision("5.3-10", "Network-delivered updates are verified through a trust relationship", "MC", "11,12"),
    Provision("5.3-11", "User is told that an update is needed and which risks it fixes", "RC", "12"),
    Provision("5.3-12", "User is warned when an update will disrupt basic function", "RC", "12"),
    Provision("5.3-13", "Defined support period is published", "M", ""),
    Provision("5.3-14", "Non-updatable constrained device: publish rationale, replacement support and support period", "RC", "3,4"),
    Provision("5.3-15", "Non-updatable constrained device: can be isolated and its hardware replaced", "RC", "3,4"),
    Provision("5.3-16", "Model designation clearly recognisable (label or interface)", "M", ""),
    Provision("5.4-1", "Sensitive security parameters in persistent storage are stored securely", "M", ""),
    Provision("5.4-2", "Hard-coded unique device identity resists tampering", "MC", "10"),
    Provision("5.4-3", "No hard-coded critical security parameters in source code", "M", ""),
    Provision("5.4-4", "CSPs for update checks and cloud communication are unique per device and not mass-derivable", "M", ""),
    Provision("5.5-1", "Best-practice cryptography for communication", "M", ""),
    Provision("5.5-2", "Reviewed or evaluated implementations of network and crypto functions", "R", ""),
    Provision("5.5-3", "Cryptographic algorithms and primitives are updatable", "R", ""),
    Provision("5.5-4", "Network access to functions requires authentication (initialised state)", "R", ""),
    Provision("5.5-5", "Security-relevant configuration over the network requires authentication", "M", ""),
    Provision("5.5-6", "CSPs encrypted in transit", "R", ""),
    Provision("5.5-7", "CSPs kept confidential on remotely accessible interfaces", "M", ""),
    Provision("5.5-8", "Secure life-cycle management of CSPs by the manufacturer", "M", ""),
    Provision("5.6-1", "Unused network and logical interfaces disabled", "M", ""),
    Provision("5.6-2", "Minimal security-relevant disclosure before authentication", "M", ""),
    Provision("5.6-3", "Physical interfaces not needlessly exposed", "R", ""),
    Provision("5.6-4", "Physically reachable debug interface disabled in software", "MC", "13"),
    Provision("5.6-5", "Only needed software services enabled", "R", ""),
    Provision("5.6-6", "Code minimised to needed functionality", "R", ""),
    Provision("5.6-7", "Least privilege", "R", ""),
    Provision("5.6-8", "Hardware-level memory access control", "R", ""),
    Provision("5.6-9", "Secure development process", "R", ""),
    Provision("5.7-1", "Software verified by secure boot", "R", ""),
    Provision("5.7-2", "On unauthorised change: alert, and restrict networking to what alerting needs", "R", ""),
    Provision("5.8-1", "Personal data in transit is confidential (best-practice crypto)", "R", ""),
    Provision("5.8-2", "Sensitive personal data to associated services is confidential", "M", ""),
    Provision("5.8-3", "External sensing capabilities documented", "M", ""),
    Provision("5.9-1", "Resilience to network and power outages", "R", ""),
    Provision("5.9-2", "Keeps working locally without network; recovers cleanly after power loss", "R", ""),
    Provision("5.9-3", "Connects in an orderly, expected way (no reconnection storms)", "R", ""),
    Provision("5.10-1", "Telemetry examined for security anomalies", "RC", "6"),
    Provision("5.11-1", "Simple erasure of user data from the device", "M", ""),
    Provision("5.11-2", "Removal of personal data from associated services, started from the device", "R", ""),
    Provision("5.11-3", "Clear deletion instructions", "R", ""),
    Provision("5.11-4", "Clear confirmation that deletion happened", "R", ""),
    Provision("5.12-1", "Installation and maintenance need few user decisions and follow usable-security practice", "R", ""),
    Provision("5.12-2", "Guidance on secure set-up", "R", ""),
    Provision("5.12-3", "Guidance on checking that the set-up is secure", "R", ""),
    Provision("5.13-1", "Input validated (UI, APIs, network)", "M", ""),
    Provision("6-1", "Transparent information on personal-data processing", "M", ""),
    Provision("6-2", "Consent obtained validly", "MC", "7"),
    Provision("6-3", "Consent can be withdrawn at any time", "M", "(7)"),
    Provision("6-4", "Telemetry limited to the personal data needed", "RC", "6"),
    Provision("6-5", "Users told which telemetry is collected, why and by whom", "MC", "6"),
    # V3.1.3-only provisions and splits
    Provision("5.0-1", "Record a justification for every recommendation not applied (V3 form of 4-1)", "", "", "V3"),
    Provision("5.1-2A", "Machine-to-machine authentication should not use passwords", "", "", "V3"),
    Provision("5.3-4A", "Automatic updates can be configured", "", "", "V3"),
    Provision("5.3-4B", "Automatic updates enabled at initialisation", "", "", "V3"),
    Provision("5.3-6A", "Automatic updates on by default, user can disable or postpone", "", "", "V3"),
    Provision("5.3-6B", "Update notifications on by default, user can disable or postpone", "", "", "V3"),
    Provision("5.3-15A", "Non-updatable device can be isolated", "", "", "V3"),
    Provision("5.3-15B", "Non-updatable device's hardware can be replaced", "", "", "V3"),
    Provision("5.6-4A", "Debug interface disabled or protected by best-practice access control", "", "", "V3"),
    Provision("5.6-4B", "Physical debug ports disabled", "", "", "V3"),
    Provision("5.13-1A", "Input validated on user interfaces", "", "", "V3"),
    Provision("5.13-1B", "Input validated on network interfaces", "", "", "V3"),
    Provision("6-3A", "Consent can be withdrawn", "", "", "V3"),
    Provision("6-3B", "Consent records are stored", "", "", "V3"),
    Provision("6-6", "Personal data minimised and deleted when no longer needed", "", "", "V3"),
    Provision("6-7", "Aggregation-only personal data", "", "", "V3"),
    Provision("6-8", "Personal data anonymised", "", "", "V3"),
)

BY_ID: dict[str, Provision] = {p.id: p for p in PROVISIONS}


def unknown_provisions(ids: tuple[str, ...] | list[str]) -> list[str]:
    """The ids that are not EN 303 645 provisions (e.g. a typo such as ``5.5.1``)."""
    return [i for i in ids if i not in BY_ID]

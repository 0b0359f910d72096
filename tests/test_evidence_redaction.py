"""Secrets are scrubbed from a run folder's text evidence, whoever wrote it."""

from __future__ import annotations

from pathlib import Path

from rig.evidence.redaction import REDACTED, SecretRegistry, scrub_tree


def test_scrub_tree_rewrites_text_evidence_and_leaves_binaries(tmp_path: Path) -> None:
    registry = SecretRegistry()
    registry.add("156c782d")  # a PoP read from a console
    registry.add("virtual-lab-passphrase")
    (tmp_path / "allure-results").mkdir()
    junit = tmp_path / "junit.xml"
    junit.write_text('<system-out>QRCODE: {"pop":"156c782d"}</system-out>')
    attachment = tmp_path / "allure-results" / "abc-attachment.txt"
    attachment.write_text("Password : virtual-lab-passphrase\n")
    clean = tmp_path / "allure-results" / "def-result.json"
    clean.write_text('{"status": "passed"}')
    pcap = tmp_path / "capture.pcap"
    pcap.write_bytes(b"\xd4\xc3\xb2\xa1" + b"virtual-lab-passphrase")

    changed = scrub_tree(tmp_path, registry)

    assert changed == sorted([attachment, junit])
    assert junit.read_text() == f'<system-out>QRCODE: {{"pop":"{REDACTED}"}}</system-out>'
    assert attachment.read_text() == f"Password : {REDACTED}\n"
    assert clean.read_text() == '{"status": "passed"}'
    assert pcap.read_bytes().endswith(b"virtual-lab-passphrase"), "captures are evidence of a leak, never rewritten"


def test_ota_url_tokens_are_cut_to_a_prefix_wherever_they_appear() -> None:
    """A pre-signed OTA URL is a bearer credential until it expires; nodes print it on their console."""
    line = ('I (1763) esp_rmaker_ota_using_topics: URL: https://127.0.0.1:38885/ota/'
            'KBeu2c-sO3O0kpx1BxWh4Ky5VN7OI2gsBiFe_wEhTIE/Bda94qXdoNzb5w-c6fmW1A.bin')
    scrubbed = SecretRegistry().scrub(line)
    assert "KBeu2c-sO3O0kpx1BxWh4Ky5VN7OI2gsBiFe_wEhTIE" not in scrubbed
    assert scrubbed.endswith("/ota/KBeu2c…/Bda94qXdoNzb5w-c6fmW1A.bin")
    assert SecretRegistry().scrub("see /ota/short/ and /ota/abcdefghijklmnop/") == "see /ota/short/ and /ota/abcdef…/"

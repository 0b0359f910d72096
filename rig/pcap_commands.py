"""``rig pcap analyze FILE``: what a lab engineer asks of a capture at the bench.

The flows in the capture (5-tuple, bytes each way, whether each side looks like TLS, HTTP or
MQTT) and, with ``--canary LABEL=VALUE`` (repeatable; ``VALUE`` may be ``env:VAR`` so a secret
never sits in the shell history), where any of those values crosses the wire readable — in the
encodings an app would send it (:func:`rig.capture.cleartext_hits`). A hit is printed by label,
never by value. Exit 0: no hit; 1: a hit; 2: the file cannot be read (one message naming it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from rig.capture import PcapError, analyze, cleartext_hits, flow_report, render_text
from rig.lab import resolve_secret

pcap_app = typer.Typer(no_args_is_help=True, help="Captures: flows and secrets in clear.")
err_console = Console(stderr=True)


def _canaries(specs: list[str]) -> dict[str, str]:
    canaries: dict[str, str] = {}
    for spec in specs:
        label, sep, value = spec.partition("=")
        if not sep or not label or not value:
            raise typer.BadParameter(f"{spec.split('=')[0]!r}: give LABEL=VALUE (or LABEL=env:VAR)", param_hint="--canary")
        try:
            canaries[label] = resolve_secret(value, f"canary {label!r}")
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--canary") from None
    return canaries


@pcap_app.command("analyze")
def analyze_command(
    pcap: Annotated[Path, typer.Argument(help="a pcap or pcapng file")],
    canary: Annotated[list[str], typer.Option("--canary", "-c", help="LABEL=VALUE or LABEL=env:VAR to look for in clear")] = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="print the flow report as JSON")] = False,
) -> None:
    """Flows in PCAP and any --canary value found readable on the wire."""
    canaries = _canaries(canary)
    try:
        traffic = analyze(pcap)
        hits = cleartext_hits(traffic, canaries) if canaries else []
    except (PcapError, OSError) as exc:
        err_console.print(str(exc), markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    report = flow_report(traffic, hits)
    print(json.dumps(report, indent=2) if as_json else render_text(report))
    raise typer.Exit(1 if hits else 0)

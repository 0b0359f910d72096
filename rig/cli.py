"""``rig``: the front door for CI, compliance engineers and the lab bench.

Commands map to what DESIGN.md's users do: ``rig boards`` (what is in the farm),
``rig run`` (the suites over the farm into a fresh ``reports/<run-id>/``). Bad input
prints one readable message and exits non-zero; no tracebacks for lab mistakes.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from rig.board_commands import board_app, provision
from rig.cli_lab import BoardsOption, load_lab_or_exit
from rig.espressif_tools import EspressifToolError
from rig.firmware.behaviour import BehaviourManifest
from rig.lab import DEFAULT_BOARDS_FILE, LabConfigError
from rig.pcap_commands import pcap_app
from rig.runs import RunDirectory
from rig.vboard.cli import app as vboard_app  # the CLI is one of the few places that may import the emulator

REPO_ROOT = Path(__file__).resolve().parents[1]
SUITES_DIR = REPO_ROOT / "suites"

app = typer.Typer(add_completion=False, no_args_is_help=True, help="HIL security test rig for ESP RainMaker-class devices.")
console = Console()
err_console = Console(stderr=True)

@app.command()
def boards(boards_file: BoardsOption = Path(DEFAULT_BOARDS_FILE)) -> None:
    """Show the farm described by boards.yaml; exit 2 if the file is invalid."""
    lab = load_lab_or_exit(boards_file)
    table = Table(title=f"lab {lab.lab} — {len(lab.boards)} board(s), stack: {lab.stack.kind}")
    for col in ("name", "kind", "chip", "port", "firmware", "tags", "eFuses"):
        table.add_column(col)
    for b in lab.boards:
        port = lab.live_port(b) or "(on start)"
        firmware = str(b.firmware) if b.firmware else ("generated" if b.kind == "virtual" else "(none)")
        table.add_row(
            b.name,
            b.kind,
            b.chip,
            port,
            firmware,
            ", ".join(b.tags),
            "sacrificial" if b.sacrificial else "keep",
        )
    console.print(table)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(
    ctx: typer.Context,
    boards_file: BoardsOption = Path(DEFAULT_BOARDS_FILE),
    board: Annotated[list[str] | None, typer.Option("--board", help="only this board (repeatable)")] = None,
) -> None:
    """Run suites/ against the farm into reports/<run-id>/. Arguments after -- go to pytest."""
    lab = load_lab_or_exit(boards_file)
    selected = board or []
    try:
        lab.select(selected)
    except LabConfigError as exc:
        err_console.print(str(exc), markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    if not SUITES_DIR.is_dir():
        err_console.print(f"no suites folder at {SUITES_DIR}. Fix: run rig from a checkout of the rig repository")
        raise typer.Exit(2)
    run_dir = RunDirectory.create(lab.reports_dir)
    argv = [
        sys.executable, "-m", "pytest", str(SUITES_DIR),
        f"--rootdir={REPO_ROOT}",
        f"--boards={boards_file.resolve()}",
        *[f"--board={n}" for n in selected],
        f"--rig-run-dir={run_dir.root}",
        f"--junitxml={run_dir.junit}",
        f"--alluredir={run_dir.allure_results}",
        "-o", "junit_family=xunit2",
        *ctx.args,
    ]  # fmt: skip
    console.print(f"[bold]run {run_dir.run_id}[/] on {', '.join(selected) or 'every board'} of lab {lab.lab}")
    code = subprocess.call(argv, cwd=REPO_ROOT)
    console.print(f"results in [bold]{run_dir.root}[/]:")
    console.print(f"  JUnit   {run_dir.junit}")
    console.print(f"  allure  {run_dir.allure_results}  (allure serve {run_dir.allure_results})")
    console.print(f"  logs    {run_dir.logs}")
    raise typer.Exit(code)


@app.command()
def up(
    boards_file: BoardsOption = Path(DEFAULT_BOARDS_FILE),
    test_mode: Annotated[bool, typer.Option("--test-mode", help="test controls for suites: a movable cloud clock "
                                            "(POST /test/clock/advance), faulty OTA deliveries (POST /test/ota/delivery)")] = False,
) -> None:
    """Start the local cloud stack and every virtual board in the background."""
    from rig import lab_services

    lab = load_lab_or_exit(boards_file)
    try:
        state, started = lab_services.start(lab, boards_file, test_mode=test_mode)
    except lab_services.LabServicesError as exc:
        err_console.print(f"rig up failed: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(("started" if started else "already running") + f" lab {state.lab} (supervisor pid {state.pid})")
    _print_state(state)


@app.command()
def status(boards_file: BoardsOption = Path(DEFAULT_BOARDS_FILE)) -> None:
    """Show what `rig up` started and whether each part answers; exit 3 when nothing runs."""
    from rig import lab_services

    lab = load_lab_or_exit(boards_file)
    state = lab_services.running_state(lab)
    if state is None:
        console.print(f"lab {lab.lab}: not running (start it with `rig up`)")
        raise typer.Exit(3)
    console.print(f"lab {state.lab}: running (supervisor pid {state.pid})")
    _print_state(state)


@app.command()
def down(boards_file: BoardsOption = Path(DEFAULT_BOARDS_FILE)) -> None:
    """Stop what `rig up` started."""
    from rig import lab_services

    lab = load_lab_or_exit(boards_file)
    try:
        state = lab_services.stop(lab)
    except lab_services.LabServicesError as exc:
        err_console.print(str(exc), markup=False, soft_wrap=True)
        raise typer.Exit(1) from None
    console.print(f"lab {lab.lab}: " + ("stopped" if state else "was not running"))


def _print_state(state: object) -> None:
    from rig.lab_services import LabServicesState, port_open

    assert isinstance(state, LabServicesState)
    table = Table()
    for col in ("part", "address", "answers"):
        table.add_column(col)
    if state.stack:
        s = state.stack
        for part, url in (("REST API", s.api_url), ("OTA host", s.ota_url), ("MQTT broker", f"mqtts://{s.mqtt_host}:{s.mqtt_port}")):
            host, port = url.split("//", 1)[1].rsplit(":", 1)
            table.add_row(part, url, "yes" if port_open(host, int(port)) else "[red]no[/]")
        table.add_row("lab CA", s.ca_cert, "")
    for name, url in state.boards.items():
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        table.add_row(f"board {name}", url, "yes" if port_open(host, int(port.split("?")[0])) else "[red]no[/]")
    console.print(table)


app.add_typer(vboard_app, name="vboard", help="Virtual ESP32-C3 boards.")
app.add_typer(board_app, name="board", help="Operations on one board of the lab (claim).")
app.command("provision")(provision)
app.add_typer(pcap_app, name="pcap")

user_app = typer.Typer(no_args_is_help=True, help="Cloud users of the local stack.")
app.add_typer(user_app, name="user")


@user_app.command("add")
def user_add(
    email: str,
    boards_file: BoardsOption = Path(DEFAULT_BOARDS_FILE),
    password: Annotated[str, typer.Option(prompt=True, hide_input=True, confirmation_prompt=True, envvar="RIG_USER_PASSWORD")] = "",
) -> None:
    """Create a cloud user on the lab's local stack (password stored hashed)."""
    from rig.cloud.stack import LocalStack
    from rig.cloud.store import StoreError

    lab = load_lab_or_exit(boards_file)
    try:
        user_id = LocalStack.for_lab(lab).add_user(email, password)
    except StoreError as exc:
        err_console.print(f"cannot add user {email}: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(2) from None
    console.print(f"user {email} added (user_id {user_id})")


firmware_app = typer.Typer(no_args_is_help=True, help="Firmware sets and images.")
app.add_typer(firmware_app, name="firmware")


@firmware_app.command("build-virtual")
def firmware_build_virtual(
    boards_file: BoardsOption = Path(DEFAULT_BOARDS_FILE),
    dest: Annotated[Path | None, typer.Option(help="output folder (default: the lab's virtual set)")] = None,
    key: Annotated[Path | None, typer.Option(help="Secure Boot V2 RSA-3072 key file (default: the lab's virtual key)")] = None,
    hsm: Annotated[bool, typer.Option("--hsm", help="sign with the lab HSM's key (SoftHSM2, the cloud signer's default "
                                                    "key; PINs from boards.yaml hsm: or the lab's state)")] = False,
) -> None:
    """Write the virtual firmware set: base, next, next_secure, crash_on_boot, no_cloud (ESP-IDF build dirs).

    Every image is signed by one key: a key file, or with --hsm the lab HSM's key, which
    never leaves the token (espsecure sign-data --hsm). The set's root gets the key's
    public half, whose digest is what a board's eFuse must hold to boot the set.
    """
    from rig.cloud.stack import LocalStack
    from rig.firmware.firmware_set import FirmwareSetError
    from rig.firmware.secure_boot_v2 import HsmError, SigningError
    from rig.firmware.softhsm import SoftHsmError, SoftHsmUnavailable
    from rig.firmware.virtual_set import PUBLIC_KEY_FILE, VIRTUAL_SIGNING_KEY, SetSigner, build_virtual_set, ensure_signing_key

    lab = load_lab_or_exit(boards_file)
    if hsm and key is not None:
        err_console.print("--hsm and --key name two different signing keys. Fix: pass one of them", markup=False)
        raise typer.Exit(2)
    out = dest or lab.state_dir / "firmware" / "virtual"
    try:
        if hsm:
            signer = LocalStack.for_lab(lab).open_signer().set_signer()  # the key the lab's cloud signs OTA images with
        else:
            signer = SetSigner.key_file(ensure_signing_key(key or lab.state_dir / VIRTUAL_SIGNING_KEY))
        fs = build_virtual_set(out, signer)
    except (FirmwareSetError, EspressifToolError, SigningError, HsmError, SoftHsmError, SoftHsmUnavailable, OSError) as exc:
        err_console.print(f"could not build the virtual firmware set: {exc}", markup=False, soft_wrap=True)
        raise typer.Exit(1) from None
    table = Table(title=f"virtual firmware set {fs.root}")
    for col in ("role", "version", "secure_version", "behaviour", "app"):
        table.add_column(col)
    for role in fs.roles:
        desc = fs.app_desc(role)
        behaviour = BehaviourManifest.from_image(fs.build(role).read_app_image())
        table.add_row(role, desc.version, str(desc.secure_version), behaviour.boot if behaviour else "-", str(fs.build(role).path))
    console.print(table)
    console.print(f"signed by {signer.source}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"Secure Boot V2 key digest: {signer.key_digest.hex()}", markup=False, highlight=False)
    console.print(f"a board trusts it after: espefuse burn-key-digest BLOCK_KEY0 {fs.root / PUBLIC_KEY_FILE} "
                  "SECURE_BOOT_DIGEST0", markup=False, highlight=False, soft_wrap=True)  # fmt: skip


def main() -> None:
    app()


if __name__ == "__main__":
    main()

"""One full OTA cycle on a virtual board, timed, and the share of it spent in fixed delays.

Run: ``.venv/bin/python bench/ota_cycle.py [--cycles 3] [--keep DIR]``

Set-up, with the rig's own APIs as a lab runs them: the local cloud stack in test mode
(:class:`rig.cloud.stack.LocalStack`); the virtual firmware set's ``base`` build signed by
the stack's HSM key (:meth:`rig.cloud.signer.CloudSigner.set_signer`), so the cloud's OTA
signatures are the ones the board trusts; one virtual board (``python -m rig.vboard.serve``
through :func:`rig.boards.virtual_ports.launch_virtual_board`) flashed with esptool
(:class:`rig.boards.board.Board`), claimed (:func:`rig.boards.claim.claim_board`),
provisioned over SoftAP from the QR its console prints and mapped to a user
(:mod:`rig.prov`, as ``rig provision`` does).

Then ``--cycles`` OTA cycles, each timed from ``POST v1/user/otajob`` to the cloud
service handling the node's ``otastatus`` ``success``: the cloud signs the image in the
HSM and publishes ``otaurl``, the node downloads it over HTTPS into the passive slot,
verifies it, reboots after RainMaker's reboot delay, boots it, joins Wi-Fi, connects MQTT,
confirms the image and reports. The images alternate the set's ``next`` and ``base``
roles with a new version each cycle (:func:`rig.firmware.variants.version`), uploaded
unsigned: the cloud signs every one.

Phases come from the node's console (each line stamped as it arrives: the board sends a
line when the firmware writes it, before the UART pacing wait) and from the cloud service
(each handled message stamped as it arrives). Fixed delays come from the board process
itself: started with ``RIG_VBOARD_DELAY_TRACE=<file>`` it appends every fixed pause it
takes — task sleeps, one-shot timers, the UART pacing console output at 115 200 baud,
the DevKit's and the ROM's pauses — with its start (``time.monotonic()``, one clock for
the whole host) and length (:mod:`rig.vboard.node.delay_trace`). Per cycle the bench
keeps the delays that overlap its window, clipped to it, and counts a delay as spent on
the cycle only when the cycle waits for it (:data:`DELAYS` says which do: the reboot
timer does, the rollback deadline that the confirmation cancels does not); overlapping
delays count once.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import serial

from rig.boards.board import Board
from rig.boards.claim import claim_board
from rig.boards.virtual_ports import (
    FIRST_HOST,
    LAST_HOST,
    VIRTUAL_SUBNET,
    default_board_address,
    launch_virtual_board,
    radio_network,
    stop_virtual_board,
    write_radio_file,
)
from rig.cloud.service import CloudMqtt, HandledMessage
from rig.cloud.stack import LocalStack
from rig.firmware.build_dir import write_build_dir
from rig.firmware.partition_table import RAINMAKER_4MB
from rig.firmware.variants import unsigned, version
from rig.firmware.virtual_set import PROJECT_NAME, SDKCONFIG, VIRTUAL_ROLES, virtual_app_image, virtual_bootloader_image
from rig.lab import BoardSpec
from rig.prov.console_qr import read_qr_payload
from rig.prov.provisioner import ProvisioningClient, provision_wifi
from rig.prov.rainmaker_api import RainMakerUser
from rig.prov.transport_http import SoftApHttpTransport
from rig.targets import ESP32C3
from rig.vboard.node.delay_trace import ENV_VAR as TRACE_ENV_VAR

BOARD = "bench-ota"
SSID, PASSPHRASE = "bench-lab", "bench-lab-passphrase"
STEP_S = 60.0
"""Upper bound of one set-up step (the host may be busy with a test run)."""
CYCLE_S = 180.0
"""Upper bound of one OTA cycle."""
CONSOLE_BAUD = 115200


@dataclass(frozen=True)
class Delay:
    """What a delay name of the trace is: *on_path* when an OTA cycle waits for it to end."""

    what: str
    whose: str
    on_path: bool


FIRMWARE = "firmware's own delay"
EMULATED = "emulated hardware time"
DELAYS: dict[str, Delay] = {
    "rmaker_reboot_tm": Delay("reboot after the download ('Rebooting in N seconds'; RainMaker's OTA_REBOOT_TIMER_SEC: 10)", FIRMWARE, True),
    "wifi_association": Delay("Wi-Fi scan, association, 4-way handshake, DHCP (ASSOCIATION_S)", EMULATED, True),
    "mqtt_reconnect_backoff": Delay("MQTT reconnect backoff after a failed connection", FIRMWARE, True),
    "uart_tx_pacing": Delay("console output paced at 115 200 baud (the UART FIFO drains no faster)", EMULATED, True),
    "strap_settle": Delay("EN release to GPIO9 strap sampling, power-on only (STRAP_SETTLE_S)", EMULATED, True),
    "rom_invalid_header_retry": Delay("ROM retrying an erased flash", EMULATED, True),
    "ota_rollback_tm": Delay("rollback deadline, cancelled by the confirmation (rollback_wait_s)", FIRMWARE, False),
    "connectivity_timer": Delay("connectivity report after MQTT connects (CONNECTIVITY_REPORT_DELAY)", FIRMWARE, False),
    "ota_fetch_tm": Delay("otafetch after connecting / after the confirmation (RMAKER_OTA_FETCH_DELAY)", FIRMWARE, False),
    "wifi_prov_mgr_tm": Delay("provisioning manager auto-stop after the station connects", FIRMWARE, False),
    "prov_stop": Delay("provisioning stop after the app read Connected", FIRMWARE, False),
    "app_wifi_prov_stop_tm": Delay("provisioning window (app_wifi auto-stop)", FIRMWARE, False),
}
"""Every fixed delay the virtual board traces. A name not listed counts as on the path (conservative)."""


# --------------------------------------------------------------------------- what the bench watches


class ConsoleLog:
    """The board's console through pyserial's RFC 2217 client (DTR/RTS released: opening it
    resets nothing), every line stamped with ``time.monotonic()`` as it arrives."""

    def __init__(self, url: str):
        self.port = serial.serial_for_url(url, do_not_open=True, baudrate=CONSOLE_BAUD, timeout=0.2)
        self.port.dtr = False
        self.port.rts = False
        self.port.open()
        self.lines: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="console", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        pending = b""
        while not self._stop.is_set():
            try:
                data = self.port.read(1)  # pyserial's RFC 2217 client hands over a whole received chunk at once
            except serial.SerialException:
                return
            if not data:
                continue
            now = time.monotonic()
            *done, pending = (pending + data).split(b"\n")
            with self._cond:
                self.lines += [(now, raw.decode("utf-8", "replace").rstrip("\r")) for raw in done]
                self._cond.notify_all()

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def find(self, pattern: re.Pattern[str], start: int, timeout: float = 0.0) -> int | None:
        """The index of the first line from *start* on matching *pattern*, waiting up to *timeout*."""

        def search() -> int | None:
            return next((i for i in range(start, len(self.lines)) if pattern.search(self.lines[i][1])), None)

        with self._cond:
            return self._cond.wait_for(search, timeout)

    def tail(self, count: int = 40) -> str:
        with self._cond:
            return "\n".join(text for _, text in self.lines[-count:])

    def close(self) -> None:
        self._stop.set()
        self.port.close()
        self._thread.join(2)


class CloudLog:
    """Every node→cloud message the stack's MQTT service handles, stamped on arrival."""

    def __init__(self, service: CloudMqtt):
        self.seen: list[tuple[float, HandledMessage]] = []
        self._cond = threading.Condition()
        handle = service.handle_message

        def stamped(topic: str, payload: bytes) -> HandledMessage | None:
            arrived = time.monotonic()
            record = handle(topic, payload)
            if record is not None:
                with self._cond:
                    self.seen.append((arrived, record))
                    self._cond.notify_all()
            return record

        service.handle_message = stamped  # type: ignore[method-assign]  # the paho callback looks it up on the instance

    def mark(self) -> int:
        with self._cond:
            return len(self.seen)

    def wait(self, node_id: str, suffix: str, after: int, timeout: float,
             predicate: Callable[[HandledMessage], bool] = lambda _m: True) -> tuple[float, HandledMessage]:  # fmt: skip
        def search() -> tuple[float, HandledMessage] | None:
            return next((s for s in self.seen[after:] if s[1].node_id == node_id and s[1].suffix == suffix and predicate(s[1])), None)

        with self._cond:
            found = self._cond.wait_for(search, timeout)
        if found is None:
            raise TimeoutError(f"the cloud handled no matching {suffix!r} from {node_id} within {timeout:g} s")
        return found


@dataclass(frozen=True)
class DelayRecord:
    """One line of the board's delay trace (:mod:`rig.vboard.node.delay_trace`)."""

    name: str
    kind: str
    start: float
    planned: float
    waited: float
    cut: bool

    @property
    def end(self) -> float:
        return self.start + self.waited

    @property
    def on_path(self) -> bool:
        known = DELAYS.get(self.name)
        return known.on_path if known is not None else True


def read_trace(path: Path) -> list[DelayRecord]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        raw = json.loads(line)
        records.append(DelayRecord(raw["name"], raw["kind"], raw["start"], raw["planned"], raw["waited"], raw["cut"]))
    return records


def union_length(intervals: Iterable[tuple[float, float]]) -> float:
    """Seconds covered by at least one of *intervals* (overlaps counted once)."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end <= reach:
            continue
        total += end - max(start, reach)
        reach = end
    return total


# --------------------------------------------------------------------------- one cycle


EVENTS: tuple[tuple[str, str, str], ...] = (
    (
        "otaurl",
        "job created → otaurl on the node (cloud signs in the HSM, publishes)",
        r"esp_rmaker_ota_using_topics: Upgrade Handler got:",
    ),
    ("downloaded", "HTTPS download into the passive slot", r"Reporting in-progress: Firmware Image download complete"),
    ("rebooting", "esp_ota_end (verify), otadata, reboot timer set", r"Rebooting in \d+ seconds\.$"),
    ("reset", "reboot delay, app shutdown, reset", r"^rst:0x"),
    ("loaded", "ROM and bootloader (verify, load)", r"boot: Loaded app from partition at offset"),
    ("app", "app startup (cpu_start … app_main)", r"main_task: Calling app_main\(\)"),
    ("ip", "node init, Wi-Fi join", r"Connected with IP Address:"),
    ("mqtt", "MQTT over TLS connected", r"esp_mqtt_glue: MQTT Connected$"),
    ("reported", "image confirmed, success reported", r"Reporting success: OTA Upgrade finished and verified successfully"),
)
CLOUD_PHASE = "otastatus success reaches the cloud"
PHASES = (*(label for _, label, _ in EVENTS), CLOUD_PHASE)


@dataclass
class Cycle:
    number: int
    version: str
    start: float
    end: float
    marks: list[float]
    """Each phase's end: one per :data:`EVENTS`, then the cloud's arrival of ``success``."""
    delays: list[DelayRecord] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.end - self.start

    def clipped(self, records: Iterable[DelayRecord], start: float, end: float) -> list[tuple[float, float]]:
        return [(max(r.start, start), min(r.end, end)) for r in records if r.start < end and r.end > start]

    def in_window(self, *, uart: bool, start: float | None = None, end: float | None = None) -> float:
        """Seconds of on-path delays inside [start, end] (default: the whole cycle): UART pacing or the others."""
        chosen = [r for r in self.delays if r.on_path and (r.kind == "uart") == uart]
        return union_length(self.clipped(chosen, self.start if start is None else start, self.end if end is None else end))

    def phases(self) -> list[tuple[str, float, float, float]]:
        """(phase, seconds, fixed delays in it, UART pacing in it)."""
        rows, before = [], self.start
        for label, at in zip(PHASES, self.marks, strict=True):
            rows.append((label, at - before, self.in_window(uart=False, start=before, end=at),
                         self.in_window(uart=True, start=before, end=at)))  # fmt: skip
            before = at
        return rows


def run_cycle(number: int, image: bytes, image_version: str, user: RainMakerUser, node_id: str,
              console: ConsoleLog, cloud: CloudLog) -> Cycle:  # fmt: skip
    image_id = user.upload_ota_image(f"bench-{image_version}", image)["ota_image_id"]
    cloud_mark, line = cloud.mark(), console.mark()
    start = time.monotonic()
    job_id = user.create_ota_job(image_id, node_id)
    final = re.compile(rf"OTA job {re.escape(job_id)}: (success|failed|rejected)")
    end, message = cloud.wait(node_id, "otastatus", cloud_mark, CYCLE_S, lambda m: bool(final.fullmatch(m.detail)))
    if not message.detail.endswith("success"):
        raise SystemExit(f"cycle {number}: the OTA job ended {message.detail!r}; the console ends:\n{console.tail()}")
    marks = []
    for key, _, pattern in EVENTS:
        found = console.find(re.compile(pattern), line, timeout=5.0)
        if found is None:
            raise SystemExit(f"cycle {number}: no {key!r} line ({pattern}) on the console; it ends:\n{console.tail()}")
        line = found + 1
        marks.append(console.lines[found][0])
    return Cycle(number, image_version, start, end, [*marks, end])


# --------------------------------------------------------------------------- set-up


def free_board_address(name: str) -> str:
    """The board's derived ``127.0.1.N``, or the next one whose provisioning port nobody holds
    (a test run on the same host may own the derived one)."""
    first = int(default_board_address(name).rsplit(".", 1)[1])
    span = LAST_HOST - FIRST_HOST + 1
    for step in range(span):
        address = f"{VIRTUAL_SUBNET}{FIRST_HOST + (first - FIRST_HOST + step) % span}"
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((address, 80))
            except OSError:
                continue
        return address
    raise SystemExit("no free 127.0.1.N address for the bench board")


def cycle_images(signer: Any, cycles: int) -> list[tuple[str, bytes]]:
    """(version, unsigned image) per cycle: the ``next`` and ``base`` roles in turn, each with
    a version of its own (the running one must differ), for the cloud to sign."""
    roles = {r.role: r for r in VIRTUAL_ROLES}
    signed = {name: virtual_app_image(roles[name], signer) for name in ("next", "base")}
    images = []
    for k in range(1, cycles + 1):
        role = roles["next" if k % 2 else "base"]
        value = f"{role.version}-ota{k}"
        images.append((value, version(unsigned(signed[role.role]), value)))
    return images


def provision(url: str, address: str, stack: LocalStack, http: httpx.Client) -> tuple[str, RainMakerUser]:
    """``rig provision``'s steps: the QR from the console, SoftAP provisioning, the cloud mapping. The node id."""
    email, password = f"bench-{uuid.uuid4().hex[:6]}@rig.test", "bench-password-1"
    stack.add_user(email, password)
    user = RainMakerUser(http, email, password)
    qr = read_qr_payload(url, timeout=STEP_S)
    client = ProvisioningClient(SoftApHttpTransport(address), pop=qr.pop or "", username=qr.username or "")
    secret = str(uuid.uuid4())
    outcome = provision_wifi(client, SSID, PASSPHRASE, user.user_id, secret, timeout=STEP_S)
    if not outcome.connected or client.node_id is None:
        raise SystemExit(f"provisioning failed: {outcome}")
    request = user.request_mapping(client.node_id, secret)
    status = user.wait_mapping(request.request_id, timeout=STEP_S)
    if status != "confirmed":
        raise SystemExit(f"the cloud mapping ended {status!r}")
    return client.node_id, user


def run(cycles: int, work: Path) -> list[Cycle]:
    trace = work / "delays.jsonl"
    lab = work / "lab"
    write_radio_file(lab, [radio_network(SSID, PASSPHRASE)])
    with LocalStack(work / "cloud", test_mode=True) as stack:
        assert stack.signer is not None and stack.mqtt is not None
        cloud = CloudLog(stack.mqtt)
        signer = stack.signer.set_signer()
        print(f"signing the firmware with {signer.source} …", file=sys.stderr)
        build = write_build_dir(work / "base", PROJECT_NAME, virtual_app_image(VIRTUAL_ROLES[0], signer), virtual_bootloader_image(signer),
                                RAINMAKER_4MB, SDKCONFIG, ESP32C3.name)  # fmt: skip
        images = cycle_images(signer, cycles)
        address = free_board_address(BOARD)
        os.environ[TRACE_ENV_VAR] = str(trace)  # the board process inherits it
        try:
            proc, url = launch_virtual_board(BOARD, lab, work / f"{BOARD}.log", address=address)
        finally:
            del os.environ[TRACE_ENV_VAR]
        console: ConsoleLog | None = None
        done: list[Cycle] = []
        try:
            print(f"board {BOARD} on {url} ({address}): flash, claim, provision …", file=sys.stderr)
            board = Board(spec=BoardSpec(name=BOARD, kind="virtual"), port=url)
            board.flash(build.flash_files)
            ep = stack.endpoints
            claim_board(board, stack.pki, ep.mqtt_host, ep.mqtt_port, work / "claim")
            context = ssl.create_default_context(cafile=ep.ca_cert)
            with httpx.Client(base_url=ep.api_url, verify=context, timeout=STEP_S) as http:
                node_id, user = provision(url, address, stack, http)
                cloud.wait(node_id, "otafetch", 0, STEP_S)  # subscribed to otaurl: ready for a job
                console = ConsoleLog(url)
                for number, (image_version, image) in enumerate(images, 1):
                    print(f"cycle {number}: {image_version} …", file=sys.stderr)
                    ready = cloud.mark()
                    cycle = run_cycle(number, image, image_version, user, node_id, console, cloud)
                    done.append(cycle)
                    cloud.wait(node_id, "otafetch", ready, STEP_S)  # the new image asks again: ready for the next job
        finally:
            if console is not None:
                console.close()
            stop_virtual_board(proc)
    records = read_trace(trace)
    for cycle in done:
        cycle.delays = [r for r in records if r.start < cycle.end and r.end > cycle.start]
    return done


# --------------------------------------------------------------------------- report


def table(header: tuple[str, ...], rows: Iterable[tuple[object, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(cycles: list[Cycle]) -> str:
    out = []
    rows = []
    for c in cycles:
        fixed, uart = c.in_window(uart=False), c.in_window(uart=True)
        rows.append((c.number, c.version, f"{c.total:.2f}", f"{fixed:.2f}", f"{100 * fixed / c.total:.0f} %",
                     f"{uart:.2f}", f"{100 * uart / c.total:.0f} %"))  # fmt: skip
    med = statistics.median
    total = med(c.total for c in cycles)
    fixed = med(c.in_window(uart=False) for c in cycles)
    uart = med(c.in_window(uart=True) for c in cycles)
    rows.append(
        ("median", "", f"{total:.2f}", f"{fixed:.2f}", f"{100 * fixed / total:.0f} %", f"{uart:.2f}", f"{100 * uart / total:.0f} %")
    )
    out.append("One OTA cycle: POST v1/user/otajob → the cloud handles otastatus success (seconds)\n")
    out.append(table(("cycle", "version", "total", "fixed delays", "share", "UART pacing", "share"), rows))
    out.append("\nfixed delays: the board's timers, task sleeps and ROM/DevKit pauses the cycle waits for (overlaps once);"
               " UART pacing: console output at 115 200 baud, the chip's own UART, counted apart.")  # fmt: skip
    phase_rows = []
    per_cycle = [c.phases() for c in cycles]
    for i, label in enumerate(PHASES):
        phase_rows.append((label, f"{med(p[i][1] for p in per_cycle):.3f}", f"{med(p[i][2] for p in per_cycle):.3f}",
                           f"{med(p[i][3] for p in per_cycle):.3f}", " / ".join(f"{p[i][1]:.2f}" for p in per_cycle)))  # fmt: skip
    out.append("\nPhases, ended by console lines and the cloud (median; fixed delays and UART pacing inside each)\n")
    out.append(table(("phase", "seconds", "fixed delays", "UART pacing", "per cycle"), phase_rows))
    out.append(f"\nFixed delays seen inside the cycles (per cycle, median of {len(cycles)})\n")
    out.append(table(("delay", "kind", "set to (s)", "count", "waited (s)", "cycle waits for it", "whose", "what"), delay_rows(cycles)))
    return "\n".join(out)


def delay_rows(cycles: list[Cycle]) -> list[tuple[object, ...]]:
    names = sorted({r.name for c in cycles for r in c.delays}, key=lambda n: (n == "uart_tx_pacing", n))
    rows: list[tuple[object, ...]] = []
    for name in names:
        seen = [[r for r in c.delays if r.name == name] for c in cycles]
        flat = [r for group in seen for r in group]
        planned = sorted({r.planned for r in flat})
        set_to = "per write" if name == "uart_tx_pacing" else ", ".join(f"{p:g}" for p in planned[:3]) + (" …" if len(planned) > 3 else "")
        count = statistics.median(len(group) for group in seen)
        waited = statistics.median(
            sum(max(0.0, min(r.end, c.end) - max(r.start, c.start)) for r in group) for group, c in zip(seen, cycles, strict=True)
        )
        cut = sum(r.cut for r in flat)
        known = DELAYS.get(name, Delay("(not in the bench's list)", "?", True))
        waits = ("yes" if known.on_path else "no") + (f", {cut} of {len(flat)} ended early" if cut else "")
        rows.append((name, flat[0].kind, set_to, f"{count:g}", f"{waited:.3f}", waits, known.whose, known.what))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cycles", type=int, default=3, help="OTA cycles to time (default 3)")
    parser.add_argument("--keep", type=Path, help="keep the work folder (stack, board log, delay trace) here")
    args = parser.parse_args(argv)
    if args.cycles < 1:
        parser.error("--cycles must be at least 1")
    work = Path(tempfile.mkdtemp(prefix="rig-ota-bench-"))
    try:
        cycles = run(args.cycles, work)
        print(report(cycles))
    finally:
        if args.keep is not None:
            shutil.copytree(work, args.keep, dirs_exist_ok=True)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

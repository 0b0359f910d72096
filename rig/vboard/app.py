"""The app the emulated bootloader starts: ESP-IDF startup, then what the image's behaviour manifest says.

:func:`run_app` prints what an ESP-IDF v5.4 app prints on an ESP32-C3 from
``cpu_start`` to ``main_task`` (esp-idf ``components/esp_system/port/cpu_start.c``,
``components/esp_app_format/esp_app_desc.c`` ``init_show_app_info``,
``components/efuse/src/esp_efuse_startup.c``, ``components/heap/heap_caps_init.c``,
``components/spi_flash/esp_flash_api.c``, ``components/esp_hw_support/sleep_gpio.c``,
``components/freertos/app_startup.c``), reading every value from the image that booted
(app descriptor, image header) and the chip (eFuses). Then it obeys the behaviour
manifest (``rig.firmware.behaviour``):

* ``crash``: ``app_main`` faults at once — the RISC-V panic handler's report
  (esp-idf ``components/esp_system/panic.c``, ``port/arch/riscv/panic_arch.c``) and
  ``Rebooting...``; the board resets with ``rst:0xc (RTC_SW_CPU_RST)``;
* ``ok`` / ``no_cloud`` (and images without a manifest): the ESP RainMaker serial console
  (esp-rainmaker-common ``components/rmaker_console``: ``rmaker_console.c`` and the
  generic commands of ``rmaker_common_cmds.c`` — ``help``, ``reboot``, ``up-time``,
  ``mem-dump``, ``task-dump``, ``cpu-dump``, ``sock-dump``, ``heap-trace``). Like that
  console it writes ``\\n>> `` before every line but the first, prints ``\\n`` after each
  line it reads, says nothing about unknown commands or empty lines (``esp_console_run``
  returns ESP_ERR_NOT_FOUND / ESP_ERR_INVALID_ARG, which the task ignores), and prints
  ``rmaker_console: Console command failed with error: %d`` when a handler returns
  non-zero. RainMaker's own commands (``reset-to-factory``, ``local-time``, ``tz-set``,
  ``get-node-id`` …) belong to the RainMaker node and are registered by it through
  :attr:`AppContext.commands`.

The app never confirms a new OTA image itself: a RainMaker node marks it valid only
after MQTT connects. :func:`mark_app_valid` and :func:`mark_app_invalid_and_reboot`
are ``esp_ota_mark_app_valid_cancel_rollback`` / ``esp_ota_mark_app_invalid_rollback_and_reboot``
(esp-idf ``components/app_update/esp_ota_ops.c``) for that node to call.

Output conventions: text goes to :meth:`BoardConsole.write` with ``\\n`` line ends (the
UART side turns them into ``\\r\\n`` as ESP-IDF's newlib and the ROM's putc do), log
lines through :meth:`BoardConsole.log`.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import ClassVar, Literal

from rig.firmware.app_desc import APP_DESC_OFFSET
from rig.firmware.behaviour import BehaviourManifest
from rig.firmware.image import FLASH_SIZE_NIBBLES
from rig.firmware.otadata import OtaSelectEntry, OtaState, ota_seq_crc
from rig.vboard.bootloader import (
    DEFAULT_CONFIG,
    RESET_RTC_SW_CPU,
    BootEfuses,
    BootloaderConfig,
    BootOutcome,
    LogMessage,
    PartitionEntry,
    RomReset,
    efuse_uint,
    read_otadata,
    select_otadata,
    update_secure_version,
    verify_app_partition,
    write_otadata_entry,
)
from rig.vboard.console import BoardConsole
from rig.vboard.flash import FlashStorage

__all__ = [
    "CONSOLE_POLL_S",
    "AppContext",
    "AppExit",
    "AppMain",
    "ConsoleCommand",
    "ConsoleCommands",
    "OtaOpsError",
    "mark_app_invalid_and_reboot",
    "mark_app_valid",
    "panic_report",
    "run_app",
    "running_app_ota_state",
    "split_argv",
]

CONSOLE_POLL_S = 0.25
"""How long the console task waits in ``read_line`` before it looks for a restart
requested from another thread (:meth:`AppContext.esp_restart`)."""

ELF_SHA_CHARS = 9
"""``CONFIG_APP_RETRIEVE_LEN_ELF_SHA`` default: the ELF SHA-256 hex digits the startup
banner and the panic handler print."""


# =========================================================================== messages


TAG_CPU = "cpu_start"
TAG_APP = "app_init"
TAG_EFUSE = "efuse_init"
TAG_HEAP = "heap_init"
TAG_FLASH = "spi_flash"
TAG_SLEEP = "sleep_gpio"
TAG_MAIN = "main_task"
TAG_CONSOLE = "rmaker_console"
TAG_COMMON = "rmaker_common_cmds"
TAG_OTA = "esp_ota_ops"


class Msg:
    """Every line the app prints, in one place (log lines as :class:`LogMessage`, ``printf``
    text as plain format strings)."""

    # cpu_start.c
    UNICORE = LogMessage("I", TAG_CPU, "Unicore app")
    USER_CODE = LogMessage("I", TAG_CPU, "Pro cpu start user code")
    CPU_FREQ = LogMessage("I", TAG_CPU, "cpu freq: {hz} Hz")
    # esp_app_desc.c init_show_app_info
    APP_INFO = LogMessage("I", TAG_APP, "Application information:")
    PROJECT = LogMessage("I", TAG_APP, "Project name:     {name}")
    VERSION = LogMessage("I", TAG_APP, "App version:      {version}")
    SECURE_VERSION = LogMessage("I", TAG_APP, "Secure version:   {version}")
    COMPILE_TIME = LogMessage("I", TAG_APP, "Compile time:     {date} {time}")
    ELF_SHA = LogMessage("I", TAG_APP, "ELF file SHA256:  {sha}...")
    IDF = LogMessage("I", TAG_APP, "ESP-IDF:          {idf}")
    # esp_efuse_startup.c
    MIN_REV = LogMessage("I", TAG_EFUSE, "Min chip rev:     v{major}.{minor}")
    MAX_REV = LogMessage("I", TAG_EFUSE, "Max chip rev:     v{major}.{minor} {ignored}")
    CHIP_REV = LogMessage("I", TAG_EFUSE, "Chip rev:         v{major}.{minor}")
    # heap_caps_init.c
    HEAP_INIT = LogMessage("I", TAG_HEAP, "Initializing. RAM available for dynamic allocation:")
    HEAP_REGION = LogMessage("I", TAG_HEAP, "At {addr:08X} len {length:08X} ({kib} KiB): {name}")
    # esp_flash_api.c / spi_flash_chip_generic.c
    FLASH_CHIP = LogMessage("I", TAG_FLASH, "detected chip: {chip}")
    FLASH_IO = LogMessage("I", TAG_FLASH, "flash io: {io}")
    FLASH_LARGER = LogMessage("W", TAG_FLASH, "Detected size({detected}k) larger than the size in the binary image "
                                              "header({header}k). Using the size in the binary image header.")
    # sleep_gpio.c
    SLEEP_ISOLATE = LogMessage("I", TAG_SLEEP, "Configure to isolate all GPIO pins in sleep state")
    SLEEP_SWITCH = LogMessage("I", TAG_SLEEP, "Enable automatic switching of GPIO sleep configuration")
    # app_startup.c
    MAIN_STARTED = LogMessage("I", TAG_MAIN, "Started on CPU0")
    MAIN_CALLING = LogMessage("I", TAG_MAIN, "Calling app_main()")
    MAIN_RETURNED = LogMessage("I", TAG_MAIN, "Returned from app_main()")
    # rmaker_console.c, rmaker_common_cmds.c
    UART_INIT = LogMessage("I", TAG_CONSOLE, "Initialising UART on port {port}")
    REGISTERING = LogMessage("I", TAG_COMMON, "Registering command: {name}")
    PROMPT = "\n>> "
    AFTER_LINE = "\n"
    COMMAND_FAILED = TAG_CONSOLE + ": Console command failed with error: {ret}\n"
    UPTIME = TAG_COMMON + ": Uptime of the device: {ms} milliseconds\n"
    TASK_DUMP_OFF = (TAG_COMMON + ": To use this utility enable: Component config --> FreeRTOS --> "
                     "Enable FreeRTOS trace facility\n")
    CPU_DUMP_OFF = (TAG_COMMON + ": To use this utility enable: Component config --> FreeRTOS --> "
                    "Enable FreeRTOS to collect run time stats\n")
    HEAP_TRACE_OFF = (TAG_COMMON + ": To use this utility enable: Component config --> Heap memory debugging --> "
                      "Enable heap tracing\n")
    MEM_DUMP = ("\tDescription\tInternal\tSPIRAM\n"
                "Current Free Memory\t{free}\t\t0\n"
                "Largest Free Block\t{largest}\t\t0\n"
                "Min. Ever Free Size\t{minimum}\t\t0\n")
    SOCK_DUMP_HEAD = "sock_fd\tprotocol\tlocal_addr\t\tpeer_addr\n"
    SOCK_DUMP_TAIL = "Remaining sockets: {free}\n"
    # esp_console commands.c help_command / argtable3 arg_end
    HELP_HEAD = "{name} {hint}\n"
    HELP_GLOSSARY = "  {syntax:>12}  {text}\n"
    HELP_UNKNOWN = ("help: Unrecognized option '{name}'. Please use correct command as argument or type 'help' "
                    "only to print help for all commands\n")
    HELP_EXTRA = 'help: unexpected argument "{arg}"\n'
    HELP_DESCRIPTION = ("Print the summary of all registered commands if no arguments are given, otherwise print "
                        "summary of given command.")
    HELP_GLOSSARY_ARG = ("<string>", "Name of command")
    COMMON_HELP: ClassVar[Mapping[str, str]] = MappingProxyType({  # register_generic_debug_commands, typos kept
        "reboot": "",
        "up-time": "Get the device up time in milliseconds.",
        "mem-dump": "Get the available memory.",
        "task-dump": "Get the list of all the running tasks.",
        "cpu-dump": "Get the CPU utilisation by all the runninng tasks.",
        "sock-dump": "Get the list of all the active sockets.",
        "heap-trace": "Start or stop heap tracing. Usage: heap-trace <start|stop> <bufer_size>",
    })
    REBOOT_NEWLINE = "\n"
    # esp_ota_ops.c
    OTA_FACTORY = LogMessage("E", TAG_OTA, "Running firmware is factory")
    OTA_NO_ROLLBACK = LogMessage("E", TAG_OTA, "Rollback is not possible, do not have any suitable apps in slots")
    OTA_ROLLBACK = LogMessage("I", TAG_OTA, "Rollback to previously worked partition. Restart.")
    # panic.c, panic_arch.c (RISC-V): printed with \r\n on the chip
    PANIC_HEAD = "Guru Meditation Error: Core  0 panic'ed ({reason}). Exception was unhandled.\n"
    PANIC_DUMP_HEAD = "Core  0 register dump:"
    PANIC_REGISTER = "{name}: 0x{value:08x}  "
    PANIC_STACK_HEAD = "\nStack memory:\n"
    PANIC_STACK_LINE = "{addr:08x}: {words}\n"
    PANIC_ELF = "\nELF file SHA256: {sha}\n"
    PANIC_REBOOT = "Rebooting...\n"


def _log(console: BoardConsole, message: LogMessage, **values: object) -> None:
    console.log(message.level, message.tag, message.format(**values))


# =========================================================================== startup data

CPU_FREQ_HZ = 160_000_000  # CONFIG_ESP_DEFAULT_CPU_FREQ_MHZ_160 (ESP32-C3 default)
HEAP_REGIONS: tuple[tuple[int, int, str], ...] = (
    (0x3FC904E0, 0x0002FB20, "RAM"),
    (0x3FCC0000, 0x0001C710, "Retention RAM"),
    (0x3FCDC710, 0x00002950, "Retention RAM"),
    (0x5000021C, 0x00001DCC, "RTCRAM"),
)
"""``heap_init`` regions of an ESP-IDF v5.4.1 ESP32-C3 app (observed boot log); a real
app's depend on its static RAM use."""
HEAP_FREE, HEAP_LARGEST, HEAP_MIN_FREE = 252_680, 188_416, 251_904
"""What ``mem-dump`` reports (internal RAM; no SPIRAM on ESP32-C3)."""
LWIP_MAX_SOCKETS = 10  # CONFIG_LWIP_MAX_SOCKETS, MEMP_NUM_NETCONN
FLASH_IO_NAMES = {0: "qio", 1: "qout", 2: "dio", 3: "dout", 4: "fastrd", 5: "slowrd"}
"""``esp_flash_io_mode_t`` names (``spi_flash``'s ``flash io:`` line) by image header ``spi_mode``."""
FLASH_SIZE_BYTES = {nibble: int(name[:-2]) << 20 for name, nibble in FLASH_SIZE_NIBBLES.items()}

RISCV_PANIC_REASONS = (
    "Instruction address misaligned", "Instruction access fault", "Illegal instruction", "Breakpoint",
    "Load address misaligned", "Load access fault", "Store address misaligned", "Store access fault",
    "Environment call from U-mode", "Environment call from S-mode", "", "Environment call from M-mode",
)
"""``panic_arch_fill_info`` reasons, indexed by ``mcause``."""
DEFAULT_PANIC_REASON = "Load access fault"
PANIC_REGISTER_NAMES = (
    "MEPC    ", "RA      ", "SP      ", "GP      ", "TP      ", "T0      ", "T1      ", "T2      ",
    "S0/FP   ", "S1      ", "A0      ", "A1      ", "A2      ", "A3      ", "A4      ", "A5      ",
    "A6      ", "A7      ", "S2      ", "S3      ", "S4      ", "S5      ", "S6      ", "S7      ",
    "S8      ", "S9      ", "S10     ", "S11     ", "T3      ", "T4      ", "T5      ", "T6      ",
    "MSTATUS ", "MTVEC   ", "MCAUSE  ", "MTVAL   ", "MHARTID ",
)
"""``panic_print_registers`` (``panic_arch.c``), four per line."""
PANIC_STACK_BYTES = 1024
PANIC_SP = 0x3FC9A0F0


# =========================================================================== exit and context


@dataclass(frozen=True)
class AppExit:
    """How the app ended. ``sw_reset``: ``esp_restart()``; ``panic``: the panic handler
    rebooted; ``stopped``: the board was reset or powered off from outside (EN pin)."""

    reset: Literal["sw_reset", "panic", "stopped"]
    reason: str = ""

    @property
    def rom_reset(self) -> RomReset | None:
        """What the ROM prints next: ``rst:0xc (RTC_SW_CPU_RST)`` after a software reset or
        a panic (``esp_rom_software_reset_cpu(0)`` on ESP32-C3); None when stopped from outside."""
        return None if self.reset == "stopped" else RESET_RTC_SW_CPU


class OtaOpsError(RuntimeError):
    """An ``esp_ota_ops`` call failed; ``err`` is the ``esp_err_t`` name ESP-IDF returns."""

    def __init__(self, err: str, problem: str):
        super().__init__(f"{err}: {problem}")
        self.err = err


CommandResult = int | AppExit
"""A handler's return: the command's ``int`` return code, or an :class:`AppExit` (e.g. ``reboot``)."""


@dataclass(frozen=True)
class ConsoleCommand:
    """One ``esp_console_cmd_t``: name, help (None hides it from ``help``), hint, handler.

    ``glossary`` lists ``(syntax, text)`` rows for ``help`` (argtable's glossary), and
    ``hint`` what ``help`` prints after the name (argtable's syntax, with its leading space).
    """

    name: str
    help: str | None
    handler: Callable[[list[str]], CommandResult]
    hint: str = ""
    glossary: tuple[tuple[str, str], ...] = ()


def split_argv(line: str, argv_size: int = 8) -> list[str]:
    """``esp_console_split_argv``: split on spaces, ``"`` quotes, ``\\`` escapes (of ``\\``,
    ``"`` and space only), at most ``argv_size - 1`` arguments (RainMaker: ``max_cmdline_args = 8``)."""
    args: list[str] = []
    current: list[str] = []
    state = "space"
    for char in line:
        if len(args) >= argv_size - 1:
            break
        if state == "space":
            if char == " ":
                continue
            state = {'"': "quoted", "\\": "arg_escaped"}.get(char, "arg")
            if state == "arg":
                current.append(char)
        elif state == "quoted":
            if char == '"':
                args.append("".join(current))
                current, state = [], "space"
            elif char == "\\":
                state = "quoted_escaped"
            else:
                current.append(char)
        elif state in ("arg_escaped", "quoted_escaped"):
            if char in ('\\', '"', " "):
                current.append(char)
            state = "arg" if state == "arg_escaped" else "quoted"
        elif char == " ":
            args.append("".join(current))
            current, state = [], "space"
        elif char == "\\":
            state = "arg_escaped"
        else:
            current.append(char)
    if state != "space" and len(args) < argv_size - 1:
        args.append("".join(current))
    return args


def _arg_print_formatted(text: str, lmargin: int = 2, rmargin: int = 78) -> str:
    """argtable3 ``arg_print_formatted``: word-wrap *text* to ``rmargin - lmargin + 1``
    columns, later lines indented by *lmargin*; empty text prints nothing."""
    out: list[str] = []
    textlen = len(text)
    line_start, line_end = 0, textlen
    colwidth = rmargin - lmargin + 1
    while line_end > line_start:
        while line_start < textlen and text[line_start].isspace() and text[line_start] != "\n":
            line_start += 1
        if line_end - line_start > colwidth:
            line_end = line_start + colwidth
            while line_end > line_start and not text[line_end].isspace():
                line_end -= 1
            if line_end == line_start:
                line_end = line_start + colwidth
            else:
                while line_end > line_start and text[line_end].isspace():
                    line_end -= 1
                line_end += 1
        while line_start < line_end:
            char = text[line_start]
            line_start += 1
            if char == "\n":
                break
            out.append(char)
        out.append("\n")
        if line_end < textlen:
            out.append(" " * lmargin)
            line_end = textlen
    return "".join(out)


class ConsoleCommands:
    """The ``esp_console`` command list: registration order, re-registration moves a
    command to the end (``CONFIG_CONSOLE_SORTED_HELP`` off), ``help`` built in."""

    def __init__(self, console: BoardConsole):
        self._console = console
        self._commands: dict[str, ConsoleCommand] = {}
        self.register(ConsoleCommand("help", Msg.HELP_DESCRIPTION, self._help, hint=" [<string>]",
                                     glossary=(Msg.HELP_GLOSSARY_ARG,)))

    def register(self, command: ConsoleCommand, *, log_tag: str | None = None) -> None:
        """``esp_console_cmd_register``; with *log_tag*, first log ``<tag>: Registering command: <name>``
        as RainMaker's registration helpers do."""
        if " " in command.name or not command.name:
            raise ValueError(f"console command name {command.name!r} must be one word (ESP_ERR_INVALID_ARG)")
        if log_tag is not None:
            self._console.log(Msg.REGISTERING.level, log_tag, Msg.REGISTERING.format(name=command.name))
        self._commands.pop(command.name, None)
        self._commands[command.name] = command

    @property
    def names(self) -> list[str]:
        return list(self._commands)

    def run(self, line: str) -> CommandResult | None:
        """``esp_console_run``: None for an empty line or an unknown command (no output)."""
        argv = split_argv(line)
        if not argv or argv[0] not in self._commands:
            return None
        return self._commands[argv[0]].handler(argv)

    def help_text(self, command: ConsoleCommand) -> str:
        """``print_arg_help``."""
        text = Msg.HELP_HEAD.format(name=command.name, hint=command.hint)
        text += "  " + _arg_print_formatted(command.help or "")
        text += "".join(Msg.HELP_GLOSSARY.format(syntax=s, text=t) for s, t in command.glossary)
        return text + "\n"

    def _help(self, argv: list[str]) -> int:
        if len(argv) > 2:
            self._console.write(Msg.HELP_EXTRA.format(arg=argv[2]))
            return 1
        shown = [c for c in self._commands.values() if c.help is not None]
        if len(argv) == 1:
            self._console.write("".join(self.help_text(c) for c in shown))
            return 0
        match = next((c for c in shown if c.name == argv[1]), None)
        if match is None:
            self._console.write(Msg.HELP_UNKNOWN.format(name=argv[1]))
            return 1
        self._console.write(self.help_text(match))
        return 0


@dataclass
class AppContext:
    """What the app's ``app_main`` gets: the boot, the chip, the console and its commands.

    :meth:`esp_restart` may be called from any thread; the console task returns the
    restart within :data:`CONSOLE_POLL_S`.
    """

    boot: BootOutcome
    flash: FlashStorage
    efuse: BootEfuses
    console: BoardConsole
    commands: ConsoleCommands
    config: BootloaderConfig = DEFAULT_CONFIG
    exit_event: threading.Event = field(default_factory=threading.Event, repr=False)
    """Set once the app is ending (restart, panic, or a reset from outside noticed by the
    console task): the app's own tasks wait on it."""
    _restart: list[AppExit] = field(default_factory=list, repr=False)
    _restart_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _exit_hooks: list[Callable[[AppExit], None]] = field(default_factory=list, repr=False)
    _cleanups: list[Callable[[], None]] = field(default_factory=list, repr=False)

    def esp_restart(self, reason: str = "esp_restart()") -> AppExit:
        """Request a software reset (the first request wins) and return it."""
        return self.request_exit(AppExit("sw_reset", reason))

    def request_exit(self, ended: AppExit) -> AppExit:
        """End the app with *ended* (a restart, a panic, a stop); the first request wins and is
        returned. May be called from any thread: the exit hooks run here, on the caller's
        thread, before this returns (so the chip goes quiet as a real reset makes it)."""
        with self._restart_lock:
            first = not self._restart
            if first:
                self._restart.append(ended)
            winner = self._restart[0]
            hooks = list(self._exit_hooks) if first else []
        if first:
            self.exit_event.set()
            for hook in hooks:
                hook(winner)
        return winner

    def add_exit_hook(self, hook: Callable[[AppExit], None]) -> None:
        """Call *hook* once, when the app is asked to end (it must not block: it runs on
        whichever thread asked, which may be one of the app's own)."""
        with self._restart_lock:
            pending = self._restart[0] if self._restart else None
            if pending is None:
                self._exit_hooks.append(hook)
        if pending is not None:
            hook(pending)

    def add_cleanup(self, cleanup: Callable[[], None]) -> None:
        """Call *cleanup* on the chip's thread after the app has ended, before the board
        resets (join the app's threads, release what they held)."""
        self._cleanups.append(cleanup)

    def run_cleanups(self) -> None:
        for cleanup in reversed(self._cleanups):
            cleanup()
        self._cleanups.clear()

    @property
    def restart_requested(self) -> AppExit | None:
        with self._restart_lock:
            return self._restart[0] if self._restart else None


AppMain = Callable[[AppContext], AppExit | None]
"""The image's ``app_main``: returns an :class:`AppExit` to end the app, None to return
from ``app_main`` (the console keeps running)."""


# =========================================================================== startup


def _print_startup(boot: BootOutcome, flash: FlashStorage, efuse: BootEfuses, console: BoardConsole) -> None:
    desc, header = boot.app_desc, boot.header
    _log(console, Msg.UNICORE)
    _log(console, Msg.USER_CODE)
    _log(console, Msg.CPU_FREQ, hz=CPU_FREQ_HZ)
    if desc is not None:
        _log(console, Msg.APP_INFO)
        _log(console, Msg.PROJECT, name=desc.project_name)
        _log(console, Msg.VERSION, version=desc.version)
        _log(console, Msg.SECURE_VERSION, version=desc.secure_version)
        if desc.date or desc.time:
            _log(console, Msg.COMPILE_TIME, date=desc.date, time=desc.time)
        _log(console, Msg.ELF_SHA, sha=desc.elf_sha256_hex[:ELF_SHA_CHARS])
        _log(console, Msg.IDF, idf=desc.idf_ver)
    if header is not None:
        low, high = header.min_chip_rev_full, header.max_chip_rev_full
        _log(console, Msg.MIN_REV, major=low // 100, minor=low % 100)
        ignored = "(constraint ignored)" if efuse_uint(efuse, "DISABLE_WAFER_VERSION_MAJOR") else ""
        _log(console, Msg.MAX_REV, major=high // 100, minor=high % 100, ignored=ignored)
    major, minor = boot.chip_revision
    _log(console, Msg.CHIP_REV, major=major, minor=minor)
    _log(console, Msg.HEAP_INIT)
    for addr, length, name in HEAP_REGIONS:
        _log(console, Msg.HEAP_REGION, addr=addr, length=length, kib=length // 1024, name=name)
    _log(console, Msg.FLASH_CHIP, chip="generic")
    spi_mode = header.spi_mode if header is not None else 2
    _log(console, Msg.FLASH_IO, io=FLASH_IO_NAMES.get(spi_mode, "slowrd"))
    header_size = FLASH_SIZE_BYTES.get(header.spi_size) if header is not None else None
    if header_size is not None and flash.size > header_size:
        _log(console, Msg.FLASH_LARGER, detected=flash.size // 1024, header=header_size // 1024)
    _log(console, Msg.SLEEP_ISOLATE)
    _log(console, Msg.SLEEP_SWITCH)
    _log(console, Msg.MAIN_STARTED)


# =========================================================================== panic


def _stack_word(stream: bytes, at: int) -> int:
    """A plausible stack word: zero, the FreeRTOS fill pattern, a DRAM or an IROM pointer."""
    raw = int.from_bytes(stream[at:at + 4], "little")
    kind = raw % 4
    if kind == 0:
        return 0
    if kind == 1:
        return 0xA5A5A5A5
    if kind == 2:
        return 0x3FC90000 | (raw >> 16) & 0xFFFC
    return 0x42000000 | (raw >> 12) & 0x3FFFC


def _panic(boot: BootOutcome, behaviour: BehaviourManifest, console: BoardConsole) -> AppExit:
    """The RISC-V panic handler's report for a fault in ``app_main``, then ``Rebooting...``."""
    wanted = behaviour.extra.get("panic_reason", DEFAULT_PANIC_REASON)
    reason = wanted if isinstance(wanted, str) and wanted in RISCV_PANIC_REASONS and wanted else DEFAULT_PANIC_REASON
    return panic_report(boot, console, reason)


def panic_report(boot: BootOutcome, console: BoardConsole, reason: str = DEFAULT_PANIC_REASON) -> AppExit:
    """Print the RISC-V panic handler's report for a fault with *reason* (one of
    :data:`RISCV_PANIC_REASONS`) and ``Rebooting...``; the :class:`AppExit` to end the app
    with (``AppContext.request_exit``). Any task of the app may fault, not only ``app_main``."""
    if reason not in RISCV_PANIC_REASONS or not reason:
        raise ValueError(f"{reason!r} is not a RISC-V panic reason; use one of {', '.join(r for r in RISCV_PANIC_REASONS if r)}")
    mcause = RISCV_PANIC_REASONS.index(reason)
    entry = boot.header.entry_addr if boot.header is not None else 0x42000020
    sha = boot.app_desc.app_elf_sha256 if boot.app_desc is not None else hashlib.sha256(boot.image).digest()
    seed = hashlib.sha256(b"rig.vboard.app panic " + sha).digest()
    mepc = entry + 0x2A
    registers = [0] * len(PANIC_REGISTER_NAMES)
    registers[:8] = [mepc, mepc - 0x16, PANIC_SP, 0x3FC8E000, 0x3FC9A2E0, 0x4005890E, 0x0000000F, 0]
    registers[10:12] = [0, int.from_bytes(seed[:4], "little") & 0xFFFF]
    registers[32:37] = [0x00001881, 0x40380001, mcause, 0, 0]
    text = [Msg.PANIC_HEAD.format(reason=reason), "\n", Msg.PANIC_DUMP_HEAD]
    for row in range(0, len(PANIC_REGISTER_NAMES), 4):
        text.append("\n")
        text.extend(Msg.PANIC_REGISTER.format(name=name, value=value)
                    for name, value in zip(PANIC_REGISTER_NAMES[row:row + 4], registers[row:row + 4], strict=True))
    text.append("\n")
    text.append(Msg.PANIC_STACK_HEAD)
    stream = b"".join(hashlib.sha256(seed + bytes([i])).digest() for i in range(PANIC_STACK_BYTES // 32))
    for line_at in range(0, PANIC_STACK_BYTES, 32):
        words = [f"0x{_stack_word(stream, line_at + 4 * k):08x}" for k in range(8)]
        text.append(Msg.PANIC_STACK_LINE.format(addr=PANIC_SP + line_at, words=" ".join(words)))
    text.append("\n")
    text.append(Msg.PANIC_ELF.format(sha=sha.hex()[:ELF_SHA_CHARS]))
    text.append("\n")
    text.append(Msg.PANIC_REBOOT)
    console.write("".join(text))
    return AppExit("panic", f"Guru Meditation Error ({reason}) in app_main")


# =========================================================================== console


def _register_common_commands(ctx: AppContext) -> None:
    """``register_generic_debug_commands`` (rmaker_common_cmds.c), each logged as it registers."""
    console = ctx.console

    def reboot(_argv: list[str]) -> CommandResult:
        console.write(Msg.REBOOT_NEWLINE)
        return ctx.esp_restart("console command: reboot")

    def up_time(_argv: list[str]) -> CommandResult:
        console.write(Msg.UPTIME.format(ms=console.uptime_ms()))
        return 0

    def mem_dump(_argv: list[str]) -> CommandResult:
        console.write(Msg.MEM_DUMP.format(free=HEAP_FREE, largest=HEAP_LARGEST, minimum=HEAP_MIN_FREE))
        return 0

    def printer(text: str) -> Callable[[list[str]], CommandResult]:
        def handler(_argv: list[str]) -> CommandResult:
            console.write(text)
            return 0
        return handler

    sockets = printer(Msg.SOCK_DUMP_HEAD + Msg.SOCK_DUMP_TAIL.format(free=LWIP_MAX_SOCKETS))
    handlers: dict[str, Callable[[list[str]], CommandResult]] = {
        "reboot": reboot,
        "up-time": up_time,
        "mem-dump": mem_dump,
        "task-dump": printer(Msg.TASK_DUMP_OFF),
        "cpu-dump": printer(Msg.CPU_DUMP_OFF),
        "sock-dump": sockets,
        "heap-trace": printer(Msg.HEAP_TRACE_OFF),
    }
    for name, handler in handlers.items():
        ctx.commands.register(ConsoleCommand(name, Msg.COMMON_HELP[name], handler), log_tag=TAG_COMMON)


def _read_command_line(ctx: AppContext) -> str | AppExit:
    """Wait for a line; an outside reset or an ``esp_restart`` from another thread ends the wait."""
    while True:
        pending = ctx.restart_requested
        if pending is not None:
            return pending
        if ctx.console.stopping.is_set():
            return AppExit("stopped", "board reset or powered off")
        line = ctx.console.read_line(CONSOLE_POLL_S)
        if line is not None:
            return line


def _console_task(ctx: AppContext) -> AppExit:
    """``scli_task`` (rmaker_console.c): prompt, read, ``\\n``, run, report a non-zero return."""
    first_done = False
    while True:
        if first_done:
            ctx.console.write(Msg.PROMPT)
        first_done = True
        line = _read_command_line(ctx)
        if isinstance(line, AppExit):
            return line
        ctx.console.write(Msg.AFTER_LINE)
        result = ctx.commands.run(line)
        if isinstance(result, AppExit):
            return result
        if result:
            ctx.console.write(Msg.COMMAND_FAILED.format(ret=result))
        pending = ctx.restart_requested
        if pending is not None:
            return pending


# =========================================================================== run


def run_app(boot: BootOutcome, flash: FlashStorage, efuse: BootEfuses, console: BoardConsole, *,
            app_main: AppMain | None = None, config: BootloaderConfig = DEFAULT_CONFIG) -> AppExit:
    """Run the app *boot* started until it resets or the board stops it.

    Prints the ESP-IDF startup lines, then per the behaviour manifest panics (``crash``)
    or starts the RainMaker console and calls *app_main* (the next layer's firmware,
    e.g. the RainMaker node) on the main task while the console task serves commands
    beside it; ``main_task: Returned from app_main()`` follows when *app_main* returns.
    The console serves until ``reboot``, :meth:`AppContext.request_exit` (a restart or
    a panic from any task) or ``console.stopping``; then the exit hooks and cleanups
    run. Returns how it ended; the board resets accordingly (:attr:`AppExit.rom_reset`).
    """
    if boot.halted or boot.partition is None:
        raise ValueError(f"the bootloader started no app ({boot.reason}); run_app needs a booted outcome")
    _print_startup(boot, flash, efuse, console)
    if console.stopping.is_set():
        return AppExit("stopped", "board reset or powered off")
    _log(console, Msg.MAIN_CALLING)
    behaviour = boot.behaviour or BehaviourManifest()
    if behaviour.boot == "crash":
        return _panic(boot, behaviour, console)
    ctx = AppContext(boot, flash, efuse, console, ConsoleCommands(console), config)
    _log(console, Msg.UART_INIT, port=0)  # the console task (priority above main) starts first
    _register_common_commands(ctx)
    if app_main is None:
        _log(console, Msg.MAIN_RETURNED)
        ended = _console_task(ctx)
        ctx.request_exit(ended)
        ctx.run_cleanups()
        return ended
    return _run_with_app_main(ctx, app_main)


def _run_with_app_main(ctx: AppContext, app_main: AppMain) -> AppExit:
    """``app_main`` on the main task while the console task serves commands beside it, as
    on the chip: an ``app_main`` that blocks (RainMaker's ``app_network_start`` waits for
    Wi-Fi) leaves the console usable (``wifi-prov`` is how it gets unblocked)."""
    task = threading.Thread(target=lambda: ctx.request_exit(_console_task(ctx)), name="console_task", daemon=True)
    task.start()
    try:
        ended = app_main(ctx)
        if ended is not None:
            ctx.request_exit(ended)
        elif ctx.restart_requested is None:
            _log(ctx.console, Msg.MAIN_RETURNED)
        task.join()
    finally:
        winner = ctx.request_exit(AppExit("stopped", "app ended"))  # the first request wins: this one only if app_main raised
        ctx.run_cleanups()
    return winner


# =========================================================================== OTA ops (esp_ota_ops.c)


def _with_state(entry: OtaSelectEntry, state: OtaState) -> OtaSelectEntry:
    """``rewrite_ota_seq``: the entry with a new state and its CRC recomputed (seq_label kept)."""
    return replace(entry, ota_state=int(state), crc=ota_seq_crc(entry.ota_seq))


def _active_otadata(boot: BootOutcome, flash: FlashStorage, console: BoardConsole
                    ) -> tuple[PartitionEntry, list[OtaSelectEntry], int, list[PartitionEntry | None]]:
    """``read_otadata`` + ``bootloader_common_get_active_otadata``; raises like ESP-IDF when there is none."""
    otadata_part = boot.otadata_partition
    if otadata_part is None:
        raise OtaOpsError("ESP_ERR_NOT_FOUND", "the partition table has no otadata partition")
    entries = read_otadata(flash, otadata_part).entries
    slots = boot.app_slots
    active = select_otadata(entries, [e.is_valid for e in entries])
    if active == -1 or not slots:
        _log(console, Msg.OTA_FACTORY)
        raise OtaOpsError("ESP_FAIL", "otadata selects no OTA app (the running firmware is factory)")
    return otadata_part, entries, active, slots


def running_app_ota_state(boot: BootOutcome, flash: FlashStorage) -> OtaState | None:
    """``esp_ota_get_state_partition(esp_ota_get_running_partition())``: the state of the
    otadata entry (CRC intact) that selects the running slot; None for a factory app or
    when no entry selects it (ESP_ERR_NOT_SUPPORTED / ESP_ERR_NOT_FOUND)."""
    running, otadata_part = boot.partition, boot.otadata_partition
    slots = boot.app_slots
    if running is None or running.ota_slot is None or otadata_part is None or not slots:
        return None
    for entry in read_otadata(flash, otadata_part).entries:
        if (entry.ota_seq - 1) % len(slots) == running.ota_slot and entry.crc_ok:
            return entry.state
    return None


def mark_app_valid(boot: BootOutcome, flash: FlashStorage, efuse: BootEfuses, console: BoardConsole,
                   config: BootloaderConfig = DEFAULT_CONFIG) -> None:
    """``esp_ota_mark_app_valid_cancel_rollback``: the active otadata entry becomes VALID
    (its sector rewritten) and, with anti-rollback, the eFuse ``SECURE_VERSION`` is raised
    to the running app's. Raises :class:`OtaOpsError` as ESP-IDF returns errors."""
    otadata_part, entries, active, _ = _active_otadata(boot, flash, console)
    entry = entries[active]
    if entry.ota_state == OtaState.VALID:
        return
    write_otadata_entry(flash, otadata_part, active, _with_state(entry, OtaState.VALID))
    if config.anti_rollback and boot.app_desc is not None and not update_secure_version(
            efuse, console, boot.app_desc.secure_version, config.secure_version_bits):
        raise OtaOpsError("ESP_FAIL", "the eFuse SECURE_VERSION could not be raised to the running app's")


def _rollback_possible(boot: BootOutcome, flash: FlashStorage, efuse: BootEfuses, entries: Sequence[OtaSelectEntry],
                       slots: list[PartitionEntry | None], config: BootloaderConfig) -> bool:
    """``esp_ota_check_rollback_is_possible``: the other otadata entry selects an app that verifies."""
    valid = [e.is_valid for e in entries]
    active = select_otadata(entries, valid)
    if active == -1:
        return False
    last = 1 - active
    factory = next((p for p in boot.partitions if p.is_factory), None)
    if not config.anti_rollback and not valid[last] and factory is not None:
        return verify_app_partition(flash, factory, efuse)
    if not valid[last]:
        return False
    part = slots[(entries[last].ota_seq - 1) % len(slots)]
    if part is None or not verify_app_partition(flash, part, efuse):
        return False
    if not config.anti_rollback:
        return True
    raw = flash.read(part.offset + APP_DESC_OFFSET, 8)
    return int.from_bytes(raw[4:8], "little") >= efuse.secure_version


def mark_app_invalid_and_reboot(boot: BootOutcome, flash: FlashStorage, efuse: BootEfuses, console: BoardConsole,
                                config: BootloaderConfig = DEFAULT_CONFIG) -> AppExit:
    """``esp_ota_mark_app_invalid_rollback_and_reboot``: when another app can boot, the
    active otadata entry becomes INVALID and the chip restarts (return the
    :class:`AppExit` from the app); otherwise ``ESP_ERR_OTA_ROLLBACK_FAILED``."""
    otadata_part, entries, active, slots = _active_otadata(boot, flash, console)
    if not _rollback_possible(boot, flash, efuse, entries, slots, config):
        _log(console, Msg.OTA_NO_ROLLBACK)
        raise OtaOpsError("ESP_ERR_OTA_ROLLBACK_FAILED", "no other bootable app to roll back to")
    entry = entries[active]
    write_otadata_entry(flash, otadata_part, active, _with_state(entry, OtaState.INVALID))
    _log(console, Msg.OTA_ROLLBACK)
    return AppExit("sw_reset", "esp_ota_mark_app_invalid_rollback_and_reboot()")

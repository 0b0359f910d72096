"""ESP-IDF build directories: write the ones the rig generates, read the ones ESP-IDF makes.

A build directory is what ``idf.py build`` leaves in ``build/`` and what pytest-embedded-idf
flashes from (``IdfApp``)::

    flasher_args.json                     what to flash where, with which esptool options
    flash_args                            the same for ``esptool write-flash @flash_args``
    bootloader/bootloader.bin             at the chip's bootloader offset (ESP32-C3: 0x0)
    partition_table/partition-table.bin   at CONFIG_PARTITION_TABLE_OFFSET
    ota_data_initial.bin                  erased otadata, when the table has an otadata partition
    <project>.bin                         the app, at the default boot partition (factory, else ota_0)
    config/sdkconfig.json                 the configuration as pytest-embedded-idf reads it
    sdkconfig                             the same in Kconfig text form (the rig's firmware-set contract)

Sources: esp-idf ``components/esptool_py/flasher_args.json.in`` and
``components/esptool_py/project_include.cmake`` (``flasher_args.json`` keys, the
``"encrypted"`` strings, ``extra_esptool_args``), ``components/app_update/CMakeLists.txt``
(``ota_data_initial.bin`` = blank otadata), ``components/partition_table/parttool.py``
(``PARTITION_BOOT_DEFAULT``: factory, else ota_0 … ota_15), esp-idf-kconfig ``kconfgen``
(``sdkconfig`` text and ``config/sdkconfig.json``: names without ``CONFIG_``, bools as
true/false, hex and int values as numbers), pytest-embedded-idf ``app.py`` (``IdfApp``:
which of these files it reads, and that it turns the partition table into CSV with a
``gen_esp32part.py``-compatible ``part_tool``).

``project_description.json`` is not written: ``IdfApp`` does not read it (only
``--skip-check-coredump`` tooling does, together with an ELF the rig does not have).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rig.firmware.errors import FirmwareFormatError
from rig.firmware.otadata import OtaDataPartition
from rig.firmware.partition_table import PART_TOOL_SCRIPT, PartitionTable
from rig.targets import SUPPORTED, target_for

FLASHER_ARGS_JSON = "flasher_args.json"
FLASH_ARGS = "flash_args"
BOOTLOADER_BIN = "bootloader/bootloader.bin"
PARTITION_TABLE_BIN = "partition_table/partition-table.bin"
OTA_DATA_INITIAL_BIN = "ota_data_initial.bin"
SDKCONFIG = "sdkconfig"
SDKCONFIG_JSON = "config/sdkconfig.json"

_ARCH = {"esp32": "XTENSA", "esp32s2": "XTENSA", "esp32s3": "XTENSA"}
"""Chips that are not RISC-V (soc ``IDF_TARGET_ARCH_*``); every other chip the rig may meet is."""

SdkconfigValue = str | int | bool


class KconfigHex(int):
    """An int that Kconfig stores as hex (``CONFIG_PARTITION_TABLE_OFFSET=0xc000``)."""

    def __repr__(self) -> str:
        return f"KconfigHex(0x{int(self):x})"


@dataclass(frozen=True)
class FlashSettings:
    """``flash_settings`` of flasher_args.json: esptool's ``--flash-mode/--flash-freq/--flash-size``."""

    flash_mode: str = "dio"
    flash_freq: str = "80m"
    flash_size: str = "4MB"

    @property
    def flash_size_bytes(self) -> int:
        text = self.flash_size.upper()
        for suffix, unit in (("MB", 1024 * 1024), ("KB", 1024)):
            if text.endswith(suffix) and text[: -len(suffix)].isdigit():
                return int(text[: -len(suffix)]) * unit
        raise ValueError(f"flash size {self.flash_size!r} is not like '4MB'")


@dataclass(frozen=True)
class IdfBuildDir:
    """One ESP-IDF build directory, every path absolute."""

    path: Path
    project_name: str
    target: str
    app_bin: Path
    app_offset: int
    bootloader_bin: Path
    bootloader_offset: int
    partition_table_bin: Path
    partition_table_offset: int
    ota_data_initial_bin: Path | None
    otadata_offset: int | None
    flash_files: dict[int, Path]
    flash_settings: FlashSettings
    sdkconfig: dict[str, SdkconfigValue] = field(repr=False)
    encrypted_offsets: frozenset[int] = frozenset()

    def read_partition_table(self) -> PartitionTable:
        """``partition-table.bin`` parsed, for its flash offset."""
        return PartitionTable.parse(self.partition_table_bin.read_bytes(), offset=self.partition_table_offset)

    def read_app_image(self) -> bytes:
        return self.app_bin.read_bytes()

    def idf_app_kwargs(self) -> dict[str, str]:
        """Arguments for ``pytest_embedded_idf.app.IdfApp`` (and the matching ``--app-path``,
        ``--build-dir``, ``--part-tool`` options): this directory is the build directory itself."""
        return {"app_path": str(self.path), "build_dir": str(self.path), "part_tool": str(PART_TOOL_SCRIPT)}


# --------------------------------------------------------------------------- sdkconfig

def _normalise_key(key: str) -> str:
    name = key.removeprefix("CONFIG_")
    if not re.fullmatch(r"[A-Z0-9_]+", name):
        raise ValueError(f"sdkconfig name {key!r} is not a Kconfig symbol (A-Z, 0-9, _)")
    return name


def sdkconfig_text(values: Mapping[str, SdkconfigValue]) -> str:
    """Kconfig's ``sdkconfig`` form: ``CONFIG_X=y``, ``# CONFIG_X is not set``, quoted strings, hex kept hex."""
    lines = ["#", "# Automatically generated file. DO NOT EDIT.",
             "# Espressif IoT Development Framework (ESP-IDF) Project Configuration (written by the rig)", "#"]
    for key, value in values.items():
        name = _normalise_key(key)
        if isinstance(value, bool):
            lines.append(f"CONFIG_{name}=y" if value else f"# CONFIG_{name} is not set")
        elif isinstance(value, KconfigHex):
            lines.append(f"CONFIG_{name}=0x{int(value):x}")
        elif isinstance(value, int):
            lines.append(f"CONFIG_{name}={value}")
        elif isinstance(value, str):
            escaped = value.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'CONFIG_{name}="{escaped}"')
        else:
            raise ValueError(f"sdkconfig {name}: {type(value).__name__} is not a Kconfig value (bool, int, str)")
    return "\n".join(lines) + "\n"


_LINE_SET = re.compile(r"CONFIG_([A-Za-z0-9_]+)=(.*)")
_LINE_UNSET = re.compile(r"# CONFIG_([A-Za-z0-9_]+) is not set")


def parse_sdkconfig(text: str, what: str = "sdkconfig") -> dict[str, SdkconfigValue]:
    """Read ``sdkconfig`` text into names without ``CONFIG_``; a line Kconfig would not write is an error."""
    values: dict[str, SdkconfigValue] = {}
    for line_no, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        unset = _LINE_UNSET.fullmatch(line)
        if unset:
            values[unset.group(1)] = False
            continue
        if not line or line.startswith("#"):
            continue
        match = _LINE_SET.fullmatch(line)
        if not match:
            raise FirmwareFormatError(what, f"line {line_no} is not CONFIG_NAME=value: {raw!r}", None,
                                      "the file is not an sdkconfig, or was edited by hand")
        name, value = match.groups()
        if value in ("y", "n"):
            values[name] = value == "y"
        elif value.startswith('"'):
            if len(value) < 2 or not value.endswith('"'):
                raise FirmwareFormatError(what, f"line {line_no}: unterminated string {value!r}", None,
                                          "close the quotes")
            values[name] = re.sub(r"\\(.)", r"\1", value[1:-1])
        elif re.fullmatch(r"0[xX][0-9a-fA-F]+", value):
            values[name] = KconfigHex(int(value, 16))
        elif re.fullmatch(r"-?[0-9]+", value):
            values[name] = int(value)
        else:
            values[name] = value
    return values


def _sdkconfig_json(values: Mapping[str, SdkconfigValue]) -> str:
    return json.dumps({_normalise_key(k): (int(v) if isinstance(v, KconfigHex) else v) for k, v in values.items()},
                      indent=4) + "\n"


# --------------------------------------------------------------------------- writing

def _entry(offset: int, file: str, encrypted: bool) -> dict[str, str]:
    return {"offset": f"0x{offset:x}", "file": file, "encrypted": "true" if encrypted else "false"}


def write_build_dir(
    path: str | Path,
    project_name: str,
    app_image: bytes,
    bootloader_image: bytes,
    partition_table: PartitionTable,
    sdkconfig: Mapping[str, SdkconfigValue] | None = None,
    target: str = "esp32c3",
    *,
    flash_settings: FlashSettings | None = None,
    esptool_v5_names: bool = True,
) -> IdfBuildDir:
    """Write an ESP-IDF-layout build directory at *path* (created if missing) and return it.

    The app goes to the table's default boot partition (factory, else ota_0), the
    bootloader to the chip's bootloader offset, the table to ``partition_table.offset``,
    and erased otadata to the otadata partition when there is one. *sdkconfig* (names
    with or without ``CONFIG_``) is written over what the rig derives (``IDF_TARGET``,
    flash settings, ``PARTITION_TABLE_OFFSET``, ``PARTITION_TABLE_MD5`` …); a value that
    contradicts the arguments is a ``ValueError``. With ``SECURE_FLASH_ENC_ENABLED`` set
    every file is marked ``"encrypted": "true"``, as an ESP-IDF development-mode build does.

    *esptool_v5_names* writes ``--flash-mode``/``hard-reset`` (ESP-IDF ≥ 6, esptool 5);
    ``False`` writes ``--flash_mode``/``hard_reset`` as ESP-IDF 5.x does. esptool 5 reads
    both, the old ones with a deprecation warning.
    """
    if target not in SUPPORTED:
        raise ValueError(f"target {target!r} is not supported; the rig knows {', '.join(SUPPORTED)}")
    chip = target_for(target)
    if not project_name or not re.fullmatch(r"[A-Za-z0-9_.+-]+", project_name) or project_name.startswith("."):
        raise ValueError(f"project name {project_name!r} must be a plain file name (letters, digits, _ . + -)")
    settings = flash_settings or FlashSettings(flash_size=f"{chip.flash_size // (1024 * 1024)}MB")
    partition_table.check_fits(settings.flash_size_bytes)

    app_partition = partition_table.boot_default()
    if app_partition is None:
        raise ValueError("the partition table has no factory or ota_N app partition to flash the app to")
    if len(app_image) > app_partition.size:
        raise ValueError(f"app image is 0x{len(app_image):x} bytes but partition {app_partition.name!r} holds "
                         f"0x{app_partition.size:x}")
    bootloader_room = partition_table.offset - chip.bootloader_offset
    if len(bootloader_image) > bootloader_room:
        raise ValueError(f"bootloader image is 0x{len(bootloader_image):x} bytes but only 0x{bootloader_room:x} fit "
                         f"between 0x{chip.bootloader_offset:x} and the partition table at 0x{partition_table.offset:x}")
    otadata = partition_table.otadata

    config = _derived_sdkconfig(target, settings, partition_table, chip.bootloader_offset)
    for key, value in (sdkconfig or {}).items():
        name = _normalise_key(key)
        if name in config and name in _FIXED_KEYS and config[name] != value:
            raise ValueError(f"sdkconfig {name}={value!r} contradicts the build ({config[name]!r}); "
                             "change the argument it comes from instead")
        config[name] = value
    encrypted = bool(config.get("SECURE_FLASH_ENC_ENABLED"))

    root = Path(path).resolve()
    files: dict[str, tuple[int, bytes]] = {
        "bootloader": (chip.bootloader_offset, bootloader_image),
        "partition-table": (partition_table.offset, partition_table.to_bytes()),
        "app": (app_partition.offset, app_image),
    }
    names = {"bootloader": BOOTLOADER_BIN, "partition-table": PARTITION_TABLE_BIN, "app": f"{project_name}.bin"}
    if otadata is not None:
        files["otadata"] = (otadata.offset, OtaDataPartition.blank().to_bytes())
        names["otadata"] = OTA_DATA_INITIAL_BIN
    for role, (_, data) in files.items():
        out = root / names[role]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(data)

    by_offset = sorted(files, key=lambda role: files[role][0])
    opt = (lambda o: f"--{o}") if esptool_v5_names else (lambda o: "--" + o.replace("-", "_"))
    write_flash_args = [opt("flash-mode"), settings.flash_mode, opt("flash-size"), settings.flash_size,
                        opt("flash-freq"), settings.flash_freq]
    flasher_args: dict[str, Any] = {
        "write_flash_args": write_flash_args,
        "flash_settings": {"flash_mode": settings.flash_mode, "flash_size": settings.flash_size,
                           "flash_freq": settings.flash_freq},
        "flash_files": {f"0x{files[r][0]:x}": names[r] for r in by_offset},
        **{r: _entry(files[r][0], names[r], encrypted) for r in ("bootloader", "app", "partition-table", "otadata")
           if r in files},
        "extra_esptool_args": {
            "after": "hard-reset" if esptool_v5_names else "hard_reset",
            "before": "default-reset" if esptool_v5_names else "default_reset",
            "stub": True,
            "chip": target,
        },
    }
    (root / FLASHER_ARGS_JSON).write_text(json.dumps(flasher_args, indent=4) + "\n")
    (root / FLASH_ARGS).write_text(" ".join(write_flash_args) + "\n"
                                   + "".join(f"0x{files[r][0]:x} {names[r]}\n" for r in by_offset))
    (root / SDKCONFIG).write_text(sdkconfig_text(config))
    (root / SDKCONFIG_JSON).parent.mkdir(parents=True, exist_ok=True)
    (root / SDKCONFIG_JSON).write_text(_sdkconfig_json(config))
    return read_build_dir(root)


_FIXED_KEYS = frozenset({
    "IDF_TARGET", "ESPTOOLPY_FLASHMODE", "ESPTOOLPY_FLASHFREQ", "ESPTOOLPY_FLASHSIZE",
    "PARTITION_TABLE_OFFSET", "PARTITION_TABLE_MD5", "BOOTLOADER_OFFSET_IN_FLASH",
})


def _derived_sdkconfig(target: str, settings: FlashSettings, table: PartitionTable,
                       bootloader_offset: int) -> dict[str, SdkconfigValue]:
    arch = _ARCH.get(target, "RISCV")
    chip = target_for(target)
    return {
        "IDF_TARGET": target,
        f"IDF_TARGET_{target.upper()}": True,
        f"IDF_TARGET_ARCH_{arch}": True,
        "IDF_TARGET_ARCH": arch.lower(),
        "IDF_FIRMWARE_CHIP_ID": KconfigHex(chip.image_chip_id),
        "APP_BUILD_TYPE_APP_2NDBOOT": True,
        "BOOTLOADER_OFFSET_IN_FLASH": KconfigHex(bootloader_offset),
        f"ESPTOOLPY_FLASHMODE_{settings.flash_mode.upper()}": True,
        "ESPTOOLPY_FLASHMODE": settings.flash_mode,
        f"ESPTOOLPY_FLASHFREQ_{settings.flash_freq.upper()}": True,
        "ESPTOOLPY_FLASHFREQ": settings.flash_freq,
        f"ESPTOOLPY_FLASHSIZE_{settings.flash_size.upper()}": True,
        "ESPTOOLPY_FLASHSIZE": settings.flash_size,
        "ESPTOOLPY_BEFORE_RESET": True,
        "ESPTOOLPY_BEFORE": "default_reset",
        "ESPTOOLPY_AFTER_RESET": True,
        "ESPTOOLPY_AFTER": "hard_reset",
        "PARTITION_TABLE_CUSTOM": True,
        "PARTITION_TABLE_CUSTOM_FILENAME": "partitions.csv",
        "PARTITION_TABLE_FILENAME": "partitions.csv",
        "PARTITION_TABLE_OFFSET": KconfigHex(table.offset),
        "PARTITION_TABLE_MD5": table.md5,
    }


# --------------------------------------------------------------------------- reading

def _missing(path: Path, what: str, fix: str) -> FileNotFoundError:
    return FileNotFoundError(f"{path}: {what} not found — {fix}")


def read_build_dir(path: str | Path) -> IdfBuildDir:
    """Read a build directory written by ESP-IDF (``idf.py build``) or by :func:`write_build_dir`.

    A missing directory or file is a ``FileNotFoundError`` naming it; a
    ``flasher_args.json`` or ``sdkconfig`` that is not what ESP-IDF writes is a
    :class:`FirmwareFormatError`. ``sdkconfig`` is looked for in the directory, then as
    ``config/sdkconfig.json``, then in the parent (the project directory).
    """
    root = Path(path).resolve()
    if not root.is_dir():
        raise _missing(root, "build directory", "give the ESP-IDF build/ directory (the one holding "
                       "flasher_args.json), or run `idf.py build` first")
    args_file = root / FLASHER_ARGS_JSON
    if not args_file.is_file():
        hint = " (this looks like the project directory: use its build/ folder)" if (root / "build").is_dir() else ""
        raise _missing(args_file, FLASHER_ARGS_JSON, "this is not an ESP-IDF build directory, or the build did not "
                       f"finish; run `idf.py build`{hint}")
    try:
        args = json.loads(args_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FirmwareFormatError(str(args_file), f"is not JSON ({exc})", None,
                                  "rebuild; ESP-IDF generates this file") from None
    if not isinstance(args, dict):
        raise FirmwareFormatError(str(args_file), "is not a JSON object", None, "rebuild; ESP-IDF generates this file")

    def entry(*keys: str, required: bool = True) -> tuple[int, Path] | None:
        for key in keys:
            if key in args:
                value = args[key]
                try:
                    offset = int(value["offset"], 0)
                    file = root / value["file"]
                except (TypeError, KeyError, ValueError):
                    raise FirmwareFormatError(str(args_file), f'"{key}" is {value!r}, not '
                                              '{"offset": "0x…", "file": "…"}', None, "rebuild") from None
                if not file.is_file():
                    raise _missing(file, f'"{key}" file', f"{FLASHER_ARGS_JSON} names it but it is not there; "
                                   "copy the whole build directory")
                return offset, file
        if required:
            raise FirmwareFormatError(str(args_file), f'has no "{keys[0]}" entry', None,
                                      "this build does not produce a flashable app (e.g. a RAM app); rebuild")
        return None

    app = entry("app")
    bootloader = entry("bootloader")
    table = entry("partition-table", "partition_table")
    otadata = entry("otadata", required=False)
    assert app is not None and bootloader is not None and table is not None

    try:
        settings_raw = args["flash_settings"]
        settings = FlashSettings(settings_raw["flash_mode"], settings_raw["flash_freq"], settings_raw["flash_size"])
        flash_files: dict[int, Path] = {}
        for offset_text, rel in args["flash_files"].items():
            flash_files[int(offset_text, 0)] = root / rel
    except (TypeError, KeyError, ValueError) as exc:
        raise FirmwareFormatError(str(args_file), f"flash_settings / flash_files are not what ESP-IDF writes ({exc!r})",
                                  None, "rebuild") from None
    for file in flash_files.values():
        if not file.is_file():
            raise _missing(file, "flash file", f"{FLASHER_ARGS_JSON} lists it under flash_files; copy the whole "
                           "build directory")
    encrypted = frozenset(
        int(v["offset"], 0) for v in args.values()
        if isinstance(v, dict) and v.get("encrypted") == "true" and isinstance(v.get("offset"), str)
    )

    sdkconfig = _read_sdkconfig(root)
    target = str(args.get("extra_esptool_args", {}).get("chip") or sdkconfig.get("IDF_TARGET") or "")
    if not target:
        raise FirmwareFormatError(str(args_file), 'names no chip (extra_esptool_args "chip") and sdkconfig has no '
                                  "IDF_TARGET", None, "rebuild with a current ESP-IDF")
    return IdfBuildDir(
        path=root,
        project_name=app[1].stem,
        target=target,
        app_bin=app[1],
        app_offset=app[0],
        bootloader_bin=bootloader[1],
        bootloader_offset=bootloader[0],
        partition_table_bin=table[1],
        partition_table_offset=table[0],
        ota_data_initial_bin=otadata[1] if otadata else None,
        otadata_offset=otadata[0] if otadata else None,
        flash_files=flash_files,
        flash_settings=settings,
        sdkconfig=sdkconfig,
        encrypted_offsets=encrypted,
    )


def _read_sdkconfig(root: Path) -> dict[str, SdkconfigValue]:
    text_file, json_file, project_file = root / SDKCONFIG, root / SDKCONFIG_JSON, root.parent / SDKCONFIG
    if text_file.is_file():
        return parse_sdkconfig(text_file.read_text(), str(text_file))
    if json_file.is_file():
        try:
            values = json.loads(json_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise FirmwareFormatError(str(json_file), f"is not JSON ({exc})", None, "rebuild") from None
        if not isinstance(values, dict) or not all(isinstance(v, str | int | bool) for v in values.values()):
            raise FirmwareFormatError(str(json_file), "is not a flat JSON object of Kconfig values", None, "rebuild")
        return values
    if project_file.is_file():
        return parse_sdkconfig(project_file.read_text(), str(project_file))
    raise _missing(text_file, "sdkconfig", f"looked for {SDKCONFIG}, {SDKCONFIG_JSON} and ../{SDKCONFIG}; "
                   "copy the build's config/sdkconfig.json or the project's sdkconfig next to flasher_args.json")


__all__ = [
    "FlashSettings",
    "IdfBuildDir",
    "KconfigHex",
    "SdkconfigValue",
    "parse_sdkconfig",
    "read_build_dir",
    "sdkconfig_text",
    "write_build_dir",
]

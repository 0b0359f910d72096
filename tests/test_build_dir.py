"""ESP-IDF build directories: judged by pytest-embedded-idf's IdfApp and by esptool itself."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pytest_embedded_idf.app import FlashFile, IdfApp

from rig.firmware.app_desc import AppDescriptor
from rig.firmware.build_dir import (
    FlashSettings,
    IdfBuildDir,
    KconfigHex,
    parse_sdkconfig,
    read_build_dir,
    sdkconfig_text,
    write_build_dir,
)
from rig.firmware.errors import FirmwareFormatError
from rig.firmware.image import EspImage, ImageHeader, Segment, build_app_image, build_image
from rig.firmware.partition_table import PART_TOOL_SCRIPT, RAINMAKER_4MB, PartitionTable

IRAM_LOAD = 0x403CE000  # ESP32-C3 bootloader IRAM (SOC_IRAM_LOW..SOC_IRAM_HIGH)
DRAM_LOAD = 0x3FCD5000


@pytest.fixture(scope="module")
def bootloader() -> bytes:
    """A minimal 2nd-stage bootloader image: code in IRAM, data in DRAM, no app descriptor."""
    image = build_image([Segment(IRAM_LOAD, bytes.fromhex("6f000000")), Segment(DRAM_LOAD, bytes(16))],
                        header=ImageHeader(entry_addr=IRAM_LOAD))
    parsed = EspImage.parse(image)
    assert all(s.is_loaded() for s in parsed.segments)
    return image


@pytest.fixture(scope="module")
def app() -> bytes:
    return build_app_image(AppDescriptor(project_name="rig_app", version="1.2.3"), b"manifest")


SDKCONFIG = {
    "BOOTLOADER_APP_ROLLBACK_ENABLE": True,
    "CONFIG_SECURE_BOOT": False,
    "APP_PROJECT_VER": 'say "hi"',
    "LOG_DEFAULT_LEVEL": 3,
    "ESP_RMAKER_FACTORY_PARTITION_NAME": "fctry",
}


@pytest.fixture
def build(tmp_path: Path, app: bytes, bootloader: bytes) -> IdfBuildDir:
    return write_build_dir(tmp_path / "base", "rig_app", app, bootloader, RAINMAKER_4MB, SDKCONFIG)


def idf_app(build: IdfBuildDir) -> IdfApp:
    return IdfApp(**build.idf_app_kwargs())


# --------------------------------------------------------------------------- pytest-embedded-idf

def test_idf_app_accepts_the_build_dir(build: IdfBuildDir) -> None:
    app = idf_app(build)
    root = str(build.path)
    assert app.binary_path == root
    assert app.target == "esp32c3" and app.is_riscv32 and not app.is_xtensa
    assert not app.is_loadable_elf and not app.is_linux_elf
    assert app.flash_files == [
        FlashFile(0x0, os.path.join(root, "bootloader/bootloader.bin"), False),
        FlashFile(0xC000, os.path.join(root, "partition_table/partition-table.bin"), False),
        FlashFile(0x16000, os.path.join(root, "ota_data_initial.bin"), False),
        FlashFile(0x20000, os.path.join(root, "rig_app.bin"), False),
    ]
    assert app.flash_settings == {"flash_mode": "dio", "flash_size": "4MB", "flash_freq": "80m", "encrypt": False}
    assert app.flash_args["extra_esptool_args"] == {"after": "hard-reset", "before": "default-reset", "stub": True,
                                                    "chip": "esp32c3"}
    assert app.write_flash_args == ["--flash-mode", "dio", "--flash-size", "4MB", "--flash-freq", "80m",
                                    "0x0", "bootloader/bootloader.bin", "0xc000",
                                    "partition_table/partition-table.bin", "0x16000", "ota_data_initial.bin",
                                    "0x20000", "rig_app.bin"]


def test_idf_app_reads_sdkconfig_values(build: IdfBuildDir) -> None:
    config = idf_app(build).sdkconfig
    assert config["IDF_TARGET"] == "esp32c3"
    assert config["BOOTLOADER_APP_ROLLBACK_ENABLE"] is True
    assert config["SECURE_BOOT"] is False
    assert config["PARTITION_TABLE_OFFSET"] == 0xC000
    assert config["LOG_DEFAULT_LEVEL"] == 3
    assert config["APP_PROJECT_VER"] == 'say "hi"'
    assert config["ESPTOOLPY_FLASHSIZE"] == "4MB"


def test_idf_app_reads_the_partition_table(build: IdfBuildDir) -> None:
    table = idf_app(build).partition_table
    assert list(table) == [p.name for p in RAINMAKER_4MB]
    assert table["ota_0"] == {"type": "app", "subtype": "ota_0", "offset": 0x20000, "size": 0x1E0000, "flags": ""}
    assert table["otadata"] == {"type": "data", "subtype": "ota", "offset": 0x16000, "size": 0x2000, "flags": ""}
    assert table["esp_secure_cert"] == {"type": "63", "subtype": "6", "offset": 0xD000, "size": 0x2000,
                                        "flags": "encrypted"}
    assert table["fctry"]["offset"] == 0x3FA000 and table["nvs"]["size"] == 0x6000


def test_idf_app_with_esp_idf_5_option_names_and_flash_encryption(tmp_path: Path, app: bytes,
                                                                   bootloader: bytes) -> None:
    build = write_build_dir(tmp_path / "enc", "rig_app", app, bootloader, RAINMAKER_4MB,
                            {"SECURE_FLASH_ENC_ENABLED": True}, esptool_v5_names=False)
    idf = idf_app(build)
    assert idf.flash_args["write_flash_args"][0] == "--flash_mode"
    assert idf.flash_args["extra_esptool_args"]["after"] == "hard_reset"
    assert idf.flash_settings["encrypt"] is True
    assert all(f.encrypted for f in idf.flash_files)
    assert build.encrypted_offsets == {0x0, 0xC000, 0x16000, 0x20000}


# --------------------------------------------------------------------------- the files themselves

def test_files_and_flasher_args_shape(build: IdfBuildDir, app: bytes, bootloader: bytes) -> None:
    root = build.path
    assert (root / "rig_app.bin").read_bytes() == app
    assert (root / "bootloader/bootloader.bin").read_bytes() == bootloader
    assert (root / "partition_table/partition-table.bin").read_bytes() == RAINMAKER_4MB.to_bytes()
    assert (root / "ota_data_initial.bin").read_bytes() == b"\xff" * 0x2000
    args = json.loads((root / "flasher_args.json").read_text())
    assert list(args) == ["write_flash_args", "flash_settings", "flash_files", "bootloader", "app",
                          "partition-table", "otadata", "extra_esptool_args"]
    assert args["app"] == {"offset": "0x20000", "file": "rig_app.bin", "encrypted": "false"}
    assert args["partition-table"] == {"offset": "0xc000", "file": "partition_table/partition-table.bin",
                                       "encrypted": "false"}
    assert (root / "flash_args").read_text().splitlines()[0] == "--flash-mode dio --flash-size 4MB --flash-freq 80m"


def test_sdkconfig_text_known_answer() -> None:
    text = sdkconfig_text({"A": True, "CONFIG_B": False, "C": 'x"y\\z', "D": 12, "E": KconfigHex(0xC000)})
    assert text.splitlines()[4:] == [
        "CONFIG_A=y", "# CONFIG_B is not set", 'CONFIG_C="x\\"y\\\\z"', "CONFIG_D=12", "CONFIG_E=0xc000"]
    back = parse_sdkconfig(text)
    assert back == {"A": True, "B": False, "C": 'x"y\\z', "D": 12, "E": 0xC000}
    assert isinstance(back["E"], KconfigHex)


def test_read_back_what_was_written(build: IdfBuildDir) -> None:
    again = read_build_dir(build.path)
    assert again == build
    assert build.project_name == "rig_app" and build.target == "esp32c3"
    assert (build.app_offset, build.bootloader_offset, build.partition_table_offset, build.otadata_offset) == (
        0x20000, 0x0, 0xC000, 0x16000)
    assert build.flash_settings == FlashSettings("dio", "80m", "4MB")
    assert build.read_partition_table() == RAINMAKER_4MB
    assert build.sdkconfig["PARTITION_TABLE_OFFSET"] == KconfigHex(0xC000)
    assert build.sdkconfig["ESP_RMAKER_FACTORY_PARTITION_NAME"] == "fctry"
    assert EspImage.parse(build.read_app_image()).app_desc.version == "1.2.3"


def test_factory_table_without_otadata(tmp_path: Path, app: bytes, bootloader: bytes) -> None:
    table = PartitionTable.from_csv("nvs, data, nvs, , 0x6000\nphy_init, data, phy, , 0x1000\n"
                                    "factory, app, factory, , 1M\n")
    build = write_build_dir(tmp_path / "f", "plain", app, bootloader, table)
    assert build.app_offset == 0x10000 and build.ota_data_initial_bin is None
    assert sorted(build.flash_files) == [0x0, 0x8000, 0x10000]
    assert not (build.path / "ota_data_initial.bin").exists()


def test_esptool_merge_bin_accepts_flash_args(build: IdfBuildDir, app: bytes) -> None:
    """The real esptool reads the written flash_args (offsets, files, flash options) and places every file."""
    merged = build.path / "merged.bin"
    subprocess.run([sys.executable, "-m", "esptool", "--chip", "esp32c3", "merge-bin", "-o", str(merged),
                    "@flash_args"], cwd=build.path, check=True, capture_output=True, timeout=60)
    data = merged.read_bytes()
    assert data[0xC000:0xCC00] == RAINMAKER_4MB.to_bytes()
    assert data[0x16000:0x18000] == b"\xff" * 0x2000
    assert data[0x20000:0x20000 + len(app)] == app


# --------------------------------------------------------------------------- real ESP-IDF layout

def test_reads_an_esp_idf_5_build_dir(tmp_path: Path, app: bytes, bootloader: bytes) -> None:
    """ESP-IDF 5.x writes underscored options, no sdkconfig in build/ (it is in the project dir)."""
    project = tmp_path / "led_light"
    root = project / "build"
    (root / "bootloader").mkdir(parents=True)
    (root / "partition_table").mkdir()
    (root / "bootloader/bootloader.bin").write_bytes(bootloader)
    (root / "partition_table/partition-table.bin").write_bytes(RAINMAKER_4MB.to_bytes())
    (root / "ota_data_initial.bin").write_bytes(b"\xff" * 0x2000)
    (root / "led_light.bin").write_bytes(app)
    (root / "flasher_args.json").write_text("""{
    "write_flash_args" : [ "--flash_mode", "dio",
                           "--flash_size", "4MB",
                           "--flash_freq", "80m" ],
    "flash_settings" : {
        "flash_mode": "dio",
        "flash_size": "4MB",
        "flash_freq": "80m"
    },
    "flash_files" : {
        "0x0" : "bootloader/bootloader.bin",
        "0x20000" : "led_light.bin",
        "0xc000" : "partition_table/partition-table.bin",
        "0x16000" : "ota_data_initial.bin"
    },
    "bootloader" : { "offset" : "0x0", "file" : "bootloader/bootloader.bin", "encrypted" : "false" },
    "app" : { "offset" : "0x20000", "file" : "led_light.bin", "encrypted" : "false" },
    "partition-table" : { "offset" : "0xc000", "file" : "partition_table/partition-table.bin", "encrypted" : "false" },
    "otadata" : { "offset" : "0x16000", "file" : "ota_data_initial.bin", "encrypted" : "false" },
    "extra_esptool_args" : {
        "after"  : "hard_reset",
        "before" : "default_reset",
        "stub"   : true,
        "chip"   : "esp32c3"
    }
}
""")
    (project / "sdkconfig").write_text('CONFIG_IDF_TARGET="esp32c3"\nCONFIG_PARTITION_TABLE_OFFSET=0xc000\n'
                                       "CONFIG_BOOTLOADER_APP_ROLLBACK_ENABLE=y\n# CONFIG_SECURE_BOOT is not set\n")
    build = read_build_dir(root)
    assert build.project_name == "led_light" and build.target == "esp32c3"
    assert build.sdkconfig == {"IDF_TARGET": "esp32c3", "PARTITION_TABLE_OFFSET": 0xC000,
                               "BOOTLOADER_APP_ROLLBACK_ENABLE": True, "SECURE_BOOT": False}
    assert build.read_partition_table() == RAINMAKER_4MB
    (root / "config").mkdir()
    (root / "config/sdkconfig.json").write_text('{"IDF_TARGET": "esp32c3", "SECURE_BOOT": false}')
    assert read_build_dir(root).sdkconfig == {"IDF_TARGET": "esp32c3", "SECURE_BOOT": False}
    with pytest.raises(FileNotFoundError, match="use its build/ folder"):
        read_build_dir(project)


# --------------------------------------------------------------------------- errors

def test_missing_pieces_are_named(build: IdfBuildDir, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="build directory not found"):
        read_build_dir(tmp_path / "nope")
    (build.path / "ota_data_initial.bin").unlink()
    with pytest.raises(FileNotFoundError, match=r'ota_data_initial\.bin: "otadata" file not found'):
        read_build_dir(build.path)
    (build.path / "flasher_args.json").write_text("{not json")
    with pytest.raises(FirmwareFormatError, match="is not JSON"):
        read_build_dir(build.path)
    (build.path / "flasher_args.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"flasher_args\.json not found"):
        read_build_dir(build.path)


def test_broken_flasher_args_and_sdkconfig(build: IdfBuildDir) -> None:
    args_file = build.path / "flasher_args.json"
    args = json.loads(args_file.read_text())
    args["app"] = {"offset": 5}
    args_file.write_text(json.dumps(args))
    with pytest.raises(FirmwareFormatError, match='"app" is'):
        read_build_dir(build.path)
    del args["app"]
    args_file.write_text(json.dumps(args))
    with pytest.raises(FirmwareFormatError, match='no "app" entry'):
        read_build_dir(build.path)


def test_sdkconfig_problems(build: IdfBuildDir) -> None:
    (build.path / "sdkconfig").write_text("CONFIG_OK=y\nthis is not kconfig\n")
    with pytest.raises(FirmwareFormatError, match="line 2"):
        read_build_dir(build.path)
    (build.path / "sdkconfig").unlink()
    (build.path / "config/sdkconfig.json").unlink()
    with pytest.raises(FileNotFoundError, match="sdkconfig not found"):
        read_build_dir(build.path)
    with pytest.raises(FirmwareFormatError, match="unterminated"):
        parse_sdkconfig('CONFIG_X="abc\n')


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"sdkconfig": {"PARTITION_TABLE_OFFSET": 0x8000}}, "contradicts"),
    ({"sdkconfig": {"IDF_TARGET": "esp32"}}, "contradicts"),
    ({"sdkconfig": {"bad name": True}}, "not a Kconfig symbol"),
    ({"target": "esp32s3"}, "not supported"),
    ({"project_name": "../evil"}, "plain file name"),
    ({"app_image": b"\0" * 0x1E0001}, "holds 0x1e0000"),
    ({"bootloader_image": b"\0" * 0xC001}, "only 0xc000 fit"),
    ({"flash_settings": FlashSettings(flash_size="2MB")}, "past the 0x200000-byte flash"),
])
def test_write_refuses_inconsistent_builds(tmp_path: Path, app: bytes, bootloader: bytes, kwargs: dict,
                                           words: str) -> None:
    args = {"path": tmp_path / "x", "project_name": "rig_app", "app_image": app, "bootloader_image": bootloader,
            "partition_table": RAINMAKER_4MB, "sdkconfig": None, **kwargs}
    with pytest.raises((ValueError, FirmwareFormatError), match=words):
        write_build_dir(**args)


def test_table_without_app_partition_is_refused(tmp_path: Path, app: bytes, bootloader: bytes) -> None:
    with pytest.raises(ValueError, match="no factory or ota_N"):
        write_build_dir(tmp_path / "x", "p", app, bootloader, PartitionTable.from_csv("nvs, data, nvs, , 0x6000"))


def test_part_tool_is_the_module_file() -> None:
    assert Path(PART_TOOL_SCRIPT).name == "partition_table.py" and Path(PART_TOOL_SCRIPT).is_file()

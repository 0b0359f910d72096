"""ESP32-C3 constants the rig needs, in one place.

Sources: esp-idf ``components/bootloader_support/include/esp_app_format.h`` (image
chip id), ``components/soc/esp32c3/include/soc/soc.h`` (memory map),
``components/efuse/esp32c3/esp_efuse_table.csv`` (SECURE_VERSION width),
``components/soc/esp32c3/include/soc/soc_caps.h`` (Secure Boot V2: RSA only, 3 key
digests); esptool ``esptool/targets/esp32c3.py``.
"""

from __future__ import annotations

from typing import ClassVar


class ChipTarget:
    """Base of a chip's constants; subclasses fill every field."""

    name: ClassVar[str]
    display_name: ClassVar[str]
    image_chip_id: ClassVar[int]
    flash_size: ClassVar[int]
    mmu_page_size: ClassVar[int]
    secure_version_bits: ClassVar[int]
    sbv2_max_signature_blocks: ClassVar[int]
    sbv2_schemes: ClassVar[tuple[str, ...]]
    bootloader_offset: ClassVar[int]
    partition_table_offset: ClassVar[int]
    drom_base: ClassVar[int]
    irom_base: ClassVar[int]
    dram_base: ClassVar[int]
    iram_base: ClassVar[int]
    features: ClassVar[frozenset[str]]


class ESP32C3(ChipTarget):
    name = "esp32c3"
    display_name = "ESP32-C3"
    image_chip_id = 0x0005          # esp_chip_id_t ESP_CHIP_ID_ESP32C3
    flash_size = 4 * 1024 * 1024     # the DevKitC-02 module (ESP32-C3-WROOM-02, 4 MB)
    mmu_page_size = 0x10000          # 64 KB flash MMU pages
    secure_version_bits = 16         # EFUSE_BLK0 SECURE_VERSION, 16 bits, thermometer coded
    sbv2_max_signature_blocks = 3    # SECURE_BOOT_DIGEST0..2
    sbv2_schemes = ("rsa3072",)      # SOC_SECURE_BOOT_V2_RSA only
    bootloader_offset = 0x0          # ESP32-C3 ROM loads the 2nd stage from flash offset 0
    partition_table_offset = 0x8000  # ESP-IDF default; RainMaker examples move it to 0xC000
    drom_base = 0x3C000000           # SOC_DROM_LOW
    irom_base = 0x42000000           # SOC_IROM_LOW
    dram_base = 0x3FC80000           # SOC_DRAM_LOW
    iram_base = 0x4037C000           # SOC_IRAM_LOW
    # What a suite may ask for with @pytest.mark.needs(...): radios and security blocks
    # of the SoC (SOC_WIFI_SUPPORTED, SOC_BT_SUPPORTED, SOC_USB_SERIAL_JTAG_SUPPORTED …).
    features = frozenset({"wifi", "ble", "usb_serial_jtag", "secure_boot_v2", "flash_encryption", "efuse"})

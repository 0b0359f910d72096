"""The virtual ESP32-C3 board. Nothing outside rig/vboard/, the CLI and the farm fixture imports it.

Suites reach a virtual board only as they reach a real one: through its RFC 2217
serial port, esptool/espefuse, and the network.
"""

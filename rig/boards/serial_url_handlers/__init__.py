"""pyserial URL handlers the rig's own tool runs use (``serial.protocol_handler_packages``).

pyserial resolves ``scheme://...`` by importing ``<package>.protocol_<scheme>`` from each
package named in ``serial.protocol_handler_packages``, first match wins (pyserial 3.5
``serial/__init__.py`` ``serial_for_url``). :func:`install` puts this package first, so
esptool's and espefuse's unmodified ``serial.serial_for_url(port)`` gets the rig's
``rfc2217://`` client (:mod:`.protocol_rfc2217`); every other scheme, and plain device
paths, still resolve to pyserial's own classes.
"""

from __future__ import annotations

import serial

PACKAGE = __name__


def install() -> None:
    """Make this package the first place pyserial looks for URL handlers (idempotent)."""
    if PACKAGE in serial.protocol_handler_packages:
        serial.protocol_handler_packages.remove(PACKAGE)
    serial.protocol_handler_packages.insert(0, PACKAGE)

"""SLIP framing of the ESP serial download protocol (RFC 1055 as esptool uses it).

Every command and response travels as ``0xC0 <escaped payload> 0xC0`` with
``0xC0 -> 0xDB 0xDC`` and ``0xDB -> 0xDB 0xDD`` inside the payload
(esptool ``loader.py`` ``ESPLoader.write`` / ``slip_reader``; esp-flasher-stub
``src/slip.c``; shared/reference/esptool-protocol.md §1).

The decoder is the chip's side of the wire, so it must never give up on bad input:
a real ROM keeps listening whatever the host sends. It follows the stub's state
machine (bytes outside a frame are ignored, an invalid escape or an oversized frame
aborts the frame) with one robustness rule from RFC 1055: an empty frame (two
``0xC0`` in a row) leaves the decoder *inside* a frame, so a stray ``0xC0`` in line
noise cannot leave it permanently out of step with the host's framing.
"""

from __future__ import annotations

from dataclasses import dataclass

END = 0xC0
"""Frame delimiter."""
ESC = 0xDB
"""Escape introducer."""
ESC_END = 0xDC
"""``ESC ESC_END`` stands for a payload ``0xC0``."""
ESC_ESC = 0xDD
"""``ESC ESC_ESC`` stands for a payload ``0xDB``."""

_END_B = bytes([END])
_ESC_B = bytes([ESC])
_ESCAPED = {ESC_END: END, ESC_ESC: ESC}
"""Second byte of an escape → the payload byte it stands for."""

DEFAULT_MAX_FRAME = 0x4000 + 16 + 8 + 64
"""Largest payload accepted: a stub FLASH_DATA block (``FLASH_WRITE_SIZE`` 0x4000,
esptool ``StubMixin``) plus its 16-byte sub-header, the 8-byte command header and
slack. Anything longer cannot be a valid command and is dropped."""


def encode(payload: bytes) -> bytes:
    """One SLIP frame carrying *payload* (escape ``0xDB`` first, then ``0xC0``)."""
    body = payload.replace(_ESC_B, bytes([ESC, ESC_ESC])).replace(_END_B, bytes([ESC, ESC_END]))
    return _END_B + body + _END_B


@dataclass
class DecoderStats:
    """What the decoder threw away; for diagnostics and tests, never for control flow."""

    noise_bytes: int = 0
    """Bytes received outside any frame (line noise, console text, a host talking to the wrong thing)."""
    bad_escapes: int = 0
    """Frames aborted because ``0xDB`` was followed by something other than DC/DD."""
    oversized: int = 0
    """Frames aborted because they grew past the maximum payload."""
    frames: int = 0
    """Complete frames delivered."""


class SlipDecoder:
    """Incremental SLIP decoder: feed it bytes as they arrive, get complete payloads back."""

    _OUT, _IN, _ESCAPING = range(3)

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self.stats = DecoderStats()
        self._state = self._OUT
        self._buf = bytearray()

    def reset(self) -> None:
        """Forget any partial frame (the UART FIFO is cleared by a chip reset)."""
        self._state = self._OUT
        self._buf.clear()

    def feed(self, data: bytes) -> list[bytes]:
        """Consume *data*; return the payloads of the frames it completed, in order."""
        frames: list[bytes] = []
        i, n = 0, len(data)
        while i < n:
            if self._state == self._OUT:
                start = data.find(_END_B, i)
                if start < 0:
                    self.stats.noise_bytes += n - i
                    return frames
                self.stats.noise_bytes += start - i
                self._state = self._IN
                self._buf.clear()
                i = start + 1
            elif self._state == self._IN:
                # Copy plain runs in one go, up to the frame's END (found once); decode the
                # escapes between them in place.
                end = data.find(_END_B, i)
                stop = n if end < 0 else end
                while self._state == self._IN and i < n:
                    esc = data.find(_ESC_B, i, stop)
                    j = stop if esc < 0 else esc
                    self._buf += data[i:j]
                    i = j
                    if len(self._buf) > self.max_frame:
                        self.stats.oversized += 1
                        self.reset()
                    elif i != esc:
                        break  # at the END, or at the end of this chunk
                    elif i + 1 < n and data[i + 1] in _ESCAPED:
                        self._buf.append(_ESCAPED[data[i + 1]])
                        i += 2
                    else:
                        self._state = self._ESCAPING  # a bad escape, or its second byte comes in the next chunk
                        i += 1
                if self._state != self._IN or i >= n:
                    continue
                i += 1  # the END
                if self._buf:
                    frames.append(bytes(self._buf))
                    self.stats.frames += 1
                    self._buf.clear()
                    self._state = self._OUT
                # An empty frame: stay inside, the 0xC0 just seen opens the next one.
            else:  # _ESCAPING
                byte = data[i]
                i += 1
                if byte in _ESCAPED:
                    self._buf.append(_ESCAPED[byte])
                    self._state = self._IN
                else:
                    self.stats.bad_escapes += 1
                    self.reset()
                    if byte == END:
                        # The 0xC0 that broke the escape may be the next frame's opener.
                        self._state = self._IN
        return frames

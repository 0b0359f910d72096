"""Errors of the provisioning wire protocol, one per side of the link.

The device side never raises anything but :class:`SecurityRefusal` /
:class:`EndpointFailure` for bad input: they are the Python form of a protocomm
handler returning an ``esp_err_t`` other than ``ESP_OK`` (esp-idf
``components/protocomm/src/common/protocomm.c``), which the HTTP transport turns into
a closed socket. The client side raises :class:`SessionError` (the handshake did not
give a session) and :class:`ProtobufDecodeError` (bytes that are not the message
they claim to be).
"""

from __future__ import annotations

from enum import IntEnum


class EspErr(IntEnum):
    """The ``esp_err_t`` values protocomm's handlers return (esp-idf ``components/esp_common/include/esp_err.h``)."""

    ESP_OK = 0
    ESP_FAIL = -1
    ESP_ERR_NO_MEM = 0x101
    ESP_ERR_INVALID_ARG = 0x102
    ESP_ERR_INVALID_STATE = 0x103
    ESP_ERR_NOT_FOUND = 0x105


class ProtocommError(Exception):
    """Base of every error in :mod:`rig.protocomm`."""


class ProtobufDecodeError(ProtocommError, ValueError):
    """Bytes that do not decode as the named protobuf message.

    ``offset`` is the byte offset in the outermost buffer where decoding stopped.
    """

    def __init__(self, message: str, offset: int, problem: str):
        self.message_name = message
        self.offset = offset
        self.problem = problem
        super().__init__(
            f"{message}: {problem} at byte {offset}. Fix: the peer sent bytes that are not a valid {message}; "
            "capture the exchange and compare it with the .proto the endpoint expects"
        )


class SecurityRefusal(ProtocommError):
    """The device's security handler refused a request (its ``esp_err_t`` was not ``ESP_OK``).

    ``esp_err`` is what the handler returns to protocomm; ``cause`` the code of the step that
    failed (security1.c / security2.c turn every handshake-step error into ``ESP_FAIL``, so a
    Command1 in the wrong state is ``esp_err=ESP_FAIL, cause=ESP_ERR_INVALID_STATE``).
    ``device_log`` is the ``(tag, text)`` of the ``ESP_LOGE`` line the ESP-IDF firmware prints at
    that point, so an emulated board can print what a real one does.
    """

    def __init__(self, esp_err: EspErr, reason: str, device_log: tuple[str, str] | None = None, cause: EspErr | None = None):
        self.esp_err = esp_err
        self.cause = cause if cause is not None else esp_err
        self.reason = reason
        self.device_log = device_log
        shown = f" ({self.cause.name})" if self.cause is not esp_err else ""
        super().__init__(f"{esp_err.name}{shown}: {reason}")


class EndpointFailure(ProtocommError):
    """A protocomm endpoint failed; the transport answers the way ESP-IDF does (HTTP: closes the socket)."""

    def __init__(self, endpoint: str, esp_err: EspErr, reason: str):
        self.endpoint = endpoint
        self.esp_err = esp_err
        self.reason = reason
        super().__init__(f"endpoint {endpoint!r} failed with {esp_err.name}: {reason}")


class SessionError(ProtocommError):
    """The client could not establish (or use) a security session.

    ``status`` is the device's ``Status`` from the response when it sent one (an
    ESP-IDF device never does for a wrong PoP: it drops the request instead), else None.
    """

    def __init__(self, problem: str, status: int | None = None, fix: str | None = None):
        self.problem = problem
        self.status = status
        self.fix = fix
        shown = f" (device status {status})" if status is not None else ""
        hint = f" Fix: {fix}" if fix else ""
        super().__init__(f"{problem}{shown}.{hint}")

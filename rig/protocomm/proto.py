"""A small proto3 codec where messages are declared as field lists, scapy-style.

Protocomm's messages (esp-idf ``components/protocomm/proto/*.proto``, ``wifi_provisioning/proto``,
esp-rainmaker's ``esp_rmaker_user_mapping.proto`` …) are declared once in
:mod:`rig.protocomm.messages` as :class:`Message` subclasses with a ``FIELDS`` tuple::

    class SessionCmd0(Message):
        FIELDS = (Bytes("client_pubkey", 1),)

Why our own codec rather than generated ``_pb2`` modules: the rig has to *send* what a
generated class refuses to build (wrong wire types, two members of one oneof, truncated
length prefixes) and to say exactly where a peer's bytes stop making sense. So:

* :meth:`Message.encode` is canonical proto3 — fields in number order, proto3 defaults
  omitted, oneof members and sub-messages emitted whenever set (even when empty), repeated
  numeric fields packed — which is byte-for-byte what ``google.protobuf``'s
  ``SerializeToString()`` produces (wire format: https://protobuf.dev/programming-guides/encoding/).
* :meth:`Message.decode` keeps unknown fields (re-emitted after the known ones, as
  google.protobuf does), merges a repeated occurrence of a singular sub-message, lets the last
  oneof member win, accepts packed and unpacked repeated scalars, and turns malformed input
  (truncated varint, a length running past the end, a wire type that does not match the
  declared field) into a :class:`ProtobufDecodeError` naming the message and the byte offset.
* Strings decode leniently (invalid UTF-8 kept through ``surrogateescape``) because the
  device side's protobuf-c does not validate UTF-8 either; re-encoding gives the same bytes.
* Fields declared ``secret=True`` (a Wi-Fi passphrase, a mapping secret) print as ``***`` in
  ``repr`` so a message can be logged without leaking them (see ``rig.evidence.redaction``).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import Any, ClassVar, Self

from rig.protocomm.errors import ProtobufDecodeError

_MAX_VARINT_BYTES = 10
_MAX_GROUP_DEPTH = 64
_U64 = (1 << 64) - 1


class WireType(IntEnum):
    """Protobuf wire types (https://protobuf.dev/programming-guides/encoding/#structure)."""

    VARINT = 0
    I64 = 1
    LEN = 2
    SGROUP = 3
    EGROUP = 4
    I32 = 5


class Kind(Enum):
    """Scalar kinds the provisioning protos use, with their wire type and value range."""

    INT32 = ("int32", WireType.VARINT, -(1 << 31), (1 << 31) - 1)
    INT64 = ("int64", WireType.VARINT, -(1 << 63), (1 << 63) - 1)
    UINT32 = ("uint32", WireType.VARINT, 0, (1 << 32) - 1)
    UINT64 = ("uint64", WireType.VARINT, 0, _U64)
    BOOL = ("bool", WireType.VARINT, 0, 1)
    ENUM = ("enum", WireType.VARINT, -(1 << 31), (1 << 31) - 1)
    BYTES = ("bytes", WireType.LEN, None, None)
    STRING = ("string", WireType.LEN, None, None)
    MESSAGE = ("message", WireType.LEN, None, None)

    def __init__(self, proto_name: str, wire_type: WireType, low: int | None, high: int | None):
        self.proto_name = proto_name
        self.wire_type = wire_type
        self.low = low
        self.high = high

    @property
    def numeric(self) -> bool:
        return self.wire_type is WireType.VARINT


@dataclass(frozen=True)
class Field:
    """One declared field: its name, number and kind (plus enum / message type, repeated, oneof)."""

    name: str
    number: int
    kind: Kind
    enum: type[IntEnum] | None = None
    message: type[Message] | None = None
    repeated: bool = False
    oneof: str | None = None
    secret: bool = False

    def default(self) -> Any:
        """The proto3 default a reader sees when the field is absent."""
        if self.kind is Kind.MESSAGE:
            return None
        if self.kind is Kind.BYTES:
            return b""
        if self.kind is Kind.STRING:
            return ""
        if self.kind is Kind.BOOL:
            return False
        if self.kind is Kind.ENUM and self.enum is not None:
            return _enum_value(self.enum, 0)
        return 0


# --- declaration helpers: the field-list vocabulary, CamelCase like scapy's field classes ----------------


def Int32(name: str, number: int, **kw: Any) -> Field:
    return Field(name, number, Kind.INT32, **kw)


def Int64(name: str, number: int, **kw: Any) -> Field:
    return Field(name, number, Kind.INT64, **kw)


def UInt32(name: str, number: int, **kw: Any) -> Field:
    return Field(name, number, Kind.UINT32, **kw)


def UInt64(name: str, number: int, **kw: Any) -> Field:
    return Field(name, number, Kind.UINT64, **kw)


def Bool(name: str, number: int, **kw: Any) -> Field:
    return Field(name, number, Kind.BOOL, **kw)


def Enum_(name: str, number: int, enum: type[IntEnum], **kw: Any) -> Field:
    return Field(name, number, Kind.ENUM, enum=enum, **kw)


def Bytes(name: str, number: int, **kw: Any) -> Field:
    return Field(name, number, Kind.BYTES, **kw)


def String(name: str, number: int, **kw: Any) -> Field:
    return Field(name, number, Kind.STRING, **kw)


def Msg(name: str, number: int, message: type[Message], **kw: Any) -> Field:
    return Field(name, number, Kind.MESSAGE, message=message, **kw)


def Repeated(field: Field) -> Field:
    return Field(field.name, field.number, field.kind, field.enum, field.message, True, field.oneof, field.secret)


def Oneof(name: str, *members: Field) -> tuple[Field, ...]:
    """Members of ``oneof <name> { ... }``; splice into ``FIELDS`` with ``*Oneof(...)``."""
    return tuple(Field(m.name, m.number, m.kind, m.enum, m.message, False, name, m.secret) for m in members)


# --- wire primitives --------------------------------------------------------------------------------


def encode_varint(value: int) -> bytes:
    """Base-128 varint of *value*; negative numbers as their 64-bit two's complement (10 bytes)."""
    value &= _U64
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_tag(number: int, wire_type: int) -> bytes:
    return encode_varint((number << 3) | wire_type)


def raw_field(number: int, value: int | bytes, wire_type: int | None = None) -> bytes:
    """One field's bytes built by hand: an int becomes a varint field, bytes a length-delimited one.

    For adversarial suites: ``raw_field(20, b"") + raw_field(22, b"")`` is a Sec1Payload with two
    oneof members, ``raw_field(2, 5, wire_type=2)`` a field with a wire type its message does not declare.
    """
    if isinstance(value, int):
        return encode_tag(number, WireType.VARINT if wire_type is None else wire_type) + encode_varint(value)
    payload = bytes(value)
    return encode_tag(number, WireType.LEN if wire_type is None else wire_type) + encode_varint(len(payload)) + payload


def _read_varint(buf: bytes, pos: int, end: int, what: str) -> tuple[int, int]:
    start = pos
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise ProtobufDecodeError(what, start, "truncated varint")
        if pos - start >= _MAX_VARINT_BYTES:
            raise ProtobufDecodeError(what, start, f"varint longer than {_MAX_VARINT_BYTES} bytes")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if result > _U64:
                raise ProtobufDecodeError(what, start, "varint does not fit in 64 bits")
            return result, pos
        shift += 7


def _read_length(buf: bytes, pos: int, end: int, what: str, field_start: int) -> tuple[int, int]:
    length, pos = _read_varint(buf, pos, end, what)
    if length > end - pos:
        raise ProtobufDecodeError(what, field_start, f"length {length} runs past the end ({end - pos} bytes left)")
    return length, pos


def _skip_field(buf: bytes, pos: int, end: int, wire_type: int, number: int, what: str, field_start: int, depth: int = 0) -> int:
    """Position after an unknown field's value (groups skipped recursively)."""
    if wire_type == WireType.VARINT:
        return _read_varint(buf, pos, end, what)[1]
    if wire_type == WireType.I64:
        if end - pos < 8:
            raise ProtobufDecodeError(what, field_start, "truncated 64-bit field")
        return pos + 8
    if wire_type == WireType.I32:
        if end - pos < 4:
            raise ProtobufDecodeError(what, field_start, "truncated 32-bit field")
        return pos + 4
    if wire_type == WireType.LEN:
        length, pos = _read_length(buf, pos, end, what, field_start)
        return pos + length
    if wire_type == WireType.SGROUP:
        if depth >= _MAX_GROUP_DEPTH:
            raise ProtobufDecodeError(what, field_start, "groups nested too deeply")
        while True:
            inner_start = pos
            tag, pos = _read_varint(buf, pos, end, what)
            if tag & 7 == WireType.EGROUP:
                if tag >> 3 != number:
                    raise ProtobufDecodeError(what, inner_start, f"end-group for field {tag >> 3} closes group {number}")
                return pos
            pos = _skip_field(buf, pos, end, tag & 7, tag >> 3, what, inner_start, depth + 1)
    if wire_type == WireType.EGROUP:
        raise ProtobufDecodeError(what, field_start, f"end-group for field {number} without a start-group")
    raise ProtobufDecodeError(what, field_start, f"invalid wire type {wire_type}")


def _enum_value(enum: type[IntEnum], value: int) -> int:
    """proto3 enums are open: a number the enum does not name stays a plain int."""
    try:
        return enum(value)
    except ValueError:
        return value


def _signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _scalar_from_varint(field: Field, raw: int) -> Any:
    kind = field.kind
    if kind is Kind.BOOL:
        return raw != 0
    if kind is Kind.UINT32:
        return raw & 0xFFFFFFFF
    if kind is Kind.UINT64:
        return raw
    if kind is Kind.INT64:
        return _signed(raw, 64)
    value = _signed(raw, 32)  # int32 and enum read the low 32 bits of the varint
    if kind is Kind.ENUM and field.enum is not None:
        return _enum_value(field.enum, value)
    return value


def _check_value(cls_name: str, field: Field, value: Any) -> Any:
    """The stored form of *value* for *field*, or a ValueError/TypeError naming the field."""
    where = f"{cls_name}.{field.name} ({field.kind.proto_name})"
    kind = field.kind
    if kind is Kind.MESSAGE:
        if not isinstance(value, field.message):  # type: ignore[arg-type]
            raise TypeError(f"{where} takes a {field.message.__name__ if field.message else '?'}, not {type(value).__name__}")
        return value
    if kind is Kind.BYTES:
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"{where} takes bytes, not {type(value).__name__}")
        return bytes(value)
    if kind is Kind.STRING:
        if not isinstance(value, str):
            raise TypeError(f"{where} takes str, not {type(value).__name__}")
        return value
    if kind is Kind.BOOL:
        if not isinstance(value, bool) and value not in (0, 1):
            raise TypeError(f"{where} takes a bool, not {value!r}")
        return bool(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{where} takes an int, not {type(value).__name__}")
    if not kind.low <= value <= kind.high:  # type: ignore[operator]
        raise ValueError(f"{where} value {value} is outside [{kind.low}, {kind.high}]")
    if kind is Kind.ENUM and field.enum is not None:
        return _enum_value(field.enum, int(value))
    return value


def _encode_scalar(field: Field, value: Any) -> bytes:
    """The value part (no tag) of one scalar."""
    kind = field.kind
    if kind is Kind.BYTES:
        return encode_varint(len(value)) + value
    if kind is Kind.STRING:
        raw = value.encode("utf-8", "surrogateescape")
        return encode_varint(len(raw)) + raw
    if kind is Kind.MESSAGE:
        raw = value.encode()
        return encode_varint(len(raw)) + raw
    return encode_varint(int(value))


# --- messages ---------------------------------------------------------------------------------------


class Message:
    """Base of a declared proto3 message. Subclasses set ``FIELDS`` (and cite their .proto in the docstring).

    Fields are attributes: unset scalars read as their proto3 default, unset sub-messages as
    None, repeated fields as a list you may append to. Assigning one member of a oneof clears
    the others. Equality is equality of the canonical encoding (as in proto3, "unset" and
    "set to the default" are the same message).
    """

    FIELDS: ClassVar[tuple[Field, ...]] = ()
    _by_name: ClassVar[dict[str, Field]]
    _by_number: ClassVar[dict[int, Field]]
    _order: ClassVar[tuple[Field, ...]]
    _oneofs: ClassVar[dict[str, tuple[str, ...]]]

    __slots__ = ("_unknown", "_values")

    def __init_subclass__(cls, **kwargs: Any):
        super().__init_subclass__(**kwargs)
        by_name: dict[str, Field] = {}
        by_number: dict[int, Field] = {}
        oneofs: dict[str, list[str]] = {}
        for f in cls.FIELDS:
            if f.name in by_name or f.number in by_number:
                raise ValueError(f"{cls.__name__}: field {f.name!r} / number {f.number} declared twice")
            if not 1 <= f.number < (1 << 29) or 19000 <= f.number <= 19999:
                raise ValueError(f"{cls.__name__}.{f.name}: field number {f.number} is not allowed in protobuf")
            if f.kind is Kind.MESSAGE and f.message is None:
                raise ValueError(f"{cls.__name__}.{f.name}: a message field needs its message type")
            by_name[f.name] = f
            by_number[f.number] = f
            if f.oneof:
                oneofs.setdefault(f.oneof, []).append(f.name)
        cls._by_name = by_name
        cls._by_number = by_number
        cls._order = tuple(sorted(cls.FIELDS, key=lambda f: f.number))
        cls._oneofs = {k: tuple(v) for k, v in oneofs.items()}

    def __init__(self, **values: Any):
        object.__setattr__(self, "_values", {})
        object.__setattr__(self, "_unknown", b"")
        for oneof, members in self._oneofs.items():
            given = [m for m in members if values.get(m) is not None]
            if len(given) > 1:
                raise ValueError(f"{type(self).__name__}: oneof {oneof!r} takes one member, got {', '.join(given)}")
        for name, value in values.items():
            setattr(self, name, value)

    # attribute access ---------------------------------------------------------------------------
    def __getattr__(self, name: str) -> Any:
        field = type(self)._by_name.get(name) if not name.startswith("_") else None
        if field is None:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}")
        values = self._values
        if name in values:
            return values[name]
        if field.repeated:
            values[name] = []
            return values[name]
        return field.default()

    def __setattr__(self, name: str, value: Any) -> None:
        field = type(self)._by_name.get(name)
        if field is None:
            raise AttributeError(f"{type(self).__name__} has no field {name!r}; its fields are {', '.join(self._by_name)}")
        if value is None:
            self._values.pop(name, None)
            return
        if field.repeated:
            if isinstance(value, str | bytes) or not isinstance(value, Iterable):
                raise TypeError(f"{type(self).__name__}.{name} is repeated; assign a list")
            value = [_check_value(type(self).__name__, field, v) for v in value]
        else:
            value = _check_value(type(self).__name__, field, value)
        self._store(field, value)

    def _store(self, field: Field, value: Any) -> None:
        if field.oneof:
            for other in self._oneofs[field.oneof]:
                if other != field.name:
                    self._values.pop(other, None)
        self._values[field.name] = value

    def has(self, name: str) -> bool:
        """Whether *name* would be on the wire (set oneof member / sub-message, non-default scalar, non-empty list)."""
        field = self._by_name[name]
        if name not in self._values:
            return False
        value = self._values[name]
        if field.repeated:
            return bool(value)
        if field.oneof or field.kind is Kind.MESSAGE:
            return True
        return value != field.default()

    def which(self, oneof: str) -> str | None:
        """The name of the member of *oneof* that is set, or None."""
        for member in self._oneofs[oneof]:
            if member in self._values:
                return member
        return None

    @property
    def unknown_fields(self) -> bytes:
        """Raw bytes of fields this declaration does not know, in the order they arrived."""
        return self._unknown

    # wire format --------------------------------------------------------------------------------
    def encode(self) -> bytes:
        """Canonical proto3 bytes (== google.protobuf ``SerializeToString()``)."""
        out = bytearray()
        for field in self._order:
            if field.name not in self._values:
                continue
            value = self._values[field.name]
            if field.repeated:
                if not value:
                    continue
                items = [_check_value(type(self).__name__, field, v) for v in value]
                if field.kind.numeric:
                    packed = b"".join(encode_varint(int(v)) for v in items)
                    out += encode_tag(field.number, WireType.LEN) + encode_varint(len(packed)) + packed
                else:
                    for item in items:
                        out += encode_tag(field.number, field.kind.wire_type) + _encode_scalar(field, item)
                continue
            if not field.oneof and field.kind is not Kind.MESSAGE and value == field.default():
                continue
            out += encode_tag(field.number, field.kind.wire_type) + _encode_scalar(field, value)
        out += self._unknown
        return bytes(out)

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Self:
        """Parse *data*; malformed bytes raise :class:`ProtobufDecodeError` with the offset."""
        buf = bytes(data)
        message = cls()
        message._merge(buf, 0, len(buf))
        return message

    def _merge(self, buf: bytes, pos: int, end: int) -> None:
        what = type(self).__name__
        unknown = bytearray(self._unknown)
        while pos < end:
            field_start = pos
            tag, pos = _read_varint(buf, pos, end, what)
            number, wire_type = tag >> 3, tag & 7
            if number == 0:
                raise ProtobufDecodeError(what, field_start, "field number 0 is not valid")
            field = self._by_number.get(number)
            if field is None:
                pos = _skip_field(buf, pos, end, wire_type, number, what, field_start)
                unknown += buf[field_start:pos]
                continue
            if field.repeated and field.kind.numeric and wire_type == WireType.LEN:
                length, pos = _read_length(buf, pos, end, what, field_start)
                stop = pos + length
                items = self.__getattr__(field.name)
                while pos < stop:
                    raw, pos = _read_varint(buf, pos, stop, f"{what}.{field.name}")
                    items.append(_scalar_from_varint(field, raw))
                continue
            if wire_type != field.kind.wire_type:
                raise ProtobufDecodeError(
                    what, field_start, f"field {field.name} (#{number}, {field.kind.proto_name}) arrived with wire type {wire_type}"
                )
            value: Any
            if field.kind.numeric:
                raw, pos = _read_varint(buf, pos, end, what)
                value = _scalar_from_varint(field, raw)
            else:
                length, pos = _read_length(buf, pos, end, what, field_start)
                chunk_end = pos + length
                if field.kind is Kind.MESSAGE:
                    existing = None if field.repeated else self._values.get(field.name)
                    value = existing if existing is not None else field.message()  # type: ignore[misc]
                    value._merge(buf, pos, chunk_end)
                elif field.kind is Kind.STRING:
                    value = buf[pos:chunk_end].decode("utf-8", "surrogateescape")
                else:
                    value = buf[pos:chunk_end]
                pos = chunk_end
            if field.repeated:
                self.__getattr__(field.name).append(value)
            else:
                self._store(field, value)
        object.__setattr__(self, "_unknown", bytes(unknown))

    # python conveniences ------------------------------------------------------------------------
    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and other.encode() == self.encode()  # type: ignore[attr-defined]

    __hash__ = None  # type: ignore[assignment]  # mutable, like google.protobuf messages

    def __repr__(self) -> str:
        parts = []
        for field in self._order:
            if not self.has(field.name):
                continue
            value = self._values[field.name]
            shown = "***" if field.secret else repr(value)
            parts.append(f"{field.name}={shown}")
        if self._unknown:
            parts.append(f"<{len(self._unknown)} unknown bytes>")
        return f"{type(self).__name__}({', '.join(parts)})"

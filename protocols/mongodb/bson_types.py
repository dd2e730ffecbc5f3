"""The BSON values Python has no type for, as small frozen types, and the
BSON type name of any decoded value (what an audit shows instead of it).

Spec: bsonspec.org "BSON Specification Version 1.1"; Decimal128's string
form from mongodb/specifications ``source/bson-decimal128/decimal128.md``
(IEEE 754-2008 decimal128, BID encoding, "to-scientific-string").
See :mod:`protocols.mongodb.bson` for which BSON type becomes which value.
"""

from __future__ import annotations

import decimal
import enum
import struct
from collections.abc import Mapping
from typing import Any, Final

import attrs

from protocols.errors import ErrorCode, LocalProtocolError

__all__ = [
    "Int64", "Binary", "ObjectId", "DateTime", "Regex", "DBPointer", "Code", "Symbol",
    "CodeWithScope", "Timestamp", "Decimal128", "Constant", "UNDEFINED", "MIN_KEY", "MAX_KEY",
    "type_name", "is_int32", "is_int64",
]


# Comparisons, not ``in range(...)``: for an int subclass (an IntEnum, say)
# range's membership test falls back to iterating the whole range.
def is_int32(value: int) -> bool:
    return -(2**31) <= value < 2**31


def is_int64(value: int) -> bool:
    return -(2**63) <= value < 2**63


def _int64(_instance: object, _attr: object, value: int) -> None:
    if not is_int64(value):
        raise ValueError(f"{value} does not fit an int64")


# --- the types Python lacks ---------------------------------------------------------


class Int64(int):
    """An int that encodes as BSON int64 even when it would fit an int32."""

    __slots__ = ()

    def __repr__(self) -> str:
        return f"Int64({int(self)})"


def _bytes_of(value: object) -> bytes:
    return bytes(value)  # type: ignore[call-overload]


@attrs.frozen
class Binary:
    """Binary data of a subtype other than 0 (generic binary is plain bytes).
    For the old binary subtype 2, ``data`` is the payload inside its own
    length prefix."""

    subtype: int = attrs.field(validator=attrs.validators.and_(
        attrs.validators.instance_of(int), attrs.validators.in_(range(256))))
    data: bytes = attrs.field(converter=_bytes_of)


@attrs.frozen
class ObjectId:
    """A 12-byte ObjectId."""

    binary: bytes = attrs.field(converter=_bytes_of)

    @binary.validator
    def _twelve(self, _attr: object, value: bytes) -> None:
        if len(value) != 12:
            raise ValueError("an ObjectId is 12 bytes")

    def __str__(self) -> str:
        return self.binary.hex()


@attrs.frozen
class DateTime:
    """UTC milliseconds since the Unix epoch (any int64: beyond Python's datetime)."""

    millis: int = attrs.field(validator=_int64)


@attrs.frozen
class Regex:
    """A regular expression and its option letters (canonically sorted)."""

    pattern: str
    flags: str = ""


@attrs.frozen
class DBPointer:
    """The deprecated DBPointer: a namespace and an ObjectId."""

    namespace: str
    id: ObjectId


@attrs.frozen
class Code:
    """JavaScript code."""

    code: str


@attrs.frozen
class Symbol:
    """The deprecated symbol type: a string that is not a str."""

    name: str


@attrs.frozen
class CodeWithScope:
    """JavaScript code with its scope document."""

    code: str
    scope: Mapping[str, Any] = attrs.field(hash=False)


@attrs.frozen
class Timestamp:
    """The internal replication timestamp: seconds and an ordinal."""

    time: int = attrs.field(validator=attrs.validators.in_(range(2**32)))
    increment: int = attrs.field(validator=attrs.validators.in_(range(2**32)))


_DEC_BIAS: Final = 6176
_DEC_MAX_COEFFICIENT: Final = 10**34 - 1


@attrs.frozen
class Decimal128:
    """An IEEE 754-2008 decimal128 (BID encoding), kept as its 16 raw bytes
    (little-endian, as on the wire). ``str()`` follows the spec's string rules."""

    raw: bytes = attrs.field(converter=_bytes_of)

    @raw.validator
    def _sixteen(self, _attr: object, value: bytes) -> None:
        if len(value) != 16:
            raise ValueError("a Decimal128 is 16 bytes")

    def __str__(self) -> str:
        # decimal128.md, "To String Representation": NaN has no sign; a
        # combination field of 11 (other than NaN/Infinity) puts the
        # coefficient over 10**34 - 1, which is non-canonical and reads as 0.
        low, high = struct.unpack("<QQ", self.raw)
        sign = high >> 63
        if (high >> 58) & 0x1F == 0x1F:
            return "NaN"
        if (high >> 58) & 0x1F == 0x1E:
            return "-Infinity" if sign else "Infinity"
        if (high >> 61) & 0x3 == 0x3:
            exponent = (high >> 47) & 0x3FFF
            coefficient = 0
        else:
            exponent = (high >> 49) & 0x3FFF
            coefficient = ((high & 0x1FFFFFFFFFFFF) << 64) | low
            if coefficient > _DEC_MAX_COEFFICIENT:
                coefficient = 0
        digits = tuple(int(d) for d in str(coefficient))
        # Python's decimal prints the same to-scientific-string the spec asks for.
        return str(decimal.Decimal((sign, digits, exponent - _DEC_BIAS)))


class Constant(enum.Enum):
    """The BSON values that are only a type."""

    UNDEFINED = 0x06
    MIN_KEY = 0xFF
    MAX_KEY = 0x7F

    def __repr__(self) -> str:
        return self.name


UNDEFINED: Final = Constant.UNDEFINED
MIN_KEY: Final = Constant.MIN_KEY
MAX_KEY: Final = Constant.MAX_KEY


# --- type names, for shapes ----------------------------------------------------------

_NAMES: Final[dict[type, str]] = {
    float: "double", str: "string", dict: "document", list: "array", bytes: "binary",
    Binary: "binary", ObjectId: "objectId", bool: "bool", DateTime: "datetime",
    type(None): "null", Regex: "regex", DBPointer: "dbPointer", Code: "code", Symbol: "symbol",
    CodeWithScope: "codeWithScope", int: "int32", Timestamp: "timestamp", Int64: "int64",
    Decimal128: "decimal128",
}
_CONSTANT_NAMES: Final = {UNDEFINED: "undefined", MIN_KEY: "minKey", MAX_KEY: "maxKey"}


def type_name(value: Any) -> str:
    """The BSON type name of a decoded value ("int32", "string", "objectId",
    ...): what an audit shows in place of the value."""
    if isinstance(value, Constant):
        return _CONSTANT_NAMES[value]
    name = _NAMES.get(type(value))
    if name is None:
        if isinstance(value, int):
            return "int32" if is_int32(value) else "int64"
        raise LocalProtocolError(f"no BSON type for {type(value).__name__}",
                                 code=ErrorCode.BAD_REQUEST)
    if name == "int32" and not is_int32(value):
        return "int64"
    return name

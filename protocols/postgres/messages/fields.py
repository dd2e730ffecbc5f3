"""The field codec every PostgreSQL message module shares.

Spec: PostgreSQL docs, "Frontend/Backend Protocol", "Message Data Types".
Strings are NUL-terminated (``String``); fixed integers are big-endian and
signed unless the spec says otherwise. Here are the reader for a received
body (running off its end is a protocol error, 08P01), the writers, the
validators the message classes run when they are built (a bad message
cannot be built: :class:`LocalProtocolError`), and :class:`Typed`, the
base of every message with a type byte.

Text is UTF-8: the gateway only ever answers before the client's
``client_encoding`` takes effect, and identifiers that reach RBAC must be
text. Error messages never echo peer bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final, NoReturn

import attrs

from protocols.errors import ErrorCode, LocalProtocolError
from protocols.postgres.messages.framing import frame
from protocols.postgres.messages.sqlstate import protocol_violation

I16: Final = struct.Struct(">h")
U16: Final = struct.Struct(">H")
I32: Final = struct.Struct(">i")
U32: Final = struct.Struct(">I")
II: Final = struct.Struct(">II")

__all__ = [
    "I16", "U16", "I32", "U32", "II", "malformed", "invalid", "Reader", "utf8", "cstr",
    "check_str", "check_bytes", "int_range", "int_tuple", "str_tuple", "freeze_str_map",
    "map_field", "INT16", "INT32", "UINT32", "FORMATS", "frozen", "Typed", "decode_body",
]


def malformed(message: str) -> NoReturn:
    raise protocol_violation(message)


def invalid(message: str) -> NoReturn:
    raise LocalProtocolError(message, code=ErrorCode.BAD_REQUEST)


# --- reading fields -------------------------------------------------------------


class Reader:
    """Reads a body front to back; running off its end is a protocol error."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            malformed(f"{self._what} is truncated")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def int16(self) -> int:
        return int(I16.unpack(self._take(2))[0])

    def uint16(self) -> int:
        return int(U16.unpack(self._take(2))[0])

    def int32(self) -> int:
        return int(I32.unpack(self._take(4))[0])

    def uint32(self) -> int:
        return int(U32.unpack(self._take(4))[0])

    def byte(self) -> int:
        return self._take(1)[0]

    def raw(self, n: int) -> bytes:
        return self._take(n)

    def rest(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    def cstring(self) -> bytes:
        end = self._data.find(b"\x00", self._pos)
        if end < 0:
            malformed(f"{self._what} has a string without its NUL terminator")
        out = self._data[self._pos : end]
        self._pos = end + 1
        return out

    def text(self) -> str:
        return utf8(self.cstring(), self._what)

    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def end(self) -> None:
        if self._pos != len(self._data):
            malformed(f"{self._what} has {len(self._data) - self._pos} unexpected trailing bytes")


def utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        malformed(f"{what} has text that is not valid UTF-8")


def cstr(value: str) -> bytes:
    return value.encode("utf-8") + b"\x00"


# --- validators ---------------------------------------------------------------


def check_str(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        invalid(f"{attr.name} must be a str, not {type(value).__name__}")
    if "\x00" in value:
        invalid(f"{attr.name} may not contain NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        invalid(f"{attr.name} is not valid Unicode text")


def check_bytes(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bytes):
        invalid(f"{attr.name} must be bytes, not {type(value).__name__}")


def int_range(lo: int, hi: int) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            invalid(f"{attr.name} must be an integer in {lo}..{hi}")
    return check


def int_tuple(lo: int, hi: int, max_len: int) -> Callable[[object], tuple[int, ...]]:
    def convert(value: object) -> tuple[int, ...]:
        if not isinstance(value, (tuple, list)):
            invalid(f"expected a sequence of integers, not {type(value).__name__}")
        if len(value) > max_len:
            invalid(f"at most {max_len} entries allowed, not {len(value)}")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or not lo <= item <= hi:
                invalid(f"entries must be integers in {lo}..{hi}")
        return tuple(value)
    return convert


def str_tuple(value: object) -> tuple[str, ...]:
    if not isinstance(value, (tuple, list)):
        invalid(f"expected a sequence of strings, not {type(value).__name__}")
    for item in value:
        if not isinstance(item, str) or not item or "\x00" in item:
            invalid("entries must be non-empty strings without NUL")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            invalid("entries must be valid Unicode text")
    return tuple(value)


def freeze_str_map(value: object) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        invalid(f"expected a mapping of str to str, not {type(value).__name__}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key or "\x00" in key:
            invalid("keys must be non-empty strings without NUL")
        if not isinstance(item, str) or "\x00" in item:
            invalid(f"the value of {key!r} must be a string without NUL")
        try:
            key.encode("utf-8")
            item.encode("utf-8")
        except UnicodeEncodeError:
            invalid(f"{key!r} is not valid Unicode text")
        out[key] = item
    return MappingProxyType(out)


def map_field(**kwargs: Any) -> Any:
    return attrs.field(converter=freeze_str_map, hash=False,
                       repr=lambda m: repr(dict(m)), **kwargs)


INT16 = int_range(-(1 << 15), (1 << 15) - 1)
INT32 = int_range(-(1 << 31), (1 << 31) - 1)
UINT32 = int_range(0, (1 << 32) - 1)
FORMATS = int_tuple(0, 1, 0xFFFF)  # format codes: 0 text, 1 binary
frozen = attrs.frozen(kw_only=True)


# --- typed messages -------------------------------------------------------------


class Typed:
    """Shared by typed messages: ``encode()`` frames ``_body()``."""

    type_code: ClassVar[bytes]

    def _body(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        return frame(self.type_code, self._body())


def decode_body(what: str, decode: Callable[[Reader], Any], body: bytes) -> Any:
    """``decode`` run over the whole of ``body``: its own validation errors and
    leftover bytes both become 08P01, naming ``what``."""
    reader = Reader(body, what)
    try:
        message = decode(reader)
    except LocalProtocolError as exc:  # the classes' own validation
        malformed(f"malformed {what}: {exc.message}")
    reader.end()
    return message

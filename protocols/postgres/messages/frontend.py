"""Frontend messages: what a PostgreSQL client says after the startup packet.

Spec: PostgreSQL docs, "Frontend/Backend Protocol", "Message Formats":
PasswordMessage and the SASL responses (all type 'p'), Query, the extended
query messages (Parse, Bind, Execute, Describe, Close, Sync, Flush), COPY's
CopyData/CopyDone/CopyFail, FunctionCall and Terminate. One frozen class per
message, with ``encode()``; :func:`decode_frontend` turns a received body
into one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Final, Union

import attrs

from protocols.postgres.messages.fields import (
    FORMATS, I16, I32, INT32, U16, U32, UINT32, Reader, Typed, check_bytes, check_str, cstr,
    decode_body, frozen, int_range, int_tuple, invalid, malformed,
)

__all__ = [
    "PasswordMessage", "SASLInitialResponse", "SASLResponse", "Query", "Parse", "Bind",
    "Execute", "Describe", "Close", "Sync", "Flush", "CopyData", "CopyDone", "CopyFail",
    "FunctionCall", "Terminate", "FrontendMessage", "FRONTEND_TYPES", "decode_frontend",
]


@frozen
class PasswordMessage(Typed):
    """Frontend: a cleartext or md5-hashed password. Never logged or shown."""

    type_code = b"p"
    password: bytes = attrs.field(validator=check_bytes, repr=False)

    def __attrs_post_init__(self) -> None:
        if b"\x00" in self.password:
            invalid("a password may not contain NUL")

    def _body(self) -> bytes:
        return self.password + b"\x00"


@frozen
class SASLInitialResponse(Typed):
    type_code = b"p"
    mechanism: str = attrs.field(validator=check_str)
    data: bytes | None = attrs.field(default=None, repr=False)

    def _body(self) -> bytes:
        if self.data is None:
            return cstr(self.mechanism) + I32.pack(-1)
        return cstr(self.mechanism) + I32.pack(len(self.data)) + self.data


@frozen
class SASLResponse(Typed):
    type_code = b"p"
    data: bytes = attrs.field(validator=check_bytes, repr=False)

    def _body(self) -> bytes:
        return self.data


@frozen
class Query(Typed):
    """Frontend: a simple query (one or more statements)."""

    type_code = b"Q"
    text: str = attrs.field(validator=check_str)

    def _body(self) -> bytes:
        return cstr(self.text)


@frozen
class Parse(Typed):
    type_code = b"P"
    statement: str = attrs.field(validator=check_str)
    text: str = attrs.field(validator=check_str)
    param_types: tuple[int, ...] = attrs.field(default=(), converter=int_tuple(0, 2**32 - 1,
                                                                                0xFFFF))

    def _body(self) -> bytes:
        return (cstr(self.statement) + cstr(self.text) + U16.pack(len(self.param_types))
                + b"".join(U32.pack(t) for t in self.param_types))


def _values(value: object) -> tuple[bytes | None, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 0xFFFF:
        invalid("values must be a sequence of at most 65535 bytes-or-None")
    for item in value:
        if item is not None and not isinstance(item, bytes):
            invalid("values must be bytes or None (NULL)")
    return tuple(value)


def _encode_values(values: tuple[bytes | None, ...]) -> bytes:
    out = bytearray(U16.pack(len(values)))
    for value in values:
        out += I32.pack(-1) if value is None else I32.pack(len(value)) + value
    return bytes(out)


def _decode_values(r: Reader) -> list[bytes | None]:
    values: list[bytes | None] = []
    for _ in range(r.uint16()):
        size = r.int32()
        if size < -1:
            malformed("a parameter has a negative length")
        values.append(None if size == -1 else r.raw(size))
    return values


@frozen
class Bind(Typed):
    """Frontend: bind parameter ``values`` to ``statement``, making ``portal``."""

    type_code = b"B"
    portal: str = attrs.field(validator=check_str)
    statement: str = attrs.field(validator=check_str)
    param_formats: tuple[int, ...] = attrs.field(default=(), converter=FORMATS)
    values: tuple[bytes | None, ...] = attrs.field(default=(), converter=_values, repr=False)
    result_formats: tuple[int, ...] = attrs.field(default=(), converter=FORMATS)

    def _body(self) -> bytes:
        return (cstr(self.portal) + cstr(self.statement)
                + U16.pack(len(self.param_formats))
                + b"".join(I16.pack(f) for f in self.param_formats)
                + _encode_values(self.values)
                + U16.pack(len(self.result_formats))
                + b"".join(I16.pack(f) for f in self.result_formats))


@frozen
class Execute(Typed):
    type_code = b"E"
    portal: str = attrs.field(default="", validator=check_str)
    max_rows: int = attrs.field(default=0, validator=INT32)  # 0: no limit

    def _body(self) -> bytes:
        return cstr(self.portal) + I32.pack(self.max_rows)


def _check_kind(_inst: object, _attr: object, value: object) -> None:
    if value not in ("S", "P"):
        invalid("kind must be 'S' (prepared statement) or 'P' (portal)")


@frozen
class Describe(Typed):
    type_code = b"D"
    kind: str = attrs.field(validator=_check_kind)
    name: str = attrs.field(default="", validator=check_str)

    def _body(self) -> bytes:
        return self.kind.encode("ascii") + cstr(self.name)


@frozen
class Close(Typed):
    type_code = b"C"
    kind: str = attrs.field(validator=_check_kind)
    name: str = attrs.field(default="", validator=check_str)

    def _body(self) -> bytes:
        return self.kind.encode("ascii") + cstr(self.name)


@frozen
class Sync(Typed):
    type_code = b"S"


@frozen
class Flush(Typed):
    type_code = b"H"


@frozen
class CopyData(Typed):
    type_code = b"d"
    data: bytes = attrs.field(validator=check_bytes, repr=lambda d: f"<{len(d)} bytes>")

    def _body(self) -> bytes:
        return self.data


@frozen
class CopyDone(Typed):
    type_code = b"c"


@frozen
class CopyFail(Typed):
    type_code = b"f"
    message: str = attrs.field(validator=check_str)

    def _body(self) -> bytes:
        return cstr(self.message)


@frozen
class FunctionCall(Typed):
    """Frontend: call function ``oid`` directly (libpq's large-object API does)."""

    type_code = b"F"
    oid: int = attrs.field(validator=UINT32)
    arg_formats: tuple[int, ...] = attrs.field(default=(), converter=FORMATS)
    args: tuple[bytes | None, ...] = attrs.field(default=(), converter=_values, repr=False)
    result_format: int = attrs.field(default=0, validator=int_range(0, 1))

    def _body(self) -> bytes:
        return (U32.pack(self.oid) + U16.pack(len(self.arg_formats))
                + b"".join(I16.pack(f) for f in self.arg_formats)
                + _encode_values(self.args) + I16.pack(self.result_format))


@frozen
class Terminate(Typed):
    type_code = b"X"


FrontendMessage = Union[
    Query, Parse, Bind, Execute, Describe, Close, Sync, Flush, CopyData, CopyDone, CopyFail,
    FunctionCall, Terminate,
]


def _formats(r: Reader) -> list[int]:
    return [r.int16() for _ in range(r.uint16())]


def _decode_bind(r: Reader) -> Bind:
    portal, statement = r.text(), r.text()
    formats = _formats(r)
    values = _decode_values(r)
    results = _formats(r)
    if len(formats) not in (0, 1, len(values)):
        malformed("Bind has a parameter format count that matches no parameter count")
    return Bind(portal=portal, statement=statement, param_formats=formats, values=values,
                result_formats=results)


def _decode_function_call(r: Reader) -> FunctionCall:
    oid = r.uint32()
    formats = _formats(r)
    args = _decode_values(r)
    return FunctionCall(oid=oid, arg_formats=formats, args=args, result_format=r.int16())


def _decode_target(cls: type[Describe] | type[Close]) -> Callable[[Reader], FrontendMessage]:
    return lambda r: cls(kind=chr(r.byte()), name=r.text())


_FRONTEND: Final[Mapping[bytes, tuple[str, Callable[[Reader], FrontendMessage]]]] = {
    b"Q": ("Query", lambda r: Query(text=r.text())),
    b"P": ("Parse", lambda r: Parse(statement=r.text(), text=r.text(),
                                    param_types=[r.uint32() for _ in range(r.uint16())])),
    b"B": ("Bind", _decode_bind),
    b"E": ("Execute", lambda r: Execute(portal=r.text(), max_rows=r.int32())),
    b"D": ("Describe", _decode_target(Describe)),
    b"C": ("Close", _decode_target(Close)),
    b"S": ("Sync", lambda r: Sync()),
    b"H": ("Flush", lambda r: Flush()),
    b"d": ("CopyData", lambda r: CopyData(data=r.rest())),
    b"c": ("CopyDone", lambda r: CopyDone()),
    b"f": ("CopyFail", lambda r: CopyFail(message=r.text())),
    b"F": ("FunctionCall", _decode_function_call),
    b"X": ("Terminate", lambda r: Terminate()),
}

#: Frontend message types valid after the startup packet (protocol 3.0). 'p'
#: is a password, SASL or GSSAPI response: which one only the authentication
#: exchange that asked for it knows, so decode_frontend() does not decode it.
FRONTEND_TYPES: Final = frozenset(_FRONTEND) | {b"p"}


def decode_frontend(type_code: bytes, body: bytes) -> FrontendMessage:
    """Decode one frontend message after startup; an unknown type is an error
    (RemoteProtocolError, 08P01), and so is 'p' (see FRONTEND_TYPES)."""
    entry = _FRONTEND.get(type_code)
    if entry is None:
        malformed(f"unexpected frontend message type {type_code!r}")
    what, decode = entry
    return decode_body(what, decode, body)

"""Backend messages: what a PostgreSQL server says.

Spec: PostgreSQL docs, "Frontend/Backend Protocol", "Message Formats" and
"Error and Notice Message Fields". One frozen class per message the gateway
or the cluster builds or reads (the authentication requests, ParameterStatus,
BackendKeyData, ReadyForQuery, ErrorResponse, NoticeResponse,
NegotiateProtocolVersion, CommandComplete, the COPY responses), with
``encode()``; :func:`decode_backend` turns a received body into one, and
:func:`error_response_for` builds the FATAL refusal a client is shown.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable, Mapping
from typing import ClassVar, Final, Self, Union

import attrs

from protocols.errors import ErrorCode
from protocols.postgres.messages.fields import (
    FORMATS, I32, II, INT32, U32, UINT32, Reader, Typed, check_bytes, check_str, cstr,
    decode_body, frozen, int_range, invalid, malformed, map_field, str_tuple,
)
from protocols.postgres.messages.sqlstate import SQLSTATE_FOR_CODE, SqlState, sqlstate_ok
from protocols.postgres.messages.startup import MAX_CANCEL_KEY, MIN_CANCEL_KEY, CancelRequest

__all__ = [
    "AuthenticationOk", "AuthenticationCleartextPassword", "AuthenticationMD5Password",
    "AuthenticationSASL", "AuthenticationSASLContinue", "AuthenticationSASLFinal",
    "AuthenticationOther", "ParameterStatus", "BackendKeyData", "ReadyForQuery",
    "ErrorResponse", "NoticeResponse", "NegotiateProtocolVersion", "CommandComplete",
    "CopyInResponse", "CopyOutResponse", "CopyBothResponse", "BackendMessage",
    "decode_backend", "error_response_for",
]


class _Auth(Typed):
    type_code = b"R"
    auth_code: ClassVar[int]

    def _payload(self) -> bytes:
        return b""

    def _body(self) -> bytes:
        return I32.pack(self.auth_code) + self._payload()


@frozen
class AuthenticationOk(_Auth):
    auth_code = 0


@frozen
class AuthenticationCleartextPassword(_Auth):
    auth_code = 3


@frozen
class AuthenticationMD5Password(_Auth):
    auth_code = 5
    salt: bytes = attrs.field(validator=check_bytes)

    def __attrs_post_init__(self) -> None:
        if len(self.salt) != 4:
            invalid("an MD5 salt is 4 bytes")

    def _payload(self) -> bytes:
        return self.salt


@frozen
class AuthenticationSASL(_Auth):
    auth_code = 10
    mechanisms: tuple[str, ...] = attrs.field(converter=str_tuple)

    def _payload(self) -> bytes:
        return b"".join(cstr(m) for m in self.mechanisms) + b"\x00"


@frozen
class AuthenticationSASLContinue(_Auth):
    auth_code = 11
    data: bytes = attrs.field(validator=check_bytes)

    def _payload(self) -> bytes:
        return self.data


@frozen
class AuthenticationSASLFinal(_Auth):
    auth_code = 12
    data: bytes = attrs.field(validator=check_bytes)

    def _payload(self) -> bytes:
        return self.data


@frozen
class AuthenticationOther(_Auth):
    """An authentication request Wicket does not perform (Kerberos, GSSAPI,
    SSPI, ...): kept by code so the refusal can name it."""

    auth_code = -1  # placeholder: the real code is the `code` field
    code: int = attrs.field(validator=INT32)
    data: bytes = attrs.field(default=b"", validator=check_bytes)

    def _body(self) -> bytes:
        return I32.pack(self.code) + self.data


@frozen
class ParameterStatus(Typed):
    type_code = b"S"
    name: str = attrs.field(validator=check_str)
    value: str = attrs.field(validator=check_str)

    def _body(self) -> bytes:
        return cstr(self.name) + cstr(self.value)


@frozen
class BackendKeyData(Typed):
    """The pid and secret a client must quote to cancel. Under protocol 3.0
    the key is exactly 4 bytes; 3.2 allows 4..256."""

    type_code = b"K"
    process_id: int = attrs.field(validator=UINT32)
    secret_key: bytes = attrs.field(validator=check_bytes, repr=False)

    def __attrs_post_init__(self) -> None:
        if not MIN_CANCEL_KEY <= len(self.secret_key) <= MAX_CANCEL_KEY:
            invalid(f"secret_key must be {MIN_CANCEL_KEY}..{MAX_CANCEL_KEY} bytes long")

    def _body(self) -> bytes:
        return U32.pack(self.process_id) + self.secret_key

    def matches(self, cancel: CancelRequest) -> bool:
        """Whether ``cancel`` quotes this pid and key (in constant time)."""
        return cancel.process_id == self.process_id and hmac.compare_digest(
            cancel.secret_key, self.secret_key
        )


def _check_status(_inst: object, _attr: object, value: object) -> None:
    if value not in ("I", "T", "E"):
        invalid("status must be 'I' (idle), 'T' (in a transaction) or 'E' (failed transaction)")


@frozen
class ReadyForQuery(Typed):
    type_code = b"Z"
    status: str = attrs.field(default="I", validator=_check_status)

    def _body(self) -> bytes:
        return self.status.encode("ascii")


_ERROR_SEVERITIES: Final = frozenset({"ERROR", "FATAL", "PANIC"})
_NOTICE_SEVERITIES: Final = frozenset({"WARNING", "NOTICE", "DEBUG", "INFO", "LOG"})


def _check_fields(_inst: object, _attr: object, value: Mapping[str, str]) -> None:
    for key in value:
        if len(key) != 1 or not key.isascii():
            invalid("field codes are single ASCII characters")


class _Fields(Typed):
    """ErrorResponse and NoticeResponse: one-letter coded fields (spec:
    "Error and Notice Message Fields"). S severity (localized), V severity
    (never localized), C SQLSTATE, M message, D detail, H hint, and more."""

    fields: Mapping[str, str]
    _severities: ClassVar[frozenset[str]]

    @classmethod
    def create(cls, *, severity: str, sqlstate: str, message: str, detail: str | None = None,
               hint: str | None = None, **more: str) -> Self:
        """Build one with the usual fields in the server's order: S V C M D H.
        ``more`` takes other one-letter codes (``P="12"`` for a position)."""
        if severity not in cls._severities:
            invalid(f"severity {severity!r} is not one of {sorted(cls._severities)}")
        if not sqlstate_ok(sqlstate):
            invalid("sqlstate must be five characters of 0-9 or A-Z")
        fields = {"S": severity, "V": severity, "C": sqlstate, "M": message}
        if detail is not None:
            fields["D"] = detail
        if hint is not None:
            fields["H"] = hint
        fields.update(more)
        return cls(fields=fields)

    @property
    def severity(self) -> str | None:
        """The non-localized severity (V), or the localized one (S) from old servers."""
        return self.fields.get("V") or self.fields.get("S")

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")

    @property
    def message(self) -> str | None:
        return self.fields.get("M")

    @property
    def detail(self) -> str | None:
        return self.fields.get("D")

    @property
    def hint(self) -> str | None:
        return self.fields.get("H")

    def _body(self) -> bytes:
        return b"".join(k.encode("ascii") + cstr(v) for k, v in self.fields.items()) + b"\x00"


@frozen
class ErrorResponse(_Fields):
    type_code = b"E"
    _severities = _ERROR_SEVERITIES
    fields: Mapping[str, str] = map_field(validator=_check_fields)


@frozen
class NoticeResponse(_Fields):
    type_code = b"N"
    _severities = _NOTICE_SEVERITIES
    fields: Mapping[str, str] = map_field(validator=_check_fields)


def error_response_for(error: Exception, *, message: str | None = None,
                       hint: str | None = None, detail: str | None = None) -> ErrorResponse:
    """The FATAL ErrorResponse that tells a client why it is being turned away.

    ``error`` is usually a :class:`~protocols.errors.ProtocolError` (a dial
    refusal, a codec error): its ``wire_hint`` is used when it is a SQLSTATE,
    else the SQLSTATE for its ``code``. Any other exception is an internal
    error, and its text is not shown (it may hold anything).
    """
    wire_hint = getattr(error, "wire_hint", None)
    code = getattr(error, "code", None)
    if isinstance(wire_hint, str) and sqlstate_ok(wire_hint):
        sqlstate = wire_hint
    elif isinstance(code, ErrorCode):
        sqlstate = SQLSTATE_FOR_CODE[code]
    else:
        sqlstate = SqlState.INTERNAL_ERROR
    if message is None:
        message = getattr(error, "message", None) if isinstance(code, ErrorCode) else None
        if not isinstance(message, str) or not message:
            message = "internal error in the Wicket gateway"
    # Never let an odd message make the refusal itself unsendable.
    message = message.replace("\x00", "").encode("utf-8", "replace").decode("utf-8")
    return ErrorResponse.create(severity="FATAL", sqlstate=sqlstate, message=message,
                                detail=detail, hint=hint)


@frozen
class NegotiateProtocolVersion(Typed):
    """Backend: "I speak at most 3.<newest_minor>, and not these _pq_ options"."""

    type_code = b"v"
    newest_minor: int = attrs.field(default=0, validator=int_range(0, 0xFFFF))
    unrecognized: tuple[str, ...] = attrs.field(default=(), converter=str_tuple)

    def _body(self) -> bytes:
        return II.pack(self.newest_minor, len(self.unrecognized)) + b"".join(
            cstr(o) for o in self.unrecognized)


@frozen
class CommandComplete(Typed):
    type_code = b"C"
    tag: str = attrs.field(validator=check_str)

    def _body(self) -> bytes:
        return cstr(self.tag)


class _CopyResponse(Typed):
    format: int
    column_formats: tuple[int, ...]

    def _body(self) -> bytes:
        return struct.pack(f">bH{len(self.column_formats)}h", self.format,
                           len(self.column_formats), *self.column_formats)


@frozen
class CopyInResponse(_CopyResponse):
    """Backend: COPY FROM STDIN started; the client now sends CopyData."""

    type_code = b"G"
    format: int = attrs.field(default=0, validator=int_range(0, 1))
    column_formats: tuple[int, ...] = attrs.field(default=(), converter=FORMATS)


@frozen
class CopyOutResponse(_CopyResponse):
    """Backend: COPY TO STDOUT started; the server now sends CopyData."""

    type_code = b"H"
    format: int = attrs.field(default=0, validator=int_range(0, 1))
    column_formats: tuple[int, ...] = attrs.field(default=(), converter=FORMATS)


@frozen
class CopyBothResponse(_CopyResponse):
    """Backend: both directions carry CopyData (streaming replication)."""

    type_code = b"W"
    format: int = attrs.field(default=0, validator=int_range(0, 1))
    column_formats: tuple[int, ...] = attrs.field(default=(), converter=FORMATS)


BackendMessage = Union[
    AuthenticationOk, AuthenticationCleartextPassword, AuthenticationMD5Password,
    AuthenticationSASL, AuthenticationSASLContinue, AuthenticationSASLFinal, AuthenticationOther,
    ParameterStatus, BackendKeyData, ReadyForQuery, ErrorResponse, NoticeResponse,
    NegotiateProtocolVersion, CommandComplete, CopyInResponse, CopyOutResponse, CopyBothResponse,
]


def _decode_auth(r: Reader) -> BackendMessage:
    code = r.int32()
    if code == 0:
        return AuthenticationOk()
    if code == 3:
        return AuthenticationCleartextPassword()
    if code == 5:
        return AuthenticationMD5Password(salt=r.raw(4))
    if code == 10:
        mechanisms = []
        while name := r.text():
            mechanisms.append(name)
        return AuthenticationSASL(mechanisms=mechanisms)
    if code == 11:
        return AuthenticationSASLContinue(data=r.rest())
    if code == 12:
        return AuthenticationSASLFinal(data=r.rest())
    return AuthenticationOther(code=code, data=r.rest())


def _decode_fields(r: Reader) -> dict[str, str]:
    fields: dict[str, str] = {}
    while code := r.byte():
        # Unknown field codes must be ignored (the spec says new ones may
        # appear), but a code byte is still one character of the fields map.
        fields[chr(code)] = r.text()
    return fields


def _decode_copy(cls: type[_CopyResponse]) -> Callable[[Reader], BackendMessage]:
    def decode(r: Reader) -> BackendMessage:
        fmt = r.byte()
        formats = [r.int16() for _ in range(r.uint16())]
        return cls(format=fmt, column_formats=formats)  # type: ignore[call-arg]
    return decode


def _decode_negotiate(r: Reader) -> BackendMessage:
    newest = r.uint32()
    count = r.uint32()
    if newest > 0xFFFF:
        malformed("NegotiateProtocolVersion names an impossible minor version")
    names = [r.text() for _ in range(min(count, 1 << 16))]
    if count > len(names) or not all(names):
        malformed("NegotiateProtocolVersion has a bad option list")
    return NegotiateProtocolVersion(newest_minor=newest, unrecognized=names)


def _decode_key(r: Reader) -> BackendMessage:
    pid = r.uint32()
    key = r.rest()
    if not MIN_CANCEL_KEY <= len(key) <= MAX_CANCEL_KEY:
        malformed("BackendKeyData has a secret key of an invalid length")
    return BackendKeyData(process_id=pid, secret_key=key)


def _decode_ready(r: Reader) -> BackendMessage:
    status = chr(r.byte())
    if status not in "ITE":
        malformed("ReadyForQuery has an unknown transaction status")
    return ReadyForQuery(status=status)


_BACKEND: Final[Mapping[bytes, tuple[str, Callable[[Reader], BackendMessage]]]] = {
    b"R": ("an Authentication message", _decode_auth),
    b"S": ("ParameterStatus", lambda r: ParameterStatus(name=r.text(), value=r.text())),
    b"K": ("BackendKeyData", _decode_key),
    b"Z": ("ReadyForQuery", _decode_ready),
    b"E": ("ErrorResponse", lambda r: ErrorResponse(fields=_decode_fields(r))),
    b"N": ("NoticeResponse", lambda r: NoticeResponse(fields=_decode_fields(r))),
    b"v": ("NegotiateProtocolVersion", _decode_negotiate),
    b"C": ("CommandComplete", lambda r: CommandComplete(tag=r.text())),
    b"G": ("CopyInResponse", _decode_copy(CopyInResponse)),
    b"H": ("CopyOutResponse", _decode_copy(CopyOutResponse)),
    b"W": ("CopyBothResponse", _decode_copy(CopyBothResponse)),
}


def decode_backend(type_code: bytes, body: bytes) -> BackendMessage | None:
    """Decode one backend message, or None for a type this module does not
    model (DataRow, RowDescription, ...: the caller passes those along)."""
    entry = _BACKEND.get(type_code)
    if entry is None:
        return None
    what, decode = entry
    return decode_body(what, decode, body)

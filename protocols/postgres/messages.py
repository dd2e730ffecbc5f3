"""PostgreSQL wire messages (protocol 3.0): framing, encoding and decoding.

Spec: the PostgreSQL documentation, chapter "Frontend/Backend Protocol":
"Message Data Types", "Message Formats", "Error and Notice Message Fields".

Layout
------
Two kinds of packet share one connection::

    untyped  := length:Int32 | code:Int32 | payload       (first packet only:
                StartupMessage, SSLRequest, GSSENCRequest, CancelRequest)
    typed    := type:Byte1 | length:Int32 | body           (everything after)

In both, ``length`` counts itself but not the type byte. Strings are
NUL-terminated (``String``); fixed integers are big-endian and signed unless
the spec says otherwise. This module holds:

* one small frozen class per message we send or read, with ``encode()``,
  validated when constructed: a bad message cannot be built
  (:class:`LocalProtocolError`), and a bad one received is a
  :class:`RemoteProtocolError` with SQLSTATE 08P01;
* :func:`decode_backend` / :func:`decode_frontend` to turn a typed message's
  body into one of those classes, and :func:`decode_startup_packet` for the
  untyped first packet;
* :class:`FrameSplitter`, a streaming splitter that keeps only the bytes a
  caller asks for and skips the rest without buffering (a 100 MiB CopyData
  costs no memory), for the audit parsers in :mod:`.audit`;
* the SQLSTATE <-> :class:`ErrorCode` vocabulary used for refusals.

Text is UTF-8: the gateway only ever answers before the client's
``client_encoding`` takes effect, and identifiers that reach RBAC must be
text. Error messages never echo peer bytes.
"""

from __future__ import annotations

import hmac
import struct
from collections.abc import Callable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final, NoReturn, Self, Union

import attrs

from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.signals import NEED_DATA, PAUSED, ConnectionClosed, Signal

__all__ = [
    # constants
    "PROTOCOL_3_0", "SSL_REQUEST_CODE", "GSSENC_REQUEST_CODE", "CANCEL_REQUEST_CODE",
    "MAX_STARTUP_PACKET", "MIN_CANCEL_KEY", "MAX_CANCEL_KEY", "MAX_MESSAGE_LENGTH",
    "SqlState", "SQLSTATE_FOR_CODE", "error_code_for_sqlstate", "protocol_violation",
    # untyped startup packets
    "SSLRequest", "GSSENCRequest", "CancelRequest", "StartupMessage", "StartupPacket",
    "decode_startup_packet", "parse_ssl_answer", "replication_requested",
    # backend messages
    "AuthenticationOk", "AuthenticationCleartextPassword", "AuthenticationMD5Password",
    "AuthenticationSASL", "AuthenticationSASLContinue", "AuthenticationSASLFinal",
    "AuthenticationOther", "ParameterStatus", "BackendKeyData", "ReadyForQuery",
    "ErrorResponse", "NoticeResponse", "NegotiateProtocolVersion", "CommandComplete",
    "CopyInResponse", "CopyOutResponse", "CopyBothResponse", "BackendMessage",
    "decode_backend", "error_response_for",
    # frontend messages
    "PasswordMessage", "SASLInitialResponse", "SASLResponse", "Query", "Parse", "Bind",
    "Execute", "Describe", "Close", "Sync", "Flush", "CopyData", "CopyDone", "CopyFail",
    "FunctionCall", "Terminate", "FrontendMessage", "FRONTEND_TYPES", "decode_frontend",
    # framing
    "HEADER", "frame", "Frame", "FrameSplitter", "KeepPolicy", "Signal", "NEED_DATA", "PAUSED",
    "ConnectionClosed",
]

PROTOCOL_3_0: Final = 3 << 16  # 196608: major 3, minor 0
SSL_REQUEST_CODE: Final = (1234 << 16) | 5679  # 80877103
GSSENC_REQUEST_CODE: Final = (1234 << 16) | 5680  # 80877104
CANCEL_REQUEST_CODE: Final = (1234 << 16) | 5678  # 80877102
_SPECIAL_MAJOR: Final = 1234
# The server's own bound on the first packet (MAX_STARTUP_PACKET_LENGTH).
MAX_STARTUP_PACKET: Final = 10000
# Protocol 3.2 (PostgreSQL 18) made the cancel key variable: 4..256 bytes.
# Under 3.0 it is exactly 4, but accepting longer ones costs nothing.
MIN_CANCEL_KEY: Final = 4
MAX_CANCEL_KEY: Final = 256
# A typed message's length field (which counts itself) may be at most this:
# the server refuses anything of 1 GiB or more.
MAX_MESSAGE_LENGTH: Final = (1 << 30) - 1

HEADER: Final = struct.Struct(">cI")  # type byte, length
_I16 = struct.Struct(">h")
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")
_U32 = struct.Struct(">I")
_II = struct.Struct(">II")


# --- SQLSTATE vocabulary ------------------------------------------------------


class SqlState:
    """The SQLSTATEs this package produces (PostgreSQL Appendix A)."""

    PROTOCOL_VIOLATION: Final = "08P01"
    CONNECTION_FAILURE: Final = "08006"
    CONNECTION_REJECTED: Final = "08004"  # sqlserver_rejected_establishment_of_sqlconnection
    FEATURE_NOT_SUPPORTED: Final = "0A000"
    INVALID_AUTHORIZATION: Final = "28000"
    INVALID_PASSWORD: Final = "28P01"
    INSUFFICIENT_PRIVILEGE: Final = "42501"
    INVALID_CATALOG_NAME: Final = "3D000"  # "database does not exist"
    TOO_MANY_CONNECTIONS: Final = "53300"
    CANNOT_CONNECT_NOW: Final = "57P03"
    INTERNAL_ERROR: Final = "XX000"


#: What the gateway answers a client with when a dial fails with a code and
#: carries no SQLSTATE of its own.
SQLSTATE_FOR_CODE: Final[Mapping[ErrorCode, str]] = MappingProxyType({
    ErrorCode.ACCESS_DENIED: SqlState.INVALID_AUTHORIZATION,
    ErrorCode.RESOURCE_NOT_FOUND: SqlState.INVALID_CATALOG_NAME,
    ErrorCode.CERT_EXPIRED: SqlState.INVALID_AUTHORIZATION,
    ErrorCode.CERT_INVALID: SqlState.INVALID_AUTHORIZATION,
    ErrorCode.CERT_REQUIRED: SqlState.INVALID_AUTHORIZATION,
    ErrorCode.USER_LOCKED: SqlState.INVALID_AUTHORIZATION,
    ErrorCode.UPSTREAM_UNREACHABLE: SqlState.CONNECTION_FAILURE,
    ErrorCode.BAD_REQUEST: SqlState.PROTOCOL_VIOLATION,
    ErrorCode.UNSUPPORTED_VERSION: SqlState.FEATURE_NOT_SUPPORTED,
    ErrorCode.RATE_LIMITED: SqlState.TOO_MANY_CONNECTIONS,
    ErrorCode.INTERNAL_ERROR: SqlState.INTERNAL_ERROR,
})

_CODE_FOR_SQLSTATE: Final[Mapping[str, ErrorCode]] = MappingProxyType({
    SqlState.INVALID_CATALOG_NAME: ErrorCode.RESOURCE_NOT_FOUND,
    SqlState.TOO_MANY_CONNECTIONS: ErrorCode.RATE_LIMITED,
    SqlState.CANNOT_CONNECT_NOW: ErrorCode.UPSTREAM_UNREACHABLE,
    SqlState.INSUFFICIENT_PRIVILEGE: ErrorCode.ACCESS_DENIED,
    SqlState.FEATURE_NOT_SUPPORTED: ErrorCode.UNSUPPORTED_VERSION,
})


def error_code_for_sqlstate(sqlstate: str | None) -> ErrorCode:
    """The :class:`ErrorCode` closest to an upstream server's SQLSTATE, so a
    cluster can turn an upstream refusal into a typed dial error."""
    if sqlstate is None:
        return ErrorCode.INTERNAL_ERROR
    if sqlstate.startswith("28"):  # class 28: invalid authorization specification
        return ErrorCode.ACCESS_DENIED
    return _CODE_FOR_SQLSTATE.get(sqlstate, ErrorCode.INTERNAL_ERROR)


def protocol_violation(message: str) -> RemoteProtocolError:
    """The error for malformed peer input: BAD_REQUEST, SQLSTATE 08P01."""
    return RemoteProtocolError(message, code=ErrorCode.BAD_REQUEST,
                               wire_hint=SqlState.PROTOCOL_VIOLATION)


def _malformed(message: str) -> NoReturn:
    raise protocol_violation(message)


def _invalid(message: str) -> NoReturn:
    raise LocalProtocolError(message, code=ErrorCode.BAD_REQUEST)


# --- reading and writing fields -----------------------------------------------


class _Reader:
    """Reads a body front to back; running off its end is a protocol error."""

    __slots__ = ("_data", "_pos", "_what")

    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            _malformed(f"{self._what} is truncated")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def int16(self) -> int:
        return int(_I16.unpack(self._take(2))[0])

    def uint16(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def int32(self) -> int:
        return int(_I32.unpack(self._take(4))[0])

    def uint32(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

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
            _malformed(f"{self._what} has a string without its NUL terminator")
        out = self._data[self._pos : end]
        self._pos = end + 1
        return out

    def text(self) -> str:
        return _utf8(self.cstring(), self._what)

    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def end(self) -> None:
        if self._pos != len(self._data):
            _malformed(f"{self._what} has {len(self._data) - self._pos} unexpected trailing bytes")


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        _malformed(f"{what} has text that is not valid UTF-8")


def _cstr(value: str) -> bytes:
    return value.encode("utf-8") + b"\x00"


def frame(type_code: bytes, body: bytes = b"") -> bytes:
    """One typed message: ``type_code`` (one byte), the length, the body."""
    return HEADER.pack(type_code, 4 + len(body)) + body


# --- validators ---------------------------------------------------------------


def _check_str(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, str):
        _invalid(f"{attr.name} must be a str, not {type(value).__name__}")
    if "\x00" in value:
        _invalid(f"{attr.name} may not contain NUL")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        _invalid(f"{attr.name} is not valid Unicode text")


def _check_bytes(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    if not isinstance(value, bytes):
        _invalid(f"{attr.name} must be bytes, not {type(value).__name__}")


def _int_range(lo: int, hi: int) -> Callable[[object, attrs.Attribute[Any], object], None]:
    def check(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            _invalid(f"{attr.name} must be an integer in {lo}..{hi}")
    return check


def _int_tuple(lo: int, hi: int, max_len: int) -> Callable[[object], tuple[int, ...]]:
    def convert(value: object) -> tuple[int, ...]:
        if not isinstance(value, (tuple, list)):
            _invalid(f"expected a sequence of integers, not {type(value).__name__}")
        if len(value) > max_len:
            _invalid(f"at most {max_len} entries allowed, not {len(value)}")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int) or not lo <= item <= hi:
                _invalid(f"entries must be integers in {lo}..{hi}")
        return tuple(value)
    return convert


def _str_tuple(value: object) -> tuple[str, ...]:
    if not isinstance(value, (tuple, list)):
        _invalid(f"expected a sequence of strings, not {type(value).__name__}")
    for item in value:
        if not isinstance(item, str) or not item or "\x00" in item:
            _invalid("entries must be non-empty strings without NUL")
        try:
            item.encode("utf-8")
        except UnicodeEncodeError:
            _invalid("entries must be valid Unicode text")
    return tuple(value)


def _freeze_str_map(value: object) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        _invalid(f"expected a mapping of str to str, not {type(value).__name__}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key or "\x00" in key:
            _invalid("keys must be non-empty strings without NUL")
        if not isinstance(item, str) or "\x00" in item:
            _invalid(f"the value of {key!r} must be a string without NUL")
        try:
            key.encode("utf-8")
            item.encode("utf-8")
        except UnicodeEncodeError:
            _invalid(f"{key!r} is not valid Unicode text")
        out[key] = item
    return MappingProxyType(out)


def _map_field(**kwargs: Any) -> Any:
    return attrs.field(converter=_freeze_str_map, hash=False,
                       repr=lambda m: repr(dict(m)), **kwargs)


_INT16 = _int_range(-(1 << 15), (1 << 15) - 1)
_INT32 = _int_range(-(1 << 31), (1 << 31) - 1)
_UINT32 = _int_range(0, (1 << 32) - 1)
_FORMATS = _int_tuple(0, 1, 0xFFFF)  # format codes: 0 text, 1 binary
_frozen = attrs.frozen(kw_only=True)


# --- untyped startup packets (frontend) ---------------------------------------


@_frozen
class SSLRequest:
    """Frontend: may I switch to TLS? The answer is one byte, S or N."""

    def encode(self) -> bytes:
        return _II.pack(8, SSL_REQUEST_CODE)


@_frozen
class GSSENCRequest:
    """Frontend: may I switch to GSSAPI encryption? Wicket always says N."""

    def encode(self) -> bytes:
        return _II.pack(8, GSSENC_REQUEST_CODE)


@_frozen
class CancelRequest:
    """Frontend, on a fresh connection: cancel what backend ``process_id`` runs."""

    process_id: int = attrs.field(validator=_UINT32)
    secret_key: bytes = attrs.field(validator=_check_bytes, repr=False)

    def __attrs_post_init__(self) -> None:
        if not MIN_CANCEL_KEY <= len(self.secret_key) <= MAX_CANCEL_KEY:
            _invalid(f"secret_key must be {MIN_CANCEL_KEY}..{MAX_CANCEL_KEY} bytes long")

    def encode(self) -> bytes:
        return (_II.pack(12 + len(self.secret_key), CANCEL_REQUEST_CODE)
                + _U32.pack(self.process_id) + self.secret_key)


def _check_startup_params(inst: StartupMessage, _attr: object, value: Mapping[str, str]) -> None:
    # "user" is the one parameter the server insists on.
    if not value.get("user"):
        _invalid("a StartupMessage needs a non-empty 'user' parameter")


@_frozen
class StartupMessage:
    """Frontend: the first real packet, with the protocol version and the
    session parameters (``user``, ``database``, ``application_name``, ``options``,
    ``replication``, any run-time setting, and ``_pq_.*`` protocol options)."""

    parameters: Mapping[str, str] = _map_field(validator=_check_startup_params)
    major: int = attrs.field(default=3, validator=_int_range(0, 0xFFFF))
    minor: int = attrs.field(default=0, validator=_int_range(0, 0xFFFF))

    @property
    def user(self) -> str:
        return self.parameters["user"]

    @property
    def database(self) -> str:
        """The database, which defaults to the user name (as the server does)."""
        return self.parameters.get("database") or self.user

    @property
    def application_name(self) -> str | None:
        return self.parameters.get("application_name")

    @property
    def options(self) -> str | None:
        """Command-line style options for the backend (``-c name=value``)."""
        return self.parameters.get("options")

    @property
    def replication(self) -> str | None:
        """``true``/``database``/... for a replication connection, else None."""
        return self.parameters.get("replication")

    @property
    def wants_replication(self) -> bool:
        return replication_requested(self.replication)

    @property
    def protocol_options(self) -> Mapping[str, str]:
        """The ``_pq_.*`` protocol extensions asked for (we support none)."""
        return MappingProxyType({k: v for k, v in self.parameters.items()
                                 if k.startswith("_pq_.")})

    def encode(self) -> bytes:
        body = bytearray(_U32.pack((self.major << 16) | self.minor))
        for key, value in self.parameters.items():
            body += _cstr(key) + _cstr(value)
        body += b"\x00"
        if 4 + len(body) > MAX_STARTUP_PACKET:
            _invalid(f"the StartupMessage would be {4 + len(body)} bytes; "
                     f"servers accept at most {MAX_STARTUP_PACKET}")
        return _U32.pack(4 + len(body)) + bytes(body)


StartupPacket = Union[SSLRequest, GSSENCRequest, CancelRequest, StartupMessage]


def decode_startup_packet(payload: bytes) -> StartupPacket:
    """Decode the untyped first packet; ``payload`` follows the length field.

    Raises RemoteProtocolError: 08P01 if malformed, 0A000
    (``UNSUPPORTED_VERSION``) for a protocol other than 3.x, 28000 when the
    StartupMessage names no user.
    """
    if len(payload) < 4:
        _malformed("invalid length of startup packet")
    (code,) = _U32.unpack_from(payload)
    major, minor = code >> 16, code & 0xFFFF
    rest = payload[4:]
    if code in (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE):
        if rest:
            _malformed("invalid length of an SSLRequest or GSSENCRequest")
        return SSLRequest() if code == SSL_REQUEST_CODE else GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        if not 4 + MIN_CANCEL_KEY <= len(rest) <= 4 + MAX_CANCEL_KEY:
            _malformed("invalid length of a CancelRequest")
        (pid,) = _U32.unpack_from(rest)
        return CancelRequest(process_id=pid, secret_key=rest[4:])
    if major != 3:
        raise RemoteProtocolError(
            f"unsupported frontend protocol {major}.{minor}: Wicket supports 3.0",
            code=ErrorCode.UNSUPPORTED_VERSION, wire_hint=SqlState.FEATURE_NOT_SUPPORTED,
        )
    reader = _Reader(rest, "the StartupMessage")
    params: dict[str, str] = {}
    while True:
        name = reader.text()
        if not name:  # an empty name ends the list, and the packet
            break
        value = reader.text()
        if name in params:
            # Two readers that pick different duplicates (RBAC and the real
            # server, say) is how one request comes to mean two things.
            _malformed("the StartupMessage repeats a parameter")
        params[name] = value
    if not reader.at_end():
        _malformed("invalid startup packet layout: expected terminator as last byte")
    if not params.get("user"):
        raise RemoteProtocolError(
            "no PostgreSQL user name specified in startup packet",
            code=ErrorCode.ACCESS_DENIED, wire_hint=SqlState.INVALID_AUTHORIZATION,
        )
    return StartupMessage(parameters=params, major=major, minor=minor)


def parse_ssl_answer(answer: bytes, *, gssenc: bool = False) -> bool:
    """The server's one-byte reply to our SSLRequest (S or N), or with
    ``gssenc`` to our GSSENCRequest (G or N): True to go ahead. Anything else
    (an ErrorResponse, say) is a RemoteProtocolError. The caller must read
    exactly one byte: a byte more would be unencrypted data smuggled in ahead
    of the handshake (CVE-2021-23222)."""
    if answer == (b"G" if gssenc else b"S"):
        return True
    if answer == b"N":
        return False
    _malformed("the server did not answer the encryption request as the protocol says")


# --- backend messages -----------------------------------------------------------


class _Typed:
    """Shared by typed messages: ``encode()`` frames ``_body()``."""

    type_code: ClassVar[bytes]

    def _body(self) -> bytes:
        return b""

    def encode(self) -> bytes:
        return frame(self.type_code, self._body())


class _Auth(_Typed):
    type_code = b"R"
    auth_code: ClassVar[int]

    def _payload(self) -> bytes:
        return b""

    def _body(self) -> bytes:
        return _I32.pack(self.auth_code) + self._payload()


@_frozen
class AuthenticationOk(_Auth):
    auth_code = 0


@_frozen
class AuthenticationCleartextPassword(_Auth):
    auth_code = 3


@_frozen
class AuthenticationMD5Password(_Auth):
    auth_code = 5
    salt: bytes = attrs.field(validator=_check_bytes)

    def __attrs_post_init__(self) -> None:
        if len(self.salt) != 4:
            _invalid("an MD5 salt is 4 bytes")

    def _payload(self) -> bytes:
        return self.salt


@_frozen
class AuthenticationSASL(_Auth):
    auth_code = 10
    mechanisms: tuple[str, ...] = attrs.field(converter=_str_tuple)

    def _payload(self) -> bytes:
        return b"".join(_cstr(m) for m in self.mechanisms) + b"\x00"


@_frozen
class AuthenticationSASLContinue(_Auth):
    auth_code = 11
    data: bytes = attrs.field(validator=_check_bytes)

    def _payload(self) -> bytes:
        return self.data


@_frozen
class AuthenticationSASLFinal(_Auth):
    auth_code = 12
    data: bytes = attrs.field(validator=_check_bytes)

    def _payload(self) -> bytes:
        return self.data


@_frozen
class AuthenticationOther(_Auth):
    """An authentication request Wicket does not perform (Kerberos, GSSAPI,
    SSPI, ...): kept by code so the refusal can name it."""

    auth_code = -1  # placeholder: the real code is the `code` field
    code: int = attrs.field(validator=_INT32)
    data: bytes = attrs.field(default=b"", validator=_check_bytes)

    def _body(self) -> bytes:
        return _I32.pack(self.code) + self.data


@_frozen
class ParameterStatus(_Typed):
    type_code = b"S"
    name: str = attrs.field(validator=_check_str)
    value: str = attrs.field(validator=_check_str)

    def _body(self) -> bytes:
        return _cstr(self.name) + _cstr(self.value)


@_frozen
class BackendKeyData(_Typed):
    """The pid and secret a client must quote to cancel. Under protocol 3.0
    the key is exactly 4 bytes; 3.2 allows 4..256."""

    type_code = b"K"
    process_id: int = attrs.field(validator=_UINT32)
    secret_key: bytes = attrs.field(validator=_check_bytes, repr=False)

    def __attrs_post_init__(self) -> None:
        if not MIN_CANCEL_KEY <= len(self.secret_key) <= MAX_CANCEL_KEY:
            _invalid(f"secret_key must be {MIN_CANCEL_KEY}..{MAX_CANCEL_KEY} bytes long")

    def _body(self) -> bytes:
        return _U32.pack(self.process_id) + self.secret_key

    def matches(self, cancel: CancelRequest) -> bool:
        """Whether ``cancel`` quotes this pid and key (in constant time)."""
        return cancel.process_id == self.process_id and hmac.compare_digest(
            cancel.secret_key, self.secret_key
        )


def _check_status(_inst: object, _attr: object, value: object) -> None:
    if value not in ("I", "T", "E"):
        _invalid("status must be 'I' (idle), 'T' (in a transaction) or 'E' (failed transaction)")


@_frozen
class ReadyForQuery(_Typed):
    type_code = b"Z"
    status: str = attrs.field(default="I", validator=_check_status)

    def _body(self) -> bytes:
        return self.status.encode("ascii")


_ERROR_SEVERITIES: Final = frozenset({"ERROR", "FATAL", "PANIC"})
_NOTICE_SEVERITIES: Final = frozenset({"WARNING", "NOTICE", "DEBUG", "INFO", "LOG"})


def _check_fields(_inst: object, _attr: object, value: Mapping[str, str]) -> None:
    for key in value:
        if len(key) != 1 or not key.isascii():
            _invalid("field codes are single ASCII characters")


def _sqlstate_ok(value: str) -> bool:
    return len(value) == 5 and all(c.isdigit() or "A" <= c <= "Z" for c in value)


class _Fields(_Typed):
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
            _invalid(f"severity {severity!r} is not one of {sorted(cls._severities)}")
        if not _sqlstate_ok(sqlstate):
            _invalid("sqlstate must be five characters of 0-9 or A-Z")
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
        return b"".join(k.encode("ascii") + _cstr(v) for k, v in self.fields.items()) + b"\x00"


@_frozen
class ErrorResponse(_Fields):
    type_code = b"E"
    _severities = _ERROR_SEVERITIES
    fields: Mapping[str, str] = _map_field(validator=_check_fields)


@_frozen
class NoticeResponse(_Fields):
    type_code = b"N"
    _severities = _NOTICE_SEVERITIES
    fields: Mapping[str, str] = _map_field(validator=_check_fields)


def replication_requested(value: str | None) -> bool:
    """Whether a ``replication`` startup parameter asks for a replication
    connection (PostgreSQL reads false/off/no/0 as an ordinary one)."""
    return value is not None and value.lower() not in ("false", "off", "no", "0")


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
    if isinstance(wire_hint, str) and _sqlstate_ok(wire_hint):
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


@_frozen
class NegotiateProtocolVersion(_Typed):
    """Backend: "I speak at most 3.<newest_minor>, and not these _pq_ options"."""

    type_code = b"v"
    newest_minor: int = attrs.field(default=0, validator=_int_range(0, 0xFFFF))
    unrecognized: tuple[str, ...] = attrs.field(default=(), converter=_str_tuple)

    def _body(self) -> bytes:
        return _II.pack(self.newest_minor, len(self.unrecognized)) + b"".join(
            _cstr(o) for o in self.unrecognized)


@_frozen
class CommandComplete(_Typed):
    type_code = b"C"
    tag: str = attrs.field(validator=_check_str)

    def _body(self) -> bytes:
        return _cstr(self.tag)


class _CopyResponse(_Typed):
    format: int
    column_formats: tuple[int, ...]

    def _body(self) -> bytes:
        return struct.pack(f">bH{len(self.column_formats)}h", self.format,
                           len(self.column_formats), *self.column_formats)


@_frozen
class CopyInResponse(_CopyResponse):
    """Backend: COPY FROM STDIN started; the client now sends CopyData."""

    type_code = b"G"
    format: int = attrs.field(default=0, validator=_int_range(0, 1))
    column_formats: tuple[int, ...] = attrs.field(default=(), converter=_FORMATS)


@_frozen
class CopyOutResponse(_CopyResponse):
    """Backend: COPY TO STDOUT started; the server now sends CopyData."""

    type_code = b"H"
    format: int = attrs.field(default=0, validator=_int_range(0, 1))
    column_formats: tuple[int, ...] = attrs.field(default=(), converter=_FORMATS)


@_frozen
class CopyBothResponse(_CopyResponse):
    """Backend: both directions carry CopyData (streaming replication)."""

    type_code = b"W"
    format: int = attrs.field(default=0, validator=_int_range(0, 1))
    column_formats: tuple[int, ...] = attrs.field(default=(), converter=_FORMATS)


BackendMessage = Union[
    AuthenticationOk, AuthenticationCleartextPassword, AuthenticationMD5Password,
    AuthenticationSASL, AuthenticationSASLContinue, AuthenticationSASLFinal, AuthenticationOther,
    ParameterStatus, BackendKeyData, ReadyForQuery, ErrorResponse, NoticeResponse,
    NegotiateProtocolVersion, CommandComplete, CopyInResponse, CopyOutResponse, CopyBothResponse,
]


def _decode_auth(r: _Reader) -> BackendMessage:
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


def _decode_fields(r: _Reader) -> dict[str, str]:
    fields: dict[str, str] = {}
    while code := r.byte():
        # Unknown field codes must be ignored (the spec says new ones may
        # appear), but a code byte is still one character of the fields map.
        fields[chr(code)] = r.text()
    return fields


def _decode_copy(cls: type[_CopyResponse]) -> Callable[[_Reader], BackendMessage]:
    def decode(r: _Reader) -> BackendMessage:
        fmt = r.byte()
        formats = [r.int16() for _ in range(r.uint16())]
        return cls(format=fmt, column_formats=formats)  # type: ignore[call-arg]
    return decode


def _decode_negotiate(r: _Reader) -> BackendMessage:
    newest = r.uint32()
    count = r.uint32()
    if newest > 0xFFFF:
        _malformed("NegotiateProtocolVersion names an impossible minor version")
    names = [r.text() for _ in range(min(count, 1 << 16))]
    if count > len(names) or not all(names):
        _malformed("NegotiateProtocolVersion has a bad option list")
    return NegotiateProtocolVersion(newest_minor=newest, unrecognized=names)


def _decode_key(r: _Reader) -> BackendMessage:
    pid = r.uint32()
    key = r.rest()
    if not MIN_CANCEL_KEY <= len(key) <= MAX_CANCEL_KEY:
        _malformed("BackendKeyData has a secret key of an invalid length")
    return BackendKeyData(process_id=pid, secret_key=key)


def _decode_ready(r: _Reader) -> BackendMessage:
    status = chr(r.byte())
    if status not in "ITE":
        _malformed("ReadyForQuery has an unknown transaction status")
    return ReadyForQuery(status=status)


_BACKEND: Final[Mapping[bytes, tuple[str, Callable[[_Reader], BackendMessage]]]] = {
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
    return _decode(what, decode, body)


def _decode(what: str, decode: Callable[[_Reader], Any], body: bytes) -> Any:
    reader = _Reader(body, what)
    try:
        message = decode(reader)
    except LocalProtocolError as exc:  # the classes' own validation
        _malformed(f"malformed {what}: {exc.message}")
    reader.end()
    return message


# --- frontend messages ----------------------------------------------------------


@_frozen
class PasswordMessage(_Typed):
    """Frontend: a cleartext or md5-hashed password. Never logged or shown."""

    type_code = b"p"
    password: bytes = attrs.field(validator=_check_bytes, repr=False)

    def __attrs_post_init__(self) -> None:
        if b"\x00" in self.password:
            _invalid("a password may not contain NUL")

    def _body(self) -> bytes:
        return self.password + b"\x00"


@_frozen
class SASLInitialResponse(_Typed):
    type_code = b"p"
    mechanism: str = attrs.field(validator=_check_str)
    data: bytes | None = attrs.field(default=None, repr=False)

    def _body(self) -> bytes:
        if self.data is None:
            return _cstr(self.mechanism) + _I32.pack(-1)
        return _cstr(self.mechanism) + _I32.pack(len(self.data)) + self.data


@_frozen
class SASLResponse(_Typed):
    type_code = b"p"
    data: bytes = attrs.field(validator=_check_bytes, repr=False)

    def _body(self) -> bytes:
        return self.data


@_frozen
class Query(_Typed):
    """Frontend: a simple query (one or more statements)."""

    type_code = b"Q"
    text: str = attrs.field(validator=_check_str)

    def _body(self) -> bytes:
        return _cstr(self.text)


@_frozen
class Parse(_Typed):
    type_code = b"P"
    statement: str = attrs.field(validator=_check_str)
    text: str = attrs.field(validator=_check_str)
    param_types: tuple[int, ...] = attrs.field(default=(), converter=_int_tuple(0, 2**32 - 1,
                                                                                0xFFFF))

    def _body(self) -> bytes:
        return (_cstr(self.statement) + _cstr(self.text) + _U16.pack(len(self.param_types))
                + b"".join(_U32.pack(t) for t in self.param_types))


def _values(value: object) -> tuple[bytes | None, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 0xFFFF:
        _invalid("values must be a sequence of at most 65535 bytes-or-None")
    for item in value:
        if item is not None and not isinstance(item, bytes):
            _invalid("values must be bytes or None (NULL)")
    return tuple(value)


def _encode_values(values: tuple[bytes | None, ...]) -> bytes:
    out = bytearray(_U16.pack(len(values)))
    for value in values:
        out += _I32.pack(-1) if value is None else _I32.pack(len(value)) + value
    return bytes(out)


def _decode_values(r: _Reader) -> list[bytes | None]:
    values: list[bytes | None] = []
    for _ in range(r.uint16()):
        size = r.int32()
        if size < -1:
            _malformed("a parameter has a negative length")
        values.append(None if size == -1 else r.raw(size))
    return values


@_frozen
class Bind(_Typed):
    """Frontend: bind parameter ``values`` to ``statement``, making ``portal``."""

    type_code = b"B"
    portal: str = attrs.field(validator=_check_str)
    statement: str = attrs.field(validator=_check_str)
    param_formats: tuple[int, ...] = attrs.field(default=(), converter=_FORMATS)
    values: tuple[bytes | None, ...] = attrs.field(default=(), converter=_values, repr=False)
    result_formats: tuple[int, ...] = attrs.field(default=(), converter=_FORMATS)

    def _body(self) -> bytes:
        return (_cstr(self.portal) + _cstr(self.statement)
                + _U16.pack(len(self.param_formats))
                + b"".join(_I16.pack(f) for f in self.param_formats)
                + _encode_values(self.values)
                + _U16.pack(len(self.result_formats))
                + b"".join(_I16.pack(f) for f in self.result_formats))


@_frozen
class Execute(_Typed):
    type_code = b"E"
    portal: str = attrs.field(default="", validator=_check_str)
    max_rows: int = attrs.field(default=0, validator=_INT32)  # 0: no limit

    def _body(self) -> bytes:
        return _cstr(self.portal) + _I32.pack(self.max_rows)


def _check_kind(_inst: object, _attr: object, value: object) -> None:
    if value not in ("S", "P"):
        _invalid("kind must be 'S' (prepared statement) or 'P' (portal)")


@_frozen
class Describe(_Typed):
    type_code = b"D"
    kind: str = attrs.field(validator=_check_kind)
    name: str = attrs.field(default="", validator=_check_str)

    def _body(self) -> bytes:
        return self.kind.encode("ascii") + _cstr(self.name)


@_frozen
class Close(_Typed):
    type_code = b"C"
    kind: str = attrs.field(validator=_check_kind)
    name: str = attrs.field(default="", validator=_check_str)

    def _body(self) -> bytes:
        return self.kind.encode("ascii") + _cstr(self.name)


@_frozen
class Sync(_Typed):
    type_code = b"S"


@_frozen
class Flush(_Typed):
    type_code = b"H"


@_frozen
class CopyData(_Typed):
    type_code = b"d"
    data: bytes = attrs.field(validator=_check_bytes, repr=lambda d: f"<{len(d)} bytes>")

    def _body(self) -> bytes:
        return self.data


@_frozen
class CopyDone(_Typed):
    type_code = b"c"


@_frozen
class CopyFail(_Typed):
    type_code = b"f"
    message: str = attrs.field(validator=_check_str)

    def _body(self) -> bytes:
        return _cstr(self.message)


@_frozen
class FunctionCall(_Typed):
    """Frontend: call function ``oid`` directly (libpq's large-object API does)."""

    type_code = b"F"
    oid: int = attrs.field(validator=_UINT32)
    arg_formats: tuple[int, ...] = attrs.field(default=(), converter=_FORMATS)
    args: tuple[bytes | None, ...] = attrs.field(default=(), converter=_values, repr=False)
    result_format: int = attrs.field(default=0, validator=_int_range(0, 1))

    def _body(self) -> bytes:
        return (_U32.pack(self.oid) + _U16.pack(len(self.arg_formats))
                + b"".join(_I16.pack(f) for f in self.arg_formats)
                + _encode_values(self.args) + _I16.pack(self.result_format))


@_frozen
class Terminate(_Typed):
    type_code = b"X"


FrontendMessage = Union[
    Query, Parse, Bind, Execute, Describe, Close, Sync, Flush, CopyData, CopyDone, CopyFail,
    FunctionCall, Terminate,
]


def _formats(r: _Reader) -> list[int]:
    return [r.int16() for _ in range(r.uint16())]


def _decode_bind(r: _Reader) -> Bind:
    portal, statement = r.text(), r.text()
    formats = _formats(r)
    values = _decode_values(r)
    results = _formats(r)
    if len(formats) not in (0, 1, len(values)):
        _malformed("Bind has a parameter format count that matches no parameter count")
    return Bind(portal=portal, statement=statement, param_formats=formats, values=values,
                result_formats=results)


def _decode_function_call(r: _Reader) -> FunctionCall:
    oid = r.uint32()
    formats = _formats(r)
    args = _decode_values(r)
    return FunctionCall(oid=oid, arg_formats=formats, args=args, result_format=r.int16())


def _decode_target(cls: type[Describe] | type[Close]) -> Callable[[_Reader], FrontendMessage]:
    return lambda r: cls(kind=chr(r.byte()), name=r.text())


_FRONTEND: Final[Mapping[bytes, tuple[str, Callable[[_Reader], FrontendMessage]]]] = {
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
        _malformed(f"unexpected frontend message type {type_code!r}")
    what, decode = entry
    return _decode(what, decode, body)


# --- streaming framing ----------------------------------------------------------


@attrs.frozen(slots=True)
class Frame:
    """One typed message from a :class:`FrameSplitter`.

    ``body`` is the whole body when ``complete``, else only its first bytes
    (as many as the splitter's ``keep`` asked for): the rest was skipped.
    """

    type_code: bytes
    body_length: int  # the body's full length (the length field minus 4)
    body: bytes

    @property
    def complete(self) -> bool:
        return len(self.body) == self.body_length


#: keep(type_code, body_length) -> how many body bytes to keep (0..body_length).
KeepPolicy = Callable[[bytes, int], int]


class FrameSplitter:
    """Splits a stream of typed messages without buffering what it need not.

    Theory of operation: for each message the splitter reads the 5-byte
    header, asks ``keep(type, body_length)`` how many body bytes the caller
    wants, collects exactly those, hands out a :class:`Frame`, and then only
    counts down the remainder of the body as it streams past. Memory is the
    largest ``keep`` answer, whatever the peer sends. ``keep`` may raise (a
    RemoteProtocolError for a type the stream may not carry, say).

    A frame is handed out as soon as its kept bytes are in: a message whose
    body is skipped (``keep`` said 0) comes out right after its header. The
    chunk passed to :meth:`feed` is not retained.
    """

    __slots__ = ("_keep", "_max_length", "_header", "_type", "_length", "_kept", "_want",
                 "_skip")

    def __init__(self, keep: KeepPolicy, *, max_length: int = MAX_MESSAGE_LENGTH) -> None:
        self._keep = keep
        self._max_length = max_length
        self._header = bytearray()
        self._type = b""
        self._length = 0
        self._kept = bytearray()
        self._want = 0  # body bytes still to keep
        self._skip = 0  # body bytes still to drop

    @property
    def at_boundary(self) -> bool:
        """True between messages (nothing of a message is pending)."""
        return not (self._header or self._want or self._skip)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Frame]:
        """Consume ``data``, yielding each frame as it becomes available.

        Raises RemoteProtocolError (08P01) for a bad length; the splitter is
        then unusable. Consume the iterator fully: bytes are only taken as
        it advances.
        """
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            if self._want:
                step = min(self._want, end - pos)
                self._kept += view[pos : pos + step]
                self._want -= step
                pos += step
                if not self._want:
                    yield self._emit(bytes(self._kept))
                continue
            if not self._header and end - pos >= 5:
                type_code, length = HEADER.unpack_from(view, pos)
                pos += 5
            else:
                step = min(5 - len(self._header), end - pos)
                self._header += view[pos : pos + step]
                pos += step
                if len(self._header) < 5:
                    break
                type_code, length = HEADER.unpack(self._header)
                self._header.clear()
            if not 4 <= length <= self._max_length:
                _malformed(f"invalid message length {length}")
            body = length - 4
            keep = min(max(self._keep(type_code, body), 0), body)
            self._type, self._length = type_code, body
            if keep == body and end - pos >= body:
                # The common case: a small message wholly inside this chunk.
                out = bytes(view[pos : pos + body])
                pos += body
                yield Frame(type_code, body, out)
            elif keep == 0:
                yield self._emit(b"")
            else:
                self._kept = bytearray()
                self._want = keep
        view.release()

    def _emit(self, kept: bytes) -> Frame:
        self._kept = bytearray()
        self._skip = self._length - len(kept)
        return Frame(self._type, self._length, kept)

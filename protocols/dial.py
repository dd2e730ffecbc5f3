"""The dial exchange between the gateway (client) and the cluster (server).

Wire format (version 1; keep the prose version in docs/ in step with this)
-------------------------------------------------------------------------
On a data route, right after the TLS 1.3 handshake, the gateway sends one
DialRequest frame and the cluster answers with exactly one DialAccept or
DialError frame. After a DialAccept both directions carry the relayed
protocol's raw bytes, unframed; after a DialError the cluster closes::

    frame  := length:u32 big-endian | version:u8 | type:u8 | body
    length  = bytes after the length field (version + type + body), 2..65536
    body    = one UTF-8 JSON object
    type    = 1 DialRequest, 2 DialAccept, 3 DialError

Version rule: a receiver that does not speak a frame's version treats it as a
protocol error with code ``unsupported_version``; a server then still answers
with a *version 1* DialError carrying ``"supported": [1, ...]``, so a peer of
any version can read the refusal and pick a version both ends speak. Within a
version, unknown JSON keys are ignored (that is how a version grows); missing
or ill-typed known keys, and unknown frame types, are ``bad_request``.

Decoding is strict: bodies must be valid UTF-8; NaN/Infinity (and numbers too
large to be finite) are rejected; an object with a duplicate key is rejected
too, because two readers that disagree on which duplicate wins (say, the RBAC
check and the audit log) are exactly how a request is made to mean two things.
Encoding is compact and deterministic: ``json.dumps`` with ``(",", ":")``
separators, non-ASCII text as UTF-8, every known key always present.

Theory of operation
-------------------
:class:`DialConnection` is an h11-style sans-I/O object: ``receive_data``
takes bytes (``b""`` for EOF), ``next_event`` returns the peer's one event,
``NEED_DATA`` or, once the peer's frame is in, ``PAUSED``; ``send`` turns our
event into bytes. Whatever arrives after the peer's frame is not ours to
parse: it is the relayed protocol's first bytes, kept verbatim for
``trailing_data``. Everything that moves the state machine is in the table
below; the rest of the module does not decide who may speak when.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Final, Literal, NoReturn, Union, cast

import attrs

from protocols.buffer import BufferedReceiver, ReceiveBuffer
from protocols.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from protocols.framing import DIAL_FRAME, FrameSplitter
from protocols.signals import NEED_DATA, PAUSED, Signal

__all__ = [
    "DIAL_VERSION", "SUPPORTED_VERSIONS", "MAX_FRAME", "DEFAULT_MAX_BUFFER_SIZE",
    "FrameType", "Role", "State", "Signal", "NEED_DATA", "PAUSED",
    "DialRequest", "DialAccept", "DialError", "DialEvent", "DialConnection", "refusal_for",
    "encode_event", "decode_event",
]

DIAL_VERSION: Final = 1
SUPPORTED_VERSIONS: Final[tuple[int, ...]] = (1,)
MAX_FRAME: Final = DIAL_FRAME.max_length  # largest allowed value of the length field (65536)
# What a connection buffers at most: one whole frame, plus room for the
# relayed protocol's first bytes that may share reads with it (a client may
# pipeline them right behind its request). A caller that reads at most 64 KiB
# at a time and stops feeding once next_event() has returned the dial event
# never reaches it; a peer that floods us does.
DEFAULT_MAX_BUFFER_SIZE: Final = 256 * 1024

_LENGTH = struct.Struct(">I")
_HEADER = DIAL_FRAME.header  # length, version, type
_PREFIX = _LENGTH.size + 1  # enough to judge length and version

MAX_RESOURCE: Final = 253  # a DNS name's limit, so a resource name can be a host name
MAX_PARAMS: Final = 32
MAX_PARAM_KEY: Final = 64
MAX_PARAM_VALUE: Final = 1024
#: A dial with this parameter asks the cluster only to reach the resource's
#: upstream and close, for every kind alike: no session (docs/wire.md).
PARAM_PROBE: Final = "probe"
MAX_CLIENT_ADDR: Final = 128
MAX_SESSION_ID: Final = 128
MAX_CODE: Final = 64
MAX_MESSAGE: Final = 4096
MAX_SUPPORTED: Final = 256  # a version is a u8: listing each at most once fits


class FrameType(enum.IntEnum):
    REQUEST = 1
    ACCEPT = 2
    ERROR = 3


class Role(enum.Enum):
    CLIENT = "client"  # the gateway: dials
    SERVER = "server"  # the cluster: answers


class State(enum.Enum):
    # client states
    SEND_REQUEST = "SEND_REQUEST"
    AWAIT_ANSWER = "AWAIT_ANSWER"
    # server states
    AWAIT_REQUEST = "AWAIT_REQUEST"
    SEND_ANSWER = "SEND_ANSWER"
    SEND_REFUSAL = "SEND_REFUSAL"
    # shared end states
    ACCEPTED = "ACCEPTED"
    REFUSED = "REFUSED"
    ERROR = "ERROR"


_C, _S = Role.CLIENT, Role.SERVER

# The state machine. Both ends run the same table, whichever role they play:
# a frame moves both parties at once, because each frame is the one thing
# the other side was waiting for. In pictures:
#
#     client: SEND_REQUEST  -> AWAIT_ANSWER -> ACCEPTED | REFUSED
#     server: AWAIT_REQUEST -> SEND_ANSWER  -> ACCEPTED | REFUSED
#                   |               |
#                   +---------------+--> SEND_REFUSAL -> REFUSED
#                     (the client broke the protocol: see _ON_PEER_ERROR)
#
# and as the table the code follows:
#
#     (client state, server state, sender, frame) -> (client state, server state)
#
# A (state, sender, frame) combination missing from the table is out of turn:
# LocalProtocolError if we tried to send it, RemoteProtocolError if the peer did.
_TRANSITIONS: Final[Mapping[tuple[State, State, Role, FrameType], tuple[State, State]]] = {
    (State.SEND_REQUEST, State.AWAIT_REQUEST, _C, FrameType.REQUEST):
        (State.AWAIT_ANSWER, State.SEND_ANSWER),
    (State.AWAIT_ANSWER, State.SEND_ANSWER, _S, FrameType.ACCEPT):
        (State.ACCEPTED, State.ACCEPTED),
    (State.AWAIT_ANSWER, State.SEND_ANSWER, _S, FrameType.ERROR):
        (State.REFUSED, State.REFUSED),
    # The client's bytes could not be read (see _ON_PEER_ERROR): the server
    # owes it exactly one refusal, which is how an old or new client learns
    # why, instead of seeing a dropped connection.
    (State.ERROR, State.SEND_REFUSAL, _S, FrameType.ERROR):
        (State.ERROR, State.REFUSED),
}

# When the peer breaks the protocol it moves to ERROR and the connection is
# poisoned for receiving. Our own state stays, except that a server which has
# not answered yet now may only refuse.
_ON_PEER_ERROR: Final[Mapping[tuple[Role, State], State]] = {
    (_S, State.AWAIT_REQUEST): State.SEND_REFUSAL,
    (_S, State.SEND_ANSWER): State.SEND_REFUSAL,
}

# States in which a party has already sent its one frame: from then on, bytes
# from it belong to the relayed protocol and next_event() returns PAUSED.
_HAS_SENT: Final = frozenset({State.AWAIT_ANSWER, State.ACCEPTED, State.REFUSED})




# --- validation ----------------------------------------------------------
# Events validate themselves, so a bad event can neither be sent nor be
# received: construction raises LocalProtocolError, which the decoder turns
# into RemoteProtocolError. Messages name fields and never echo peer values
# (a params key, once checked to be short, is the one exception).


def _invalid(message: str) -> NoReturn:
    raise LocalProtocolError(message, code=ErrorCode.BAD_REQUEST)


def _kind(value: object) -> str:
    """A value's type in JSON's words: errors reach both Python callers and peers."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, (list, tuple)):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _check_text(name: str, value: object, min_len: int, max_len: int) -> None:
    if not isinstance(value, str):
        _invalid(f"{name} must be a string, not {_kind(value)}")
    if not min_len <= len(value) <= max_len:
        _invalid(f"{name} must be {min_len}..{max_len} characters long, not {len(value)}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate (JSON allows "\ud800") cannot be sent as UTF-8.
            _invalid(f"{name} is not valid Unicode text")


def _text(min_len: int, max_len: int, *, optional: bool = False) -> Any:
    def check(_instance: object, attribute: attrs.Attribute[Any], value: object) -> None:
        if not (optional and value is None):
            _check_text(attribute.name, value, min_len, max_len)

    return check


def _freeze_params(value: object) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        _invalid(f"params must be a mapping of strings to strings, not {_kind(value)}")
    if len(value) > MAX_PARAMS:
        _invalid(f"params may have at most {MAX_PARAMS} entries, not {len(value)}")
    frozen: dict[str, str] = {}
    for key, item in value.items():
        _check_text("params key", key, 1, MAX_PARAM_KEY)
        _check_text(f"params[{key!r}]", item, 0, MAX_PARAM_VALUE)
        frozen[key] = item
    # A read-only view of a private copy: nobody else can mutate it.
    return MappingProxyType(frozen)


def _freeze_versions(value: object) -> tuple[int, ...]:
    if not isinstance(value, (list, tuple)):
        _invalid(f"supported must be a list of versions, not {_kind(value)}")
    if len(value) > MAX_SUPPORTED:
        _invalid(f"supported may list at most {MAX_SUPPORTED} versions")
    for version in value:
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= 255:
            _invalid("supported must list versions as integers 0..255")
    return tuple(value)


def _seconds(value: object) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        _invalid(f"retry_after must be a number of seconds or null, not {_kind(value)}")
    try:
        seconds = float(value)
    except OverflowError:
        _invalid("retry_after is too large")
    if not math.isfinite(seconds) or seconds < 0:
        _invalid("retry_after must be a finite, non-negative number of seconds")
    return seconds


def _check_code(_instance: object, _attribute: object, value: object) -> None:
    if not isinstance(value, ErrorCode):
        _invalid(f"code must be an ErrorCode, not {_kind(value)}")


def _check_raw_code(instance: DialError, _attribute: object, value: object) -> None:
    # raw_code exists only to carry a code this build does not know (a newer
    # cluster's), so an error is always either known or unknown, never both:
    # that keeps equality and round trips exact.
    if value is None:
        return
    _check_text("raw_code", value, 1, MAX_CODE)
    if instance.code is not ErrorCode.INTERNAL_ERROR:
        _invalid("raw_code is only for unknown codes, which map to code=INTERNAL_ERROR")
    if value in _KNOWN_CODES:
        _invalid("raw_code names a known code; pass it as code= instead")


_KNOWN_CODES: Final = frozenset(code.value for code in ErrorCode)


def _params_repr(params: Mapping[str, str]) -> str:
    return repr(dict(params))


def _params_field() -> Any:
    # Excluded from the hash (a mapping has none), but compared for equality.
    return attrs.field(factory=dict, converter=_freeze_params, hash=False, repr=_params_repr)


def _required(body: Mapping[str, object], key: str) -> object:
    if key not in body:
        _invalid(f"{key} is missing")
    return body[key]


# --- events --------------------------------------------------------------


@attrs.define(frozen=True, slots=True, kw_only=True)
class DialRequest:
    """Gateway -> cluster: open ``resource`` with these parameters."""

    frame_type: ClassVar[FrameType] = FrameType.REQUEST

    resource: str = attrs.field(validator=_text(1, MAX_RESOURCE))
    #: e.g. db_user, db_name, login; at most 32 entries.
    params: Mapping[str, str] = _params_field()
    #: the local client's address, for the audit log only.
    client_addr: str | None = attrs.field(
        default=None, validator=_text(0, MAX_CLIENT_ADDR, optional=True)
    )

    def _body(self) -> dict[str, object]:
        return {"resource": self.resource, "params": dict(self.params),
                "client_addr": self.client_addr}

    @classmethod
    def _from_body(cls, body: Mapping[str, object]) -> DialRequest:
        return cls(resource=_required(body, "resource"), params=body.get("params", {}),
                   client_addr=body.get("client_addr"))


@attrs.define(frozen=True, slots=True, kw_only=True)
class DialAccept:
    """Cluster -> gateway: accepted; raw protocol bytes follow."""

    frame_type: ClassVar[FrameType] = FrameType.ACCEPT

    session_id: str = attrs.field(validator=_text(1, MAX_SESSION_ID))
    params: Mapping[str, str] = _params_field()

    def _body(self) -> dict[str, object]:
        return {"session_id": self.session_id, "params": dict(self.params)}

    @classmethod
    def _from_body(cls, body: Mapping[str, object]) -> DialAccept:
        return cls(session_id=_required(body, "session_id"), params=body.get("params", {}))


@attrs.define(frozen=True, slots=True, kw_only=True)
class DialError:
    """Cluster -> gateway: refused, with a typed reason.

    A code string this build does not know arrives as ``code=INTERNAL_ERROR``
    with the original in ``raw_code``; ``wire_code`` is what goes on the wire.
    """

    frame_type: ClassVar[FrameType] = FrameType.ERROR

    code: ErrorCode = attrs.field(validator=_check_code)
    message: str = attrs.field(validator=_text(0, MAX_MESSAGE))
    retry_after: float | None = attrs.field(default=None, converter=_seconds)
    supported: tuple[int, ...] = attrs.field(default=(), converter=_freeze_versions)
    raw_code: str | None = attrs.field(default=None, validator=_check_raw_code)

    @property
    def wire_code(self) -> str:
        return self.raw_code if self.raw_code is not None else self.code.value

    def _body(self) -> dict[str, object]:
        return {"code": self.wire_code, "message": self.message,
                "retry_after": self.retry_after, "supported": list(self.supported)}

    @classmethod
    def _from_body(cls, body: Mapping[str, object]) -> DialError:
        raw = _required(body, "code")
        _check_text("code", raw, 1, MAX_CODE)
        raw = cast(str, raw)
        if raw in _KNOWN_CODES:
            code, raw_code = ErrorCode(raw), None
        else:
            code, raw_code = ErrorCode.INTERNAL_ERROR, raw
        return cls(code=code, raw_code=raw_code, message=_required(body, "message"),
                   retry_after=body.get("retry_after"), supported=body.get("supported", ()))


DialEvent = Union[DialRequest, DialAccept, DialError]
_EVENT_TYPES: Final[Mapping[int, type[DialEvent]]] = {
    cls.frame_type: cls for cls in (DialRequest, DialAccept, DialError)
}


def refusal_for(error: ProtocolError) -> DialError:
    """The DialError a server sends back after ``error`` (usually the
    RemoteProtocolError its next_event() raised). For unsupported_version it
    lists the versions we speak, so the peer can retry with one of them."""
    # Our messages are short and plain; still, never let an odd one make
    # the refusal itself unsendable.
    message = error.message.encode("utf-8", "replace").decode("utf-8")[:MAX_MESSAGE]
    if error.code is ErrorCode.UNSUPPORTED_VERSION:
        return DialError(code=error.code, message=message, supported=SUPPORTED_VERSIONS)
    return DialError(code=error.code, message=message)


# --- codec -----------------------------------------------------------------


def _encode(event: DialEvent) -> bytes:
    body = json.dumps(event._body(), separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")
    length = 2 + len(body)
    if length > MAX_FRAME:
        raise LocalProtocolError(
            f"{type(event).__name__} encodes to {length} bytes; a dial frame holds at most "
            f"{MAX_FRAME} (shorten its params)",
            code=ErrorCode.BAD_REQUEST,
        )
    return _HEADER.pack(length, DIAL_VERSION, event.frame_type) + body


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("a JSON object has a duplicate key")
    return obj


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not a JSON number")


def _decode(frame_type: int, body: bytes) -> DialEvent:
    cls = _EVENT_TYPES.get(frame_type)
    if cls is None:
        raise RemoteProtocolError(f"unknown dial frame type {frame_type}")
    try:
        obj = json.loads(body.decode("utf-8"), object_pairs_hook=_no_duplicates,
                         parse_constant=_no_constants)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON, our hooks and over-long
        # integers; RecursionError, absurd nesting. Only the parser's own
        # explanation (a position, a reason) is kept, never the input.
        raise RemoteProtocolError(
            f"{cls.__name__} body is not valid UTF-8 JSON: {str(exc)[:200]}"
        ) from None
    if not isinstance(obj, dict):
        raise RemoteProtocolError(
            f"{cls.__name__} body must be a JSON object, not {_kind(obj)}"
        )
    try:
        return cls._from_body(obj)
    except LocalProtocolError as exc:
        raise RemoteProtocolError(f"malformed {cls.__name__}: {exc.message}") from exc


def encode_event(event: DialEvent) -> bytes:
    """One whole dial frame for ``event``, outside any exchange: how the
    multiplexed connection (protocols.mux) carries dial events in its own
    OPEN and REPLY frames. Raises :class:`LocalProtocolError` if it is too
    large."""
    if not isinstance(event, (DialRequest, DialAccept, DialError)):
        raise LocalProtocolError(f"not a dial event: {type(event).__name__}")
    return _encode(event)


def decode_event(frame: bytes) -> DialEvent:
    """The event in ``frame``, which must be exactly one whole dial frame,
    checked as strictly as a :class:`DialConnection` checks it. Raises
    :class:`RemoteProtocolError` (code ``unsupported_version`` for another
    version)."""
    if len(frame) < _HEADER.size:
        raise RemoteProtocolError(f"a dial frame is at least {_HEADER.size} bytes, not {len(frame)}")
    length, version, frame_type = _HEADER.unpack_from(frame)
    if version not in SUPPORTED_VERSIONS:
        raise RemoteProtocolError(
            f"dial protocol version {version} is not supported "
            f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})",
            code=ErrorCode.UNSUPPORTED_VERSION,
        )
    if length != len(frame) - _LENGTH.size or length > MAX_FRAME:
        raise RemoteProtocolError(f"dial frame length {length} does not match its {len(frame)} bytes")
    return _decode(frame_type, frame[_HEADER.size:])


# --- the connection ----------------------------------------------------------


class DialConnection(BufferedReceiver):
    """One end of one dial exchange; see the module docstring."""

    def __init__(self, our_role: Role, *, max_buffer_size: int = DEFAULT_MAX_BUFFER_SIZE) -> None:
        if not isinstance(our_role, Role):
            raise TypeError(f"our_role must be a Role, not {type(our_role).__name__}")
        if max_buffer_size < _LENGTH.size + MAX_FRAME:
            raise ValueError(f"max_buffer_size must hold one whole frame "
                             f"({_LENGTH.size + MAX_FRAME} bytes)")
        self.our_role: Final = our_role
        self.their_role: Final = Role.SERVER if our_role is Role.CLIENT else Role.CLIENT
        self._states = {Role.CLIENT: State.SEND_REQUEST, Role.SERVER: State.AWAIT_REQUEST}
        self._buffer = ReceiveBuffer(max_buffer_size)
        self._splitter = FrameSplitter(DIAL_FRAME, max_length=MAX_FRAME)
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def states(self) -> dict[Role, State]:
        return dict(self._states)

    @property
    def our_state(self) -> State:
        return self._states[self.our_role]

    @property
    def their_state(self) -> State:
        return self._states[self.their_role]

    def __repr__(self) -> str:
        return (f"<DialConnection {self.our_role.value}: client={self._states[_C].name} "
                f"server={self._states[_S].name}>")

    # -- receiving ----------------------------------------------------------

    def _overflowed(self, exc: RemoteProtocolError) -> None:
        self._poison(exc)

    def next_event(self) -> DialEvent | Literal[Signal.NEED_DATA, Signal.PAUSED]:
        """The peer's dial event, NEED_DATA, or PAUSED once it has arrived.

        Raises RemoteProtocolError if the peer broke the protocol; the
        connection is then poisoned and every later call raises again.
        """
        if self._error is not None:
            err = self._error
            raise RemoteProtocolError(err.message, code=err.code, wire_hint=err.wire_hint) from err
        if self.their_state in _HAS_SENT:
            return PAUSED
        try:
            event = self._read_frame()
            if event is not NEED_DATA:
                self._states[_C], self._states[_S] = self._lookup(
                    self.their_role, event, RemoteProtocolError
                )
        except RemoteProtocolError as exc:
            self._poison(exc)
            raise
        return event

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """``(bytes received after the peer's frame, whether EOF was seen)``.

        The bytes are the relayed stream's first bytes and must be forwarded.
        Only meaningful once next_event() has returned the peer's event;
        raises LocalProtocolError before that, and the stored
        RemoteProtocolError if the connection is poisoned.
        """
        if self._error is not None:
            err = self._error
            raise RemoteProtocolError(err.message, code=err.code, wire_hint=err.wire_hint) from err
        if self.their_state not in _HAS_SENT:
            raise LocalProtocolError("no trailing data before the peer's dial frame has arrived")
        return self._buffer.peek(len(self._buffer)) or b"", self._eof

    def _read_frame(self) -> DialEvent | Literal[Signal.NEED_DATA]:
        buf = self._buffer
        # Decisions need length *and* version: a newer peer's frame may be
        # larger than ours allow, and it must hear "unsupported version", not
        # "too large", however the bytes happen to be chunked. (A length too
        # short to hold a version makes a bad frame whatever follows it.)
        prefix = buf.peek(_PREFIX)
        if prefix is None:
            return self._short(None)
        version = prefix[_LENGTH.size]
        if version not in SUPPORTED_VERSIONS and DIAL_FRAME.length_of(prefix) >= 2:
            raise RemoteProtocolError(
                f"dial protocol version {version} is not supported "
                f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})",
                code=ErrorCode.UNSUPPORTED_VERSION,
            )
        frame = self._splitter.read_frame(buf)  # judges the length
        if frame is None:
            return self._short(_LENGTH.size + DIAL_FRAME.length_of(prefix))
        return _decode(frame.kind, frame.body)

    def _short(self, frame_size: int | None) -> Literal[Signal.NEED_DATA]:
        if not self._eof:
            return NEED_DATA
        have = len(self._buffer)
        if have == 0:
            raise RemoteProtocolError(
                f"the {self.their_role.value} closed the connection before sending its dial frame"
            )
        total = "?" if frame_size is None else str(frame_size)
        raise RemoteProtocolError(
            f"the connection closed in the middle of a dial frame ({have} of {total} bytes)"
        )

    # -- sending ------------------------------------------------------------

    def send(self, event: DialEvent) -> bytes:
        """The bytes for ``event``. Raises LocalProtocolError if it is out of
        turn or cannot be encoded; then nothing changes, so a server that
        fails to send an Accept can still send a DialError."""
        if not isinstance(event, (DialRequest, DialAccept, DialError)):
            raise LocalProtocolError(
                f"send() takes a DialRequest, DialAccept or DialError, not {type(event).__name__}"
            )
        after = self._lookup(self.our_role, event, LocalProtocolError)
        data = _encode(event)
        self._states[_C], self._states[_S] = after
        return data

    # -- the state machine --------------------------------------------------

    def _lookup(
        self, sender: Role, event: DialEvent, error: type[ProtocolError]
    ) -> tuple[State, State]:
        client, server = self._states[_C], self._states[_S]
        after = _TRANSITIONS.get((client, server, sender, event.frame_type))
        if after is None:
            done = server in (State.ACCEPTED, State.REFUSED)
            over = " (the dial exchange is over)" if done else ""
            raise error(
                f"the {sender.value} may not send {type(event).__name__} while the client is "
                f"{client.name} and the server is {server.name}{over}",
                code=ErrorCode.BAD_REQUEST if error is RemoteProtocolError else None,
            )
        return after

    def _poison(self, exc: RemoteProtocolError) -> None:
        self._error = exc
        self._states[self.their_role] = State.ERROR
        ours = _ON_PEER_ERROR.get((self.our_role, self.our_state))
        if ours is not None:
            self._states[self.our_role] = ours

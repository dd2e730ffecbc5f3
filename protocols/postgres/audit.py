"""Audit events from a relayed PostgreSQL session: the cluster's side.

Spec: PostgreSQL docs, "Frontend/Backend Protocol": Simple Query, Extended
Query, Function Call, COPY Operations, Termination; "Message Formats".

Theory of operation
-------------------
The relay copies every client -> server byte (after the startup phase) into a
:class:`FrontendAuditor` and every server -> client byte into a
:class:`BackendAuditor`, in whatever chunks it read them. Each is h11 style:
``receive_data(bytes)`` (``b""`` for EOF), then ``next_event()`` until it
returns ``NEED_DATA``. ``receive_data`` parses eagerly and never keeps a
reference to the chunk, so the relay may reuse its buffers.

Memory is bounded whatever the peer sends. A :class:`~.messages.FrameSplitter`
keeps a message whole only when it is at most ``max_message`` bytes (1 MiB by
default) and keeps just a prefix (``max_text`` + 1 KiB) of a larger one: the
event then carries what the prefix held and ``truncated=True``, and the rest
of the body streams past uncounted except for its length. CopyData and
DataRow bodies are never kept at all; consecutive CopyData messages are
summed into one :class:`CopyDataEvent` (messages and bytes), handed out when
the run ends. Statement text is cut to ``max_text`` bytes, with a flag.
Password messages ('p') are never looked into.

Text is decoded as UTF-8 with replacement: the session's client_encoding
may be anything, and an audit record must never fail over it. Framing and
layout, though, are checked as strictly as the server checks them, so a
malformed stream raises RemoteProtocolError (08P01) once the events before
it have been handed out; the auditor is then poisoned.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from typing import Final, Literal, NoReturn, Union

import attrs

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.postgres.messages import (
    FRONTEND_TYPES, MAX_MESSAGE_LENGTH, NEED_DATA, ConnectionClosed, Frame, FrameSplitter, Signal,
    protocol_violation,
)

__all__ = [
    "DEFAULT_MAX_TEXT", "DEFAULT_MAX_MESSAGE", "CopyDirection",
    "QueryEvent", "ParseEvent", "BindEvent", "ExecuteEvent", "FunctionCallEvent",
    "CopyDataEvent", "CopyDoneEvent", "CopyFailEvent", "TerminateEvent", "MessageEvent",
    "ErrorEvent", "CommandCompleteEvent", "CopyResponseEvent", "ReadyForQueryEvent",
    "FrontendEvent", "BackendEvent", "FrontendAuditor", "BackendAuditor",
]

DEFAULT_MAX_TEXT: Final = 16 * 1024
DEFAULT_MAX_MESSAGE: Final = 1024 * 1024
_PREFIX_SLACK: Final = 1024  # room for names and counts ahead of the text


class CopyDirection(enum.Enum):
    IN = "in"  # client -> server (COPY FROM STDIN)
    OUT = "out"  # server -> client (COPY TO STDOUT)
    BOTH = "both"  # CopyBothResponse (replication)


_event = attrs.frozen(kw_only=True)


# --- frontend events -----------------------------------------------------------


@_event
class QueryEvent:
    """A simple Query: one or more statements, run now."""

    text: str
    truncated: bool  # text was cut to max_text bytes (or the message to its prefix)
    size: int  # the message body's full size in bytes


@_event
class ParseEvent:
    """Parse: prepare ``text`` as ``statement`` ("" is the unnamed one)."""

    statement: str
    text: str
    truncated: bool
    size: int
    param_types: int | None  # how many parameter types were given; None if cut off


@_event
class BindEvent:
    """Bind: make ``portal`` from ``statement`` and parameter values.

    Values are only carried when the auditor was built with
    ``bind_values=True`` (each cut to ``max_value`` bytes; None is SQL NULL);
    ``param_formats`` says which are text (0) and binary (1): one code for
    all, one per value, or none for all-text.
    """

    portal: str
    statement: str
    param_count: int | None  # None if the message was cut before the count
    param_formats: tuple[int, ...]
    values: tuple[bytes | None, ...] | None = attrs.field(repr=False)
    truncated: bool
    size: int


@_event
class ExecuteEvent:
    portal: str
    max_rows: int  # 0: all rows


@_event
class FunctionCallEvent:
    """A fast-path function call by OID (libpq's large-object calls are these)."""

    oid: int
    arg_count: int | None
    size: int


@_event
class CopyDataEvent:
    """A run of CopyData messages: how many, and their bodies' total length
    as declared in their headers (bodies are never kept). A run cut by EOF
    counts the last message whole; its ConnectionClosed then says unclean."""

    direction: CopyDirection
    messages: int
    bytes: int


@_event
class CopyDoneEvent:
    direction: CopyDirection


@_event
class CopyFailEvent:
    """The client aborted a COPY FROM STDIN."""

    message: str
    truncated: bool


@_event
class TerminateEvent:
    """The client said goodbye; nothing after it is parsed."""


@_event
class MessageEvent:
    """Any other message (Sync, Flush, Describe, Close, a password message):
    only reported when the auditor was built with ``report_all=True``."""

    type_code: bytes
    size: int


# --- backend events -------------------------------------------------------------


@_event
class ErrorEvent:
    """An ErrorResponse: the statement (or the session, if FATAL) failed."""

    severity: str | None
    sqlstate: str | None
    message: str
    truncated: bool


@_event
class CommandCompleteEvent:
    tag: str  # e.g. "SELECT 5", "INSERT 0 1", "COPY 1000"


@_event
class CopyResponseEvent:
    """CopyInResponse, CopyOutResponse or CopyBothResponse: a COPY started."""

    direction: CopyDirection
    format: int  # 0 text, 1 binary
    columns: int


@_event
class ReadyForQueryEvent:
    status: str  # I idle, T in a transaction, E in a failed transaction


FrontendEvent = Union[QueryEvent, ParseEvent, BindEvent, ExecuteEvent, FunctionCallEvent,
                      CopyDataEvent, CopyDoneEvent, CopyFailEvent, TerminateEvent, MessageEvent,
                      ConnectionClosed]
BackendEvent = Union[ErrorEvent, CommandCompleteEvent, CopyResponseEvent, CopyDataEvent,
                     CopyDoneEvent, ReadyForQueryEvent, ConnectionClosed]


# --- reading kept bodies -----------------------------------------------------------


class _Cut(Exception):
    """Ran off the kept prefix of a message whose body was partly skipped."""


class _Fields:
    """Reads a kept body. Running off its end is malformed when the body is
    whole, and means "cut here" (:class:`_Cut`) when it is only a prefix."""

    __slots__ = ("_data", "_pos", "_complete", "_what")

    def __init__(self, frame: Frame, what: str) -> None:
        self._data = frame.body
        self._pos = 0
        self._complete = frame.complete
        self._what = what

    def _short(self) -> NoReturn:
        if self._complete:
            raise protocol_violation(f"{self._what} is truncated")
        raise _Cut

    def raw(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            self._short()
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def partial(self, n: int) -> tuple[bytes, bool]:
        """Up to ``n`` bytes, and whether all ``n`` were there (not cut)."""
        out = self._data[self._pos : self._pos + n]
        if len(out) < n and self._complete:
            self._short()
        self._pos += len(out)
        return out, len(out) == n

    def number(self, size: int, *, signed: bool = True) -> int:
        return int.from_bytes(self.raw(size), "big", signed=signed)

    def cstring(self) -> tuple[bytes, bool]:
        """A NUL-terminated string, and whether its end was seen (not cut)."""
        end = self._data.find(b"\x00", self._pos)
        if end < 0:
            if self._complete:
                raise protocol_violation(f"{self._what} has a string without its NUL")
            out = self._data[self._pos :]
            self._pos = len(self._data)
            return out, False
        out = self._data[self._pos : end]
        self._pos = end + 1
        return out, True

    def formats(self) -> tuple[int, ...]:
        codes = tuple(self.number(2) for _ in range(self.number(2, signed=False)))
        if any(code not in (0, 1) for code in codes):
            raise protocol_violation(f"{self._what} has an invalid format code")
        return codes

    def counted(self, a_value: str) -> tuple[tuple[int, ...], int]:
        """Format codes, then how many values follow (Bind's parameters,
        FunctionCall's arguments: ``a_value`` names one, "a parameter")."""
        formats = self.formats()
        count = self.number(2, signed=False)
        if len(formats) not in (0, 1, count):
            noun = a_value.split()[-1]
            raise protocol_violation(f"{self._what} has a format count that matches no {noun} count")
        return formats, count

    def length(self, a_value: str) -> int:
        """One value's length; -1 is NULL."""
        size = self.number(4)
        if size < -1:
            raise protocol_violation(f"{self._what} has {a_value} of negative length")
        return size

    def end(self) -> None:
        if self._complete and self._pos != len(self._data):
            raise protocol_violation(f"{self._what} has unexpected trailing bytes")


def _text(data: bytes, limit: int) -> tuple[str, bool]:
    """``data`` cut to ``limit`` bytes and decoded leniently; and whether cut."""
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


# --- the auditors --------------------------------------------------------------------


class _Auditor:
    """Shared machinery: a splitter, an event queue, the CopyData run, EOF."""

    _direction: CopyDirection

    def __init__(self, *, max_text: int, max_message: int, max_length: int) -> None:
        if max_text < 1 or max_message < 1:
            raise ValueError("max_text and max_message must be positive")
        self._max_text = max_text
        self._max_message = max_message
        self._prefix = max_text + _PREFIX_SLACK
        self._splitter = FrameSplitter(self._keep, max_length=max_length)
        self._events: deque[object] = deque()
        self._copy_messages = 0
        self._copy_bytes = 0
        self._ended = False  # a Terminate was seen: stop parsing
        self._eof = False
        self._closed: ConnectionClosed | None = None
        self._error: RemoteProtocolError | None = None
        self.messages_seen = 0
        self.bytes_seen = 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Parse a copy of the next bytes of the stream; ``b""`` for EOF.
        Never raises for the peer's sake: next_event() does, in order."""
        if not data:
            if not self._eof:
                self._eof = True
                if self._error is None:
                    self._flush_copy()
                    self._closed = ConnectionClosed(clean=self._splitter.at_boundary)
            return
        if self._eof:
            raise LocalProtocolError("receive_data() got bytes after EOF (b'')")
        self.bytes_seen += len(data)
        if self._error is not None or self._ended:
            return
        try:
            for frame in self._splitter.feed(data):
                self.messages_seen += 1
                if frame.type_code == b"d":
                    self._copy_messages += 1
                    self._copy_bytes += frame.body_length
                    continue
                self._flush_copy()
                self._on_frame(frame)
                if self._ended:
                    break
        except RemoteProtocolError as exc:
            self._error = exc

    def next_event(self) -> object:
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            err = self._error
            raise RemoteProtocolError(err.message, code=err.code, wire_hint=err.wire_hint) from err
        if self._closed is not None:
            return self._closed
        return NEED_DATA

    def _flush_copy(self) -> None:
        if self._copy_messages:
            self._events.append(CopyDataEvent(direction=self._direction,
                                              messages=self._copy_messages,
                                              bytes=self._copy_bytes))
            self._copy_messages = self._copy_bytes = 0

    def _whole_or_prefix(self, size: int) -> int:
        return size if size <= self._max_message else self._prefix

    # Provided by each subclass: how much of a message to keep (or raise, for
    # a type the stream may not carry), and what a kept frame means.
    _keep: Callable[[bytes, int], int]
    _on_frame: Callable[[Frame], None]


# Frontend messages with no body at all.
_EMPTY_FRONTEND: Final = frozenset({b"S", b"H", b"c", b"X"})


class FrontendAuditor(_Auditor):
    """Audit events from the client -> server stream (after startup).

    ``bind_values`` adds Bind parameter values to BindEvent (each cut to
    ``max_value`` bytes); ``report_all`` adds a MessageEvent for every
    message that has no event of its own.
    """

    _direction = CopyDirection.IN

    def __init__(self, *, max_text: int = DEFAULT_MAX_TEXT,
                 max_message: int = DEFAULT_MAX_MESSAGE, bind_values: bool = False,
                 max_value: int = 256, report_all: bool = False,
                 max_length: int = MAX_MESSAGE_LENGTH) -> None:
        super().__init__(max_text=max_text, max_message=max_message, max_length=max_length)
        self._bind_values = bind_values
        self._max_value = max_value
        self._report_all = report_all

    def next_event(self) -> FrontendEvent | Literal[Signal.NEED_DATA]:  # type: ignore[override]
        """The next event, or NEED_DATA; after EOF, ConnectionClosed forever.
        Raises RemoteProtocolError (08P01) for a malformed stream."""
        return super().next_event()  # type: ignore[return-value]

    def _keep(self, type_code: bytes, size: int) -> int:
        if type_code not in FRONTEND_TYPES:
            raise protocol_violation(f"invalid frontend message type {type_code!r}")
        if type_code in _EMPTY_FRONTEND:
            if size:
                raise protocol_violation(f"invalid length for message type {type_code!r}")
            return 0
        if type_code in (b"d", b"p"):
            return 0  # CopyData is counted; password messages are never read
        return self._whole_or_prefix(size)

    def _on_frame(self, frame: Frame) -> None:
        handler = _FRONTEND_HANDLERS.get(frame.type_code)
        event = handler(self, frame) if handler is not None else None
        if event is None and self._report_all:
            event = MessageEvent(type_code=frame.type_code, size=frame.body_length)
        if event is not None:
            self._events.append(event)

    def _query(self, frame: Frame) -> QueryEvent:
        r = _Fields(frame, "Query")
        raw, whole = r.cstring()
        r.end()
        text, cut = _text(raw, self._max_text)
        return QueryEvent(text=text, truncated=cut or not whole, size=frame.body_length)

    def _parse(self, frame: Frame) -> ParseEvent:
        r = _Fields(frame, "Parse")
        name, raw, count, whole = b"", b"", None, False
        try:
            name, whole = r.cstring()
            if whole:
                raw, whole = r.cstring()
            if whole:
                count = r.number(2, signed=False)
                r.raw(4 * count)
                r.end()
        except _Cut:
            whole = False
        text, cut = _text(raw, self._max_text)
        return ParseEvent(statement=_text(name, self._max_text)[0], text=text,
                          truncated=cut or not whole, size=frame.body_length,
                          param_types=count)

    def _bind(self, frame: Frame) -> BindEvent:
        r = _Fields(frame, "Bind")
        portal = statement = b""
        count: int | None = None
        formats: tuple[int, ...] = ()
        values: list[bytes | None] = []
        cut = False
        try:
            portal, whole = r.cstring()
            if not whole:
                raise _Cut
            statement, whole = r.cstring()
            if not whole:
                raise _Cut
            formats, count = r.counted("a parameter")
            for _ in range(count):
                size = r.length("a parameter")
                if size == -1:
                    values.append(None)
                    continue
                value, whole = r.partial(size)
                values.append(value[: self._max_value])
                cut = cut or size > self._max_value
                if not whole:
                    raise _Cut
            r.formats()  # result column formats
            r.end()
        except _Cut:
            cut = True
        return BindEvent(portal=_text(portal, self._max_text)[0],
                         statement=_text(statement, self._max_text)[0], param_count=count,
                         param_formats=formats,
                         values=tuple(values) if self._bind_values else None,
                         truncated=cut, size=frame.body_length)

    def _execute(self, frame: Frame) -> ExecuteEvent:
        r = _Fields(frame, "Execute")
        portal, _ = r.cstring()
        try:
            max_rows = r.number(4)
        except _Cut:
            max_rows = 0  # only a portal name of over max_message bytes gets here
        r.end()
        return ExecuteEvent(portal=_text(portal, self._max_text)[0], max_rows=max_rows)

    def _function_call(self, frame: Frame) -> FunctionCallEvent:
        r = _Fields(frame, "FunctionCall")
        oid = r.number(4, signed=False)  # the prefix always holds these 4 bytes
        count: int | None = None
        try:
            _, count = r.counted("an argument")
            for _ in range(count):
                r.raw(max(r.length("an argument"), 0))
            if r.number(2) not in (0, 1):
                raise protocol_violation("FunctionCall has an invalid result format")
            r.end()
        except _Cut:
            pass
        return FunctionCallEvent(oid=oid, arg_count=count, size=frame.body_length)

    def _copy_done(self, frame: Frame) -> CopyDoneEvent:
        return CopyDoneEvent(direction=CopyDirection.IN)

    def _copy_fail(self, frame: Frame) -> CopyFailEvent:
        r = _Fields(frame, "CopyFail")
        raw, whole = r.cstring()
        r.end()
        text, cut = _text(raw, self._max_text)
        return CopyFailEvent(message=text, truncated=cut or not whole)

    def _target(self, frame: Frame) -> None:
        # Describe and Close: checked, but reported only as a MessageEvent.
        r = _Fields(frame, "Describe" if frame.type_code == b"D" else "Close")
        if r.raw(1) not in (b"S", b"P"):
            raise protocol_violation("Describe/Close must name a statement or a portal")
        r.cstring()
        r.end()

    def _terminate(self, frame: Frame) -> TerminateEvent:
        self._ended = True
        return TerminateEvent()


_FRONTEND_HANDLERS: Final[dict[bytes, Callable[[FrontendAuditor, Frame], object]]] = {
    b"Q": FrontendAuditor._query,
    b"P": FrontendAuditor._parse,
    b"B": FrontendAuditor._bind,
    b"E": FrontendAuditor._execute,
    b"F": FrontendAuditor._function_call,
    b"c": FrontendAuditor._copy_done,
    b"f": FrontendAuditor._copy_fail,
    b"D": FrontendAuditor._target,
    b"C": FrontendAuditor._target,
    b"X": FrontendAuditor._terminate,
}

_COPY_RESPONSES: Final = {b"G": CopyDirection.IN, b"H": CopyDirection.OUT,
                          b"W": CopyDirection.BOTH}
_AUDITED_BACKEND: Final = frozenset({b"E", b"C", b"Z", b"c", *_COPY_RESPONSES})


class BackendAuditor(_Auditor):
    """Audit events from the server -> client stream (after startup):
    errors, command tags, COPY starts, CopyData totals, ReadyForQuery.
    Message types it does not know are skipped (a newer server may add some)."""

    _direction = CopyDirection.OUT

    def __init__(self, *, max_text: int = DEFAULT_MAX_TEXT,
                 max_message: int = DEFAULT_MAX_MESSAGE,
                 max_length: int = MAX_MESSAGE_LENGTH) -> None:
        super().__init__(max_text=max_text, max_message=max_message, max_length=max_length)

    def next_event(self) -> BackendEvent | Literal[Signal.NEED_DATA]:  # type: ignore[override]
        """The next event, or NEED_DATA; after EOF, ConnectionClosed forever.
        Raises RemoteProtocolError (08P01) for a malformed stream."""
        return super().next_event()  # type: ignore[return-value]

    def _keep(self, type_code: bytes, size: int) -> int:
        if (type_code == b"Z" and size != 1) or (type_code == b"c" and size):
            raise protocol_violation(f"invalid length for message type {type_code!r}")
        if type_code in (b"E", b"C", b"Z") or type_code in _COPY_RESPONSES:
            return self._whole_or_prefix(size)
        return 0  # DataRow, RowDescription, notices, ...: not audited

    def _on_frame(self, frame: Frame) -> None:
        type_code = frame.type_code
        if type_code not in _AUDITED_BACKEND:
            return
        r = _Fields(frame, f"backend message {type_code!r}")
        if type_code == b"E":
            self._events.append(self._error_event(r))
        elif type_code == b"C":
            raw, _ = r.cstring()
            r.end()
            self._events.append(CommandCompleteEvent(tag=_text(raw, self._max_text)[0]))
        elif type_code == b"Z":
            status = r.raw(1).decode("latin-1")
            if status not in ("I", "T", "E"):
                raise protocol_violation("ReadyForQuery has an unknown transaction status")
            self._events.append(ReadyForQueryEvent(status=status))
        elif type_code == b"c":
            self._events.append(CopyDoneEvent(direction=CopyDirection.OUT))
        else:  # G, H or W
            self._events.append(self._copy_response(type_code, r))

    def _error_event(self, r: _Fields) -> ErrorEvent:
        fields: dict[bytes, bytes] = {}
        whole = True
        try:
            while (code := r.raw(1)) != b"\x00":
                value, whole = r.cstring()
                fields[code] = value
                if not whole:
                    break
            else:
                r.end()
        except _Cut:
            whole = False
        message, cut = _text(fields.get(b"M", b""), self._max_text)
        severity = fields.get(b"V") or fields.get(b"S")
        sqlstate = fields.get(b"C")
        return ErrorEvent(
            severity=None if severity is None else _text(severity, 64)[0],
            sqlstate=None if sqlstate is None else _text(sqlstate, 16)[0],
            message=message, truncated=cut or not whole,
        )

    def _copy_response(self, type_code: bytes, r: _Fields) -> CopyResponseEvent:
        fmt = r.raw(1)[0]
        try:
            columns = len(r.formats())
        except _Cut:
            columns = -1  # only a response of over max_message bytes gets here
        if fmt not in (0, 1):
            raise protocol_violation("a CopyResponse has an invalid format")
        r.end()
        return CopyResponseEvent(direction=_COPY_RESPONSES[type_code], format=fmt,
                                 columns=columns)

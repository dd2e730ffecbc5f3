"""Audit events from a relayed PostgreSQL session: the cluster's side.

Spec: PostgreSQL docs, "Frontend/Backend Protocol": Simple Query, Extended
Query, Function Call, COPY Operations, Termination; "Message Formats".

Theory of operation
-------------------
The relay copies every client -> server byte (after the startup phase) into a
:class:`FrontendAuditor` and every server -> client byte into a
:class:`BackendAuditor`, in whatever chunks it read them. Both are built on
:class:`~protocols.auditor.StreamAuditor`, over the PostgreSQL frame layout
(``receive_data``, then ``next_event()`` until ``NEED_DATA``; no reference
to a chunk is kept, so the relay may reuse its buffers).

This runs on every message of every session, so each message is read only
as far as an event needs it (issue 14):

* server -> client: only ErrorResponse and COPY are read (and, with
  ``completions``, CommandComplete and ReadyForQuery). DataRow,
  RowDescription and everything else are skipped by their length, unread
  and uncopied.
* client -> server: Query, Parse, Execute, FunctionCall and CopyFail are
  read; Bind up to its parameter count (its values only with
  ``bind_values``); Sync, Flush, Describe, Close and password messages
  ('p', never looked into) are skipped by their length unless
  ``report_all`` asks for them.
* CopyData is never kept: consecutive CopyData messages are counted from
  their headers and summed into one :class:`CopyDataEvent` (messages and
  bytes), handed out when the run ends.

Memory is bounded whatever the peer sends: a message is kept whole only
when it is at most ``max_message`` bytes (1 MiB by default), else as a
prefix (``max_text`` + 1 KiB): the event then carries what the prefix held
and ``truncated=True``, and the rest of the body streams past uncounted
except for its length. A statement (Query, Parse) is the exception: its
event carries its full length and SHA-256, and its text whole up to
``max_text`` bytes or else its first and last halves of that around a
marker (:class:`~protocols.auditor.Statement`); in a message kept only as a
prefix, the rest of the statement is followed as it streams past and the
event comes when the message ends. Other text is cut to ``max_text`` bytes,
with a flag.

Text is decoded as UTF-8 with replacement: the session's client_encoding
may be anything, and an audit record must never fail over it. Framing, and
the layout of what is read, are checked as strictly as the server checks
them, so a malformed stream raises RemoteProtocolError (08P01) once the
events before it have been handed out; the auditor is then poisoned. What
is skipped unread is not checked.
"""

from __future__ import annotations

import enum
from hashlib import sha256
import struct
from collections.abc import Callable
from typing import Final, Literal, NoReturn, Union

import attrs

from protocols.auditor import DEFAULT_MAX_TEXT, Statement, StatementReader, StreamAuditor
from protocols.framing import POSTGRES_MESSAGE, Frame
from protocols.postgres.messages import (
    FRONTEND_TYPES, MAX_MESSAGE_LENGTH, ConnectionClosed, Signal, protocol_violation,
)

__all__ = [
    "DEFAULT_MAX_TEXT", "DEFAULT_MAX_MESSAGE", "CopyDirection",
    "QueryEvent", "ParseEvent", "BindEvent", "ExecuteEvent", "FunctionCallEvent",
    "CopyDataEvent", "CopyDoneEvent", "CopyFailEvent", "TerminateEvent", "MessageEvent",
    "ErrorEvent", "CommandCompleteEvent", "CopyResponseEvent", "ReadyForQueryEvent",
    "FrontendEvent", "BackendEvent", "FrontendAuditor", "BackendAuditor",
]

DEFAULT_MAX_MESSAGE: Final = 1024 * 1024
_PREFIX_SLACK: Final = 1024  # room for names and counts ahead of the text
_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")


class CopyDirection(enum.Enum):
    IN = "in"  # client -> server (COPY FROM STDIN)
    OUT = "out"  # server -> client (COPY TO STDOUT)
    BOTH = "both"  # CopyBothResponse (replication)


_event = attrs.frozen(kw_only=True)


# --- frontend events -----------------------------------------------------------


@_event
class QueryEvent:
    """A simple Query: one or more statements, run now."""

    text: str  # whole, or its head and tail (protocols.auditor.Statement)
    truncated: bool  # text is not all of the statement
    length: int  # the statement's full length in bytes
    sha256: str  # of all of its bytes
    size: int  # the message body's full size in bytes


@_event
class ParseEvent:
    """Parse: prepare ``text`` as ``statement`` ("" is the unnamed one)."""

    statement: str
    text: str  # as QueryEvent's
    truncated: bool
    length: int
    sha256: str
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


class _Auditor(StreamAuditor):
    """What both directions share: PostgreSQL framing, the bounds, and the
    CopyData run (counted from the headers, bodies skipped unseen)."""

    _direction: CopyDirection

    def __init__(self, *, max_text: int, max_message: int, max_length: int,
                 only: frozenset | None = None) -> None:
        if max_text < 1 or max_message < 1:
            raise ValueError("max_text and max_message must be positive")
        super().__init__(POSTGRES_MESSAGE, max_length=max_length, only=only)
        self._max_text = max_text
        self._max_message = max_message
        self._prefix = max_text + _PREFIX_SLACK
        self._copy_messages = 0
        self._copy_bytes = 0

    def _count_copy(self, size: int) -> None:
        self._copy_messages += 1
        self._copy_bytes += size

    def _flush_copy(self) -> None:
        if self._copy_messages:
            self._events.append(CopyDataEvent(direction=self._direction,
                                              messages=self._copy_messages,
                                              bytes=self._copy_bytes))
            self._copy_messages = self._copy_bytes = 0

    _on_eof = _flush_copy

    def _whole_or_prefix(self, size: int) -> int:
        return size if size <= self._max_message else self._prefix


#: A handler's answer when its event comes once the message's rest has
#: streamed past (a statement in a message over max_message).
_LATER: Final = object()

# How much of each frontend message the events need. Bodies of the types in
# _EMPTY_FRONTEND must be empty; _QUIET ones make no event of their own and
# are skipped by their length unless report_all asks for a MessageEvent.
_EMPTY_FRONTEND: Final = frozenset({b"S", b"H", b"c", b"X"})
_QUIET: Final = frozenset({b"S", b"H", b"D", b"C", b"p"})


class FrontendAuditor(_Auditor):
    """Audit events from the client -> server stream (after startup).

    Query, Parse, Execute, FunctionCall, CopyFail and CopyDone make events;
    Bind is read up to its parameter count (the values only with
    ``bind_values``, each cut to ``max_value`` bytes). Sync, Flush, Describe,
    Close and password messages are skipped by their length, unless
    ``report_all`` asks for a MessageEvent for each (Describe and Close are
    then checked too).
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

    def next_event(self) -> FrontendEvent | Literal[Signal.NEED_DATA]:
        """The next event, or NEED_DATA; after EOF, ConnectionClosed forever.
        Raises RemoteProtocolError (08P01) for a malformed stream."""
        return super().next_event()  # type: ignore[no-any-return]

    def _keep(self, type_code: bytes, size: int) -> int | None:
        if type_code == b"d":
            self._count_copy(size)
            return None
        if type_code not in FRONTEND_TYPES:
            raise protocol_violation(f"invalid frontend message type {type_code!r}")
        if type_code in _EMPTY_FRONTEND and size:
            raise protocol_violation(f"invalid length for message type {type_code!r}")
        if type_code in _QUIET:
            if not self._report_all:
                return None
            return 0 if type_code in (b"S", b"H", b"p") else self._whole_or_prefix(size)
        if type_code == b"B" and not self._bind_values:
            return min(size, self._prefix)  # the count comes before the values
        return self._whole_or_prefix(size)

    def _on_frame(self, frame: Frame) -> None:
        if self._copy_messages:
            self._flush_copy()
        handler = _FRONTEND_HANDLERS.get(frame.kind)  # (type_code, without the property's call)
        event = handler(self, frame) if handler is not None else None
        if event is _LATER:  # queued when the rest of the message has gone by
            return
        if event is None and self._report_all:
            event = MessageEvent(type_code=frame.type_code, size=frame.body_length)
        if event is not None:
            self._events.append(event)

    def _query(self, frame: Frame) -> QueryEvent | object:
        size = frame.body_length

        def event(s: Statement) -> QueryEvent:
            return QueryEvent(text=s.text, truncated=s.truncated, length=s.length, sha256=s.sha256,
                              size=size)

        if len(frame.body) == size:  # frame.complete, inline: once per statement
            body = frame.body
            nul = body.find(b"\x00")
            if 0 <= nul == size - 1 and size <= self._max_text:
                # The usual Query, whole and short (once per statement): the
                # event straight from the bytes, the same as the general way.
                raw = body[:nul]
                return QueryEvent(text=raw.decode("utf-8", "replace"), truncated=False, length=nul,
                                  sha256=sha256(raw).hexdigest(), size=size)
            r = _Fields(frame, "Query")
            raw, _ = r.cstring()
            r.end()
            return event(StatementReader.of(raw, self._max_text))
        return self._statement_of(frame, StatementReader(self._max_text, until=b"\x00"), event)

    def _parse(self, frame: Frame) -> ParseEvent | object:
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
            pass
        statement_name, size = _text(name, self._max_text)[0], frame.body_length

        def event(s: Statement) -> ParseEvent:
            return ParseEvent(statement=statement_name, text=s.text, truncated=s.truncated,
                              length=s.length, sha256=s.sha256, size=size, param_types=count)

        if frame.complete:
            return event(StatementReader.of(raw, self._max_text))
        # Past the name (however long) to the text's NUL: the rest streams past.
        return self._statement_of(frame, StatementReader(self._max_text, until=b"\x00", after=1), event)

    def _statement_of(self, frame: Frame, reader: StatementReader,
                      event: Callable[[Statement], object]) -> object:
        """The event of a statement in a message kept only as a prefix: now
        if the prefix holds all of the statement, else :data:`_LATER`."""
        reader.update(frame.body)
        statement = self._statement(frame, reader, event)
        return _LATER if statement is None else event(statement)

    def _bind(self, frame: Frame) -> BindEvent:
        if not self._bind_values and frame.complete:
            event = self._bind_head(frame)
            if event is not None:
                return event
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
            # Without the values, the event lacks nothing but what was never
            # read: it is whole if the message was.
            cut = self._bind_values_of(r, count, values) if self._bind_values else not frame.complete
        except _Cut:
            cut = True
        return BindEvent(portal=_text(portal, self._max_text)[0],
                         statement=_text(statement, self._max_text)[0], param_count=count,
                         param_formats=formats,
                         values=tuple(values) if self._bind_values else None,
                         truncated=cut, size=frame.body_length)

    def _bind_head(self, frame: Frame) -> BindEvent | None:
        """The common case of :meth:`_bind`, without its reader: a whole Bind
        read only up to its parameter count. None if anything is off (the
        reader then says what)."""
        body = frame.body
        portal_end = body.find(b"\x00")
        statement_end = body.find(b"\x00", portal_end + 1)
        if portal_end < 0 or statement_end < 0:
            return None
        pos = statement_end + 1
        if len(body) < pos + 2:
            return None
        (n_formats,) = _U16.unpack_from(body, pos)
        count_at = pos + 2 + 2 * n_formats
        if len(body) < count_at + 2:
            return None
        formats = struct.unpack_from(f">{n_formats}h", body, pos + 2) if n_formats else ()
        (count,) = _U16.unpack_from(body, count_at)
        if any(code not in (0, 1) for code in formats) or n_formats not in (0, 1, count):
            return None
        limit = self._max_text
        return BindEvent(portal=_text(body[:portal_end], limit)[0],
                         statement=_text(body[portal_end + 1 : statement_end], limit)[0],
                         param_count=count, param_formats=formats, values=None,
                         truncated=False, size=frame.body_length)

    def _bind_values_of(self, r: _Fields, count: int, values: list[bytes | None]) -> bool:
        """Read Bind's ``count`` values (and the rest of it) into ``values``;
        whether any was cut to max_value."""
        cut = False
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
        return cut

    def _execute(self, frame: Frame) -> ExecuteEvent:
        body = frame.body
        end = len(body) - 5
        if end >= 0 and body.find(b"\x00") == end:  # the common case, whole
            return ExecuteEvent(portal=_text(body[:end], self._max_text)[0],
                                max_rows=_I32.unpack_from(body, end + 1)[0])
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
        # Describe and Close (read only for report_all): checked, but
        # reported only as a MessageEvent.
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
# What the backend auditor reads: errors and COPY; with ``completions``,
# CommandComplete and ReadyForQuery too. Everything else (DataRow,
# RowDescription, BindComplete, notices...) is skipped by its length.
_BACKEND_READ: Final = frozenset({b"E", b"c", b"d", *_COPY_RESPONSES})
_COMPLETIONS: Final = frozenset({b"C", b"Z"})


class BackendAuditor(_Auditor):
    """Audit events from the server -> client stream (after startup):
    errors, COPY starts, CopyData totals and CopyDone; with
    ``completions=True`` also CommandComplete and ReadyForQuery (a decode per
    statement and per transaction that the cluster's audit does not need).
    Every other message, known or not (a newer server may add some), is
    skipped by its length, unread."""

    _direction = CopyDirection.OUT

    def __init__(self, *, max_text: int = DEFAULT_MAX_TEXT,
                 max_message: int = DEFAULT_MAX_MESSAGE, completions: bool = False,
                 max_length: int = MAX_MESSAGE_LENGTH) -> None:
        read = _BACKEND_READ | _COMPLETIONS if completions else _BACKEND_READ
        # Only these are looked at; the rest pass by their length unasked.
        super().__init__(max_text=max_text, max_message=max_message, max_length=max_length, only=read)
        self._read = read

    def next_event(self) -> BackendEvent | Literal[Signal.NEED_DATA]:
        """The next event, or NEED_DATA; after EOF, ConnectionClosed forever.
        Raises RemoteProtocolError (08P01) for a malformed stream."""
        return super().next_event()  # type: ignore[no-any-return]

    def _keep(self, type_code: bytes, size: int) -> int | None:
        if type_code not in self._read:
            return None  # DataRow, RowDescription, ...: the per-row path is this
        if type_code == b"d":
            self._count_copy(size)
            return None
        if (type_code == b"Z" and size != 1) or (type_code == b"c" and size):
            raise protocol_violation(f"invalid length for message type {type_code!r}")
        return self._whole_or_prefix(size)

    def _on_frame(self, frame: Frame) -> None:
        if self._copy_messages:
            self._flush_copy()
        type_code = frame.kind
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

"""The client -> server half of a PostgreSQL session's audit:
statements (Query, Parse, Bind, Execute, FunctionCall), COPY from the
client, Terminate."""

from __future__ import annotations

import struct
from collections.abc import Callable
from hashlib import sha256
from typing import Final, Literal

from protocols.auditor import DEFAULT_MAX_TEXT, LATER, Statement, StatementReader
from protocols.framing import Frame
from protocols.postgres.audit.events import (
    BindEvent, CopyDirection, CopyDoneEvent, CopyFailEvent, ExecuteEvent, FrontendEvent, FunctionCallEvent,
    MessageEvent, ParseEvent, QueryEvent, TerminateEvent,
)
from protocols.postgres.audit.reading import DEFAULT_MAX_MESSAGE, Auditor, Cut, Fields, clip_text
from protocols.postgres.messages import FRONTEND_TYPES, MAX_MESSAGE_LENGTH, Signal, protocol_violation

_U16 = struct.Struct(">H")
_I32 = struct.Struct(">i")

# How much of each frontend message the events need. Bodies of the types in
# _EMPTY_FRONTEND must be empty; _QUIET ones make no event of their own and
# are skipped by their length unless report_all asks for a MessageEvent.
_EMPTY_FRONTEND: Final = frozenset({b"S", b"H", b"c", b"X"})
_QUIET: Final = frozenset({b"S", b"H", b"D", b"C", b"p"})


class FrontendAuditor(Auditor):
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
        if event is LATER:  # queued when the rest of the message has gone by
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
            r = Fields(frame, "Query")
            raw, _ = r.cstring()
            r.end()
            return event(StatementReader.of(raw, self._max_text))
        return self._statement_of(frame, StatementReader(self._max_text, until=b"\x00"), event)

    def _parse(self, frame: Frame) -> ParseEvent | object:
        r = Fields(frame, "Parse")
        name, raw, count, whole = b"", b"", None, False
        try:
            name, whole = r.cstring()
            if whole:
                raw, whole = r.cstring()
            if whole:
                count = r.number(2, signed=False)
                r.raw(4 * count)
                r.end()
        except Cut:
            pass
        statement_name, size = clip_text(name, self._max_text)[0], frame.body_length

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
        if the prefix holds all of the statement, else :data:`LATER`."""
        reader.update(frame.body)
        return self._statement_event(frame, reader, event)

    def _bind(self, frame: Frame) -> BindEvent:
        if not self._bind_values and frame.complete:
            event = self._bind_head(frame)
            if event is not None:
                return event
        r = Fields(frame, "Bind")
        portal = statement = b""
        count: int | None = None
        formats: tuple[int, ...] = ()
        values: list[bytes | None] = []
        cut = False
        try:
            portal, whole = r.cstring()
            if not whole:
                raise Cut
            statement, whole = r.cstring()
            if not whole:
                raise Cut
            formats, count = r.counted("a parameter")
            # Without the values, the event lacks nothing but what was never
            # read: it is whole if the message was.
            cut = self._bind_values_of(r, count, values) if self._bind_values else not frame.complete
        except Cut:
            cut = True
        return BindEvent(portal=clip_text(portal, self._max_text)[0],
                         statement=clip_text(statement, self._max_text)[0], param_count=count,
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
        return BindEvent(portal=clip_text(body[:portal_end], limit)[0],
                         statement=clip_text(body[portal_end + 1 : statement_end], limit)[0],
                         param_count=count, param_formats=formats, values=None,
                         truncated=False, size=frame.body_length)

    def _bind_values_of(self, r: Fields, count: int, values: list[bytes | None]) -> bool:
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
                raise Cut
        r.formats()  # result column formats
        r.end()
        return cut

    def _execute(self, frame: Frame) -> ExecuteEvent:
        body = frame.body
        end = len(body) - 5
        if end >= 0 and body.find(b"\x00") == end:  # the common case, whole
            return ExecuteEvent(portal=clip_text(body[:end], self._max_text)[0],
                                max_rows=_I32.unpack_from(body, end + 1)[0])
        r = Fields(frame, "Execute")
        portal, _ = r.cstring()
        try:
            max_rows = r.number(4)
        except Cut:
            max_rows = 0  # only a portal name of over max_message bytes gets here
        r.end()
        return ExecuteEvent(portal=clip_text(portal, self._max_text)[0], max_rows=max_rows)

    def _function_call(self, frame: Frame) -> FunctionCallEvent:
        r = Fields(frame, "FunctionCall")
        oid = r.number(4, signed=False)  # the prefix always holds these 4 bytes
        count: int | None = None
        try:
            _, count = r.counted("an argument")
            for _ in range(count):
                r.raw(max(r.length("an argument"), 0))
            if r.number(2) not in (0, 1):
                raise protocol_violation("FunctionCall has an invalid result format")
            r.end()
        except Cut:
            pass
        return FunctionCallEvent(oid=oid, arg_count=count, size=frame.body_length)

    def _copy_done(self, frame: Frame) -> CopyDoneEvent:
        return CopyDoneEvent(direction=CopyDirection.IN)

    def _copy_fail(self, frame: Frame) -> CopyFailEvent:
        r = Fields(frame, "CopyFail")
        raw, whole = r.cstring()
        r.end()
        text, cut = clip_text(raw, self._max_text)
        return CopyFailEvent(message=text, truncated=cut or not whole)

    def _target(self, frame: Frame) -> None:
        # Describe and Close (read only for report_all): checked, but
        # reported only as a MessageEvent.
        r = Fields(frame, "Describe" if frame.type_code == b"D" else "Close")
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

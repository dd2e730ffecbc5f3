"""The base of every streaming statement auditor (PostgreSQL today; MySQL and
MongoDB next): bytes of one direction of a relayed session in, audit events
out.

Theory of operation
-------------------
The relay copies each chunk it forwards into an auditor, h11 style:
``receive_data(bytes)`` (``b""`` for EOF), then ``next_event()`` until it
returns ``NEED_DATA``. ``receive_data`` parses at once and keeps no
reference to the chunk, so the relay may reuse its buffers; it never raises
for the peer's sake: a malformed stream is raised by ``next_event()``, after
the events that came before it, and poisons the auditor.

Parsing is a :class:`~protocols.framing.FrameSplitter` over the protocol's
:class:`~protocols.framing.FrameLayout`, with the subclass's ``_keep`` as its
policy, and the cost is set there: a message no event needs is skipped by
its length (``_keep`` returns None: no copy, no object), and one that is
needed is kept whole only up to ``max_message`` bytes, else as a prefix the
event is built from (flagged truncated). Memory is bounded by that, whatever
the peer sends. ``_on_frame`` turns a kept frame into events
(``self._events.append``), decoding only as far as they need.

Statements are recorded so that nothing can hide in them (issue 15, item
6: a 17 KiB leading comment once pushed a ``CREATE TABLE`` past a 16 KiB
cut). Every statement event carries a :class:`Statement`: the statement's
full length in bytes and its SHA-256, always, and its text whole when it
fits ``max_text`` bytes, else its first and last ``max_text / 2`` bytes
around a marker that says how many bytes are left out (``truncated``).
A statement in a message kept only as a prefix is not cut short either: a
subclass hands it to :meth:`StreamAuditor._statement`, which follows the
rest of the message as it streams past (:meth:`FrameSplitter.follow`),
into the digest and the tail, and queues the event when the message ends.
A statement may also go on past its frame, in frames of its own (MySQL
sends a payload of 2^24-1 bytes or more as several packets): the subclass
says so (``continued``) and hands each further frame to
:meth:`StreamAuditor._statement_goes_on`, keeping as little of it as it
likes; the rest of each is followed the same way, and the event comes
with the last. So a statement of any size costs ``max_text`` bytes and a
hash state.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Callable
from typing import Any, Final

import attrs

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.framing import Frame, FrameLayout, FrameSplitter
from protocols.signals import NEED_DATA, ConnectionClosed

__all__ = ["DEFAULT_MAX_TEXT", "LATER", "Statement", "StatementReader", "StreamAuditor"]

#: Statement text an event carries: the whole text up to this many bytes,
#: else the first and the last half of it.
DEFAULT_MAX_TEXT: Final = 16 * 1024

#: What :meth:`StreamAuditor._statement_event` answers when the event comes
#: later, once the rest of its statement has streamed past.
LATER: Final = object()


@attrs.frozen(kw_only=True)
class Statement:
    """A statement as the audit records it."""

    #: The text (decoded leniently): whole, or its head and tail around a
    #: marker saying how many bytes are left out between them.
    text: str
    #: The statement's full length in bytes, as sent.
    length: int
    #: SHA-256 (hex) of all of those bytes: compare it with the server's log.
    sha256: str
    #: The text is not all of the statement (cut in the middle, or the
    #: stream ended inside it).
    truncated: bool


class StatementReader:
    """A statement's bytes, fed in pieces of any size, into a
    :class:`Statement`: it keeps the first ``max_text // 2`` bytes, the last
    ``max_text - max_text // 2`` and a running SHA-256, whatever the
    statement's size. With ``until`` (PostgreSQL's NUL), the statement ends at
    that byte; :meth:`update` then says how much of a piece was statement.
    With ``after`` as well, the statement starts only past that many
    ``until`` bytes (PostgreSQL's Parse: the statement's name comes first)."""

    __slots__ = ("_head_size", "_tail_size", "_head", "_tail", "_hash", "length", "ended", "until",
                 "_after")

    def __init__(self, max_text: int = DEFAULT_MAX_TEXT, *, until: bytes | None = None,
                 after: int = 0) -> None:
        if after and until is None:
            raise ValueError("after counts until bytes: give until too")
        if max_text < 1:
            raise ValueError("max_text must be positive")
        self._head_size = max_text // 2
        self._tail_size = max_text - self._head_size
        self._head = bytearray()
        self._tail = bytearray()
        self._hash = hashlib.sha256()
        #: The byte that ends the statement (None: the caller says where it ends).
        self.until = until
        self._after = after
        #: Bytes of statement so far.
        self.length = 0
        #: The ``until`` byte has been seen: the statement is all in.
        self.ended = False

    def update(self, data: bytes | bytearray | memoryview) -> int:
        """Take the next bytes; how many of them were statement (all, unless
        ``until`` ended it among them; none once it has ended)."""
        if self.ended:
            return 0
        if self.until is not None:
            if type(data) is memoryview:
                data = data.tobytes()  # (only the rest of an oversized message comes as views)
            while self._after:
                skip = data.find(self.until)
                if skip < 0:
                    return 0
                data = data[skip + 1 :]
                self._after -= 1
            stop = data.find(self.until)
            if stop >= 0:
                data = data[:stop]
                self.ended = True
        taken = len(data)
        self._hash.update(data)
        self.length += taken
        room = self._head_size - len(self._head)
        if room > 0:
            self._head += data[:room]
            data = data[room:]
        if data:
            tail = self._tail
            tail += data[-self._tail_size :]
            if len(tail) > self._tail_size:
                del tail[: len(tail) - self._tail_size]
        return taken

    def result(self, *, complete: bool = True) -> Statement:
        """The statement read so far; ``complete=False``: its stream ended
        before the statement did (it is then flagged truncated)."""
        omitted = self.length - len(self._head) - len(self._tail)
        if omitted:
            text = (f"{self._head.decode('utf-8', 'replace')}\n/* [audit: {omitted} of {self.length} "
                    f"bytes not shown; sha256 is of them all] */\n{self._tail.decode('utf-8', 'replace')}")
        else:
            text = (self._head + self._tail).decode("utf-8", "replace")
        return Statement(text=text, length=self.length, sha256=self._hash.hexdigest(),
                         truncated=bool(omitted) or not complete)

    @classmethod
    def of(cls, data: bytes, max_text: int = DEFAULT_MAX_TEXT) -> Statement:
        """The :class:`Statement` of a statement held whole."""
        if len(data) <= max_text:  # the common case, on every statement: no reader
            return Statement(text=data.decode("utf-8", "replace"), length=len(data),
                             sha256=hashlib.sha256(data).hexdigest(), truncated=False)
        reader = cls(max_text)
        reader.update(data)
        return reader.result()


class StreamAuditor:
    """One direction of a relayed session, turned into audit events."""

    def __init__(self, layout: FrameLayout, *, max_length: int | None = None,
                 only: frozenset | None = None) -> None:
        """``only``: the kinds ``_keep`` is asked about, if not all: any
        other message is skipped by its length without the call."""
        self._splitter = FrameSplitter(layout, keep=self._keep, max_length=max_length, only=only)
        self._events: deque[Any] = deque()
        self._ended = False  # the stream said goodbye: parse nothing more
        self._eof = False
        self._closed: ConnectionClosed | None = None
        self._error: RemoteProtocolError | None = None
        #: Bytes received, parsed or not.
        self.bytes_seen = 0
        # A statement whose message is still streaming past: its reader and
        # what makes its event (see _statement); and whether it goes on in
        # frames after this one (``continued``).
        self._following: tuple[StatementReader, Callable[[Statement], Any]] | None = None
        self._continued = False

    @property
    def messages_seen(self) -> int:
        """Messages whose header has been read, skipped ones included."""
        return self._splitter.frames

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Parse the next bytes of the stream; ``b""`` for EOF. Never raises
        for the peer's sake: next_event() does, in order."""
        if not data:
            if not self._eof:
                self._eof = True
                if self._error is None:
                    clean = self._splitter.at_boundary
                    if self._following is not None:  # the stream ended inside a statement
                        reader, make = self._following
                        self._following, clean = None, False
                        self._events.append(make(reader.result(complete=False)))
                    self._on_eof()
                    self._closed = ConnectionClosed(clean=clean)
            return
        if self._eof:
            raise LocalProtocolError("receive_data() got bytes after EOF (b'')")
        self.bytes_seen += len(data)
        if self._error is not None or self._ended:
            return
        on_frame = self._on_frame
        try:
            for frame in self._splitter.feed(data):
                on_frame(frame)
                if self._ended:
                    break
        except RemoteProtocolError as exc:
            self._error = exc

    def next_event(self) -> Any:
        """The next event, or NEED_DATA; after EOF, ConnectionClosed forever.
        Raises RemoteProtocolError for a malformed stream."""
        if self._events:
            return self._events.popleft()
        if self._error is not None:
            err = self._error
            raise RemoteProtocolError(err.message, code=err.code, wire_hint=err.wire_hint) from err
        if self._closed is not None:
            return self._closed
        return NEED_DATA

    def next_events(self) -> list[Any]:
        """Every event ready now, in order: what :meth:`next_event` gives
        until ``NEED_DATA`` (or ``ConnectionClosed``, which is left out), in
        one call; ``[]`` if none. Raises RemoteProtocolError for a
        malformed stream once the events before it have been returned."""
        events = self._events
        if events:
            out = list(events)
            events.clear()
            return out
        if self._error is not None:
            self.next_event()  # raises it, as next_event() does
        return []

    # -- for a protocol's handlers ----------------------------------------------

    def _statement(self, frame: Frame, reader: StatementReader,
                   make: Callable[[Statement], Any], *, continued: bool = False) -> Statement | None:
        """The statement ``reader`` has read from ``frame``'s kept body. If
        the frame is whole (and the statement does not go on past it), or
        the statement ended inside what was kept, it is returned at once.
        Else None: the rest of the frame is followed as it streams past, and
        ``make(statement)`` is queued when the frame ends (or the stream
        does), so the event carries the statement's full length, digest and
        tail whatever its size. ``continued``: the statement goes on in the
        frames after this one, which the subclass hands to
        :meth:`_statement_goes_on`; the event then comes with the last."""
        if reader.ended or (frame.complete and not continued):
            return reader.result()
        self._following, self._continued = (reader, make), continued
        if not frame.complete:
            self._splitter.follow(reader.update, self._followed)
        return None

    def _statement_event(self, frame: Frame, reader: StatementReader,
                         make: Callable[[Statement], Any], *, continued: bool = False) -> Any:
        """:meth:`_statement`, for a handler: ``make``'s event now, or
        :data:`LATER` (it is queued when the statement has streamed past)."""
        statement = self._statement(frame, reader, make, continued=continued)
        return LATER if statement is None else make(statement)

    def _statement_goes_on(self, frame: Frame, *, last: bool) -> None:
        """A frame that carries more of the statement being followed (see
        :meth:`_statement`): its kept body, then the rest of it as it
        streams past, into the statement; ``last``: the statement ends
        with this frame."""
        reader, _ = self._following  # type: ignore[misc]
        reader.update(frame.body)
        self._continued = not last
        if not frame.complete:
            self._splitter.follow(reader.update, self._followed)
        elif last:
            self._followed()

    def _followed(self) -> None:
        if self._continued:
            return  # the statement goes on in the next frame
        reader, make = self._following  # type: ignore[misc]
        self._following = None
        # Ended at its terminator, or (a protocol without one) with the frame.
        self._events.append(make(reader.result(complete=reader.ended or reader.until is None)))

    # -- what a protocol provides ----------------------------------------------

    def _keep(self, kind: Any, body_length: int) -> int | None:
        """How much of a message's body the events need (None: skip it unseen).
        May raise RemoteProtocolError for a message the stream may not carry."""
        raise NotImplementedError

    def _on_frame(self, frame: Frame) -> None:
        """Queue the events a kept message makes."""
        raise NotImplementedError

    def _on_eof(self) -> None:
        """The stream ended: queue what was still being gathered."""

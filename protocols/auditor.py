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
"""

from __future__ import annotations

from collections import deque
from typing import Any

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.framing import Frame, FrameLayout, FrameSplitter
from protocols.signals import NEED_DATA, ConnectionClosed

__all__ = ["StreamAuditor"]


class StreamAuditor:
    """One direction of a relayed session, turned into audit events."""

    def __init__(self, layout: FrameLayout, *, max_length: int | None = None) -> None:
        self._splitter = FrameSplitter(layout, keep=self._keep, max_length=max_length)
        self._events: deque[Any] = deque()
        self._ended = False  # the stream said goodbye: parse nothing more
        self._eof = False
        self._closed: ConnectionClosed | None = None
        self._error: RemoteProtocolError | None = None
        #: Bytes received, parsed or not.
        self.bytes_seen = 0

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
                    self._on_eof()
                    self._closed = ConnectionClosed(clean=self._splitter.at_boundary)
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

"""Message filters: a kind's word on each whole message a client sends,
given inside the relay, before the message moves on.

Theory of operation
-------------------
An audit tap (``End.tap``, ``Stream.tap_in``) sees bytes as they pass; it
cannot hold a message back or answer one. Some kinds must: a MongoDB
command on a database the user's roles do not allow is answered with an
error and never reaches the server, a hello is answered as one server,
a client's login attempt is refused (gateway/cluster/mongodb_gate.py). A
:class:`MessageFilter` does that, one whole message at a time, in the relay
itself: no trio task, no socket pair, no hop.

:class:`Filtered` runs a kind's filter for one session:

* **client -> server.** The direction is split into whole frames by the
  filter's :class:`~protocols.framing.FrameLayout` (its length field read
  and bounded by ``max_length`` as soon as it is in, so an announced frame
  over the cap ends the session at once; a frame split over reads is held
  until whole, at most ``max_length`` bytes). Each frame is handed, as
  ``bytes``, to ``filter.on_message`` which returns ``None`` (pass it on
  as it came), ``bytes`` (answer the client with these instead, ``b""``:
  drop it unanswered) or raises (end the session: what the filter cannot
  read must not pass). The messages passed in one read go to the server
  in one write.
* **server -> client.** The relay shows every chunk to :meth:`Filtered.from_server`
  after it goes on, which follows the frame boundaries (a skip-everything
  :class:`~protocols.framing.FrameSplitter`: one header read per message):
  an answer made while one of the server's messages is half-relayed waits
  and follows that message, so it never lands inside one.
* **the client's EOF** is told to the filter (``eof``) after it went on to
  the server: a filter whose session has no server (one that refused the
  cluster's login) closes its stand-in there, and the session ends as any
  other does.

Who calls, and the rules that follow. The relay engine runs the filter in
its own thread, under its lock, for a two-socket session
(gateway/net/pairs.py) and for a stream of a multiplexed connection
(gateway/net/muxstreams.py); the task-based relay (gateway/net/relay.py)
runs it under a lock of its own. So a filter blocks on nothing: it awaits
nothing, reads no network and no disk but the store's freshness check
(``Cluster.fresh_snapshot``), and queues its audit events. Its answers
are small (an error reply, a hello), written to the client's side behind
whatever waits there; a client that keeps sending while not reading its
answers is held back (two-socket relay) or its stream ended once the
answers would overrun its window (multiplexed connection), never buffered
without bound.
"""

from __future__ import annotations

from typing import Protocol

from protocols.errors import RemoteProtocolError
from protocols.framing import FrameLayout, FrameSplitter

__all__ = ["Filtered", "MessageFilter"]


class MessageFilter(Protocol):
    """A kind's filter of one session's client messages (see the module doc)."""

    #: How the client's messages are framed, and the largest one taken.
    layout: FrameLayout
    max_length: int

    def on_message(self, raw: bytes) -> bytes | None:
        """One whole message: None to pass it, bytes to answer it instead
        (b"": drop it); raise to end the session."""

    def eof(self) -> None:
        """The client's direction ended (after its EOF went on)."""

    def broken(self, error: Exception) -> None:
        """The client's framing is broken (a length out of bounds): the
        session ends with ``error`` once this returns (record it)."""


def _skip(_kind: object, _length: int) -> None:
    return None  # a keep policy: count frames, keep nothing


class Filtered:
    """One session's filter with its framing state (see the module doc)."""

    __slots__ = ("filter", "_layout", "_max", "_head", "_partial", "_server", "_waiting", "carried")

    def __init__(self, message_filter: MessageFilter) -> None:
        self.filter = message_filter
        self._layout = layout = message_filter.layout
        self._max = message_filter.max_length
        self._head = layout.length_end
        self._partial = bytearray()  # the start of a client frame, until it is whole
        self._server = FrameSplitter(layout, keep=_skip, max_length=layout.max_length)
        self._waiting: list[bytes] = []  # answers behind a half-relayed server message
        #: Of the bytes :meth:`from_client` last passed on, how many it had
        #: been given by earlier calls (held as a partial frame meanwhile).
        self.carried = 0

    @property
    def buffered(self) -> int:
        """Bytes of a client frame held until it is whole."""
        return len(self._partial)

    def from_client(self, data: bytes) -> tuple[list[bytes], bytes]:
        """Split ``data`` (the next bytes from the client) into whole
        messages for the filter: (messages to pass on, in order; the
        answers to write to the client now). Raises what the filter or the
        framing raises (``RemoteProtocolError`` for a bad length)."""
        head, on_message = self._head, self.filter.on_message
        partial = self._partial
        carried = len(partial)
        self.carried = 0
        if not carried and len(data) >= head:
            size = self._size(data)
            if size == len(data):
                # The usual read: exactly one whole message.
                answer = on_message(data)
                if answer is None:
                    return [data], b""
                return [], self._answer(answer)
        passed: list[bytes] = []
        answers: list[bytes] = []
        partial += data
        pos, end = 0, len(partial)
        while end - pos >= head:
            size = self._size(partial[pos:pos + head])
            if end - pos < size:
                break
            with memoryview(partial) as view:  # one copy, not two
                raw = bytes(view[pos:pos + size])
            answer = on_message(raw)
            if answer is None:
                passed.append(raw)
                if pos < carried:
                    self.carried += min(size, carried - pos)
            elif answer:
                answers.append(answer)
            pos += size
        del partial[:pos]
        return passed, self._answer(b"".join(answers)) if answers else b""

    def _size(self, head: bytes | bytearray) -> int:
        """The size of the frame ``head`` starts; a bad length is the filter's
        to record, then ends the session (RemoteProtocolError)."""
        layout = self._layout
        try:
            return layout.frame_size(layout.length_of(head), self._max)
        except RemoteProtocolError as exc:
            self.filter.broken(exc)
            raise

    def _answer(self, answer: bytes) -> bytes:
        if not answer or self._server.at_boundary:
            return answer
        self._waiting.append(answer)
        return b""

    def from_server(self, data: bytes | memoryview) -> bytes:
        """Follow ``data`` (the next bytes the server's side relayed to the
        client); the answers that may follow it now (usually b"")."""
        for _ in self._server.feed(data):
            pass
        if self._waiting and self._server.at_boundary:
            waiting, self._waiting = self._waiting, []
            return b"".join(waiting)
        return b""

    def eof(self) -> None:
        self.filter.eof()

"""Message filters: a kind's word on each whole message a client sends,
given inside the relay, before the message moves on. The one way the
cluster answers a client itself.

Theory of operation
-------------------
An audit tap (``End.tap``, ``Stream.tap_in``) sees bytes as they pass; it
cannot hold a message back or answer one. Some kinds must: a MongoDB
command on a database the user's roles do not allow is answered with an
error and never reaches the server, a hello is answered as one server
(gateway/cluster/mongodb_gate.py); a MySQL ``USE`` or COM_INIT_DB of a
database the roles do not allow is answered with ERR 1044, and a
COM_CHANGE_USER is re-dialled as the new db user (gateway/cluster/mysql.py,
mysql_change_user.py). A :class:`MessageFilter` does that, one whole
message at a time, in the relay itself.

:class:`Filtered` runs a kind's filter for one session:

* **client -> server.** The direction is split into whole frames by the
  filter's :class:`~protocols.framing.FrameLayout` (its length field read
  and bounded by ``max_length`` as soon as it is in, so an announced frame
  over the cap ends the session at once; a frame split over reads is held
  until whole, at most ``max_length`` bytes). Each frame is handed, as
  ``bytes``, to ``filter.on_message``, which returns

  - ``None``: pass it on as it came;
  - ``bytes``: answer the client with these instead (``b""``: drop it);
  - :data:`MORE`: the frame is the start of a message that goes on in the
    next frame (MySQL's 16 MiB packets): the filter is called again with
    the frames joined, at most ``max_message`` bytes in all (more ends the
    session: what cannot be checked does not pass);
  - :class:`Hold`: only trio can answer it (a re-dial): the message, and
    everything the client sends after it, is held; ``Hold.work`` runs in
    the session's trio task (:meth:`Filtered.serve`), and what it returns
    is the answer, after which the relay goes on with the held bytes;
  - or raises: the session ends (what the filter cannot read must not
    pass).

  The messages passed in one read go to the server in one write.
* **server -> client.** The relay shows every chunk to :meth:`Filtered.from_server`
  after it goes on, which follows the frame boundaries (a skip-everything
  :class:`~protocols.framing.FrameSplitter`: one header read per message):
  an answer made while one of the server's messages is half-relayed waits
  and follows that message, so it never lands inside one. A filter that
  answers only where the server owes nothing, as it knows from a tap on
  the server's side (``between_replies``: MySQL's auditor), is spared
  that: the relays show a chunk to that tap and pass it on in one step
  (under the engine's lock; in the task-based relay, within the turn of
  what goes to the client).
* **the client's EOF** is told to the filter (``eof``) after it went on to
  the server; while messages are held back (below), the EOF waits behind
  them.

Holding back. Nothing is buffered without bound, and the relay learns
when to stop reading from the filter's state alone (:attr:`Filtered.stalled`):

* answers: :meth:`Filtered.from_client` stops handing messages to the
  filter once the answers it made reach ``room`` (the relay's say: the
  room left in a stream's window on a multiplexed connection, a fixed
  :data:`ANSWER_ROOM` on a two-socket relay). The rest of the client's
  bytes stay unread by the filter (and, on a multiplexed connection,
  unacknowledged: the gateway's window closes, and its client blocks on a
  full socket) until the relay has written the answers and calls again.
  A client that pipelines commands without reading their answers is
  slowed down to the pace it reads at, never cut off;
* a held message: nothing after it is looked at until its answer is in.
  One message is held at a time, and ``Hold.work`` is the kind's to bound
  (a re-dial's login timeout); if the session ends first, the task is
  cancelled with it (the relay's end cancels :meth:`Filtered.serve`, and
  the relay does not wait for the work: no deadlock either way). The
  answer comes from trio's thread: :meth:`Filtered.serve` stores it
  (``_reply`` before ``held`` is cleared, so the relay's thread, which
  reads them without a lock, never sees a message neither held nor
  answered) and calls the relay's ``resume`` callback: the two-socket
  relay queues the client's end for its own thread (``again``), a stream
  of a multiplexed connection goes on under the engine's lock
  (``MuxLink.resume_filter``, as every call from trio into a link does),
  the task-based relay sets an event its client direction waits on.

Acknowledging (for a multiplexed connection, whose peer may send only what
was acknowledged): after each :meth:`Filtered.from_client`, ``taken`` is
how many bytes the filter newly took responsibility for (looked at, or
held as the start of an incomplete frame: acknowledged at once, so a frame
larger than a window can arrive) and ``carried`` how many of the bytes it
passed on were taken by an earlier call (already acknowledged). Bytes left
unread (held back, above) are not taken.

Who calls, and the rules that follow. The relay engine runs the filter in
its own thread, under its lock, for a two-socket session
(gateway/net/pairs.py) and for a stream of a multiplexed connection
(gateway/net/muxstreams.py); the task-based relay (gateway/net/relay.py)
runs it under a lock of its own. So a filter blocks on nothing: it awaits
nothing, reads no network and no disk but the store's freshness check
(``Cluster.fresh_snapshot``), and queues its audit events; what needs
trio goes into a :class:`Hold`.
"""

from __future__ import annotations

import math
from typing import Awaitable, Callable, Protocol

import attrs
import trio

from protocols.errors import RemoteProtocolError
from protocols.framing import FrameLayout, FrameSplitter

__all__ = ["ANSWER_ROOM", "MORE", "Filtered", "Hold", "MessageFilter"]


#: The answers a two-socket relay lets one read's messages make before it
#: writes them and waits for the client to take them.
ANSWER_ROOM = 256 * 1024


class _More:
    def __repr__(self) -> str:
        return "MORE"


#: ``on_message``'s word for a frame that is the start of a longer message.
MORE = _More()


@attrs.frozen(slots=True)
class Hold:
    """``on_message``'s word for a message only trio can answer: ``work()``
    runs in the session's trio task and returns the answer for the client
    (raising ends the session); the relay holds the client's later bytes
    until then."""

    work: Callable[[], Awaitable[bytes]]


class MessageFilter(Protocol):
    """A kind's filter of one session's client messages (see the module doc)."""

    #: How the client's messages are framed, and the largest frame taken.
    layout: FrameLayout
    max_length: int
    #: Optional: the largest message of frames joined (MORE), by default
    #: ``max_length``; whether it may return :class:`Hold` (default False:
    #: its session then needs no trio task beside the relay); and whether
    #: it answers only where the server owes nothing (it follows the
    #: replies itself, from a tap that runs before they go on: MySQL's
    #: auditor), so the relay need not follow the server's frames for it
    #: (default False).
    max_message: int
    holds: bool
    between_replies: bool

    def on_message(self, raw: bytes) -> bytes | Hold | _More | None:
        """One whole message: None to pass it, bytes to answer it instead
        (b"": drop it), MORE, a Hold; raise to end the session."""

    def eof(self) -> None:
        """The client's direction ended (after its EOF went on)."""

    def broken(self, error: Exception) -> None:
        """The client's framing is broken (a length out of bounds): the
        session ends with ``error`` once this returns (record it)."""


def _skip(_kind: object, _length: int) -> None:
    return None  # a keep policy: count frames, keep nothing


class Filtered:
    """One session's filter with its framing state (see the module doc).
    Made in trio's thread (it keeps trio's token for :class:`Hold`)."""

    __slots__ = ("filter", "_layout", "_length_of", "_frame_size", "_uncounted", "_min_size", "_max_size", "_max", "_max_message", "_head", "_partial", "_taken", "_joined",
                 "_server", "_waiting", "_stopped", "held", "_reply", "_send", "_receive", "_token",
                 "resume", "carried", "taken", "_eof", "holds", "follows_server")

    def __init__(self, message_filter: MessageFilter) -> None:
        self.filter = message_filter
        self._layout = layout = message_filter.layout
        self._max = message_filter.max_length
        self._max_message = getattr(message_filter, "max_message", self._max)
        self._head = layout.length_end
        self._length_of, self._frame_size = layout.length_of, layout.frame_size  # on every message
        self._uncounted = layout.uncounted
        self._min_size, self._max_size = layout.min_length + layout.uncounted, self._max + layout.uncounted
        self._partial = bytearray()  # client bytes not handed to the filter yet
        self._taken = 0  # how many of them were taken (an incomplete frame's start)
        self._joined: bytearray | None = None  # frames of a message the filter said MORE to
        self._server = (None if getattr(message_filter, "between_replies", False)
                        else FrameSplitter(layout, keep=_skip, max_length=layout.max_length))
        #: The relay must show it the server's bytes (:meth:`from_server`).
        self.follows_server = self._server is not None
        self._waiting: list[bytes] = []  # answers behind a half-relayed server message
        self._stopped = False  # whole messages wait in _partial (room ran out, or one is held)
        #: A message is with trio (:class:`Hold`): nothing more is looked at.
        self.held = False
        self._reply: bytes | None = None  # trio's answer to it, for the relay to write
        self._send, self._receive = trio.open_memory_channel[Callable[[], Awaitable[bytes]]](1)
        try:
            self._token: trio.lowlevel.TrioToken | None = trio.lowlevel.current_trio_token()
        except RuntimeError:  # made outside trio (a test of a filter alone): it cannot hold
            self._token = None
        #: Set by the relay: called (from trio's thread, under no lock) once
        #: a held message's answer is in; it makes the relay call
        #: :meth:`from_client` (b"") in its own thread.
        self.resume: Callable[[], None] | None = None
        #: Of the bytes :meth:`from_client` last passed on, how many an
        #: earlier call had taken; and how many bytes it newly took.
        self.carried = 0
        self.taken = 0
        self._eof = False
        #: The filter may return :class:`Hold`: its session runs :meth:`serve`.
        self.holds = bool(getattr(message_filter, "holds", False))

    @property
    def buffered(self) -> int:
        """Client bytes held here (an incomplete frame, or held back)."""
        return len(self._partial) + (len(self._joined) if self._joined else 0)

    @property
    def stalled(self) -> bool:
        """The relay must not read the client now: a message is held, or
        whole messages wait for their turn (call :meth:`from_client` again
        once the answers were written; also when :attr:`pending`)."""
        return self.held or self._stopped or self._reply is not None

    @property
    def pending(self) -> bool:
        """:meth:`from_client` has work without new bytes: trio answered a
        held message, or messages wait that room stopped."""
        return not self.held and (self._reply is not None or (self._stopped and not self._waiting))

    def from_client(self, data: bytes, room: float = math.inf) -> tuple[list[bytes], bytes]:
        """Split ``data`` (the next bytes from the client; b"" to go on with
        what waits) into whole messages for the filter, until the answers
        reach ``room``: (messages to pass on, in order; the answers to
        write to the client now). Raises what the filter or the framing
        raises (``RemoteProtocolError`` for a bad length)."""
        if (not self._partial and not self.held and not self._stopped and self._joined is None
                and self._reply is None and len(data) >= self._head and room > 0):
            # (The frame's size without _size's calls; a length out of
            # bounds goes the long way, which says so.)
            size = self._length_of(data) + self._uncounted
            if size == len(data) and self._min_size <= size <= self._max_size:
                # The usual read: exactly one whole message.
                self.carried = 0
                self.taken = size
                answer = self.filter.on_message(data)
                if answer is None:
                    return [data], b""
                if type(answer) is bytes:
                    return [], self._answer(answer)
                if answer is MORE:
                    self._joined = bytearray(data)
                else:
                    work = self._hold(answer)
                    self.held = True
                    self._token.run_sync_soon(self._send.send_nowait, work)
                return [], b""
        return self._scan(data, room)

    def _scan(self, data: bytes, room: float) -> tuple[list[bytes], bytes]:
        head, on_message = self._head, self.filter.on_message
        partial = self._partial
        taken_before = self._taken
        joined_acked = len(self._joined) if self._joined is not None else 0
        self.carried = 0
        passed: list[bytes] = []
        answers: list[bytes] = []
        # Answers waiting behind a server message count against the room.
        made = sum(map(len, self._waiting))
        if self._reply is not None:
            reply, self._reply = self._reply, None
            if reply:
                answers.append(reply)
                made += len(reply)
        if data:
            partial += data
        pos, end = 0, len(partial)
        stopped = self.held
        hold = None
        while not stopped and end - pos >= head:
            if made >= room:
                stopped = True
                break
            size = self._size(partial[pos:pos + head])
            if end - pos < size:
                break
            with memoryview(partial) as view:  # one copy, not two
                raw = bytes(view[pos:pos + size])
            start = pos
            pos += size
            earlier = max(0, min(pos, taken_before) - start)  # of this frame, taken by an earlier call
            joined = self._joined
            if joined is not None:
                joined += raw
                if len(joined) > self._max_message:
                    error = RemoteProtocolError(
                        f"a {self._layout.name} message over {self._max_message} bytes cannot be checked "
                        f"through Wicket")
                    self.filter.broken(error)
                    raise error
                raw = bytes(joined)
            answer = on_message(raw)
            if answer is MORE:
                if joined is None:
                    self._joined = bytearray(raw)
                continue
            self._joined = None
            if answer is None:
                passed.append(raw)
                self.carried += earlier + joined_acked
            elif type(answer) is Hold:
                self.held = stopped = True
                hold = self._hold(answer)
            elif answer:
                answers.append(answer)
                made += len(answer)
            joined_acked = 0
        # Taken: every frame looked at, and an incomplete frame's start (when
        # the scan stopped for want of bytes, not for room or a hold).
        upto = pos if stopped else end
        self.taken = max(0, upto - taken_before)
        self._taken = max(upto, taken_before) - pos
        self._stopped = stopped and not self.held
        del partial[:pos]
        if hold is not None:  # last: trio may answer at once
            self._token.run_sync_soon(self._send.send_nowait, hold)
        return passed, self._answer(b"".join(answers)) if answers else b""

    def _hold(self, hold: Hold) -> Callable[[], Awaitable[bytes]]:
        if not self.holds or self._token is None:  # nobody would run it: the session would wait forever
            raise RuntimeError(f"{type(self.filter).__name__} held a message but does not say it holds")
        return hold.work

    def _size(self, head: bytes | bytearray) -> int:
        """The size of the frame ``head`` starts; a bad length is the filter's
        to record, then ends the session (RemoteProtocolError)."""
        try:
            return self._frame_size(self._length_of(head), self._max)
        except RemoteProtocolError as exc:
            self.filter.broken(exc)
            raise

    def _answer(self, answer: bytes) -> bytes:
        if not answer or self._server is None or self._server.at_boundary:
            return answer
        self._waiting.append(answer)
        return b""

    def from_server(self, data: bytes | memoryview) -> bytes:
        """Follow ``data`` (the next bytes the server's side relayed to the
        client); the answers that may follow it now (usually b"")."""
        if self._server is None:
            return b""
        for _ in self._server.feed(data):
            pass
        if self._waiting and self._server.at_boundary:
            waiting, self._waiting = self._waiting, []
            return b"".join(waiting)
        return b""

    def eof(self) -> None:
        """The client's EOF went on: tell the filter (once)."""
        if not self._eof:
            self._eof = True
            self.filter.eof()

    # -- trio's side -----------------------------------------------------------

    async def serve(self) -> None:
        """Beside the relay, for the session's life: run each held
        message's work and hand its answer to the relay. What the work
        raises ends the session (it propagates)."""
        async for work in self._receive:
            reply = await work()
            self._reply = reply  # first: the relay's thread reads ``held`` without a lock
            self.held = False
            if self.resume is not None:
                self.resume()

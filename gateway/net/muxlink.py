"""A multiplexed gateway <-> cluster connection, run by the relay engine.

Theory of operation
-------------------
:mod:`protocols.mux` says what goes on the wire; this module moves it. A
:class:`MuxLink` owns one TLS connection (an engine ``End`` whose
``owner`` is the link) and, per session, a :class:`Stream` bound to a plain
socket (the client's on the gateway, the upstream's on the cluster; another
``End`` owned by the link). The engine's thread calls :meth:`MuxLink.on_ready`
for all of them, under the engine's lock; trio's thread calls the other
public methods, which take the same lock.

Moving bytes, in the engine's thread:

- socket -> connection: read at most the stream's send window, frame it as
  DATA, encrypt, write. While the connection's socket has a tail (the
  kernel would not take more), streams stop reading and queue in
  ``blocked``; the tail draining resumes them. Sessions share the TCP
  connection's flow control this way, and each is also held to its window.
- connection -> socket: the link reads the connection whenever it is
  readable (never blocked by a slow stream), decrypts into a scratch
  buffer, parses it there without a copy, and writes each stream's DATA to
  its socket at once: the DATA of one stream that came in one read (a read
  usually ends inside a frame) goes out in one ``sendmsg``. Such a run is
  taken whole (``MuxConnection.take_data``), with no event object, dispatch
  or gathering per frame: most wake-ups of a bulk transfer are nothing
  else; the other frames go through ``next_event`` and a handler each. What the socket
  does not take is copied into that end's tail, at most one window's worth,
  because the peer may not send more than we acknowledged; the sum over
  streams is bounded too (LINK_HELD, HELD_LIMIT: past them a stream is
  reset). Bytes are acknowledged (WINDOW) only once the kernel took them.
- FIN carries a half-close each way (``shutdown(SHUT_WR)`` after the tail);
  a socket error or a cancelled session sends RESET; a stream is over once
  FIN went both ways and its tail is empty. A stream that ends any other way
  (RESET either way, a refusal, the connection's end) resets its socket
  (TCP RST), so the client or upstream sees an abort, never a clean EOF;
  when the abort came from the other side, after the bytes that came
  before it (``RelayEngine.abort``).
- Whatever ends the connection (EOF, TLS or protocol error, ``close``) ends
  every stream on it, with that reason, but one: a stream whose OPEN never
  left this machine, or, on a connection that ended with a reset, was never
  acknowledged by the cluster's kernel, cannot have had its bytes passed on
  (docs/wire.md says why). The gateway
  gets such a stream back through its ``retry`` callback, with the client's
  socket as it is and the bytes already read from it, to start it again on
  another connection: a session sent into a connection that was already
  dead (the cluster's host restarted, a middlebox forgot the flow) goes
  through instead of being reset.

Sessions: the gateway calls :meth:`MuxLink.start` with the client's socket,
which sends the OPEN and relays the socket at once: the client's first bytes
follow the OPEN without waiting for the REPLY (protocols/mux.py allows it),
and a refusal resets the socket. The cluster gets each OPEN through
``on_open(link, stream, request)``, called in the engine's thread under the
lock (it must not block: it decides at once, or hands the stream to trio;
it may run before the constructor returns), and calls
:meth:`MuxLink.accept` with the upstream socket, which passes on the bytes
that came early, or :meth:`MuxLink.refuse`. A stream's end is reported to its
``notify(link, stream)`` callback (in whichever thread ended it, under the
lock), or, without one, to :meth:`MuxLink.wait` in trio, which returns the
error that ended the stream, or ``None`` after a clean end. All the public
methods may be called from trio's thread or from a callback in the engine's
thread (the engine's lock is re-entrant).

A stream's socket may speak TLS (a PostgreSQL server with ``tls =
require``, a client of ``--local-tls``): its end then carries the
SSLObject, and the link reads and writes plaintext through the engine's
TLS code (``read_into``, ``seal``, ``send_eof``), the same that serves the
link's own connection. What the kernel does not take of the records is the
tail, held as ciphertext; its plaintext is acknowledged once it drained.
Taps (the cluster's audit parsers; the gateway's look at a PostgreSQL
session's first bytes) see each direction's plaintext before it moves on;
one that raises resets the stream. What the cluster answers itself (a
MySQL ``USE`` it refuses, a MongoDB command, a COM_CHANGE_USER re-dialled
in trio) goes through the stream's message filter
(gateway/net/filters.py; ``StreamIO._filter``): its answers go back on the
stream within the stream's window, and what the window has no room for
waits (``Stream.owed``) with the gateway's later bytes left unacknowledged,
so a client that pipelines without reading is slowed to its own pace, not
reset; the answers go out as the gateway's WINDOW frames come
(``StreamIO._filter_more``), or, for a held message, when trio calls
``MuxLink.resume_filter``.

Where the gateway must answer a refusal in the client's own protocol, it
:meth:`MuxLink.open` s a stream without a socket, awaits :meth:`MuxLink.reply`,
then :meth:`MuxLink.bind` s the client's socket (the cluster's first bytes
wait in ``early`` meanwhile, as the gateway's do on the cluster). A control
dial (a cancel) is a stream without a socket whose REPLY is all
(:meth:`MuxLink.control`); it goes behind what the client had sent on the
session it acts on, and :meth:`MuxLink.flushed` lets the cluster wait until
that has been written to the session's socket.

Layout: this module has the link (what both sides share of its public
methods, the connection's events, a handler per frame type, the ends of
streams and of the link); mixed into :class:`MuxLink`, by job:
:mod:`gateway.net.muxopening` (the gateway's side: opening streams,
control dials, the REPLY), :mod:`gateway.net.muxanswering` (the
cluster's side: the decision on each OPEN, the answers) and
:mod:`gateway.net.muxstreams` (:class:`Stream` and the moving of a
stream's bytes, ``StreamIO``).
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
from typing import Callable

import trio

from gateway.net.engine import PUMP_BUDGET, RelayEngine
from gateway.net.ends import (
    _ALWAYS, End, Failure, _IN, _OUT, detach, reset_and_close, seal, send_failure, watch_mask,
)
from gateway.net.muxanswering import StreamAnswering
from gateway.net.muxopening import LinkClosed, StreamOpening
from gateway.net.muxstreams import Stream, StreamIO
from gateway.net.tcp import LINK_USER_TIMEOUT, final_marks, keep_alive, stalled
from gateway.net.tls import TLSStream
from protocols.dial import NEED_DATA, DialRequest
from protocols.errors import RemoteProtocolError
from protocols.mux import (
    HEADER,
    MAX_DATA,
    MuxConnection,
    Role,
    StreamData,
    StreamFin,
    StreamOpened,
    StreamReplied,
    StreamReset,
    StreamWindow,
)

__all__ = ["MAX_STREAMS", "LinkClosed", "MuxLink", "Stream"]

log = logging.getLogger(__name__)

#: Streams one connection may have open at once; more are refused
#: (``rate_limited``) without costing anything.
MAX_STREAMS = 32768

#: Bytes waiting for the connection's socket above which the link stops
#: reading it: what a peer that sends but does not read (every OPEN, DATA
#: and FIN makes us answer) can make us hold.
LINK_BACKLOG = 1024 * 1024


_HEADER_SIZE = HEADER.size

#: DATA pieces for one stream written with one ``sendmsg`` at most (IOV_MAX
#: is 1024; a peer sending tiny frames must not make us exceed it).
GATHER_MAX = 64


class MuxLink(StreamOpening, StreamAnswering, StreamIO):
    """See the module docstring. Create it in trio's thread."""

    def __init__(self, engine: RelayEngine, tls: TLSStream, role: Role, *, name: str,
                 socket_name: str,
                 on_open: Callable[["MuxLink", Stream, DialRequest], None] | None = None,
                 max_streams: int | None = None) -> None:
        self.engine = engine
        self.role = role
        self.gateway = role is Role.GATEWAY
        # Where _pump reads a stream's bytes: right behind room for a DATA
        # header in the engine's buffer, so a frame is sent without a copy.
        self.payload = engine.framed[_HEADER_SIZE:]
        self.room = min(MAX_DATA, len(self.payload))
        self.name = name
        self.socket_name = socket_name
        self.conn = MuxConnection(role)
        self.streams: dict[int, Stream] = {}
        self.blocked: dict[End, None] = {}  # an ordered set
        # DATA received for one stream in this pass over the connection's
        # bytes, not written yet: written with one system call (a read of
        # the connection usually holds the end of one frame and the start
        # of the next). Views of the engine's scratch buffer: written or
        # copied before the next read.
        self.gathered_for: Stream | None = None
        self.gathered: list[memoryview] = []
        self.token = trio.lowlevel.current_trio_token()
        self.on_open = on_open
        self.max_streams = MAX_STREAMS if max_streams is None else max_streams
        self.failed: str | None = None
        self.held = 0  # over this link's streams (see LINK_HELD)
        self.closed = trio.Event()
        sock, tls_state = detach(tls)
        # A peer that vanished must end the link, not leave it open forever
        # (gateway/net/tcp.py): the cluster would keep every session on it.
        keep_alive(sock, user_timeout=LINK_USER_TIMEOUT)
        self.end = End(sock, name, tls_state, None)
        self.end.owner = self
        with engine.lock:
            engine.ends[self.end.fd] = self.end
            engine.again.append(self.end)  # bytes may already wait inside the TLS object
        engine.wake()

    # ------------------------------------------------------------------
    # trio's thread.

    def _attach(self, stream: Stream, raw: socket.socket, counters, tls: tuple | None, tap) -> None:
        """(under the lock) Bind ``raw`` to an answered stream and hand it
        what came for it meanwhile (the bytes, the FIN)."""
        self._bind(stream, raw, counters, tls, tap)
        if tls is not None:
            # Bytes may already wait inside the TLS object, not in the kernel.
            self.engine.again.append(stream.end)
            self.engine.wake()
        if stream.early:
            data, stream.early = memoryview(stream.early), None
            self._unhold(stream, len(data))  # _to_socket holds what the socket does not take
            self._run_guarded(stream.end, lambda: self._to_socket(stream, [data]))
        if stream.early_fin and not stream.finished:
            stream.end.eof_wanted = True
            self._run_guarded(stream.end, lambda: self._fin_to_socket(stream))

    async def wait(self, stream: Stream) -> str | None:
        """Until the stream is over: its error, or None. If cancelled, the
        stream is reset (the other side learns why) and closed at once."""
        with self.engine.lock:
            if stream.done is None and not stream.finished:
                stream.done = trio.Event()
        try:
            if stream.done is None:
                await trio.lowlevel.checkpoint()
            else:
                await stream.done.wait()
        except BaseException:
            with self.engine.lock:
                if not stream.finished:
                    self._finish(stream, "cancelled", reset=True)
            raise
        return stream.error

    def cut(self, stream: Stream, reason: str) -> None:
        """End a stream now (both ways), telling the other side why."""
        with self.engine.lock:
            self._finish(stream, reason, reset=True)

    def close(self, reason: str) -> None:
        """End the link and every stream on it: a cut, so every stream's
        socket is reset at once."""
        with self.engine.lock:
            self._fail(reason, drain=False)

    def __len__(self) -> int:
        return len(self.streams)

    def stalled(self) -> bool:
        """Whether the connection has stopped getting answers (see
        gateway/net/tcp.py): better not trusted with new sessions. Any
        thread may ask."""
        return stalled(self.end.sock)

    def _bind(self, stream: Stream, raw: socket.socket, counters, tls: tuple | None = None,
              tap: Callable[[bytes], None] | None = None) -> None:
        end = End(raw, stream.name, tls, tap)
        end.owner = self
        end.session = stream  # for the owner: which stream this socket is
        stream.end = end
        stream.counters = counters
        self.engine.ends[end.fd] = end
        # Registered from this thread (epoll is thread-safe): the engine
        # sees whatever the socket already holds without being woken.
        self._update(end)

    def _send_guarded(self, frame: bytes) -> None:
        try:
            self._send(frame)
        except Failure as exc:
            self._fail(str(exc))

    def _run_guarded(self, end: End, action) -> None:
        stream = end.session
        try:
            action()
            self._settle(stream)
        except Failure as exc:
            self._failure(end, exc)

    # ------------------------------------------------------------------
    # The engine's thread (or trio's, holding the lock).

    def on_ready(self, end: End, ev: int) -> None:
        try:
            if end is self.end:
                self._on_link(ev)
            elif end.session is not None:
                self._on_stream(end.session, ev)
        except Failure as exc:
            self._failure(end, exc)
        except RemoteProtocolError as exc:
            self._fail(f"{self.name}: broke the multiplexing protocol: {exc}")
        except Exception as exc:  # a bug: end this link, keep serving the others
            log.exception("mux_link_error link=%s", self.name)
            self._fail(f"internal error in the relay engine: {exc!r}", drain=False)

    def _failure(self, end: End, exc: Failure) -> None:
        if end is self.end or self.end.failed:
            self._fail(str(exc))
        elif end.session is not None:
            self._finish(end.session, str(exc), reset=True)

    def _on_link(self, ev: int) -> None:
        end = self.end
        if self.failed is not None:
            return
        engine = self.engine
        if ev & (_OUT | _ALWAYS) and end.tail is not None:
            try:
                engine.drain(end)
            except OSError as exc:
                raise send_failure(end, exc) from None
            if end.tail is None and self.blocked:
                engine.again.extend(self.blocked)
                self.blocked.clear()
            if engine.backlog(end) < LINK_BACKLOG:
                ev |= _IN  # reading may have been held back: catch up now
        if ev & (_IN | _ALWAYS):
            # Plaintext is read into the engine's scratch buffer and parsed
            # there without a copy (borrowed): whatever is still needed is
            # written or copied before the next read, and ``release`` keeps
            # what is not parsed yet.
            plain = engine.link_plain
            budget = PUMP_BUDGET
            conn = self.conn
            last = False
            # Frames left unparsed by the last pass (rare) go first; with a
            # tail, parsing first also checks LINK_BACKLOG before any read.
            parse = end.tail is not None or conn.unparsed()
            try:
                while True:
                    if parse:
                        # Past LINK_BACKLOG the rest wait in ``conn``,
                        # unparsed, until our socket drains (EPOLLOUT brings
                        # us back here): however much one read brought, a
                        # peer that does not read cannot make us answer more
                        # than one frame beyond the limit.
                        while end.tail is None or engine.backlog(end) < LINK_BACKLOG:
                            if self.gathered_for is None:
                                # The usual bytes: one stream's DATA, taken
                                # as a run of pieces without an event each.
                                pieces: list[memoryview] = []
                                sid = conn.take_data(pieces, GATHER_MAX)
                                if sid is not None:
                                    if pieces:
                                        self._run_of_data(sid, pieces)
                                        if self.failed is not None:
                                            return
                                    if not conn.unparsed():
                                        break
                                    continue
                            try:
                                event = conn.next_event()
                            except RemoteProtocolError:
                                # What came before the bad frame is authentic:
                                # it goes out before the link ends.
                                if self.gathered_for is not None:
                                    self._deliver()
                                raise
                            if event is NEED_DATA:
                                break
                            self._dispatch(event)
                            if self.failed is not None:
                                return
                            if not conn.unparsed():
                                break  # what next_event would say, at a fraction of its cost
                        else:
                            break
                        if last:
                            break
                        if self.gathered_for is not None:
                            self._deliver()  # may end the link (a RESET it could not send)
                            if self.failed is not None:
                                return
                        conn.release()
                    parse = True
                    n = engine.read_tls(end, plain)  # reports a TLS error that came with data
                    if n < 0:
                        break
                    if n == 0:
                        raise Failure(f"{self.name}: closed the multiplexed connection")
                    conn.receive_data(plain[:n], borrowed=True)
                    budget -= n
                    if budget <= 0:
                        engine.again.append(end)
                        last = True
                    elif n < len(plain) and end.error_pending is None and not end.peer_closed:
                        last = True  # the kernel is empty: dispatch this, then wait for epoll
                if self.gathered_for is not None:
                    self._deliver()
            finally:
                conn.release()
        if end.tail is not None or end.mask != _IN or end.failed:  # else as it was
            self._update_link()

    def _dispatch(self, event) -> None:
        gathered_for = self.gathered_for
        if type(event) is StreamData:
            if gathered_for is not None:
                if gathered_for.sid == event.stream and len(self.gathered) < GATHER_MAX:
                    self.gathered.append(event.data)
                    return
                self._deliver()
            stream = self.streams.get(event.stream)
            if stream is None:
                return
            if stream.end is None:  # sent ahead of our accept (cluster)
                try:
                    self._hold(stream, len(event.data))
                except Failure as exc:
                    self._finish(stream, str(exc), reset=True)
                    return
                if stream.finished:  # making room ended the link, and this stream with it
                    return
                if stream.early is None:
                    stream.early = bytearray()
                stream.early += event.data
                return
            self.gathered_for = stream
            self.gathered.append(event.data)
            return
        if gathered_for is not None:  # every other event comes after that DATA
            self._deliver()
        _HANDLERS[type(event)](self, event)

    # -- the other frames, one handler each (_HANDLERS) -----------------

    def _on_window(self, event: StreamWindow) -> None:
        stream = self.streams.get(event.stream)
        if stream is not None and stream.end is not None:
            try:
                if stream.filter is not None and (stream.owed is not None or stream.filter.pending):
                    self._filter_more(stream)  # answers owed, messages held back for them
                if stream.owed is None and not stream.finished:
                    self._pump(stream)  # may read the socket's EOF: settle
                self._settle(stream)
            except Failure as exc:
                self._stream_failed(stream, exc)

    def _on_fin(self, event: StreamFin) -> None:
        stream = self.streams.get(event.stream)
        if stream is None:
            return
        if stream.end is None:
            stream.early_fin = True
            return
        stream.end.eof_wanted = True
        try:
            self._fin_to_socket(stream)
            self._settle(stream)
        except Failure as exc:
            self._stream_failed(stream, exc)

    def _on_reset(self, event: StreamReset) -> None:
        stream = self.streams.get(event.stream)
        if stream is not None:
            self._finish(stream, f"{self.name}: reset the stream: {event.reason}", reset=False)

    def _stream_failed(self, stream: Stream, exc: Failure) -> None:
        """One stream's socket failed: reset that stream. A failure of the
        connection itself (while sending a frame) ends the link instead."""
        if self.end.failed:
            raise exc
        self._finish(stream, str(exc), reset=True)


    def _send(self, frame: bytes) -> None:
        """Encrypt ``frame`` and write it to the connection (after its tail)."""
        if not frame or self.failed is not None:
            return
        end = self.end
        self.engine.write(end, seal(end, frame), copy=False)
        if end.tail is not None and not end.mask & _OUT:
            # Also when trio's thread sent this (an OPEN, a REPLY, a RESET):
            # the engine must hear when the socket can take the rest.
            self._update_link()

    def _update(self, end: End) -> None:
        stream = end.session
        if stream is None or stream.finished:
            return
        mask = 0
        if not end.in_done and not end.failed and self.conn.send_window(stream.sid) > 0 and stream.owed is None:
            if self.end.tail is None:
                mask |= _IN
            else:
                self.blocked[end] = None  # resumed when the connection drains
        if end.tail is not None:
            mask |= _OUT
        self.engine.set_mask(end, mask or watch_mask(end))

    def _update_link(self) -> None:
        if self.failed is not None:
            return
        end = self.end
        if end.tail is None:  # the usual case, checked without a call
            mask = 0 if end.failed else _IN
        else:
            reading = not end.failed and len(end.tail) + end.more_bytes < LINK_BACKLOG
            mask = (_IN if reading else 0) | _OUT
        if mask != end.mask or end.registered != bool(mask):
            self.engine.set_mask(end, mask)

    def _finish(self, stream: Stream, error: str | None, *, reset: bool, drain: bool | None = None) -> None:
        """End ``stream``; with ``reset``, tell the other side (RESET). Its
        socket closes after a clean end, else is reset: with ``drain``
        (default: when the abort came from the other side, ``not reset``)
        once the bytes that came before the abort have reached its peer."""
        if stream.finished:
            return
        stream.finished = True
        stream.error = error
        self.streams.pop(stream.sid, None)
        if reset and self.failed is None:
            try:
                self._send(self.conn.send_reset(stream.sid, error or "closed"))
            except Failure as exc:
                self._fail(str(exc))
        end = stream.end
        if end is not None:
            self.blocked.pop(end, None)
            self.engine.forget(end)
            draining = False
            if error is None:
                end.sock.close()
            else:
                # An abort is passed on as one. One that came from the other
                # side (its RESET, the connection's end) first delivers what
                # came before it; one of ours (a failed socket, a cut) at once.
                # What it holds counts against the limits until it is gone.
                draining = self.engine.abort(end, drain=not reset if drain is None else drain,
                                             held=stream.held, release=self._released)
            if draining:
                stream.held = 0  # the drainer's now
            else:
                end.owner = end.session = None
                end.tail = None
                end.more = []
            # A TLS socket's state is freed now, by reference counting.
            end.obj = end.ssl = end.incoming = end.outgoing = end.key_update = None
            end.carry = end.tap = None
            stream.end = None
        if stream.filter is not None:
            stream.filter.resume = None
        stream.early = stream.retry = stream.sent = stream.tap_in = stream.filter = stream.owed = None
        if stream.flushed is not None:
            self._set_flushed(stream)
        if stream.held:
            self._unhold(stream, stream.held)
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if stream.notify is not None:
            try:
                stream.notify(self, stream)
            except Exception:
                log.exception("mux_notify_failed link=%s", self.name)
        elif stream.done is not None:
            try:
                self.token.run_sync_soon(stream.done.set)
            except trio.RunFinishedError:
                pass

    def _give_back(self, stream: Stream, reason: str) -> None:
        """(gateway) End ``stream``, which the cluster never saw, and hand
        its socket to its ``retry`` callback (see :meth:`start`)."""
        stream.finished = True
        stream.error = reason
        self.streams.pop(stream.sid, None)
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        end, stream.end = stream.end, None
        if end is not None:
            self.blocked.pop(end, None)
            self.engine.forget(end)
            end.owner = end.session = None
        retry, early = stream.retry, bytes(stream.sent)
        stream.retry = stream.sent = None
        if stream.held:
            self._unhold(stream, stream.held)
        if stream.done is not None:  # opened without a socket: reply() hears of it
            try:
                self.token.run_sync_soon(stream.done.set)
            except trio.RunFinishedError:
                pass
        try:
            retry(None if end is None else end.sock, early, end is not None and end.in_done, reason)
        except Exception:
            log.exception("mux_retry_failed link=%s", self.name)
            if end is not None:
                reset_and_close(end.sock)

    def _fail(self, reason: str, *, drain: bool = True) -> None:
        """End the link: every stream, then the connection. ``drain``: the
        streams' sockets first deliver what they hold (the connection
        failed under us), or not (we close it)."""
        if self.failed is not None:
            return
        self.failed = reason
        # If the connection is over for good, where what the cluster cannot
        # have read begins: after a reset, what its kernel did not
        # acknowledge (its host holds the connection no more); after anything
        # else (a timeout: a path that lost only what comes back looks the
        # same, with the cluster reading all along), what never left.
        unseen = None
        marks = final_marks(self.end.sock) if self.gateway and drain else None
        if marks is not None:
            unseen = marks[0] if self.end.os_error == errno.ECONNRESET else marks[1]
        for stream in list(self.streams.values()):
            if unseen is not None and stream.retry is not None and unseen < stream.opened:
                self._give_back(stream, reason)
            else:
                self._finish(stream, reason, reset=False, drain=drain)
        end = self.end
        self.engine.forget(end)
        _close_notify_nowait(end)
        end.sock.close()
        end.owner = None
        end.obj = end.ssl = end.incoming = end.outgoing = end.key_update = None
        end.tail = None
        end.more = []
        self.blocked.clear()
        self.gathered_for, self.gathered = None, []
        self.on_open = None  # it holds the link: let both go now
        try:
            self.token.run_sync_soon(self.closed.set)
        except trio.RunFinishedError:
            pass


#: What MuxLink._dispatch does with each event but DATA (which it handles
#: itself: it is most of them).
_HANDLERS: dict[type, Callable[[MuxLink, object], None]] = {
    StreamWindow: MuxLink._on_window,
    StreamFin: MuxLink._on_fin,
    StreamReset: MuxLink._on_reset,
    StreamOpened: MuxLink._on_opened,
    StreamReplied: MuxLink._on_replied,
}


def _close_notify_nowait(end: End) -> None:
    """Tell a healthy TLS peer that the connection is over, if that fits in
    the kernel now (as ``TLSStream.aclose``). Every stream on it has ended
    already: the peer ends those it still has as failed."""
    if end.obj is None or end.failed or end.eof_sent:
        return
    try:
        end.obj.unwrap()
    except ssl.SSLError:
        pass
    try:
        for data in (end.tail, *end.more, end.outgoing.read()):
            if data is not None and RelayEngine.write_some(end, memoryview(data)):
                break
    except OSError:
        pass



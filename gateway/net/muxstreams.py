"""A multiplexed connection's streams (see :mod:`gateway.net.muxlink`): a
:class:`Stream`, one session on a link, and how its bytes move between its
socket and the connection: its socket read into DATA frames within the
stream's window (:meth:`StreamIO._pump`), DATA written to its socket
(gathered, :meth:`StreamIO._deliver`), what the socket does not take held
within the link's and the engine's limits (:meth:`StreamIO._hold`), its tail
drained and its EOF passed on. A mixin of :class:`~gateway.net.muxlink.MuxLink`."""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Callable

import trio

from gateway.net.engine import PUMP_BUDGET, Timer
from gateway.net.ends import (
    _ALWAYS, End, Failure, _IN, _OUT, Tap, detach, failed_quietly, reset_and_close, seal, send_failure,
)
from gateway.net.filters import Filtered
from protocols.dial import DialAccept, DialError
from protocols.mux import HEADER, StreamData

if TYPE_CHECKING:
    from gateway.net.muxlink import MuxLink

__all__ = ["HELD_LIMIT", "LINK_HELD", "Stream", "StreamIO"]

_HEADER_SIZE = HEADER.size

#: Bytes a process may hold for stream sockets that do not take DATA as fast
#: as it comes (their tails, and early data waiting for a decision), per
#: connection and in all. Each stream alone is held to its window (2 MiB);
#: these bound the sum, so that servers that stopped reading, times many
#: streams, cannot exhaust the cluster's memory. Past either, the stream
#: holding the most is reset, with the reason.
LINK_HELD = 128 * 1024 * 1024
HELD_LIMIT = 512 * 1024 * 1024
_MiB = 1024 * 1024


class Stream:
    """One session on a link. ``counters`` (a RelayCounters) count
    ``a_to_b`` from the gateway's side to the upstream's, as the relay does.
    ``context`` is the owner's (the client's address, the cluster's live
    session)."""

    __slots__ = ("sid", "end", "early", "early_fin", "reply", "done", "error", "finished",
                 "counters", "name", "notify", "timer", "context", "held", "retry", "opened", "sent",
                 "tap_in", "flushed", "sealed", "control", "arrived", "replied_at", "filter", "preacked",
                 "owed")

    def __init__(self, sid: int, name: str, notify: Callable[["MuxLink", "Stream"], None] | None = None) -> None:
        self.sid = sid
        self.name = name  # the socket's side, for error messages
        self.end: End | None = None
        self.early: bytearray | None = None  # DATA that came before the accept (cluster)
        self.early_fin = False
        self.reply: DialAccept | DialError | None = None
        self.done: trio.Event | None = None  # for wait()
        self.error: str | None = None
        self.finished = False
        self.counters = None
        self.notify = notify
        self.timer: Timer | None = None  # the REPLY's deadline (gateway)
        self.context = None
        self.held = 0  # bytes in ``early`` and the socket's tail (see LINK_HELD)
        # (gateway) Until the REPLY, for a start on another connection: the
        # owner's callback, where the OPEN ends in the connection's bytes
        # (as tcp.final_marks counts them), and a copy of the DATA
        # sent on the stream.
        self.retry: Callable[[socket.socket, bytes, bool, str], None] | None = None
        self.opened = 0
        self.sent: bytearray | None = None
        # Shown every chunk from the connection before it goes to the
        # socket (the cluster's audit parsers, the gateway's look at a
        # session's start-up); one that raises resets the stream. The other
        # direction's tap is the socket end's own (``End.tap``).
        self.tap_in: Callable[[bytes], None] | None = None
        # (cluster) The session's message filter (gateway/net/filters.py):
        # the connection's bytes go through it to the socket; and bytes it
        # held (a message split over reads) were acknowledged as it took
        # them, so as many written bytes are not acknowledged again.
        self.filter: Filtered | None = None
        self.preacked = 0
        # (cluster) The filter's answers the stream's window had no room
        # for: sent as the gateway acknowledges (:meth:`StreamIO._filter_more`);
        # meanwhile neither the socket's bytes nor the filter's next
        # messages go on.
        self.owed: bytearray | None = None
        # Set once the socket has taken everything written to it so far
        # (see :meth:`MuxLink.flushed`).
        self.flushed: trio.Event | None = None
        # A TLS socket: plaintext sealed into records that wait in its tail,
        # acknowledged once they are written.
        self.sealed = 0
        self.control = False  # (gateway) a control dial: no session, the REPLY is all
        # (gateway) time.monotonic() when the client arrived (the OPEN's, or
        # its owner's earlier one), and when the REPLY came (0.0: not yet).
        self.arrived = time.monotonic()
        self.replied_at = 0.0

    @property
    def dial_seconds(self) -> float | None:
        """From the client's arrival to the cluster's answer; None before."""
        return self.replied_at - self.arrived if self.replied_at else None


class StreamIO:
    """The bytes of a link's streams (see the module doc)."""

    # -- (cluster) what a kind does to a running session from trio ----------

    def switch(self, stream: Stream, sock, *, goodbye: bytes = b"") -> bool:
        """(cluster) Go on with ``sock`` (a socket, or one of our TLS
        streams: the link carries its records) as ``stream``'s upstream,
        with the old socket's tap: the session carries on with another
        connection to the server (MySQL's COM_CHANGE_USER re-dialled as the
        new db user, from a message its filter holds: the answer goes to
        the gateway as the held message's, filters.Hold). The old socket gets
        ``goodbye`` (what the protocol says before it leaves), as far as
        its kernel takes it at once, and is closed. Only between exchanges:
        nothing may be waiting to be written to the old socket, nor its
        EOF. False (``sock`` reset) if the stream is over or is not
        between exchanges."""
        raw, tls = (sock, None) if isinstance(sock, socket.socket) else detach(sock)
        with self.engine.lock:
            old = stream.end
            if (stream.finished or self.failed is not None or old is None or old.tail is not None
                    or old.in_done or old.eof_wanted):
                reset_and_close(raw)
                return False
            self.blocked.pop(old, None)
            self.engine.forget(old)
            if goodbye:
                try:
                    self.engine.write_some(old, goodbye if old.obj is None else seal(old, goodbye))
                except (OSError, Failure):
                    pass  # it is going anyway
            old.sock.close()
            tap, old.tap, old.owner, old.session = old.tap, None, None, None
            old.obj = old.ssl = old.incoming = old.outgoing = old.key_update = old.carry = None
            stream.end = None
            self._bind(stream, raw, stream.counters, tls, tap)
            if tls is not None:  # bytes may already wait inside the TLS object
                self.engine.again.append(stream.end)
                self.engine.wake()
            return not stream.finished and self.failed is None

    def resume_filter(self, stream: Stream) -> None:
        """(trio's thread: ``Filtered.resume``) A message the stream's
        filter held has its answer: send it, and go on with what the
        gateway sent meanwhile."""
        with self.engine.lock:
            if stream.finished or self.failed is not None or stream.end is None:
                return
            self._run_guarded(stream.end, lambda: self._filter_more(stream))

    def _on_stream(self, stream: Stream, ev: int) -> None:
        end = stream.end
        if stream.finished or end is None:
            return
        if ev == _IN and end.mask == _IN and end.tail is None:
            # The usual event: bytes to read, nothing queued for the socket,
            # and epoll set to wait for more (not so for a stream resumed
            # from ``blocked``). A pump that only emptied the socket changed
            # nothing that _settle and _update_link look at.
            if self._pump(stream):
                return
        else:
            if ev & (_OUT | _ALWAYS) and end.tail is not None:
                self._flush(stream)
            if ev & (_IN | _ALWAYS) and not stream.finished and stream.owed is None:
                self._pump(stream)
            if not stream.finished:
                failed_quietly(end, ev)
        self._settle(stream)
        self._update_link()

    def _pump(self, stream: Stream, urgent: bool = False) -> bool:
        """socket -> connection, within the window and the budget. Each read
        lands right behind room for its DATA header, so the frame is
        encrypted straight from the read buffer, never copied. True if it
        stopped only because the socket was empty, with the window open and
        the connection's socket taking everything (nothing to settle).
        ``urgent``: read even while the connection's socket is backed up
        (what must go before a control frame; still within the window)."""
        end = stream.end
        conn, link_end = self.conn, self.end
        engine = self.engine
        framed, payload, room = engine.framed, self.payload, self.room
        budget = PUMP_BUDGET
        gateway = self.gateway
        sid = stream.sid
        while not end.in_done:
            if link_end.tail is not None and not urgent:
                self.blocked[end] = None
                return False
            want = conn.send_window(sid)
            if want > room:
                want = room
            elif want <= 0:
                return False
            if end.obj is None:
                try:
                    n = end.sock.recv_into(payload, want)
                except BlockingIOError:
                    return True
                except OSError as exc:
                    end.failed = True
                    raise Failure(f"{end.name}: receive failed: {exc.strerror or exc}") from None
            else:
                n = engine.read_into(end, payload[:want])  # reading may queue a KeyUpdate answer
                if n < 0:
                    return end.tail is None
            if n and end.tap is not None:
                _show(end.tap, payload[:n], end.name)
            if not n:
                end.in_done = True
                self._send(conn.send_fin(stream.sid))
                return False
            if gateway:
                if stream.sent is not None:  # no REPLY yet: kept for a retry
                    self._hold(stream, n)
                    if stream.finished:  # making room ended the link, and this stream with it
                        return False
                    stream.sent += payload[:n]
                stream.counters.a_to_b += n
            else:
                stream.counters.b_to_a += n
            framed[:_HEADER_SIZE] = conn.send_data_header(sid, n)
            self._send(framed[:_HEADER_SIZE + n])
            if stream.filter is not None and stream.filter.follows_server:
                # The server's bytes went on: the filter's answers that waited
                # for the end of a server message may follow them now.
                answers = _filtered(stream.filter.from_server, payload[:n], end.name)
                if answers:
                    self._answer(stream, answers)
                    if stream.owed is not None:
                        return False  # the rest waits for the answers (_filter_more)
                    if stream.filter.pending:
                        self._filter_more(stream)  # messages that waited behind the reply
                    if stream.finished:
                        return False
            budget -= n
            if budget <= 0:
                engine.again.append(end)
                return False
            if n < want:
                # The socket is empty (the window is not: n < want): epoll
                # says when there is more. Reading again now would only cost
                # an EAGAIN, a syscall and a raised exception.
                return link_end.tail is None and end.tail is None
        return False

    def _deliver(self) -> None:
        """Write the DATA gathered for one stream (see ``gathered``)."""
        stream, pieces = self.gathered_for, self.gathered
        self.gathered_for, self.gathered = None, []
        if not stream.finished:
            self._deliver_to(stream, pieces)

    def _run_of_data(self, sid: int, pieces: list[memoryview]) -> None:
        """The link's fast path: DATA for one stream taken as a run
        (``MuxConnection.take_data``), written at once, without an event,
        a dispatch or a gathering per frame."""
        stream = self.streams.get(sid)
        if stream is None:
            return  # it ended; these crossed its end
        if stream.end is None:  # no socket yet: held as early data
            for piece in pieces:
                self._dispatch(StreamData(sid, piece))
            return
        self._deliver_to(stream, pieces)

    def _deliver_to(self, stream: Stream, pieces: list[memoryview]) -> None:
        try:
            self._to_socket(stream, pieces)
            if not stream.finished and stream.end.tail is not None and not stream.end.mask & _OUT:
                self._settle(stream)  # wait for the socket to take the rest
        except Failure as exc:
            self._stream_failed(stream, exc)

    def _to_socket(self, stream: Stream, pieces: list[memoryview]) -> None:
        """connection -> socket: write now (several pieces with one
        ``sendmsg``), keep a copy of the rest in the tail. Making room for
        that copy may end the link, and this stream with it (see
        :meth:`_hold`): its socket is then no longer its own, and the rest
        goes nowhere."""
        if stream.tap_in is not None:
            for piece in pieces:
                tap = stream.tap_in  # a tap may let go of the stream midway (the gateway's start-up watch)
                if tap is None:
                    break
                _show(tap, piece, stream.end.name)
        if stream.filter is not None:
            pieces = self._filter(stream, pieces)
            if not pieces or stream.finished:
                return
        self._write_out(stream, pieces)

    def _write_out(self, stream: Stream, pieces: list) -> None:
        """:meth:`_to_socket` past the tap and the filter."""
        end = stream.end
        engine = self.engine
        if end.obj is not None:
            self._to_tls(stream, pieces)
            return
        if end.tail is not None:
            # Queued (one copy of the run); acknowledged once written.
            data = b"".join(pieces)
            self._hold(stream, len(data))
            if not stream.finished:
                engine.write(end, data, copy=True)
            return
        try:
            if len(pieces) == 1:
                data = pieces[0]
                rest = engine.write_some(end, data)
                sent = len(data) - len(rest)
                rest = bytes(rest) if rest else None
            else:
                try:
                    sent = end.sock.sendmsg(pieces)
                except BlockingIOError:
                    sent = 0
                rest = _unsent(pieces, sent)
        except OSError as exc:
            raise send_failure(end, exc) from None
        self._written(stream, sent)
        if rest:
            self._hold(stream, len(rest))
            if not stream.finished:
                end.tail = memoryview(rest)

    def _filter(self, stream: Stream, pieces: list) -> list:
        """(cluster) The connection's bytes for ``stream`` through its
        filter: the whole messages it passes (to write to the socket), its
        answers sent back at once, within the room its window leaves (what
        the filter did not take for want of room stays unacknowledged: the
        gateway's window closes, and with it its client's socket). Every
        byte it took is either passed on, and acknowledged once written, or
        not (an incomplete frame, answered, dropped), and acknowledged now."""
        filtered = stream.filter
        data = b"" if not pieces else bytes(pieces[0]) if len(pieces) == 1 else b"".join(pieces)
        owed = stream.owed
        room = self.conn.send_window(stream.sid) - (len(owed) if owed is not None else 0)
        try:
            passed, answers = filtered.from_client(data, room)
        except Exception as exc:  # a message it cannot read, a bad length: the stream, never the link
            raise Failure(f"{stream.name}: {exc}") from None
        carried = filtered.carried
        taken_now = filtered.taken - ((len(passed[0]) if len(passed) == 1 else sum(map(len, passed))) - carried)
        if taken_now:
            self._written(stream, taken_now)
        if carried:
            stream.preacked += carried
        if answers:
            self._answer(stream, answers)
        return passed

    def _answer(self, stream: Stream, answers: bytes) -> None:
        """(cluster) The filter's answers to the gateway on ``stream``: what
        its window takes now, the rest owed until the gateway acknowledges
        (a client that sends without reading its answers is held back,
        :meth:`_filter`, not reset)."""
        owed = stream.owed
        if owed is None:
            n = min(len(answers), self.conn.send_window(stream.sid))
            if n:
                self._send(self.conn.send_data(stream.sid, answers if n == len(answers) else answers[:n]))
                stream.counters.b_to_a += n
            if n == len(answers):
                return
            stream.owed = bytearray(answers[n:])
        else:
            owed += answers

    def _filter_more(self, stream: Stream) -> None:
        """(cluster) The window opened, or trio answered a held message:
        send what is owed, then let the filter go on with what waited,
        and pass the gateway's EOF on once nothing waits before it."""
        owed = stream.owed
        if owed is not None:
            n = min(len(owed), self.conn.send_window(stream.sid))
            if n:
                self._send(self.conn.send_data(stream.sid, bytes(owed[:n])))
                stream.counters.b_to_a += n
                del owed[:n]
            if owed:
                return
            stream.owed = None
        filtered = stream.filter
        while (filtered.pending and not stream.finished and stream.owed is None
               and self.conn.send_window(stream.sid) > 0):
            pieces = self._filter(stream, [])
            if pieces and not stream.finished:
                self._write_out(stream, pieces)
        if not stream.finished and stream.end.eof_wanted and not filtered.stalled:
            self._fin_to_socket(stream)

    def _fin_to_socket(self, stream: Stream) -> None:
        """The gateway's FIN: on to the socket (after its tail), then, with
        a filter, to the filter; with a filter still holding messages back,
        once they went on (:meth:`_filter_more`)."""
        filtered = stream.filter
        if filtered is not None and filtered.stalled:
            return
        self._after_write(stream)
        if filtered is not None:
            filtered.eof()

    def _to_tls(self, stream: Stream, pieces: list[memoryview]) -> None:
        """:meth:`_to_socket` for a TLS socket: the plaintext is sealed into
        records at once; what the kernel does not take waits in the tail
        (held, as ciphertext), and its plaintext is acknowledged once the
        tail has drained."""
        end = stream.end
        n = sum(len(piece) for piece in pieces)
        records = seal(end, pieces[0] if len(pieces) == 1 else b"".join(pieces))
        queued = end.tail is not None
        if queued:
            rest = records
        else:
            try:
                rest = self.engine.write_some(end, records)
            except OSError as exc:
                raise send_failure(end, exc) from None
            if not rest:
                self._written(stream, n)
                return
        # Acknowledged once the tail has drained (_flush), which is why the
        # tail is set here and not through engine.write: that would try
        # the socket again and, finding room, leave no tail to drain.
        stream.sealed += n
        self._hold(stream, len(rest))
        if stream.finished:
            return
        if queued:
            self.engine.write(end, rest, copy=False)  # behind the tail
        else:
            end.tail = memoryview(rest)

    def _hold(self, stream: Stream, n: int) -> None:
        """Count ``n`` more bytes held for ``stream``'s socket. Past
        LINK_HELD or HELD_LIMIT the stream of this link that holds the most
        is reset to make room (a stuck one, rather than one that met a full
        socket once), or, if that is this one, raise :class:`Failure`."""
        engine = self.engine
        while True:
            if self.held + n > LINK_HELD:
                where, limit = "for the sessions of one connection", LINK_HELD
            elif engine.held + n > HELD_LIMIT:
                where, limit = "in all", HELD_LIMIT
            else:
                self.held += n
                engine.held += n
                stream.held += n
                return
            reason = (f"does not take data as fast as it comes, and the relay already holds "
                      f"{limit / _MiB:g} MiB {where} for sockets that do not (its limit); "
                      f"the session was reset")
            most = max(self.streams.values(), key=lambda s: s.held, default=stream)
            if most is stream or most.held <= stream.held + n or self.failed is not None:
                raise Failure(f"{stream.name}: {reason}")
            self._finish(most, f"{most.name}: {reason}", reset=True)
            if stream.finished:  # its RESET could not be sent: the link, and this stream, ended
                return

    def _unhold(self, stream: Stream, n: int) -> None:
        self.held -= n
        self.engine.held -= n
        stream.held -= n

    def _released(self, n: int) -> None:
        """A drainer (an aborted stream's socket) let go of ``n`` bytes."""
        self.held -= n
        self.engine.held -= n

    def _flush(self, stream: Stream) -> None:
        end = stream.end
        try:
            written = self.engine.drain(end)
        except OSError as exc:
            raise send_failure(end, exc) from None
        # Every byte of a stream's tail was held, but for what reading TLS
        # made OpenSSL write (a KeyUpdate answer).
        self._unhold(stream, min(written, stream.held))
        if end.obj is None:
            self._written(stream, written)
        elif end.tail is None and stream.sealed:
            sealed, stream.sealed = stream.sealed, 0
            self._written(stream, sealed)
        if end.tail is None and stream.flushed is not None:
            self._set_flushed(stream)
        self._after_write(stream)

    def _written(self, stream: Stream, n: int) -> None:
        if not n:
            return
        if stream.preacked:  # see Stream.preacked
            done = min(n, stream.preacked)
            stream.preacked -= done
            n -= done
            if not n:
                return
        if self.gateway:
            stream.counters.b_to_a += n
        else:
            stream.counters.a_to_b += n
        frame = self.conn.acknowledge(stream.sid, n)
        if frame:  # once a quarter of a window is due
            self._send(frame)

    def _after_write(self, stream: Stream) -> None:
        """The peer's FIN becomes ours to the socket once its tail is gone
        (a TLS socket's close_notify first, which may leave a tail of its
        own: we come back here once that has drained)."""
        end = stream.end
        if end.tail is None and end.eof_wanted and not end.eof_sent and (stream.filter is None
                                                                         or not stream.filter.stalled):
            self.engine.send_eof(end)

    def _set_flushed(self, stream: Stream) -> None:
        event, stream.flushed = stream.flushed, None
        try:
            self.token.run_sync_soon(event.set)
        except trio.RunFinishedError:
            pass

    def _settle(self, stream: Stream) -> None:
        """After anything that may have changed a stream's state: finish it
        if both directions are over, else make its epoll interest match.
        Every path that reads, writes, or takes a FIN or a WINDOW ends here."""
        if stream.finished:
            return
        end = stream.end
        if end is None:
            return
        if end.in_done and end.eof_sent and end.tail is None:
            self._finish(stream, None, reset=False)
        else:
            self._update(end)


def _show(tap: Tap, data: memoryview, name: str) -> None:
    """Show ``data`` to a tap; what it refuses (an audit parser that cannot
    parse it) must not pass: the stream is reset."""
    try:
        tap(bytes(data))
    except Exception as exc:
        raise Failure(f"{name}: {exc}") from None


def _filtered(step: Callable, data, name: str, *args):
    """A filter's ``step`` on ``data``; what it raises (a message it cannot
    read, a bad length) resets the stream, never the connection."""
    try:
        return step(data, *args)
    except Exception as exc:
        raise Failure(f"{name}: {exc}") from None


def _unsent(pieces: list[memoryview], sent: int) -> bytes:
    """A copy of what ``sendmsg(pieces)`` did not send."""
    for i, piece in enumerate(pieces):
        if sent < len(piece):
            return b"".join([piece[sent:], *pieces[i + 1:]])
        sent -= len(piece)
    return b""

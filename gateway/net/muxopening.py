"""The gateway's side of a multiplexed connection (see
:mod:`gateway.net.muxlink`): opening streams. :meth:`StreamOpening.start`
sends the OPEN and relays the client's socket at once; :meth:`~StreamOpening.open`
opens a stream without a socket, :meth:`~StreamOpening.reply` awaits the
cluster's answer and :meth:`~StreamOpening.bind` hands the client's socket
over once accepted; :meth:`~StreamOpening.control` is a control dial (a
cancel, a probe, a renewal of the connection's certificate: no session, the
REPLY is all); the REPLY's handler. Each OPEN has a deadline for its REPLY.
A mixin of :class:`~gateway.net.muxlink.MuxLink`: its state and its other
methods are the link's.
"""

from __future__ import annotations

import socket
import time
from typing import TYPE_CHECKING, Callable

import trio

from gateway.net.ends import Failure, detach, reset_and_close
from gateway.net.muxstreams import Stream
from gateway.net.tcp import unread, written
from gateway.net.tls import TLSStream
from protocols.dial import DialAccept, DialError, DialRequest
from protocols.errors import LocalProtocolError
from protocols.mux import StreamReplied

if TYPE_CHECKING:
    from gateway.net.muxlink import MuxLink

__all__ = ["CONTROL_DRAIN_LIMIT", "CONTROL_DRAIN_PAUSE", "LinkClosed", "StreamOpening"]

#: A cancel (a control dial after a session) waits until the engine has read
#: what the client had sent on the session before it, polling every
#: CONTROL_DRAIN_PAUSE, for CONTROL_DRAIN_LIMIT at most: a server that reads
#: a huge query slowly holds the stream's window shut meanwhile.
CONTROL_DRAIN_PAUSE = 0.005
CONTROL_DRAIN_LIMIT = 10.0


class LinkClosed(Exception):
    """The multiplexed connection is over; open a new one."""


class StreamOpening:
    """(gateway) Opening streams; see the module docstring."""

    def start(self, request: DialRequest, sock: socket.socket, counters,
              notify: Callable[["MuxLink", Stream], None], *, reply_timeout: float,
              context=None, retry: Callable[[socket.socket | None, bytes, bool, str], None] | None = None,
              early: bytes = b"", early_fin: bool = False, arrived: float | None = None) -> Stream:
        """(gateway) Open a stream for ``request`` and relay ``sock`` (a
        connected non-blocking socket, now the link's) on it at once. A
        refusal, or no REPLY within ``reply_timeout`` seconds, ends the
        stream and resets ``sock``; ``notify(link, stream)`` hears of the end
        (``stream.reply`` says which). Raises :class:`LinkClosed` (``sock``
        is still the caller's then).

        If the connection ends before the cluster could have read the OPEN
        (see the module docstring), the stream ends without a word to
        ``notify`` and ``retry(sock, early, early_fin, reason)`` gets
        ``sock`` back (in whichever thread saw the reset, under the lock,
        maybe before ``start`` returns), with the bytes already read from
        it, whether its EOF was, and why the connection ended: pass the
        first three to ``start`` on another link (``early`` is at most
        EARLY_DATA bytes). Use ``retry`` with ``notify``, not :meth:`wait`;
        a session started with ``early`` is not started again. ``arrived``:
        when the client came (time.monotonic()), if before the OPEN; the
        stream's ``dial_seconds`` count from it."""
        if retry is not None and (early or early_fin):
            raise ValueError("pass retry or early, not both: a session is started again once at most")
        with self.engine.lock:
            stream = self._open(request, notify, reply_timeout, context, retry, arrived)
            sid = stream.sid
            self._bind(stream, sock, counters)
            if early:  # read from the socket for an OPEN on another link
                self._send_guarded(self.conn.send_data_header(sid, len(early)) + early)
            if early_fin and not stream.finished:
                stream.end.in_done = True
                self._send_guarded(self.conn.send_fin(sid))
            if not stream.finished:
                # What the client sent already goes right behind the OPEN.
                self._run_guarded(stream.end, lambda: self._pump(stream))
        return stream

    def open(self, request: DialRequest, *, reply_timeout: float, context=None,
             retry: Callable[[socket.socket | None, bytes, bool, str], None] | None = None,
             arrived: float | None = None) -> Stream:
        """(gateway) Open a stream for ``request`` without a socket yet:
        await :meth:`reply`, then :meth:`bind` the client's socket (the
        cluster's first bytes wait until then), or turn the client away in
        its own protocol. ``retry(None, b"", False, reason)`` and
        ``arrived``: as for :meth:`start`. Raises :class:`LinkClosed`."""
        with self.engine.lock:
            stream = self._open(request, None, reply_timeout, context, retry, arrived)
            stream.done = trio.Event()
        return stream

    async def reply(self, stream: Stream) -> DialAccept | DialError | None:
        """(gateway) The cluster's answer to :meth:`open`; None if the
        stream ended first (``stream.error`` says why). If cancelled, the
        stream is reset."""
        try:
            if stream.reply is None and not stream.finished:
                await stream.done.wait()
        except BaseException:
            self.cut(stream, "cancelled")
            raise
        return stream.reply

    def bind(self, stream: Stream, client: trio.SocketStream | TLSStream, counters, *,
             tap_in: Callable[[bytes], None] | None = None, ahead: bytes = b"") -> bool:
        """(gateway) Relay ``client`` (its socket is the link's now; one of
        our TLS streams: the link carries its records) on a stream that
        :meth:`open` started and the cluster accepted; end it with
        :meth:`wait`. ``tap_in`` sees every chunk of the cluster's bytes
        before the client does. ``ahead``: bytes the gateway already read
        from the client (the session's first: a MongoDB client's first
        command after hellos answered here), sent before any the socket
        holds; at most the stream's first window (INITIAL_WINDOW). False if
        the stream ended meanwhile (the socket is reset then)."""
        sock, tls = detach(client)
        with self.engine.lock:
            if stream.finished or self.failed is not None:
                reset_and_close(sock)
                return False
            if len(ahead) > self.conn.send_window(stream.sid):
                reset_and_close(sock)
                raise ValueError(f"{len(ahead)} bytes ahead do not fit the stream's window")
            stream.tap_in = tap_in
            stream.done = None  # now for wait()
            self._attach(stream, sock, counters, tls, None)
            if ahead and not stream.finished:
                counters.a_to_b += len(ahead)
                self._send_guarded(self.conn.send_data(stream.sid, ahead))
            if not stream.finished:
                self._run_guarded(stream.end, lambda: self._pump(stream))
            return True

    def _open(self, request: DialRequest, notify, reply_timeout: float, context, retry,
              arrived: float | None = None) -> Stream:
        """(under the lock) Send the OPEN and register the stream, with its
        REPLY's deadline and what a ``retry`` needs. Raises
        :class:`LinkClosed`."""
        if self.failed is not None:
            raise LinkClosed(self.failed)
        try:
            sid, frame = self.conn.send_open(request)
        except LocalProtocolError as exc:  # stream ids used up, after 2**32 - 1 sessions
            self._fail(str(exc))
            raise LinkClosed(self.failed) from None
        self._send_guarded(frame)
        if self.failed is not None:
            raise LinkClosed(self.failed)
        stream = Stream(sid, self.socket_name, notify)
        stream.context = context
        if arrived is not None:
            stream.arrived = arrived
        if retry is not None:
            opened = written(self.end.sock)  # the OPEN is in the kernel, or queued behind
            if opened is not None:
                stream.retry, stream.sent = retry, bytearray()
                stream.opened = opened + self.engine.backlog(self.end)
        self.streams[sid] = stream
        stream.timer = self.engine.call_later(reply_timeout, lambda: self._overdue(stream, reply_timeout))
        return stream

    def _overdue(self, stream: Stream, timeout: float) -> None:
        if stream.reply is None and not stream.finished:
            self._finish(stream, f"the cluster did not answer within {timeout:.0f}s", reset=True)

    async def control(self, request: DialRequest, *, after: Stream | None = None,
                      timeout: float) -> DialAccept | DialError:
        """(gateway) A control dial (no session: a cancel) on a stream of its
        own, and the cluster's answer. ``after``: a session whose bytes the
        client sent before this must reach the cluster first: what its
        socket holds is read and sent ahead of the OPEN, and the cluster
        acts once it has written all of it (:meth:`flushed`). Raises
        :class:`LinkClosed` (also when no answer came within ``timeout``
        seconds)."""
        if after is not None:
            await self._read_up(after, min(timeout, CONTROL_DRAIN_LIMIT))
        with self.engine.lock:
            if self.failed is not None:
                raise LinkClosed(self.failed)
            if after is not None and not after.finished and after.end is not None:
                self._run_guarded(after.end, lambda: self._pump(after, urgent=True))
            stream = self._open(request, None, timeout, None, None)
            stream.control = True
            stream.done = trio.Event()
            self._send_guarded(self.conn.send_fin(stream.sid))
            if self.failed is not None:
                raise LinkClosed(self.failed)
        try:
            await stream.done.wait()
        finally:
            with self.engine.lock:
                self._finish(stream, "cancelled", reset=True)  # nothing if it is over
        if stream.reply is None:
            raise LinkClosed(stream.error or self.failed or "the stream ended without an answer")
        return stream.reply

    async def _read_up(self, stream: Stream, limit: float) -> None:
        """Until the engine has read what the client had sent on ``stream``
        when this was called: its socket's queue, and what the client's
        kernel still held for it (that moves in as the queue drains). The
        stream's window may hold the engine back (a server reading slowly),
        so this polls, for ``limit`` seconds at most."""
        quiet = False  # the queue was empty at the last look
        with trio.move_on_after(limit):
            while True:
                with self.engine.lock:
                    end = stream.end
                    if stream.finished or end is None or end.in_done or self.failed is not None:
                        return
                    waiting = unread(end.sock)
                if not waiting:
                    if quiet:  # empty twice, a pause apart: the client's kernel held nothing back
                        return
                    quiet = True
                else:
                    quiet = False
                await trio.sleep(CONTROL_DRAIN_PAUSE)

    def _on_replied(self, event: StreamReplied) -> None:
        stream = self.streams.get(event.stream)
        if stream is None:
            return
        stream.reply = event.reply
        stream.replied_at = time.monotonic()
        if stream.sent is not None:
            self._unhold(stream, len(stream.sent))
            stream.retry = stream.sent = None
        if stream.timer is not None:
            stream.timer.cancel()
            stream.timer = None
        if isinstance(event.reply, DialError):
            self._finish(stream, event.reply.message, reset=False)
        elif stream.control:  # the answer is all (see control)
            self._finish(stream, None, reset=False)
        elif stream.end is None:  # opened without a socket (open): reply() hears of it
            if stream.done is not None:
                try:
                    self.token.run_sync_soon(stream.done.set)
                except trio.RunFinishedError:
                    pass
        else:
            # Its window may have been held at EARLY_DATA: read on now.
            try:
                self._pump(stream)
                self._settle(stream)
            except Failure as exc:
                self._stream_failed(stream, exc)

"""The cluster's side of a multiplexed connection (see
:mod:`gateway.net.muxlink`): the decision on each OPEN. The OPEN's handler
refuses what the link cannot take (no ``on_open``, past ``max_streams``)
and hands the rest to ``on_open``, which answers with
:meth:`~StreamAnswering.accept` (the upstream socket, relayed at once, the
gateway's early bytes passed on), :meth:`~StreamAnswering.refuse`, or, for
a control dial, :meth:`~StreamAnswering.answer`; :meth:`~StreamAnswering.flushed`
lets a cancel wait until its session's earlier bytes reached the upstream.
A mixin of :class:`~gateway.net.muxlink.MuxLink`: its state and its other
methods are the link's.
"""

from __future__ import annotations

import logging
import socket
from typing import Callable

import trio

from gateway.net.ends import detach, reset_and_close
from gateway.net.filters import Filtered
from gateway.net.muxstreams import Stream
from gateway.net.tls import TLSStream
from protocols.dial import DialAccept, DialError
from protocols.errors import ErrorCode
from protocols.mux import StreamOpened

__all__ = ["StreamAnswering"]

log = logging.getLogger("gateway.net.muxlink")


class StreamAnswering:
    """(cluster) Deciding and answering OPENs; see the module docstring."""

    def _on_opened(self, event: StreamOpened) -> None:
        refusal = None
        if self.on_open is None:
            refusal = DialError(code=ErrorCode.BAD_REQUEST, message="this side does not accept streams")
        elif len(self.streams) >= self.max_streams:
            # Each stream costs the cluster a task and, once accepted,
            # an upstream socket: a gateway cannot make it hold more.
            refusal = DialError(
                code=ErrorCode.RATE_LIMITED,
                message=f"too many sessions on one connection (the limit is {self.max_streams}); "
                        f"close some and try again",
            )
        if refusal is not None:
            self._send(self.conn.send_reply(event.stream, refusal))
            return
        stream = Stream(event.stream, self.socket_name)
        self.streams[event.stream] = stream
        try:
            self.on_open(self, stream, event.request)
        except Exception:
            log.exception("mux_on_open_failed link=%s", self.name)
            self.refuse(stream, DialError(code=ErrorCode.INTERNAL_ERROR,
                                          message="internal error in the cluster"))

    def accept(self, stream: Stream, reply: DialAccept,
               sock: trio.SocketStream | TLSStream | socket.socket | None,
               counters, *, first: bytes = b"", taps: tuple[Callable[[bytes], None] | None, ...] = (None, None),
               filtered: Filtered | None = None) -> bool:
        """(cluster) Answer the OPEN with ``reply`` and relay ``sock`` (a
        socket, or one of our TLS streams: the link carries its records) for
        it: ``first`` goes to the gateway right behind the REPLY, then what
        the gateway sent early goes to ``sock``. ``taps``: (shown the
        gateway's bytes, shown the socket's), as ``relay``'s; ``filtered``:
        the gateway's messages go through it (gateway/net/filters.py). False if the
        stream or the link ended meanwhile (``sock`` is reset then).
        Without ``sock`` (an upstream that already said no and left:
        ``first`` is its answer) the stream ends after ``first`` and FIN."""
        raw, tls = (sock, None) if sock is None or isinstance(sock, socket.socket) else detach(sock)
        with self.engine.lock:
            if stream.finished or self.failed is not None:
                if raw is not None:
                    reset_and_close(raw)  # the session was cut while it connected
                return False
            frames = self.conn.send_reply(stream.sid, reply)
            if first:
                frames += self.conn.send_data(stream.sid, first)
                counters.b_to_a += len(first)
            if raw is None:
                self._send_guarded(frames + self.conn.send_fin(stream.sid))
                stream.counters = counters
                self._finish(stream, None, reset=False)
                return True
            self._send_guarded(frames)
            if stream.finished:
                reset_and_close(raw)
                return False
            stream.tap_in = taps[0]
            stream.filter = filtered
            if filtered is not None:
                filtered.resume = lambda: self.resume_filter(stream)
            self._attach(stream, raw, counters, tls, taps[1])
        return True

    def refuse(self, stream: Stream, error: DialError) -> None:
        """(cluster) Turn the OPEN down."""
        with self.engine.lock:
            if stream.finished or self.failed is not None:
                return
            self._send_guarded(self.conn.send_reply(stream.sid, error))
            self._finish(stream, error.message, reset=False)

    def answer(self, stream: Stream, reply: DialAccept | DialError) -> None:
        """(cluster) Answer a control OPEN (one that asks for no session: a
        cancel): the REPLY, and with an accept our FIN, and the stream is
        over (the gateway's FIN came with its OPEN)."""
        if isinstance(reply, DialError):
            self.refuse(stream, reply)
            return
        with self.engine.lock:
            if stream.finished or self.failed is not None:
                return
            self._send_guarded(self.conn.send_reply(stream.sid, reply))
            if self.failed is None:
                self._send_guarded(self.conn.send_fin(stream.sid))
            self._finish(stream, None, reset=False)

    def flushed(self, stream: Stream) -> trio.Event | None:
        """(cluster, the engine's thread or under its lock) An event set once
        ``stream``'s socket has taken every byte that came for it so far, or
        None if it has (or the stream is over)."""
        end = stream.end
        if stream.finished or end is None or (end.tail is None and not stream.early):
            return None
        if stream.flushed is None:
            stream.flushed = trio.Event()
        return stream.flushed

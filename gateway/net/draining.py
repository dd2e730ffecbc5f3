"""Aborting a session that the other side aborted: the socket still
hands its peer the bytes that came before the abort (:class:`_Draining`),
then is reset; see :meth:`gateway.net.engine.RelayEngine.abort`."""

from __future__ import annotations

import select
import time
from typing import TYPE_CHECKING, Callable

from gateway.net.ends import _OUT, _WATCH, End, _unacknowledged, reset_and_close
from gateway.net.tls import linger_reset

if TYPE_CHECKING:
    from gateway.net.engine import RelayEngine

__all__ = ["ABORT_DRAIN"]

#: How long a socket whose session the other side aborted may take to hand
#: its peer the bytes that came before the abort; then it is reset anyway.
ABORT_DRAIN = 5.0


#: How often such a socket is asked whether its peer has acknowledged
#: everything (SIOCOUTQ): first after this, then twice as long each time.
_DRAIN_POLL = 0.002


_DRAIN_POLL_MAX = 0.1


class _Draining:
    """The owner of a socket whose session was aborted by the other side:
    it writes what is still queued for the socket, waits until the peer's
    kernel has acknowledged all of it, then resets the connection, within
    :data:`ABORT_DRAIN` seconds. The socket is set to reset on close from
    the start, so a process that exits meanwhile resets it too, never ends
    it with a FIN. ``release(n)`` (if given) hears of each ``n`` bytes of
    the ``held`` it owned that are gone (written, or dropped at the end),
    so that the owner's memory limits keep counting them until then."""

    __slots__ = ("engine", "end", "deadline", "timer", "delay", "held", "release")

    def __init__(self, engine: "RelayEngine", end: "End", held: int = 0,
                 release: Callable[[int], None] | None = None) -> None:
        self.engine, self.end = engine, end
        self.held, self.release = held, release
        self.deadline = time.monotonic() + ABORT_DRAIN
        self.delay = _DRAIN_POLL
        linger_reset(end.sock)
        end.owner = self
        end.session = None
        engine.ends[end.fd] = end
        # Errors and hang-ups reach on_ready whatever the mask: a peer that
        # fails meanwhile ends the wait.
        engine.set_mask(end, _OUT if end.tail is not None else _WATCH)
        self.timer = engine.call_later(self.delay, self._check)

    def on_ready(self, end: "End", ev: int) -> None:
        if ev & select.EPOLLERR:
            self._reset()  # the peer is gone: nothing more will be delivered
            return
        if ev & select.EPOLLHUP and end.tail is None:
            # Both directions shut (our FIN went out before the abort), not
            # a failure: what is unacknowledged may still arrive; the timer
            # watches it from here.
            self.engine.set_mask(end, 0)
            return
        try:
            self._released(self.engine.drain(end))
        except OSError:
            self._reset()
            return
        if end.tail is None:
            self.engine.set_mask(end, _WATCH)

    def _released(self, n: int) -> None:
        n = min(n, self.held)
        if n and self.release is not None:
            self.held -= n
            self.release(n)

    def _check(self) -> None:
        end = self.end
        if end is None:
            return
        if time.monotonic() >= self.deadline or (end.tail is None and not _unacknowledged(end.sock)):
            self._reset()
            return
        self.delay = min(2 * self.delay, _DRAIN_POLL_MAX)
        self.timer = self.engine.call_later(self.delay, self._check)

    def _reset(self) -> None:
        end, self.end = self.end, None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self._released(self.held)
        self.engine.forget(end)
        reset_and_close(end.sock)
        end.owner = None
        end.tail = None
        end.more = []

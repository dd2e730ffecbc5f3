"""The relay engine: one thread per process moving the bytes of every
established session, on an epoll loop of its own.

Theory of operation
-------------------
Everything up to the relay (accepting, handshakes, the dial, a protocol's
startup phase, the API) runs in trio. Once a session only has to move bytes
both ways, trio's generality costs more than the bytes do: each wake-up of a
task is a pass of trio's scheduler plus an ``epoll_ctl`` to re-arm a one-shot
registration, and a relay direction needs several of them per message. On
this machine that was ~200 µs of CPU per round trip per process, six times
what a C relay spends. So :func:`gateway.net.relay.relay` hands the two
sockets (and, for a TLS side, its :class:`ssl.SSLObject` and memory BIOs) to
this engine, and only waits for it to report the end.

The engine is what stunnel or haproxy do, in Python: one thread, one
level-triggered epoll set, non-blocking sockets, and per session a small
state machine. No task, no buffer and no wake-up belongs to an idle
session: its cost is two sockets, two small objects and, for TLS, OpenSSL's
own state. Reads go into two scratch buffers shared by all sessions (they
never hold data between events); only bytes a slow receiver has not taken
yet are kept, per side, in ``_End.tail``.

One side, ``_End``, is a socket plus, when it speaks TLS, its SSLObject. The
direction *from* an end to its peer is pumped by :meth:`RelayEngine._pump`:

1. plaintext the end produced earlier but could not deliver (``carry``)
   goes first; then decrypt what is already in the incoming BIO, and read
   the socket only when that is empty (as :mod:`gateway.net.tls` does),
   filling the plaintext buffer while the last receive filled its own (the
   kernel holds more): a bulk transfer then moves whole buffers, one write
   to the peer each, rather than a buffer and then its leftover;
2. hand it to the peer: encrypt it into the peer's SSLObject (or take it
   as is for plain TCP) and write it to the peer's socket at once;
3. whatever the peer's kernel buffer does not take becomes ``peer.tail``,
   and the direction stops reading until the tail has drained (EPOLLOUT):
   back-pressure by TCP flow control, as in any C relay;
4. stop when the source would block, or after ``PUMP_BUDGET`` bytes so one
   busy session cannot starve the others (it is pumped again on the next
   turn of the loop, even though epoll may say nothing, since its data may
   sit decrypted inside OpenSSL).

Epoll interest follows from that state: EPOLLIN while the direction out of
an end may read, EPOLLOUT while the end has a tail. An end that wants
neither is removed from the set, because epoll reports a hang-up whatever
the mask, and a level-triggered hang-up nobody consumes would spin; except
an end that sent its EOF while we still owe it data or ours, which stays
registered for errors only (``_WATCH``), so that a peer that vanished
meanwhile ends the session (:func:`_failed_quietly` consumes the event).

TLS rules kept from :mod:`gateway.net.tls`:
- Reading can make OpenSSL write (a KeyUpdate answer, an alert): after every
  read of a TLS end its outgoing BIO is flushed to its socket, in order
  with the data, through the same tail.
- End of stream: the peer's close_notify is EOF; a TCP EOF without it is a
  truncation, an error, delivered after every authentic byte before it.
- Half-close: EOF from one side becomes close_notify plus ``shutdown(SHUT_WR)``
  on a TLS side (plain ``shutdown(SHUT_WR)`` on a plain one) once that
  side's tail has drained; the other direction keeps flowing. Before
  ``SSLObject.unwrap`` every complete record already received is decrypted
  into ``carry`` (``unwrap`` would otherwise fail on it and lose it).
- A close_notify we cannot deliver after the peer sent its own and went
  away is not an error.
- A session that did not end cleanly (an error on either side, a tap that
  refused bytes, cancellation) is *aborted*: both sockets are closed with a
  TCP RST (:func:`reset_and_close`) and no close_notify, so neither peer can
  take a cut stream for a complete one (a FIN, or a close_notify, would say
  "that was everything"). A reset is passed on as a reset, hop by hop, as
  stunnel and haproxy do. Only a session whose directions both ended with an
  EOF closes gracefully. When the abort came from the other side (its
  reset, a truncation), the bytes that came before it still reach this
  side's peer first, as they would over one TCP connection: the socket
  writes what it still holds and is reset once the peer's kernel has
  acknowledged all of it (:meth:`RelayEngine.abort`, at most
  :data:`ABORT_DRAIN` seconds). A cut (a lock, cancellation) resets at once.

Threads. trio's thread hands a session over in :meth:`RelayEngine.relay`
(detaching the sockets from their trio objects, so the engine owns the
descriptors and closes them) and awaits an event; the engine reports the
end with ``TrioToken.run_sync_soon``. Tap callbacks (the audit parsers) are
called in the engine's thread, in order, with a copy of the bytes, before
those bytes are forwarded; a tap that raises ends the session (what cannot
be audited does not pass). So a tap must be safe to call from another
thread than trio's: the cluster's auditors only parse and queue events
(``Cluster.audit_soon`` is thread-safe).
A single lock guards the engine's tables: the engine takes it for each
batch of events, trio's thread takes it to register or abort a session.
It is re-entrant, so an owner's callback (running under it in the engine's
thread) may call the same public methods trio's thread does.

Beyond relaying, the engine can do the few per-connection steps that need no
decision from trio, so that a new session costs no trip through trio's
scheduler and no hand-off of the GIL between the two threads:
:meth:`RelayEngine.listen` accepts connections and hands each to a callback
in the engine's thread, :meth:`RelayEngine.connect` opens a TCP connection
without blocking, and :meth:`RelayEngine.call_later` runs a callback after a
delay (the timeouts of both).
Every socket call is non-blocking, so nobody holds the lock for long, and
a stale epoll event (a descriptor closed and reused in between) costs a
harmless EAGAIN. The GIL is released around every system call, so trio's
thread stays responsive while the engine is busy.

Cancellation. If the awaiting task is cancelled (a lock cuts the session,
the server stops), it aborts the session under the lock, which resets both
sockets at once, and re-raises.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import heapq
import itertools
import logging
import os
import select
import socket
import ssl
import sys
import threading
import time
from typing import Callable

import trio

from gateway.net import tlskeys
from gateway.net.descriptors import ACCEPT_STARVED, Starvation
from gateway.net.tcp import TCP_CLOSE, unacknowledged
from gateway.net.tls import TLSStream, linger_reset

__all__ = ["ABORT_DRAIN", "PUMP_BUDGET", "RelayEngine", "Timer", "engine", "eligible", "reset_and_close", "seal"]

log = logging.getLogger(__name__)

#: Bytes one direction may move per turn before the loop serves others.
PUMP_BUDGET = 1024 * 1024

#: After this many sessions ended (and at least as many as are still live),
#: hand freed heap back to the kernel; see :func:`_trim_heap`.
TRIM_AFTER = 256

_READ = 256 * 1024  # plaintext read per step (and the scratch size)
FRAME_HEADROOM = 16
_NOTHING = memoryview(b"")  # what _write_some returns when the kernel took everything
_CIPHER = _READ + 8 * 1024  # ciphertext read per recv: one read plus record overhead
_MAX_EVENTS = 1024

#: How long another thread may keep the GIL while the engine waits for it.
SWITCH_INTERVAL = 0.0001

#: How long a socket whose session the other side aborted may take to hand
#: its peer the bytes that came before the abort; then it is reset anyway.
ABORT_DRAIN = 5.0
#: How often such a socket is asked whether its peer has acknowledged
#: everything (SIOCOUTQ): first after this, then twice as long each time.
_DRAIN_POLL = 0.002
_DRAIN_POLL_MAX = 0.1

#: Connections one listener accepts per turn of the loop.
ACCEPT_BATCH = 64

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT
_ALWAYS = select.EPOLLERR | select.EPOLLHUP
#: The interest of a socket we neither read nor write now but must hear
#: fail: one that sent us its EOF while we owe it more (a half-closed,
#: quiet session), so that keepalive's verdict on a peer that vanished
#: (gateway/net/tcp.py) ends the session. Only errors and hang-ups are
#: reported for it, and a hang-up only comes with an error here (our side
#: of the socket is still open for writing).
_WATCH = select.EPOLLERR

_TRUNCATED = (
    "the peer closed the TCP connection without a TLS close_notify, so the "
    "stream may have been cut short"
)

Tap = Callable[[bytes], None]


def reset_and_close(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST instead of a FIN (SO_LINGER 0): what a
    relay does to a connection whose other half was cut, so that its peer
    sees an abort, not an end. Anything still unsent is dropped."""
    linger_reset(sock)
    sock.close()


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes written to ``sock`` that its peer's kernel has not acknowledged
    yet (SIOCOUTQ); 0 if the connection failed (a reset, keepalive's
    timeout: nothing more will be delivered, although the count may stay
    up) or the socket cannot say."""
    try:
        # tcpi_state, the first byte of TCP_INFO: a reset or timed-out
        # connection is CLOSE for good (SO_ERROR would say so only once).
        if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE:
            return 0
    except OSError:
        pass  # not TCP (a test's AF_UNIX pair): SIOCOUTQ alone
    return unacknowledged(sock) or 0


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

    def __init__(self, engine: "RelayEngine", end: "_End", held: int = 0,
                 release: Callable[[int], None] | None = None) -> None:
        self.engine, self.end = engine, end
        self.held, self.release = held, release
        self.deadline = time.monotonic() + ABORT_DRAIN
        self.delay = _DRAIN_POLL
        linger_reset(end.sock)
        end.owner = self
        end.session = None
        engine._ends[end.fd] = end
        # Errors and hang-ups reach on_ready whatever the mask: a peer that
        # fails meanwhile ends the wait.
        engine.set_mask(end, _OUT if end.tail is not None else _WATCH)
        self.timer = engine.call_later(self.delay, self._check)

    def on_ready(self, end: "_End", ev: int) -> None:
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


class _Cut(Exception):
    """Ends a session on our own account (a tap that refused bytes): both
    sides are reset at once, with this message."""


class _Failure(Exception):
    """One side's operation failed; ends the session with this message."""


def _ssl_text(exc: ssl.SSLError) -> str:
    return exc.reason or str(exc)


class _End:
    """One side of a session: a non-blocking socket, TLS state if any, and
    what is waiting to be written to it."""

    __slots__ = (
        "sock", "fd", "name", "obj", "ssl", "incoming", "outgoing", "peer", "session", "tap", "forward",
        "owner",
        "tail", "more", "more_bytes", "carry", "mask", "registered", "in_done", "eof_wanted", "eof_sent", "peer_closed",
        "tcp_eof", "failed", "error_pending", "os_error", "kernel_full",
        "records", "rekey_at", "key_update", "shift",
    )

    def __init__(self, sock: socket.socket, name: str, tls: tuple | None, tap: Tap | None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        # ``tls``: (SSLObject, incoming BIO, outgoing BIO[, records written
        # under the current key so far]), as _detach hands it over.
        self.obj, self.incoming, self.outgoing, *written = tls if tls is not None else (None, None, None)
        # The C object behind the SSLObject: its read, write and pending are
        # the same calls without a Python frame around each (they are on
        # every message's path). ``obj`` itself if that ever moves.
        self.ssl = getattr(self.obj, "_sslobj", self.obj)
        self.peer: _End | None = None
        self.session: _Session | None = None
        self.tap = tap
        self.forward = True  # data read here counts as a_to_b
        # Not None for the ends of a multiplexed connection and its streams
        # (gateway/net/muxlink.py), which handles their events itself.
        self.owner = None
        self.tail: memoryview | None = None  # bytes for this socket the kernel has not taken
        # Queued behind the tail (a list, so appending costs no copy of what
        # is already queued); non-empty only while there is a tail.
        self.more: list[bytes] = []
        self.more_bytes = 0
        self.carry: bytearray | None = None  # plaintext read here, not yet handed to the peer
        self.mask = 0
        self.registered = False
        self.in_done = False  # EOF read from this end (and passed on)
        self.eof_wanted = False  # send EOF here once the tail has drained
        self.eof_sent = False  # our EOF (close_notify and/or FIN) went out here
        self.peer_closed = False  # TLS: their close_notify was read
        self.tcp_eof = False  # TLS: the socket reported EOF
        self.failed = False  # an operation on this end failed
        self.error_pending: str | None = None  # an error to report after delivering data
        self.os_error: int | None = None  # the errno a read or write of the socket failed with
        # TLS: the last receive filled the buffer, so the kernel likely holds
        # more: a read that already has some plaintext receives again.
        self.kernel_full = False
        # TLS: records written under the current key, and when to ask for a
        # new one (gateway/net/tlskeys.py); how (None: not looked up yet,
        # False: not possible here).
        self.records = written[0] if written else 0
        self.rekey_at = tlskeys.UPDATE_AFTER
        self.key_update: Callable[[], None] | None | bool = None
        self.shift = 14 if self.obj is None else tlskeys.record_shift(self.obj)  # see tlskeys.records


class _Session:
    __slots__ = ("a", "b", "counters", "token", "done", "error", "finished")

    def __init__(self, a: _End, b: _End, counters, token: trio.lowlevel.TrioToken) -> None:
        self.a, self.b = a, b
        self.counters = counters
        self.token = token
        self.done = trio.Event()
        self.error: str | None = None
        self.finished = False


class Timer:
    """A callback :meth:`RelayEngine.call_later` will run; ``cancel`` it
    (with the engine's lock held) if it is no longer wanted."""

    __slots__ = ("fn", "engine")

    def __init__(self, fn: Callable[[], None], engine: "RelayEngine") -> None:
        self.fn: Callable[[], None] | None = fn
        self.engine = engine

    def cancel(self) -> None:
        if self.fn is not None:
            self.fn = None
            self.engine._cancelled_timers += 1


class _Listener:
    """A listening socket the engine accepts on (:meth:`RelayEngine.listen`)."""

    def __init__(self, engine: "RelayEngine", sock: socket.socket, on_accept) -> None:
        self.engine = engine
        self.on_accept = on_accept
        sock.setblocking(False)
        self.end = _End(sock, "listener", None, None)
        self.end.owner = self
        self.closed = False
        self.starved = Starvation("relay engine")

    def on_ready(self, end: _End, ev: int) -> None:
        accept = end.sock.accept
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in ACCEPT_STARVED:
                    # Out of descriptors or memory: stop accepting for a
                    # moment (level-triggered epoll would spin); the clients
                    # wait in the backlog. One log line per episode.
                    self.engine.set_mask(end, 0)
                    self.engine.call_later(self.starved.failed(exc), self._resume)
                    return
                continue  # ECONNABORTED and the like: that client is gone already
            self.starved.accepted()
            sock.setblocking(False)
            try:
                self.on_accept(sock, addr)
            except Exception:
                log.exception("accept_handler_failed action=report this as a bug with the traceback")
                reset_and_close(sock)  # cut short, not ended

    def _resume(self) -> None:
        if not self.closed:
            self.engine.set_mask(self.end, _IN)

    def close(self) -> None:
        """Stop accepting and close the socket (any thread)."""
        with self.engine._lock:
            if self.closed:
                return
            self.closed = True
            self.engine.forget(self.end)
            self.end.sock.close()
            self.end.owner = None


class _Connecting:
    """A non-blocking connect in progress (:meth:`RelayEngine.connect`)."""

    def __init__(self, engine: "RelayEngine", sock: socket.socket, done, timeout: float) -> None:
        self.engine = engine
        self.done = done
        self.end = _End(sock, "connecting", None, None)
        self.end.owner = self
        self.timer = engine.call_later(timeout, self._timed_out)

    def on_ready(self, end: _End, ev: int) -> None:
        err = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._end(None, os.strerror(err))
            return
        try:
            end.sock.getpeername()
        except OSError:
            # Not connected yet, and no error: a stale event (meant for a
            # socket closed earlier in this batch whose descriptor this one
            # reuses). Keep waiting for the real one.
            return
        self._end(end.sock, None)

    def _timed_out(self) -> None:
        self._end(None, "timed out")

    def cancel(self, reason: str) -> None:
        """Give up now (any thread): ``done(None, reason)``, unless it is
        done already."""
        with self.engine._lock:
            self._end(None, reason)

    def _end(self, sock: socket.socket | None, error: str | None) -> None:
        end, done = self.end, self.done
        if done is None:
            return
        self.done = None
        self.timer.cancel()
        self.engine.forget(end)
        end.owner = None
        if sock is None:
            end.sock.close()
        try:
            done(sock, error)
        except Exception:
            log.exception("connect_callback_failed action=report this as a bug with the traceback")


def eligible(stream: object) -> bool:
    """Whether the engine can take ``stream`` over: a connected socket
    stream, or one of our TLS streams between operations with nothing
    half-done inside it."""
    if isinstance(stream, TLSStream):
        return stream.detachable()
    return type(stream) is trio.SocketStream and stream.socket.fileno() >= 0


def _detach(stream) -> tuple[socket.socket, tuple | None]:
    if isinstance(stream, TLSStream):
        fd, tls = stream.detach()
        tls = (*tls, stream.records)  # the count goes on (gateway/net/tlskeys.py)
    else:
        fd, tls = stream.socket.detach(), None
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock, tls


class RelayEngine:
    """See the module docstring. Use :func:`engine` for the process's one."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._epoll = select.epoll()
        self._timers: list[tuple[float, int, Timer]] = []  # a heap
        self._cancelled_timers = 0  # cancelled ones still in the heap
        self._timer_seq = itertools.count()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, _IN)
        self._ends: dict[int, _End] = {}
        self._again: list[_End] = []  # directions to pump without an event
        self._ended_since_trim = 0
        # Bytes the multiplexed connections hold for slow stream sockets
        # (gateway/net/muxlink.py, HELD_LIMIT), under the lock.
        self.held = 0
        self._plain = memoryview(bytearray(_READ))
        self._cipher = memoryview(bytearray(_CIPHER))
        # The multiplexed connections' plaintext, parsed in place
        # (MuxLink._on_link is the only reader; it never nests).
        self._link_plain = memoryview(bytearray(_READ))
        # A read with room in front for a frame header (gateway/net/muxlink.py).
        self._framed = memoryview(bytearray(FRAME_HEADROOM + _READ))
        # Another thread running Python (trio's, a store worker encoding a
        # batch of audit events) keeps the GIL until it blocks or for the
        # switch interval, 5 ms by default: a relayed byte would wait that
        # long. Asking for the GIL back sooner costs the busy thread little.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._run, name="wicket-relay", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------
    # trio's side.

    async def relay(self, a, b, *, counters, names: tuple[str, str],
                    taps: tuple[Tap | None, Tap | None] = (None, None)):
        """Relay between two :func:`eligible` streams until both directions
        end or one fails; returns the error text or ``None``. Takes the
        streams' descriptors: they are closed when this returns (or, after
        an abort that came from one side, the other is reset within
        :data:`ABORT_DRAIN` seconds; see :meth:`abort`)."""
        token = trio.lowlevel.current_trio_token()
        await trio.lowlevel.checkpoint_if_cancelled()
        sock_a, tls_a = _detach(a)
        sock_b, tls_b = _detach(b)
        end_a = _End(sock_a, names[0], tls_a, taps[0])
        end_b = _End(sock_b, names[1], tls_b, taps[1])
        end_a.peer, end_b.peer = end_b, end_a
        end_b.forward = False
        session = _Session(end_a, end_b, counters, token)
        end_a.session = end_b.session = session
        with self._lock:
            self._ends[end_a.fd] = end_a
            self._ends[end_b.fd] = end_b
            # Both directions start with a pump in the engine's thread:
            # bytes may already wait inside a TLS object, not in the kernel.
            self._again += (end_a, end_b)
        self.wake()
        try:
            await session.done.wait()
        except BaseException:
            with self._lock:
                if not session.finished:
                    self._finish(session, "cancelled")
            raise
        return session.error

    def wake(self) -> None:
        """Make the engine's thread look at ``_again`` now."""
        os.eventfd_write(self._wake_fd, 1)

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` in the engine's thread, under the lock, after
        ``delay`` seconds (any thread may call this)."""
        timer = Timer(fn, self)
        with self._lock:
            timers = self._timers
            if self._cancelled_timers > max(1024, len(timers) // 2):
                # Cancelled timers wait in the heap until their deadline (a
                # REPLY's is a minute away): drop them once they are most of it.
                timers[:] = [t for t in timers if t[2].fn is not None]
                heapq.heapify(timers)
                self._cancelled_timers = 0
            when = time.monotonic() + delay
            first = not self._timers or when < self._timers[0][0]
            heapq.heappush(self._timers, (when, next(self._timer_seq), timer))
        if first and threading.get_ident() != self._thread.ident:
            self.wake()  # its poll may be sleeping past the new deadline
        return timer

    def listen(self, sock: socket.socket, on_accept: Callable[[socket.socket, object], None]) -> _Listener:
        """Accept on the listening ``sock`` in the engine's thread: each
        new connection (non-blocking) goes to ``on_accept(sock, address)``,
        called under the lock. ``close()`` the result to stop."""
        listener = _Listener(self, sock, on_accept)
        with self._lock:
            self._ends[listener.end.fd] = listener.end
            self.set_mask(listener.end, _IN)
        return listener

    def connect(self, family: int, address: tuple, timeout: float,
                done: Callable[[socket.socket | None, str | None], None]) -> _Connecting | None:
        """Open a TCP connection to ``address`` without blocking; then
        ``done(sock, None)`` with the connected non-blocking socket (with
        TCP_NODELAY), or ``done(None, reason)``, in the engine's thread under
        the lock, or right away in the calling thread when the outcome is
        known at once (a loopback connect usually is): call it with the lock
        held, so ``done`` always runs under it. Returns the connect still in
        progress (``cancel()`` it to give up), or None if ``done`` ran."""
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        except OSError as exc:  # out of descriptors, say
            done(None, exc.strerror or str(exc))
            return None
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex(address)
        except OSError as exc:
            sock.close()
            done(None, exc.strerror or str(exc))
            return None
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            done(None, os.strerror(err))
            return None
        try:
            sock.getpeername()
        except OSError:
            pass  # in progress: epoll says when it is done
        else:
            # Already connected, as a loopback connect always is: no need
            # to wait for the event (and pay a turn of the loop for it).
            try:
                done(sock, None)
            except Exception:
                log.exception("connect_callback_failed action=report this as a bug with the traceback")
            return None
        with self._lock:
            connecting = _Connecting(self, sock, done, timeout)
            self._ends[connecting.end.fd] = connecting.end
            # Also when connect_ex already succeeded: EPOLLOUT comes at once.
            self.set_mask(connecting.end, _OUT)
        return connecting

    # ------------------------------------------------------------------
    # The engine's thread.

    def _run(self) -> None:
        _name_thread(b"wicket-relay")
        poll = self._epoll.poll
        ends = self._ends
        wake_fd = self._wake_fd
        timers = self._timers
        timeout = -1
        while True:
            events = poll(timeout, _MAX_EVENTS)
            with self._lock:
                if timers and timers[0][0] <= time.monotonic():
                    self._run_timers()
                for fd, ev in events:
                    end = ends.get(fd)
                    if end is not None:
                        self._guarded(end, ev)
                    elif fd == wake_fd:
                        try:
                            os.eventfd_read(wake_fd)
                        except BlockingIOError:
                            pass
                if self._again:
                    again, self._again = self._again, []
                    for end in again:
                        self._guarded(end, _IN)
                if self._ended_since_trim >= TRIM_AFTER and self._ended_since_trim >= len(ends) // 2:
                    self._ended_since_trim = 0
                    _trim_heap()
                # The next poll's timeout, decided under the lock: another
                # thread adding work or an earlier timer wakes us anyway.
                if self._again:
                    timeout = 0
                elif timers:
                    self._drop_cancelled()
                    timeout = max(0.0, timers[0][0] - time.monotonic()) if timers else -1
                else:
                    timeout = -1

    def _drop_cancelled(self) -> None:
        """Pop cancelled timers off the top of the heap: an established
        session's loop then pays nothing for a REPLY timer cancelled long
        before its deadline."""
        timers = self._timers
        while timers and timers[0][2].fn is None:
            heapq.heappop(timers)
            self._cancelled_timers = max(0, self._cancelled_timers - 1)

    def _run_timers(self) -> None:
        timers = self._timers
        now = time.monotonic()
        while timers and timers[0][0] <= now:
            timer = heapq.heappop(timers)[2]
            fn = timer.fn
            if fn is None:
                self._cancelled_timers = max(0, self._cancelled_timers - 1)
                continue  # cancelled
            timer.fn = None
            try:
                fn()
            except Exception:
                log.exception("relay_engine_timer_failed")

    def _guarded(self, end: _End, ev: int) -> None:
        if end.owner is not None:
            try:
                end.owner.on_ready(end, ev)
            except Exception:  # a bug: keep the engine (every other session) running
                log.exception("relay_engine_error owner=%s", type(end.owner).__name__)
                self.forget(end)
            return
        session = end.session
        if session is None or session.finished:
            return
        peer = end.peer
        try:
            if ev == _IN and end.mask == _IN and end.tail is None:
                # The usual event: bytes to read, nothing queued here, and
                # epoll set to wait for more (not so for a direction pumped
                # from ``_again`` before it was first registered). A pump
                # that only emptied the socket changed nothing _update looks
                # at, on either end.
                if self._pump(end):
                    return
            else:
                if ev & (_OUT | _ALWAYS) and end.tail is not None:
                    self._flush(end)
                if ev & (_IN | _ALWAYS):
                    self._pump(end)
                _failed_quietly(end, ev)
            self._update(end)
            self._update(peer)
        except _Failure as exc:
            self._finish(session, str(exc), drain=True)
        except _Cut as exc:
            self._finish(session, str(exc))
        except Exception as exc:  # a bug: end this session, keep serving the others
            log.exception("relay_engine_error session_sides=%s,%s", session.a.name, session.b.name)
            self._finish(session, f"internal error in the relay engine: {exc!r}")

    def _update(self, end: _End) -> None:
        """Make the epoll registration match what the end waits for, and
        finish the session once both directions are over."""
        session = end.session
        if session is None or session.finished:
            return
        a, b = session.a, session.b
        if a.in_done and b.in_done and a.eof_sent and b.eof_sent and a.tail is None and b.tail is None:
            self._finish(session, None)
            return
        mask = 0
        if not end.in_done and end.peer.tail is None and not end.failed:
            mask |= _IN
        if end.tail is not None:
            mask |= _OUT
        self.set_mask(end, mask or watch_mask(end))

    def set_mask(self, end: _End, mask: int) -> None:
        """Register ``end`` in the epoll set for ``mask`` (0: not at all)."""
        if mask == end.mask and end.registered == bool(mask):
            return
        if not mask:
            if end.registered:
                self._epoll.unregister(end.fd)
                end.registered = False
        elif end.registered:
            self._epoll.modify(end.fd, mask)
        else:
            self._epoll.register(end.fd, mask)
            end.registered = True
        end.mask = mask

    def forget(self, end: _End) -> None:
        """Drop ``end`` from the tables and the epoll set (not closing it);
        counted towards the next heap trim."""
        if self._ends.get(end.fd) is end:
            del self._ends[end.fd]
        if end.registered:
            try:
                self._epoll.unregister(end.fd)
            except OSError:
                pass
            end.registered = False
        self._ended_since_trim += 1

    def abort(self, end: _End, *, drain: bool, held: int = 0,
              release: Callable[[int], None] | None = None) -> bool:
        """Reset ``end``'s connection (already forgotten by its owner), at
        once, or with ``drain`` once what is queued for it has reached its
        peer (see :class:`_Draining`, which takes ``held`` and ``release``).
        True if it drains: its tail is then the drainer's, and the caller
        must leave it alone. Under the lock."""
        if drain and not end.failed and end.error_pending is None \
                and (end.tail is not None or _unacknowledged(end.sock)):
            _Draining(self, end, held, release)
            return True
        reset_and_close(end.sock)
        return False

    def _finish(self, session: _Session, error: str | None, *, drain: bool = False) -> None:
        """End ``session``: a graceful close after a clean end (``error`` is
        None), else an abort of both sides (see the module docstring); with
        ``drain`` (the abort came from one side), a side that did not fail
        first delivers what it holds."""
        session.finished = True
        session.error = error
        for end in (session.a, session.b):
            self.forget(end)
            draining = False
            if error is None:
                end.sock.close()
            else:
                draining = self.abort(end, drain=drain)
            # Break the cycles (end <-> peer, end <-> session): the OpenSSL
            # state hanging off them is freed now, by reference counting,
            # not whenever the cyclic collector next gets to it.
            end.session = end.peer = end.tap = None
            end.obj = end.ssl = end.incoming = end.outgoing = end.key_update = None
            end.carry = None
            if not draining:
                end.tail = None
                end.more = []
        try:
            session.token.run_sync_soon(session.done.set)
        except trio.RunFinishedError:
            pass

    # -- moving bytes ---------------------------------------------------

    def _pump(self, src: _End) -> bool:
        """Move bytes from ``src`` to its peer; see the module docstring.
        True if it stopped only because ``src`` had nothing more, with
        nothing left queued for either end."""
        dst = src.peer
        budget = PUMP_BUDGET
        plain = self._plain
        while not src.in_done and dst.tail is None:
            if budget <= 0:
                self._again.append(src)
                return False
            if src.carry:
                data = memoryview(src.carry)
                src.carry = None
            else:
                n = self._read(src, plain)
                if n < 0:
                    return src.tail is None  # reading TLS may have queued a KeyUpdate answer
                if n == 0:
                    src.in_done = True
                    dst.eof_wanted = True
                    if dst.tail is None:
                        self._send_eof(dst)
                    return False
                data = plain[:n]
            self._deliver(src, dst, data)
            budget -= len(data)
            if len(data) < len(plain) and src.error_pending is None and not src.peer_closed:
                # A short read emptied the kernel (and OpenSSL): epoll says
                # when there is more. Reading again now would only cost an
                # EAGAIN, which is a syscall and a raised exception.
                return dst.tail is None and src.tail is None
        return False

    def read_into(self, src: _End, view: memoryview) -> int:
        """:meth:`_read`, after the plaintext ``src`` holds in ``carry``
        (stashed before its close_notify went out): for an owner that needs
        the bytes in its own buffer (gateway/net/muxlink.py)."""
        carry = src.carry
        if carry:
            n = min(len(carry), len(view))
            view[:n] = carry[:n]
            del carry[:n]
            if not carry:
                src.carry = None
            return n
        return self._read(src, view)

    def _read(self, src: _End, view: memoryview) -> int:
        """Read plaintext from ``src`` into ``view``: the count, 0 for EOF,
        -1 if it would block. Raises :class:`_Failure`."""
        if src.obj is None:
            try:
                return src.sock.recv_into(view)
            except BlockingIOError:
                return -1
            except OSError as exc:
                src.failed = True
                src.os_error = exc.errno
                raise _Failure(f"{src.name}: receive failed: {exc.strerror or exc}") from None
        return self._read_tls(src, view)

    def _read_tls(self, src: _End, view: memoryview) -> int:
        """:meth:`_read` for a TLS end. An error that came with data is
        reported by the next call, once that data is passed on."""
        if src.error_pending is not None:
            src.failed = True
            raise _Failure(src.error_pending)
        if src.peer_closed:
            return 0
        ssl_obj, incoming = src.ssl, src.incoming
        limit = len(view)
        total = 0
        cipher = self._cipher
        read = ssl_obj.read
        while True:
            try:
                # SSL_read costs a raised exception when it can only say
                # "want read": skip it when no complete record can be waiting.
                while total < limit and (incoming.pending or incoming.eof or ssl_obj.pending()):
                    n = read(limit - total, view[total:] if total else view)
                    if not n:
                        src.peer_closed = True
                        break
                    total += n
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                src.peer_closed = True
            except ssl.SSLError as exc:
                message = _TRUNCATED if isinstance(exc, ssl.SSLEOFError) else f"TLS error: {_ssl_text(exc)}"
                self._flush_protocol_output(src)  # the alert tells the peer why
                _receive_failed(src, f"{src.name}: receive failed: {message}", total)
                break
            if total == limit or src.peer_closed:
                break
            if total and not src.kernel_full:
                break
            if src.tcp_eof:
                # write_eof was fed and OpenSSL still wants data: unreachable
                # in practice (it raises SSLEOFError), kept as a guard.
                src.failed = True
                raise _Failure(f"{src.name}: receive failed: {_TRUNCATED}")
            try:
                n = src.sock.recv_into(cipher)
            except BlockingIOError:
                src.kernel_full = False
                break
            except OSError as exc:
                src.os_error = exc.errno
                _receive_failed(src, f"{src.name}: receive failed: {exc.strerror or exc}", total)
                break
            if n:
                incoming.write(cipher[:n])
                src.kernel_full = n == len(cipher)
            else:
                src.tcp_eof = True
                incoming.write_eof()
                src.kernel_full = False
        if src.outgoing.pending:
            self._flush_protocol_output(src)
        if total:
            return total
        return 0 if src.peer_closed else -1

    def _flush_protocol_output(self, end: _End) -> None:
        """Queue what OpenSSL wrote while reading (a KeyUpdate answer, an
        alert) for ``end``'s socket, after anything already queued."""
        data = end.outgoing.read()
        if not data or end.eof_sent:
            return  # nothing may follow our close_notify
        self._write(end, memoryview(data), copy=False)

    def _deliver(self, src: _End, dst: _End, data: memoryview) -> None:
        if src.tap is not None:
            try:
                src.tap(bytes(data))
            except Exception as exc:
                # What the tap (an audit parser) cannot take must not pass:
                # the session ends here, before these bytes are forwarded.
                raise _Cut(f"{src.name}: {exc}") from None
        counters = src.session.counters
        if src.forward:
            counters.a_to_b += len(data)
        else:
            counters.b_to_a += len(data)
        if dst.obj is None:
            self._write(dst, data, copy=True)
            return
        self._write(dst, seal(dst, data), copy=False)

    def _write(self, dst: _End, data: memoryview | bytes, *, copy: bool) -> None:
        """Write ``data`` to ``dst`` after its tail; keep what the kernel
        does not take (a copy, when ``data`` is a scratch buffer)."""
        if dst.tail is not None:
            dst.more.append(bytes(data))
            dst.more_bytes += len(data)
            return
        try:
            rest = self._write_some(dst, data)
        except OSError as exc:
            dst.failed = True
            dst.os_error = exc.errno
            raise _Failure(f"{dst.name}: send failed: {exc.strerror or exc}") from None
        if rest:
            dst.tail = memoryview(bytes(rest) if copy else rest)

    @staticmethod
    def _write_some(end: _End, data: memoryview | bytes) -> memoryview | bytes:
        """Send as much of ``data`` as the kernel takes; the rest (empty if
        it took everything, as it nearly always does: one call then)."""
        send = end.sock.send
        try:
            n = send(data)
            while n < len(data):
                data = data[n:]
                n = send(data)
        except BlockingIOError:
            return data
        return _NOTHING

    def drain(self, end: _End) -> int:
        """Write ``end``'s tail, then what is queued behind it, as far as the
        kernel takes it; return how many bytes went. Raises ``OSError``."""
        written = 0
        while end.tail is not None:
            before = len(end.tail)
            rest = self._write_some(end, end.tail)
            written += before - len(rest)
            if rest:
                end.tail = rest
                return written
            if end.more:
                end.tail = memoryview(b"".join(end.more))
                end.more, end.more_bytes = [], 0
            else:
                end.tail = None
        return written

    @staticmethod
    def backlog(end: _End) -> int:
        """Bytes waiting for ``end``'s socket."""
        return 0 if end.tail is None else len(end.tail) + end.more_bytes

    def _flush(self, end: _End) -> None:
        """EPOLLOUT: write the tail; once it is gone, send a pending EOF and
        let the direction into this end read again."""
        try:
            self.drain(end)
        except OSError as exc:
            end.failed = True
            if end.eof_wanted and end.peer_closed:
                # Only our close_notify was left, and the peer had sent its
                # own and gone: both directions are over.
                end.tail = None
                end.more = []
                end.eof_sent = True
                return
            raise _Failure(f"{end.name}: send failed: {exc.strerror or exc}") from None
        if end.tail is not None:
            return
        if end.eof_wanted and not end.eof_sent:
            self._send_eof(end)
            if end.tail is not None:
                return
        if not end.peer.in_done:
            self._pump(end.peer)

    def _send_eof(self, end: _End) -> None:
        """The direction into ``end`` is over: close_notify (TLS) and FIN,
        after anything still queued for it."""
        if end.eof_sent:
            return
        if end.obj is not None and not end.failed:
            self._stash(end)
            try:
                end.obj.unwrap()
            except ssl.SSLWantReadError:
                pass  # ours is written; theirs has not come: expected
            except ssl.SSLError as exc:
                if not end.peer_closed:
                    end.failed = True
                    raise _Failure(f"{end.name}: send_eof failed: TLS error: {_ssl_text(exc)}") from None
            data = end.outgoing.read()
            if data:
                try:
                    rest = self._write_some(end, memoryview(data))
                except OSError as exc:
                    rest = None
                    if not end.peer_closed:
                        end.failed = True
                        raise _Failure(f"{end.name}: send_eof failed: {exc.strerror or exc}") from None
                if rest:
                    end.tail = rest  # flushed on EPOLLOUT, then shut down
                    end.eof_wanted = True
                    return
        end.eof_sent = True
        try:
            end.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            # Not an error only after a TLS peer's close_notify: it may drop
            # the connection then. Otherwise (ENOTCONN included) the peer
            # reset the connection, perhaps after its own EOF, and what we
            # sent may not have been read: an abort, not an end.
            if not end.peer_closed:
                end.failed = True
                raise _Failure(f"{end.name}: send_eof failed: {exc.strerror or exc}") from None

    def _stash(self, end: _End) -> None:
        """Decrypt every complete record waiting in ``end``'s incoming BIO
        into ``end.carry`` (``unwrap`` would fail on them)."""
        obj, incoming = end.obj, end.incoming
        plain = self._plain
        try:
            while not end.peer_closed and (incoming.pending or obj.pending()):
                n = obj.read(len(plain), plain)
                if not n:
                    end.peer_closed = True
                    break
                if end.carry is None:
                    end.carry = bytearray()
                end.carry += plain[:n]
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            end.peer_closed = True
        except ssl.SSLError as exc:
            end.error_pending = f"{end.name}: receive failed: TLS error: {_ssl_text(exc)}"
        if end.carry:
            # That plaintext goes to the other side as soon as it can take it.
            self._again.append(end)


def seal(end: _End, data) -> bytes:
    """Encrypt ``data`` for the TLS ``end``: the records to write to its
    socket (a key update first when one is due). Raises :class:`_Failure`."""
    if end.records >= end.rekey_at:
        rekey(end)  # right before a write, which sends the KeyUpdate: see tlskeys.rekey
    try:
        end.ssl.write(data)
    except ssl.SSLError as exc:
        end.failed = True
        raise _Failure(f"{end.name}: send failed: TLS error: {_ssl_text(exc)}") from None
    end.records += (len(data) >> end.shift) + 1  # tlskeys.records, inline: every message pays it
    return end.outgoing.read()


def rekey(end: _End) -> None:
    """:func:`tlskeys.rekey` for an end; raises :class:`_Failure`."""
    try:
        tlskeys.rekey(end, end.obj, end.name)
    except tlskeys.KeysWornOut as exc:
        end.failed = True
        raise _Failure(str(exc)) from None


def watch_mask(end: _End) -> int:
    """The interest for an end that wants neither to read nor to write:
    ``_WATCH`` if it sent its EOF and we still owe it ours, else none."""
    return _WATCH if end.in_done and not end.eof_sent and end.tail is None and not end.failed else 0


def _failed_quietly(end: _End, ev: int) -> None:
    """An error or hang-up on an end we only watch (``_WATCH``): raise
    :class:`_Failure` with what the socket says (keepalive's "Connection
    timed out", a reset). Ends with any other interest meet their errors
    in their reads and writes."""
    if ev & _ALWAYS and end.mask == _WATCH:
        try:
            code = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            code = exc.errno or 0
        end.failed = True
        end.os_error = code or None
        raise _Failure(f"{end.name}: connection failed: {os.strerror(code) if code else 'closed by the peer'}")


def _receive_failed(src: _End, error: str, got: int) -> None:
    """A read of ``src`` failed after ``got`` bytes of plaintext: with none,
    raise :class:`_Failure` now; else the error waits in ``error_pending``
    for the next read, so the bytes that came before it are passed on."""
    if not got:
        src.failed = True
        raise _Failure(error) from None  # the text says it all; no chained traceback
    src.error_pending = error


def _load_malloc_trim():
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):  # not glibc
        return None
    if trim is not None:
        trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _load_malloc_trim()


def _name_thread(name: bytes) -> None:
    """Give the calling thread ``name`` where the system shows it (``top
    -H``, /proc/PID/task/TID/comm): Python does not pass thread names on."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl(15, name, 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError, TypeError):
        pass  # not Linux, or no libc: only the name is missing


def _trim_heap() -> None:
    """Give freed heap pages back to the kernel (glibc's ``malloc_trim``).

    A burst of sessions leaves OpenSSL's per-connection state and the
    sessions' objects freed but still resident: glibc returns memory to the
    kernel only from the top of a heap, and each thread has its own heap.
    Without this, a gateway that once held 10,000 connections keeps that
    much resident for good, which looks exactly like a leak. With it, RSS
    falls back once they close. Costs about a millisecond per call on a
    large heap, and runs only after many sessions ended."""
    if _malloc_trim is not None:
        _malloc_trim(0)


_engine: RelayEngine | None = None
_engine_lock = threading.Lock()


def engine() -> RelayEngine:
    """The process's relay engine, started on first use."""
    global _engine
    if _engine is None:
        with _engine_lock:
            if _engine is None:
                _engine = RelayEngine()
    return _engine

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
yet are kept, per side, in ``End.tail``.

One side, ``End``, is a socket plus, when it speaks TLS, its SSLObject. The
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
meanwhile ends the session (:func:`failed_quietly` consumes the event);
a unix socket whose peer closed it after that EOF (no error) is that peer
ending the session: no longer watched, and the session ends cleanly with
the other side's EOF (a byte still sent to it fails, as on TCP).

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
be audited does not pass). A tap only looks: what the cluster answers
itself (a command it refuses, the session going on) goes through the
session's message filter (:mod:`gateway.net.filters`), run in this thread
too. So a tap must be safe to call from another
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

Where each job lives. This module is the reactor: the thread, the epoll
set, the lock, timers (:meth:`RelayEngine.call_later`), the dispatch of
events to an end's owner or its two-socket session, and aborts. The rest,
one job a module:

- :mod:`gateway.net.ends`: an end (``End``), sealing records for it, the
  epoll masks, how an operation on an end fails;
- :mod:`gateway.net.endio`: reading an end (the TLS pump), writing to it
  (tails), draining it, its EOF (mixed into :class:`RelayEngine`);
- :mod:`gateway.net.pairs`: the two-socket relay, :meth:`RelayEngine.relay`
  and its pump (mixed in too);
- :mod:`gateway.net.acceptor`: the listener and the connector;
- :mod:`gateway.net.draining`: a socket's drain before its reset, after
  the other side aborted;
- :mod:`gateway.net.muxlink`: a multiplexed connection as an owner of ends.
- :mod:`gateway.net.filters`: a kind's message filter, which the two-socket
  relay and the multiplexed streams run on the client's whole messages
  (pass, answer, hold for trio, or end), after the taps (which see
  chunks). A two-socket session's answers are written to the client by
  one helper (``PairRelay._answer``) under one rule: while they wait, the
  client is not read (its filter's ``stalled``), so they need no cap of
  their own; a held message's answer comes from trio through ``again``.

The owner interface. An end whose ``owner`` is set (a link, a listener, a
connect, a drain) gets its events in ``owner.on_ready(end, ev)``, in the
engine's thread under ``lock``. Owners use the engine through public names
only: ``lock`` (re-entrant; trio's thread takes it too), ``ends`` (an end
is registered as ``ends[end.fd] = end``), ``again`` (ends to serve on the
next turn without an event) and :meth:`wake`, :meth:`set_mask`,
:meth:`forget`, :meth:`abort`, :meth:`call_later`; reading with
:meth:`read_into` / :meth:`read_tls`, writing with :meth:`write`,
:meth:`write_some`, :meth:`drain`, :meth:`backlog` and :meth:`send_eof`;
and two scratch buffers, ``framed`` (a read with room for a frame header in
front) and ``link_plain`` (a link's plaintext, parsed in place).
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
import sys
import threading
import time
from typing import Callable

from gateway.net.acceptor import _Connecting, _Listener
from gateway.net.draining import ABORT_DRAIN, _Draining
from gateway.net.endio import EndIO
from gateway.net.ends import (
    _ALWAYS, _IN, _OUT, _Cut, End, Failure, failed_quietly, _unacknowledged, eligible, reset_and_close,
    seal,
)
from gateway.net.pairs import PUMP_BUDGET, PairRelay
from gateway.net.threadname import name_os_thread

__all__ = ["ABORT_DRAIN", "PUMP_BUDGET", "RelayEngine", "Timer", "engine", "eligible", "reset_and_close", "seal"]

log = logging.getLogger(__name__)

#: After this many sessions ended (and at least as many as are still live),
#: hand freed heap back to the kernel; see :func:`_trim_heap`.
TRIM_AFTER = 256

_READ = 256 * 1024  # plaintext read per step (and the scratch size)
FRAME_HEADROOM = 16
_CIPHER = _READ + 8 * 1024  # ciphertext read per recv: one read plus record overhead
_MAX_EVENTS = 1024

#: How long another thread may keep the GIL while the engine waits for it.
SWITCH_INTERVAL = 0.0001


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


class RelayEngine(PairRelay, EndIO):
    """See the module docstring. Use :func:`engine` for the process's one."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._epoll = select.epoll()
        self._timers: list[tuple[float, int, Timer]] = []  # a heap
        self._cancelled_timers = 0  # cancelled ones still in the heap
        self._timer_seq = itertools.count()
        self._wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._epoll.register(self._wake_fd, _IN)
        self.ends: dict[int, End] = {}
        self.again: list[End] = []  # directions to pump without an event
        self._ended_since_trim = 0
        # Bytes the multiplexed connections hold for slow stream sockets
        # (gateway/net/muxlink.py, HELD_LIMIT), under the lock.
        self.held = 0
        self._plain = memoryview(bytearray(_READ))
        self._cipher = memoryview(bytearray(_CIPHER))
        # The multiplexed connections' plaintext, parsed in place
        # (MuxLink._on_link is the only reader; it never nests).
        self.link_plain = memoryview(bytearray(_READ))
        # A read with room in front for a frame header (gateway/net/muxlink.py).
        self.framed = memoryview(bytearray(FRAME_HEADROOM + _READ))
        # Another thread running Python (trio's, a store worker encoding a
        # batch of audit events) keeps the GIL until it blocks or for the
        # switch interval, 5 ms by default: a relayed byte would wait that
        # long. Asking for the GIL back sooner costs the busy thread little.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        self._thread = threading.Thread(target=self._run, name="wicket-relay", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        """Make the engine's thread look at ``again`` now."""
        os.eventfd_write(self._wake_fd, 1)

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer:
        """Run ``fn`` in the engine's thread, under the lock, after
        ``delay`` seconds (any thread may call this)."""
        timer = Timer(fn, self)
        with self.lock:
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
        with self.lock:
            self.ends[listener.end.fd] = listener.end
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
        with self.lock:
            connecting = _Connecting(self, sock, done, timeout)
            self.ends[connecting.end.fd] = connecting.end
            # Also when connect_ex already succeeded: EPOLLOUT comes at once.
            self.set_mask(connecting.end, _OUT)
        return connecting

    # ------------------------------------------------------------------
    # The engine's thread.

    def _run(self) -> None:
        name_os_thread(b"wicket-relay")
        poll = self._epoll.poll
        ends = self.ends
        wake_fd = self._wake_fd
        timers = self._timers
        timeout = -1
        while True:
            events = poll(timeout, _MAX_EVENTS)
            with self.lock:
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
                if self.again:
                    again, self.again = self.again, []
                    for end in again:
                        self._guarded(end, _IN)
                if self._ended_since_trim >= TRIM_AFTER and self._ended_since_trim >= len(ends) // 2:
                    self._ended_since_trim = 0
                    _trim_heap()
                # The next poll's timeout, decided under the lock: another
                # thread adding work or an earlier timer wakes us anyway.
                if self.again:
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

    def _guarded(self, end: End, ev: int) -> None:
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
                # from ``again`` before it was first registered). A pump
                # that only emptied the socket changed nothing _update looks
                # at, on either end.
                if self._pump(end):
                    return
            else:
                if ev & (_OUT | _ALWAYS) and end.tail is not None:
                    self._flush(end)
                if ev & (_IN | _ALWAYS):
                    self._pump(end)
                failed_quietly(end, ev)
            self._update(end)
            self._update(peer)
        except Failure as exc:
            self._finish(session, str(exc), drain=True)
        except _Cut as exc:
            self._finish(session, str(exc))
        except Exception as exc:  # a bug: end this session, keep serving the others
            log.exception("relay_engine_error session_sides=%s,%s", session.a.name, session.b.name)
            self._finish(session, f"internal error in the relay engine: {exc!r}")


    def set_mask(self, end: End, mask: int) -> None:
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

    def forget(self, end: End) -> None:
        """Drop ``end`` from the tables and the epoll set (not closing it);
        counted towards the next heap trim."""
        if self.ends.get(end.fd) is end:
            del self.ends[end.fd]
        if end.registered:
            try:
                self._epoll.unregister(end.fd)
            except OSError:
                pass
            end.registered = False
        self._ended_since_trim += 1

    def abort(self, end: End, *, drain: bool, held: int = 0,
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

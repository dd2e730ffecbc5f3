"""The two-socket relay: a session of two ends the engine pumps into each
other (:meth:`PairRelay.relay`, what :func:`gateway.net.relay.relay` hands
over), until both directions end or one fails; see the theory of operation
in :mod:`gateway.net.engine`. A mixin of
:class:`~gateway.net.engine.RelayEngine`."""

from __future__ import annotations

import trio

from gateway.net.ends import _IN, _OUT, _Cut, End, detach, Tap, seal, send_failure, watch_mask
from gateway.net.filters import ANSWER_ROOM, Filtered

__all__ = ["PUMP_BUDGET", "PairRelay"]

#: Bytes one direction may move per turn before the loop serves others.
PUMP_BUDGET = 1024 * 1024

class _Session:
    __slots__ = ("a", "b", "counters", "token", "done", "error", "finished")

    def __init__(self, a: End, b: End, counters, token: trio.lowlevel.TrioToken) -> None:
        self.a, self.b = a, b
        self.counters = counters
        self.token = token
        self.done = trio.Event()
        self.error: str | None = None
        self.finished = False


class PairRelay:
    """The engine's two-socket sessions (see the module doc)."""

    # ------------------------------------------------------------------
    # trio's side.

    async def relay(self, a, b, *, counters, names: tuple[str, str],
                    taps: tuple[Tap | None, Tap | None] = (None, None), filtered: Filtered | None = None,
                    early: bytes = b""):
        """Relay between two :func:`eligible` streams until both directions
        end or one fails; returns the error text or ``None``. Takes the
        streams' descriptors: they are closed when this returns (or, after
        an abort that came from one side, the other is reset within
        :data:`ABORT_DRAIN` seconds; see :meth:`abort`). ``filtered``: the
        messages from ``a`` go through it (gateway/net/filters.py);
        ``early``: bytes ``a`` sent before the relay began, relayed (tapped,
        filtered) first, as if just read."""
        token = trio.lowlevel.current_trio_token()
        await trio.lowlevel.checkpoint_if_cancelled()
        sock_a, tls_a = detach(a)
        sock_b, tls_b = detach(b)
        end_a = End(sock_a, names[0], tls_a, taps[0])
        end_b = End(sock_b, names[1], tls_b, taps[1])
        end_a.peer, end_b.peer = end_b, end_a
        end_b.forward = False
        end_a.filter = filtered
        if early:
            end_a.carry = bytearray(early)
        session = _Session(end_a, end_b, counters, token)
        end_a.session = end_b.session = session
        if filtered is not None:
            filtered.resume = lambda: self._resume(end_a)
        with self.lock:
            self.ends[end_a.fd] = end_a
            self.ends[end_b.fd] = end_b
            # Both directions start with a pump in the engine's thread:
            # bytes may already wait inside a TLS object, not in the kernel.
            self.again += (end_a, end_b)
        self.wake()
        try:
            await session.done.wait()
        except BaseException:
            with self.lock:
                if not session.finished:
                    self._finish(session, "cancelled")
            raise
        return session.error

    def _resume(self, end: End) -> None:
        """(trio's thread) A held message's answer is in: the engine's
        thread writes it and goes on with the client (see filters.py)."""
        with self.lock:
            if end.session is not None and not end.session.finished:
                self.again.append(end)
        self.wake()

    def _update(self, end: End) -> None:
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
        if not end.in_done and end.peer.tail is None and not end.failed and (
                end.filter is None or (end.tail is None and not end.filter.stalled)):
            mask |= _IN
        if end.tail is not None:
            mask |= _OUT
        self.set_mask(end, mask or watch_mask(end))

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
            if end.filter is not None:
                end.filter.resume = None
            end.session = end.peer = end.tap = end.filter = None
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

    def _pump(self, src: End) -> bool:
        """Move bytes from ``src`` to its peer; see the module docstring.
        True if it stopped only because ``src`` had nothing more, with
        nothing left queued for either end."""
        dst = src.peer
        budget = PUMP_BUDGET
        plain = self._plain
        while not src.in_done and dst.tail is None:
            filtered = src.filter
            if filtered is not None and (src.tail is not None or filtered.stalled):
                # Its answers wait for the client to read them, or a message
                # for trio: so does the rest. Messages that waited go first.
                if src.tail is not None or not filtered.pending:
                    return False
                self._filter(src, dst, b"")
                continue
            if budget <= 0:
                self.again.append(src)
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
                        self.send_eof(dst)
                    if src.filter is not None:
                        src.filter.eof()
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

    def _deliver(self, src: End, dst: End, data: memoryview) -> None:
        if src.tap is not None:
            try:
                src.tap(bytes(data))
            except Exception as exc:
                # What the tap (an audit parser) cannot take must not pass:
                # the session ends here, before these bytes are forwarded.
                raise _Cut(f"{src.name}: {exc}") from None
        if src.filter is not None:
            src.session.counters.a_to_b += len(data)
            self._filter(src, dst, bytes(data))
            return
        counters = src.session.counters
        if src.forward:
            counters.a_to_b += len(data)
        else:
            counters.b_to_a += len(data)
        if dst.obj is None:
            self.write(dst, data, copy=True)
        else:
            self.write(dst, seal(dst, data), copy=False)
        if dst.filter is not None and dst.filter.follows_server:
            # The server's bytes went on: the filter's answers that waited
            # for the end of a server message may follow them now.
            try:
                answers = dst.filter.from_server(data)
            except Exception as exc:
                raise _Cut(f"{src.name}: {exc}") from None
            if answers:
                self._answer(dst, answers)
                if dst.filter.pending:
                    self.again.append(dst)  # messages that waited for room may go on

    def _filter(self, src: End, dst: End, data: bytes) -> None:
        """client -> server through the session's filter: whole messages
        pass (in one write), answers go back to the client."""
        try:
            passed, answers = src.filter.from_client(data, ANSWER_ROOM)
        except Exception as exc:
            raise _Cut(f"{src.name}: {exc}") from None
        if passed:
            out = passed[0] if len(passed) == 1 else b"".join(passed)
            self.write(dst, out if dst.obj is None else seal(dst, out), copy=False)
        if answers:
            self._answer(src, answers)

    def _answer(self, end: End, answers: bytes) -> None:
        """The filter's answers to the client's ``end``, behind what waits
        there. No cap of their own: while they wait (``end.tail``), the
        client is not read and its filter takes nothing more (``_pump``,
        ``_update``), so one read's answers (at most ANSWER_ROOM and one
        answer more) are all a client can make us hold."""
        end.session.counters.b_to_a += len(answers)
        self.write(end, answers if end.obj is None else seal(end, answers), copy=False)

    def _flush(self, end: End) -> None:
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
            raise send_failure(end, exc) from None
        if end.tail is not None:
            return
        if end.eof_wanted and not end.eof_sent:
            self.send_eof(end)
            if end.tail is not None:
                return
        if not end.peer.in_done:
            self._pump(end.peer)
        if end.filter is not None and not end.in_done:
            self._pump(end)  # its answers were read: the rest may go on

"""Relay bytes between two half-closeable streams, both ways, until both end.

Two implementations, one contract. When both streams are plain sockets or
our own TLS streams (every relay in production), they are handed to the
process's relay engine (:mod:`gateway.net.engine`): a dedicated epoll loop
that moves the bytes without any trio task per session. Any other stream
(a memory stream in a test, a stream in an odd state) is relayed by the
task-based loop below. ``WICKET_RELAY=trio`` in the environment forces the
task-based loop everywhere, to compare the two.


This is the hot path after a session's startup phase: client <-> gateway
(plain TCP) and gateway <-> cluster (TLS) on one side, cluster (TLS) <->
upstream (plain TCP) on the other. One function serves every pairing,
plain<->plain included; only the way a direction *reads* adapts to the
source (see ``_receiver``): a :class:`gateway.net.tls.TLSStream` decrypts
straight into the direction's buffer, a :class:`trio.SocketStream` is read
with ``recv_into``, and any other stream falls back to ``receive_some``.

Semantics
---------
- Each direction is a task: receive up to ``buffer_size`` bytes from one
  stream into its own buffer, ``send_all`` them to the other. Nothing else
  is buffered, so a slow reader pushes back on the writer through TCP flow
  control. The buffer starts at 16 KiB and doubles while reads fill it, so
  an interactive session holds little memory and a bulk one soon reads
  ``buffer_size`` at a time.
- Half-close is carried: EOF from one side becomes ``send_eof()`` on the
  other, and the opposite direction keeps flowing. A client's
  ``shutdown(SHUT_WR)`` reaches the upstream and the reply still comes back.
- ``relay`` returns once both directions have seen EOF, with the byte counts.
- If either stream fails (:class:`trio.BrokenResourceError`, e.g. a
  connection reset or a TLS truncation, or :class:`trio.ClosedResourceError`),
  the other direction is cancelled and ``relay`` *returns* normally, with
  ``RelayStats.error`` describing the first failure. A reset peer is an
  ordinary end of a session, and the caller wants the byte counts for its
  audit log either way. Other exceptions (bugs) propagate.
- Cancellation from outside propagates as usual (``trio.Cancelled``); pass a
  :class:`RelayCounters` to still know how many bytes moved by then.
- A relay that did not end cleanly (a failure, cancellation, a bug) aborts
  both streams: their close is a TCP RST, with no TLS close_notify, so each
  peer sees the stream cut rather than ended (a FIN would tell a client that
  a truncated transfer was complete). A reset is passed on as a reset.
- The caller opened the streams and closes them (``async with``), whatever
  the outcome. The engine takes over the descriptors of the streams it
  relays and closes them when the relay ends; the streams are then already
  closed and their ``aclose`` does nothing.
- ``taps`` (one per side, or ``None``) are shown every chunk received from
  that side, in order, before it is forwarded and before the relay returns:
  the audit parsers read the session this way. A tap that raises ends the
  relay with that error; a tap only looks. The engine calls taps from its
  own thread, so they must not touch trio.
- ``filtered`` (gateway/net/filters.py): ``a``'s bytes reach ``b`` only as
  whole messages its filter passed; its answers go back to ``a``, never
  inside one of ``b``'s messages (here: decided and sent under one lock
  with ``b``'s bytes to ``a``); a message it holds for trio stops this
  direction until its answer is in. What the filter raises ends the
  relay, as a broken stream.
- ``early``: bytes ``a`` sent before the relay began go first, through
  the tap and the filter like any others.

Counting. A byte is counted once ``send_all`` has handed it to the
destination, so the counts are what actually left toward each side.
"""

from __future__ import annotations

import contextlib
import errno
import os
from typing import Awaitable, Callable

import attrs
import trio

from gateway.net import engine as engine_mod
from gateway.net.ends import Tap
from gateway.net.filters import ANSWER_ROOM, Filtered
from gateway.net.tls import linger_reset

__all__ = ["DEFAULT_BUFFER_SIZE", "RelayCounters", "RelayStats", "relay", "reset_on_close"]

#: The most read at once in each direction. Large, so a bulk transfer costs
#: few wake-ups; a stream returns what it has, so small interactive messages
#: are not delayed by it.
DEFAULT_BUFFER_SIZE = 256 * 1024

_INITIAL_BUFFER = 2 * 1024

_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError)


@attrs.define(slots=True)
class RelayCounters:
    """Live byte counts of a running relay, readable at any time (for example
    after the relay was cancelled, for a session-end record)."""

    a_to_b: int = 0
    b_to_a: int = 0


@attrs.frozen(slots=True, kw_only=True)
class RelayStats:
    """How a relay ended. ``error`` is ``None`` after a clean end (EOF both
    ways) and otherwise names the side and operation that failed first, e.g.
    ``"b: receive failed: socket error while receiving: Connection reset by
    peer"``."""

    a_to_b: int
    b_to_a: int
    error: str | None = None


def _receiver(stream: trio.abc.ReceiveStream) -> Callable[[memoryview], Awaitable[int]]:
    """Return ``receive_into(buffer) -> count`` for ``stream`` (0 means EOF).

    Reading into the direction's own buffer instead of getting a fresh
    ``bytes`` per read avoids a large allocation per chunk, which at these
    sizes is malloc growing and trimming the heap (``brk``) and faulting in
    fresh pages on every read: a measurable share of a relay's CPU.
    """
    receive_into = getattr(stream, "receive_into", None)
    if receive_into is not None:  # TLSStream, or anything offering the same
        return receive_into
    if isinstance(stream, trio.SocketStream):
        sock = stream.socket

        async def socket_receive_into(buffer: memoryview) -> int:
            # What SocketStream.receive_some does, minus the allocation;
            # errors translated the way SocketStream translates them.
            try:
                return await sock.recv_into(buffer)
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise trio.ClosedResourceError("the socket was closed") from None
                raise trio.BrokenResourceError(f"socket error: {exc.strerror or exc}") from exc

        return socket_receive_into

    async def generic_receive_into(buffer: memoryview) -> int:
        data = await stream.receive_some(len(buffer))
        buffer[:len(data)] = data
        return len(data)

    return generic_receive_into


async def _through_filter(filtered: Filtered, data: bytes, a: trio.abc.Stream, b: trio.abc.Stream,
                          to_a, to_b, counters: RelayCounters, name: str, wake: list[trio.Event]) -> None:
    """``a``'s bytes through the filter: whole messages on to ``b``, the
    answers back to ``a`` (counted as ``b`` -> ``a``); then what waited in
    the filter (messages past the room for answers, a held message's
    answer), until it waits for nothing. ``to_a``, ``to_b``: the turns of
    the sends to each side; ``wake[0]``: set when the filter may go on."""
    while True:
        async with to_a:
            passed, answers = _step(filtered.from_client, data, name, ANSWER_ROOM)
            if answers:
                await a.send_all(answers)
                counters.b_to_a += len(answers)
        if passed:
            async with to_b:
                await b.send_all(b"".join(passed))
        data = b""
        while filtered.stalled and not filtered.pending:  # a message with trio, answers behind a reply
            await wake[0].wait()
            wake[0] = trio.Event()
        if not filtered.pending:
            return


def _step(step: Callable, data, name: str, *args):
    """A filter's ``step``: what it raises ends the relay as a broken stream."""
    try:
        return step(data, *args)
    except Exception as exc:
        raise trio.BrokenResourceError(f"{name}: {exc}") from None


def reset_on_close(stream: trio.abc.Stream) -> None:
    """Make the caller's ``aclose`` of ``stream`` an abort (TCP RST, no
    close_notify) when it is a socket or one of our TLS streams; nothing for
    a stream the engine took over (it resets those itself)."""
    reset_on_close = getattr(stream, "reset_on_close", None)
    if reset_on_close is not None:  # TLSStream
        reset_on_close()
    elif isinstance(stream, trio.SocketStream):
        linger_reset(stream.socket)


async def relay(
    a: trio.abc.HalfCloseableStream,
    b: trio.abc.HalfCloseableStream,
    *,
    buffer_size: int = DEFAULT_BUFFER_SIZE,
    counters: RelayCounters | None = None,
    names: tuple[str, str] = ("a", "b"),
    taps: tuple[Tap | None, Tap | None] = (None, None),
    filtered: Filtered | None = None,
    early: bytes = b"",
) -> RelayStats:
    """Copy ``a`` -> ``b`` and ``b`` -> ``a`` until both directions end.

    ``names`` label the two sides in ``RelayStats.error`` (for logs, e.g.
    ``("client", "cluster")``). ``filtered``: ``a``'s messages go through
    it (gateway/net/filters.py). ``early``: bytes ``a`` sent before the
    relay began (after a dial frame, in its read), relayed first as if
    just read: tapped, filtered, counted. See the module docstring for
    the rules."""
    if buffer_size < 1:
        raise ValueError("buffer_size must be >= 1")
    if counters is None:
        counters = RelayCounters()
    if (buffer_size == DEFAULT_BUFFER_SIZE and os.environ.get("WICKET_RELAY") != "trio"
            and engine_mod.eligible(a) and engine_mod.eligible(b)):
        try:
            error = await engine_mod.engine().relay(a, b, counters=counters, names=names, taps=taps,
                                                    filtered=filtered, early=early)
        except BaseException:
            # Cancelled before the engine took the sockets: the caller's
            # close must still be an abort.
            reset_on_close(a)
            reset_on_close(b)
            raise
        return RelayStats(a_to_b=counters.a_to_b, b_to_a=counters.b_to_a, error=error)
    errors: list[str] = []
    # With a filter, what goes to ``a`` (the server's bytes, the filter's
    # answers) is decided and sent in one turn, so an answer never lands
    # inside a server message (gateway/net/filters.py).
    turns = {id(s): trio.StrictFIFOLock() if filtered is not None else contextlib.nullcontext()
             for s in (a, b)}
    wake = [trio.Event()]
    if filtered is not None:
        filtered.resume = lambda: wake[0].set()

    async def pump(src: trio.abc.HalfCloseableStream, dst: trio.abc.HalfCloseableStream,
                   src_name: str, dst_name: str, forward: bool, tap: Tap | None,
                   cancel_scope: trio.CancelScope) -> None:
        receive_into, send_all = _receiver(src), dst.send_all
        dst_turn, src_turn = turns[id(dst)], turns[id(src)]

        async def send(data) -> None:
            async with dst_turn:
                await send_all(data)

        # Start small and double while reads fill the buffer: an interactive
        # session keeps a few KiB per direction, a bulk one reaches
        # buffer_size after a handful of reads.
        buffer = memoryview(bytearray(min(_INITIAL_BUFFER, buffer_size)))
        receive_failed = failed = f"{src_name}: receive failed"
        send_failed = f"{dst_name}: send failed"
        try:
            first = early if forward else b""
            while True:
                if first:
                    data, n, first = memoryview(first), -1, b""
                else:
                    n = await receive_into(buffer)
                    if not n:
                        break
                    data = buffer[:n]
                if tap is not None and (forward or filtered is None):
                    tap(bytes(data))
                failed = send_failed
                if filtered is None:
                    await send(data)
                elif forward:
                    await _through_filter(filtered, bytes(data), src, dst, src_turn, dst_turn, counters, src_name,
                                          wake)
                else:
                    async with dst_turn:  # the turn of what goes to ``a``: tapped and sent in one
                        if tap is not None:
                            tap(bytes(data))
                        answers = _step(filtered.from_server, data, src_name)
                        await send_all(data)
                        if answers:
                            await send_all(answers)
                            counters.b_to_a += len(answers)
                    if answers and filtered.pending:
                        wake[0].set()  # messages that waited behind the reply may go on
                failed = receive_failed
                if forward:
                    counters.a_to_b += len(data)
                else:
                    counters.b_to_a += len(data)
                if n == len(buffer) < buffer_size:
                    buffer = memoryview(bytearray(min(2 * n, buffer_size)))
            failed = f"{dst_name}: send_eof failed"
            async with dst_turn:
                await dst.send_eof()
            if filtered is not None and forward:
                filtered.eof()
        except _STREAM_ERRORS as exc:
            errors.append(f"{failed}: {exc or type(exc).__name__}")
            cancel_scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            scope = nursery.cancel_scope
            nursery.start_soon(pump, a, b, names[0], names[1], True, taps[0], scope)
            nursery.start_soon(pump, b, a, names[1], names[0], False, taps[1], scope)
    except BaseException:
        reset_on_close(a)
        reset_on_close(b)
        raise
    if errors:
        reset_on_close(a)
        reset_on_close(b)
    return RelayStats(
        a_to_b=counters.a_to_b,
        b_to_a=counters.b_to_a,
        error=errors[0] if errors else None,
    )

"""The relay engine (gateway/net/engine.py) on its own: what the stress run
in test_relay.py does not pin down. Taps see every byte in order before the
relay returns, a receiver that stops reading bounds what the engine holds,
cancellation closes promptly and cleanly, and many sessions leave nothing
behind in the engine's tables, its epoll set or the process's descriptors.
"""

from __future__ import annotations

import functools
import os
import random
import socket
import time

import pytest
import trio

from gateway.net.engine import engine
from gateway.net.ends import _unacknowledged
from gateway.net.relay import RelayCounters, relay
from gateway.net.tlsconnect import accept_tls, open_tls_connection
from tests.unit import tlsutil
from tests.unit.gateway.net.relaypair import HANG, relayed, tcp_pair
from tests.unit.tlsutil import read_exactly, read_until_eof, read_until_reset


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def tls_pair(pki, listener):
    """(client TLSStream, server TLSStream) over loopback, handshaken."""
    port = listener.socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        server: list = []

        async def accept() -> None:
            server.append(await accept_tls(await listener.accept(), tlsutil.server_context(pki)))

        nursery.start_soon(accept)
        client = await open_tls_connection(
            "127.0.0.1", port, tlsutil.client_context(pki), server_hostname=tlsutil.SERVER_NAME
        )
    return client, server[0]


async def tls_connection(pki):
    """A handshaken (client, server) TLS pair over loopback, the listener
    already closed."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        return await tls_pair(pki, listener)


async def test_taps_see_every_byte_in_order_before_the_relay_returns(pki):
    # client (plain) -> [relay: plain | TLS] -> TLS peer, as the cluster
    # runs a PostgreSQL session with its audit parsers on both sides.
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        client, relay_plain = await tcp_pair(listener)
        relay_tls, far_tls = await tls_pair(pki, listener)
    seen_a: list[bytes] = []
    seen_b: list[bytes] = []
    up = random.Random(5).randbytes(3 * 1024 * 1024 + 17)
    down = random.Random(6).randbytes(1024 * 1024 + 3)

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            stats: list = []

            async def run_relay() -> None:
                stats.append(await relay(relay_plain, relay_tls, names=("client", "server"),
                                         taps=(seen_a.append, seen_b.append)))

            async def far_side() -> None:
                assert await read_until_eof(far_tls) == up
                await far_tls.send_all(down)
                await far_tls.send_eof()

            nursery.start_soon(run_relay)
            nursery.start_soon(far_side)
            await client.send_all(up)
            await client.send_eof()
            assert await read_until_eof(client) == down
    assert b"".join(seen_a) == up and b"".join(seen_b) == down
    assert (stats[0].a_to_b, stats[0].b_to_a, stats[0].error) == (len(up), len(down), None)
    for s in (client, relay_plain, relay_tls, far_tls):
        await s.aclose()


async def test_a_receiver_that_stops_reading_bounds_what_the_engine_holds():
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        client, relay_a = await tcp_pair(listener)
        relay_b, server = await tcp_pair(listener)
    counters = RelayCounters()
    sent = 0
    chunk = b"x" * 65536
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: relay(relay_a, relay_b, counters=counters))
            # The server reads nothing. The client can push only what the
            # four socket buffers and the engine's one pending write hold,
            # then blocks: nothing grows without bound.
            while True:
                with trio.move_on_after(1) as scope:
                    await client.send_all(chunk)
                if scope.cancelled_caught:
                    break
                sent += len(chunk)
                assert sent < 64 * 1024 * 1024, "the relay buffered without bound"
            held = [len(end.tail) for end in engine().ends.values() if end.tail is not None]
            assert held and max(held) <= 256 * 1024 + 16 * 1024, held
            # Reading resumes the flow and everything arrives, once, in order.
            await client.send_eof()
            got = await read_until_eof(server)
            assert counters.a_to_b == len(got) >= sent
            assert got == b"x" * len(got)
            await server.send_eof()
            assert await read_until_eof(client) == b""
    for s in (client, server):
        await s.aclose()


async def test_cancellation_resets_both_sides_at_once(pki):
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        client, relay_plain = await tcp_pair(listener)
        relay_tls, far_tls = await tls_pair(pki, listener)
    counters = RelayCounters()
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def run_relay() -> None:
                with scope:
                    await relay(relay_plain, relay_tls, counters=counters)

            nursery.start_soon(run_relay)
            await client.send_all(b"hello")
            assert await read_exactly(far_tls, 5) == b"hello"
            scope.cancel()
            # A cut session is an abort on both sides: a TCP RST, and no
            # close_notify on the TLS side (which would make it a clean end).
            assert await read_until_reset(far_tls) == b""
            assert await read_until_reset(client) == b""
    assert counters.a_to_b == 5
    for s in (client, far_tls):
        await s.aclose()


async def test_many_sessions_leave_nothing_behind(pki):
    eng = engine()
    fds_before = open_fds()
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    rounds, width = 5, 40
    with trio.fail_after(HANG):
        async with listener:
            for _ in range(rounds):
                async with trio.open_nursery() as nursery:
                    for i in range(width):
                        client, relay_plain = await tcp_pair(listener)
                        relay_tls, far_tls = await tls_pair(pki, listener)

                        async def session(client=client, a=relay_plain, b=relay_tls, far=far_tls, i=i):
                            async with client, a, b, far:
                                async with trio.open_nursery() as inner:
                                    inner.start_soon(relay, a, b)
                                    payload = bytes([i]) * (i * 997)
                                    await client.send_all(payload)
                                    await client.send_eof()
                                    assert await read_until_eof(far) == payload
                                    await far.send_eof()
                                    assert await read_until_eof(client) == b""

                        nursery.start_soon(session)
    assert eng.ends == {} and eng.again == []
    assert open_fds() == fds_before


async def test_a_tap_that_raises_ends_the_session_before_those_bytes_pass():
    # An audit parser that cannot parse a chunk: the session must end there,
    # and the chunk must not reach the other side (what cannot be audited
    # does not pass).
    def tap(data: bytes) -> None:
        if b"evil" in data:
            raise ValueError("unparseable stream")

    async with relayed(taps=(tap, None)) as pair:
        await pair.client.send_all(b"fine")
        assert await read_exactly(pair.server, 4) == b"fine"
        await pair.client.send_all(b"evil")
        assert await read_until_reset(pair.server) == b""
    assert pair.stats[0].error == "client: unparseable stream" and pair.stats[0].a_to_b == 4


# ----------------------------------------------------------------------
# What the engine does besides relaying: timers, connect, accept.

class FromEngine:
    """Collects what callbacks in the engine's thread report, for trio."""

    def __init__(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.items: list = []
        self.changed = trio.Event()

    def __call__(self, *item) -> None:  # the engine's thread
        self.token.run_sync_soon(self._add, item[0] if len(item) == 1 else item)

    def _add(self, item) -> None:
        self.items.append(item)
        self.changed.set()
        self.changed = trio.Event()

    async def wait_for(self, count: int) -> list:
        with trio.fail_after(HANG):
            while len(self.items) < count:
                await self.changed.wait()
        return self.items


def listening(backlog: int = 8):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(backlog)
    return sock


async def test_timers_run_in_deadline_order_and_a_cancelled_one_never():
    eng = engine()
    seen = FromEngine()
    cancelled = eng.call_later(0.02, lambda: seen("cancelled"))
    eng.call_later(0.03, lambda: seen("third"))
    eng.call_later(0.01, lambda: seen("second"))
    eng.call_later(0, lambda: seen("first"))
    with eng.lock:
        cancelled.cancel()
    eng.call_later(0.05, lambda: seen("after the cancelled one was due"))
    assert await seen.wait_for(4) == ["first", "second", "third", "after the cancelled one was due"]


async def test_connect_reports_a_connected_socket_or_why_not():
    eng = engine()
    seen = FromEngine()
    listener = listening()
    eng.connect(socket.AF_INET, listener.getsockname(), 10, seen)
    (sock, error), = await seen.wait_for(1)
    assert error is None and not sock.getblocking()
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    accepted, _ = listener.accept()
    sock.send(b"hi")
    assert accepted.recv(2) == b"hi"
    for s in (sock, accepted):
        s.close()
    port = listener.getsockname()[1]
    listener.close()  # nothing listens there now
    eng.connect(socket.AF_INET, ("127.0.0.1", port), 10, seen)
    assert (await seen.wait_for(2))[1] == (None, "Connection refused")


def full_listener():
    """A listener whose accept queue is full, so it drops further SYNs: a
    connect to it neither succeeds nor fails for a while. Also returns the
    connections that fill it."""
    listener = listening(0)
    fillers = []
    for _ in range(2):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(listener.getsockname())
        fillers.append(s)
    return listener, fillers


async def test_connect_gives_up_after_its_timeout():
    eng = engine()
    listener, fillers = full_listener()
    seen = FromEngine()
    eng.connect(socket.AF_INET, listener.getsockname(), 0.2, seen)
    assert await seen.wait_for(1) == [(None, "timed out")]
    assert not any(type(e.owner).__name__ == "_Connecting" for e in eng.ends.values())
    for s in (*fillers, listener):
        s.close()


async def test_listen_hands_each_connection_to_the_callback_until_closed():
    eng = engine()
    seen = FromEngine()
    sock = listening(64)
    address = sock.getsockname()
    acceptor = eng.listen(sock, seen)
    clients = [socket.create_connection(address) for _ in range(3)]
    accepted = await seen.wait_for(3)
    assert sorted(a[1] for a in accepted) == sorted(c.getsockname() for c in clients)
    assert all(not a[0].getblocking() for a in accepted)
    acceptor.close()
    assert sock.fileno() == -1 and acceptor.end.fd not in eng.ends
    for s in (*clients, *(a[0] for a in accepted)):
        s.close()


async def test_connect_ignores_a_stale_event_and_reports_running_out_of_descriptors(monkeypatch):
    import errno
    import select
    from gateway.net import engine as engine_module

    eng = engine()
    listener, fillers = full_listener()  # our connect stays in progress
    seen = FromEngine()
    eng.connect(socket.AF_INET, listener.getsockname(), HANG, seen)
    with eng.lock:
        (connecting,) = [e for e in eng.ends.values() if type(e.owner).__name__ == "_Connecting"]
        # An event meant for an earlier socket with the same descriptor.
        connecting.owner.on_ready(connecting, select.EPOLLOUT)
        assert connecting.owner is not None and not seen.items  # still waiting
        connecting.owner._timed_out()
    assert await seen.wait_for(1) == [(None, "timed out")]

    def no_more(*args, **kwargs):
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(engine_module.socket, "socket", no_more)
    eng.connect(socket.AF_INET, listener.getsockname(), HANG, seen)
    assert (await seen.wait_for(2))[1] == (None, "Too many open files")
    monkeypatch.undo()
    for s in (*fillers, listener):
        s.close()


async def test_a_failing_callback_does_not_stop_the_engine():
    eng = engine()
    full, fillers = full_listener()
    seen = FromEngine()

    def broken(sock, error):
        seen("broken called")
        raise RuntimeError("a bug in a callback")

    eng.connect(socket.AF_INET, full.getsockname(), 0.05, broken)  # ends in the engine's thread
    assert await seen.wait_for(1) == ["broken called"]
    listener = listening()
    eng.connect(socket.AF_INET, listener.getsockname(), HANG, seen)  # the engine still serves
    sock, error = (await seen.wait_for(2))[1]
    assert error is None
    for s in (sock, listener, full, *fillers):
        s.close()


def test_cancelled_timers_do_not_pile_up_in_the_heap():
    eng = engine()
    with eng.lock:
        for _ in range(5000):
            eng.call_later(3600, lambda: None).cancel()
        assert len(eng._timers) <= 2 * 1024 + 2


async def test_a_listener_out_of_descriptors_pauses_then_accepts_what_waited():
    import errno
    class OutOfDescriptorsOnce(socket.socket):
        failures = 0

        def accept(self):
            if not OutOfDescriptorsOnce.failures:
                OutOfDescriptorsOnce.failures += 1
                raise OSError(errno.EMFILE, "Too many open files")
            return super().accept()

    eng = engine()
    seen = FromEngine()
    plain = listening()
    sock = OutOfDescriptorsOnce(fileno=plain.detach())
    acceptor = eng.listen(sock, seen)
    client = socket.create_connection(sock.getsockname())
    (accepted, address), = await seen.wait_for(1)  # after the pause, not lost
    assert OutOfDescriptorsOnce.failures == 1 and address == client.getsockname()
    acceptor.close()
    for s in (accepted, client):
        s.close()


@pytest.mark.skipif(tlsutil.OPENSSL is None, reason="needs the openssl command (requirements/apt.txt)")
async def test_key_updates_from_a_tls_peer_are_answered_in_order(pki):
    # openssl s_client as the TLS peer of a relayed session sends KeyUpdates,
    # asking for ours back or not. Bytes keep flowing both ways after each.
    # OpenSSL puts our KeyUpdate ahead of the next record we write: it must
    # reach the peer, in order, or that record is garbage to it (dropping
    # it makes this test fail).
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener, trio.open_nursery() as nursery:
        peer = await tlsutil.start_s_client(nursery, pki, listener.socket.getsockname()[1])
        with trio.fail_after(HANG):
            relay_tls = await accept_tls(await listener.accept(), tlsutil.server_context(pki))
            client, relay_plain = await tcp_pair(listener)
            nursery.start_soon(functools.partial(relay, relay_plain, relay_tls, counters=RelayCounters()))
            await peer.send(b"first\n")
            assert await read_exactly(client, 6) == b"first\n"
            for n, ask in ((1, True), (2, False), (3, True)):
                await peer.key_update(ask=ask)
                await peer.send(b"after %d\n" % n)
                assert await read_exactly(client, 8) == b"after %d\n" % n
                await client.send_all(b"reply %d\n" % n)
                await peer.until_shown(b"reply %d\n" % n)
            await client.aclose()
            await peer.close()
        nursery.cancel_scope.cancel()


async def test_bytes_that_came_before_a_reset_reach_a_slow_reader_first(pki):
    # The TLS peer sends and resets at once. The relay holds part of those
    # bytes (its tail, its socket's send queue) when it reads the reset:
    # the slow plain-side reader must still get every byte, then the reset.
    import struct

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        client, relay_plain = await tcp_pair(listener)
        relay_tls, far_tls = await tls_pair(pki, listener)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
    payload = random.Random(12).randbytes(600 * 1024)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            stats: list = []

            async def run_relay() -> None:
                stats.append(await relay(relay_plain, relay_tls, names=("client", "server")))

            async def send_and_reset() -> None:
                await far_tls.send_all(payload)
                # All of it in the relay's hands (acknowledged): a reset
                # drops what the sender's own kernel still holds.
                while _unacknowledged(far_tls.transport_stream.socket):
                    await trio.sleep(0.01)
                far_tls.transport_stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                far_tls.transport_stream.socket.close()  # a reset, no close_notify

            nursery.start_soon(run_relay)
            nursery.start_soon(send_and_reset)
            got = bytearray()
            try:
                while data := await client.receive_some(4096):  # a slow reader
                    got += data
                    await trio.lowlevel.checkpoint()
            except trio.BrokenResourceError as exc:
                assert isinstance(exc.__cause__, ConnectionResetError), exc
            else:
                raise AssertionError("a clean EOF where a reset was due")
            assert bytes(got) == payload
    assert stats[0].error.startswith("server: receive failed") and "reset" in stats[0].error, stats
    await client.aclose()
    await far_tls.aclose()


@pytest.mark.parametrize("client_eof", [False, True], ids=["quiet", "client_eof_follows"])
async def test_a_reset_after_the_servers_eof_ends_the_session_as_failed(pki, client_eof):
    # The server answered, half-closed, then reset.
    # quiet: the client sends nothing more, so the relay neither reads nor
    # writes the server's socket now, yet its failure (a reset here;
    # keepalive's timeout for a vanished host) must end the session.
    # client_eof_follows: the client half-closes at once; whichever the
    # relay meets first (the reset on the watched socket, or ENOTCONN on
    # passing the client's EOF on), the session did not end cleanly: what
    # the client sent after the server's EOF was never read.
    import struct

    async with relayed(close=False) as pair:
        client, server, stats = pair.client, pair.server, pair.stats
        await server.send_all(b"bye")
        await server.send_eof()
        assert await read_until_eof(client) == b"bye"
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await server.aclose()
        if client_eof:
            await client.send_eof()
    if client_eof:
        assert stats[0].error is not None and stats[0].error.startswith("server: "), stats
    else:
        # (A reset after the peer's FIN reads as EPIPE: "Broken pipe".)
        assert stats[0].error.startswith("server: connection failed: "), stats
    await client.aclose()


def test_a_reset_socket_has_nothing_left_to_deliver():
    # After a reset, Linux keeps SIOCOUTQ up (the sequence numbers stay) but
    # nothing more will go out: a drain must not wait for it.
    import struct

    with socket.create_server(("127.0.0.1", 0)) as server:
        near = socket.create_connection(server.getsockname())
        far, _ = server.accept()
    with near, far:
        far.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        near.setblocking(False)
        try:
            while True:
                near.send(b"x" * 65536)
        except BlockingIOError:
            pass
        assert _unacknowledged(near) > 0  # far reads nothing: the data waits
        far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        far.close()
        deadline = time.monotonic() + HANG
        while _unacknowledged(near) and time.monotonic() < deadline:  # the reset's arrival
            time.sleep(0.001)
        assert _unacknowledged(near) == 0


SNDBUF = 212992  # net.core.wmem_max's usual default: what any kernel grants


def test_a_tls_read_fills_the_buffer_while_the_kernel_holds_more(pki):
    # A read of TLS stops at the size of the plaintext buffer, which leaves
    # the tail of the last receive decrypted or buffered in OpenSSL. The next
    # read must go on receiving (the kernel had more), not hand over that
    # small tail alone: on a bulk transfer that tail cost a second write to
    # the other socket and a trip through epoll for every read.
    from gateway.net.engine import _CIPHER
    from gateway.net.ends import End

    client, server = tlsutil.memory_pair(pki)
    size = 256 * 1024
    payload = os.urandom(4 * size)
    server[0].write(payload)
    ciphertext = server[2].read()
    assert len(ciphertext) > 3 * _CIPHER  # several receives' worth
    ours, theirs = socket.socketpair()
    with ours, theirs:
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)  # the kernel may grant less
        if theirs.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < _CIPHER * 3 // 2:
            pytest.skip("this kernel's socket buffers hold less than one and a half receives")
        ours.setblocking(False)
        theirs.setblocking(False)
        left = memoryview(ciphertext)
        end = End(ours, "tls", client, None)
        view = memoryview(bytearray(size))
        got = []
        while sum(got) < len(payload):
            while left:  # the peer keeps the socket full
                try:
                    left = left[theirs.send(left):]
                except BlockingIOError:
                    break
            n = engine().read_tls(end, view)
            assert n > 0
            got.append(n)
        assert got == [size] * 4

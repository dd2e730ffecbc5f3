"""gateway/net/muxlink.py: which sessions of a lost or stalled connection start
again on another one, and which must not."""

from __future__ import annotations

import contextlib
import socket
import sys

import pytest
import trio

from gateway.net import muxlink
from gateway.net.engine import engine
from gateway.net.muxlink import MuxLink
from gateway.net.relay import RelayCounters
from protocols.dial import DialAccept, DialRequest
from protocols.mux import Role
from tests.unit import tlsutil
from tests.unit.gateway.net.muxenv import HANG, linked, loopback_pair
from tests.unit.gateway.net.test_engine import tls_connection
from tests.unit.tlsutil import ask_and_answer, read_until_eof, read_until_reset


class Retries:
    """A gateway stream's ``retry`` and ``notify`` callbacks, recorded."""

    def __init__(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.given_back: list[tuple[socket.socket, bytes, bool, str]] = []
        self.ended: list[str | None] = []
        self.event = trio.Event()

    def retry(self, sock: socket.socket, early: bytes, fin: bool, reason: str) -> None:  # any thread
        self.given_back.append((sock, early, fin, reason))
        self.token.run_sync_soon(self.event.set)

    def notify(self, link: MuxLink, stream) -> None:  # any thread
        self.ended.append(stream.error)
        self.token.run_sync_soon(self.event.set)


def raw_socket(stream: trio.SocketStream) -> socket.socket:
    raw = socket.socket(fileno=stream.socket.detach())
    raw.setblocking(False)
    return raw


async def retrying_session(link: MuxLink) -> tuple[trio.SocketStream, Retries, muxlink.Stream]:
    """A client that sent b"hello", its session started on ``link`` with a
    ``retry``: (the client's end, what the callbacks heard, the stream)."""
    client, near = loopback_pair()
    await client.send_all(b"hello")
    calls = Retries()
    stream = link.start(DialRequest(resource="a"), raw_socket(near), RelayCounters(), calls.notify,
                        reply_timeout=HANG, retry=calls.retry)
    return client, calls, stream


async def test_a_session_the_cluster_never_saw_starts_again_on_another_connection(pki):
    # The cluster's host forgot the connection (it restarted, or a middlebox
    # lost the flow) and the gateway does not know yet: the OPEN and the
    # client's first bytes meet a reset, unacknowledged. The cluster cannot
    # have acted on them, so the stream is handed back with the client's
    # socket and those bytes, and goes through on another connection whole:
    # the client notices nothing.
    gw_tls, cl_tls = await tls_connection(pki)
    dead = MuxLink(engine(), gw_tls, Role.GATEWAY, name="cluster", socket_name="client")
    tlsutil.vanish(cl_tls.transport_stream.socket)
    with trio.fail_after(HANG):
        client, calls, _ = await retrying_session(dead)
        await calls.event.wait()
        await dead.closed.wait()
    assert not calls.ended  # no end to report: the session goes on
    [(sock, early, fin, reason)] = calls.given_back
    assert (early, fin) == (b"hello", False) and "reset" in reason, (early, fin, reason)
    assert not dead.streams and sock.fileno() != -1
    async with linked(pki) as pair:
        with trio.fail_after(HANG):
            counters = RelayCounters()
            pair.gateway.start(DialRequest(resource="b"), sock, counters, calls.notify, reply_timeout=HANG,
                               early=early, early_fin=fin)
            await pair.accepted["b"].wait()
            upstream = pair.upstreams["b"]
            assert await ask_and_answer(client, upstream, b", again", b"world") == b"hello, again"
            # A session resumed after its client's EOF came: the FIN follows
            # the bytes.
            other, near = loopback_pair()
            pair.gateway.start(DialRequest(resource="c"), raw_socket(near), RelayCounters(), calls.notify,
                               reply_timeout=HANG, early=b"bye", early_fin=True)
            await pair.accepted["c"].wait()
            assert await read_until_eof(pair.upstreams["c"]) == b"bye"
            await pair.upstreams["c"].send_eof()
            assert await read_until_eof(other) == b""
            while len(calls.ended) < 2:
                await trio.sleep(0.01)
        assert calls.ended == [None, None] and len(calls.given_back) == 1
        await client.aclose()
        await other.aclose()


async def test_a_session_the_cluster_may_have_seen_is_not_started_again(pki):
    # The cluster's kernel acknowledged the OPEN and the client's first
    # bytes (its process read them: it may have connected the upstream and
    # passed them on), then the connection was reset. Starting the session
    # again could repeat those bytes: the client's connection is reset, as
    # for every other stream on a connection that failed.
    from gateway.net import tcp
    from protocols.mux import NEED_DATA, MuxConnection, StreamData

    gw_tls, cl_tls = await tls_connection(pki)
    link = MuxLink(engine(), gw_tls, Role.GATEWAY, name="cluster", socket_name="client")
    with trio.fail_after(HANG):
        client, calls, _ = await retrying_session(link)
        cluster = MuxConnection(Role.CLUSTER)
        while not isinstance(event := cluster.next_event(), StreamData):
            if event is NEED_DATA:
                cluster.receive_data(await cl_tls.receive_some(65536))
        sock = cl_tls.transport_stream.socket
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)  # no delayed acknowledgement
        while tcp.unacknowledged(link.end.sock):
            await trio.sleep(0.001)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
        sock.close()
        assert await read_until_reset(client) == b""
        await calls.event.wait()
        await link.closed.wait()
    assert not calls.given_back
    [error] = calls.ended
    assert "reset" in error, error
    await client.aclose()


async def flooded_link(pki) -> tuple[MuxLink, object, trio.SocketStream]:
    """A gateway link to a hand-made cluster that accepted one session and
    will read no more (its receive buffer cut to the least): (link, the
    cluster's end, the session's client). Sending on the client through
    :func:`flood` shuts the cluster's window."""
    from protocols.mux import NEED_DATA, MuxConnection, StreamOpened

    gw_tls, cl_tls = await tls_connection(pki)
    cl_tls.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    link = MuxLink(engine(), gw_tls, Role.GATEWAY, name="cluster", socket_name="client")
    flooder, near = loopback_pair()
    link.start(DialRequest(resource="flood"), raw_socket(near), RelayCounters(), lambda *_: None,
               reply_timeout=HANG)
    cluster = MuxConnection(Role.CLUSTER)
    with trio.fail_after(HANG):
        while not isinstance(event := cluster.next_event(), StreamOpened):
            if event is NEED_DATA:
                cluster.receive_data(await cl_tls.receive_some(65536))
        await cl_tls.send_all(cluster.send_reply(event.stream, DialAccept(session_id="f")))
    return link, cl_tls, flooder


async def flood(client: trio.SocketStream) -> None:
    with contextlib.suppress(trio.BrokenResourceError):
        while True:
            await client.send_all(b"x" * 65536)


async def test_a_session_that_never_left_a_connection_that_timed_out_starts_again(pki, monkeypatch):
    # Nothing sent on the connection is acknowledged any more (here: a
    # cluster that stopped reading, its window shut). A session started
    # meanwhile waits behind, never sent (past the shut window), and when
    # the connection times out (LINK_USER_TIMEOUT, cut to 1 s) it is handed
    # back: what never left this machine cannot have been read. The session
    # whose bytes did leave is reset (see the next test for why).
    import fcntl

    SIOCOUTQNSD = 0x894B  # bytes in the send queue not sent yet

    def unsent(sock: socket.socket) -> int:
        return int.from_bytes(fcntl.ioctl(sock.fileno(), SIOCOUTQNSD, bytes(4)), "little")

    monkeypatch.setattr(muxlink, "LINK_USER_TIMEOUT", 1)
    link, cl_tls, flooder = await flooded_link(pki)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood, flooder)
            while not unsent(link.end.sock):  # the cluster's window is shut
                await trio.sleep(0.01)
            client, calls, _ = await retrying_session(link)
            await link.closed.wait()
            nursery.cancel_scope.cancel()
        assert "timed out" in link.failed, link.failed
        [(sock, early, fin, reason)] = calls.given_back
        assert "timed out" in reason
        # Held back behind the full connection, it had read nothing yet: the
        # client's bytes still wait in its socket, for the next connection.
        assert (early, fin) == (b"", False) and sock.recv(100, socket.MSG_PEEK) == b"hello"
    sock.close()
    for s in (client, flooder):
        await s.aclose()
    await cl_tls.aclose()


@pytest.mark.parametrize("ended_by, reached, started_again", [
    ("reset", "the cluster's kernel", False),
    ("reset", "the wire, unacknowledged", True),
    ("reset", "nowhere", True),
    ("timeout", "the cluster's kernel", False),
    ("timeout", "the wire, unacknowledged", False),  # the acknowledgements may be what got lost
    ("timeout", "nowhere", True),
])
async def test_which_sessions_of_a_dead_connection_start_again(pki, monkeypatch, ended_by, reached,
                                                               started_again):
    # The rule of docs/wire.md, case by case, with the kernel's final counts
    # (acknowledged, sent) placed around where the stream's OPEN ends.
    import errno

    gw_tls, cl_tls = await tls_connection(pki)
    link = MuxLink(engine(), gw_tls, Role.GATEWAY, name="cluster", socket_name="client")
    client, calls, stream = await retrying_session(link)
    opened = stream.opened
    marks = {"the cluster's kernel": (opened, opened), "the wire, unacknowledged": (opened - 1, opened),
             "nowhere": (opened - 1, opened - 1)}[reached]
    monkeypatch.setattr(muxlink, "final_marks", lambda sock: marks)
    with engine().lock:
        link.end.os_error = errno.ECONNRESET if ended_by == "reset" else errno.ETIMEDOUT
        link._fail(f"cluster: receive failed: {ended_by}")
    with trio.fail_after(HANG):
        await calls.event.wait()
    assert len(calls.given_back) == started_again and len(calls.ended) == (not started_again)
    for sock, *_ in calls.given_back:
        sock.close()
    await client.aclose()
    await cl_tls.aclose()


async def test_a_cluster_that_stops_reading_is_not_taken_for_a_stall(pki):
    # A cluster that stopped reading the connection (its window shut) makes
    # the kernel back off as a dead path does (tcpi_backoff), but it answers
    # every probe: that is back-pressure, or a stuck peer, not a network
    # that went away, and the link keeps its place.
    from gateway.net import tcp

    link, cl_tls, flooder = await flooded_link(pki)
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(flood, flooder)
            while link.end.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[4] < tcp.STALL_BACKOFF:
                await trio.sleep(0.05)
            assert not link.stalled()
            nursery.cancel_scope.cancel()
    link.close("test over")
    await flooder.aclose()
    await cl_tls.aclose()


@pytest.mark.parametrize("backoff, silent_ms, stalled", [
    (3, 1500, True),   # retransmitted 3 times in a row, nothing back for 1.5 s: the path is gone
    (6, 20000, True),
    (3, 200, False),   # backing off, but answered 0.2 s ago: a shut window, a live peer
    (2, 5000, False),  # not backed off enough yet
    (0, 60000, False), # merely quiet: nothing outstanding
])
def test_a_stall_is_backing_off_with_nothing_coming_back(backoff, silent_ms, stalled):
    from gateway.net import tcp

    class Sock:
        def getsockopt(self, level, option, size):
            info = bytearray(size)
            info[4] = backoff
            info[56:60] = silent_ms.to_bytes(4, sys.byteorder)
            return bytes(info)

    class Closed:
        def getsockopt(self, *args):
            raise OSError(9, "Bad file descriptor")

    assert tcp.stalled(Sock()) is stalled
    assert tcp.stalled(Closed()) is False


async def test_a_stream_opened_without_a_socket_is_handed_back_when_the_cluster_never_saw_it(pki):
    gw_tls, cl_tls = await tls_connection(pki)
    dead = MuxLink(engine(), gw_tls, Role.GATEWAY, name="cluster", socket_name="client")
    tlsutil.vanish(cl_tls.transport_stream.socket)
    calls = Retries()
    with trio.fail_after(HANG):
        stream = dead.open(DialRequest(resource="a"), reply_timeout=HANG, retry=calls.retry)
        assert await dead.reply(stream) is None
        await dead.closed.wait()
    [(sock, early, fin, reason)] = calls.given_back
    assert (sock, early, fin) == (None, b"", False) and "reset" in reason, reason

"""gateway/net/muxlink.py in one process, the sessions: a gateway link and a cluster link
over a real TLS 1.3 connection on loopback, both run by the relay engine,
with loopback sockets for the clients and the upstreams. The cluster side's
decisions are a small callback here; the real ones are tested end to end in
tests/integration/test_tcp_route.py.

By topic: bounds on what the relay holds in test_muxlink_backpressure.py;
key updates, probes and cuts in test_muxlink_liveness.py; sessions started
again after a lost connection in test_muxlink_retry.py; shared pieces in
muxenv.py."""

from __future__ import annotations

import random
import socket

import pytest
import trio

from gateway.net import muxlink
from gateway.net.engine import engine
from gateway.net.muxlink import LinkClosed, MuxLink
from gateway.net.relay import RelayCounters
from protocols.dial import DialAccept, DialError, DialRequest
from protocols.errors import ErrorCode
from protocols.mux import INITIAL_WINDOW, Role
from tests.unit.gateway.net.muxenv import HANG, Started, linked, loopback_pair, socket_pair
from tests.unit.gateway.net.test_engine import tls_connection, tls_pair
from tests.unit.tlsutil import ask_and_answer, read_exactly, read_until_eof, read_until_reset


async def test_sessions_flow_both_ways_with_half_close(pki):
    async with linked(pki) as pair:
        payloads = {f"r{i}": random.Random(i).randbytes(i * 300_007 + 1) for i in range(4)}
        done: dict[str, str | None] = {}

        async def one(resource: str, data: bytes) -> None:
            # The client sends everything at once: up to EARLY_DATA of it
            # follows the OPEN, the rest once the cluster accepted.
            client, started = await pair.session(resource, accepted=False)
            async with trio.open_nursery() as inner:

                async def send() -> None:
                    await client.send_all(data)
                    await client.send_eof()

                async def wait() -> None:
                    done[resource] = await started.ended()

                inner.start_soon(send)
                inner.start_soon(wait)
                await pair.accepted[resource].wait()
                upstream = pair.upstreams[resource]

                async def echo() -> None:
                    # Half-close: the upstream answers only after our EOF.
                    got = await read_until_eof(upstream)
                    await upstream.send_all(got[::-1])
                    await upstream.send_eof()

                inner.start_soon(echo)
                assert await read_until_eof(client) == data[::-1]
            counters = started.counters
            assert (counters.a_to_b, counters.b_to_a) == (len(data), len(data))
            await client.aclose()
            await upstream.aclose()

        with trio.fail_after(HANG):
            async with trio.open_nursery() as sessions:
                for resource, data in payloads.items():
                    sessions.start_soon(one, resource, data)
            # The cluster's side of every stream ends too (this once hung:
            # a FIN read while a WINDOW reopened the stream went unnoticed).
            while len(pair.results) < len(payloads):
                await trio.sleep(0.01)
        assert len(done) == len(payloads)
        assert set(done.values()) == {None} and set(pair.results.values()) == {None}
        assert len(pair.gateway) == len(pair.cluster) == 0


async def test_refusals_and_the_stream_limit(pki, monkeypatch):
    monkeypatch.setattr(muxlink, "MAX_STREAMS", 1)
    async with linked(pki) as pair:
        with trio.fail_after(HANG):
            client0, refused = await pair.session("nope", accepted=False, tcp=True)
            assert await refused.ended() == "not you"
            reply = refused.stream.reply
            assert isinstance(reply, DialError) and reply.code is ErrorCode.ACCESS_DENIED
            assert await read_until_reset(client0) == b""  # the refusal reset the client's socket
            client, first = await pair.session("one")  # the one stream allowed
            client2, second = await pair.session("two", accepted=False)
            await second.ended()
            reply = second.stream.reply
            assert isinstance(reply, DialError) and reply.code is ErrorCode.RATE_LIMITED
            pair.gateway.cut(first.stream, "the test changed its mind")
            assert await first.ended() == "the test changed its mind"
            for c in (client0, client, client2):
                await c.aclose()


async def test_a_lost_connection_ends_every_stream_and_new_opens_fail(pki):
    async with linked(pki) as pair:
        with trio.fail_after(HANG):
            client, started = await pair.session("a", tcp=True)
            stream = started.stream
            await client.send_all(b"ping")
            assert await read_exactly(pair.upstreams["a"], 4) == b"ping"
            ends = [pair.gateway.end, pair.cluster.end, stream.end,
                    *(st.end for st in pair.cluster.streams.values())]
            assert all(e is not None for e in ends)
            pair.cluster.close("the cluster is stopping")
            # The client sees its connection reset (not a clean end); the
            # gateway's stream reports why.
            assert await read_until_reset(client) == b""
            assert "closed the multiplexed connection" in await started.ended()
            await pair.gateway.closed.wait()
            near, far = socket_pair()
            with pytest.raises(LinkClosed):
                Started(pair.gateway, DialRequest(resource="b"), near)
            await far.aclose()
            assert await read_until_reset(pair.upstreams["a"]) == b""
        await client.aclose()
        await pair.upstreams["a"].aclose()
    # Every socket of both links and of the stream is closed, and the engine
    # holds none of them.
    assert all(e.sock.fileno() == -1 for e in ends)
    assert not any(e in ends for e in engine().ends.values())


async def test_a_client_reset_resets_the_stream_and_the_upstream(pki):
    import struct

    async with linked(pki) as pair:
        with trio.fail_after(HANG):
            client, started = await pair.session("a", tcp=True)
            await client.send_all(b"x")
            assert await read_exactly(pair.upstreams["a"], 1) == b"x"
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.aclose()  # a TCP RST
            assert await read_until_reset(pair.upstreams["a"]) == b""  # passed on as one
            error = await started.ended()
            assert error.startswith("client: receive failed"), error
            while "a" not in pair.results:
                await trio.sleep(0.01)
            assert "reset the stream" in pair.results["a"], pair.results["a"]
            # The link itself carries on.
            client2, started2 = await pair.session("b")
            pair.gateway.cut(started2.stream, "done")
            await started2.ended()
            await client2.aclose()
        await pair.upstreams["a"].aclose()


async def test_frames_sent_from_trios_thread_drain_when_the_peer_reads_again(pki):
    # An OPEN the kernel takes only in part becomes the connection's tail;
    # the engine must then wait for EPOLLOUT, even though trio's thread,
    # not the engine's, wrote it. (It once did not: the dial hung.)
    from protocols.mux import NEED_DATA, MuxConnection

    gw_tls, far = await tls_connection(pki)
    gw_tls.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    far.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    link = MuxLink(engine(), gw_tls, Role.GATEWAY, name="cluster", socket_name="client")
    request = DialRequest(resource="r" * 100, client_addr="x" * 100)
    sent = 0
    clients = []
    with trio.fail_after(HANG):
        while not link.end.registered:  # the engine's first look at the link is over
            await trio.sleep(0.01)
        while link.end.tail is None:  # until the kernel stops taking them
            near, client = socket_pair()
            clients.append(client)
            Started(link, request, near)
            sent += 1
        conn = MuxConnection(Role.CLUSTER)
        got = 0
        while got < sent:
            data = await far.receive_some(65536)
            assert data, "the link closed"
            conn.receive_data(data)
            while conn.next_event() is not NEED_DATA:
                got += 1
    assert got == sent
    link.close("test over")
    await far.aclose()
    for client in clients:
        await client.aclose()


async def test_a_peer_that_does_not_read_cannot_grow_the_links_backlog(pki, monkeypatch):
    # Every OPEN gets a REPLY; a peer that sends OPENs and reads nothing
    # makes the cluster's link queue replies. Past LINK_BACKLOG the link
    # stops reading the peer (TCP pushes back) instead of queueing more.
    from protocols.mux import MuxConnection

    monkeypatch.setattr(muxlink, "LINK_BACKLOG", 64 * 1024)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener, trio.open_nursery() as nursery:
        peer, cl_tls = await tls_pair(pki, listener)
        cl_tls.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        peer.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

        def refuse_all(link, stream, request) -> None:
            link.refuse(stream, DialError(code=ErrorCode.ACCESS_DENIED, message="no " * 100))

        link = MuxLink(engine(), cl_tls, Role.CLUSTER, name="gateway", socket_name="upstream",
                       on_open=refuse_all)
        conn = MuxConnection(Role.GATEWAY)
        with trio.move_on_after(3):  # send until TCP stops taking more
            while True:
                _, frame = conn.send_open(DialRequest(resource="r"))
                await peer.send_all(frame)
        # One REPLY past the limit at most, however many OPENs one read
        # brought (the rest wait, unparsed).
        assert engine().backlog(link.end) < muxlink.LINK_BACKLOG + 1024
        link.close("test over")
        await peer.aclose()
        nursery.cancel_scope.cancel()


async def test_a_stream_accepted_after_a_full_early_window_reads_its_upstream(pki):
    # The gateway's first frame is exactly EARLY_DATA long and the cluster
    # accepts between its header and its payload: from the REPLY on, the
    # stream may send, so the upstream must be read. (It once was not: the
    # epoll interest was computed before the REPLY and never again.)
    import select

    from protocols.mux import EARLY_DATA, NEED_DATA, MuxConnection, StreamData

    peer, cl_tls = await tls_connection(pki)
    opened: list = []
    link = MuxLink(engine(), cl_tls, Role.CLUSTER, name="gateway", socket_name="upstream",
                   on_open=lambda _link, stream, _request: opened.append(stream))
    gw = MuxConnection(Role.GATEWAY)
    sid, frame = gw.send_open(DialRequest(resource="r"))
    await peer.send_all(frame + gw.send_data_header(sid, EARLY_DATA))  # the payload comes later
    with trio.fail_after(HANG):
        while not opened or link.conn._data_left != EARLY_DATA:  # the header is parsed
            await trio.sleep(0.01)
        near, upstream = socket_pair()
        assert link.accept(opened[0], DialAccept(session_id="s"), near, RelayCounters())
        assert opened[0].end.mask & select.EPOLLIN
        await peer.send_all(b"x" * EARLY_DATA)
        assert len(await read_exactly(upstream, EARLY_DATA)) == EARLY_DATA
        await upstream.send_all(b"response")
        got = b""
        while b"response" not in got:
            gw.receive_data(await peer.receive_some(65536))
            while (event := gw.next_event()) is not NEED_DATA:
                if isinstance(event, StreamData):
                    got += bytes(event.data)
    link.close("test over")
    await peer.aclose()
    await upstream.aclose()


async def test_a_stream_opened_before_its_socket(pki):
    # `wicket proxy db`'s way: the REPLY first (a refusal is then answered
    # in the client's own protocol), the client's socket after it; the
    # cluster's first bytes wait for the socket.
    async with linked(pki) as pair:
        with trio.fail_after(HANG):
            refused = pair.gateway.open(DialRequest(resource="nope"), reply_timeout=HANG)
            assert isinstance(await pair.gateway.reply(refused), DialError) and refused.finished
            stream = pair.gateway.open(DialRequest(resource="b"), reply_timeout=HANG)
            assert await pair.gateway.reply(stream) == DialAccept(session_id="b")
            await pair.upstreams["b"].send_all(b"welcome")  # before the gateway has a socket for it
            while pair.cluster_counters["b"].b_to_a < 7:
                await trio.sleep(0.001)
            client, near = loopback_pair()
            seen: list[bytes] = []
            assert pair.gateway.bind(stream, near, RelayCounters(), tap_in=seen.append)
            assert await read_until_eof_or(client, 7) == b"welcome"
            assert await ask_and_answer(client, pair.upstreams["b"], b"hello", b"bye") == b"hello"
            assert await pair.gateway.wait(stream) is None
        assert b"".join(seen) == b"welcomebye"
        await client.aclose()


async def test_bytes_read_ahead_go_before_the_sockets(pki):
    # A MongoDB client's first command, read by the gateway while it
    # answered hellos itself, reaches the server before what the client
    # sends next; more than the stream's window is the caller's error.
    async with linked(pki) as pair:
        with trio.fail_after(HANG):
            stream = pair.gateway.open(DialRequest(resource="m"), reply_timeout=HANG)
            assert await pair.gateway.reply(stream) == DialAccept(session_id="m")
            client, near = loopback_pair()
            await client.send_all(b" and after")
            counters = RelayCounters()
            assert pair.gateway.bind(stream, near, counters, ahead=b"first command")
            assert await read_exactly(pair.upstreams["m"], 23) == b"first command and after"
            assert counters.a_to_b == 23
            too_much = pair.gateway.open(DialRequest(resource="n"), reply_timeout=HANG)
            await pair.gateway.reply(too_much)
            other, near2 = loopback_pair()
            with pytest.raises(ValueError):
                pair.gateway.bind(too_much, near2, RelayCounters(), ahead=bytes(INITIAL_WINDOW + 1))
            pair.gateway.cut(too_much, "test over")
        await client.aclose()
        await other.aclose()


async def test_a_control_dial_is_answered_and_leaves_its_session_alone(pki):
    # A cancel: a stream of its own whose REPLY is all, sent behind what the
    # client had sent on the session it names (the ordering itself is
    # tests/integration/test_postgres_cancel.py's, against a slow server).
    async with linked(pki) as pair:
        with trio.fail_after(HANG):
            client, started = await pair.session("s", tcp=True)
            await client.send_all(b"select")
            reply = await pair.gateway.control(DialRequest(resource="s", params={"control": "1"}),
                                               after=started.stream, timeout=HANG)
            assert reply == DialAccept(session_id="-")
            assert len(pair.gateway.streams) == 1 and len(pair.cluster.streams) == 1
            assert await ask_and_answer(client, pair.upstreams["s"], b" 1", b"1") == b"select 1"
            assert await started.ended() is None
        await client.aclose()


async def read_until_eof_or(stream, n: int) -> bytes:
    """Read until ``n`` bytes or EOF."""
    data = bytearray()
    while len(data) < n:
        chunk = await stream.receive_some(65536)
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_every_event_of_the_codec_has_a_handler():
    # DATA is dispatched inline; each other frame type has its handler.
    from typing import get_args

    from gateway.net import muxlink
    from protocols import mux

    assert set(muxlink._HANDLERS) | {mux.StreamData} == set(get_args(mux.MuxEvent))


async def test_the_cluster_switches_a_sessions_upstream_between_exchanges(pki):
    # MySQL's COM_CHANGE_USER re-dialled: the session goes on with a new
    # connection to the server, the old one says goodbye and is closed
    # (the answer is the held message's: test_filters.py).
    async with linked(pki) as pair:
        with trio.fail_after(HANG):
            client, started = await pair.session("w")
            old = pair.upstreams["w"]
            await client.send_all(b"a")
            assert await read_exactly(old, 1) == b"a"
            near, new = loopback_pair()
            stream = pair.cluster_streams["w"]
            assert pair.cluster.switch(stream, near, goodbye=b"bye")
            assert await read_until_eof(old) == b"bye"
            await client.send_all(b"b")
            assert await read_exactly(new, 1) == b"b"
            await new.send_all(b"c")
            assert await read_exactly(client, 1) == b"c"
            await client.send_eof()
            assert await read_until_eof(new) == b""
            await new.send_eof()
            assert await read_until_eof(client) == b""
            assert await started.ended() is None
            late, late_far = loopback_pair()
            assert not pair.cluster.switch(stream, late)  # over: the socket is reset
        for s in (client, new, late_far):
            await s.aclose()

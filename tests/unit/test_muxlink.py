"""gateway/net/muxlink.py in one process: a gateway link and a cluster link
over a real TLS 1.3 connection on loopback, both run by the relay engine,
with loopback sockets for the clients and the upstreams. The cluster side's
decisions are a small callback here; the real ones are tested end to end in
tests/integration/test_tcp_route.py."""

from __future__ import annotations

import random

import pytest
import trio

from gateway.net import muxlink
from gateway.net.engine import engine
from gateway.net.muxlink import LinkClosed, MuxLink
from gateway.net.relay import RelayCounters
from protocols.dial import DialAccept, DialError, DialRequest
from protocols.errors import ErrorCode
from protocols.mux import Role
from tests.unit import tlsutil
from tests.unit.test_engine import tcp_pair, tls_pair
from tests.unit.tlsutil import read_exactly, read_until_eof

HANG = 60


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return tlsutil.make_pki(tmp_path_factory.mktemp("pki"))


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of stream sockets (AF_UNIX: the engine takes any)."""
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


class Pair:
    """Both ends of one link, plus what the cluster side did."""

    def __init__(self, nursery: trio.Nursery, listener, gateway_tls, cluster_tls) -> None:
        self.listener = listener
        self.nursery = nursery
        self.upstreams: dict[str, trio.SocketStream] = {}
        self.results: dict[str, str | None] = {}
        self.cluster_counters: dict[str, RelayCounters] = {}
        self.cluster = MuxLink(engine(), cluster_tls, Role.CLUSTER, name="gateway", socket_name="upstream",
                               on_open=self.on_open)
        self.gateway = MuxLink(engine(), gateway_tls, Role.GATEWAY, name="cluster", socket_name="client")

    def on_open(self, stream, request: DialRequest) -> None:
        self.nursery.start_soon(self.decide, stream, request)

    async def decide(self, stream, request: DialRequest) -> None:
        if request.resource == "nope":
            self.cluster.refuse(stream, DialError(code=ErrorCode.ACCESS_DENIED, message="not you"))
            return
        near, far = socket_pair()
        self.upstreams[request.resource] = far
        counters = self.cluster_counters[request.resource] = RelayCounters()
        if self.cluster.accept(stream, DialAccept(session_id=request.resource), near, counters):
            self.results[request.resource] = await self.cluster.wait(stream)

    def attach_soon(self, stream, near: trio.SocketStream) -> list:
        """Attach ``near`` to ``stream`` in the background; the list gets
        the stream's result when it ends."""
        result: list = []

        async def attach() -> None:
            result.append(await self.gateway.attach(stream, near, RelayCounters()))

        self.nursery.start_soon(attach)
        return result

    async def close(self) -> None:
        """End the link from the gateway's side and wait until both sides
        let go of their sockets."""
        self.gateway.close("test over")
        with trio.fail_after(HANG):
            await self.gateway.closed.wait()
            await self.cluster.closed.wait()
        for upstream in self.upstreams.values():
            await upstream.aclose()

    async def session(self, resource: str, *, tcp: bool = False):
        """(client socket, stream, gateway-side socket) for an accepted
        session; ``tcp`` for a real TCP client (one that can send a reset)."""
        stream = self.gateway.open(DialRequest(resource=resource))
        await stream.replied.wait()
        assert isinstance(stream.reply, DialAccept), stream.reply
        near, far = await tcp_pair(self.listener) if tcp else socket_pair()
        return far, stream, near


async def test_sessions_flow_both_ways_with_half_close(pki):
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener, trio.open_nursery() as nursery:
        gw_tls, cl_tls = await tls_pair(pki, listener)
        pair = Pair(nursery, listener, gw_tls, cl_tls)
        payloads = {f"r{i}": random.Random(i).randbytes(i * 300_007 + 1) for i in range(4)}
        done: dict[str, str | None] = {}

        async def one(resource: str, data: bytes) -> None:
            client, stream, near = await pair.session(resource)
            counters = RelayCounters()
            async with trio.open_nursery() as inner:

                async def attach() -> None:
                    done[resource] = await pair.gateway.attach(stream, near, counters)

                inner.start_soon(attach)
                upstream = pair.upstreams[resource]

                async def echo() -> None:
                    # Half-close: the upstream answers only after our EOF.
                    got = await read_until_eof(upstream)
                    await upstream.send_all(got[::-1])
                    await upstream.send_eof()

                inner.start_soon(echo)
                await client.send_all(data)
                await client.send_eof()
                assert await read_until_eof(client) == data[::-1]
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
        await pair.close()
        nursery.cancel_scope.cancel()


async def test_refusals_and_the_stream_limit(pki, monkeypatch):
    monkeypatch.setattr(muxlink, "MAX_STREAMS", 1)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener, trio.open_nursery() as nursery:
        gw_tls, cl_tls = await tls_pair(pki, listener)
        pair = Pair(nursery, listener, gw_tls, cl_tls)
        with trio.fail_after(HANG):
            refused = pair.gateway.open(DialRequest(resource="nope"))
            await refused.replied.wait()
            assert isinstance(refused.reply, DialError) and refused.reply.code is ErrorCode.ACCESS_DENIED
            assert refused.finished
            client, first, near = await pair.session("one")  # the one stream allowed
            second = pair.gateway.open(DialRequest(resource="two"))
            await second.replied.wait()
            assert isinstance(second.reply, DialError) and second.reply.code is ErrorCode.RATE_LIMITED
            pair.gateway.abandon(first, "the test changed its mind")
            await client.aclose()
            await near.aclose()
        await pair.close()
        nursery.cancel_scope.cancel()


async def test_a_lost_connection_ends_every_stream_and_new_opens_fail(pki):
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener, trio.open_nursery() as nursery:
        gw_tls, cl_tls = await tls_pair(pki, listener)
        pair = Pair(nursery, listener, gw_tls, cl_tls)
        with trio.fail_after(HANG):
            client, stream, near = await pair.session("a")
            result = pair.attach_soon(stream, near)
            await client.send_all(b"ping")
            assert await read_exactly(pair.upstreams["a"], 4) == b"ping"
            ends = [pair.gateway.end, pair.cluster.end, stream.end,
                    *(st.end for st in pair.cluster.streams.values())]
            assert all(e is not None for e in ends)
            pair.cluster.close("the cluster is stopping")
            # The client sees its connection end; the gateway's stream
            # reports why.
            assert await read_until_eof(client) == b""
            while not result:
                await trio.sleep(0.01)
            assert "closed the multiplexed connection" in result[0]
            await pair.gateway.closed.wait()
            with pytest.raises(LinkClosed):
                pair.gateway.open(DialRequest(resource="b"))
            assert await read_until_eof(pair.upstreams["a"]) == b""
        await client.aclose()
        await pair.upstreams["a"].aclose()
        nursery.cancel_scope.cancel()
    # Every socket of both links and of the stream is closed, and the engine
    # holds none of them.
    assert all(e.sock.fileno() == -1 for e in ends)
    assert not any(e in ends for e in engine()._ends.values())


async def test_a_client_reset_resets_the_stream_and_the_upstream_is_closed(pki):
    import socket
    import struct

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener, trio.open_nursery() as nursery:
        gw_tls, cl_tls = await tls_pair(pki, listener)
        pair = Pair(nursery, listener, gw_tls, cl_tls)
        with trio.fail_after(HANG):
            client, stream, near = await pair.session("a", tcp=True)
            result = pair.attach_soon(stream, near)
            await client.send_all(b"x")
            assert await read_exactly(pair.upstreams["a"], 1) == b"x"
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await client.aclose()  # a TCP RST
            assert await read_until_eof(pair.upstreams["a"]) == b""
            while not result or "a" not in pair.results:
                await trio.sleep(0.01)
            assert result[0].startswith("client: receive failed"), result[0]
            assert "reset the stream" in pair.results["a"], pair.results["a"]
            # The link itself carries on.
            client2, stream2, near2 = await pair.session("b")
            pair.gateway.abandon(stream2, "done")
            await client2.aclose()
            await near2.aclose()
        await pair.upstreams["a"].aclose()
        await pair.close()
        nursery.cancel_scope.cancel()


async def test_frames_sent_from_trios_thread_drain_when_the_peer_reads_again(pki):
    # An OPEN the kernel takes only in part becomes the connection's tail;
    # the engine must then wait for EPOLLOUT, even though trio's thread,
    # not the engine's, wrote it. (It once did not: the dial hung.)
    import socket

    from protocols.mux import NEED_DATA, MuxConnection

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        gw_tls, far = await tls_pair(pki, listener)
    gw_tls.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    far.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    link = MuxLink(engine(), gw_tls, Role.GATEWAY, name="cluster", socket_name="client")
    request = DialRequest(resource="r" * 100, client_addr="x" * 100)
    sent = 0
    with trio.fail_after(HANG):
        while not link.end.registered:  # the engine's first look at the link is over
            await trio.sleep(0.01)
        while link.end.tail is None:  # until the kernel stops taking them
            link.open(request)
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


async def test_a_peer_that_does_not_read_cannot_grow_the_links_backlog(pki, monkeypatch):
    # Every OPEN gets a REPLY; a peer that sends OPENs and reads nothing
    # makes the cluster's link queue replies. Past LINK_BACKLOG the link
    # stops reading the peer (TCP pushes back) instead of queueing more.
    import socket

    from protocols.mux import MuxConnection

    monkeypatch.setattr(muxlink, "LINK_BACKLOG", 64 * 1024)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener, trio.open_nursery() as nursery:
        peer, cl_tls = await tls_pair(pki, listener)
        cl_tls.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        peer.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)

        def refuse_all(stream, request) -> None:
            link.refuse(stream, DialError(code=ErrorCode.ACCESS_DENIED, message="no " * 100))

        link = MuxLink(engine(), cl_tls, Role.CLUSTER, name="gateway", socket_name="upstream",
                       on_open=refuse_all)
        conn = MuxConnection(Role.GATEWAY)
        with trio.move_on_after(3):  # send until TCP stops taking more
            while True:
                _, frame = conn.send_open(DialRequest(resource="r"))
                await peer.send_all(frame)
        assert engine().backlog(link.end) < muxlink.LINK_BACKLOG + 2 * 65536
        link.close("test over")
        await peer.aclose()
        nursery.cancel_scope.cancel()

"""gateway/net/muxlink.py in one process: a gateway link and a cluster link
over a real TLS 1.3 connection on loopback, both run by the relay engine,
with loopback sockets for the clients and the upstreams. The cluster side's
decisions are a small callback here; the real ones are tested end to end in
tests/integration/test_tcp_route.py."""

from __future__ import annotations

import collections
import contextlib
import random
import socket
import sys

import pytest
import trio

from gateway.net import muxlink, muxstreams
from gateway.net.engine import engine
from gateway.net.muxlink import LinkClosed, MuxLink
from gateway.net.relay import RelayCounters
from protocols.dial import DialAccept, DialError, DialRequest
from protocols.errors import ErrorCode
from protocols.mux import Role
from tests.unit import tlsutil
from tests.unit.gateway.net.test_engine import tcp_pair, tls_connection, tls_pair
from tests.unit.tlsutil import ask_and_answer, read_exactly, read_until_eof, read_until_reset

HANG = 60


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of stream sockets (AF_UNIX: the engine takes any)."""
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


def loopback_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of TCP sockets on loopback: unlike AF_UNIX, a reset
    (an aborted stream) is seen as one."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return tuple(trio.SocketStream(trio.socket.from_stdlib_socket(s)) for s in (a, b))


class Started:
    """A gateway stream started from trio on ``sock`` (which the link
    takes over), as `wicket proxy tcp` starts one from the engine's thread;
    ``await ended()`` returns the error that ended it, or None."""

    def __init__(self, link: MuxLink, request: DialRequest, sock: trio.SocketStream) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.event = trio.Event()
        self.counters = RelayCounters()
        raw = socket.socket(fileno=sock.socket.detach())
        raw.setblocking(False)
        try:
            self.stream = link.start(request, raw, self.counters, self._notify, reply_timeout=HANG)
        except LinkClosed:
            raw.close()
            raise

    def _notify(self, link: MuxLink, stream) -> None:  # any thread
        self.token.run_sync_soon(self.event.set)

    async def ended(self) -> str | None:
        await self.event.wait()
        return self.stream.error


class Pair:
    """Both ends of one link, plus what the cluster side did."""

    def __init__(self, nursery: trio.Nursery, listener, gateway_tls, cluster_tls) -> None:
        self.listener = listener
        self.nursery = nursery
        self.token = trio.lowlevel.current_trio_token()
        self.upstreams: dict[str, trio.SocketStream] = {}
        self.accepted: dict[str, trio.Event] = collections.defaultdict(trio.Event)
        self.results: dict[str, str | None] = {}
        self.cluster_counters: dict[str, RelayCounters] = {}
        self.cluster = MuxLink(engine(), cluster_tls, Role.CLUSTER, name="gateway", socket_name="upstream",
                               on_open=self.on_open)
        self.gateway = MuxLink(engine(), gateway_tls, Role.GATEWAY, name="cluster", socket_name="client")

    def on_open(self, link, stream, request: DialRequest) -> None:  # the engine's thread
        self.token.run_sync_soon(self.nursery.start_soon, self.decide, stream, request)

    async def decide(self, stream, request: DialRequest) -> None:
        if request.params.get("control"):  # a control dial: the answer is all
            self.cluster.answer(stream, DialAccept(session_id="-"))
            return
        if request.resource == "nope":
            self.cluster.refuse(stream, DialError(code=ErrorCode.ACCESS_DENIED, message="not you"))
            return
        near, far = loopback_pair()
        self.upstreams[request.resource] = far
        counters = self.cluster_counters[request.resource] = RelayCounters()
        if self.cluster.accept(stream, DialAccept(session_id=request.resource), near, counters):
            self.accepted[request.resource].set()
            self.results[request.resource] = await self.cluster.wait(stream)

    async def close(self) -> None:
        """End the link from the gateway's side and wait until both sides
        let go of their sockets."""
        self.gateway.close("test over")
        with trio.fail_after(HANG):
            await self.gateway.closed.wait()
            await self.cluster.closed.wait()
        for upstream in self.upstreams.values():
            await upstream.aclose()

    async def session(self, resource: str, *, tcp: bool = False, accepted: bool = True):
        """(client socket, Started) for a session; waits until the cluster
        side accepted it unless ``accepted`` is False. ``tcp`` for a real TCP
        client (one that can send a reset)."""
        near, far = await tcp_pair(self.listener) if tcp else socket_pair()
        started = Started(self.gateway, DialRequest(resource=resource), near)
        if accepted:
            await self.accepted[resource].wait()
        return far, started


@contextlib.asynccontextmanager
async def linked(pki):
    """Both ends of a fresh link over loopback (a :class:`Pair`); closed,
    with every upstream, when the block ends (a link a test closed already
    is left as it is)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener, trio.open_nursery() as nursery:
        gw_tls, cl_tls = await tls_pair(pki, listener)
        pair = Pair(nursery, listener, gw_tls, cl_tls)
        yield pair
        await pair.close()
        nursery.cancel_scope.cancel()


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


class RawGateway:
    """A cluster-side MuxLink driven by a hand-made gateway: the test writes
    the frames (``gw`` makes them) and owns the upstream ends."""

    def __init__(self, peer, link: MuxLink, gw, sids: list[int], upstreams: list, ended: list) -> None:
        self.peer, self.link, self.gw, self.sids, self.upstreams, self.ended = peer, link, gw, sids, upstreams, ended

    @classmethod
    async def open(cls, pki, streams: int, *, sndbuf: int | None = None, tcp: bool = False) -> "RawGateway":
        """``tcp``: the upstreams are TCP connections, which can tell a reset
        from an EOF (else AF_UNIX pairs)."""
        from protocols.mux import NEED_DATA, MuxConnection, StreamReplied

        peer, cl_tls = await tls_connection(pki)
        opened: list = []
        ended: list = []
        link = MuxLink(engine(), cl_tls, Role.CLUSTER, name="gateway", socket_name="upstream",
                       on_open=lambda _link, stream, _request: opened.append(stream))
        gw = MuxConnection(Role.GATEWAY)
        sids = [gw.send_open(DialRequest(resource=f"r{i}")) for i in range(streams)]
        await peer.send_all(b"".join(frame for _, frame in sids))
        while len(opened) < streams:
            await trio.sleep(0.01)
        upstreams = []
        for stream in opened:
            near, far = loopback_pair() if tcp else socket_pair()
            if sndbuf is not None:
                near.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            stream.notify = lambda _link, st: ended.append((st.sid, st.error))
            assert link.accept(stream, DialAccept(session_id="s"), near, RelayCounters())
            upstreams.append(far)
        replied = 0
        while replied < streams:  # the gateway side may send the whole window from here on
            gw.receive_data(await peer.receive_some(65536))
            while (event := gw.next_event()) is not NEED_DATA:
                replied += isinstance(event, StreamReplied)
        return cls(peer, link, gw, [sid for sid, _ in sids], upstreams, ended)

    async def close(self) -> None:
        self.link.close("test over")
        await self.peer.aclose()
        for far in self.upstreams:
            await far.aclose()


async def test_many_small_frames_in_one_read_reach_each_upstream_in_order(pki, monkeypatch):
    # One read of the connection holds many DATA frames; a stream's run of
    # them is written with one sendmsg (at most GATHER_MAX pieces), from a
    # scratch buffer the next read overwrites. Small upstream buffers force
    # partial writes, so what the kernel did not take must have been copied.
    monkeypatch.setattr(muxlink, "GATHER_MAX", 5)
    with trio.fail_after(HANG):
        raw = await RawGateway.open(pki, 2, sndbuf=16384)
        rng = random.Random(7)
        expected = {sid: bytearray() for sid in raw.sids}
        wire = bytearray()
        while len(wire) < 600_000:
            sid = raw.sids[rng.random() < 0.3]  # runs of one stream, interleaved
            payload = rng.randbytes(rng.choice([1, 9, 100, 3000]))
            expected[sid] += payload
            wire += raw.gw.send_data(sid, payload)
        for sid in raw.sids:
            wire += raw.gw.send_fin(sid)

        async def read(far, sid) -> None:
            assert await read_until_eof(far) == expected[sid]

        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw.peer.send_all, bytes(wire))
            for far, sid in zip(raw.upstreams, raw.sids):
                nursery.start_soon(read, far, sid)
        await raw.close()


async def test_a_gathered_write_that_fails_resets_only_its_stream(pki):
    with trio.fail_after(HANG):
        raw = await RawGateway.open(pki, 2)
        # Its upstream takes nothing more: sendmsg fails (EPIPE). (Not a
        # close: that would also end our reading side, and the socket's
        # watch could see the failure before any write meets it.)
        raw.upstreams[0].socket.shutdown(socket.SHUT_RD)
        wire, expected = bytearray(), bytearray()
        for i in range(50):
            wire += raw.gw.send_data(raw.sids[0], b"lost" * 3)
            expected += b"kept %d;" % i
            wire += raw.gw.send_data(raw.sids[1], b"kept %d;" % i)
        wire += raw.gw.send_fin(raw.sids[1])
        await raw.peer.send_all(bytes(wire))
        assert await read_until_eof(raw.upstreams[1]) == bytes(expected)
        assert raw.link.failed is None
        assert [sid for sid, _ in raw.ended] == [raw.sids[0]] and "send failed" in raw.ended[0][1]
        await raw.close()


async def test_data_before_a_protocol_error_is_delivered_then_the_link_ends(pki):
    from protocols.mux import HEADER

    with trio.fail_after(HANG):
        raw = await RawGateway.open(pki, 1, tcp=True)
        wire = raw.gw.send_data(raw.sids[0], b"authentic") + HEADER.pack(99, raw.sids[0], 0)
        await raw.peer.send_all(wire)
        assert await read_until_reset(raw.upstreams[0]) == b"authentic"
        await raw.link.closed.wait()
        assert "broke the multiplexing protocol" in raw.link.failed
        await raw.close()


async def test_a_link_that_fails_while_delivering_reads_no_more(pki, monkeypatch):
    # The upstream's write fails, and so does the RESET that should tell
    # the gateway: the link is over, and must not touch its socket again.
    from gateway.net.ends import Failure
    from protocols.mux import FrameType

    with trio.fail_after(HANG):
        raw = await RawGateway.open(pki, 1)
        link, eng = raw.link, raw.link.engine
        reads_after_failure = []
        real_read, real_send = eng._read, link._send

        def read(end, view):
            if end is link.end and link.failed is not None:
                reads_after_failure.append(link.failed)
            return real_read(end, view)

        def send(frame) -> None:
            if frame and frame[0] == FrameType.RESET:
                link.end.failed = True
                raise Failure("gateway: send failed: simulated")
            real_send(frame)

        monkeypatch.setattr(eng, "_read", read)
        monkeypatch.setattr(link, "_send", send)
        await raw.upstreams[0].aclose()
        # Two frames, then more bytes: the read that brought the frames is
        # not the last, so the loop would read again after delivering.
        await raw.peer.send_all(raw.gw.send_data(raw.sids[0], b"a" * 9) * 2)
        with contextlib.suppress(trio.BrokenResourceError):  # the link may have closed already
            await raw.peer.send_eof()
        await link.closed.wait()
        assert "simulated" in link.failed and not reads_after_failure
        await raw.close()


async def held_becomes(link: MuxLink, value: int) -> None:
    """Until the link holds ``value`` bytes for its streams' sockets (read
    under the engine's lock: it counts after the bytes move)."""
    while True:
        with link.engine.lock:
            if link.held == value:
                return
        await trio.sleep(0.01)


async def resets_seen(peer, gw, count: int) -> dict[int, str]:
    """Read the link's frames (as the gateway) until ``count`` RESETs came."""
    from protocols.mux import NEED_DATA, StreamReset

    resets: dict[int, str] = {}
    while len(resets) < count:
        gw.receive_data(await peer.receive_some(65536))
        while (event := gw.next_event()) is not NEED_DATA:
            if isinstance(event, StreamReset):
                resets[event.stream] = event.reason
    return resets


@pytest.mark.parametrize("limit", ["LINK_HELD", "HELD_LIMIT"])
async def test_what_slow_upstreams_make_the_relay_hold_is_bounded(pki, monkeypatch, limit):
    # Three upstreams that do not read, 200 KiB sent to each in turn (20 KiB
    # frames), 300 KiB allowed: each time the limit is reached, a stream is
    # reset with the reason (the one holding the most, unless the bytes
    # arriving for another would make that one hold more: which, depends on
    # how the frames were batched into reads). The one left is held whole
    # and gets every byte once its upstream reads.
    held_before = engine().held
    with trio.fail_after(HANG):
        raw = await RawGateway.open(pki, 3, sndbuf=4096)
        if limit == "LINK_HELD":
            monkeypatch.setattr(muxstreams, "LINK_HELD", 300 * 1024)
        else:
            monkeypatch.setattr(muxstreams, "HELD_LIMIT", held_before + 300 * 1024)
        payload = random.Random(3).randbytes(200 * 1024)
        chunks = [payload[i:i + 20 * 1024] for i in range(0, len(payload), 20 * 1024)]
        wire = b"".join(b"".join(raw.gw.send_data(sid, c) for c in chunks) + raw.gw.send_fin(sid)
                        for sid in raw.sids)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(raw.peer.send_all, wire)
            resets = await resets_seen(raw.peer, raw.gw, 2)
        (kept,) = set(raw.sids) - set(resets)
        for reason in resets.values():
            assert "does not take data as fast as it comes" in reason and "0.292969 MiB" in reason
            assert ("one connection" in reason) == (limit == "LINK_HELD")
        assert raw.link.held <= 300 * 1024
        assert await read_until_eof(raw.upstreams[raw.sids.index(kept)]) == payload
        await held_becomes(raw.link, 0)  # the accounting follows the last byte
        assert engine().held == held_before
        await raw.close()


async def near_the_limit(pki, monkeypatch) -> RawGateway:
    """Two streams, LINK_HELD at 300 KiB, and the first one stuck holding
    about 280 KiB (its upstream does not read): 100 KiB more for the
    second would pass the limit."""
    monkeypatch.setattr(muxstreams, "LINK_HELD", 300 * 1024)
    raw = await RawGateway.open(pki, 2, sndbuf=4096)
    await raw.peer.send_all(raw.gw.send_data(raw.sids[0], b"s" * 280 * 1024))
    while raw.link.held < 200 * 1024:
        await trio.sleep(0.01)
    return raw


async def test_at_the_limit_the_stream_holding_the_most_is_reset(pki, monkeypatch):
    # The stuck one makes room, the other is relayed.
    with trio.fail_after(HANG):
        raw = await near_the_limit(pki, monkeypatch)
        stuck, other = raw.sids
        await raw.peer.send_all(raw.gw.send_data(other, b"o" * 100 * 1024) + raw.gw.send_fin(other))
        assert list(await resets_seen(raw.peer, raw.gw, 1)) == [stuck]
        assert await read_until_eof(raw.upstreams[1]) == b"o" * 100 * 1024
        await raw.close()


async def test_making_room_on_a_connection_that_fails_ends_the_stream_cleanly(pki, monkeypatch, caplog):
    # As above, but the connection's socket fails when the RESET that makes
    # room goes out: the link ends, and with it the stream whose bytes
    # wanted the room. Those bytes go nowhere (its socket was handed to a
    # drainer); before, they became the tail of a socket no longer its own,
    # and a stream without a socket raised AttributeError (a bug, logged).
    with trio.fail_after(HANG):
        raw = await near_the_limit(pki, monkeypatch)
        stuck, other = raw.sids
        with raw.link.engine.lock:
            raw.link.end.sock.shutdown(socket.SHUT_WR)  # the next frame out fails
        await raw.peer.send_all(raw.gw.send_data(other, b"o" * 100 * 1024))
        while len(raw.ended) < 2:
            await trio.sleep(0.01)
        assert "send failed" in raw.link.failed
        errors = dict(raw.ended)
        assert "does not take data as fast as it comes" in errors[stuck]  # the room made
        assert "send failed" in errors[other]  # the link's end
        assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
        await held_becomes(raw.link, 0)
        await raw.close()


async def test_early_data_counts_against_what_the_relay_holds(pki, monkeypatch):
    from protocols.mux import EARLY_DATA, MuxConnection

    monkeypatch.setattr(muxstreams, "LINK_HELD", EARLY_DATA + EARLY_DATA // 2)
    held_before = engine().held
    peer, cl_tls = await tls_connection(pki)
    opened: list = []
    link = MuxLink(engine(), cl_tls, Role.CLUSTER, name="gateway", socket_name="upstream",
                   on_open=lambda _link, stream, _request: opened.append(stream))
    gw = MuxConnection(Role.GATEWAY)
    wire = b""
    for _ in range(2):  # two streams the cluster has not decided yet, a full early window each
        sid, frame = gw.send_open(DialRequest(resource="r"))
        wire += frame + gw.send_data(sid, b"e" * EARLY_DATA)
    with trio.fail_after(HANG):
        await peer.send_all(wire)
        # One of them is reset (which, depends on how the second one's
        # bytes were cut into reads: the one holding the most goes).
        (reset,) = await resets_seen(peer, gw, 1)
        await held_becomes(link, EARLY_DATA)  # the survivor's, all of it
        (survivor,) = [st for st in opened if st.sid != reset]
        near, upstream = socket_pair()
        assert link.accept(survivor, DialAccept(session_id="s"), near, RelayCounters())
        assert await read_exactly(upstream, EARLY_DATA) == b"e" * EARLY_DATA
        await held_becomes(link, 0)
        assert engine().held == held_before
    link.close("test over")
    await peer.aclose()
    await upstream.aclose()


async def test_a_stream_held_back_by_a_full_connection_reads_again_once_it_drains(pki):
    # While the connection's socket is full, streams with bytes to send are
    # parked (``blocked``, epoll interest in their sockets dropped). Once it
    # drains they are pumped again; a parked stream whose socket is empty by
    # then must get its epoll interest back, or what its upstream sends
    # later is never read.
    from protocols.mux import NEED_DATA, StreamData

    with trio.fail_after(HANG):
        raw = await RawGateway.open(pki, 1)
        raw.link.end.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        raw.peer.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
        (upstream,) = raw.upstreams
        first = random.Random(3).randbytes(256 * 1024)  # within the stream's window
        got = bytearray()

        async def read_peer(until: int) -> None:
            while len(got) < until:
                data = await raw.peer.receive_some(65536)
                assert data, "the link closed"
                raw.gw.receive_data(data)
                while (event := raw.gw.next_event()) is not NEED_DATA:
                    if isinstance(event, StreamData):
                        got.extend(event.data)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream.send_all, first)
            while not raw.link.blocked:  # the connection is full: the stream is parked
                await trio.sleep(0.01)
            await read_peer(len(first))
        while raw.link.blocked or raw.link.end.tail is not None:
            await trio.sleep(0.01)
        await upstream.send_all(b"later")
        await read_peer(len(first) + 5)
        assert got == first + b"later"
        await raw.close()


def test_what_a_partial_sendmsg_left_is_copied_whole():
    pieces = [memoryview(b"abc"), memoryview(b""), memoryview(b"d"), memoryview(b"efgh")]
    whole = b"abcdefgh"
    for sent in range(len(whole) + 1):
        assert muxstreams._unsent(pieces, sent) == whole[sent:]


@pytest.mark.skipif(tlsutil.OPENSSL is None, reason="needs the openssl command (requirements/apt.txt)")
async def test_key_updates_on_the_multiplexed_connection(pki):
    # openssl s_client plays the gateway, writing mux frames made here, and
    # sends KeyUpdates (asking for ours back, or not): the stream keeps
    # flowing both ways after each, our DATA under our new keys.
    from gateway.net.tls import accept_tls
    from protocols.mux import MuxConnection

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    opened: list = []
    gw = MuxConnection(Role.GATEWAY)
    async with listener, trio.open_nursery() as nursery:
        peer = await tlsutil.start_s_client(nursery, pki, listener.socket.getsockname()[1])
        with trio.fail_after(HANG):
            cl_tls = await accept_tls(await listener.accept(), tlsutil.server_context(pki))
            link = MuxLink(engine(), cl_tls, Role.CLUSTER, name="gateway", socket_name="upstream",
                           on_open=lambda _link, stream, _request: opened.append(stream))
            sid, frame = gw.send_open(DialRequest(resource="r"))
            await peer.send(frame)
            while not opened:
                await trio.sleep(0.01)
            near, upstream = socket_pair()
            assert link.accept(opened[0], DialAccept(session_id="s"), near, RelayCounters())
            for n, ask in ((1, True), (2, False), (3, True)):
                await peer.key_update(ask=ask)
                await peer.send(gw.send_data(sid, b"up %d;" % n))
                assert await read_exactly(upstream, 5) == b"up %d;" % n
                await upstream.send_all(b"down %d;" % n)
                await peer.until_shown(b"down %d;" % n)  # inside a DATA frame
            link.close("test over")
            await upstream.aclose()
            await peer.close()
        nursery.cancel_scope.cancel()


async def test_link_sockets_probe_a_quiet_peer_and_bound_unacknowledged_data(pki):
    # Both ends of a link: keepalive probes after 30 s of quiet, and data
    # unacknowledged for 30 s ends the connection (gateway/net/tcp.py):
    # sooner than a session gives up waiting for its REPLY, so a session sent
    # into a connection that reaches nobody any more is handed back in time.
    from gateway.local.dialer import DIAL_TIMEOUT
    from gateway.net import tcp

    assert tcp.LINK_USER_TIMEOUT < DIAL_TIMEOUT

    async with linked(pki) as pair:
        for link in (pair.gateway, pair.cluster):
            sock = link.end.sock
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == tcp.KEEPALIVE_IDLE
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == tcp.KEEPALIVE_INTERVAL
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == tcp.KEEPALIVE_COUNT
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == tcp.LINK_USER_TIMEOUT * 1000


async def test_a_peer_that_stops_reading_the_link_ends_it_after_the_user_timeout(pki, monkeypatch):
    # A gateway that is gone (or stuck) shuts its receive window for good:
    # the cluster's link must end (every stream on it with it) instead of
    # holding them forever. With the timeout cut to 1 s for the test.
    monkeypatch.setattr(muxlink, "LINK_USER_TIMEOUT", 1)
    with trio.fail_after(HANG):
        raw = await RawGateway.open(pki, 1, tcp=True)
        raw.peer.transport_stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        # The upstream sends more than the peer's buffers hold; the peer
        # (the test) never reads again.
        upstream = raw.upstreams[0]
        try:
            while True:
                await upstream.send_all(b"d" * 65536)
        except trio.BrokenResourceError as exc:  # the stream ended with the link: reset
            assert isinstance(exc.__cause__, ConnectionResetError), exc
        await raw.link.closed.wait()
        assert "Connection timed out" in raw.link.failed, raw.link.failed
        assert raw.ended and "Connection timed out" in raw.ended[0][1], raw.ended
        await raw.close()


async def test_bytes_that_came_before_a_reset_reach_a_slow_client_first(pki):
    # The upstream sends a response and resets. Over one TCP connection the
    # client could read the whole response before the reset; through the
    # link it must too, although the gateway still holds part of it (in its
    # tail and its socket's send queue) when the RESET arrives.
    import struct

    payload = random.Random(11).randbytes(1536 * 1024)  # under one window, over what the client buffers
    async with linked(pki) as pair:
        with trio.fail_after(HANG):
            client, started = await pair.session("a", tcp=True)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            upstream = pair.upstreams["a"]
            await upstream.send_all(payload)
            while pair.cluster_counters["a"].b_to_a < len(payload):  # all of it read and sent on
                await trio.sleep(0.01)
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await upstream.aclose()
            assert "reset the stream" in await started.ended()
            # Only now does the client read: everything, then the reset.
            with engine().lock:
                held_before = engine().held - pair.gateway.held
            assert await read_until_reset(client) == payload
            # What the drain held counted against the limits until it went.
            await held_becomes(pair.gateway, 0)
            with engine().lock:
                assert engine().held == held_before
            await client.aclose()


async def test_a_half_closed_quiet_stream_hears_its_upstream_fail(pki):
    # The upstream answered and half-closed; the client sends nothing more.
    # Nobody reads or writes the upstream's socket now, yet its failure (a
    # reset here; keepalive's timeout for a vanished host) must end the
    # session instead of leaving it open for good.
    import struct

    async with linked(pki) as pair:
        with trio.fail_after(HANG):
            client, started = await pair.session("a", tcp=True)
            upstream = pair.upstreams["a"]
            await upstream.send_all(b"bye")
            await upstream.send_eof()
            assert await read_until_eof(client) == b"bye"
            upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            await upstream.aclose()
            error = await started.ended()
            # (A reset after the peer's FIN reads as EPIPE: "Broken pipe".)
            assert "reset the stream: upstream: connection failed: " in error, error
            await client.aclose()


async def test_closing_the_link_cuts_its_streams_at_once(pki):
    # Our own close (the certificate's end, the process stopping) is a cut:
    # a stream's socket is reset at once, even with bytes still held for a
    # slow client, not drained as after the peer's abort.
    from gateway.net.draining import _Draining

    payload = random.Random(13).randbytes(1536 * 1024)
    async with linked(pki) as pair:
        with trio.fail_after(HANG):
            client, started = await pair.session("a", tcp=True)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            await pair.upstreams["a"].send_all(payload)
            while pair.cluster_counters["a"].b_to_a < len(payload):
                await trio.sleep(0.01)
            pair.gateway.close("the gateway is stopping")
            with engine().lock:
                assert not [e for e in engine().ends.values() if isinstance(e.owner, _Draining)]
            assert "the gateway is stopping" in await started.ended()
            assert len(await read_until_reset(client)) < len(payload)
            await client.aclose()


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


async def test_a_control_dial_is_answered_and_leaves_its_session_alone(pki):
    # A cancel: a stream of its own whose REPLY is all, sent behind what the
    # client had sent on the session it names (the ordering itself is
    # tests/integration/test_postgres.py's, against a slow server).
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

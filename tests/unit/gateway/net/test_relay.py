"""The relay: small cases on memory and socket streams, then a randomized
stress run through the real hot path, twice:

    client -> [gateway relay] -> TLS 1.3 -> [cluster relay] -> upstream
    client -> [gateway link] => one multiplexed TLS 1.3 connection => [cluster link] -> upstream

on loopback, many connections at once, each following a scenario (echo,
upload, download, client reset, upstream reset, session cut, cluster crash) with seeded
random chunk sizes and scheduling. Every byte must arrive once and in order,
every relay must end the way the scenario says (an abort reaches both ends as
a TCP reset, never as a clean EOF), and no descriptor may leak.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct

import attrs
import pytest
import trio
import trio.testing

from gateway.net.engine import engine
from gateway.net.muxlink import MuxLink
from gateway.net.relay import RelayCounters, RelayStats, relay
from gateway.net.tlsconnect import accept_tls, open_tls_connection
from tests.unit import tlsutil
from protocols.dial import DialAccept, DialRequest
from protocols.mux import Role as MuxRole
from tests.unit.tlsutil import ask_and_answer, read_exactly, read_until_eof, read_until_reset
from tests.unit.gateway.net.test_engine import tcp_pair, tls_pair
from tests.unit.gateway.net.muxenv import Started

HANG = 60  # seconds before a stuck test fails instead of hanging


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))




def reset_on_close(stream: trio.SocketStream) -> None:
    """SO_LINGER 0: close() sends a TCP RST, as a crashed peer would."""
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# ----------------------------------------------------------------------
# Small cases.


async def test_half_close_is_carried_and_the_reply_comes_back():
    client, relay_a = trio.testing.memory_stream_pair()
    relay_b, server = trio.testing.memory_stream_pair()
    result: list[RelayStats] = []

    async def run_relay() -> None:
        result.append(await relay(relay_a, relay_b))

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay)
            assert await ask_and_answer(client, server, b"question", b"answer") == b"question"
    assert result == [RelayStats(a_to_b=8, b_to_a=6, error=None)]


async def test_socket_streams_half_close_and_counts():
    # The plain<->plain case (the cluster's upstream side uses a SocketStream).
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    payload = random.Random(1).randbytes(3 * 1024 * 1024)
    async with listener:
        client = await trio.open_tcp_stream("127.0.0.1", port)
        relay_a = await listener.accept()
        relay_b = await trio.open_tcp_stream("127.0.0.1", port)
        server = await listener.accept()
    streams = (client, relay_a, relay_b, server)
    result: list[RelayStats] = []

    async def run_relay() -> None:
        result.append(await relay(relay_a, relay_b))

    async def echo() -> None:
        while data := await server.receive_some():
            await server.send_all(data)
        await server.send_eof()

    async def send() -> None:
        await client.send_all(payload)
        await client.send_eof()

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay)
            nursery.start_soon(echo)
            nursery.start_soon(send)
            assert await read_until_eof(client) == payload
    assert result == [RelayStats(a_to_b=len(payload), b_to_a=len(payload))]
    for s in streams:
        await s.aclose()


async def test_a_failing_side_ends_the_relay_with_an_error():
    client, relay_a = trio.testing.memory_stream_pair()
    relay_b, server = trio.testing.memory_stream_pair()
    result: list[RelayStats] = []

    async def run_relay() -> None:
        result.append(await relay(relay_a, relay_b, names=("client", "upstream")))

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(run_relay)
            await client.send_all(b"12345")
            assert await read_exactly(server, 5) == b"12345"
            # The upstream goes away; the next send to it fails, and the
            # other direction (idle in a receive) is cancelled.
            await server.aclose()
            await client.send_all(b"more")
    (stats,) = result
    assert stats.a_to_b == 5 and stats.b_to_a == 0
    assert stats.error is not None and stats.error.startswith("upstream: send failed")


async def test_outside_cancellation_propagates_and_counters_stay_readable():
    client, relay_a = trio.testing.memory_stream_pair()
    relay_b, server = trio.testing.memory_stream_pair()
    counters = RelayCounters()
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            with trio.CancelScope() as scope:

                async def drive() -> None:
                    await client.send_all(b"abc")
                    assert await read_exactly(server, 3) == b"abc"
                    await server.send_all(b"de")
                    assert await read_exactly(client, 2) == b"de"
                    scope.cancel()  # e.g. the user was locked

                nursery.start_soon(drive)
                await relay(relay_a, relay_b, counters=counters)
                raise AssertionError("relay returned instead of being cancelled")
    assert scope.cancelled_caught
    assert counters == RelayCounters(a_to_b=3, b_to_a=2)


@pytest.mark.parametrize("how", ["reset", "cancel", "cancelled_before_it_began"])
@pytest.mark.parametrize("implementation", ["engine", "trio"])
async def test_an_aborted_relay_resets_both_sides(pki, monkeypatch, how, implementation):
    # The same contract from both implementations: a relay that did not end
    # cleanly (a peer's reset, cancellation) resets the plain side and the
    # TLS side, with no close_notify, so neither peer takes the cut stream
    # for a complete one.
    if implementation == "trio":
        monkeypatch.setenv("WICKET_RELAY", "trio")
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        client, relay_plain = await tcp_pair(listener)
        relay_tls, far_tls = await tls_pair(pki, listener)
    result: list[RelayStats] = []
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            scope = trio.CancelScope()

            async def run_relay() -> None:
                with scope:
                    async with relay_plain, relay_tls:  # as every caller does
                        result.append(await relay(relay_plain, relay_tls, names=("client", "cluster")))

            if how == "cancelled_before_it_began":
                scope.cancel()
                nursery.start_soon(run_relay)
                assert await read_until_reset(client) == b""
                assert await read_until_reset(far_tls) == b""
                await client.aclose()
                await far_tls.aclose()
                return
            nursery.start_soon(run_relay)
            await far_tls.send_all(b"hello")
            assert await read_exactly(client, 5) == b"hello"
            if how == "reset":
                reset_on_close(client)
                await client.aclose()
            else:
                scope.cancel()
                assert await read_until_reset(client) == b""
            assert await read_until_reset(far_tls) == b""
    if how == "reset":
        (stats,) = result
        assert stats.error.startswith("client: receive failed") and "reset" in stats.error, stats
    else:
        assert result == []
    for s in (client, far_tls):
        await s.aclose()


async def test_buffer_size_must_be_positive():
    a, b = trio.testing.memory_stream_pair()
    with pytest.raises(ValueError):
        await relay(a, b, buffer_size=0)


# ----------------------------------------------------------------------
# The stress run.

KINDS = (
    "echo", "upload", "download_first", "client_reset", "upstream_reset", "cut", "cluster_crash",
)


@attrs.define
class Scenario:
    cid: int
    kind: str
    rng: random.Random
    upload: bytes
    download: bytes
    part: int  # bytes sent before a reset or a cut
    upstream_ok: bool = False  # the upstream side checked what it got


def make_scenarios(seed: int, count: int, max_size: int) -> list[Scenario]:
    rng = random.Random(seed)
    scenarios = []
    for cid in range(count):
        kind = KINDS[cid % len(KINDS)]
        # Log-uniform sizes: plenty of tiny sessions and some bulky ones.
        up = int(2 ** rng.uniform(0, max_size.bit_length() - 1))
        down = int(2 ** rng.uniform(0, max_size.bit_length() - 1))
        scenarios.append(Scenario(
            cid=cid, kind=kind, rng=random.Random(rng.getrandbits(64)),
            upload=rng.randbytes(up), download=rng.randbytes(down),
            part=rng.randint(1, max(1, up // 2)),
        ))
    return scenarios


async def jitter(rng: random.Random) -> None:
    """A few scheduling points, so the tasks interleave differently."""
    for _ in range(rng.choice((0, 0, 1, 3))):
        await trio.lowlevel.checkpoint()


async def send_chunks(stream, data: bytes, rng: random.Random) -> None:
    view = memoryview(data)
    start = 0
    while start < len(view):
        size = int(2 ** rng.uniform(0, 18))
        await stream.send_all(view[start:start + size])
        start += size
        await jitter(rng)


async def read_random(stream, rng: random.Random) -> bytes:
    parts = []
    while data := await stream.receive_some(rng.choice((1, 100, 4096, 65536, None))):
        parts.append(data)
        await jitter(rng)
    return b"".join(parts)


@attrs.define
class Path:
    """The hot path's two hops, as the gateway and the cluster run them."""

    server_ctx: object
    client_ctx: object
    scenarios: dict[int, Scenario]
    cluster_port: int = 0
    upstream_port: int = 0
    gateway_stats: dict[int, RelayStats] = attrs.Factory(dict)
    cluster_stats: dict[int, RelayStats | None] = attrs.Factory(dict)
    cluster_counters: dict[int, RelayCounters] = attrs.Factory(dict)
    cluster_scopes: dict[int, trio.CancelScope] = attrs.Factory(dict)
    cluster_tls: dict[int, object] = attrs.Factory(dict)

    async def gateway(self, client: trio.SocketStream) -> None:
        async with client:
            # Like the real gateway's startup phase: read the client's first
            # bytes (here a connection id), then dial and relay.
            header = await read_exactly(client, 4)
            (cid,) = struct.unpack(">I", header)
            tls = await open_tls_connection(
                "127.0.0.1", self.cluster_port, self.client_ctx,
                server_hostname=tlsutil.SERVER_NAME,
            )
            async with tls:
                await tls.send_all(header)
                self.gateway_stats[cid] = await relay(client, tls, names=("client", "cluster"))

    async def cluster(self, tcp: trio.SocketStream) -> None:
        tls = await accept_tls(tcp, self.server_ctx)
        async with tls:
            header = await read_exactly(tls, 4)  # the "dial"
            (cid,) = struct.unpack(">I", header)
            if self.scenarios[cid].kind == "cluster_crash":
                # A second descriptor for the same connection, to "crash" it
                # from outside while the relay owns the first one. (Only
                # here: while it is open, closing the relay's descriptor
                # neither resets nor ends the connection.)
                self.cluster_tls[cid] = os.dup(tls.transport_stream.socket.fileno())
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
            async with upstream:
                await upstream.send_all(header)
                counters = self.cluster_counters[cid] = RelayCounters()
                self.cluster_stats[cid] = None
                with trio.CancelScope() as scope:
                    self.cluster_scopes[cid] = scope
                    self.cluster_stats[cid] = await relay(
                        tls, upstream, counters=counters, names=("gateway", "upstream")
                    )

    async def upstream(self, stream: trio.SocketStream) -> None:
        async with stream:
            (cid,) = struct.unpack(">I", await read_exactly(stream, 4))
            sc = self.scenarios[cid]
            await UPSTREAM[sc.kind](sc, stream)


# Upstream halves of the scenarios.


async def upstream_echo(sc: Scenario, stream) -> None:
    while data := await stream.receive_some(sc.rng.choice((1, 1000, 65536))):
        await stream.send_all(data)
        await jitter(sc.rng)
    await stream.send_eof()
    sc.upstream_ok = True


async def upstream_upload(sc: Scenario, stream) -> None:
    data = await read_random(stream, sc.rng)
    sc.upstream_ok = data == sc.upload
    # Only now, after the client's EOF, the reply: half-close was carried.
    await stream.send_all(hashlib.sha256(data).digest())
    await stream.send_eof()


async def upstream_download_first(sc: Scenario, stream) -> None:
    async def send() -> None:
        await send_chunks(stream, sc.download, sc.rng)
        await stream.send_eof()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        sc.upstream_ok = await read_random(stream, sc.rng) == sc.upload


async def upstream_client_reset(sc: Scenario, stream) -> None:
    assert await read_exactly(stream, sc.part) == sc.upload[:sc.part]
    await stream.send_all(b"ack")
    # The client resets: the reset comes through as a reset, not an EOF.
    assert await read_until_reset(stream) == b""
    sc.upstream_ok = True


async def upstream_reset(sc: Scenario, stream) -> None:
    assert await read_exactly(stream, sc.part) == sc.upload[:sc.part]
    reset_on_close(stream)
    sc.upstream_ok = True


async def upstream_cut(sc: Scenario, stream) -> None:
    assert await read_exactly(stream, sc.part) == sc.upload[:sc.part]
    await stream.send_all(b"ack")
    # The cluster cancels the session and resets this connection.
    assert await read_until_reset(stream) == b""
    sc.upstream_ok = True


async def upstream_cluster_crash(sc: Scenario, stream) -> None:
    assert await read_exactly(stream, sc.part) == sc.upload[:sc.part]
    await stream.send_all(b"ack")
    assert await read_until_reset(stream) == b""
    sc.upstream_ok = True


UPSTREAM = {
    "echo": upstream_echo,
    "upload": upstream_upload,
    "download_first": upstream_download_first,
    "client_reset": upstream_client_reset,
    "upstream_reset": upstream_reset,
    "cut": upstream_cut,
    "cluster_crash": upstream_cluster_crash,
}


# Client halves, which also check the outcome on the relays.


async def client_session(path: Path, gateway_port: int, sc: Scenario) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", gateway_port)
    async with stream:
        await stream.send_all(struct.pack(">I", sc.cid))
        kind = sc.kind
        if kind == "echo":
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    await send_chunks(stream, sc.upload, sc.rng)
                    await stream.send_eof()

                nursery.start_soon(send)
                assert await read_random(stream, sc.rng) == sc.upload
        elif kind == "upload":
            await send_chunks(stream, sc.upload, sc.rng)
            await stream.send_eof()
            assert await read_until_eof(stream) == hashlib.sha256(sc.upload).digest()
        elif kind == "download_first":
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    await send_chunks(stream, sc.upload, sc.rng)
                    await stream.send_eof()

                nursery.start_soon(send)
                assert await read_random(stream, sc.rng) == sc.download
        elif kind == "client_reset":
            await send_chunks(stream, sc.upload[:sc.part], sc.rng)
            assert await read_exactly(stream, 3) == b"ack"
            reset_on_close(stream)
        elif kind == "upstream_reset":
            await send_chunks(stream, sc.upload[:sc.part], sc.rng)
            # The cluster sees the reset and passes it on: a reset on
            # every hop, never a clean EOF.
            assert await read_until_reset(stream) == b""
        elif kind == "cut":
            await send_chunks(stream, sc.upload[:sc.part], sc.rng)
            assert await read_exactly(stream, 3) == b"ack"
            path.cluster_scopes[sc.cid].cancel()
            assert await read_until_reset(stream) == b""
        elif kind == "cluster_crash":
            await send_chunks(stream, sc.upload[:sc.part], sc.rng)
            assert await read_exactly(stream, 3) == b"ack"
            # The cluster's socket vanishes under its TLS stream: no
            # close_notify. The gateway reports a truncation (or a reset)
            # and resets the client's connection.
            crash(path.cluster_tls.pop(sc.cid))
            assert await read_until_reset(stream) == b""


def crash(fd: int) -> None:
    """What the kernel does to a crashed process's connection: both
    directions end at once, with no TLS close_notify."""
    sock = socket.socket(fileno=fd)
    try:
        sock.shutdown(socket.SHUT_RDWR)
    finally:
        sock.close()


def check_outcome(path: Path, sc: Scenario) -> None:
    gw = path.gateway_stats[sc.cid]
    cl = path.cluster_stats[sc.cid]
    counters = path.cluster_counters[sc.cid]
    assert sc.upstream_ok, sc.kind
    if sc.kind in ("echo", "upload", "download_first"):
        back = {
            "echo": len(sc.upload),
            "upload": 32,
            "download_first": len(sc.download),
        }[sc.kind]
        expected = RelayStats(a_to_b=len(sc.upload), b_to_a=back)
        assert gw == expected, sc.kind
        assert cl == expected, sc.kind
    elif sc.kind == "client_reset":
        assert gw.a_to_b == sc.part and gw.b_to_a == 3
        assert gw.error and gw.error.startswith("client: receive failed"), gw.error
        # The gateway reset its TLS connection in turn.
        assert (cl.a_to_b, cl.b_to_a) == (sc.part, 3)
        assert cl.error and cl.error.startswith("gateway: receive failed") and "reset" in cl.error, cl.error
    elif sc.kind == "upstream_reset":
        assert cl is not None and cl.a_to_b == sc.part and cl.b_to_a == 0
        assert cl.error and cl.error.startswith("upstream: receive failed"), cl.error
        assert "reset" in cl.error.lower(), cl.error
        assert (gw.a_to_b, gw.b_to_a) == (sc.part, 0)
        assert gw.error and gw.error.startswith("cluster: receive failed") and "reset" in gw.error, gw.error
    elif sc.kind == "cut":
        assert cl is None  # cancelled: no stats, only the live counters
        assert counters == RelayCounters(a_to_b=sc.part, b_to_a=3)
        assert (gw.a_to_b, gw.b_to_a) == (sc.part, 3)
        assert gw.error and gw.error.startswith("cluster: receive failed") and "reset" in gw.error, gw.error
    elif sc.kind == "cluster_crash":
        assert gw.error and gw.error.startswith("cluster: receive failed"), gw.error
        assert cl is not None and cl.error and cl.error.startswith("gateway: receive failed")
        assert (gw.a_to_b, gw.b_to_a) == (sc.part, 3)
        assert counters == RelayCounters(a_to_b=sc.part, b_to_a=3)


async def run_stress(pki, *, seed: int, count: int, max_size: int) -> None:
    scenarios = make_scenarios(seed, count, max_size)
    path = Path(
        server_ctx=tlsutil.server_context(pki),
        client_ctx=tlsutil.client_context(pki),
        scenarios={sc.cid: sc for sc in scenarios},
    )
    engine()  # its epoll and wake-up descriptors live as long as the process
    fds_before = open_fds()
    listeners = [
        (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] for _ in range(3)
    ]
    gateway_l, cluster_l, upstream_l = listeners
    path.cluster_port = cluster_l.socket.getsockname()[1]
    path.upstream_port = upstream_l.socket.getsockname()[1]
    gateway_port = gateway_l.socket.getsockname()[1]

    with trio.fail_after(HANG):
        async with trio.open_nursery() as handlers:
            async with trio.open_nursery() as servers:

                async def accept_loop(listener, handler) -> None:
                    async with listener:
                        while True:
                            handlers.start_soon(handler, await listener.accept())

                for listener, handler in zip(
                    listeners, (path.gateway, path.cluster, path.upstream)
                ):
                    servers.start_soon(accept_loop, listener, handler)
                async with trio.open_nursery() as clients:
                    for sc in scenarios:
                        clients.start_soon(client_session, path, gateway_port, sc)
                servers.cancel_scope.cancel()  # stop accepting, close the listeners
            # Here every handler finishes on its own: nothing else is cancelled.

    for fd in path.cluster_tls.values():
        os.close(fd)
    for sc in scenarios:
        check_outcome(path, sc)
    assert open_fds() == fds_before, "a socket was left open"


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_stress_through_gateway_tls_cluster(pki, seed):
    await run_stress(pki, seed=seed, count=36, max_size=512 * 1024)


@pytest.mark.heavy
@pytest.mark.parametrize("seed", range(10, 16))
async def test_stress_heavy(pki, seed):
    await run_stress(pki, seed=seed, count=240, max_size=8 * 1024 * 1024)


# ----------------------------------------------------------------------
# The same scenarios over the multiplexed connection: every session is a
# stream of one TLS connection between a gateway link and a cluster link
# (gateway/net/muxlink.py), as `wicket proxy tcp` runs them. A crash of that
# connection ends every stream on it, so "cluster_crash" is left to
# tests/unit/gateway/net/test_muxlink.py.

MUX_KINDS = tuple(k for k in KINDS if k != "cluster_crash")


@attrs.define
class MuxPath:
    scenarios: dict[int, Scenario]
    upstream_port: int = 0
    gateway_link: MuxLink | None = None
    cluster_link: MuxLink | None = None
    gateway_results: dict[int, tuple] = attrs.Factory(dict)
    cluster_results: dict[int, tuple] = attrs.Factory(dict)
    cluster_scopes: dict[int, trio.CancelScope] = attrs.Factory(dict)
    nursery: trio.Nursery | None = None
    token: trio.lowlevel.TrioToken | None = None

    async def gateway(self, client: trio.SocketStream) -> None:
        async with client:
            header = await read_exactly(client, 4)
            (cid,) = struct.unpack(">I", header)
            started = Started(self.gateway_link, DialRequest(resource=str(cid)), client)
            error = await started.ended()
            assert isinstance(started.stream.reply, DialAccept), started.stream.reply
            self.gateway_results[cid] = (error, started.counters)

    def on_open(self, link, stream, request: DialRequest) -> None:  # the engine's thread
        self.token.run_sync_soon(self.nursery.start_soon, self.cluster, stream, request)

    async def cluster(self, stream, request: DialRequest) -> None:
        cid = int(request.resource)
        upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
        async with upstream:
            await upstream.send_all(struct.pack(">I", cid))
            counters = RelayCounters()
            self.cluster_results[cid] = (None, counters)
            with trio.CancelScope() as scope:
                self.cluster_scopes[cid] = scope
                assert self.cluster_link.accept(stream, DialAccept(session_id=str(cid)), upstream, counters)
                self.cluster_results[cid] = (await self.cluster_link.wait(stream), counters)

    async def upstream(self, stream: trio.SocketStream) -> None:
        async with stream:
            (cid,) = struct.unpack(">I", await read_exactly(stream, 4))
            sc = self.scenarios[cid]
            await UPSTREAM[sc.kind](sc, stream)


def check_mux_outcome(path: MuxPath, sc: Scenario) -> None:
    gw_error, gw = path.gateway_results[sc.cid]
    cl_error, cl = path.cluster_results[sc.cid]
    assert sc.upstream_ok, sc.kind
    if sc.kind in ("echo", "upload", "download_first"):
        back = {"echo": len(sc.upload), "upload": 32, "download_first": len(sc.download)}[sc.kind]
        expected = RelayCounters(a_to_b=len(sc.upload), b_to_a=back)
        assert (gw_error, gw) == (None, expected), sc.kind
        assert (cl_error, cl) == (None, expected), sc.kind
    elif sc.kind == "client_reset":
        assert gw_error.startswith("client: receive failed"), gw_error
        assert "reset the stream" in cl_error, cl_error
        assert (gw.a_to_b, gw.b_to_a) == (cl.a_to_b, cl.b_to_a) == (sc.part, 3)
    elif sc.kind == "upstream_reset":
        assert cl_error.startswith("upstream: receive failed") and "reset" in cl_error.lower(), cl_error
        assert "reset the stream" in gw_error, gw_error
        assert (gw.a_to_b, gw.b_to_a) == (cl.a_to_b, cl.b_to_a) == (sc.part, 0)
    elif sc.kind == "cut":
        assert cl_error is None  # cancelled: the wait raised, only the counters
        assert "reset the stream: cancelled" in gw_error, gw_error
        assert (cl.a_to_b, cl.b_to_a) == (gw.a_to_b, gw.b_to_a) == (sc.part, 3)


async def run_mux_stress(pki, *, seed: int, count: int, max_size: int) -> None:
    scenarios = [sc for sc in make_scenarios(seed, count * len(KINDS) // len(MUX_KINDS), max_size)
                 if sc.kind in MUX_KINDS][:count]
    path = MuxPath(scenarios={sc.cid: sc for sc in scenarios})
    engine()
    fds_before = open_fds()
    gateway_l, link_l, upstream_l = [(await trio.open_tcp_listeners(0, host="127.0.0.1"))[0] for _ in range(3)]
    path.upstream_port = upstream_l.socket.getsockname()[1]
    gateway_port = gateway_l.socket.getsockname()[1]

    with trio.fail_after(HANG):
        async with trio.open_nursery() as handlers:
            path.nursery = handlers
            path.token = trio.lowlevel.current_trio_token()
            async with link_l:
                port = link_l.socket.getsockname()[1]
                async with trio.open_nursery() as n:
                    accepted: list = []

                    async def accept() -> None:
                        accepted.append(await accept_tls(await link_l.accept(), tlsutil.server_context(pki)))

                    n.start_soon(accept)
                    gw_tls = await open_tls_connection("127.0.0.1", port, tlsutil.client_context(pki),
                                                       server_hostname=tlsutil.SERVER_NAME)
            path.cluster_link = MuxLink(engine(), accepted[0], MuxRole.CLUSTER, name="gateway",
                                        socket_name="upstream", on_open=path.on_open)
            path.gateway_link = MuxLink(engine(), gw_tls, MuxRole.GATEWAY, name="cluster", socket_name="client")
            async with trio.open_nursery() as servers:

                async def accept_loop(listener, handler) -> None:
                    async with listener:
                        while True:
                            handlers.start_soon(handler, await listener.accept())

                servers.start_soon(accept_loop, gateway_l, path.gateway)
                servers.start_soon(accept_loop, upstream_l, path.upstream)
                async with trio.open_nursery() as clients:
                    for sc in scenarios:
                        clients.start_soon(client_session, path, gateway_port, sc)
                servers.cancel_scope.cancel()
            # Every stream's handlers finish on their own; then the link.
            while len(path.gateway_results) < len(scenarios) or len(path.cluster_link):
                await trio.sleep(0.01)
            path.gateway_link.close("test over")
            await path.cluster_link.closed.wait()

    for sc in scenarios:
        check_mux_outcome(path, sc)
    assert open_fds() == fds_before, "a socket was left open"


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_stress_through_the_multiplexed_connection(pki, seed):
    await run_mux_stress(pki, seed=seed, count=36, max_size=512 * 1024)


@pytest.mark.heavy
@pytest.mark.parametrize("seed", range(10, 14))
async def test_stress_mux_heavy(pki, seed):
    await run_mux_stress(pki, seed=seed, count=240, max_size=8 * 1024 * 1024)

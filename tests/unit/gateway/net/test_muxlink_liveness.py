"""gateway/net/muxlink.py: key updates, keepalive probes and user timeouts,
resets and half-closes seen in time, closing a link."""

from __future__ import annotations

import random
import socket

import pytest
import trio

from gateway.net import muxlink
from gateway.net.engine import engine
from gateway.net.muxlink import MuxLink
from gateway.net.relay import RelayCounters
from protocols.dial import DialAccept, DialRequest
from protocols.mux import Role
from tests.unit import tlsutil
from tests.unit.gateway.net.muxenv import HANG, RawGateway, held_becomes, linked, socket_pair
from tests.unit.tlsutil import read_exactly, read_until_eof, read_until_reset


@pytest.mark.skipif(tlsutil.OPENSSL is None, reason="needs the openssl command (requirements/apt.txt)")
async def test_key_updates_on_the_multiplexed_connection(pki):
    # openssl s_client plays the gateway, writing mux frames made here, and
    # sends KeyUpdates (asking for ours back, or not): the stream keeps
    # flowing both ways after each, our DATA under our new keys.
    from gateway.net.tlsconnect import accept_tls
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

"""gateway/net/muxlink.py: what the relay holds for slow peers and upstreams is
bounded; frames in one read, failing writes and protocol errors."""

from __future__ import annotations

import contextlib
import random
import socket

import pytest
import trio

from gateway.net import muxlink, muxstreams
from gateway.net.engine import engine
from gateway.net.muxlink import MuxLink
from gateway.net.relay import RelayCounters
from protocols.dial import DialAccept, DialRequest
from protocols.mux import Role
from tests.unit.gateway.net.muxenv import HANG, RawGateway, held_becomes, socket_pair
from tests.unit.gateway.net.test_engine import tls_connection
from tests.unit.tlsutil import read_exactly, read_until_eof, read_until_reset


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

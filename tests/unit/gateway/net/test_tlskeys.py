"""TLS 1.3 key updates (gateway/net/tlskeys.py): OpenSSL's updater found
safely behind the stdlib's SSLObject, and every relay path asking for one
after its share of records, so that no key protects more than TLS allows.
The peers count the KeyUpdate messages they read (OpenSSL's message
callback, a private hook of the ssl module, used here only to watch); each
side updates its own sending key."""

from __future__ import annotations

import logging
import ssl
import struct

import pytest
import trio

from gateway.net import tlskeys
from gateway.net.relay import RelayCounters
from protocols.dial import DialRequest
from tests.unit import tlsutil
from tests.unit.gateway.net.test_engine import tls_connection
from tests.unit.gateway.net.muxenv import HANG, Started, linked, loopback_pair, socket_pair
from tests.unit.tlsutil import read_exactly


def records_in(ciphertext: bytes) -> int:
    n = pos = 0
    while pos < len(ciphertext):
        pos += 5 + struct.unpack_from(">H", ciphertext, pos + 3)[0]
        n += 1
    return n


def test_an_update_goes_out_in_front_of_the_next_record(pki):
    client, server = tlsutil.memory_pair(pki)
    for sender, receiver in ((client, server), (server, client)):
        update = tlskeys.key_updater(sender[0])
        assert update is not None  # this CPython's layout was recognised
        update()
        sender[0].write(b"after the update")
        wire = sender[2].read()
        assert records_in(wire) == 2  # the KeyUpdate, then the data under the new key
        receiver[1].write(wire)
        assert receiver[0].read(100) == b"after the update"
        # Each side updates its own sending key; the peer was not asked to.
        receiver[0].write(b"answer")
        wire = receiver[2].read()
        assert records_in(wire) == 1
        sender[1].write(wire)
        assert sender[0].read(100) == b"answer"


def test_a_refused_update_leaves_no_error_behind_for_other_connections(pki):
    # OpenSSL's error queue is per thread: an error left there is reported
    # by the next call on *any* connection of the engine's thread.
    first, _ = tlsutil.memory_pair(pki)
    other, _ = tlsutil.memory_pair(pki)
    update = tlskeys.key_updater(first[0])
    update()
    with pytest.raises(ssl.SSLError, match="refused"):
        update()  # one is already on its way (OpenSSL: still in init)
    with pytest.raises(ssl.SSLWantReadError):
        other[0].read(100)  # nothing to read, and nothing else to say


def test_records_are_never_undercounted():
    assert [tlskeys.records(n) for n in (1, 16383, 16384, 256 * 1024)] == [1, 1, 2, 17]
    assert tlskeys.records(16384, 9) >= 16384 // 512


def test_a_smaller_record_size_the_client_negotiated_is_counted(pki):
    # A local PostgreSQL client may ask for max_fragment_length (RFC 6066):
    # OpenSSL then cuts every 16 KiB write into 32 records of 512 bytes.
    import ctypes

    client_ctx = tlsutil.client_context(pki)
    lib = ctypes.CDLL(ssl._ssl.__file__)
    ctx_ptr = ctypes.c_void_p.from_address(id(client_ctx) + object.__basicsize__).value
    assert lib.SSL_CTX_set_tlsext_max_fragment_length(ctypes.c_void_p(ctx_ptr), 1) == 1  # 512 bytes
    client, server = tlsutil.memory_pair(pki, client_ctx=client_ctx)
    assert tlskeys.record_shift(server[0]) == tlskeys.record_shift(client[0]) == 9
    server[0].write(b"x" * 16384)
    assert records_in(server[2].read()) == 32 <= tlskeys.records(16384, 9)
    plain, _ = tlsutil.memory_pair(pki)
    assert tlskeys.record_shift(plain[0]) == 14


def test_what_has_no_such_limit_is_left_alone(pki):
    # TLS 1.2 (a local PostgreSQL client or server may speak it) has no
    # KeyUpdate: its connections are neither updated nor cut.
    class Counts:
        records, rekey_at, key_update = tlskeys.MAX_RECORDS, tlskeys.UPDATE_AFTER, None

    for side in tlsutil.memory_pair(pki, version=ssl.TLSVersion.TLSv1_2):
        state = Counts()
        tlskeys.rekey(state, side[0], "test")
        assert state.rekey_at == tlskeys.NEVER and state.key_update is False


class KeyUpdatesRead:
    """Contexts whose connections count the KeyUpdate messages they read."""

    def __init__(self, monkeypatch) -> None:
        self.count = 0
        for name in ("server_context", "client_context"):
            make = getattr(tlsutil, name)
            monkeypatch.setattr(tlsutil, name, lambda pki, *a, _make=make, **k: self._watched(_make(pki, *a, **k)))

    def _watched(self, ctx: ssl.SSLContext) -> ssl.SSLContext:
        def seen(conn, direction, version, content_type, msg_type, data) -> None:
            if direction == "read" and content_type == ssl._TLSContentType.HANDSHAKE \
                    and msg_type == ssl._TLSMessageType.KEY_UPDATE:
                self.count += 1

        ctx._msg_callback = seen
        return ctx


async def echo_through_a_link(pki, messages: int) -> None:
    """``messages`` round trips of 100 bytes through a fresh link."""
    async with linked(pki) as pair:
        near, far = socket_pair()
        started = Started(pair.gateway, DialRequest(resource="r"), near)
        await pair.accepted["r"].wait()
        upstream = pair.upstreams["r"]
        for i in range(messages):
            message = b"%0100d" % i
            await far.send_all(message)
            assert await read_exactly(upstream, 100) == message
            await upstream.send_all(message)
            assert await read_exactly(far, 100) == message
        await far.aclose()
        await upstream.aclose()
        await started.ended()


async def test_the_multiplexed_connection_updates_its_keys_every_so_many_records(pki, monkeypatch):
    monkeypatch.setattr(tlskeys, "UPDATE_AFTER", 50)
    watch = KeyUpdatesRead(monkeypatch)
    with trio.fail_after(HANG):
        await echo_through_a_link(pki, 300)  # 300 records each way, a few more for control frames
    # Each side updates its key after each 50 of its records: at least 6
    # updates read by each side.
    assert watch.count >= 12


async def test_a_relayed_tls_session_updates_its_keys(pki, monkeypatch):
    # The engine's other TLS path (a session relayed as is: PostgreSQL's).
    from gateway.net.relay import relay
    from tests.unit.gateway.net.test_engine import tcp_pair

    monkeypatch.setattr(tlskeys, "UPDATE_AFTER", 8)
    watch = KeyUpdatesRead(monkeypatch)
    payload = bytes(range(256)) * 4096  # 1 MiB: 64 full records
    with trio.fail_after(HANG):
        tls_near, tls_far = await tls_connection(pki)
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        async with listener, trio.open_nursery() as nursery:
            client, relay_plain = await tcp_pair(listener)
            nursery.start_soon(lambda: relay(relay_plain, tls_near, counters=RelayCounters()))

            async def send() -> None:
                await client.send_all(payload)
                await client.send_eof()

            nursery.start_soon(send)
            assert await read_exactly(tls_far, len(payload)) == payload
            await tls_far.send_eof()
            await client.aclose()
    # The count is checked before each write (up to 256 KiB, 17 records
    # counted): a key protects at most UPDATE_AFTER records plus one write's.
    assert watch.count >= 3


async def test_a_tls_stream_updates_its_keys(pki, monkeypatch):
    monkeypatch.setattr(tlskeys, "UPDATE_AFTER", 8)
    watch = KeyUpdatesRead(monkeypatch)
    payload = bytes(range(256)) * 4096
    with trio.fail_after(HANG):
        near, far = await tls_connection(pki)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(near.send_all, payload)
            assert await read_exactly(far, len(payload)) == payload
        await near.aclose()
        await far.aclose()
    assert watch.count >= 3  # before each chunk of 256 KiB but the first


async def test_an_update_due_after_the_last_write_does_not_block_the_close(pki, monkeypatch):
    # OpenSSL holds a connection "in init" from the moment an update is asked
    # for until the KeyUpdate is written; a close_notify asked for meanwhile
    # fails (SHUTDOWN_WHILE_IN_INIT). So the update is asked for right before
    # a write, never after the write that reached the count: here the last
    # chunk reaches it exactly, and the close must still go out.
    from gateway.net.tls import SEND_CHUNK

    monkeypatch.setattr(tlskeys, "UPDATE_AFTER", tlskeys.records(SEND_CHUNK))
    with trio.fail_after(HANG):
        near, far = await tls_connection(pki)
        async with trio.open_nursery() as nursery:

            async def send() -> None:
                await near.send_all(b"x" * SEND_CHUNK)
                await near.send_eof()

            nursery.start_soon(send)
            got = bytearray()
            while chunk := await far.receive_some(65536):
                got += chunk
        assert len(got) == SEND_CHUNK  # then the close_notify: a clean end
        await near.aclose()
        await far.aclose()


async def test_without_an_updater_a_connection_ends_before_its_key_wears_out(pki, monkeypatch, caplog):
    monkeypatch.setattr(tlskeys, "UPDATE_AFTER", 50)
    monkeypatch.setattr(tlskeys, "MAX_RECORDS", 120)
    monkeypatch.setattr(tlskeys, "key_updater", lambda obj: None)
    caplog.set_level(logging.WARNING)
    with trio.fail_after(HANG):
        async with linked(pki) as pair:
            near, far = loopback_pair()  # TCP: the cut is seen as a reset
            started = Started(pair.gateway, DialRequest(resource="r"), near)
            await pair.accepted["r"].wait()
            upstream = pair.upstreams["r"]
            with pytest.raises(trio.BrokenResourceError):
                for i in range(200):  # one record each way per message: past 120 on both sides
                    await far.send_all(b"%0100d" % i)
                    await read_exactly(upstream, 100)
                    await upstream.send_all(b"%0100d" % i)
                    await read_exactly(far, 100)
            assert "as many as it may, and could not get a new key" in await started.ended()
            await far.aclose()
    assert "tls_key_update_unavailable" in caplog.text


async def test_the_count_goes_on_when_the_engine_takes_a_connection_over(pki):
    # The records a TLSStream wrote before the relay engine took its
    # connection over (a dial, a PostgreSQL start-up) count against the key.
    from gateway.net.ends import detach, End

    with trio.fail_after(HANG):
        near, far = await tls_connection(pki)
        await near.send_all(b"x" * 100_000)  # 7 records
        assert await read_exactly(far, 100_000)
        written = near.records
        assert written >= 7
        sock, tls = detach(near)
        end = End(sock, "tls", tls, None)
        assert end.records == written
        sock.close()
        await far.aclose()

"""TLSStream over real loopback sockets, with a throwaway CA.

Each test builds its own connected pair through a listener on 127.0.0.1:0.
Nothing here sleeps: ordering comes from the data itself, from
``wait_all_tasks_blocked``, or from trio's own events; ``fail_after`` only
turns a hang into a failure.
"""

from __future__ import annotations

import hashlib
import random
import socket
import ssl
import struct
from contextlib import asynccontextmanager

import pytest
import trio
import trio.testing

from gateway.net.tls import DEFAULT_RECEIVE_SIZE, TLSStream
from gateway.net.tlsconnect import accept_tls, open_tls_connection
from tests.unit import tlsutil
from tests.unit.tlsutil import read_exactly, read_until_eof

HANG = 20  # seconds before a stuck test fails instead of hanging


@pytest.fixture(scope="module")
def server_ctx(pki):
    return tlsutil.server_context(pki)


@pytest.fixture(scope="module")
def client_ctx(pki):
    return tlsutil.client_context(pki)


async def connect_pair(
    server_ctx: ssl.SSLContext,
    client_ctx: ssl.SSLContext,
    *,
    session: ssl.SSLSession | None = None,
) -> tuple[TLSStream, TLSStream]:
    """(client, server), both handshaken over a fresh loopback connection."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    result: dict[str, TLSStream] = {}
    async with listener:
        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:

                async def server() -> None:
                    result["server"] = await accept_tls(await listener.accept(), server_ctx)

                nursery.start_soon(server)
                result["client"] = await open_tls_connection(
                    "127.0.0.1", port, client_ctx, server_hostname=tlsutil.SERVER_NAME,
                    session=session,
                )
    return result["client"], result["server"]


@asynccontextmanager
async def tls_pair(server_ctx, client_ctx, **kw):
    client, server = await connect_pair(server_ctx, client_ctx, **kw)
    try:
        with trio.fail_after(HANG):
            yield client, server
    finally:
        await client.aclose()
        await server.aclose()




def set_linger_zero(sock) -> None:
    """Make close() send a TCP RST instead of a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# ----------------------------------------------------------------------
# trio's own conformance suite for half-closeable streams.


async def test_trio_stream_conformance(server_ctx, client_ctx):
    async def maker():
        return await connect_pair(server_ctx, client_ctx)

    async def clogged_maker():
        client, server = await maker()
        # Fill both directions: sends that block, then cancelled. The stream
        # must stay usable (what was encrypted is kept and sent first).
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, b"x" * (16 * 1024 * 1024))
            nursery.start_soon(server.send_all, b"y" * (16 * 1024 * 1024))
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
        return client, server

    with trio.fail_after(60):
        await trio.testing.check_half_closeable_stream(maker, clogged_maker)


# ----------------------------------------------------------------------
# Handshake and introspection.


async def test_mutual_tls13_handshake_with_alpn(pki, server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        for stream in (client, server):
            assert stream.version() == "TLSv1.3"
            assert stream.selected_alpn_protocol() == tlsutil.ALPN
            assert stream.cipher()[1] == "TLSv1.3"
        assert server.server_side and not client.server_side
        assert server.getpeercert(binary_form=True) == pki.client_cert_der
        subject = dict(rdn[0] for rdn in client.getpeercert()["subject"])
        assert subject["commonName"] == tlsutil.SERVER_NAME
        assert isinstance(client.transport_stream, trio.SocketStream)
        # Idempotent.
        await client.do_handshake()
        await server.do_handshake()


async def test_server_without_client_cert_sees_none(pki):
    server_ctx = tlsutil.server_context(pki, require_client_cert=False)
    client_ctx = tlsutil.client_context(pki, with_cert=False)
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        assert server.getpeercert() is None
        await client.send_all(b"hi")
        assert await server.receive_some() == b"hi"


async def test_missing_client_cert_is_refused_with_an_alert(pki, server_ctx):
    client_ctx = tlsutil.client_context(pki, with_cert=False)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:

                async def server() -> None:
                    with pytest.raises(trio.BrokenResourceError) as info:
                        await accept_tls(await listener.accept(), server_ctx)
                    assert isinstance(info.value.__cause__, ssl.SSLError)

                nursery.start_soon(server)
                # In TLS 1.3 the client finishes first; the server's verdict
                # arrives as an alert on the client's first read.
                client = await open_tls_connection(
                    "127.0.0.1", port, client_ctx, server_hostname=tlsutil.SERVER_NAME
                )
                async with client:
                    with pytest.raises(trio.BrokenResourceError) as info:
                        await client.receive_some()
                    assert "CERTIFICATE_REQUIRED" in str(info.value)


async def test_tls12_peer_is_refused(pki, server_ctx):
    client_ctx = tlsutil.client_context(
        pki, minimum_version=ssl.TLSVersion.TLSv1_2, maximum_version=ssl.TLSVersion.TLSv1_2
    )
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:

                async def server() -> None:
                    tcp = await listener.accept()
                    with pytest.raises(trio.BrokenResourceError) as info:
                        await accept_tls(tcp, server_ctx)
                    assert "UNSUPPORTED_PROTOCOL" in str(info.value)
                    assert tcp.socket.fileno() == -1  # accept_tls closed it

                nursery.start_soon(server)
                with pytest.raises(trio.BrokenResourceError) as info:
                    await open_tls_connection(
                        "127.0.0.1", port, client_ctx, server_hostname=tlsutil.SERVER_NAME
                    )
                assert isinstance(info.value.__cause__, ssl.SSLError)


async def test_untrusted_server_is_refused(server_ctx, tmp_path):
    other = tlsutil.make_pki(tmp_path / "other")
    client_ctx = tlsutil.client_context(other)
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:

                async def server() -> None:
                    with pytest.raises(trio.BrokenResourceError, match="ALERT"):
                        await accept_tls(await listener.accept(), server_ctx)

                nursery.start_soon(server)
                with pytest.raises(trio.BrokenResourceError) as info:
                    await open_tls_connection(
                        "127.0.0.1", port, client_ctx, server_hostname=tlsutil.SERVER_NAME
                    )
                assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
                assert "CERTIFICATE_VERIFY_FAILED (" in str(info.value)


async def test_peer_hangs_up_during_handshake(client_ctx):
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        with trio.fail_after(HANG):
            async with trio.open_nursery() as nursery:

                async def server() -> None:
                    tcp = await listener.accept()
                    await tcp.receive_some()  # the ClientHello
                    await tcp.aclose()

                nursery.start_soon(server)
                with pytest.raises(trio.BrokenResourceError, match="during the TLS handshake"):
                    await open_tls_connection(
                        "127.0.0.1", port, client_ctx, server_hostname=tlsutil.SERVER_NAME
                    )


async def test_handshake_runs_implicitly_on_first_use(server_ctx, client_ctx):
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        with trio.fail_after(HANG):
            client = TLSStream(
                await trio.open_tcp_stream("127.0.0.1", port), client_ctx,
                server_side=False, server_hostname=tlsutil.SERVER_NAME,
            )
            server = TLSStream(await listener.accept(), server_ctx, server_side=True)
            async with client, server, trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, b"implicit")
                assert await server.receive_some() == b"implicit"


# ----------------------------------------------------------------------
# Data.


@pytest.mark.parametrize("size", [1, 100, 16383, 16384, 16385, 100_000])
async def test_round_trip_sizes(server_ctx, client_ctx, size):
    payload = random.Random(size).randbytes(size)
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        await client.send_all(payload)
        assert await read_exactly(server, size) == payload
        await server.send_all(payload[::-1])
        assert await read_exactly(client, size) == payload[::-1]


async def test_bulk_8mib_both_directions_at_once(server_ctx, client_ctx):
    rng = random.Random(8)
    up = rng.randbytes(8 * 1024 * 1024)
    down = rng.randbytes(8 * 1024 * 1024 + 17)
    received: dict[str, bytes] = {}

    async def sender(stream, data, chunk):
        view = memoryview(data)
        for start in range(0, len(view), chunk):
            await stream.send_all(view[start:start + chunk])
        await stream.send_eof()

    async def receiver(name, stream, max_bytes):
        received[name] = await read_until_eof(stream, max_bytes)

    async def receiver_into(name, stream):
        buf = bytearray(100_000)
        parts = []
        while n := await stream.receive_into(buf):
            parts.append(bytes(buf[:n]))
        received[name] = b"".join(parts)

    async with tls_pair(server_ctx, client_ctx) as (client, server):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender, client, up, 1_000_000)
            nursery.start_soon(sender, server, down, len(down))  # one huge send_all
            nursery.start_soon(receiver, "up", server, None)
            nursery.start_soon(receiver_into, "down", client)
    assert hashlib.sha256(received["up"]).digest() == hashlib.sha256(up).digest()
    assert hashlib.sha256(received["down"]).digest() == hashlib.sha256(down).digest()


async def test_receive_some_limits(server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        await client.send_all(b"abcdef")
        assert await server.receive_some(2) == b"ab"
        assert await server.receive_some(3) == b"cde"
        assert await server.receive_some() == b"f"
        # One call never returns more than DEFAULT_RECEIVE_SIZE.
        big = b"z" * (DEFAULT_RECEIVE_SIZE * 2)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.send_all, big)
            await trio.testing.wait_all_tasks_blocked()
            got = await server.receive_some(len(big))
            assert 0 < len(got) <= DEFAULT_RECEIVE_SIZE
            rest = await read_exactly(server, len(big) - len(got))
        assert got + rest == big
        with pytest.raises(ValueError):
            await server.receive_some(0)
        with pytest.raises(ValueError):
            await server.receive_into(bytearray())


async def test_cancelled_send_leaves_the_stream_consistent(server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.send_all, b"a" * (16 * 1024 * 1024))
                await trio.testing.wait_all_tasks_blocked()
                scope.cancel()
        received = []

        async def reader() -> None:
            received.append(await read_until_eof(server))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await client.send_all(b"Z" * 10)
            await client.send_eof()
        # Some prefix of the cancelled send went through, whole, then ours.
        data = received[0]
        assert data.endswith(b"Z" * 10)
        assert data[:-10] == b"a" * (len(data) - 10)


# ----------------------------------------------------------------------
# Half-close.


@pytest.mark.parametrize("first", ["client", "server"])
async def test_half_close_both_directions(server_ctx, client_ctx, first):
    async with tls_pair(server_ctx, client_ctx) as pair:
        a, b = pair if first == "client" else pair[::-1]
        await a.send_all(b"request")
        await a.send_eof()
        await a.send_eof()  # idempotent
        with pytest.raises(trio.ClosedResourceError):
            await a.send_all(b"more")
        assert await read_until_eof(b) == b"request"
        assert await b.receive_some() == b""  # and stays at EOF
        # b can still send, a can still receive.
        await b.send_all(b"reply")
        assert await read_exactly(a, 5) == b"reply"
        await b.send_all(b" and more")
        await b.send_eof()
        assert await read_until_eof(a) == b" and more"
        assert await a.receive_some() == b""


async def test_send_eof_also_ends_the_tcp_write_side(server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        await client.send_eof()
        assert await server.receive_some() == b""
        # Below TLS, the FIN follows the close_notify: a plain-TCP peer (a C
        # proxy relaying our stream) sees EOF too.
        assert await server.transport_stream.socket.recv(1) == b""


async def test_send_eof_after_the_peer_closed_and_left_is_fine(server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        await server.send_eof()
        set_linger_zero(server.transport_stream)
        await server.transport_stream.aclose()  # gone, with a reset
        assert await client.receive_some() == b""
        await client.send_eof()  # nothing to report: both directions are over
        assert await client.receive_some() == b""


async def test_send_eof_with_records_waiting_to_be_read(server_ctx, client_ctx):
    # OpenSSL's SSL_shutdown (behind SSLObject.unwrap) refuses to run while
    # complete application-data records wait in the incoming BIO; send_eof
    # must set them aside, and none of them may be lost.
    payload = random.Random(3).randbytes(300_000)
    async with tls_pair(server_ctx, client_ctx) as (client, server):

        async def server_side() -> None:
            await server.send_all(payload)
            assert await server.receive_some() == b""
            await server.send_all(b"after")
            await server.send_eof()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(server_side)
            # Leaves the rest waiting, part of it already decrypted.
            first = await client.receive_some(10)
            await client.send_eof()
            rest = await read_until_eof(client, 1000)
        assert first + rest == payload + b"after"


# ----------------------------------------------------------------------
# Ends: truncation, errors, close.


async def test_truncation_raises_broken_resource(server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        await server.send_all(b"last words")
        # Close the TCP connection under the TLS layer: no close_notify.
        await server.transport_stream.aclose()
        assert await read_exactly(client, 10) == b"last words"
        with pytest.raises(trio.BrokenResourceError, match="close_notify") as info:
            await client.receive_some()
        assert isinstance(info.value.__cause__, ssl.SSLEOFError)
        with pytest.raises(trio.BrokenResourceError):  # and it stays broken
            await client.receive_some()
        with pytest.raises(trio.BrokenResourceError):
            await client.send_all(b"x")


async def test_connection_reset_raises_broken_resource(server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        set_linger_zero(server.transport_stream)
        await server.transport_stream.aclose()
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.receive_some()
        assert isinstance(info.value.__cause__, ConnectionResetError)


async def test_corrupt_record_is_reported_to_both_sides(server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        # An application-data record whose authentication tag cannot match.
        body = b"\x00" * 40
        record = b"\x17\x03\x03" + struct.pack(">H", len(body)) + body
        await server.transport_stream.send_all(record)
        with pytest.raises(trio.BrokenResourceError) as info:
            await client.receive_some()
        assert isinstance(info.value.__cause__, ssl.SSLError)
        # The client's alert reached the server, which learns why.
        with pytest.raises(trio.BrokenResourceError, match="(?i)alert"):
            await server.receive_some()


async def test_aclose_sends_close_notify_and_is_idempotent(server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        await client.aclose()
        await client.aclose()
        assert client.transport_stream.socket.fileno() == -1
        assert await server.receive_some() == b""  # a clean EOF, not a truncation
        for op in (client.receive_some, client.send_eof, lambda: client.send_all(b"x")):
            with pytest.raises(trio.ClosedResourceError):
                await op()


async def test_aclose_with_unread_data_still_ends_cleanly(server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        await server.send_all(b"one")
        await server.send_all(b"two")
        await server.send_all(b"three")
        assert await client.receive_some(1) == b"o"
        await client.aclose()
        assert await server.receive_some() == b""


async def test_aclose_when_cancelled_still_closes(server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        with trio.CancelScope() as scope:
            scope.cancel()
            await client.aclose()
        assert client.transport_stream.socket.fileno() == -1
        assert await server.receive_some() == b""


async def test_aclose_wakes_a_blocked_receiver(server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):

        async def blocked_receiver() -> None:
            with pytest.raises(trio.ClosedResourceError):
                await client.receive_some()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(blocked_receiver)
            await trio.testing.wait_all_tasks_blocked()
            await client.aclose()


async def test_one_receiver_and_one_sender_at_a_time(server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        with pytest.RaisesGroup(trio.BusyResourceError):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(client.receive_some)
                nursery.start_soon(client.receive_some)
        # A receive and a send may run at the same time.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(server.receive_some)
            await trio.testing.wait_all_tasks_blocked()
            await server.send_all(b"while receiving")
            await client.send_all(b"x")
        assert await client.receive_some() == b"while receiving"


# ----------------------------------------------------------------------
# Session resumption.


async def test_session_resumption(server_ctx, client_ctx):
    async with tls_pair(server_ctx, client_ctx) as (client, server):
        assert not client.session_reused
        # TLS 1.3 tickets arrive after the handshake: the client must receive
        # something before its session is resumable.
        await server.send_all(b"hello")
        assert await client.receive_some() == b"hello"
        session = client.session
        assert session is not None and session.has_ticket
    async with tls_pair(server_ctx, client_ctx, session=session) as (client, server):
        assert client.session_reused
        assert server.session_reused
        await client.send_all(b"resumed")
        assert await server.receive_some() == b"resumed"

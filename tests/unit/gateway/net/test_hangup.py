"""A side that sent its EOF and then closed its socket (gateway/net/ends.py
``failed_quietly``): on a unix socket, the hang-up with no error is that
side ending the session (ssh's ProxyUseFdpass socket after ``ssh host
true``), so the session ends cleanly once the other side's EOF comes; a
hang-up with an error, bytes sent to the closed side, and a TCP peer's
failure stay failures."""

from __future__ import annotations

import select
import socket
import struct

import pytest
import trio

from gateway.net.engine import engine
from gateway.net.ends import _WATCH, End, Failure, failed_quietly, watch_mask
from tests.unit.gateway.net.relaypair import HANG, relayed
from tests.unit.tlsutil import read_until_eof


def _watched(sock: socket.socket) -> End:
    """An end as the engine holds one whose peer sent its EOF while we owe
    it ours: registered for errors only."""
    end = End(sock, "client", None, None)
    end.in_done = True
    assert watch_mask(end) == _WATCH
    end.mask = _WATCH
    return end


def _events(sock: socket.socket) -> int:
    poll = select.epoll()
    try:
        poll.register(sock.fileno(), _WATCH)
        return sum(ev for _fd, ev in poll.poll(5))
    finally:
        poll.close()


def test_a_unix_peer_that_closes_after_its_eof_hung_up_and_is_no_longer_watched():
    ours, theirs = socket.socketpair()
    with ours:
        theirs.shutdown(socket.SHUT_WR)
        theirs.close()
        end = _watched(ours)
        ev = _events(ours)
        assert ev & select.EPOLLHUP
        failed_quietly(end, ev)  # no Failure
        assert end.hung_up and not end.failed and end.os_error is None
        assert watch_mask(end) == 0  # unregistered: a level-triggered hang-up would spin


def test_a_unix_peer_that_closes_with_our_bytes_unread_is_a_failure():
    # It closed its socket with bytes it never read: the kernel says so
    # (ECONNRESET), and the session did not end cleanly.
    ours, theirs = socket.socketpair()
    with ours:
        ours.send(b"never read")
        theirs.close()
        end = _watched(ours)
        with pytest.raises(Failure, match="client: connection failed: Connection reset"):
            failed_quietly(end, _events(ours))
        assert end.failed and not end.hung_up


def test_a_reset_tcp_peer_is_a_failure_with_its_errno():
    listener = socket.create_server(("127.0.0.1", 0))
    with listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    with near:
        far.shutdown(socket.SHUT_WR)
        far.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        far.close()
        end = _watched(near)
        # (A reset after the peer's FIN reads as EPIPE, see test_engine.py.)
        with pytest.raises(Failure, match="client: connection failed: "):
            failed_quietly(end, _events(near))
        assert end.failed and end.os_error and not end.hung_up


async def _hung_up(fd: int) -> None:
    """Poll (with a deadline) until the engine saw the end on ``fd`` hang up."""
    with trio.fail_after(HANG):
        while not ((end := engine().ends.get(fd)) is not None and end.hung_up):
            await trio.sleep(0.01)


@pytest.mark.parametrize("server_sends", [False, True], ids=["server_eof", "server_writes_to_the_closed_client"])
async def test_a_client_that_closes_after_its_eof_ends_the_session(server_sends):
    # client (unix socket pair) -> [relay] -> server (TCP). The client sends
    # a request and its EOF and closes its socket at once (as ssh does);
    # the server reads it all and ends too: a clean end. Bytes the server
    # sends after the client closed can no longer be delivered: a failure.
    async with relayed(unix_client=True, close=False) as pair:
        client, server, stats = pair.client, pair.server, pair.stats
        await client.send_all(b"request")
        await client.send_eof()
        await client.aclose()
        assert await read_until_eof(server) == b"request"
        await _hung_up(pair.client_fd)
        if server_sends:
            await server.send_all(b"too late")  # the relay then resets the server
        else:
            await server.send_eof()
    if server_sends:
        assert stats[0].error.startswith("client: send failed: "), stats
    else:
        assert stats[0].error is None, stats
        assert await read_until_eof(server) == b""
    await server.aclose()

"""gateway/local/connect.py: how a failure to reach the cluster is worded,
and whether it may pass within seconds (what the wait room waits out)."""

from __future__ import annotations

import socket
import ssl
import struct

import pytest
import trio

from gateway.local.connect import ClusterError, _passing, _reason, connect_cluster


async def test_a_refused_connect_may_pass_and_says_why():
    # A real connect to a port nobody listens on: trio reports it as one
    # OSError without an errno; the cause is found in its attempts.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ClusterError) as info:
            await connect_cluster("127.0.0.1", port, ssl.create_default_context(), "localhost")
    assert info.value.passing
    assert info.value.message == (f"cannot reach the cluster at 127.0.0.1:{port}: Connection refused; "
                                  f"is `wicket-cluster start` running there?")


async def test_a_connection_cut_during_the_handshake_may_pass():
    # A cluster that is stopping drops the connections it had not accepted
    # yet: the handshake meets an EOF or a reset, which a restart ends.
    for linger in (False, True):
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()

            async def drop() -> None:
                await trio.lowlevel.wait_readable(listener)
                conn, _ = listener.accept()
                if linger:
                    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                conn.close()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(drop)
                with pytest.raises(ClusterError) as info:
                    await connect_cluster("127.0.0.1", listener.getsockname()[1], ssl.create_default_context(),
                                   "localhost")
        # (A reset may even come before the handshake's first read: a
        # connect error then, and one that may pass all the same.)
        assert info.value.passing, info.value.message


def test_resolver_errors_are_in_the_resolvers_words():
    assert _reason(socket.gaierror(socket.EAI_NONAME, "Name or service not known")) == "Name or service not known"
    assert not _passing(socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    assert _passing(socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution"))
    assert _reason(ConnectionRefusedError(111, "Error connecting to ('h', 1): Connection refused")) == \
        "Connection refused"

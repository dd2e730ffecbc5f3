"""gateway/net/tcp.py: what the kernel says of a connection's peer."""

from __future__ import annotations

import socket
import struct
import time

import trio

from gateway.net.tcp import peer_left


def test_a_peer_that_left_is_told_from_one_that_only_half_closed():
    def until(predicate) -> None:
        deadline = time.monotonic() + 10  # what the peer did is on its way through loopback
        while not predicate():
            assert time.monotonic() < deadline

    with socket.create_server(("127.0.0.1", 0)) as listener:
        def pair():
            a = socket.create_connection(listener.getsockname())
            b, _ = listener.accept()
            return a, b

        a, b = pair()
        with a, b:
            assert not peer_left(b, eof=True)  # quiet
            a.sendall(b"x")
            a.shutdown(socket.SHUT_WR)
            # Its FIN (after data, or after a TLS close_notify) counts where
            # asked for, and nothing was taken from the socket.
            until(lambda: peer_left(b, eof=True))
            assert not peer_left(b, eof=False) and b.recv(1) == b"x"
        a, b = pair()
        with trio.socket.from_stdlib_socket(b) as b:  # a trio socket too
            a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            a.close()  # a reset
            until(lambda: peer_left(b, eof=False))
    a, b = socket.socketpair()  # not TCP: the socket itself is asked
    with a, b:
        assert not peer_left(b, eof=True)
        a.shutdown(socket.SHUT_WR)
        assert peer_left(b, eof=True) and not peer_left(b, eof=False)

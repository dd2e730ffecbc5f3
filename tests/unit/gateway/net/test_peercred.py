"""Who is on the other end: the kernel's answer for unix and loopback TCP
peers, and the listener's rule on it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest

from gateway.net import peercred
from gateway.net.peercred import LocalUsers, PeerUnknown, peer_uid

NOBODY = 65534
as_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")


def accepted(family: int, host: str, *, listener_family: int | None = None, dual: bool = False):
    listener = socket.socket(listener_family or family)
    if dual:
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.bind((host if not dual else "::", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1" if dual else host, port))
    server, _ = listener.accept()
    listener.close()
    return client, server


def test_a_loopback_tcp_peer_is_this_uid():
    client, server = accepted(socket.AF_INET, "127.0.0.1")
    with client, server:
        assert peer_uid(server) == os.getuid()
        assert LocalUsers().refusal(server) is None


def test_ipv6_and_a_dual_stack_listener():
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        client, server = accepted(socket.AF_INET6, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with client, server:
        assert peer_uid(server) == os.getuid()
    # An IPv4 client of a dual-stack listener looks v4-mapped from our side.
    client, server = accepted(socket.AF_INET, "", listener_family=socket.AF_INET6, dual=True)
    with client, server:
        assert server.getpeername()[0].startswith("::ffff:")
        assert peer_uid(server) == os.getuid()


def test_a_unix_peer():
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_uid(b) == os.getuid()


def test_many_lookups_reuse_one_netlink_socket():
    client, server = accepted(socket.AF_INET, "127.0.0.1")
    with client, server:
        for _ in range(200):
            assert peer_uid(server) == os.getuid()
    assert peercred._local.netlink is not None


def test_a_peer_that_is_gone_is_unknown():
    client, server = accepted(socket.AF_INET, "127.0.0.1")
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
    client.close()  # a reset: the client's socket no longer exists
    with server:
        with pytest.raises(PeerUnknown):
            peer_uid(server)
        assert "could not be determined" in LocalUsers().refusal(server)
    assert LocalUsers(anyone=True).refusal(server) is None


@as_root
def test_another_local_user_is_refused_unless_allowed():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    # A process of uid "nobody" connects and waits for us to hang up.
    child = subprocess.Popen(
        [sys.executable, "-c", f"import os, socket; os.setgid({NOBODY}); os.setuid({NOBODY}); "
         f"s = socket.socket(); s.connect(('127.0.0.1', {port})); s.recv(1)"])
    try:
        listener.settimeout(30)
        server, _ = listener.accept()
        with server:
            assert peer_uid(server) == NOBODY
            refusal = LocalUsers(uids=frozenset({12345})).refusal(server)
            assert f"uid {NOBODY}" in refusal and f"--allow-uid {NOBODY}" in refusal
            assert LocalUsers(uids=frozenset({12345, NOBODY})).refusal(server) is None
            assert LocalUsers(uids=frozenset({12345}), anyone=True).refusal(server) is None
    finally:
        listener.close()
        child.wait(timeout=30)


def test_root_and_remote_peers_pass(monkeypatch):
    client, server = accepted(socket.AF_INET, "127.0.0.1")
    with client, server:
        monkeypatch.setattr(peercred, "peer_uid", lambda sock: 0)
        assert LocalUsers(uids=frozenset({12345})).refusal(server) is None
        monkeypatch.setattr(peercred, "peer_uid", lambda sock: None)
        assert LocalUsers(uids=frozenset({12345})).refusal(server) is None

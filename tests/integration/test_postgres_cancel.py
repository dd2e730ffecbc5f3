"""PostgreSQL end to end: cancel requests (forged keys, another user's
session, a cancel that must wait for the query it follows)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.integration.pgclients import _gateway, dsn
from tests.integration.pgenv import need_postgres

need_postgres()
psycopg = pytest.importorskip("psycopg")


def test_forged_cancel_cancels_nothing(pg_port):
    """A CancelRequest with a key this gateway did not hand out is ignored."""
    with psycopg.connect(dsn(pg_port)) as conn:
        pid = conn.info.backend_pid
        t = threading.Timer(0.2, lambda: _send_cancel(pg_port, pid, b"\x00\x01\x02\x03"))
        t.start()
        assert conn.execute("select pg_sleep(1), 'done'").fetchone()[1] == "done"
        t.join()


def _send_cancel(port: int, pid: int, secret: bytes) -> None:
    import socket
    import struct

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(struct.pack(">IIi", 16, 80877102, pid) + secret)
        s.recv(10)


async def test_cancel_of_another_users_session_is_refused(pg_env, gw, tmp_path):
    """The cluster lets only a session's owner cancel it."""
    from gateway import kinds
    from gateway.local.dialer import Dialer, DialRefused
    from gateway.local.profile import Profile
    from protocols.dial import DialRequest
    from protocols.errors import ErrorCode

    cluster, _ = pg_env
    intruder = _gateway(cluster, tmp_path, "pg")
    try:
        dialer = Dialer(Profile.load(intruder.home), kinds.POSTGRES.alpn)
        with pytest.raises(DialRefused) as err:
            await dialer.dial(DialRequest(resource="pg", params={"cancel": "0123456789abcdef"}))
        assert err.value.error.code is ErrorCode.ACCESS_DENIED
    finally:
        intruder.stop()


class SlowServer:
    """Just enough of a PostgreSQL server to log in (trust) and take one
    query, read slowly (64 KiB every 10 ms) so that the relays hold the rest
    of it; and a CancelRequest, noting how much of the query had arrived
    (read, or waiting in the socket) when the cancel came."""

    PID, SECRET = 4242, b"s3cr"

    def __init__(self, query_size: int) -> None:
        self.query_size = query_size
        # A small receive buffer: the cluster's kernel holds the rest of the
        # query, written but not yet taken, when the cancel comes.
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.received = 0
        self.at_cancel: list[tuple[int, bool]] = []  # (query bytes by then, key right)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        from protocols.postgres import AuthenticationOk, BackendKeyData, ReadyForQuery

        session, _ = self.listener.accept()
        startup_len = int.from_bytes(session.recv(4, socket.MSG_WAITALL), "big")
        session.recv(startup_len - 4, socket.MSG_WAITALL)
        session.sendall(AuthenticationOk().encode() + BackendKeyData(process_id=self.PID, secret_key=self.SECRET)
                        .encode() + ReadyForQuery(status="I").encode())
        self.listener.settimeout(0.01)
        deadline = time.monotonic() + 60
        while self.received < self.query_size + 5 and time.monotonic() < deadline:
            with self.lock:
                data = session.recv(65536)
                if not data:
                    break
                self.received += len(data)
            try:
                cancel, _ = self.listener.accept()
            except TimeoutError:
                continue
            with self.lock:
                session.setblocking(False)
                try:  # what had arrived when the cancel came: read, and in the socket
                    while data := session.recv(1 << 20):
                        self.received += len(data)
                except BlockingIOError:
                    pass
                session.setblocking(True)
            packet = cancel.recv(16, socket.MSG_WAITALL)
            self.at_cancel.append((self.received, packet[8:] == self.PID.to_bytes(4, "big") + self.SECRET))
            cancel.close()
        session.close()


def test_a_cancel_waits_for_the_query_it_follows(pg_env, gw):
    """A cancel sent right after its query reaches the server only once every
    byte of the query has been written to the server's socket, however slowly
    the server reads: the gateway sends it behind the session's bytes, and the
    cluster waits until they are written. The client gets the server's real
    process id; the secret it quotes is not the server's, yet the server
    gets the real one."""
    from protocols.postgres import CancelRequest, StartupMessage, StartupRelay

    cluster, _ = pg_env
    query = b"select 1 -- " + b"x" * (1536 * 1024)
    server = SlowServer(len(query) + 1)
    cluster.admin("resources", "add", "pg-slow", "--kind", "postgres", "--address", server.address,
                  "--tls", "disable", "--auth", "password", "--password-ref", "app=env:WICKET_TEST_PG_PW")
    _, port = gw.proxy("db", "pg-slow")
    with socket.socket() as client:
        # A big send buffer: sendall returns while much of the query still
        # waits in this kernel for the gateway to read it. It was sent, so
        # the cancel must still come after it.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        client.connect(("127.0.0.1", port))
        client.sendall(StartupMessage(parameters={"user": "app", "database": "app"}).encode())
        startup = StartupRelay(None)
        client.settimeout(30)
        while not startup.done:
            startup.feed(client.recv(65536))
        key = startup.upstream_key
        assert key.process_id == SlowServer.PID and key.secret_key != SlowServer.SECRET
        client.sendall(b"Q" + (len(query) + 5).to_bytes(4, "big") + query + b"\0")  # written: in the kernel
        with socket.create_connection(("127.0.0.1", port)) as cancel:
            cancel.sendall(CancelRequest(process_id=key.process_id, secret_key=key.secret_key).encode())
            cancel.settimeout(30)
            assert cancel.recv(1) == b""  # the gateway closes once the cluster answered
        server.thread.join(60)
    assert server.at_cancel == [(len(query) + 6, True)]

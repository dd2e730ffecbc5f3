"""gateway.local.ssh_asyncio: ending a local client's connection when the
cluster cuts its session."""

from __future__ import annotations

import asyncssh

from gateway.local.ssh_asyncio import GatewayServer


class _ClosedChannel:
    """What asyncssh's channel does once the client has closed it."""

    def write_stderr(self, data: bytes) -> None:
        raise BrokenPipeError("Channel not open for sending")

    def exit(self, status: int) -> None:
        raise BrokenPipeError("Channel not open for sending")


class _Session:
    closed = False
    chan = _ClosedChannel()


class _Conn:
    disconnected: tuple[int, str] | None = None

    def disconnect(self, code: int, message: str) -> None:
        self.disconnected = (code, message)


def test_a_cut_after_the_client_closed_its_channel_still_ends_the_connection():
    # The client (ssh) has gone, its channel closed, while the stream was
    # still open; the cluster then cuts it (it stopped). Nothing raises:
    # once this escaped and took the whole SSH server down with it.
    server = GatewayServer(None, None, "127.0.0.1:1")
    server.conn = _Conn()
    server.sessions.add(_Session())
    server._cut("cluster: reset the stream: cancelled")
    assert server.ended
    assert server.conn.disconnected == (asyncssh.DISC_BY_APPLICATION,
                                        "wicket: the session was cut: cluster: reset the stream: cancelled")

"""gateway/local/proxy.py's TcpProxy starting a session again after its
connection died before the cluster saw it: the second attempt carries the
client's first arrival, so `wicket agent`'s dial histogram times the dial
from then, not from the retry. The connections are small fakes that
record what ``MuxLink.start`` was given (and the first hands the socket
back at once, as a dead connection does); the real retry is in
tests/unit/gateway/net/test_muxlink_retry.py and
tests/integration/test_tcp_cluster_restarts.py."""

from __future__ import annotations

import socket

import trio

from gateway.local.proxy import TcpProxy


class FakeLink:
    def __init__(self, dead: bool) -> None:
        self.dead = dead
        self.starts: list[dict] = []
        self.failed = None

    def start(self, request, sock, counters, notify, **kw):
        self.starts.append(kw)
        if self.dead:  # the connection was already gone: the session comes back
            kw["retry"](sock, kw["early"], kw["early_fin"], "reset by the cluster's host")
        return None

    def __len__(self) -> int:
        return 0


class FakeDialer:
    def __init__(self, *links: FakeLink) -> None:
        self.links = list(links)
        self._link = None

    def ready_link(self):
        return self.links.pop(0)

    async def link(self):
        return self.links.pop(0)

    def check_fresh(self) -> None:
        pass


async def test_a_retried_session_is_timed_from_the_clients_first_arrival():
    dead, alive = FakeLink(dead=True), FakeLink(dead=False)
    proxy = TcpProxy(None, "echo", dialer=FakeDialer(dead, alive))
    a, b = socket.socketpair()
    try:
        async with trio.open_nursery() as nursery:
            proxy._token, proxy._nursery = trio.lowlevel.current_trio_token(), nursery
            proxy._on_accept(b, ("127.0.0.1", 5555))
            with trio.fail_after(10):
                while not alive.starts:
                    await trio.sleep(0.001)
        first, again = dead.starts[0], alive.starts[0]
        assert first["retry"] is not None and again["retry"] is None  # once only
        assert again["arrived"] == first["arrived"]
        assert proxy.started == 1
    finally:
        a.close()
        b.close()

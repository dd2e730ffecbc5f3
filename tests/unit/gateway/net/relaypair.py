"""The scaffolding the relay tests share (test_engine.py, test_hangup.py,
test_filters.py): a client and a server joined by a relay running in a
nursery for the block, over TCP on loopback or a unix socket pair."""

from __future__ import annotations

import contextlib
from typing import AsyncIterator

import attrs
import trio

from gateway.net.relay import relay

#: Seconds after which a test that waits for the relay has hung.
HANG = 60


async def tcp_pair(listener) -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected (near, far) pair of TCP streams through ``listener``."""
    port = listener.socket.getsockname()[1]
    near = await trio.open_tcp_stream("127.0.0.1", port)
    far = await listener.accept()
    return near, far


def unix_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of unix stream sockets (the engine takes any)."""
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


@attrs.define
class Relayed:
    """A running relay's two outer sides; ``stats`` gets its RelayStats;
    ``client_fd``: the relay's descriptor of the client's side."""

    client: trio.SocketStream
    server: trio.SocketStream
    nursery: trio.Nursery
    client_fd: int
    stats: list = attrs.field(factory=list)


@contextlib.asynccontextmanager
async def relayed(*, tcp: bool = True, unix_client: bool = False, names: tuple[str, str] = ("client", "server"),
                  close: bool = True, **kwargs) -> AsyncIterator[Relayed]:
    """client <-> [relay(..., **kwargs)] <-> server for the block (at most
    HANG seconds): over TCP on loopback (``tcp``), else unix socket pairs;
    ``unix_client``: the client's side a unix pair, the server's TCP. The
    outer sides are closed after it (unless not ``close``)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener:
        client, relay_a = unix_pair() if unix_client or not tcp else await tcp_pair(listener)
        relay_b, server = await tcp_pair(listener) if tcp else unix_pair()
    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            pair = Relayed(client, server, nursery, relay_a.socket.fileno())

            async def run_relay() -> None:
                async with relay_a, relay_b:
                    pair.stats.append(await relay(relay_a, relay_b, names=names, **kwargs))

            nursery.start_soon(run_relay)
            yield pair
    if close:
        for side in (client, server):
            await side.aclose()

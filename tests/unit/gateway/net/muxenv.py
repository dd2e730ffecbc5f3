"""What the muxlink tests share: socket pairs, a linked gateway and cluster
over real TLS on loopback (``linked``), and a hand-driven gateway (``RawGateway``)."""

from __future__ import annotations

import collections
import contextlib
import socket

import trio

from gateway.net.engine import engine
from gateway.net.muxlink import LinkClosed, MuxLink
from gateway.net.relay import RelayCounters
from protocols.dial import DialAccept, DialError, DialRequest
from protocols.errors import ErrorCode
from protocols.mux import Role
from tests.unit.gateway.net.test_engine import tcp_pair, tls_connection, tls_pair


HANG = 60


def socket_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of stream sockets (AF_UNIX: the engine takes any)."""
    a, b = trio.socket.socketpair()
    return trio.SocketStream(a), trio.SocketStream(b)


def loopback_pair() -> tuple[trio.SocketStream, trio.SocketStream]:
    """A connected pair of TCP sockets on loopback: unlike AF_UNIX, a reset
    (an aborted stream) is seen as one."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return tuple(trio.SocketStream(trio.socket.from_stdlib_socket(s)) for s in (a, b))


class Started:
    """A gateway stream started from trio on ``sock`` (which the link
    takes over), as `wicket proxy tcp` starts one from the engine's thread;
    ``await ended()`` returns the error that ended it, or None."""

    def __init__(self, link: MuxLink, request: DialRequest, sock: trio.SocketStream) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self.event = trio.Event()
        self.counters = RelayCounters()
        raw = socket.socket(fileno=sock.socket.detach())
        raw.setblocking(False)
        try:
            self.stream = link.start(request, raw, self.counters, self._notify, reply_timeout=HANG)
        except LinkClosed:
            raw.close()
            raise

    def _notify(self, link: MuxLink, stream) -> None:  # any thread
        self.token.run_sync_soon(self.event.set)

    async def ended(self) -> str | None:
        await self.event.wait()
        return self.stream.error


class Pair:
    """Both ends of one link, plus what the cluster side did."""

    #: Message filters (gateway/net/filters.py) for the cluster's side, by resource.
    filtered: dict = {}

    def __init__(self, nursery: trio.Nursery, listener, gateway_tls, cluster_tls) -> None:
        self.listener = listener
        self.nursery = nursery
        self.token = trio.lowlevel.current_trio_token()
        self.upstreams: dict[str, trio.SocketStream] = {}
        self.accepted: dict[str, trio.Event] = collections.defaultdict(trio.Event)
        self.results: dict[str, str | None] = {}
        self.cluster_counters: dict[str, RelayCounters] = {}
        self.taps: dict[str, tuple] = {}  # the cluster's taps for a resource's sessions
        self.cluster_streams: dict[str, object] = {}
        self.cluster = MuxLink(engine(), cluster_tls, Role.CLUSTER, name="gateway", socket_name="upstream",
                               on_open=self.on_open)
        self.gateway = MuxLink(engine(), gateway_tls, Role.GATEWAY, name="cluster", socket_name="client")

    def on_open(self, link, stream, request: DialRequest) -> None:  # the engine's thread
        self.token.run_sync_soon(self.nursery.start_soon, self.decide, stream, request)

    async def decide(self, stream, request: DialRequest) -> None:
        if request.params.get("control"):  # a control dial: the answer is all
            self.cluster.answer(stream, DialAccept(session_id="-"))
            return
        if request.resource == "nope":
            self.cluster.refuse(stream, DialError(code=ErrorCode.ACCESS_DENIED, message="not you"))
            return
        near, far = loopback_pair()
        self.upstreams[request.resource] = far
        counters = self.cluster_counters[request.resource] = RelayCounters()
        self.cluster_streams[request.resource] = stream
        if self.cluster.accept(stream, DialAccept(session_id=request.resource), near, counters,
                               taps=self.taps.get(request.resource, (None, None)),
                               filtered=self.filtered.get(request.resource)):
            self.accepted[request.resource].set()
            self.results[request.resource] = await self.cluster.wait(stream)

    async def close(self) -> None:
        """End the link from the gateway's side and wait until both sides
        let go of their sockets."""
        self.gateway.close("test over")
        with trio.fail_after(HANG):
            await self.gateway.closed.wait()
            await self.cluster.closed.wait()
        for upstream in self.upstreams.values():
            await upstream.aclose()

    async def session(self, resource: str, *, tcp: bool = False, accepted: bool = True):
        """(client socket, Started) for a session; waits until the cluster
        side accepted it unless ``accepted`` is False. ``tcp`` for a real TCP
        client (one that can send a reset)."""
        near, far = await tcp_pair(self.listener) if tcp else socket_pair()
        started = Started(self.gateway, DialRequest(resource=resource), near)
        if accepted:
            await self.accepted[resource].wait()
        return far, started


@contextlib.asynccontextmanager
async def linked(pki):
    """Both ends of a fresh link over loopback (a :class:`Pair`); closed,
    with every upstream, when the block ends (a link a test closed already
    is left as it is)."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    async with listener, trio.open_nursery() as nursery:
        gw_tls, cl_tls = await tls_pair(pki, listener)
        pair = Pair(nursery, listener, gw_tls, cl_tls)
        yield pair
        await pair.close()
        nursery.cancel_scope.cancel()


class RawGateway:
    """A cluster-side MuxLink driven by a hand-made gateway: the test writes
    the frames (``gw`` makes them) and owns the upstream ends."""

    def __init__(self, peer, link: MuxLink, gw, sids: list[int], upstreams: list, ended: list) -> None:
        self.peer, self.link, self.gw, self.sids, self.upstreams, self.ended = peer, link, gw, sids, upstreams, ended

    @classmethod
    async def open(cls, pki, streams: int, *, sndbuf: int | None = None, tcp: bool = False) -> "RawGateway":
        """``tcp``: the upstreams are TCP connections, which can tell a reset
        from an EOF (else AF_UNIX pairs)."""
        from protocols.mux import NEED_DATA, MuxConnection, StreamReplied

        peer, cl_tls = await tls_connection(pki)
        opened: list = []
        ended: list = []
        link = MuxLink(engine(), cl_tls, Role.CLUSTER, name="gateway", socket_name="upstream",
                       on_open=lambda _link, stream, _request: opened.append(stream))
        gw = MuxConnection(Role.GATEWAY)
        sids = [gw.send_open(DialRequest(resource=f"r{i}")) for i in range(streams)]
        await peer.send_all(b"".join(frame for _, frame in sids))
        while len(opened) < streams:
            await trio.sleep(0.01)
        upstreams = []
        for stream in opened:
            near, far = loopback_pair() if tcp else socket_pair()
            if sndbuf is not None:
                near.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
            stream.notify = lambda _link, st: ended.append((st.sid, st.error))
            assert link.accept(stream, DialAccept(session_id="s"), near, RelayCounters())
            upstreams.append(far)
        replied = 0
        while replied < streams:  # the gateway side may send the whole window from here on
            gw.receive_data(await peer.receive_some(65536))
            while (event := gw.next_event()) is not NEED_DATA:
                replied += isinstance(event, StreamReplied)
        return cls(peer, link, gw, [sid for sid, _ in sids], upstreams, ended)

    async def close(self) -> None:
        self.link.close("test over")
        await self.peer.aclose()
        for far in self.upstreams:
            await far.aclose()


async def held_becomes(link: MuxLink, value: int) -> None:
    """Until the link holds ``value`` bytes for its streams' sockets (read
    under the engine's lock: it counts after the bytes move)."""
    while True:
        with link.engine.lock:
            if link.held == value:
                return
        await trio.sleep(0.01)

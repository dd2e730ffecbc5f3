"""The cluster deciding a multiplexed dial in the relay engine's thread
(gateway/cluster/enginedial.py, ``start_in_engine``), over a real pair of links:
what happens between the decision and the upstream's connect. The checks
themselves (gateway/cluster/reach.py) and the trio path are tested end to end in
tests/integration/test_tcp_route.py; here the cluster is a small stand-in
with the same session and audit calls."""

from __future__ import annotations

import socket
import time
import types

import attrs
import pytest
import trio

from gateway.cluster import enginedial
from gateway.cluster.routekind import connect_tcp
from gateway.cluster.core import LiveSession
from gateway.net.engine import engine
from gateway.net.muxlink import MuxLink
from protocols.dial import DialRequest
from protocols.mux import Role
from tests.unit.gateway.net.test_engine import tcp_pair, tls_connection
from tests.unit.gateway.net.muxenv import HANG, Started
from tests.unit.tlsutil import read_until_reset


@attrs.define
class StandIn:
    """What start_in_engine uses of a Cluster."""

    sessions: dict = attrs.Factory(dict)
    events: list = attrs.Factory(list)
    engine_connects: set = attrs.Factory(set)

    def fresh_snapshot(self):
        return types.SimpleNamespace(resources={})  # the checks are stubbed; no resource of another kind

    def new_session(self, user, resource, kind) -> LiveSession:
        session = LiveSession(id=f"s{len(self.events)}", user=user, resource=resource, kind=kind,
                              started=time.time(), cancel_scope=trio.CancelScope())
        self.sessions[session.id] = session
        return session

    def end_session(self, session) -> None:
        self.sessions.pop(session.id, None)

    def audit_soon(self, event, user, **fields) -> None:
        self.events.append((event, fields))


@attrs.define
class EngineDial:
    """One mux dial decided by start_in_engine (checks stubbed: alice may
    reach ``resource``): both links, the gateway's session, its client."""

    cluster: StandIn
    cluster_link: MuxLink
    gateway_link: MuxLink
    started: Started
    client: trio.SocketStream

    @classmethod
    async def open(cls, pki, monkeypatch, resource) -> "EngineDial":
        def authorize(cluster, snap, cert, request, kind, audit):
            audit.user = "alice"
            return None, resource, {}, types.SimpleNamespace(reason="allowed by role 'dev'")

        monkeypatch.setattr(enginedial, "authorize", authorize)
        cluster = StandIn()
        gw_tls, cl_tls = await tls_connection(pki)

        def on_open(link, stream, request) -> None:  # the engine's thread
            assert enginedial.start_in_engine(cluster, link, stream, request, b"cert", "gw")

        cluster_link = MuxLink(engine(), cl_tls, Role.CLUSTER, name="gateway", socket_name="upstream",
                               on_open=on_open)
        gateway_link = MuxLink(engine(), gw_tls, Role.GATEWAY, name="cluster", socket_name="client")
        # Over TCP, so that an abort is visible to the client as a reset.
        listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
        async with listener:
            near, client = await tcp_pair(listener)
        started = Started(gateway_link, DialRequest(resource=resource.name), near)
        return cls(cluster, cluster_link, gateway_link, started, client)

    async def close(self) -> None:
        await self.client.aclose()
        self.gateway_link.close("test over")
        with trio.fail_after(HANG):
            await self.cluster_link.closed.wait()


async def test_a_lock_while_the_upstream_connects_cuts_the_session(pki, monkeypatch):
    eng = engine()
    connects: list = []
    monkeypatch.setattr(eng, "connect", lambda family, address, timeout, done: connects.append(done))
    d = await EngineDial.open(pki, monkeypatch, types.SimpleNamespace(name="echo", address="127.0.0.1:9",
                                                                      labels={}))
    with trio.fail_after(HANG):
        while not connects:  # the OPEN reached the cluster; its connect is "in flight"
            await trio.sleep(0.01)
        (session,) = d.cluster.sessions.values()
        session.cancel("user_locked")  # what watch_locks does, from trio's thread
        assert "user_locked" in await d.started.ended()  # the gateway got the RESET
        assert await read_until_reset(d.client) == b""
        with socket.create_server(("127.0.0.1", 0)) as server:
            upstream = socket.create_connection(server.getsockname())
            far, _ = server.accept()
        with eng.lock:
            connects[0](upstream, None)  # the connect completes after all
    assert upstream.fileno() == -1  # never relayed, and reset: the upstream saw a cut, not an end
    with pytest.raises(ConnectionResetError):
        far.recv(1)
    assert [e for e, _ in d.cluster.events] == ["dial.allowed", "session.start", "session.end"]
    assert d.cluster.events[-1][1]["reason"] == "user_locked"
    assert not d.cluster.sessions and not len(d.cluster_link)
    far.close()
    await d.close()


async def test_a_connect_given_up_at_shutdown_is_on_record_at_once(pki, monkeypatch):
    # The upstream neither answers nor refuses (a full accept queue). When
    # the cluster stops it gives up on the connect, and the dial is audited
    # then, before the audit log's last flush, not whenever the connect
    # would have timed out.
    from tests.unit.gateway.net.test_engine import full_listener

    listener, fillers = full_listener()
    host, port = listener.getsockname()
    d = await EngineDial.open(pki, monkeypatch, types.SimpleNamespace(name="slow", address=f"{host}:{port}",
                                                                      labels={}))
    with trio.fail_after(HANG):
        while not d.cluster.engine_connects:
            await trio.sleep(0.01)
        for session in list(d.cluster.sessions.values()):  # as the server stops
            session.cancel("cluster_stopping")
        enginedial.abandon_engine_connects(d.cluster)
        assert [(e, f["code"], f["reason"]) for e, f in d.cluster.events] == [
            ("dial.denied", "upstream_unreachable", "cluster_stopping")]
        assert not d.cluster.engine_connects and not d.cluster.sessions
        assert "cluster_stopping" in await d.started.ended()
    await d.close()
    listener.close()
    for s in fillers:
        s.close()


def keepalive_of(sock) -> tuple[int, int]:
    return (sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE))


async def test_upstream_connections_are_probed_when_quiet(pki, monkeypatch):
    # Both ways of connecting an upstream (the engine's, for an IP literal,
    # and trio's, for a name) turn keepalive on: a server that vanished ends
    # its session instead of holding it forever (gateway/net/tcp.py).
    from gateway.net import tcp

    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    port = listener.socket.getsockname()[1]
    async with listener:
        d = await EngineDial.open(pki, monkeypatch, types.SimpleNamespace(name="up", address=f"127.0.0.1:{port}",
                                                                          labels={}))
        with trio.fail_after(HANG):
            upstream = await listener.accept()
            while not len(d.cluster_link) or next(iter(d.cluster_link.streams.values())).end is None:
                await trio.sleep(0.01)
        (stream,) = d.cluster_link.streams.values()
        assert keepalive_of(stream.end.sock) == (1, tcp.KEEPALIVE_IDLE)
        # No user timeout there: a server may stop reading for as long as it likes.
        assert stream.end.sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 0
        await upstream.aclose()
        await d.close()

        by_name = await connect_tcp(types.SimpleNamespace(name="named", address=f"localhost:{port}"))
        async with by_name:
            assert keepalive_of(by_name.socket) == (1, tcp.KEEPALIVE_IDLE)
            (await listener.accept()).socket.close()

"""The cluster's multiplexed route (``wicket-mux``, protocols/mux.py): one
gateway connection whose streams are dials for resources of every kind.

Theory of operation
-------------------
Each OPEN is decided exactly as a dial on its own connection
(gateway/cluster/dial.py: the same checks, audit events and session
bookkeeping), with the connection's certificate as it stands: the one it
was opened with, or the one it was renewed with since
(gateway/cluster/linkrenewal.py, whose dials for ``@link`` are handed over
first). A tcp stream is decided and its upstream connected in the relay
engine's thread when it can be (gateway/cluster/enginedial.py: a fresh access
snapshot, a literal address, room for the session), so a session costs no
trio task; the others go through trio (the kind's ``open``: PostgreSQL's
TLS and login), then the engine relays them. A control dial that acts on a
session of this connection (a cancel) waits until the bytes that came for
that session before it reached the upstream (:func:`_after`).

The connection lives until its certificate's end (a renewal moves it);
then its sessions that a kind can interrupt upstream are cut that way
first, and the connection closes with the rest. One without a valid
certificate lives only long enough to answer its first dial with the
typed refusal.
"""

from __future__ import annotations

import logging
import socket
from typing import Mapping

import trio

from gateway import kinds
from gateway.cluster.core import Cluster
from gateway.cluster.dial import DIAL_TIMEOUT, UNAUTHENTICATED_STREAMS, decide, run_session
from gateway.cluster.dialaudit import refuse_over_cap
from gateway.cluster.enginedial import EngineSession, start_in_engine
from gateway.cluster.linkrenewal import LinkCredential, on_link_dial
from gateway.cluster.routekind import TCP, UPSTREAM, RouteKind
from gateway.identity import pki
from gateway.identity.pki import utcnow
from gateway.net.engine import eligible, engine
from gateway.net.muxlink import MAX_STREAMS, MuxLink, Stream
from gateway.net.relay import RelayCounters
from gateway.net.tcp import unacknowledged
from gateway.net.tls import TLSStream
from protocols import linkrenewal
from protocols.dial import DialAccept, DialError, DialRequest
from protocols.errors import ErrorCode
from protocols.mux import Role as MuxRole

__all__ = ["handle_mux"]

log = logging.getLogger("wicket.cluster.dial")


async def handle_mux(cluster: Cluster, stream: TLSStream, *, client_addr: str) -> None:
    """Serve a multiplexed connection (protocols/mux.py): each stream is a
    dial for a resource of any kind (gateway/kinds.py), decided and audited
    exactly as on its own connection. A tcp stream is started in the relay
    engine's thread when it can be (:func:`~gateway.cluster.enginedial.start_in_engine`); the others go
    through trio (the kind's ``open``: PostgreSQL's TLS and login), then the
    engine relays them."""
    routes = {name: kind.route() for name, kind in kinds.KINDS.items()}
    cert = stream.getpeercert(binary_form=True)
    # The connection lives as long as the identity it was opened with, or
    # the one it was renewed with since (gateway/cluster/linkrenewal.py).
    # One without a valid identity lives only long enough to answer its
    # first dial with the typed refusal (as a dial on its own connection
    # would), so it cannot hold one of the cluster's connection slots for long.
    max_streams = MAX_STREAMS
    per_connection = cluster.limits.streams_per_connection
    identity = None
    try:
        identity, _user, _roles = await cluster.identify(cert)
        lifetime = (identity.not_after - utcnow()).total_seconds() if cluster.config.disconnect_expired_cert \
            else float("inf")
        expiry = "the session certificate expired"
    except pki.CertError as exc:
        lifetime = DIAL_TIMEOUT
        expiry = f"no valid session certificate ({exc.code.value})"
        max_streams = UNAUTHENTICATED_STREAMS
    cred = LinkCredential(cert=cert, identity=identity,
                          expiry=trio.CancelScope(deadline=trio.current_time() + max(0.0, lifetime)))
    token = trio.lowlevel.current_trio_token()
    async with trio.open_nursery() as nursery:

        def in_trio(link: MuxLink, st: Stream, request: DialRequest, cert: bytes | None,
                    after: _Ahead | None) -> None:
            if link.failed is None:
                nursery.start_soon(_mux_session, cluster, link, st, request, cert, client_addr, routes, after, cred)

        def spawn(fn, *args) -> None:
            try:
                token.run_sync_soon(nursery.start_soon, fn, *args)
            except trio.RunFinishedError:
                pass

        def on_open(link: MuxLink, st: Stream, request: DialRequest) -> None:  # the engine's thread
            if linkrenewal.is_link_request(request):  # about the connection itself
                on_link_dial(cluster, link, cred, st, request, client_addr, spawn)
                return
            cert = cred.cert  # the connection's certificate as it is now
            if len(link.streams) > per_connection:
                refuse_over_cap(cluster, link, st, request, cert, client_addr, per_connection)
                return
            if not start_in_engine(cluster, link, st, request, cert, client_addr, cred):
                token.run_sync_soon(in_trio, link, st, request, cert, _after(cluster, link, request, routes))

        link = MuxLink(engine(), stream, MuxRole.CLUSTER, name="gateway", socket_name=UPSTREAM,
                       on_open=on_open, max_streams=max_streams)
        reason = "the cluster is stopping"
        try:
            with cred.expiry:
                await link.closed.wait()
            if cred.expiry.cancelled_caught:
                reason = expiry
                await _interrupt_sessions(cluster, link)
                with link.engine.lock:
                    for st in link.streams.values():
                        if isinstance(st.context, EngineSession) and st.context.session.end_reason is None:
                            st.context.session.end_reason = "cert_expired"
        finally:
            link.close(reason)
    log.info("mux_closed client=%s reason=%s", client_addr, link.failed)


async def _interrupt_sessions(cluster: Cluster, link: MuxLink) -> None:
    """The connection's certificate expired: its sessions that a kind
    can interrupt upstream are cut that way first (Cluster.cut), all at
    once, before the connection closes on them."""
    on_link = [session for session in list(cluster.sessions.values())
               if session.interrupt is not None and session.extra.get("stream", (None,))[0] is link]
    if on_link:
        async with trio.open_nursery() as nursery:
            for session in on_link:
                nursery.start_soon(cluster.cut, session, "cert_expired")


#: What a control dial waits for before it acts (:func:`_after`).
_Ahead = tuple["trio.Event | None", "socket.socket | None"]
#: How often a cancel looks whether the server took its query's bytes.
DELIVERED_POLL = 0.005


def _after(cluster: Cluster, link: MuxLink, request: DialRequest,
           routes: Mapping[str, RouteKind]) -> _Ahead | None:
    """(the engine's thread) For a control dial that acts on a session of
    this connection (a cancel): an event set once the bytes that came for
    it before this OPEN have been written to its upstream socket
    (``MuxLink.flushed``), and that socket, whose kernel then hands them to
    the server (:func:`_delivered`), so the control cannot overtake them.
    None: nothing to wait for."""
    for kind in routes.values():
        session = kind.acts_on(cluster, request)
        if session is not None:
            on = session.extra.get("stream")
            if on is not None and on[0] is link:
                end = on[1].end
                return link.flushed(on[1]), (end.sock if end is not None else None)
    return None


async def _delivered(sock: socket.socket) -> None:
    """Until the server's kernel has acknowledged everything written to
    ``sock`` (SIOCOUTQ: a server reading a huge query slowly holds its
    window shut, and the rest waits in our kernel)."""
    while unacknowledged(sock):
        await trio.sleep(DELIVERED_POLL)


async def _mux_session(cluster: Cluster, link: MuxLink, st: Stream, request: DialRequest,
                       cert: bytes | None, client_addr: str, routes: Mapping[str, RouteKind],
                       after: _Ahead | None = None, cred: LinkCredential | None = None) -> None:
    try:
        async with cluster.connection_slots:
            if after is not None:
                flushed, sock = after
                with trio.move_on_after(DIAL_TIMEOUT):
                    if flushed is not None:
                        await flushed.wait()
                    if sock is not None:
                        await _delivered(sock)
            snap = await cluster.snapshot()
            resource = snap.resources.get(request.resource)
            # A resource of a kind this route does not carry is refused by
            # the checks, as being of another kind than tcp.
            kind = routes.get(resource.kind, TCP) if resource is not None else TCP
            outcome = await decide(cluster, cert, request, kind, client_addr, snap)
            if not isinstance(outcome, tuple):  # a refusal, or a control dial's answer
                link.answer(st, outcome)
                return
            session, opened, identity = outcome
            session.extra["stream"] = (link, st)
            if cred is not None:
                cred.adopt(session)  # renewed while this dial was decided: by the new certificate
            # An upstream that refused the login and left cannot be handed
            # over: its answer (``first_bytes``) is all there is to relay.
            upstream = opened.upstream if eligible(opened.upstream) else None

            async def run(counters: RelayCounters) -> str | None:
                accept = DialAccept(session_id=session.id, params=opened.reply_params)
                if not link.accept(st, accept, upstream, counters, first=opened.first_bytes,
                                   taps=(opened.tap_client, opened.tap_server), filtered=opened.filtered()):
                    return st.error or "the gateway ended the stream before it started"
                return await link.wait(st)

            await run_session(cluster, session, opened, identity, client_addr, run)
    except Exception:
        log.exception("mux_session_failed client=%s action=%s", client_addr,
                      "report this as a bug with the traceback")
        link.refuse(st, DialError(code=ErrorCode.INTERNAL_ERROR, message="internal error in the cluster"))

"""The cluster's data routes: read the dial, decide, open the upstream, relay.

Theory of operation
-------------------
A data route starts after the TLS handshake on the route's ALPN id. The
gateway sends one dial frame (see ``protocols/dial.py``); before any upstream
byte moves, the cluster checks, in order:

1. a session certificate was presented, is for this cluster, readable and in
   its validity window (``cert_required`` / ``cert_invalid`` / ``cert_expired``);
2. the user still exists and is not locked, the certificate not revoked
   (``access_denied`` / ``user_locked`` / ``cert_expired``);
3. the resource exists and the user's roles reach it at all, else
   ``access_denied`` the same way for both (no one learns what exists); it
   is of the route's kind (``bad_request``);
4. the user's roles allow it with these parameters, deny winning
   (``access_denied`` naming the parameters; the audit has the role and rule);
5. the route's kind opens the upstream (TCP connect; for PostgreSQL also TLS
   and the login as the db user), or refuses (``upstream_unreachable``...).

A dial with the ``probe`` parameter stops after check 3: the cluster only
connects to the upstream and closes (``dial.probe``), or refuses with
``upstream_unreachable`` (`wicket agent --check-upstreams`).

Any refusal is a typed DialError frame, audited as ``dial.denied``. On
success the cluster answers DialAccept, sends whatever the kind produced for
the client first (PostgreSQL: AuthenticationOk ... ReadyForQuery), and
relays. The session runs inside a cancel scope registered with
:class:`~gateway.cluster.core.Cluster`, so a lock cancels it, and its
deadline is the certificate's expiry.

What differs per kind lives in a :class:`~gateway.cluster.routekind.RouteKind`;
this module is the one place the dial and the session bookkeeping are
written, with one job a module beside it: ``routekind.py`` (what a kind
gives: ``Opened``, ``Refused``, the upstream's TCP connect, the tcp kind),
``reach.py`` (checks 1 to 4, and the probe dial), ``dialaudit.py`` (what a
dial and its session put on record; the refusal over a connection's cap on
streams), ``enginedial.py`` (a tcp stream decided and connected in the
relay engine's thread).
"""

from __future__ import annotations

import functools
import logging
import socket
import time
from typing import Awaitable, Callable, Mapping

import trio

from gateway import kinds
from gateway.cluster.core import (
    INTERRUPT_TIMEOUT, LOCK_POLL_INTERVAL, AtCapacity, Cluster, LiveSession, Snapshot,
)
from gateway.cluster.dialaudit import DialAudit, audit_end, audit_start, refuse_over_cap
from gateway.cluster.enginedial import EngineSession, start_in_engine
from gateway.cluster.reach import authorize, probe
# What a kind gives the dial: the kinds import these names from here.
from gateway.cluster.routekind import (  # noqa: F401
    CONNECT_TIMEOUT, TCP, Answered, Opened, Refused, RouteKind, abandoned, connect_tcp,
)
from gateway.identity import pki
from gateway.identity.pki import utcnow
from gateway.net.engine import eligible, engine
from gateway.net.muxlink import MAX_STREAMS, MuxLink, Stream
from gateway.net.relay import RelayCounters, relay, reset_on_close
from gateway.net.tcp import unacknowledged
from gateway.net.tls import TLSStream
from protocols.dial import (PARAM_PROBE, DialAccept, DialConnection, DialError, DialRequest, NEED_DATA, Role,
                            refusal_for)
from protocols.errors import ErrorCode, RemoteProtocolError
from protocols.mux import Role as MuxRole

log = logging.getLogger("wicket.cluster.dial")

DIAL_TIMEOUT = 10.0
#: Streams a multiplexed connection without a valid certificate may have
#: open: enough for its dials to get their typed refusals, not enough for
#: it to make the cluster hold much (each may carry a window of early data).
UNAUTHENTICATED_STREAMS = 8
READ_CHUNK = 64 * 1024
#: How much longer than its certificate an interruptible session may last:
#: the lock watcher's look (every LOCK_POLL_INTERVAL) and the interrupt.
CUT_GRACE = INTERRUPT_TIMEOUT + 2 * LOCK_POLL_INTERVAL

def _cancellation(exc: BaseException) -> bool:
    """``exc`` is trio cancelling us, perhaps from inside a nursery (an
    exception group of nothing but Cancelled, as trio.open_tcp_stream's)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


async def read_dial(stream: TLSStream, conn: DialConnection) -> DialRequest:
    with trio.fail_after(DIAL_TIMEOUT):
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await stream.receive_some(READ_CHUNK))
                continue
            assert isinstance(event, DialRequest)  # a server connection yields nothing else
            return event


async def handle_route(cluster: Cluster, stream: TLSStream, kind: RouteKind, *, client_addr: str) -> None:
    """Serve one data-route connection for resources of ``kind.kind``."""
    conn = DialConnection(Role.SERVER)
    try:
        request = await read_dial(stream, conn)
    except RemoteProtocolError as exc:
        log.info("dial_malformed client=%s error=%s", client_addr, exc)
        await _send_quietly(stream, conn.send(refusal_for(exc)))
        return
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        return
    outcome = await _decide(cluster, stream.getpeercert(binary_form=True), request, kind, client_addr)
    if isinstance(outcome, (DialAccept, DialError)):
        await _send_quietly(stream, conn.send(outcome))
        return
    session, opened, identity = outcome
    upstream = opened.upstream
    filtered = opened.filtered()

    async def run(counters: RelayCounters) -> str | None:
        try:
            await stream.send_all(conn.send(DialAccept(session_id=session.id, params=opened.reply_params))
                                  + opened.first_bytes)
            counters.b_to_a += len(opened.first_bytes)
            trailing, _eof = conn.trailing_data
            if trailing:
                if opened.tap_client:
                    opened.tap_client(trailing)
                counters.a_to_b += len(trailing)
                if filtered is not None:
                    try:
                        passed, answers = filtered.from_client(trailing)
                    except Exception as exc:  # what the filter cannot read must not pass
                        raise trio.BrokenResourceError(f"gateway: {exc}") from None
                    if answers:
                        await stream.send_all(answers)
                        counters.b_to_a += len(answers)
                    trailing = b"".join(passed)
                if trailing:
                    await upstream.send_all(trailing)
        except BaseException:
            # Cut (a lock, the certificate's end) or broken before the relay
            # began: an abort on both sides, as the relay would make it.
            reset_on_close(stream)
            reset_on_close(upstream)
            raise
        stats = await relay(stream, upstream, counters=counters, names=("gateway", "upstream"),
                            taps=(opened.tap_client, opened.tap_server), filtered=filtered)
        return stats.error

    await _run_session(cluster, session, opened, identity, client_addr, run)


async def handle_mux(cluster: Cluster, stream: TLSStream, *, client_addr: str) -> None:
    """Serve a multiplexed connection (protocols/mux.py): each stream is a
    dial for a resource of any kind (gateway/kinds.py), decided and audited
    exactly as on its own connection. A tcp stream is started in the relay
    engine's thread when it can be (:func:`~gateway.cluster.enginedial.start_in_engine`); the others go
    through trio (the kind's ``open``: PostgreSQL's TLS and login), then the
    engine relays them."""
    routes = {name: kind.route() for name, kind in kinds.KINDS.items()}
    cert = stream.getpeercert(binary_form=True)
    # The connection lives as long as the identity it was opened with. One
    # without a valid identity lives only long enough to answer its first
    # dial with the typed refusal (as a dial on its own connection would),
    # so it cannot hold one of the cluster's connection slots for long.
    max_streams = MAX_STREAMS
    per_connection = cluster.limits.streams_per_connection
    try:
        identity, _user, _roles = await cluster.identify(cert)
        lifetime = (identity.not_after - utcnow()).total_seconds() if cluster.config.disconnect_expired_cert \
            else float("inf")
        expiry = "the session certificate expired"
    except pki.CertError as exc:
        lifetime = DIAL_TIMEOUT
        expiry = f"no valid session certificate ({exc.code.value})"
        max_streams = UNAUTHENTICATED_STREAMS
    token = trio.lowlevel.current_trio_token()
    async with trio.open_nursery() as nursery:

        def in_trio(link: MuxLink, st: Stream, request: DialRequest, after: _Ahead | None) -> None:
            if link.failed is None:
                nursery.start_soon(_mux_session, cluster, link, st, request, cert, client_addr, routes, after)

        def on_open(link: MuxLink, st: Stream, request: DialRequest) -> None:  # the engine's thread
            if len(link.streams) > per_connection:
                refuse_over_cap(cluster, link, st, request, cert, client_addr, per_connection)
                return
            if not start_in_engine(cluster, link, st, request, cert, client_addr):
                token.run_sync_soon(in_trio, link, st, request, _after(cluster, link, request, routes))

        link = MuxLink(engine(), stream, MuxRole.CLUSTER, name="gateway", socket_name="upstream",
                       on_open=on_open, max_streams=max_streams)
        reason = "the cluster is stopping"
        try:
            with trio.move_on_after(max(0.0, lifetime)) as timer:
                await link.closed.wait()
            if timer.cancelled_caught:
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
                       after: _Ahead | None = None) -> None:
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
            outcome = await _decide(cluster, cert, request, kind, client_addr, snap)
            if not isinstance(outcome, tuple):  # a refusal, or a control dial's answer
                link.answer(st, outcome)
                return
            session, opened, identity = outcome
            session.extra["stream"] = (link, st)
            # An upstream that refused the login and left cannot be handed
            # over: its answer (``first_bytes``) is all there is to relay.
            upstream = opened.upstream if eligible(opened.upstream) else None

            async def run(counters: RelayCounters) -> str | None:
                accept = DialAccept(session_id=session.id, params=opened.reply_params)
                if not link.accept(st, accept, upstream, counters, first=opened.first_bytes,
                                   taps=(opened.tap_client, opened.tap_server), filtered=opened.filtered()):
                    return st.error or "the gateway ended the stream before it started"
                return await link.wait(st)

            await _run_session(cluster, session, opened, identity, client_addr, run)
    except Exception:
        log.exception("mux_session_failed client=%s action=%s", client_addr,
                      "report this as a bug with the traceback")
        link.refuse(st, DialError(code=ErrorCode.INTERNAL_ERROR, message="internal error in the cluster"))


async def _decide(cluster: Cluster, cert: bytes | None, request: DialRequest, kind: RouteKind,
                  client_addr: str, snap: Snapshot | None = None
                  ) -> tuple[LiveSession, Opened, pki.Identity] | DialAccept | DialError:
    """Every check of the module docstring, in order, then open the
    upstream. Returns the refusal (audited as ``dial.denied``), a DialAccept
    for a control dial, or the live session with its upstream (audited as
    ``dial.allowed``). ``snap``: the access snapshot, if the caller just
    read it."""
    audit = DialAudit.of(request, kind, client_addr)
    try:
        if snap is None:
            snap = await cluster.snapshot()
        if PARAM_PROBE in request.params:
            return await probe(cluster, snap, cert, request, kind, audit)
        identity, resource, params, decision = authorize(cluster, snap, cert, request, kind, audit)
        control = await kind.control(cluster, resource, request, identity)
        if control is not None:
            answer = control if isinstance(control, Answered) else Answered(control)
            cluster.audit_soon("dial.control", audit.user, **audit.fields, reason=answer.reason)
            return DialAccept(session_id="-", params=answer.params)
        try:
            session = cluster.new_session(audit.user, resource.name, kind.kind)
        except AtCapacity as exc:
            return audit.limited(cluster, exc)
        try:
            opened = await kind.open(cluster, resource, params, session)
        except BaseException as exc:
            cluster.end_session(session)
            if _cancellation(exc):  # stopping: the dial still goes on record
                audit.denied(cluster, abandoned(resource, session.end_reason))
            raise
    except Refused as refusal:
        return audit.denied(cluster, refusal)
    if kind.interrupt is not None:
        session.interrupt = functools.partial(kind.interrupt, cluster, resource, session)
    audit.allowed(cluster, session, decision)
    return session, opened, identity


async def _run_session(cluster: Cluster, session: LiveSession, opened: Opened, identity: pki.Identity,
                       client_addr: str, run: Callable[[RelayCounters], Awaitable[str | None]]) -> None:
    """The session's bookkeeping around ``run`` (which relays and returns
    the relay's error): session.start/end, the cancel scope a lock or the
    certificate's expiry cuts, the kind's finish hook."""
    counters = RelayCounters()
    error = None
    async with opened.upstream:
        started = time.monotonic()
        audit_start(cluster, session, client_addr, opened.details)
        try:
            if cluster.config.disconnect_expired_cert:
                left = (identity.not_after - utcnow()).total_seconds()
                if session.interrupt is not None:
                    # The lock watcher cuts it at expiry, interrupting it
                    # upstream first (Cluster.cut); this is the backstop.
                    left += CUT_GRACE
                session.cancel_scope.deadline = trio.current_time() + max(0.0, left)
            with session.cancel_scope:
                error = await run(counters)
            if session.cancel_scope.cancelled_caught and session.end_reason is None:
                session.end_reason = "cert_expired"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            session.end_reason = f"error: {exc}"
        finally:
            cluster.end_session(session)
            if opened.finish:
                opened.finish()
            audit_end(cluster, session, counters, started, session.end_reason or error or "closed")


async def _send_quietly(stream: TLSStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass

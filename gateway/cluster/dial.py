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

What differs per kind lives in a :class:`RouteKind`; this module is the one
place the checks and the session bookkeeping are written.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
import socket
import time
from typing import Any, Awaitable, Callable, Mapping, Protocol

import attrs
import trio

from gateway.cluster import rbac
from gateway import kinds, printable
from gateway.addresses import parse_hostport
from gateway.cluster.core import (
    INTERRUPT_TIMEOUT, LOCK_POLL_INTERVAL, MAX_CONNECTIONS, AtCapacity, Cluster, LiveSession, Snapshot,
)
from gateway.cluster.store import Resource
from gateway.identity import pki
from gateway.identity.pki import utcnow
from gateway.net.engine import eligible, engine, reset_and_close
from gateway.net.filters import Filtered, MessageFilter
from gateway.net.muxlink import MAX_STREAMS, MuxLink, Stream
from gateway.net.relay import RelayCounters, relay, reset_on_close
from gateway.net.tcp import keep_alive, unacknowledged
from gateway.net.tls import TLSStream
from protocols.dial import (PARAM_PROBE, DialAccept, DialConnection, DialError, DialRequest, NEED_DATA, Role,
                            refusal_for)
from protocols.errors import ErrorCode, RemoteProtocolError
from protocols.mux import Role as MuxRole

log = logging.getLogger("wicket.cluster.dial")

DIAL_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
#: Streams a multiplexed connection without a valid certificate may have
#: open: enough for its dials to get their typed refusals, not enough for
#: it to make the cluster hold much (each may carry a window of early data).
UNAUTHENTICATED_STREAMS = 8
READ_CHUNK = 64 * 1024
#: How much longer than its certificate an interruptible session may last:
#: the lock watcher's look (every LOCK_POLL_INTERVAL) and the interrupt.
CUT_GRACE = INTERRUPT_TIMEOUT + 2 * LOCK_POLL_INTERVAL

Tap = Callable[[bytes], None]


class Refused(Exception):
    """Turn the dial down with a typed error (and audit why)."""

    def __init__(self, code: ErrorCode, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason or message


@attrs.define(eq=False)
class Opened:
    """An upstream ready for the relay."""

    upstream: trio.abc.HalfCloseableStream
    #: Bytes for the gateway right after the accept (e.g. the server's
    #: AuthenticationOk ... ReadyForQuery after the cluster logged in).
    first_bytes: bytes = b""
    #: Called with every chunk gateway -> upstream / upstream -> gateway.
    tap_client: Tap | None = None
    tap_server: Tap | None = None
    #: Called once the relay is over (flush an auditor, say).
    finish: Callable[[], None] | None = None
    #: Extra fields for session.start.
    details: Mapping[str, Any] = attrs.field(factory=dict)
    #: Parameters for the gateway in the DialAccept (what the kind's
    #: gateway route needs to know of the upstream: MySQL's handshake
    #: values and login result).
    reply_params: Mapping[str, str] = attrs.field(factory=dict)
    #: Given each whole message from the gateway before it goes on, in the
    #: relay's thread (MongoDB's command gate): pass it, answer it, or end
    #: the session (gateway/net/filters.py).
    filter: MessageFilter | None = None

    def filtered(self) -> Filtered | None:
        """The relay's state for :attr:`filter`, one per session."""
        return None if self.filter is None else Filtered(self.filter)


@attrs.frozen
class Answered:
    """A control dial's outcome with parameters for the gateway (what
    ``RouteKind.control`` may return instead of a bare audit reason)."""

    reason: str
    params: Mapping[str, str] = attrs.field(factory=dict)


class RouteKind(Protocol):
    kind: str

    def check_params(self, request: DialRequest, identity: pki.Identity) -> dict[str, str]:
        """Validate/complete the dial parameters that RBAC will see."""

    async def open(self, cluster: Cluster, resource: Resource, params: dict[str, str],
                   session: LiveSession) -> Opened:
        """Open the upstream (raise :class:`Refused`)."""

    async def control(self, cluster: Cluster, resource: Resource, request: DialRequest,
                      identity: pki.Identity) -> str | Answered | None:
        """Handle a control dial (no session: e.g. a PostgreSQL cancel).
        Return None if ``request`` is an ordinary dial, else an audit
        reason (:class:`Answered`: with parameters for the gateway)."""

    def acts_on(self, cluster: Cluster, request: DialRequest) -> LiveSession | None:
        """The live session a control dial acts on (a cancel's), if any: on
        a multiplexed connection it is decided only once every byte that
        came for that session before it has reached the upstream. Called
        in the relay engine's thread: blocks on nothing."""

    #: ``async interrupt(cluster, resource, session, reason) -> str``, or
    #: None: stop what ``session`` runs upstream before a lock, a
    #: revocation or the certificate's expiry cuts it (PostgreSQL: a
    #: CancelRequest with the backend's key; MySQL would KILL QUERY,
    #: MongoDB killOp), so that closing the connection does not leave a
    #: statement running or let in-flight writes complete. Returns what it
    #: did, for the audit (``session.interrupt``). None for kinds whose
    #: upstream stops when its connection closes (tcp).
    interrupt: Callable[[Cluster, Resource, LiveSession, str], Awaitable[str]] | None


def unreachable(resource: Resource, why: str) -> Refused:
    return Refused(
        ErrorCode.UPSTREAM_UNREACHABLE,
        f"{resource.name} ({resource.address}) is not reachable from the cluster: {why}; "
        f"check that it is running",
    )


#: What an engine connect given up on says (``connected`` tells it apart).
ABANDONED = "abandoned"


def abandoned(resource: Resource, why: str | None) -> Refused:
    """The dial was allowed, but given up before its session was set up
    (``why``: the live session's end reason, cluster_stopping say)."""
    why = why or ABANDONED
    return Refused(
        ErrorCode.UPSTREAM_UNREACHABLE,
        f"the session to {resource.name} was given up before it was set up ({why}); try again",
        reason=why,
    )


def _cancellation(exc: BaseException) -> bool:
    """``exc`` is trio cancelling us, perhaps from inside a nursery (an
    exception group of nothing but Cancelled, as trio.open_tcp_stream's)."""
    if isinstance(exc, BaseExceptionGroup):
        return exc.split(trio.Cancelled)[1] is None
    return isinstance(exc, trio.Cancelled)


def abandon_engine_connects(cluster: Cluster) -> None:
    """(trio's thread) Give up on every upstream connect the relay engine
    still waits for: each dial is refused and audited now, not after the
    audit log's last flush."""
    with engine().lock:  # the engine's thread adds and removes them under it
        for connecting in list(cluster.engine_connects):
            connecting.cancel(ABANDONED)


async def connect_tcp(resource: Resource) -> trio.SocketStream:
    host, port = parse_hostport(resource.address)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await trio.open_tcp_stream(host, port)
        keep_alive(stream.socket)  # a server that vanished ends its session (gateway/net/tcp.py)
        return stream
    except trio.TooSlowError:
        raise unreachable(resource, "timed out") from None
    except OSError as exc:
        raise unreachable(resource, exc.strerror or str(exc)) from None


@functools.lru_cache(maxsize=1024)
def literal_address(address: str) -> tuple[int, tuple] | None:
    """(family, sockaddr) for a resource address whose host is an IP
    literal; None for a name, which needs resolving."""
    host, port = parse_hostport(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (socket.AF_INET6, (host, port, 0, 0)) if ip.version == 6 else (socket.AF_INET, (host, port))


class TcpKind:
    kind = "tcp"
    interrupt = None  # closing the upstream connection is all there is

    def check_params(self, request: DialRequest, identity: pki.Identity) -> dict[str, str]:
        return dict(request.params)

    async def open(self, cluster, resource, params, session) -> Opened:
        return Opened(upstream=await connect_tcp(resource))

    async def control(self, cluster, resource, request, identity) -> str | None:
        return None

    def acts_on(self, cluster, request) -> LiveSession | None:
        return None


TCP = TcpKind()


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
    engine's thread when it can be (:func:`_start_in_engine`); the others go
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
                # Each stream may cost the cluster an upstream descriptor.
                audit = _DialAudit.of(request, TCP, client_addr)
                audit.user = cluster.claimed_user(cert)
                snap = cluster.fresh_snapshot()  # the resource's kind, for the record, if at hand
                resource = snap.resources.get(request.resource) if snap is not None else None
                audit.fields["kind"] = resource.kind if resource is not None else None
                link.refuse(st, audit.limited(cluster, AtCapacity(
                    f"this connection has {per_connection} sessions open, the most one gateway connection "
                    f"may (the cluster's limits.streams_per_connection); close some and try again",
                    "streams_per_connection")))
                return
            if not _start_in_engine(cluster, link, st, request, cert, client_addr):
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
                        if isinstance(st.context, _EngineSession) and st.context.session.end_reason is None:
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


@attrs.define(eq=False)
class _DialAudit:
    """What a dial's audit events say, gathered as the checks go."""

    fields: dict[str, Any]
    user: str | None = None
    identity: pki.Identity | None = None

    @classmethod
    def of(cls, request: DialRequest, kind: RouteKind, client_addr: str) -> "_DialAudit":
        return cls({
            "resource": request.resource,
            "kind": kind.kind,
            "client_addr": client_addr,
            "local_client": request.client_addr,
            "params": dict(request.params),
        })

    def denied(self, cluster: Cluster, refusal: Refused) -> DialError:
        cluster.audit_soon("dial.denied", self.user, **self.fields, code=refusal.code.value, reason=refusal.reason)
        return DialError(code=refusal.code, message=refusal.message)

    def limited(self, cluster: Cluster, exc: AtCapacity) -> DialError:
        """Refused at a limit: audited (and logged) in full the first time
        this minute for this user and limit, then counted
        (``dial.limited``), so a flood of streams cannot flood the audit."""
        if cluster.note_limit_refusal(self.user, exc.limit):
            log.warning("dial_limited user=%s limit=%s client=%s message=%r", self.user, exc.limit,
                        self.fields["client_addr"], exc.message)
            cluster.audit_soon("dial.denied", self.user, **self.fields, code=ErrorCode.RATE_LIMITED.value,
                               reason=f"limit {exc.limit}", limit=exc.limit)
        return DialError(code=ErrorCode.RATE_LIMITED, message=exc.message)

    def allowed(self, cluster: Cluster, session: LiveSession, decision: rbac.Decision) -> None:
        session.identity = self.identity  # from now on, revoking it cuts the session
        cluster.audit_soon("dial.allowed", self.user, **self.fields, session_id=session.id, reason=decision.reason)


def _authorize(cluster: Cluster, snap: Snapshot, cert: bytes | None, request: DialRequest, kind: RouteKind,
               audit: _DialAudit) -> tuple[pki.Identity, Resource, dict[str, str], rbac.Decision]:
    """Checks 1 to 4 of the module docstring against ``snap``; raises
    :class:`Refused`. Blocks on nothing, so the relay engine's thread runs it
    too (:func:`_start_in_engine`)."""
    identity, resource, roles = _reach(cluster, snap, cert, request, kind, audit)
    params = kind.check_params(request, identity)
    audit.fields["params"] = params
    decision = rbac.decide(roles, resource.name, resource.labels, params)
    if not decision.allowed:
        # The next step is the gateway's to add (it knows the client's
        # protocol), so the message says only what happened.
        raise Refused(ErrorCode.ACCESS_DENIED, rbac.refusal(roles, resource.name, resource.labels, params),
                      reason=decision.reason)
    return identity, resource, params, decision


def _reach(cluster: Cluster, snap: Snapshot, cert: bytes | None, request: DialRequest, kind: RouteKind,
           audit: _DialAudit) -> tuple[pki.Identity, Resource, list]:
    """Checks 1 to 3: the certificate, the resource within the holder's
    reach and of this route's kind; raises :class:`Refused`."""
    try:
        identity, _user, roles = cluster.identify_in(snap, cert)
    except pki.CertError as exc:
        # On record under the user the certificate names (so `audit --user`
        # finds a locked user's or an expired certificate's dials), marked
        # as a claim: the certificate was refused.
        audit.user = cluster.claimed_user(cert)
        if audit.user is not None:
            audit.fields["user_claimed"] = True
        raise Refused(exc.code, exc.message) from None
    audit.user, audit.identity = identity.user, identity
    # A name with a control character (a resource, a db user, a db name) is
    # no one's, and no glob may match it: refused outright.
    for what, name in (("resource", request.resource), *rbac.constrained(request.params).items()):
        if not printable.is_clean(name):
            raise Refused(ErrorCode.BAD_REQUEST, f"{what} {printable.escape(name)!r} contains a control "
                          f"character ({printable.first_unsafe(name)}); names with control characters are refused")
    resource = snap.resources.get(request.resource)
    # Unknown, and there but out of the user's reach, look the same to the
    # user (one code, one message); the audit's reason tells them apart.
    if resource is None:
        raise Refused(ErrorCode.ACCESS_DENIED, rbac.refusal(roles, request.resource, None),
                      reason=f"no resource named {request.resource!r}")
    if not rbac.visible(roles, resource.name, resource.labels):
        raise Refused(ErrorCode.ACCESS_DENIED, rbac.refusal(roles, resource.name, resource.labels),
                      reason=rbac.decide(roles, resource.name, resource.labels).reason)
    # The user can see this one (`wicket ls` shows its kind): say which.
    if resource.kind != kind.kind:
        raise Refused(
            ErrorCode.BAD_REQUEST,
            f"resource {resource.name!r} is of kind {resource.kind}, not {kind.kind}; "
            f"use `{kinds.proxy_command(resource.kind)} {resource.name}`",
        )
    return identity, resource, roles


async def _decide(cluster: Cluster, cert: bytes | None, request: DialRequest, kind: RouteKind,
                  client_addr: str, snap: Snapshot | None = None
                  ) -> tuple[LiveSession, Opened, pki.Identity] | DialAccept | DialError:
    """Every check of the module docstring, in order, then open the
    upstream. Returns the refusal (audited as ``dial.denied``), a DialAccept
    for a control dial, or the live session with its upstream (audited as
    ``dial.allowed``). ``snap``: the access snapshot, if the caller just
    read it."""
    audit = _DialAudit.of(request, kind, client_addr)
    try:
        if snap is None:
            snap = await cluster.snapshot()
        if PARAM_PROBE in request.params:
            return await _probe(cluster, snap, cert, request, kind, audit)
        identity, resource, params, decision = _authorize(cluster, snap, cert, request, kind, audit)
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


async def _probe(cluster: Cluster, snap: Snapshot, cert: bytes | None, request: DialRequest, kind: RouteKind,
                 audit: _DialAudit) -> DialAccept:
    """A probe (``wicket agent --check-upstreams``): may the holder reach
    the resource at all (checks 1 to 3; no session, so no parameters to
    grant), and does its upstream take a TCP connection from the cluster?
    No session and no protocol byte; audited as ``dial.probe``. Raises
    :class:`Refused` (upstream_unreachable with the reason)."""
    _identity, resource, _roles = _reach(cluster, snap, cert, request, kind, audit)
    audit.fields["params"] = {}
    upstream = await connect_tcp(resource)
    reset_on_close(upstream)  # nothing was said: an abort, not an empty conversation
    await upstream.aclose()
    cluster.audit_soon("dial.probe", audit.user, **audit.fields, reason="reachable")
    return DialAccept(session_id="-")


@attrs.define(eq=False, slots=True)
class _EngineSession:
    """A mux stream's session run by the relay engine alone (no trio task)."""

    session: LiveSession
    started: float = 0.0  # when the upstream connected (the session's start)


def _start_in_engine(cluster: Cluster, link: MuxLink, st: Stream, request: DialRequest, cert: bytes | None,
                     client_addr: str) -> bool:
    """(the engine's thread, under its lock) Decide an OPEN and connect the
    upstream without trio, as :func:`_mux_session` would: same checks, same
    audit events. False if this one needs trio: the access snapshot is
    stale (reloading it reads the store), the upstream's host is a name to
    resolve, or the cluster is at its session limit."""
    snap = cluster.fresh_snapshot()
    if snap is None or PARAM_PROBE in request.params:  # a probe: trio's (it connects and closes)
        return False
    resource = snap.resources.get(request.resource)
    if resource is not None and resource.kind != TCP.kind:
        return False  # its kind's open is trio's
    audit = _DialAudit.of(request, TCP, client_addr)
    try:
        _identity, resource, _params, decision = _authorize(cluster, snap, cert, request, TCP, audit)
    except Refused as refusal:
        link.refuse(st, audit.denied(cluster, refusal))
        return True
    target = literal_address(resource.address)
    if target is None or len(cluster.sessions) >= MAX_CONNECTIONS:
        return False
    try:
        session = cluster.new_session(audit.user, resource.name, TCP.kind)
    except AtCapacity as exc:
        link.refuse(st, audit.limited(cluster, exc))
        return True
    es = st.context = _EngineSession(session)
    # From now on a lock or a stop cuts the stream, even while the upstream
    # is still connecting (``connected`` then finds it finished). Both run
    # under the engine's lock, so neither can slip between the other's steps.
    session.cut = functools.partial(link.cut, st)

    def connected(sock: socket.socket | None, error: str | None) -> None:
        cluster.engine_connects.difference_update(in_flight)
        if sock is None:
            session.cut = None
            cluster.end_session(session)
            if error is ABANDONED:
                refusal = abandoned(resource, session.end_reason)
            else:
                refusal = unreachable(resource, error)
            link.refuse(st, audit.denied(cluster, refusal))
            return
        keep_alive(sock)
        audit.allowed(cluster, session, decision)
        _audit_start(cluster, session, client_addr, {})
        es.started = time.monotonic()
        if st.finished or link.failed is not None:  # cut, or the gateway gave up, meanwhile
            reset_and_close(sock)
            _engine_session_ended(cluster, es, RelayCounters(), st.error or "the gateway ended the stream "
                                  "before it started")
            return
        st.notify = functools.partial(_engine_stream_ended, cluster)
        link.accept(st, DialAccept(session_id=session.id), sock, RelayCounters())

    in_flight: list = []
    connecting = link.engine.connect(target[0], target[1], CONNECT_TIMEOUT, connected)
    if connecting is not None:  # ``connected`` runs later, in this thread, under the same lock
        in_flight.append(connecting)
        cluster.engine_connects.add(connecting)
    return True


def _engine_stream_ended(cluster: Cluster, link: MuxLink, st: Stream) -> None:
    _engine_session_ended(cluster, st.context, st.counters, st.error)


def _engine_session_ended(cluster: Cluster, es: _EngineSession, counters: RelayCounters, error: str | None) -> None:
    session = es.session
    session.cut = None
    cluster.end_session(session)
    _audit_end(cluster, session, counters, es.started, session.end_reason or error or "closed")


def _audit_start(cluster: Cluster, session: LiveSession, client_addr: str, details: Mapping[str, Any]) -> None:
    cluster.audit_soon("session.start", session.user, session_id=session.id, resource=session.resource,
                       kind=session.kind, client_addr=client_addr, **details)


def _audit_end(cluster: Cluster, session: LiveSession, counters: RelayCounters, started: float, reason: str) -> None:
    cluster.audit_soon(
        "session.end", session.user, session_id=session.id, resource=session.resource,
        kind=session.kind,
        bytes_from_client=counters.a_to_b,
        bytes_to_client=counters.b_to_a,
        duration=round(time.monotonic() - started, 3),
        reason=reason,
    )


async def _run_session(cluster: Cluster, session: LiveSession, opened: Opened, identity: pki.Identity,
                       client_addr: str, run: Callable[[RelayCounters], Awaitable[str | None]]) -> None:
    """The session's bookkeeping around ``run`` (which relays and returns
    the relay's error): session.start/end, the cancel scope a lock or the
    certificate's expiry cuts, the kind's finish hook."""
    counters = RelayCounters()
    error = None
    async with opened.upstream:
        started = time.monotonic()
        _audit_start(cluster, session, client_addr, opened.details)
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
            _audit_end(cluster, session, counters, started, session.end_reason or error or "closed")


async def _send_quietly(stream: TLSStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass

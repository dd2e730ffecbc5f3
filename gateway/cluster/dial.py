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
place the checks and the session bookkeeping are written. A dial on the
multiplexed connection is one of its streams (gateway/cluster/muxroute.py),
decided with the same :func:`decide` (or, in the relay engine's thread, the
same :func:`authorize`) and run by the same :func:`run_session`.
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
from gateway.cluster.core import AtCapacity, Cluster, LiveSession, Snapshot
from gateway.cluster.store import Resource
from gateway.identity import pki
from gateway.net.engine import engine
from gateway.net.relay import RelayCounters, relay, reset_on_close
from gateway.net.tcp import keep_alive
from gateway.net.tls import TLSStream
from protocols.dial import (PARAM_PROBE, DialAccept, DialConnection, DialError, DialRequest, NEED_DATA, Role,
                            refusal_for)
from protocols.errors import ErrorCode, RemoteProtocolError

log = logging.getLogger("wicket.cluster.dial")

DIAL_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
#: Streams a multiplexed connection without a valid certificate may have
#: open: enough for its dials to get their typed refusals, not enough for
#: it to make the cluster hold much (each may carry a window of early data).
UNAUTHENTICATED_STREAMS = 8
READ_CHUNK = 64 * 1024

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
    #: Runs beside the relay for the session's life (MongoDB's command
    #: gate between ``upstream``, one end of a socket pair, and the
    #: server); the session ends when the relay does, cancelling it.
    task: Callable[[], Awaitable[None]] | None = None


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
    literal = literal_address(resource.address)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            if literal is None:
                stream = await trio.open_tcp_stream(host, port)
            else:  # one address: none of open_tcp_stream's resolving and racing tasks (half the CPU)
                sock = trio.socket.socket(literal[0], socket.SOCK_STREAM)
                try:
                    await sock.connect(literal[1])
                except BaseException:
                    sock.close()
                    raise
                stream = trio.SocketStream(sock)
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
    outcome = await decide(cluster, stream.getpeercert(binary_form=True), request, kind, client_addr)
    if isinstance(outcome, (DialAccept, DialError)):
        await _send_quietly(stream, conn.send(outcome))
        return
    session, opened, identity = outcome
    upstream = opened.upstream

    async def run(counters: RelayCounters) -> str | None:
        try:
            await stream.send_all(conn.send(DialAccept(session_id=session.id, params=opened.reply_params))
                                  + opened.first_bytes)
            counters.b_to_a += len(opened.first_bytes)
            trailing, _eof = conn.trailing_data
            if trailing:
                if opened.tap_client:
                    opened.tap_client(trailing)
                await upstream.send_all(trailing)
                counters.a_to_b += len(trailing)
        except BaseException:
            # Cut (a lock, the certificate's end) or broken before the relay
            # began: an abort on both sides, as the relay would make it.
            reset_on_close(stream)
            reset_on_close(upstream)
            raise
        stats = await relay(stream, upstream, counters=counters, names=("gateway", "upstream"),
                            taps=(opened.tap_client, opened.tap_server))
        return stats.error

    await run_session(cluster, session, opened, identity, client_addr, run)


@attrs.define(eq=False)
class DialAudit:
    """What a dial's audit events say, gathered as the checks go."""

    fields: dict[str, Any]
    user: str | None = None
    identity: pki.Identity | None = None

    @classmethod
    def of(cls, request: DialRequest, kind: RouteKind, client_addr: str) -> "DialAudit":
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


def authorize(cluster: Cluster, snap: Snapshot, cert: bytes | None, request: DialRequest, kind: RouteKind,
               audit: DialAudit) -> tuple[pki.Identity, Resource, dict[str, str], rbac.Decision]:
    """Checks 1 to 4 of the module docstring against ``snap``; raises
    :class:`Refused`. Blocks on nothing, so the relay engine's thread runs it
    too (:func:`start_in_engine`)."""
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
           audit: DialAudit) -> tuple[pki.Identity, Resource, list]:
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


async def decide(cluster: Cluster, cert: bytes | None, request: DialRequest, kind: RouteKind,
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
            return await _probe(cluster, snap, cert, request, kind, audit)
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


async def _probe(cluster: Cluster, snap: Snapshot, cert: bytes | None, request: DialRequest, kind: RouteKind,
                 audit: DialAudit) -> DialAccept:
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


def audit_start(cluster: Cluster, session: LiveSession, client_addr: str, details: Mapping[str, Any]) -> None:
    cluster.audit_soon("session.start", session.user, session_id=session.id, resource=session.resource,
                       kind=session.kind, client_addr=client_addr, **details)


def audit_end(cluster: Cluster, session: LiveSession, counters: RelayCounters, started: float, reason: str) -> None:
    cluster.audit_soon(
        "session.end", session.user, session_id=session.id, resource=session.resource,
        kind=session.kind,
        bytes_from_client=counters.a_to_b,
        bytes_to_client=counters.b_to_a,
        duration=round(time.monotonic() - started, 3),
        reason=reason,
        **session.extra.get("end_fields", {}),  # what a kind repeats at the end (ssh: login, node)
    )


async def run_session(cluster: Cluster, session: LiveSession, opened: Opened, identity: pki.Identity,
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
            if session.identity is None:
                session.identity = identity
            # At the certificate's end (a renewal of the connection moves
            # it: gateway/cluster/linkrenewal.py).
            session.cancel_scope.deadline = cluster.expiry_deadline(session)
            with session.cancel_scope:
                if opened.task is None:
                    error = await run(counters)
                else:
                    error = await _beside(opened.task, run, counters)
            if session.cancel_scope.cancelled_caught and session.end_reason is None:
                session.end_reason = "cert_expired"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            session.end_reason = f"error: {exc}"
        finally:
            cluster.end_session(session)
            if opened.finish:
                opened.finish()
            audit_end(cluster, session, counters, started, session.end_reason or error or "closed")


async def _beside(task: Callable[[], Awaitable[None]], run: Callable[[RelayCounters], Awaitable[str | None]],
                  counters: RelayCounters) -> str | None:
    """``run`` with the kind's ``task`` beside it; the task is cancelled
    once the relay is over."""
    error = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(task)
        error = await run(counters)
        nursery.cancel_scope.cancel()
    return error


async def _send_quietly(stream: TLSStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass

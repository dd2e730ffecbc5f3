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
relay engine's thread). A dial on the multiplexed connection is one of its
streams (gateway/cluster/muxroute.py), decided with the same :func:`decide`
(or, in the relay engine's thread, the same
:func:`~gateway.cluster.reach.authorize`) and run by the same
:func:`run_session`.
"""

from __future__ import annotations

import functools
import logging
import time
from typing import Awaitable, Callable

import trio

from gateway.cluster.core import AtCapacity, Cluster, LiveSession, Snapshot
from gateway.cluster.dialaudit import DialAudit, audit_end, audit_start
from gateway.cluster.reach import authorize, probe
# What a kind gives the dial: the kinds import these names from here.
from gateway.cluster.routekind import (
    CONNECT_TIMEOUT, TCP, UPSTREAM, Answered, Opened, Refused, RouteKind, abandoned, connect_tcp,
)
from gateway.identity import pki
from gateway.net.relay import RelayCounters, relay, reset_on_close
from gateway.net.tls import TLSStream
from protocols.dial import (PARAM_PROBE, DialAccept, DialConnection, DialError, DialRequest, NEED_DATA, Role,
                            refusal_for)
from protocols.errors import RemoteProtocolError

__all__ = [
    "DIAL_TIMEOUT", "UNAUTHENTICATED_STREAMS", "decide", "handle_route", "read_dial", "run_session",
    # re-exported for the kinds (gateway/cluster/routekind.py)
    "CONNECT_TIMEOUT", "TCP", "Answered", "Opened", "Refused", "RouteKind", "connect_tcp",
]

log = logging.getLogger("wicket.cluster.dial")

DIAL_TIMEOUT = 10.0
#: Streams a multiplexed connection without a valid certificate may have
#: open: enough for its dials to get their typed refusals, not enough for
#: it to make the cluster hold much (each may carry a window of early data).
UNAUTHENTICATED_STREAMS = 8
READ_CHUNK = 64 * 1024


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
        except BaseException:
            # Cut (a lock, the certificate's end) or broken before the relay
            # began: an abort on both sides, as the relay would make it.
            reset_on_close(stream)
            reset_on_close(upstream)
            raise
        # What the gateway sent behind its dial frame is the relay's first
        # read: tapped and filtered like the rest (a USE there is refused).
        trailing, _eof = conn.trailing_data
        stats = await relay(stream, upstream, counters=counters, names=("gateway", UPSTREAM),
                            taps=(opened.tap_client, opened.tap_server), filtered=opened.filtered(),
                            early=trailing)
        return stats.error

    await run_session(cluster, session, opened, identity, client_addr, run)


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
                filtered = opened.filtered()
                if filtered is None or not filtered.holds:
                    error = await run(counters)
                else:  # what the filter holds for trio runs beside the relay
                    error = await _beside(filtered.serve, run, counters)
            if session.cancel_scope.cancelled_caught and session.end_reason is None:
                session.end_reason = "cert_expired"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            session.end_reason = f"error: {exc}"
        finally:
            cluster.end_session(session)
            if opened.finish:
                opened.finish()
            audit_end(cluster, session, counters, started,
                      session.end_reason or _upstream_failure(opened, error) or "closed")


def _upstream_failure(opened: Opened, error: str | None) -> str | None:
    """The relay's ``error``, unless it is the upstream's after the client
    said goodbye (a PostgreSQL server closes, or resets, the connection once
    it has read Terminate: our FIN or close_notify may meet the reset)."""
    if error is not None and error.startswith(f"{UPSTREAM}: ") and opened.said_goodbye is not None \
            and opened.said_goodbye():
        return None
    return error


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

"""The cluster's data routes: read the dial, decide, connect, relay.

Theory of operation
-------------------
A data route starts after the TLS handshake on the route's ALPN id. The
gateway sends one dial frame (see ``protocols/dial.py``); before any upstream
byte moves, the cluster checks, in order:

1. a session certificate was presented, is for this cluster, readable and in
   its validity window (``cert_required`` / ``cert_invalid`` / ``cert_expired``);
2. the user still exists and is not locked (``access_denied`` / ``user_locked``);
3. the resource exists (``resource_not_found``) and is of the route's kind;
4. the user's roles allow it with these parameters, deny winning
   (``access_denied`` with the reason);
5. the upstream answers within the connect timeout (``upstream_unreachable``).

Any refusal is a typed DialError frame, audited as ``dial.denied``. On
success the cluster answers DialAccept and relays; the session runs inside a
cancel scope registered with :class:`~gateway.cluster.core.Cluster`, so a lock
cancels it, and its deadline is the certificate's expiry.
"""

from __future__ import annotations

import logging
import time

import trio

from gateway.cluster import rbac
from gateway.cluster.config import parse_hostport
from gateway.cluster.core import Cluster
from gateway.identity.pki import utcnow
from gateway.identity import pki
from gateway.net.relay import RelayCounters, relay
from gateway.net.tls import TLSStream
from protocols.dial import DialAccept, DialConnection, DialError, DialRequest, NEED_DATA, Role, refusal_for
from protocols.errors import ErrorCode, RemoteProtocolError

log = logging.getLogger("wicket.cluster.dial")

DIAL_TIMEOUT = 10.0
CONNECT_TIMEOUT = 10.0
READ_CHUNK = 64 * 1024


class Refused(Exception):
    def __init__(self, code: ErrorCode, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason or message


async def read_dial(stream: TLSStream, conn: DialConnection) -> DialRequest:
    with trio.fail_after(DIAL_TIMEOUT):
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await stream.receive_some(READ_CHUNK))
                continue
            if isinstance(event, DialRequest):
                return event
            raise RemoteProtocolError("expected a dial request", code=ErrorCode.BAD_REQUEST)


async def handle_tcp(cluster: Cluster, stream: TLSStream, *, kind: str, client_addr: str) -> None:
    """Serve one data-route connection for resources of ``kind``."""
    conn = DialConnection(Role.SERVER)
    try:
        request = await read_dial(stream, conn)
    except RemoteProtocolError as exc:
        log.info("dial_malformed client=%s error=%s", client_addr, exc)
        await _send_quietly(stream, conn.send(refusal_for(exc)))
        return
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        return

    user_name = None
    audit_fields = {
        "resource": request.resource,
        "kind": kind,
        "client_addr": client_addr,
        "local_client": request.client_addr,
        "params": dict(request.params),
    }
    try:
        try:
            identity, user, roles = await cluster.identify(stream.getpeercert(binary_form=True))
        except pki.CertError as exc:
            raise Refused(exc.code, exc.message) from None
        user_name = identity.user
        resource = await cluster.db(cluster.store.get_resource, request.resource)
        if resource is None:
            raise Refused(
                ErrorCode.RESOURCE_NOT_FOUND,
                f"no resource named {request.resource!r}; `wicket ls` lists the ones you can reach",
            )
        if resource.kind != kind:
            raise Refused(
                ErrorCode.BAD_REQUEST,
                f"resource {resource.name!r} is of kind {resource.kind}, not {kind}; "
                f"use `wicket proxy {resource.kind} {resource.name}`",
            )
        decision = rbac.decide(roles, resource.name, resource.labels, dict(request.params))
        if not decision.allowed:
            raise Refused(
                ErrorCode.ACCESS_DENIED,
                f"access to {resource.name} denied: {decision.reason}; ask an administrator for a role "
                f"that allows it",
                reason=decision.reason,
            )
        host, port = parse_hostport(resource.address)
        try:
            with trio.fail_after(CONNECT_TIMEOUT):
                upstream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as exc:
            raise Refused(
                ErrorCode.UPSTREAM_UNREACHABLE,
                f"{resource.name} ({resource.address}) is not reachable from the cluster: "
                f"{getattr(exc, 'strerror', None) or type(exc).__name__}; check that it is running",
            ) from None
    except Refused as refusal:
        await cluster.audit("dial.denied", user_name, **audit_fields, code=refusal.code.value,
                            reason=refusal.reason)
        await _send_quietly(stream, conn.send(DialError(code=refusal.code, message=refusal.message)))
        return

    session = cluster.new_session(user_name, resource.name, kind)
    await cluster.audit("dial.allowed", user_name, **audit_fields, session_id=session.id,
                        reason=decision.reason)
    counters = RelayCounters()
    trailing = b""
    stats = None
    async with upstream:
        started = time.monotonic()
        await cluster.audit("session.start", user_name, session_id=session.id,
                            resource=resource.name, kind=kind, client_addr=client_addr)
        try:
            if cluster.config.disconnect_expired_cert:
                left = (identity.not_after - utcnow()).total_seconds()
                session.cancel_scope.deadline = trio.current_time() + max(0.0, left)
            await stream.send_all(conn.send(DialAccept(session_id=session.id)))
            trailing, _eof = conn.trailing_data
            with session.cancel_scope:
                if trailing:
                    await upstream.send_all(trailing)
                stats = await relay(stream, upstream, counters=counters, names=("gateway", "upstream"))
            if session.cancel_scope.cancelled_caught and session.end_reason is None:
                session.end_reason = "cert_expired"
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            session.end_reason = f"error: {exc}"
        finally:
            cluster.end_session(session)
            with trio.CancelScope(shield=True):
                await cluster.audit(
                    "session.end", user_name, session_id=session.id, resource=resource.name,
                    kind=kind,
                    bytes_from_client=len(trailing) + counters.a_to_b,
                    bytes_to_client=counters.b_to_a,
                    duration=round(time.monotonic() - started, 3),
                    reason=session.end_reason or (stats.error if stats and stats.error else "closed"),
                )


async def _send_quietly(stream: TLSStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass

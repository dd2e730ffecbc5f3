"""What a dial and its session put on record: ``dial.denied`` (with the
refusals at a ``[limits]`` limit counted, not flooded: ``dial.limited``),
``dial.allowed``, ``session.start`` and ``session.end``; and the refusal of
a stream over the connection's cap (``limits.streams_per_connection``)."""

from __future__ import annotations

import logging
import time
from typing import Any, Mapping

import attrs

from gateway.cluster import rbac
from gateway.cluster.core import AtCapacity, Cluster, LiveSession
from gateway.cluster.routekind import TCP, Refused, RouteKind
from gateway.identity import pki
from gateway.net.muxlink import MuxLink, Stream
from gateway.net.relay import RelayCounters
from protocols.dial import DialError, DialRequest
from protocols.errors import ErrorCode

log = logging.getLogger("wicket.cluster.dial")


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


def refuse_over_cap(cluster: Cluster, link: MuxLink, st: Stream, request: DialRequest, cert: bytes | None,
                    client_addr: str, per_connection: int) -> None:
    """(the engine's thread) Refuse an OPEN past the connection's cap on
    sessions: each stream may cost the cluster an upstream descriptor."""
    audit = DialAudit.of(request, TCP, client_addr)
    audit.user = cluster.claimed_user(cert)
    snap = cluster.fresh_snapshot()  # the resource's kind, for the record, if at hand
    resource = snap.resources.get(request.resource) if snap is not None else None
    audit.fields["kind"] = resource.kind if resource is not None else None
    link.refuse(st, audit.limited(cluster, AtCapacity(
        f"this connection has {per_connection} sessions open, the most one gateway connection "
        f"may (the cluster's limits.streams_per_connection); close some and try again",
        "streams_per_connection")))

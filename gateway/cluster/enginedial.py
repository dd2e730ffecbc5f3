"""A tcp stream of a multiplexed connection decided and connected in the
relay engine's thread, without trio (:func:`start_in_engine`): the same
checks and audit events as trio's path, against the in-memory snapshot,
with the upstream connected by the engine without blocking."""

from __future__ import annotations

import functools
import socket
import time

import attrs

from gateway.cluster.core import MAX_CONNECTIONS, AtCapacity, Cluster, LiveSession
from gateway.cluster.dialaudit import DialAudit, audit_end, audit_start
from gateway.cluster.linkrenewal import LinkCredential
from gateway.cluster.reach import authorize
from gateway.cluster.routekind import (ABANDONED, CONNECT_TIMEOUT, TCP, Refused, abandoned, literal_address,
                                       unreachable)
from gateway.net.engine import engine, reset_and_close
from gateway.net.muxlink import MuxLink, Stream
from gateway.net.relay import RelayCounters
from gateway.net.tcp import keep_alive
from protocols.dial import PARAM_PROBE, DialAccept, DialRequest


@attrs.define(eq=False, slots=True)
class EngineSession:
    """A mux stream's session run by the relay engine alone (no trio task)."""

    session: LiveSession
    started: float = 0.0  # when the upstream connected (the session's start)


def start_in_engine(cluster: Cluster, link: MuxLink, st: Stream, request: DialRequest, cert: bytes | None,
                     client_addr: str, cred: LinkCredential | None = None) -> bool:
    """(the engine's thread, under its lock) Decide an OPEN and connect the
    upstream without trio, as :func:`~gateway.cluster.muxroute.handle_mux`'s trio path would: same checks, same
    audit events. False if this one needs trio: the access snapshot is
    stale (reloading it reads the store), the upstream's host is a name to
    resolve, or the cluster is at its session limit."""
    snap = cluster.fresh_snapshot()
    if snap is None or PARAM_PROBE in request.params:  # a probe: trio's (it connects and closes)
        return False
    resource = snap.resources.get(request.resource)
    if resource is not None and resource.kind != TCP.kind:
        return False  # its kind's open is trio's
    audit = DialAudit.of(request, TCP, client_addr)
    try:
        _identity, resource, _params, decision = authorize(cluster, snap, cert, request, TCP, audit)
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
    es = st.context = EngineSession(session)
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
        session.extra["stream"] = (link, st)  # a renewal of the connection extends it
        if cred is not None:
            cred.adopt(session)
        audit_start(cluster, session, client_addr, {})
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


def _engine_session_ended(cluster: Cluster, es: EngineSession, counters: RelayCounters, error: str | None) -> None:
    session = es.session
    session.cut = None
    cluster.end_session(session)
    audit_end(cluster, session, counters, es.started, session.end_reason or error or "closed")


def abandon_engine_connects(cluster: Cluster) -> None:
    """(trio's thread) Give up on every upstream connect the relay engine
    still waits for: each dial is refused and audited now, not after the
    audit log's last flush."""
    with engine().lock:  # the engine's thread adds and removes them under it
        for connecting in list(cluster.engine_connects):
            connecting.cancel(ABANDONED)

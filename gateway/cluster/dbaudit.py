"""A database session's audit, from a copy of the bytes the cluster relays.

Shared by every database kind: a kind's codec has a streaming auditor per
direction (protocols/auditor.py's base: fed bytes, it yields events and
skips what it does not need by length); :class:`SessionAuditor` feeds each
chunk to it in the relay's thread, hands every event to the kind's
handler, and queues audit events with ``cluster.audit_fields_soon`` (written in
batches, never awaited here). What cannot be parsed cannot be audited: a
protocol error is recorded (``<prefix>.protocol_error``) and ends the
session (the relay sees a broken stream).
"""

from __future__ import annotations

from typing import Any, Callable

import trio

from gateway.cluster.core import Cluster, LiveSession
from protocols.errors import ProtocolError


class SessionAuditor:
    """Turns a session's two byte streams into audit events; a kind
    subclasses it with its auditors, handlers and ``prefix`` (its events'
    namespace: ``pg``, ``mysql``)."""

    prefix = "db"
    #: What the protocol is called in a protocol error's message.
    protocol = "database"

    def __init__(self, cluster: Cluster, session: LiveSession) -> None:
        self.cluster, self.session = cluster, session

    def emit(self, event: str, **fields: Any) -> None:
        """Queue ``<prefix>.<event>`` for the audit log."""
        session = self.session
        self.cluster.audit_fields_soon(f"{self.prefix}.{event}", session.user, {
            "session_id": session.id, "resource": session.resource, **fields})

    def feed(self, auditor, handler: Callable[[object], None], data: bytes, side: str) -> None:
        """Give ``data`` (b"" at EOF) to ``auditor`` and hand every event it
        completes to ``handler``; ``side``: "client" or "server"."""
        try:
            auditor.receive_data(data)
            events = auditor.next_events()  # one call per chunk, not per event
            while events:
                for event in events:
                    handler(event)
                events = auditor.next_events()
        except ProtocolError as exc:
            self.emit("protocol_error", side=side, error=exc.message)
            raise trio.BrokenResourceError(f"unparseable {self.protocol} {side} stream: {exc.message}") from None

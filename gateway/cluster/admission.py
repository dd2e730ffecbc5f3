"""Connections per client address, capped, for those not authenticated yet.

A connection is counted against its address from the accept until it
presents a session certificate (in the TLS handshake); one without (the
API's login, health and ca; a peer stalling its handshake) counts for its
whole life. Past :data:`UNAUTHENTICATED_PER_ADDRESS`, an address's new
connections are closed at once, so one address cannot take the cluster's
descriptors with idle or half-open connections, while everyone else, and
every gateway with a certificate, is unaffected. One log line per episode
(an address going over the cap), not one per connection.
"""

from __future__ import annotations

import collections
import logging

log = logging.getLogger("wicket.cluster")

#: Enough for many people behind one NAT logging in at once, far from the
#: cluster's descriptors.
UNAUTHENTICATED_PER_ADDRESS = 64


class Slot:
    """One counted connection; :meth:`release` when it authenticated or ended."""

    __slots__ = ("_owner", "_host")

    def __init__(self, owner: "AddressSlots", host: str) -> None:
        self._owner, self._host = owner, host

    def release(self) -> None:
        """Idempotent."""
        if self._owner is not None:
            self._owner._release(self._host)
            self._owner = None


class AddressSlots:
    def __init__(self, limit: int = UNAUTHENTICATED_PER_ADDRESS) -> None:
        self.limit = limit
        self._held: collections.Counter[str] = collections.Counter()
        self._refused: collections.Counter[str] = collections.Counter()  # this episode, per address

    def take(self, host: str) -> Slot | None:
        """A slot for a new connection from ``host``, or None if it holds
        the limit already (close the connection)."""
        if self._held[host] >= self.limit:
            if not self._refused[host]:
                log.warning("connections_refused client_host=%s reason=%s action=%s", host,
                            f"{self.limit} connections without a session certificate are open from it",
                            "none needed if this is an attack; else find what opens them")
            self._refused[host] += 1
            return None
        self._held[host] += 1
        return Slot(self, host)

    def held(self, host: str) -> int:
        return self._held[host]

    def _release(self, host: str) -> None:
        self._held[host] -= 1
        if self._held[host] <= 0:
            del self._held[host]
            refused = self._refused.pop(host, 0)
            if refused:
                log.info("connections_refused_ended client_host=%s refused=%d", host, refused)

"""Refusals too many to audit one by one, counted per key and minute.

A peer that offers a certificate from another CA fails the TLS handshake
before it has any identity; a client that keeps guessing after the login
limit gets refusal after refusal (thousands a second). Auditing each would
let anyone flood the audit; auditing none hides them. :class:`Tally` counts
them per key (a source address; a user and address) and window (a minute
of the clock) and hands back one record per key and window once the window
is over: how many, the first and last time, and the first detail. A flood
of many keys is bounded too: past :data:`MAX_SOURCES` keys, the rest are
counted together under the key :data:`OVERFLOW`; and a caller may name a
group for each key (the client address of a user and address) and cap the
keys of one group in a window: past ``max_per_group``, the group's new keys
are counted together under ``(OVERFLOW, group)``. Without that, a client
past its address's limit could name a new user on every try, and every
try would be the first of its key.

Pure and synchronous (callers pass ``now``); the cluster notes refusals and
collects what is due from trio's thread.
"""

from __future__ import annotations

import collections
from collections.abc import Hashable
from typing import Any

import attrs

WINDOW = 60.0
MAX_SOURCES = 10_000
OVERFLOW = "*"


@attrs.define(slots=True)
class _Count:
    first: float
    last: float
    count: int
    error: str


class Tally:
    def __init__(self, *, window: float = WINDOW, max_sources: int = MAX_SOURCES,
                 max_per_group: int | None = None) -> None:
        self.window = window
        self.max_sources = max_sources
        self.max_per_group = max_per_group
        self._counts: dict[tuple[float, Hashable], _Count] = {}
        # Keys by name per (window start, group), while the window is open.
        self._group_keys: collections.Counter[tuple[float, Hashable]] = collections.Counter()

    def note(self, key: Hashable, error: str, now: float, *, group: Hashable = None) -> bool:
        """Count one refusal; True if it is the first of its key in its
        window (a caller may record that one at once)."""
        start = now - now % self.window
        slot = (start, key)
        count = self._counts.get(slot)
        if count is None and group is not None and self.max_per_group is not None:
            if self._group_keys[(start, group)] >= self.max_per_group:
                slot = (start, (OVERFLOW, group))
                count = self._counts.get(slot)
            elif len(self._counts) < self.max_sources:  # (else counted under OVERFLOW below)
                self._group_keys[(start, group)] += 1
        if count is None and len(self._counts) >= self.max_sources:
            slot = (start, OVERFLOW)
            count = self._counts.get(slot)
        if count is None:
            self._counts[slot] = _Count(first=now, last=now, count=1, error=error)
            return True
        count.last = now
        count.count += 1
        return False

    def due(self, now: float) -> list[dict[str, Any]]:
        """Records of the windows over by ``now`` (each once), oldest first."""
        over = [slot for slot in self._counts if slot[0] + self.window <= now]
        for window in [window for window in self._group_keys if window[0] + self.window <= now]:
            del self._group_keys[window]
        return [self._record(slot) for slot in sorted(over, key=_order)]

    def drain(self) -> list[dict[str, Any]]:
        """Every record, over or not (the cluster is stopping)."""
        self._group_keys.clear()
        return [self._record(slot) for slot in sorted(self._counts, key=_order)]

    def _record(self, slot: tuple[float, Hashable]) -> dict[str, Any]:
        count = self._counts.pop(slot)
        return {"key": slot[1], "count": count.count, "first_seen": count.first,
                "last_seen": count.last, "window_seconds": self.window, "error": count.error}

    def __len__(self) -> int:
        return len(self._counts)


def _order(slot: tuple[float, Hashable]) -> tuple[float, str]:
    return slot[0], repr(slot[1])  # keys of different types sort too

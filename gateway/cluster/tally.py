"""Refusals too many to audit one by one, counted per source and minute.

A peer that offers a certificate from another CA fails the TLS handshake
before it has any identity. Auditing each such handshake would let anyone
flood the audit; auditing none (as before) hid them. :class:`Tally` counts
them per source and window (a minute of the clock) and hands back one
record per source and window once the window is over: how many, the first
and last time, and the first error. A flood from many addresses is bounded
too: past :data:`MAX_SOURCES` sources in a window, the rest are counted
together under the source ``*``.

Pure and synchronous (callers pass ``now``); the cluster notes refusals and
collects what is due from trio's thread.
"""

from __future__ import annotations

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
    def __init__(self, *, window: float = WINDOW, max_sources: int = MAX_SOURCES) -> None:
        self.window = window
        self.max_sources = max_sources
        self._counts: dict[tuple[float, str], _Count] = {}

    def note(self, source: str, error: str, now: float) -> None:
        start = now - now % self.window
        key = (start, source)
        count = self._counts.get(key)
        if count is None and len(self._counts) >= self.max_sources:
            key = (start, OVERFLOW)
            count = self._counts.get(key)
        if count is None:
            self._counts[key] = _Count(first=now, last=now, count=1, error=error)
        else:
            count.last = now
            count.count += 1

    def due(self, now: float) -> list[dict[str, Any]]:
        """Records of the windows over by ``now`` (each once), oldest first."""
        over = [key for key in self._counts if key[0] + self.window <= now]
        return [self._record(key) for key in sorted(over)]

    def drain(self) -> list[dict[str, Any]]:
        """Every record, over or not (the cluster is stopping)."""
        return [self._record(key) for key in sorted(self._counts)]

    def _record(self, key: tuple[float, str]) -> dict[str, Any]:
        count = self._counts.pop(key)
        return {"client_host": key[1], "count": count.count, "first_seen": count.first,
                "last_seen": count.last, "window_seconds": self.window, "error": count.error}

    def __len__(self) -> int:
        return len(self._counts)

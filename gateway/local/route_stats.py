"""What a resource's local route counts, for `wicket agent`'s /metrics:
sessions ended, bytes each way, dials refused by the cluster's error code,
dials that got no answer, and how long the cluster took to answer: a
session's dial from the client's arrival (a session started again on a new
connection counts from its first arrival too), and, apart, control dials
(a PostgreSQL cancel, a MySQL USE asked of the cluster, a
``--check-upstreams`` probe) from their start, since a cancel first waits
for the session's earlier bytes and would blur the sessions' figures. Each
a histogram in :data:`DIAL_BUCKETS`. Updated from trio's thread and the
relay engine's, once per session start and end: a lock, not a hot path.
"""

from __future__ import annotations

import bisect
import collections
import threading

#: The dial latency histograms' upper bounds, in seconds (a local dial is
#: milliseconds; a cluster far away or waking up, seconds).
DIAL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    """Counts per bucket of DIAL_BUCKETS (the last: slower than all) and
    the sum, under the owner's lock."""

    def __init__(self) -> None:
        self.counts = [0] * (len(DIAL_BUCKETS) + 1)
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        self.counts[bisect.bisect_left(DIAL_BUCKETS, seconds)] += 1
        self.sum += seconds

    def cumulative(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative (upper bound, count) pairs ending with +Inf, and the
        sum of the seconds: Prometheus's histogram."""
        buckets, running = [], 0
        for bound, count in zip([*map(str, DIAL_BUCKETS), "+Inf"], self.counts):
            running += count
            buckets.append((bound, running))
        return buckets, self.sum


class RouteStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sessions = 0
        self.sent = 0  # client -> resource
        self.received = 0  # resource -> client
        self.refused: collections.Counter[str] = collections.Counter()
        self.failed = 0
        self.dials = Histogram()
        self.control_dials = Histogram()

    def ended(self, sent: int, received: int) -> None:
        with self._lock:
            self.sessions += 1
            self.sent += sent
            self.received += received

    def refusal(self, code: str) -> None:
        with self._lock:
            self.refused[code] += 1

    def failure(self) -> None:
        with self._lock:
            self.failed += 1

    def answered(self, seconds: float | None) -> None:
        """The cluster answered a session's dial (accepted or refused)
        ``seconds`` after the client arrived."""
        if seconds is None:
            return
        with self._lock:
            self.dials.observe(seconds)

    def control_answered(self, seconds: float) -> None:
        """The cluster answered a control dial ``seconds`` after it began."""
        with self._lock:
            self.control_dials.observe(seconds)

    def dial_histogram(self) -> tuple[list[tuple[str, int]], float]:
        """The sessions' dials: see :meth:`Histogram.cumulative`."""
        with self._lock:
            return self.dials.cumulative()

    def control_histogram(self) -> tuple[list[tuple[str, int]], float]:
        with self._lock:
            return self.control_dials.cumulative()

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"sessions": self.sessions, "sent": self.sent, "received": self.received,
                    "refused": dict(self.refused), "failed": self.failed}

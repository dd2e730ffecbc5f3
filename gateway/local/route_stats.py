"""What a resource's local route counts, for `wicket agent`'s /metrics:
sessions ended, bytes each way, dials refused by the cluster's error code,
dials that got no answer, and how long the cluster took to answer (from
the client's arrival: a histogram in :data:`DIAL_BUCKETS`). Updated from
trio's thread and the relay engine's, once per session start and end: a
lock, not a hot path.
"""

from __future__ import annotations

import bisect
import collections
import threading

#: The dial latency histogram's upper bounds, in seconds (a local dial is
#: milliseconds; a cluster far away or waking up, seconds).
DIAL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class RouteStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sessions = 0
        self.sent = 0  # client -> resource
        self.received = 0  # resource -> client
        self.refused: collections.Counter[str] = collections.Counter()
        self.failed = 0
        #: Answers per bucket of DIAL_BUCKETS (the last: slower than all).
        self.dial_counts = [0] * (len(DIAL_BUCKETS) + 1)
        self.dial_sum = 0.0

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
        """The cluster answered a dial (accepted or refused) ``seconds``
        after the client arrived."""
        if seconds is None:
            return
        seconds = max(seconds, 0.0)
        with self._lock:
            self.dial_counts[bisect.bisect_left(DIAL_BUCKETS, seconds)] += 1
            self.dial_sum += seconds

    def dial_histogram(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative (upper bound, count) pairs ending with +Inf, and the
        sum of the seconds: Prometheus's histogram."""
        with self._lock:
            counts, total = list(self.dial_counts), self.dial_sum
        buckets, running = [], 0
        for bound, count in zip([*map(str, DIAL_BUCKETS), "+Inf"], counts):
            running += count
            buckets.append((bound, running))
        return buckets, total

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"sessions": self.sessions, "sent": self.sent, "received": self.received,
                    "refused": dict(self.refused), "failed": self.failed}

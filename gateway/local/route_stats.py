"""What a resource's local route counts, for `wicket agent`'s /metrics:
sessions ended, bytes each way, dials refused by the cluster's error code
and dials that got no answer. Updated from trio's thread and the relay
engine's, once per session end: a lock, not a hot path.
"""

from __future__ import annotations

import collections
import threading


class RouteStats:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sessions = 0
        self.sent = 0  # client -> resource
        self.received = 0  # resource -> client
        self.refused: collections.Counter[str] = collections.Counter()
        self.failed = 0

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

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {"sessions": self.sessions, "sent": self.sent, "received": self.received,
                    "refused": dict(self.refused), "failed": self.failed}

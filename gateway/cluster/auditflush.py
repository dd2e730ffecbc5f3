"""The cluster's audit events, queued from any thread and written in batches.

Theory of operation
-------------------
Events arrive from trio's thread (a login, a session's start and end) and
from the relay engine's (the statement auditors run there, on each chunk
before it is forwarded). Both append to one deque (appends and poplefts are
thread-safe), and nothing that queues ever waits for the store.

trio's thread writes them: :meth:`AuditFlusher.run` wakes every
AUDIT_FLUSH_INTERVAL (or at once when a full batch of AUDIT_BATCH is
waiting) and writes what is queued through ``write`` (the store's worker,
one transaction per batch), so a steady stream of statements costs a few
large transactions a second. :meth:`AuditFlusher.audit` writes at once
(after what is queued, so order is kept): what the caller must know is on
record before it goes on. Each turn also asks the cluster's tallies
(refusals counted per minute, gateway/cluster/tally.py) to queue the
records of windows that are over; at the stop, all of them, then the last
flush, shielded.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Awaitable, Callable

import trio

log = logging.getLogger("wicket.cluster")

AUDIT_FLUSH_INTERVAL = 0.2
AUDIT_BATCH = 500

#: (event, user, fields, time): what the store's ``write_many`` takes.
Queued = tuple[str, str | None, dict[str, Any], float]


class AuditFlusher:
    """One per cluster. ``write(batch)`` writes a batch (on the store's
    thread); ``queue_tallies(now)`` queues the tallies' records of windows
    over by ``now`` (None: all, the cluster is stopping), on trio's thread,
    whenever ``tallies_waiting()`` says there may be some."""

    def __init__(self, write: Callable[[list[Queued]], Awaitable[None]],
                 queue_tallies: Callable[[float | None], None], tallies_waiting: Callable[[], bool]) -> None:
        self._write = write
        self._queue_tallies = queue_tallies
        self._tallies_waiting = tallies_waiting
        # Appended to from trio's thread and from the relay engine's (the
        # PostgreSQL auditors run there): a deque, drained with popleft.
        self.pending: collections.deque[Queued] = collections.deque()
        self._audit_wakeup = trio.Event()
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._trio_thread: int | None = None
        self._wake_requested = False

    async def audit(self, event: str, user: str | None, **fields: Any) -> None:
        """Write an event now (after any batched ones, so order is kept)."""
        self.pending.append((event, user, fields, time.time()))
        await self.flush_audit()

    def audit_fields_soon(self, event: str, user: str | None, fields: dict[str, Any]) -> None:
        """Queue a high-volume event (a statement), with the fields as a
        dict the caller gives up; written within AUDIT_FLUSH_INTERVAL, in
        order, many per transaction. Safe to call from any thread (the relay
        engine's audit taps do)."""
        self.pending.append((event, user, fields, time.time()))
        if len(self.pending) >= AUDIT_BATCH:
            if threading.get_ident() == self._trio_thread:
                self._audit_wakeup.set()
            elif self._trio_token is not None and not self._wake_requested:
                self._wake_requested = True
                try:
                    self._trio_token.run_sync_soon(self._wake_flusher)
                except trio.RunFinishedError:
                    pass

    def _wake_flusher(self) -> None:
        self._wake_requested = False
        self._audit_wakeup.set()

    async def flush_audit(self, *, backlog: bool = False) -> None:
        """Write the queued events, in batches. ``backlog``: only while a
        full batch (AUDIT_BATCH) is waiting after the first: the flusher's
        timer takes the rest with the next interval's, so a steady stream
        of statements is written in a few large transactions a second,
        not in one small one per store round trip."""
        pending = self.pending
        while pending:
            # popleft, not a swap: another thread may append meanwhile.
            batch = [pending.popleft() for _ in range(len(pending))]
            try:
                await self._write(batch)
            except Exception:
                # One bad event must not lose the batch or stop auditing:
                # write them one by one and log what cannot be written.
                for event in batch:
                    try:
                        await self._write([event])
                    except Exception:
                        log.exception("audit_write_failed event=%s user=%s action=%s", event[0], event[1],
                                      "check the store (disk full? permissions?)")
            if backlog and len(pending) < AUDIT_BATCH:
                break

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        self._trio_token = trio.lowlevel.current_trio_token()
        self._trio_thread = threading.get_ident()
        task_status.started()
        try:
            while True:
                with trio.move_on_after(AUDIT_FLUSH_INTERVAL):
                    await self._audit_wakeup.wait()
                self._audit_wakeup = trio.Event()
                if self._tallies_waiting():
                    self._queue_tallies(time.time())
                await self.flush_audit(backlog=True)
        finally:
            self._queue_tallies(None)
            with trio.CancelScope(shield=True):
                await self.flush_audit()

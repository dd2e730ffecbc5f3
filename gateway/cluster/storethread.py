"""The cluster's store calls, one at a time on one thread of its own.

The store is synchronous SQLite; the event loop must never wait on a disk
sync, so every call runs on another thread (``Cluster.db``). One thread,
not trio's thread cache: a store call is a few hundred microseconds and
runs hundreds of times a second (the audit's batches, the snapshot's
reloads, logins), and trio names its cached worker after each job's
function and task and back (two renames per call, and names like ``None
from gateway...`` where the job is a ``partial``). This thread is named
``wicket-store`` once, so ``top -H`` and the benchmarks' CPU per thread
(benchmarks/procstat.py's ``thread_cpu``) show what the store costs.

Calls run in the order they were made (a FIFO queue), as
``CapacityLimiter(1)`` handed out turns before: a long prune, batch by
batch, lets the logins queued meanwhile in between. A caller cancelled
while its call waits for its turn gives up at once; once the call runs,
it is waited for (as ``trio.to_thread.run_sync`` does).
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable, TypeVar

import outcome
import trio

from gateway.net.threadname import name_os_thread

T = TypeVar("T")

NAME = "wicket-store"

_QUEUED, _RUNNING, _CANCELLED = range(3)


class _Call:
    __slots__ = ("fn", "token", "task", "state")

    def __init__(self, fn: Callable[[], Any], token: trio.lowlevel.TrioToken, task: trio.lowlevel.Task) -> None:
        self.fn, self.token, self.task = fn, token, task
        self.state = _QUEUED


class StoreThread:
    """``await run(fn)``: ``fn()`` on the store's thread (started on the
    first call); :meth:`close` ends the thread once the calls made are done."""

    def __init__(self, name: str = NAME) -> None:
        self.name = name
        self._calls: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    async def run(self, fn: Callable[[], T]) -> T:
        """(trio) ``fn()``'s result, or what it raised."""
        await trio.lowlevel.checkpoint_if_cancelled()
        call = _Call(fn, trio.lowlevel.current_trio_token(), trio.lowlevel.current_task())
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()
        self._calls.put(call)

        def abort(_raise_cancel) -> trio.lowlevel.Abort:
            with self._lock:
                if call.state == _QUEUED:
                    call.state = _CANCELLED
                    return trio.lowlevel.Abort.SUCCEEDED
            return trio.lowlevel.Abort.FAILED  # running: its result is on its way

        return await trio.lowlevel.wait_task_rescheduled(abort)

    def close(self) -> None:
        """End the thread after the calls already made (any thread but it)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._calls.put(None)
            thread.join()

    def _work(self) -> None:
        name_os_thread(self.name.encode()[:15])
        while True:
            call = self._calls.get()
            if call is None:
                return
            with self._lock:
                if call.state == _CANCELLED:
                    continue
                call.state = _RUNNING
            result = outcome.capture(call.fn)
            try:
                call.token.run_sync_soon(trio.lowlevel.reschedule, call.task, result)
            except trio.RunFinishedError:
                pass  # its trio run is over: no one is waiting

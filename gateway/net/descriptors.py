"""The process's file descriptors: how many it may open, how many it keeps
in reserve, and accepting that backs off quietly when they run out.

Every connection and every upstream socket is a descriptor, and the soft
``RLIMIT_NOFILE`` is often 1,024 while the hard limit the system allows is
far higher: :func:`raise_open_files_limit` lifts the soft limit to the hard
one at start (both the cluster and the gateway call it). :class:`Budget`
says how many of them sessions may take: all but a reserve, left for what
must keep working when sessions fill the rest (the cluster's API, its
store and audit files, an operator's admin work; the gateway's connection
to the cluster).

Running out anyway (another process, the system's own limit) shows as
EMFILE/ENFILE on ``accept``. :func:`serve_listeners` (trio's listeners) and
the relay engine's listener pause accepting for a moment then, the clients
waiting in the kernel's backlog, and log one line when it starts and one
when it ends (:class:`Starvation`), never one per attempt: trio's own
``serve_listeners`` logs a traceback ten times a second.
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import time
from typing import Any, Awaitable, Callable

import attrs
import trio

__all__ = ["ACCEPT_STARVED", "Budget", "Starvation", "open_files_limit", "raise_open_files_limit",
           "serve_listeners"]

log = logging.getLogger("wicket.descriptors")

#: accept(2)'s errors that mean "out of descriptors or kernel memory for
#: now": wait, then try again.
ACCEPT_STARVED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
#: The first pause after such an error; it doubles while they go on.
ACCEPT_PAUSE = 0.1
ACCEPT_PAUSE_MAX = 1.0
#: The reserve's bounds: a fraction of the limit (1/8), at least enough for
#: a few API calls and the store, at most what that ever needs.
RESERVE_MIN, RESERVE_MAX = 32, 1024


def open_files_limit() -> int:
    """The soft RLIMIT_NOFILE now."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def raise_open_files_limit() -> tuple[int, int]:
    """Lift the soft RLIMIT_NOFILE to the hard limit; (before, after). Where
    the system refuses (a hard limit of infinity above the kernel's
    ``nr_open``), the soft limit stays as it was."""
    soft, hard = real_hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                hard = int(f.read())
        except (OSError, ValueError):
            hard = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, real_hard[1]))
        except (ValueError, OSError) as exc:
            log.warning("open_files_limit_kept limit=%d error=%s", soft, exc)
            return soft, soft
    return soft, open_files_limit()


def default_reserve(limit: int) -> int:
    return max(RESERVE_MIN, min(RESERVE_MAX, limit // 8))


@attrs.frozen(slots=True)
class Budget:
    """``limit`` descriptors, of which sessions may hold all but ``reserve``."""

    limit: int
    reserve: int

    @classmethod
    def of_process(cls, reserve: int | None = None) -> "Budget":
        limit = open_files_limit()
        return cls(limit, default_reserve(limit) if reserve is None else reserve)

    @property
    def for_sessions(self) -> int:
        return max(0, self.limit - self.reserve)


class Starvation:
    """One episode of accept(2) failing for lack of descriptors or memory:
    one log line at its start, one at its end (with how many attempts failed
    and for how long). Used by one thread at a time."""

    __slots__ = ("where", "since", "failures", "pause")

    def __init__(self, where: str) -> None:
        self.where = where
        self.since = 0.0
        self.failures = 0
        self.pause = ACCEPT_PAUSE

    @property
    def active(self) -> bool:
        return self.failures > 0

    def failed(self, exc: OSError) -> float:
        """accept failed with ``exc`` (one of :data:`ACCEPT_STARVED`): how
        long to pause before the next attempt."""
        if not self.failures:
            self.since = time.monotonic()
            self.pause = ACCEPT_PAUSE
            log.warning("accept_paused listener=%s error=%s action=%s", self.where,
                        errno.errorcode.get(exc.errno, exc.errno),
                        "waiting for descriptors to be freed; if this lasts, raise the open files limit "
                        "(ulimit -n, LimitNOFILE=) or find what holds so many connections")
        else:
            self.pause = min(ACCEPT_PAUSE_MAX, self.pause * 2)
        self.failures += 1
        return self.pause

    def accepted(self) -> None:
        """accept worked again: the episode is over (cheap when none is on)."""
        if self.failures:
            log.info("accept_resumed listener=%s failed_attempts=%d paused_for=%.1fs", self.where,
                     self.failures, time.monotonic() - self.since)
            self.failures = 0


async def serve_listeners(handler: Callable[[Any], Awaitable[object]], listeners: list[trio.SocketListener], *,
                          handler_nursery: trio.Nursery | None = None, name: str = "listener",
                          task_status=trio.TASK_STATUS_IGNORED) -> None:
    """trio.serve_listeners, but running out of descriptors pauses each
    listener quietly (:class:`Starvation`) instead of logging a traceback
    per attempt. Each connection's handler gets its stream and closes it."""

    async def run(stream) -> None:
        try:
            await handler(stream)
        finally:
            await trio.aclose_forcefully(stream)

    async def one(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        starved = Starvation(name)
        async with listener:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:
                    if exc.errno not in ACCEPT_STARVED:
                        raise
                    await trio.sleep(starved.failed(exc))
                    continue
                starved.accepted()
                nursery.start_soon(run, stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(one, listener, handler_nursery or nursery)
        task_status.started(listeners)


def count_open() -> int | None:
    """Descriptors open in this process now (Linux: /proc/self/fd); None
    where that cannot be read. Costs a directory read: not per connection."""
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # the listing's own
    except OSError:
        return None

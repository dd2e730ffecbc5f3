"""Where new clients wait while the cluster cannot be reached.

A cluster restarting, not up yet, or a network switching: a connect fails at
once, in a way that passes within seconds (:class:`ClusterError`'s
``passing``). Rather than turning a client away, its proxy tries again for
up to ``--wait-for-cluster`` seconds (:func:`ride_out`), and a
:class:`WaitRoom` bounds how many wait at once.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, TypeVar

import trio

from gateway.local.connect import ClusterError

#: How long a new session waits, by default, while the cluster cannot be
#: reached at all (it is restarting, not up yet, the network is switching)
#: before the client is turned away; `wicket proxy --wait-for-cluster`.
RIDE_OUT = 10.0
#: The first pause between attempts meanwhile, doubled up to the last.
RIDE_OUT_PAUSES = (0.1, 1.0)
#: Clients of one proxy that may wait so at once.
WAITING_MAX = 512

log = logging.getLogger("wicket.client")

T = TypeVar("T")


class ClientGone(Exception):
    """The client left while it waited for the cluster (:func:`ride_out`)."""


async def ride_out(attempt: Callable[[], Awaitable[T]], deadline: float,
                   on_wait: Callable[[ClusterError], None] | None = None,
                   gone: Callable[[], bool] | None = None) -> T:
    """``attempt()``, again while it fails with a :class:`ClusterError` that
    may pass (a cluster restarting or not up yet), until ``deadline`` (trio
    time): pauses of 0.1 s, doubling to 1 s, and a last attempt at the
    deadline. ``on_wait`` hears the first such failure (to say why the
    client waits). The last failure is raised, saying how long it waited.
    (An attempt started before the deadline may take its own timeouts.)
    Raises :class:`ClientGone` instead once ``gone()`` says so (asked
    before each further attempt)."""
    pause, longest = RIDE_OUT_PAUSES
    started = trio.current_time()
    waited = False
    while True:
        try:
            return await attempt()
        except ClusterError as exc:
            left = deadline - trio.current_time()
            if not exc.passing or left <= 0:
                if not waited:
                    raise
                # A new error: the one caught may be another waiter's too.
                waited_for = round(trio.current_time() - started, 1)
                raise ClusterError(exc.code, f"waited {waited_for:g}s for the cluster: {exc.message}",
                                   passing=exc.passing) from None
            if not waited and on_wait is not None:
                on_wait(exc)
            waited = True
        await trio.sleep(min(pause, left))
        pause = min(pause * 2, longest)
        if gone is not None and gone():
            raise ClientGone()


class WaitRoom:
    """Where one proxy's new clients wait for a cluster that cannot be
    reached (:func:`ride_out`): each for up to ``wait`` seconds, and at most
    WAITING_MAX at once (past that, clients that gave up and came again
    must not pile up sockets and tasks: the next is turned away at once).
    Only clients that met a failure that may pass count as waiting."""

    def __init__(self, resource: str, wait: float) -> None:
        self.resource, self.wait = resource, wait
        self.waiting = 0

    def deadline(self) -> float:
        """Until when a client arriving now may wait (trio time)."""
        return trio.current_time() + self.wait

    async def ride_out(self, attempt: Callable[[], Awaitable[T]], deadline: float, client_addr: str,
                       gone: Callable[[], bool]) -> T:
        """:func:`ride_out`, counted, with the log line of a client that waits."""
        waits = False

        def on_wait(exc: ClusterError) -> None:
            nonlocal waits
            if self.waiting >= WAITING_MAX:
                log.warning("cluster_wait_full resource=%s client=%s waiting=%d", self.resource, client_addr,
                            self.waiting)
                raise exc  # turned away at once, with the failure as it is
            self.waiting += 1
            waits = True
            log.info("cluster_wait resource=%s client=%s wait=%gs error=%r", self.resource, client_addr,
                     max(0.0, deadline - trio.current_time()), exc.message)

        try:
            return await ride_out(attempt, deadline, on_wait, gone)
        finally:
            if waits:
                self.waiting -= 1

"""gateway/net/descriptors.py: the open files limit, the reserve, and
accepting that pauses quietly when descriptors run out."""

from __future__ import annotations

import errno
import logging
import resource

import pytest
import trio
import trio.testing

from gateway.net import descriptors
from gateway.net.descriptors import Budget, Starvation, serve_listeners


def test_the_soft_limit_is_raised_to_the_hard_one():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 64:
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
        before, after = descriptors.raise_open_files_limit()
        assert after == descriptors.open_files_limit() >= before
        if hard != resource.RLIM_INFINITY:
            assert after == hard
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@pytest.mark.parametrize("limit, reserve", [(64, 32), (1024, 128), (20000, 1024), (1 << 20, 1024)])
def test_the_reserve_is_an_eighth_within_bounds(limit, reserve):
    assert descriptors.default_reserve(limit) == reserve
    assert Budget(limit, reserve).for_sessions == limit - reserve


def test_an_episode_is_logged_once_at_each_end(caplog):
    caplog.set_level(logging.INFO, "wicket.descriptors")
    starved = Starvation("test")
    starved.accepted()  # nothing going on: nothing said
    pauses = [starved.failed(OSError(errno.EMFILE, "Too many open files")) for _ in range(10)]
    assert pauses[0] == descriptors.ACCEPT_PAUSE and pauses[-1] == descriptors.ACCEPT_PAUSE_MAX
    assert pauses == sorted(pauses)
    starved.accepted()
    starved.accepted()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2, lines
    assert lines[0].startswith("accept_paused listener=test error=EMFILE")
    assert lines[1].startswith("accept_resumed listener=test failed_attempts=10")
    assert not any(r.exc_info for r in caplog.records)
    starved.failed(OSError(errno.ENFILE, "Too many open files in system"))  # a new episode
    assert caplog.records[-1].getMessage().startswith("accept_paused listener=test error=ENFILE")


class _Starving(trio.abc.Listener):
    """Fails ``failures`` accepts with EMFILE, then hands out one stream."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.served = trio.Event()

    async def accept(self):
        await trio.lowlevel.checkpoint()
        if self.failures:
            self.failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        if self.served.is_set():
            await trio.sleep_forever()
        self.served.set()
        a, _b = trio.testing.memory_stream_pair()
        return a

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_serve_listeners_pauses_without_a_traceback(caplog, autojump_clock):
    caplog.set_level(logging.DEBUG)
    listener = _Starving(5)
    handled = []

    async def handler(stream) -> None:
        handled.append(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_listeners, handler, [listener])
        await listener.served.wait()
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert len(handled) == 1
    messages = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("accept_paused") for m in messages) == 1
    assert sum(m.startswith("accept_resumed") for m in messages) == 1
    assert not any(r.exc_info for r in caplog.records)


async def test_other_accept_errors_are_not_swallowed():
    class Broken(_Starving):
        async def accept(self):
            await trio.lowlevel.checkpoint()
            raise OSError(errno.EBADF, "Bad file descriptor")

    with pytest.raises(BaseExceptionGroup) as info:
        async with trio.open_nursery() as nursery:
            await nursery.start(serve_listeners, lambda s: None, [Broken(0)])
    assert info.group_contains(OSError)

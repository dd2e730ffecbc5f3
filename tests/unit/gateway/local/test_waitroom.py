"""gateway/local/waitroom.py without a cluster: which failures to reach the
cluster a new session waits out (:func:`ride_out`, :class:`WaitRoom`), for
how long, and what the person is told. Time is trio's mock clock, so the
waits cost nothing; the real thing (a cluster restarted under a running
proxy) is in tests/integration/test_tcp_cluster_restarts.py.
"""

from __future__ import annotations

import pytest
import trio
import trio.testing

from gateway.local import waitroom
from gateway.local.connect import ClusterError
from gateway.local.waitroom import ClientGone, WaitRoom, ride_out


def refused() -> ClusterError:
    return ClusterError("unreachable", "cannot reach the cluster: Connection refused", passing=True)


class Attempts:
    """Fails with ``failures`` in turn, then returns "up"; notes when."""

    def __init__(self, *failures: ClusterError) -> None:
        self.failures = list(failures)
        self.times: list[float] = []

    async def __call__(self) -> str:
        self.times.append(trio.current_time())
        if self.failures:
            raise self.failures.pop(0)
        return "up"


@pytest.fixture
def autojump_clock():
    return trio.testing.MockClock(autojump_threshold=0)


def within(seconds: float) -> float:
    return trio.current_time() + seconds


async def test_a_cluster_back_within_the_wait_is_ridden_out(autojump_clock):
    attempt, heard = Attempts(refused(), refused(), refused()), []
    assert await ride_out(attempt, within(10), heard.append) == "up"
    start = attempt.times[0]
    assert [round(t - start, 3) for t in attempt.times] == [0, 0.1, 0.3, 0.7]  # pauses double
    assert len(heard) == 1  # the first failure is reported, once


async def test_a_cluster_still_down_is_given_up_on_after_a_last_attempt_at_the_deadline(autojump_clock):
    attempt = Attempts(*[refused() for _ in range(100)])
    start = trio.current_time()
    with pytest.raises(ClusterError) as info:
        await ride_out(attempt, within(5), None)
    assert trio.current_time() - start == pytest.approx(5)
    times = [round(t - start, 3) for t in attempt.times]
    assert times[:6] == [0, 0.1, 0.3, 0.7, 1.5, 2.5] and times[-1] == 5  # at most 1 s apart, the last on time
    assert info.value.message == "waited 5s for the cluster: cannot reach the cluster: Connection refused"
    assert info.value.passing


async def test_waiters_sharing_one_failure_each_say_how_long_they_waited(autojump_clock):
    # MuxDialer.link hands one connect's failure to every client that waited
    # for it; each client's own message must not compound the others'.
    shared = refused()
    messages = []

    async def one(wait: float) -> None:
        with pytest.raises(ClusterError) as info:
            await ride_out(Attempts(*[shared] * 100), within(wait), None)
        messages.append(info.value.message)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one, 2)
        nursery.start_soon(one, 3)
    refusal = "cannot reach the cluster: Connection refused"
    assert messages == [f"waited {n}s for the cluster: {refusal}" for n in (2, 3)]
    assert shared.message == "cannot reach the cluster: Connection refused"


async def test_failures_that_will_not_pass_are_reported_at_once(autojump_clock):
    # A certificate the cluster does not take, or a connect that already
    # waited CONNECT_TIMEOUT for an answer: waiting more would not help.
    failure = ClusterError("cert_invalid", "the cluster presented a certificate we do not trust")
    attempt = Attempts(failure)
    with pytest.raises(ClusterError) as info:
        await ride_out(attempt, within(10), None)
    assert info.value is failure and "waited" not in info.value.message
    assert len(attempt.times) == 1


async def test_no_wait_means_one_attempt(autojump_clock):
    attempt = Attempts(refused())
    with pytest.raises(ClusterError) as info:
        await ride_out(attempt, within(0), None)
    assert len(attempt.times) == 1 and "waited" not in info.value.message


async def test_a_client_that_left_stops_its_wait(autojump_clock):
    attempt = Attempts(*[refused() for _ in range(100)])
    with pytest.raises(ClientGone):
        await ride_out(attempt, within(10), None, lambda: len(attempt.times) == 3)
    assert len(attempt.times) == 3


async def test_past_the_limit_of_waiting_clients_the_next_is_turned_away_at_once(autojump_clock, monkeypatch):
    monkeypatch.setattr(waitroom, "WAITING_MAX", 2)
    room, outcomes = WaitRoom("r", 10), []
    cluster_back = trio.Event()

    async def attempt() -> str:
        if not cluster_back.is_set():
            raise refused()
        return "up"

    async def one(name: str) -> None:
        try:
            outcomes.append((name, await room.ride_out(attempt, room.deadline(), name, lambda: False)))
        except ClusterError as exc:
            outcomes.append((name, exc.message))

    async with trio.open_nursery() as nursery:
        for name in ("a", "b"):
            nursery.start_soon(one, name)
        await trio.testing.wait_all_tasks_blocked()
        assert room.waiting == 2
        await one("c")  # the room is full: one attempt, no wait
        cluster_back.set()
    assert outcomes[0] == ("c", "cannot reach the cluster: Connection refused")
    assert sorted(outcomes[1:]) == [("a", "up"), ("b", "up")]
    assert room.waiting == 0


async def test_only_clients_that_wait_count_against_the_limit(autojump_clock, monkeypatch):
    # A dial that is merely slow (a healthy cluster, a long PostgreSQL
    # login) is not waiting for the cluster: it must not fill the room.
    monkeypatch.setattr(waitroom, "WAITING_MAX", 1)
    room, done = WaitRoom("r", 10), trio.Event()

    async def slow_but_fine() -> str:
        await done.wait()
        return "up"

    async with trio.open_nursery() as nursery:
        nursery.start_soon(room.ride_out, slow_but_fine, room.deadline(), "slow", lambda: False)
        await trio.testing.wait_all_tasks_blocked()
        assert room.waiting == 0
        attempt = Attempts(refused(), refused())
        assert await room.ride_out(attempt, room.deadline(), "waits", lambda: False) == "up"
        assert len(attempt.times) == 3  # it was let in to wait
        done.set()
    assert room.waiting == 0

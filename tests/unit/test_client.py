"""gateway/local/client.py without a cluster: which failures to reach the
cluster a new session waits out (:func:`ride_out`), and for how long. Time
is trio's mock clock, so the waits cost nothing; the real thing (a cluster
restarted under a running proxy) is in tests/integration/test_tcp_route.py.
"""

from __future__ import annotations

import socket
import ssl

import pytest
import trio
import trio.testing

from gateway.local.client import ClusterError, _connect, ride_out


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


async def test_a_cluster_back_within_the_wait_is_ridden_out(autojump_clock):
    attempt, heard = Attempts(refused(), refused(), refused()), []
    assert await ride_out(attempt, 10, heard.append) == "up"
    start = attempt.times[0]
    assert [round(t - start, 3) for t in attempt.times] == [0, 0.1, 0.3, 0.7]  # pauses double
    assert len(heard) == 1  # the first failure is reported, once


async def test_a_cluster_still_down_is_given_up_on_after_the_wait(autojump_clock):
    attempt = Attempts(*[refused() for _ in range(100)])
    start = trio.current_time()
    with pytest.raises(ClusterError) as info:
        await ride_out(attempt, 5, None)
    assert 4 <= trio.current_time() - start <= 5
    assert max(b - a for a, b in zip(attempt.times, attempt.times[1:])) == pytest.approx(1.0)  # at most 1 s apart
    assert "Connection refused" in str(info.value) and "waited 5s for the cluster" in str(info.value)


async def test_failures_that_will_not_pass_are_reported_at_once(autojump_clock):
    # A certificate the cluster does not take, or a connect that already
    # waited CONNECT_TIMEOUT for an answer: waiting more would not help.
    failure = ClusterError("cert_invalid", "the cluster presented a certificate we do not trust")
    attempt = Attempts(failure)
    with pytest.raises(ClusterError) as info:
        await ride_out(attempt, 10, None)
    assert info.value is failure and "waited" not in info.value.message
    assert len(attempt.times) == 1


async def test_no_wait_means_one_attempt(autojump_clock):
    attempt = Attempts(refused())
    with pytest.raises(ClusterError) as info:
        await ride_out(attempt, 0, None)
    assert len(attempt.times) == 1 and "waited" not in info.value.message


async def test_a_refused_connect_may_pass_and_says_why():
    # A real connect to a port nobody listens on: trio reports it as one
    # OSError without an errno; the cause is found in its attempts.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(ClusterError) as info:
            await _connect("127.0.0.1", port, ssl.create_default_context(), "localhost")
    assert info.value.passing
    assert info.value.message == (f"cannot reach the cluster at 127.0.0.1:{port}: Connection refused; "
                                  f"is `wicket-cluster start` running there?")

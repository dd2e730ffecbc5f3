"""gateway/cluster/login_limits.py: growing waits after failed logins."""

from __future__ import annotations

from gateway.cluster.login_limits import FIRST_DELAY, wait

WINDOW = 300.0


def test_no_wait_below_the_threshold():
    assert wait(4, 100.0, 5, WINDOW, now=100.0) == 0.0


def test_the_wait_doubles_with_each_failure_beyond_and_is_capped_by_the_window():
    assert wait(5, 100.0, 5, WINDOW, now=100.0) == FIRST_DELAY
    assert wait(6, 100.0, 5, WINDOW, now=100.0) == 2 * FIRST_DELAY
    assert wait(7, 100.0, 5, WINDOW, now=105.0) == 4 * FIRST_DELAY - 5
    assert wait(50, 100.0, 5, WINDOW, now=100.0) == WINDOW
    assert wait(10**6, 100.0, 5, WINDOW, now=100.0) == WINDOW  # no overflow however many


def test_the_wait_runs_from_the_last_failure():
    assert wait(5, 100.0, 5, WINDOW, now=100.0 + FIRST_DELAY) == 0.0


def test_attempts_in_progress_count_from_now():
    assert wait(5, None, 5, WINDOW, now=100.0) == FIRST_DELAY

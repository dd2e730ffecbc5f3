"""gateway.cluster.sharedcounts: counts every worker of a cluster sees
(two views of one file stand for two workers), a dead worker's column
dropped, rows of finished keys reclaimed."""

from __future__ import annotations

import pytest

from gateway.cluster import sharedcounts
from gateway.cluster.sharedcounts import SharedCounts, WorkerPlace


@pytest.fixture
def pair(tmp_path):
    path = tmp_path / "workers.counts"
    sharedcounts.create(path, 2)
    a, b = SharedCounts(path, 2, 0), SharedCounts(path, 2, 1)
    yield a, b
    a.close()
    b.close()


def test_a_limit_holds_across_workers(pair):
    a, b = pair
    assert a.take(("user", "alice"), 3) and b.take(("user", "alice"), 3) and a.take(("user", "alice"), 3)
    assert not b.take(("user", "alice"), 3) and not a.take(("user", "alice"), 3)
    assert b.take(("user", "bob"), 3)  # another key has its own count
    assert a.total(("user", "alice")) == 3 and b.total(("user", "alice")) == 3
    assert b.add(("user", "alice"), -1) == 2
    assert a.take(("user", "alice"), 3)


def test_a_worker_never_takes_back_what_another_counted(pair):
    a, b = pair
    assert a.add(("host", "10.0.0.1")) == 1
    assert b.add(("host", "10.0.0.1"), -1) == 1  # b counted nothing: its count stays at 0
    assert b.add(("nobody",), -1) == 0  # an unknown key is not made up


def test_a_dead_workers_counts_are_dropped(pair, tmp_path):
    a, b = pair
    for _ in range(2):
        b.add(("user", "alice"))
    a.add(("user", "alice"))
    supervisor = SharedCounts(tmp_path / "workers.counts", 2, 0)
    supervisor.clear_worker(1)
    supervisor.close()
    assert a.total(("user", "alice")) == 1


def test_finished_keys_are_reclaimed_when_the_table_fills(tmp_path, monkeypatch):
    monkeypatch.setattr(sharedcounts, "SLOTS", 16)
    path = tmp_path / "workers.counts"
    sharedcounts.create(path, 1)
    counts = SharedCounts(path, 1, 0)
    counts.add(("held",))
    for n in range(100):  # far more keys than slots, each ended before the next
        assert counts.take(("user", str(n)), 1)
        counts.add(("user", str(n)), -1)
    assert counts.total(("held",)) == 1  # survived every compaction
    for n in range(7):  # half the table: then it is full of live keys
        assert counts.take(("live", str(n)), 5)
    assert counts.take(("one too many",), 5)  # no room: allowed, counted per worker only
    counts.close()


def test_a_table_for_another_number_of_workers_is_refused(tmp_path):
    path = tmp_path / "workers.counts"
    sharedcounts.create(path, 2)
    with pytest.raises(ValueError, match="not a table for 3 workers"):
        SharedCounts(path, 3, 0)
    with pytest.raises(ValueError):
        SharedCounts(path, 2, 2)


def test_a_budget_split_between_workers_is_rounded_up():
    place = WorkerPlace(index=0, count=3, counts=None)
    assert place.share(4) == 2 and place.share(64, least=8) == 22 and place.share(1) == 1
    assert WorkerPlace(index=0, count=64, counts=None).share(64, least=8) == 8

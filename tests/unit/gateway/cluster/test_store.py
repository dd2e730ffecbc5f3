"""gateway.cluster.store: pruning the audit a batch at a time, and reading
all of it a page at a time. (The rest of the store: tests/unit/test_store.py.)"""

from __future__ import annotations

import pytest

from gateway.cluster.store import Store


@pytest.fixture
def store(tmp_path):
    with Store.open(tmp_path / "wicket.db") as s:
        s.append_audit_many([("test.event", f"u{i % 3}", {"i": i}, 100.0 + i) for i in range(25)])
        yield s


def test_prune_batch_deletes_the_oldest_first_and_at_most_its_limit(store):
    assert store.prune_audit_batch(110.0, 4) == 4
    assert [e.fields["i"] for e in store.query_audit()][:2] == [4, 5]
    assert store.prune_audit_batch(110.0, 100) == 6  # fewer than the limit: none older left
    assert store.prune_audit_batch(110.0, 100) == 0
    assert [e.fields["i"] for e in store.query_audit()][0] == 10
    with pytest.raises(ValueError):
        store.prune_audit_batch(110.0, 0)


@pytest.mark.parametrize("page", [1, 2, 7, 25, 1000])
def test_iter_audit_reads_every_event_in_the_window_page_by_page(store, page):
    everything = store.query_audit()
    assert list(store.iter_audit(page=page)) == everything
    window = [e for e in everything if 105.0 <= e.time < 117.0]
    assert list(store.iter_audit(105.0, 117.0, page=page)) == window and len(window) == 12
    assert list(store.iter_audit(since=124.0, page=page)) == everything[-1:]
    assert list(store.iter_audit(until=100.0, page=page)) == []


def test_iter_audit_holds_one_page(store, monkeypatch):
    """An export of any size: each read fetches one page."""
    fetched: list[int] = []
    events = store.iter_audit(page=10)
    real_read = store._read

    def counting_read():
        fetched.append(1)
        return real_read()

    monkeypatch.setattr(store, "_read", counting_read)
    first = next(events)
    assert first.fields["i"] == 0 and len(fetched) == 1  # one page read, not the table
    assert len(list(events)) == 24 and len(fetched) == 3


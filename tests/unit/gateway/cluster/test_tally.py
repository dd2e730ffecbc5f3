"""gateway/cluster/tally.py: refusals counted per source and minute."""

from __future__ import annotations

from gateway.cluster.tally import OVERFLOW, Tally


def test_one_record_per_source_and_window_once_it_is_over():
    tally = Tally(window=60.0)
    firsts = [tally.note("192.0.2.1", f"error at {now}", now) for now in (120.0, 130.5, 179.0)]
    assert firsts == [True, False, False]
    tally.note("192.0.2.2", "other", 150.0)
    assert tally.note("192.0.2.1", "next minute", 181.0)  # a new window
    assert tally.due(179.9) == []  # the first minute is not over yet
    records = tally.due(180.0)
    assert [(r["key"], r["count"]) for r in records] == [("192.0.2.1", 3), ("192.0.2.2", 1)]
    assert records[0]["first_seen"] == 120.0 and records[0]["last_seen"] == 179.0
    assert records[0]["error"] == "error at 120.0"  # the first one's
    assert tally.due(200.0) == []  # each once
    assert [(r["key"], r["count"]) for r in tally.drain()] == [("192.0.2.1", 1)]
    assert not tally


def test_many_sources_are_bounded():
    tally = Tally(window=60.0, max_sources=3)
    for i in range(1000):
        tally.note(f"2001:db8::{i:x}", "x", 10.0)
    records = {r["key"]: r["count"] for r in tally.drain()}
    assert len(records) == 4 and records[OVERFLOW] == 997  # three by name, the rest together


def test_keys_of_any_shape():
    tally = Tally(window=60.0, max_sources=1)
    tally.note(("alice", "192.0.2.1"), "", 1.0)
    tally.note(("bob", "192.0.2.1"), "", 2.0)
    assert [(r["key"], r["count"]) for r in tally.drain()] == [("*", 1), (("alice", "192.0.2.1"), 1)]


def test_a_group_names_its_first_keys_and_counts_the_rest_together():
    """A client past its address's login limit names a new user on every
    try: each would be the first of its key, and audited in full."""
    tally = Tally(window=60.0, max_per_group=2)
    firsts = [tally.note((f"user{i}", "192.0.2.1"), "", 10.0 + i, group="192.0.2.1") for i in range(50)]
    assert firsts == [True, True, True] + [False] * 47  # two by name, then the group's overflow once
    assert tally.note(("user0", "192.0.2.1"), "", 59.5, group="192.0.2.1") is False  # a named key counts on
    assert tally.note(("other", "192.0.2.2"), "", 59.6, group="192.0.2.2") is True  # another group
    records = {r["key"]: r["count"] for r in tally.due(60.0)}
    assert records == {("user0", "192.0.2.1"): 2, ("user1", "192.0.2.1"): 1, (OVERFLOW, "192.0.2.1"): 48,
                       ("other", "192.0.2.2"): 1}
    # A new window names keys again.
    assert tally.note(("user9", "192.0.2.1"), "", 125.0, group="192.0.2.1") is True


def test_groups_are_bounded_too():
    tally = Tally(window=60.0, max_sources=3, max_per_group=2)
    for i in range(1000):
        tally.note(("u", f"2001:db8::{i:x}"), "", 10.0, group=f"2001:db8::{i:x}")
    assert len(tally._group_keys) <= 3  # memory: no more groups than keys by name
    assert {r["key"]: r["count"] for r in tally.drain()}[OVERFLOW] == 997

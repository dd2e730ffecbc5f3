"""gateway.cluster.core: audit retention gives the store's thread back
between batches; the [limits] on sessions and the cut's interrupt.
(Standing and which sessions a change cuts are in tests/unit/test_core.py.)"""

from __future__ import annotations

import time

import pytest
import trio

from gateway.cluster import config as cfg
from gateway.cluster import core
from gateway.cluster.core import Cluster


def _cluster(tmp_path) -> Cluster:
    return Cluster.open(cfg.from_dict({"cluster": {"state_dir": str(tmp_path / "state")}}))


async def test_a_long_prune_lets_a_login_read_the_store_between_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "RETENTION_BATCH", 100)
    cluster = _cluster(tmp_path)
    try:
        old, new = time.time() - 7 * 86400, time.time()
        cluster.store.append_audit_many([("login.failed", "x", {"i": i}, old) for i in range(500)])
        cluster.store.append_audit_many([("login.ok", "y", {}, new)])
        batches: list[int] = []
        first_batch_done = trio.Event()
        prune_batch = cluster.store.prune_audit_batch

        def counted(before: float, limit: int) -> int:
            deleted = prune_batch(before, limit)
            batches.append(deleted)
            trio.from_thread.run_sync(first_batch_done.set)  # (a worker thread of this trio run)
            return deleted

        monkeypatch.setattr(cluster.store, "prune_audit_batch", counted)
        batches_before_login: list[int] = []

        async def login() -> None:
            await first_batch_done.wait()
            await cluster.db(cluster.store.get_user, "alice")
            batches_before_login.append(len(batches))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(login)
                assert await cluster.prune_audit(new - 86400) == 500
        # Six turns (five full batches and the empty one that ends it): the
        # login's read went in between them, not after the whole prune.
        assert len(batches) == 6 and batches_before_login[0] < len(batches)
        assert [e.event for e in cluster.store.query_audit()] == ["login.ok"]
    finally:
        cluster.close()


def _limited(tmp_path, **limits) -> Cluster:
    return Cluster.open(cfg.from_dict({"cluster": {"state_dir": str(tmp_path / "state")}, "limits": limits}))


def test_a_user_past_streams_per_user_is_refused_naming_it_and_others_are_not(tmp_path):
    cluster = _limited(tmp_path, streams_per_user=2)
    try:
        a = [cluster.new_session("alice", "db", "postgres") for _ in range(2)]
        with pytest.raises(core.AtCapacity) as err:
            cluster.new_session("alice", "db", "postgres")
        assert err.value.limit == "streams_per_user" and "limits.streams_per_user" in err.value.message
        cluster.new_session("bob", "db", "postgres")  # someone else is unaffected
        cluster.end_session(a[0])
        cluster.end_session(a[0])  # ending twice gives back one place, not two
        cluster.new_session("alice", "db", "postgres")
        with pytest.raises(core.AtCapacity):
            cluster.new_session("alice", "db", "postgres")
    finally:
        cluster.close()


def test_sessions_never_take_the_reserved_descriptors(tmp_path):
    cluster = _limited(tmp_path, reserve_fds=10)
    try:
        room = cluster.open_files - 10
        for _ in range(3):
            cluster.connection_opened()
        sessions = [cluster.new_session(f"u{i % 50}", "db", "tcp") for i in range(room - 3)]
        with pytest.raises(core.AtCapacity) as err:
            cluster.new_session("someone-else", "db", "tcp")
        assert err.value.limit == "open_files" and "limits.reserve_fds = 10" in err.value.message
        cluster.connection_closed()
        cluster.new_session("someone-else", "db", "tcp")
        assert len(sessions) == room - 3
    finally:
        cluster.close()


def test_a_refusal_at_a_limit_is_audited_once_a_minute_then_counted(tmp_path):
    cluster = _limited(tmp_path)
    try:
        firsts = [cluster.note_limit_refusal("alice", "streams_per_user") for _ in range(5)]
        assert firsts == [True, False, False, False, False]
        assert cluster.note_limit_refusal("alice", "streams_per_connection")  # another limit: its own first
        cluster._queue_tallies(None)  # stopping: every window is over
        counted = [e for e in cluster._audit_pending if e[0] == "dial.limited"]
        assert len(counted) == 1
        event, user, fields, _ = counted[0]
        assert user == "alice" and fields["limit"] == "streams_per_user" and fields["repeats"] == 4
    finally:
        cluster.close()


async def test_a_cut_interrupts_upstream_first_and_audits_it(tmp_path):
    cluster = _limited(tmp_path)
    try:
        session = cluster.new_session("alice", "db", "postgres")
        order: list[str] = []

        async def interrupt(reason: str) -> str:
            order.append(f"interrupt {reason}")
            return "cancel sent"

        session.interrupt = interrupt
        session.cut = lambda reason: order.append(f"cut {reason}")
        await cluster.cut(session, "user_locked")
        await cluster.cut(session, "user_locked")  # once only
        assert order == ["interrupt user_locked", "cut user_locked"]
        events = [e for e in cluster._audit_pending if e[0] == "session.interrupt"]
        assert len(events) == 1 and events[0][2]["result"] == "cancel sent"
    finally:
        cluster.close()

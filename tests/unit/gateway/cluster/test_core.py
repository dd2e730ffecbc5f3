"""gateway.cluster.core: audit retention gives the store's thread back
between batches; the [limits] on sessions and the cut's interrupt; whether a
certificate still stands (locks, removals, revocations) and which live
sessions a change cuts."""

from __future__ import annotations

import datetime as dt
import time

import pytest
import trio

from gateway.cluster import config as cfg
from gateway.cluster import auditflush, core
from gateway.cluster.core import Cluster, LiveSession, Snapshot
from gateway.cluster.passwords import DUMMY_HASH
from gateway.cluster.store import Lock, User
from gateway.identity import pki
from protocols.errors import ErrorCode


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
        token = trio.lowlevel.current_trio_token()  # the store's thread is not one of trio's

        def counted(before: float, limit: int) -> int:
            deleted = prune_batch(before, limit)
            batches.append(deleted)
            trio.from_thread.run_sync(first_batch_done.set, trio_token=token)
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


@pytest.mark.parametrize("arriving", [10, auditflush.AUDIT_BATCH])
async def test_statements_arriving_during_a_write_wait_for_the_next_interval_unless_a_batch_is_full(
        tmp_path, monkeypatch, arriving):
    """A steady stream of statements is written in a few large
    transactions a second: what arrives while a batch is being written
    waits for the flusher's next turn, unless a whole batch is waiting
    already; a write that must happen now (``audit``) takes everything."""
    cluster = _cluster(tmp_path)
    try:
        writes: list[int] = []
        write_many = cluster.audit_log.write_many

        def write(batch):
            if not writes:  # the relay's taps go on queueing meanwhile
                for i in range(arriving):
                    cluster.audit_soon("mysql.execute", "alice", i=i)
            writes.append(len(batch))
            write_many(batch)

        monkeypatch.setattr(cluster.audit_log, "write_many", write)
        for i in range(3):
            cluster.audit_soon("mysql.execute", "alice", i=i)
        with trio.fail_after(30):
            await cluster.flush_audit(backlog=True)
        assert writes == ([3] if arriving < auditflush.AUDIT_BATCH else [3, arriving])
        assert len(cluster._audit_pending) == (arriving if arriving < auditflush.AUDIT_BATCH else 0)
        with trio.fail_after(30):
            await cluster.audit("session.end", "alice")
        assert not cluster._audit_pending
        assert len(cluster.store.query_audit(limit=10_000)) == 3 + arriving + 1
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


def test_refused_renewals_past_the_first_are_audited_as_one_count(tmp_path):
    cluster = _limited(tmp_path)
    try:
        firsts = [cluster.note_renew_refusal("alice", "cert_invalid") for _ in range(5)]
        assert firsts == [True, False, False, False, False]
        assert cluster.note_renew_refusal("alice", "access_denied")  # another code: its own first
        cluster._queue_tallies(None)  # stopping: every window is over
        counted = [e for e in cluster._audit_pending if e[0] == "link.renew_denied"]
        assert len(counted) == 1
        event, user, fields, _ = counted[0]
        assert user == "alice" and fields["code"] == "cert_invalid" and fields["repeats"] == 4
    finally:
        cluster.close()


@pytest.mark.parametrize("tally, event", [("limit_refusals", "dial.limited"), ("renew_refusals", "link.renew_denied")])
async def test_a_running_cluster_writes_counted_refusals_once_their_minute_is_over(tmp_path, tally, event):
    """Not only when it stops: the flusher asks every tally each turn."""
    cluster = _limited(tmp_path)
    try:
        a_while_ago = time.time() - 120
        for _ in range(3):
            getattr(cluster, tally).note(("alice", "x"), "", a_while_ago)
        async with trio.open_nursery() as nursery:
            await nursery.start(cluster.run_audit_flusher)
            with trio.fail_after(30):
                while not cluster.store.query_audit(event_prefix=event):
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        [written] = cluster.store.query_audit(event_prefix=event)
        assert written.user == "alice" and written.fields["repeats"] == 2
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


NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _identity(user: str = "alice", generation: int = 0, serial: int = 11) -> pki.Identity:
    return pki.Identity(user=user, roles=(), cluster="c", not_before=NOW, not_after=NOW + dt.timedelta(hours=1),
                        serial=serial, generation=generation)


def _snapshot(*, generation: int = 0, locked: bool = False, revoked: frozenset[int] = frozenset(),
              users: tuple[str, ...] = ("alice",)) -> Snapshot:
    return Snapshot(
        counter=1,
        users={name: User(name=name, roles=(), created_at=0.0, password_hash=DUMMY_HASH,
                          cert_generation=generation) for name in users},
        locks={"alice": Lock(user="alice", reason="incident", created_by="admin", created_at=0.0)} if locked else {},
        roles={}, resources={}, revoked=revoked,
        revocations={"alice": "user locked: incident"} if generation else {},
    )


def test_a_certificate_of_the_current_generation_stands():
    assert Cluster.check_standing(_snapshot(generation=2), _identity(generation=2)).name == "alice"


@pytest.mark.parametrize(("snap", "identity", "code", "words"), [
    (_snapshot(generation=1), _identity(generation=0), ErrorCode.CERT_EXPIRED, "revoked (user locked: incident)"),
    (_snapshot(revoked=frozenset({11})), _identity(serial=11), ErrorCode.CERT_EXPIRED, "certs revoke"),
    (_snapshot(locked=True), _identity(), ErrorCode.USER_LOCKED, "is locked (incident)"),
    (_snapshot(users=()), _identity(), ErrorCode.ACCESS_DENIED, "no longer exists"),
])
def test_refusals_say_what_happened(snap, identity, code, words):
    with pytest.raises(pki.CertError) as err:
        Cluster.check_standing(snap, identity)
    assert err.value.code is code and words in err.value.message
    # The next step is the gateway's (or the API's) to add, once.
    assert "administrator" not in err.value.message and "wicket login" not in err.value.message


def test_which_live_sessions_a_change_cuts():
    def session(identity: pki.Identity | None) -> LiveSession:
        s = LiveSession(id="s", user="alice", resource="r", kind="tcp", started=0.0,
                        cancel_scope=trio.CancelScope())
        s.identity = identity
        return s

    assert Cluster.cut_reason(_snapshot(), session(_identity())) is None
    assert Cluster.cut_reason(_snapshot(locked=True), session(None)) == "user_locked"
    assert Cluster.cut_reason(_snapshot(generation=1), session(_identity())) == "cert_revoked"
    assert Cluster.cut_reason(_snapshot(revoked=frozenset({11})), session(_identity())) == "cert_revoked"
    assert Cluster.cut_reason(_snapshot(users=()), session(_identity())) == "user_removed"
    # A session not allowed yet is judged once it is.
    assert Cluster.cut_reason(_snapshot(generation=1), session(None)) is None

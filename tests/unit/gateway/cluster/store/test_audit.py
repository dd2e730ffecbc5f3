"""gateway.cluster.store.audit: appending, queries, counts and pruning;
then pruning a batch at a time and reading all of it a page at a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cluster.store import AuditEvent, Store


# --- audit ---------------------------------------------------------------------


@pytest.fixture
def audited(store: Store) -> Store:
    rows = [
        (1.0, "login.failed", "alice", {"client_host": "192.0.2.1"}),
        (2.0, "login.failed", "alice", {"client_host": "192.0.2.2"}),
        (3.0, "login.ok", "alice", {"client_host": "192.0.2.1"}),
        (4.0, "login.failed", "bob", {"client_host": "192.0.2.1"}),
        (5.0, "dial.allowed", "alice", {"resource": "orders-db"}),
        (6.0, "login.failed", None, {"client_host": "192.0.2.1", "attempts": 3}),
        (7.0, "user.lock", "bob", {"by": "admin"}),
    ]
    for now, event, user, fields in rows:
        store.append_audit(event, user, fields, now=now)
    return store


def test_append_returns_increasing_ids(store: Store) -> None:
    ids = [store.append_audit("session.start", "alice", {}, now=float(i)) for i in range(3)]
    assert ids == sorted(ids) and len(set(ids)) == 3


def test_query_audit_roundtrip(audited: Store) -> None:
    events = audited.query_audit()
    assert len(events) == 7
    assert [e.id for e in events] == sorted(e.id for e in events)
    first = events[0]
    assert isinstance(first, AuditEvent)
    assert (first.time, first.event, first.user) == (1.0, "login.failed", "alice")
    assert first.fields == {"client_host": "192.0.2.1"}
    assert events[5].user is None


def test_query_audit_filters(audited: Store) -> None:
    def events(**kw) -> list[str]:
        return [f"{e.event}@{e.time:g}" for e in audited.query_audit(**kw)]

    assert events(since=5.0) == ["dial.allowed@5", "login.failed@6", "user.lock@7"]
    assert events(user="bob") == ["login.failed@4", "user.lock@7"]
    assert events(event_prefix="login.", since=3.0) == [
        "login.ok@3", "login.failed@4", "login.failed@6"
    ]
    assert events(event_prefix="user") == ["user.lock@7"]
    assert events(event_prefix="log", user="alice", limit=2) == ["login.failed@1", "login.failed@2"]
    assert events(limit=2, latest=True) == ["login.failed@6", "user.lock@7"]
    third = audited.query_audit()[2].id
    assert events(after_id=third, limit=1) == ["login.failed@4"]
    assert events(user="carol") == []


def test_query_audit_argument_checks(audited: Store) -> None:
    for limit in (0, -1, 10**9, True):
        with pytest.raises(ValueError, match="limit"):
            audited.query_audit(limit=limit)
    with pytest.raises(ValueError, match="prefix"):
        audited.query_audit(event_prefix="login%")
    with pytest.raises(ValueError, match="since"):
        audited.query_audit(since=float("nan"))


def test_count_audit(audited: Store) -> None:
    assert audited.count_audit("login.failed") == 4
    assert audited.count_audit("login.failed", "alice") == 2
    assert audited.count_audit("login.failed", "alice", 2.0) == 1
    assert audited.count_audit("login.failed", since=2.0) == 3
    by_host = ("client_host", "192.0.2.1")
    assert audited.count_audit("login.failed", field=by_host) == 3
    assert audited.count_audit("login.failed", since=5.0, field=by_host) == 1
    assert audited.count_audit("login.failed", "alice", field=by_host) == 1
    assert audited.count_audit("login.failed", field=("attempts", 3)) == 1
    assert audited.count_audit("login.failed", field=("client_host", "203.0.113.9")) == 0
    assert audited.count_audit("login", "alice") == 0  # exact event names only


def test_count_audit_field_checks(audited: Store) -> None:
    with pytest.raises(ValueError, match="field name"):
        audited.count_audit("login.failed", field=("a') OR 1=1 --", "x"))
    with pytest.raises(TypeError):
        audited.count_audit("login.failed", field=("client_host", ["x"]))


def test_append_audit_validation(store: Store) -> None:
    for event in ("", "Login.OK", "login.", ".login", "login failed", "x" * 65):
        with pytest.raises(ValueError, match="event"):
            store.append_audit(event, "alice", {})
    with pytest.raises(ValueError, match="JSON"):
        store.append_audit("login.ok", "alice", {"rate": float("nan")})
    with pytest.raises(TypeError):
        store.append_audit("login.ok", "alice", ["not", "a", "mapping"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="truncate"):
        store.append_audit("session.query", "alice", {"sql": "x" * (300 * 1024)})
    with pytest.raises(ValueError):
        store.append_audit("login.failed", "u" * 300, {})
    # A failed login may name a user that could never exist: still recorded.
    store.append_audit("login.failed", "Robert'); DROP TABLE users;--", {})
    assert store.query_audit()[0].user == "Robert'); DROP TABLE users;--"


def test_audit_records_odd_values_as_text(store: Store) -> None:
    # Losing an audit event to a type error would be worse than a str().
    store.append_audit("session.end", "alice", {"path": Path("/tmp/x"), "n": {"k": (1, 2)}})
    assert store.query_audit()[0].fields == {"path": "/tmp/x", "n": {"k": [1, 2]}}


def test_prune_audit(audited: Store) -> None:
    last_id = audited.query_audit()[-1].id
    assert audited.prune_audit(before=4.0) == 3
    assert [e.time for e in audited.query_audit()] == [4.0, 5.0, 6.0, 7.0]
    audited.prune_audit(before=100.0)
    # Ids are never reused, so a reader tailing by id misses nothing.
    assert audited.append_audit("login.ok", "alice", {}, now=200.0) > last_id


def test_append_audit_many_is_one_ordered_transaction(store: Store) -> None:
    store.append_audit_many([
        ("session.start", "alice", {"n": 1}, 10.0),
        ("pg.query", "alice", {"query": "select 1"}, 11.0),
        ("session.end", "alice", None, 12.0),
    ])
    events = store.query_audit(user="alice")
    assert [e.event for e in events] == ["session.start", "pg.query", "session.end"]
    assert dict(events[1].fields) == {"query": "select 1"}
    # One bad event and nothing of the batch is written.
    with pytest.raises(ValueError):
        store.append_audit_many([("ok.event", None, None, 1.0), ("Bad Event", None, None, 2.0)])
    assert len(store.query_audit()) == 3
    store.append_audit_many([])


@pytest.fixture
def filled(tmp_path):
    """25 audit events, times 100 to 124, users u0 to u2."""
    with Store.open(tmp_path / "wicket.db") as s:
        s.append_audit_many([("test.event", f"u{i % 3}", {"i": i}, 100.0 + i) for i in range(25)])
        yield s


def test_prune_batch_deletes_the_oldest_first_and_at_most_its_limit(filled):
    assert filled.prune_audit_batch(110.0, 4) == 4
    assert [e.fields["i"] for e in filled.query_audit()][:2] == [4, 5]
    assert filled.prune_audit_batch(110.0, 100) == 6  # fewer than the limit: none older left
    assert filled.prune_audit_batch(110.0, 100) == 0
    assert [e.fields["i"] for e in filled.query_audit()][0] == 10
    with pytest.raises(ValueError):
        filled.prune_audit_batch(110.0, 0)


@pytest.mark.parametrize("page", [1, 2, 7, 25, 1000])
def test_iter_audit_reads_every_event_in_the_window_page_by_page(filled, page):
    everything = filled.query_audit()
    assert list(filled.iter_audit(page=page)) == everything
    window = [e for e in everything if 105.0 <= e.time < 117.0]
    assert list(filled.iter_audit(105.0, 117.0, page=page)) == window and len(window) == 12
    assert list(filled.iter_audit(since=124.0, page=page)) == everything[-1:]
    assert list(filled.iter_audit(until=100.0, page=page)) == []


def test_iter_audit_holds_one_page(filled, monkeypatch):
    """An export of any size: each read fetches one page."""
    fetched: list[int] = []
    events = filled.iter_audit(page=10)
    real_read = filled._read

    def counting_read():
        fetched.append(1)
        return real_read()

    monkeypatch.setattr(filled, "_read", counting_read)
    first = next(events)
    assert first.fields["i"] == 0 and len(fetched) == 1  # one page read, not the table
    assert len(list(events)) == 24 and len(fetched) == 3



# --- what the indexes serve ------------------------------------------------------


def _plan(db_path: Path, sql: str, params: list) -> str:
    import sqlite3

    conn = sqlite3.connect(db_path)
    try:
        return " | ".join(row[-1] for row in conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
    finally:
        conn.close()


@pytest.mark.parametrize("event", ["login.failed", "bot.join_failed"])
@pytest.mark.parametrize("user", [None, "alice"])
def test_the_limiters_counts_use_the_client_host_index(audited: Store, db_path: Path, event: str,
                                                       user: str | None) -> None:
    # What gateway/cluster/api.py and join.py ask (Store.last_audit).
    where, params = Store._audit_filters(since=1.0, user=user, event=event, field=("client_host", "192.0.2.1"))
    plan = _plan(db_path, f"SELECT count(*), max(time) FROM audit{where}", params)
    assert "USING INDEX audit_event_client_host_time" in plan, plan
    assert audited.last_audit(event, user=user, since=0.0, field=("client_host", "192.0.2.1"))[0] == (
        {("login.failed", None): 3, ("login.failed", "alice"): 1}.get((event, user), 0))


def test_the_client_host_index_holds_only_the_limiters_events(audited: Store, db_path: Path) -> None:
    """Statement events (most rows) no longer cost a json_extract each."""
    import sqlite3

    audited.append_audit_many([("mysql.execute", "alice", {"client_host": "192.0.2.1"}, 8.0)] * 5)
    conn = sqlite3.connect(db_path)
    try:
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'audit_event_client_host_time'").fetchone()
        indexed = conn.execute("SELECT count(*) FROM audit INDEXED BY audit_event_client_host_time"
                               " WHERE event = 'login.failed' OR event = 'bot.join_failed'").fetchone()[0]
    finally:
        conn.close()
    assert "WHERE event = 'login.failed' OR event = 'bot.join_failed'" in sql
    assert indexed == 4
    # Counting other events by a field still works, by the (event, time) index.
    assert audited.count_audit("mysql.execute", field=("client_host", "192.0.2.1")) == 5
    assert audited.count_audit("login.ok", field=("client_host", "192.0.2.1")) == 1


@pytest.mark.parametrize("filters", [
    {}, {"since": 3.0}, {"user": "alice"}, {"event_prefix": "login."}, {"after_id": 2},
    {"since": 3.0, "user": "bob", "event_prefix": "login."},
])
@pytest.mark.parametrize("latest", [True, False])
def test_the_audit_commands_queries_use_an_index(audited: Store, db_path: Path, filters: dict,
                                                 latest: bool) -> None:
    # What `wicket-cluster audit` asks (Store.query_audit): served by an
    # index or the primary key, never a scan of the table in another order.
    where, params = Store._audit_filters(**{"since": None, "user": None, **filters})
    order = "DESC" if latest else "ASC"
    plan = _plan(db_path, f"SELECT * FROM audit{where} ORDER BY id {order} LIMIT ?", [*params, 10])
    assert "USING" in plan or plan == "SCAN audit", plan

"""Tests for gateway.cluster.store: the cluster's SQLite store."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from gateway.cluster.store import core as store_mod
from gateway.cluster.passwords import DUMMY_HASH
from gateway.cluster.store import (
    MIGRATIONS,
    AlreadyExists,
    AuditEvent,
    Lock,
    NotFound,
    Resource,
    RoleRecord,
    SchemaTooNew,
    Store,
    StoreError,
    User,
    validate_name,
)

HASH = DUMMY_HASH  # any well-formed Argon2id PHC string will do
OTHER_HASH = DUMMY_HASH.replace("$AAAA", "$BBBB", 1)
SECRET = b"12345678901234567890"


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "wicket.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store.open(db_path) as s:
        yield s


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _user_version(path: Path) -> int:
    conn = sqlite3.connect(path)
    try:
        return conn.execute("PRAGMA user_version").fetchone()[0]
    finally:
        conn.close()


# --- opening, files, schema ----------------------------------------------------


def test_files_are_private_whatever_the_umask(db_path: Path) -> None:
    old = os.umask(0o002)
    try:
        with Store.open(db_path) as s:
            s.append_audit("login.ok", "alice", {}, now=1.0)  # makes -wal and -shm exist
            files = [db_path, Path(f"{db_path}-wal"), Path(f"{db_path}-shm")]
            assert all(f.exists() for f in files)
            assert [_mode(f) for f in files] == [0o600, 0o600, 0o600]
    finally:
        os.umask(old)


def test_world_readable_file_refused(db_path: Path) -> None:
    Store.open(db_path).close()
    db_path.chmod(0o644)
    with pytest.raises(StoreError, match="chmod 600"):
        Store.open(db_path)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(tmp_path / "nope" / "wicket.db")


def test_fresh_db_is_at_latest_version_and_reopen_is_a_noop(db_path: Path) -> None:
    with Store.open(db_path) as s:
        s.add_user("alice", HASH, ["admin"], now=1.0)
        counter = s.change_counter()
    assert _user_version(db_path) == len(MIGRATIONS)
    with Store.open(db_path) as s:
        assert s.get_user("alice") is not None
        assert s.change_counter() == counter
    assert _user_version(db_path) == len(MIGRATIONS)


def test_migrates_an_existing_version_0_file(db_path: Path) -> None:
    # An empty SQLite database someone (an older tool) already created.
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 0")
    conn.close()
    db_path.chmod(0o600)
    with Store.open(db_path) as s:
        assert s.list_users() == []
        assert s.change_counter() == 0
    assert _user_version(db_path) == len(MIGRATIONS)


def test_migrates_an_older_schema_keeping_data(db_path: Path, monkeypatch) -> None:
    with Store.open(db_path) as s:
        s.add_user("alice", HASH, ["admin"], now=1.0)
    newer = [*MIGRATIONS, ("CREATE TABLE extra (x INTEGER)", "INSERT INTO extra VALUES (42)")]
    monkeypatch.setattr(store_mod, "MIGRATIONS", newer)
    with Store.open(db_path) as s:
        assert s.get_user("alice").roles == ("admin",)
    assert _user_version(db_path) == len(newer)
    conn = sqlite3.connect(db_path)
    assert conn.execute("SELECT x FROM extra").fetchall() == [(42,)]
    conn.close()
    with Store.open(db_path):  # and again: nothing left to do
        pass
    assert _user_version(db_path) == len(newer)


def test_failed_migration_rolls_back(db_path: Path, monkeypatch) -> None:
    Store.open(db_path).close()
    broken = [*MIGRATIONS, ("CREATE TABLE half (x INTEGER)", "THIS IS NOT SQL")]
    monkeypatch.setattr(store_mod, "MIGRATIONS", broken)
    with pytest.raises(StoreError, match=str(db_path)):
        Store.open(db_path)
    assert _user_version(db_path) == len(MIGRATIONS)
    conn = sqlite3.connect(db_path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert "half" not in tables


def test_schema_too_new(db_path: Path) -> None:
    Store.open(db_path).close()
    conn = sqlite3.connect(db_path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(SchemaTooNew) as info:
        Store.open(db_path)
    message = str(info.value)
    assert str(db_path) in message and "99" in message and str(len(MIGRATIONS)) in message
    assert "upgrade wicket" in message
    assert (info.value.found, info.value.known) == (99, len(MIGRATIONS))


def test_closed_store(db_path: Path) -> None:
    s = Store.open(db_path)
    s.close()
    s.close()  # idempotent
    with pytest.raises(StoreError, match="closed"):
        s.list_users()
    assert "closed" in repr(s)


# --- users ---------------------------------------------------------------------


def test_user_crud(store: Store) -> None:
    created = store.add_user("alice", HASH, ["admin", "dev"], now=100.0)
    assert created == store.get_user("alice")
    assert created.roles == ("admin", "dev")
    assert created.created_at == 100.0
    assert created.totp_enrolled is False and created.totp_last_step is None

    store.add_user("bob", HASH, [], totp_secret=SECRET, now=101.0)
    assert [u.name for u in store.list_users()] == ["alice", "bob"]
    assert store.get_user("bob").totp_enrolled is True
    assert store.get_user("bob").totp_secret == SECRET

    store.set_user_roles("alice", ["dev"])
    store.set_password_hash("alice", OTHER_HASH)
    alice = store.get_user("alice")
    assert (alice.roles, alice.password_hash) == (("dev",), OTHER_HASH)

    assert store.delete_user("alice") is True
    assert store.delete_user("alice") is False
    assert store.get_user("alice") is None


def test_add_user_twice(store: Store) -> None:
    store.add_user("alice", HASH, [], now=1.0)
    with pytest.raises(AlreadyExists, match="user 'alice' already exists"):
        store.add_user("alice", HASH, [], now=2.0)
    assert store.get_user("alice").created_at == 1.0


def test_updates_of_missing_user(store: Store) -> None:
    for call in (
        lambda: store.set_user_roles("ghost", []),
        lambda: store.set_password_hash("ghost", HASH),
        lambda: store.set_totp_secret("ghost", SECRET),
        lambda: store.set_totp_last_step("ghost", 1),
    ):
        with pytest.raises(NotFound, match="user 'ghost' does not exist"):
            call()


@pytest.mark.parametrize("name", ["", "Alice", "a" * 65, "-rf", ".", "..", "a b", "ä", None])
def test_invalid_user_names(store: Store, name) -> None:
    with pytest.raises(ValueError, match="invalid user name"):
        store.add_user(name, HASH, [])


def test_name_rules() -> None:
    for ok in ("a", "alice", "a.b-c_d", "0day", "x" * 64):
        assert validate_name("user", ok) == ok


def test_roles_validated(store: Store) -> None:
    with pytest.raises(TypeError):
        store.add_user("alice", HASH, "admin")
    with pytest.raises(ValueError, match="repeat"):
        store.add_user("alice", HASH, ["a", "a"])
    with pytest.raises(ValueError, match="invalid role name"):
        store.add_user("alice", HASH, ["Admin"])


def test_plaintext_password_refused_and_not_echoed(store: Store) -> None:
    with pytest.raises(ValueError) as info:
        store.add_user("alice", "hunter2-hunter2", [])
    assert "hunter2" not in str(info.value)
    store.add_user("alice", HASH, [])
    with pytest.raises(ValueError):
        store.set_password_hash("alice", "hunter2-hunter2")


def test_secrets_not_in_repr(store: Store) -> None:
    user = store.add_user("alice", HASH, [], totp_secret=SECRET)
    text = repr(user)
    assert "argon2" not in text and "1234567890" not in text and "totp_enrolled=True" in text


def test_user_record_consistency() -> None:
    with pytest.raises(ValueError):
        User(name="a", roles=(), created_at=0.0, password_hash=HASH, totp_enrolled=True)


def test_totp_secret_enrol_and_remove(store: Store) -> None:
    store.add_user("alice", HASH, [])
    with pytest.raises(ValueError, match="16 to 64 bytes"):
        store.set_totp_secret("alice", b"short")
    store.set_totp_secret("alice", SECRET)
    assert store.set_totp_last_step("alice", 10)
    store.set_totp_secret("alice", SECRET[::-1])  # re-enrolment forgets the step
    assert store.get_user("alice").totp_last_step is None
    store.set_totp_secret("alice", None)
    assert store.get_user("alice").totp_enrolled is False


def test_totp_last_step_only_increases(store: Store) -> None:
    store.add_user("alice", HASH, [], totp_secret=SECRET)
    counter = store.change_counter()
    assert store.set_totp_last_step("alice", 5) is True
    assert store.set_totp_last_step("alice", 5) is False  # same code again: replay
    assert store.set_totp_last_step("alice", 4) is False
    assert store.get_user("alice").totp_last_step == 5
    assert store.set_totp_last_step("alice", 6) is True
    assert store.get_user("alice").totp_last_step == 6
    # Logins do not make every poller reload.
    assert store.change_counter() == counter
    for bad in (-1, True, 1.5):
        with pytest.raises(ValueError):
            store.set_totp_last_step("alice", bad)


def test_totp_last_step_race_between_processes(db_path: Path) -> None:
    # Two cluster processes verify the same code at once; exactly one wins.
    with Store.open(db_path) as a, Store.open(db_path) as b:
        a.add_user("alice", HASH, [], totp_secret=SECRET)
        results = []
        barrier = threading.Barrier(2)

        def attempt(s: Store) -> None:
            barrier.wait()
            results.append(s.set_totp_last_step("alice", 7))

        threads = [threading.Thread(target=attempt, args=(s,)) for s in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == [False, True]


# --- roles ---------------------------------------------------------------------


def test_role_crud(store: Store) -> None:
    spec = {"allow": [{"resources": {"env": "prod"}, "db_users": ["ro"]}], "max_ttl": 3600}
    assert store.put_role("dev", spec, "config", now=1.0) is True
    role = store.get_role("dev")
    assert role == RoleRecord(name="dev", spec=spec, source="config")
    assert dict(role.spec) == spec
    store.put_role("admin", {}, "cli")
    assert [r.name for r in store.list_roles()] == ["admin", "dev"]
    assert store.delete_role("dev") is True
    assert store.delete_role("dev") is False
    assert store.get_role("dev") is None


def test_put_role_same_content_is_a_noop(store: Store) -> None:
    store.put_role("dev", {"b": 1, "a": [1, 2]}, "config", now=1.0)
    counter = store.change_counter()
    assert store.put_role("dev", {"a": [1, 2], "b": 1}, "config", now=2.0) is False
    assert store.change_counter() == counter
    assert store.put_role("dev", {"a": [1, 2], "b": 2}, "config", now=3.0) is True
    assert store.change_counter() == counter + 1
    assert store.put_role("dev", {"a": [1, 2], "b": 2}, "cli", now=4.0) is True
    assert store.get_role("dev").source == "cli"


def test_role_validation(store: Store) -> None:
    with pytest.raises(ValueError, match="source"):
        store.put_role("dev", {}, "somewhere")
    with pytest.raises(ValueError, match="JSON"):
        store.put_role("dev", {"x": object()}, "cli")
    with pytest.raises(ValueError, match="JSON"):
        store.put_role("dev", {"x": float("nan")}, "cli")
    with pytest.raises(TypeError):
        store.put_role("dev", ["not", "a", "dict"], "cli")


def test_role_spec_is_read_only_and_a_private_copy() -> None:
    spec = {"allow": ["x"]}
    role = RoleRecord(name="dev", spec=spec, source="cli")
    spec["allow"].append("y")
    assert dict(role.spec) == {"allow": ["x"]}
    with pytest.raises(TypeError):
        role.spec["allow"] = []  # type: ignore[index]


# --- resources -----------------------------------------------------------------


def _pg(**overrides) -> Resource:
    fields = dict(
        name="orders-db",
        kind="postgres",
        address="db.internal:5432",
        labels={"env": "prod", "team": "orders"},
        spec={"database": "orders", "tls": True},
        source="config",
    )
    fields.update(overrides)
    return Resource(**fields)


def test_resource_crud(store: Store) -> None:
    assert store.put_resource(_pg(), now=1.0) is True
    assert store.get_resource("orders-db") == _pg()
    store.put_resource(_pg(name="bastion", kind="ssh", address="[2001:db8::1]:22", spec={}))
    store.put_resource(_pg(name="cache", kind="tcp", address="10.0.0.5:6379"))
    assert [r.name for r in store.list_resources()] == ["bastion", "cache", "orders-db"]
    assert [r.name for r in store.list_resources(kind="ssh")] == ["bastion"]
    assert store.delete_resource("cache") is True
    assert store.delete_resource("cache") is False
    assert store.get_resource("cache") is None


def test_put_resource_replaces_and_skips_noops(store: Store) -> None:
    store.put_resource(_pg())
    counter = store.change_counter()
    assert store.put_resource(_pg()) is False
    assert store.change_counter() == counter
    assert store.put_resource(_pg(labels={"env": "staging"})) is True
    assert store.get_resource("orders-db").labels == {"env": "staging"}
    assert store.change_counter() == counter + 1


@pytest.mark.parametrize(
    "overrides",
    [
        {"address": "db.internal"},
        {"address": "db.internal:0"},
        {"address": "db.internal:70000"},
        {"address": "::1:5432"},
        {"address": ":5432"},
        {"kind": "Postgres"},
        {"kind": ""},
        {"name": "Orders"},
        {"labels": {"": "x"}},
        {"labels": {"env": 1}},
        {"source": "api"},
    ],
)
def test_resource_validation(overrides: dict) -> None:
    with pytest.raises((ValueError, TypeError)):
        _pg(**overrides)


def test_resource_labels_read_only() -> None:
    resource = _pg()
    with pytest.raises(TypeError):
        resource.labels["env"] = "dev"  # type: ignore[index]


def test_put_resource_type_checked(store: Store) -> None:
    with pytest.raises(TypeError):
        store.put_resource({"name": "x"})  # type: ignore[arg-type]


# --- locks ---------------------------------------------------------------------


def test_lock_crud(store: Store) -> None:
    assert store.get_lock("alice") is None
    lock = store.lock_user("alice", "laptop stolen", "admin", now=10.0)
    assert lock == Lock(user="alice", reason="laptop stolen", created_by="admin", created_at=10.0)
    assert store.get_lock("alice") == lock
    # Locking again replaces the reason: the latest decision is what counts.
    store.lock_user("alice", "still stolen", "security", now=20.0)
    assert store.get_lock("alice").reason == "still stolen"
    store.lock_user("bob", "", "admin", now=30.0)
    assert [l.user for l in store.list_locks()] == ["alice", "bob"]
    assert store.unlock_user("alice") is True
    assert store.unlock_user("alice") is False
    assert [l.user for l in store.list_locks()] == ["bob"]


def test_lock_validation(store: Store) -> None:
    with pytest.raises(ValueError, match="invalid user name"):
        store.lock_user("Alice", "x", "admin")
    with pytest.raises(ValueError, match="created_by"):
        store.lock_user("alice", "x", "")
    with pytest.raises(ValueError, match="reason"):
        store.lock_user("alice", "x" * 2000, "admin")


def test_lock_survives_user_deletion(store: Store) -> None:
    store.add_user("alice", HASH, [])
    store.lock_user("alice", "offboarded", "admin")
    store.delete_user("alice")
    assert store.get_lock("alice") is not None


# --- change detection ----------------------------------------------------------


def test_change_counter_bumps_on_every_watched_table(store: Store) -> None:
    seen = [store.change_counter()]

    def bumped() -> bool:
        seen.append(store.change_counter())
        return seen[-1] > seen[-2]

    store.add_user("alice", HASH, [])
    assert bumped()
    store.set_user_roles("alice", ["dev"])
    assert bumped()
    store.put_role("dev", {}, "cli")
    assert bumped()
    store.put_resource(_pg())
    assert bumped()
    store.lock_user("alice", "x", "admin")
    assert bumped()
    store.unlock_user("alice")
    assert bumped()
    store.delete_resource("orders-db")
    assert bumped()
    store.append_audit("login.ok", "alice", {})
    assert not bumped()


def test_another_connection_sees_writes(db_path: Path) -> None:
    with Store.open(db_path) as server, Store.open(db_path) as cli:
        version, counter = server.data_version(), server.change_counter()
        own_version = cli.data_version()
        cli.lock_user("alice", "compromised", "admin")
        # The server's poller notices, and finds the lock (one transaction:
        # the lock and the revocation of the user's certificates).
        assert server.data_version() != version
        assert server.change_counter() > counter
        assert server.get_lock("alice").reason == "compromised"
        # data_version reports other connections' commits, not our own.
        assert cli.data_version() == own_version


def test_audit_from_another_connection_moves_data_version_only(db_path: Path) -> None:
    with Store.open(db_path) as a, Store.open(db_path) as b:
        version, counter = a.data_version(), a.change_counter()
        b.append_audit("session.start", "alice", {"resource": "orders-db"})
        assert a.data_version() != version
        assert a.change_counter() == counter


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


# --- concurrency ---------------------------------------------------------------


def test_threads_and_processes_share_the_file(db_path: Path) -> None:
    # Two connections (as the server and the CLI), each used from two
    # threads, writing at once: the busy timeout and BEGIN IMMEDIATE
    # serialise them without "database is locked" errors.
    with Store.open(db_path) as a, Store.open(db_path) as b:
        errors: list[BaseException] = []

        def work(s: Store, n: int) -> None:
            try:
                for i in range(50):
                    s.append_audit("session.query", f"user{n}", {"i": i})
                    s.lock_user(f"user{n}", str(i), "test")
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s, n)) for n, s in enumerate([a, b, a, b])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert a.count_audit("session.query") == 200
        assert len(b.list_locks()) == 4


async def test_used_from_trio_worker_threads(store: Store) -> None:
    limiter = trio.CapacityLimiter(1)

    async def append(i: int) -> None:
        await trio.to_thread.run_sync(
            lambda: store.append_audit("dial.allowed", "alice", {"i": i}, now=float(i)),
            limiter=limiter,
        )

    async with trio.open_nursery() as nursery:
        for i in range(10):
            nursery.start_soon(append, i)
    count = await trio.to_thread.run_sync(store.count_audit, "dial.allowed", limiter=limiter)
    assert count == 10


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


def test_audit_jsonl_lines_from_two_writers_never_interleave(tmp_path: Path) -> None:
    # The cluster and the admin CLI append to one file, each from its own
    # descriptor (as two processes do): every line stays whole.
    import json

    from gateway.cluster.audit import AuditLog

    jsonl = tmp_path / "audit.jsonl"
    logs = [AuditLog(Store.open(tmp_path / f"w{i}.db"), jsonl) for i in range(2)]
    big = {"statement": "x" * 20_000, "params": {"é": "ü"}}

    def writer(log: AuditLog, who: str) -> None:
        for i in range(20):
            log.write_many([("session.statement", who, {**big, "n": i}, 1.0)] * 10)

    threads = [threading.Thread(target=writer, args=(log, f"user{i}")) for i, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = jsonl.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 * 20 * 10
    docs = [json.loads(line) for line in lines]
    assert {d["user"] for d in docs} == {"user0", "user1"}
    assert all(d["params"] == {"é": "ü"} and d["event"] == "session.statement" for d in docs)
    assert stat.S_IMODE(jsonl.stat().st_mode) == 0o600
    for log in logs:
        log.close()
        log.store.close()


def test_audit_jsonl_that_cannot_be_written_catches_up_and_never_duplicates(tmp_path: Path, monkeypatch,
                                                                           caplog) -> None:
    # The file fails after the store committed (disk full: /dev/full in
    # its place). write_many must not raise (a caller retrying the batch
    # would store it twice); the file gets the lines once it can.
    import json

    from gateway.cluster import audit

    jsonl = tmp_path / "audit.jsonl"
    log = audit.AuditLog(Store.open(tmp_path / "a.db"), jsonl)
    real = os.dup(log._fd)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, log._fd)
    log.write_many([("test.event", "u", {"n": 1}, 1.0), ("test.event", "u", {"n": 2}, 2.0)])
    log.write_many([("test.event", "u", {"n": 3}, 3.0)])
    assert "audit_jsonl_write_failed" in caplog.text and caplog.text.count("audit_jsonl_write_failed") == 1
    assert jsonl.read_text() == ""
    os.dup2(real, log._fd)
    log.write_many([("test.event", "u", {"n": 4}, 4.0)])
    assert [json.loads(line)["n"] for line in jsonl.read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(e.fields["n"] for e in log.store.query_audit()) == [1, 2, 3, 4]  # each once
    assert "audit_jsonl_caught_up dropped_lines=0" in caplog.text

    # Past JSONL_BACKLOG the oldest whole lines go, and are counted.
    monkeypatch.setattr(audit, "JSONL_BACKLOG", 100)
    os.dup2(full, log._fd)
    log.write_many([("test.event", "u", {"n": n}, 5.0) for n in range(5, 15)])
    os.dup2(real, log._fd)
    log.write_many([("test.event", "u", {"n": 15}, 6.0)])
    kept = [json.loads(line)["n"] for line in jsonl.read_text().splitlines()][4:]
    assert 1 <= len(kept) < 11 and kept == list(range(16 - len(kept), 16))  # the newest, in order
    assert log.jsonl_dropped == 11 - len(kept)
    assert sorted(e.fields["n"] for e in log.store.query_audit()) == list(range(1, 16))
    for fd in (real, full):
        os.close(fd)
    log.close()
    log.store.close()


def test_replace_password_hash_only_over_the_hash_it_expects(store: Store) -> None:
    from gateway.cluster.passwords import hash_password

    store.add_user("alice", DUMMY_HASH)
    changed_meanwhile = hash_password("a new password")
    store.set_password_hash("alice", changed_meanwhile)
    # A re-hash computed from the old hash must not undo that change.
    assert store.replace_password_hash("alice", DUMMY_HASH, hash_password("the old one")) is False
    assert store.get_user("alice").password_hash == changed_meanwhile
    upgraded = hash_password("a new password")
    assert store.replace_password_hash("alice", changed_meanwhile, upgraded) is True
    assert store.get_user("alice").password_hash == upgraded
    assert store.replace_password_hash("nobody", DUMMY_HASH, upgraded) is False


# --- revocation ------------------------------------------------------------------


def test_lock_password_and_removal_each_revoke_the_certificates_issued_before(store: Store) -> None:
    store.add_user("alice", HASH, [], now=1.0)
    assert store.get_user("alice").cert_generation == 0
    store.lock_user("alice", "laptop stolen", "admin", now=2.0)
    assert store.get_user("alice").cert_generation == 1
    # An unlock does not give the old generation back.
    store.unlock_user("alice")
    assert store.get_user("alice").cert_generation == 1
    assert store.revocation_reasons() == {"alice": "user locked: laptop stolen"}
    assert store.set_password_hash("alice", OTHER_HASH, now=3.0) == 2
    assert [u.cert_generation for u in store.list_users()] == [2]
    assert store.revocation_reasons() == {"alice": "password changed"}
    # Removing revokes too, and a user re-created under the name starts
    # past every generation the old one had.
    assert store.delete_user("alice", now=4.0) is True
    store.add_user("alice", HASH, [], now=5.0)
    assert store.get_user("alice").cert_generation == 3
    assert store.revoke_user_certs("alice", "by hand", now=6.0) == 4


def test_a_login_rehash_does_not_revoke(store: Store) -> None:
    store.add_user("alice", HASH, [], now=1.0)
    assert store.replace_password_hash("alice", HASH, OTHER_HASH)
    assert store.get_user("alice").cert_generation == 0


def test_revocations_bump_the_change_counter(db_path: Path) -> None:
    with Store.open(db_path) as server, Store.open(db_path) as cli:
        cli.add_user("alice", HASH, [], now=1.0)
        counter = server.change_counter()
        cli.revoke_user_certs("alice", "by hand", now=2.0)
        assert server.change_counter() > counter
        counter = server.change_counter()
        cli.revoke_cert(0xABC, user="alice", reason="", revoked_by="admin", expires_at=10.0, now=2.0)
        assert server.change_counter() > counter


def test_revoked_certificates_by_serial(store: Store) -> None:
    serial = (1 << 158) + 0xABC  # serials are up to 159 bits: text in the store
    assert store.revoke_cert(serial, user="alice", reason="lost", revoked_by="admin", expires_at=100.0, now=1.0)
    assert not store.revoke_cert(serial, user="alice", reason="again", revoked_by="admin", expires_at=100.0)
    store.revoke_cert(7, user=None, reason="", revoked_by="admin", expires_at=None, now=2.0)
    assert [r.serial for r in store.list_revoked_certs()] == [serial, 7]
    assert store.list_revoked_certs()[0].reason == "lost"
    # Once a certificate has expired its revocation no longer matters.
    assert [r.serial for r in store.list_revoked_certs(live_at=200.0)] == [7]
    assert store.prune_revoked_certs(200.0) == 1
    assert [r.serial for r in store.list_revoked_certs()] == [7]
    for bad in (0, -1, 1 << 160, True, "abc"):
        with pytest.raises(ValueError):
            store.revoke_cert(bad, user=None, reason="", revoked_by="admin", expires_at=None)


def test_find_issued_cert_and_parse_serial(store: Store) -> None:
    store.append_audit("login.ok", "alice", {"serial": "abc", "expires_at": "2026-01-01T00:00:00+00:00"}, now=1.0)
    store.append_audit("login.failed", "bob", {"serial": "abd"}, now=2.0)
    found = store.find_issued_cert(0xABC)
    assert found is not None and found.user == "alice"
    assert store.find_issued_cert(0xABD) is None  # only issuing events count
    assert store_mod.parse_serial("0xAB:C") == 0xABC
    with pytest.raises(ValueError, match="hex digits"):
        store_mod.parse_serial("xyz")


def test_version_one_file_migrates_with_its_users(db_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(store_mod, "MIGRATIONS", MIGRATIONS[:1])
    with Store.open(db_path) as s:
        s.add_user("alice", HASH, ["dev"], now=1.0)
    monkeypatch.undo()
    with Store.open(db_path) as s:
        assert _user_version(db_path) == len(MIGRATIONS)
        assert s.get_user("alice").cert_generation == 0
        s.lock_user("alice", "x", "admin", now=2.0)
        assert s.get_user("alice").cert_generation == 1

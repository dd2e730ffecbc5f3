"""gateway.cluster.store.core: the file (private, migrated, refused when too
new), change detection, and one store shared by threads and processes."""

from __future__ import annotations

import os
import sqlite3
import stat
import threading
from pathlib import Path

import pytest
import trio

from gateway.cluster.store import core as store_mod
from gateway.cluster.store import MIGRATIONS, SchemaTooNew, Store, StoreError
from tests.unit.gateway.cluster.store.storeenv import HASH
from tests.unit.gateway.cluster.store.storeenv import pg_resource as _pg


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

"""gateway.cluster.store.revocations: locks, and the certificates that
locks, password changes and removals revoke."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.cluster.store import Lock, Store, parse_serial
from tests.unit.gateway.cluster.store.storeenv import HASH, OTHER_HASH


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
    assert parse_serial("0xAB:C") == 0xABC
    with pytest.raises(ValueError, match="hex digits"):
        parse_serial("xyz")

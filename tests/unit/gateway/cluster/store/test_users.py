"""gateway.cluster.store.users: users (hashes, TOTP) and roles."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from gateway.cluster.passwords import DUMMY_HASH
from gateway.cluster.store import AlreadyExists, NotFound, RoleRecord, Store, User, validate_name
from tests.unit.gateway.cluster.store.storeenv import HASH, OTHER_HASH, SECRET


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

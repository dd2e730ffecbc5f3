"""gateway.cluster.store.resources."""

from __future__ import annotations

import pytest

from gateway.cluster.store import Store
from tests.unit.gateway.cluster.store.storeenv import pg_resource as _pg


# --- resources -----------------------------------------------------------------



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

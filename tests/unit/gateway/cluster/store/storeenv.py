"""What the store tests share: well-formed values to store."""

from __future__ import annotations

from gateway.cluster.passwords import DUMMY_HASH
from gateway.cluster.store import Resource

HASH = DUMMY_HASH  # any well-formed Argon2id PHC string will do
OTHER_HASH = DUMMY_HASH.replace("$AAAA", "$BBBB", 1)
SECRET = b"12345678901234567890"


def pg_resource(**overrides) -> Resource:
    """A valid postgres resource, with *overrides*."""
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


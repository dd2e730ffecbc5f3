"""gateway.cluster.mongodb: what a dial may ask of the mongodb kind (a
session, or a hello probe)."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.cluster import rbac
from gateway.cluster.dial import Refused
from gateway.cluster.mongodb import MongoKind
from gateway.identity.pki import Identity
from protocols.dial import DialRequest
from protocols.mongodb import HELLO_PROBE

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
ALICE = Identity(user="alice", roles=("dev",), cluster="test", not_before=NOW,
                 not_after=NOW + dt.timedelta(hours=1))


def check(**params: str) -> dict[str, str]:
    return MongoKind().check_params(DialRequest(resource="mongo", params=params), ALICE)


def test_a_session_asks_for_a_db_user_by_default_the_users_own():
    assert check() == {"db_user": "alice"}
    assert check(db_user="app", db_name="shop", other="dropped") == {"db_user": "app", "db_name": "shop"}


def test_a_hello_probe_is_checked_as_the_session_it_stands_before():
    out = check(db_user="app", db_name="shop", **{HELLO_PROBE: "anything"})
    assert out == {"db_user": "app", "db_name": "shop", HELLO_PROBE: "hello"}
    # The roles see the same db user and database (the probe's marker is no
    # constrained parameter).
    assert rbac.constrained(out) == {"db_user": "app", "db_name": "shop"}


@pytest.mark.parametrize("params", [{"db_user": "a\x00b"}, {"db_name": "a.b"}, {"db_name": "x" * 64}])
def test_names_mongodb_would_not_take_are_refused(params):
    with pytest.raises(Refused):
        check(**params, **{HELLO_PROBE: "hello"})

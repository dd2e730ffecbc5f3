"""gateway.cluster.postgres: what a dial may ask of the postgres kind."""

from __future__ import annotations

import datetime as dt

import pytest

from gateway.cluster.dial import Refused
from gateway.cluster.postgres import PostgresKind
from gateway.identity.pki import Identity
from protocols.dial import DialRequest
from protocols.errors import ErrorCode

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
ALICE = Identity(user="alice", roles=("dev",), cluster="test", not_before=NOW,
                 not_after=NOW + dt.timedelta(hours=1))


def check(**params: str) -> dict[str, str]:
    return PostgresKind().check_params(DialRequest(resource="pg", params=params), ALICE)


def test_allowed_settings_reach_the_server_and_options_as_checked() -> None:
    out = check(**{"db_user": "app", "pg.user": "ignored", "pg.database": "ignored",
                   "pg.replication": "off", "pg.application_name": "psql", "pg.TimeZone": "UTC",
                   "pg.options": r"--search-path=a\ b   -c statement_timeout=5s"})
    assert out == {"db_user": "app", "db_name": "app", "pg.application_name": "psql", "pg.TimeZone": "UTC",
                   "pg.options": r"-c search_path=a\ b -c statement_timeout=5s"}


@pytest.mark.parametrize("params, code, named", [
    ({"pg.options": "-c log_statement=none"}, ErrorCode.ACCESS_DENIED, '"log_statement"'),
    ({"pg.log_statement": "none"}, ErrorCode.ACCESS_DENIED, '"log_statement"'),
    ({"pg.options": "-c role=admin"}, ErrorCode.ACCESS_DENIED, '"role"'),
    ({"pg.options": "-d 5"}, ErrorCode.ACCESS_DENIED, '"-d" switch'),
    ({"pg.options": "-c search_path"}, ErrorCode.BAD_REQUEST, "needs a value"),
])
def test_a_gateway_cannot_pass_on_other_settings(params: dict[str, str], code: ErrorCode, named: str) -> None:
    """The gateway refuses these first; a modified one meets the same rule here."""
    with pytest.raises(Refused) as info:
        check(**params)
    assert info.value.code is code and named in info.value.message


def test_replication_is_refused() -> None:
    with pytest.raises(Refused, match="replication connections are not supported"):
        check(**{"pg.replication": "database"})

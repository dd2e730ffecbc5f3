"""gateway.cluster.mysql: what a dial may ask of the mysql kind, and what
its session auditor records and refuses."""

from __future__ import annotations

import datetime as dt

import pytest
import trio

from gateway.cluster.dial import Refused
from gateway.cluster.mysql import MySqlKind, MySqlSessionAuditor, names_constrained
from gateway.cluster.rbac import Role
from gateway.cluster.store import Resource
from gateway.identity.pki import Identity
from protocols.dial import DialRequest
from protocols.errors import ErrorCode
from protocols.mysql import Command
from protocols.mysql import dialparams as dp
from tests.unit.protocols.mysql.session import MODERN, command, err, ok, query

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
ALICE = Identity(user="alice", roles=("dev",), cluster="test", not_before=NOW,
                 not_after=NOW + dt.timedelta(hours=1))


def check(**params: str) -> dict[str, str]:
    return MySqlKind().check_params(DialRequest(resource="maria", params=params), ALICE)


def test_params_default_to_the_identity_and_keep_no_database():
    out = check()
    assert out["db_user"] == "alice" and "db_name" not in out
    assert int(out[dp.CAPS]) and out[dp.CHARSET] == "0" and out[dp.MAX_PACKET] == str(1 << 24)


def test_params_pass_the_clients_handshake_and_attributes():
    out = check(db_user="app", db_name="shop", **{dp.CAPS: "12345", dp.CHARSET: "45", dp.MAX_PACKET: "1024",
                                                  dp.ATTR_PREFIX + "program_name": "mysql", "other": "dropped"})
    assert out == {"db_user": "app", "db_name": "shop", dp.CAPS: "12345", dp.CHARSET: "45",
                   dp.MAX_PACKET: "1024", dp.ATTR_PREFIX + "program_name": "mysql"}


def test_a_probe_carries_nothing_else():
    assert check(**{dp.PROBE: "anything", "db_user": "root"}) == {dp.PROBE: "handshake"}


@pytest.mark.parametrize("params", [
    {"db_user": "u" * 81}, {"db_name": "d" * 65}, {"db_user": "a\x00b"},
    {dp.CAPS: "-1"}, {dp.CAPS: str(1 << 64)}, {dp.CHARSET: "256"}, {dp.MAX_PACKET: "x"},
])
def test_bad_params_are_refused(params):
    with pytest.raises(Refused) as info:
        check(**params)
    assert info.value.code is ErrorCode.BAD_REQUEST


class FakeCluster:
    def __init__(self):
        self.events = []

    def audit_fields_soon(self, event, user, fields):
        self.events.append((event, fields))


class FakeSession:
    id, user, resource = "s1", "alice", "maria"


def auditor(roles=()):
    cluster = FakeCluster()
    a = MySqlSessionAuditor(cluster, FakeSession(), MODERN,
                            Resource(name="maria", kind="mysql", address="127.0.0.1:3306", labels={}),
                            "app")
    a.roles = list(roles)
    return cluster, a


ROLE = Role.from_spec("dev", {"allow": [{"resources": ["maria"], "db_users": ["app"], "db_names": ["app*"]}]})


def test_commands_and_errors_are_audited():
    cluster, a = auditor([ROLE])
    a.from_client(query("select 1"))
    a.from_server(err(1, 1146, "Table 'app.t' doesn't exist"))
    a.from_client(command(Command.INIT_DB, b"app_two"))
    a.from_server(ok(1))
    a.from_client(command(Command.PING))
    a.from_server(ok(1))
    names = [e for e, _ in cluster.events]
    assert names == ["mysql.query", "mysql.error", "mysql.init_db", "mysql.command"]
    assert cluster.events[1][1]["errno"] == 1146
    assert cluster.events[2][1] == {"session_id": "s1", "resource": "maria", "schema": "app_two", "allowed": True}
    assert cluster.events[3][1]["command"] == "PING"


@pytest.mark.parametrize("packet", [command(Command.INIT_DB, b"secret"), query("USE secret"),
                                    command(Command.CHANGE_USER, b"root\x00\x00")])
def test_what_the_role_does_not_allow_ends_the_session_unsent(packet):
    cluster, a = auditor([ROLE])
    with pytest.raises(trio.BrokenResourceError):
        a.from_client(packet)
    assert cluster.events[-1][0] in ("mysql.init_db", "mysql.change_user")


@pytest.mark.parametrize("spec, constrained", [
    ({"allow": [{"resources": ["maria"], "db_users": ["app"], "db_names": ["*"]}]}, False),
    # No db_names list: no database at all (a session without one only).
    ({"allow": [{"resources": ["maria"], "db_users": ["app"]}]}, True),
    ({"allow": [{"resources": ["maria"], "db_users": ["app"], "db_names": ["app*"]}]}, True),
    ({"allow": [{"resources": ["maria"], "db_users": ["app"], "db_names": ["*"]}],
      "deny": [{"resources": ["maria"], "db_names": ["mysql"]}]}, True),
])
def test_names_constrained(spec, constrained):
    role = Role.from_spec("r", spec)
    resource = Resource(name="maria", kind="mysql", address="127.0.0.1:3306", labels={})
    assert names_constrained([role], resource, "app") is constrained


def test_a_database_name_that_is_not_utf8_ends_the_session():
    role = Role.from_spec("r", {"allow": [{"resources": ["maria"], "db_users": ["app"], "db_names": ["*"]}]})
    cluster, a = auditor([role])
    with pytest.raises(trio.BrokenResourceError):
        a.from_client(command(Command.INIT_DB, b"app\xff"))
    assert cluster.events[-1][1]["allowed"] is False

"""The cluster's dial checks (gateway/cluster/reach.py ``authorize``): what
a refused user is told and what the audit keeps. The cluster is a small
stand-in: the checks read only the access snapshot and the identity."""

from __future__ import annotations

import datetime as dt

import attrs
import pytest

from gateway.cluster import reach
from gateway.cluster.dialaudit import DialAudit
from gateway.cluster.routekind import TCP, Refused
from gateway.cluster.core import Snapshot
from gateway.cluster.postgres import POSTGRES
from gateway.cluster.rbac import Role
from gateway.cluster.store import Resource
from gateway.identity import pki
from protocols.dial import DialRequest
from protocols.errors import ErrorCode

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
ROLE = Role.from_spec("readers", {
    "allow": [{"labels": {"env": "dev"}, "db_users": ["app"], "db_names": ["app"]}],
    "deny": [{"labels": {"tier": "critical"}}],
})
RESOURCES = {
    "web": Resource(name="web", kind="tcp", address="127.0.0.1:80", labels={"env": "dev"}),
    "secret": Resource(name="secret", kind="tcp", address="127.0.0.1:81", labels={"env": "prod"}),
    "vault": Resource(name="vault", kind="tcp", address="127.0.0.1:82", labels={"env": "dev", "tier": "critical"}),
    "hidden-pg": Resource(name="hidden-pg", kind="postgres", address="127.0.0.1:5432", labels={"env": "prod"}),
    "pg": Resource(name="pg", kind="postgres", address="127.0.0.1:5433", labels={"env": "dev"}),
}
SNAPSHOT = Snapshot(counter=1, users={}, locks={}, roles={}, resources=RESOURCES)


@attrs.define
class StandIn:
    """What authorize uses of a Cluster."""

    def identify_in(self, snap, cert):
        identity = pki.Identity(user="alice", roles=("readers",), cluster="c", not_before=NOW,
                                not_after=NOW + dt.timedelta(hours=1))
        return identity, None, [ROLE]


def refusal(resource: str, kind=TCP, **params: str) -> tuple[ErrorCode, str, str]:
    audit = DialAudit.of(DialRequest(resource=resource, params=params), kind, "127.0.0.1:1")
    with pytest.raises(Refused) as err:
        reach.authorize(StandIn(), SNAPSHOT, b"cert", DialRequest(resource=resource, params=params), kind, audit)
    return err.value.code, err.value.message, err.value.reason


def test_unknown_and_out_of_reach_look_the_same_to_the_user():
    told = {name: refusal(name) for name in ("nothing-here", "secret", "vault", "hidden-pg")}
    shapes = {(code, message.replace(repr(name), "NAME")) for name, (code, message, _) in told.items()}
    assert shapes == {(ErrorCode.ACCESS_DENIED, "access to NAME denied: no such resource, or none of your "
                                                "roles reaches it")}
    # No kind on the wrong route, no role, no rule.
    assert not any(word in message for _, message, _ in told.values()
                   for word in ("postgres", "kind", "readers", "rule"))
    # The audit keeps the truth.
    assert told["nothing-here"][2] == "no resource named 'nothing-here'"
    assert told["vault"][2] == "denied by role 'readers' (deny rule 1)"
    assert "readers" in told["secret"][2]


def test_a_reachable_resource_on_the_wrong_route_names_its_kind():
    code, message, _ = refusal("pg")
    assert code is ErrorCode.BAD_REQUEST and "wicket proxy db pg" in message


def test_a_parameter_denial_names_only_what_roles_constrain_and_no_next_step():
    code, message, reason = refusal("pg", POSTGRES, db_user="postgres", db_name="app",
                                    **{"pg.application_name": "psql"})
    assert code is ErrorCode.ACCESS_DENIED
    assert message == "access to 'pg' denied: none of your roles allows db_name=app, db_user=postgres on it"
    # The gateway adds the next step, once.
    assert "administrator" not in message and "ask" not in message
    assert "application_name" not in reason


@pytest.mark.parametrize(("resource", "params", "what"), [
    ("web\n2026-01-01 forged", {}, "resource"),
    ("pg", {"db_user": "ro_\n<forged line>", "db_name": "app"}, "db_user"),
    ("pg", {"db_user": "app", "db_name": "app\u202e"}, "db_name"),
])
def test_names_with_control_characters_are_refused(resource, params, what):
    code, message, _ = refusal(resource, POSTGRES, **params)
    assert code is ErrorCode.BAD_REQUEST and message.startswith(what) and "control character" in message
    assert "\n" not in message and "\u202e" not in message  # the message itself is safe to log

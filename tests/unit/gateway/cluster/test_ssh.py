"""The ssh kind's cluster side: logins, the principals a certificate gets,
the node settings."""

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from gateway.cluster import config as cfg
from gateway.cluster.dial import Refused
from gateway.cluster.rbac import Role
from gateway.cluster.ssh import (
    agent_forwarding_allowed, allowed_logins, check_login, node_name, principal, sshd_config_lines,
)
from gateway.cluster.store import Resource
from gateway.identity.sshcerts import public_key_line

HOST_KEY = public_key_line(ed25519.Ed25519PrivateKey.generate())


def _node(name, **labels):
    return Resource(name=name, kind="ssh", address="10.0.0.1:22", labels=labels, spec={"host_key": HOST_KEY},
                    source="cli")


@pytest.mark.parametrize("login", ["root", "deploy", "a.b-c_d", "_svc", "host$", "x" * 64])
def test_logins_sshd_would_take(login):
    assert check_login(login) == login


@pytest.mark.parametrize("login", ["", None, "a b", "root@x", "-oProxyCommand=x", "x" * 65, "r\nx", "$x", "a/b"])
def test_anything_else_is_not_a_login(login):
    with pytest.raises(Refused) as info:
        check_login(login)
    assert info.value.code.value == "bad_request"


def test_principals_are_the_logins_allowed_by_name_deny_winning():
    roles = [
        Role.from_spec("ops", {"allow": [{"labels": {"env": "prod"}, "logins": ["root", "deploy", "svc-*"]}],
                               "deny": [{"resources": ["db-*"], "logins": ["root"]}]}),
        Role.from_spec("dev", {"allow": [{"resources": ["dev-*"], "logins": ["dev"]}]}),
    ]
    resources = {r.name: r for r in (_node("db-1", env="prod"), _node("web-1", env="staging"),
                                     Resource(name="pg", kind="postgres", address="h:5432", labels={"env": "prod"},
                                              spec={"tls": "disable", "auth": "password",
                                                    "passwords": {"*": "env:X"}}, source="cli"))}
    # db-1 only: root is denied there, the glob is no principal, web-1 and dev-* reach nothing.
    assert allowed_logins(roles, resources) == ["deploy"]
    resources["app-1"] = _node("app-1", env="prod")
    assert allowed_logins(roles, resources) == ["deploy", "root"]
    resources["dev-1"] = _node("dev-1")
    assert allowed_logins(roles, resources) == ["deploy", "dev", "root"]


def test_node_settings():
    assert cfg.validate_resource("n", "ssh", "h:22", {"host_key": HOST_KEY + " comment"}) == {"host_key": HOST_KEY}
    assert cfg.validate_resource("n", "ssh", "h:22", {"host_ca": "cluster"}) == {"host_ca": "cluster"}
    assert cfg.validate_resource("n", "ssh", "h:22", {"host_ca": HOST_KEY}) == {"host_ca": HOST_KEY}
    with pytest.raises(ValueError, match="needs host_key.*ssh-keyscan.*or host_ca"):
        cfg.validate_resource("n", "ssh", "h:22", {})
    with pytest.raises(ValueError, match="host_key: not an OpenSSH public key"):
        cfg.validate_resource("n", "ssh", "h:22", {"host_key": "ssh-ed25519 AAAA"})
    with pytest.raises(ValueError, match="unknown setting.*tls"):
        cfg.validate_resource("n", "ssh", "h:22", {"host_key": HOST_KEY, "tls": "require"})
    assert cfg.validate_resource("n", "ssh", "h:22", {"host_ca": "cluster", "principals": "node"}) == \
        {"host_ca": "cluster", "principals": "node"}
    with pytest.raises(ValueError, match="principals must be one of login, node"):
        cfg.validate_resource("n", "ssh", "h:22", {"host_ca": "cluster", "principals": "any"})
    with pytest.raises(ValueError, match="needs host_key"):
        cfg.validate_resource("n", "ssh", "h:22", {"principals": "node"})


def test_a_certificate_names_the_login_or_the_login_on_the_node():
    login_node = _node("web-1")
    scoped = Resource(name="web-2", kind="ssh", address="h:22", labels={}, source="cli",
                      spec={"host_key": HOST_KEY, "principals": "node"})
    assert principal(login_node, "root", "web-1.prod") == "root"
    assert principal(scoped, "root", "web-2.prod") == "root@web-2.prod"
    lines = sshd_config_lines("web-2", "prod")
    assert "AuthorizedPrincipalsCommand /bin/echo %u@web-2.prod\n" in lines
    assert "TrustedUserCAKeys " in lines and "AuthorizedPrincipalsCommandUser nobody" in lines


def test_agent_forwarding_only_where_a_role_says_on_deny_winning():
    roles = [Role.from_spec("ops", {"allow": [{"labels": {"env": "prod"}, "logins": ["root", "deploy"]},
                                              {"resources": ["web-*"], "logins": ["deploy"],
                                               "ssh_agent_forwarding": ["on"]}],
                                    "deny": [{"resources": ["web-9"], "ssh_agent_forwarding": ["on"]}]})]
    assert agent_forwarding_allowed(roles, _node("web-1", env="prod"), "deploy")
    assert not agent_forwarding_allowed(roles, _node("web-1", env="prod"), "root")
    assert not agent_forwarding_allowed(roles, _node("app-1", env="prod"), "deploy")
    assert not agent_forwarding_allowed(roles, _node("web-9", env="prod"), "deploy")


def test_node_names_carry_the_cluster():
    assert node_name("web-1", "prod") == "web-1.prod"


def test_gateway_reports_are_recorded_only_for_the_users_own_terminated_sessions():
    import datetime as dt

    from gateway.cluster import ssh
    from gateway.identity import pki
    from gateway.net.http import HTTPError

    recorded = []

    class Cluster:
        def audit_soon(self, event, user, **fields):
            recorded.append((event, user, fields))

    now = dt.datetime.now(dt.timezone.utc)
    alice = pki.Identity(user="alice", roles=(), cluster="c", not_before=now, not_after=now)
    ssh.SSH.terminated["s-alice"] = ("alice", "web-1")
    ssh.SSH.terminated["s-bob"] = ("bob", "web-1")
    try:
        answer = ssh.record_gateway_reports(Cluster(), alice, {"events": [
            {"session_id": "s-alice", "event": "ssh.exec", "fields": {"command": "ls", "extra": "dropped"}},
            {"session_id": "s-alice", "event": "ssh.sftp",
             "fields": {"op": "file", "path": "/x", "bytes_written": 5, "ok": "yes", "bytes_read": True}},
            {"session_id": "s-alice", "event": "ssh.exec", "fields": {"command": "x" * 20000}},
            {"session_id": "s-bob", "event": "ssh.exec", "fields": {"command": "not hers"}},
            {"session_id": "s-alice", "event": "login.ok", "fields": {}},
            {"session_id": "nope", "event": "ssh.exec", "fields": {"command": "ls"}},
        ]})
    finally:
        del ssh.SSH.terminated["s-alice"], ssh.SSH.terminated["s-bob"]
    assert answer.body == {"recorded": 3, "refused": 3}
    assert recorded[0] == ("ssh.exec", "alice", {"session_id": "s-alice", "resource": "web-1",
                                                 "reported_by": "gateway", "command": "ls"})
    assert recorded[1][2]["bytes_written"] == 5 and "ok" not in recorded[1][2] and "bytes_read" not in recorded[1][2]
    assert len(recorded[2][2]["command"]) == ssh.MAX_REPORTED_TEXT and recorded[2][2]["truncated"] is True
    with pytest.raises(HTTPError):
        ssh.record_gateway_reports(Cluster(), alice, {"events": [{}] * 300})

"""MySQL/MariaDB's statement audit end to end: a real MariaDB 10.11, the
real cluster and gateway, the mysql CLI. A statement's audit event carries
its full length and the SHA-256 of all of it, and its head and tail when
it is longer than the text kept (issue 15's rule, for MySQL: issue 16),
also when it is sent in several packets (a payload of 16 MiB or more)."""

from __future__ import annotations

import hashlib
import itertools
import subprocess

import pytest

from tests.integration.dbenv import add_resource, database_env, new_gateway
from tests.integration.harness import wait_for

from gateway.local.mariadbserver import MariaDbServer, find_mariadbd  # noqa: E402

try:
    find_mariadbd()
except Exception as exc:  # pragma: no cover - a machine without MariaDB
    pytest.skip(f"MariaDB server not installed: {exc}", allow_module_level=True)

ROLES = """
[roles.my-audit]
[[roles.my-audit.allow]]
resources = ["maria-audit"]
db_users = ["app"]
db_names = ["app"]
"""

_n = itertools.count(1)


@pytest.fixture(scope="module")
def audit_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("my-audit")

    def make_server(client_ca_pem: bytes) -> MariaDbServer:
        return MariaDbServer(tmp / "mariadb", client_ca_pem=client_ca_pem)

    with database_env(tmp, make_server, roles=ROLES) as (cluster, server):
        server.sql("CREATE DATABASE app; CREATE USER app@'%' REQUIRE SUBJECT '/CN=app';"
                   "GRANT ALL ON app.* TO app@'%' REQUIRE SUBJECT '/CN=app';")
        add_resource(cluster, server, "maria-audit", "mysql")
        gw = new_gateway(cluster, tmp, "my-audit", "myaudit")
        try:
            yield cluster, gw, gw.proxy("db", "maria-audit")[1]
        finally:
            gw.stop()


def mysql_stdin(port: int, script: str) -> subprocess.CompletedProcess:
    """The mysql CLI running ``script`` from its standard input (a
    statement over the 128 KiB an argument may hold)."""
    return subprocess.run(["mysql", "--no-defaults", "-h", "127.0.0.1", "-P", str(port), "-u", "app", "-N", "-B",
                           "--connect-timeout=30", "--max-allowed-packet=64M", "app"],
                          input=script, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("padding", [17 * 1024, 2 * 1024 * 1024, 20 * 1024 * 1024],
                         ids=["17KiB", "2MiB", "20MiB"])
def test_a_statement_cannot_hide_behind_padding(audit_env, padding):
    """17 KiB: over the text kept; 2 MiB: over the part of a command the
    auditor keeps (followed as it streams past); 20 MiB: over one packet
    (the client sends it as two, the digest covers both)."""
    cluster, gw, port = audit_env
    marker = f"hidden_{next(_n)}"
    statement = f"select length('{'x' * padding}') as n, '{marker}' as m"
    r = mysql_stdin(port, statement + ";\n")
    assert r.returncode == 0, r.stderr[:2000]
    assert r.stdout.split() == [str(padding), marker]

    def recorded():
        return [e for e in cluster.audit(user=gw.user, event="mysql.query") if e.get("length") == len(statement)]

    [event] = wait_for(recorded, what="the padded statement's audit event")
    assert event["sha256"] == hashlib.sha256(statement.encode()).hexdigest()
    assert event["truncated"] is True and event["size"] == len(statement) + 1
    assert event["query"].startswith("select length('xxx") and event["query"].endswith(f"'{marker}' as m")
    assert len(event["query"]) < 17 * 1024

"""The shared set-up of the test_postgres*.py topic files: one PostgreSQL 15
with resources for each upstream auth mode, a logged-in gateway and its db
proxy (package fixtures, shared by those files through conftest.py, as they
were by one module before the split), and psql, dsn and error helpers."""

from __future__ import annotations

import os
import subprocess

import pytest

from gateway.local.pgserver import PgServer
from tests.integration.dbenv import add_down_resource, add_resource, database_env, new_gateway
from tests.integration.harness import Gateway


PG_PW = "scram secret for pwuser"
MD5_PW = "md5 secret for md5user"

ROLES = """
[roles.pg]
[[roles.pg.allow]]
resources = ["pg*"]
db_users = ["app", "pwuser", "md5user"]
db_names = ["*"]
[[roles.pg.deny]]
resources = ["pg*"]
db_names = ["template*"]

[roles.pg-app-only]
[[roles.pg-app-only.allow]]
resources = ["pg"]
db_users = ["app"]
db_names = ["app"]
"""


@pytest.fixture(scope="package")
def pg_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pg")
    md5_file = tmp / "md5.pass"
    md5_file.write_text(MD5_PW + "\n")

    def make_server(client_ca_pem: bytes) -> PgServer:
        return PgServer(tmp / "pgserver", client_ca_pem=client_ca_pem,
                        hba_extra="hostssl all pwuser 127.0.0.1/32 scram-sha-256\n"
                                  "host all md5user 127.0.0.1/32 md5\n")

    with database_env(tmp, make_server, roles=ROLES, env={"WICKET_TEST_PG_PW": PG_PW}) as (cluster, server):
        server.sql("CREATE ROLE app LOGIN")
        server.sql("CREATE DATABASE app OWNER app")
        server.sql(f"CREATE ROLE pwuser LOGIN PASSWORD '{PG_PW}'")
        server.sql(f"SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD '{MD5_PW}'")
        server.sql("GRANT ALL ON DATABASE app TO pwuser, md5user")
        server.sql("GRANT ALL ON SCHEMA public TO pwuser, md5user", dbname="app")
        add_resource(cluster, server, "pg", "postgres", "--label", "env=dev")
        add_resource(cluster, server, "pg-pw", "postgres", "--auth", "password",
                     "--password-ref", "pwuser=env:WICKET_TEST_PG_PW")
        cluster.admin("resources", "add", "pg-md5", "--kind", "postgres", "--address", server.address,
                      "--tls", "disable", "--auth", "password", "--password-ref", f"md5user=file:{md5_file}")
        add_down_resource(cluster, "pg-down", "postgres")
        yield cluster, server


@pytest.fixture(scope="package")
def gw(pg_env, tmp_path_factory):
    """A user with role pg, logged in, with a db proxy to resource pg."""
    cluster, _ = pg_env
    g = _gateway(cluster, tmp_path_factory.mktemp("gw"), "pg")
    yield g
    g.stop()


_n = iter(range(1, 10_000))  # unique names for the tests' own objects


def _gateway(cluster, tmp, roles: str) -> Gateway:
    return new_gateway(cluster, tmp, roles, "pguser")


@pytest.fixture(scope="package")
def pg_port(gw):
    _, port = gw.proxy("db", "pg")
    return port


def dsn(port: int, user: str = "app", db: str = "app", **extra: str) -> str:
    parts = {"host": "127.0.0.1", "port": str(port), "user": user, "dbname": db, **extra}
    return " ".join(f"{k}={v}" for k, v in parts.items())


def psql(port: int, *args: str, user: str = "app", db: str = "app", extra: dict | None = None,
         input: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-tA", dsn(port, user, db, **(extra or {})), *args],
                          capture_output=True, text=True, timeout=120, input=input,
                          env={**os.environ, "PGCONNECT_TIMEOUT": "30", **(env or {})})


def _expect_fatal(r: subprocess.CompletedProcess, *phrases: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "FATAL" in r.stderr
    for p in phrases:
        assert p in r.stderr, r.stderr


def connect_error(port: int, user: str = "app", db: str = "app", **connect) -> tuple[str | None, str]:
    """(SQLSTATE, message) of a refused connection, as a driver sees it
    (asyncpg exposes the server's SQLSTATE on connection errors; libpq does not).
    ``connect``: more for asyncpg.connect (server_settings, say)."""
    import asyncio

    import asyncpg

    async def attempt():
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user=user, database=db, ssl=False,
                                         timeout=60, **connect)
        except asyncpg.PostgresError as exc:
            return exc.sqlstate, str(exc)
        await conn.close()
        return None, ""

    return asyncio.run(attempt())

"""A PostgreSQL 15 behind a real cluster, for the topic test files that need
one (test_unix_sockets.py, test_session_cut.py): one resource ``pg`` the
cluster logs in to with its client certificate, as db user ``app``."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import Cluster, Echo, Gateway, logged_in

NOBODY = 65534

ROLES = """
[roles.pg]
[[roles.pg.allow]]
resources = ["pg"]
db_users = ["app"]
db_names = ["app"]
"""


def need_postgres() -> None:
    from gateway.local.pgserver import find_bindir

    try:
        find_bindir()
    except Exception as exc:  # pragma: no cover - a machine without PostgreSQL
        pytest.skip(f"PostgreSQL server not installed: {exc}", allow_module_level=True)


@contextlib.contextmanager
def running(tmp: Path):
    """(cluster, server), started, and stopped at the end."""
    echo, cluster, server = start(tmp)
    try:
        yield cluster, server
    finally:
        server.stop()
        cluster.stop()
        echo.proc.stop()


def user(tmp: Path, cluster: Cluster, name: str, roles: str = "pg", *login: str) -> Gateway:
    """A Gateway for a new user with ``roles``, logged in (``login``: extra
    ``wicket login`` options)."""
    return logged_in(tmp, cluster, name, roles, *login)


def start(tmp: Path):
    """(echo, cluster, server), started."""
    from gateway.local.pgserver import PgServer

    echo = Echo(tmp)
    cluster = Cluster(tmp, echo, extra_config=ROLES)
    server = PgServer(tmp / "pgserver", client_ca_pem=(cluster.state / "db_client_ca.crt").read_bytes())
    server.start()
    server.sql("CREATE ROLE app LOGIN")
    server.sql("CREATE DATABASE app OWNER app")
    cluster.admin("resources", "add", "pg", "--kind", "postgres", "--address", server.address,
                  "--ca-file", str(server.server_ca_path), "--server-name", "localhost")
    return echo, cluster, server


def psql(conninfo: str, *args: str, timeout: float = 120, preexec_fn=None) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ["PATH"], "PGCONNECT_TIMEOUT": "30", "HOME": "/"}
    return subprocess.run(["psql", "-X", "-v", "ON_ERROR_STOP=1", "-tA", conninfo, *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd="/", preexec_fn=preexec_fn)


def as_nobody() -> None:
    """preexec_fn: the child runs as uid nobody (another local user)."""
    os.setgid(NOBODY)
    os.setuid(NOBODY)

"""A lock or the certificate's expiry stops what a session runs upstream:
the cluster cancels the running PostgreSQL statement with the backend's
key (RouteKind.interrupt), then closes the session, so a long statement is
gone and an in-flight write does not commit after the cut. Audited as
``session.interrupt``.

Each statement would run for ten minutes if it were not cancelled; the
polls give up long before that, so without the interrupt these fail."""

from __future__ import annotations

import subprocess

import pytest

from tests.integration import pgenv
from tests.integration.harness import Gateway, wait_for

pgenv.need_postgres()

SLOW_INSERT = "insert into cut_rows select 1 from pg_sleep(600)"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cut")
    with pgenv.running(tmp) as (cluster, server):
        server.sql("CREATE TABLE cut_rows (n int)", dbname="app")
        server.sql("GRANT ALL ON cut_rows TO app", dbname="app")
        yield tmp, cluster, server


def count(server, query: str, dbname: str = "postgres") -> int:
    return int(server.sql(query, dbname=dbname).strip())


def running(server, text: str) -> bool:
    return count(server, f"select count(*) from pg_stat_activity where query = '{text}' and state = 'active'") > 0


def start_slow_insert(gw: Gateway, server, port: int | None = None) -> tuple[subprocess.Popen, int]:
    if port is None:
        _, port = gw.proxy("db", "pg")
    client = subprocess.Popen(["psql", "-X", "-tA", f"host=127.0.0.1 port={port} user=app dbname=app",
                               "-c", SLOW_INSERT], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: running(server, SLOW_INSERT), what="the statement to run")
    return client, port


def test_a_lock_cancels_the_running_statement_and_its_write(env):
    tmp, cluster, server = env
    gw = pgenv.user(tmp, cluster, "locked-mid-query")
    try:
        client, _ = start_slow_insert(gw, server)
        cluster.admin("users", "lock", gw.user, "--reason", "laptop stolen")
        wait_for(lambda: not running(server, SLOW_INSERT), timeout=20, what="the statement to be cancelled")
        _, err = client.communicate(timeout=30)
        assert client.returncode != 0
        assert count(server, "select count(*) from cut_rows", "app") == 0  # the write did not commit
        # The backend is gone too, not idle.
        wait_for(lambda: count(server, "select count(*) from pg_stat_activity where usename = 'app'") == 0,
                 timeout=20, what="the backend to end")
        events = cluster.wait_audit(event="session.interrupt", user=gw.user)
        assert events[0]["reason"] == "user_locked" and events[0]["result"] == "cancel sent", events
        ended = cluster.wait_audit(event="session.end", user=gw.user)
        assert ended[0]["reason"] == "user_locked"
    finally:
        gw.stop()
        cluster.admin("users", "unlock", gw.user, check=False)


def test_the_certificates_expiry_cancels_the_running_statement(env):
    tmp, cluster, server = env
    gw = pgenv.user(tmp, cluster, "expires-mid-query", "pg")
    try:
        _, port = gw.proxy("db", "pg")
        # The short certificate is made once the proxy is up (its start-up,
        # slow on a loaded machine, must not use it up); the proxy takes the
        # new login for its next dial.
        r = gw.login("--ttl", "6s")
        assert r.returncode == 0, r.stderr
        client, _ = start_slow_insert(gw, server, port)
        # No one does anything: the certificate runs out.
        wait_for(lambda: not running(server, SLOW_INSERT), timeout=30, what="the statement to be cancelled")
        client.communicate(timeout=30)
        assert count(server, "select count(*) from cut_rows", "app") == 0
        events = cluster.wait_audit(event="session.interrupt", user=gw.user)
        assert events[0]["reason"] == "cert_expired" and events[0]["result"] == "cancel sent", events
    finally:
        gw.stop()

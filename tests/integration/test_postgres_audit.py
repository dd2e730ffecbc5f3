"""PostgreSQL end to end: the statement audit (simple and extended protocol,
padding, COPY), and a lock cutting a live session."""

from __future__ import annotations

import json

import pytest

from tests.integration.harness import wait_for
from tests.integration.pgclients import _gateway, _n, dsn, psql
from tests.integration.pgenv import need_postgres

need_postgres()
psycopg = pytest.importorskip("psycopg")


# -- audit -------------------------------------------------------------------------


def test_statements_are_audited(pg_env, gw, pg_port):
    cluster, _ = pg_env
    marker = f"audit_marker_{next(_n)}"
    assert psql(pg_port, "-c", f"select '{marker}'").returncode == 0
    with psycopg.connect(dsn(pg_port)) as conn:
        conn.execute(f"select %s::text as {marker}_x", ("secret-param-value",))
        with pytest.raises(psycopg.errors.UndefinedTable):
            conn.execute(f"select * from {marker}_missing")

    def events():
        return [e for e in cluster.audit(user=gw.user) if marker in json.dumps(e)]

    found = wait_for(lambda: len(events()) >= 4 and events(), what="statement audit events")
    kinds = {e["event"] for e in found}
    assert {"pg.query", "pg.parse", "pg.error"} <= kinds, kinds
    assert "secret-param-value" not in json.dumps(cluster.audit(user=gw.user))
    err = next(e for e in found if e["event"] == "pg.error")
    assert err["sqlstate"] == "42P01"
    ends = cluster.wait_audit(user=gw.user, event="session.end")
    assert ends and all(e["kind"] == "postgres" for e in ends)


def test_a_statement_cannot_hide_behind_padding(pg_env, gw, pg_port):
    """A 17 KiB leading comment once pushed a CREATE TABLE past the 16 KiB
    the audit kept of a statement. Its tail is kept now, with its full
    length and digest."""
    import hashlib

    cluster, _ = pg_env
    table = f"t_hidden_{next(_n)}"
    statement = "/* " + "x" * 17 * 1024 + f" */ create table {table} (x int)"
    with psycopg.connect(dsn(pg_port), autocommit=True) as conn:
        conn.execute(statement.encode(), prepare=False)  # (bytes: psycopg sends it as it is)

    def recorded():
        return [e for e in cluster.audit(user=gw.user, event="pg.") if e.get("length") == len(statement)]

    [event] = wait_for(recorded, what="the padded statement's audit event")
    assert f"create table {table} (x int)" in event["query"] and event["truncated"] is True
    assert event["sha256"] == hashlib.sha256(statement.encode()).hexdigest()
    assert len(event["query"]) < 17 * 1024


def test_copy_is_audited(pg_env, gw, pg_port):
    cluster, _ = pg_env
    assert psql(pg_port, "-c", "drop table if exists t_audit_copy; create table t_audit_copy (x int)").returncode == 0
    r = psql(pg_port, "-c", "\\copy t_audit_copy from stdin", input="1\n2\n3\n")
    assert r.returncode == 0, r.stderr
    r = psql(pg_port, "-c", "\\copy t_audit_copy to stdout")
    assert r.stdout.split() == ["1", "2", "3"]
    cluster.wait_audit(lambda evs: {c["direction"] for c in evs} >= {"in", "out"}, user=gw.user, event="pg.copy")


def test_extended_protocol_execution_is_audited_once(pg_env, gw, pg_port):
    cluster, _ = pg_env
    marker = f"exec_marker_{next(_n)}"
    with psycopg.connect(dsn(pg_port)) as conn:
        conn.execute(f"select %s::int as {marker}", (7,), prepare=True)
    parses = cluster.wait_audit(lambda evs: any(marker in e.get("query", "") for e in evs),
                                user=gw.user, event="pg.parse")
    statement = next(e["statement"] for e in parses if marker in e.get("query", ""))
    executes = cluster.wait_audit(lambda evs: any(e["statement"] == statement for e in evs),
                                  user=gw.user, event="pg.execute")
    run = next(e for e in executes if e["statement"] == statement)
    assert run["param_count"] == 1


def test_a_lock_cuts_a_live_session_on_the_multiplexed_connection(pg_env, tmp_path):
    """A PostgreSQL session is a stream of the multiplexed connection: a lock
    still ends it within 2 s, and its session.end says why."""
    cluster, _ = pg_env
    g = _gateway(cluster, tmp_path, "pg")
    try:
        _, port = g.proxy("db", "pg")
        with psycopg.connect(dsn(port), autocommit=True) as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            cluster.admin("users", "lock", g.user, "--reason", "incident 43")
            with pytest.raises(psycopg.OperationalError):  # cut: not 30 s later, with a row
                conn.execute("select pg_sleep(30)")
        ended = cluster.wait_audit(user=g.user, event="session.end")
        assert ended[-1]["reason"] == "user_locked" and ended[-1]["kind"] == "postgres"
        started = cluster.audit(user=g.user, event="session.start")
        assert started[-1]["session_id"] == ended[-1]["session_id"] and started[-1]["db_user"] == "app"
    finally:
        cluster.admin("users", "unlock", g.user)
        g.stop()

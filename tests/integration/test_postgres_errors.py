"""PostgreSQL end to end: every error path, as the client's own error (denied
db users, unreachable resources and clusters, expired certificates,
malformed start-ups, replication, other local users)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from tests.integration.harness import Gateway, wait_for
from tests.integration.pgclients import _expect_fatal, _gateway, _n, connect_error, dsn, psql
from tests.integration.pgenv import need_postgres

need_postgres()
psycopg = pytest.importorskip("psycopg")
pytest.importorskip("asyncpg")  # connect_error's driver


# -- every error path, as the client's own error ------------------------------------


def test_denied_db_user(pg_env, tmp_path):
    cluster, _ = pg_env
    g = _gateway(cluster, tmp_path, "pg-app-only")
    try:
        _, port = g.proxy("db", "pg")
        r = psql(port, "-c", "select 1", user="pwuser")
        _expect_fatal(r, "access to 'pg' denied: none of your roles allows db_name=app, db_user=pwuser on it")
        assert r.stderr.count("administrator") == 1, r.stderr  # what to do, once
        assert "application_name" not in r.stderr and "pg-app-only" not in r.stderr
        assert connect_error(port, user="pwuser")[0] == "28000"
        with pytest.raises(psycopg.OperationalError, match="denied"):
            psycopg.connect(dsn(port, user="pwuser"))
        assert psql(port, "-c", "select 1").returncode == 0  # app/app is allowed
        _expect_fatal(psql(port, "-c", "select 1", db="postgres"), "denied")
    finally:
        g.stop()
    denied = cluster.wait_audit(user=g.user, event="dial.denied")
    assert any(e["params"].get("db_user") == "pwuser" for e in denied)


def test_unknown_resource_and_unreachable(gw):
    # `wicket proxy db` asks the cluster which kind a resource is (postgres
    # and mysql share the verb) and will not start for one out of reach.
    r = gw.run("proxy", "db", "pg-nope", "--port", "0")
    assert r.returncode == 4 and "no resource named 'pg-nope' that you can reach" in r.stderr
    # The kind's own verb starts without asking: the client hears the refusal.
    _, port = gw.proxy("postgres", "pg-nope")
    sqlstate, message = connect_error(port)
    # As a resource out of the user's reach: no one learns what exists.
    assert sqlstate == "28000" and "no such resource, or none of your roles reaches it" in message
    _expect_fatal(psql(port, "-c", "select 1"), "access to 'pg-nope' denied")
    _, port = gw.proxy("db", "pg-down")
    sqlstate, message = connect_error(port)
    assert sqlstate == "08006" and "not reachable" in message
    _expect_fatal(psql(port, "-c", "select 1"), "not reachable from the cluster")


def test_a_cluster_that_cannot_be_reached_is_waited_for_then_a_native_error(pg_env, tmp_path):
    # The profile points at a port nobody listens on: every connect is
    # refused at once, as while the cluster restarts. The client waits for
    # --wait-for-cluster, then gets why as its own error.
    cluster, _ = pg_env
    g = _gateway(cluster, tmp_path, "pg")
    try:
        with g.cluster_unreachable():
            proc, port = g.proxy("postgres", "pg", "--wait-for-cluster", "0.5")  # "db" would ask the cluster first
            sqlstate, message = connect_error(port)
        assert sqlstate == "08006"
        assert re.search(r"waited [\d.]+s for the cluster", message) and "Connection refused" in message
        assert "wicket-cluster start" in message  # what to check
        assert "Wicket cluster is running" in message and "resource is down" not in message
        assert "cluster_wait" in proc.log()
    finally:
        g.stop()


def test_db_verb_starts_without_the_cluster_once_it_knows_the_kind(pg_env, tmp_path):
    # `wicket proxy db` learns a resource's kind from the cluster; when the
    # cluster is away it goes by the last listing, so the client still hears
    # why in its own protocol instead of the gateway not starting.
    cluster, _ = pg_env
    g = _gateway(cluster, tmp_path, "pg")
    try:
        with g.cluster_unreachable():
            r = g.run("proxy", "db", "pg", "--port", "0")
        assert r.returncode == 5, r.stderr
        assert "the kind of pg is not known yet" in r.stderr and "`wicket proxy postgres pg`" in r.stderr
        assert g.run("ls").returncode == 0  # the listing is remembered
        with g.cluster_unreachable():
            _, port = g.proxy("db", "pg", "--wait-for-cluster", "0.5")
            sqlstate, message = connect_error(port)
        assert sqlstate == "08006" and re.search(r"waited [\d.]+s for the cluster", message)
    finally:
        g.stop()


def test_upstream_error_is_native(pg_port):
    r = psql(pg_port, "-c", "select 1", db="no_such_db")
    assert r.returncode == 2
    assert 'database "no_such_db" does not exist' in r.stderr


def test_expired_certificate(pg_env, tmp_path):
    cluster, _ = pg_env
    name = f"pguser{next(_n)}"
    cluster.add_user(name, "pg")
    g = Gateway(tmp_path, cluster, name)
    try:
        # Long enough for the proxy to start on a busy machine (it refuses
        # to start on an expired login), short enough to wait out.
        assert g.login("--ttl", "10s").returncode == 0
        _, port = g.proxy("db", "pg")
        wait_for(lambda: g.run("status").returncode == 3, timeout=40, what="expiry", interval=0.2)
        sqlstate, message = connect_error(port)
        assert sqlstate == "28000" and "wicket login" in message
        _expect_fatal(psql(port, "-c", "select 1"), "expired", "wicket login")
    finally:
        g.stop()


def test_malformed_startup_gets_error_and_gateway_keeps_serving(pg_port):
    import socket
    import struct

    with socket.create_connection(("127.0.0.1", pg_port), timeout=30) as s:
        s.sendall(struct.pack(">II", 8, 0x00020000))  # protocol 2.0: unsupported
        answer = s.recv(4096)
    assert answer[:1] == b"E" and b"0A000" in answer
    with socket.create_connection(("127.0.0.1", pg_port), timeout=30) as s:
        s.sendall(struct.pack(">I", 100_000))  # an absurd startup length
        answer = s.recv(4096)
    assert answer[:1] == b"E" and b"08P01" in answer
    assert psql(pg_port, "-c", "select 1").stdout.strip() == "1"


@pytest.mark.parametrize("mode", ["database", "true"])  # logical (psql), physical (pg_receivewal)
def test_replication_is_refused_as_not_supported(pg_port, mode):
    import socket
    import struct

    body = b"user\x00app\x00database\x00app\x00replication\x00" + mode.encode() + b"\x00\x00"
    with socket.create_connection(("127.0.0.1", pg_port), timeout=30) as s:
        s.sendall(struct.pack(">II", 8 + len(body), 3 << 16) + body)
        answer = s.recv(4096)
    assert answer[:1] == b"E" and b"SFATAL" in answer and b"C0A000" in answer
    assert b"replication connections are not supported through Wicket" in answer
    assert psql(pg_port, "-c", "select 1").stdout.strip() == "1"


def test_replication_clients_are_told_why(pg_port, tmp_path):
    why = "FATAL:  replication connections are not supported through Wicket; connect to the server directly"
    _expect_fatal(psql(pg_port, "-c", "select 1", extra={"replication": "database"}), why)
    for tool in (["pg_receivewal", "--no-loop", "-D", str(tmp_path)], ["pg_basebackup", "-D", str(tmp_path / "b")]):
        r = subprocess.run([*tool, "-d", dsn(pg_port)], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PGCONNECT_TIMEOUT": "30"})
        assert r.returncode == 1 and why in r.stderr, (tool, r.stderr)


NOBODY = 65534


def _as_nobody(*argv: str) -> subprocess.CompletedProcess:
    """``argv`` run by a process of uid nobody (another local user)."""
    def drop() -> None:
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=120, preexec_fn=drop, cwd="/",
                          env={"PATH": os.environ["PATH"], "PGCONNECT_TIMEOUT": "30", "HOME": "/"})


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
def test_another_local_user_is_told_no_in_its_own_protocol(gw, pg_port):
    """A gateway acts with its owner's identity: psql run by another local
    user gets a FATAL saying why (and the owner's gateway keeps serving its
    owner); --allow-uid lets that user in."""
    r = _as_nobody("psql", "-X", "-tA", dsn(pg_port), "-c", "select 1")
    _expect_fatal(r, f"uid {NOBODY}", f"--allow-uid {NOBODY}")
    assert psql(pg_port, "-c", "select 1").stdout.strip() == "1"
    _, open_port = gw.proxy("db", "pg", "--allow-uid", str(NOBODY))
    r = _as_nobody("psql", "-X", "-tA", dsn(open_port), "-c", "select current_user")
    assert r.returncode == 0 and r.stdout.strip() == "app", r.stderr

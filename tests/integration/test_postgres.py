"""PostgreSQL end to end: a real PostgreSQL 15, the real cluster and gateway
processes, and real clients (psql, pgbench, psycopg 3, asyncpg)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import threading
import time

import pytest

from tests.integration.harness import Cluster, Echo, Gateway, keepalive_everywhere, wait_for

psycopg = pytest.importorskip("psycopg")
asyncpg = pytest.importorskip("asyncpg")

from gateway.local.pgserver import PgServer, find_bindir  # noqa: E402

try:
    find_bindir()
except Exception as exc:  # pragma: no cover - a machine without PostgreSQL
    pytest.skip(f"PostgreSQL server not installed: {exc}", allow_module_level=True)

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


@pytest.fixture(scope="module")
def pg_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pg")
    echo = Echo(tmp)
    md5_file = tmp / "md5.pass"
    md5_file.write_text(MD5_PW + "\n")
    cluster = Cluster(tmp, echo, extra_config=ROLES, env={"WICKET_TEST_PG_PW": PG_PW})
    server = PgServer(tmp / "pgserver", client_ca_pem=(cluster.state / "db_client_ca.crt").read_bytes(),
                      hba_extra="hostssl all pwuser 127.0.0.1/32 scram-sha-256\n"
                                "host all md5user 127.0.0.1/32 md5\n")
    server.start()
    server.sql("CREATE ROLE app LOGIN")
    server.sql("CREATE DATABASE app OWNER app")
    server.sql(f"CREATE ROLE pwuser LOGIN PASSWORD '{PG_PW}'")
    server.sql(f"SET password_encryption = 'md5'; CREATE ROLE md5user LOGIN PASSWORD '{MD5_PW}'")
    server.sql("GRANT ALL ON DATABASE app TO pwuser, md5user")
    server.sql("GRANT ALL ON SCHEMA public TO pwuser, md5user", dbname="app")
    ca = str(server.server_ca_path)
    cluster.admin("resources", "add", "pg", "--kind", "postgres", "--address", server.address,
                  "--ca-file", ca, "--server-name", "localhost", "--label", "env=dev")
    cluster.admin("resources", "add", "pg-pw", "--kind", "postgres", "--address", server.address,
                  "--ca-file", ca, "--server-name", "localhost", "--auth", "password",
                  "--password-ref", "pwuser=env:WICKET_TEST_PG_PW")
    cluster.admin("resources", "add", "pg-md5", "--kind", "postgres", "--address", server.address,
                  "--tls", "disable", "--auth", "password", "--password-ref", f"md5user=file:{md5_file}")
    cluster.admin("resources", "add", "pg-down", "--kind", "postgres", "--address", "127.0.0.1:9",
                  "--tls", "require")
    yield cluster, server
    server.stop()
    cluster.stop()
    echo.proc.stop()


_n = iter(range(1, 10_000))


@pytest.fixture(scope="module")
def gw(pg_env, tmp_path_factory):
    """A user with role pg, logged in, with a db proxy to resource pg."""
    cluster, _ = pg_env
    g = _gateway(cluster, tmp_path_factory.mktemp("gw"), "pg")
    yield g
    g.stop()


def _gateway(cluster, tmp, roles: str) -> Gateway:
    return Gateway.logged_in(cluster, tmp, f"pguser{next(_n)}", roles)


@pytest.fixture(scope="module")
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


# -- psql and pgbench ------------------------------------------------------------


def test_psql_no_password(pg_port):
    r = psql(pg_port, "-c", "select current_user, current_database()")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "app|app"


def test_psql_script_and_copy(pg_port, tmp_path):
    script = tmp_path / "s.sql"
    data = tmp_path / "in.csv"
    out = tmp_path / "out.csv"
    data.write_text("".join(f"{i},row {i}\n" for i in range(5000)))
    script.write_text(
        "drop table if exists t_copy;\n"
        "create table t_copy (id int, name text);\n"
        f"\\copy t_copy from '{data}' with csv\n"
        f"\\copy (select * from t_copy order by id) to '{out}' with csv\n"
        "select count(*) from t_copy;\n"
    )
    r = psql(pg_port, "-f", str(script))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "5000"
    assert out.read_text() == data.read_text()


def test_connections_off_the_machine_are_probed_when_quiet(pg_env, pg_port):
    """While a session is open, every connection between the gateway and the
    cluster (the session's and the warm pool's) and between the cluster and
    PostgreSQL has keepalive on at both ends (gateway/net/tcp.py)."""
    cluster, server = pg_env
    with psycopg.connect(dsn(pg_port)) as conn:
        conn.execute("select 1")
        for port in (int(cluster.address.rsplit(":", 1)[1]), int(server.address.rsplit(":", 1)[1])):
            wait_for(lambda: keepalive_everywhere(port), what=f"keepalive on every connection to port {port}",
                     interval=0.1)


def test_pgbench(pg_port):
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(pg_port), "PGUSER": "app", "PGDATABASE": "app"}

    def bench(*args: str) -> str:
        r = subprocess.run(["pgbench", *args], capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, r.stderr
        return r.stdout

    bench("-i", "-s", "1", "-q")
    assert "number of transactions actually processed: 400/400" in bench("-S", "-c", "4", "-t", "100")
    assert "number of transactions actually processed: 400/400" in bench("-S", "-M", "prepared", "-c", "4",
                                                                         "-t", "100")
    assert "number of transactions actually processed: 100/100" in bench("-S", "-C", "-c", "2", "-t", "50")


# -- drivers ---------------------------------------------------------------------


def test_psycopg_queries_and_listen_notify(pg_port):
    with psycopg.connect(dsn(pg_port), autocommit=True) as conn:
        assert conn.execute("select %s::int + 1", (41,)).fetchone() == (42,)
        conn.execute("listen wicket_channel")
        with psycopg.connect(dsn(pg_port), autocommit=True) as other:
            other.execute("select pg_notify('wicket_channel', 'hello')")
        note = next(conn.notifies(timeout=30, stop_after=1))
        assert (note.channel, note.payload) == ("wicket_channel", "hello")


def test_the_client_gets_the_real_backend_pid(pg_port):
    """PQbackendPID is the server's process id (NOTIFY's self-filtering,
    pg_terminate_backend of one's own backend and pools rely on it); only
    the cancel secret is the cluster's own."""
    with psycopg.connect(dsn(pg_port), autocommit=True) as conn:
        assert conn.info.backend_pid == conn.execute("select pg_backend_pid()").fetchone()[0]
        conn.execute("listen own")
        conn.execute("notify own, 'me'")
        note = next(conn.notifies(timeout=30, stop_after=1))
        assert note.pid == conn.info.backend_pid


def test_psycopg_cancel(pg_port):
    with psycopg.connect(dsn(pg_port)) as conn:
        t = threading.Timer(0.5, conn.cancel)
        started = time.monotonic()
        t.start()
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(60)")
        assert time.monotonic() - started < 30
        conn.rollback()
        assert conn.execute("select 1").fetchone() == (1,)


def test_fifty_mib_row(pg_port):
    with psycopg.connect(dsn(pg_port)) as conn:
        (value,) = conn.execute("select repeat('x', 50 * 1024 * 1024)").fetchone()
        assert len(value) == 50 * 1024 * 1024


def test_asyncpg_prepared_timeout_and_copy(pg_port):
    # asyncpg is an asyncio library: run it in its own loop (the suite is trio).
    import asyncio

    asyncio.run(_asyncpg_session(pg_port))


async def _asyncpg_session(pg_port: int) -> None:
    import asyncio

    conn = await asyncpg.connect(host="127.0.0.1", port=pg_port, user="app", database="app", ssl=False)
    try:
        stmt = await conn.prepare("select $1::int * 2")
        assert [await stmt.fetchval(i) for i in range(5)] == [0, 2, 4, 6, 8]
        # asyncpg's timeout sends a CancelRequest through the gateway; the
        # connection is usable again only once the server really cancelled.
        started = time.monotonic()
        with pytest.raises(asyncio.TimeoutError):
            await conn.execute("select pg_sleep(60)", timeout=0.5)
        assert await conn.fetchval("select 1") == 1
        assert time.monotonic() - started < 30

        await conn.execute("drop table if exists t_big; create table t_big (line text)")
        size = 100 * 1024 * 1024
        line = b"y" * 1023 + b"\n"
        sent = hashlib.sha256()

        async def source():
            for _ in range(size // len(line) // 256):
                chunk = line * 256
                sent.update(chunk)
                yield chunk

        await conn.copy_to_table("t_big", source=source(), format="text")
        assert await conn.fetchval("select count(*) from t_big") == size // len(line)
        got = hashlib.sha256()
        total = 0

        async def sink(chunk: bytes) -> None:
            nonlocal total
            got.update(chunk)
            total += len(chunk)

        await conn.copy_from_table("t_big", output=sink, format="text")
        assert total == size and got.hexdigest() == sent.hexdigest()
    finally:
        await conn.close()


# -- upstream auth modes and local TLS --------------------------------------------


def test_scram_and_md5_upstream(gw):
    _, port_pw = gw.proxy("db", "pg-pw")
    r = psql(port_pw, "-c", "select current_user", user="pwuser")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "pwuser"
    _, port_md5 = gw.proxy("db", "pg-md5", "--db-user", "md5user")
    r = psql(port_md5, "-c", "select current_user, current_database()", user="whoever", db="app")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "md5user|app"


def test_local_tls_verify_full(gw):
    _, port = gw.proxy("db", "pg", "--local-tls")
    ca = gw.home / "local-ca.crt"
    for host in ("localhost", "127.0.0.1"):
        r = subprocess.run(["psql", "-X", "-tA", f"host={host} port={port} user=app dbname=app sslmode=verify-full "
                            f"sslrootcert={ca}", "-c", "select 1"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    with psycopg.connect(dsn(port, sslmode="verify-full", sslrootcert=str(ca), host="localhost")) as conn:
        assert conn.info.pgconn.ssl_in_use
    assert (gw.home / "local-ca.key").stat().st_mode & 0o777 == 0o600


# -- every error path, as the client's own error ------------------------------------


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

    async def attempt():
        try:
            conn = await asyncpg.connect(host="127.0.0.1", port=port, user=user, database=db, ssl=False,
                                         timeout=60, **connect)
        except asyncpg.PostgresError as exc:
            return exc.sqlstate, str(exc)
        await conn.close()
        return None, ""

    return asyncio.run(attempt())


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
        profile = g.home / "profile.json"
        doc = json.loads(profile.read_text())
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            doc["cluster_addr"] = f"127.0.0.1:{closed.getsockname()[1]}"
            profile.write_text(json.dumps(doc))
            proc, port = g.proxy("postgres", "pg", "--wait-for-cluster", "0.5")  # "db" would ask the cluster first
            sqlstate, message = connect_error(port)
        assert sqlstate == "08006"
        assert re.search(r"waited [\d.]+s for the cluster", message) and "Connection refused" in message
        assert "wicket-cluster start" in message  # what to check
        assert "Wicket cluster is running" in message and "resource is down" not in message
        assert "cluster_wait" in proc.log()
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


# -- settings at connection start --------------------------------------------------


def test_allowed_settings_pass(pg_port):
    r = psql(pg_port, "-c", "show search_path", "-c", "show statement_timeout",
             env={"PGOPTIONS": "-c search_path=public"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["public", "0"]
    r = psql(pg_port, "-c", "show search_path", "-c", "show statement_timeout",
             env={"PGOPTIONS": r'-csearch_path="my\ schema",public --statement-timeout=7s'})
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ['"my schema",public', "7s"]
    sqlstate, _ = connect_error(pg_port, server_settings={"DateStyle": "German", "search_path": "public"})
    assert sqlstate is None  # asyncpg sends settings as start-up parameters of their own


def test_other_settings_are_refused_naming_the_setting(pg_port):
    r = psql(pg_port, "-c", "select 1", env={"PGOPTIONS": "-c log_statement=none"})
    _expect_fatal(r, 'setting "log_statement" in the options start-up parameter is not allowed when connecting '
                     "through Wicket", "remove it from PGOPTIONS")
    for settings in ({"options": "-c search_path=public -c log_statement=none"}, {"log_statement": "none"},
                     {"options": "--local-preload-libraries=x"}):
        sqlstate, message = connect_error(pg_port, server_settings=settings)
        assert sqlstate == "42501" and "not allowed when connecting through Wicket" in message, message
    sqlstate, message = connect_error(pg_port, server_settings={"options": "-c search_path"})
    assert sqlstate == "42601" and "needs a value" in message
    assert psql(pg_port, "-c", "select 1").stdout.strip() == "1"


def test_startup_refusals_reach_a_client_that_negotiated_tls(gw):
    _, port = gw.proxy("db", "pg", "--local-tls")
    r = psql(port, "-c", "select 1", extra={"sslmode": "require"}, env={"PGOPTIONS": "-c log_statement=none"})
    _expect_fatal(r, 'FATAL:  setting "log_statement"')
    r = psql(port, "-c", "select 1", extra={"sslmode": "require", "replication": "database"})
    _expect_fatal(r, "FATAL:  replication connections are not supported through Wicket")


async def test_the_cluster_refuses_other_settings_from_any_gateway(pg_env, gw):
    """A gateway that does not check (an old or a modified one) meets the
    same allowlist in the cluster, and the refusal is audited."""
    from gateway import kinds
    from gateway.local.dialer import Dialer, DialRefused
    from gateway.local.profile import Profile
    from protocols.dial import DialRequest
    from protocols.errors import ErrorCode

    cluster, _ = pg_env
    dialer = Dialer(Profile.load(gw.home), kinds.POSTGRES.alpn)
    marker = f"marker{next(_n)}"
    with pytest.raises(DialRefused) as err:
        await dialer.dial(DialRequest(resource="pg", params={
            "db_user": "app", "pg.application_name": marker, "pg.options": "-c log_statement=none"}))
    assert err.value.error.code is ErrorCode.ACCESS_DENIED
    assert 'setting "log_statement"' in err.value.error.message
    denied = cluster.wait_audit(lambda evs: any(e["params"].get("pg.application_name") == marker for e in evs),
                                user=gw.user, event="dial.denied")
    assert any('"log_statement"' in e["reason"] for e in denied), denied


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


def test_ls_shows_db_users(gw):
    items = json.loads(gw.run("ls", "--format", "json").stdout)
    pg = next(i for i in items if i["name"] == "pg")
    assert pg["kind"] == "postgres"
    assert pg["allowed"]["db_user"] == ["app", "pwuser", "md5user"]
    text = gw.run("ls").stdout
    assert "db_users=app,pwuser,md5user" in text and "db_names=*" in text


def test_forged_cancel_cancels_nothing(pg_port):
    """A CancelRequest with a key this gateway did not hand out is ignored."""
    with psycopg.connect(dsn(pg_port)) as conn:
        pid = conn.info.backend_pid
        t = threading.Timer(0.2, lambda: _send_cancel(pg_port, pid, b"\x00\x01\x02\x03"))
        t.start()
        assert conn.execute("select pg_sleep(1), 'done'").fetchone()[1] == "done"
        t.join()


def _send_cancel(port: int, pid: int, secret: bytes) -> None:
    import socket
    import struct

    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(struct.pack(">IIi", 16, 80877102, pid) + secret)
        s.recv(10)


async def test_cancel_of_another_users_session_is_refused(pg_env, gw, tmp_path):
    """The cluster lets only a session's owner cancel it."""
    from gateway import kinds
    from gateway.local.dialer import Dialer, DialRefused
    from gateway.local.profile import Profile
    from protocols.dial import DialRequest
    from protocols.errors import ErrorCode

    cluster, _ = pg_env
    intruder = _gateway(cluster, tmp_path, "pg")
    try:
        dialer = Dialer(Profile.load(intruder.home), kinds.POSTGRES.alpn)
        with pytest.raises(DialRefused) as err:
            await dialer.dial(DialRequest(resource="pg", params={"cancel": "0123456789abcdef"}))
        assert err.value.error.code is ErrorCode.ACCESS_DENIED
    finally:
        intruder.stop()


def test_odd_startup_parameters_do_not_break_the_gateway(pg_port):
    import socket
    import struct

    params = b"user\x00app\x00database\x00app\x00" + b"x" * 70 + b"\x00v\x00\x00"
    with socket.create_connection(("127.0.0.1", pg_port), timeout=30) as s:
        s.sendall(struct.pack(">II", 8 + len(params), 0x00030000) + params)
        answer = s.recv(65536)
    assert answer[:1] in (b"R", b"E")  # logged in (the odd parameter dropped) or told why
    assert psql(pg_port, "-c", "select 1").stdout.strip() == "1"


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



class SlowServer:
    """Just enough of a PostgreSQL server to log in (trust) and take one
    query, read slowly (64 KiB every 10 ms) so that the relays hold the rest
    of it; and a CancelRequest, noting how much of the query had arrived
    (read, or waiting in the socket) when the cancel came."""

    PID, SECRET = 4242, b"s3cr"

    def __init__(self, query_size: int) -> None:
        self.query_size = query_size
        # A small receive buffer: the cluster's kernel holds the rest of the
        # query, written but not yet taken, when the cancel comes.
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen()
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.received = 0
        self.at_cancel: list[tuple[int, bool]] = []  # (query bytes by then, key right)
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        from protocols.postgres import AuthenticationOk, BackendKeyData, ReadyForQuery

        session, _ = self.listener.accept()
        startup_len = int.from_bytes(session.recv(4, socket.MSG_WAITALL), "big")
        session.recv(startup_len - 4, socket.MSG_WAITALL)
        session.sendall(AuthenticationOk().encode() + BackendKeyData(process_id=self.PID, secret_key=self.SECRET)
                        .encode() + ReadyForQuery(status="I").encode())
        self.listener.settimeout(0.01)
        deadline = time.monotonic() + 60
        while self.received < self.query_size + 5 and time.monotonic() < deadline:
            with self.lock:
                data = session.recv(65536)
                if not data:
                    break
                self.received += len(data)
            try:
                cancel, _ = self.listener.accept()
            except TimeoutError:
                continue
            with self.lock:
                session.setblocking(False)
                try:  # what had arrived when the cancel came: read, and in the socket
                    while data := session.recv(1 << 20):
                        self.received += len(data)
                except BlockingIOError:
                    pass
                session.setblocking(True)
            packet = cancel.recv(16, socket.MSG_WAITALL)
            self.at_cancel.append((self.received, packet[8:] == self.PID.to_bytes(4, "big") + self.SECRET))
            cancel.close()
        session.close()


def test_a_cancel_waits_for_the_query_it_follows(pg_env, gw):
    """A cancel sent right after its query reaches the server only once every
    byte of the query has been written to the server's socket, however slowly
    the server reads: the gateway sends it behind the session's bytes, and the
    cluster waits until they are written. The client gets the server's real
    process id; the secret it quotes is not the server's, yet the server
    gets the real one."""
    from protocols.postgres import CancelRequest, StartupMessage, StartupRelay

    cluster, _ = pg_env
    query = b"select 1 -- " + b"x" * (1536 * 1024)
    server = SlowServer(len(query) + 1)
    cluster.admin("resources", "add", "pg-slow", "--kind", "postgres", "--address", server.address,
                  "--tls", "disable", "--auth", "password", "--password-ref", "app=env:WICKET_TEST_PG_PW")
    _, port = gw.proxy("db", "pg-slow")
    with socket.socket() as client:
        # A big send buffer: sendall returns while much of the query still
        # waits in this kernel for the gateway to read it. It was sent, so
        # the cancel must still come after it.
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        client.connect(("127.0.0.1", port))
        client.sendall(StartupMessage(parameters={"user": "app", "database": "app"}).encode())
        startup = StartupRelay(None)
        client.settimeout(30)
        while not startup.done:
            startup.feed(client.recv(65536))
        key = startup.upstream_key
        assert key.process_id == SlowServer.PID and key.secret_key != SlowServer.SECRET
        client.sendall(b"Q" + (len(query) + 5).to_bytes(4, "big") + query + b"\0")  # written: in the kernel
        with socket.create_connection(("127.0.0.1", port)) as cancel:
            cancel.sendall(CancelRequest(process_id=key.process_id, secret_key=key.secret_key).encode())
            cancel.settimeout(30)
            assert cancel.recv(1) == b""  # the gateway closes once the cluster answered
        server.thread.join(60)
    assert server.at_cancel == [(len(query) + 6, True)]


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


def _direct_tls(port: int, ca, alpn: list[str] | None) -> bytes:
    """A PostgreSQL 17 client's sslnegotiation=direct: TLS from the first
    byte (no SSLRequest), then the StartupMessage and one query; what the
    gateway answered, decrypted."""
    import ssl

    from protocols.postgres import StartupMessage

    ctx = ssl.create_default_context(cafile=str(ca))
    if alpn is not None:
        ctx.set_alpn_protocols(alpn)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(StartupMessage(parameters={"user": "app", "database": "app"}).encode())
        out = bytearray()
        deadline = time.monotonic() + 30
        while b"Z\x00\x00\x00\x05" not in out and b"E\x00" not in out[:2] and time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                return bytes(out)
            out += chunk
        if b"Z\x00\x00\x00\x05" in out:
            s.sendall(b"Q" + (len(b"select 41 + 1\0") + 4).to_bytes(4, "big") + b"select 41 + 1\0")
            while b"C\x00" not in out.split(b"Z\x00\x00\x00\x05", 1)[1] and time.monotonic() < deadline:
                out += s.recv(65536)
        return bytes(out)


def test_direct_tls_with_local_tls(gw):
    """sslnegotiation=direct works with --local-tls and ALPN "postgresql"; a
    direct TLS client without that ALPN gets PostgreSQL 17's refusal; without
    --local-tls the proxy says what to do in its log."""
    proc, port = gw.proxy("db", "pg", "--local-tls")
    ca = gw.home / "local-ca.crt"
    answer = _direct_tls(port, ca, ["postgresql"])
    assert b"42" in answer.split(b"Z\x00\x00\x00\x05", 1)[1]  # the DataRow of select 41 + 1
    refused = _direct_tls(port, ca, None)
    assert refused.startswith(b"E") and b"08P01" in refused and b"postgresql" in refused
    plain_proc, plain_port = gw.proxy("db", "pg")
    with pytest.raises(OSError):
        _direct_tls(plain_port, ca, ["postgresql"])
    wait_for(lambda: "pg_direct_tls_refused" in plain_proc.log() and "--local-tls" in plain_proc.log(),
             what="the refusal in the proxy's log")

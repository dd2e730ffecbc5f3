"""PostgreSQL end to end: a real PostgreSQL 15, the real cluster and gateway
processes, and real clients (psql, pgbench, psycopg 3, asyncpg).

Here the clients: psql and pgbench, drivers, upstream auth modes, local TLS,
settings at connection start. By topic: test_postgres_errors.py,
test_postgres_audit.py, test_postgres_cancel.py; the shared set-up is
pgclients.py."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import threading
import time

import pytest

from tests.integration.harness import keepalive_everywhere, wait_for
from tests.integration.pgclients import _expect_fatal, _n, connect_error, dsn, psql
from tests.integration.pgenv import need_postgres

need_postgres()
psycopg = pytest.importorskip("psycopg")
asyncpg = pytest.importorskip("asyncpg")


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


def test_ls_shows_db_users(gw):
    items = json.loads(gw.run("ls", "--format", "json").stdout)
    pg = next(i for i in items if i["name"] == "pg")
    assert pg["kind"] == "postgres"
    assert pg["allowed"]["db_user"] == ["app", "pwuser", "md5user"]
    text = gw.run("ls").stdout
    assert "db_users=app,pwuser,md5user" in text and "db_names=*" in text


def test_odd_startup_parameters_do_not_break_the_gateway(pg_port):
    import socket
    import struct

    params = b"user\x00app\x00database\x00app\x00" + b"x" * 70 + b"\x00v\x00\x00"
    with socket.create_connection(("127.0.0.1", pg_port), timeout=30) as s:
        s.sendall(struct.pack(">II", 8 + len(params), 0x00030000) + params)
        answer = s.recv(65536)
    assert answer[:1] in (b"R", b"E")  # logged in (the odd parameter dropped) or told why
    assert psql(pg_port, "-c", "select 1").stdout.strip() == "1"


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

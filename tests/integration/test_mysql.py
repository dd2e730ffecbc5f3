"""MySQL/MariaDB end to end: a real MariaDB 10.11, the real cluster and
gateway processes, and real clients (the mysql CLI, mysqldump, sysbench,
PyMySQL, mysqlclient, asyncmy, aiomysql)."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading

import pytest

from tests.integration.harness import Gateway, wait_for

pymysql = pytest.importorskip("pymysql")

from tests.integration.mysqlenv import (  # noqa: E402,F401  (the module's fixtures, shared)
    NATIVE_PW, _gateway, _n, any_port, gw, my_env, my_port, mysql, port, pw_port,
)
from protocols.mysql import Capability, advertised  # noqa: E402


# -- the mysql CLI -----------------------------------------------------------------


def test_mysql_cli_no_password(port):
    r = mysql(port, "-e", "select current_user(), database(), @@ssl_cipher is not null")
    assert r.returncode == 0, r.stderr
    user, db, _tls = r.stdout.strip().split("\t")
    assert user == "app@%" and db == "app"


def test_greeting_is_the_servers(my_port, my_env):
    """Byte for byte what the server greets with (MariaDB's "5.5.5-" prefix included)."""
    _, server = my_env
    direct = pymysql.connect(host="127.0.0.1", port=server.port, user="nativeuser", password=NATIVE_PW)
    conn = pymysql.connect(host="127.0.0.1", port=my_port, user="app", database="app")
    try:
        assert conn.get_server_info() == direct.get_server_info()
        assert conn.server_charset == direct.server_charset
        # Its capabilities, less what the gateway cannot carry (TLS without
        # --local-tls, compression, client-only bits).
        assert conn.server_capabilities == advertised(Capability(direct.server_capabilities), tls=False).value
        assert not conn.server_capabilities & Capability.SSL.value
    finally:
        conn.close()
        direct.close()


def test_password_upstream_native_and_ed25519(pw_port):
    for user in ("nativeuser", "eduser"):
        r = mysql(pw_port, "-e", "select current_user()", user=user)
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == f"{user}@%"


def test_mysql_cli_script_multi_statements_and_errors(port, tmp_path):
    script = tmp_path / "s.sql"
    script.write_text(
        "drop table if exists t_script;\n"
        "create table t_script (id int primary key, name varchar(20));\n"
        "insert into t_script values (1, 'one'), (2, 'two'), (3, 'three');\n"
        "select count(*) from t_script; select name from t_script where id = 2;\n"
    )
    r = mysql(port, input=script.read_text())
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["3", "two"]
    # A server error is the client's own, and the session goes on.
    r = mysql(port, "--force", input="select * from no_such_table;\nselect 42;\n")
    assert "ERROR 1146 (42S02)" in r.stderr
    assert r.stdout.strip() == "42"


def test_multi_results_and_prepared_statements_pymysql(port):
    conn = pymysql.connect(host="127.0.0.1", port=port, user="app", database="app",
                           client_flag=pymysql.constants.CLIENT.MULTI_STATEMENTS)
    try:
        with conn.cursor() as cur:
            cur.execute("select 1; select 2, 3; do 0")
            assert cur.fetchall() == ((1,),)
            assert cur.nextset() and cur.fetchall() == ((2, 3),)
            cur.execute("prepare st from 'select ? + 1'")
            cur.execute("set @a = 41")
            cur.execute("execute st using @a")
            assert cur.fetchall() == ((42,),)
    finally:
        conn.close()


def test_pymysql_tls_preferred_without_local_tls(my_port):
    """PyMySQL >= 1.2 asks for TLS when offered; without --local-tls it is not offered."""
    conn = pymysql.connect(host="127.0.0.1", port=my_port, user="app", database="app", ssl={})
    try:
        with conn.cursor() as cur:
            cur.execute("select 1")
            assert cur.fetchone() == (1,)
    finally:
        conn.close()


@pytest.fixture(scope="module")
def tls_port(gw):
    return gw.proxy("db", "maria", "--local-tls")[1]


def test_local_tls_with_the_cli_and_pymysql(tls_port, gw):
    ca = next(gw.home.rglob("local-ca.crt"), None) or next(p for p in gw.home.rglob("*ca*.crt"))
    r = mysql(tls_port, "--ssl", f"--ssl-ca={ca}", "--ssl-verify-server-cert", "-e",
              "select 'tls ok'")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "tls ok"
    conn = pymysql.connect(host="localhost", port=tls_port, user="app", database="app",
                           ssl_ca=str(ca), ssl_verify_identity=True)
    plain = pymysql.connect(host="127.0.0.1", port=tls_port, user="app", database="app")  # PyMySQL's defaults
    try:
        for c in (conn, plain):
            with c.cursor() as cur:
                cur.execute("select 2")
                assert cur.fetchone() == (2,)
        assert conn._sock.version() and conn._sock.version().startswith("TLS")
    finally:
        conn.close()
        plain.close()


# -- refusals, each the client's own error -----------------------------------------


def test_database_the_role_does_not_allow(my_port, my_env, gw):
    cluster, _ = my_env
    r = mysql(my_port, "-e", "select 1", db="secret")
    assert r.returncode != 0
    assert "ERROR 1045 (28000)" in r.stderr and "db_name=secret" in r.stderr, r.stderr
    cluster.wait_audit(lambda evs: any(e["params"].get("db_name") == "secret" for e in evs),
                       user=gw.user, event="dial.denied")


def test_db_user_the_role_does_not_allow(my_port):
    r = mysql(my_port, "-e", "select 1", user="root")
    assert r.returncode != 0
    assert "ERROR 1045 (28000)" in r.stderr and "ask a cluster administrator" in r.stderr, r.stderr


def test_the_servers_own_refusal(my_port):
    """A db user the role allows but the server does not know: the server's ERR, verbatim."""
    r = mysql(my_port, "-e", "select 1", user="nobody")
    assert r.returncode != 0
    assert "ERROR 1045 (28000)" in r.stderr and "nobody" in r.stderr, r.stderr


def test_unknown_database_is_the_servers_1049(my_port):
    r = mysql(my_port, "-e", "select 1", db="app_missing")
    assert r.returncode != 0
    assert "ERROR 1049 (42000)" in r.stderr, r.stderr


def test_upstream_down(gw):
    _, port = gw.proxy("db", "maria-down")
    r = mysql(port, "-e", "select 1")
    assert r.returncode != 0
    assert "ERROR 1429" in r.stderr and "maria-down" in r.stderr, r.stderr


# -- audit -----------------------------------------------------------------------


def test_commands_are_audited(my_port, my_env, gw):
    cluster, _ = my_env
    marker = f"audit_marker_{next(_n)}"
    r = mysql(my_port, "-e", f"select '{marker}'; select * from no_such_{marker}")
    assert "ERROR 1146" in r.stderr
    queries = cluster.wait_audit(lambda evs: any(marker in e["query"] for e in evs), user=gw.user,
                                 event="mysql.query")
    assert any(e["query"] == f"select '{marker}'" for e in queries)
    errors = cluster.wait_audit(lambda evs: any(marker in e["message"] for e in evs), user=gw.user,
                                event="mysql.error")
    assert any(e["errno"] == 1146 and e["sqlstate"] == "42S02" for e in errors)
    starts = cluster.wait_audit(user=gw.user, event="session.start")
    assert any(e.get("db_user") == "app" and e.get("kind") == "mysql" for e in starts)


# -- sysbench ----------------------------------------------------------------------

SYSBENCH = shutil.which("sysbench")


def sysbench(port: int, test: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["sysbench", test, "--mysql-host=127.0.0.1", f"--mysql-port={port}",
                           "--mysql-user=app", "--mysql-password=", "--mysql-db=sbtest", "--mysql-ssl=off",
                           "--tables=1", "--table-size=1000", *args],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(SYSBENCH is None, reason="sysbench not installed")
def test_sysbench_point_select_and_read_write(port, my_env):
    cluster, _ = my_env
    r = sysbench(port, "oltp_read_write", "cleanup")
    r = sysbench(port, "oltp_read_write", "prepare")
    assert r.returncode == 0, r.stdout + r.stderr
    for test in ("oltp_point_select", "oltp_read_write"):
        r = sysbench(port, test, "--threads=4", "--events=400", "--time=0", "run")
        assert r.returncode == 0, r.stdout + r.stderr
        assert "errors:                              0 " in r.stdout.replace("\n", " ") or " 0 " in r.stdout
    # Prepared statements: their text once, each execution without values.
    prepares = cluster.wait_audit(lambda evs: any("sbtest1" in e["query"] for e in evs), event="mysql.prepare")
    assert prepares
    executes = cluster.wait_audit(lambda evs: len(evs) >= 100, event="mysql.execute")
    assert all(e["param_count"] is not None for e in executes[:50])


# -- drivers -----------------------------------------------------------------------


def test_mysqlclient(my_port):
    MySQLdb = pytest.importorskip("MySQLdb")
    conn = MySQLdb.connect(host="127.0.0.1", port=my_port, user="app", database="app")
    try:
        cur = conn.cursor()
        cur.execute("select %s + 1", (41,))
        assert cur.fetchone() == (42,)
    finally:
        conn.close()


async def test_asyncmy_and_aiomysql(my_port):
    import trio_asyncio  # the drivers are asyncio's

    async def run_both():
        out = []
        asyncmy = pytest.importorskip("asyncmy")
        conn = await asyncmy.connect(host="127.0.0.1", port=my_port, user="app", database="app")
        async with conn.cursor() as cur:
            await cur.execute("select 7")
            out.append(await cur.fetchone())
        conn.close()
        aiomysql = pytest.importorskip("aiomysql")
        conn = await aiomysql.connect(host="127.0.0.1", port=my_port, user="app", db="app")
        async with conn.cursor() as cur:
            await cur.execute("select 8")
            out.append(await cur.fetchone())
        conn.close()
        return out

    async with trio_asyncio.open_loop():
        out = await trio_asyncio.aio_as_trio(run_both)()
    assert out == [(7,), (8,)]


# -- kill from a second session ----------------------------------------------------


def test_kill_query_from_a_second_session(my_port, my_env, gw):
    cluster, _ = my_env
    conn = pymysql.connect(host="127.0.0.1", port=my_port, user="app", database="app")
    other = pymysql.connect(host="127.0.0.1", port=my_port, user="app", database="app")
    errors: list[BaseException] = []
    try:
        with conn.cursor() as cur:
            cur.execute("select connection_id()")
            [thread] = cur.fetchone()

        def sleep() -> None:
            try:
                with conn.cursor() as cur:
                    cur.execute("select sleep(60)")
                    errors.append(AssertionError(f"not interrupted: {cur.fetchall()}"))
            except BaseException as exc:
                errors.append(exc)

        t = threading.Thread(target=sleep)
        t.start()
        with other.cursor() as cur:
            wait_for(lambda: (cur.execute(f"select count(*) from information_schema.processlist where id = {thread} "
                                          f"and info like 'select sleep%'"), cur.fetchone()[0])[1],
                     what="the sleeping query")
            cur.execute(f"kill query {thread}")
        t.join(30)
        # SLEEP() interrupted returns 1 (MariaDB), or the query fails with 1317.
        assert not t.is_alive()
    finally:
        conn.close()
        other.close()
    cluster.wait_audit(lambda evs: any(e["query"] == f"kill query {thread}" for e in evs), user=gw.user,
                       event="mysql.query")


# -- mysqldump and restore, large values --------------------------------------------


def _dump_and_restore(port: int, tmp_path, rows: int, width: int) -> None:
    setup = ("drop table if exists app.t_dump; create table app.t_dump (id int primary key, v longtext);"
             f"insert into app.t_dump select seq, repeat(char(65 + seq % 26), {width}) from seq_1_to_{rows};")
    r = mysql(port, "-e", setup)
    assert r.returncode == 0, r.stderr
    dump = tmp_path / "app.sql"
    with open(dump, "wb") as out:
        r = subprocess.run(["mysqldump", "--no-defaults", "-h", "127.0.0.1", "-P", str(port), "-u", "app",
                            "--single-transaction", "--skip-ssl", "app", "t_dump"], stdout=out,
                           stderr=subprocess.PIPE, timeout=600)
    assert r.returncode == 0, r.stderr
    assert dump.stat().st_size > rows * width
    with open(dump, "rb") as src:
        r = subprocess.run(["mysql", "--no-defaults", "-h", "127.0.0.1", "-P", str(port), "-u", "app",
                            "--skip-ssl", "dumped"], stdin=src, capture_output=True, timeout=600)
    assert r.returncode == 0, r.stderr
    r = mysql(port, "-e", "select count(*), sum(length(v)), md5(group_concat(md5(v) order by id)) from app.t_dump;"
                          "select count(*), sum(length(v)), md5(group_concat(md5(v) order by id)) from dumped.t_dump")
    assert r.returncode == 0, r.stderr
    original, restored = r.stdout.strip().splitlines()
    assert original == restored and original.startswith(f"{rows}\t{rows * width}\t")


def test_mysqldump_and_restore(port, tmp_path):
    _dump_and_restore(port, tmp_path, rows=2000, width=1000)


@pytest.mark.heavy
def test_mysqldump_and_restore_100_mib(my_port, tmp_path):
    _dump_and_restore(my_port, tmp_path, rows=1600, width=64 * 1024)


@pytest.mark.heavy
def test_a_64_mib_blob(port):
    conn = pymysql.connect(host="127.0.0.1", port=port, user="app", database="app")
    blob = bytes(range(256)) * (64 * 1024 * 1024 // 256)
    try:
        with conn.cursor() as cur:
            cur.execute("drop table if exists t_blob")
            cur.execute("create table t_blob (id int primary key, b longblob)")
            cur.execute("insert into t_blob values (1, %s)", (blob,))
            cur.execute("select b from t_blob where id = 1")
            assert cur.fetchone()[0] == blob
    finally:
        conn.close()


def test_load_data_local_where_a_role_allows_it(my_env, tmp_path_factory, tmp_path):
    cluster, _ = my_env
    g = _gateway(cluster, tmp_path_factory.mktemp("gw-infile"), "my-infile")
    try:
        port = g.proxy("db", "maria")[1]
        data = tmp_path / "in.tsv"
        # Enough packets for their ids to wrap past 0 (none may be taken for a command).
        data.write_text("".join(f"{i}\trow {i} " + "x" * 200 + "\n" for i in range(20000)))
        r = mysql(port, "--local-infile=1", "-e",
                  "drop table if exists t_infile_ok; create table t_infile_ok (id int, v text);"
                  f"load data local infile '{data}' into table t_infile_ok; select count(*) from t_infile_ok;"
                  "use app; select 'still here'")
        assert r.returncode == 0, r.stderr
        assert r.stdout.split("\n")[0] == "20000"
        assert "still here" in r.stdout
        [event] = cluster.wait_audit(lambda evs: any(e["file"] == str(data) for e in evs), user=g.user,
                                     event="mysql.local_infile")
        assert event["bytes"] == data.stat().st_size
    finally:
        g.stop()


def test_load_data_local_is_refused_in_the_servers_words(my_port, tmp_path):
    data = tmp_path / "in.tsv"
    data.write_text("1\tone\n2\ttwo\n")
    r = mysql(my_port, "--local-infile=1", "-e",
              "create table if not exists t_infile (id int, v text);"
              f"load data local infile '{data}' into table t_infile")
    assert r.returncode != 0
    assert "ERROR 1148" in r.stderr or "ERROR 4166" in r.stderr or "not allowed" in r.stderr, r.stderr


def test_a_session_that_quits_ends_as_quit(any_port, my_env):
    cluster, _ = my_env
    marker = f"quit_marker_{next(_n)}"
    assert mysql(any_port, "-e", f"select '{marker}'").returncode == 0
    queries = cluster.wait_audit(lambda evs: any(marker in e["query"] for e in evs), event="mysql.query")
    [query] = [e for e in queries if marker in e["query"]]
    ends = cluster.wait_audit(lambda evs: any(e["session_id"] == query["session_id"] for e in evs),
                              event="session.end")
    assert [e["reason"] for e in ends if e["session_id"] == query["session_id"]] == ["quit"]


def test_a_cluster_that_cannot_be_reached_is_the_clients_error(my_env, tmp_path):
    cluster, _ = my_env
    g = _gateway(cluster, tmp_path, "my")
    try:
        with g.cluster_unreachable():
            _, port = g.proxy("mysql", "maria", "--wait-for-cluster", "0.5")  # "db" would ask the cluster first
            r = mysql(port, "-e", "select 1")
        assert r.returncode != 0
        assert "ERROR 1429" in r.stderr and "Wicket cluster is running" in r.stderr, r.stderr
    finally:
        g.stop()


def test_expired_certificate(my_env, tmp_path):
    cluster, _ = my_env
    name = f"myexpiry{next(_n)}"
    cluster.add_user(name, "my")
    g = Gateway(tmp_path, cluster, name)
    try:
        assert g.login("--ttl", "10s").returncode == 0
        _, port = g.proxy("db", "maria")
        assert mysql(port, "-e", "select 1").returncode == 0  # the greeting is cached now
        wait_for(lambda: g.run("status").returncode == 3, timeout=40, what="expiry", interval=0.2)
        r = mysql(port, "-e", "select 1")
        assert "ERROR 1045 (28000)" in r.stderr and "wicket login" in r.stderr, r.stderr
    finally:
        g.stop()


@pytest.mark.parametrize("role", ["my", "my-any"])  # some databases, every database
def test_a_lock_kills_the_running_query(my_env, tmp_path, role):
    cluster, server = my_env
    g = _gateway(cluster, tmp_path, role)
    alias = f"cut_{next(_n)}"

    def running() -> int:
        return int(server.sql(f"select count(*) from information_schema.processlist where info like "
                              f"'select sleep(600) as {alias}%'").strip())

    try:
        _, port = g.proxy("db", "maria")
        client = subprocess.Popen(["mysql", "--no-defaults", "-h", "127.0.0.1", "-P", str(port), "-u", "app",
                                   "-e", f"select sleep(600) as {alias}", "app"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        wait_for(running, what="the query to run")
        cluster.admin("users", "lock", g.user, "--reason", "laptop stolen")
        wait_for(lambda: not running(), timeout=20, what="the query to be killed")
        client.communicate(timeout=30)
        [event] = cluster.wait_audit(event="session.interrupt", user=g.user)
        assert event["reason"] == "user_locked" and event["result"].startswith("KILL QUERY "), event
        assert event["result"].endswith(" sent"), event
        ended = cluster.wait_audit(event="session.end", user=g.user)
        assert ended[-1]["reason"] == "user_locked"
    finally:
        g.stop()
        cluster.admin("users", "unlock", g.user, check=False)


def test_local_tls_client_cert(gw):
    proc, port = gw.proxy("db", "maria", "--local-tls-client-cert")
    home = gw.home
    ca, cert, key = home / "local-ca.crt", next(home.glob("local-client*.crt")), next(home.glob("local-client*.key"))
    r = mysql(port, "--ssl", f"--ssl-ca={ca}", "-e", "select 1")
    assert r.returncode != 0 and "requires a TLS client certificate" in r.stderr and "--ssl-cert=" in r.stderr, r.stderr
    r = mysql(port, f"--ssl-ca={ca}", "--ssl-verify-server-cert", f"--ssl-cert={cert}", f"--ssl-key={key}",
              "-e", "select 'with cert'")
    assert r.returncode == 0 and r.stdout.strip() == "with cert", r.stderr


def test_unix_socket(gw, tmp_path):
    """``--unix-socket PATH``: mysql --socket=PATH, the socket the owner's only."""
    from tests.integration.harness import PY, Proc
    path = tmp_path / "maria.sock"
    log = gw.tmp / f"proxy-{gw.user}-maria-unix.log"
    proc = Proc([PY, "-m", "gateway.cli.wicket", "proxy", "db", "maria", "--unix-socket", str(path)], log, gw.env())
    gw.proxies.append(proc)
    assert proc.read_line(r"listening on unix:(\S+)").group(1) == str(path)
    assert path.stat().st_mode & 0o777 == 0o600
    r = subprocess.run(["mysql", "--no-defaults", f"--socket={path}", "-u", "app", "-N", "-B", "-e",
                        "select current_user()", "app"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "app@%", r.stderr


# -- wicket exec, env and config mysql ------------------------------------------------


def test_exec_gives_the_mysql_clients_environment(gw):
    r = gw.run("exec", "--db", "maria", "--", "sh", "-c",
               'mysql --no-defaults -h "$MYSQL_HOST" -P "$MYSQL_TCP_PORT" -u app -N -B --connect-timeout=30 '
               '-e "select database()" app && echo "url=$MYSQL_URL"')
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == "app" and lines[1].startswith("url=mysql://127.0.0.1:"), r.stdout


def test_config_mysql_writes_a_group_the_cli_reads(gw, tmp_path):
    cnf = tmp_path / "my.cnf"
    cnf.write_text("[client]\nuser=mine\n")
    r = gw.run("config", "mysql", "maria", "--file", str(cnf))
    assert r.returncode == 0, r.stderr
    text = cnf.read_text()
    assert text.startswith("[client]\nuser=mine\n\n[client_maria]\n"), text  # the user's own group kept
    port = int(re.search(r"^port=(\d+)$", text, re.M).group(1))
    proc, _ = gw.proxy("db", "maria", "--port", str(port))
    try:
        r = subprocess.run(["mysql", f"--defaults-file={cnf}", "--defaults-group-suffix=_maria", "-u", "app",
                            "-N", "-B", "--connect-timeout=30", "-e", "select 1", "app"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and r.stdout.strip() == "1", r.stderr
    finally:
        proc.stop()

"""MySQL/MariaDB end to end: a real MariaDB 10.11, the real cluster and
gateway processes, and real clients (the mysql CLI, mysqldump, sysbench,
PyMySQL, mysqlclient, asyncmy, aiomysql)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading

import pytest

from tests.integration.harness import Cluster, Echo, Gateway, wait_for

pymysql = pytest.importorskip("pymysql")

from gateway.local.mariadbserver import MariaDbServer, find_mariadbd  # noqa: E402
from protocols.mysql import Capability, advertised  # noqa: E402

try:
    find_mariadbd()
except Exception as exc:  # pragma: no cover - a machine without MariaDB
    pytest.skip(f"MariaDB server not installed: {exc}", allow_module_level=True)

NATIVE_PW = "native secret for nativeuser"
ED_PW = "ed25519 secret for eduser"

ROLES = """
[roles.my]
[[roles.my.allow]]
resources = ["maria*"]
db_users = ["app", "nativeuser", "eduser", "nobody"]
db_names = ["app", "app_*", "sbtest", "dumped"]
[[roles.my.deny]]
resources = ["maria*"]
db_names = ["mysql"]
"""


@pytest.fixture(scope="module")
def my_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("my")
    echo = Echo(tmp)
    ed_file = tmp / "ed.pass"
    ed_file.write_text(ED_PW + "\n")
    cluster = Cluster(tmp, echo, extra_config=ROLES, env={"WICKET_TEST_MY_PW": NATIVE_PW})
    server = MariaDbServer(tmp / "mariadb", client_ca_pem=(cluster.state / "db_client_ca.crt").read_bytes())
    server.start()
    server.sql("CREATE DATABASE app; CREATE DATABASE app_other; CREATE DATABASE sbtest; CREATE DATABASE dumped; "
               "CREATE DATABASE secret;"
               "CREATE USER app@'%' REQUIRE SUBJECT '/CN=app';"
               f"CREATE USER nativeuser@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('{NATIVE_PW}');"
               f"CREATE USER eduser@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{ED_PW}');"
               "GRANT ALL ON *.* TO app@'%' REQUIRE SUBJECT '/CN=app';"
               "GRANT ALL ON app.* TO nativeuser@'%'; GRANT ALL ON app.* TO eduser@'%';")
    ca = str(server.server_ca_path)
    cluster.admin("resources", "add", "maria", "--kind", "mysql", "--address", server.address,
                  "--ca-file", ca, "--server-name", "localhost", "--label", "env=dev")
    cluster.admin("resources", "add", "maria-pw", "--kind", "mysql", "--address", server.address,
                  "--ca-file", ca, "--server-name", "localhost", "--auth", "password",
                  "--password-ref", "nativeuser=env:WICKET_TEST_MY_PW", "--password-ref", f"eduser=file:{ed_file}")
    cluster.admin("resources", "add", "maria-down", "--kind", "mysql", "--address", "127.0.0.1:9",
                  "--tls", "require")
    yield cluster, server
    server.stop()
    cluster.stop()
    echo.proc.stop()


_n = iter(range(1, 10_000))


def _gateway(cluster, tmp, roles: str) -> Gateway:
    name = f"myuser{next(_n)}"
    cluster.add_user(name, roles)
    g = Gateway(tmp, cluster, name)
    r = g.login()
    assert r.returncode == 0, r.stderr
    return g


@pytest.fixture(scope="module")
def gw(my_env, tmp_path_factory):
    cluster, _ = my_env
    g = _gateway(cluster, tmp_path_factory.mktemp("gw"), "my")
    yield g
    g.stop()


@pytest.fixture(scope="module")
def my_port(gw):
    return gw.proxy("db", "maria")[1]


@pytest.fixture(scope="module")
def pw_port(gw):
    return gw.proxy("db", "maria-pw")[1]


def mysql(port: int, *args: str, user: str = "app", db: str | None = "app", input: str | None = None,
          timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = ["mysql", "--no-defaults", "-h", "127.0.0.1", "-P", str(port), "-u", user, "-N", "-B",
           "--connect-timeout=30", *args]
    if db:
        cmd.append(db)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)


# -- the mysql CLI -----------------------------------------------------------------


def test_mysql_cli_no_password(my_port):
    r = mysql(my_port, "-e", "select current_user(), database(), @@ssl_cipher is not null")
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

"""The MySQL integration tests' shared set-up (test_mysql.py,
test_mysql_commands.py), built on dbenv.py: a real MariaDB 10.11 whose
accounts trust the cluster's database client CA, the cluster with the
roles below, resources for it, a logged-in gateway, and the mysql CLI.
Each test module that imports the fixtures gets its own (module scope)."""

from __future__ import annotations

import subprocess

import pytest

from tests.integration.dbenv import add_down_resource, add_resource, database_env, new_gateway
from tests.integration.harness import Gateway

from gateway.local.mariadbserver import MariaDbServer, find_mariadbd  # noqa: E402

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

[roles.my-infile]
[[roles.my-infile.allow]]
resources = ["maria"]
db_users = ["app"]
db_names = ["app"]
local_infile = ["on"]

[roles.my-any]
[[roles.my-any.allow]]
resources = ["maria"]
db_users = ["app"]
db_names = ["*"]
"""


@pytest.fixture(scope="module")
def my_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("my")
    ed_file = tmp / "ed.pass"
    ed_file.write_text(ED_PW + "\n")

    def make_server(client_ca_pem: bytes) -> MariaDbServer:
        return MariaDbServer(tmp / "mariadb", client_ca_pem=client_ca_pem)

    with database_env(tmp, make_server, roles=ROLES, env={"WICKET_TEST_MY_PW": NATIVE_PW}) as (cluster, server):
        server.sql("CREATE DATABASE app; CREATE DATABASE app_other; CREATE DATABASE sbtest; CREATE DATABASE dumped; "
                   "CREATE DATABASE secret;"
                   "CREATE USER app@'%' REQUIRE SUBJECT '/CN=app';"
                   f"CREATE USER nativeuser@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('{NATIVE_PW}');"
                   f"CREATE USER eduser@'%' IDENTIFIED VIA ed25519 USING PASSWORD('{ED_PW}');"
                   "GRANT ALL ON *.* TO app@'%' REQUIRE SUBJECT '/CN=app';"
                   "GRANT ALL ON app.* TO nativeuser@'%'; GRANT ALL ON app.* TO eduser@'%';")
        add_resource(cluster, server, "maria", "mysql", "--label", "env=dev")
        add_resource(cluster, server, "maria-pw", "mysql", "--auth", "password",
                     "--password-ref", "nativeuser=env:WICKET_TEST_MY_PW", "--password-ref", f"eduser=file:{ed_file}")
        add_down_resource(cluster, "maria-down", "mysql")
        yield cluster, server


_n = iter(range(1, 10_000))  # unique names for the tests' own objects


def _gateway(cluster, tmp, roles: str) -> Gateway:
    return new_gateway(cluster, tmp, roles, "myuser")


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
def any_port(my_env, tmp_path_factory):
    """A user whose role allows the db user every database."""
    cluster, _ = my_env
    g = _gateway(cluster, tmp_path_factory.mktemp("gw-any"), "my-any")
    yield g.proxy("db", "maria")[1]
    g.stop()


@pytest.fixture
def port(my_port):
    """Where the client tests connect. Every session runs one way (relayed
    by the engine, the cluster answering what the roles do not allow), so
    the stricter role (some databases) stands for both."""
    return my_port


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



"""The shared set-up of the test_mongodb*.py topic files: a MongoDB wire
server (mongoeco, tests/servers/mongo.py) with resources for each upstream
mode, the real cluster, a logged-in gateway and its proxy (module
fixtures: each file that imports them gets its own), and the pymongo
client helper. A file imports what it uses."""

from __future__ import annotations

import pytest

from gateway.local.mongoserver import make_server_tls
from tests.integration.harness import Cluster, Echo, Gateway
from tests.servers import mongo

pymongo = pytest.importorskip("pymongo")

try:
    mongo.mongoeco_python()
except mongo.Unavailable as exc:  # pragma: no cover - a machine without Python 3.13
    pytest.skip(str(exc), allow_module_level=True)

DB_PW = "mongo secret for app"

ROLES = """
[roles.mongo]
[[roles.mongo.allow]]
resources = ["mongo*"]
db_users = ["app"]
db_names = ["app", "shop*", "admin"]
[[roles.mongo.deny]]
resources = ["mongo*"]
db_names = ["shop_secret"]
"""


@pytest.fixture(scope="module")
def mongo_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mongo")
    echo = Echo(tmp)
    cluster = Cluster(tmp, echo, extra_config=ROLES, env={"WICKET_TEST_MONGO_PW": DB_PW,
                                                          "WICKET_TEST_WRONG_PW": "not the password"})
    make_server_tls(tmp, "wicket test mongodb server CA")
    server = mongo.MongoServer(tmp / "mongoeco.log", user="app", password=DB_PW,
                               tls_cert=tmp / "server.crt", tls_key=tmp / "server.key")
    password = ("--auth", "password", "--password-ref", "app=env:WICKET_TEST_MONGO_PW")
    cluster.admin("resources", "add", "mongo", "--kind", "mongodb", "--address", server.address,
                  "--tls", "disable", *password, "--label", "env=dev")
    cluster.admin("resources", "add", "mongo-tls", "--kind", "mongodb", "--address",
                  f"127.0.0.1:{server.tls_port}", "--tls", "verify-full", "--ca-file", str(tmp / "server-ca.crt"),
                  "--server-name", "localhost", *password)
    cluster.admin("resources", "add", "mongo-down", "--kind", "mongodb", "--address", "127.0.0.1:9",
                  "--tls", "disable", *password)
    # A server that trusts the cluster's database client CA: X.509 logins.
    x509 = mongo.MongoServer(tmp / "mongoeco-x509.log", user="app", password=DB_PW, tls_cert=tmp / "server.crt",
                             tls_key=tmp / "server.key", tls_ca=cluster.state / "db_client_ca.crt")
    cluster.admin("resources", "add", "mongo-x509", "--kind", "mongodb", "--address",
                  f"127.0.0.1:{x509.tls_port}", "--tls", "verify-full", "--ca-file", str(tmp / "server-ca.crt"),
                  "--server-name", "localhost", "--auth", "cert")
    # The cluster's password for app is not the server's: its login fails.
    cluster.admin("resources", "add", "mongo-wrong-pw", "--kind", "mongodb", "--address", server.address,
                  "--tls", "disable", "--auth", "password", "--password-ref", "app=env:WICKET_TEST_WRONG_PW")
    yield cluster, server
    x509.stop()
    server.stop()
    cluster.stop()
    echo.proc.stop()


_n = iter(range(1, 10_000))


def user_name() -> str:
    """A fresh user's name."""
    return f"mongouser{next(_n)}"


def new_gateway(cluster, tmp, roles: str) -> Gateway:
    """A gateway for a fresh user with ``roles``, logged in."""
    return Gateway.logged_in(cluster, tmp, user_name(), roles)


@pytest.fixture(scope="module")
def gw(mongo_env, tmp_path_factory):
    cluster, _ = mongo_env
    g = new_gateway(cluster, tmp_path_factory.mktemp("gw"), "mongo")
    yield g
    g.stop()


@pytest.fixture(scope="module")
def port(gw):
    _, port = gw.proxy("mongodb", "mongo", "--db-user", "app")
    return port


def client(port: int, db: str = "", **options):
    options.setdefault("serverSelectionTimeoutMS", 20_000)
    return pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/{db}?directConnection=true", **options)


def sessions_started(cluster, user: str) -> list[dict]:
    """The ``session.start`` audit events of ``user``, oldest first."""
    return [e for e in cluster.audit(user=user) if e["event"] == "session.start"]


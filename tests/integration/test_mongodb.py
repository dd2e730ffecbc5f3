"""MongoDB end to end: a MongoDB wire server (mongoeco, tests/servers/mongo.py),
the real cluster and gateway processes, and real clients (pymongo sync and
async, the Node.js driver, mongosh)."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from gateway.identity import pki
from tests.integration.harness import Cluster, Echo, Gateway
from tests.servers import mongo

pymongo = pytest.importorskip("pymongo")
from pymongo import errors as mongo_errors  # noqa: E402

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

[roles.mongo-app-only]
[[roles.mongo-app-only.allow]]
resources = ["mongo*"]
db_users = ["app"]
db_names = ["app"]
"""


@pytest.fixture(scope="module")
def mongo_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mongo")
    echo = Echo(tmp)
    cluster = Cluster(tmp, echo, extra_config=ROLES, env={"WICKET_TEST_MONGO_PW": DB_PW})
    now = pki.utcnow()
    ca = pki.CertificateAuthority.create("wicket test mongodb server CA", now=now)
    key = pki.generate_key()
    (tmp / "server.crt").write_bytes(pki.cert_to_pem(ca.issue_host_cert(key.public_key(), ["localhost"], now=now)))
    (tmp / "server.key").write_bytes(pki.key_to_pem(key))
    (tmp / "server-ca.crt").write_bytes(ca.pem)
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
    yield cluster, server
    server.stop()
    cluster.stop()
    echo.proc.stop()


_n = iter(range(1, 10_000))


def _gateway(cluster, tmp, roles: str) -> Gateway:
    name = f"mongouser{next(_n)}"
    cluster.add_user(name, roles)
    g = Gateway(tmp, cluster, name)
    r = g.login()
    assert r.returncode == 0, r.stderr
    return g


@pytest.fixture(scope="module")
def gw(mongo_env, tmp_path_factory):
    cluster, _ = mongo_env
    g = _gateway(cluster, tmp_path_factory.mktemp("gw"), "mongo")
    yield g
    g.stop()


@pytest.fixture(scope="module")
def port(gw):
    _, port = gw.proxy("mongodb", "mongo", "--db-user", "app")
    return port


def client(port: int, db: str = "", **options):
    options.setdefault("serverSelectionTimeoutMS", 20_000)
    return pymongo.MongoClient(f"mongodb://127.0.0.1:{port}/{db}?directConnection=true", **options)


def test_crud_through_the_gateway(port):
    with client(port) as c:
        t = c.app.crud
        t.drop()
        t.insert_one({"_id": 1, "name": "ada", "age": 36})
        assert t.find_one({"_id": 1})["name"] == "ada"
        t.update_one({"_id": 1}, {"$set": {"age": 37}})
        assert t.find_one({"age": {"$gt": 36}})["_id"] == 1
        assert t.delete_one({"_id": 1}).deleted_count == 1
        assert t.count_documents({}) == 0

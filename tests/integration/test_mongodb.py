"""MongoDB end to end: a MongoDB wire server (mongoeco, tests/servers/mongo.py),
the real cluster and gateway processes, and real clients (pymongo sync and
async, the Node.js driver, mongosh): CRUD, cursors, sizes, refusals, TLS,
audit, cuts. What the gateway answers before a session (hellos, the local
login, probes) is test_mongodb_handshake.py's; the set-up is mongoenv.py's."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys

import pytest

from tests.integration.harness import Cluster, Echo, Gateway, wait_for
from tests.integration.mongoenv import (  # noqa: F401 (gw, mongo_env, port: fixtures)
    DB_PW, ROLES, client, gw, mongo_env, new_gateway, port, pymongo, user_name,
)
from tests.servers import mongo

from pymongo import errors as mongo_errors  # noqa: E402


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


def test_aggregation_and_a_cursor_over_many_batches(port):
    with client(port) as c:
        t = c.app.many
        t.drop()
        # ObjectId ids: mongoeco checks a numeric _id against every document.
        t.insert_many([{"n": i, "group": i % 3} for i in range(2000)])
        seen = [d["n"] for d in t.find({}, batch_size=7).sort("n", 1)]
        assert seen == list(range(2000))  # ~285 getMores
        groups = {d["_id"]: d["n"] for d in t.aggregate([{"$group": {"_id": "$group", "n": {"$sum": 1}}}])}
        assert groups == {0: 667, 1: 667, 2: 666}


def test_a_cursor_closed_early_then_the_session_goes_on(port):
    with client(port, maxPoolSize=1) as c:
        t = c.app.early
        t.drop()
        t.insert_many([{"_id": i} for i in range(100)])
        cursor = t.find({}, batch_size=5)
        assert next(cursor)["_id"] == 0
        assert cursor.cursor_id  # open on the server: the close sends killCursors
        cursor.close()
        assert t.count_documents({}) == 100


def test_a_15_mib_document_both_ways(port):
    big = "x" * (15 * 1024 * 1024)
    with client(port) as c:
        t = c.app.big
        t.drop()
        t.insert_one({"_id": "big", "blob": big})
        assert t.find_one({"_id": "big"})["blob"] == big


def test_bulk_writes_and_a_session(port):
    from pymongo import DeleteOne, InsertOne, UpdateOne

    with client(port) as c:
        t = c.app.bulk
        t.drop()
        result = t.bulk_write([InsertOne({"_id": i, "v": 0}) for i in range(500)]
                              + [UpdateOne({"_id": 1}, {"$set": {"v": 1}}), DeleteOne({"_id": 2})])
        assert (result.inserted_count, result.modified_count, result.deleted_count) == (500, 1, 1)
        with c.start_session() as s:
            t.insert_one({"_id": "s", "v": 1}, session=s)
            assert t.find_one({"_id": "s"}, session=s)["v"] == 1


def test_the_async_api(port):
    from pymongo import AsyncMongoClient

    async def main():
        c = AsyncMongoClient(f"mongodb://127.0.0.1:{port}/?directConnection=true", serverSelectionTimeoutMS=20_000)
        try:
            t = c.app.asyncapi
            await t.drop()
            await t.insert_many([{"_id": i} for i in range(50)])
            return [d["_id"] async for d in t.find({}, batch_size=10).sort("_id", 1)]
        finally:
            await c.close()

    assert asyncio.run(main()) == list(range(50))


def test_a_database_the_roles_do_not_allow_is_refused_and_the_session_goes_on(port):
    with client(port, maxPoolSize=1) as c:
        with pytest.raises(mongo_errors.OperationFailure) as caught:
            c.shop_secret.items.find_one()
        assert caught.value.code == 13
        assert "shop_secret" in str(caught.value) and "db_names" in str(caught.value)
        c.shop.items.insert_one({"_id": 1})  # the same connection, allowed
        # $out to a database the roles refuse, from one they allow.
        with pytest.raises(mongo_errors.OperationFailure) as caught:
            list(c.shop.items.aggregate([{"$match": {}}, {"$out": {"db": "shop_secret", "coll": "x"}}]))
        assert caught.value.code == 13
        assert c.app.command("ping")["ok"] == 1.0


def test_an_unreachable_server_is_host_unreachable(gw):
    _, p = gw.proxy("mongodb", "mongo-down", "--db-user", "app")
    with client(p, retryReads=False) as c:
        with pytest.raises(mongo_errors.OperationFailure) as caught:
            c.app.t.find_one()
    assert caught.value.code == 6
    assert "not reachable" in str(caught.value)


def test_the_tls_leg_to_the_server(gw):
    _, p = gw.proxy("db", "mongo-tls", "--db-user", "app")
    with client(p) as c:
        c.app.tls.drop()
        c.app.tls.insert_one({"_id": 1})
        assert c.app.tls.find_one()["_id"] == 1


def test_the_cluster_logs_in_with_an_x509_certificate(gw, mongo_env):
    cluster, _ = mongo_env
    _, p = gw.proxy("mongodb", "mongo-x509", "--db-user", "app")
    with client(p) as c:
        c.app.x509.replace_one({"_id": 1}, {"v": 1}, upsert=True)
        assert c.app.x509.find_one({"_id": 1})["v"] == 1
    started = cluster.wait_audit(lambda evs: any(e.get("resource") == "mongo-x509" for e in evs),
                                 user=gw.user, event="session.start")
    assert {e.get("auth") for e in started if e.get("resource") == "mongo-x509"} == {"MONGODB-X509"}


def test_the_servers_refusal_of_the_clusters_login_reaches_the_driver(gw, mongo_env):
    cluster, _ = mongo_env
    _, p = gw.proxy("mongodb", "mongo-wrong-pw", "--db-user", "app")
    with client(p) as c:
        assert c.admin.command("hello")["ok"] == 1.0  # the server's own values
        with pytest.raises(mongo_errors.OperationFailure) as caught:
            c.app.t.find_one()
    assert caught.value.code == 18
    assert "refused the cluster's login as db user 'app'" in str(caught.value)
    started = cluster.wait_audit(lambda evs: any(e.get("resource") == "mongo-wrong-pw" for e in evs),
                                 user=gw.user, event="session.start")
    assert any("login_error" in e for e in started if e.get("resource") == "mongo-wrong-pw")


def test_every_command_is_audited_with_shapes_never_values(port, mongo_env, gw):
    cluster, _ = mongo_env
    with client(port) as c:
        c.app.audited.find_one({"email": "ada@example.com", "age": {"$gte": 30}})
        with pytest.raises(mongo_errors.OperationFailure):
            c.shop_secret.x.find_one()
    events = cluster.wait_audit(
        lambda evs: any(e["event"] == "mongodb.command" and e.get("collection") == "audited" for e in evs)
        and any(e["event"] == "mongodb.denied" for e in evs), user=gw.user)
    found = next(e for e in events if e["event"] == "mongodb.command" and e.get("collection") == "audited")
    assert found["database"] == "app" and found["command"] == "find"
    assert found["filters"] == [{"email": "string", "age": {"$gte": "int32"}}]
    assert "ada@example.com" not in json.dumps(events)
    denied = next(e for e in events if e["event"] == "mongodb.denied")
    assert denied["denied_database"] == "shop_secret"
    assert any(e["event"] == "session.start" and e.get("db_user") == "app" for e in events)


def test_mongosh(port):
    shell = mongo.mongosh()
    r = subprocess.run([str(shell), "--quiet", "--norc", f"mongodb://127.0.0.1:{port}/app?directConnection=true",
                        "--eval", "db.sh.drop(); db.sh.insertMany([...Array(120).keys()].map(i => ({_id: i}))); "
                                  "print(db.sh.find().batchSize(10).toArray().length)"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.strip().splitlines()[-1] == "120"
    r = subprocess.run([str(shell), "--quiet", "--norc", f"mongodb://127.0.0.1:{port}/shop_secret?directConnection=true",
                        "--eval", "db.x.findOne()"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "not authorized on shop_secret" in r.stderr + r.stdout


NODE_SCRIPT = """
const { MongoClient } = require('mongodb');
(async () => {
  const c = new MongoClient(process.env.MONGO_URI, { serverSelectionTimeoutMS: 20000 });
  try {
    const t = c.db('app').collection('node');
    await t.drop().catch(() => {});
    await t.insertMany([...Array(300).keys()].map(i => ({ _id: i })));
    const n = (await t.find().batchSize(25).toArray()).length;
    let code = null;
    try { await c.db('shop_secret').collection('x').findOne(); } catch (e) { code = e.code; }
    console.log(JSON.stringify({ n, code }));
  } finally { await c.close(); }
})().catch(e => { console.error(String(e)); process.exit(1); });
"""


def test_the_nodejs_driver(port):
    folder = mongo.node_clients()
    env = {**os.environ, "MONGO_URI": f"mongodb://127.0.0.1:{port}/?directConnection=true"}
    r = subprocess.run(["node", "-e", NODE_SCRIPT], capture_output=True, text=True, timeout=120, cwd=folder, env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"n": 300, "code": 13}


def test_a_lock_cuts_a_live_session_and_the_next_dial_says_why(mongo_env, tmp_path):
    cluster, _ = mongo_env
    g = new_gateway(cluster, tmp_path, "mongo")
    try:
        _, p = g.proxy("mongodb", "mongo", "--db-user", "app")
        with client(p, maxPoolSize=1) as c:
            assert c.app.command("ping")["ok"] == 1.0
            cluster.admin("users", "lock", g.user, "--reason", "incident 44")
            ended = cluster.wait_audit(user=g.user, event="session.end")
            assert ended[-1]["reason"] == "user_locked" and ended[-1]["kind"] == "mongodb"
            with pytest.raises(mongo_errors.OperationFailure) as caught:  # the retry's new dial
                c.app.items.find_one()
            assert caught.value.code == 18 and "locked" in str(caught.value)
    finally:
        cluster.admin("users", "unlock", g.user)
        g.stop()


def test_a_cut_stops_the_sessions_cursors_on_the_server(mongo_env, tmp_path):
    """A lock interrupts the session upstream (RouteKind.interrupt): the
    cluster logs in as the same db user and sends killSessions with the
    client's lsids, then killCursors for the cursors it was reading.
    mongoeco has no killSessions (its refusal is in the audit's result);
    the cursor is gone from the server all the same."""
    cluster, server = mongo_env
    g = new_gateway(cluster, tmp_path, "mongo")
    try:
        _, p = g.proxy("mongodb", "mongo", "--db-user", "app")
        with client(p, maxPoolSize=1) as c:
            t = c.app.cut_cursor
            t.drop()
            t.insert_many([{"n": i} for i in range(10)])
            cursor = t.find({}, batch_size=2)
            assert [next(cursor)["n"] for _ in range(3)] == [0, 1, 2]  # one getMore
            cursor_id = cursor.cursor_id
            assert cursor_id
            cluster.admin("users", "lock", g.user, "--reason", "incident 45")
            # Each of the driver's connections is a session (its monitors' too).
            # Wait for the one that stopped something: a monitor's session,
            # with nothing to stop, may be audited first.
            idle = "nothing to stop (no logical session or cursor seen)"
            events = cluster.wait_audit(lambda evs: any(e["result"] != idle for e in evs),
                                        event="session.interrupt", user=g.user)
            assert {e["reason"] for e in events} == {"user_locked"}, events
            [event] = [e for e in events if e["result"] != idle]
            assert event["result"].startswith("killSessions (1 sessions) "), event
            assert event["result"].endswith("killCursors: 1 killed, 0 already closed"), event
            # On the server, as the same db user: the cursor is no more.
            with pymongo.MongoClient(f"mongodb://{server.address}/?directConnection=true", username="app",
                                     password=DB_PW, authMechanism="SCRAM-SHA-256",
                                     serverSelectionTimeoutMS=20_000) as direct:
                reply = direct.app.command({"killCursors": "cut_cursor", "cursors": [cursor_id]})
            assert reply["cursorsKilled"] == [] and cursor_id in reply["cursorsNotFound"], reply
    finally:
        cluster.admin("users", "unlock", g.user, check=False)
        g.stop()


def _try_uri(proc) -> str:
    found = re.search(r'Try: mongosh "([^"]+)"', proc.log())
    assert found, proc.log()
    return found.group(1)


def test_local_tls_with_the_printed_uri_and_a_plain_client_told_why(gw):
    proc, p = gw.proxy("mongodb", "mongo", "--db-user", "app", "--local-tls")
    uri = _try_uri(proc)
    ca = gw.home / "local-ca.crt"
    assert uri.endswith(f"&tls=true&tlsCAFile={ca}") and f"127.0.0.1:{p}/" in uri, uri
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=20_000) as c:  # the local login, over TLS
        c.app.tls_local.replace_one({"_id": 1}, {"v": "over tls"}, upsert=True)
        assert c.app.tls_local.find_one({"_id": 1})["v"] == "over tls"
    with pymongo.MongoClient(f"mongodb://127.0.0.1:{p}/?directConnection=true&tls=true&tlsCAFile={ca}",
                             serverSelectionTimeoutMS=20_000) as c:  # no credentials
        assert c.app.command("ping")["ok"] == 1.0
    # A plaintext driver's hello is answered, in plain, with what to add.
    with client(p, serverSelectionTimeoutMS=3000) as c:
        with pytest.raises(mongo_errors.PyMongoError) as caught:
            c.app.command("ping")
    assert "requires TLS" in str(caught.value) and f"tlsCAFile={ca}" in str(caught.value), caught.value
    wait_for(lambda: re.search(r"local_tls_refused .*a plaintext client", proc.log()), what="the log line")


def test_local_tls_client_cert(gw):
    proc, p = gw.proxy("mongodb", "mongo", "--db-user", "app", "--local-tls-client-cert")
    uri = _try_uri(proc)
    pem = gw.home / "local-client.pem"
    assert uri.endswith(f"&tlsCertificateKeyFile={pem}"), uri
    assert pem.stat().st_mode & 0o077 == 0
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=20_000) as c:
        assert c.app.command("ping")["ok"] == 1.0
    # TLS without the certificate: told in MongoDB's words what to add.
    ca = gw.home / "local-ca.crt"
    with client(p, tls=True, tlsCAFile=str(ca), serverSelectionTimeoutMS=20_000, retryReads=False) as c:
        with pytest.raises(mongo_errors.OperationFailure) as caught:
            c.app.t.find_one()
    assert caught.value.code == 13 and "tlsCertificateKeyFile=" in str(caught.value), caught.value


def test_compression_the_server_lacks_is_negotiated_away(port):
    with client(port, compressors="zlib") as c:
        assert c.admin.command("hello").get("compression") is None  # mongoeco offers none
        c.app.zipped.replace_one({"_id": 1}, {"v": "x" * 10_000}, upsert=True)
        assert len(c.app.zipped.find_one({"_id": 1})["v"]) == 10_000


@pytest.fixture(scope="module")
def zlib_server(mongo_env, gw, tmp_path_factory):
    """A server that does OP_COMPRESSED with zlib, as mongod does by
    default, behind resource mongo-zlib: (the proxy's port, the server's log)."""
    cluster, _ = mongo_env
    log = tmp_path_factory.mktemp("zlib") / "mongoeco-zlib.log"
    server = mongo.MongoServer(log, user="app", password=DB_PW, compressors="zlib")
    try:
        cluster.admin("resources", "add", "mongo-zlib", "--kind", "mongodb", "--address", server.address,
                      "--tls", "disable", "--auth", "password", "--password-ref", "app=env:WICKET_TEST_MONGO_PW")
        _, p = gw.proxy("mongodb", "mongo-zlib", "--db-user", "app")
        yield p, log
    finally:
        server.stop()


def test_op_compressed_goes_end_to_end_and_is_opened_for_the_audit(zlib_server, mongo_env, gw):
    """The server agrees to zlib in its hello, so the gateway's hellos offer
    it to a driver that asks: commands and replies then travel compressed
    from the driver to the server and back (the relay passes them as they
    are), and the cluster's gate opens each to check and audit it."""
    cluster, _ = mongo_env
    p, log = zlib_server
    with client(p, compressors="zlib") as c:
        # What the gate offers a hello that asks: what both ends have.
        assert c.admin.command({"hello": 1, "compression": ["snappy", "zlib"]})["compression"] == ["zlib"]
        t = c.app.zlibbed
        t.drop()
        t.insert_many([{"_id": i, "v": "x" * 10_000} for i in range(50)])
        assert len(t.find_one({"_id": 7, "v": {"$exists": True}})["v"]) == 10_000
        assert [d["_id"] for d in t.find({}, batch_size=7).sort("_id", 1)] == list(range(50))  # getMores
        with pytest.raises(mongo_errors.OperationFailure) as caught:  # a compressed error reply
            c.app.command({"noSuchCommand": 1})
        assert caught.value.code != 13
        with pytest.raises(mongo_errors.OperationFailure) as caught:  # refused by the gate, not the server
            c.shop_secret.x.find_one()
        assert caught.value.code == 13
    with client(p) as c:  # a driver that offers no compressor: plain, to the same server
        assert c.app.zlibbed.count_documents({}) == 50
    wait_for(lambda: "compressed_request" in log.read_text(), what="the server's compressed requests")
    events = cluster.wait_audit(
        lambda evs: any(e.get("collection") == "zlibbed" and e.get("command") == "find" for e in evs)
        and any(e["event"] == "mongodb.error" and e.get("command") == "noSuchCommand" for e in evs)
        and any(e["event"] == "mongodb.denied" and e.get("denied_database") == "shop_secret" for e in evs),
        user=gw.user)
    find = next(e for e in events if e.get("collection") == "zlibbed" and e.get("command") == "find")
    assert find["filters"] == [{"_id": "int32", "v": {"$exists": "bool"}}]
    insert = next(e for e in events if e.get("collection") == "zlibbed" and e.get("command") == "insert")
    assert insert["documents"] == 50


def test_a_session_kept_to_one_database(gw):
    _, p = gw.proxy("mongodb", "mongo", "--db-user", "app", "--db-name", "app")
    with client(p, maxPoolSize=1) as c:
        c.app.pinned.replace_one({"_id": 1}, {"v": 1}, upsert=True)
        with pytest.raises(mongo_errors.OperationFailure) as caught:
            c.shop.items.find_one()  # a role allows shop; this session keeps to app
        assert caught.value.code == 13 and "--db-name" in str(caught.value)


def test_a_cluster_that_cannot_be_reached_is_host_unreachable(tmp_path):
    echo = Echo(tmp_path)
    cluster = Cluster(tmp_path, echo, extra_config=ROLES)
    try:
        cluster.admin("resources", "add", "mongo", "--kind", "mongodb", "--address", "127.0.0.1:9",
                      "--tls", "require")
        g = new_gateway(cluster, tmp_path, "mongo")
        _, p = g.proxy("mongodb", "mongo", "--db-user", "app", "--wait-for-cluster", "0")
        cluster.stop()
        with client(p, retryReads=False) as c:
            with pytest.raises(mongo_errors.OperationFailure) as caught:
                c.app.t.find_one()
        assert caught.value.code == 6
        assert "check that the Wicket cluster is running" in str(caught.value)
        g.stop()
    finally:
        if cluster.proc.popen.poll() is None:
            cluster.stop()
        echo.proc.stop()


def test_an_expired_login_says_to_log_in_again(mongo_env, tmp_path):
    cluster, _ = mongo_env
    name = user_name()
    cluster.add_user(name, "mongo")
    g = Gateway(tmp_path, cluster, name)
    try:
        # Long enough for the proxy to start on a busy machine (it refuses
        # to start on an expired login), short enough to wait out.
        assert g.login("--ttl", "10s").returncode == 0
        _, p = g.proxy("mongodb", "mongo", "--db-user", "app")
        wait_for(lambda: g.run("status").returncode == 3, timeout=40, what="expiry", interval=0.2)
        with client(p) as c:
            with pytest.raises(mongo_errors.OperationFailure) as caught:
                c.app.t.find_one()
        assert caught.value.code == 391 and "wicket login" in str(caught.value)
    finally:
        g.stop()


def test_an_exhaust_cursor(port):
    from pymongo import CursorType

    with client(port, maxPoolSize=2) as c:
        t = c.app.exhaust
        t.drop()
        t.insert_many([{"n": i} for i in range(120)])
        # exhaustAllowed getMores: the server may answer each with moreToCome.
        got = [d["n"] for d in t.find({}, batch_size=10, cursor_type=CursorType.EXHAUST).sort("n", 1)]
        assert got == list(range(120))
        assert t.count_documents({}) == 120  # the connection is still in step


def test_exec_gives_drivers_the_connection_string(gw):
    script = ("import os, pymongo; c = pymongo.MongoClient(os.environ['MONGODB_URI'], serverSelectionTimeoutMS=20000); "
              "c.app.execd.insert_one({'n': 1}); print(c.app.execd.count_documents({}) >= 1, os.environ['MONGODB_URI'])")
    r = gw.run("exec", "--mongodb", "mongo", "--db-user", "app", "--", sys.executable, "-c", script)
    assert r.returncode == 0, r.stderr
    ok, uri = r.stdout.split()
    assert ok == "True" and uri.startswith("mongodb://127.0.0.1:") and uri.endswith("/?directConnection=true")
    # Under local TLS the exported URI says TLS and the CA to trust (and
    # the client certificate), as the one `wicket proxy` prints.
    for flag, tail in (("--local-tls", f"&tls=true&tlsCAFile={gw.home}/local-ca.crt"),
                       ("--local-tls-client-cert", f"&tlsCertificateKeyFile={gw.home}/local-client.pem")):
        r = gw.run("exec", "--mongodb", "mongo", "--db-user", "app", flag, "--", sys.executable, "-c", script)
        assert r.returncode == 0, r.stderr
        ok, uri = r.stdout.split()
        assert ok == "True" and uri.endswith(tail), uri


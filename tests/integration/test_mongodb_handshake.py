"""MongoDB end to end, before a session: the hellos the gateway answers
itself (a driver's monitors cost no session upstream; the server's values
learnt by a hello probe), what a driver sees when the cluster refuses,
and the local login for tools that insist on one. The set-up is
mongoenv.py's, shared with test_mongodb.py."""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import time

import pytest

from tests.integration.harness import wait_for
from tests.integration.mongoenv import (  # noqa: F401 (gw, mongo_env, port: fixtures)
    client, gw, mongo_env, new_gateway, port, pymongo, sessions_started,
)
from tests.servers import mongo

from pymongo import errors as mongo_errors  # noqa: E402


def test_the_hello_is_one_server_with_the_upstreams_limits(port, mongo_env):
    _, server = mongo_env
    with pymongo.MongoClient(server.uri(), serverSelectionTimeoutMS=20_000) as direct:
        real = direct.admin.command("hello")
    with client(port) as c:
        hello = c.admin.command("hello")
    for key in ("maxBsonObjectSize", "maxMessageSizeBytes", "maxWriteBatchSize", "maxWireVersion"):
        assert hello[key] == real[key]
    assert hello["isWritablePrimary"] is True
    assert not {"hosts", "setName", "primary", "me", "saslSupportedMechs"} & set(hello)


def test_credentials_in_the_uri_get_a_clear_answer(port):
    with pymongo.MongoClient(f"mongodb://app:whatever@127.0.0.1:{port}/?directConnection=true",
                             serverSelectionTimeoutMS=20_000) as c:
        with pytest.raises(mongo_errors.OperationFailure) as caught:
            c.app.command("ping")
    assert caught.value.code == 18
    assert "remove the user name and password" in str(caught.value)


@pytest.fixture(scope="module")
def local_uri(gw):
    """The one URI `wicket proxy` prints, with its local credential."""
    proc, p = gw.proxy("mongodb", "mongo", "--db-user", "app")
    found = re.search(r'"(mongodb://wicket:[^@"]+@127\.0\.0\.1:\d+/[^"]*)"', proc.log())
    assert found, proc.log()
    assert f":{p}/" in found.group(1)
    return found.group(1)


@pytest.mark.parametrize("mechanism", ["SCRAM-SHA-256", "SCRAM-SHA-1", None])
def test_tools_that_insist_on_a_login_use_the_printed_local_credential(local_uri, mechanism):
    uri = local_uri + (f"&authMechanism={mechanism}" if mechanism else "")
    with pymongo.MongoClient(uri, serverSelectionTimeoutMS=20_000) as c:
        c.app.local.replace_one({"_id": 1}, {"mechanism": str(mechanism)}, upsert=True)
        assert c.app.local.find_one({"_id": 1})["mechanism"] == str(mechanism)
    wrong = re.sub(r"wicket:[^@]+@", "wicket:not-the-password@", local_uri)
    with pymongo.MongoClient(wrong, serverSelectionTimeoutMS=20_000) as c:
        with pytest.raises(mongo_errors.OperationFailure) as caught:
            c.app.command("ping")
    assert caught.value.code == 18 and "local login" in str(caught.value)


def test_mongosh_with_the_printed_uri(local_uri):
    r = subprocess.run([str(mongo.mongosh()), "--quiet", "--norc", local_uri, "--eval", "db.runCommand({ping: 1}).ok"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr + r.stdout
    assert r.stdout.strip().splitlines()[-1] == "1"


# -- hellos answered by the gateway, sessions only for commands ------------------------


class _Heartbeats(pymongo.monitoring.ServerHeartbeatListener):
    """The driver's monitor's checks of the gateway: those that succeeded,
    and those that failed."""

    def __init__(self) -> None:
        self.checks: list = []
        self.failures: list = []

    def started(self, event) -> None:
        pass

    def succeeded(self, event) -> None:
        self.checks.append(event)

    def failed(self, event) -> None:
        self.failures.append(event)


NODE_IDLE_SCRIPT = """
const { MongoClient } = require('mongodb');
(async () => {
  const c = new MongoClient(process.env.MONGO_URI, { serverSelectionTimeoutMS: 20000, heartbeatFrequencyMS: 500 });
  const beats = [];
  c.on('serverHeartbeatSucceeded', (e) => beats.push(e));
  await c.connect();
  await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no heartbeats in 20 s')), 20000);
    c.on('serverHeartbeatSucceeded', () => { if (beats.length >= 3) { clearTimeout(timer); resolve(); } });
  });
  console.log(JSON.stringify({ heartbeats: 3, awaited: beats.some((e) => e.awaited) }));
  await c.close();
})().catch(e => { console.error(String(e)); process.exit(1); });
"""


def test_clients_left_idle_cost_no_session_even_on_a_cold_gateway_and_a_first_find_does(mongo_env, tmp_path):
    """Nothing known of the server yet: the first hello waits for a hello
    probe (a control dial, no login on the server), so even the first
    client's monitors cost no session; each client's first command does."""
    cluster, server = mongo_env
    with pymongo.MongoClient(server.uri(), serverSelectionTimeoutMS=20_000) as direct:
        real = direct.admin.command("hello")["maxWireVersion"]
    g = new_gateway(cluster, tmp_path, "mongo")
    try:
        proc, p = g.proxy("mongodb", "mongo", "--db-user", "app")
        beats = _Heartbeats()
        with client(p, heartbeatFrequencyMS=500, event_listeners=[beats]) as c:
            # The monitor's hellos, every heartbeat, answered here. The
            # gateway's hello has no topologyVersion: the driver polls.
            wait_for(lambda: len(beats.checks) >= 4, what="four heartbeats")
            assert not any(e.awaited for e in beats.checks)
            # The server's own value, from the probe (not a default).
            assert beats.checks[0].reply.max_wire_version == real
            assert c.app.lazy_sync.find_one({"n": 1}) is None  # the pool's first command dials
            events = cluster.wait_audit(lambda evs: any(e.get("collection") == "lazy_sync" for e in evs),
                                        user=g.user)
            find = next(e for e in events if e.get("collection") == "lazy_sync")
            assert [e["session_id"] for e in sessions_started(cluster, g.user)] == [find["session_id"]]
        probes = [e for e in events if e["event"] == "dial.control"]
        assert [(e["reason"], e["params"]["db_user"]) for e in probes] == [("hello probe", "app")], probes
        assert "mongodb_server_learnt" in proc.log()
        # The monitor left without ever needing the server.
        wait_for(lambda: re.search(r"mongodb_client_left .*hellos=\d+ session=none", proc.log()),
                 what="the monitor's leaving")

        async def main():
            beats = _Heartbeats()
            c = pymongo.AsyncMongoClient(f"mongodb://127.0.0.1:{p}/?directConnection=true",
                                         heartbeatFrequencyMS=500, event_listeners=[beats],
                                         serverSelectionTimeoutMS=20_000)
            try:
                await c.aconnect()  # the async client's monitor starts here
                for _ in range(400):  # at most 20 s
                    if len(beats.checks) >= 3:
                        break
                    await asyncio.sleep(0.05)
                assert len(beats.checks) >= 3 and not any(e.awaited for e in beats.checks)
                assert await c.app.lazy_async.find_one() is None
            finally:
                await c.close()

        asyncio.run(main())
        events = cluster.wait_audit(lambda evs: any(e.get("collection") == "lazy_async" for e in evs), user=g.user)
        find = next(e for e in events if e.get("collection") == "lazy_async")
        started = sessions_started(cluster, g.user)
        assert [e["session_id"] for e in started][1:] == [find["session_id"]], started
        # The Node.js driver connects (its monitor's hellos) and leaves: no session.
        env = {**os.environ, "MONGO_URI": f"mongodb://127.0.0.1:{p}/?directConnection=true"}
        r = subprocess.run(["node", "-e", NODE_IDLE_SCRIPT], capture_output=True, text=True, timeout=120,
                           cwd=mongo.node_clients(), env=env)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout.strip().splitlines()[-1]) == {"heartbeats": 3, "awaited": False}
        with client(p) as c:
            assert c.app.lazy_node.find_one() is None
        events = cluster.wait_audit(lambda evs: any(e.get("collection") == "lazy_node" for e in evs), user=g.user)
        find = next(e for e in events if e.get("collection") == "lazy_node")
        assert [e["session_id"] for e in sessions_started(cluster, g.user)][2:] == [find["session_id"]]
    finally:
        g.stop()


def test_a_wrong_local_credential_is_refused_before_any_dial(mongo_env, tmp_path):
    cluster, _ = mongo_env
    g = new_gateway(cluster, tmp_path, "mongo")
    try:
        proc, p = g.proxy("mongodb", "mongo", "--db-user", "app")
        wrong = f"mongodb://wicket:not-the-password@127.0.0.1:{p}/?directConnection=true&authSource=admin"
        with pymongo.MongoClient(wrong, serverSelectionTimeoutMS=20_000) as c:
            with pytest.raises(mongo_errors.OperationFailure) as caught:
                c.app.wrong_pw.find_one()
        assert caught.value.code == 18 and "local login" in str(caught.value)
        wait_for(lambda: "mongodb_local_login_failed" in proc.log(), what="the refusal's log line")
        right = re.search(r'"(mongodb://wicket:[^@"]+@[^"]+)"', proc.log()).group(1)
        with pymongo.MongoClient(right, serverSelectionTimeoutMS=20_000) as c:
            assert c.app.right_pw.find_one() is None
        events = cluster.wait_audit(lambda evs: any(e.get("collection") == "right_pw" for e in evs), user=g.user)
        find = next(e for e in events if e.get("collection") == "right_pw")
        started = [e for e in events if e["event"] == "session.start"]
        assert [e["session_id"] for e in started] == [find["session_id"]], started  # none for the wrong one
    finally:
        g.stop()


def _raw_conversation(port: int, messages: list, replies: int = 1) -> list:
    """Send ``messages`` at once on a new connection; the first ``replies``
    replies, decoded."""
    import socket

    from protocols.mongodb import MessageReader
    from protocols.signals import NEED_DATA

    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(b"".join(m.encode() for m in messages))
        reader = MessageReader(verify_checksums=False)
        out = []
        while len(out) < replies:
            while (event := reader.next_event()) is NEED_DATA:
                reader.receive_data(s.recv(65536))
            out.append(event)
        return out


def _raw_command(port: int, message) -> object:
    return _raw_conversation(port, [message])[0]


def test_what_the_gateway_answers_itself_before_a_session(port):
    from protocols.mongodb import OpMsg, OpQuery, OpReply, bson

    with client(port) as c:  # the gateway has the server's values: what follows is answered here
        assert c.admin.command("ping")["ok"] == 1.0
        in_session = c.admin.command("hello")  # the cluster's answer, on a session
    # Say the gateway once offered a topologyVersion (it never does): a
    # server whose processId is not the request's answers at once, and the
    # driver, seeing none in the answer, goes back to polling. The reply
    # comes well within the socket's 20 s, a third of maxAwaitTimeMS.
    awaitable = OpMsg(request_id=7, exhaust_allowed=True, body={
        "hello": 1, "$db": "admin", "maxAwaitTimeMS": bson.Int64(60_000),
        "topologyVersion": {"processId": bson.ObjectId(bytes(12)), "counter": bson.Int64(0)}})
    reply = _raw_command(port, awaitable)
    assert isinstance(reply, OpMsg) and reply.response_to == 7 and not reply.more_to_come
    assert reply.body["isWritablePrimary"] is True and "topologyVersion" not in reply.body
    assert "connectionId" not in reply.body  # no server connection stands behind this answer
    for key in ("maxWireVersion", "maxMessageSizeBytes", "maxBsonObjectSize"):  # the server's, cached
        assert reply.body[key] == in_session[key], key
    # A legacy OP_QUERY isMaster (old drivers' first message) gets an OP_REPLY.
    legacy = _raw_command(port, OpQuery(request_id=8, collection="admin.$cmd", query={"isMaster": 1}, limit=-1))
    assert isinstance(legacy, OpReply) and legacy.response_to == 8 and legacy.documents[0]["ismaster"] is True
    # A first message that is not a hello: told so, in reply to it.
    refused = _raw_command(port, OpMsg(request_id=9, body={"find": "t", "$db": "app"}))
    assert isinstance(refused, OpMsg) and refused.response_to == 9
    assert refused.body["codeName"] == "CommandNotSupported" and "must be hello" in refused.body["errmsg"]
    # moreToCome: no reply; a checksummed hello is answered.
    quiet = OpMsg(request_id=10, more_to_come=True, body={"hello": 1, "$db": "admin"})
    summed = OpMsg(request_id=11, checksum=True, body={"hello": 1, "$db": "admin"})
    (reply,) = _raw_conversation(port, [quiet, summed])
    assert reply.response_to == 11 and reply.body["ok"] == 1.0
    # A login nobody announced in its hello is the local credential's (its
    # SCRAM challenge, where the cluster would refuse any); the other way
    # to log in is told what to do.
    hello = OpMsg(request_id=12, body={"hello": 1, "$db": "admin"})
    start = OpMsg(request_id=13, body={"saslStart": 1, "mechanism": "SCRAM-SHA-256",
                                       "payload": b"n,,n=wicket,r=abcdefghijkl", "$db": "admin"})
    _, challenge = _raw_conversation(port, [hello, start], replies=2)
    assert challenge.response_to == 13 and challenge.body["ok"] == 1.0 and b"r=abcdefghijkl" in challenge.body["payload"]
    x509 = OpMsg(request_id=14, body={"authenticate": 1, "mechanism": "MONGODB-X509", "$db": "$external"})
    _, failed = _raw_conversation(port, [hello, x509], replies=2)
    assert failed.response_to == 14 and failed.body["code"] == 18
    assert "remove the user name and password" in failed.body["errmsg"]


def test_a_refused_dial_is_the_drivers_own_error_at_once(mongo_env, tmp_path):
    """The cluster refuses this user: the probe is refused, yet the
    gateway answers the driver's hellos (as the default server: no values
    are known), so the driver selects it and its first command raises
    OperationFailure with the refusal at once, instead of a
    ServerSelectionTimeoutError after serverSelectionTimeoutMS. A message
    as large as those hellos allow is read and refused too."""
    cluster, _ = mongo_env
    outsider = new_gateway(cluster, tmp_path, "dev")  # no role reaches mongo*
    try:
        _, p = outsider.proxy("mongodb", "mongo", "--db-user", "app")
        beats = _Heartbeats()
        with client(p, serverSelectionTimeoutMS=30_000, heartbeatFrequencyMS=500, event_listeners=[beats]) as c:
            started = time.monotonic()
            with pytest.raises(mongo_errors.OperationFailure) as caught:
                c.app.t.find_one()
            assert time.monotonic() - started < 15  # not a server selection's timeout
            assert caught.value.code == 13
            assert "access to 'mongo' denied" in str(caught.value)
            wait_for(lambda: len(beats.checks) >= 2, what="two heartbeats")
            assert not beats.failures
            # One insert of 20 MiB (four 5 MiB documents): past 16 MiB, within
            # the 48 MB the hellos said. Refused, not cut.
            with pytest.raises(mongo_errors.OperationFailure) as caught:
                c.app.t.insert_many([{"blob": "x" * (5 * 1024 * 1024)} for _ in range(4)])
            assert caught.value.code == 13
        denied = cluster.wait_audit(user=outsider.user, event="dial.denied")
        assert any(e.get("params", {}).get("mongodb.probe") == "hello" for e in denied), denied
        assert sessions_started(cluster, outsider.user) == []
    finally:
        outsider.stop()

"""gateway.cluster.mongodb_gate: a MongoDB session's commands checked,
answered or passed, and audited; the gate as the relay's message filter
over real socket pairs (in the relay engine, and in the task-based relay),
with a scripted server and a cluster that records its audit events."""

from __future__ import annotations

import types

import pytest
import trio
import trio.testing

from gateway.cluster import rbac
from gateway.cluster.mongodb_gate import CommandGate, stand_in_for
from gateway.net.filters import Filtered
from gateway.net.relay import relay
from protocols.mongodb import MessageReader, OpMsg, OpQuery, OpReply
from protocols.signals import NEED_DATA

ROLE = rbac.Role.from_spec("mongo", {
    "allow": [{"resources": ["db"], "db_users": ["app"], "db_names": ["app", "shop*"]}],
    "deny": [{"resources": ["db"], "db_names": ["shop_secret"]}],
})
UPSTREAM_HELLO = {"isWritablePrimary": True, "setName": "rs0", "hosts": ["a:1", "b:2"],
                  "maxBsonObjectSize": 16777216, "maxMessageSizeBytes": 48000000, "maxWriteBatchSize": 100000,
                  "minWireVersion": 0, "maxWireVersion": 21, "connectionId": 42, "ok": 1.0}


@pytest.fixture(autouse=True, params=["engine", "trio"])
def relay_kind(request, monkeypatch):
    """Every case through both relays: the engine's, and the task-based one."""
    if request.param == "trio":
        monkeypatch.setenv("WICKET_RELAY", "trio")
    else:
        monkeypatch.delenv("WICKET_RELAY", raising=False)
    return request.param


class RecordingCluster:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        self.snap = types.SimpleNamespace(users={"alice": types.SimpleNamespace(name="alice", roles=("mongo",))},
                                          roles={"mongo": ROLE})

    def audit_soon(self, event, user, **fields) -> None:
        self.events.append((event, fields))

    def audit_fields_soon(self, event, user, fields) -> None:
        self.events.append((event, fields))

    def fresh_snapshot(self):
        return self.snap

    async def snapshot(self):
        return self.snap

    def roles_in(self, snap, user, claimed):
        return [snap.roles[name] for name in user.roles]

    def named(self, event: str) -> list[dict]:
        return [fields for name, fields in self.events if name == event]


class Session:
    """The gate as the relay's filter, a client on the relay's gateway side
    and a scripted server on its upstream side (as MongoKind.login makes it)."""

    def __init__(self, nursery: trio.Nursery, *, db_name: str | None = None, refusal: str | None = None) -> None:
        self.cluster = RecordingCluster()
        self.nursery = nursery
        self.db_name, self.refusal = db_name, refusal
        client, gateway_side = trio.socket.socketpair()
        upstream, server = trio.socket.socketpair()
        self.client, self.server = trio.SocketStream(client), trio.SocketStream(server)
        self._relay_ends = trio.SocketStream(gateway_side), trio.SocketStream(upstream)
        self.replies = MessageReader(verify_checksums=False)
        self.requests = MessageReader(verify_checksums=False)
        self._ids = 0

    async def start(self) -> "Session":
        gateway_side, upstream = self._relay_ends
        stand_in = None
        if self.refusal is not None:
            upstream, stand_in = await stand_in_for(upstream)
        session = types.SimpleNamespace(id="s1", user="alice", resource="db", identity=None)
        resource = types.SimpleNamespace(name="db", labels={})
        self.gate = CommandGate(self.cluster, session, resource, hello=UPSTREAM_HELLO, db_user="app",
                                db_name=self.db_name, refusal=self.refusal, stand_in=stand_in)
        self.nursery.start_soon(self._relay, gateway_side, upstream)
        return self

    async def _relay(self, gateway_side, upstream) -> None:
        async with gateway_side, upstream:  # as the cluster's session closes them
            await relay(gateway_side, upstream, names=("gateway", "upstream"), taps=(None, self.gate.tap_server),
                        filtered=Filtered(self.gate))
        self.gate.finish()

    async def send(self, body: dict, **flags) -> int:
        self._ids += 1
        await self.client.send_all(OpMsg(request_id=self._ids, body=body, **flags).encode())
        return self._ids

    async def reply(self):
        return await _next(self.client, self.replies)

    async def request(self):
        return await _next(self.server, self.requests)


async def _next(stream, reader):
    while (event := reader.next_event()) is NEED_DATA:
        reader.receive_data(await stream.receive_some(65536))
    return event


async def test_a_hello_is_answered_from_the_servers_own_as_one_server() -> None:
    async with trio.open_nursery() as nursery:
        s = await Session(nursery).start()
        rid = await s.send({"hello": 1, "helloOk": True, "$db": "admin"})
        reply = await s.reply()
        assert reply.response_to == rid
        assert reply.body["maxWireVersion"] == 21 and reply.body["msg"] == "isdbgrid"
        assert reply.body["connectionId"] == 42 and "hosts" not in reply.body
        # A legacy isMaster in OP_QUERY gets an OP_REPLY.
        await s.client.send_all(OpQuery(request_id=77, collection="admin.$cmd", query={"isMaster": 1}).encode())
        legacy = await s.reply()
        assert isinstance(legacy, OpReply) and legacy.response_to == 77 and legacy.documents[0]["ismaster"]
        nursery.cancel_scope.cancel()


async def test_a_denied_database_is_unauthorized_and_the_session_goes_on() -> None:
    async with trio.open_nursery() as nursery:
        s = await Session(nursery).start()
        rid = await s.send({"find": "items", "filter": {"price": {"$gt": 10}}, "$db": "shop_secret"})
        reply = await s.reply()
        assert reply.response_to == rid and reply.body["code"] == 13 and reply.body["codeName"] == "Unauthorized"
        assert "not authorized on shop_secret to execute command find" in reply.body["errmsg"]
        # $out from an allowed database into a denied one.
        await s.send({"aggregate": "items", "pipeline": [{"$out": {"db": "shop_secret", "coll": "x"}}],
                      "cursor": {}, "$db": "shop"})
        assert (await s.reply()).body["code"] == 13
        # An allowed command passes, byte for byte, and its reply comes back.
        rid = await s.send({"find": "items", "filter": {"sku": "A-1"}, "$db": "shop"})
        forwarded = await s.request()
        assert forwarded.request_id == rid and forwarded.body["$db"] == "shop"
        await s.server.send_all(OpMsg(request_id=1, response_to=rid,
                                      body={"ok": 0.0, "errmsg": "boom", "code": 2, "codeName": "BadValue"}).encode())
        assert (await s.reply()).body["errmsg"] == "boom"
        await trio.testing.wait_all_tasks_blocked()
        denied = s.cluster.named("mongodb.denied")
        assert [d["denied_database"] for d in denied] == ["shop_secret", "shop_secret"]
        (command,) = s.cluster.named("mongodb.command")
        assert command["database"] == "shop" and command["collection"] == "items"
        assert command["filters"] == [{"sku": "string"}]  # the shape, never the value
        (error,) = s.cluster.named("mongodb.error")
        assert error["command"] == "find" and error["code"] == 2
        nursery.cancel_scope.cancel()


async def test_a_session_kept_to_one_database() -> None:
    async with trio.open_nursery() as nursery:
        s = await Session(nursery, db_name="app").start()
        await s.send({"find": "items", "$db": "shop"})  # a role allows shop, the dial said app
        reply = await s.reply()
        assert reply.body["code"] == 13 and "keeps to database 'app'" in reply.body["errmsg"]
        await s.send({"ping": 1, "$db": "admin"})  # housekeeping runs anywhere
        assert (await s.request()).body["ping"] == 1
        nursery.cancel_scope.cancel()


async def test_a_client_login_is_refused_and_never_reaches_the_server() -> None:
    async with trio.open_nursery() as nursery:
        s = await Session(nursery).start()
        await s.send({"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": b"n,,n=x,r=y", "$db": "admin"})
        reply = await s.reply()
        assert reply.body["code"] == 18 and "remove the user name and password" in reply.body["errmsg"]
        await s.send({"ping": 1, "$db": "admin"})
        assert "ping" in (await s.request()).body  # the first thing the server saw
        nursery.cancel_scope.cancel()


async def test_an_unacknowledged_denied_write_gets_no_reply() -> None:
    async with trio.open_nursery() as nursery:
        s = await Session(nursery).start()
        await s.send({"insert": "x", "documents": [{"a": 1}], "$db": "shop_secret"}, more_to_come=True)
        rid = await s.send({"ping": 1, "$db": "admin"})
        assert (await s.request()).request_id == rid  # the write was dropped, not passed
        await s.server.send_all(OpMsg(request_id=9, response_to=rid, body={"ok": 1.0}).encode())
        assert (await s.reply()).response_to == rid  # and nothing came before the ping's reply
        nursery.cancel_scope.cancel()


async def test_a_reply_of_the_gates_own_never_lands_inside_the_servers() -> None:
    async with trio.open_nursery() as nursery:
        s = await Session(nursery).start()
        rid = await s.send({"find": "items", "$db": "app"})
        await s.request()
        whole = OpMsg(request_id=5, response_to=rid, body={"cursor": {"firstBatch": [{"x": "y" * 5000}],
                                                                      "id": 0, "ns": "app.items"}, "ok": 1.0}).encode()
        await s.server.send_all(whole[:3000])  # half a reply is on its way to the client
        await trio.testing.wait_all_tasks_blocked()
        denied = await s.send({"find": "items", "$db": "shop_secret"})
        await trio.testing.wait_all_tasks_blocked()
        await s.server.send_all(whole[3000:])
        first, second = await s.reply(), await s.reply()
        assert first.response_to == rid and second.response_to == denied
        nursery.cancel_scope.cancel()


async def test_a_malformed_message_ends_the_session_on_record() -> None:
    async with trio.open_nursery() as nursery:
        s = await Session(nursery).start()
        await s.client.send_all(b"\x05\x00\x00\x00garbage")  # a length shorter than any header
        assert await s.server.receive_some(100) == b""  # the server's connection is closed
        assert await s.client.receive_some(100) == b""
        (event,) = s.cluster.named("mongodb.protocol_error")
        assert event["side"] == "client"


async def test_a_login_the_server_refused_is_every_commands_answer() -> None:
    async with trio.open_nursery() as nursery:
        s = await Session(nursery, refusal="db refused the cluster's login as db user 'app'").start()
        assert await s.server.receive_some(100) == b""  # nothing goes to that server
        await s.send({"hello": 1, "$db": "admin"})
        assert (await s.reply()).body["maxWireVersion"] == 21
        await s.send({"find": "items", "$db": "app"})
        reply = await s.reply()
        assert reply.body["code"] == 18 and "refused the cluster's login" in reply.body["errmsg"]
        nursery.cancel_scope.cancel()

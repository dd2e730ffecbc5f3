"""protocols.mongodb.handshake: the gateway's own hello."""

from __future__ import annotations

from typing import Any

import pytest

from protocols.mongodb import bson, wire
from protocols.mongodb.commands import reply_to
from protocols.mongodb.handshake import ClientHello, client_hello, gateway_hello
from tests.unit.protocols.feeding import malformed

REPLICA_SET_HELLO = {
    "topologyVersion": {"processId": bson.ObjectId(bytes(12)), "counter": bson.Int64(0)},
    "hosts": ["db1:27017", "db2:27017"], "setName": "rs0", "setVersion": 3,
    "isWritablePrimary": True, "secondary": False, "primary": "db1:27017", "me": "db1:27017",
    "electionId": bson.ObjectId(bytes(12)), "maxBsonObjectSize": 16777216,
    "maxMessageSizeBytes": 48000000, "maxWriteBatchSize": 100000,
    "localTime": bson.DateTime(1765000000000), "logicalSessionTimeoutMinutes": 30,
    "connectionId": 7, "minWireVersion": 0, "maxWireVersion": 21, "readOnly": False,
    "compression": ["snappy", "zstd", "zlib"], "saslSupportedMechs": ["SCRAM-SHA-256"],
    "ok": 1.0,
}
DRIVER_HELLO = {"isMaster": 1, "helloOk": True, "compression": ["snappy", "zstd", "zlib"],
                "client": {"application": {"name": "report-job"},
                           "driver": {"name": "PyMongo", "version": "4.18.2"}},
                "saslSupportedMechs": "admin.app", "$db": "admin"}


def test_a_driver_s_hello() -> None:
    assert client_hello(DRIVER_HELLO) == ClientHello(
        command="isMaster", compression=("snappy", "zstd", "zlib"), hello_ok=True,
        wants_auth=True, application="report-job")
    assert client_hello({"hello": 1, "loadBalanced": True, "compression": "zlib",
                         "client": "x"}) == ClientHello(command="hello", load_balanced=True)


@pytest.mark.parametrize("body", [{"find": "t"}, {}])
def test_the_first_command_must_be_hello(body: dict[str, Any]) -> None:
    assert malformed(client_hello, body).wire_hint == 115


def test_a_replica_set_is_shown_as_one_router() -> None:
    reply = gateway_hello(REPLICA_SET_HELLO, client_hello(DRIVER_HELLO), connection_id=42)
    assert reply == {
        "ismaster": True, "helloOk": True, "msg": "isdbgrid", "maxBsonObjectSize": 16777216,
        "maxMessageSizeBytes": 48000000, "maxWriteBatchSize": 100000,
        "localTime": bson.DateTime(1765000000000), "logicalSessionTimeoutMinutes": 30,
        "minWireVersion": 0, "maxWireVersion": 21, "readOnly": False, "connectionId": 42,
        "compression": ["zlib"], "ok": 1.0}
    for hidden in ("hosts", "setName", "primary", "me", "topologyVersion", "saslSupportedMechs"):
        assert hidden not in reply


def test_a_standalone_stays_one_and_the_spelling_follows_the_request() -> None:
    standalone = {"isWritablePrimary": True, "maxWireVersion": 17, "ok": 1.0}
    reply = gateway_hello(standalone, ClientHello(command="hello"), connection_id=2**40,
                          compressors=())
    assert reply == {"isWritablePrimary": True, "maxWireVersion": 17, "readOnly": False,
                     "connectionId": bson.Int64(2**40), "ok": 1.0}


def test_the_reply_goes_in_the_request_s_kind() -> None:
    legacy = wire.OpQuery(request_id=5, collection="admin.$cmd", query=DRIVER_HELLO)
    reply = reply_to(legacy, gateway_hello(REPLICA_SET_HELLO, client_hello(legacy.query)),
                     request_id=1)
    assert isinstance(reply, wire.OpReply) and reply.response_to == 5
    assert wire.decode_message(reply.encode()) == reply
    modern = wire.OpMsg(request_id=6, body={"hello": 1, "$db": "admin"})
    assert isinstance(reply_to(modern, {"ok": 1.0}), wire.OpMsg)


# --- the upstream's hello as a dial accept's parameters ---------------------------------


def test_the_upstream_hello_travels_as_accept_params_and_back() -> None:
    from protocols.mongodb import hello_from_params, hello_params

    upstream = {**REPLICA_SET_HELLO, "connectionId": 2**40, "compression": ["zlib", "snappy"]}
    params = hello_params(upstream, ["snappy", "zlib"])
    assert all(isinstance(v, str) and len(k) <= 64 for k, v in params.items())
    assert params["hello.compression"] == "zlib"  # only what the codec can open
    assert "hello.localTime" not in params  # the gateway's clock says it
    back = hello_from_params(params)
    assert back["msg"] == "isdbgrid"  # a replica set stays one router
    reply = gateway_hello(back, client_hello({"hello": 1, "compression": ["zstd", "zlib"]}),
                          connection_id=back["connectionId"], compressors=back["compression"])
    for key in ("maxBsonObjectSize", "maxMessageSizeBytes", "maxWireVersion", "minWireVersion"):
        assert reply[key] == upstream[key]
    assert reply["compression"] == ["zlib"] and reply["connectionId"] == 2**40
    assert not {"hosts", "setName", "primary", "me"} & set(reply)


def test_params_that_do_not_read_are_left_out() -> None:
    from protocols.mongodb import hello_from_params

    assert hello_from_params({"hello.maxWireVersion": "many", "other": "1", "hello.unknown": "3",
                              "hello.readOnly": "1"}) == {"readOnly": True}

"""protocols.mongodb.handshake: the gateway's own hello."""

from __future__ import annotations

from typing import Any

import pytest

from protocols.mongodb import bson, wire
from protocols.mongodb.commands import reply_to
from protocols.mongodb.handshake import (
    ClientHello, client_hello, compressors_of, gateway_hello, hello_from_params, hello_params, max_message_size,
)
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


@pytest.mark.parametrize(("size", "limit"), [
    (48_000_000, 48_000_000), (8 * 1024 * 1024, 8 * 1024 * 1024), (1024 * 1024, 1024 * 1024),
    (1024 * 1024 - 1, wire.DEFAULT_MAX_MESSAGE_SIZE), (2**40, wire.DEFAULT_MAX_MESSAGE_SIZE),
    (True, wire.DEFAULT_MAX_MESSAGE_SIZE), ("48000000", wire.DEFAULT_MAX_MESSAGE_SIZE),
    (None, wire.DEFAULT_MAX_MESSAGE_SIZE),
])
def test_the_message_size_a_client_may_send_is_the_servers_within_bounds(size: object, limit: int) -> None:
    assert max_message_size({} if size is None else {"maxMessageSizeBytes": size}) == limit


def test_a_message_size_that_travelled_as_a_param_is_the_servers() -> None:
    carried = hello_from_params(hello_params({"maxMessageSizeBytes": 8_000_000, "maxWireVersion": 21}))
    assert max_message_size(carried) == 8_000_000


def test_the_compressors_kept_are_those_the_codec_opens_in_the_servers_order() -> None:
    assert compressors_of(REPLICA_SET_HELLO) == ("zlib",)
    assert compressors_of({"compression": ["zlib", "snappy"]}) == ("zlib",)
    assert compressors_of({"compression": "zlib"}) == ()
    assert compressors_of({}) == ()


def test_params_that_do_not_read_are_left_out() -> None:
    from protocols.mongodb import hello_from_params

    assert hello_from_params({"hello.maxWireVersion": "many", "other": "1", "hello.unknown": "3",
                              "hello.readOnly": "1"}) == {"readOnly": True}


# -- HandshakeReader: the messages a gateway answers before the session ------------

from hypothesis import given, strategies as st  # noqa: E402

from protocols.errors import LocalProtocolError  # noqa: E402
from protocols.mongodb.commands import HANDSHAKE_COMMANDS  # noqa: E402
from protocols.mongodb.handshake import HandshakeReader, SessionBegins  # noqa: E402
from protocols.errors import RemoteProtocolError  # noqa: E402
from protocols.signals import NEED_DATA, PAUSED, ConnectionClosed  # noqa: E402
from tests.unit.protocols.feeding import FEEDS, fuzz, split  # noqa: E402

HELLO = wire.OpMsg(request_id=1, body={"hello": 1, "$db": "admin"})
HEARTBEAT = wire.OpMsg(request_id=2, body={"hello": 1, "topologyVersion": {"processId": bson.ObjectId(bytes(12)),
                                                                          "counter": bson.Int64(0)},
                                           "maxAwaitTimeMS": 10_000, "$db": "admin"}, exhaust_allowed=True)
LEGACY = wire.OpQuery(request_id=3, collection="admin.$cmd", query={"isMaster": 1}, limit=-1)
FIND = wire.OpMsg(request_id=4, body={"find": "t", "filter": {"hello": 1}, "$db": "app"})


def _drain(reader: HandshakeReader, chunks: list[bytes]) -> list:
    """Feed ``chunks`` until the session begins or the client leaves."""
    events: list = []
    for chunk in chunks:
        reader.receive_data(chunk)
        while (event := reader.next_event()) is not NEED_DATA:
            events.append(event)
            if isinstance(event, (SessionBegins, ConnectionClosed)):
                return events
    return events


def _read(data: bytes, how: str, *, handled=HANDSHAKE_COMMANDS, eof: bool = False) -> tuple[HandshakeReader, list]:
    reader = HandshakeReader(handled)
    return reader, _drain(reader, split(data, how) + ([b""] if eof else []))


@pytest.mark.parametrize("how", FEEDS)
def test_hellos_are_read_until_the_sessions_first_message(how: str) -> None:
    session = FIND.encode() + b"\x01\x02trailing"
    reader, events = _read(HELLO.encode() + LEGACY.encode() + HEARTBEAT.encode() + session, how)
    assert events[:3] == [HELLO, LEGACY, HEARTBEAT] and events[3:4] == [SessionBegins()]
    assert reader.next_event() is PAUSED  # the rest is the session's
    # What came so far: a byte at a time, the session begins as its first
    # message is whole (the rest is the relay's to read).
    assert reader.trailing_data == (session if how == "whole" else FIND.encode(), False)
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"more")  # the session's bytes go to the cluster


@pytest.mark.parametrize("how", FEEDS)
def test_a_login_is_read_when_asked_for(how: str) -> None:
    start = wire.OpMsg(request_id=5, body={"saslStart": 1, "mechanism": "SCRAM-SHA-256", "$db": "admin"})
    reader, events = _read(HELLO.encode() + start.encode(), how, handled=HANDSHAKE_COMMANDS | {"saslStart"})
    assert events == [HELLO, start] and not reader.pending


def test_the_session_begins_at_a_compressed_or_long_message_without_reading_it() -> None:
    compressed = wire.compress(HELLO).encode()  # a hello is never compressed: not the handshake's
    reader, events = _read(compressed[:16], "whole")
    assert events == [SessionBegins()] and reader.trailing_data == (compressed[:16], False)
    big = wire.OpMsg(body={"insert": "t", "documents": [{"x": "y" * 70_000}], "$db": "app"}).encode()
    reader, events = _read(big[:16], "whole")
    assert events == [SessionBegins()] and reader.trailing_data == (big[:16], False)


def test_a_legacy_query_on_a_collection_is_the_sessions() -> None:
    query = wire.OpQuery(collection="app.t", query={"hello": 1}).encode()
    reader, events = _read(query, "whole")
    assert events == [SessionBegins()] and reader.trailing_data[0] == query


@pytest.mark.parametrize("how", FEEDS)
def test_a_client_that_leaves(how: str) -> None:
    reader, events = _read(HELLO.encode(), how, eof=True)
    assert events == [HELLO, ConnectionClosed(clean=True)]
    reader, events = _read(HELLO.encode()[:-3], how, eof=True)
    assert events == [ConnectionClosed(clean=False)]


def test_pending_says_a_message_is_half_here() -> None:
    reader = HandshakeReader(HANDSHAKE_COMMANDS)
    assert not reader.pending and reader.next_event() is NEED_DATA
    reader.receive_data(HELLO.encode()[:5])
    assert reader.pending and reader.next_event() is NEED_DATA
    with pytest.raises(LocalProtocolError):
        reader.trailing_data


def test_a_malformed_message_poisons_the_reader() -> None:
    reader = HandshakeReader(HANDSHAKE_COMMANDS)
    reader.receive_data(b"\x08\x00\x00\x00" + bytes(12))
    first = malformed(reader.next_event)
    assert "shorter than its header" in first.message
    assert malformed(reader.next_event).message == first.message
    reader = HandshakeReader(HANDSHAKE_COMMANDS)
    broken = bytearray(HELLO.encode())
    broken[21] = 0x7F  # an unknown BSON type in the body
    reader.receive_data(bytes(broken))
    malformed(reader.next_event)


def test_more_than_a_handshake_ahead_is_refused() -> None:
    reader = HandshakeReader(HANDSHAKE_COMMANDS, max_message_size=1024)
    half = wire.OpMsg(body={"hello": 1, "pad": "x" * 900}).encode()[:-1]
    reader.receive_data(half)
    reader.receive_data(bytes(70_000))
    assert "handshake's worth" in malformed(reader.next_event).message


@fuzz
@given(st.binary(max_size=300))
def test_fuzzed_bytes_are_messages_the_session_or_a_protocol_error(data: bytes) -> None:
    reader = HandshakeReader(HANDSHAKE_COMMANDS)
    try:
        events = _drain(reader, [HELLO.encode() + data, b""])
    except RemoteProtocolError:  # only the peer's fault, said so
        return
    assert events[0] == HELLO and isinstance(events[-1], (SessionBegins, ConnectionClosed))

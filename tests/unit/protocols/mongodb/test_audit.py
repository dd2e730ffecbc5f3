"""protocols.mongodb.audit: command events from the client's stream, error
replies from the server's, fed whole, a byte at a time, with trailing data."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.mongodb import bson, wire
from protocols.mongodb.audit import (
    ClientAuditor, CommandEvent, ErrorReplyEvent, ServerAuditor, UnauditedMessageEvent,
)
from protocols.mongodb.commands import Command, error_reply
from protocols.mongodb.wire import DocumentSequence, OpMsg, OpQuery, OpReply
from protocols.signals import ConnectionClosed
from tests.unit.protocols.feeding import FEEDS, fuzz, malformed, pump, split
from tests.unit.protocols.mongodb.corpus import captured_streams


HELLO = OpQuery(request_id=1, collection="admin.$cmd", query={"isMaster": 1, "helloOk": True})
FIND = OpMsg(request_id=2, body={"find": "users", "filter": {"age": {"$gt": 30}}, "$db": "app"})
INSERT = OpMsg(request_id=3, body={"insert": "users", "$db": "app"}, sequences=[
    DocumentSequence(identifier="documents", documents=[{"secret": "x" * 100}] * 5)])
UPDATE = OpMsg(request_id=4, body={"update": "users", "$db": "app", "writeConcern": {"w": 0}},
               sequences=[DocumentSequence(identifier="updates", documents=[
                   {"q": {"name": "bob"}, "u": {"$set": {"age": 3}}}])], more_to_come=True)
GET_MORE = OpMsg(request_id=5, body={"getMore": bson.Int64(77), "collection": "users",
                                     "$db": "app"}, exhaust_allowed=True, checksum=True)
CLIENT = [HELLO, FIND, INSERT, UPDATE, GET_MORE]


def size(message: wire.Message) -> int:
    return len(message.encode())


CLIENT_EVENTS = [
    CommandEvent(request_id=1, command=Command(name="isMaster", database="admin", legacy=True),
                 size=size(HELLO)),
    CommandEvent(request_id=2, command=Command(name="find", database="app", collection="users",
                                               filters=[{"age": {"$gt": "int32"}}]),
                 size=size(FIND)),
    CommandEvent(request_id=3, command=Command(name="insert", database="app",
                                               collection="users", documents=5),
                 size=size(INSERT)),
    CommandEvent(request_id=4, command=Command(name="update", database="app",
                                               collection="users", documents=1,
                                               filters=[{"name": "string"}]),
                 more_to_come=True, size=size(UPDATE)),
    CommandEvent(request_id=5, command=Command(name="getMore", database="app",
                                               collection="users", cursor_id=77),
                 exhaust_allowed=True, size=size(GET_MORE)),
]
CLIENT_STREAM = b"".join(m.encode() for m in CLIENT)


@pytest.mark.parametrize("how", FEEDS)
def test_client_commands_whole_or_bytewise(how: str) -> None:
    auditor = ClientAuditor()
    events = pump(auditor, split(CLIENT_STREAM, how) + [b""])
    assert events == CLIENT_EVENTS + [ConnectionClosed(clean=True)]
    assert "x" * 100 not in repr(events) and "bob" not in repr(events)
    assert auditor.messages_seen == 5 and auditor.bytes_seen == len(CLIENT_STREAM)


@pytest.mark.parametrize("how", FEEDS)
def test_trailing_data_makes_an_unclean_close(how: str) -> None:
    auditor = ClientAuditor()
    events = pump(auditor, split(CLIENT_STREAM + FIND.encode()[:30], how) + [b""])
    assert events == CLIENT_EVENTS + [ConnectionClosed(clean=False)]
    with pytest.raises(LocalProtocolError):
        auditor.receive_data(b"x")


def test_compressed_commands_are_audited_as_what_they_hold() -> None:
    auditor = ClientAuditor()
    raw = wire.compress(FIND).encode() + wire.compress(HELLO, wire.Compressor.NOOP).encode()
    events = pump(auditor, [raw])
    assert [e.command.name for e in events] == ["find", "isMaster"]
    assert events[0].size == len(wire.compress(FIND).encode())


def test_snappy_poisons_the_client_auditor() -> None:
    compressed = wire.OpCompressed(original_opcode=wire.OP_MSG, uncompressed_size=1,
                                   compressor_id=1, payload=b"x")
    auditor = ClientAuditor()
    auditor.receive_data(FIND.encode() + compressed.encode() + FIND.encode())
    assert auditor.next_event().command.name == "find"
    assert "snappy" in malformed(auditor.next_event).message
    malformed(auditor.next_event)


@pytest.mark.parametrize("message, words", [
    (OpReply(documents=[{"ok": 1}]), "only servers send"),
    (OpQuery(collection="app.users", query={}), "OP_QUERY on"),
    (OpMsg(body={"find": "t"}), "no $db"),
])
def test_what_a_client_may_not_send(message: wire.Message, words: str) -> None:
    auditor = ClientAuditor()
    auditor.receive_data(message.encode())
    assert words in malformed(auditor.next_event).message


def test_a_message_over_max_message_keeps_its_command() -> None:
    big = OpMsg(request_id=9, body={"insert": "t", "$db": "app"}, sequences=[
        DocumentSequence(identifier="documents", documents=[{"b": b"x" * 500}] * 4)])
    auditor = ClientAuditor(max_message=300)
    events = pump(auditor, split(big.encode() + FIND.encode(), "bytewise"))
    assert events[0] == CommandEvent(request_id=9, command=Command(
        name="insert", database="app", collection="t"), size=size(big), truncated=True)
    assert events[1].command.name == "find"
    # No body section within the prefix: only the message's existence is told.
    huge_body = OpMsg(request_id=10, body={"insert": "t", "documents": [{"b": b"x" * 500}],
                                           "$db": "app"})
    document = bson.encode({"b": b"x" * 200})
    sections = (struct.pack("<I", 0) + b"\x01" + struct.pack("<i", 4 + 5 + len(document))
                + b"docs\x00" + document + b"\x00" + bson.encode({"a": 1, "$db": "x"}))
    seq_first = struct.pack("<iiii", 16 + len(sections), 11, 0, wire.OP_MSG) + sections
    assert wire.decode_message(seq_first).sequences[0].identifier == "docs"
    auditor = ClientAuditor(max_message=100)
    events = pump(auditor, [huge_body.encode(), seq_first, wire.compress(big).encode()])
    assert events[0] == UnauditedMessageEvent(request_id=10, op_code=wire.OP_MSG,
                                              size=size(huge_body))
    assert isinstance(events[1], UnauditedMessageEvent)
    assert events[2].op_code == wire.OP_COMPRESSED


# --- the server's stream --------------------------------------------------------------------

OK_BATCH = OpMsg(request_id=20, response_to=2, body={
    "cursor": {"firstBatch": [{"secret": "y" * 50}] * 10, "id": bson.Int64(77),
               "ns": "app.users"}, "ok": 1.0})
DENIED = error_reply(FIND, "not authorized on app to execute command", "Unauthorized",
                     request_id=21)
EXHAUST_1 = OpMsg(request_id=22, response_to=5, body={"cursor": {"nextBatch": []}, "ok": 1},
                  more_to_come=True)
EXHAUST_ERR = OpMsg(request_id=23, response_to=22, body={
    "ok": 0, "errmsg": "cursor id 77 not found", "code": bson.Int64(43),
    "codeName": "CursorNotFound"}, checksum=True)
LEGACY_OK = OpReply(request_id=24, response_to=1, documents=[{"ismaster": True, "ok": 1.0}])
LEGACY_ERR = error_reply(HELLO, "no", 18, request_id=25)
NO_OK = OpMsg(request_id=26, response_to=6, body={"n": 1})
FLOAT_CODE = OpMsg(request_id=27, response_to=7, body={"ok": False, "code": 2.0,
                                                       "errmsg": 5})
SERVER = [OK_BATCH, DENIED, EXHAUST_1, EXHAUST_ERR, LEGACY_OK, LEGACY_ERR, NO_OK, FLOAT_CODE]
SERVER_STREAM = b"".join(m.encode() for m in SERVER)
SERVER_EVENTS = [
    ErrorReplyEvent(response_to=2, code=13, code_name="Unauthorized",
                    errmsg="not authorized on app to execute command", truncated=False),
    ErrorReplyEvent(response_to=22, code=43, code_name="CursorNotFound",
                    errmsg="cursor id 77 not found", truncated=False),
    ErrorReplyEvent(response_to=1, code=18, code_name="AuthenticationFailed", errmsg="no",
                    truncated=False),
    ErrorReplyEvent(response_to=7, code=2, code_name=None, errmsg="", truncated=False),
]


@pytest.mark.parametrize("how", FEEDS)
def test_server_errors_whole_or_bytewise(how: str) -> None:
    auditor = ServerAuditor()
    events = pump(auditor, split(SERVER_STREAM, how) + [b""])
    assert events == SERVER_EVENTS + [ConnectionClosed(clean=True)]


@pytest.mark.parametrize("how", FEEDS)
def test_server_trailing_data(how: str) -> None:
    auditor = ServerAuditor()
    events = pump(auditor, split(SERVER_STREAM + DENIED.encode()[:40], how) + [b""])
    assert events == SERVER_EVENTS + [ConnectionClosed(clean=False)]


def test_a_long_errmsg_is_cut_and_a_large_reply_is_a_success() -> None:
    long_error = error_reply(FIND, "e" * 3000, 13)
    late_ok = OpMsg(body={"cursor": {"firstBatch": [{"x": "z" * 1000}] * 100}, "ok": 0})
    auditor = ServerAuditor(max_text=100, max_reply=4096)
    events = pump(auditor, [long_error.encode(), late_ok.encode()])
    assert len(events) == 1 and events[0].errmsg == "e" * 100 and events[0].truncated


def test_compressed_replies() -> None:
    auditor = ServerAuditor(max_reply=2000)
    big_error = OpMsg(body={"ok": 0, "errmsg": "q" * 3000, "code": 13})
    events = pump(auditor, [wire.compress(DENIED).encode(), wire.compress(OK_BATCH).encode(),
                            wire.compress(big_error).encode(),
                            wire.compress(OK_BATCH, wire.Compressor.NOOP).encode()])
    assert events == SERVER_EVENTS[:1]
    noisy = OpMsg(body={"ok": 1, "b": bytes(range(256)) * 4})
    assert pump(ServerAuditor(max_reply=100), [wire.compress(noisy).encode()]) == []
    auditor = ServerAuditor()
    snappy = wire.OpCompressed(original_opcode=wire.OP_MSG, uncompressed_size=1,
                               compressor_id=3, payload=b"x")
    auditor.receive_data(snappy.encode())
    assert "zstd" in malformed(auditor.next_event).message


@pytest.mark.parametrize("raw, words", [
    (OpQuery(collection="a.$cmd", query={}).encode(), "server sent opCode 2004"),
    (struct.pack("<iiiiI", 20, 0, 0, wire.OP_MSG, 0), "shorter"),
    (struct.pack("<iiiiIB", 21, 0, 0, wire.OP_MSG, 4, 0), "required flag"),
    (struct.pack("<iiiiIBi", 25, 0, 0, wire.OP_MSG, 0, 0, 3), "below 5"),
    (struct.pack("<iiii", 0x7FFFFFFF, 0, 0, 1), "exceeds"),
])
def test_malformed_server_streams(raw: bytes, words: str) -> None:
    auditor = ServerAuditor()
    auditor.receive_data(raw)
    assert words in malformed(auditor.next_event).message


def test_a_reply_with_only_sequences_is_skipped() -> None:
    raw = struct.pack("<iiiiIB", 0, 0, 0, wire.OP_MSG, 0, 1) + struct.pack("<i", 6) + b"a\x00"
    raw = struct.pack("<i", len(raw)) + raw[4:]
    assert pump(ServerAuditor(), [raw]) == []


# --- fuzzing -----------------------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=300), st.booleans())
def test_random_streams_only_ever_raise_a_remote_error(data: bytes, server: bool) -> None:
    auditor = ServerAuditor(max_reply=64) if server else ClientAuditor(max_message=64)
    try:
        pump(auditor, [data, b""])
    except RemoteProtocolError:
        pass


@fuzz
@given(st.lists(st.sampled_from(CLIENT), max_size=6), st.integers(1, 50))
def test_any_split_of_a_client_stream_gives_the_same_events(messages: list[wire.Message],
                                                            step: int) -> None:
    raw = b"".join(m.encode() for m in messages)
    chunks = [raw[i : i + step] for i in range(0, len(raw), step)]
    expected = [CLIENT_EVENTS[CLIENT.index(m)] for m in messages]
    assert pump(ClientAuditor(), chunks + [b""]) == expected + [ConnectionClosed(clean=True)]


# --- real driver traffic -------------------------------------------------------------------


@pytest.mark.parametrize("name, stream", captured_streams(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_pymongo_session_is_audited(name: str, stream: bytes) -> None:
    events = pump(ClientAuditor(), split(stream, "bytewise") + [b""])
    assert events[-1] == ConnectionClosed(clean=True)
    commands = [e.command for e in events[:-1]]
    if len(commands) == 1:  # the monitoring connection: a hello
        assert commands[0].name == "ismaster"
        return
    assert [c.name for c in commands] == ["ismaster", "find", "insert", "update", "delete",
                                          "aggregate", "insert", "endSessions"]
    find, insert, update, delete, aggregate, unacknowledged = commands[1:7]
    assert find.filters == ({"age": {"$gt": "int32"}, "name": "string"},)
    assert (insert.collection, insert.documents) == ("users", 3)
    assert update.filters == ({"name": "string"},)
    assert delete.filters == ({"age": {"$lt": "int32"}},)
    assert aggregate.databases == {"app", "reports"} and aggregate.pipeline == ("$match", "$merge")
    assert events[6].more_to_come and not events[5].more_to_come
    assert "bob" not in repr(events) and "s" * 20 not in repr(events)


def test_bulk_write_namespaces_come_from_its_sequences() -> None:
    bulk = OpMsg(request_id=30, body={"bulkWrite": 1, "$db": "admin"}, sequences=[
        DocumentSequence(identifier="ops", documents=[{"insert": 0, "document": {"s": "x"}}] * 2),
        DocumentSequence(identifier="nsInfo", documents=[{"ns": "hr.salaries"}])])
    (event,) = pump(ClientAuditor(), [bulk.encode()])
    assert event.command.databases == {"admin", "hr"} and event.command.documents == 2


# --- the gate's read decodes only what it decides on ---------------------------------------

_leaf = st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none(), st.booleans(),
                  st.floats(allow_nan=False))
_tree = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text("$ab", max_size=3), inner, max_size=3)),
    max_leaves=15)
#: Bodies whose every field the view reads, or skips, or counts.
BODIES = [
    {"find": "t", "filter": {"_id": 1}, "limit": 1, "singleBatch": True,
     "lsid": {"id": bson.Binary(4, bytes(16))}, "$db": "app", "$readPreference": {"mode": "primaryPreferred"},
     "$clusterTime": {"clusterTime": bson.Timestamp(1, 2), "signature": {"hash": b"x" * 20, "keyId": 0}}},
    {"insert": "t", "documents": [{"a": 1}, {"b": "x" * 50}], "ordered": True, "$db": "app"},
    {"update": "t", "updates": [{"q": {"n": "bob"}, "u": {"$set": {"a": 1}}}], "$db": "app"},
    {"delete": "t", "deletes": [{"q": {"a": {"$lt": 3}}, "limit": 0}], "$db": "app"},
    {"aggregate": "t", "pipeline": [{"$match": {"x": 1}}, {"$out": {"db": "other", "coll": "o"}}],
     "cursor": {}, "$db": "app"},
    {"getMore": bson.Int64(1 << 40), "collection": "t", "batchSize": 10, "$db": "app"},
    {"explain": {"find": "t", "filter": {"a": 1}}, "verbosity": "queryPlanner", "$db": "app"},
    {"renameCollection": "a.b", "to": "c.d", "dropTarget": False, "$db": "admin"},
    {"bulkWrite": 1, "ops": [{"insert": 0, "document": {}}] * 3, "nsInfo": [{"ns": "hr.s"}], "$db": "admin"},
    {"mapReduce": "t", "map": bson.Code("f"), "reduce": bson.Code("g"), "out": {"replace": "o", "db": "x"},
     "query": {"a": 1}, "$db": "app"},
    {"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": b"n,,n=u,r=x", "$db": "admin"},
    {"count": "t", "query": {"a": {"$in": [1, 2]}}, "$db": "app"},
]


def _both_ways(body: dict) -> tuple[object, object]:
    """(the gate's Command, or its error; a full decode's, or its error)."""
    raw = OpMsg(request_id=9, body=body).encode()
    from protocols.framing import Frame
    from protocols.mongodb.audit import client_event
    from protocols.mongodb.commands import view_message

    def run(fn):
        try:
            return fn()
        except RemoteProtocolError as exc:
            return type(exc), exc.wire_hint
    gate = run(lambda: client_event(Frame(None, len(raw) - 4, raw[4:])).command)
    full = run(lambda: view_message(wire.decode_message(raw)))
    return gate, full


@pytest.mark.parametrize("body", BODIES, ids=lambda b: next(iter(b)))
def test_the_gates_read_is_the_full_decodes(body: dict) -> None:
    gate, full = _both_ways(body)
    assert isinstance(gate, Command) and gate == full


@fuzz
@given(st.dictionaries(st.sampled_from(["find", "aggregate", "update", "delete", "insert", "getMore",
                                        "explain", "filter", "pipeline", "updates", "deletes",
                                        "documents", "renameCollection", "to", "lsid", "limit"]),
                       _tree, min_size=1, max_size=5))
def test_any_body_reads_the_same_through_the_gate(body: dict) -> None:
    body["$db"] = "app"
    gate, full = _both_ways(body)
    if isinstance(full, Command) and isinstance(gate, Command) and full.name == "insert" and isinstance(
            body.get("documents"), int):
        return  # an int for documents: counted only from an array (nonsense either way)
    assert gate == full

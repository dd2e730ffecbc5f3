"""protocols.mongodb.commands: what a command is about, its filter shapes,
and the error replies drivers raise as their own exceptions."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import ErrorCode, RemoteProtocolError
from protocols.mongodb import bson, commands, wire
from protocols.mongodb.commands import Command, Namespace, error_reply, shape, view, view_message
from protocols.mongodb.wire import DocumentSequence, OpMsg, OpQuery, OpReply
from tests.unit.protocols.feeding import fuzz, malformed


def test_find_shows_its_filter_shape_never_values() -> None:
    cmd = view({"find": "users", "filter": {"age": {"$gt": 30}, "name": "bob",
                                            "$or": [{"a": 1.5}, {"b": None}]},
                "limit": 1, "$db": "app"})
    assert cmd == Command(name="find", database="app", collection="users",
                          filters=[{"age": {"$gt": "int32"}, "name": "string",
                                    "$or": [{"a": "double"}, {"b": "null"}]}])
    assert cmd.databases == {"app"} and not cmd.is_auth and "bob" not in repr(cmd)


def test_aggregate_stages_and_the_databases_it_writes_to() -> None:
    cmd = view({"aggregate": "orders", "pipeline": [
        {"$match": {"status": "A"}},
        {"$lookup": {"from": "users", "localField": "u", "foreignField": "_id", "as": "u"}},
        {"$lookup": {"from": {"db": "ref", "coll": "zips"}, "pipeline": [{"$match": {}}],
                     "as": "z"}},
        {"$unionWith": "archive"},
        {"$facet": {"x": [{"$unionWith": {"coll": "old", "pipeline": []}}]}},
        {"$merge": {"into": {"db": "reports", "coll": "daily"}}},
    ], "cursor": {}, "$db": "shop"})
    assert cmd.pipeline == ("$match", "$lookup", "$lookup", "$unionWith", "$facet", "$merge")
    assert cmd.filters == ({"status": "string"}, {})
    assert cmd.writes_to == (Namespace("reports", "daily"),)
    assert set(cmd.reads_from) == {Namespace("shop", "users"), Namespace("ref", "zips"),
                                   Namespace("shop", "archive"), Namespace("shop", "old")}
    assert cmd.databases == {"shop", "reports", "ref"}
    out = view({"aggregate": 1, "pipeline": [{"$out": "c"}], "$db": "a"})
    assert out.collection is None and out.writes_to == (Namespace("a", "c"),)
    out = view({"aggregate": "x", "pipeline": [{"$out": {"db": "b", "coll": "c"}},
                                               {"$merge": "same"}], "$db": "a"})
    assert out.writes_to == (Namespace("b", "c"), Namespace("a", "same"))
    assert str(Namespace("b", "c")) == "b.c" and str(Namespace("b")) == "b"


def test_writes_count_their_documents_from_a_sequence_or_the_body() -> None:
    insert = OpMsg(body={"insert": "t", "$db": "app"}, sequences=[
        DocumentSequence(identifier="documents", documents=[{"a": 1}] * 3)])
    assert view_message(insert).documents == 3
    assert view({"insert": "t", "documents": [{}, {}], "$db": "d"}).documents == 2
    assert view({"insert": "t", "$db": "d"}, {"documents": 7}).documents == 7
    update = view({"update": "t", "$db": "d"}, {"updates": [
        {"q": {"_id": 1}, "u": {"$set": {"x": 1}}}, {"q": {"n": {"$in": [1, "a"]}}, "u": {}}]})
    assert update.documents == 2
    assert update.filters == ({"_id": "int32"}, {"n": {"$in": ["int32", "string"]}})
    delete = view({"delete": "t", "deletes": [{"q": {"a": bson.Int64(1)}, "limit": 1}],
                   "$db": "d"})
    assert delete.filters == ({"a": "int64"},) and delete.documents == 1


@pytest.mark.parametrize("body, collection", [
    ({"getMore": bson.Int64(5), "collection": "users", "$db": "app"}, "users"),
    ({"killCursors": "users", "cursors": [bson.Int64(5)], "$db": "app"}, "users"),
    ({"count": "users", "query": {"a": 1}, "$db": "app"}, "users"),
    ({"ping": 1, "$db": "admin"}, None),
    ({"listCollections": 1, "$db": "app"}, None),
])
def test_the_collection_of_each_command(body: dict[str, Any], collection: str | None) -> None:
    assert view(body).collection == collection


def test_the_logical_session_and_the_cursor_a_command_names() -> None:
    uuid = bytes(range(16))
    got = view({"getMore": bson.Int64(7), "collection": "users", "lsid": {"id": bson.Binary(4, uuid)}, "$db": "app"})
    assert (got.lsid, got.cursor_id) == (uuid, 7)
    plain = view({"find": "users", "$db": "app"})
    assert (plain.lsid, plain.cursor_id) == (None, None)
    # Not a UUID (subtype 4, 16 bytes): not kept.
    for lsid in ({"id": bson.Binary(3, uuid)}, {"id": bson.Binary(4, b"short")}, {"id": "x"}, "x"):
        assert view({"find": "users", "lsid": lsid, "$db": "app"}).lsid is None
    assert view({"getMore": True, "collection": "users", "$db": "app"}).cursor_id is None


def test_explain_is_seen_through() -> None:
    cmd = view({"explain": {"find": "users", "filter": {"a": 1}}, "verbosity": "queryPlanner",
                "$db": "app"})
    assert (cmd.name, cmd.collection, cmd.filters) == ("explain", "users", ({"a": "int32"},))


def test_rename_collection_touches_both_databases() -> None:
    cmd = view({"renameCollection": "a.x", "to": "b.y", "$db": "admin"})
    assert cmd.databases == {"admin", "a", "b"}


def test_auth_commands_keep_the_mechanism_never_the_payload() -> None:
    cmd = view({"saslStart": 1, "mechanism": "SCRAM-SHA-256", "payload": b"n,,n=u,r=x",
                "$db": "admin"})
    assert cmd.is_auth and cmd.mechanism == "SCRAM-SHA-256" and "n=u" not in repr(cmd)
    assert view({"hello": 1, "$db": "admin"}).is_auth


def test_legacy_hello_on_admin_cmd() -> None:
    hello = OpQuery(collection="admin.$cmd", query={"isMaster": 1, "helloOk": True})
    assert view_message(hello) == Command(name="isMaster", database="admin", legacy=True)
    wrapped = OpQuery(collection="admin.$cmd",
                      query={"$query": {"ismaster": 1}, "$readPreference": {"mode": "primary"}})
    assert view_message(wrapped).name == "ismaster"
    err = malformed(view_message, OpQuery(collection="app.users", query={}))
    assert err.wire_hint == 352
    malformed(view_message, OpQuery(collection=".$cmd", query={"ping": 1}))


@pytest.mark.parametrize("body", [
    {}, {"find": "t"}, {"find": "t", "$db": 1},
    {"aggregate": "t", "pipeline": {}, "$db": "a"},
    {"aggregate": "t", "pipeline": [{"$match": {}, "$limit": 1}], "$db": "a"},
    {"aggregate": "t", "pipeline": [{"$out": 5}], "$db": "a"},
    {"aggregate": "t", "pipeline": [{"$out": {"db": "x"}}], "$db": "a"},
    {"aggregate": "t", "pipeline": [{"$lookup": "x"}], "$db": "a"},
])
def test_bodies_no_server_would_run(body: dict[str, Any]) -> None:
    assert malformed(view, body).wire_hint == 9


def test_deep_pipelines_are_refused() -> None:
    pipeline: list[Any] = []
    for _ in range(commands.MAX_SHAPE_DEPTH + 2):
        pipeline = [{"$facet": {"f": pipeline}}]
    malformed(view, {"aggregate": "t", "pipeline": pipeline, "$db": "a"})


def test_shapes_are_bounded() -> None:
    deep: Any = 1
    for _ in range(20):
        deep = {"a": deep}
    cut = shape(deep)
    for _ in range(commands.MAX_SHAPE_DEPTH):
        cut = cut["a"]
    assert cut == "..."
    assert shape([[[[[[[[[1]]]]]]]]]) == [[[[[[[["..."]]]]]]]]
    wide = shape({str(i): i for i in range(100)})
    assert len(wide) == commands.MAX_SHAPE_KEYS + 1 and wide["..."] == "..."
    assert shape(list(range(100)))[-1] == "..."
    many = view({"delete": "t", "deletes": [{"q": {}}] * 40, "$db": "d"})
    assert len(many.filters) == commands.MAX_FILTERS and many.filters_truncated


def test_error_replies_in_the_request_s_own_kind() -> None:
    request = OpMsg(request_id=41, body={"find": "t", "$db": "secret"})
    reply = error_reply(request, "role 'dev' may not use database 'secret'", "Unauthorized",
                        request_id=9)
    assert isinstance(reply, OpMsg) and reply.response_to == 41 and reply.request_id == 9
    assert reply.body == {"ok": 0.0, "errmsg": "role 'dev' may not use database 'secret'",
                          "code": 13, "codeName": "Unauthorized"}
    assert wire.decode_message(reply.encode()) == reply
    legacy = error_reply(OpQuery(request_id=3, collection="admin.$cmd", query={"isMaster": 1}),
                         "upstream down", 6)
    assert isinstance(legacy, OpReply) and legacy.response_to == 3
    assert legacy.documents[0]["codeName"] == "HostUnreachable"
    assert commands.error_document("x", 12345)["codeName"] == "UnknownError"


def test_every_dial_error_has_a_driver_code() -> None:
    for code in ErrorCode:
        assert commands.error_code_for(code) in commands.ERROR_CODES.values()
    assert commands.error_code_for(ErrorCode.ACCESS_DENIED) == 13
    assert commands.error_code_for(ErrorCode.UPSTREAM_UNREACHABLE) == 6


_leaf = st.one_of(st.integers(-5, 5), st.text(max_size=3), st.none(), st.booleans(),
                  st.floats(allow_nan=False))
_tree = st.recursive(_leaf, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text("$ab", max_size=3), inner, max_size=3)),
    max_leaves=15)


@fuzz
@given(st.dictionaries(st.sampled_from(["find", "aggregate", "update", "delete", "insert",
                                        "getMore", "explain", "filter", "pipeline", "updates",
                                        "deletes", "documents", "renameCollection", "to"]),
                       _tree, min_size=1, max_size=5), st.booleans())
def test_any_body_is_viewed_or_refused_remotely(body: dict[str, Any], with_db: bool) -> None:
    if with_db:
        body["$db"] = "app"
    try:
        cmd = view(body)
    except RemoteProtocolError:
        return
    assert cmd.database == "app"


def test_bulk_write_touches_every_namespace_it_names() -> None:
    body = {"bulkWrite": 1, "$db": "admin"}
    sequences = {"ops": [{"insert": 0, "document": {"a": 1}}, {"insert": 1, "document": {}}],
                 "nsInfo": [{"ns": "app.users"}, {"ns": "audit.log"}, "junk"]}
    cmd = view(body, sequences)
    assert cmd.writes_to == (Namespace("app", "users"), Namespace("audit", "log"))
    assert cmd.databases == {"admin", "app", "audit"} and cmd.documents == 2
    assert view({"bulkWrite": 1, "$db": "admin"}, {"ops": 5}).documents == 5
    assert view({"bulkWrite": 1, "ops": "x", "$db": "admin"}).documents == 0


@pytest.mark.parametrize("out, target", [
    ("results", Namespace("app", "results")),
    ({"replace": "r", "db": "other"}, Namespace("other", "r")),
    ({"merge": "m"}, Namespace("app", "m")),
    ({"db": "x", "sharded": True}, Namespace("x", None)),
    ({"inline": 1}, None),
])
def test_map_reduce_output(out: Any, target: Namespace | None) -> None:
    cmd = view({"mapReduce": "src", "map": bson.Code("f"), "reduce": bson.Code("g"), "out": out,
                "$db": "app"})
    assert cmd.writes_to == (() if target is None else (target,))


def test_rename_collection_without_a_dot() -> None:
    assert view({"renameCollection": "a", "to": "b.y", "$db": "admin"}).databases == {
        "admin", "a", "b"}

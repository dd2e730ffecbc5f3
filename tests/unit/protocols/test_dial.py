"""protocols.dial: the gateway <-> cluster dial exchange, fed every which way."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.dial import (
    DEFAULT_MAX_BUFFER_SIZE, DIAL_VERSION, MAX_FRAME, NEED_DATA, PAUSED, SUPPORTED_VERSIONS,
    DialAccept, DialConnection, DialError, DialRequest, Role, State, refusal_for,
)
from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from tests.unit.protocols.feeding import FEEDS, fuzz, split


REQUEST = DialRequest(resource="orders-db", params={"db_user": "alice", "db_name": "orders"},
                      client_addr="127.0.0.1:50123")
ACCEPT = DialAccept(session_id="3f0c2a", params={"server_version": "16.2"})
REFUSAL = DialError(code=ErrorCode.ACCESS_DENIED, message="role dev may not use db_user admin")


def frame(body: bytes | str | object, *, ftype: int = 1, version: int = DIAL_VERSION,
          length: int | None = None) -> bytes:
    """A hand-made frame: ``body`` as bytes, as text, or as JSON-encodable data."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    elif not isinstance(body, bytes):
        body = json.dumps(body).encode("utf-8")
    if length is None:
        length = 2 + len(body)
    return struct.pack(">IBB", length, version, ftype) + body




def pump(conn: DialConnection, chunks: Iterable[bytes]) -> list[object]:
    """Feed each chunk, draining next_event() after each; return the events."""
    events: list[object] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while (event := conn.next_event()) not in (NEED_DATA, PAUSED):
            events.append(event)
    return events


def first_error(conn: DialConnection, chunks: Iterable[bytes]) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        pump(conn, chunks)
    return info.value


def client_awaiting_answer() -> DialConnection:
    conn = DialConnection(Role.CLIENT)
    conn.send(REQUEST)
    return conn


def server_error(data: bytes, how: str = "whole") -> tuple[DialConnection, RemoteProtocolError]:
    conn = DialConnection(Role.SERVER)
    return conn, first_error(conn, split(data, how))


TRAILING = (b"", b"\x00\x00\x00\x08\x00\x03\x00\x00\x00\x00relayed bytes, not a dial frame")


# --- round trips ---------------------------------------------------------


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("trailing", TRAILING)
@pytest.mark.parametrize("eof", (False, True))
@pytest.mark.parametrize("request_", [
    REQUEST,
    DialRequest(resource="r"),
    DialRequest(resource="ssh-node-01", params={"login": "root"}, client_addr=""),
    DialRequest(resource="données", params={"db_name": "日本語", "k": "tab\tand \"quotes\"\x00"}),
])
def test_request_reaches_the_server(how: str, trailing: bytes, eof: bool,
                                    request_: DialRequest) -> None:
    client, server = DialConnection(Role.CLIENT), DialConnection(Role.SERVER)
    data = client.send(request_)
    assert client.states == {Role.CLIENT: State.AWAIT_ANSWER, Role.SERVER: State.SEND_ANSWER}
    chunks = split(data + trailing, how) + ([b""] if eof else [])
    assert pump(server, chunks) == [request_]
    assert server.states == client.states
    assert server.our_state is State.SEND_ANSWER and server.their_state is State.AWAIT_ANSWER
    assert server.trailing_data == (trailing, eof)
    assert server.next_event() is PAUSED  # and it stays that way


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("trailing", TRAILING)
@pytest.mark.parametrize("eof", (False, True))
@pytest.mark.parametrize("answer, end", [
    (ACCEPT, State.ACCEPTED),
    (DialAccept(session_id="s" * 128), State.ACCEPTED),
    (REFUSAL, State.REFUSED),
    (DialError(code=ErrorCode.RATE_LIMITED, message="", retry_after=2.5), State.REFUSED),
    (DialError(code=ErrorCode.UNSUPPORTED_VERSION, message="v", supported=(1, 2)), State.REFUSED),
    (DialError(code=ErrorCode.INTERNAL_ERROR, message="m", raw_code="quota_exceeded"),
     State.REFUSED),
])
def test_answer_reaches_the_client(how: str, trailing: bytes, eof: bool,
                                   answer: DialAccept | DialError, end: State) -> None:
    client, server = DialConnection(Role.CLIENT), DialConnection(Role.SERVER)
    assert pump(server, [client.send(REQUEST)]) == [REQUEST]
    data = server.send(answer)
    assert server.states == {Role.CLIENT: end, Role.SERVER: end}
    chunks = split(data + trailing, how) + ([b""] if eof else [])
    assert pump(client, chunks) == [answer]
    assert client.states == server.states
    assert client.trailing_data == (trailing, eof)


def test_encoding_is_compact_and_deterministic() -> None:
    data = DialConnection(Role.CLIENT).send(
        DialRequest(resource="pg", params={"db_user": "é"})
    )
    body = '{"resource":"pg","params":{"db_user":"é"},"client_addr":null}'.encode()
    assert data == struct.pack(">IBB", 2 + len(body), 1, 1) + body
    server = DialConnection(Role.SERVER)
    server.receive_data(data)
    server.next_event()
    refusal = server.send(DialError(code=ErrorCode.CERT_EXPIRED, message="log in again"))
    assert refusal[6:] == (b'{"code":"cert_expired","message":"log in again",'
                           b'"retry_after":null,"supported":[]}')


def test_unknown_keys_are_ignored_and_optional_keys_default() -> None:
    body = {"resource": "pg", "future_field": {"nested": [1, 2]}, "another": None}
    server = DialConnection(Role.SERVER)
    assert pump(server, [frame(body)]) == [DialRequest(resource="pg")]
    client = client_awaiting_answer()
    assert pump(client, [frame({"session_id": "x", "extra": 1}, ftype=2)]) == [
        DialAccept(session_id="x")
    ]
    client = client_awaiting_answer()
    assert pump(client, [frame({"code": "user_locked", "message": "locked"}, ftype=3)]) == [
        DialError(code=ErrorCode.USER_LOCKED, message="locked")
    ]


def test_unknown_error_code_is_kept_verbatim() -> None:
    client = client_awaiting_answer()
    [err] = pump(client, [frame({"code": "quota_exceeded", "message": "m"}, ftype=3)])
    assert isinstance(err, DialError)
    assert err.code is ErrorCode.INTERNAL_ERROR
    assert err.raw_code == err.wire_code == "quota_exceeded"
    # A relay can pass it on unchanged.
    server = DialConnection(Role.SERVER)
    pump(server, [DialConnection(Role.CLIENT).send(REQUEST)])
    assert b'"code":"quota_exceeded"' in server.send(err)
    assert REFUSAL.raw_code is None and REFUSAL.wire_code == "access_denied"


def test_whitespace_in_json_is_accepted() -> None:
    server = DialConnection(Role.SERVER)
    assert pump(server, [frame(' \n{ "resource" : "pg" }\t')]) == [DialRequest(resource="pg")]


# --- version rule ----------------------------------------------------------


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("version", (0, 2, 255))
@pytest.mark.parametrize("length", (2, 100, MAX_FRAME + 1, 2**32 - 1))
def test_unsupported_version_is_refused_in_version_1(how: str, version: int, length: int) -> None:
    # A hypothetical v2 request, perhaps bigger than v1 allows: the verdict is
    # "unsupported version" whatever its size and however it is chunked.
    data = frame({"resource": "pg"}, version=version)[:6] + b"{}"
    data = struct.pack(">I", length) + data[4:]
    server, err = server_error(data, how)
    assert err.code is ErrorCode.UNSUPPORTED_VERSION
    assert server.states == {Role.CLIENT: State.ERROR, Role.SERVER: State.SEND_REFUSAL}
    refusal = server.send(refusal_for(err))
    assert server.our_state is State.REFUSED
    # The refusal is a plain version-1 frame that any v1 client decodes.
    assert refusal[4] == 1 and refusal[5] == 3
    body = json.loads(refusal[6:])
    assert body["code"] == "unsupported_version" and body["supported"] == [1]
    [answer] = pump(client_awaiting_answer(), [refusal])
    assert answer == DialError(code=ErrorCode.UNSUPPORTED_VERSION, message=err.message,
                               supported=SUPPORTED_VERSIONS)
    # Exactly once.
    with pytest.raises(LocalProtocolError):
        server.send(refusal_for(err))


def test_client_rejects_an_answer_in_another_version() -> None:
    client = client_awaiting_answer()
    err = first_error(client, [frame({"session_id": "x"}, ftype=2, version=2)])
    assert err.code is ErrorCode.UNSUPPORTED_VERSION
    assert client.states == {Role.CLIENT: State.AWAIT_ANSWER, Role.SERVER: State.ERROR}
    with pytest.raises(LocalProtocolError):
        client.send(REQUEST)


# --- malformed frames ---------------------------------------------------------


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("length, message", [
    (0, "below the minimum"), (1, "below the minimum"),
    (MAX_FRAME + 1, "exceeds the maximum"), (2**32 - 1, "exceeds the maximum"),
])
def test_bad_lengths_fail_fast(how: str, length: int, message: str) -> None:
    # Only the 5-byte prefix is sent: no need to wait for a body that would
    # never fit (or does not exist).
    _, err = server_error(struct.pack(">IB", length, 1), how)
    assert err.code is ErrorCode.BAD_REQUEST and message in err.message


def test_largest_frame_is_accepted() -> None:
    padding = MAX_FRAME - 2 - len('{"resource":"r","pad":""}')
    body = '{"resource":"r","pad":"' + "x" * padding + '"}'
    data = frame(body)
    assert struct.unpack(">I", data[:4])[0] == MAX_FRAME
    assert pump(DialConnection(Role.SERVER), [data]) == [DialRequest(resource="r")]


@pytest.mark.parametrize("body, message", [
    (b"", "not valid UTF-8 JSON"),
    (b"{", "not valid UTF-8 JSON"),
    (b"\xff\xfe{}", "not valid UTF-8 JSON"),
    (b'{"resource":"pg"}{}', "not valid UTF-8 JSON"),
    ('\ufeff{"resource":"pg"}'.encode(), "not valid UTF-8 JSON"),
    (b'{"resource":"pg","x":NaN}', "NaN is not a JSON number"),
    (b'{"resource":"pg","x":Infinity}', "Infinity is not a JSON number"),
    (b'{"resource":"pg","x":-Infinity}', "-Infinity is not a JSON number"),
    (b'{"resource":"pg","resource":"other"}', "duplicate key"),
    (b'{"resource":"pg","params":{"a":"1","a":"2"}}', "duplicate key"),
    (b'{"resource":"pg","x":' + b"[" * 30_000 + b"]" * 30_000 + b"}", "not valid UTF-8 JSON"),
    (b'{"resource":"pg","x":' + b"9" * 5000 + b"}", "not valid UTF-8 JSON"),
    (b"[]", "must be a JSON object, not array"),
    (b'"pg"', "must be a JSON object, not string"),
    (b"12", "must be a JSON object, not number"),
    (b"null", "must be a JSON object, not null"),
])
def test_bad_json_is_refused(body: bytes, message: str) -> None:
    _, err = server_error(frame(body))
    assert err.code is ErrorCode.BAD_REQUEST
    assert message in err.message
    assert len(err.message) < 400  # parser explanations, never our input


@pytest.mark.parametrize("body, message", [
    ({}, "resource is missing"),
    ({"resource": 5}, "resource must be a string, not number"),
    ({"resource": None}, "resource must be a string, not null"),
    ({"resource": ""}, "resource must be 1..253 characters long, not 0"),
    ({"resource": "r" * 254}, "resource must be 1..253 characters long, not 254"),
    ({"resource": "\ud800"}, "resource is not valid Unicode text"),
    ({"resource": "r", "params": None}, "params must be a mapping of strings to strings, not null"),
    ({"resource": "r", "params": [["a", "b"]]}, "params must be a mapping"),
    ({"resource": "r", "params": {"a": 1}}, "params['a'] must be a string, not number"),
    ({"resource": "r", "params": {"a": True}}, "params['a'] must be a string, not boolean"),
    ({"resource": "r", "params": {"a": {}}}, "params['a'] must be a string, not object"),
    ({"resource": "r", "params": {"": "b"}}, "params key must be 1..64 characters long"),
    ({"resource": "r", "params": {"k" * 65: "b"}}, "params key must be 1..64 characters long"),
    ({"resource": "r", "params": {"a": "v" * 1025}}, "must be 0..1024 characters long"),
    ({"resource": "r", "params": {str(i): "" for i in range(33)}}, "at most 32 entries"),
    ({"resource": "r", "client_addr": 1}, "client_addr must be a string, not number"),
    ({"resource": "r", "client_addr": "a" * 129}, "client_addr must be 0..128 characters"),
])
def test_bad_request_fields_are_refused(body: dict, message: str) -> None:
    server, err = server_error(frame(body))
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.message.startswith("malformed DialRequest: ")
    assert message in err.message
    assert isinstance(err.__cause__, LocalProtocolError)
    # ... and the refusal tells the gateway why.
    refusal = refusal_for(err)
    assert refusal.code is ErrorCode.BAD_REQUEST and refusal.message == err.message
    assert server.send(refusal)


@pytest.mark.parametrize("ftype, body, message", [
    (2, {}, "session_id is missing"),
    (2, {"session_id": ""}, "session_id must be 1..128 characters long"),
    (2, {"session_id": 7}, "session_id must be a string, not number"),
    (2, {"session_id": "s", "params": "db=x"}, "params must be a mapping"),
    (3, {"message": "m"}, "code is missing"),
    (3, {"code": "access_denied"}, "message is missing"),
    (3, {"code": 403, "message": "m"}, "code must be a string, not number"),
    (3, {"code": "", "message": "m"}, "code must be 1..64 characters long"),
    (3, {"code": "c" * 65, "message": "m"}, "code must be 1..64 characters long"),
    (3, {"code": "access_denied", "message": "m" * 4097}, "message must be 0..4096"),
    (3, {"code": "access_denied", "message": ["m"]}, "message must be a string, not array"),
    (3, {"code": "rate_limited", "message": "", "retry_after": "5"}, "must be a number"),
    (3, {"code": "rate_limited", "message": "", "retry_after": True}, "not boolean"),
    (3, {"code": "rate_limited", "message": "", "retry_after": -1}, "non-negative"),
    (3, '{"code": "rate_limited", "message": "", "retry_after": 1e400}', "finite"),
    (3, {"code": "rate_limited", "message": "", "retry_after": 10**400}, "too large"),
    (3, {"code": "unsupported_version", "message": "", "supported": "1"}, "must be a list"),
    (3, {"code": "unsupported_version", "message": "", "supported": None}, "not null"),
    (3, {"code": "unsupported_version", "message": "", "supported": [True]}, "integers 0..255"),
    (3, {"code": "unsupported_version", "message": "", "supported": [256]}, "integers 0..255"),
    (3, {"code": "unsupported_version", "message": "", "supported": [1.0]}, "integers 0..255"),
    (3, {"code": "unsupported_version", "message": "", "supported": [1] * 257}, "at most 256"),
])
def test_bad_answer_fields_are_refused(ftype: int, body: dict | str, message: str) -> None:
    client = client_awaiting_answer()
    err = first_error(client, [frame(body, ftype=ftype)])
    assert err.code is ErrorCode.BAD_REQUEST
    assert message in err.message


@pytest.mark.parametrize("ftype", (0, 4, 255))
def test_unknown_frame_types_are_refused(ftype: int) -> None:
    _, err = server_error(frame({"resource": "pg"}, ftype=ftype))
    assert err.code is ErrorCode.BAD_REQUEST
    assert err.message == f"unknown dial frame type {ftype}"


@pytest.mark.parametrize("ftype, body", [
    (2, {"session_id": "s"}),
    (3, {"code": "access_denied", "message": "client cannot refuse"}),
])
def test_server_refuses_answers_from_the_client(ftype: int, body: dict) -> None:
    server, err = server_error(frame(body, ftype=ftype))
    assert err.code is ErrorCode.BAD_REQUEST
    assert "the client may not send" in err.message
    assert server.our_state is State.SEND_REFUSAL


def test_client_refuses_a_request_from_the_server() -> None:
    err = first_error(client_awaiting_answer(), [frame({"resource": "pg"})])
    assert "the server may not send DialRequest" in err.message


def test_client_refuses_an_answer_before_it_asked() -> None:
    client = DialConnection(Role.CLIENT)
    data = frame({"session_id": "s"}, ftype=2)
    assert pump(client, [data[:-1]]) == []  # incomplete: just wait
    err = first_error(client, [data[-1:]])
    assert "while the client is SEND_REQUEST" in err.message
    assert client.states == {Role.CLIENT: State.SEND_REQUEST, Role.SERVER: State.ERROR}
    with pytest.raises(LocalProtocolError):
        client.send(REQUEST)


# --- EOF -------------------------------------------------------------------


@pytest.mark.parametrize("how", FEEDS)
def test_eof_mid_frame(how: str) -> None:
    data = DialConnection(Role.CLIENT).send(REQUEST)
    for cut in range(1, len(data)):
        server = DialConnection(Role.SERVER)
        err = first_error(server, split(data[:cut], how) + [b""])
        assert err.code is ErrorCode.BAD_REQUEST
        assert "closed in the middle of a dial frame" in err.message
        total = "?" if cut < 5 else str(len(data))
        assert f"({cut} of {total} bytes)" in err.message


@pytest.mark.parametrize("role, peer", [(Role.SERVER, "client"), (Role.CLIENT, "server")])
def test_eof_before_anything(role: Role, peer: str) -> None:
    conn = DialConnection(role)
    if role is Role.CLIENT:
        conn.send(REQUEST)
    err = first_error(conn, [b""])
    assert err.message == f"the {peer} closed the connection before sending its dial frame"
    conn.receive_data(b"")  # a second EOF is harmless


def test_no_bytes_after_eof() -> None:
    server = DialConnection(Role.SERVER)
    server.receive_data(b"")
    with pytest.raises(LocalProtocolError, match="after EOF"):
        server.receive_data(b"late")


def test_eof_after_the_frame_is_fine() -> None:
    server = DialConnection(Role.SERVER)
    assert pump(server, [DialConnection(Role.CLIENT).send(REQUEST), b""]) == [REQUEST]
    assert server.trailing_data == (b"", True)


# --- poisoning and the buffer cap ----------------------------------------------


def test_errors_poison_the_connection() -> None:
    server, err = server_error(frame(b"not json"))
    for _ in range(2):
        with pytest.raises(RemoteProtocolError) as again:
            server.next_event()
        assert (again.value.code, again.value.message) == (err.code, err.message)
        assert again.value.__cause__ is err
    server.receive_data(DialConnection(Role.CLIENT).send(REQUEST))  # ignored
    with pytest.raises(RemoteProtocolError):
        server.next_event()
    with pytest.raises(RemoteProtocolError):
        server.trailing_data
    with pytest.raises(LocalProtocolError, match="may not send DialAccept"):
        server.send(ACCEPT)
    assert server.our_state is State.SEND_REFUSAL  # a failed send changes nothing
    server.send(refusal_for(err))
    assert server.states == {Role.CLIENT: State.ERROR, Role.SERVER: State.REFUSED}


def test_an_endless_frame_never_exceeds_the_cap() -> None:
    server = DialConnection(Role.SERVER, max_buffer_size=4 + MAX_FRAME)
    header = struct.pack(">IBB", MAX_FRAME, 1, 1)
    assert pump(server, [header, b" " * (MAX_FRAME - 3)]) == []
    err = first_error(server, [b"  "])  # one byte fits, two do not
    assert err.code is ErrorCode.BAD_REQUEST
    assert f"more than {4 + MAX_FRAME} bytes" in err.message
    assert server.our_state is State.SEND_REFUSAL


def test_too_much_trailing_data_poisons_too() -> None:
    server = DialConnection(Role.SERVER)
    pump(server, [DialConnection(Role.CLIENT).send(REQUEST)])
    server.receive_data(b"x" * DEFAULT_MAX_BUFFER_SIZE)  # the request itself no longer counts
    assert server.next_event() is PAUSED
    server.receive_data(b"y")
    with pytest.raises(RemoteProtocolError, match="more than"):
        server.next_event()
    with pytest.raises(RemoteProtocolError):
        server.trailing_data  # some of it was dropped: never hand out a partial stream
    assert server.states == {Role.CLIENT: State.ERROR, Role.SERVER: State.SEND_REFUSAL}
    with pytest.raises(LocalProtocolError):
        server.send(ACCEPT)
    server.send(DialError(code=ErrorCode.BAD_REQUEST, message="too much pipelined data"))


def test_buffer_cap_must_hold_a_frame() -> None:
    with pytest.raises(ValueError, match="one whole frame"):
        DialConnection(Role.SERVER, max_buffer_size=MAX_FRAME)
    with pytest.raises(TypeError, match="Role"):
        DialConnection("client")  # type: ignore[arg-type]


# --- sending -----------------------------------------------------------------


@pytest.mark.parametrize("role, prepare, event", [
    (Role.CLIENT, [], ACCEPT),
    (Role.CLIENT, [], REFUSAL),
    (Role.CLIENT, [REQUEST], REQUEST),
    (Role.SERVER, [], REQUEST),
    (Role.SERVER, [], ACCEPT),  # an answer before the question
    (Role.SERVER, [], REFUSAL),
])
def test_sending_out_of_turn(role: Role, prepare: list, event: object) -> None:
    conn = DialConnection(role)
    for earlier in prepare:
        conn.send(earlier)
    before = conn.states
    with pytest.raises(LocalProtocolError, match="may not send") as info:
        conn.send(event)  # type: ignore[arg-type]
    assert info.value.code is ErrorCode.INTERNAL_ERROR
    assert conn.states == before


@pytest.mark.parametrize("answer", [ACCEPT, REFUSAL])
def test_nothing_after_the_exchange(answer: DialAccept | DialError) -> None:
    client, server = DialConnection(Role.CLIENT), DialConnection(Role.SERVER)
    pump(server, [client.send(REQUEST)])
    pump(client, [server.send(answer)])
    for conn in (client, server):
        for event in (REQUEST, ACCEPT, REFUSAL):
            with pytest.raises(LocalProtocolError, match="the dial exchange is over"):
                conn.send(event)
        assert conn.next_event() is PAUSED


def test_send_rejects_non_events() -> None:
    with pytest.raises(LocalProtocolError, match="not bytes"):
        DialConnection(Role.CLIENT).send(b"raw")  # type: ignore[arg-type]


def test_an_event_too_large_to_frame_is_not_sent() -> None:
    # Each field is within its limit, but together they do not fit a frame.
    huge = DialRequest(resource="r", params={f"k{i}": "\U0001f600" * 1024 for i in range(32)})
    client = DialConnection(Role.CLIENT)
    with pytest.raises(LocalProtocolError, match="a dial frame holds at most 65536") as info:
        client.send(huge)
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert client.our_state is State.SEND_REQUEST
    assert client.send(REQUEST)  # nothing changed: a smaller request still goes


def test_trailing_data_only_after_the_frame() -> None:
    server = DialConnection(Role.SERVER)
    server.receive_data(b"\x00\x00")
    with pytest.raises(LocalProtocolError, match="before the peer's dial frame"):
        server.trailing_data


def test_reprs() -> None:
    conn = DialConnection(Role.CLIENT)
    assert repr(conn) == "<DialConnection client: client=SEND_REQUEST server=AWAIT_REQUEST>"
    assert repr(NEED_DATA) == str(NEED_DATA) == "NEED_DATA" and repr(PAUSED) == "PAUSED"
    assert repr(REQUEST) == ("DialRequest(resource='orders-db', params={'db_user': 'alice', "
                             "'db_name': 'orders'}, client_addr='127.0.0.1:50123')")


# --- events --------------------------------------------------------------------


def test_events_are_frozen_values() -> None:
    a = DialRequest(resource="pg", params={"a": "1", "b": "2"})
    b = DialRequest(resource="pg", params={"b": "2", "a": "1"})
    assert a == b and hash(a) == hash(b)
    assert a != DialRequest(resource="pg", params={"a": "1"})
    with pytest.raises(AttributeError):
        a.resource = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        a.params["a"] = "x"  # type: ignore[index]
    source = {"db_user": "alice"}
    c = DialRequest(resource="pg", params=source)
    source["db_user"] = "mallory"
    assert c.params == {"db_user": "alice"}  # a private copy
    assert dict(DialAccept(session_id="s").params) == {}
    assert DialError(code=ErrorCode.RATE_LIMITED, message="", retry_after=3).retry_after == 3.0
    versions = DialError(code=ErrorCode.UNSUPPORTED_VERSION, message="", supported=[1])
    assert versions.supported == (1,)
    with pytest.raises(TypeError):
        DialRequest("pg")  # type: ignore[misc]  # keyword-only


@pytest.mark.parametrize("build, message", [
    (lambda: DialRequest(resource=""), "resource must be 1..253"),
    (lambda: DialRequest(resource="r", params=[("a", "b")]), "params must be a mapping"),
    (lambda: DialRequest(resource="r", client_addr=b"1.2.3.4"), "client_addr must be a string"),
    (lambda: DialAccept(session_id=None), "session_id must be a string"),
    (lambda: DialError(code="access_denied", message=""), "code must be an ErrorCode"),
    (lambda: DialError(code=ErrorCode.ACCESS_DENIED, message=None), "message must be a string"),
    (lambda: DialError(code=ErrorCode.ACCESS_DENIED, message="", raw_code="x"),
     "raw_code is only for unknown codes"),
    (lambda: DialError(code=ErrorCode.INTERNAL_ERROR, message="", raw_code="access_denied"),
     "raw_code names a known code"),
    (lambda: DialError(code=ErrorCode.INTERNAL_ERROR, message="", raw_code=""),
     "raw_code must be 1..64"),
    (lambda: DialError(code=ErrorCode.RATE_LIMITED, message="", retry_after=float("nan")),
     "finite"),
])
def test_events_validate_on_construction(build: Callable[[], object], message: str) -> None:
    with pytest.raises(LocalProtocolError, match=message) as info:
        build()
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_refusal_for() -> None:
    assert refusal_for(RemoteProtocolError("garbled")) == DialError(
        code=ErrorCode.BAD_REQUEST, message="garbled"
    )
    assert refusal_for(RemoteProtocolError("v9?", code=ErrorCode.UNSUPPORTED_VERSION)) == DialError(
        code=ErrorCode.UNSUPPORTED_VERSION, message="v9?", supported=(1,)
    )
    assert refusal_for(LocalProtocolError("oops")).code is ErrorCode.INTERNAL_ERROR
    # Whatever the message, the refusal itself is always sendable.
    odd = refusal_for(RemoteProtocolError("x" * 10_000 + "\ud800"))
    assert len(odd.message) == 4096
    assert refusal_for(RemoteProtocolError("bad \ud800 text")).message == "bad ? text"


# --- property-based ------------------------------------------------------------

_text = st.text(max_size=40)
_params = st.dictionaries(st.text(min_size=1, max_size=64), st.text(max_size=64), max_size=32)
_requests = st.builds(
    DialRequest, resource=st.text(min_size=1, max_size=253), params=_params,
    client_addr=st.none() | st.text(max_size=128),
)
_codes = st.sampled_from(ErrorCode)
_errors = st.one_of(
    st.builds(DialError, code=_codes, message=st.text(max_size=4096),
              retry_after=st.none() | st.floats(min_value=0, allow_infinity=False),
              supported=st.lists(st.integers(0, 255), max_size=8)),
    st.builds(DialError, code=st.just(ErrorCode.INTERNAL_ERROR), message=_text,
              raw_code=st.text(min_size=1, max_size=64).filter(
                  lambda s: s not in {c.value for c in ErrorCode})),
)
_answers = st.one_of(
    st.builds(DialAccept, session_id=st.text(min_size=1, max_size=128), params=_params), _errors
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)]) if b > a]


@fuzz
@given(request_=_requests, answer=_answers, trailing_up=st.binary(max_size=64),
       trailing_down=st.binary(max_size=64), cuts_up=st.lists(st.integers(0, 10**6)),
       cuts_down=st.lists(st.integers(0, 10**6)), eof=st.booleans())
def test_any_valid_exchange_round_trips(request_: DialRequest, answer: DialAccept | DialError,
                                        trailing_up: bytes, trailing_down: bytes,
                                        cuts_up: list[int], cuts_down: list[int],
                                        eof: bool) -> None:
    client, server = DialConnection(Role.CLIENT), DialConnection(Role.SERVER)
    up = client.send(request_) + trailing_up
    assert pump(server, chunked(up, cuts_up) + ([b""] if eof else [])) == [request_]
    assert server.trailing_data == (trailing_up, eof)
    down = server.send(answer) + trailing_down
    assert pump(client, chunked(down, cuts_down)) == [answer]
    assert client.trailing_data == (trailing_down, False)
    assert client.states == server.states


def assert_only_remote_errors(conn: DialConnection, chunks: list[bytes], eof: bool) -> None:
    cap = DEFAULT_MAX_BUFFER_SIZE
    try:
        pump(conn, chunks + ([b""] if eof else []))
    except RemoteProtocolError as exc:
        assert isinstance(exc.code, ErrorCode)
        assert conn.their_state is State.ERROR
        if conn.our_role is Role.SERVER:
            # Whatever went wrong, the refusal can be sent.
            assert conn.send(refusal_for(exc))
        return
    if conn.next_event() is PAUSED:
        data, seen_eof = conn.trailing_data
        assert len(data) <= cap and seen_eof == eof


_junk = st.lists(st.binary(max_size=300), max_size=8)
_plausible = st.builds(  # a valid-looking prefix, then anything
    lambda n, v, t, rest: [struct.pack(">IBB", n, v, t), *rest],
    st.integers(0, 600), st.sampled_from([1, 1, 1, 2]), st.integers(0, 4), _junk,
)
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                max_size=4),
    max_leaves=12,
)
_field_names = st.sampled_from(["resource", "params", "client_addr", "session_id", "code",
                                "message", "retry_after", "supported", "other"])
_bodies = st.dictionaries(_field_names, _json_values | st.sampled_from(
    ["pg", "access_denied", "quota", ""]) | st.dictionaries(st.text(max_size=5),
                                                            st.text(max_size=5)), max_size=5)
_json_frames = st.builds(
    lambda t, body: [frame(json.dumps(body), ftype=t)], st.integers(1, 3), _bodies
)


@fuzz
@given(role=st.sampled_from(Role), asked=st.booleans(),
       chunks=_junk | _plausible | _json_frames, eof=st.booleans())
def test_random_input_only_ever_raises_remote_protocol_error(
    role: Role, asked: bool, chunks: list[bytes], eof: bool
) -> None:
    conn = DialConnection(role)
    if role is Role.CLIENT and asked:
        conn.send(REQUEST)
    assert_only_remote_errors(conn, chunks, eof)


def test_a_flood_in_one_read_is_capped() -> None:
    for role in Role:
        conn = DialConnection(role)
        conn.receive_data(b"\x00\x00\xff\xff\x01\x01" + b"\x00" * DEFAULT_MAX_BUFFER_SIZE)
        with pytest.raises(RemoteProtocolError, match="more than"):
            conn.next_event()

"""protocols.postgres.messages: message codec, startup packets, the frame splitter."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.postgres import messages as m
from protocols.postgres.messages import (
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET, SSL_REQUEST_CODE, Frame,
    FrameSplitter, SqlState,
)

fuzz = settings(derandomize=True, database=None, deadline=None, max_examples=300)


def startup_payload(params: bytes, version: int = m.PROTOCOL_3_0) -> bytes:
    return struct.pack(">I", version) + params


def malformed(fn, *args) -> RemoteProtocolError:  # type: ignore[no-untyped-def]
    with pytest.raises(RemoteProtocolError) as info:
        fn(*args)
    return info.value


# --- exact layouts (spec: "Message Formats") ----------------------------------------


def test_fixed_layouts() -> None:
    assert m.AuthenticationOk().encode() == b"R\x00\x00\x00\x08\x00\x00\x00\x00"
    assert m.AuthenticationCleartextPassword().encode() == b"R\x00\x00\x00\x08\x00\x00\x00\x03"
    assert m.AuthenticationMD5Password(salt=b"abcd").encode() == (
        b"R\x00\x00\x00\x0c\x00\x00\x00\x05abcd")
    assert m.ReadyForQuery().encode() == b"Z\x00\x00\x00\x05I"
    assert m.ReadyForQuery(status="T").encode() == b"Z\x00\x00\x00\x05T"
    assert m.ParameterStatus(name="a", value="b").encode() == b"S\x00\x00\x00\x08a\x00b\x00"
    assert m.BackendKeyData(process_id=7, secret_key=b"\x01\x02\x03\x04").encode() == (
        b"K\x00\x00\x00\x0c\x00\x00\x00\x07\x01\x02\x03\x04")
    assert m.SSLRequest().encode() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert m.GSSENCRequest().encode() == b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert m.CancelRequest(process_id=1, secret_key=b"kkkk").encode() == (
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x01kkkk")
    assert (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE) == (
        80877103, 80877104, 80877102)
    assert m.StartupMessage(parameters={"user": "u", "database": "d"}).encode() == (
        b"\x00\x00\x00\x1b\x00\x03\x00\x00user\x00u\x00database\x00d\x00\x00")
    assert m.NegotiateProtocolVersion(newest_minor=0, unrecognized=("_pq_.x",)).encode() == (
        b"v\x00\x00\x00\x13\x00\x00\x00\x00\x00\x00\x00\x01_pq_.x\x00")
    assert m.Terminate().encode() == b"X\x00\x00\x00\x04"
    assert m.PasswordMessage(password=b"pw").encode() == b"p\x00\x00\x00\x07pw\x00"
    assert m.SASLInitialResponse(mechanism="M", data=b"xy").encode() == (
        b"p\x00\x00\x00\x0cM\x00\x00\x00\x00\x02xy")
    assert m.SASLInitialResponse(mechanism="M").encode() == (
        b"p\x00\x00\x00\x0aM\x00\xff\xff\xff\xff")
    assert m.SASLResponse(data=b"z").encode() == b"p\x00\x00\x00\x05z"
    assert m.CopyInResponse(format=0, column_formats=(0, 0)).encode() == (
        b"G\x00\x00\x00\x0b\x00\x00\x02\x00\x00\x00\x00")


def test_error_response_fields_in_server_order() -> None:
    err = m.ErrorResponse.create(severity="FATAL", sqlstate="28000", message="no", detail="d",
                                 hint="h", P="3")
    assert err.encode() == (b"E\x00\x00\x00\x27"
                            b"SFATAL\x00VFATAL\x00C28000\x00Mno\x00Dd\x00Hh\x00P3\x00\x00")
    assert (err.severity, err.sqlstate, err.message, err.detail, err.hint) == (
        "FATAL", "28000", "no", "d", "h")
    notice = m.NoticeResponse.create(severity="WARNING", sqlstate="01000", message="w")
    assert notice.encode()[:1] == b"N" and notice.detail is None and notice.hint is None
    # Old servers send only the localized severity.
    assert m.ErrorResponse(fields={"S": "ERREUR"}).severity == "ERREUR"
    assert m.ErrorResponse(fields={}).severity is None


@pytest.mark.parametrize("kwargs", [
    {"severity": "NOTICE", "sqlstate": "28000", "message": "m"},  # not an error severity
    {"severity": "FATAL", "sqlstate": "2800", "message": "m"},
    {"severity": "FATAL", "sqlstate": "2800a", "message": "m"},
    {"severity": "FATAL", "sqlstate": "28000", "message": "m\x00"},
])
def test_error_response_validation(kwargs: dict[str, str]) -> None:
    with pytest.raises(LocalProtocolError):
        m.ErrorResponse.create(**kwargs)


def test_error_response_field_codes_are_single_characters() -> None:
    with pytest.raises(LocalProtocolError):
        m.ErrorResponse(fields={"SS": "x"})
    with pytest.raises(LocalProtocolError):
        m.ErrorResponse(fields={"é": "x"})


# --- refusals ---------------------------------------------------------------------


@pytest.mark.parametrize("code, sqlstate", [
    (ErrorCode.ACCESS_DENIED, "28000"),
    (ErrorCode.RESOURCE_NOT_FOUND, "3D000"),
    (ErrorCode.UPSTREAM_UNREACHABLE, "08006"),
    (ErrorCode.BAD_REQUEST, "08P01"),
    (ErrorCode.RATE_LIMITED, "53300"),
    (ErrorCode.UNSUPPORTED_VERSION, "0A000"),
    (ErrorCode.INTERNAL_ERROR, "XX000"),
])
def test_error_response_for_codes(code: ErrorCode, sqlstate: str) -> None:
    err = m.error_response_for(RemoteProtocolError("nope", code=code), hint="log in again")
    assert err.fields == {"S": "FATAL", "V": "FATAL", "C": sqlstate, "M": "nope",
                          "H": "log in again"}


def test_every_code_has_a_sqlstate() -> None:
    assert set(m.SQLSTATE_FOR_CODE) == set(ErrorCode)


def test_error_response_for_prefers_a_sqlstate_hint() -> None:
    exc = RemoteProtocolError("x", code=ErrorCode.BAD_REQUEST, wire_hint="53300")
    assert m.error_response_for(exc).sqlstate == "53300"
    # A hint that is not a SQLSTATE (a MySQL number, say) falls back to the code.
    exc = RemoteProtocolError("x", code=ErrorCode.ACCESS_DENIED, wire_hint=1045)
    assert m.error_response_for(exc).sqlstate == "28000"


def test_error_response_for_other_exceptions_hides_their_text() -> None:
    err = m.error_response_for(KeyError("secret"))
    assert err.sqlstate == "XX000" and "secret" not in (err.message or "")
    err = m.error_response_for(KeyError("x"), message="custom", detail="more")
    assert err.message == "custom" and err.detail == "more"
    err = m.error_response_for(LocalProtocolError("a\x00b"))
    assert err.message == "ab"
    err = m.error_response_for(LocalProtocolError(""))
    assert err.message == "internal error in the Wicket gateway"


@pytest.mark.parametrize("sqlstate, code", [
    ("28000", ErrorCode.ACCESS_DENIED),
    ("28P01", ErrorCode.ACCESS_DENIED),
    ("42501", ErrorCode.ACCESS_DENIED),
    ("3D000", ErrorCode.RESOURCE_NOT_FOUND),
    ("53300", ErrorCode.RATE_LIMITED),
    ("57P03", ErrorCode.UPSTREAM_UNREACHABLE),
    ("0A000", ErrorCode.UNSUPPORTED_VERSION),
    ("XX000", ErrorCode.INTERNAL_ERROR),
    (None, ErrorCode.INTERNAL_ERROR),
])
def test_error_code_for_sqlstate(sqlstate: str | None, code: ErrorCode) -> None:
    assert m.error_code_for_sqlstate(sqlstate) is code


def test_signals_print_their_names() -> None:
    assert repr(m.NEED_DATA) == str(m.NEED_DATA) == "NEED_DATA"
    assert repr(m.PAUSED) == "PAUSED"


def test_protocol_violation() -> None:
    exc = m.protocol_violation("bad")
    assert exc.code is ErrorCode.BAD_REQUEST and exc.wire_hint == SqlState.PROTOCOL_VIOLATION


# --- backend messages: round trips and malformed bodies -------------------------------------


BACKEND = [
    m.AuthenticationOk(),
    m.AuthenticationCleartextPassword(),
    m.AuthenticationMD5Password(salt=b"\x00\xff\x10\x20"),
    m.AuthenticationSASL(mechanisms=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
    m.AuthenticationSASL(mechanisms=()),
    m.AuthenticationSASLContinue(data=b"r=abc,s=c2FsdA==,i=4096"),
    m.AuthenticationSASLFinal(data=b"v=xyz"),
    m.AuthenticationOther(code=7),
    m.AuthenticationOther(code=8, data=b"gss token"),
    m.ParameterStatus(name="server_version", value="17.2"),
    m.ParameterStatus(name="application_name", value=""),
    m.BackendKeyData(process_id=4242, secret_key=b"\x00" * 4),
    m.BackendKeyData(process_id=2**32 - 1, secret_key=bytes(range(256))),
    m.ReadyForQuery(status="E"),
    m.ErrorResponse.create(severity="ERROR", sqlstate="42P01",
                           message='relation "x" does not exist', P="15"),
    m.NoticeResponse.create(severity="NOTICE", sqlstate="00000", message="héllo"),
    m.NegotiateProtocolVersion(newest_minor=2, unrecognized=("_pq_.a", "_pq_.b")),
    m.NegotiateProtocolVersion(),
    m.CommandComplete(tag="SELECT 1"),
    m.CopyInResponse(format=1, column_formats=(1, 1, 1)),
    m.CopyOutResponse(),
    m.CopyBothResponse(format=0, column_formats=(0,)),
]


@pytest.mark.parametrize("message", BACKEND, ids=lambda x: type(x).__name__)
def test_backend_round_trip(message: m.BackendMessage) -> None:
    data = message.encode()
    assert struct.unpack(">I", data[1:5])[0] == len(data) - 1
    assert m.decode_backend(data[:1], data[5:]) == message


def test_unmodelled_backend_types_decode_to_none() -> None:
    assert m.decode_backend(b"D", b"\x00\x00") is None
    assert m.decode_backend(b"T", b"") is None


@pytest.mark.parametrize("type_code, body", [
    (b"R", b""),  # no auth code
    (b"R", b"\x00\x00\x00\x00x"),  # trailing byte after AuthenticationOk
    (b"R", b"\x00\x00\x00\x05abc"),  # short md5 salt
    (b"R", b"\x00\x00\x00\x0aSCRAM-SHA-256\x00"),  # mechanism list without its terminator
    (b"S", b"name\x00value"),
    (b"S", b"\xff\x00v\x00"),  # not UTF-8
    (b"K", b"\x00\x00\x00\x01abc"),  # key too short
    (b"K", b"\x00\x00\x00\x01" + b"k" * 257),  # key too long
    (b"Z", b"X"),
    (b"Z", b""),
    (b"E", b"SERROR\x00"),  # no final terminator
    (b"E", b"Mmsg"),
    (b"v", b"\x00\x01\x00\x00\x00\x00\x00\x00"),  # minor > 65535
    (b"v", b"\x00\x00\x00\x00\x00\x00\x00\x02a\x00"),  # one name short
    (b"v", b"\x00\x00\x00\x00\x00\x00\x00\x01\x00"),  # empty option name
    (b"v", b"\x00\x00\x00\x00\xff\xff\xff\xff"),  # absurd count
    (b"C", b"SELECT 1"),
    (b"G", b"\x02\x00\x00"),  # format 2
    (b"G", b"\x00\x00\x01\x00\x05"),  # column format 5
    (b"H", b"\x00\x00\x02\x00\x00"),  # one column format short
])
def test_malformed_backend_bodies(type_code: bytes, body: bytes) -> None:
    err = malformed(m.decode_backend, type_code, body)
    assert err.code is ErrorCode.BAD_REQUEST and err.wire_hint == "08P01"


# --- frontend messages --------------------------------------------------------------


FRONTEND = [
    m.Query(text="select 1; select 2"),
    m.Query(text=""),
    m.Parse(statement="s1", text="select $1::int, $2", param_types=(23, 0)),
    m.Parse(statement="", text="select 1"),
    m.Bind(portal="p", statement="s1", param_formats=(0, 1), values=(b"42", None),
           result_formats=(1,)),
    m.Bind(portal="", statement=""),
    m.Execute(portal="p", max_rows=10),
    m.Execute(),
    m.Describe(kind="S", name="s1"),
    m.Close(kind="P"),
    m.Sync(),
    m.Flush(),
    m.CopyData(data=b"1\t2\n"),
    m.CopyDone(),
    m.CopyFail(message="aborted by user"),
    m.FunctionCall(oid=952, arg_formats=(1,), args=(b"\x00\x00\x00\x01", None), result_format=1),
    m.Terminate(),
]


@pytest.mark.parametrize("message", FRONTEND, ids=lambda x: type(x).__name__)
def test_frontend_round_trip(message: m.FrontendMessage) -> None:
    data = message.encode()
    assert data[:1] in m.FRONTEND_TYPES
    assert m.decode_frontend(data[:1], data[5:]) == message


@pytest.mark.parametrize("type_code, body", [
    (b"?", b""),
    (b"p", b"secret\x00"),  # password messages are the auth exchange's to decode
    (b"Q", b"select 1"),
    (b"Q", b"a\x00b\x00"),
    (b"B", b"\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x00"),  # 2 formats, 0 params
    (b"B", b"\x00\x00\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),  # length -2
    (b"B", b"\x00\x00\x00\x01\x00\x02\x00\x00\x00\x00"),  # format 2
    (b"D", b"X\x00"),
    (b"S", b"x"),
    (b"E", b"\x00\x00\x00"),
])
def test_malformed_frontend_bodies(type_code: bytes, body: bytes) -> None:
    err = malformed(m.decode_frontend, type_code, body)
    assert err.wire_hint == "08P01"


def test_secrets_stay_out_of_reprs() -> None:
    assert "hunter2" not in repr(m.PasswordMessage(password=b"hunter2"))
    assert "topsecret" not in repr(m.SASLResponse(data=b"topsecret"))
    assert "kkkk" not in repr(m.CancelRequest(process_id=1, secret_key=b"kkkk"))
    assert "kkkk" not in repr(m.BackendKeyData(process_id=1, secret_key=b"kkkk"))
    assert "<3 bytes>" in repr(m.CopyData(data=b"abc"))


@pytest.mark.parametrize("build", [
    lambda: m.Query(text="a\x00"),
    lambda: m.Query(text=1),
    lambda: m.Query(text="\ud800"),
    lambda: m.PasswordMessage(password="str"),
    lambda: m.PasswordMessage(password=b"a\x00b"),
    lambda: m.ReadyForQuery(status="X"),
    lambda: m.BackendKeyData(process_id=-1, secret_key=b"kkkk"),
    lambda: m.BackendKeyData(process_id=True, secret_key=b"kkkk"),
    lambda: m.BackendKeyData(process_id=1, secret_key=b"k"),
    lambda: m.CancelRequest(process_id=1, secret_key=b"k" * 257),
    lambda: m.AuthenticationMD5Password(salt=b"abc"),
    lambda: m.AuthenticationSASL(mechanisms="SCRAM"),
    lambda: m.AuthenticationSASL(mechanisms=("",)),
    lambda: m.AuthenticationSASL(mechanisms=("\udcff",)),
    lambda: m.StartupMessage(parameters={"database": "d"}),
    lambda: m.StartupMessage(parameters={"user": ""}),
    lambda: m.StartupMessage(parameters=[("user", "u")]),
    lambda: m.StartupMessage(parameters={"user": "u", "": "x"}),
    lambda: m.StartupMessage(parameters={"user": "u", "k": None}),
    lambda: m.StartupMessage(parameters={"user": "u", "k": "\ud800"}),
    lambda: m.StartupMessage(parameters={"user": "u"}, major=70000),
    lambda: m.Describe(kind="X"),
    lambda: m.Bind(portal="", statement="", param_formats=(2,)),
    lambda: m.Bind(portal="", statement="", param_formats=[True]),
    lambda: m.Bind(portal="", statement="", param_formats="01"),
    lambda: m.Bind(portal="", statement="", param_formats=(0,) * 65536),
    lambda: m.Bind(portal="", statement="", values=("text",)),
    lambda: m.Bind(portal="", statement="", values=b"abc"),
    lambda: m.Parse(statement="", text="", param_types=(-1,)),
    lambda: m.CopyData(data="x"),
    lambda: m.NegotiateProtocolVersion(unrecognized=("a\x00",)),
])
def test_invalid_messages_cannot_be_built(build) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(LocalProtocolError):
        build()


def test_startup_message_too_large_to_send() -> None:
    msg = m.StartupMessage(parameters={"user": "u", "options": "x" * MAX_STARTUP_PACKET})
    with pytest.raises(LocalProtocolError):
        msg.encode()


# --- untyped startup packets ------------------------------------------------------------


def test_decode_startup_message_and_properties() -> None:
    params = (b"user\x00alice\x00application_name\x00psql\x00options\x00-c geqo=off\x00"
              b"replication\x00database\x00_pq_.foo\x00bar\x00\x00")
    msg = m.decode_startup_packet(startup_payload(params, (3 << 16) | 2))
    assert isinstance(msg, m.StartupMessage)
    assert (msg.major, msg.minor, msg.user, msg.database) == (3, 2, "alice", "alice")
    assert msg.application_name == "psql" and msg.options == "-c geqo=off"
    assert msg.replication == "database"
    assert dict(msg.protocol_options) == {"_pq_.foo": "bar"}
    assert list(msg.parameters) == ["user", "application_name", "options", "replication",
                                    "_pq_.foo"]
    # Round trip through encode().
    assert m.decode_startup_packet(msg.encode()[4:]) == msg
    plain = m.decode_startup_packet(startup_payload(b"user\x00u\x00database\x00db\x00\x00"))
    assert isinstance(plain, m.StartupMessage)
    assert plain.database == "db" and plain.application_name is None
    assert plain.options is None and plain.replication is None and not plain.protocol_options


def test_decode_requests() -> None:
    assert m.decode_startup_packet(m.SSLRequest().encode()[4:]) == m.SSLRequest()
    assert m.decode_startup_packet(m.GSSENCRequest().encode()[4:]) == m.GSSENCRequest()
    for key in (b"abcd", bytes(range(256)), b"\x00" * 32):
        cancel = m.CancelRequest(process_id=99, secret_key=key)
        assert m.decode_startup_packet(cancel.encode()[4:]) == cancel


@pytest.mark.parametrize("payload, sqlstate", [
    (b"", "08P01"),
    (b"\x00\x03", "08P01"),
    (struct.pack(">I", SSL_REQUEST_CODE) + b"x", "08P01"),
    (struct.pack(">I", GSSENC_REQUEST_CODE) + b"x", "08P01"),
    (struct.pack(">II", CANCEL_REQUEST_CODE, 1) + b"abc", "08P01"),
    (struct.pack(">II", CANCEL_REQUEST_CODE, 1) + b"k" * 257, "08P01"),
    (struct.pack(">I", CANCEL_REQUEST_CODE), "08P01"),
    (startup_payload(b"user\x00u\x00", 2 << 16), "0A000"),
    (startup_payload(b"user\x00u\x00\x00", 4 << 16), "0A000"),
    (startup_payload(b"user\x00u\x00\x00", (1234 << 16) | 5681), "0A000"),
    (startup_payload(b"user\x00u\x00"), "08P01"),  # no final terminator
    (startup_payload(b"user\x00u"), "08P01"),
    (startup_payload(b"user\x00u\x00\x00extra"), "08P01"),
    (startup_payload(b"user\x00u\x00user\x00v\x00\x00"), "08P01"),  # duplicate
    (startup_payload(b"user\x00\xff\x00\x00"), "08P01"),  # not UTF-8
    (startup_payload(b"database\x00d\x00\x00"), "28000"),  # no user
    (startup_payload(b"user\x00\x00\x00"), "28000"),  # empty user
    (startup_payload(b"\x00"), "28000"),
])
def test_bad_startup_packets(payload: bytes, sqlstate: str) -> None:
    err = malformed(m.decode_startup_packet, payload)
    assert err.wire_hint == sqlstate
    expected = {"08P01": ErrorCode.BAD_REQUEST, "0A000": ErrorCode.UNSUPPORTED_VERSION,
                "28000": ErrorCode.ACCESS_DENIED}[sqlstate]
    assert err.code is expected


def test_parse_ssl_answer() -> None:
    assert m.parse_ssl_answer(b"S") is True
    assert m.parse_ssl_answer(b"N") is False
    assert m.parse_ssl_answer(b"G", gssenc=True) is True
    assert m.parse_ssl_answer(b"N", gssenc=True) is False
    for bad in (b"E", b"", b"SN", b"G"):
        malformed(m.parse_ssl_answer, bad)
    malformed(lambda: m.parse_ssl_answer(b"S", gssenc=True))


def test_backend_key_matches_cancel() -> None:
    key = m.BackendKeyData(process_id=5, secret_key=b"abcd")
    assert key.matches(m.CancelRequest(process_id=5, secret_key=b"abcd"))
    assert not key.matches(m.CancelRequest(process_id=5, secret_key=b"abce"))
    assert not key.matches(m.CancelRequest(process_id=6, secret_key=b"abcd"))


# --- the frame splitter --------------------------------------------------------------------


def keep_all(_type: bytes, size: int) -> int:
    return size


def split_all(splitter: FrameSplitter, chunks: list[bytes]) -> list[Frame]:
    return [frame for chunk in chunks for frame in splitter.feed(chunk)]


STREAM = b"".join(x.encode() for x in FRONTEND)


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_splitter_yields_every_message(how: str) -> None:
    chunks = [STREAM] if how == "whole" else [STREAM[i : i + 1] for i in range(len(STREAM))]
    splitter = FrameSplitter(keep_all)
    frames = split_all(splitter, chunks)
    assert splitter.at_boundary
    assert [m.decode_frontend(f.type_code, f.body) for f in frames] == FRONTEND
    assert all(f.complete for f in frames)


def test_splitter_keeps_only_what_is_asked_for() -> None:
    big = m.CopyData(data=b"x" * 100_000).encode()
    query = m.Query(text="y" * 50).encode()
    splitter = FrameSplitter(lambda t, n: 10 if t == b"Q" else 0)
    frames = split_all(splitter, [big[:3], big[3:70_000], big[70_000:] + query[:7], query[7:]])
    assert frames == [Frame(b"d", 100_000, b""), Frame(b"Q", 51, b"y" * 10)]
    assert not frames[1].complete and splitter.at_boundary
    # A policy asking for more than the body, or a negative amount, is clamped.
    frames = split_all(FrameSplitter(lambda t, n: n + 100), [query])
    assert frames[0].complete
    frames = split_all(FrameSplitter(lambda t, n: -5), [query])
    assert frames == [Frame(b"Q", 51, b"")]


def test_splitter_is_mid_message_between_chunks() -> None:
    splitter = FrameSplitter(keep_all)
    assert split_all(splitter, [b"Q\x00"]) == [] and not splitter.at_boundary
    assert split_all(splitter, [b"\x00\x00\x06a"]) == [] and not splitter.at_boundary
    assert split_all(splitter, [b"\x00"]) == [Frame(b"Q", 2, b"a\x00")]


@pytest.mark.parametrize("length", [0, 3, 2**31, 2**32 - 1, m.MAX_MESSAGE_LENGTH + 1])
def test_splitter_rejects_bad_lengths(length: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        split_all(FrameSplitter(keep_all), [b"Q" + struct.pack(">I", length)])
    assert info.value.wire_hint == "08P01"


def test_splitter_custom_max_length() -> None:
    splitter = FrameSplitter(keep_all, max_length=100)
    assert len(split_all(splitter, [m.Query(text="a" * 90).encode()])) == 1
    with pytest.raises(RemoteProtocolError):
        split_all(splitter, [m.Query(text="a" * 96).encode()])


def test_splitter_accepts_memoryview_and_bytearray() -> None:
    data = m.Sync().encode() + m.Flush().encode()
    assert len(split_all(FrameSplitter(keep_all), [bytearray(data)])) == 2
    assert len(split_all(FrameSplitter(keep_all), [memoryview(data)])) == 2


@fuzz
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_splitter_any_chunking(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in zip(bounds, bounds[1:])]
    frames = split_all(FrameSplitter(lambda t, n: min(n, 3)), chunks)
    assert frames == split_all(FrameSplitter(lambda t, n: min(n, 3)), [STREAM])
    assert len(frames) == len(FRONTEND)


# --- fuzzing: bad input only ever raises RemoteProtocolError ---------------------------------


@fuzz
@given(type_code=st.sampled_from([bytes([c]) for c in b"RSKZEvNCGHWD?"]),
       body=st.binary(max_size=64))
def test_fuzz_decode_backend(type_code: bytes, body: bytes) -> None:
    try:
        m.decode_backend(type_code, body)
    except RemoteProtocolError:
        pass


@fuzz
@given(type_code=st.sampled_from(sorted(m.FRONTEND_TYPES) + [b"?"]), body=st.binary(max_size=64))
def test_fuzz_decode_frontend(type_code: bytes, body: bytes) -> None:
    try:
        m.decode_frontend(type_code, body)
    except RemoteProtocolError:
        pass


@fuzz
@given(payload=st.one_of(
    st.binary(max_size=64),
    st.binary(max_size=64).map(lambda b: struct.pack(">I", m.PROTOCOL_3_0) + b),
    st.binary(max_size=64).map(lambda b: struct.pack(">I", CANCEL_REQUEST_CODE) + b),
    st.lists(st.sampled_from([b"user", b"database", b"\x00", b"x", b"\xff", b"_pq_.a"]),
             max_size=12).map(lambda p: struct.pack(">I", m.PROTOCOL_3_0) + b"".join(p)),
))
def test_fuzz_decode_startup_packet(payload: bytes) -> None:
    try:
        m.decode_startup_packet(payload)
    except RemoteProtocolError:
        pass


@fuzz
@given(data=st.binary(max_size=200), cut=st.integers(min_value=0, max_value=200))
def test_fuzz_splitter(data: bytes, cut: int) -> None:
    splitter = FrameSplitter(lambda t, n: n if t == b"Q" else 2)
    try:
        split_all(splitter, [data[:cut], data[cut:]])
    except RemoteProtocolError:
        pass


def test_replication_requested_reads_the_parameter_as_postgresql_does():
    from protocols.postgres import replication_requested

    assert not any(replication_requested(v) for v in (None, "false", "OFF", "no", "0"))
    assert all(replication_requested(v) for v in ("true", "on", "database", "1", "yes"))

"""protocols.postgres.messages.backend: backend messages, decode_backend, refusals."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.postgres import messages as m
from tests.unit.protocols.feeding import fuzz, malformed

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
    assert m.NegotiateProtocolVersion(newest_minor=0, unrecognized=("_pq_.x",)).encode() == (
        b"v\x00\x00\x00\x13\x00\x00\x00\x00\x00\x00\x00\x01_pq_.x\x00")
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


def test_backend_key_matches_cancel() -> None:
    key = m.BackendKeyData(process_id=5, secret_key=b"abcd")
    assert key.matches(m.CancelRequest(process_id=5, secret_key=b"abcd"))
    assert not key.matches(m.CancelRequest(process_id=5, secret_key=b"abce"))
    assert not key.matches(m.CancelRequest(process_id=6, secret_key=b"abcd"))


@fuzz
@given(type_code=st.sampled_from([bytes([c]) for c in b"RSKZEvNCGHWD?"]),
       body=st.binary(max_size=64))
def test_fuzz_decode_backend(type_code: bytes, body: bytes) -> None:
    try:
        m.decode_backend(type_code, body)
    except RemoteProtocolError:
        pass

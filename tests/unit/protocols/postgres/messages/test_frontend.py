"""protocols.postgres.messages.frontend: frontend messages and decode_frontend."""

from __future__ import annotations


import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import RemoteProtocolError
from protocols.postgres import messages as m
from tests.unit.protocols.feeding import fuzz, malformed

def test_fixed_layouts() -> None:
    assert m.Terminate().encode() == b"X\x00\x00\x00\x04"
    assert m.PasswordMessage(password=b"pw").encode() == b"p\x00\x00\x00\x07pw\x00"
    assert m.SASLInitialResponse(mechanism="M", data=b"xy").encode() == (
        b"p\x00\x00\x00\x0cM\x00\x00\x00\x00\x02xy")
    assert m.SASLInitialResponse(mechanism="M").encode() == (
        b"p\x00\x00\x00\x0aM\x00\xff\xff\xff\xff")
    assert m.SASLResponse(data=b"z").encode() == b"p\x00\x00\x00\x05z"


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


@fuzz
@given(type_code=st.sampled_from(sorted(m.FRONTEND_TYPES) + [b"?"]), body=st.binary(max_size=64))
def test_fuzz_decode_frontend(type_code: bytes, body: bytes) -> None:
    try:
        m.decode_frontend(type_code, body)
    except RemoteProtocolError:
        pass

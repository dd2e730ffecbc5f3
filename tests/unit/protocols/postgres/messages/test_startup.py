"""protocols.postgres.messages.startup: the untyped startup-phase packets."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.postgres import messages as m
from tests.unit.protocols.feeding import fuzz, malformed
from protocols.postgres.messages import (
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET, SSL_REQUEST_CODE,
)

def startup_payload(params: bytes, version: int = m.PROTOCOL_3_0) -> bytes:
    return struct.pack(">I", version) + params


def test_fixed_layouts() -> None:
    assert m.SSLRequest().encode() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert m.GSSENCRequest().encode() == b"\x00\x00\x00\x08\x04\xd2\x16\x30"
    assert m.CancelRequest(process_id=1, secret_key=b"kkkk").encode() == (
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x00\x01kkkk")
    assert (SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE) == (
        80877103, 80877104, 80877102)
    assert m.StartupMessage(parameters={"user": "u", "database": "d"}).encode() == (
        b"\x00\x00\x00\x1b\x00\x03\x00\x00user\x00u\x00database\x00d\x00\x00")


def test_startup_message_too_large_to_send() -> None:
    msg = m.StartupMessage(parameters={"user": "u", "options": "x" * MAX_STARTUP_PACKET})
    with pytest.raises(LocalProtocolError):
        msg.encode()


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


def test_replication_requested_reads_the_parameter_as_postgresql_does():
    from protocols.postgres import replication_requested

    assert not any(replication_requested(v) for v in (None, "false", "OFF", "no", "0"))
    assert all(replication_requested(v) for v in ("true", "on", "database", "1", "yes"))

"""protocols.postgres.frontend: the gateway reading a client's startup, and the
startup relay that swaps BackendKeyData."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.postgres import messages as m
from protocols.postgres.frontend import (
    DirectTLS, StartupConnection, StartupRelay, State, negotiation_for,
)
from protocols.postgres.messages import NEED_DATA, PAUSED, ConnectionClosed
from tests.unit.protocols.feeding import FEEDS, fuzz, split


STARTUP = m.StartupMessage(parameters={"user": "alice", "database": "orders",
                                       "application_name": "psql", "client_encoding": "UTF8"})
TRAILING = (b"", m.Query(text="select 1").encode())




def pump(conn: StartupConnection, chunks: Iterable[bytes]) -> list[object]:
    events: list[object] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            event = conn.next_event()
            if event in (NEED_DATA, PAUSED):
                break
            events.append(event)
            if isinstance(event, ConnectionClosed):
                break
    return events


def error_of(conn: StartupConnection, chunks: Iterable[bytes]) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        pump(conn, chunks)
    assert conn.state is State.ERROR
    return info.value


# --- the happy paths -------------------------------------------------------------------


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("trailing", TRAILING)
@pytest.mark.parametrize("eof", (False, True))
def test_plain_startup(how: str, trailing: bytes, eof: bool) -> None:
    conn = StartupConnection()
    chunks = split(STARTUP.encode() + trailing, how) + ([b""] if eof else [])
    assert pump(conn, chunks) == [STARTUP]
    assert conn.state is State.DONE and not conn.tls
    assert conn.trailing_data == (trailing, eof)
    assert conn.next_event() is PAUSED


@pytest.mark.parametrize("how", FEEDS)
def test_gss_refused_then_ssl_accepted(how: str) -> None:
    conn = StartupConnection()
    assert pump(conn, split(m.GSSENCRequest().encode(), how)) == [m.GSSENCRequest()]
    assert conn.state is State.GSS_ANSWER_DUE and conn.next_event() is PAUSED
    assert conn.answer_gssenc() == b"N"
    assert pump(conn, split(m.SSLRequest().encode(), how)) == [m.SSLRequest()]
    assert conn.answer_ssl(accept=True) == b"S"
    assert conn.tls and conn.state is State.AWAIT_PACKET
    # The caller now runs TLS and feeds what it decrypts.
    assert pump(conn, split(STARTUP.encode(), how)) == [STARTUP]


def test_ssl_refused_then_plain_startup() -> None:
    conn = StartupConnection()
    assert pump(conn, [m.SSLRequest().encode()]) == [m.SSLRequest()]
    assert conn.answer_ssl(accept=False) == b"N"
    assert not conn.tls
    # libpq with gssencmode=prefer may still ask for GSS after SSL was refused.
    assert pump(conn, [m.GSSENCRequest().encode()]) == [m.GSSENCRequest()]
    assert conn.answer_gssenc() == b"N"
    assert pump(conn, [STARTUP.encode()]) == [STARTUP]


@pytest.mark.parametrize("how", FEEDS)
def test_cancel_request(how: str) -> None:
    cancel = m.CancelRequest(process_id=1234, secret_key=b"\x01\x02\x03\x04")
    conn = StartupConnection()
    assert pump(conn, split(cancel.encode(), how)) == [cancel]
    assert conn.state is State.DONE
    # Protocol 3.2 keys are longer.
    long_key = m.CancelRequest(process_id=1, secret_key=bytes(range(256)))
    assert pump(StartupConnection(), [long_key.encode()]) == [long_key]


@pytest.mark.parametrize("first", [b"\x16", b"\x16\x03", b"\x16\x03\x01\x02\x00\x01"])
def test_direct_tls(first: bytes) -> None:
    conn = StartupConnection()
    assert pump(conn, [first]) == [DirectTLS()]
    assert conn.state is State.DIRECT_TLS_DUE and conn.next_event() is PAUSED
    assert conn.trailing_data == (first, False)
    assert conn.accept_direct_tls() == first
    assert conn.tls
    # Inside TLS: no more encryption requests, a StartupMessage is next.
    assert pump(conn, [STARTUP.encode()]) == [STARTUP]


def test_direct_tls_only_as_the_first_byte() -> None:
    conn = StartupConnection()
    pump(conn, [m.SSLRequest().encode()])
    conn.answer_ssl(accept=False)
    err = error_of(conn, [b"\x16\x03\x01\x02\x00"])
    assert err.wire_hint == "08P01"


def test_clean_eof_is_an_event() -> None:
    conn = StartupConnection()
    assert pump(conn, [b""]) == [ConnectionClosed(clean=True)]
    assert conn.state is State.CLOSED
    assert conn.next_event() == ConnectionClosed(clean=True)
    # Also after an answered SSLRequest (libpq probing, then giving up).
    conn = StartupConnection()
    pump(conn, [m.SSLRequest().encode()])
    conn.answer_ssl(accept=False)
    assert pump(conn, [b""]) == [ConnectionClosed(clean=True)]


# --- refusals ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("data, sqlstate", [
    (STARTUP.encode()[:-3], "08P01"),  # EOF mid-packet
    (struct.pack(">I", 7) + b"\x00" * 3, "08P01"),
    (struct.pack(">I", 10001) + b"\x00" * 8, "08P01"),
    (struct.pack(">I", 2**32 - 1), "08P01"),
    (struct.pack(">II", 12, 2 << 16) + b"u\x00\x00\x00", "0A000"),
    (struct.pack(">II", 14, 3 << 16) + b"db\x00x\x00\x00", "28000"),
])
def test_bad_first_packets(how: str, data: bytes, sqlstate: str) -> None:
    conn = StartupConnection()
    err = error_of(conn, split(data, how) + [b""])
    assert err.wire_hint == sqlstate
    # Poisoned: the same error again, and no trailing data.
    with pytest.raises(RemoteProtocolError) as again:
        conn.next_event()
    assert again.value.message == err.message
    with pytest.raises(RemoteProtocolError):
        conn.trailing_data


def test_plaintext_after_ssl_request_is_refused() -> None:
    # CVE-2021-23214: bytes sent before the TLS handshake must not be read as
    # if they had come through TLS.
    conn = StartupConnection()
    assert pump(conn, [m.SSLRequest().encode() + STARTUP.encode()]) == [m.SSLRequest()]
    with pytest.raises(RemoteProtocolError) as info:
        conn.answer_ssl(accept=True)
    assert info.value.wire_hint == "08P01" and conn.state is State.ERROR
    with pytest.raises(RemoteProtocolError):
        conn.next_event()


def test_plaintext_after_ssl_request_is_fine_when_refused() -> None:
    conn = StartupConnection()
    assert pump(conn, [m.SSLRequest().encode() + STARTUP.encode()]) == [m.SSLRequest()]
    assert conn.answer_ssl(accept=False) == b"N"
    assert pump(conn, []) == [] and conn.next_event() == STARTUP


@pytest.mark.parametrize("steps", [
    [("ssl", False), ("ssl", None)],
    [("ssl", True), ("ssl", None)],
    [("ssl", True), ("gss", None)],
    [("gss", False), ("gss", None)],
    [("direct", True), ("ssl", None)],
    [("direct", True), ("gss", None)],
])
def test_encryption_is_negotiated_once(steps: list[tuple[str, bool | None]]) -> None:
    conn = StartupConnection()
    packets = {"ssl": m.SSLRequest().encode(), "gss": m.GSSENCRequest().encode(),
               "direct": b"\x16\x03\x01"}
    for kind, accept in steps:
        if accept is None:
            err = error_of(conn, [packets[kind]])
            assert err.wire_hint == "08P01" and "already negotiated" in err.message
            return
        pump(conn, [packets[kind]])
        if kind == "ssl":
            conn.answer_ssl(accept=accept)
        elif kind == "gss":
            conn.answer_gssenc()
        else:
            conn.accept_direct_tls()
    raise AssertionError("unreachable")


def test_answers_out_of_turn() -> None:
    conn = StartupConnection()
    for call in (lambda: conn.answer_ssl(accept=True), conn.answer_gssenc,
                 conn.accept_direct_tls):
        with pytest.raises(LocalProtocolError):
            call()
    pump(conn, [m.SSLRequest().encode()])
    with pytest.raises(LocalProtocolError):
        conn.answer_gssenc()
    with pytest.raises(LocalProtocolError):
        conn.trailing_data


def test_buffer_is_capped() -> None:
    with pytest.raises(ValueError):
        StartupConnection(max_buffer_size=100)
    conn = StartupConnection(max_buffer_size=10_000)
    conn.receive_data(b"\x00" * 10_000)
    conn.receive_data(b"\x00")  # too much: poisoned
    conn.receive_data(b"\x00")  # ignored
    with pytest.raises(RemoteProtocolError) as info:
        conn.next_event()
    assert info.value.wire_hint == "08P01" and info.value.code is ErrorCode.BAD_REQUEST


def test_bytes_after_eof_are_a_local_error() -> None:
    conn = StartupConnection()
    conn.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        conn.receive_data(b"x")
    assert conn.next_event() == ConnectionClosed(clean=True)
    assert repr(conn) == "<StartupConnection CLOSED tls=False>"


@fuzz
@given(data=st.binary(max_size=64), eof=st.booleans())
def test_fuzz_random_bytes(data: bytes, eof: bool) -> None:
    conn = StartupConnection()
    try:
        pump(conn, [data] + ([b""] if eof else []))
    except RemoteProtocolError:
        pass


@fuzz
@given(cuts=st.lists(st.integers(min_value=0, max_value=200), max_size=12))
def test_fuzz_chunking(cuts: list[int]) -> None:
    data = m.GSSENCRequest().encode() + m.SSLRequest().encode() + STARTUP.encode() + b"tail"
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    conn = StartupConnection()
    events: list[object] = []
    for a, b in zip(bounds, bounds[1:]):
        events += pump(conn, [data[a:b]] if a < b else [])
        while conn.state in (State.GSS_ANSWER_DUE, State.SSL_ANSWER_DUE):
            if conn.state is State.GSS_ANSWER_DUE:
                conn.answer_gssenc()
            else:
                conn.answer_ssl(accept=False)
            event = conn.next_event()
            if event is not NEED_DATA:
                events.append(event)
    assert events == [m.GSSENCRequest(), m.SSLRequest(), STARTUP]
    assert conn.trailing_data == (b"tail", False)


# --- negotiation -------------------------------------------------------------------------


def test_negotiation_for() -> None:
    assert negotiation_for(STARTUP) is None
    newer = m.StartupMessage(parameters={"user": "u"}, minor=2)
    assert negotiation_for(newer) == m.NegotiateProtocolVersion(newest_minor=0)
    opts = m.StartupMessage(parameters={"user": "u", "_pq_.b": "1", "x": "y", "_pq_.a": "2"})
    npv = negotiation_for(opts)
    assert npv == m.NegotiateProtocolVersion(newest_minor=0, unrecognized=("_pq_.b", "_pq_.a"))
    assert npv is not None and npv.encode()[:1] == b"v"


# --- the startup relay ---------------------------------------------------------------------


UPSTREAM_KEY = m.BackendKeyData(process_id=31337, secret_key=b"\xaa\xbb\xcc\xdd")
OUR_KEY = m.BackendKeyData(process_id=7, secret_key=b"\x01\x02\x03\x04")
BEFORE = (m.AuthenticationOk().encode()
          + m.ParameterStatus(name="server_version", value="17.2").encode()
          + m.NoticeResponse.create(severity="NOTICE", sqlstate="00000", message="hi").encode())
AFTER = m.ReadyForQuery().encode()
REST = m.ParameterStatus(name="TimeZone", value="UTC").encode() + b"\x00garbage is fine here"


def relay_all(relay: StartupRelay, chunks: Iterable[bytes]) -> bytes:
    return b"".join(relay.feed(chunk) for chunk in chunks)


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("rest", [b"", REST])
def test_relay_swaps_the_key(how: str, rest: bytes) -> None:
    relay = StartupRelay(OUR_KEY)
    data = BEFORE + UPSTREAM_KEY.encode() + AFTER + rest
    out = relay_all(relay, split(data, how))
    assert out == BEFORE + OUR_KEY.encode() + AFTER + rest
    assert relay.done and relay.upstream_key == UPSTREAM_KEY and relay.error is None
    assert relay.feed(b"anything") == b"anything"  # out of the way


def test_relay_without_a_key_passes_it_on() -> None:
    relay = StartupRelay(None)
    data = BEFORE + UPSTREAM_KEY.encode() + AFTER
    assert relay.feed(data) == data and relay.upstream_key == UPSTREAM_KEY


def test_relay_keeps_long_upstream_keys() -> None:
    long_key = m.BackendKeyData(process_id=1, secret_key=b"k" * 32)
    relay = StartupRelay(OUR_KEY)
    assert relay.feed(long_key.encode() + AFTER) == OUR_KEY.encode() + AFTER
    assert relay.upstream_key == long_key


@pytest.mark.parametrize("how", FEEDS)
def test_relay_records_an_error(how: str) -> None:
    fatal = m.ErrorResponse.create(severity="FATAL", sqlstate="3D000",
                                   message='database "x" does not exist')
    relay = StartupRelay(OUR_KEY)
    data = m.AuthenticationOk().encode() + fatal.encode()
    assert relay_all(relay, split(data, how)) == data
    assert relay.error == fatal and not relay.done


def test_relay_streams_big_messages() -> None:
    # A message it does not hold is passed on as it arrives, never buffered.
    relay = StartupRelay(OUR_KEY)
    header = b"N" + struct.pack(">I", 4 + 10_000_000)
    assert relay.feed(header[:3]) == b""
    assert relay.feed(header[3:] + b"x" * 10) == header + b"x" * 10
    chunk = b"y" * 65536
    for _ in range(10_000_000 // 65536):
        assert relay.feed(chunk) == chunk
    tail = b"z" * (10_000_000 - 10 - (10_000_000 // 65536) * 65536)
    assert relay.feed(tail + AFTER) == tail + AFTER and relay.done
    # A huge ErrorResponse is passed on unread.
    relay = StartupRelay(OUR_KEY)
    big = m.ErrorResponse.create(severity="FATAL", sqlstate="XX000", message="e" * 70_000)
    assert relay.feed(big.encode()) == big.encode() and relay.error is None


@pytest.mark.parametrize("data", [
    b"S\x00\x00\x00\x03",  # length below 4
    b"S\x40\x00\x00\x00",  # 1 GiB: more than a server may send
    b"K\x00\x00\x00\x04",  # empty BackendKeyData
    b"K\x00\x00\x00\x0b\x00\x00\x00\x01abc",  # 3-byte key
    b"K" + struct.pack(">I", 4 + 4 + 257) + b"\x00" * 261,  # key too long
    b"Z\x00\x00\x00\x04",  # empty ReadyForQuery
    b"Z\x00\x00\x00\x06II",
    b"Z\x00\x00\x00\x05Q",
    b"E\x00\x00\x00\x04",
])
def test_relay_rejects_malformed_frames(data: bytes) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        StartupRelay(OUR_KEY).feed(data)
    assert info.value.wire_hint == "08P01"


def test_relay_key_checks() -> None:
    with pytest.raises(TypeError):
        StartupRelay(b"key")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        StartupRelay(m.BackendKeyData(process_id=1, secret_key=b"k" * 8))


@fuzz
@given(cuts=st.lists(st.integers(min_value=0, max_value=120), max_size=12))
def test_relay_any_chunking(cuts: list[int]) -> None:
    data = BEFORE + UPSTREAM_KEY.encode() + AFTER + REST
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    relay = StartupRelay(OUR_KEY)
    out = relay_all(relay, [data[a:b] for a, b in zip(bounds, bounds[1:])])
    assert out == BEFORE + OUR_KEY.encode() + AFTER + REST and relay.done


@fuzz
@given(data=st.binary(max_size=100))
def test_relay_fuzz(data: bytes) -> None:
    try:
        StartupRelay(OUR_KEY).feed(data)
    except RemoteProtocolError:
        pass


# --- the whole startup, gateway and cluster joined by fake links --------------------------


def test_gateway_and_cluster_together() -> None:
    from protocols.postgres.audit import FrontendAuditor, QueryEvent
    from protocols.postgres.scram import LoginReady, UpstreamLogin

    # psql -> gateway: SSLRequest (refused), then a 3.2 StartupMessage.
    client_startup = m.StartupMessage(parameters={"user": "alice", "application_name": "psql",
                                                  "_pq_.test": "1"}, minor=2)
    gateway = StartupConnection()
    assert pump(gateway, [m.SSLRequest().encode()]) == [m.SSLRequest()]
    to_client = gateway.answer_ssl(accept=False)
    [startup] = pump(gateway, [client_startup.encode()])
    assert isinstance(startup, m.StartupMessage) and startup.database == "alice"
    npv = negotiation_for(startup)
    assert npv is not None
    to_client += npv.encode()

    # cluster -> upstream: log in as the mapped database user.
    login = UpstreamLogin(user="app_rw", database=startup.database, password="pw",
                          parameters={"application_name": startup.application_name or ""})
    upstream_sees = m.decode_startup_packet(login.data_to_send()[4:])
    assert isinstance(upstream_sees, m.StartupMessage) and upstream_sees.user == "app_rw"
    upstream_key = m.BackendKeyData(process_id=999, secret_key=b"UPST")
    login.receive_data(m.AuthenticationCleartextPassword().encode())
    assert login.next_event() is NEED_DATA
    assert login.data_to_send() == m.PasswordMessage(password=b"pw").encode()
    login.receive_data(m.AuthenticationOk().encode()
                       + m.ParameterStatus(name="server_version", value="17.2").encode()
                       + upstream_key.encode() + m.ReadyForQuery().encode())
    ready = login.next_event()
    assert isinstance(ready, LoginReady) and ready.backend_key == upstream_key

    # cluster -> gateway -> psql: the startup answer, with the gateway's own key.
    relay = StartupRelay(OUR_KEY)
    to_client += relay.feed(ready.client_bytes)
    assert relay.done and relay.upstream_key == upstream_key
    assert to_client == (b"N" + npv.encode() + m.AuthenticationOk().encode()
                         + m.ParameterStatus(name="server_version", value="17.2").encode()
                         + OUR_KEY.encode() + m.ReadyForQuery().encode())

    # psql -> upstream: the session, audited by the cluster on the way.
    auditor = FrontendAuditor()
    auditor.receive_data(m.Query(text="select now()").encode())
    event = auditor.next_event()
    assert isinstance(event, QueryEvent) and (event.text, event.truncated, event.length) == ("select now()", False, 12)
    # Ctrl-C: psql opens a new connection with the key it was given.
    cancel = StartupConnection()
    [request] = pump(cancel, [m.CancelRequest(process_id=7, secret_key=b"\x01\x02\x03\x04")
                              .encode()])
    assert isinstance(request, m.CancelRequest) and OUR_KEY.matches(request)

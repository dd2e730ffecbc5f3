"""protocols.mysql.server: the gateway's connection phase (server role)."""

from __future__ import annotations

import collections
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.mysql import auth
from protocols.mysql.client import LoginReady, UpstreamLogin
from protocols.mysql.constants import Capability, ErrorNumber, ServerStatus
from protocols.mysql.generic import ErrPacket, OkPacket
from protocols.mysql.messages import (
    AuthMoreData, AuthSwitchRequest, Handshake, HandshakeResponse, ServerInfo, SSLRequest,
    StartTLS,
)
from protocols.mysql.messages import MAX_ATTRIBUTES_LENGTH
from protocols.mysql.packets import encode_packets, iter_packets
from protocols.mysql.server import (
    ClientLogin, GatewayHandshake, HandshakeState, advertised, err_for, new_scramble,
)
from protocols.signals import NEED_DATA, PAUSED, ConnectionClosed
from tests.unit.protocols.feeding import FEEDS, fuzz, malformed, split

UPSTREAM_CAPS = (Capability.LONG_PASSWORD | Capability.PROTOCOL_41
                 | Capability.SECURE_CONNECTION | Capability.PLUGIN_AUTH
                 | Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA | Capability.CONNECT_WITH_DB
                 | Capability.CONNECT_ATTRS | Capability.DEPRECATE_EOF | Capability.SSL
                 | Capability.COMPRESS | Capability.MULTI_STATEMENTS | Capability.SESSION_TRACK
                 | Capability.QUERY_ATTRIBUTES | Capability.OPTIONAL_RESULTSET_METADATA
                 | Capability.LOCAL_FILES)
UPSTREAM = ServerInfo(server_version="8.0.36", capabilities=UPSTREAM_CAPS, charset=255,
                      status=ServerStatus.AUTOCOMMIT, connection_id=7)
SCRAMBLE = b"0123456789abcdefghij"
CLIENT_CAPS = (Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION | Capability.PLUGIN_AUTH
               | Capability.CONNECT_WITH_DB | Capability.DEPRECATE_EOF
               | Capability.CONNECT_ATTRS | Capability.COMPRESS | Capability.LOCAL_FILES)


def pkt(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


def gateway(**kwargs: object) -> GatewayHandshake:
    return GatewayHandshake(UPSTREAM, connection_id=99, scramble=SCRAMBLE,
                            **kwargs)  # type: ignore[arg-type]


def client_response(plugin: str = auth.NATIVE_PASSWORD, data: bytes = b"x" * 20,
                    caps: Capability = CLIENT_CAPS) -> bytes:
    return HandshakeResponse(capabilities=caps, username="alice", auth_response=data,
                             database="shop", auth_plugin=plugin, charset=45,
                             attributes={"_client_name": "libmysql"}).encode()


def events_of(hs: GatewayHandshake, chunks: list[bytes]) -> list[object]:
    events: list[object] = []
    for chunk in chunks:
        hs.receive_data(chunk)
        while (event := hs.next_event()) not in (NEED_DATA, PAUSED):
            events.append(event)
            if isinstance(event, ConnectionClosed):
                break
    return events


def test_the_greeting_repeats_the_upstream() -> None:
    hs = gateway()
    ((seq, payload),) = iter_packets(hs.data_to_send())
    hello = Handshake.decode(payload)
    assert seq == 0 and hello.server_version == "8.0.36" and hello.connection_id == 99
    assert hello.charset == 255 and hello.status == ServerStatus.AUTOCOMMIT
    assert hello.scramble == SCRAMBLE and hello.auth_plugin == auth.NATIVE_PASSWORD
    assert hello.capabilities == hs.capabilities
    assert Capability.SSL not in hello.capabilities
    assert Capability.COMPRESS not in hello.capabilities
    assert Capability.OPTIONAL_RESULTSET_METADATA not in hello.capabilities
    assert Capability.QUERY_ATTRIBUTES in hello.capabilities
    assert "AWAIT_RESPONSE" in repr(hs)


def test_advertised_capabilities() -> None:
    caps = advertised(UPSTREAM_CAPS, tls=True, compression=True, drop=Capability.LOCAL_FILES)
    assert Capability.SSL in caps and Capability.COMPRESS in caps
    assert Capability.LOCAL_FILES not in caps
    bare = advertised(Capability(0), tls=False, compression=True)
    assert bare == Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION | Capability.PLUGIN_AUTH


def test_scrambles_are_fresh_and_printable() -> None:
    one, two = new_scramble(), new_scramble()
    assert one != two and len(one) == 20 and all(33 <= b < 127 for b in one)
    # Every printable byte turns up as often as chance allows: 5,000
    # scrambles, 1,064 expected each, 5 standard deviations either way (a
    # plain modulo of a byte would give 68 values ~1,172 and 26 ~781).
    counts = collections.Counter(b"".join(new_scramble() for _ in range(5000)))
    assert set(counts) == set(range(33, 127)) and max(counts.values()) < 1230 and min(counts.values()) > 900
    with pytest.raises(ValueError):
        GatewayHandshake(UPSTREAM, connection_id=1, scramble=b"\x00" * 20)


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("trailing", [b"", pkt(0, b"\x03select 1")])
def test_a_native_password_client_gets_in_with_any_password(how: str, trailing: bytes) -> None:
    hs = gateway()
    hs.data_to_send()
    events = events_of(hs, split(pkt(1, client_response()) + trailing, how))
    assert events == [ClientLogin(
        username="alice", database="shop", capabilities=CLIENT_CAPS & ~Capability.COMPRESS,
        charset=45, max_packet_size=1 << 24, attributes={"_client_name": "libmysql"},
        plugin=auth.NATIVE_PASSWORD, tls=False)]
    assert hs.state is HandshakeState.VERDICT_DUE and hs.next_event() is PAUSED
    ok = hs.accept(OkPacket(status=ServerStatus.AUTOCOMMIT | ServerStatus.IN_TRANS))
    assert list(iter_packets(ok)) == [(2, b"\x00\x00\x00\x03\x00\x00\x00")]
    assert hs.trailing_data == (trailing, False) and hs.next_event() is PAUSED


def test_caching_sha2_clients_hear_fast_auth_success() -> None:
    hs = gateway()
    events_of(hs, [pkt(1, client_response(auth.CACHING_SHA2_PASSWORD, b"h" * 32))])
    sent = list(iter_packets(hs.accept()))
    assert sent == [(2, AuthMoreData(data=auth.FAST_AUTH_SUCCESS).encode()),
                    (3, OkPacket().encode(CLIENT_CAPS))]
    hs = gateway()
    events_of(hs, [pkt(1, client_response(auth.CACHING_SHA2_PASSWORD, b""))])
    assert [seq for seq, _ in iter_packets(hs.accept())] == [2]  # no password: just OK


@pytest.mark.parametrize("plugin", [auth.CLIENT_ED25519, "dialog", auth.SHA256_PASSWORD])
def test_other_plugins_are_switched_to_native(plugin: str) -> None:
    hs = gateway()
    hs.data_to_send()
    assert events_of(hs, [pkt(1, client_response(plugin, b""))]) == []
    ((seq, payload),) = iter_packets(hs.data_to_send())
    assert seq == 2 and AuthSwitchRequest.decode(payload) == AuthSwitchRequest(
        plugin=auth.NATIVE_PASSWORD, data=SCRAMBLE + b"\x00")
    (login,) = events_of(hs, [pkt(3, b"any answer at all")])
    assert isinstance(login, ClientLogin) and login.plugin == auth.NATIVE_PASSWORD
    assert [seq for seq, _ in iter_packets(hs.accept())] == [4]


def test_clients_without_plugin_auth() -> None:
    hs = gateway()
    caps = CLIENT_CAPS & ~Capability.PLUGIN_AUTH
    (login,) = events_of(hs, [pkt(1, HandshakeResponse(capabilities=caps, username="bob",
                                                       auth_response=b"x" * 20).encode())])
    assert isinstance(login, ClientLogin) and login.database is None
    assert login.plugin == auth.NATIVE_PASSWORD and dict(login.attributes) == {}


@pytest.mark.parametrize("how", FEEDS)
def test_tls_on_request(how: str) -> None:
    hs = gateway(tls=True)
    assert Capability.SSL in hs.capabilities
    ssl = SSLRequest(capabilities=CLIENT_CAPS | Capability.SSL).encode()
    hello = b"\x16\x03\x01\x00\x05hello"
    assert events_of(hs, split(pkt(1, ssl) + hello, how)) == [StartTLS()]
    assert hs.next_event() is PAUSED
    assert hs.start_tls() == hello
    (login,) = events_of(hs, [pkt(2, client_response(caps=CLIENT_CAPS | Capability.SSL))])
    assert isinstance(login, ClientLogin) and login.tls
    assert Capability.SSL in login.capabilities
    assert [seq for seq, _ in iter_packets(hs.accept())] == [3]


def test_tls_rules() -> None:
    ssl = pkt(1, SSLRequest(capabilities=CLIENT_CAPS | Capability.SSL).encode())
    err = malformed(events_of, gateway(), [ssl])
    assert err.wire_hint == ErrorNumber.ER_HANDSHAKE_ERROR and "not offered" in err.message
    hs = gateway(tls=True)
    events_of(hs, [ssl + b"\x03select"])
    assert "plaintext" in malformed(hs.start_tls).message
    hs = gateway(tls=True)
    err = malformed(events_of, hs, [pkt(1, client_response(caps=CLIENT_CAPS | Capability.SSL))])
    assert "without an SSLRequest" in err.message
    hs = gateway(tls=True)
    events_of(hs, [ssl])
    hs.start_tls()
    assert "not offered" in malformed(events_of, hs, [pkt(2, SSLRequest(
        capabilities=CLIENT_CAPS | Capability.SSL).encode())]).message


def test_refusing_with_an_err() -> None:
    hs = gateway()
    events_of(hs, [pkt(1, client_response())])
    denied = ErrPacket.of(ErrorNumber.ER_ACCESS_DENIED_ERROR, "role 'dev' may not use db 'hr'")
    assert list(iter_packets(hs.refuse(denied))) == [(2, denied.encode())]
    assert hs.state is HandshakeState.DONE
    with pytest.raises(LocalProtocolError):
        hs.refuse(denied)
    with pytest.raises(LocalProtocolError):
        hs.accept()


def test_a_broken_client_still_hears_an_err() -> None:
    hs = gateway()
    hs.data_to_send()
    err = malformed(events_of, hs, [pkt(1, b"\x01\x02")])
    assert err.wire_hint == ErrorNumber.ER_HANDSHAKE_ERROR
    assert malformed(hs.next_event).message == err.message
    answer = err_for(err)
    assert answer.errno == 1043 and answer.sqlstate == "08S01"
    assert [seq for seq, _ in iter_packets(hs.refuse(answer))] == [2]
    assert hs.state is HandshakeState.ERROR


def test_err_for_codes_without_a_number() -> None:
    err = err_for(RemoteProtocolError("denied", code=ErrorCode.ACCESS_DENIED))
    assert (err.errno, err.sqlstate, err.message) == (1045, "28000", "denied")
    unreachable = err_for(RemoteProtocolError("down", code=ErrorCode.UPSTREAM_UNREACHABLE,
                                              wire_hint="08006"))
    assert unreachable.errno == 1429
    lost = err_for(RemoteProtocolError("lost", code=ErrorCode.UPSTREAM_UNREACHABLE,
                                       wire_hint=ErrorNumber.CR_SERVER_LOST))
    assert lost.errno == 1429  # a client-side number never goes into an ERR


@pytest.mark.parametrize(("data", "hint"), [
    (pkt(2, client_response()), ErrorNumber.ER_NET_PACKETS_OUT_OF_ORDER),
    (b"\xff\xff\x00\x01", ErrorNumber.ER_NET_PACKET_TOO_LARGE),
    (pkt(1, b"\x00" * 4), ErrorNumber.ER_HANDSHAKE_ERROR),
])
def test_protocol_errors_carry_their_error_number(data: bytes, hint: int) -> None:
    err = malformed(events_of, GatewayHandshake(UPSTREAM, connection_id=1, max_message_size=4096),
                    [data])
    assert err.wire_hint == hint


def test_a_flood_poisons_the_connection() -> None:
    hs = GatewayHandshake(UPSTREAM, connection_id=1, max_message_size=16)
    hs.receive_data(b"\x00" * 100)
    assert malformed(hs.next_event).wire_hint == ErrorNumber.ER_NET_PACKET_TOO_LARGE
    hs.receive_data(b"more")  # ignored once poisoned


def test_hanging_up() -> None:
    hs = gateway()
    hs.receive_data(b"")
    assert hs.next_event() == ConnectionClosed(clean=True)
    assert hs.next_event() == ConnectionClosed(clean=True)
    hs = gateway()
    hs.receive_data(pkt(1, client_response())[:10])
    hs.receive_data(b"")
    assert malformed(hs.next_event).wire_hint == ErrorNumber.ER_NET_READ_ERROR


def test_calls_out_of_turn() -> None:
    hs = gateway()
    for call in (hs.accept, hs.start_tls):
        with pytest.raises(LocalProtocolError):
            call()
    with pytest.raises(LocalProtocolError):
        _ = hs.trailing_data
    hs.receive_data(b"")
    assert isinstance(hs.next_event(), ConnectionClosed)
    with pytest.raises(LocalProtocolError):
        hs.refuse(ErrPacket(errno=1))


@fuzz
@given(st.binary(max_size=120))
def test_random_client_bytes_raise_only_protocol_errors(data: bytes) -> None:
    hs = GatewayHandshake(UPSTREAM, connection_id=1, tls=True, max_message_size=100)
    try:
        events = events_of(hs, [data])
        if events and isinstance(events[0], StartTLS):
            hs.start_tls()
    except RemoteProtocolError as exc:
        assert isinstance(exc.wire_hint, int)
        hs.refuse(err_for(exc))


# --- the two roles joined by a fake link ---------------------------------------------------


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("plugins", [{auth.NATIVE_PASSWORD}, {auth.CACHING_SHA2_PASSWORD}])
def test_upstream_login_against_the_gateway(tls: bool, plugins: set[str]) -> None:
    """Our client role logs in to our server role: every byte one sends is
    what the other reads."""
    hs = gateway(tls=tls)
    login = UpstreamLogin(user="alice", password="any", database="shop", tls=tls,
                          plugins=plugins)
    result = None
    for _ in range(10):
        login.receive_data(hs.data_to_send())
        while (event := login.next_event()) not in (NEED_DATA, PAUSED):
            if isinstance(event, StartTLS):
                hs.receive_data(login.data_to_send())
                assert hs.next_event() == StartTLS()
                assert hs.start_tls() == b""
                login.tls_started()
            else:
                result = event
        hs.receive_data(login.data_to_send())
        event = hs.next_event()
        if isinstance(event, ClientLogin):
            assert event.username == "alice" and event.database == "shop" and event.tls is tls
            login.receive_data(hs.accept(OkPacket(status=2)))
    assert isinstance(result, LoginReady) and result.ok == OkPacket(status=2)
    assert result.server.server_version == "8.0.36" and result.tls is tls


# --- what PyMySQL sends, built by hand the way its _request_authentication does ------------


def pymysql_answer(hello: Handshake, *, tls: bool) -> list[bytes]:
    """PyMySQL 1.2's packets for ``hello``, user "app", password "pw", db
    "shop", TLS preferred: struct.pack("<iIB23s", flags, 2**24-1, charset,
    b"") as the head; then fields chosen by the *server's* capabilities."""
    flags = (1 | 4 | 1 << 9 | 1 << 13 | 1 << 15 | 1 << 17 | 1 << 19 | 1 << 20 | 1 << 21
             | 1 << 3)  # CAPABILITIES | MULTI_RESULTS | CONNECT_WITH_DB
    server = hello.capabilities.value
    packets, seq = [], 1
    if tls and server & Capability.SSL.value:
        flags |= Capability.SSL.value
        packets.append(pkt(seq, struct.pack("<iIB23s", flags, 2**24 - 1, 45, b"")))
        seq += 1
    data = struct.pack("<iIB23s", flags, 2**24 - 1, 45, b"") + b"app\x00"
    scramble = auth.native_password(b"pw", hello.scramble)
    if server & Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA.value:
        data += bytes([len(scramble)]) + scramble  # _lenenc_int of 20
    else:
        data += struct.pack("B", len(scramble)) + scramble
    if server & Capability.CONNECT_WITH_DB.value:
        data += b"shop\x00"
    if server & Capability.PLUGIN_AUTH.value:
        data += b"mysql_native_password\x00"
    if server & Capability.CONNECT_ATTRS.value:
        attrs = b"".join(bytes([len(k)]) + k + bytes([len(v)]) + v for k, v in (
            (b"_client_name", b"pymysql"), (b"_client_version", b"1.2.0"), (b"_pid", b"4242")))
        data += bytes([len(attrs)]) + attrs
    packets.append(pkt(seq, data))
    return packets


@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("upstream_caps",
                         [UPSTREAM_CAPS, UPSTREAM_CAPS & ~Capability.CONNECT_ATTRS])
def test_pymysql_gets_in(tls: bool, upstream_caps: Capability) -> None:
    upstream = ServerInfo(server_version="10.11.6-MariaDB", capabilities=upstream_caps)
    hs = GatewayHandshake(upstream, connection_id=5, tls=tls)
    ((_, greeting),) = iter_packets(hs.data_to_send())
    answer = pymysql_answer(Handshake.decode(greeting), tls=True)  # it always prefers TLS
    if tls:
        assert events_of(hs, [answer[0]]) == [StartTLS()]
        assert hs.start_tls() == b""
    (login,) = events_of(hs, answer[-1:])
    assert isinstance(login, ClientLogin) and login.username == "app"
    assert login.database == "shop" and login.tls is tls
    if Capability.CONNECT_ATTRS in upstream_caps:
        assert login.attributes["_client_name"] == "pymysql"
    else:  # its flag says CONNECT_ATTRS, but it sends none to such a server
        assert dict(login.attributes) == {}
    assert [seq for seq, _ in iter_packets(hs.accept())] == [3 if tls else 2]


MYSQL8 = ServerInfo(server_version="8.0.36", capabilities=UPSTREAM_CAPS,
                    auth_plugin=auth.CACHING_SHA2_PASSWORD)


def test_a_mysql_8_upstream_greets_with_caching_sha2() -> None:
    hs = GatewayHandshake(MYSQL8, connection_id=1, scramble=SCRAMBLE)
    ((_, payload),) = iter_packets(hs.data_to_send())
    assert Handshake.decode(payload).auth_plugin == auth.CACHING_SHA2_PASSWORD
    # A client answering with that plugin by default (an empty name) gets
    # fast-auth success; one that starts with another plugin is switched to it.
    (login,) = events_of(hs, [pkt(1, client_response("", b"s" * 32))])
    assert isinstance(login, ClientLogin) and login.plugin == auth.CACHING_SHA2_PASSWORD
    assert [p[:2] for _, p in iter_packets(hs.accept())] == [b"\x01\x03", b"\x00\x00"]
    hs = GatewayHandshake(MYSQL8, connection_id=1, scramble=SCRAMBLE)
    hs.data_to_send()
    events_of(hs, [pkt(1, client_response(auth.CLIENT_ED25519, b""))])
    ((_, switch),) = iter_packets(hs.data_to_send())
    assert AuthSwitchRequest.decode(switch).plugin == auth.CACHING_SHA2_PASSWORD
    (login,) = events_of(hs, [pkt(3, b"s" * 32)])
    assert isinstance(login, ClientLogin) and login.plugin == auth.CACHING_SHA2_PASSWORD
    assert [seq for seq, _ in iter_packets(hs.accept())] == [4, 5]


def test_an_upstream_plugin_we_cannot_greet_with_falls_back_to_native() -> None:
    odd = ServerInfo(server_version="10.11.6-MariaDB", capabilities=UPSTREAM_CAPS,
                     auth_plugin=auth.CLIENT_ED25519)
    hs = GatewayHandshake(odd, connection_id=1)
    ((_, payload),) = iter_packets(hs.data_to_send())
    assert Handshake.decode(payload).auth_plugin == auth.NATIVE_PASSWORD


def test_the_largest_attributes_a_server_takes_fit() -> None:
    caps = CLIENT_CAPS | Capability.CONNECT_ATTRS
    big = {"k": "v" * (MAX_ATTRIBUTES_LENGTH - 8)}
    response = HandshakeResponse(capabilities=caps, username="u", auth_plugin="",
                                 attributes=big).encode()
    (login,) = events_of(gateway(), [encode_packets(response, 1)[0]])
    assert isinstance(login, ClientLogin) and login.attributes == big

"""protocols.mysql.messages: connection-phase messages and OK/ERR/EOF, against
the hex dumps published for them."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.mysql.constants import Capability, ErrorNumber, ServerStatus
from protocols.mysql.messages import (
    MAX_ATTRIBUTES_LENGTH, AuthMoreData, AuthSwitchRequest, Handshake, HandshakeResponse,
    ServerInfo, SSLRequest,
)
from protocols.mysql.packets import lenenc_bytes
from tests.unit.protocols.feeding import fuzz, malformed
from tests.unit.protocols.mysql.samples import fuzz_decoders, names, payload


# A MySQL 5.7.18 server's greeting, as captured in a packet trace.
MYSQL_57 = payload(
    "4e0000000a352e372e31382d6c6f6700127a29003358381844 5e164800ffff210200ffc115"
    "00000000000000000000407911302a41615564776e0d00"
    "6d7973716c5f6e61746976655f70617373776f726400".replace(" ", ""))
# A MySQL 5.0.22 greeting (no CLIENT_PLUGIN_AUTH): the old protocol reference's example.
MYSQL_50 = payload(
    "41 00 00 00 0a 35 2e 30 2e 32 32 2d 63 6f 6d 6d 75 6e 69 74 79 2d 6e 74 00 01 00 00 00"
    "7e 37 33 3a 69 25 78 4f 00 2c a2 08 02 00 00 00 00 00 00 00 00 00 00 00 00 00 00"
    "61 7c 69 78 42 7b 6a 21 61 49 29 2d 00")
# dev.mysql.com, HandshakeResponse320's example: a pre-4.1 client.
RESPONSE_320 = payload("1100000185240000006f6c640047445343515952 5f".replace(" ", ""))


def test_mysql_57_greeting() -> None:
    hello = Handshake.decode(MYSQL_57)
    assert hello.server_version == "5.7.18-log" and hello.connection_id == 0x297A12
    assert hello.scramble == bytes.fromhex("33583818445e1648407911302a41615564776e0d")
    assert hello.charset == 33 and hello.status == ServerStatus.AUTOCOMMIT
    assert hello.auth_plugin == "mysql_native_password" and not hello.is_mariadb
    assert Capability.DEPRECATE_EOF in hello.capabilities
    assert hello.capabilities.value == 0xC1FFFFFF & ~(1 << 25 | 1 << 26 | 1 << 27 | 1 << 28
                                                      | 1 << 29)
    assert hello.encode() == MYSQL_57
    assert hello.info == ServerInfo(server_version="5.7.18-log",
                                    capabilities=hello.capabilities, charset=33, status=2,
                                    connection_id=0x297A12,
                                    auth_plugin="mysql_native_password")


def test_mysql_50_greeting_without_plugin_auth() -> None:
    hello = Handshake.decode(MYSQL_50)
    assert hello.server_version == "5.0.22-community-nt" and hello.auth_plugin is None
    assert hello.scramble == b"~73:i%xOa|ixB{j!aI)-"
    assert Capability.PLUGIN_AUTH not in hello.capabilities
    assert hello.encode() == MYSQL_50


def test_mariadb_extended_capabilities_ride_in_the_filler() -> None:
    caps = (Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION | Capability.PLUGIN_AUTH
            | Capability.MARIADB_PROGRESS | Capability.MARIADB_STMT_BULK_OPERATIONS)
    hello = Handshake(server_version="5.5.5-10.11.6-MariaDB", connection_id=9,
                      auth_plugin_data=b"A" * 20 + b"\x00", capabilities=caps)
    wire = hello.encode()
    assert wire[-(4 + 13 + 22):-(13 + 22)] == (0b101).to_bytes(4, "little")
    again = Handshake.decode(wire)
    assert again == hello and again.is_mariadb
    with pytest.raises(LocalProtocolError):  # MySQL's bit 0 and MariaDB's bits clash
        Handshake(server_version="x", connection_id=1, auth_plugin_data=b"A" * 20,
                  capabilities=caps | Capability.LONG_PASSWORD)


def test_an_unterminated_plugin_name_is_read_to_the_end() -> None:
    # MySQL 5.5.7..5.5.9 sent the plugin name without its NUL (bug #59453).
    hello = Handshake.decode(MYSQL_57[:-1])
    assert hello.auth_plugin == "mysql_native_password"


@pytest.mark.parametrize(("data", "words"), [
    (b"\x09" + MYSQL_57[1:], "protocol version 9"),
    (MYSQL_57[:30], "truncated"),
    (MYSQL_57[:27], "4.1"),  # ends after the low capability bits
    (MYSQL_57[:25] + b"\xff\xfd" + MYSQL_57[27:], "4.1"),  # PROTOCOL_41 clear
    (MYSQL_50 + b"x", "trailing"),
])
def test_bad_greetings(data: bytes, words: str) -> None:
    err = malformed(Handshake.decode, data)
    assert err.wire_hint == ErrorNumber.ER_HANDSHAKE_ERROR and words in err.message


def test_handshake_validation() -> None:
    base = dict(server_version="8.0.36", connection_id=1, auth_plugin_data=b"A" * 21,
                capabilities=Capability.PROTOCOL_41 | Capability.PLUGIN_AUTH)
    for change in ({"auth_plugin_data": b"A" * 7}, {"auth_plugin": None},
                   {"connection_id": -1}, {"server_version": "a\x00b"}, {"charset": 256},
                   {"capabilities": -1}, {"capabilities": "x"}):
        with pytest.raises(LocalProtocolError):
            Handshake(**{**base, **change})  # type: ignore[arg-type]
    from_bits = Handshake(**{**base, "capabilities": 0x80200})  # type: ignore[arg-type]
    assert from_bits.capabilities == (
        Capability.PROTOCOL_41 | Capability.PLUGIN_AUTH)


# --- the client's answer ------------------------------------------------------------------

CLIENT_CAPS = (Capability.LONG_PASSWORD | Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION
               | Capability.PLUGIN_AUTH | Capability.TRANSACTIONS | Capability.MULTI_RESULTS)


def test_ssl_request_is_the_32_byte_head() -> None:
    request = SSLRequest(capabilities=CLIENT_CAPS | Capability.SSL, charset=255)
    wire = request.encode()
    assert len(wire) == 32 and wire[8] == 255 and wire[9:] == b"\x00" * 23
    assert HandshakeResponse.decode(wire) == request
    with pytest.raises(LocalProtocolError):
        SSLRequest(capabilities=CLIENT_CAPS)
    no_ssl = (CLIENT_CAPS.mysql_bits).to_bytes(4, "little") + wire[4:]
    assert "not an SSLRequest" in malformed(HandshakeResponse.decode, no_ssl).message


def test_response_with_everything() -> None:
    caps = (CLIENT_CAPS | Capability.CONNECT_WITH_DB | Capability.CONNECT_ATTRS
            | Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA | Capability.ZSTD_COMPRESSION_ALGORITHM
            | Capability.MARIADB_PROGRESS)
    response = HandshakeResponse(capabilities=caps, username="app", auth_response=b"\x00" * 300,
                                 database="shop", auth_plugin="caching_sha2_password",
                                 attributes={"_client_name": "libmariadb", "prog": "mysql"},
                                 zstd_level=3, charset=45, max_packet_size=1 << 30)
    wire = response.encode()
    assert wire[32:36] == b"app\x00" and wire[36:39] == b"\xfc\x2c\x01"
    assert wire[28:32] == b"\x01\x00\x00\x00"  # MariaDB's bits in the filler
    again = HandshakeResponse.decode(wire)
    assert again == response and dict(again.attributes or {}) == {
        "_client_name": "libmariadb", "prog": "mysql"}
    assert "caching_sha2_password" in repr(again) and "libmariadb" in repr(again)


def test_auth_response_encodings_follow_the_capabilities() -> None:
    secure = HandshakeResponse(capabilities=CLIENT_CAPS, username="u", auth_response=b"\x01\x02",
                               auth_plugin="mysql_native_password")
    assert secure.encode()[32:] == b"u\x00\x02\x01\x02mysql_native_password\x00"
    old = CLIENT_CAPS & ~Capability.SECURE_CONNECTION & ~Capability.PLUGIN_AUTH
    plain = HandshakeResponse(capabilities=old, username="u", auth_response=b"ab")
    assert plain.encode()[32:] == b"u\x00ab\x00"
    assert HandshakeResponse.decode(plain.encode()) == plain
    with pytest.raises(LocalProtocolError):
        HandshakeResponse(capabilities=old, username="u", auth_response=b"a\x00")
    with pytest.raises(LocalProtocolError):
        HandshakeResponse(capabilities=CLIENT_CAPS, username="u", auth_response=b"a" * 256)


def test_fields_a_client_leaves_off_read_as_empty() -> None:
    caps = CLIENT_CAPS | Capability.CONNECT_WITH_DB | Capability.CONNECT_ATTRS
    wire = HandshakeResponse(capabilities=caps, username="u", database="d", auth_plugin="p",
                             attributes={}).encode()
    cut = wire[: wire.index(b"d\x00")]
    short = HandshakeResponse.decode(cut)
    assert (short.database, short.auth_plugin, dict(short.attributes or {})) == ("", "", {})
    assert short.encode() != cut  # the empty fields are written out again


@pytest.mark.parametrize("change", [
    {"capabilities": CLIENT_CAPS & ~Capability.PROTOCOL_41},
    {"database": "d"}, {"attributes": {"a": "b"}}, {"zstd_level": 3},
    {"capabilities": CLIENT_CAPS | Capability.ZSTD_COMPRESSION_ALGORITHM, "zstd_level": 300},
    {"attributes": {"a": 1}}, {"attributes": [("a", "b")]}, {"username": "a\x00"},
    {"max_packet_size": 1 << 32},
])
def test_response_validation(change: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError):
        fields = {"capabilities": CLIENT_CAPS, "username": "u", **change}
        HandshakeResponse(**fields)  # type: ignore[arg-type]


def test_attributes_are_bounded() -> None:
    caps = CLIENT_CAPS | Capability.CONNECT_ATTRS
    with pytest.raises(LocalProtocolError):
        HandshakeResponse(capabilities=caps, username="u",
                          attributes={"k": "v" * MAX_ATTRIBUTES_LENGTH}).encode()
    head = HandshakeResponse(capabilities=caps, username="u", attributes={}).encode()[:-1]
    block = lenenc_bytes(b"k") + lenenc_bytes(b"v" * MAX_ATTRIBUTES_LENGTH)
    err = malformed(HandshakeResponse.decode, head + lenenc_bytes(block))
    assert err.wire_hint == ErrorNumber.ER_HANDSHAKE_ERROR and "attributes" in err.message


def test_pre_41_clients_are_refused() -> None:
    err = malformed(HandshakeResponse.decode, RESPONSE_320)
    assert err.wire_hint == ErrorNumber.ER_HANDSHAKE_ERROR and "4.1" in err.message


def testnames_that_is_not_utf8_survives_a_round_trip() -> None:
    response = HandshakeResponse(capabilities=CLIENT_CAPS, username="caf\udce9",
                                 auth_plugin="")
    assert response.encode()[32:37] == b"caf\xe9\x00"
    assert HandshakeResponse.decode(response.encode()).username == "caf\udce9"


# --- authentication exchange -----------------------------------------------------------


def test_auth_switch_and_more_data() -> None:
    switch = AuthSwitchRequest(plugin="client_ed25519", data=b"n" * 32)
    assert switch.encode() == b"\xfeclient_ed25519\x00" + b"n" * 32
    assert AuthSwitchRequest.decode(switch.encode()) == switch
    assert "mysql_old_password" in malformed(AuthSwitchRequest.decode, b"\xfe").message
    assert "not an AuthSwitch" in malformed(AuthSwitchRequest.decode, b"\x01x").message
    more = AuthMoreData(data=b"\x04")
    assert more.encode() == b"\x01\x04" and AuthMoreData.decode(b"\x01\x04") == more
    assert "not an AuthMoreData" in malformed(AuthMoreData.decode, b"\x02").message


# --- fuzzing --------------------------------------------------------------------------------

DECODERS: list[Callable[[bytes], object]] = [
    Handshake.decode, HandshakeResponse.decode, AuthSwitchRequest.decode, AuthMoreData.decode,
]


test_random_bytes_raise_only_protocol_errors = fuzz_decoders(DECODERS, max_size=120)


@fuzz
@given(st.sampled_from(DECODERS[:2]), st.integers(0, 200), st.binary(min_size=1, max_size=4))
def test_mutated_examples_raise_only_protocol_errors(decode: Callable[[bytes], object],
                                                     where: int, junk: bytes) -> None:
    base = MYSQL_57 if decode is Handshake.decode else HandshakeResponse(
        capabilities=CLIENT_CAPS | Capability.CONNECT_ATTRS | Capability.CONNECT_WITH_DB,
        username="u", database="d", auth_plugin="p", attributes={"a": "b"}).encode()
    where %= len(base)
    try:
        decode(base[:where] + junk + base[where + len(junk):])
    except RemoteProtocolError:
        pass


@fuzz
@given(st.integers(0, 2**64 - 1).map(Capability.of), names, st.binary(max_size=40),
       st.one_of(st.none(), names), st.one_of(st.none(), st.dictionaries(names, names,
                                                                          max_size=3)))
def test_response_round_trips(caps: Capability, user: str, auth: bytes, database: str | None,
                              attributes: dict[str, str] | None) -> None:
    caps |= Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION
    caps &= ~Capability.ZSTD_COMPRESSION_ALGORITHM
    if database is not None:
        caps |= Capability.CONNECT_WITH_DB
    if attributes is not None:
        caps |= Capability.CONNECT_ATTRS
    response = HandshakeResponse(
        capabilities=caps, username=user, auth_response=auth,
        database=database if Capability.CONNECT_WITH_DB in caps else None,
        auth_plugin="p" if Capability.PLUGIN_AUTH in caps else None,
        attributes=attributes if Capability.CONNECT_ATTRS in caps else None)
    decoded = HandshakeResponse.decode(response.encode())
    assert HandshakeResponse.decode(decoded.encode()) == decoded
    assert decoded.username == user and decoded.auth_response == auth


@fuzz
@given(st.integers(0, 2**32 - 1), st.binary(min_size=20, max_size=20), names,
       st.integers(0, 2**64 - 1).map(Capability.of))
def test_handshake_round_trips(conn: int, nonce: bytes, version: str, caps: Capability) -> None:
    caps |= Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION
    if Capability.LONG_PASSWORD in caps:
        caps = Capability.of(caps.mysql_bits)
    hello = Handshake(server_version=version, connection_id=conn,
                      auth_plugin_data=nonce + b"\x00", capabilities=caps,
                      auth_plugin="x" if Capability.PLUGIN_AUTH in caps else None)
    assert Handshake.decode(hello.encode()) == hello


@fuzz
@given(names, st.binary(max_size=40))
def test_auth_exchange_round_trips(plugin: str, data: bytes) -> None:
    switch = AuthSwitchRequest(plugin=plugin, data=data)
    assert AuthSwitchRequest.decode(switch.encode()) == switch
    assert AuthMoreData.decode(AuthMoreData(data=data).encode()) == AuthMoreData(data=data)

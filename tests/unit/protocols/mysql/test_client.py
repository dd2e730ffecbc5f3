"""protocols.mysql.client: the upstream login state machine (client role)."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.mysql import auth, ed25519
from protocols.mysql.client import LoginReady, LoginRefused, LoginState, UpstreamLogin
from protocols.mysql.constants import Capability, ErrorNumber
from protocols.mysql.generic import ErrPacket, OkPacket
from protocols.mysql.messages import (
    AuthMoreData, AuthSwitchRequest, Handshake, HandshakeResponse, SSLRequest, StartTLS,
)
from protocols.mysql.packets import iter_packets
from protocols.signals import NEED_DATA, PAUSED
from tests.unit.protocols.feeding import FEEDS, fuzz, malformed, split

NONCE = b"abcdefghijklmnopqrst"
SERVER_CAPS = (Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION | Capability.PLUGIN_AUTH
               | Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA | Capability.CONNECT_WITH_DB
               | Capability.CONNECT_ATTRS | Capability.DEPRECATE_EOF | Capability.SSL
               | Capability.TRANSACTIONS | Capability.MULTI_RESULTS | Capability.COMPRESS
               | Capability.MARIADB_PROGRESS)


def pkt(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


def greeting(plugin: str = auth.NATIVE_PASSWORD, caps: Capability = SERVER_CAPS) -> bytes:
    return pkt(0, Handshake(server_version="5.5.5-10.11.6-MariaDB", connection_id=42,
                            auth_plugin_data=NONCE + b"\x00", capabilities=caps,
                            charset=33, status=2, auth_plugin=plugin).encode())


OK = OkPacket(status=2).encode(SERVER_CAPS)


def drive(login: UpstreamLogin,
          chunks: list[bytes]) -> tuple[list[object], list[tuple[int, bytes]]]:
    """Feed ``chunks``; answer StartTLS at once; collect events and what was sent."""
    events: list[object] = []
    sent = bytearray(login.data_to_send())
    for chunk in chunks:
        login.receive_data(chunk)
        while (event := login.next_event()) not in (NEED_DATA, PAUSED):
            events.append(event)
            sent += login.data_to_send()
            if isinstance(event, StartTLS):
                login.tls_started()
        sent += login.data_to_send()
    return events, list(iter_packets(bytes(sent)))


def response(sent: list[tuple[int, bytes]], index: int = 0) -> HandshakeResponse:
    message = HandshakeResponse.decode(sent[index][1])
    assert isinstance(message, HandshakeResponse)
    return message


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("trailing", [b"", pkt(1, b"\xff\x01\x00late")])
def test_native_password_login(how: str, trailing: bytes) -> None:
    login = UpstreamLogin(user="app", password="s3cret", database="shop",
                          attributes={"program_name": "wicket"})
    assert login.data_to_send() == b"" and "AWAIT_HANDSHAKE" in repr(login)
    events, sent = drive(login, split(greeting() + pkt(2, OK) + trailing, how))
    assert len(events) == 1 and isinstance(ready := events[0], LoginReady)
    assert ready.server.server_version == "5.5.5-10.11.6-MariaDB"
    assert ready.server.connection_id == 42 and ready.server.charset == 33
    assert ready.plugin == auth.NATIVE_PASSWORD and not ready.tls
    assert ready.ok == OkPacket(status=2) and ready.ok_payload == OK
    sent_response = response(sent)
    assert sent[0][0] == 1 and sent_response.username == "app"
    assert sent_response.auth_response == auth.native_password(b"s3cret", NONCE)
    assert sent_response.database == "shop" and sent_response.charset == 33
    assert dict(sent_response.attributes or {}) == {"program_name": "wicket"}
    caps = sent_response.capabilities
    assert caps == ready.capabilities and Capability.SSL not in caps
    assert Capability.COMPRESS not in caps  # not asked for
    assert Capability.DEPRECATE_EOF in caps and Capability.CONNECT_WITH_DB in caps
    assert login.state is LoginState.DONE and login.next_event() is PAUSED
    assert login.trailing_data == (trailing, False)


def test_tls_first_then_the_response() -> None:
    login = UpstreamLogin(user="app", password="pw", tls=True, charset=45)
    events, sent = drive(login, [greeting(), pkt(3, OK)])
    assert isinstance(events[0], StartTLS) and isinstance(events[1], LoginReady)
    assert events[1].tls and Capability.SSL in events[1].capabilities
    ssl = HandshakeResponse.decode(sent[0][1])
    assert isinstance(ssl, SSLRequest) and sent[0][0] == 1 and ssl.charset == 45
    assert sent[1][0] == 2 and response(sent, 1).charset == 45


def test_tls_is_never_given_up() -> None:
    login = UpstreamLogin(user="app", password="pw", tls=True)
    err = malformed(drive, login, [greeting(caps=SERVER_CAPS & ~Capability.SSL)])
    assert err.wire_hint == ErrorNumber.ER_NOT_SUPPORTED_AUTH_MODE
    assert err.code is ErrorCode.UPSTREAM_UNREACHABLE and "TLS" in err.message
    assert login.state is LoginState.ERROR
    assert malformed(login.next_event).message == err.message


def test_plaintext_ahead_of_tls_is_refused() -> None:
    login = UpstreamLogin(user="app", password="pw", tls=True)
    login.receive_data(greeting() + b"\x16")
    assert isinstance(login.next_event(), StartTLS) and login.next_event() is PAUSED
    assert "plaintext" in malformed(login.tls_started).message
    with pytest.raises(LocalProtocolError):
        login.tls_started()


def test_caching_sha2_fast_auth() -> None:
    login = UpstreamLogin(user="app", password="pw")
    more = pkt(2, AuthMoreData(data=auth.FAST_AUTH_SUCCESS).encode())
    events, sent = drive(login, [greeting(auth.CACHING_SHA2_PASSWORD) + more + pkt(3, OK)])
    assert isinstance(events[0], LoginReady) and events[0].plugin == auth.CACHING_SHA2_PASSWORD
    assert response(sent).auth_response == auth.caching_sha2_password(b"pw", NONCE)
    assert response(sent).auth_plugin == auth.CACHING_SHA2_PASSWORD


def full_auth(tls: bool = False, **kwargs: object) -> tuple[UpstreamLogin, list[bytes]]:
    login = UpstreamLogin(user="app", password="pw", tls=tls, **kwargs)  # type: ignore[arg-type]
    first = 3 if tls else 2
    return login, [greeting(auth.CACHING_SHA2_PASSWORD),
                   pkt(first, AuthMoreData(data=auth.PERFORM_FULL_AUTH).encode())]


def test_caching_sha2_full_auth_over_tls_sends_the_password() -> None:
    login, script = full_auth(tls=True)
    events, sent = drive(login, [*script, pkt(5, OK)])
    assert isinstance(events[-1], LoginReady)
    assert sent[-1] == (4, b"pw\x00")


def rsa_key() -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, key.public_key().public_bytes(serialization.Encoding.PEM,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)


def opened(key: rsa.RSAPrivateKey, sealed: bytes) -> bytes:
    oaep = padding.OAEP(mgf=padding.MGF1(hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    return bytes(b ^ NONCE[i % 20] for i, b in enumerate(key.decrypt(sealed, oaep)))


def test_caching_sha2_full_auth_with_a_pinned_key() -> None:
    key, pem = rsa_key()
    login, script = full_auth(server_public_key=pem)
    events, sent = drive(login, [*script, pkt(4, OK)])
    assert isinstance(events[-1], LoginReady) and opened(key, sent[-1][1]) == b"pw\x00"


def test_caching_sha2_full_auth_asking_for_the_key() -> None:
    key, pem = rsa_key()
    login, script = full_auth(request_public_key=True)
    events, sent = drive(login, [*script, pkt(4, AuthMoreData(data=pem).encode()), pkt(6, OK)])
    assert isinstance(events[-1], LoginReady)
    assert sent[1] == (3, auth.REQUEST_PUBLIC_KEY) and opened(key, sent[2][1]) == b"pw\x00"


def test_caching_sha2_full_auth_without_tls_or_key_is_refused() -> None:
    login, script = full_auth()
    err = malformed(drive, login, script)
    assert err.wire_hint == ErrorNumber.ER_NOT_SUPPORTED_AUTH_MODE and "RSA" in err.message


def test_switch_to_client_ed25519() -> None:
    nonce = b"N" * 32
    login = UpstreamLogin(user="app", password="secret")
    switch = pkt(2, AuthSwitchRequest(plugin=auth.CLIENT_ED25519, data=nonce).encode())
    events, sent = drive(login, [greeting(), switch, pkt(4, OK)])
    assert isinstance(events[0], LoginReady) and events[0].plugin == auth.CLIENT_ED25519
    assert sent[1][0] == 3
    Ed25519PublicKey.from_public_bytes(ed25519.public_key(b"secret")).verify(sent[1][1], nonce)


def test_switch_to_native_strips_the_nul() -> None:
    login = UpstreamLogin(user="app", password="pw")
    other = b"ABCDEFGHIJKLMNOPQRST"
    switch = pkt(2, AuthSwitchRequest(plugin=auth.NATIVE_PASSWORD, data=other + b"\x00").encode())
    _, sent = drive(login, [greeting(auth.CACHING_SHA2_PASSWORD), switch])
    assert sent[1] == (3, auth.native_password(b"pw", other))


@pytest.mark.parametrize("tls", [False, True])
def test_cleartext_only_over_tls(tls: bool) -> None:
    login = UpstreamLogin(user="app", password="pw", tls=tls)
    seq = 3 if tls else 2
    switch = pkt(seq, AuthSwitchRequest(plugin=auth.CLEAR_PASSWORD).encode())
    if tls:
        _, sent = drive(login, [greeting(), switch])
        assert sent[-1] == (4, b"pw\x00")
    else:
        err = malformed(drive, login, [greeting(), switch])
        assert "cleartext" in err.message and err.wire_hint == 1251


@pytest.mark.parametrize(("plugin", "words"), [
    ("dialog", "does not support"), (auth.CLIENT_ED25519, "does not allow"),
])
def test_plugins_outside_the_allowed_set(plugin: str, words: str) -> None:
    login = UpstreamLogin(user="app", password="pw", plugins={auth.NATIVE_PASSWORD})
    switch = pkt(2, AuthSwitchRequest(plugin=plugin, data=b"n" * 32).encode())
    err = malformed(drive, login, [greeting(), switch])
    assert words in err.message and err.wire_hint == ErrorNumber.ER_NOT_SUPPORTED_AUTH_MODE


def test_an_unusable_offer_is_answered_with_an_allowed_plugin() -> None:
    login = UpstreamLogin(user="app", password="pw", plugins={auth.CACHING_SHA2_PASSWORD})
    _, sent = drive(login, [greeting("auth_gssapi_client")])
    assert response(sent).auth_plugin == auth.CACHING_SHA2_PASSWORD
    login = UpstreamLogin(user="app", password="pw", plugins={auth.CLIENT_ED25519})
    _, sent = drive(login, [greeting("auth_gssapi_client")])
    assert response(sent).auth_plugin == "auth_gssapi_client"
    assert response(sent).auth_response == b""
    with pytest.raises(ValueError):
        UpstreamLogin(user="app", plugins={"dialog"})


def test_no_password_for_certificate_accounts() -> None:
    login = UpstreamLogin(user="app", tls=True)
    events, sent = drive(login, [greeting(), pkt(3, OK)])
    assert isinstance(events[-1], LoginReady) and response(sent, 1).auth_response == b""
    login = UpstreamLogin(user="app")
    switch = pkt(2, AuthSwitchRequest(plugin=auth.CLIENT_ED25519, data=b"n" * 32).encode())
    assert "no password" in malformed(drive, login, [greeting(), switch]).message
    login, script = full_auth()
    login = UpstreamLogin(user="app")
    assert "no password" in malformed(drive, login, script).message


@pytest.mark.parametrize("how", FEEDS)
def test_refusals_carry_the_servers_err_verbatim(how: str) -> None:
    denied = ErrPacket.of(1045, "Access denied for user 'app'@'10.0.0.1'").encode()
    login = UpstreamLogin(user="app", password="pw")
    events, _ = drive(login, split(greeting() + pkt(2, denied), how))
    assert events == [LoginRefused(error=ErrPacket.decode(denied), payload=denied)]
    assert login.trailing_data == (b"", False)
    busy = b"\xff\x10\x04Too many connections"
    events, _ = drive(UpstreamLogin(user="app"), split(pkt(0, busy), how))
    assert isinstance(events[0], LoginRefused) and events[0].error.sqlstate is None


@pytest.mark.parametrize(("script", "words"), [
    ([greeting(), pkt(3, OK)], "packets out of order"),
    ([greeting(), pkt(2, b"\x05")], "out of turn"),
    ([pkt(0, b"\x09junk")], "out of turn"),
    ([greeting(), pkt(2, AuthMoreData(data=b"\x03").encode())], "AuthMoreData"),
    ([greeting(auth.CACHING_SHA2_PASSWORD), pkt(2, AuthMoreData(data=b"\x07").encode())],
     "unknown message"),
    ([greeting(), pkt(2, AuthSwitchRequest(plugin="mysql_native_password").encode()),
      pkt(4, AuthSwitchRequest(plugin="mysql_native_password").encode()),
      pkt(6, AuthSwitchRequest(plugin="mysql_native_password").encode())], "keeps switching"),
    ([b"\xff\xff\x7f\x00"], "over"),
])
def test_misbehaving_servers(script: list[bytes], words: str) -> None:
    err = malformed(drive, UpstreamLogin(user="app", password="pw"), script)
    assert words in err.message and err.code is ErrorCode.UPSTREAM_UNREACHABLE


def test_hanging_up_mid_login() -> None:
    login = UpstreamLogin(user="app", password="pw")
    drive(login, [greeting()])
    login.receive_data(b"")
    err = malformed(login.next_event)
    assert err.wire_hint == ErrorNumber.CR_SERVER_LOST


def test_calls_out_of_turn() -> None:
    login = UpstreamLogin(user="app", password="pw")
    with pytest.raises(LocalProtocolError):
        login.tls_started()
    with pytest.raises(LocalProtocolError):
        _ = login.trailing_data


@fuzz
@given(st.binary(max_size=80))
def test_random_server_bytes_raise_only_protocol_errors(data: bytes) -> None:
    login = UpstreamLogin(user="app", password="pw", tls=True, max_message_size=200)
    try:
        drive(login, [greeting(), data])
    except RemoteProtocolError as exc:
        assert exc.code is ErrorCode.UPSTREAM_UNREACHABLE

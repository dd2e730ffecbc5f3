"""protocols.postgres.scram: SCRAM-SHA-256, md5, and the upstream login state machine."""

from __future__ import annotations

import base64
import hashlib
import hmac
import pickle
import struct
from collections.abc import Iterable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.postgres import messages as m
from protocols.postgres.messages import NEED_DATA, PAUSED
from tests.unit.protocols.feeding import fuzz, split
from protocols.postgres.scram import (
    AuthMethod, LoginReady, LoginState, ScramSHA256Client, UpstreamLogin, UpstreamLoginError,
    md5_password, saslprep,
)


# RFC 7677 section 3: user "user", password "pencil".
RFC_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096")
RFC_CLIENT_FINAL = (b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
                    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=")
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


# --- SCRAM against the RFC test vector ------------------------------------------------


def rfc_client() -> ScramSHA256Client:
    return ScramSHA256Client("pencil", username="user", nonce=RFC_NONCE)


def test_rfc7677_exchange() -> None:
    client = rfc_client()
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    assert not client.done
    client.verify_server_final(RFC_SERVER_FINAL)
    assert client.done and "DONE" in repr(client)


def test_wrong_server_signature_is_refused() -> None:
    client = rfc_client()
    client.client_first()
    client.client_final(RFC_SERVER_FIRST)
    forged = b"v=" + base64.b64encode(b"\x00" * 32)
    with pytest.raises(RemoteProtocolError) as info:
        client.verify_server_final(forged)
    assert info.value.code is ErrorCode.UPSTREAM_UNREACHABLE
    assert info.value.wire_hint == "08006" and "signature" in info.value.message
    assert not client.done
    with pytest.raises(LocalProtocolError):  # no second try
        client.verify_server_final(RFC_SERVER_FINAL)


def test_wrong_password_gives_a_different_proof() -> None:
    client = ScramSHA256Client("pencil2", username="user", nonce=RFC_NONCE)
    client.client_first()
    assert client.client_final(RFC_SERVER_FIRST) != RFC_CLIENT_FINAL
    with pytest.raises(RemoteProtocolError):
        client.verify_server_final(RFC_SERVER_FINAL)


def test_username_is_escaped_and_nonce_is_random() -> None:
    client = ScramSHA256Client("pw", username="a=b,c")
    first = client.client_first()
    assert first.startswith(b"n,,n=a=3Db=2Cc,r=")
    other = ScramSHA256Client("pw").client_first()
    assert other.startswith(b"n,,n=,r=") and other[8:] != first[17:]
    assert len(other) == len(b"n,,n=,r=") + 24


@pytest.mark.parametrize("nonce", ["", "a,b", "tab\t", "é"])
def test_bad_nonce_is_refused(nonce: str) -> None:
    with pytest.raises(ValueError):
        ScramSHA256Client("pw", nonce=nonce)


@pytest.mark.parametrize("server_first, words", [
    (b"\xff", "UTF-8"),
    (b"m=ext," + RFC_SERVER_FIRST, "extension"),
    (b"r=rOprNGfwEbeRWgbNEkqOx,s=W22ZaJ0SNY7soEsUEjb6gQ==", "malformed"),
    (b"s=W22ZaJ0SNY7soEsUEjb6gQ==,r=rOprNGfwEbeRWgbNEkqOx,i=4096", "malformed"),
    (b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
    (b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),  # not extended
    (b"r=rOprNGfwEbeRWgbNEkqO\x7f,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096", "nonce"),
    (b"r=rOprNGfwEbeRWgbNEkqOx,s=not base64!,i=4096", "base64"),
    (b"r=rOprNGfwEbeRWgbNEkqOx,s=\xc3\xa9,i=4096", "base64"),
    (b"r=rOprNGfwEbeRWgbNEkqOx,s=,i=4096", "empty"),
    (b"r=rOprNGfwEbeRWgbNEkqOx,s=c2FsdA==,i=0", "iteration"),
    (b"r=rOprNGfwEbeRWgbNEkqOx,s=c2FsdA==,i=-1", "iteration"),
    (b"r=rOprNGfwEbeRWgbNEkqOx,s=c2FsdA==,i=", "iteration"),
    (b"r=rOprNGfwEbeRWgbNEkqOx,s=c2FsdA==,i=\xd9\xa3", "iteration"),  # Arabic-Indic digit
    (b"r=rOprNGfwEbeRWgbNEkqOx,s=c2FsdA==,i=1000001", "iteration"),
])
def test_bad_server_first(server_first: bytes, words: str) -> None:
    client = rfc_client()
    client.client_first()
    with pytest.raises(RemoteProtocolError) as info:
        client.client_final(server_first)
    assert words in info.value.message and info.value.wire_hint == "08006"


def test_iteration_cap_is_configurable() -> None:
    client = ScramSHA256Client("pencil", username="user", nonce=RFC_NONCE, max_iterations=4095)
    client.client_first()
    with pytest.raises(RemoteProtocolError):
        client.client_final(RFC_SERVER_FIRST)


@pytest.mark.parametrize("server_final, words", [
    (b"\xff", "UTF-8"),
    (b"e=invalid-proof", "error: invalid-proof"),
    (b"e=<script>", "(unprintable)"),
    (b"x=abc", "malformed"),
    (b"v=***", "base64"),
])
def test_bad_server_final(server_final: bytes, words: str) -> None:
    client = rfc_client()
    client.client_first()
    client.client_final(RFC_SERVER_FIRST)
    with pytest.raises(RemoteProtocolError) as info:
        client.verify_server_final(server_final)
    assert words in info.value.message


def test_steps_out_of_order() -> None:
    client = rfc_client()
    with pytest.raises(LocalProtocolError):
        client.client_final(RFC_SERVER_FIRST)
    with pytest.raises(LocalProtocolError):
        client.verify_server_final(RFC_SERVER_FINAL)
    client.client_first()
    with pytest.raises(LocalProtocolError):
        client.client_first()


# --- SASLprep and passwords -----------------------------------------------------------------


@pytest.mark.parametrize("text, prepared", [
    ("pencil", "pencil"),
    ("", ""),
    ("I\u00adX", "IX"),  # soft hyphen maps to nothing (RFC 4013 section 3)
    ("user\u00a0name", "user name"),  # no-break space maps to space
    ("\u2168", "IX"),  # ROMAN NUMERAL NINE, NFKC
    ("\u00aa", "a"),
    ("caf\u0065\u0301", "caf\u00e9"),
    ("\u05d0\u05d1", "\u05d0\u05d1"),  # right-to-left only: fine
])
def test_saslprep(text: str, prepared: str) -> None:
    assert saslprep(text) == prepared


@pytest.mark.parametrize("text", [
    "\u0007",  # ASCII control
    "a\u0080b",  # non-ASCII control
    "\ue000",  # private use
    "a\u0221",  # unassigned in Unicode 3.2
    "\u05d0a",  # right-to-left mixed with left-to-right
    "\u05d01",  # must end right-to-left
])
def test_saslprep_prohibits(text: str) -> None:
    with pytest.raises(ValueError):
        saslprep(text)


class Server:
    """A SCRAM-SHA-256 server written from RFC 5802, for the login tests."""

    def __init__(self, password: bytes, *, salt: bytes = b"0123456789abcdef",
                 iterations: int = 4096) -> None:
        self.salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        self.salt, self.iterations = salt, iterations

    def first(self, client_first: bytes) -> bytes:
        assert client_first.startswith(b"n,,")
        self.client_first_bare = client_first[3:]
        nonce = dict(p.split(b"=", 1) for p in self.client_first_bare.split(b","))[b"r"]
        self.server_first = (b"r=" + nonce + b"SERVERNONCE,s=" + base64.b64encode(self.salt)
                             + b",i=" + str(self.iterations).encode())
        return self.server_first

    def final(self, client_final: bytes) -> bytes | None:
        without_proof, proof = client_final.rsplit(b",p=", 1)
        auth = self.client_first_bare + b"," + self.server_first + b"," + without_proof
        client_key = hmac.new(self.salted, b"Client Key", "sha256").digest()
        stored = hashlib.sha256(client_key).digest()
        signature = hmac.new(stored, auth, "sha256").digest()
        recovered = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature))
        if hashlib.sha256(recovered).digest() != stored:
            return None
        server_key = hmac.new(self.salted, b"Server Key", "sha256").digest()
        return b"v=" + base64.b64encode(hmac.new(server_key, auth, "sha256").digest())


@pytest.mark.parametrize("password, server_sees", [
    ("pencil", b"pencil"),
    ("\u2168", b"IX"),  # prepared
    ("bell\u0007", b"bell\x07"),  # SASLprep refuses it: used as is, as libpq does
    (b"caf\xe9", b"caf\xe9"),  # not UTF-8: used as is
    ("\ud800", b"\xed\xa0\x80"),  # a lone surrogate, used as is
    (b"\xe2\x85\xa8", b"IX"),  # bytes that are UTF-8 are prepared
])
def test_scram_password_preparation(password: str | bytes, server_sees: bytes) -> None:
    server = Server(server_sees)
    client = ScramSHA256Client(password)
    final = server.final(client.client_final(server.first(client.client_first())))
    assert final is not None
    client.verify_server_final(final)


def test_md5_password_known_value() -> None:
    # Computed with md5sum(1): md5("secret" "postgres") is 53f48b7c..., and
    # md5 of that hex text followed by the salt 01 02 03 04 is bb41a296...
    expected = b"md5bb41a296aab6baccb36ff243a562abff"
    assert md5_password("postgres", "secret", b"\x01\x02\x03\x04") == expected
    assert md5_password(b"postgres", b"secret", b"\x01\x02\x03\x04") == expected
    with pytest.raises(LocalProtocolError):
        md5_password("u", "p", b"abc")


# --- the upstream login ---------------------------------------------------------------------


PARAMS = [("server_version", "17.2"), ("client_encoding", "UTF8"), ("TimeZone", "UTC")]
KEY = m.BackendKeyData(process_id=4711, secret_key=b"\x09\x08\x07\x06")


def after_ok(status: str = "I") -> bytes:
    return (b"".join(m.ParameterStatus(name=n, value=v).encode() for n, v in PARAMS)
            + KEY.encode() + m.ReadyForQuery(status=status).encode())




class Run:
    """Drive an UpstreamLogin; ``reply(sent)`` gives the server's next bytes."""

    def __init__(self, login: UpstreamLogin) -> None:
        self.login = login
        self.sent: list[bytes] = []

    def feed(self, data: bytes, how: str = "whole") -> LoginReady | None:
        ready = None
        for chunk in split(data, how):
            self.login.receive_data(chunk)
            event = self.login.next_event()
            out = self.login.data_to_send()
            if out:
                self.sent.append(out)
            if isinstance(event, LoginReady):
                ready = event
        return ready


def typed(data: bytes) -> tuple[bytes, bytes]:
    assert struct.unpack(">I", data[1:5])[0] == len(data) - 1
    return data[:1], data[5:]


def test_startup_message_is_sent_first() -> None:
    login = UpstreamLogin(user="app", parameters={"application_name": "wicket/psql"})
    first = login.data_to_send()
    assert login.data_to_send() == b""
    startup = m.decode_startup_packet(first[4:])
    assert isinstance(startup, m.StartupMessage)
    assert dict(startup.parameters) == {"user": "app", "database": "app",
                                        "application_name": "wicket/psql"}
    assert login.state is LoginState.AWAIT_AUTH and login.next_event() is NEED_DATA
    for key in ("user", "database", "_pq_.x"):
        with pytest.raises(LocalProtocolError):
            UpstreamLogin(user="app", parameters={key: "x"})
    with pytest.raises(ValueError):
        UpstreamLogin(user="app", password="a\x00b")
    with pytest.raises(ValueError):
        UpstreamLogin(user="app", password="\ud800")


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize("trailing", [b"", m.NoticeResponse.create(
    severity="NOTICE", sqlstate="00000", message="later").encode()])
def test_trust_login(how: str, trailing: bytes) -> None:
    login = UpstreamLogin(user="app", database="orders")
    login.data_to_send()
    data = m.AuthenticationOk().encode() + after_ok("I")
    ready = Run(login).feed(data + trailing, how)
    assert ready is not None
    assert ready.method is AuthMethod.TRUST
    assert list(ready.parameters.items()) == PARAMS
    assert ready.backend_key == KEY and ready.transaction_status == "I"
    assert ready.client_bytes == data and ready.negotiated is None and ready.notices == ()
    assert login.state is LoginState.READY and login.next_event() is PAUSED
    assert login.trailing_data == (trailing, False)
    assert "<" in repr(ready) and "READY" in repr(login)


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_cleartext_login(how: str) -> None:
    login = UpstreamLogin(user="app", password="s3cret")
    login.data_to_send()
    run = Run(login)
    assert run.feed(m.AuthenticationCleartextPassword().encode(), how) is None
    assert run.sent == [m.PasswordMessage(password=b"s3cret").encode()]
    assert login.state is LoginState.AWAIT_OK
    ready = run.feed(m.AuthenticationOk().encode() + after_ok(), how)
    assert ready is not None and ready.method is AuthMethod.CLEARTEXT


def test_md5_login() -> None:
    login = UpstreamLogin(user="postgres", password="secret")
    login.data_to_send()
    run = Run(login)
    run.feed(m.AuthenticationMD5Password(salt=b"\x01\x02\x03\x04").encode())
    assert run.sent == [m.PasswordMessage(password=b"md5bb41a296aab6baccb36ff243a562abff").encode()]
    ready = run.feed(m.AuthenticationOk().encode() + after_ok())
    assert ready is not None and ready.method is AuthMethod.MD5


def scram_login(how: str, *, password: str = "pencil", server_password: bytes = b"pencil",
                tamper: bool = False) -> tuple[Run, LoginReady | None]:
    login = UpstreamLogin(user="app", password=password, scram_nonce="clientnonce")
    login.data_to_send()
    run = Run(login)
    server = Server(server_password)
    run.feed(m.AuthenticationSASL(mechanisms=("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")).encode(),
             how)
    mtype, body = typed(run.sent[-1])
    assert mtype == b"p" and body.startswith(b"SCRAM-SHA-256\x00")
    (size,) = struct.unpack(">i", body[14:18])
    client_first = body[18:]
    assert size == len(client_first) and client_first.startswith(b"n,,n=,r=clientnonce")
    assert login.state is LoginState.AWAIT_SASL_CONTINUE
    run.feed(m.AuthenticationSASLContinue(data=server.first(client_first)).encode(), how)
    mtype, client_final = typed(run.sent[-1])
    assert login.state is LoginState.AWAIT_SASL_FINAL
    final = server.final(client_final)
    if final is None:  # the server would refuse with 28P01
        error = m.ErrorResponse.create(severity="FATAL", sqlstate="28P01",
                                       message='password authentication failed for user "app"')
        run.feed(error.encode(), how)
        raise AssertionError("unreachable")
    if tamper:
        final = final[:-4] + b"AAA="
    run.feed(m.AuthenticationSASLFinal(data=final).encode(), how)
    assert login.state is LoginState.AWAIT_OK
    return run, run.feed(m.AuthenticationOk().encode() + after_ok("T"), how)


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_scram_login(how: str) -> None:
    _, ready = scram_login(how)
    assert ready is not None and ready.method is AuthMethod.SCRAM_SHA_256
    assert ready.transaction_status == "T"
    assert ready.client_bytes == m.AuthenticationOk().encode() + after_ok("T")


def test_scram_wrong_password_is_the_server_refusal() -> None:
    with pytest.raises(UpstreamLoginError) as info:
        scram_login("whole", password="wrong")
    err = info.value
    assert err.code is ErrorCode.ACCESS_DENIED and err.wire_hint == "28P01"
    assert err.response is not None and err.response.sqlstate == "28P01"
    assert err.message == 'password authentication failed for user "app"'


def test_scram_forged_server_signature_is_refused() -> None:
    with pytest.raises(UpstreamLoginError) as info:
        scram_login("whole", tamper=True)
    assert info.value.code is ErrorCode.UPSTREAM_UNREACHABLE
    assert info.value.wire_hint == "08006" and info.value.response is None


def test_scram_ok_without_server_final_is_refused() -> None:
    # A server that skips SASLFinal must not get away with it.
    login = UpstreamLogin(user="app", password="pencil")
    login.data_to_send()
    run = Run(login)
    run.feed(m.AuthenticationSASL(mechanisms=("SCRAM-SHA-256",)).encode())
    server = Server(b"pencil")
    client_first = typed(run.sent[-1])[1][18:]
    run.feed(m.AuthenticationSASLContinue(data=server.first(client_first)).encode())
    with pytest.raises(UpstreamLoginError) as info:
        run.feed(m.AuthenticationOk().encode())
    assert "out of turn" in info.value.message


@pytest.mark.parametrize("error, sqlstate, code", [
    (m.ErrorResponse.create(severity="FATAL", sqlstate="28000", message="no pg_hba.conf entry"),
     "28000", ErrorCode.ACCESS_DENIED),
    (m.ErrorResponse.create(severity="FATAL", sqlstate="53300", message="too many clients"),
     "53300", ErrorCode.RATE_LIMITED),
    (m.ErrorResponse(fields={"S": "FATAL"}), "08006", ErrorCode.INTERNAL_ERROR),
])
def test_refusal_before_auth(error: m.ErrorResponse, sqlstate: str, code: ErrorCode) -> None:
    login = UpstreamLogin(user="app", password="pw")
    login.receive_data(error.encode())
    with pytest.raises(UpstreamLoginError) as info:
        login.next_event()
    assert info.value.wire_hint == sqlstate and info.value.code is code
    assert info.value.response == error
    assert login.state is LoginState.ERROR
    # Poisoned: the same error again, and more bytes change nothing.
    login.receive_data(b"more")
    with pytest.raises(UpstreamLoginError) as again:
        login.next_event()
    assert again.value.response == error
    if error.message is None:
        assert info.value.message == "the upstream server refused the connection"


def test_refusal_after_auth_ok() -> None:
    # "database does not exist" comes after AuthenticationOk.
    login = UpstreamLogin(user="app", database="nope")
    error = m.ErrorResponse.create(severity="FATAL", sqlstate="3D000",
                                   message='database "nope" does not exist')
    login.receive_data(m.AuthenticationOk().encode() + error.encode())
    with pytest.raises(UpstreamLoginError) as info:
        login.next_event()
    assert info.value.code is ErrorCode.RESOURCE_NOT_FOUND and info.value.wire_hint == "3D000"


def test_login_error_pickles_whole() -> None:
    error = m.ErrorResponse.create(severity="FATAL", sqlstate="3D000", message="x")
    exc = UpstreamLoginError.from_response(error)
    again = pickle.loads(pickle.dumps(exc))
    assert type(again) is UpstreamLoginError and again.response == error
    assert (again.message, again.code, again.wire_hint) == ("x", exc.code, "3D000")
    plain = pickle.loads(pickle.dumps(UpstreamLoginError("m")))
    assert plain.response is None and plain.message == "m"


@pytest.mark.parametrize("request_, methods, password, words", [
    (m.AuthenticationOk(), {AuthMethod.SCRAM_SHA_256}, "pw", "without a password"),
    (m.AuthenticationCleartextPassword(), {AuthMethod.SCRAM_SHA_256}, "pw", "does not allow"),
    (m.AuthenticationMD5Password(salt=b"salt"), {AuthMethod.SCRAM_SHA_256}, "pw",
     "does not allow"),
    (m.AuthenticationCleartextPassword(), set(AuthMethod), None, "no password"),
    (m.AuthenticationSASL(mechanisms=("SCRAM-SHA-256",)), set(AuthMethod), None, "no password"),
    (m.AuthenticationSASL(mechanisms=("SCRAM-SHA-256-PLUS", "OAUTHBEARER")), set(AuthMethod),
     "pw", "offered: SCRAM-SHA-256-PLUS, OAUTHBEARER"),
    (m.AuthenticationSASL(mechanisms=()), set(AuthMethod), "pw", "offered: none"),
    (m.AuthenticationOther(code=7), set(AuthMethod), "pw", "method 7"),
])
def test_methods_we_will_not_use(request_: object, methods: set[AuthMethod],
                                 password: str | None, words: str) -> None:
    login = UpstreamLogin(user="app", password=password, methods=methods)
    login.receive_data(request_.encode())  # type: ignore[attr-defined]
    with pytest.raises(UpstreamLoginError) as info:
        login.next_event()
    assert words in info.value.message
    assert info.value.wire_hint == "08004" and info.value.code is ErrorCode.UPSTREAM_UNREACHABLE
    assert login.data_to_send().startswith(b"\x00")  # only the StartupMessage went out


@pytest.mark.parametrize("data", [
    m.ParameterStatus(name="a", value="b").encode(),  # before authentication
    m.ReadyForQuery().encode(),
    m.AuthenticationSASLContinue(data=b"x").encode(),
    m.AuthenticationOk().encode() + m.AuthenticationOk().encode(),
    m.AuthenticationOk().encode() + m.NegotiateProtocolVersion().encode(),
    m.AuthenticationOk().encode() + b"D\x00\x00\x00\x06\x00\x00",  # DataRow
    b"R\x00\x00\x00\x03",  # bad length
    b"R" + struct.pack(">I", 64 * 1024 + 5) + b"\x00" * 10,  # too long
    b"Z\x00\x00\x00\x05Q",  # malformed for the codec
])
def test_out_of_turn_or_malformed(data: bytes) -> None:
    login = UpstreamLogin(user="app")
    login.receive_data(data)
    with pytest.raises(UpstreamLoginError) as info:
        login.next_event()
    assert info.value.wire_hint == "08006" and info.value.code is ErrorCode.UPSTREAM_UNREACHABLE


def test_notices_and_negotiation_are_collected() -> None:
    notice = m.NoticeResponse.create(severity="WARNING", sqlstate="01000", message="careful")
    npv = m.NegotiateProtocolVersion(newest_minor=0, unrecognized=("_pq_.x",))
    login = UpstreamLogin(user="app")
    data = notice.encode() + npv.encode() + m.AuthenticationOk().encode()
    login.receive_data(data + notice.encode() + after_ok())
    ready = login.next_event()
    assert isinstance(ready, LoginReady)
    assert ready.notices == (notice, notice) and ready.negotiated == npv
    # Only what follows AuthenticationOk (itself included) is for the client.
    assert ready.client_bytes == m.AuthenticationOk().encode() + notice.encode() + after_ok()


def test_notice_and_parameter_floods_are_bounded() -> None:
    notice = m.NoticeResponse.create(severity="NOTICE", sqlstate="00000", message="n").encode()
    login = UpstreamLogin(user="app")
    login.receive_data(notice * 100)
    assert login.next_event() is NEED_DATA
    login.receive_data(m.AuthenticationOk().encode() + after_ok())
    ready = login.next_event()
    assert isinstance(ready, LoginReady) and len(ready.notices) == 64
    login = UpstreamLogin(user="app", max_message_size=1024)
    login.receive_data(m.AuthenticationOk().encode())
    with pytest.raises(UpstreamLoginError) as info:
        for _ in range(1000):
            login.receive_data(m.ParameterStatus(name="p", value="v" * 100).encode())
            login.next_event()
    assert "too much" in info.value.message


def test_buffer_overflow_poisons() -> None:
    login = UpstreamLogin(user="app", max_message_size=100)
    login.receive_data(b"N" + b"\x00" * 300)  # more than the buffer holds, unparsed
    with pytest.raises(UpstreamLoginError) as info:
        login.next_event()
    assert info.value.wire_hint == "08006"


@pytest.mark.parametrize("data", [b"", m.AuthenticationOk().encode()[:4],
                                  m.AuthenticationOk().encode()])
def test_eof_during_login(data: bytes) -> None:
    login = UpstreamLogin(user="app")
    if data:
        login.receive_data(data)
        assert login.next_event() is NEED_DATA
    login.receive_data(b"")
    with pytest.raises(UpstreamLoginError) as info:
        login.next_event()
    assert "closed" in info.value.message
    with pytest.raises(LocalProtocolError):
        login.receive_data(b"x")


def test_trailing_data_only_when_ready() -> None:
    login = UpstreamLogin(user="app")
    with pytest.raises(LocalProtocolError):
        login.trailing_data
    login.receive_data(m.AuthenticationOk().encode() + after_ok())
    login.receive_data(b"")
    assert isinstance(login.next_event(), LoginReady)
    assert login.trailing_data == (b"", True)


# --- fuzzing ---------------------------------------------------------------------------------


def drive(login: UpstreamLogin, chunks: Iterable[bytes]) -> list[object]:
    events = []
    for chunk in chunks:
        login.receive_data(chunk)
        events.append(login.next_event())
        login.data_to_send()
    return events


@fuzz
@given(data=st.binary(max_size=200), eof=st.booleans())
def test_fuzz_random_server_bytes(data: bytes, eof: bool) -> None:
    login = UpstreamLogin(user="app", password="pw")
    try:
        drive(login, [data] + ([b""] if eof else []))
    except UpstreamLoginError as exc:
        assert isinstance(exc, RemoteProtocolError)


@fuzz
@given(prefix=st.lists(st.sampled_from([
    m.AuthenticationOk().encode(), m.AuthenticationCleartextPassword().encode(),
    m.AuthenticationMD5Password(salt=b"abcd").encode(),
    m.AuthenticationSASL(mechanisms=("SCRAM-SHA-256",)).encode(),
    m.AuthenticationSASLContinue(data=b"r=x,s=c2FsdA==,i=1").encode(),
    m.AuthenticationSASLFinal(data=b"v=AAAA").encode(), KEY.encode(),
    m.ReadyForQuery().encode(), m.ParameterStatus(name="a", value="b").encode(),
]), max_size=6), noise=st.binary(max_size=12))
def test_fuzz_message_sequences(prefix: list[bytes], noise: bytes) -> None:
    login = UpstreamLogin(user="app", password="pw")
    try:
        drive(login, [b"".join(prefix) + noise])
    except UpstreamLoginError:
        pass


@fuzz
@given(cuts=st.lists(st.integers(min_value=1, max_value=150), max_size=10))
def test_fuzz_chunking_of_a_valid_login(cuts: list[int]) -> None:
    data = (m.AuthenticationMD5Password(salt=b"\x01\x02\x03\x04").encode()
            + m.AuthenticationOk().encode() + after_ok())
    bounds = [0, *sorted(c for c in cuts if c < len(data)), len(data)]
    login = UpstreamLogin(user="postgres", password="secret")
    events = drive(login, [data[a:b] for a, b in zip(bounds, bounds[1:]) if a < b])
    ready = [e for e in events if isinstance(e, LoginReady)]
    assert len(ready) == 1 and ready[0].method is AuthMethod.MD5
    assert ready[0].client_bytes == m.AuthenticationOk().encode() + after_ok()

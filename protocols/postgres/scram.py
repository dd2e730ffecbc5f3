"""Logging in to an upstream PostgreSQL server with a password: the cluster's side.

Spec: PostgreSQL docs, "Frontend/Backend Protocol": Start-up, SASL
Authentication; RFC 5802 (SCRAM), RFC 7677 (SCRAM-SHA-256), RFC 4013
(SASLprep). Password types: ``password`` (cleartext), ``md5`` and
``scram-sha-256``.

Theory of operation
-------------------
:class:`ScramSHA256Client` is the SCRAM exchange alone (no channel binding:
the gs2 header is ``n,,``), three calls in a fixed order; its core, shared
with MongoDB, is :class:`protocols.scram.ScramClient`. It checks the
server's signature, so a server that does not know the password (an
impostor) cannot make the login succeed.

:class:`UpstreamLogin` is the whole startup, sans-I/O and h11/h2 style: it
opens with a StartupMessage in its outbox (``data_to_send()``), then the
caller loops ``receive_data(upstream bytes)`` / ``data_to_send()`` /
``next_event()`` until next_event() returns a :class:`LoginReady`. That
event carries everything the client must see to start its session, as raw
bytes (AuthenticationOk through ReadyForQuery), plus what they say
(ParameterStatus, BackendKeyData). A server refusal (ErrorResponse) or any
misbehaviour raises :class:`UpstreamLoginError`, whose ``code`` and
``wire_hint`` (a SQLSTATE) are ready for a dial refusal, and whose
``response`` holds the server's own ErrorResponse when there was one.

The state table below says which message may come in which state; a
message missing from it is a protocol violation. Once SCRAM has started,
AuthenticationOk is only accepted after the server signature verified:
otherwise a server could skip the proof step.

PBKDF2 runs inside next_event() (4096 iterations by default, about a
millisecond); ``max_iterations`` bounds what a hostile server can ask for.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType
from typing import Final, Literal

import attrs

from protocols.buffer import BufferedReceiver, ReceiveBuffer
from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.framing import POSTGRES_MESSAGE, FrameSplitter
from protocols.scram import DEFAULT_MAX_ITERATIONS, ScramClient, saslprep
from protocols.postgres.messages import (
    AuthenticationCleartextPassword, AuthenticationMD5Password, AuthenticationOk,
    AuthenticationOther, AuthenticationSASL, AuthenticationSASLContinue, AuthenticationSASLFinal,
    BackendKeyData, ErrorResponse, NegotiateProtocolVersion, NoticeResponse, ParameterStatus,
    NEED_DATA, PAUSED, PasswordMessage, ReadyForQuery, SASLInitialResponse, SASLResponse, Signal,
    SqlState, StartupMessage, decode_backend, error_code_for_sqlstate, frame,
)

__all__ = [
    "saslprep", "md5_password", "ScramSHA256Client", "SCRAM_SHA_256",
    "DEFAULT_MAX_ITERATIONS", "AuthMethod", "ALL_METHODS", "LoginState", "LoginReady",
    "UpstreamLoginError", "UpstreamLogin",
]

SCRAM_SHA_256: Final = "SCRAM-SHA-256"


def _upstream_error(message: str) -> RemoteProtocolError:
    # The client did nothing wrong: it hears "connection failure".
    return RemoteProtocolError(message, code=ErrorCode.UPSTREAM_UNREACHABLE,
                               wire_hint=SqlState.CONNECTION_FAILURE)


# --- password preparation -------------------------------------------------------


def _scram_password(password: str | bytes) -> bytes:
    # As libpq does: SASLprep when the password is valid UTF-8 and SASLprep
    # accepts it, else the password's bytes as they are.
    try:
        text = password.decode("utf-8") if isinstance(password, bytes) else password
        return saslprep(text).encode("utf-8")
    except (UnicodeError, ValueError):
        return password if isinstance(password, bytes) else password.encode("utf-8",
                                                                            "surrogatepass")


def _as_bytes(value: str | bytes) -> bytes:
    return value if isinstance(value, bytes) else value.encode("utf-8")


def md5_password(user: str | bytes, password: str | bytes, salt: bytes) -> bytes:
    """The md5 password message body: ``"md5" + md5(md5(password + user) + salt)``
    in hex, where the inner digest is used as its hex text."""
    if len(salt) != 4:
        raise LocalProtocolError("an md5 salt is 4 bytes", code=ErrorCode.BAD_REQUEST)
    inner = hashlib.md5(_as_bytes(password) + _as_bytes(user)).hexdigest().encode("ascii")
    return b"md5" + hashlib.md5(inner + salt).hexdigest().encode("ascii")


# --- SCRAM-SHA-256 (the shared core in protocols/scram.py) ----------------------------


class ScramSHA256Client(ScramClient):
    """The client half of one SCRAM-SHA-256 exchange (RFC 5802 / 7677).

    Call :meth:`client_first`, then :meth:`client_final` with the server's
    first message, then :meth:`verify_server_final` with its last one.
    Server messages that are malformed, or a signature that does not verify,
    raise RemoteProtocolError (UPSTREAM_UNREACHABLE, SQLSTATE 08006); calls
    out of order raise LocalProtocolError. PostgreSQL ignores the SCRAM user
    name (the StartupMessage's counts) and libpq sends an empty one: so do we
    unless told otherwise. The password is prepared as libpq prepares it.
    """

    def __init__(self, password: str | bytes, *, username: str = "", nonce: str | None = None,
                 max_iterations: int = DEFAULT_MAX_ITERATIONS) -> None:
        super().__init__(_scram_password(password), mechanism=SCRAM_SHA_256, username=username,
                         nonce=nonce, max_iterations=max_iterations, error=_upstream_error)


# --- the whole login ------------------------------------------------------------------


class AuthMethod(enum.Enum):
    TRUST = "trust"  # AuthenticationOk with no password asked (trust, cert, peer, ...)
    CLEARTEXT = "password"
    MD5 = "md5"
    SCRAM_SHA_256 = "scram-sha-256"


ALL_METHODS: Final = frozenset(AuthMethod)


class LoginState(enum.Enum):
    AWAIT_AUTH = "AWAIT_AUTH"  # StartupMessage sent; what does the server want?
    AWAIT_OK = "AWAIT_OK"  # our password or SCRAM proof went out
    AWAIT_SASL_CONTINUE = "AWAIT_SASL_CONTINUE"
    AWAIT_SASL_FINAL = "AWAIT_SASL_FINAL"
    AUTHENTICATED = "AUTHENTICATED"  # reading ParameterStatus/BackendKeyData until ReadyForQuery
    READY = "READY"
    ERROR = "ERROR"


@attrs.frozen(kw_only=True)
class LoginReady:
    """Logged in; the session can start.

    ``client_bytes`` is what the client must receive to start its session,
    verbatim: the server's AuthenticationOk and every message after it up to
    and including ReadyForQuery (ParameterStatus, BackendKeyData,
    NoticeResponse). The other fields say what those bytes hold.
    """

    method: AuthMethod
    parameters: Mapping[str, str] = attrs.field(converter=lambda m: MappingProxyType(dict(m)),
                                                repr=lambda m: repr(dict(m)), hash=False)
    backend_key: BackendKeyData | None
    transaction_status: str
    notices: tuple[NoticeResponse, ...]
    negotiated: NegotiateProtocolVersion | None
    client_bytes: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")


class UpstreamLoginError(RemoteProtocolError):
    """The upstream server refused the login or broke the protocol.

    ``response`` is the server's ErrorResponse when it sent one (``code`` and
    ``wire_hint`` then follow its SQLSTATE; the cluster may relay it to the
    client as is). Otherwise ``code`` is UPSTREAM_UNREACHABLE with SQLSTATE
    08006, or 08004 when the server asks for something we will not do.
    """

    def __init__(self, message: str, *, code: ErrorCode | None = None,
                 wire_hint: str | int | None = None,
                 response: ErrorResponse | None = None) -> None:
        super().__init__(message, code=code, wire_hint=wire_hint)
        self.response = response

    @classmethod
    def from_response(cls, response: ErrorResponse) -> UpstreamLoginError:
        sqlstate = response.sqlstate
        return cls(response.message or "the upstream server refused the connection",
                   code=error_code_for_sqlstate(sqlstate),
                   wire_hint=sqlstate or SqlState.CONNECTION_FAILURE, response=response)

    def __reduce__(self) -> tuple[object, ...]:
        # Errors cross process boundaries; the response's read-only mapping
        # does not pickle, so it travels as a plain dict.
        fields = None if self.response is None else dict(self.response.fields)
        return (_rebuild_login_error, (self.message, self.code, self.wire_hint, fields))


def _rebuild_login_error(message: str, code: ErrorCode, wire_hint: str | int | None,
                         fields: dict[str, str] | None) -> UpstreamLoginError:
    response = None if fields is None else ErrorResponse(fields=fields)
    return UpstreamLoginError(message, code=code, wire_hint=wire_hint, response=response)


def _rejected(message: str) -> UpstreamLoginError:
    return UpstreamLoginError(message, code=ErrorCode.UPSTREAM_UNREACHABLE,
                              wire_hint=SqlState.CONNECTION_REJECTED)


_Handler = Callable[["UpstreamLogin", object], LoginState]


class UpstreamLogin(BufferedReceiver):
    """Log in to an upstream server as ``user``; see the module docstring.

    ``password`` may be None when the server is expected not to ask (trust,
    certificate); ``methods`` says which answers we are willing to give (a
    cluster that talks to its upstream without TLS should leave CLEARTEXT
    out). ``parameters`` are extra StartupMessage parameters
    (``application_name``, ``client_encoding``, ...).
    """

    def __init__(self, *, user: str, database: str | None = None,
                 password: str | bytes | None = None,
                 parameters: Mapping[str, str] | None = None,
                 methods: Collection[AuthMethod] = ALL_METHODS,
                 max_message_size: int = 64 * 1024,
                 max_iterations: int = DEFAULT_MAX_ITERATIONS,
                 scram_nonce: str | None = None) -> None:
        params = {"user": user, "database": database or user}
        for key, value in (parameters or {}).items():
            if key in ("user", "database") or key.startswith("_pq_."):
                raise LocalProtocolError(f"parameter {key!r} is set by UpstreamLogin itself")
            params[key] = value
        self._outbox = bytearray(StartupMessage(parameters=params).encode())
        self._user = user
        # Bad configuration fails here, not halfway through a login.
        self._password = None if password is None else _as_bytes(password)
        if self._password is not None and b"\x00" in self._password:
            raise ValueError("a PostgreSQL password cannot contain NUL")
        self._methods = frozenset(methods)
        self._max_message = max_message_size
        self._max_iterations = max_iterations
        self._nonce = scram_nonce
        # The buffer holds unparsed bytes: a couple of messages at most.
        self._buffer = ReceiveBuffer(2 * (max_message_size + 5))
        self._splitter = FrameSplitter(POSTGRES_MESSAGE, max_length=max_message_size + 4)
        self._state = LoginState.AWAIT_AUTH
        self._status = "I"
        self._method = AuthMethod.TRUST
        self._scram: ScramSHA256Client | None = None
        self._parameters: dict[str, str] = {}
        self._key: BackendKeyData | None = None
        self._notices: list[NoticeResponse] = []
        self._negotiated: NegotiateProtocolVersion | None = None
        self._client_bytes = bytearray()
        self._eof = False
        self._error: UpstreamLoginError | None = None

    @property
    def state(self) -> LoginState:
        return self._state

    def __repr__(self) -> str:
        return f"<UpstreamLogin {self._state.name} method={self._method.value}>"

    def data_to_send(self) -> bytes:
        """Bytes to write to the server now (the StartupMessage at first)."""
        out = bytes(self._outbox)
        self._outbox.clear()
        return out

    # receive_data (BufferedReceiver): bytes from the server.

    def _overflowed(self, exc: RemoteProtocolError) -> None:
        self._fail(_upstream_error(exc.message))

    def next_event(self) -> LoginReady | Literal[Signal.NEED_DATA, Signal.PAUSED]:
        """NEED_DATA, a LoginReady (once), then PAUSED. Each call handles
        every complete message buffered, so call data_to_send() after it."""
        if self._error is not None:
            err = self._error
            raise UpstreamLoginError(err.message, code=err.code, wire_hint=err.wire_hint,
                                     response=err.response) from err
        if self._state is LoginState.READY:
            return PAUSED
        try:
            while self._state is not LoginState.READY:
                message = self._read_message()
                if message is None:
                    if self._eof:
                        raise _upstream_error("the upstream server closed the connection "
                                              "during login")
                    return NEED_DATA
                self._handle(message)
        except RemoteProtocolError as exc:
            self._fail(exc)
            raise self._error from exc  # type: ignore[misc]
        return LoginReady(method=self._method, parameters=self._parameters,
                          backend_key=self._key, transaction_status=self._status,
                          notices=tuple(self._notices), negotiated=self._negotiated,
                          client_bytes=bytes(self._client_bytes))

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """Bytes the server sent after ReadyForQuery (to relay), and EOF."""
        if self._state is not LoginState.READY:
            raise LocalProtocolError("no trailing data before the login is complete")
        return self._buffer.peek(len(self._buffer)) or b"", self._eof

    # -- internals ----------------------------------------------------------------

    def _fail(self, exc: RemoteProtocolError) -> None:
        if not isinstance(exc, UpstreamLoginError):
            # The codec says 08P01 (protocol violation), but it was the
            # server's violation: the client hears "connection failure".
            exc = UpstreamLoginError(exc.message, code=ErrorCode.UPSTREAM_UNREACHABLE,
                                     wire_hint=SqlState.CONNECTION_FAILURE)
        self._error = exc
        self._state = LoginState.ERROR

    def _read_message(self) -> tuple[bytes, object] | None:
        message = self._splitter.read_frame(self._buffer)  # judges the length
        if message is None:
            return None
        type_code, _, body = message
        return frame(type_code, body), decode_backend(type_code, body)

    def _handle(self, item: tuple[bytes, object]) -> None:
        raw, message = item
        if isinstance(message, ErrorResponse):
            raise UpstreamLoginError.from_response(message)
        handler = _TABLE.get((self._state, type(message)))
        if handler is None:
            name = type(message).__name__ if message is not None else f"message {raw[:1]!r}"
            raise _upstream_error(f"the upstream server sent {name} out of turn "
                                  f"(login state {self._state.name})")
        if self._state is LoginState.AUTHENTICATED:
            self._client_bytes += raw
            if len(self._client_bytes) > 16 * self._max_message:
                raise _upstream_error("the upstream server sent too much before ReadyForQuery")
        self._state = handler(self, message)
        if isinstance(message, AuthenticationOk):
            self._client_bytes += raw

    def _need_password(self, method: AuthMethod) -> bytes:
        if method not in self._methods:
            raise _rejected(f"the upstream server asks for {method.value} authentication, "
                            f"which this resource does not allow")
        if self._password is None:
            raise _rejected(f"the upstream server asks for {method.value} authentication "
                            f"and no password is configured")
        self._method = method
        return self._password

    # Handlers: each returns the next state.

    def _on_ok(self, _msg: object) -> LoginState:
        if self._state is LoginState.AWAIT_AUTH and AuthMethod.TRUST not in self._methods:
            raise _rejected("the upstream server let us in without a password, "
                            "which this resource does not allow")
        return LoginState.AUTHENTICATED

    def _on_cleartext(self, _msg: object) -> LoginState:
        self._outbox += PasswordMessage(password=self._need_password(AuthMethod.CLEARTEXT)
                                        ).encode()
        return LoginState.AWAIT_OK

    def _on_md5(self, msg: object) -> LoginState:
        assert isinstance(msg, AuthenticationMD5Password)
        password = self._need_password(AuthMethod.MD5)
        self._outbox += PasswordMessage(password=md5_password(self._user, password, msg.salt)
                                        ).encode()
        return LoginState.AWAIT_OK

    def _on_sasl(self, msg: object) -> LoginState:
        assert isinstance(msg, AuthenticationSASL)
        if SCRAM_SHA_256 not in msg.mechanisms:
            offered = ", ".join(m[:40] for m in msg.mechanisms[:8]) or "none"
            raise _rejected(f"the upstream server offers no SASL mechanism we support "
                            f"(offered: {offered})")
        password = self._need_password(AuthMethod.SCRAM_SHA_256)
        self._scram = ScramSHA256Client(password, nonce=self._nonce,
                                        max_iterations=self._max_iterations)
        self._outbox += SASLInitialResponse(mechanism=SCRAM_SHA_256,
                                            data=self._scram.client_first()).encode()
        return LoginState.AWAIT_SASL_CONTINUE

    def _on_sasl_continue(self, msg: object) -> LoginState:
        assert isinstance(msg, AuthenticationSASLContinue) and self._scram is not None
        self._outbox += SASLResponse(data=self._scram.client_final(msg.data)).encode()
        return LoginState.AWAIT_SASL_FINAL

    def _on_sasl_final(self, msg: object) -> LoginState:
        assert isinstance(msg, AuthenticationSASLFinal) and self._scram is not None
        self._scram.verify_server_final(msg.data)
        return LoginState.AWAIT_OK

    def _on_other_auth(self, msg: object) -> LoginState:
        assert isinstance(msg, AuthenticationOther)
        raise _rejected(f"the upstream server asks for authentication method {msg.code}, "
                        f"which Wicket does not support")

    def _on_negotiate(self, msg: object) -> LoginState:
        assert isinstance(msg, NegotiateProtocolVersion)
        self._negotiated = msg  # we asked for 3.0 and no options: nothing to change
        return self._state

    def _on_notice(self, msg: object) -> LoginState:
        assert isinstance(msg, NoticeResponse)
        if len(self._notices) < 64:
            self._notices.append(msg)
        return self._state

    def _on_parameter(self, msg: object) -> LoginState:
        assert isinstance(msg, ParameterStatus)
        self._parameters[msg.name] = msg.value
        return self._state

    def _on_key(self, msg: object) -> LoginState:
        assert isinstance(msg, BackendKeyData)
        self._key = msg
        return self._state

    def _on_ready(self, msg: object) -> LoginState:
        assert isinstance(msg, ReadyForQuery)
        self._status = msg.status
        return LoginState.READY


_S = LoginState
_AUTH_REQUESTS: Final[Mapping[type, _Handler]] = {
    AuthenticationOk: UpstreamLogin._on_ok,
    AuthenticationCleartextPassword: UpstreamLogin._on_cleartext,
    AuthenticationMD5Password: UpstreamLogin._on_md5,
    AuthenticationSASL: UpstreamLogin._on_sasl,
    AuthenticationOther: UpstreamLogin._on_other_auth,
}

# (state, message class) -> handler. An ErrorResponse is a refusal in every
# state; anything not listed is out of turn.
_TABLE: Final[Mapping[tuple[LoginState, type], _Handler]] = MappingProxyType({
    **{(_S.AWAIT_AUTH, cls): handler for cls, handler in _AUTH_REQUESTS.items()},
    (_S.AWAIT_AUTH, NegotiateProtocolVersion): UpstreamLogin._on_negotiate,
    (_S.AWAIT_OK, AuthenticationOk): UpstreamLogin._on_ok,
    (_S.AWAIT_SASL_CONTINUE, AuthenticationSASLContinue): UpstreamLogin._on_sasl_continue,
    (_S.AWAIT_SASL_FINAL, AuthenticationSASLFinal): UpstreamLogin._on_sasl_final,
    **{(state, NoticeResponse): UpstreamLogin._on_notice
       for state in (_S.AWAIT_AUTH, _S.AWAIT_OK, _S.AWAIT_SASL_CONTINUE, _S.AWAIT_SASL_FINAL,
                     _S.AUTHENTICATED)},
    (_S.AUTHENTICATED, ParameterStatus): UpstreamLogin._on_parameter,
    (_S.AUTHENTICATED, BackendKeyData): UpstreamLogin._on_key,
    (_S.AUTHENTICATED, ReadyForQuery): UpstreamLogin._on_ready,
})

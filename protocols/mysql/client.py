"""Logging in to an upstream MySQL/MariaDB server: the cluster's side (client role).

Spec: MySQL Source Code Documentation, "Client/Server Protocol", Connection
Phase (Initial Handshake, SSL, Authentication Method Switch, Fast/Full
authentication of caching_sha2_password); MariaDB docs, "Connection".

Theory of operation
-------------------
:class:`UpstreamLogin` is sans-I/O and h11/h2 style: the caller loops
``receive_data(server bytes)`` / ``next_event()`` / ``data_to_send()``::

    server: Handshake (seq 0) ──> [we: SSLRequest (1); StartTLS event;
                                    the caller wraps the socket, tls_started()]
    we: HandshakeResponse41 (1, or 2 after TLS) ──> the server answers with
        OK                        ──> LoginReady
        ERR                       ──> LoginRefused (the server's ERR verbatim)
        AuthSwitchRequest (0xFE)  ──> the named plugin's answer to its nonce
        AuthMoreData (0x01)       ──> caching_sha2_password's next step:
            0x03 fast auth success: the OK follows
            0x04 perform full auth: over TLS, the password and NUL; without
                 TLS, RSA-OAEP of (password+NUL) XOR nonce, with a pinned
                 public key or (when allowed) one requested from the server
                 (0x02), which answers with AuthMoreData(PEM)

Which answers we give is policy: ``plugins`` lists the allowed ones, and the
cleartext ones (mysql_clear_password, caching_sha2's full auth as
cleartext) only ever run over TLS. Asking an unauthenticated server for its
RSA key hands the password to whoever answers, so it is off unless
``request_public_key`` says otherwise. A ``password`` of None (client
certificate accounts) answers with empty responses and refuses any plugin
that needs a real password.

Every packet's sequence id is checked (:class:`.packets.PacketChannel`).
Bad server behaviour raises :class:`~protocols.errors.RemoteProtocolError`
with ``code`` UPSTREAM_UNREACHABLE and wire hint ER_HANDSHAKE_ERROR (1043)
or ER_NOT_SUPPORTED_AUTH_MODE (1251) when the server asks for what we will
not do; the object is then poisoned.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType
from typing import Final, Literal, Union

import attrs

from protocols.errors import ErrorCode, RemoteProtocolError
from protocols.mysql import auth
from protocols.mysql.constants import Capability, ErrorNumber
from protocols.mysql.generic import ErrPacket, OkPacket
from protocols.mysql.messages import (
    AuthMoreData, AuthSwitchRequest, Handshake, HandshakeResponse, ServerInfo, SSLRequest,
    StartTLS,
)
from protocols.mysql.phase import ConnectionPhase
from protocols.signals import NEED_DATA, PAUSED, Signal

__all__ = [
    "DEFAULT_CLIENT_CAPABILITIES", "ALL_PLUGINS", "LoginState", "LoginReady",
    "LoginRefused", "LoginEvent", "UpstreamLogin",
]

#: What a modern client asks for, before intersecting with the server's.
DEFAULT_CLIENT_CAPABILITIES: Final = (
    Capability.LONG_PASSWORD | Capability.LONG_FLAG | Capability.PROTOCOL_41
    | Capability.TRANSACTIONS | Capability.SECURE_CONNECTION | Capability.MULTI_STATEMENTS
    | Capability.MULTI_RESULTS | Capability.PS_MULTI_RESULTS | Capability.PLUGIN_AUTH
    | Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA | Capability.CONNECT_ATTRS
    | Capability.SESSION_TRACK | Capability.DEPRECATE_EOF)
#: Capabilities the login needs whatever the client asked for.
_REQUIRED: Final = Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION
#: Capabilities the login sets itself (from tls, database, attributes).
_OWN: Final = (Capability.SSL | Capability.CONNECT_WITH_DB | Capability.CONNECT_ATTRS
               | Capability.ZSTD_COMPRESSION_ALGORITHM | Capability.SSL_VERIFY_SERVER_CERT)
ALL_PLUGINS: Final = frozenset({auth.NATIVE_PASSWORD, auth.CACHING_SHA2_PASSWORD,
                                auth.CLIENT_ED25519, auth.CLEAR_PASSWORD})
_FIRST_ANSWERS: Final = (auth.NATIVE_PASSWORD, auth.CACHING_SHA2_PASSWORD)
_MAX_SWITCHES: Final = 2


class LoginState(enum.Enum):
    AWAIT_HANDSHAKE = "AWAIT_HANDSHAKE"
    TLS_DUE = "TLS_DUE"  # StartTLS was handed out: wrap the socket, then tls_started()
    AWAIT_AUTH = "AWAIT_AUTH"  # a response went out: OK, ERR, switch or more data?
    AWAIT_OK = "AWAIT_OK"  # caching_sha2 said fast auth success: the OK is next
    AWAIT_PUBLIC_KEY = "AWAIT_PUBLIC_KEY"  # we asked caching_sha2 for its RSA key
    DONE = "DONE"  # LoginReady or LoginRefused handed out
    ERROR = "ERROR"


@attrs.frozen(kw_only=True)
class LoginReady:
    """Logged in. ``server`` is what the server's handshake said;
    ``capabilities`` are the ones we sent (and the session runs with);
    ``ok`` is the server's OK and ``ok_payload`` its bytes."""

    server: ServerInfo
    capabilities: Capability
    plugin: str
    tls: bool
    ok: OkPacket
    ok_payload: bytes = attrs.field(repr=False)


@attrs.frozen(kw_only=True)
class LoginRefused:
    """The server said no: its ERR, decoded and verbatim (to relay)."""

    error: ErrPacket
    payload: bytes = attrs.field(repr=False)


LoginEvent = Union[StartTLS, LoginReady, LoginRefused]


def _upstream_error(message: str,
                    errno: int = ErrorNumber.ER_HANDSHAKE_ERROR) -> RemoteProtocolError:
    return RemoteProtocolError(message, code=ErrorCode.UPSTREAM_UNREACHABLE, wire_hint=int(errno))


def _refuse(message: str) -> RemoteProtocolError:
    return _upstream_error(message, ErrorNumber.ER_NOT_SUPPORTED_AUTH_MODE)


_Handler = Callable[["UpstreamLogin", bytes], Union[LoginEvent, None]]


class UpstreamLogin(ConnectionPhase[LoginState]):
    """Log in to an upstream server as ``user``; see the module docstring."""

    _DONE = LoginState.DONE
    _ERROR = LoginState.ERROR

    def __init__(self, *, user: str, password: str | bytes | None = None,
                 database: str | None = None, tls: bool = False,
                 capabilities: Capability = DEFAULT_CLIENT_CAPABILITIES,
                 charset: int | None = None, attributes: Mapping[str, str] | None = None,
                 plugins: Collection[str] = ALL_PLUGINS,
                 server_public_key: bytes | None = None, request_public_key: bool = False,
                 max_packet_size: int = 1 << 24, max_message_size: int = 64 * 1024) -> None:
        super().__init__(LoginState.AWAIT_HANDSHAKE, max_message_size=max_message_size,
                         peer="upstream server")
        unknown = set(plugins) - ALL_PLUGINS
        if unknown:
            raise ValueError(f"unsupported auth plugins: {sorted(unknown)}")
        self._user = user
        self._password = password.encode("utf-8") if isinstance(password, str) else password
        self._database = database
        self._tls_wanted = tls
        self._tls = False
        self._wanted = Capability(capabilities) & ~_OWN
        self._charset = charset
        self._attributes = None if attributes is None else MappingProxyType(dict(attributes))
        self._plugins = frozenset(plugins)
        self._public_key = server_public_key
        self._request_key = request_public_key
        self._max_packet_size = max_packet_size
        self._handshake: Handshake | None = None
        self._caps = Capability(0)
        self._plugin = ""
        self._nonce = b""
        self._switches = 0

    def __repr__(self) -> str:
        return f"<UpstreamLogin {self._state.name} plugin={self._plugin or '-'}>"

    @property
    def server_info(self) -> ServerInfo | None:
        """What the server's handshake said, once it came (also when the
        login is then refused: a gateway greets with it either way)."""
        return None if self._handshake is None else self._handshake.info

    def _overflowed(self, exc: RemoteProtocolError) -> None:
        self._fail(_upstream_error(exc.message, ErrorNumber.ER_NET_PACKET_TOO_LARGE))

    def _fail(self, exc: RemoteProtocolError) -> RemoteProtocolError:
        """Poison the login with ``exc`` in upstream terms; returns what it stored."""
        if exc.code is not ErrorCode.UPSTREAM_UNREACHABLE:
            # The codec blames "the peer": here that is the server, and the
            # client on the other end hears "the upstream failed".
            exc = _upstream_error(exc.message, exc.wire_hint or ErrorNumber.ER_HANDSHAKE_ERROR)
        self._poison(exc)
        return exc

    def next_event(self) -> LoginEvent | Literal[Signal.NEED_DATA, Signal.PAUSED]:
        """StartTLS, LoginReady or LoginRefused, NEED_DATA, or PAUSED (while
        TLS is due, and once done). Call data_to_send() after it."""
        self._raise_if_poisoned()
        if self._state in (LoginState.TLS_DUE, LoginState.DONE):
            return PAUSED
        try:
            while True:
                payload = self._channel.read(self._buffer)
                if payload is None:
                    if self._eof:
                        raise _upstream_error("the upstream server closed the connection "
                                              "during login", ErrorNumber.CR_SERVER_LOST)
                    return NEED_DATA
                event = self._handle(payload)
                if event is not None:
                    return event
        except RemoteProtocolError as exc:
            stored = self._fail(exc)
            if stored is exc:
                raise
            raise stored from exc

    def tls_started(self) -> None:
        """The TLS handshake is done: the HandshakeResponse41 goes out (over
        TLS). Raises RemoteProtocolError if the server sent plaintext after
        its handshake, where only the TLS handshake may come."""
        self._expect(LoginState.TLS_DUE, "tls_started")
        if self._buffer:
            raise self._fail(_upstream_error("the upstream server sent plaintext before TLS"))
        self._tls = True
        self._respond_to_handshake()

    # -- the exchange ----------------------------------------------------------------

    def _handle(self, payload: bytes) -> LoginEvent | None:
        first = payload[0] if payload else -1
        if first == 0xFF:
            self._state = LoginState.DONE
            return LoginRefused(error=ErrPacket.decode(payload), payload=payload)
        handler = _TABLE.get((self._state, first))
        if handler is None:
            raise _upstream_error(f"the upstream server sent a packet starting 0x{first:02X} "
                                  f"out of turn (login state {self._state.name})")
        return handler(self, payload)

    def _on_handshake(self, payload: bytes) -> LoginEvent | None:
        handshake = self._handshake = Handshake.decode(payload)
        server = handshake.capabilities
        if self._tls_wanted and Capability.SSL not in server:
            raise _refuse("the upstream server does not offer TLS, which this resource requires")
        caps = (self._wanted & server) | _REQUIRED
        caps |= server & (Capability.PLUGIN_AUTH | Capability.PLUGIN_AUTH_LENENC_CLIENT_DATA)
        if self._database is not None:
            caps |= Capability.CONNECT_WITH_DB
        if self._attributes is not None and Capability.CONNECT_ATTRS in server:
            caps |= Capability.CONNECT_ATTRS
        if self._tls_wanted:
            caps |= Capability.SSL
        self._caps = caps
        self._nonce = handshake.scramble
        if self._tls_wanted:
            self._send(SSLRequest(
                capabilities=caps, max_packet_size=self._max_packet_size,
                charset=self._charset_for(handshake)).encode())
            self._state = LoginState.TLS_DUE
            return StartTLS()
        self._respond_to_handshake()
        return None

    def _charset_for(self, handshake: Handshake) -> int:
        return handshake.charset if self._charset is None else self._charset

    def _respond_to_handshake(self) -> None:
        handshake = self._handshake
        assert handshake is not None
        offered = handshake.auth_plugin or auth.NATIVE_PASSWORD
        if offered in _FIRST_ANSWERS and offered in self._plugins:
            plugin = offered
        else:  # answer with one we can; the server switches if the account differs
            plugin = next((p for p in _FIRST_ANSWERS if p in self._plugins), offered)
        data = b""
        if plugin in _FIRST_ANSWERS:
            data = self._answer(plugin, self._nonce)
        self._plugin = plugin
        plugin_auth = Capability.PLUGIN_AUTH in self._caps
        response = HandshakeResponse(
            capabilities=self._caps, max_packet_size=self._max_packet_size,
            charset=self._charset_for(handshake), username=self._user, auth_response=data,
            database=self._database, auth_plugin=plugin if plugin_auth else None,
            attributes=self._attributes if Capability.CONNECT_ATTRS in self._caps else None)
        self._send(response.encode())
        self._state = LoginState.AWAIT_AUTH

    def _answer(self, plugin: str, nonce: bytes) -> bytes:
        """The first answer ``plugin`` gives to ``nonce``."""
        if plugin not in self._plugins:
            raise _refuse(f"the upstream server asks for {plugin[:64]!r} authentication, "
                          f"which this resource does not allow")
        password = self._password
        if plugin == auth.NATIVE_PASSWORD:
            return auth.native_password(password or b"", nonce)
        if plugin == auth.CACHING_SHA2_PASSWORD:
            return auth.caching_sha2_password(password or b"", nonce)
        if password is None:
            raise _refuse(f"the upstream server asks for {plugin} authentication and no "
                          f"password is configured")
        if plugin == auth.CLIENT_ED25519:
            return auth.ed25519_password(password, nonce)
        if not self._tls:
            raise _refuse("the upstream server asks for a cleartext password without TLS")
        return auth.clear_password(password)

    def _on_switch(self, payload: bytes) -> None:
        request = AuthSwitchRequest.decode(payload)
        self._switches += 1
        if self._switches > _MAX_SWITCHES:
            raise _upstream_error("the upstream server keeps switching auth plugins")
        if request.plugin not in ALL_PLUGINS:
            raise _refuse(f"the upstream server asks for {request.plugin[:64]!r} "
                          f"authentication, which Wicket does not support")
        self._plugin = request.plugin
        data = request.data
        if request.plugin != auth.CLIENT_ED25519 and data.endswith(b"\x00"):
            data = data[:-1]
        self._nonce = data
        self._send(self._answer(request.plugin, data))
        self._state = LoginState.AWAIT_AUTH

    def _on_more_data(self, payload: bytes) -> None:
        data = AuthMoreData.decode(payload).data
        if self._plugin != auth.CACHING_SHA2_PASSWORD:
            raise _upstream_error(f"the upstream server sent AuthMoreData to {self._plugin}")
        if data == auth.FAST_AUTH_SUCCESS:
            self._state = LoginState.AWAIT_OK
            return
        if data != auth.PERFORM_FULL_AUTH:
            raise _upstream_error("the upstream server sent caching_sha2_password an "
                                  "unknown message")
        if self._password is None:
            raise _refuse("the upstream server wants caching_sha2_password's full "
                          "authentication and no password is configured")
        if self._tls:
            self._send(auth.clear_password(self._password))
        elif self._public_key is not None:
            self._send_encrypted(self._public_key)
        elif self._request_key:
            self._send(auth.REQUEST_PUBLIC_KEY)
            self._state = LoginState.AWAIT_PUBLIC_KEY
        else:
            raise _refuse("the upstream server wants caching_sha2_password's full "
                          "authentication, which needs TLS or the server's RSA public key")

    def _on_public_key(self, payload: bytes) -> None:
        self._send_encrypted(AuthMoreData.decode(payload).data)

    def _send_encrypted(self, pem: bytes) -> None:
        assert self._password is not None
        self._send(
            auth.rsa_encrypt_password(self._password, self._nonce, pem))
        self._state = LoginState.AWAIT_AUTH

    def _on_ok(self, payload: bytes) -> LoginEvent:
        ok = OkPacket.decode(payload, self._caps)
        self._state = LoginState.DONE
        assert self._handshake is not None
        return LoginReady(server=self._handshake.info, capabilities=self._caps,
                          plugin=self._plugin, tls=self._tls, ok=ok, ok_payload=payload)


_S = LoginState
# (state, the packet's first byte) -> handler. ERR (0xFF) is a refusal in
# every state; anything not listed is out of turn.
_TABLE: Final[Mapping[tuple[LoginState, int], _Handler]] = MappingProxyType({
    (_S.AWAIT_HANDSHAKE, 10): UpstreamLogin._on_handshake,
    (_S.AWAIT_AUTH, 0x00): UpstreamLogin._on_ok,
    (_S.AWAIT_AUTH, 0xFE): UpstreamLogin._on_switch,
    (_S.AWAIT_AUTH, 0x01): UpstreamLogin._on_more_data,
    (_S.AWAIT_OK, 0x00): UpstreamLogin._on_ok,
    (_S.AWAIT_PUBLIC_KEY, 0x01): UpstreamLogin._on_public_key,
})

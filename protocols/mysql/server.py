"""The gateway's side of the connection phase: it plays the server to a local client.

Spec: MySQL Source Code Documentation, "Client/Server Protocol", Connection
Phase (Initial Handshake, SSL, Authentication Method Switch,
caching_sha2_password's fast authentication); MariaDB docs, "Connection".

Theory of operation
-------------------
The gateway knows who the user is from the session certificate, so it
takes any password, or none: what it must get right is everything else the
client will rely on afterwards, because once the connection phase is over
the command phase is relayed byte for byte between the client and the
upstream. So :class:`GatewayHandshake` greets the client with the
**upstream's** version string, charset and status, and the upstream's
capabilities minus what the gateway cannot carry (CLIENT_SSL unless local
TLS is on, compression unless asked for, and the client-only bits), with a
fresh nonce; the capabilities the client answers with (intersected with
those) are what the cluster then asks the upstream for::

    we: Handshake (seq 0)
    client: SSLRequest (1)        -> StartTLS: start_tls(), TLS handshake,
                                     then the response comes as seq 2
    client: HandshakeResponse41   -> plugin mysql_native_password,
                                     caching_sha2_password or
                                     mysql_clear_password: ClientLogin
                                  -> any other (client_ed25519, dialog,
                                     sha256_password, ...): we send
                                     AuthSwitchRequest(the greeting's plugin:
                                     the upstream's if it is one of the
                                     first two, else mysql_native_password)
    client: AuthSwitchResponse    -> ClientLogin
    we: accept(): [AuthMoreData 0x03 (caching_sha2 fast auth success)] OK
        or refuse(): ERR

h11 style: ``receive_data`` / ``next_event`` / ``data_to_send``. A client
that breaks the protocol gets a RemoteProtocolError whose ``wire_hint`` is
the MySQL error number to answer with (:meth:`GatewayHandshake.refuse`
still works on a poisoned connection, with the right sequence id, so the
client hears an ERR it can print rather than a dropped connection).
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Mapping
from typing import Final, Literal, Union

import attrs

from protocols.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from protocols.mysql import auth
from protocols.mysql.constants import ERRNO_FOR_CODE, Capability, ErrorNumber, is_client_errno
from protocols.mysql.generic import ErrPacket, OkPacket
from protocols.mysql.messages import (
    MAX_ATTRIBUTES_LENGTH, AuthMoreData, AuthSwitchRequest, Handshake, HandshakeResponse,
    ServerInfo, SSLRequest, StartTLS,
)
from protocols.mysql.packets import malformed
from protocols.mysql.phase import ConnectionPhase
from protocols.signals import NEED_DATA, PAUSED, ConnectionClosed, Signal

__all__ = [
    "GATEWAY_DROPS", "HandshakeState", "ClientLogin", "GatewayHandshake", "advertised",
    "err_for", "new_scramble",
]

#: Capabilities the gateway never advertises: TLS and compression are its
#: own decisions (parameters), the rest are client-side options or
#: exchanges the gateway does not implement.
GATEWAY_DROPS: Final = (Capability.SSL | Capability.COMPRESS
                        | Capability.ZSTD_COMPRESSION_ALGORITHM
                        | Capability.SSL_VERIFY_SERVER_CERT | Capability.REMEMBER_OPTIONS
                        | Capability.MULTI_FACTOR_AUTHENTICATION
                        | Capability.CAPABILITY_EXTENSION
                        # MySQL 8's result sets without column definitions:
                        # the auditor follows result sets by their metadata.
                        # (MariaDB's cached metadata, which it follows, is
                        # offered where the cluster says so: dialparams.)
                        | Capability.OPTIONAL_RESULTSET_METADATA)
#: What the gateway's own connection phase needs.
_GATEWAY_NEEDS: Final = (Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION
                         | Capability.PLUGIN_AUTH)
#: Plugins whose first answer the gateway takes as it is.
_ONE_SHOT: Final = frozenset({auth.NATIVE_PASSWORD, auth.CACHING_SHA2_PASSWORD,
                              auth.CLEAR_PASSWORD})
#: Plugins the greeting may name: the ones whose nonce is the handshake's.
_GREETINGS: Final = frozenset({auth.NATIVE_PASSWORD, auth.CACHING_SHA2_PASSWORD})
#: A HandshakeResponse41 with the most connection attributes servers take.
_DEFAULT_MAX_MESSAGE: Final = MAX_ATTRIBUTES_LENGTH + 4096
_TLS_HANDSHAKE: Final = 0x16


def advertised(server: Capability, *, tls: bool, compression: bool = False,
               drop: Capability = Capability(0)) -> Capability:
    """The capabilities to greet a client with, for an upstream that has
    ``server``: what it has, minus what the gateway cannot carry."""
    caps = (server & ~GATEWAY_DROPS & ~drop) | _GATEWAY_NEEDS
    if tls:
        caps |= Capability.SSL
    if compression:
        caps |= server & Capability.COMPRESS
    return caps


def new_scramble() -> bytes:
    """20 random printable bytes, 33..126 (servers avoid NUL: some clients
    treat the nonce as a C string), uniform: from one read of the system's
    random source, a byte below 188 taken modulo 94, the others dropped
    (``secrets.randbelow`` per byte would read it ~27 times, a system call
    each, on every connection)."""
    out = b""
    while len(out) < auth.SCRAMBLE_LENGTH:
        out += bytes(33 + b % 94 for b in secrets.token_bytes(2 * auth.SCRAMBLE_LENGTH) if b < 188)
    return out[:auth.SCRAMBLE_LENGTH]


def err_for(exc: ProtocolError) -> ErrPacket:
    """The ERR a client should see for ``exc``: its wire hint when that is
    a server error number, else the number for its code (a client-side
    number such as 2013 is a hint, never an ERR: MariaDB clients would
    call it malformed)."""
    hint = exc.wire_hint
    if isinstance(hint, int) and not is_client_errno(hint):
        errno = hint
    else:
        errno = ERRNO_FOR_CODE.get(exc.code, ErrorNumber.ER_INTERNAL_ERROR)
    return ErrPacket.of(errno, exc.message)


class HandshakeState(enum.Enum):
    AWAIT_RESPONSE = "AWAIT_RESPONSE"  # the greeting went out
    TLS_DUE = "TLS_DUE"  # an SSLRequest came: start_tls()
    AWAIT_SWITCH_RESPONSE = "AWAIT_SWITCH_RESPONSE"  # we asked for the greeting's plugin
    VERDICT_DUE = "VERDICT_DUE"  # ClientLogin handed out: accept() or refuse()
    DONE = "DONE"
    CLOSED = "CLOSED"  # the client hung up
    ERROR = "ERROR"


@attrs.frozen(kw_only=True)
class ClientLogin:
    """The client's login, its password (if any) set aside.
    ``capabilities`` are the client's, within what we advertised: what the
    session must run with upstream."""

    username: str
    database: str | None
    capabilities: Capability
    charset: int
    max_packet_size: int
    attributes: Mapping[str, str] = attrs.field(hash=False, repr=lambda m: repr(dict(m)))
    plugin: str
    tls: bool


HandshakeEvent = Union[StartTLS, ClientLogin, ConnectionClosed]


class GatewayHandshake(ConnectionPhase[HandshakeState]):
    """The connection phase with a local client; see the module docstring."""

    _DONE = HandshakeState.DONE
    _ERROR = HandshakeState.ERROR

    def __init__(self, server: ServerInfo, *, connection_id: int, tls: bool = False,
                 compression: bool = False, drop: Capability = Capability(0),
                 scramble: bytes | None = None,
                 max_message_size: int = _DEFAULT_MAX_MESSAGE) -> None:
        super().__init__(HandshakeState.AWAIT_RESPONSE, max_message_size=max_message_size,
                         peer="client")
        self._scramble = new_scramble() if scramble is None else scramble
        if len(self._scramble) != auth.SCRAMBLE_LENGTH or b"\x00" in self._scramble:
            raise ValueError("the scramble is 20 bytes without NUL")
        self._caps = advertised(server.capabilities, tls=tls, compression=compression,
                                drop=drop)
        self._tls_offered = tls
        self._tls = False
        # The upstream's own plugin when it is one we take at its first word
        # (MySQL 8 clients expect caching_sha2_password from a MySQL 8).
        self._greeting_plugin = (server.auth_plugin if server.auth_plugin in _GREETINGS
                                 else auth.NATIVE_PASSWORD)
        greeting = Handshake(server_version=server.server_version, connection_id=connection_id,
                             auth_plugin_data=self._scramble + b"\x00", capabilities=self._caps,
                             charset=server.charset, status=server.status,
                             auth_plugin=self._greeting_plugin)
        self._send(greeting.encode())
        self._response: HandshakeResponse | None = None
        self._plugin = self._greeting_plugin
        self._fast_auth = False

    @property
    def capabilities(self) -> Capability:
        """What the greeting advertised."""
        return self._caps

    def __repr__(self) -> str:
        return f"<GatewayHandshake {self._state.name} tls={self._tls}>"

    def _overflowed(self, exc: RemoteProtocolError) -> None:
        self._poison(RemoteProtocolError(exc.message, code=ErrorCode.BAD_REQUEST,
                                         wire_hint=int(ErrorNumber.ER_NET_PACKET_TOO_LARGE)))

    def next_event(self) -> HandshakeEvent | Literal[Signal.NEED_DATA, Signal.PAUSED]:
        """StartTLS, ClientLogin, ConnectionClosed, NEED_DATA, or PAUSED
        while a call of ours is due and once done. Raises
        RemoteProtocolError (wire_hint: the error number) for a bad client."""
        self._raise_if_poisoned()
        if self._state is HandshakeState.CLOSED:
            return ConnectionClosed(clean=True)
        if self._state not in (HandshakeState.AWAIT_RESPONSE,
                               HandshakeState.AWAIT_SWITCH_RESPONSE):
            return PAUSED
        try:
            payload = self._channel.read(self._buffer)
            if payload is None:
                if not self._eof:
                    return NEED_DATA
                if self._buffer or not self._channel.at_boundary:
                    malformed("the client hung up in the middle of a packet",
                              ErrorNumber.ER_NET_READ_ERROR)
                self._state = HandshakeState.CLOSED
                return ConnectionClosed(clean=True)
            if self._state is HandshakeState.AWAIT_SWITCH_RESPONSE:
                # Any answer will do: we take any password.
                self._fast_auth = self._plugin == auth.CACHING_SHA2_PASSWORD and bool(payload)
                return self._login()
            return self._on_response(payload)
        except RemoteProtocolError as exc:
            self._poison(exc)
            raise

    def _on_response(self, payload: bytes) -> HandshakeEvent:
        message = HandshakeResponse.decode(payload)
        if isinstance(message, SSLRequest):
            if not self._tls_offered or self._tls:
                malformed("an SSLRequest where TLS was not offered",
                          ErrorNumber.ER_HANDSHAKE_ERROR)
            self._state = HandshakeState.TLS_DUE
            return StartTLS()
        if Capability.SSL in message.capabilities and not self._tls:
            malformed("the client claims TLS without an SSLRequest",
                      ErrorNumber.ER_HANDSHAKE_ERROR)
        self._response = message
        self._plugin = auth.NATIVE_PASSWORD  # what a client without PLUGIN_AUTH speaks
        if Capability.PLUGIN_AUTH in message.capabilities:
            self._plugin = message.auth_plugin or self._greeting_plugin
        if self._plugin in _ONE_SHOT:
            self._fast_auth = (self._plugin == auth.CACHING_SHA2_PASSWORD
                               and bool(message.auth_response))
            return self._login()
        # A plugin we do not take at its first word: switch to the greeting's.
        self._plugin = self._greeting_plugin
        self._send(AuthSwitchRequest(
            plugin=self._plugin, data=self._scramble + b"\x00").encode())
        self._state = HandshakeState.AWAIT_SWITCH_RESPONSE
        return self.next_event()

    def _login(self) -> ClientLogin:
        response = self._response
        assert response is not None
        self._state = HandshakeState.VERDICT_DUE
        return ClientLogin(username=response.username, database=response.database or None,
                           capabilities=response.capabilities & self._caps,
                           charset=response.charset,
                           max_packet_size=response.max_packet_size,
                           attributes=response.attributes or {}, plugin=self._plugin,
                           tls=self._tls)

    def start_tls(self) -> bytes:
        """After StartTLS: the bytes received since the SSLRequest, which
        open the client's TLS handshake (feed them to the TLS object first);
        feed decrypted bytes from then on."""
        self._expect(HandshakeState.TLS_DUE, "start_tls")
        hello = self._buffer.take_all()
        if hello and hello[0] != _TLS_HANDSHAKE:
            self._poison_and_raise(RemoteProtocolError(
                "the client sent plaintext after its SSLRequest", code=ErrorCode.BAD_REQUEST,
                wire_hint=int(ErrorNumber.ER_HANDSHAKE_ERROR)))
        self._tls = True
        self._state = HandshakeState.AWAIT_RESPONSE
        return hello

    def accept(self, ok: OkPacket | None = None) -> bytes:
        """Let the client in: [caching_sha2's fast auth success] then ``ok``
        (by default an OK with the upstream's status). Returns the bytes to
        send; ``trailing_data`` then holds what the client sent after."""
        self._expect(HandshakeState.VERDICT_DUE, "accept")
        out = bytearray()
        if self._fast_auth:
            out += self._channel.write(AuthMoreData(data=auth.FAST_AUTH_SUCCESS).encode())
        assert self._response is not None
        out += self._channel.write((ok or OkPacket()).encode(
            self._response.capabilities & self._caps))
        self._state = HandshakeState.DONE
        return bytes(out)

    def refuse(self, error: ErrPacket) -> bytes:
        """Turn the client away with ``error`` (also after a
        RemoteProtocolError); close the connection after sending it."""
        if self._state not in (HandshakeState.ERROR, HandshakeState.VERDICT_DUE,
                               HandshakeState.AWAIT_RESPONSE,
                               HandshakeState.AWAIT_SWITCH_RESPONSE):
            raise LocalProtocolError(f"refuse() in state {self._state.name}")
        if self._state is not HandshakeState.ERROR:
            self._state = HandshakeState.DONE
        self._channel.abandon()
        return self._channel.write(error.encode())


"""protocols.mysql: the MySQL/MariaDB client/server protocol, sans-I/O.

* :mod:`.constants`: capability and status flags, commands, error numbers
  and their SQLSTATEs.
* :mod:`.packets`: packets (3-byte length, sequence id, 16 MiB
  continuation), the field codec (length-encoded integers and strings),
  :class:`PacketChannel`.
* :mod:`.messages`: the connection-phase messages; :mod:`.generic`: OK,
  ERR, EOF; :mod:`.fields`: the text and validators they share.
* :mod:`.auth` and :mod:`.ed25519`: the client side of the auth plugins.
* :mod:`.client`: the cluster logging in upstream: :class:`UpstreamLogin`.
* :mod:`.server`: the gateway playing the server: :class:`GatewayHandshake`.
  Both build on :mod:`.phase` (buffer, packet channel, outbox, poisoning).
* :mod:`.commands` and :mod:`.responses`: the cluster's audit of a relayed
  session: :class:`CommandAuditor` and :class:`ResponseAuditor`, joined by
  a :class:`CommandTracker`.

Every parser raises only :class:`~protocols.errors.RemoteProtocolError` for
bad input, its ``wire_hint`` the MySQL error number to answer with.
"""

from protocols.mysql.auth import (
    CACHING_SHA2_PASSWORD, CLEAR_PASSWORD, CLIENT_ED25519, NATIVE_PASSWORD,
    caching_sha2_password, clear_password, ed25519_password, native_password,
    rsa_encrypt_password,
)
from protocols.mysql.client import (
    ALL_PLUGINS, DEFAULT_CLIENT_CAPABILITIES, LoginReady, LoginRefused, LoginState,
    UpstreamLogin,
)
from protocols.mysql.commands import (
    ChangeUserEvent, CommandAuditor, CommandEvent, CommandTracker, ExecuteEvent, InitDbEvent,
    LocalInfileDataEvent, PrepareEvent, QueryEvent, QuitEvent, ResetConnectionEvent,
    StatementCloseEvent, StatementResetEvent,
)
from protocols.mysql.constants import (
    MAX_PAYLOAD, Capability, Command, ErrorNumber, ServerStatus,
)
from protocols.mysql.generic import EofPacket, ErrPacket, OkPacket
from protocols.mysql.messages import (
    AuthMoreData, AuthSwitchRequest, Handshake, HandshakeResponse, ServerInfo, SSLRequest,
    StartTLS,
)
from protocols.mysql.packets import PacketChannel, encode_packets
from protocols.mysql.responses import ErrorEvent, LocalInfileRequestEvent, ResponseAuditor
from protocols.mysql.server import (
    ClientLogin, GatewayHandshake, HandshakeState, advertised, err_for,
)
from protocols.signals import NEED_DATA, PAUSED, ConnectionClosed

__all__ = [
    # signals and events both roles share
    "NEED_DATA", "PAUSED", "ConnectionClosed", "StartTLS",
    # constants
    "MAX_PAYLOAD", "Capability", "Command", "ErrorNumber", "ServerStatus",
    # packets and messages
    "PacketChannel", "encode_packets", "Handshake", "SSLRequest", "HandshakeResponse",
    "AuthSwitchRequest", "AuthMoreData", "OkPacket", "ErrPacket", "EofPacket", "ServerInfo",
    # auth plugins
    "NATIVE_PASSWORD", "CACHING_SHA2_PASSWORD", "CLIENT_ED25519", "CLEAR_PASSWORD",
    "native_password", "caching_sha2_password", "rsa_encrypt_password", "ed25519_password",
    "clear_password",
    # cluster: login
    "UpstreamLogin", "LoginState", "LoginReady", "LoginRefused", "ALL_PLUGINS",
    "DEFAULT_CLIENT_CAPABILITIES",
    # gateway
    "GatewayHandshake", "HandshakeState", "ClientLogin", "advertised", "err_for",
    # cluster: audit
    "CommandTracker", "CommandAuditor", "ResponseAuditor", "QueryEvent", "PrepareEvent",
    "ExecuteEvent", "StatementCloseEvent", "StatementResetEvent", "InitDbEvent",
    "ChangeUserEvent", "ResetConnectionEvent", "QuitEvent", "CommandEvent",
    "LocalInfileDataEvent", "ErrorEvent", "LocalInfileRequestEvent",
]

"""The gateway's answer to a driver's ``hello``: the upstream's real limits,
one member, and only what both ends support.

Spec: mongodb/specifications ``source/mongodb-handshake/handshake.md``
(the client's hello: ``client``, ``compression``, ``helloOk``,
``saslSupportedMechs``, ``speculativeAuthenticate``, ``loadBalanced``);
``source/server-discovery-and-monitoring/server-discovery-and-monitoring.md``
(how a reply's fields set a server's type); ``source/compression/
OP_COMPRESSED.md`` (the compressor is negotiated in hello).

Theory of operation
-------------------
Issue 17: the gateway answers the handshake itself, so the client needs no
credentials, with values the upstream gave the cluster (wire versions,
maxBsonObjectSize, maxMessageSizeBytes, maxWriteBatchSize,
logicalSessionTimeoutMinutes). A driver must never learn the real replica
set's members (it would connect to them directly), so :func:`gateway_hello`
leaves out ``hosts``, ``setName``, ``primary``, ``me`` and the like. A
replica set or a sharded cluster upstream is shown as a router
(``msg: "isdbgrid"``): to a driver that is one server that takes every
command and allows sessions and transactions, which is what the gateway
is; a standalone upstream stays a standalone. ``topologyVersion`` is left
out too, so drivers poll rather than stream (an exhaust hello the gateway
would have to keep open). Authentication fields (``saslSupportedMechs``,
``speculativeAuthenticate``) are never answered: the gateway's login is
the session certificate. ``compression`` is the client's list, in its
order, kept to what the codec can open: a compressor neither end offers
is never used.

Before its session needs the server, a connection is read with a
:class:`HandshakeReader`: the messages the gateway answers itself (hellos;
a login against the local credential) one by one, and at the first message
that is the session's, its bytes untouched, to hand to the cluster
(``trailing_data``). Monitoring connections, which only ever send hello
(server-discovery-and-monitoring/server-monitoring.md), never need the
server. With no ``topologyVersion`` in the gateway's hello a driver never
asks for an awaitable or exhaust hello, and one that does anyway is
answered at once (server-monitoring.md: a server replies immediately when
the request's ``topologyVersion.processId`` is not its own).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

from typing import Literal

import attrs

from protocols.buffer import BufferedReceiver, ReceiveBuffer
from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.mongodb.bson import Int64
from protocols.mongodb.commands import ERROR_CODES, HANDSHAKE_COMMANDS
from protocols.mongodb.wire import (
    DEFAULT_MAX_MESSAGE_SIZE, HEADER, OP_MSG, OP_QUERY, SUPPORTED_COMPRESSORS, OpMsg, OpQuery, decode_message,
    protocol_error,
)
from protocols.signals import NEED_DATA, PAUSED, ConnectionClosed, Signal

__all__ = ["COPIED_FIELDS", "DEFAULT_HELLO", "HELLO_PROBE", "MAX_HANDSHAKE_MESSAGE", "ClientHello", "HandshakeReader",
           "SessionBegins", "client_hello", "command_of", "compressors_of", "gateway_hello", "hello_params",
           "hello_from_params", "max_message_size"]

#: What the gateway's hello copies from the upstream's, when present.
COPIED_FIELDS: Final = (
    "maxBsonObjectSize", "maxMessageSizeBytes", "maxWriteBatchSize", "localTime",
    "logicalSessionTimeoutMinutes", "minWireVersion", "maxWireVersion", "readOnly",
)
_ROUTED: Final = ("setName", "msg")  # an upstream with either is a set or a router
#: What a hello says when there is no upstream to copy from (a refused
#: dial: the driver must get as far as its first command to hear why):
#: MongoDB 7.0's limits and wire version.
DEFAULT_HELLO: Final[Mapping[str, Any]] = {
    "maxBsonObjectSize": 16 * 1024 * 1024, "maxMessageSizeBytes": 48_000_000,
    "maxWriteBatchSize": 100_000, "logicalSessionTimeoutMinutes": 30, "minWireVersion": 0,
    "maxWireVersion": 21,
}
_PARAM: Final = "hello."
#: The dial parameter of a hello probe: a control dial the cluster answers
#: with the server's hello values (:func:`hello_params`), from a
#: connection of its own that sends one hello and closes (no login, no
#: session).
HELLO_PROBE: Final = "mongodb.probe"
#: A server's maxMessageSizeBytes below this is not believed (a hello or a
#: login would not fit): the default is used instead.
_MIN_MESSAGE_SIZE: Final = 1024 * 1024


def max_message_size(hello: Mapping[str, Any]) -> int:
    """The largest message a client may send, from a server's hello: its
    ``maxMessageSizeBytes``, at most :data:`DEFAULT_MAX_MESSAGE_SIZE` (what
    every MongoDB server says: anything larger is not a server we would
    buffer for)."""
    size = hello.get("maxMessageSizeBytes")
    if isinstance(size, int) and not isinstance(size, bool) and size >= _MIN_MESSAGE_SIZE:
        return min(int(size), DEFAULT_MAX_MESSAGE_SIZE)
    return DEFAULT_MAX_MESSAGE_SIZE


def compressors_of(hello: Mapping[str, Any]) -> tuple[str, ...]:
    """The compressors a server's hello agreed to that the codec can open,
    in the server's order."""
    offered = hello.get("compression")
    if not isinstance(offered, list):
        return ()
    return tuple(c for c in offered if c in SUPPORTED_COMPRESSORS)


@attrs.frozen(kw_only=True)
class ClientHello:
    """What a driver's hello asks for."""

    command: str  # "hello", "isMaster" or "ismaster": the reply's spelling follows it
    compression: tuple[str, ...] = ()
    hello_ok: bool = False
    #: The driver would authenticate (it asked which mechanisms a user has,
    #: or sent a first SCRAM step along): the gateway should say it need not.
    wants_auth: bool = False
    load_balanced: bool = False
    application: str | None = None


def client_hello(body: Mapping[str, Any]) -> ClientHello:
    """Read a hello (OP_MSG body, or a legacy OP_QUERY's query document)."""
    command = next(iter(body), None)
    if command not in HANDSHAKE_COMMANDS:
        raise RemoteProtocolError(f"the first command must be hello, not {str(command)[:64]!r}",
                                  code=ErrorCode.BAD_REQUEST,
                                  wire_hint=ERROR_CODES["CommandNotSupported"])
    compression = body.get("compression")
    names = tuple(c for c in compression if isinstance(c, str)) if isinstance(
        compression, list) else ()
    client = body.get("client")
    application = client.get("application") if isinstance(client, Mapping) else None
    app_name = application.get("name") if isinstance(application, Mapping) else None
    return ClientHello(
        command=command, compression=names, hello_ok=body.get("helloOk") is True,
        wants_auth="saslSupportedMechs" in body or "speculativeAuthenticate" in body,
        load_balanced=body.get("loadBalanced") is True,
        application=app_name[:128] if isinstance(app_name, str) else None)


def gateway_hello(upstream: Mapping[str, Any], request: ClientHello, *,
                  connection_id: int | None = None,
                  compressors: Iterable[str] = SUPPORTED_COMPRESSORS) -> dict[str, Any]:
    """The hello reply the gateway sends for ``request``, from the hello
    the upstream gave the cluster; see the module docstring."""
    reply: dict[str, Any] = {}
    if request.command == "hello":
        reply["isWritablePrimary"] = True
    else:
        reply["ismaster"] = True
    if request.hello_ok:
        reply["helloOk"] = True
    if any(key in upstream for key in _ROUTED):
        reply["msg"] = "isdbgrid"
    for key in COPIED_FIELDS:
        if key in upstream:
            reply[key] = upstream[key]
    reply.setdefault("readOnly", False)
    if connection_id is not None:
        reply["connectionId"] = Int64(connection_id) if connection_id >= 2**31 else connection_id
    offered = set(compressors)
    both = [name for name in request.compression if name in offered]
    if both:
        reply["compression"] = both
    reply["ok"] = 1.0
    return reply


def hello_params(upstream: Mapping[str, Any], compressors: Iterable[str] = ()) -> dict[str, str]:
    """What :func:`gateway_hello` needs of the upstream's hello, as the
    string parameters of a dial's accept (``hello.<field>``): the cluster
    sends them, the gateway answers a driver's first hello from them.
    ``compressors``: those the cluster's connection to the upstream has."""
    out: dict[str, str] = {}
    for key in COPIED_FIELDS:
        value = upstream.get(key)
        if key == "localTime":
            continue  # the gateway's own clock says it
        if isinstance(value, bool):
            out[_PARAM + key] = "1" if value else "0"
        elif isinstance(value, int):
            out[_PARAM + key] = str(int(value))
    if any(key in upstream for key in _ROUTED):
        out[_PARAM + "msg"] = "isdbgrid"
    connection = upstream.get("connectionId")
    if isinstance(connection, int) and not isinstance(connection, bool):
        out[_PARAM + "connectionId"] = str(int(connection))
    out[_PARAM + "compression"] = ",".join(c for c in compressors if c in SUPPORTED_COMPRESSORS)
    return out


def hello_from_params(params: Mapping[str, str]) -> dict[str, Any]:
    """The upstream hello :func:`hello_params` carried (fields it cannot
    read are left out: :func:`gateway_hello` then omits them)."""
    hello: dict[str, Any] = {}
    for key, value in params.items():
        if not key.startswith(_PARAM):
            continue
        field = key[len(_PARAM):]
        if field == "readOnly":
            hello[field] = value == "1"
        elif field == "msg":
            hello[field] = "isdbgrid"
        elif field == "compression":
            hello[field] = [c for c in value.split(",") if c]
        elif field in COPIED_FIELDS or field == "connectionId":
            try:
                number = int(value)
            except ValueError:
                continue
            hello[field] = Int64(number) if not -2**31 <= number < 2**31 else number
    return hello


#: The largest message a :class:`HandshakeReader` reads as one of the
#: handshake's: a hello is a few hundred bytes (the handshake spec caps its
#: ``client`` document at 512), a SCRAM step less. A longer one is the
#: session's, unread.
MAX_HANDSHAKE_MESSAGE: Final = 64 * 1024


def command_of(message: OpMsg | OpQuery) -> Mapping[str, Any]:
    """A command's document: an OP_MSG's body, or a legacy OP_QUERY's
    query (its ``$query`` when wrapped)."""
    if isinstance(message, OpMsg):
        return message.body
    inner = message.query.get("$query")
    return inner if isinstance(inner, Mapping) else message.query


@attrs.frozen
class SessionBegins:
    """The next message is the session's (not one the reader was asked to
    stop at): it and what follows are ``trailing_data``."""


class HandshakeReader(BufferedReceiver):
    """A client's messages while the gateway answers them itself (see the
    module docstring), h11 style: ``receive_data`` (``b""`` for EOF), then
    ``next_event()``: an :class:`OpMsg` or :class:`OpQuery` whose command
    is in ``handled``, NEED_DATA, ConnectionClosed, or, at the first other
    message, :class:`SessionBegins` (then PAUSED), after which
    ``trailing_data`` holds its bytes and all that came behind them, for
    the session.

    A message is the session's without being decoded when it is compressed
    (the compression spec never compresses hello or a login) or longer
    than ``max_message_size``; a malformed handshake-sized one raises
    RemoteProtocolError and poisons the reader."""

    def __init__(self, handled: frozenset[str] | set[str], *,
                 max_message_size: int = MAX_HANDSHAKE_MESSAGE) -> None:
        self.handled = handled
        self._max = max_message_size
        # One whole message and the start of the next (a client that pipelines).
        self._buffer = ReceiveBuffer(max_message_size + 64 * 1024)
        self._eof = False
        self._error: RemoteProtocolError | None = None
        self._begun = False

    def _overflowed(self, exc: RemoteProtocolError) -> None:
        if not self._begun:
            self._error = protocol_error(f"a client sent more than a handshake's worth of bytes ahead "
                                         f"({exc.message})")

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if self._begun and data:
            raise LocalProtocolError("the session has begun: relay its bytes, do not feed them here")
        super().receive_data(data)

    @property
    def pending(self) -> bool:
        """Part of a message is here: the client owes the rest (the caller
        bounds how long it may take)."""
        return bool(self._buffer) and not self._begun

    def next_event(self) -> OpMsg | OpQuery | SessionBegins | ConnectionClosed | Signal:
        if self._error is not None:
            err = self._error
            raise RemoteProtocolError(err.message, code=err.code, wire_hint=err.wire_hint)
        if self._begun:
            return PAUSED  # as h11 after a protocol switch: the rest is not ours
        head = self._buffer.peek(HEADER.size)
        if head is None:
            return self._need()
        length, _request_id, _response_to, op_code = HEADER.unpack(head)
        if length < HEADER.size:
            self._error = protocol_error(f"a message's length {length} is shorter than its header")
            return self.next_event()
        if op_code not in (OP_MSG, OP_QUERY) or length > self._max:
            return self._begin()
        data = self._buffer.peek(length)
        if data is None:
            return self._need()
        try:
            message = decode_message(data, max_message_size=self._max)
        except RemoteProtocolError as exc:
            self._error = exc
            raise
        assert isinstance(message, (OpMsg, OpQuery))
        if isinstance(message, OpQuery) and not message.collection.endswith(".$cmd"):
            return self._begin()  # a legacy query on a collection, not a command
        if next(iter(command_of(message)), None) not in self.handled:
            return self._begin()
        self._buffer.consume_exactly(length)
        self._buffer.commit()
        return message

    def _need(self) -> ConnectionClosed | Literal[Signal.NEED_DATA]:
        if self._eof:
            return ConnectionClosed(clean=not self._buffer)
        return NEED_DATA

    def _begin(self) -> SessionBegins:
        self._begun = True
        return SessionBegins()

    @property
    def begun(self) -> bool:
        """Whether the session began (:class:`SessionBegins` was returned,
        or :meth:`stop` called)."""
        return self._begun

    def stop(self) -> bytes:
        """The session begins now, whatever comes next (the caller relays
        from here): what is buffered, ``trailing_data``'s bytes."""
        self._begun = True
        return self.trailing_data[0]

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """The session's first bytes (from the message that began it) and
        whether EOF came; only once :class:`SessionBegins` was returned."""
        if not self._begun:
            raise LocalProtocolError("no trailing data before the session begins")
        return self._buffer.peek(len(self._buffer)) or b"", self._eof

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
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Final

import attrs

from protocols.errors import ErrorCode, RemoteProtocolError
from protocols.mongodb.bson import Int64
from protocols.mongodb.commands import ERROR_CODES, HANDSHAKE_COMMANDS
from protocols.mongodb.wire import SUPPORTED_COMPRESSORS

__all__ = ["COPIED_FIELDS", "DEFAULT_HELLO", "ClientHello", "client_hello", "gateway_hello",
           "hello_params", "hello_from_params"]

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

"""The mysql kind's dial parameters: what the gateway and the cluster tell
each other on the dial (protocols/dial.py) about a MySQL session.

Gateway -> cluster (DialRequest), besides ``db_user`` and ``db_name``: what
the local client said in its HandshakeResponse41, so the cluster logs in
upstream the same way and the relayed command phase agrees end to end
(:data:`CAPS`, :data:`CHARSET`, :data:`MAX_PACKET`, connection attributes
under :data:`ATTR_PREFIX`); :data:`PROBE` makes a control dial that only
reads the server's handshake.

Cluster -> gateway (DialAccept): the server's handshake values
(:func:`server_params` / :func:`server_info_of`), which the gateway greets
later clients with, and the login's verdict: :data:`OK` (the server's OK
payload) or :data:`ERR` (its ERR payload, verbatim), both hex. With them,
:data:`FOLLOWS`: which of the capabilities that older clusters could not
audit (:data:`FOLLOWED_CAPS`) this cluster's auditor follows; a gateway
offers its clients those of them the server has, and none of them to a
cluster that does not say (:func:`server_info_of` leaves them out).

Every value is text (the dial's rule); numbers are decimal. Within the
dial's version, receivers ignore names they do not know, and a name is
only dropped once no receiver still in use reads it
(docs/wire.md, "Version rule"): ``mysql.session_caps`` (the capabilities
the cluster logged in with) is no longer sent; the gateways that read it
(for their own guard of ``USE``, gone since) fell back to the
capabilities they had sent, which the cluster's never exceed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from protocols.errors import ProtocolError
from protocols.mysql.constants import Capability
from protocols.mysql.messages import ServerInfo

__all__ = [
    "CAPS", "CHARSET", "MAX_PACKET", "PROBE", "ATTR_PREFIX",
    "MAX_ATTRIBUTES", "MAX_USER", "MAX_SCHEMA", "VERSION",
    "SERVER_CAPS", "SERVER_CHARSET", "STATUS", "PLUGIN", "THREAD", "OK", "ERR", "FOLLOWS", "FOLLOWED_CAPS",
    "server_params", "server_info_of",
]

#: MariaDB takes user names of up to 80 characters (MySQL 32), schema names of 64.
MAX_USER: Final = 80
MAX_SCHEMA: Final = 64

CAPS: Final = "mysql.caps"
CHARSET: Final = "mysql.charset"
MAX_PACKET: Final = "mysql.max_packet"
PROBE: Final = "mysql.probe"
ATTR_PREFIX: Final = "mysql.attr."
#: Connection attributes passed on at most (the dial carries 32 parameters).
MAX_ATTRIBUTES: Final = 16

VERSION: Final = "mysql.version"
SERVER_CAPS: Final = "mysql.server_caps"
SERVER_CHARSET: Final = "mysql.server_charset"
STATUS: Final = "mysql.status"
PLUGIN: Final = "mysql.plugin"
THREAD: Final = "mysql.thread"
OK: Final = "mysql.ok"
ERR: Final = "mysql.err"
FOLLOWS: Final = "mysql.follows"
#: Capabilities that change what the server's responses look like and that
#: a cluster's auditor must know to follow: a gateway offers them only
#: where the cluster says it does (:data:`FOLLOWS`, decimal). MariaDB's
#: cached result-set metadata (issue 16).
FOLLOWED_CAPS: Final = Capability.MARIADB_CACHE_METADATA

def server_params(info: ServerInfo) -> dict[str, str]:
    """A server's handshake values as DialAccept parameters."""
    out = {VERSION: info.server_version[:255], SERVER_CAPS: str(info.capabilities.value),
           SERVER_CHARSET: str(info.charset), STATUS: str(info.status),
           THREAD: str(info.connection_id), FOLLOWS: str(FOLLOWED_CAPS.value)}
    if info.auth_plugin is not None:
        out[PLUGIN] = info.auth_plugin
    return out


def server_info_of(params: Mapping[str, str]) -> ServerInfo | None:
    """The server's handshake values from DialAccept parameters; None if
    they are not there or not valid. Its capabilities lack those of
    :data:`FOLLOWED_CAPS` the cluster did not say it follows."""
    try:
        unfollowed = FOLLOWED_CAPS.value & ~int(params.get(FOLLOWS, "0"))
        return ServerInfo(server_version=params[VERSION], capabilities=int(params[SERVER_CAPS]) & ~unfollowed,
                          charset=int(params[SERVER_CHARSET]), status=int(params[STATUS]),
                          connection_id=int(params.get(THREAD, "0")),
                          auth_plugin=params.get(PLUGIN))
    except (KeyError, ValueError, TypeError, ProtocolError):
        return None

"""A MySQL session's COM_CHANGE_USER, re-dialled as the new db user.

Theory of operation
-------------------
A session is one upstream connection, logged in by the cluster as the db
user the dial named (gateway/cluster/mysql.py). When the client sends
COM_CHANGE_USER, the session's message filter (the auditor, in the relay
engine's thread) holds the command (``filters.Hold``), so the server never
sees it, and the relay holds whatever the client sends after it; the
session's trio task runs :meth:`UserChanger.change`, which:

1. asks the roles, fresh, whether this user may be the new db user (and
   use the database the command names), exactly as a dial would be
   decided; no: ERR 1045 (28000), or 1044 (42000) for the database alone;
2. opens a new connection to the server and logs in as the new db user
   (the resource's certificate or password for that user; the session's
   capabilities, character set and connection attributes); the server's
   own ERR goes to the client as it is if the server says no;
3. yes: the stream's upstream socket is switched to the new connection
   (``MuxLink.switch``: the old one gets COM_QUIT and is closed) and the
   client gets the OK (after caching_sha2's fast auth success when the
   client named that plugin), with the sequence ids COM_CHANGE_USER's
   answer has (from 1).

What it returns is the answer the relay sends the client, after which it
goes on with the client's bytes. Whatever the outcome the session goes
on: as the new db user, or as the one it was. The client's password in
the command is not looked at: identity is the session certificate, as at
the dial. A client should wait for the answer before it sends more (the
protocol says so); what one sends meanwhile waits, unread. Bounded: one
command is held at a time, and the re-dial by the login's timeout. A
session on a connection of its own (the kind's
ALPN route, not the multiplexed connection) cannot be switched: its
COM_CHANGE_USER gets ERR 1235 (gateway/cluster/mysql.py). Audited as
``mysql.change_user`` with the outcome.
"""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING, Any, Mapping

import trio

from gateway.cluster import rbac, resource_specs
from gateway.cluster.core import Cluster, LiveSession
from gateway.cluster.dbkind import LOGIN_TIMEOUT, PARAM_DB_NAME, PARAM_DB_USER, Upstream
from gateway.cluster.dial import Refused, connect_tcp
from gateway.cluster.store import Resource
from protocols.errors import ProtocolError
from protocols.mysql import (
    AuthMoreData, Capability, ChangeUserEvent, Command, ErrorNumber, ErrPacket, LoginRefused, UpstreamLogin,
    encode_packets,
)
from protocols.mysql import auth
from protocols.mysql.constants import ERRNO_FOR_CODE
from protocols.mysql.dialparams import MAX_SCHEMA, MAX_USER

if TYPE_CHECKING:
    from gateway.cluster.mysql import MySqlKind, MySqlSessionAuditor

log = logging.getLogger("wicket.cluster.mysql")

#: What a client says before it leaves: the old connection's goodbye.
COM_QUIT = encode_packets(bytes([Command.QUIT]), 0)[0]


class UserChanger:
    """Re-dials a session's COM_CHANGE_USER (see the module docstring).
    ``login``: what the session's upstream login asked for besides the
    user and the database (capabilities, character set, attributes...)."""

    def __init__(self, kind: MySqlKind, cluster: Cluster, resource: Resource,
                 spec: resource_specs.DatabaseSpec, session: LiveSession, auditor: MySqlSessionAuditor,
                 login: Mapping[str, Any]) -> None:
        self.kind, self.cluster, self.resource, self.spec = kind, cluster, resource, spec
        self.session, self.auditor, self.login = session, auditor, dict(login)

    async def change(self, event: ChangeUserEvent) -> bytes:
        """(trio, the filter's Hold) Re-dial for ``event``: the answer for
        the client, once the stream's upstream is switched or not."""
        link, stream = self.session.extra["stream"]
        answer, upstream, outcome = await self._redial(event)
        if upstream is None:
            switched = False
        else:
            self.auditor.tracker.new_connection()  # (the old server sends nothing now: no race)
            switched = link.switch(stream, upstream, goodbye=COM_QUIT)
        if switched:
            self.auditor.db_user = event.username
            self.session.extra["mysql_db_user"] = event.username  # for KILL QUERY (interrupt)
            self.session.extra["mysql_thread"] = outcome
            outcome = f"switched (thread {outcome})"
        elif upstream is not None:
            # Over, or (a client that broke the protocol) not between
            # exchanges: the OK would not be true.
            raise trio.BrokenResourceError("COM_CHANGE_USER: the session could not be switched to the new "
                                           "connection; it ends")
        log.info("mysql_change_user resource=%s session=%s db_user=%s outcome=%r", self.resource.name,
                 self.session.id, event.username, outcome)
        self.auditor.emit("change_user", username=event.username, database=event.database,
                          refused=upstream is None, outcome=outcome)
        return answer

    async def _redial(self, event: ChangeUserEvent) -> tuple[bytes, Any, Any]:
        """(the answer for the client, the new upstream or None, what
        happened: the new connection's id, or why not)."""
        user, db = event.username, event.database or None
        stays = f"this session stays db user {self.auditor.db_user!r}"
        roles = await self.cluster.session_roles(self.session)
        why = self._refusal(roles, user, db)
        if why is not None:
            errno, reason = why
            return _err(ErrPacket.of(errno, f"{reason}; {stays}. Ask a cluster administrator for a role "
                                            f"that allows it")), None, f"refused: {reason}"
        upstream = None
        try:
            password = self.kind.password(self.spec, self.resource, user)
            upstream = Upstream(await connect_tcp(self.resource))
            asked = dict(self.login)
            if Capability.LOCAL_FILES in asked["capabilities"] and not self._infile(roles, user, db):
                # The server must not ask for files (the client's capabilities stay as they were).
                asked["capabilities"] &= ~Capability.LOCAL_FILES
            with trio.fail_after(LOGIN_TIMEOUT):
                login = UpstreamLogin(user=user, password=password, database=db, **asked)
                outcome = await self.kind.upstream_login(self.cluster, self.resource, self.spec, user, upstream,
                                                         login)
        except Refused as exc:
            return self._failed(upstream, ERRNO_FOR_CODE[exc.code], exc.message, stays)
        except trio.TooSlowError:
            return self._failed(upstream, ErrorNumber.ER_CONNECT_TO_FOREIGN_DATA_SOURCE,
                                f"{self.resource.name} did not complete the login within {LOGIN_TIMEOUT:.0f}s",
                                stays)
        except (ProtocolError, OSError, ssl.SSLError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            return self._failed(upstream, ErrorNumber.ER_CONNECT_TO_FOREIGN_DATA_SOURCE,
                                f"talking to {self.resource.name} failed: {getattr(exc, 'message', None) or exc}",
                                stays)
        except BaseException:  # cancelled: the session is over
            _drop(upstream)
            raise
        if isinstance(outcome, LoginRefused):  # the server's own words, as at connect time
            _drop(upstream)
            error = outcome.error
            return encode_packets(outcome.payload, 1)[0], None, f"refused by the server: {error.errno} {error.message}"
        answer, seq = b"", 1
        if event.plugin == auth.CACHING_SHA2_PASSWORD:
            answer, seq = encode_packets(AuthMoreData(data=auth.FAST_AUTH_SUCCESS).encode(), seq)
        answer += encode_packets(outcome.ok_payload, seq)[0]
        trailing, _ = login.trailing_data
        return answer + trailing, upstream.stream, outcome.server.connection_id

    def _infile(self, roles: list, user: str, db: str | None) -> bool:
        from gateway.cluster.mysql import local_infile_allowed  # (that module imports this one)

        params = {PARAM_DB_USER: user, **({PARAM_DB_NAME: db} if db is not None else {})}
        return local_infile_allowed(roles, self.resource, params)

    def _refusal(self, roles: list, user: str, db: str | None) -> tuple[int, str] | None:
        """Why ``roles`` do not let this session be ``user`` (in ``db``), or None."""
        if not user or len(user) > MAX_USER or (db is not None and len(db) > MAX_SCHEMA):
            return ErrorNumber.ER_ACCESS_DENIED_ERROR, (f"db user names are 1-{MAX_USER} characters and "
                                                        f"database names at most {MAX_SCHEMA}")
        if "\ufffd" in user or (db is not None and "\ufffd" in db):
            return ErrorNumber.ER_ACCESS_DENIED_ERROR, "names must be UTF-8 through Wicket"
        where = (self.resource.name, self.resource.labels)
        as_user = rbac.decide(roles, *where, {PARAM_DB_USER: user})
        if not as_user.allowed:
            return ErrorNumber.ER_ACCESS_DENIED_ERROR, as_user.reason
        if db is not None:
            in_db = rbac.decide(roles, *where, {PARAM_DB_USER: user, PARAM_DB_NAME: db})
            if not in_db.allowed:
                return ErrorNumber.ER_DBACCESS_DENIED_ERROR, in_db.reason
        return None

    def _failed(self, upstream: Upstream | None, errno: int, message: str, stays: str) -> tuple[bytes, None, str]:
        _drop(upstream)
        log.info("mysql_change_user_failed resource=%s session=%s error=%r", self.resource.name, self.session.id,
                 message)
        return _err(ErrPacket.of(errno, f"{message}; {stays}")), None, f"failed: {message}"


def _drop(upstream: Upstream | None) -> None:
    """Close a connection the session will not use (at once: no await)."""
    if upstream is not None:
        upstream.tcp.socket.close()


def _err(err: ErrPacket) -> bytes:
    """``err`` as COM_CHANGE_USER's answer (sequence id 1)."""
    return encode_packets(err.encode(), 1)[0]

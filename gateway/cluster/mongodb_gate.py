"""A MongoDB session's commands, checked and audited one by one, inside
the relay: the kind's message filter (gateway/net/filters.py).

Theory of operation
-------------------
The relay engine (or the task-based relay) carries the session between
the gateway and the logged-in server connection, and hands the gate every
whole message the client sends (framed by protocols/mongodb/audit.py's
layout, at most the server's ``maxMessageSizeBytes``), before it moves on.
Each is read as a :class:`~protocols.mongodb.commands.Command` without
decoding its documents (:func:`~protocols.mongodb.audit.client_event`),
then:

- a ``hello``/``isMaster`` is answered here, from the server's own hello
  (protocols/mongodb/handshake.py: its limits and wire versions, one
  member, only compressors both ends have);
- a login attempt (``saslStart``, ``authenticate``...) is refused with
  AuthenticationFailed (18) saying to drop the credentials: the
  connection is already logged in as the db user, and a client must not
  switch it to another;
- a command on a database the user's roles do not allow (each database
  it touches: ``$db``, ``$out``/``$merge``/``$lookup`` targets,
  ``renameCollection``'s, a ``bulkWrite``'s ``nsInfo``) gets
  Unauthorized (13) naming the database, and the session goes on;
- anything else goes to the server as it came (checksums and compression
  untouched: the gate recomputes nothing).

Every command is audited (``mongodb.command``: database, command,
collection, filter shapes, pipeline stages, namespaces, counts; never a
value), and every refusal (``mongodb.denied``). The server's replies pass
as they come through :meth:`CommandGate.tap_server` (the relay's tap on
the server's side) into the
:class:`~protocols.mongodb.audit.ServerAuditor`: error replies become
``mongodb.error`` with the command they answer. The relay keeps the
gate's own replies out of the server's (an answer made while one of
the server's replies is half-relayed follows it).

All of it runs in the relay's thread and blocks on nothing: the roles
are read from the cluster's access snapshot when it is fresh
(``Cluster.fresh_snapshot``, one indexed read), at most every
:data:`ROLE_RECHECK` seconds; when the snapshot is stale (a change is being
loaded, which the lock watcher does within ``LOCK_POLL_INTERVAL``) the
roles already read stay until the next command looks again. So a role
change reaches a live session within about a second and a half; a lock or
a revocation cuts it at once, as for every kind. A denial is decided per
database once per snapshot.

When the server refused the cluster's login (``refusal``: a wrong secret
in the cluster's config, a user missing on the server), the session still
starts, as PostgreSQL's does with the server's ErrorResponse: the server's
connection is closed at once and the relay's upstream is one end of a
socket pair (``stand_in``) that the gate closes when the client's side
ends; hellos are answered from the server's hello, and every other command
gets AuthenticationFailed (18) with the server's words, so the driver
raises them instead of retrying a dropped connection.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import trio

from gateway.cluster import rbac
from gateway.cluster.core import Cluster, LiveSession
from gateway.cluster.dbaudit import SessionAuditor
from gateway.cluster.store import Resource
from protocols.errors import RemoteProtocolError
from protocols.framing import Frame
from protocols.mongodb import (
    CommandEvent, ServerAuditor, client_hello, compressors_of, decode_message, error_reply, gateway_hello,
    max_message_size, reply_to,
)
from protocols.mongodb.audit import MESSAGE_AFTER_LENGTH, ErrorReplyEvent, client_event
from protocols.mongodb.commands import AUTH_COMMANDS, HANDSHAKE_COMMANDS, Command
from protocols.mongodb.wire import OpMsg, OpQuery

log = logging.getLogger("wicket.cluster.mongodb")

ROLE_RECHECK = 1.0
#: Commands that read or change nothing of any database (a driver's
#: housekeeping): run whatever ``$db`` they name. A transaction's commit
#: and abort name ``admin`` but act on commands already checked.
NO_DATABASE = frozenset({
    "ping", "buildInfo", "buildinfo", "endSessions", "refreshSessions", "connectionStatus",
    "whatsmyuri", "listCommands", "commitTransaction", "abortTransaction",
})
#: Requests whose command the audit pairs with an error reply, at most.
MAX_PENDING = 1024
#: Logical sessions (``lsid``) and open cursors (seen in ``getMore``) a
#: session remembers for its interrupt (killSessions, killCursors), at most:
#: the most recent ones.
MAX_LSIDS, MAX_CURSORS = 64, 256


class CommandGate:
    """See the module docstring: a :class:`~gateway.net.filters.MessageFilter`
    (hand it to the relay), with :meth:`tap_server` for the server's side."""

    layout = MESSAGE_AFTER_LENGTH

    def __init__(self, cluster: Cluster, session: LiveSession, resource: Resource,
                 *, hello: dict[str, Any], db_user: str, db_name: str | None,
                 snapshot=None, refusal: str | None = None,
                 stand_in: socket.socket | None = None) -> None:
        self.cluster, self.session, self.resource = cluster, session, resource
        self.hello, self.db_user, self.db_name = hello, db_user, db_name
        #: The server refused our login: every command gets this (18).
        self.refusal = refusal
        #: Then: the far end of the relay's upstream, closed with the client's side.
        self.stand_in = stand_in
        self.max_length = max_message_size(hello)
        self.compressors = compressors_of(hello)
        self.audit = CommandAudit(cluster, session)
        self._server_audit = ServerAuditor(max_message_size=self.max_length)
        self._pending: dict[int, tuple[str, str]] = {}  # request id -> (command, database)
        #: The access snapshot of the dial: the roles' source until a
        #: fresh one is at hand at the first command.
        self._snapshot = snapshot
        self._roles: list[rbac.Role] | None = None
        self._roles_read = 0.0
        self._decided: dict[str, bool] = {}
        #: What a cut stops on the server (MongoKind.interrupt), oldest first.
        #: Written in the relay's thread: read them under the engine's lock.
        self.lsids: dict[bytes, None] = {}
        self.cursors: dict[int, tuple[str, str]] = {}  # id -> (database, collection)

    # -- the session ------------------------------------------------------------

    def eof(self) -> None:
        """The client's side ended: a session without a server ends too."""
        if self.stand_in is not None:
            self.stand_in.close()

    def finish(self) -> None:
        """(after the relay) Nothing is left half-said: replies are audited
        as they pass."""
        self._pending.clear()
        self.eof()

    # -- client -> server -------------------------------------------------------

    def on_message(self, raw: bytes) -> bytes | None:
        """One whole client message: None to pass it on, else the answer
        (b"": none, for an unacknowledged write). Raises
        RemoteProtocolError (recorded) for one that cannot be read."""
        try:
            event = client_event(Frame(None, len(raw) - 4, raw[4:]), self.max_length)
            if not isinstance(event, CommandEvent):
                # Too large to read its command from: no check, no pass.
                return self._refuse_raw(raw, event.request_id, "the message is too large to check", "BadValue")
            return self._decide(event, raw)
        except RemoteProtocolError as exc:
            self.broken(exc)
            raise

    def broken(self, error: Exception) -> None:
        """The client's message cannot be read: on record, then the session ends."""
        message = getattr(error, "message", None) or str(error)
        self.audit.emit("protocol_error", side="client", error=message)
        log.info("mongodb_protocol_error session=%s side=client error=%s", self.session.id, message)

    def _decide(self, event: CommandEvent, raw: bytes) -> bytes | None:
        """None to pass ``raw`` on; else the answer made here."""
        command = event.command
        name = command.name
        if name in HANDSHAKE_COMMANDS:
            request = decode_message(raw, max_message_size=self.max_length)
            body = request.body if isinstance(request, OpMsg) else request.query
            if "$query" in body and isinstance(body["$query"], dict):
                body = body["$query"]
            hello = gateway_hello(self.hello, client_hello(body), connection_id=integer(self.hello.get("connectionId")),
                                  compressors=self.compressors)
            return reply_to(request, hello).encode()
        if self.refusal is not None:
            return self._refuse(raw, event, self.refusal, "AuthenticationFailed")
        if name in AUTH_COMMANDS:
            self.audit.emit("denied", database=command.database, command=name,
                            reason="client login attempt", mechanism=command.mechanism)
            return self._refuse(raw, event, (
                f"Wicket logs in to {self.resource.name} for you (as db user {self.db_user!r}): remove the "
                f"user name and password (and authMechanism) from the connection string"),
                "AuthenticationFailed")
        if name not in NO_DATABASE:
            denied = self._denied_database(command.databases)
            if denied is not None:
                self.audit.emit("denied", database=command.database, command=name,
                                collection=command.collection, denied_database=denied)
                return self._refuse(raw, event, (
                    f"not authorized on {denied} to execute command {name}: none of your roles allows "
                    f"database {denied!r} on {self.resource.name}; ask for a role whose db_names match it"
                    + (f" (this session keeps to database {self.db_name!r}: `wicket proxy ... --db-name`)"
                       if self.db_name is not None and denied != self.db_name else "")),
                    "Unauthorized")
        self._audit_command(event)
        return None

    def _remember(self, command: Command) -> None:
        """The session's logical session and cursor, for the interrupt."""
        if command.lsid is not None:
            self.lsids.pop(command.lsid, None)
            self.lsids[command.lsid] = None
            if len(self.lsids) > MAX_LSIDS:
                del self.lsids[next(iter(self.lsids))]
        if command.cursor_id and command.collection is not None:
            self.cursors.pop(command.cursor_id, None)
            self.cursors[command.cursor_id] = (command.database, command.collection)
            if len(self.cursors) > MAX_CURSORS:
                del self.cursors[next(iter(self.cursors))]

    def _audit_command(self, event: CommandEvent) -> None:
        command = event.command
        self._remember(command)
        if not event.more_to_come:
            if len(self._pending) >= MAX_PENDING:
                self._pending.clear()
            self._pending[event.request_id] = (command.name, command.database)
        fields: dict[str, Any] = {"database": command.database, "command": command.name}
        if command.collection is not None:
            fields["collection"] = command.collection
        if command.filters:
            fields["filters"] = list(command.filters)
            if command.filters_truncated:
                fields["filters_truncated"] = True
        if command.pipeline:
            fields["pipeline"] = list(command.pipeline)
        if command.writes_to:
            fields["writes_to"] = [str(ns) for ns in command.writes_to]
        if command.reads_from:
            fields["reads_from"] = [str(ns) for ns in command.reads_from]
        if command.documents is not None:
            fields["documents"] = command.documents
        if event.more_to_come:
            fields["unacknowledged"] = True
        fields["bytes"] = event.size
        self.audit.emit("command", **fields)

    def _denied_database(self, databases: frozenset[str]) -> str | None:
        """The first of ``databases`` the session may not use, or None."""
        now = time.monotonic()
        if self._roles is None or now - self._roles_read > ROLE_RECHECK:
            snap = self.cluster.fresh_snapshot() or (self._snapshot if self._roles is None else None)
            if snap is not None:
                self._roles = roles_of(self.cluster, snap, self.session)
                self._roles_read = now
                self._decided.clear()
                self._snapshot = None
            elif self._roles is None:
                self._roles = []  # nothing read yet: nothing allowed until it is
        for database in sorted(databases):
            allowed = self._decided.get(database)
            if allowed is None:
                allowed = (self.db_name is None or database == self.db_name) and rbac.decide(
                    self._roles, self.resource.name, self.resource.labels,
                    {"db_user": self.db_user, "db_name": database}).allowed
                if self._roles_read:
                    self._decided[database] = allowed
            if not allowed:
                return database
        return None

    def _refuse(self, raw: bytes, event: CommandEvent, errmsg: str, code_name: str) -> bytes:
        if event.more_to_come:
            return b""  # an unacknowledged write: no reply is awaited, and none may come
        return self._refuse_raw(raw, event.request_id, errmsg, code_name)

    @staticmethod
    def _refuse_raw(raw: bytes, request_id: int, errmsg: str, code_name: str) -> bytes:
        # The reply's kind follows the request's: OP_REPLY for a legacy OP_QUERY.
        op_code = int.from_bytes(raw[12:16], "little")
        request = OpQuery(request_id=request_id, collection="admin.$cmd", query={}) if op_code == 2004 else \
            OpMsg(request_id=request_id, body={})
        return error_reply(request, errmsg, code_name).encode()

    # -- server -> client -------------------------------------------------------

    def tap_server(self, data: bytes) -> None:
        """The relay's tap on the server's side: replies audited as they pass."""
        self.audit.feed(self._server_audit, self._server_event, data, "server")

    def _server_event(self, event: object) -> None:
        if isinstance(event, ErrorReplyEvent):
            command, database = self._pending.pop(event.response_to, (None, None))
            self.audit.emit("error", command=command, database=database, code=event.code,
                            code_name=event.code_name, errmsg=event.errmsg)


class CommandAudit(SessionAuditor):
    """The session's audit events: ``mongodb.command``, ``.denied``,
    ``.error``, ``.protocol_error``."""

    prefix = "mongodb"
    protocol = "MongoDB"


async def stand_in_for(server: trio.abc.AsyncResource) -> tuple[trio.SocketStream, socket.socket]:
    """A server that refused the cluster's login gets nothing: its
    connection is closed, and the relay's upstream is one end of a socket
    pair instead (the stream), the other end the gate's ``stand_in``."""
    await server.aclose()
    ours, stand_in = socket.socketpair()
    return trio.SocketStream(trio.socket.from_stdlib_socket(ours)), stand_in


def roles_of(cluster: Cluster, snap, session: LiveSession) -> list[rbac.Role]:
    """The session user's roles in ``snap`` (as the certificate has them)."""
    user = snap.users.get(session.user)
    identity = session.identity
    return [] if user is None else cluster.roles_in(snap, user, identity.roles if identity is not None else None)


def integer(value: object) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

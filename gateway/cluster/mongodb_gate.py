"""A MongoDB session's commands, checked and audited one by one, between
the relay and the server.

Theory of operation
-------------------
The relay (the engine's, for a stream of ``wicket-mux``) carries the
gateway's bytes to one end of a socket pair; the gate holds the other end
and the logged-in server connection, in two trio tasks:

* **client -> server.** Whole messages are read (framed by
  protocols/mongodb/audit.py's layout, at most the server's
  ``maxMessageSizeBytes``), each read as a
  :class:`~protocols.mongodb.commands.Command` without decoding its
  documents (:func:`~protocols.mongodb.audit.client_event`), then:

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
  - anything else is written to the server as it came (checksums and
    compression untouched: the gate recomputes nothing).

  Every command is audited (``mongodb.command``: database, command,
  collection, filter shapes, pipeline stages, namespaces, counts; never a
  value), and every refusal (``mongodb.denied``).

* **server -> client.** Bytes are copied as they come, into the
  :class:`~protocols.mongodb.audit.ServerAuditor` (error replies become
  ``mongodb.error`` with the command they answer) and to the relay. A reply
  the gate makes itself must not land inside one of the server's: the copy
  holds :attr:`CommandGate._send_lock` from a message's first byte to its
  last (a skip-everything splitter finds the boundaries), and the gate's own
  replies take the lock.

When the server refused the cluster's login (``refusal``: a wrong secret
in the cluster's config, a user missing on the server), the session still
starts, as PostgreSQL's does with the server's ErrorResponse: the server's
connection is closed at once, hellos are answered from its hello, and
every other command gets AuthenticationFailed (18) with the server's
words, so the driver raises them instead of retrying a dropped connection.

Roles are read from the cluster's access snapshot at the first command and
again at most every :data:`ROLE_RECHECK` seconds (a role change reaches a
live session within that; a lock or a revocation cuts it at once, as for
every kind). A denial is decided per database once per snapshot.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import trio

from gateway.cluster import rbac
from gateway.cluster.core import Cluster, LiveSession
from gateway.cluster.dbaudit import SessionAuditor
from gateway.cluster.store import Resource
from protocols.buffer import ReceiveBuffer
from protocols.errors import RemoteProtocolError
from protocols.framing import FrameSplitter
from protocols.mongodb import (
    SUPPORTED_COMPRESSORS, CommandEvent, ServerAuditor, client_hello, decode_message, error_reply,
    gateway_hello, reply_to,
)
from protocols.mongodb.audit import MESSAGE_AFTER_LENGTH, ErrorReplyEvent, client_event
from protocols.mongodb.commands import AUTH_COMMANDS, HANDSHAKE_COMMANDS, Command
from protocols.mongodb.wire import DEFAULT_MAX_MESSAGE_SIZE, OpMsg, OpQuery

log = logging.getLogger("wicket.cluster.mongodb")

READ = 256 * 1024
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
_SKIP_ALL = lambda _kind, _length: None  # noqa: E731 (a keep policy: count frames, keep nothing)


class CommandGate:
    """See the module docstring. Make with :meth:`open`; hand
    :attr:`relay_end` to the relay, run :meth:`run` beside it."""

    def __init__(self, cluster: Cluster, session: LiveSession, resource: Resource,
                 upstream: trio.abc.HalfCloseableStream, ours: trio.SocketStream, relay_end: trio.SocketStream,
                 *, hello: dict[str, Any], db_user: str, db_name: str | None,
                 refusal: str | None = None) -> None:
        self.cluster, self.session, self.resource = cluster, session, resource
        self.upstream, self.ours, self.relay_end = upstream, ours, relay_end
        self.hello, self.db_user, self.db_name = hello, db_user, db_name
        #: The server refused our login: every command gets this (18).
        self.refusal = refusal
        size = hello.get("maxMessageSizeBytes")
        self.max_message = (min(size, DEFAULT_MAX_MESSAGE_SIZE)
                            if isinstance(size, int) and size >= 1024 * 1024 else DEFAULT_MAX_MESSAGE_SIZE)
        offered = hello.get("compression")
        self.compressors = tuple(c for c in offered if c in SUPPORTED_COMPRESSORS) if isinstance(
            offered, list) else ()
        self._send_lock = trio.Lock()
        self.audit = CommandAudit(cluster, session)
        self._server_audit = ServerAuditor(max_message_size=self.max_message)
        self._pending: dict[int, tuple[str, str]] = {}  # request id -> (command, database)
        self._roles: list[rbac.Role] | None = None
        self._roles_read = 0.0
        self._decided: dict[str, bool] = {}
        #: What a cut stops on the server (MongoKind.interrupt), oldest first.
        self.lsids: dict[bytes, None] = {}
        self.cursors: dict[int, tuple[str, str]] = {}  # id -> (database, collection)

    @classmethod
    def open(cls, cluster: Cluster, session: LiveSession, resource: Resource,
             upstream: trio.abc.HalfCloseableStream, **kwargs: Any) -> "CommandGate":
        a, b = trio.socket.socketpair()
        return cls(cluster, session, resource, upstream, trio.SocketStream(a), trio.SocketStream(b), **kwargs)

    # -- the session ------------------------------------------------------------

    async def run(self) -> None:
        """Both directions until either ends; then both ends are closed, so
        the relay ends too."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._guarded, self._from_client, nursery.cancel_scope)
                if self.refusal is None:
                    nursery.start_soon(self._guarded, self._from_server, nursery.cancel_scope)
                else:
                    await self.upstream.aclose()  # nothing goes to a server that said no
        finally:
            with trio.CancelScope(shield=True):
                await self.upstream.aclose()
                await self.ours.aclose()

    async def _guarded(self, direction, scope: trio.CancelScope) -> None:
        try:
            await direction()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except RemoteProtocolError as exc:  # the server side's is recorded by the auditor
            side = "client" if direction == self._from_client else "server"
            self.audit.emit("protocol_error", side=side, error=exc.message)
            log.info("mongodb_protocol_error session=%s side=%s error=%s", self.session.id, side, exc.message)
        finally:
            scope.cancel()

    def finish(self) -> None:
        """(after the relay) Nothing is left half-said: replies are audited
        as they pass."""
        self._pending.clear()

    # -- client -> server -------------------------------------------------------

    async def _from_client(self) -> None:
        splitter = FrameSplitter(MESSAGE_AFTER_LENGTH, max_length=self.max_message)
        buffer = ReceiveBuffer(self.max_message + READ)
        while True:
            frame = splitter.read_frame(buffer)
            if frame is None:
                data = await self.ours.receive_some(READ)
                if not data:
                    if self.refusal is None:
                        await self.upstream.send_eof()
                    return
                buffer.feed(data)
                continue
            event = client_event(frame, self.max_message)
            raw = (frame.body_length + 4).to_bytes(4, "little", signed=True) + frame.body
            if not isinstance(event, CommandEvent):
                # Too large to read its command from: no check, no pass.
                await self._refuse_raw(raw, event.request_id, "the message is too large to check", "BadValue")
                continue
            answer = await self._decide(event, raw)
            if answer is None:
                await self.upstream.send_all(raw)

    async def _decide(self, event: CommandEvent, raw: bytes) -> None | bool:
        """None to pass ``raw`` on; True once answered (or dropped) here."""
        command = event.command
        name = command.name
        if name in HANDSHAKE_COMMANDS:
            request = decode_message(raw, max_message_size=self.max_message)
            body = request.body if isinstance(request, OpMsg) else request.query
            if "$query" in body and isinstance(body["$query"], dict):
                body = body["$query"]
            hello = gateway_hello(self.hello, client_hello(body), connection_id=integer(self.hello.get("connectionId")),
                                  compressors=self.compressors)
            await self._reply(reply_to(request, hello).encode())
            return True
        if self.refusal is not None:
            await self._refuse(raw, event, self.refusal, "AuthenticationFailed")
            return True
        if name in AUTH_COMMANDS:
            self.audit.emit("denied", database=command.database, command=name,
                       reason="client login attempt", mechanism=command.mechanism)
            await self._refuse(raw, event, (
                f"Wicket logs in to {self.resource.name} for you (as db user {self.db_user!r}): remove the "
                f"user name and password (and authMechanism) from the connection string"),
                "AuthenticationFailed")
            return True
        if name not in NO_DATABASE:
            denied = await self._denied_database(command.databases)
            if denied is not None:
                self.audit.emit("denied", database=command.database, command=name,
                           collection=command.collection, denied_database=denied)
                await self._refuse(raw, event, (
                    f"not authorized on {denied} to execute command {name}: none of your roles allows "
                    f"database {denied!r} on {self.resource.name}; ask for a role whose db_names match it"
                    + (f" (this session keeps to database {self.db_name!r}: `wicket proxy ... --db-name`)"
                       if self.db_name is not None and denied != self.db_name else "")),
                    "Unauthorized")
                return True
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

    async def _denied_database(self, databases: frozenset[str]) -> str | None:
        """The first of ``databases`` the session may not use, or None."""
        now = time.monotonic()
        if self._roles is None or now - self._roles_read > ROLE_RECHECK:
            snap = self.cluster.fresh_snapshot() or await self.cluster.snapshot()
            user = snap.users.get(self.session.user)
            identity = self.session.identity
            self._roles = [] if user is None else self.cluster.roles_in(
                snap, user, identity.roles if identity is not None else None)
            self._roles_read = now
            self._decided.clear()
        for database in sorted(databases):
            allowed = self._decided.get(database)
            if allowed is None:
                allowed = (self.db_name is None or database == self.db_name) and rbac.decide(
                    self._roles, self.resource.name, self.resource.labels,
                    {"db_user": self.db_user, "db_name": database}).allowed
                self._decided[database] = allowed
            if not allowed:
                return database
        return None

    async def _refuse(self, raw: bytes, event: CommandEvent, errmsg: str, code_name: str) -> None:
        if event.more_to_come:
            return  # an unacknowledged write: no reply is awaited, and none may come
        await self._refuse_raw(raw, event.request_id, errmsg, code_name)

    async def _refuse_raw(self, raw: bytes, request_id: int, errmsg: str, code_name: str) -> None:
        # The reply's kind follows the request's: OP_REPLY for a legacy OP_QUERY.
        op_code = int.from_bytes(raw[12:16], "little")
        request = OpQuery(request_id=request_id, collection="admin.$cmd", query={}) if op_code == 2004 else \
            OpMsg(request_id=request_id, body={})
        await self._reply(error_reply(request, errmsg, code_name).encode())

    async def _reply(self, data: bytes) -> None:
        async with self._send_lock:
            await self.ours.send_all(data)

    # -- server -> client -------------------------------------------------------

    async def _from_server(self) -> None:
        boundaries = FrameSplitter(MESSAGE_AFTER_LENGTH, keep=_SKIP_ALL, max_length=self.max_message)
        lock = self._send_lock
        held = False
        try:
            while True:
                data = await self.upstream.receive_some(READ)
                if not data:
                    break
                if not held:
                    try:
                        lock.acquire_nowait()  # the common case: no checkpoint
                    except trio.WouldBlock:
                        await lock.acquire()
                    held = True
                for _ in boundaries.feed(data):
                    pass
                self._audit_reply(data)
                await self.ours.send_all(data)
                if boundaries.at_boundary:
                    lock.release()
                    held = False
        finally:
            if held:
                lock.release()
        await self.ours.send_eof()

    def _audit_reply(self, data: bytes) -> None:
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


def integer(value: object) -> int | None:
    return int(value) if isinstance(value, int) and not isinstance(value, bool) else None

"""The cluster as MySQL's and MariaDB's front door (a stream of ``wicket-mux``,
or the ``wicket-mysql`` route).

The gateway plays the server towards its local client (gateway/local/mysql.py);
the cluster logs in to the real server *as the requested db user*, with
credentials the client never sees (gateway/cluster/dbkind.py):

* ``auth = "cert"``: over TLS, a short-lived client certificate with CN =
  db user from the cluster's database client CA, which the server's
  ``ssl_ca`` trusts; the account says ``REQUIRE SUBJECT '/CN=<user>'`` and
  has no password;
* ``auth = "password"``: ``mysql_native_password``, MariaDB's
  ``client_ed25519``, or ``caching_sha2_password`` (fast auth, or full auth
  over TLS), with the secret from the cluster's environment or a file.

The gateway's dial carries what its client said in its handshake response:
``db_user`` and ``db_name`` (RBAC decides on them), its capabilities
(``mysql.caps``), character set and maximum packet size, and its connection
attributes (``mysql.attr.*``, for the audit and passed on). The cluster logs
in with those capabilities, so both ends of the relayed command phase agree
(DEPRECATE_EOF, multi-statements, query attributes...), less compression
(it could not be audited) and, unless a role allows it, LOCAL INFILE (the
server could ask the client's machine for any file), which the server
then refuses in its own words. The DialAccept
carries the server's handshake values (``mysql.version``, ``mysql.caps``,
``mysql.charset``, ``mysql.status``, ``mysql.plugin``, ``mysql.thread``,
which the gateway caches to greet later clients with) and the login's
verdict: ``mysql.ok`` (the server's OK payload, hex) or ``mysql.err`` (its
ERR, verbatim, which the client gets with the gateway's sequence ids). A
control dial ``mysql.probe`` reads a server's handshake for a gateway that
has not greeted a client of the resource yet.

Every command is audited from a copy of the relayed bytes (protocols/mysql's
auditors): COM_QUERY, COM_STMT_PREPARE (the text), COM_STMT_EXECUTE
(statement id and parameter count, never values), COM_STMT_CLOSE,
COM_INIT_DB, COM_CHANGE_USER, COM_RESET_CONNECTION, the server's errors,
LOAD DATA LOCAL (file name, bytes; only where a role has ``local_infile =
["on"]`` is the server told the client may send files). A COM_INIT_DB or
``USE`` of a database the user's roles do not allow never reaches the
server: the cluster answers it with an ERR and the session goes on
(:class:`MySqlSessionAuditor`). A COM_CHANGE_USER never reaches it either:
the cluster logs in again as the new db user, if the roles allow it, and
switches the session to that connection
(gateway/cluster/mysql_change_user.py).

A session cut by a lock, a revocation or the certificate's end is first
interrupted (``interrupt``: ``KILL QUERY`` for its connection id, from a
connection of its own as the same db user), so a long statement does not
run on, nor an in-flight write commit, after the cut.
"""

from __future__ import annotations

import functools
import logging
import re
from typing import Any, Awaitable, Callable, Mapping

import trio

from gateway.cluster import rbac, resource_specs
from gateway.cluster.core import Cluster, LiveSession
from gateway.cluster.dbaudit import SessionAuditor
from gateway.cluster.dbkind import LOGIN_TIMEOUT, PARAM_DB_NAME, PARAM_DB_USER, DatabaseKind, Upstream
from gateway.cluster.dial import Answered, Opened, Refused, connect_tcp
from gateway.cluster.mysql_change_user import UserChanger
from gateway.net.filters import MORE, Hold
from gateway.cluster.store import Resource
from gateway.identity import pki
from protocols.dial import DialRequest
from protocols.buffer import ReceiveBuffer
from protocols.errors import ErrorCode, ProtocolError
from protocols.mysql import (
    DEFAULT_CLIENT_CAPABILITIES, NEED_DATA, Capability, ChangeUserEvent, Command, CommandAuditor,
    CommandEvent, CommandTracker, ErrorEvent, ExecuteEvent, InitDbEvent, LocalInfileDataEvent,
    LocalInfileRequestEvent, LoginReady, LoginRefused, PrepareEvent, QueryEvent, QuitEvent,
    ErrorNumber, ErrPacket, PacketChannel, encode_packets, ResetConnectionEvent, ResponseAuditor, StartTLS, StatementCloseEvent,
    StatementResetEvent, UpstreamLogin,
)
from protocols.framing import MYSQL_PACKET
from protocols.mysql import dialparams as dp
from protocols.mysql.commands import query_text
from protocols.mysql.statements import UseSearch, use_targets

log = logging.getLogger("wicket.cluster.mysql")

PARAM_LOCAL_INFILE = "local_infile"
#: Bytes of a server's greeting we read for a probe (it is one packet of ~100).
MAX_GREETING = 4096
#: An OK payload larger than this (hex) travels without its session-state part.
MAX_OK_HEX = 1000


def _int(params: Mapping[str, str], key: str, bits: int, default: int) -> int:
    raw = params.get(key)
    if raw is None:
        return default
    try:
        value = int(raw, 10)
    except ValueError:
        value = -1
    if not 0 <= value < 1 << bits:
        raise Refused(ErrorCode.BAD_REQUEST, f"{key} must be an integer 0..2**{bits}-1")
    return value


class MySqlKind(DatabaseKind):
    kind = "mysql"

    def check_params(self, request: DialRequest, identity: pki.Identity) -> dict[str, str]:
        params = dict(request.params)
        if dp.PROBE in params:
            return {dp.PROBE: "handshake"}
        db_user = params.get(PARAM_DB_USER) or identity.user
        out = {PARAM_DB_USER: db_user}
        db_name = params.get(PARAM_DB_NAME)
        if db_name:  # MySQL sessions may have no default database
            out[PARAM_DB_NAME] = db_name
        for what, value, limit in ((PARAM_DB_USER, db_user, dp.MAX_USER), (PARAM_DB_NAME, db_name or "x", dp.MAX_SCHEMA)):
            if len(value) > limit or "\x00" in value:
                raise Refused(ErrorCode.BAD_REQUEST, f"{what} must be 1-{limit} characters without NUL")
        out[dp.CAPS] = str(_int(params, dp.CAPS, 64, DEFAULT_CLIENT_CAPABILITIES.value))
        out[dp.CHARSET] = str(_int(params, dp.CHARSET, 8, 0))
        out[dp.MAX_PACKET] = str(_int(params, dp.MAX_PACKET, 32, 1 << 24))
        attrs = [(k, v) for k, v in params.items() if k.startswith(dp.ATTR_PREFIX) and len(k) > len(dp.ATTR_PREFIX)]
        out.update(attrs[:dp.MAX_ATTRIBUTES])
        return out

    # -- control dials: the handshake probe --------------------------------------

    async def control(self, cluster: Cluster, resource: Resource, request: DialRequest,
                      identity: pki.Identity) -> Answered | None:
        if dp.PROBE not in request.params:
            return None
        upstream = await connect_tcp(resource)
        login = UpstreamLogin(user="-")  # only its reading of the greeting is used
        info = None
        async with upstream:
            try:
                with trio.fail_after(LOGIN_TIMEOUT):
                    while info is None:
                        data = await upstream.receive_some(MAX_GREETING)
                        login.receive_data(data)
                        event = login.next_event()
                        info = login.server_info
                        if isinstance(event, LoginRefused):  # too many connections, a blocked host
                            raise Refused(ErrorCode.UPSTREAM_UNREACHABLE,
                                          f"{resource.name} refused the connection: {event.error.errno} "
                                          f"{event.error.message}")
            except trio.TooSlowError:
                raise Refused(ErrorCode.UPSTREAM_UNREACHABLE,
                              f"{resource.name} sent no handshake within {LOGIN_TIMEOUT:.0f}s") from None
            except (ProtocolError, OSError, trio.BrokenResourceError) as exc:
                raise Refused(ErrorCode.UPSTREAM_UNREACHABLE,
                              f"{resource.name} did not greet as a MySQL server: "
                              f"{getattr(exc, 'message', None) or exc}") from None
        return Answered("handshake probe", dp.server_params(info))

    # -- interrupting a session that is being cut ----------------------------------

    async def interrupt(self, cluster: Cluster, resource: Resource, session: LiveSession, reason: str) -> str:
        """The session is being cut (a lock, a revocation, the certificate's
        end): stop its running statement with ``KILL QUERY`` from a
        connection of its own, as the same db user (who may kill its own
        threads), before the cut closes the session's connection; MariaDB
        would otherwise run the statement to its end (it notices a closed
        client only when it next writes), and an in-flight write could
        still commit. Closing the connection then rolls back any open
        transaction."""
        thread, db_user = session.extra.get("mysql_thread"), session.extra.get("mysql_db_user")
        if thread is None or db_user is None:
            return "no connection id"
        try:
            answer = await self._kill_query(cluster, resource, db_user, int(thread))
        except (Refused, ProtocolError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                trio.TooSlowError) as exc:
            return f"KILL QUERY failed: {getattr(exc, 'message', None) or exc!r}"
        return answer

    async def _kill_query(self, cluster: Cluster, resource: Resource, db_user: str, thread: int) -> str:
        spec = resource_specs.DatabaseSpec.of(resource.spec)
        password = self.password(spec, resource, db_user)
        upstream = Upstream(await connect_tcp(resource))
        try:
            with trio.fail_after(LOGIN_TIMEOUT):
                login = UpstreamLogin(user=db_user, password=password, tls=spec.tls != "disable")
                outcome = await self.upstream_login(cluster, resource, spec, db_user, upstream, login)
                if isinstance(outcome, LoginRefused):
                    return f"KILL QUERY failed: the server refused the login ({outcome.error.errno})"
                channel, buffer = PacketChannel(what="upstream server"), ReceiveBuffer(1 << 20)
                await upstream.stream.send_all(channel.write(b"\x03" + f"KILL QUERY {thread}".encode()))
                while (payload := channel.read(buffer)) is None:
                    data = await upstream.stream.receive_some(65536)
                    if not data:
                        return "KILL QUERY failed: the server closed the connection"
                    buffer.feed(data)
        finally:
            await upstream.stream.aclose()
        if payload[:1] == b"\xff":
            return f"KILL QUERY {thread} refused: {ErrPacket.decode(payload).message}"
        return f"KILL QUERY {thread} sent"

    # -- sessions ------------------------------------------------------------------

    async def login(self, cluster: Cluster, resource: Resource, spec: resource_specs.DatabaseSpec,
                    params: Mapping[str, str], session: LiveSession, upstream: Upstream,
                    password: str | None) -> Opened:
        db_user, db_name = params[PARAM_DB_USER], params.get(PARAM_DB_NAME)
        caps = Capability(int(params.get(dp.CAPS, DEFAULT_CLIENT_CAPABILITIES.value)))
        roles = await cluster.session_roles(session)
        # LOCAL INFILE lets the server read files of the client's machine:
        # offered to it only where a role says local_infile = ["on"].
        infile = Capability.LOCAL_FILES in caps and local_infile_allowed(roles, resource, params)
        # Compression could not be audited, nor MySQL 8's result sets
        # without metadata followed (no gateway asks for them: one that did
        # would not get them).
        caps &= ~(Capability.COMPRESS | Capability.ZSTD_COMPRESSION_ALGORITHM
                  | Capability.OPTIONAL_RESULTSET_METADATA)
        if not infile:
            caps &= ~Capability.LOCAL_FILES
        charset = int(params.get(dp.CHARSET, "0")) or None
        attributes = {k[len(dp.ATTR_PREFIX):]: v for k, v in params.items() if k.startswith(dp.ATTR_PREFIX)}
        asked = {"tls": spec.tls != "disable", "capabilities": caps, "charset": charset,
                 "attributes": attributes or None,
                 "max_packet_size": int(params.get(dp.MAX_PACKET, 1 << 24)) or (1 << 24)}
        login = UpstreamLogin(user=db_user, password=password, database=db_name, **asked)
        outcome = await self.upstream_login(cluster, resource, spec, db_user, upstream, login)
        details: dict[str, Any] = {"db_user": db_user, "db_name": db_name, "local_infile": infile}
        if attributes:
            details["client_attributes"] = attributes
        if isinstance(outcome, LoginRefused):
            err = outcome.error
            log.info("mysql_login_refused resource=%s db_user=%s errno=%s", resource.name, db_user, err.errno)
            reply = {dp.ERR: outcome.payload.hex()}
            if login.server_info is not None:
                reply.update(dp.server_params(login.server_info))
            return Opened(upstream=upstream.stream, reply_params=reply,
                          details={**details, "login_error": f"{err.errno} {err.sqlstate} {err.message}"})
        ok_hex = outcome.ok_payload.hex()
        if len(ok_hex) > MAX_OK_HEX:  # keep the status and counts, drop session-state details
            ok_hex = outcome.ok_payload[:1].hex() + "0000" + outcome.ok.status.to_bytes(2, "little").hex() + "0000"
        reply = {**dp.server_params(outcome.server), dp.OK: ok_hex}
        auditor = MySqlSessionAuditor(cluster, session, outcome.capabilities, resource, db_user)
        auditor.roles = roles
        session.extra["mysql_thread"] = outcome.server.connection_id  # for KILL QUERY (interrupt)
        session.extra["mysql_db_user"] = db_user
        auditor.change_user = UserChanger(self, cluster, resource, spec, session, auditor, asked).change
        trailing, _ = login.trailing_data
        return Opened(upstream=upstream.stream, first_bytes=trailing, reply_params=reply, filter=auditor,
                      tap_server=auditor.from_server, finish=auditor.finish,
                      details={**details, "auth": outcome.plugin, "tls": outcome.tls,
                               "server_version": outcome.server.server_version,
                               "thread_id": outcome.server.connection_id})

    async def upstream_login(self, cluster: Cluster, resource: Resource, spec: resource_specs.DatabaseSpec,
                     db_user: str, upstream: Upstream, login: UpstreamLogin) -> LoginReady | LoginRefused:
        while True:
            event = login.next_event()
            out = login.data_to_send()
            if out:
                await upstream.stream.send_all(out)
            if event is NEED_DATA:
                try:
                    data = await upstream.stream.receive_some(65536)
                except trio.BrokenResourceError as exc:
                    raise Refused(ErrorCode.UPSTREAM_UNREACHABLE,
                                  f"{resource.name} closed the connection during login: {exc}") from None
                login.receive_data(data)
            elif isinstance(event, StartTLS):
                await self.start_tls(cluster, upstream, spec, resource, db_user)
                login.tls_started()
            elif isinstance(event, (LoginReady, LoginRefused)):
                return event


MYSQL = MySqlKind()


def local_infile_allowed(roles: list, resource: Resource, params: Mapping[str, str]) -> bool:
    """Does a role allow this session LOAD DATA LOCAL (``local_infile = ["on"]``)?"""
    asked = {k: params[k] for k in (PARAM_DB_USER, PARAM_DB_NAME) if k in params}
    return rbac.decide(roles, resource.name, resource.labels, {**asked, PARAM_LOCAL_INFILE: "on"}).allowed


#: The commands the cluster may answer itself (a first-byte look per
#: command): a switch of database, a USE inside a query, a change of user.
_ANSWERABLE = frozenset({Command.INIT_DB, Command.QUERY, Command.CHANGE_USER})
#: A packet this long goes on in the next one (a payload of 16 MiB and more).
_FULL = b"\xff\xff\xff"
#: The largest of those commands the filter reads whole (its packets
#: joined); a larger one ends the session, as one that cannot be checked.
#: MariaDB's and MySQL's max_allowed_packet default to 16 and 64 MiB.
MAX_CHECKED_COMMAND = 64 * 1024 * 1024
#: A statement whose cut text may hide a USE further on (a bytes search,
#: before any decoding).
_MAY_USE = re.compile(rb"use", re.IGNORECASE)
_FULL_PACKET = 4 + 0xFFFFFF


class MySqlSessionAuditor(SessionAuditor):
    """A MySQL session's commands and the server's errors as audit events;
    and the cluster's word on the commands a role may not run: the
    session's message filter (gateway/net/filters.py), shown each whole
    client packet (a command of 16 MiB and more that the cluster may
    answer: its packets joined, up to ``MAX_CHECKED_COMMAND``; past that
    it passes as it comes, read for a ``USE`` anywhere, and a refused one
    ends the session before its last packet, so the server never runs it:
    :meth:`_stream`).

    Refused commands never reach the server. A COM_INIT_DB or ``USE`` of a
    database the user's roles do not allow gets ERR 1044 (42000) saying
    what to do, with sequence id 1, and the session goes on; the whole
    statement text is read for a ``USE``. A COM_CHANGE_USER is held
    (:class:`~gateway.net.filters.Hold`) for ``change_user``, the re-dial
    (gateway/cluster/mysql_change_user.py), whose answer comes later; the
    client's next bytes wait for it. Where the session cannot be switched
    (a connection of its own), ERR 1235. A command is answered in the
    server's place only when nothing of the server's is still due before
    its answer (as every client sends them: one command, then its
    result; a pipelining client's commands after a refused one are
    answered in turn, since the refused one is answered at once);
    otherwise the session ends there instead, on record."""

    prefix = "mysql"
    protocol = "MySQL"
    layout = MYSQL_PACKET
    max_length = MYSQL_PACKET.max_length
    max_message = MAX_CHECKED_COMMAND
    holds = True  # a COM_CHANGE_USER, for the re-dial
    between_replies = True  # it answers only where the server owes nothing (``tracker.pending``)

    def __init__(self, cluster: Cluster, session: LiveSession, capabilities: Capability, resource: Resource,
                 db_user: str) -> None:
        super().__init__(cluster, session)
        self.tracker = tracker = CommandTracker(capabilities)
        self.commands = CommandAuditor(tracker)
        self.responses = ResponseAuditor(tracker)
        self.resource, self.db_user = resource, db_user
        self.roles: list = []
        self.infile: str | None = None
        # The command being fed is one the cluster may answer (until its
        # event has been handled), and that answer (b"": a COM_CHANGE_USER
        # handed to ``change_user``); the command as it came.
        self._answerable = False
        self._refusal: bytes | None = None
        self._change: ChangeUserEvent | None = None
        self._raw = b""
        self._joining = 0  # a command's packets being joined: where its last one starts
        self._streaming = False  # a command too long to join passes, read as it goes (_stream)
        self._uses = UseSearch()  # a USE anywhere in it, read across its packets
        #: Re-dials a COM_CHANGE_USER in trio: its answer for the client
        #: (gateway/cluster/mysql_change_user.py).
        self.change_user: Callable[[ChangeUserEvent], Awaitable[bytes]] | None = None

    # -- the filter (gateway/net/filters.py) ------------------------------------

    def on_message(self, raw: bytes) -> bytes | Hold | object | None:
        """One whole client packet (or a command's joined packets)."""
        if self._joining:
            if raw[self._joining:self._joining + 3] == _FULL:
                if len(raw) + _FULL_PACKET > MAX_CHECKED_COMMAND:
                    return self._stream(raw)  # too long to hold: the rest is checked as it passes
                self._joining = len(raw)
                return MORE
            self._joining = 0
        elif self._streaming:
            return self._stream(raw)
        elif len(raw) > 4 and raw[4] in _ANSWERABLE and not raw[3] and self.commands.at_command:
            if raw[:3] == _FULL:  # the first of several packets: read it whole
                self._joining = len(raw)
                return MORE
        else:
            self._answerable = False
            self.feed(self.commands, self._client_event, raw, "client")
            return None
        self._answerable = not self.tracker.pending
        self._raw = raw
        self.feed(self.commands, self._client_event, raw, "client")
        self._raw = b""
        if self._refusal is None:
            return None
        answer, self._refusal = self._refusal, None
        self.tracker.pending.popleft()  # the server will not answer it: it never sees it
        if answer:
            return answer
        change, self._change = self._change, None
        return Hold(functools.partial(self.change_user, change))

    def _stream(self, raw: bytes) -> None:
        """Part of a command longer than MAX_CHECKED_COMMAND (its first
        packets, joined, then each next one): passed on as it comes, and
        read for a ``USE`` anywhere in it, not only at a statement's start
        (:class:`~protocols.mysql.statements.UseSearch`, across packets:
        its name read by the rule :func:`use_targets` reads a statement's).
        A refused one ends the session before the rest passes: the server
        runs a command only once all its packets are in, so this one never
        runs."""
        self._answerable = False  # too late to answer it in its place: a refusal ends the session
        self._joining = 0
        self.feed(self.commands, self._client_event, raw, "client")
        pos = 0
        while pos < len(raw):
            length = int.from_bytes(raw[pos:pos + 3], "little")
            last = raw[pos:pos + 3] != _FULL
            # Latin-1: one character a byte, whatever the packets cut.
            try:
                uses = self._uses.feed(raw[pos + 4:pos + 4 + length].decode("latin-1"), last=last)
            except ValueError as exc:  # too costly to read: refused, as one that cannot be checked
                raise trio.BrokenResourceError(f"a command too long to hold with {exc}; the session ends "
                                               f"(it cannot be checked for a USE)") from None
            for use in dict.fromkeys(uses):  # each name once a packet
                self._init_db(use.encode("latin-1").decode("utf-8", "replace"))
            pos += 4 + length
        self._streaming = not last
        if last:
            self._uses = UseSearch()
        return None

    def eof(self) -> None:
        pass

    def broken(self, error: Exception) -> None:
        message = getattr(error, "message", None) or str(error)
        self.emit("protocol_error", side="client", error=message)

    def from_server(self, data: bytes) -> None:
        self.feed(self.responses, self._server_event, data, "server")

    def _client_event(self, e: object) -> None:
        if isinstance(e, QueryEvent):
            self.emit("query", query=e.text, truncated=e.truncated, length=e.length, sha256=e.sha256, size=e.size,
                      attributes=e.attributes)
            text = e.text
            if e.truncated and self._raw and _MAY_USE.search(self._raw) is not None:
                text = query_text(self._raw, self.tracker.query_attributes)  # the whole of it
            for schema in use_targets(text):
                if not self._init_db(schema):
                    break
            self._answerable = False
        elif isinstance(e, ExecuteEvent):
            self.emit("execute", statement_id=e.statement_id, param_count=e.param_count, size=e.size)
        elif isinstance(e, PrepareEvent):
            self.emit("prepare", query=e.text, truncated=e.truncated, length=e.length, sha256=e.sha256,
                      size=e.size)
        elif isinstance(e, StatementCloseEvent):
            self.emit("stmt_close", statement_id=e.statement_id)
        elif isinstance(e, StatementResetEvent):
            self.emit("stmt_reset", statement_id=e.statement_id)
        elif isinstance(e, InitDbEvent):
            self._init_db(e.schema)
            self._answerable = False
        elif isinstance(e, ChangeUserEvent):
            if self.change_user is not None and "stream" in self.session.extra:  # can be re-dialled
                self._refuse(None, f"COM_CHANGE_USER to {e.username!r}")
                self._change = e
                return
            self.emit("change_user", username=e.username, database=e.database, refused=True,
                      outcome="a session on a connection of its own cannot change its db user")
            self._refuse(change_user_refused(e.username, self.db_user), f"COM_CHANGE_USER to {e.username!r}")
        elif isinstance(e, ResetConnectionEvent):
            self.emit("reset_connection")
        elif isinstance(e, QuitEvent):
            # The server closes at once, often with a reset the relay would
            # report as the session's end: it ended because the client quit.
            if self.session.end_reason is None:
                self.session.end_reason = "quit"
        elif isinstance(e, LocalInfileDataEvent):
            self.emit("local_infile", file=self.infile, bytes=e.bytes, packets=e.packets)
            self.infile = None
        elif isinstance(e, CommandEvent):
            if e.command == Command.CHANGE_USER:  # one too odd to read: refused all the same
                self.emit("change_user", username=None, database=None, refused=True)
                self._refuse(change_user_refused(None, self.db_user), "COM_CHANGE_USER")
                return
            self._answerable = False
            try:
                name = Command(e.command).name
            except ValueError:
                name = f"0x{e.command:02X}"
            self.emit("command", command=name, size=e.size)

    def _init_db(self, schema: str) -> bool:
        """Whether the roles allow switching to ``schema``; if not, the
        command is refused (see _refuse)."""
        decision = rbac.decide(self.roles, self.resource.name, self.resource.labels,
                               {PARAM_DB_USER: self.db_user, PARAM_DB_NAME: schema})
        if "\ufffd" in schema:  # not UTF-8: the server would name it otherwise than we read it
            decision = rbac.Decision(False, "database names must be UTF-8 through Wicket")
        self.emit("init_db", schema=schema, allowed=decision.allowed)
        if not decision.allowed:
            self._refuse(ErrPacket.of(ErrorNumber.ER_DBACCESS_DENIED_ERROR,
                                      f"{decision.reason}; the session stays in the database it had. "
                                      f"Ask a cluster administrator for a role that allows it"),
                         f"COM_INIT_DB {schema!r} refused: {decision.reason}")
        return decision.allowed

    def _refuse(self, err: ErrPacket | None, what: str) -> None:
        """The command being handled never reaches the server: answered
        with ``err`` (None: by the re-dial) where it can be (nothing of the
        server's due before its answer), else the session ends here (the
        audit says why)."""
        if not self._answerable:
            raise trio.BrokenResourceError(f"{what}; the session ends (it did not come as a command the "
                                           f"cluster can answer in its place)")
        self._answerable = False
        self._refusal = b"" if err is None else encode_packets(err.encode(), 1)[0]

    def _server_event(self, e: object) -> None:
        if isinstance(e, ErrorEvent):
            self.emit("error", errno=e.errno, sqlstate=e.sqlstate, message=e.message)
        elif isinstance(e, LocalInfileRequestEvent):
            self.infile = e.file_name

    def finish(self) -> None:
        if self.infile is not None:
            self.emit("local_infile", file=self.infile, bytes=None, packets=None, failed=True)


def change_user_refused(username: str | None, db_user: str) -> ErrPacket:
    """The ERR for a COM_CHANGE_USER that cannot be re-dialled (a session on
    a connection of its own; one too odd to read): what happened and what
    to do."""
    other = f"db user {username!r}" if username else "another db user"
    return ErrPacket.of(
        ErrorNumber.ER_NOT_SUPPORTED_YET,
        f"changing to {other} inside this session (COM_CHANGE_USER) is not supported through Wicket: it "
        f"stays db user {db_user!r}. Connect again as the other user (mysql -u {username or 'NEWUSER'} "
        f"...) through the same wicket proxy port; your roles decide which db users you may use")

"""The cluster as PostgreSQL's front door (a stream of ``wicket-mux``, or
the ``wicket-postgres`` route that older gateways dial).

The cluster logs in to the real server *as the requested db user*, with
credentials the client never sees:

* ``auth = "cert"``: over TLS, a short-lived client certificate with CN =
  db user, signed by the cluster's database client CA, which the server's
  ``ssl_ca_file`` trusts and its pg_hba.conf names with the ``cert``
  method. No password exists anywhere; the key lives only in memory
  (gateway/cluster/upstream_auth.py, shared by every database kind).
* ``auth = "password"``: SCRAM-SHA-256 (verifying the server's signature) or
  md5, with the secret from the cluster's environment or a file.

The gateway then receives the server's AuthenticationOk ... ReadyForQuery
as the first bytes behind the dial accept, with BackendKeyData's secret
replaced by one made for the session (the process id is the server's).
If the server refuses (wrong database, pg_hba), its own ErrorResponse goes
to the client verbatim, so psql prints the server's message and SQLSTATE.

Every statement is audited from a copy of the relayed bytes: simple Query,
Parse (statement text), Bind (parameter count; values only if configured),
Execute, COPY direction and size, and the server's errors.

A cancel arrives as a control dial naming the session: only the user who
owns that session may cancel it, and the cluster sends the CancelRequest with
the upstream backend's real key, which never leaves the cluster. On the
multiplexed connection it waits until the bytes that came for the session
before it are written upstream (``acts_on``; gateway/cluster/muxroute.py).
"""

from __future__ import annotations

import logging
import secrets
from typing import Mapping

import trio

from gateway.cluster import resource_specs
from gateway.cluster.core import Cluster, LiveSession
from gateway.cluster.dbaudit import SessionAuditor
from gateway.cluster.dbkind import PARAM_DB_NAME, PARAM_DB_USER, DatabaseKind, Upstream
from gateway.cluster.dial import CONNECT_TIMEOUT, Opened, Refused, connect_tcp
from gateway.cluster.store import Resource
from gateway.identity import pki
from protocols.dial import DialRequest
from protocols.errors import ErrorCode, ProtocolError
from protocols.postgres import (
    NEED_DATA, BackendAuditor, BackendKeyData, BindEvent, CancelRequest, CopyDataEvent,
    CopyDirection, CopyDoneEvent, CopyFailEvent, ErrorEvent, ExecuteEvent, FrontendAuditor,
    FunctionCallEvent, ParseEvent, QueryEvent, SSLRequest, StartupRelay, UpstreamLogin, UpstreamLoginError,
    TerminateEvent, parse_ssl_answer, replication_requested,
)
from protocols.postgres.options import session_parameters
from protocols.postgres.scram import AuthMethod

log = logging.getLogger("wicket.cluster.postgres")

#: PBKDF2 rounds a server may ask for: its default is 4096; more would let a
#: hostile upstream burn the cluster's CPU on every login.
MAX_SCRAM_ITERATIONS = 100_000
#: Startup parameters a client may pass through to the server.
_BLOCKED_PARAMS = {"user", "database", "replication"}

PARAM_CANCEL = "cancel"
MAX_PORTALS = 1024
_BLANK_KEY = BackendKeyData(process_id=0, secret_key=bytes(4))
PG_PREFIX = "pg."


async def _send_cancel(resource: Resource, key: BackendKeyData) -> None:
    """A CancelRequest with the backend's real key, on a connection of its
    own, as PostgreSQL wants (raises :class:`Refused`)."""
    upstream = await connect_tcp(resource)
    async with upstream:
        try:
            await upstream.send_all(CancelRequest(process_id=key.process_id, secret_key=key.secret_key).encode())
            # The server closes without answering once it has signalled the
            # backend; wait for that (bounded).
            with trio.move_on_after(CONNECT_TIMEOUT):
                while await upstream.receive_some(1024):
                    pass
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise Refused(ErrorCode.UPSTREAM_UNREACHABLE, f"sending the cancel failed: {exc}") from None


class PostgresKind(DatabaseKind):
    kind = "postgres"

    def check_params(self, request: DialRequest, identity: pki.Identity) -> dict[str, str]:
        params = dict(request.params)
        if PARAM_CANCEL in params:
            return {PARAM_CANCEL: params[PARAM_CANCEL]}
        db_user = params.get(PARAM_DB_USER) or identity.user
        out = {PARAM_DB_USER: db_user, PARAM_DB_NAME: params.get(PARAM_DB_NAME) or db_user}
        for what, value in out.items():
            # PostgreSQL identifiers: at most 63 bytes, never NUL.
            if len(value.encode()) > 63 or "\x00" in value:
                raise Refused(ErrorCode.BAD_REQUEST, f"{what} must be 1-63 bytes without NUL")
        startup: dict[str, str] = {}
        for key, value in params.items():
            if key.startswith(PG_PREFIX):
                name = key[len(PG_PREFIX):]
                if not name or "\x00" in name or "\x00" in value or name.startswith("_pq_."):
                    raise Refused(ErrorCode.BAD_REQUEST, f"startup parameter {name!r} is not allowed")
                if name == "replication" and replication_requested(value):
                    raise Refused(ErrorCode.BAD_REQUEST,
                                  "replication connections are not supported through Wicket")
                if name not in _BLOCKED_PARAMS:
                    startup[name] = value
        # Only allowlisted settings reach the server, `options` rebuilt from
        # what was checked. The gateway checks first (so its client hears
        # 42501); this is what a modified gateway cannot get round.
        try:
            settings = session_parameters(startup)
        except ProtocolError as exc:
            raise Refused(exc.code, exc.message) from None
        out.update((PG_PREFIX + name, value) for name, value in settings.items())
        return out

    # -- control dials ---------------------------------------------------------

    async def control(self, cluster: Cluster, resource: Resource, request: DialRequest,
                      identity: pki.Identity) -> str | None:
        session_id = request.params.get(PARAM_CANCEL)
        if session_id is None:
            return None
        session = cluster.sessions.get(session_id)
        # Same answer for "no such session" and "not yours": a cancel key must
        # not tell anyone which sessions exist.
        if session is None or session.user != identity.user or session.resource != resource.name:
            raise Refused(ErrorCode.ACCESS_DENIED, "no such session of yours to cancel",
                          reason=f"cancel of unknown or foreign session {session_id!r}")
        key = session.extra.get("backend_key")
        if key is None:
            raise Refused(ErrorCode.BAD_REQUEST, "the session has no cancel key")
        await _send_cancel(resource, key)
        return f"cancel of session {session_id}"

    async def interrupt(self, cluster: Cluster, resource: Resource, session: LiveSession, reason: str) -> str:
        """The session is being cut (a lock, a revocation, the certificate's
        end): cancel its running statement with the backend's key before
        the connection closes, or PostgreSQL would run it to its end (a
        backend notices a closed client only when it next writes), and an
        in-flight write could still commit. The cut then closes the
        connection, which ends the backend (and rolls back any open
        transaction)."""
        key = session.extra.get("backend_key")
        if key is None:
            return "no backend key"
        try:
            await _send_cancel(resource, key)
        except Refused as refusal:
            return f"cancel failed: {refusal.message}"
        return "cancel sent"

    def acts_on(self, cluster: Cluster, request: DialRequest) -> LiveSession | None:
        session = cluster.sessions.get(request.params.get(PARAM_CANCEL, ""))
        return session if session is not None and session.kind == self.kind else None

    # -- sessions ----------------------------------------------------------------

    async def login(self, cluster: Cluster, resource: Resource, spec: resource_specs.DatabaseSpec,
                    params: Mapping[str, str], session: LiveSession, upstream: Upstream,
                    password: str | None) -> Opened:
        db_user, db_name = params[PARAM_DB_USER], params[PARAM_DB_NAME]
        if spec.tls != "disable":
            await self._start_tls(cluster, upstream, spec, resource, db_user)
        stream = upstream.stream
        login = UpstreamLogin(
            user=db_user, database=db_name, password=password,
            parameters={k[len(PG_PREFIX):]: v for k, v in params.items() if k.startswith(PG_PREFIX)},
            # Never send a cleartext password over an unencrypted link.
            # A cleartext password only to a server we verified.
            methods={AuthMethod.TRUST, AuthMethod.MD5, AuthMethod.SCRAM_SHA_256}
            | ({AuthMethod.CLEARTEXT} if spec.tls == "verify-full" else set()),
            max_iterations=MAX_SCRAM_ITERATIONS,
        )
        try:
            ready = await self._login(stream, login)
        except UpstreamLoginError as exc:
            if exc.response is None:
                raise Refused(exc.code, f"logging in to {resource.name} failed: {exc.message}") from None
            # The server said no in its own words: the client gets them verbatim.
            log.info("pg_login_refused resource=%s db_user=%s sqlstate=%s", resource.name, db_user,
                     exc.wire_hint)
            return Opened(upstream=stream, first_bytes=exc.response.encode(),
                          details={"db_user": db_user, "db_name": db_name,
                                   "login_error": f"{exc.wire_hint} {exc.message}"})
        session.extra["backend_key"] = ready.backend_key
        trailing, _ = login.trailing_data
        auditor = PgSessionAuditor(cluster, session)
        # The backend's real secret stays here: the client gets the real
        # process id (what pg_backend_pid() says, as NOTIFY's sender and
        # pools expect) with a secret of our own, which only its gateway
        # checks before it asks us to cancel.
        real = ready.backend_key
        client_key = _BLANK_KEY if real is None else BackendKeyData(process_id=real.process_id,
                                                                    secret_key=secrets.token_bytes(4))
        client_bytes = StartupRelay(client_key).feed(ready.client_bytes)
        return Opened(upstream=stream, first_bytes=client_bytes + trailing,
                      tap_client=auditor.from_client, tap_server=auditor.from_server, finish=auditor.finish,
                      said_goodbye=auditor.said_goodbye,
                      details={"db_user": db_user, "db_name": db_name, "auth": ready.method.value})

    async def _start_tls(self, cluster: Cluster, upstream: Upstream, spec, resource: Resource,
                         db_user: str) -> None:
        tcp = upstream.tcp
        await tcp.send_all(SSLRequest().encode())
        answer = await tcp.receive_some(1)  # exactly one byte (CVE-2021-23222)
        try:
            accepted = parse_ssl_answer(answer)
        except ProtocolError:
            accepted = None
        if not accepted:
            raise self.refuse_plaintext(spec, resource)
        await self.start_tls(cluster, upstream, spec, resource, db_user)

    async def _login(self, stream: trio.abc.HalfCloseableStream, login: UpstreamLogin):
        while True:
            # next_event() may queue an answer (our password, a SCRAM
            # message): send it before waiting for the server's next move.
            event = login.next_event()
            out = login.data_to_send()
            if out:
                await stream.send_all(out)
            if event is NEED_DATA:
                try:
                    data = await stream.receive_some(65536)
                except trio.BrokenResourceError as exc:
                    raise Refused(ErrorCode.UPSTREAM_UNREACHABLE,
                                  f"the server closed the connection during login: {exc}") from None
                login.receive_data(data)
                continue
            return event


POSTGRES = PostgresKind()


class PgSessionAuditor(SessionAuditor):
    """Turns a session's two byte streams into audit events (batched)."""

    prefix = "pg"
    protocol = "PostgreSQL"

    def __init__(self, cluster: Cluster, session: LiveSession) -> None:
        super().__init__(cluster, session)
        self.front = FrontendAuditor()
        self.back = BackendAuditor()
        self.copy_in = 0
        self.copy_out = 0
        self.portals: dict[str, tuple[str, int | None]] = {}
        self.terminated = False  # the client sent Terminate (set in the relay's thread)

    def from_client(self, data: bytes) -> None:
        self.feed(self.front, self._client_event, data, "client")

    def from_server(self, data: bytes) -> None:
        self.feed(self.back, self._server_event, data, "server")

    def _client_event(self, e: object) -> None:
        if type(e) is QueryEvent:  # once per statement: one dict, built here
            session = self.session
            self.cluster.audit_fields_soon("pg.query", session.user, {
                "session_id": session.id, "resource": session.resource, "query": e.text,
                "truncated": e.truncated, "length": e.length, "sha256": e.sha256})
        elif isinstance(e, ParseEvent):
            self.emit("parse", statement=e.statement, query=e.text, truncated=e.truncated, length=e.length,
                       sha256=e.sha256)
        elif isinstance(e, BindEvent):
            # Remembered, not written: the Execute that runs the portal says
            # what ran (one event per execution instead of two).
            if len(self.portals) >= MAX_PORTALS:
                self.portals.clear()
            self.portals[e.portal] = (e.statement, e.param_count)
        elif isinstance(e, ExecuteEvent):
            statement, params = self.portals.get(e.portal, (None, None))
            self.emit("execute", portal=e.portal, statement=statement, param_count=params)
        elif isinstance(e, FunctionCallEvent):
            self.emit("function_call", oid=e.oid)
        elif isinstance(e, CopyDataEvent):
            self.copy_in += e.bytes
        elif isinstance(e, (CopyDoneEvent, CopyFailEvent)):
            self.emit("copy", direction="in", bytes=self.copy_in,
                       failed=isinstance(e, CopyFailEvent))
            self.copy_in = 0
        elif isinstance(e, TerminateEvent):
            self.terminated = True

    def said_goodbye(self) -> bool:
        """Whether the client sent Terminate (Opened.said_goodbye)."""
        return self.terminated

    def _server_event(self, e: object) -> None:
        if isinstance(e, ErrorEvent):
            self.emit("error", sqlstate=e.sqlstate, severity=e.severity, message=e.message)
        elif isinstance(e, CopyDataEvent) and e.direction is CopyDirection.OUT:
            self.copy_out += e.bytes
        elif isinstance(e, CopyDoneEvent) and e.direction is CopyDirection.OUT:
            self.emit("copy", direction="out", bytes=self.copy_out, failed=False)
            self.copy_out = 0

    def finish(self) -> None:
        if self.copy_in:
            self.emit("copy", direction="in", bytes=self.copy_in, failed=True)
        if self.copy_out:
            self.emit("copy", direction="out", bytes=self.copy_out, failed=True)

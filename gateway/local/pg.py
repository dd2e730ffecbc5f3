"""``wicket proxy db``: the gateway as a PostgreSQL server on localhost.

Per client connection:

1. the startup phase is ours: SSLRequest answered ``N`` (or ``S`` and TLS
   with the gateway's local CA under ``--local-tls``), GSSENCRequest ``N``,
   a CancelRequest routed (below), then the StartupMessage gives the db user
   and database (``--db-user`` / ``--db-name`` override them when given);
2. we open a stream on the gateway's multiplexed connection to the cluster
   (``wicket-mux``, as ``wicket proxy tcp`` does: no TLS handshake per
   client) with those as the dial's parameters, waiting out a cluster that
   cannot be reached for a while (:class:`WaitRoom`); a refusal becomes a
   FATAL ErrorResponse with a fitting SQLSTATE and a hint saying what to
   do, which psql and every driver print;
3. the cluster logs in upstream and sends the server's AuthenticationOk ...
   ReadyForQuery on the stream; the relay engine carries it to the client,
   untouched, and every byte after it both ways. A look at those first
   bytes (in the engine's thread) notes the cancel key the client got.

Cancel: the key the client gets is the server's real process id (what
``pg_backend_pid()`` says) with a secret the cluster made up; the real
secret never leaves the cluster. A client quotes the key on a new
connection; if it matches a live session of this gateway (process id, then
the secret in constant time), we send a control dial naming the cluster
session on the same multiplexed connection, right behind what the client
sent on that session (:meth:`MuxLink.control`), and the cluster, after
checking the session is this user's and writing those bytes upstream,
cancels with the real key. So a cancel never overtakes its query. A key
this gateway did not hand out cancels nothing.
"""

from __future__ import annotations

import logging

import trio

from gateway.local.dbroute import ClientPhase, DatabaseRoute, local_tls as local_tls_setup
from gateway.local.dialer import MuxDialer
from gateway.local.profile import Profile
from gateway.local.proxy import Listening
from gateway.net.muxlink import LinkClosed, MuxLink, Stream
from gateway.net.peercred import LocalUsers
from gateway.net.tls import TLSStream
from protocols.dial import DialError, DialRequest
from protocols.errors import ErrorCode, ProtocolError, RemoteProtocolError
from protocols.postgres import (
    NEED_DATA, BackendKeyData, CancelRequest, ConnectionClosed, DirectTLS, GSSENCRequest, SqlState, SSLRequest,
    StartupConnection, StartupMessage, StartupRelay, error_response_for, negotiation_for,
)
from protocols.postgres.options import session_parameters

log = logging.getLogger("wicket.proxy.postgres")

#: The ALPN id of PostgreSQL over TLS (PostgreSQL 17); required for direct TLS.
ALPN_POSTGRESQL = "postgresql"
READ = 65536
MAX_FORWARDED_PARAMS = 24


class PostgresProxy(DatabaseRoute):
    kind = "pg"

    def __init__(self, profile: Profile, resource: str, **options) -> None:
        super().__init__(profile, resource, **options)
        # The key a client got (its process id) -> its session, for a cancel.
        self._keys: dict[int, _Session] = {}

    def client_phase(self, tcp: trio.SocketStream, client_addr: str, *, may_control: bool) -> _PgClient:
        return _PgClient(self, tcp, client_addr, may_control=may_control)

    async def _cancel(self, cancel: CancelRequest, client_addr: str) -> None:
        session = self._keys.get(cancel.process_id)
        if session is None or not session.key.matches(cancel):
            log.info("pg_cancel_ignored client=%s reason=unknown key", client_addr)
            return
        request = DialRequest(resource=self.resource, params={"cancel": session.id}, client_addr=client_addr)
        try:
            reply = await self.control_dial(session.link, request, after=session.stream)
        except LinkClosed as exc:
            log.warning("pg_cancel_failed session=%s error=%s", session.id, exc)
            return
        if isinstance(reply, DialError):
            log.warning("pg_cancel_refused session=%s code=%s message=%r", session.id,
                        reply.code.value, reply.message)
            return
        log.info("pg_cancel_sent client=%s session=%s", client_addr, session.id)


class _PgClient(ClientPhase):
    """One client connection: its startup phase, its refusals, its session."""

    route: PostgresProxy

    def __init__(self, route: PostgresProxy, tcp: trio.SocketStream, client_addr: str, *,
                 may_control: bool) -> None:
        super().__init__(route, tcp, client_addr, may_control=may_control)
        self.early = b""  # NegotiateProtocolVersion, before the server's first byte

    def refusal(self, error: DialError | ProtocolError, hint: str | None) -> bytes:
        return error_response_for(error, hint=hint).encode()

    async def run(self) -> dict[str, str] | None:
        """Read up to the StartupMessage: the dial's parameters, or None."""
        proxy, tcp, client_addr = self.route, self.tcp, self.client_addr
        conn = StartupConnection()
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await self.stream.receive_some(READ))
            elif isinstance(event, SSLRequest):
                accept = proxy.tls_context is not None
                await self.stream.send_all(conn.answer_ssl(accept=accept))
                if accept:
                    self.stream = TLSStream(tcp, proxy.tls_context, server_side=True)
                    await self.stream.do_handshake()
            elif isinstance(event, GSSENCRequest):
                await self.stream.send_all(conn.answer_gssenc())
            elif isinstance(event, CancelRequest):
                if self.may_control:
                    await proxy._cancel(event, client_addr)
                return None
            elif isinstance(event, DirectTLS):
                # sslnegotiation=direct (PostgreSQL 17 clients): TLS from the
                # first byte, which only a gateway with a certificate can take.
                if proxy.tls_context is None:
                    log.info("pg_direct_tls_refused client=%s hint=%r", client_addr,
                             "the client starts with TLS (sslnegotiation=direct): start the proxy with "
                             "--local-tls, or connect with sslnegotiation=postgres (the default)")
                    return None
                self.stream = TLSStream(tcp, proxy.tls_context, server_side=True,
                                        received=conn.accept_direct_tls())
                await self.stream.do_handshake()
                if self.stream.selected_alpn_protocol() != ALPN_POSTGRESQL:
                    # As PostgreSQL 17 does: a direct TLS client must say it
                    # speaks PostgreSQL (no cross-protocol confusion).
                    raise RemoteProtocolError(
                        "direct TLS connections must negotiate the ALPN protocol \"postgresql\"",
                        code=ErrorCode.BAD_REQUEST, wire_hint="08P01")
            elif isinstance(event, ConnectionClosed):
                return None
            elif isinstance(event, StartupMessage):
                if event.wants_replication:
                    # Turned away here, in the client's terms, before any
                    # dial (the cluster refuses it too).
                    raise RemoteProtocolError(
                        "replication connections are not supported through Wicket; "
                        "connect to the server directly for replication",
                        code=ErrorCode.BAD_REQUEST, wire_hint=SqlState.FEATURE_NOT_SUPPORTED)
                # Settings outside the allowlist, likewise (42501).
                session_parameters(event.parameters)
                negotiation = negotiation_for(event)
                self.early = negotiation.encode() if negotiation is not None else b""
                trailing, _ = conn.trailing_data
                if trailing:
                    raise RemoteProtocolError(
                        "data after the StartupMessage before authentication completed",
                        code=ErrorCode.BAD_REQUEST, wire_hint="08P01")
                return self._params(event)

    def _params(self, startup: StartupMessage) -> dict[str, str]:
        proxy = self.route
        db_user = proxy.db_user or startup.user
        params = {
            "db_user": db_user,
            # A client that names no database means "the one named like the
            # user", as the server would: like the db user we connect as.
            "db_name": proxy.db_name or startup.parameters.get("database") or db_user,
        }
        for key, value in list(startup.parameters.items())[:MAX_FORWARDED_PARAMS]:
            # What does not fit the dial's limits is not forwarded (the
            # server would not know such a parameter anyway).
            if key in ("user", "database") or key.startswith("_pq_.") or not key:
                continue
            if len("pg." + key) <= 64 and len(value) <= 1024:
                params["pg." + key] = value
        return params

    async def session(self, params, link: MuxLink, stream: Stream) -> None:
        proxy, client_addr = self.route, self.client_addr
        session = _Session(proxy, link, stream, client_addr, params)
        try:
            counters, error, _ran = await proxy.relay(self, link, stream, early=self.early, tap_in=session.watch)
        finally:
            session.forget()
        if not session.started:
            err = session.startup.error
            log.info("pg_login_refused resource=%s client=%s db_user=%s sqlstate=%s message=%r error=%r",
                     proxy.resource, client_addr, params["db_user"], err.fields.get("C") if err else None,
                     err.fields.get("M") if err else None, error)
            return
        log.info("pg_session_end resource=%s client=%s session=%s sent=%d received=%d%s",
                 proxy.resource, client_addr, session.id, counters.a_to_b, counters.b_to_a,
                 f" error={error!r}" if error else "")


def postgres_route(profile: Profile, resource: str, identity, *, wait_for_cluster: float,
                   local_users: LocalUsers | None = None, db_user: str | None = None,
                   db_name: str | None = None, local_tls: bool = False,
                   local_tls_client_cert: bool = False, dialer: MuxDialer | None = None) -> Listening:
    """The postgres kind's local route (gateway/kinds.py)."""
    tls_context, ca_path, client_cert = local_tls_setup(profile.home, on=local_tls, client_cert=local_tls_client_cert,
                                                        alpn=(ALPN_POSTGRESQL,))
    local_tls = tls_context is not None
    tls_line = f"sslmode=verify-full sslrootcert={ca_path}" if local_tls else ""
    if client_cert is not None:
        tls_line += f" sslcert={client_cert[0]} sslkey={client_cert[1]}"
    pg = PostgresProxy(profile, resource, db_user=db_user, db_name=db_name, tls_context=tls_context,
                       wait_for_cluster=wait_for_cluster, local_users=local_users, dialer=dialer,
                       client_cert_line=tls_line if local_tls_client_cert else None)

    def try_line(host: str, port: int) -> str:
        user = db_user or identity.user
        conninfo = f"host={host} port={port} user={user} dbname={db_name or user}"
        if local_tls:
            conninfo += " " + tls_line
        return f'Try: psql "{conninfo}"'

    return Listening(handler=pg.handle, dialer=pg.dialer, try_line=try_line, route=pg,
                     unix_name=lambda port: f".s.PGSQL.{port}")


class _Session:
    """A session on its way: what the gateway sees of the cluster's first
    bytes (:meth:`watch`, a tap in the relay engine's thread, until
    ReadyForQuery), the cancel key the client got, and where to send a
    cancel."""

    def __init__(self, proxy: PostgresProxy, link: MuxLink, stream: Stream, client_addr: str,
                 params: dict[str, str]) -> None:
        self.proxy, self.link, self.stream = proxy, link, stream
        self.id = stream.reply.session_id
        self.client_addr, self.params = client_addr, params
        self.startup = StartupRelay(None)  # passes the bytes on untouched; notes the key and an error
        self.key: BackendKeyData | None = None
        self.started = False

    def watch(self, data: bytes) -> None:
        startup = self.startup
        startup.feed(data)
        if self.key is None and startup.upstream_key is not None:
            self.key = startup.upstream_key
            self.proxy._keys[self.key.process_id] = self
        if startup.done:
            self.started = True
            self.stream.tap_in = None  # the rest is the session's: not looked at
            p = self.params
            log.info("pg_session_start resource=%s client=%s db_user=%s db_name=%s session=%s",
                     self.proxy.resource, self.client_addr, p["db_user"], p["db_name"], self.id)

    def forget(self) -> None:
        if self.key is not None and self.proxy._keys.get(self.key.process_id) is self:
            del self.proxy._keys[self.key.process_id]

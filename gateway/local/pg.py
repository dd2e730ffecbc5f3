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
import ssl

import trio

from gateway.local.connect import ClusterError
from gateway.local.dialer import DIAL_TIMEOUT
from gateway.local.profile import Profile, ProfileError
from gateway.local.localtls import ensure_local_client_cert, local_server_context
from gateway.local.proxy import NEXT_STEP, Listening, MuxRoute, peer_addr
from gateway.local.waitroom import RIDE_OUT, ClientGone
from gateway.net.muxlink import LinkClosed, MuxLink, Stream
from gateway.net.peercred import LocalUsers
from gateway.net.relay import RelayCounters
from gateway.net.tcp import peer_left
from gateway.net.tls import TLSStream
from protocols.dial import DialError, DialRequest
from protocols.errors import ErrorCode, ProtocolError, RemoteProtocolError
from protocols.postgres import (
    NEED_DATA, BackendKeyData, CancelRequest, ConnectionClosed, DirectTLS, GSSENCRequest, SqlState, SSLRequest,
    StartupConnection, StartupMessage, StartupRelay, error_response_for, negotiation_for,
)
from protocols.postgres.options import session_parameters

log = logging.getLogger("wicket.proxy.postgres")

STARTUP_TIMEOUT = 60.0
#: The ALPN id of PostgreSQL over TLS (PostgreSQL 17); required for direct TLS.
ALPN_POSTGRESQL = "postgresql"
READ = 65536
MAX_FORWARDED_PARAMS = 24
_BY_CODE = object()  # _refuse's default hint: the next step for the error's code


class PostgresProxy(MuxRoute):
    def __init__(self, profile: Profile, resource: str, *, db_user: str | None = None,
                 db_name: str | None = None, tls_context: ssl.SSLContext | None = None,
                 wait_for_cluster: float = RIDE_OUT, local_users: LocalUsers | None = None,
                 client_cert_line: str | None = None) -> None:
        super().__init__(profile, resource, wait_for_cluster=wait_for_cluster, local_users=local_users)
        self.db_user, self.db_name = db_user, db_name
        self.tls_context = tls_context
        #: With --local-tls-client-cert: the connection settings that name
        #: the client certificate (told to a client without one).
        self.client_cert_line = client_cert_line
        # The key a client got (its process id) -> its session, for a cancel.
        self._keys: dict[int, _Session] = {}

    async def handle(self, tcp: trio.SocketStream) -> None:
        client_addr = peer_addr(tcp)
        full = self.client_arrived(client_addr)
        if full is not None:
            # At once, before the startup packet, as the server does when it
            # cannot take a connection (libpq reads an ErrorResponse in any
            # answer to SSLRequest): a refused client holds nothing here.
            await _send_and_close(tcp, error_response_for(
                DialError(code=ErrorCode.RATE_LIMITED, message=full), hint=None).encode())
            return
        try:
            await self._handle(tcp, client_addr)
        finally:
            self.client_left()

    async def _handle(self, tcp: trio.SocketStream, client_addr: str) -> None:
        # Another local user is told why in its own protocol, after its
        # startup packet; its cancel requests cancel nothing.
        stranger = self.stranger(tcp.socket, client_addr)
        client: trio.abc.HalfCloseableStream = tcp
        secured: list[TLSStream] = []  # the TLS stream, once negotiated: a refusal goes through it
        try:
            with trio.fail_after(STARTUP_TIMEOUT):
                startup, client, early = await self._startup(tcp, client_addr, secured,
                                                             may_cancel=stranger is None)
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            await client.aclose()
            return
        except ProtocolError as exc:
            log.info("pg_startup_rejected client=%s error=%s", client_addr, exc)
            await _send_and_close(secured[0] if secured else client, error_response_for(exc).encode())
            return
        if startup is None:
            await client.aclose()
            return
        if stranger is None and self.client_cert_line is not None and \
                not (secured and secured[0].getpeercert(binary_form=True)):
            # Without the certificate only its owner can read: told why in
            # its own protocol (a TLS alert would not say).
            stranger = (f"this Wicket gateway requires a TLS client certificate it issued; connect with "
                        f"{self.client_cert_line}")
            log.warning("local_user_refused resource=%s client=%s reason=%r", self.resource, client_addr,
                        "no client certificate")
        async with client:
            if stranger is not None:
                await self._refuse(client, client_addr, DialError(code=ErrorCode.ACCESS_DENIED, message=stranger),
                                   hint=None)
                return
            await self._session(client, client_addr, startup, early, tcp.socket)

    async def _startup(self, tcp: trio.SocketStream, client_addr: str, secured: list[TLSStream], *,
                       may_cancel: bool = True):
        """Read up to the StartupMessage. Returns (startup or None, the client
        stream (TLS if negotiated), bytes to send before the server's)."""
        conn = StartupConnection()
        client: trio.abc.HalfCloseableStream = tcp
        while True:
            event = conn.next_event()
            if event is NEED_DATA:
                conn.receive_data(await client.receive_some(READ))
            elif isinstance(event, SSLRequest):
                accept = self.tls_context is not None
                await client.send_all(conn.answer_ssl(accept=accept))
                if accept:
                    client = TLSStream(tcp, self.tls_context, server_side=True)
                    await client.do_handshake()
                    secured.append(client)
            elif isinstance(event, GSSENCRequest):
                await client.send_all(conn.answer_gssenc())
            elif isinstance(event, CancelRequest):
                if may_cancel:
                    await self._cancel(event, client_addr)
                return None, client, b""
            elif isinstance(event, DirectTLS):
                # sslnegotiation=direct (PostgreSQL 17 clients): TLS from the
                # first byte, which only a gateway with a certificate can take.
                if self.tls_context is None:
                    log.info("pg_direct_tls_refused client=%s hint=%r", client_addr,
                             "the client starts with TLS (sslnegotiation=direct): start the proxy with "
                             "--local-tls, or connect with sslnegotiation=postgres (the default)")
                    return None, client, b""
                client = TLSStream(tcp, self.tls_context, server_side=True, received=conn.accept_direct_tls())
                await client.do_handshake()
                secured.append(client)
                if client.selected_alpn_protocol() != ALPN_POSTGRESQL:
                    # As PostgreSQL 17 does: a direct TLS client must say it
                    # speaks PostgreSQL (no cross-protocol confusion).
                    raise RemoteProtocolError(
                        "direct TLS connections must negotiate the ALPN protocol \"postgresql\"",
                        code=ErrorCode.BAD_REQUEST, wire_hint="08P01")
            elif isinstance(event, ConnectionClosed):
                return None, client, b""
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
                early = negotiation.encode() if negotiation is not None else b""
                trailing, _ = conn.trailing_data
                if trailing:
                    raise RemoteProtocolError(
                        "data after the StartupMessage before authentication completed",
                        code=ErrorCode.BAD_REQUEST, wire_hint="08P01")
                return event, client, early

    def _params(self, startup: StartupMessage) -> dict[str, str]:
        db_user = self.db_user or startup.user
        params = {
            "db_user": db_user,
            # A client that names no database means "the one named like the
            # user", as the server would: like the db user we connect as.
            "db_name": self.db_name or startup.parameters.get("database") or db_user,
        }
        for key, value in list(startup.parameters.items())[:MAX_FORWARDED_PARAMS]:
            # What does not fit the dial's limits is not forwarded (the
            # server would not know such a parameter anyway).
            if key in ("user", "database") or key.startswith("_pq_.") or not key:
                continue
            if len("pg." + key) <= 64 and len(value) <= 1024:
                params["pg." + key] = value
        return params

    async def _session(self, client, client_addr: str, startup: StartupMessage, early: bytes, sock) -> None:
        params = self._params(startup)
        request = DialRequest(resource=self.resource, params=params, client_addr=client_addr)
        try:
            self.dialer.check_fresh()
            link, stream = await self._open(request, client_addr, sock)
        except ClientGone:
            log.info("client_left resource=%s client=%s while=waiting_for_cluster", self.resource, client_addr)
            return
        except ProfileError as exc:
            # The profile's message says what to run, with the cluster and user.
            await self._refuse(client, client_addr, DialError(code=ErrorCode.CERT_EXPIRED, message=str(exc)),
                               hint=None)
            return
        except (ClusterError, trio.TooSlowError) as exc:
            message = getattr(exc, "message", None) or "the Wicket cluster did not answer in time"
            # The cluster, not the resource, is what failed: the message says
            # what to do, with no hint about the resource.
            unreachable = getattr(exc, "code", "unreachable") == "unreachable" or getattr(exc, "passing", False)
            await self._refuse(client, client_addr,
                               DialError(code=ErrorCode.UPSTREAM_UNREACHABLE, message=message),
                               hint="check that the Wicket cluster is running and reachable from this machine"
                               if unreachable else None)
            return
        if isinstance(stream.reply, DialError):
            await self._refuse(client, client_addr, stream.reply)
            return
        session = _Session(self, link, stream, client_addr, params)
        counters = RelayCounters()
        try:
            if early:  # NegotiateProtocolVersion, before the server's first byte
                await client.send_all(early)
            if not link.bind(stream, client, counters, tap_in=session.watch):
                return
            error = await link.wait(stream)
        except BaseException:
            link.cut(stream, "cancelled")
            raise
        finally:
            session.forget()
            self.dialer.release(link)
        if not session.started:
            err = session.startup.error
            log.info("pg_login_refused resource=%s client=%s db_user=%s sqlstate=%s message=%r error=%r",
                     self.resource, client_addr, params["db_user"], err.fields.get("C") if err else None,
                     err.fields.get("M") if err else None, error)
            return
        self.stats.ended(counters.a_to_b, counters.b_to_a)
        log.info("pg_session_end resource=%s client=%s session=%s sent=%d received=%d%s",
                 self.resource, client_addr, session.id, counters.a_to_b, counters.b_to_a,
                 f" error={error!r}" if error else "")

    async def _open(self, request: DialRequest, client_addr: str, sock) -> tuple[MuxLink, Stream]:
        """A stream for ``request`` and the cluster's answer (in
        ``stream.reply``), on the connection to the cluster, waiting for one
        if need be; once more on a new connection if the first died before
        the cluster could have seen the OPEN. Raises ClusterError,
        ClientGone, ProfileError."""
        deadline = self.room.deadline()
        retried = False
        while True:
            given_back: list[str] = []  # the connection died before the cluster saw the OPEN: why

            def start(link: MuxLink) -> tuple[MuxLink, Stream]:
                return link, link.open(request, reply_timeout=DIAL_TIMEOUT, context=client_addr,
                                       retry=None if retried else lambda _s, _e, _f, why: given_back.append(why))

            # A client waits for its answer in silence: its FIN means it left.
            link, stream = await self.on_link(start, deadline, client_addr, lambda: peer_left(sock, eof=True))
            if await link.reply(stream) is not None:
                return link, stream
            if given_back:
                log.info("session_retry resource=%s client=%s reason=%r", self.resource, client_addr,
                         f"the connection to the cluster failed before the cluster saw this session "
                         f"({given_back[0]}); starting it on a new connection")
                retried = True
                continue
            error = stream.error or "the session ended before the cluster answered"
            if link.failed is not None:
                error += "; is `wicket-cluster start` still running?"
            raise ClusterError("unreachable", error)

    async def _refuse(self, client, client_addr: str, error: DialError, *,
                      hint: str | None | object = _BY_CODE) -> None:
        """Turn the client away with ``error`` in its own protocol; ``hint``:
        the next step (None: the message says it), by default the one for
        ``error.code``."""
        if hint is _BY_CODE:
            hint = NEXT_STEP.get(error.code)
        self.log_refused(client_addr, error, hint)
        await _send_and_close(client, error_response_for(error, hint=hint).encode())

    async def _cancel(self, cancel: CancelRequest, client_addr: str) -> None:
        session = self._keys.get(cancel.process_id)
        if session is None or not session.key.matches(cancel):
            log.info("pg_cancel_ignored client=%s reason=unknown key", client_addr)
            return
        request = DialRequest(resource=self.resource, params={"cancel": session.id}, client_addr=client_addr)
        try:
            reply = await session.link.control(request, after=session.stream, timeout=DIAL_TIMEOUT)
        except LinkClosed as exc:
            log.warning("pg_cancel_failed session=%s error=%s", session.id, exc)
            return
        if isinstance(reply, DialError):
            log.warning("pg_cancel_refused session=%s code=%s message=%r", session.id,
                        reply.code.value, reply.message)
            return
        log.info("pg_cancel_sent client=%s session=%s", client_addr, session.id)


def postgres_route(profile: Profile, resource: str, identity, *, wait_for_cluster: float,
                   local_users: LocalUsers | None = None, db_user: str | None = None,
                   db_name: str | None = None, local_tls: bool = False,
                   local_tls_client_cert: bool = False) -> Listening:
    """The postgres kind's local route (gateway/kinds.py)."""
    local_tls = local_tls or local_tls_client_cert
    tls_context, ca_path = (local_server_context(profile.home, alpn=(ALPN_POSTGRESQL,),
                                                 client_certs=local_tls_client_cert) if local_tls
                            else (None, None))
    tls_line = f"sslmode=verify-full sslrootcert={ca_path}" if local_tls else ""
    if local_tls_client_cert:
        cert_path, key_path = ensure_local_client_cert(profile.home)
        tls_line += f" sslcert={cert_path} sslkey={key_path}"
    pg = PostgresProxy(profile, resource, db_user=db_user, db_name=db_name, tls_context=tls_context,
                       wait_for_cluster=wait_for_cluster, local_users=local_users,
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


async def _send_and_close(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()

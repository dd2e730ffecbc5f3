"""``wicket proxy db``: the gateway as a PostgreSQL server on localhost.

Per client connection:

1. the startup phase is ours: SSLRequest answered ``N`` (or ``S`` and TLS
   with the gateway's local CA under ``--local-tls``), GSSENCRequest ``N``,
   a CancelRequest routed (below), then the StartupMessage gives the db user
   and database (``--db-user`` / ``--db-name`` override them when given);
2. we dial the cluster on the ``wicket-postgres`` route with those as
   parameters; a refusal becomes a FATAL ErrorResponse with a fitting
   SQLSTATE and a hint saying what to do, which psql and every driver print;
3. the cluster logs in upstream and sends the server's AuthenticationOk ...
   ReadyForQuery; we pass it on with BackendKeyData swapped for a key we
   made, then relay bytes both ways untouched.

Cancel: the client quotes our key on a new connection; if it matches a live
session of this gateway (constant-time compare), we send a control dial
naming the cluster session, and the cluster, after checking the session is
this user's, cancels upstream with the real key. A key this gateway did not
hand out cancels nothing.
"""

from __future__ import annotations

import logging
import secrets
import ssl

import trio

from gateway.local.connect import ClusterError
from gateway.local.dialer import Dialer, DialRefused
from gateway.local.waitroom import RIDE_OUT, ClientGone, WaitRoom
from gateway.local.profile import ProfileError
from gateway.local.proxy import NEXT_STEP, peer_addr
from gateway.net.relay import relay
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
READ = 65536
MAX_FORWARDED_PARAMS = 24
_BY_CODE = object()  # _refuse's default hint: the next step for the error's code


class PostgresProxy:
    def __init__(self, dialer: Dialer, resource: str, *, db_user: str | None = None,
                 db_name: str | None = None, tls_context: ssl.SSLContext | None = None,
                 wait_for_cluster: float = RIDE_OUT) -> None:
        self.dialer = dialer
        self.resource = resource
        self.room = WaitRoom(resource, wait_for_cluster)
        self.db_user, self.db_name = db_user, db_name
        self.tls_context = tls_context
        # Our cancel key -> the cluster session it stands for.
        self._keys: dict[int, tuple[BackendKeyData, str]] = {}

    async def handle(self, tcp: trio.SocketStream) -> None:
        client_addr = peer_addr(tcp)
        client: trio.abc.HalfCloseableStream = tcp
        secured: list[TLSStream] = []  # the TLS stream, once negotiated: a refusal goes through it
        try:
            with trio.fail_after(STARTUP_TIMEOUT):
                startup, client, early = await self._startup(tcp, client_addr, secured)
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
        async with client:
            await self._session(client, client_addr, startup, early, tcp.socket)

    async def _startup(self, tcp: trio.SocketStream, client_addr: str, secured: list[TLSStream]):
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
                await self._cancel(event, client_addr)
                return None, client, b""
            elif isinstance(event, DirectTLS):
                log.info("pg_direct_tls_refused client=%s hint=%s", client_addr,
                         "use sslnegotiation=postgres (the default)")
                return None, client, b""
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
        try:
            self.dialer.check_fresh()
            request = DialRequest(resource=self.resource, params=params, client_addr=client_addr)
            # A client waits for its answer in silence: its FIN means it left.
            dialed = await self.room.ride_out(lambda: self.dialer.dial(request), self.room.deadline(),
                                              client_addr, lambda: peer_left(sock, eof=True))
        except ClientGone:
            log.info("client_left resource=%s client=%s while=waiting_for_cluster", self.resource, client_addr)
            return
        except ProfileError as exc:
            await self._refuse(client, client_addr, DialError(code=ErrorCode.CERT_EXPIRED, message=str(exc)))
            return
        except DialRefused as exc:
            await self._refuse(client, client_addr, exc.error)
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
        key = BackendKeyData(process_id=secrets.randbelow(2**31 - 1) + 1, secret_key=secrets.token_bytes(4))
        session_id = dialed.accept.session_id
        self._keys[key.process_id] = (key, session_id)
        try:
            async with dialed.stream:
                relay_startup = StartupRelay(key)
                out = early + relay_startup.feed(dialed.trailing)
                with trio.fail_after(STARTUP_TIMEOUT):
                    while not relay_startup.done:
                        if out:
                            await client.send_all(out)
                        data = await dialed.stream.receive_some(READ)
                        if not data:
                            break
                        out = relay_startup.feed(data)
                    if out:
                        await client.send_all(out)
                if not relay_startup.done:
                    err = relay_startup.error
                    log.info("pg_login_refused resource=%s client=%s db_user=%s sqlstate=%s message=%r",
                             self.resource, client_addr, params["db_user"],
                             err.fields.get("C") if err else None, err.fields.get("M") if err else None)
                    return
                log.info("pg_session_start resource=%s client=%s db_user=%s db_name=%s session=%s",
                         self.resource, client_addr, params["db_user"], params["db_name"], session_id)
                stats = await relay(client, dialed.stream, names=("client", "cluster"))
                log.info("pg_session_end resource=%s client=%s session=%s sent=%d received=%d%s",
                         self.resource, client_addr, session_id, stats.a_to_b, stats.b_to_a,
                         f" error={stats.error!r}" if stats.error else "")
        except ProtocolError as exc:
            log.warning("pg_session_broken resource=%s client=%s error=%s", self.resource, client_addr, exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.info("pg_session_broken resource=%s client=%s error=%s", self.resource, client_addr, exc)
        except trio.TooSlowError:
            log.warning("pg_startup_timeout resource=%s client=%s session=%s", self.resource, client_addr,
                        session_id)
        finally:
            self._keys.pop(key.process_id, None)

    async def _refuse(self, client, client_addr: str, error: DialError, *,
                      hint: str | None | object = _BY_CODE) -> None:
        """Turn the client away with ``error`` in its own protocol; ``hint``:
        the next step (None: the message says it), by default the one for
        ``error.code``."""
        if hint is _BY_CODE:
            hint = NEXT_STEP.get(error.code)
        log.warning("dial_refused resource=%s client=%s code=%s message=%r next_step=%r", self.resource,
                    client_addr, error.raw_code or error.code.value, error.message, hint)
        await _send_and_close(client, error_response_for(error, hint=hint).encode())

    async def _cancel(self, cancel: CancelRequest, client_addr: str) -> None:
        entry = self._keys.get(cancel.process_id)
        if entry is None or not entry[0].matches(cancel):
            log.info("pg_cancel_ignored client=%s reason=unknown key", client_addr)
            return
        session_id = entry[1]
        try:
            dialed = await self.dialer.dial(DialRequest(resource=self.resource, params={"cancel": session_id},
                                                        client_addr=client_addr))
            await dialed.stream.aclose()
        except DialRefused as exc:
            log.warning("pg_cancel_refused session=%s code=%s message=%r", session_id,
                        exc.error.code.value, exc.error.message)
            return
        except (ClusterError, ProfileError, trio.TooSlowError) as exc:
            log.warning("pg_cancel_failed session=%s error=%s", session_id, exc)
            return
        log.info("pg_cancel_sent client=%s session=%s", client_addr, session_id)


async def _send_and_close(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
    try:
        await stream.send_all(data)
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()

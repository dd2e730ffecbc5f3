"""What every database kind's local route shares (PostgreSQL, MySQL, MongoDB).

Theory of operation
-------------------
A database client speaks first with the gateway, not the cluster: the
kind's connection phase (PostgreSQL's SSLRequest and StartupMessage,
MySQL's handshake) runs here and yields the dial's parameters (the db user
and database, and what else the kind passes on). Per client connection
:meth:`DatabaseRoute.handle` then

1. asks the kind for a :class:`ClientPhase` (one per connection: it holds
   the client's stream, which becomes a TLS stream under ``--local-tls``,
   and whatever the protocol's refusal needs, MySQL's sequence ids) and
   runs it within :data:`STARTUP_TIMEOUT`; a client that breaks the
   protocol hears the phase's native error;
2. turns away another local user (``MuxRoute.stranger``) in its own
   protocol, after its startup, so it learns why;
3. lets the kind answer alone what it can before the session is needed
   (:meth:`ClientPhase.until_needed`: MongoDB's hellos, on monitoring
   connections that never send anything else), bound by no deadline, as
   an idle session is not; what the client sent that the kind did not
   answer goes to the cluster first (``ClientPhase.ahead``);
4. opens a stream on the profile's multiplexed connection with those
   parameters and waits for the cluster's REPLY (:meth:`dial`), waiting
   out a cluster that cannot be reached (``WaitRoom``) and starting once
   more on a new connection a stream whose connection died before the
   cluster saw it; every refusal (the cluster's ``DialError``, an expired
   login, a cluster that does not answer) reaches the client as the
   phase's native error with the next step to take;
5. hands the accepted stream to the kind (:meth:`ClientPhase.session`),
   which relays it with :meth:`DatabaseRoute.relay`: the client's socket
   goes to the relay engine (the cluster's first bytes were waiting for
   it), and the call returns when the session is over.
"""

from __future__ import annotations

import logging
import ssl
import time
from typing import Any, Mapping

import trio

from gateway.local.connect import ClusterError
from gateway.local.dialer import DIAL_TIMEOUT, MuxDialer
from gateway.local.localtls import ensure_local_client_cert, local_server_context
from gateway.local.profile import Profile, ProfileError
from gateway.local.proxy import NEXT_STEP, MuxRoute, peer_addr
from gateway.local.waitroom import RIDE_OUT, ClientGone
from gateway.net.muxlink import LinkClosed, MuxLink, Stream
from gateway.net.peercred import LocalUsers
from gateway.net.relay import RelayCounters
from gateway.net.tls import TLSStream
from gateway.net.tcp import peer_left
from protocols.dial import DialError, DialRequest
from protocols.errors import ErrorCode, ProtocolError

log = logging.getLogger("wicket.proxy.db")

#: A client has this long to finish its connection phase with the gateway.
STARTUP_TIMEOUT = 60.0
#: ``hint``'s default: the next step for the error's code (NEXT_STEP).
BY_CODE = object()
#: What to do when the cluster, not the resource, failed.
CLUSTER_HINT = "check that the Wicket cluster is running and reachable from this machine"


class ClientPhase:
    """One client connection's own protocol work, made by the kind's
    :meth:`DatabaseRoute.client_phase`: the connection phase up to the
    dial's parameters (:meth:`run`), a refusal in the client's protocol
    (:meth:`refusal`), and the accepted session (:meth:`session`).
    ``stream`` is the client's stream, its TLS stream once negotiated."""

    def __init__(self, route: DatabaseRoute, tcp: trio.SocketStream, client_addr: str, *,
                 may_control: bool) -> None:
        self.route, self.tcp, self.client_addr = route, tcp, client_addr
        self.stream: trio.abc.HalfCloseableStream = tcp
        #: False for another local user: its control requests (a
        #: PostgreSQL cancel) do nothing.
        self.may_control = may_control
        #: Bytes read from the client that are the session's (read past
        #: what the kind answered itself): the cluster gets them first.
        self.ahead = b""

    async def run(self) -> Mapping[str, str] | None:
        """The connection phase: the dial's parameters, or None when there
        is no session to open (a cancel request, a client that left).
        Raises ProtocolError for a client that broke the protocol."""
        raise NotImplementedError

    async def until_needed(self) -> bool:
        """After :meth:`run`, before the dial, with no deadline: what the
        kind answers alone until the client needs the session; True once
        it does (anything it read for the session in ``ahead``), False if
        it left first. Raises ProtocolError for a client that broke the
        protocol. By default the session is needed at once."""
        return True

    def refusal(self, error: DialError | ProtocolError, hint: str | None) -> bytes:
        """The bytes that turn the client away with ``error`` (``hint``:
        what to do next, or None)."""
        raise NotImplementedError

    async def session(self, params: Mapping[str, str], link: MuxLink, stream: Stream) -> None:
        """Serve the session the cluster accepted on ``stream``."""
        raise NotImplementedError

    async def turn_away(self, error: DialError | ProtocolError, hint: str | None) -> None:
        """Send the refusal and close. A protocol whose client cannot be
        told anything yet (MySQL, before its greeting) first brings the
        exchange to where an error can be said."""
        await send_and_close(self.stream, self.refusal(error, hint))


class DatabaseRoute(MuxRoute):
    """A database kind's local route: see the module docstring. A kind
    subclasses it with :meth:`client_phase` (and ``kind``, for the logs).
    ``db_user``/``db_name``: what every connection uses whatever its client
    asks (``--db-user``/``--db-name``); ``tls_context``: TLS towards local
    clients (``--local-tls``), None for none."""

    kind = "db"

    def __init__(self, profile: Profile, resource: str, *, db_user: str | None = None,
                 db_name: str | None = None, tls_context: ssl.SSLContext | None = None,
                 wait_for_cluster: float = RIDE_OUT, local_users: LocalUsers | None = None,
                 client_cert_line: str | None = None, dialer: MuxDialer | None = None) -> None:
        super().__init__(profile, resource, wait_for_cluster=wait_for_cluster, local_users=local_users,
                         dialer=dialer)
        self.db_user, self.db_name = db_user, db_name
        self.tls_context = tls_context
        #: With --local-tls-client-cert: the connection settings that name
        #: the client certificate (told to a client without one).
        self.client_cert_line = client_cert_line

    def client_phase(self, tcp: trio.SocketStream, client_addr: str, *, may_control: bool) -> ClientPhase:
        raise NotImplementedError

    async def handle(self, tcp: trio.SocketStream) -> None:
        client_addr = peer_addr(tcp)
        full = self.client_arrived(client_addr)
        if full is not None:
            # At once, before the client's first packet, as a server does
            # when it cannot take a connection: a refused client holds
            # nothing here.
            phase = self.client_phase(tcp, client_addr, may_control=False)
            await send_and_close(tcp, phase.refusal(DialError(code=ErrorCode.RATE_LIMITED, message=full), None))
            return
        try:
            await self._handle(tcp, client_addr)
        finally:
            self.client_left()

    async def _handle(self, tcp: trio.SocketStream, client_addr: str) -> None:
        stranger = self.stranger(tcp.socket, client_addr)
        phase = self.client_phase(tcp, client_addr, may_control=stranger is None)
        ran, params = await self._step(phase, phase.run, "startup", trio.current_time() + STARTUP_TIMEOUT)
        if not ran:
            return
        if params is None:
            await phase.stream.aclose()
            return
        if stranger is None and self.client_cert_line is not None and not (
                isinstance(phase.stream, TLSStream) and phase.stream.getpeercert(binary_form=True)):
            # Without the certificate only its owner can read: told why in
            # its own protocol (a TLS alert would not say).
            stranger = (f"this Wicket gateway requires a TLS client certificate it issued; connect with "
                        f"{self.client_cert_line}")
            log.warning("local_user_refused resource=%s client=%s reason=%r", self.resource, client_addr,
                        "no client certificate")
        async with phase.stream:
            if stranger is not None:
                await self.refuse(phase, DialError(code=ErrorCode.ACCESS_DENIED, message=stranger), hint=None)
                return
            ran, needed = await self._step(phase, phase.until_needed, "client", float("inf"))
            if not (ran and needed):
                return
            dialed = await self.dial(phase, params)
            if dialed is not None:
                await phase.session(params, *dialed)

    async def _step(self, phase: ClientPhase, step, what: str, deadline: float) -> tuple[bool, Any]:
        """Run one of the phase's own steps (``run``, ``until_needed``) by
        ``deadline``: (True, what it returned), or (False, None) once the
        client left, was too slow (closed) or broke the protocol (told why,
        in its protocol, and closed)."""
        try:
            with trio.fail_at(deadline):
                return True, await step()
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
            await phase.stream.aclose()
        except ProtocolError as exc:
            log.info("%s_%s_rejected resource=%s client=%s error=%s", self.kind, what, self.resource,
                     phase.client_addr, exc)
            await phase.turn_away(exc, None)
        return False, None

    async def dial(self, phase: ClientPhase, params: Mapping[str, str]) -> tuple[MuxLink, Stream] | None:
        """A stream for a session with ``params``, accepted by the cluster;
        None once the client was turned away (or left)."""
        request = DialRequest(resource=self.resource, params=dict(params), client_addr=phase.client_addr)
        try:
            self.dialer.check_fresh()
            link, stream = await self.open_stream(request, phase.client_addr, phase.tcp.socket)
        except (ClientGone, ProfileError, ClusterError, trio.TooSlowError) as exc:
            await self._failed(phase, exc)
            return None
        if isinstance(stream.reply, DialError):
            await self.refuse(phase, stream.reply)
            self.dialer.release(link)
            return None
        return link, stream

    async def control(self, phase: ClientPhase, params: Mapping[str, str]) -> Mapping[str, str] | None:
        """A control dial (no session) with ``params``, for the client on
        ``phase``: the cluster's answer's parameters; None once the client
        was turned away (or left)."""
        client_addr = phase.client_addr
        request = DialRequest(resource=self.resource, params=dict(params), client_addr=client_addr)
        try:
            self.dialer.check_fresh()
            link = await self.on_link(lambda link: link, self.room.deadline(), client_addr,
                                      lambda: peer_left(phase.tcp.socket, eof=True))
            try:
                reply = await self.control_dial(link, request)
            except LinkClosed as exc:
                raise ClusterError("unreachable", f"the connection to the cluster failed ({exc})") from None
        except (ClientGone, ProfileError, ClusterError, trio.TooSlowError) as exc:
            await self._failed(phase, exc)
            return None
        if isinstance(reply, DialError):
            await self.refuse(phase, reply)
            return None
        return reply.params

    async def _failed(self, phase: ClientPhase, exc: Exception) -> None:
        """No answer from the cluster (``exc``): tell the client why, in its protocol."""
        if isinstance(exc, ClientGone):
            log.info("client_left resource=%s client=%s while=waiting_for_cluster", self.resource,
                     phase.client_addr)
        elif isinstance(exc, ProfileError):
            # The profile's message says what to run, with the cluster and user.
            await self.refuse(phase, DialError(code=ErrorCode.CERT_EXPIRED, message=str(exc)), hint=None)
        else:
            message = getattr(exc, "message", None) or "the Wicket cluster did not answer in time"
            # The cluster, not the resource, is what failed: the message says
            # what to do, with no hint about the resource.
            unreachable = getattr(exc, "code", "unreachable") == "unreachable" or getattr(exc, "passing", False)
            await self.refuse(phase, DialError(code=ErrorCode.UPSTREAM_UNREACHABLE, message=message),
                              hint=CLUSTER_HINT if unreachable else None)

    async def open_stream(self, request: DialRequest, client_addr: str, sock) -> tuple[MuxLink, Stream]:
        """A stream for ``request`` and the cluster's answer (in
        ``stream.reply``), on the connection to the cluster, waiting for one
        if need be; once more on a new connection if the first died before
        the cluster could have seen the OPEN. Raises ClusterError,
        ClientGone, ProfileError."""
        deadline, arrived = self.room.deadline(), time.monotonic()
        retried = False
        while True:
            given_back: list[str] = []  # the connection died before the cluster saw the OPEN: why

            def start(link: MuxLink) -> tuple[MuxLink, Stream]:
                return link, link.open(request, reply_timeout=DIAL_TIMEOUT, context=client_addr, arrived=arrived,
                                       retry=None if retried else lambda _s, _e, _f, why: given_back.append(why))

            # A client waits for its answer in silence: its FIN means it left.
            link, stream = await self.on_link(start, deadline, client_addr, lambda: peer_left(sock, eof=True))
            if await link.reply(stream) is not None:
                self.stats.answered(stream.dial_seconds)  # the agent's /metrics
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

    async def relay(self, phase: ClientPhase, link: MuxLink, stream: Stream, *, early: bytes = b"",
                    tap_in=None, client=None) -> tuple[RelayCounters, str | None, bool]:
        """Relay the client on ``stream`` until the session is over:
        ``early`` first (bytes of the gateway's own before the cluster's;
        ``phase.ahead`` goes the other way first),
        ``tap_in`` sees the cluster's bytes before the client does;
        ``client``: the stream to relay instead of the phase's (one end of
        a pair, when the kind watches the session in trio). Returns the
        counters, the session's error, and whether it ran at all."""
        counters = RelayCounters()
        try:
            if early:
                await phase.stream.send_all(early)
            if not link.bind(stream, client or phase.stream, counters, tap_in=tap_in, ahead=phase.ahead):
                return counters, stream.error, False
            error = await link.wait(stream)
            self.stats.ended(counters.a_to_b, counters.b_to_a)  # the agent's /metrics
            return counters, error, True
        except BaseException:
            link.cut(stream, "cancelled")
            raise
        finally:
            self.dialer.release(link)

    async def refuse(self, phase: ClientPhase, error: DialError, *, hint: str | None | object = BY_CODE) -> None:
        """Turn the client away with ``error`` in its own protocol and close;
        ``hint``: the next step (None: the message says it), by default the
        one for ``error.code``."""
        if hint is BY_CODE:
            hint = NEXT_STEP.get(error.code)
        self.log_refused(phase.client_addr, error, hint)
        await phase.turn_away(error, hint)


def local_tls(home, *, on: bool, client_cert: bool, alpn: tuple[str, ...] = ()):
    """``--local-tls`` / ``--local-tls-client-cert`` for a database route:
    (the server context or None, the local CA's path or None, the client
    certificate's and key's paths or None). ``client_cert`` implies TLS."""
    if not (on or client_cert):
        return None, None, None
    context, ca_path = local_server_context(home, alpn=alpn, client_certs=client_cert)
    return context, ca_path, ensure_local_client_cert(home) if client_cert else None


async def send_and_close(stream: trio.abc.HalfCloseableStream, data: bytes) -> None:
    """Send ``data``, then EOF, and close; a client that already left is no error."""
    try:
        await stream.send_all(data)
        await stream.send_eof()
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        await stream.aclose()

"""``wicket proxy db`` (or ``wicket proxy mongodb``): the gateway as a
MongoDB server on localhost.

Per client connection (gateway/local/dbroute.py runs the steps):

1. the driver's first message is its handshake, a ``hello`` (or a legacy
   ``isMaster`` in OP_QUERY); anything else is turned away with
   CommandNotSupported;
2. the gateway answers hellos itself, from the server's values (wire
   versions, limits, only compressors both ends have:
   protocols/mongodb/handshake.py), for as long as the client sends
   nothing else (:meth:`_MongoClient.until_needed`). A driver's monitoring
   connections only ever do: they cost no session upstream (no login on
   the server, no ``session.start``). The values come from the last
   session's accept, or from a hello probe (a control dial the cluster
   answers from one hello of its own, no login) when none are known or
   they are older than :data:`HELLO_MAX_AGE`: the first client of a
   ``wicket proxy`` costs a probe, not a session;
3. at the first other command the dial goes to the cluster with
   ``--db-user``/``--db-name`` when given (a MongoDB URI names no user the
   gateway would use: the cluster logs in as the db user, by default the
   Wicket user's own name); the cluster connects, logs in and answers with
   the server's hello values (``hello.*`` parameters of the accept, kept
   for the next connections);
4. that command's bytes, as the client sent them, go to the cluster first,
   then the relay engine carries every byte both ways. Every later
   command, later hellos included, is the cluster's to check, answer or
   pass on (gateway/cluster/mongodb_gate.py).

A client that insists on logging in (a connection string with a user and
password; its hello asks for ``saslSupportedMechs`` or sends
``speculativeAuthenticate``, or it just sends ``saslStart``) logs in here,
with SCRAM, against a local
credential made at each start and printed once in the URI ``wicket proxy``
shows (user ``wicket``), before any dial: a wrong credential costs no
session upstream. Any other credential gets AuthenticationFailed saying
to drop it.

A refused dial or probe (not allowed, login expired, server or cluster
down) does not close the connection, and its hellos are not refused:
a driver takes a hello's error or a closed connection as a server it
cannot select, retries in silence until its server selection times out
(30 s by default) and then prints something vague. The client's hellos
are answered as by a healthy server and every other command gets the
refusal as ``{ok: 0, errmsg, code, codeName}`` (Unauthorized 13,
AuthenticationFailed 18, HostUnreachable 6, ...), which drivers raise at
once as their own exception with the message and what to do, for as long
as the client stays (at most :data:`REFUSED_LINGER` seconds between
messages).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping
from typing import Any

import trio

from gateway.local.dbroute import STARTUP_TIMEOUT, ClientPhase, DatabaseRoute, local_tls as local_tls_setup
from gateway.local.dialer import MuxDialer
from gateway.local.localtls import ensure_local_client_pem
from gateway.local.mongo_client import tls_options
from gateway.local.profile import Profile
from gateway.local.proxy import Listening
from gateway.net.muxlink import MuxLink, Stream
from gateway.net.peercred import LocalUsers
from gateway.net.tls import TLSStream
from protocols.dial import DialAccept, DialError
from protocols.errors import ErrorCode, ProtocolError, RemoteProtocolError
from protocols.mongodb import (
    DEFAULT_HELLO, HELLO_PROBE, HandshakeReader, LocalLogin, MessageReader, OpCompressed, OpMsg, OpQuery,
    SessionBegins, client_hello, command_of, decompress, error_code_for, error_document, error_reply,
    gateway_hello, hello_from_params, max_message_size, reply_to,
)
from protocols.mongodb.commands import ERROR_CODES, HANDSHAKE_COMMANDS
from protocols.mongodb.scram import MECHANISMS
from protocols.mongodb.wire import HEADER, OP_QUERY
from protocols.signals import NEED_DATA, ConnectionClosed

log = logging.getLogger("wicket.proxy.mongodb")

READ = 65536
#: A refused connection's client may go this long between messages (and
#: send messages as large as the hello it was answered said).
REFUSED_LINGER = 60.0
#: The server's hello values are probed again when older than this (a
#: session's accept refreshes them too): a new connection's first hello,
#: and a long-lived one's hellos at most this often, may wait for a probe.
HELLO_MAX_AGE = 60.0
#: The user of the local credential (its password is made at each start).
LOCAL_USER = "wicket"
#: What the gateway reads as a login against the local credential (any
#: other way to log in, ``authenticate``, is told the same as a wrong one).
_LOGIN_STEPS = frozenset({"saslStart", "saslContinue", "authenticate"})


def _placeholder(data: bytes) -> OpMsg | OpQuery:
    """A request to reply to, from the header of a message not decoded
    here (the session's first): the reply's kind and responseTo are all
    a reply takes from it."""
    _, request_id, _, op_code = HEADER.unpack_from(data) if len(data) >= HEADER.size else (0, 0, 0, 0)
    if op_code == OP_QUERY:
        return OpQuery(request_id=request_id, collection="admin.$cmd", query={"hello": 1})
    return OpMsg(request_id=request_id, body={"hello": 1})


class MongoProxy(DatabaseRoute):
    kind = "mongodb"

    def __init__(self, profile: Profile, resource: str, *, tls_hint: str = "", **options) -> None:
        super().__init__(profile, resource, **options)
        #: With --local-tls: the URI options that make a client do TLS.
        self.tls_hint = tls_hint
        # The local credential for clients that insist on logging in: made
        # here, shown once at start (try_line), held only in memory.
        self.local_password = secrets.token_urlsafe(18)
        self._salt = secrets.token_bytes(16)
        #: The server's hello values from the last session's accept or
        #: probe, for hellos answered before a dial; None until one
        #: brought them, and when (trio's clock).
        self.upstream_hello: dict[str, Any] | None = None
        self.learnt_at = float("-inf")
        self._probing = trio.Lock()
        #: Probes done, and the last one's refusal (None if it was answered):
        #: connections that waited for a probe that was refused are told
        #: the same, not made to wait for one each in turn.
        self._probes = 0
        self._refused: tuple[DialError | ProtocolError, str | None] | None = None

    def local_login(self) -> LocalLogin:
        return LocalLogin(username=LOCAL_USER, password=self.local_password, salt=self._salt)

    def learn(self, params: Mapping[str, str]) -> dict[str, Any]:
        """The server's hello values in an accept's ``params``, kept for
        the next connections (without ``connectionId``: a hello answered
        here is no server connection's)."""
        hello = hello_from_params(params)
        self.upstream_hello = {k: v for k, v in hello.items() if k != "connectionId"}
        self.learnt_at = trio.current_time()
        return hello

    async def hello_values(self, phase: "_MongoClient") -> Mapping[str, Any] | None:
        """The server's hello values, probed through the cluster (a control
        dial: no session, no login on the server) when none are known or
        they are older than HELLO_MAX_AGE; one probe at a time, for every
        connection waiting. None when the probe was refused (the refusal
        in ``phase.held``, not yet told) or the client left."""
        probes = self._probes
        async with self._probing:
            if self.upstream_hello is not None and trio.current_time() - self.learnt_at < HELLO_MAX_AGE:
                return self.upstream_hello
            if self._probes != probes and self._refused is not None:
                phase.held = self._refused  # refused while this one waited
                return None
            phase.holding, phase.held = True, None
            try:
                params = await self.control(phase, {**phase.params, HELLO_PROBE: "hello"})
            finally:
                phase.holding = False
            if params is not None and "maxWireVersion" not in hello_from_params(params):
                phase.held = (DialError(code=ErrorCode.UPSTREAM_UNREACHABLE,
                                        message="the cluster did not say what the server is"), None)
                params = None
            self._probes += 1
            self._refused = phase.held
            if params is None:
                return None
            self.learn(params)
            log.info("mongodb_server_learnt resource=%s max_wire_version=%s", self.resource,
                     self.upstream_hello.get("maxWireVersion"))
            return self.upstream_hello

    def client_phase(self, tcp: trio.SocketStream, client_addr: str, *, may_control: bool) -> "_MongoClient":
        return _MongoClient(self, tcp, client_addr, may_control=may_control)


class _MongoClient(ClientPhase):
    """One client connection: its hellos and login, its refusals, its session."""

    route: MongoProxy

    def __init__(self, route: MongoProxy, tcp: trio.SocketStream, client_addr: str, *,
                 may_control: bool) -> None:
        super().__init__(route, tcp, client_addr, may_control=may_control)
        self.reader = HandshakeReader(HANDSHAKE_COMMANDS | _LOGIN_STEPS)
        #: The client's first hello until it is answered.
        self.first: OpMsg | OpQuery | None = None
        self.hello = None  # what the first hello asked for (a ClientHello)
        self.answered = 0  # hellos answered here
        #: A login against the local credential under way, and when it must end.
        self.login: LocalLogin | None = None
        self.login_deadline = float("inf")
        self.login_failed = False
        #: The dial's parameters (``run``'s), a probe's too.
        self.params: dict[str, str] = {}
        #: While a probe is under way a refusal is held (``held``: the
        #: error and hint), to be told outside the route's probe lock.
        self.holding = False
        self.held: tuple[DialError | ProtocolError, str | None] | None = None
        #: When this connection last made sure its hello values are fresh.
        self.checked_at = float("-inf")

    async def _next(self) -> OpMsg | OpQuery | SessionBegins | None:
        """The client's next handshake message (:class:`SessionBegins` at
        the session's first), None once it left. Between messages the
        client may take its time, as a driver's monitor does between
        heartbeats; a message once begun, and a login once begun, must
        be done within STARTUP_TIMEOUT."""
        while True:
            event = self.reader.next_event()
            if event is NEED_DATA:
                deadline = self.login_deadline
                if self.reader.pending:
                    deadline = min(deadline, trio.current_time() + STARTUP_TIMEOUT)
                with trio.fail_at(deadline):
                    data = await self.stream.receive_some(READ)
                self.reader.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                return None
            if isinstance(event, (OpMsg, OpQuery, SessionBegins)):
                return event
            return SessionBegins()  # PAUSED: the session began before

    async def _start_tls(self) -> bool:
        """``--local-tls``: TLS from the client's first byte (MongoDB has no
        in-band upgrade). A plaintext client's hello is answered, in plain,
        with what to add to its URI; False when there is no TLS session."""
        received = b""
        while len(received) < 3:
            data = await self.tcp.receive_some(READ)
            if not data:
                return False
            received += data
        # A TLS handshake record: 0x16, then the record version 3.1 or 3.3.
        # A MongoDB message starting so would be 66 KiB long: no hello is.
        if received[:3] not in (b"\x16\x03\x01", b"\x16\x03\x03"):
            log.warning("local_tls_refused resource=%s client=%s reason=%r", self.route.resource,
                        self.client_addr, "a plaintext client")
            self.reader.receive_data(received)
            first = await self._next()
            if first is not None:
                request = _placeholder(self.reader.stop()) if isinstance(first, SessionBegins) else first
                await self.stream.send_all(error_reply(request, (
                    f"this Wicket gateway requires TLS (wicket proxy --local-tls): add "
                    f"{self.route.tls_hint} to the connection string"), "SSLHandshakeFailed").encode())
            return False
        self.stream = TLSStream(self.tcp, self.route.tls_context, server_side=True, received=received)
        try:
            await self.stream.do_handshake()
        except trio.BrokenResourceError as exc:
            log.warning("local_tls_failed resource=%s client=%s error=%s", self.route.resource, self.client_addr,
                        exc.__cause__ or exc)
            return False
        return True

    async def run(self) -> dict[str, str] | None:
        if self.route.tls_context is not None and not await self._start_tls():
            return None
        first = await self._next()
        if first is None:
            return None
        if isinstance(first, SessionBegins):
            self.ahead = self.reader.stop()
            raise RemoteProtocolError("the first command must be hello (a driver's handshake)",
                                      code=ErrorCode.BAD_REQUEST, wire_hint=ERROR_CODES["CommandNotSupported"])
        self.first = first  # (a refusal answers it)
        self.hello = client_hello(command_of(first))  # CommandNotSupported if a login step
        params: dict[str, str] = {}
        if self.route.db_user:
            params["db_user"] = self.route.db_user
        if self.route.db_name:
            params["db_name"] = self.route.db_name
        self.params = params
        return params

    async def until_needed(self) -> bool:
        """Hellos (and a local login) answered here until the session's
        first command, from the server's values (probed if need be: a
        refused probe is told as a refused dial is)."""
        upstream = await self._fresh(None)
        if upstream is None:
            if self.held is not None:
                await self.turn_away(*self.held)
            return False
        needed = await self._handshake(upstream)
        if not needed and not self.login_failed:
            log.info("mongodb_client_left resource=%s client=%s hellos=%d session=none", self.route.resource,
                     self.client_addr, self.answered)
        return needed

    async def _fresh(self, known: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """The hello values to answer with: ``known`` if this connection
        made sure of them less than HELLO_MAX_AGE ago, else the route's
        (probed if stale). On a connection that has values, a refused
        refresh keeps them (and is not told: the driver hears it at its
        first command, from the dial); without, None (``held`` says why)."""
        now = trio.current_time()
        if known is not None and now - self.checked_at < HELLO_MAX_AGE:
            return known
        self.checked_at = now
        values = await self.route.hello_values(self)
        if values is None and known is not None:
            self.held = None
            return known
        return values

    async def turn_away(self, error: DialError | ProtocolError, hint: str | None) -> None:
        if self.holding:  # told once the probe lock is let go (until_needed)
            self.held = (error, hint)
            return
        await self._turn_away(error, hint)

    async def _handshake(self, upstream: Mapping[str, Any]) -> bool:
        """Answer the client's hellos (from ``upstream``, refreshed when
        stale) and its login against the local credential, the first hello
        first, until the session's first command (its bytes in ``ahead``).
        False once the client left or failed its login (it was told why)."""
        message: OpMsg | OpQuery | SessionBegins | None = self.first
        self.first = None
        while True:
            if message is None:
                return False
            if isinstance(message, SessionBegins):
                self.ahead = self.reader.stop()
                if self.login is not None and not self.login.done:
                    await self._login_refused(_placeholder(self.ahead), error_document(
                        "log in first: the connection string names a user, so the driver must log in "
                        "before its first command", "AuthenticationFailed"))
                    return False
                return True
            body = command_of(message)
            if next(iter(body), None) in HANDSHAKE_COMMANDS:
                if self.login is None and client_hello(body).wants_auth:
                    self._begin_login()
                upstream = await self._fresh(upstream) or upstream
                if not (isinstance(message, OpMsg) and message.more_to_come):
                    await self.stream.send_all(self._hello_reply(message, upstream))
                self.answered += 1
            else:  # a login step (the reader takes them until a login is done)
                if self.login is None:  # a tool that logs in without saying so in its hello
                    self._begin_login()
                answer = self.login.answer(body)
                if not answer.get("ok"):
                    await self._login_refused(message, answer)
                    return False
                await self.stream.send_all(reply_to(message, answer).encode())
                if self.login.done:
                    self.reader.handled = HANDSHAKE_COMMANDS
                    self.login_deadline = float("inf")
            message = await self._next()

    def _begin_login(self) -> None:
        self.login = self.route.local_login()
        self.reader.handled = HANDSHAKE_COMMANDS | _LOGIN_STEPS
        self.login_deadline = trio.current_time() + STARTUP_TIMEOUT

    async def _login_refused(self, request: OpMsg | OpQuery, answer: dict[str, Any]) -> None:
        answer["errmsg"] = (
            f"{answer['errmsg']} This proxy needs no credentials: remove the user name and password "
            f"from the connection string, or use the local login `wicket proxy` printed at start "
            f"(user {LOCAL_USER!r})")
        self.login_failed = True
        log.info("mongodb_local_login_failed resource=%s client=%s", self.route.resource, self.client_addr)
        await self.stream.send_all(reply_to(request, answer).encode())

    def refusal(self, error: DialError | ProtocolError, hint: str | None) -> bytes:
        message = error.message + (f"; {hint}" if hint else "")
        if isinstance(error, ProtocolError):
            code = error.wire_hint if isinstance(error.wire_hint, int) else 17
        else:
            code = error_code_for(error.code)
        request = self.first or _placeholder(self.ahead)
        return error_reply(request, message, code).encode()

    async def _turn_away(self, error: DialError | ProtocolError, hint: str | None) -> None:
        """A refused dial: answer the client's commands with the refusal
        while it stays (see the module docstring), then close. A client
        that broke the protocol hears why, and is closed."""
        try:
            if isinstance(error, DialError):
                await self.answer_refused(error, hint)
            else:
                await self.stream.send_all(self.refusal(error, hint))
        except (trio.BrokenResourceError, trio.ClosedResourceError, ProtocolError, trio.TooSlowError):
            pass
        finally:
            await self.stream.aclose()

    def _hello_reply(self, request: OpMsg | OpQuery, upstream: Mapping) -> bytes:
        body_in = command_of(request)
        body = gateway_hello(upstream, client_hello(body_in), compressors=upstream.get("compression", ()))
        if body_in.get("saslSupportedMechs") == f"admin.{LOCAL_USER}":
            body["saslSupportedMechs"] = list(MECHANISMS)  # the local credential's
        return reply_to(request, body).encode()

    async def session(self, params, link: MuxLink, stream: Stream) -> None:
        route, client_addr = self.route, self.client_addr
        accept = stream.reply
        assert isinstance(accept, DialAccept)
        route.learn(accept.params)
        log.info("mongodb_session_start resource=%s client=%s session=%s app=%r hellos_before=%d", route.resource,
                 client_addr, accept.session_id, self.hello.application if self.hello else None, self.answered)
        counters, error, _ran = await route.relay(self, link, stream)
        log.info("mongodb_session_end resource=%s client=%s session=%s sent=%d received=%d%s", route.resource,
                 client_addr, accept.session_id, counters.a_to_b, counters.b_to_a,
                 f" error={error!r}" if error else "")

    async def answer_refused(self, error: DialError, hint: str | None) -> None:
        """Hellos answered, every other command refused with ``error``,
        until the client leaves or is silent for REFUSED_LINGER seconds."""
        refusal = error.message + (f"; {hint}" if hint else "")
        code = error_code_for(error.code)
        upstream = self.route.upstream_hello or DEFAULT_HELLO
        limit = max_message_size(upstream)  # what the hellos it is answered say
        message: OpMsg | OpQuery | SessionBegins | None = self.first
        self.first = None
        self.reader.handled = HANDSHAKE_COMMANDS  # a login is refused with the rest
        if message is None and self.reader.begun:
            message = SessionBegins()  # the command that dialled (in ``ahead``)
        while isinstance(message, (OpMsg, OpQuery)):  # hellos, until the first other command
            if not (isinstance(message, OpMsg) and message.more_to_come):
                await self.stream.send_all(self._hello_reply(message, upstream))
            with trio.fail_after(REFUSED_LINGER):
                message = await self._next()
        if message is None:
            return
        reader = MessageReader(max_message_size=limit, verify_checksums=False)
        reader.receive_data(self.reader.stop())
        while True:
            with trio.fail_after(REFUSED_LINGER):
                while (event := reader.next_event()) is NEED_DATA:
                    reader.receive_data(await self.stream.receive_some(READ))
            if isinstance(event, ConnectionClosed):
                return
            if isinstance(event, OpCompressed):  # the hello offered a compressor both ends have
                event = decompress(event, max_message_size=limit)
            if not isinstance(event, (OpMsg, OpQuery)):
                raise ProtocolError(f"a client sent {type(event).__name__}, which is not a command",
                                    code=ErrorCode.BAD_REQUEST, wire_hint=17)
            if next(iter(command_of(event)), None) in HANDSHAKE_COMMANDS:
                answer = self._hello_reply(event, upstream)
            else:
                answer = error_reply(event, refusal, code).encode()
            if not (isinstance(event, OpMsg) and event.more_to_come):
                await self.stream.send_all(answer)


def mongodb_route(profile: Profile, resource: str, identity, *, wait_for_cluster: float,
                  local_users: LocalUsers | None = None, db_user: str | None = None,
                  db_name: str | None = None, local_tls: bool = False,
                  local_tls_client_cert: bool = False, dialer: MuxDialer | None = None) -> Listening:
    """The mongodb kind's local route (gateway/kinds.py)."""
    tls_context, ca_path, client_cert = local_tls_setup(profile.home, on=local_tls, client_cert=local_tls_client_cert)
    options = tls_options(ca_path if tls_context is not None else None,
                          ensure_local_client_pem(profile.home) if client_cert is not None else None)
    tls_query = "&" + options if options else ""
    proxy = MongoProxy(profile, resource, db_user=db_user, db_name=db_name, wait_for_cluster=wait_for_cluster,
                       local_users=local_users, dialer=dialer, tls_context=tls_context, tls_hint=options,
                       client_cert_line=options if client_cert is not None else None)

    def try_line(host: str, port: int) -> str:
        # One URI for every tool: drivers and shells need no credentials, and
        # tools that insist on a login get the local one (good while this
        # proxy runs; only the owner's local uid may connect anyway).
        return (f'Try: mongosh "mongodb://{LOCAL_USER}:{proxy.local_password}@{host}:{port}/'
                f'{db_name or ""}?directConnection=true&authSource=admin{tls_query}"  (the user and password are '
                f'optional: a local login for tools that insist on one)')

    return Listening(handler=proxy.handle, dialer=proxy.dialer, try_line=try_line, route=proxy)

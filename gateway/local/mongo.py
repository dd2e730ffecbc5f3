"""``wicket proxy db`` (or ``wicket proxy mongodb``): the gateway as a
MongoDB server on localhost.

Per client connection (gateway/local/dbroute.py runs the steps):

1. the driver's first message is its handshake, a ``hello`` (or a legacy
   ``isMaster`` in OP_QUERY); anything else is turned away with
   CommandNotSupported;
2. the dial goes to the cluster with ``--db-user``/``--db-name`` when given
   (a MongoDB URI names no user the gateway would use: the cluster logs
   in as the db user, by default the Wicket user's own name); the cluster
   connects, logs in and answers with the server's hello values
   (``hello.*`` parameters of the accept);
3. the gateway answers the hello itself from them (one server, the
   server's limits and wire versions, only compressors both ends have:
   protocols/mongodb/handshake.py), then the relay engine carries every
   byte both ways. Every later command, later hellos included, is the
   cluster's to check, answer or pass on (gateway/cluster/mongodb_gate.py).

A client that insists on logging in (a connection string with a user and
password; its hello asks for ``saslSupportedMechs`` or sends
``speculativeAuthenticate``) logs in here, with SCRAM, against a local
credential made at each start and printed once in the URI ``wicket proxy``
shows (user ``wicket``); any other credential gets AuthenticationFailed
saying to drop it. The session starts once it has.

A refused dial (not allowed, login expired, server or cluster down) does
not close the connection: a driver would only retry until its server
selection timed out and then print something vague. The client's hellos
are answered as by a healthy server and every other command gets the
refusal as ``{ok: 0, errmsg, code, codeName}`` (Unauthorized 13,
AuthenticationFailed 18, HostUnreachable 6, ...), which drivers raise as
their own exception with the message and what to do, for as long as the
client stays (at most :data:`REFUSED_LINGER` seconds between messages).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Mapping

import trio

from gateway.local.dbroute import STARTUP_TIMEOUT, ClientPhase, DatabaseRoute, local_tls as local_tls_setup
from gateway.local.dialer import MuxDialer
from gateway.local.localtls import ensure_local_client_pem
from gateway.local.profile import Profile
from gateway.local.proxy import Listening
from gateway.net.muxlink import MuxLink, Stream
from gateway.net.peercred import LocalUsers
from gateway.net.tls import TLSStream
from protocols.dial import DialAccept, DialError
from protocols.errors import ErrorCode, ProtocolError, RemoteProtocolError
from protocols.mongodb import (
    DEFAULT_HELLO, ClientHello, LocalLogin, MessageReader, OpMsg, OpQuery, client_hello, error_code_for,
    error_document, error_reply, gateway_hello, hello_from_params, reply_to,
)
from protocols.mongodb.commands import HANDSHAKE_COMMANDS
from protocols.mongodb.scram import MECHANISMS
from protocols.signals import NEED_DATA, ConnectionClosed

log = logging.getLogger("wicket.proxy.mongodb")

READ = 65536
#: The largest first message (a hello is a few hundred bytes).
MAX_HELLO = 1024 * 1024
#: A refused connection's client may send this large a message (one
#: document and its command) and go this long between messages.
MAX_REFUSED_MESSAGE = 16 * 1024 * 1024 + 64 * 1024
REFUSED_LINGER = 60.0
#: The user of the local credential (its password is made at each start).
LOCAL_USER = "wicket"


def _body(message: OpMsg | OpQuery) -> Mapping:
    if isinstance(message, OpMsg):
        return message.body
    query = message.query
    inner = query.get("$query")
    return inner if isinstance(inner, Mapping) else query


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

    def local_login(self) -> LocalLogin:
        return LocalLogin(username=LOCAL_USER, password=self.local_password, salt=self._salt)

    def client_phase(self, tcp: trio.SocketStream, client_addr: str, *, may_control: bool) -> "_MongoClient":
        return _MongoClient(self, tcp, client_addr, may_control=may_control)

class _MongoClient(ClientPhase):
    """One client connection: its hello, its refusals, its session."""

    route: MongoProxy

    def __init__(self, route: MongoProxy, tcp: trio.SocketStream, client_addr: str, *,
                 may_control: bool) -> None:
        super().__init__(route, tcp, client_addr, may_control=may_control)
        self.reader = MessageReader(max_message_size=MAX_HELLO, verify_checksums=False)
        self.first: OpMsg | OpQuery | None = None
        self.hello: ClientHello | None = None

    async def _next(self, reader: MessageReader) -> OpMsg | OpQuery | None:
        """The client's next message; None once it has left."""
        while True:
            event = reader.next_event()
            if event is NEED_DATA:
                reader.receive_data(await self.stream.receive_some(READ))
                continue
            if isinstance(event, ConnectionClosed):
                return None
            if isinstance(event, (OpMsg, OpQuery)):
                return event
            raise RemoteProtocolError(f"a client sent {type(event).__name__}, which is not a command",
                                      code=ErrorCode.BAD_REQUEST, wire_hint=17)

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
            first = await self._next(self.reader)
            if first is not None:
                await self.stream.send_all(error_reply(first, (
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
        first = await self._next(self.reader)
        if first is None:
            return None
        self.first = first
        self.hello = client_hello(_body(first))  # CommandNotSupported if not a hello
        params: dict[str, str] = {}
        if self.route.db_user:
            params["db_user"] = self.route.db_user
        if self.route.db_name:
            params["db_name"] = self.route.db_name
        return params

    def refusal(self, error: DialError | ProtocolError, hint: str | None) -> bytes:
        message = error.message + (f"; {hint}" if hint else "")
        if isinstance(error, ProtocolError):
            code = error.wire_hint if isinstance(error.wire_hint, int) else 17
        else:
            code = error_code_for(error.code)
        request = self.first or OpMsg(request_id=0, body={"hello": 1})
        return error_reply(request, message, code).encode()

    async def turn_away(self, error: DialError | ProtocolError, hint: str | None) -> None:
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
        body_in = _body(request)
        hello = client_hello(body_in)
        connection = upstream.get("connectionId")
        body = gateway_hello(upstream, hello, connection_id=connection if isinstance(connection, int) else None,
                             compressors=upstream.get("compression", ()))
        if body_in.get("saslSupportedMechs") == f"admin.{LOCAL_USER}":
            body["saslSupportedMechs"] = list(MECHANISMS)  # the local credential's
        return reply_to(request, body).encode()

    async def session(self, params, link: MuxLink, stream: Stream) -> None:
        route, client_addr = self.route, self.client_addr
        accept = stream.reply
        assert isinstance(accept, DialAccept) and self.first is not None
        upstream = hello_from_params(accept.params)
        early = self._hello_reply(self.first, upstream)
        if self.hello is not None and self.hello.wants_auth:
            # The client will log in: with the local credential it may.
            try:
                await self.stream.send_all(early)
                with trio.fail_after(STARTUP_TIMEOUT):
                    logged_in = await self._local_login(upstream)
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, ProtocolError):
                logged_in = False
            if not logged_in:
                link.cut(stream, "the client's local login failed")
                route.dialer.release(link)
                return
            early = b""
        log.info("mongodb_session_start resource=%s client=%s session=%s app=%r", route.resource, client_addr,
                 accept.session_id, self.hello.application if self.hello else None)
        counters, error, _ran = await route.relay(self, link, stream, early=early)
        log.info("mongodb_session_end resource=%s client=%s session=%s sent=%d received=%d%s", route.resource,
                 client_addr, accept.session_id, counters.a_to_b, counters.b_to_a,
                 f" error={error!r}" if error else "")

    async def _local_login(self, upstream: Mapping) -> bool:
        """The client's SCRAM login against the local credential; True once
        it has logged in (the session then starts), False once it failed
        (it was told, and what to do)."""
        login = self.route.local_login()
        while not login.done:
            message = await self._next(self.reader)
            if message is None:
                return False
            body = _body(message)
            name = next(iter(body), None)
            if name in HANDSHAKE_COMMANDS:
                await self.stream.send_all(self._hello_reply(message, upstream))
                continue
            if name in ("saslStart", "saslContinue"):
                answer = login.answer(body)
            else:
                answer = error_document(
                    f"log in first: the connection string names a user, so the driver must log in "
                    f"before {str(name)[:64]!r}", "AuthenticationFailed")
            if not answer.get("ok"):
                answer["errmsg"] = (
                    f"{answer['errmsg']} This proxy needs no credentials: remove the user name and password "
                    f"from the connection string, or use the local login `wicket proxy` printed at start "
                    f"(user {LOCAL_USER!r})")
                log.info("mongodb_local_login_failed resource=%s client=%s", self.route.resource,
                         self.client_addr)
            await self.stream.send_all(reply_to(message, answer).encode())
            if not answer.get("ok"):
                return False
        return True

    async def answer_refused(self, error: DialError, hint: str | None) -> None:
        """Hellos answered, every other command refused with ``error``,
        until the client leaves or is silent for REFUSED_LINGER seconds."""
        refusal = error.message + (f"; {hint}" if hint else "")
        code = error_code_for(error.code)
        reader = MessageReader(max_message_size=MAX_REFUSED_MESSAGE, verify_checksums=False)
        message = self.first
        while message is not None:
            if next(iter(_body(message)), None) in HANDSHAKE_COMMANDS:
                answer = self._hello_reply(message, DEFAULT_HELLO)
            else:
                answer = error_reply(message, refusal, code).encode()
            if not (isinstance(message, OpMsg) and message.more_to_come):
                await self.stream.send_all(answer)
            with trio.fail_after(REFUSED_LINGER):
                message = await self._next(reader)


def mongodb_route(profile: Profile, resource: str, identity, *, wait_for_cluster: float,
                  local_users: LocalUsers | None = None, db_user: str | None = None,
                  db_name: str | None = None, local_tls: bool = False,
                  local_tls_client_cert: bool = False, dialer: MuxDialer | None = None) -> Listening:
    """The mongodb kind's local route (gateway/kinds.py)."""
    tls_context, ca_path, client_cert = local_tls_setup(profile.home, on=local_tls, client_cert=local_tls_client_cert)
    tls_query = f"&tls=true&tlsCAFile={ca_path}" if tls_context is not None else ""
    if client_cert is not None:
        tls_query += f"&tlsCertificateKeyFile={ensure_local_client_pem(profile.home)}"
    proxy = MongoProxy(profile, resource, db_user=db_user, db_name=db_name, wait_for_cluster=wait_for_cluster,
                       local_users=local_users, dialer=dialer, tls_context=tls_context, tls_hint=tls_query.lstrip("&"),
                       client_cert_line=tls_query.lstrip("&") if client_cert is not None else None)

    def try_line(host: str, port: int) -> str:
        # One URI for every tool: drivers and shells need no credentials, and
        # tools that insist on a login get the local one (good while this
        # proxy runs; only the owner's local uid may connect anyway).
        return (f'Try: mongosh "mongodb://{LOCAL_USER}:{proxy.local_password}@{host}:{port}/'
                f'{db_name or ""}?directConnection=true&authSource=admin{tls_query}"  (the user and password are '
                f'optional: a local login for tools that insist on one)')

    return Listening(handler=proxy.handle, dialer=proxy.dialer, try_line=try_line, route=proxy)

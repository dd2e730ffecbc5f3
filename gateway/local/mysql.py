"""``wicket proxy db`` for MySQL and MariaDB: the gateway as the server on localhost.

Per client connection (on gateway/local/dbroute.py's :class:`DatabaseRoute`):

1. the connection phase is ours (protocols/mysql's :class:`GatewayHandshake`):
   the greeting carries the **upstream's** version string, capabilities,
   character set and status, learnt from the cluster and kept per resource
   (a probe, a control dial, before the first client; every session's
   accept refreshes them), so GUI tools and ORMs see the server they talk
   to. With ``--local-tls`` the greeting offers TLS and an SSLRequest gets
   it, with the gateway's local CA; without, CLIENT_SSL is not offered and
   clients that prefer TLS (PyMySQL, MySQL 8's) go on without it. Whatever
   auth plugin the client starts with, any password or none is taken
   (identity comes from the session certificate);
2. the client's user, database, capabilities, character set and connection
   attributes become the dial's parameters; the cluster logs in upstream
   with them (RBAC decided on the db user and database), so the command
   phase that follows is relayed byte for byte, both ends agreeing;
3. the cluster's accept says how the login went: the server's OK goes to
   the client with this connection's sequence ids (as caching_sha2's fast
   auth success first, if the client asked for it), or the server's own
   ERR, verbatim; a refusal of the dial becomes an ERR with a fitting
   error number and SQLSTATE and what to do next, which every client
   prints (1045/28000 access denied, 1044 a database the role does not
   allow, 1429 a server or cluster that cannot be reached).

The connection id in the greeting is 0: the gateway greets before the
server has a connection for the client, and an id that might be another
session's would let ``mysql``'s Ctrl-C (``KILL QUERY <id>``) stop the wrong
query; ``SELECT CONNECTION_ID()`` gives the real one.
"""

from __future__ import annotations

import logging
from typing import Mapping

import trio

from gateway.local.dbroute import ClientPhase, DatabaseRoute, local_tls as local_tls_setup
from gateway.local.dialer import MuxDialer
from gateway.local.profile import Profile
from gateway.local.proxy import Listening
from gateway.net.muxlink import MuxLink, Stream
from gateway.net.peercred import LocalUsers
from gateway.net.tls import TLSStream
from protocols.dial import DialError
from protocols.errors import ErrorCode, ProtocolError, RemoteProtocolError
from protocols.mysql import (
    DEFAULT_CLIENT_CAPABILITIES, NEED_DATA, Capability, ClientLogin, ConnectionClosed, ErrPacket,
    GatewayHandshake, OkPacket, ServerInfo, StartTLS, advertised, err_for, encode_packets,
)
from protocols.mysql import dialparams as dp
from protocols.mysql.constants import ErrorNumber

log = logging.getLogger("wicket.proxy.mysql")

READ = 65536
#: The greeting of a client about to be refused before the server was reached.
REFUSING = ServerInfo(server_version="5.5.5-10.0.0-Wicket-no-server-reached",
                      capabilities=advertised(DEFAULT_CLIENT_CAPABILITIES, tls=False))


class MySqlProxy(DatabaseRoute):
    kind = "mysql"

    def __init__(self, profile: Profile, resource: str, **options) -> None:
        super().__init__(profile, resource, **options)
        #: The upstream's handshake values (None until a probe or a session told us).
        self.server: ServerInfo | None = None
        self._probing = trio.Lock()

    def client_phase(self, tcp: trio.SocketStream, client_addr: str, *, may_control: bool) -> _MySqlClient:
        return _MySqlClient(self, tcp, client_addr, may_control=may_control)

    def learn(self, params: Mapping[str, str]) -> None:
        info = dp.server_info_of(params)
        if info is not None:
            self.server = info

    async def server_info(self, phase: ClientPhase) -> ServerInfo | None:
        """The upstream's handshake values, probed through the cluster the
        first time; None once the client was turned away."""
        async with self._probing:
            if self.server is None:
                params = await self.control(phase, {dp.PROBE: "handshake"})
                if params is None:
                    return None
                self.learn(params)
                if self.server is None:
                    await self.refuse(phase, DialError(code=ErrorCode.UPSTREAM_UNREACHABLE,
                                                       message="the cluster did not say what the server is"))
                    return None
                log.info("mysql_server_learnt resource=%s version=%s", self.resource, self.server.server_version)
            return self.server


class _MySqlClient(ClientPhase):
    """One client connection: its handshake, its refusals, its session."""

    route: MySqlProxy

    def __init__(self, route: MySqlProxy, tcp: trio.SocketStream, client_addr: str, *,
                 may_control: bool) -> None:
        super().__init__(route, tcp, client_addr, may_control=may_control)
        self.hs: GatewayHandshake | None = None
        self.login: ClientLogin | None = None

    def refusal(self, error: DialError | ProtocolError, hint: str | None) -> bytes:
        message = getattr(error, "message", None) or str(error)
        if hint:
            message = f"{message}; {hint}"
        if isinstance(error, DialError):
            packet = err_for(RemoteProtocolError(message, code=error.code))
        else:
            packet = err_for(error)
            packet = ErrPacket(errno=packet.errno, sqlstate=packet.sqlstate, message=message)
        if self.hs is None:  # no greeting: the server's first packet may be an ERR
            return encode_packets(packet.encode(), 0)[0]
        return self.hs.refuse(packet)

    async def turn_away(self, error: DialError | ProtocolError, hint: str | None) -> None:
        """A client refused before its greeting (the probe failed, another
        local user) hears the ERR after its handshake response: clients
        that wanted TLS (MariaDB 10.11's mysql) distrust an ERR in place
        of the greeting and print a TLS error instead. The greeting then
        cannot be the server's: it says so in its version string."""
        if self.hs is None and not isinstance(error, ProtocolError):
            self.hs = GatewayHandshake(REFUSING, connection_id=0, tls=self.route.tls_context is not None)
            try:
                if isinstance(await self._converse(), ConnectionClosed):
                    await self.stream.aclose()
                    return
            except (ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # it hears the ERR anyway, as soon as it reads
        await super().turn_away(error, hint)

    async def run(self) -> dict[str, str] | None:
        route = self.route
        if not self.may_control:
            return {}  # another local user: DatabaseRoute turns it away, in an ERR
        server = await route.server_info(self)
        if server is None:
            return None
        self.hs = GatewayHandshake(server, connection_id=0, tls=route.tls_context is not None)
        event = await self._converse()
        if isinstance(event, ClientLogin):
            self.login = event
            return self._params(event)
        return None

    async def _converse(self) -> ClientLogin | ConnectionClosed:
        """The handshake with the client, TLS included, up to its login (or its leaving)."""
        hs = self.hs
        while True:
            out = hs.data_to_send()
            if out:
                await self.stream.send_all(out)
            event = hs.next_event()
            out = hs.data_to_send()
            if out:
                await self.stream.send_all(out)
            if event is NEED_DATA:
                hs.receive_data(await self.stream.receive_some(READ))
            elif isinstance(event, StartTLS):
                self.stream = TLSStream(self.tcp, self.route.tls_context, server_side=True, received=hs.start_tls())
                await self.stream.do_handshake()
            else:
                return event

    def _params(self, login: ClientLogin) -> dict[str, str]:
        route = self.route
        params = {"db_user": route.db_user or login.username,
                  dp.CAPS: str(login.capabilities.value), dp.CHARSET: str(login.charset),
                  dp.MAX_PACKET: str(login.max_packet_size)}
        db_name = route.db_name or login.database
        if db_name:
            params["db_name"] = db_name
        for key, value in list(login.attributes.items())[:dp.MAX_ATTRIBUTES]:
            # What does not fit the dial's limits is left out (the audit
            # only loses a detail).
            if key and len(dp.ATTR_PREFIX + key) <= 64 and len(value) <= 1024:
                params[dp.ATTR_PREFIX + key] = value
        return params

    async def session(self, params: Mapping[str, str], link: MuxLink, stream: Stream) -> None:
        route, client_addr, hs = self.route, self.client_addr, self.hs
        reply = stream.reply.params
        route.learn(reply)
        session_id = stream.reply.session_id
        if dp.OK not in reply:
            error = ErrPacket.decode(bytes.fromhex(reply[dp.ERR])) if dp.ERR in reply else ErrPacket.of(
                ErrorNumber.ER_HANDSHAKE_ERROR, "the cluster did not say how the login went")
            log.info("mysql_login_refused resource=%s client=%s db_user=%s errno=%s message=%r", route.resource,
                     client_addr, params["db_user"], error.errno, error.message)
            link.cut(stream, "the server refused the login")
            route.dialer.release(link)
            try:
                await self.stream.send_all(hs.refuse(error))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            return
        caps = Capability(int(params[dp.CAPS]))
        early = hs.accept(OkPacket.decode(bytes.fromhex(reply[dp.OK]), caps))
        trailing, _eof = hs.trailing_data
        if trailing:
            link.cut(stream, "the client sent commands before its login was answered")
            route.dialer.release(link)
            return
        log.info("mysql_session_start resource=%s client=%s db_user=%s db_name=%s session=%s", route.resource,
                 client_addr, params["db_user"], params.get("db_name"), session_id)
        # Byte for byte from here: the cluster answers what the roles do not
        # allow (a USE, a COM_CHANGE_USER) itself (gateway/cluster/mysql.py).
        counters, error, _ran = await route.relay(self, link, stream, early=early)
        log.info("mysql_session_end resource=%s client=%s session=%s sent=%d received=%d%s", route.resource,
                 client_addr, session_id, counters.a_to_b, counters.b_to_a, f" error={error!r}" if error else "")


def mysql_route(profile: Profile, resource: str, identity, *, wait_for_cluster: float,
                local_users: LocalUsers | None = None, db_user: str | None = None,
                db_name: str | None = None, local_tls: bool = False,
                local_tls_client_cert: bool = False, dialer: MuxDialer | None = None) -> Listening:
    """The mysql kind's local route (gateway/kinds.py)."""
    tls_context, ca_path, client_cert = local_tls_setup(profile.home, on=local_tls, client_cert=local_tls_client_cert)
    tls_line = f"--ssl-ca={ca_path} --ssl-verify-server-cert" if tls_context is not None else ""
    if client_cert is not None:
        tls_line += f" --ssl-cert={client_cert[0]} --ssl-key={client_cert[1]}"
    proxy = MySqlProxy(profile, resource, db_user=db_user, db_name=db_name, tls_context=tls_context,
                       wait_for_cluster=wait_for_cluster, local_users=local_users, dialer=dialer,
                       client_cert_line=tls_line if local_tls_client_cert else None)

    def try_line(host: str, port: int) -> str:
        where = f"--socket={host}" if host.startswith("/") else f"-h {host} -P {port}"
        line = f"Try: mysql {where} -u {db_user or identity.user}"
        if db_name:
            line += f" {db_name}"
        return f"{line} {tls_line}".rstrip()

    # A unix socket is named by its own path (mysql --socket=PATH).
    return Listening(handler=proxy.handle, dialer=proxy.dialer, try_line=try_line, route=proxy)

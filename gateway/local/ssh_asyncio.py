"""The fence around asyncssh: the gateway's SSH server on localhost and its
SSH client to the node, bridged channel by channel.

Every function and method here says which world it lives in: **(asyncio)**
runs on the trio-asyncio loop as asyncssh's callbacks and coroutines do;
**(trio)** is called from trio. The only crossings are
:func:`serve_connection` (trio awaits the asyncio side with
``trio_asyncio.aio_as_trio``) and the :class:`Hooks` the asyncio side
awaits with ``trio_asyncio.trio_as_aio`` (the dial, which is trio's: the
multiplexed connection, the wait room). Both worlds run in trio's thread.

Theory of operation
-------------------
A local client connects; :func:`serve_connection` runs asyncssh's server
on the accepted socket (the host key from the profile, no password or
keyboard-interactive method ever offered). The user name is ``LOGIN`` or
``LOGIN%NODE`` (:func:`split_user`). Only once the client has proved it
holds one of the keys the local user trusts (:class:`LocalKeys`: asyncssh
has checked its signature over the session id), or at once under the
explicit ``none`` opt-in, :meth:`GatewayServer.auth_completed` asks the
trio side to dial the node with that login and an in-memory key pair's
public key: a key merely offered (the client's query, RFC 4252 §7) dials
nothing. The cluster checks RBAC for node and login, signs a user
certificate for that key and login only, and hands it over with the node's
known_hosts lines (protocols/ssh/handoff.py); then asyncssh's client logs
in to the node over the dialled stream, checking its host key. Channels the
client opens meanwhile wait for the node. Any refusal (the login, the node,
the cluster, the node's own sshd) ends the connection with the reason as
the disconnect message, which ssh prints ("Received disconnect ...:
wicket: ..."): never a bare "Connection closed".

After that every channel the client opens is bridged to one of the node's:
a session (shell with its pty, exec, a subsystem such as sftp; its
environment, window changes, signals, breaks, and the exit status or
signal coming back), a ``direct-tcpip`` (``ssh -L``) through the node, and
for ``ssh -R`` a listener on the node whose connections come back as
``forwarded-tcpip`` channels. A bridge is two :class:`_Half` objects, one
per channel: what one receives is written to the other; when a channel's
send buffer fills (asyncssh calls ``pause_writing``) the other channel
stops reading (``pause_reading``), so the SSH windows apply flow control
end to end and no buffer grows past asyncssh's own limits. EOF is carried
as a half-close, each way. ``ssh -A`` reaches the node only where a role
allows agent forwarding (:meth:`GatewayServer.forward_agent`); X11
forwarding is never offered.
"""

from __future__ import annotations

import asyncio
import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import attrs
import trio_asyncio

with warnings.catch_warnings():
    # asyncssh still imports DSA support, which cryptography deprecates.
    warnings.simplefilter("ignore")
    import asyncssh

from gateway.local.ssh_lighten import Cork, lighten

log = logging.getLogger("wicket.proxy.ssh")
logging.getLogger("asyncssh").setLevel(logging.WARNING)

#: ``ssh -p 2222 root%web-2@127.0.0.1``: the login, then the node.
NODE_SEPARATOR = "%"
LOGIN_TIMEOUT = 120.0
KEEPALIVE = 30.0
#: The ciphers the local server offers: AES-GCM only, which asyncssh does in
#: one call into OpenSSL per packet (measured: scp ~1.5x faster than with
#: chacha20-poly1305, which OpenSSH's client would pick first if offered: the
#: client's order decides). Every OpenSSH since 6.2 has it.
LOCAL_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
#: To the node, the same first, then what a node may insist on.
NODE_CIPHERS = (*LOCAL_CIPHERS, "chacha20-poly1305@openssh.com", "aes128-ctr", "aes256-ctr")


class NodeRefused(Exception):
    """The node cannot be reached for this login; the message (a banner the
    client prints) says why and what to do."""


@attrs.frozen(slots=True)
class NodeStream:
    """A dialled stream to a node: the socket asyncssh speaks SSH over, the
    user certificate for the in-memory key, and the known_hosts lines
    that vouch for the node, under ``host``."""

    sock: Any
    certificate: str
    host: str
    known_hosts: tuple[str, ...]
    #: The cluster's session id (what the gateway's audit reports name).
    session_id: str = ""
    #: Whether the user's roles let ``ssh -A`` reach the node (the
    #: certificate then permits it).
    agent_forwarding: bool = False
    #: The trio side's own (the link and its stream).
    handle: Any = None


class Hooks(Protocol):
    """What the asyncio side needs of the trio side (gateway/local/ssh_terminated.py)."""

    default_node: str

    async def dial(self, login: str, node: str, public_key: str, client_addr: str) -> NodeStream:
        """(trio) Dial ``node`` as ``login`` for ``public_key``; raises NodeRefused."""

    def watch(self, stream: NodeStream, on_cut: Callable[[str], None]) -> None:
        """(trio) Call ``on_cut(reason)`` if the cluster cuts the stream."""

    def ended(self, stream: NodeStream) -> str | None:
        """(either; blocks on nothing) Why the stream ended, if it was cut."""

    def report(self, stream: NodeStream, event: str, fields: dict) -> None:
        """(either; blocks on nothing) Queue an audit event the gateway saw
        (a command, a file operation, a forward) for the cluster's log."""


def split_user(username: str, default_node: str) -> tuple[str, str]:
    """(either) ``LOGIN%NODE`` or ``LOGIN`` (the route's node)."""
    login, sep, node = username.partition(NODE_SEPARATOR)
    return login, (node if sep else default_node)


class LocalKeys:
    """The public keys whose holders may use this gateway: the local user's
    own (``~/.ssh/*.pub``, the ssh-agent's, or an authorized_keys file),
    compared by their wire form."""

    def __init__(self, blobs: Iterable[bytes] = (), *, allow_none: bool = False) -> None:
        self.blobs = frozenset(blobs)
        self.allow_none = allow_none

    def __contains__(self, key: asyncssh.SSHKey) -> bool:
        return key.public_data in self.blobs

    @staticmethod
    def read_files(paths: Iterable[Path]) -> list[bytes]:
        """(either) The keys in public key and authorized_keys files
        (an authorized_keys line's options are skipped over)."""
        blobs = []
        for path in paths:
            try:
                text = path.read_text()
            except (OSError, UnicodeDecodeError):
                continue
            for line in text.splitlines():
                fields = line.split()
                for start in range(min(len(fields), 8)):
                    try:
                        blobs.append(asyncssh.import_public_key(" ".join(fields[start:start + 2])).public_data)
                        break
                    except (asyncssh.KeyImportError, ValueError):
                        continue
        return blobs

    @staticmethod
    async def read_agent() -> list[bytes]:
        """(asyncio) The keys the ssh-agent of ``$SSH_AUTH_SOCK`` holds (none without one)."""
        try:
            async with asyncssh.connect_agent() as agent:
                return [key.public_data for key in await agent.get_keys()]
        except (OSError, asyncssh.Error, ValueError, TypeError, AttributeError):
            return []


def load_host_key(path: Path) -> asyncssh.SSHKey:
    """(either) The gateway's host key, made on first use (0600)."""
    from gateway.identity import pki

    if not path.exists():
        key = asyncssh.generate_private_key("ssh-ed25519", comment="wicket-gateway")
        pki.write_private(path, key.export_private_key())
        pki.write_public(path.with_name(path.name + ".pub"), key.export_public_key())
    return asyncssh.read_private_key(str(path))


# -- bridging channels ------------------------------------------------------------


class _Half:
    """One channel of a bridge (see the module docstring). What arrives
    before the other channel is open (a shell's prompt may come with the
    reply to the shell request) waits in ``early`` and goes first. (asyncio)"""

    def __init__(self) -> None:
        self.chan: Any = None
        self.peer: _Half | None = None
        self.closed = False
        self.early: list[tuple[bytes, Any]] = []
        self.early_eof = False
        #: Shown every chunk this channel receives, before it is passed on
        #: (an sftp session's auditor).
        self.tap: Callable[[bytes], None] | None = None

    def pair(self, peer: "_Half") -> None:
        """(asyncio) Join two halves whose channels are open; each reads again."""
        self.peer, peer.peer = peer, self
        for half in (self, peer):
            early, half.early = half.early, []
            for data, datatype in early:
                half.peer.chan.write(data, datatype)
            if half.early_eof:
                half.eof_received()
        for half in (self, peer):
            if not half.closed:
                half.chan.resume_reading()

    def connection_made(self, chan: Any) -> None:
        self.chan = chan

    def data_received(self, data: bytes, datatype: Any) -> None:
        if self.tap is not None and datatype is None:
            self.tap(data)
        if self.peer is None:
            self.early.append((data, datatype))
        elif not self.peer.closed:
            self.peer.chan.write(data, datatype)

    def eof_received(self) -> bool:
        if self.peer is None:
            self.early_eof = True
        elif not self.peer.closed:
            self.peer.chan.write_eof()
        return True  # half-close: the other way keeps flowing

    def pause_writing(self) -> None:
        if self.peer is not None and not self.peer.closed:
            self.peer.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and not self.peer.closed:
            self.peer.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.peer is not None and not self.peer.closed:
            self.peer.chan.close()  # once its buffered data is out


class _LocalSession(_Half, asyncssh.SSHServerSession):
    """The client's session channel; its node twin opens once the client
    said what it wants (shell, exec, subsystem). (asyncio)"""

    def __init__(self, server: "GatewayServer") -> None:
        super().__init__()
        self.server = server

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.sessions.discard(self)
        super().connection_lost(exc)

    def pty_requested(self, term_type, term_size, term_modes) -> bool:
        return True  # the channel keeps them; the node gets them with the session

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return True

    def session_started(self) -> None:
        self.chan.pause_reading()  # until the node's channel is there to take it
        asyncio.get_running_loop().create_task(self._open_on_node())

    async def _open_on_node(self) -> None:
        if not await self.server.wait_node():
            return  # the connection ends with the reason
        chan = self.chan
        self.server.forward_agent(self)
        node = _NodeSession(self.server)
        command, subsystem = chan.get_command(), chan.get_subsystem()
        if command is not None:
            self.server.report("ssh.exec", command=command)
        elif subsystem is not None:
            self.server.report("ssh.subsystem", name=subsystem)
            if subsystem == "sftp":
                _SftpTaps(self.server).attach(self, node)
        else:
            self.server.report("ssh.shell", term=chan.get_terminal_type() or "")
        try:
            await self.server.node.create_session(
                lambda: node, chan.get_command(), subsystem=chan.get_subsystem(), env=chan.get_environment(),
                term_type=chan.get_terminal_type(), term_size=chan.get_terminal_size(),
                term_modes=chan.get_terminal_modes(), encoding=None)
        except (asyncssh.Error, OSError) as exc:
            if not self.closed:
                chan.write_stderr(f"wicket: the node refused the session: {_reason(exc)}\r\n".encode())
                chan.exit(255)
            return
        if self.closed:
            node.chan.close()
            return
        self.pair(node)

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self.peer is not None and not self.peer.closed:
            self.peer.chan.change_terminal_size(width, height, pixwidth, pixheight)

    def signal_received(self, signal: str) -> None:
        if self.peer is not None and not self.peer.closed:
            self.peer.chan.send_signal(signal)

    def break_received(self, msec: int) -> bool:
        if self.peer is not None and not self.peer.closed:
            self.peer.chan.send_break(msec)
            return True
        return False


class _NodeSession(_Half, asyncssh.SSHClientSession):
    """The node's session channel: its exit status or signal goes back to
    the client when it closes; if the connection to the node is lost
    instead, the whole client connection ends with the reason. (asyncio)"""

    def __init__(self, server: "GatewayServer") -> None:
        super().__init__()
        self.server = server
        self.exit: tuple | None = None

    def exit_status_received(self, status: int) -> None:
        self.exit = ("status", status)
        self.server.report("ssh.exit", status=status)

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.exit = ("signal", signal, core_dumped, msg, lang)
        self.server.report("ssh.exit", signal=signal)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        local = self.peer
        if local is None or local.closed:
            return
        if self.exit is None and exc is not None:
            self.server.node_lost(exc)
        elif self.exit is None:
            local.chan.close()
        elif self.exit[0] == "status":
            local.chan.exit(self.exit[1])
        else:
            local.chan.exit_with_signal(*self.exit[1:])


class _SftpTaps:
    """An sftp session's file operations, read from both directions
    (protocols/ssh/sftp.py) and reported as ``ssh.sftp``; input the auditor
    cannot read stops the auditing, not the session. (asyncio)"""

    def __init__(self, server: "GatewayServer") -> None:
        from protocols.ssh.sftp import SftpAuditor

        self.server = server
        self.auditor: Any = SftpAuditor()

    def attach(self, local: _Half, node: _Half) -> None:
        local.tap = lambda data: self._feed("client_data", data)
        node.tap = lambda data: self._feed("server_data", data)

    def _feed(self, side: str, data: bytes) -> None:
        from protocols.errors import RemoteProtocolError

        if self.auditor is None:
            return
        try:
            for event in getattr(self.auditor, side)(data):
                self.server.report("ssh.sftp", **event.fields())
        except RemoteProtocolError as exc:
            self.auditor = None
            self.server.report("ssh.sftp", op="audit_stopped", error=str(exc)[:200])


class _TcpHalf(_Half, asyncssh.SSHTCPSession):
    """One side of a forwarded TCP connection. (asyncio)"""


class _ReverseHalf(_TcpHalf):
    """A connection to a listener on the node (``ssh -R``): it goes back
    to the client as a ``forwarded-tcpip`` channel. (asyncio)"""

    def __init__(self, server: "GatewayServer", listen: tuple[str, int], orig: tuple[str, int]) -> None:
        super().__init__()
        self.server, self.listen, self.orig = server, listen, orig

    def connection_made(self, chan: Any) -> None:
        super().connection_made(chan)
        chan.pause_reading()
        asyncio.get_running_loop().create_task(self._open_to_client())

    async def _open_to_client(self) -> None:
        local = _TcpHalf()
        try:
            await self.server.conn.create_connection(lambda: local, self.listen[0], self.listen[1], *self.orig)
        except (asyncssh.Error, OSError):
            self.chan.close()
            return
        if self.closed:
            local.chan.close()
            return
        self.pair(local)


class _NodeClient(asyncssh.SSHClient):
    """The connection to the node. (asyncio)"""

    def __init__(self, server: "GatewayServer") -> None:
        self.server = server

    def connection_made(self, conn: Any) -> None:
        lighten(conn, self.server.cork)

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None and self.server.stream is not None:
            self.server.node_lost(exc)


def _reason(exc: BaseException) -> str:
    return getattr(exc, "reason", None) or str(exc) or type(exc).__name__


# -- the server ------------------------------------------------------------------


class GatewayServer(asyncssh.SSHServer):
    """One local client's connection (see the module docstring). (asyncio)"""

    def __init__(self, hooks: Hooks, keys: LocalKeys, client_addr: str) -> None:
        self.hooks, self.keys, self.client_addr = hooks, keys, client_addr
        self.conn: Any = None
        self.node: Any = None  # the SSH client connection to the node, once reached
        self._reaching: asyncio.Future | None = None
        self.stream: NodeStream | None = None
        self.sessions: set[_LocalSession] = set()  # the client's open session channels
        self.ended = False
        self.target: tuple[str, str] | None = None
        self.agent_requested = False  # the client asked for ``ssh -A``
        self.agent_decided = False
        self.closed = asyncio.Event()
        self.cork = Cork()  # both connections' writes (lighten)

    def connection_made(self, conn: Any) -> None:
        self.conn = conn
        lighten(conn, self.cork)
        # asyncssh makes the agent socket (a 0700 temporary directory, a
        # listener) as soon as the client asks; here it waits for the node's
        # answer and is made only where a role allows agent forwarding.
        # The request (no reply wanted by OpenSSH) is answered in order, so
        # the session's own requests wait behind it, as they would for the node.
        make_listener = conn.create_agent_listener

        async def agent_listener() -> bool:
            self.agent_requested = True
            if not await self.wait_node() or not self.stream.agent_forwarding:
                return False
            return await make_listener()

        conn.create_agent_listener = agent_listener

    def connection_lost(self, exc: Exception | None) -> None:
        if self.node is not None:
            self.node.close()
        self.closed.set()

    async def begin_auth(self, username: str) -> bool:
        self.target = split_user(username, self.hooks.default_node)
        return not self.keys.allow_none  # the none opt-in: no authentication asked for

    def public_key_auth_supported(self) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return False

    def kbdint_auth_supported(self) -> bool:
        return False

    async def validate_public_key(self, username: str, key: Any) -> bool:
        # Asked both for a query (is this key acceptable?) and for the signed
        # request, before asyncssh checks the signature: nothing is dialled
        # here, only once the client has proved it holds the key.
        return key in self.keys

    def auth_completed(self) -> None:
        """The client proved it holds a trusted key (or the ``none`` opt-in
        let it in): now the node is dialled, once per connection. Channels
        the client opens meanwhile wait for it (:meth:`wait_node`); a refusal
        ends the connection with the reason, which ssh prints."""
        self._reaching = asyncio.ensure_future(self._connect_node())
        self._reaching.add_done_callback(self._reached)

    def _reached(self, reaching: asyncio.Future) -> None:
        if reaching.cancelled():
            return
        exc = reaching.exception()
        message = f"wicket: the node could not be reached ({_reason(exc)})" if exc is not None else reaching.result()
        if exc is not None:
            log.warning("ssh_reach_failed client=%s error=%r", self.client_addr, _reason(exc))
        if message is not None:
            self._end(asyncssh.DISC_BY_APPLICATION, message)

    async def wait_node(self) -> bool:
        """(asyncio) Wait until the node is reached or refused: True if reached."""
        if self._reaching is None:
            return False
        await asyncio.wait([self._reaching])
        return self.node is not None and not self.ended

    async def _connect_node(self) -> str | None:
        """(asyncio) None once the node is reached, else what to tell the client."""
        login, node = self.target
        key = asyncssh.generate_private_key("ssh-ed25519")
        public = key.export_public_key().decode("ascii").strip()
        try:
            stream = await trio_asyncio.trio_as_aio(self.hooks.dial)(login, node, public, self.client_addr)
        except NodeRefused as exc:
            return f"wicket: {exc}"
        try:
            cert = asyncssh.import_certificate(stream.certificate)
            self.node = await asyncssh.run_client(
                stream.sock, config=None, client_factory=lambda: _NodeClient(self), username=login, client_keys=[(key, cert)], agent_path=None,
                known_hosts=asyncssh.import_known_hosts("".join(line + "\n" for line in stream.known_hosts)),
                host_key_alias=stream.host, preferred_auth="publickey", keepalive_interval=KEEPALIVE,
                encryption_algs=NODE_CIPHERS,
                encoding=None, connect_timeout=LOGIN_TIMEOUT)
        except asyncssh.PermissionDenied as exc:
            stream.sock.close()
            return (f"wicket: {node} did not let {login} in ({_reason(exc)}): its sshd must trust the cluster's SSH "
                    f"user CA (TrustedUserCAKeys; `wicket-cluster ca show ssh-user [--node {node}]`) and have a "
                    f"user {login}")
        except asyncssh.HostKeyNotVerifiable as exc:
            stream.sock.close()
            return (f"wicket: the host key of {node} is not the one the cluster registered ({_reason(exc)}); "
                    f"ask a cluster administrator to check the node")
        except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
            stream.sock.close()
            cut = self.hooks.ended(stream)  # the cluster's reason, if it cut the stream (a host key mismatch)
            return f"wicket: the SSH connection to {node} failed: {cut or _reason(exc)}"
        except asyncio.CancelledError:  # the client left meanwhile (_serve)
            stream.sock.close()
            raise
        self.stream = stream
        self.hooks.watch(stream, self._cut)
        return None

    def _cut(self, reason: str) -> None:
        """(asyncio or trio: only schedules) The cluster cut the session."""
        self._end(asyncssh.DISC_BY_APPLICATION, f"wicket: the session was cut: {reason}")

    def node_lost(self, exc: BaseException) -> None:
        """(asyncio) The connection to the node is gone: say why to the client."""
        reason = self.hooks.ended(self.stream) if self.stream is not None else None
        if reason is not None:
            self._cut(reason)
        else:
            self._end(asyncssh.DISC_CONNECTION_LOST,
                      f"wicket: the connection to {self.target[1]} was lost: {_reason(exc)}")

    def _end(self, code: int, message: str) -> None:
        """(asyncio or trio: only schedules) End the client's connection,
        saying why: on each open session's stderr, which ssh prints before it
        sees the channel close (asyncssh closes the channels before it sends
        the disconnect), and as the disconnect reason (what ``ssh -N``
        prints, and ssh when no session was open yet)."""
        if self.conn is None or self.ended:
            return
        self.ended = True
        for session in list(self.sessions):
            if not session.closed and session.chan is not None:
                try:
                    session.chan.write_stderr((message + "\r\n").encode())
                    session.chan.exit(255)
                except BrokenPipeError:  # the client closed the channel already: no one to tell
                    pass
        self.conn.disconnect(code, message)

    def session_requested(self) -> Any:
        if self._reaching is None or self.ended:
            return False
        session = _LocalSession(self)
        self.sessions.add(session)
        return session

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> Any:
        # ``ssh -L``: asyncssh opens the direct-tcpip channel on the node's
        # connection and bridges the two (once the node is reached).
        if self._reaching is None or self.ended:
            return False

        async def through_node() -> Any:
            if not await self.wait_node():
                raise asyncssh.ChannelOpenError(asyncssh.OPEN_CONNECT_FAILED, "the node was not reached")
            self.report("ssh.forward", direction="local", host=dest_host, port=dest_port)
            return await self.conn.forward_tunneled_connection(self.node, dest_host, dest_port)

        return through_node()

    async def server_requested(self, listen_host: str, listen_port: int) -> Any:
        # ``ssh -R``: the node listens; each connection comes back to the client.
        if not await self.wait_node():
            return False
        listener: Any = None

        def factory(orig_host: str, orig_port: int) -> _ReverseHalf:
            return _ReverseHalf(self, (listen_host, listener.get_port()), (orig_host, orig_port))

        try:
            listener = await self.node.create_server(factory, listen_host, listen_port)
        except (asyncssh.Error, OSError) as exc:
            log.info("ssh_forward_refused node=%s listen=%s:%d error=%r", self.target[1], listen_host, listen_port,
                     _reason(exc))
            return False
        self.report("ssh.forward", direction="remote", host=listen_host, port=listener.get_port())
        return listener

    def forward_agent(self, session: "_LocalSession") -> None:
        """(asyncio) ``ssh -A``: the client asked. Where a role allows it,
        asyncssh made a socket here whose connections become auth-agent
        channels to the client (channel requests run in order, so it exists
        before the session starts: see :meth:`connection_made`), the node's
        sessions ask for agent forwarding and the node's auth-agent channels
        are carried to that socket (asyncssh has no public knob for it after
        connecting: the attribute ``run_client(agent_forwarding=PATH)``
        sets); else no socket was made and the client is told on stderr,
        once. Audited either way, once."""
        if not self.agent_requested or self.agent_decided:
            return
        self.agent_decided = True
        allowed = self.stream is not None and self.stream.agent_forwarding
        self.report("ssh.agent_forwarding", allowed=allowed)
        path = self.conn.get_agent_path()
        if allowed:
            if path is not None:
                self.node._agent_forward_path = path
        else:
            session.chan.write_stderr(
                f"wicket: agent forwarding to {self.target[1]} as {self.target[0]} is not allowed by your roles; "
                f"the session goes on without it (a cluster administrator can allow it: roles add "
                f"--ssh-agent-forwarding on)\r\n".encode())

    def report(self, event: str, **fields: Any) -> None:
        """(asyncio) An audit event for the cluster's log (Hooks.report)."""
        if self.stream is not None:
            self.hooks.report(self.stream, event, fields)


async def _serve(sock: Any, hooks: Hooks, keys: LocalKeys, host_key: Any, client_addr: str) -> None:
    """(asyncio) Serve one local client until it leaves."""
    server = GatewayServer(hooks, keys, client_addr)
    try:
        conn = await asyncssh.run_server(
            sock, server_factory=lambda: server, server_host_keys=[host_key], config=None,
            agent_forwarding=True, x11_forwarding=False, allow_pty=True, line_editor=False, encoding=None,
            login_timeout=LOGIN_TIMEOUT, keepalive_interval=KEEPALIVE,
            public_key_auth=True, password_auth=False, kbdint_auth=False,
            encryption_algs=LOCAL_CIPHERS)
    except (asyncssh.Error, OSError, asyncio.TimeoutError) as exc:
        log.info("ssh_client_failed client=%s error=%r", client_addr, _reason(exc))
        return
    try:
        await conn.wait_closed()
    finally:
        conn.close()
        if server._reaching is not None and not server._reaching.done():
            server._reaching.cancel()  # the client left while the node was being reached
        if server.node is not None:
            server.node.close()


async def serve_connection(sock: Any, hooks: Hooks, keys: LocalKeys, host_key: Any, client_addr: str) -> None:
    """(trio) Serve one local client on ``sock`` (a connected socket, now
    asyncssh's) until it leaves; cancelling it closes the connection."""
    await trio_asyncio.aio_as_trio(_serve)(sock, hooks, keys, host_key, client_addr)


async def agent_keys() -> list[bytes]:
    """(trio) The ssh-agent's public keys."""
    return await trio_asyncio.aio_as_trio(LocalKeys.read_agent)()


def known_hosts_line(host_key: Any, host: str, port: int) -> str:
    """(either) The line a client's known_hosts needs for this gateway."""
    pattern = host if port == 22 else f"[{host}]:{port}"
    return f"{pattern} {host_key.export_public_key().decode('ascii').split(' wicket')[0].strip()}"


def open_loop() -> Any:
    """(trio) The asyncio loop every function here runs on (an async context manager)."""
    return trio_asyncio.open_loop()

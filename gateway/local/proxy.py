"""``wicket proxy tcp``: a local listener relaying each connection to a
resource as a stream of the gateway's multiplexed connection to the cluster.

Theory of operation
-------------------
The listening socket belongs to the relay engine (gateway/net/engine.py):
its thread accepts each client and, while the connection to the cluster is
up and the login on disk unchanged and in date, starts the session there and
then, with :meth:`MuxLink.start`: the OPEN goes out with the client's first
bytes behind it, and nothing waits for trio. Everything else takes the slow
path through trio: opening (or reopening) the connection to the cluster
(while the cluster cannot be reached at all, a restart or a network
switching, the client waits up to ``wait_for_cluster`` seconds rather than
being turned away at once), picking up a renewed login, reporting an
expired one, and starting again on a new connection a session whose
connection died before the cluster saw it (``MuxLink.start``'s ``retry``:
the client notices nothing).

The end of every session, refused or relayed, is logged from the thread that
saw it (a refusal with what to do next); gateway/logs.py hands the line to a
writer thread, so no thread here waits for stderr. Other clients are
unaffected by one client's trouble.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import stat
import threading
import time
from pathlib import Path
from typing import Any, Callable, TypeVar

import attrs

import trio

from gateway.addresses import format_addr
from gateway.local.connect import ClusterError
from gateway.local.dialer import DIAL_TIMEOUT, MuxDialer
from gateway.local.waitroom import RIDE_OUT, ClientGone, WaitRoom
from gateway.local.profile import Profile, ProfileError
from gateway.local.route_stats import RouteStats
from gateway.net.descriptors import Budget, serve_listeners
from gateway.net.engine import engine, reset_and_close
from gateway.net.muxlink import LinkClosed, MuxLink, Stream
from gateway.net.peercred import LocalUsers
from gateway.net.relay import RelayCounters, reset_on_close
from gateway.net.tcp import peer_left
from protocols.dial import DialAccept, DialError, DialRequest
from protocols.errors import ErrorCode

log = logging.getLogger("wicket.proxy")

T = TypeVar("T")

#: A session to start again: its counters, the bytes already read from the
#: client, whether the client's EOF was among them, and when the client
#: arrived (time.monotonic(): its dial is timed from then, not the retry).
_Resume = tuple[RelayCounters, bytes, bool, float]

NEXT_STEP = {
    ErrorCode.CERT_EXPIRED: "run `wicket login` again",
    ErrorCode.CERT_INVALID: "run `wicket login` again",
    ErrorCode.CERT_REQUIRED: "run `wicket login` first",
    ErrorCode.ACCESS_DENIED: "ask a cluster administrator for a role that allows it",
    ErrorCode.USER_LOCKED: "ask a cluster administrator to unlock your user",
    ErrorCode.RESOURCE_NOT_FOUND: "`wicket ls` lists the resources you can reach",
    ErrorCode.UPSTREAM_UNREACHABLE: "the resource is down or unreachable from the cluster",
    ErrorCode.RATE_LIMITED: None,  # the cluster's message names the limit and what to do
}


@attrs.frozen(slots=True, kw_only=True)
class Listening:
    """What `wicket proxy` needs of a kind's local route (each kind's
    ``gateway_route`` factory in gateway/kinds.py makes one): the handler
    for :func:`run_listener`, the dialer whose connection to keep open, and
    the line that tells a person which client command to try."""

    handler: Any
    dialer: MuxDialer
    try_line: Callable[[str, int], str]
    #: The route's shared part (its client limit is set from the command line).
    route: "MuxRoute"
    #: The name of the route's unix socket in a directory given to
    #: ``--unix-socket``, from the port (PostgreSQL's ``.s.PGSQL.<port>``);
    #: None: the kind's clients name the socket's own path.
    unix_name: Callable[[int], str] | None = None


def peer_addr(stream: trio.SocketStream) -> str:
    try:
        return format_addr(stream.socket.getpeername())
    except OSError:  # the client already reset the connection
        return "unknown"


class MuxRoute:
    """What every kind's local route shares (``TcpProxy``, and
    gateway/local/pg.py's ``PostgresProxy``): its sessions are streams of
    the profile's multiplexed connection; while none can be opened, a new
    client waits in the :class:`WaitRoom`; refusals and failures are logged
    alike, with what to do next. Only the local users ``local_users`` lets
    in get a session (by default the gateway's owner: another local user
    would act with the owner's identity; gateway/net/peercred.py)."""

    def __init__(self, profile: Profile, resource: str, *, wait_for_cluster: float = RIDE_OUT,
                 local_users: LocalUsers | None = None, dialer: MuxDialer | None = None) -> None:
        self.profile = profile
        self.resource = resource
        self.room = WaitRoom(resource, wait_for_cluster)
        #: The connection to the cluster: this route's own, or one that the
        #: other routes of the process share (``dialer``: `wicket agent`
        #: keeps one connection, and its renewal, for all its resources).
        self.dialer = dialer if dialer is not None else MuxDialer(profile)
        self.local_users = local_users or LocalUsers()
        self.stats = RouteStats()
        #: Local clients served at once (``--max-connections``): each holds
        #: a descriptor; past it, a new client is refused (in its protocol
        #: where it has one), and the gateway keeps its reserve for its own
        #: connection to the cluster. Clients counted under ``_count_lock``.
        self.max_clients = Budget.of_process().for_sessions
        self.clients = 0
        self._count_lock = threading.Lock()
        self._over = False  # refusing now: logged once per episode

    def client_arrived(self, client_addr: str) -> str | None:
        """Count a new local client, or say why it is refused (logged once
        per episode). Any thread; :meth:`client_left` when it is gone."""
        with self._count_lock:
            if self.clients < self.max_clients:
                self.clients += 1
                if self._over and self.clients < self.max_clients * 9 // 10:
                    self._over = False
                return None
            first, self._over = not self._over, True
        refusal = (f"this proxy already serves {self.max_clients} connections, its limit; close some, or "
                   f"restart it with a higher --max-connections")
        if first:
            log.warning("clients_refused resource=%s client=%s reason=%r", self.resource, client_addr, refusal)
        return refusal

    def client_left(self) -> None:
        with self._count_lock:
            self.clients -= 1

    def stranger(self, sock: socket.socket, client_addr: str) -> str | None:
        """Why the client on ``sock`` may not use this gateway (logged), or
        None. Any thread may ask."""
        refusal = self.local_users.refusal(sock)
        if refusal is not None:
            log.warning("local_user_refused resource=%s client=%s reason=%r", self.resource, client_addr, refusal)
        return refusal

    async def on_link(self, start: Callable[[MuxLink], T], deadline: float, client_addr: str,
                      gone: Callable[[], bool]) -> T:
        """``start(link)`` on the connection to the cluster, waiting for one
        (until ``deadline``, while ``gone()`` says the client is still
        there); once more on a new one if that one closed meanwhile
        (``start`` raised :class:`LinkClosed`). Raises ClusterError,
        ClientGone."""
        for attempt in range(2):
            link = await self.room.ride_out(self.dialer.link, deadline, client_addr, gone)
            try:
                return start(link)
            except LinkClosed:
                if attempt:
                    raise ClusterError("unreachable", f"the connection to the cluster failed ({link.failed}); "
                                       f"is `wicket-cluster start` still running?") from None
        raise AssertionError("unreachable")

    async def control_dial(self, link: MuxLink, request: DialRequest, *, after: Stream | None = None,
                           timeout: float = DIAL_TIMEOUT) -> DialAccept | DialError:
        """``link.control(...)``, timed into the route's control dial
        histogram (a cancel's time includes its wait for the session's
        earlier bytes: ``after``). Raises LinkClosed."""
        started = time.monotonic()
        reply = await link.control(request, after=after, timeout=timeout)
        self.stats.control_answered(time.monotonic() - started)
        return reply

    def log_refused(self, client_addr: str, error: DialError, next_step: str | None) -> None:
        self.stats.refusal(error.raw_code or error.code.value)
        log.warning("dial_refused resource=%s client=%s code=%s message=%r next_step=%r", self.resource,
                    client_addr, error.raw_code or error.code.value, error.message, next_step)


class TcpProxy(MuxRoute):
    """Serves one resource; see the module docstring. Pass the object to
    :func:`run_listener`."""

    def __init__(self, profile: Profile, resource: str, *, wait_for_cluster: float = RIDE_OUT,
                 local_users: LocalUsers | None = None, dialer: MuxDialer | None = None) -> None:
        super().__init__(profile, resource, wait_for_cluster=wait_for_cluster, local_users=local_users,
                         dialer=dialer)
        self.engine = engine()
        self.started = 0  # sessions started / ended (under the engine's lock)
        self.ended = 0
        self._token: trio.lowlevel.TrioToken | None = None
        self._nursery: trio.Nursery | None = None

    @property
    def active(self) -> int:
        return self.started - self.ended

    async def serve_listeners(self, listeners: list[trio.SocketListener], *,
                              task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Accept on ``listeners`` (in the relay engine) until cancelled."""
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            accepting = []
            try:
                for listener in listeners:
                    sock = socket.socket(fileno=listener.socket.detach())
                    accepting.append(self.engine.listen(sock, self._on_accept))
                task_status.started()
                await trio.sleep_forever()
            finally:
                for acceptor in accepting:
                    acceptor.close()

    # -- the engine's thread (or trio's, holding the engine's lock) --------

    def _on_accept(self, sock: socket.socket, addr) -> None:
        # A tcp client has no protocol to be told in why it is refused: it
        # gets a reset, and the log says why.
        if self.stranger(sock, format_addr(addr)) is not None or \
                self.client_arrived(format_addr(addr)) is not None:
            reset_and_close(sock)
            return
        if sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        arrived = time.monotonic()
        link = self.dialer.ready_link()
        if link is not None:
            try:
                self._start(link, sock, addr, arrived=arrived)
                return
            except LinkClosed:
                pass
        try:
            self._token.run_sync_soon(self._spawn_slow, sock, addr, None, arrived)
        except trio.RunFinishedError:
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        """The client's connection ends with no session (so no ``_on_end``)."""
        reset_and_close(sock)
        self.client_left()

    def _spawn_slow(self, sock: socket.socket, addr, resume: _Resume | None = None,
                    arrived: float | None = None) -> None:  # trio's thread
        try:
            self._nursery.start_soon(self._start_slowly, sock, addr, resume, arrived)
        except RuntimeError:  # stopping: the nursery takes no more
            self._drop(sock)

    def _start(self, link: MuxLink, sock: socket.socket, addr, resume: _Resume | None = None,
               arrived: float | None = None) -> None:
        """Start the session on ``link``; ``resume``: again, after its first
        connection died before the cluster saw it (once only)."""
        client_addr = format_addr(addr)
        if resume is None:
            counters, early, fin = RelayCounters(), b"", False
            if arrived is None:
                arrived = time.monotonic()
            first = arrived

            def retry(sock: socket.socket, early: bytes, fin: bool, reason: str) -> None:
                self._again(sock, addr, (counters, early, fin, first), reason)
        else:
            (counters, early, fin, arrived), retry = resume, None
        with self.engine.lock:
            self.started += 1
            try:
                link.start(DialRequest(resource=self.resource, client_addr=client_addr), sock,
                           counters, self._on_end, reply_timeout=DIAL_TIMEOUT, context=client_addr,
                           retry=retry, early=early, early_fin=fin, arrived=arrived)
            except LinkClosed:
                self.started -= 1
                raise

    def _again(self, sock: socket.socket, addr, resume: _Resume, reason: str) -> None:
        """(under the engine's lock) The session's connection died before the
        cluster saw it: start it again on a new one, from trio."""
        self.started -= 1  # it starts again
        log.info("session_retry resource=%s client=%s reason=%r", self.resource, format_addr(addr),
                 f"the connection to the cluster failed before the cluster saw this session ({reason}); "
                 f"starting it on a new connection")
        try:
            self._token.run_sync_soon(self._spawn_slow, sock, addr, resume)
        except trio.RunFinishedError:
            self._drop(sock)

    def _on_end(self, link: MuxLink, stream: Stream) -> None:
        self.ended += 1
        self.client_left()
        self._log_end(link, stream)  # queued for the log's writer thread: cheap here
        if not self.dialer.is_current(link):
            # A replaced connection (a renewed login) closes after its last
            # session: trio's business, as is everything about connections.
            try:
                self._token.run_sync_soon(self.dialer.release, link)
            except trio.RunFinishedError:
                pass

    # -- trio's thread -----------------------------------------------------

    async def _start_slowly(self, sock: socket.socket, addr, resume: _Resume | None = None,
                            arrived: float | None = None) -> None:
        """No connection ready (or a new login on disk, or ``resume``): get
        one, then start the session as the engine would have. ``arrived``:
        when the client came (time.monotonic()), if before this."""
        client_addr = format_addr(addr)
        if arrived is None:
            arrived = time.monotonic()
        try:
            try:
                self.dialer.check_fresh()
                # A client may send and half-close before its session
                # starts: only a reset says it left.
                await self.on_link(lambda link: self._start(link, sock, addr, resume, arrived),
                                   self.room.deadline(), client_addr, lambda: peer_left(sock, eof=False))
                return
            except ProfileError as exc:
                log.warning("dial_refused resource=%s client=%s code=cert_expired message=%r",
                            self.resource, client_addr, str(exc))
            except ClientGone:
                log.info("client_left resource=%s client=%s while=waiting_for_cluster", self.resource, client_addr)
            except (ClusterError, trio.TooSlowError) as exc:
                self.stats.failure()
                log.warning("dial_failed resource=%s client=%s error=%r", self.resource, client_addr,
                            getattr(exc, "message", None) or "the cluster did not answer in time")
        except BaseException:
            self._drop(sock)
            raise
        self._drop(sock)  # no session: the client sees an abort, not an empty answer

    def _log_end(self, link: MuxLink, stream: Stream) -> None:
        reply, client_addr = stream.reply, stream.context
        if reply is not None:
            self.stats.answered(stream.dial_seconds)
        if isinstance(reply, DialAccept):
            counters = stream.counters
            self.stats.ended(counters.a_to_b, counters.b_to_a)
            log.info("session_end resource=%s client=%s session=%s sent=%d received=%d%s",
                     self.resource, client_addr, reply.session_id, counters.a_to_b, counters.b_to_a,
                     f" error={stream.error!r}" if stream.error else "")
        elif isinstance(reply, DialError):
            self.log_refused(client_addr, reply, NEXT_STEP.get(reply.code, "see the cluster's audit log"))
        else:
            error = stream.error or "the session ended before the cluster answered"
            if link.failed is not None:
                error += "; is `wicket-cluster start` still running?"
            self.stats.failure()
            log.warning("dial_failed resource=%s client=%s error=%r", self.resource, client_addr, error)


def tcp_route(profile: Profile, resource: str, identity, *, wait_for_cluster: float,
              local_users: LocalUsers | None = None, dialer: MuxDialer | None = None) -> Listening:
    """The tcp kind's local route (gateway/kinds.py)."""
    tcp = TcpProxy(profile, resource, wait_for_cluster=wait_for_cluster, local_users=local_users, dialer=dialer)
    return Listening(handler=tcp, dialer=tcp.dialer, route=tcp,
                     try_line=lambda host, port: f"Try: nc -U {host}" if host.startswith("/") else
                     f"Try: nc {host} {port}")


class ListenError(OSError):
    """The listener cannot be set up (the message says why and what to do)."""


def unix_socket_path(path: Path, port: int, name: Callable[[int], str] | None) -> Path:
    """Where ``--unix-socket PATH`` listens: PATH itself, or for a directory
    the kind's socket name in it (PostgreSQL's ``.s.PGSQL.<port>``, so that
    ``psql host=DIR port=PORT`` finds it)."""
    if path.is_dir():
        if name is None:
            raise ListenError(f"{path} is a directory; this kind needs the socket's own path (e.g. {path}/NAME.sock)")
        return path / name(port)
    return path


def parse_unix_mode(text: str | int) -> int:
    """A unix socket's mode (``"0660"``, or an int): octal permissions that
    let the owner read and write. Raises ValueError saying what is expected."""
    try:
        mode = text if isinstance(text, int) and not isinstance(text, bool) else int(str(text), 8)
    except ValueError:
        mode = -1
    if not 0 < mode <= 0o777 or mode & 0o600 != 0o600:
        raise ValueError("an octal mode that lets you read and write, e.g. 0600 or 0660")
    return mode


def unix_address(bound: str, port: int) -> tuple[str, int]:
    """What clients are told of a unix socket ``bound``: PostgreSQL's
    directory and port (``psql host=DIR port=PORT``), or the path and 0."""
    path = Path(bound)
    prefix = ".s.PGSQL."
    if path.name.startswith(prefix) and path.name[len(prefix):].isdigit():
        return str(path.parent), int(path.name[len(prefix):])
    return bound, 0


def _bind_unix(path: Path, mode: int) -> socket.socket:
    """A listening unix socket at ``path`` with ``mode``, created with that
    mode from the start (no moment where others could connect). A socket
    file left by a gateway that died is replaced; one in use is not."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ListenError(f"{path} exists and is not a socket; choose another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
            raise ListenError(f"{path} is in use by another listener; stop it or choose another path")
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # left behind by a listener that is gone
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(socket.SOMAXCONN)
    return sock


def guarded(handler: Callable[[trio.SocketStream], Any]) -> Callable[[trio.SocketStream], Any]:
    """``handler`` (an async function of a client's stream) such that one
    client's trouble, even a bug, ends that client's connection only: every
    other client keeps its session, and the listener goes on."""

    async def run(stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        except Exception:
            log.exception("connection_failed client=%s action=%s", peer_addr(stream),
                          "report this as a bug with the traceback")
            reset_on_close(stream)  # cut short, not ended
            await stream.aclose()

    return run


async def run_listener(
    handler,
    *,
    host: str,
    port: int,
    unix_socket: Path | None = None,
    unix_mode: int = 0o600,
    task_status=trio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
    handler_nursery: trio.Nursery | None = None,
) -> None:
    """Listen on ``host:port``, or on the unix socket at ``unix_socket``
    (mode ``unix_mode``, removed at the end), and serve each connection
    with ``handler`` (an async function of a trio stream, or an object with
    its own ``serve_listeners``) until SIGINT/SIGTERM (or cancellation).
    Started value: the bound address (a unix socket's path, as a str).
    With ``handler_nursery``, connections' tasks run there: cancelling
    this function then only stops accepting, and live sessions carry on
    (a graceful stop drains them)."""
    if unix_socket is not None:
        sock = _bind_unix(unix_socket, unix_mode)
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(sock))]
        bound = str(unix_socket)
    else:
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()

    try:
        async with trio.open_nursery() as nursery:
            serve = getattr(handler, "serve_listeners", None)
            if serve is not None:  # it accepts by itself (TcpProxy: in the relay engine)
                await nursery.start(serve, listeners)
            else:
                # Out of descriptors, it pauses quietly (gateway/net/descriptors.py).
                nursery.start_soon(functools.partial(serve_listeners, guarded(handler), listeners, name="proxy",
                                                     handler_nursery=handler_nursery))
            task_status.started(bound)
            if handle_signals:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        log.info("proxy_stopping signal=%s", signal.Signals(signum).name)
                        break
                nursery.cancel_scope.cancel()
    finally:
        if unix_socket is not None:
            try:
                os.unlink(unix_socket)
            except FileNotFoundError:
                pass

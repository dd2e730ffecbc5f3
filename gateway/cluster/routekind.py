"""What a kind is to the cluster's dial (:class:`RouteKind`): how it opens
its upstream (:class:`Opened`, or :class:`Refused` with a typed error), how
it answers a control dial (:class:`Answered`); the upstream's TCP connect
every kind starts with, and the tcp kind itself, which is nothing more.
gateway/cluster/dial.py runs the checks and the session around them."""

from __future__ import annotations

import functools
import ipaddress
import socket
from typing import Any, Awaitable, Callable, Mapping, Protocol

import attrs
import trio

from gateway.addresses import parse_hostport
from gateway.cluster.core import Cluster, LiveSession
from gateway.cluster.store import Resource
from gateway.identity import pki
from gateway.net.filters import Filtered, MessageFilter
from gateway.net.tcp import keep_alive
from protocols.dial import DialRequest
from protocols.errors import ErrorCode

CONNECT_TIMEOUT = 10.0
#: The relay's name for the upstream's end: its errors read "upstream: ...".
UPSTREAM = "upstream"

Tap = Callable[[bytes], None]


class Refused(Exception):
    """Turn the dial down with a typed error (and audit why)."""

    def __init__(self, code: ErrorCode, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.reason = code, message, reason or message


@attrs.define(eq=False)
class Opened:
    """An upstream ready for the relay."""

    upstream: trio.abc.HalfCloseableStream
    #: Bytes for the gateway right after the accept (e.g. the server's
    #: AuthenticationOk ... ReadyForQuery after the cluster logged in).
    first_bytes: bytes = b""
    #: Called with every chunk gateway -> upstream / upstream -> gateway.
    tap_client: Tap | None = None
    tap_server: Tap | None = None
    #: Called once the relay is over (flush an auditor, say).
    finish: Callable[[], None] | None = None
    #: Whether the client has said goodbye in its protocol (PostgreSQL's
    #: Terminate): after that, the server closing or resetting the
    #: connection is the session's clean end, not an upstream failure.
    said_goodbye: Callable[[], bool] | None = None
    #: Extra fields for session.start.
    details: Mapping[str, Any] = attrs.field(factory=dict)
    #: Parameters for the gateway in the DialAccept (what the kind's
    #: gateway route needs to know of the upstream: MySQL's handshake
    #: values and login result).
    reply_params: Mapping[str, str] = attrs.field(factory=dict)
    #: Given each whole message from the gateway before it goes on, in the
    #: relay's thread (MongoDB's command gate, MySQL's session auditor):
    #: pass it, answer it, hold it for trio, or end the session
    #: (gateway/net/filters.py).
    filter: MessageFilter | None = None
    _filtered: Filtered | None = attrs.field(default=None, init=False, repr=False)

    def filtered(self) -> Filtered | None:
        """The relay's state for :attr:`filter`, one per session (made at
        the first call, in trio's thread)."""
        if self._filtered is None and self.filter is not None:
            self._filtered = Filtered(self.filter)
        return self._filtered


@attrs.frozen
class Answered:
    """A control dial's outcome with parameters for the gateway (what
    ``RouteKind.control`` may return instead of a bare audit reason)."""

    reason: str
    params: Mapping[str, str] = attrs.field(factory=dict)


class RouteKind(Protocol):
    kind: str

    def check_params(self, request: DialRequest, identity: pki.Identity) -> dict[str, str]:
        """Validate/complete the dial parameters that RBAC will see."""

    async def open(self, cluster: Cluster, resource: Resource, params: dict[str, str],
                   session: LiveSession) -> Opened:
        """Open the upstream (raise :class:`Refused`)."""

    async def control(self, cluster: Cluster, resource: Resource, request: DialRequest,
                      identity: pki.Identity) -> str | Answered | None:
        """Handle a control dial (no session: e.g. a PostgreSQL cancel).
        Return None if ``request`` is an ordinary dial, else an audit
        reason (:class:`Answered`: with parameters for the gateway)."""

    def acts_on(self, cluster: Cluster, request: DialRequest) -> LiveSession | None:
        """The live session a control dial acts on (a cancel's), if any: on
        a multiplexed connection it is decided only once every byte that
        came for that session before it has reached the upstream. Called
        in the relay engine's thread: blocks on nothing."""

    #: ``async interrupt(cluster, resource, session, reason) -> str``, or
    #: None: stop what ``session`` runs upstream before a lock, a
    #: revocation or the certificate's expiry cuts it (PostgreSQL: a
    #: CancelRequest with the backend's key; MySQL would KILL QUERY,
    #: MongoDB killOp), so that closing the connection does not leave a
    #: statement running or let in-flight writes complete. Returns what it
    #: did, for the audit (``session.interrupt``). None for kinds whose
    #: upstream stops when its connection closes (tcp).
    interrupt: Callable[[Cluster, Resource, LiveSession, str], Awaitable[str]] | None


def unreachable(resource: Resource, why: str) -> Refused:
    return Refused(
        ErrorCode.UPSTREAM_UNREACHABLE,
        f"{resource.name} ({resource.address}) is not reachable from the cluster: {why}; "
        f"check that it is running",
    )


#: What an engine connect given up on says (``connected`` tells it apart).
ABANDONED = "abandoned"


def abandoned(resource: Resource, why: str | None) -> Refused:
    """The dial was allowed, but given up before its session was set up
    (``why``: the live session's end reason, cluster_stopping say)."""
    why = why or ABANDONED
    return Refused(
        ErrorCode.UPSTREAM_UNREACHABLE,
        f"the session to {resource.name} was given up before it was set up ({why}); try again",
        reason=why,
    )


async def connect_tcp(resource: Resource) -> trio.SocketStream:
    host, port = parse_hostport(resource.address)
    literal = literal_address(resource.address)
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            if literal is None:
                stream = await trio.open_tcp_stream(host, port)
            else:  # one address: none of open_tcp_stream's resolving and racing tasks (half the CPU)
                sock = trio.socket.socket(literal[0], socket.SOCK_STREAM)
                try:
                    await sock.connect(literal[1])
                except BaseException:
                    sock.close()
                    raise
                stream = trio.SocketStream(sock)
        keep_alive(stream.socket)  # a server that vanished ends its session (gateway/net/tcp.py)
        return stream
    except trio.TooSlowError:
        raise unreachable(resource, "timed out") from None
    except OSError as exc:
        raise unreachable(resource, exc.strerror or str(exc)) from None


@functools.lru_cache(maxsize=1024)
def literal_address(address: str) -> tuple[int, tuple] | None:
    """(family, sockaddr) for a resource address whose host is an IP
    literal; None for a name, which needs resolving."""
    host, port = parse_hostport(address)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    return (socket.AF_INET6, (host, port, 0, 0)) if ip.version == 6 else (socket.AF_INET, (host, port))


class TcpKind:
    kind = "tcp"
    interrupt = None  # closing the upstream connection is all there is

    def check_params(self, request: DialRequest, identity: pki.Identity) -> dict[str, str]:
        return dict(request.params)

    async def open(self, cluster, resource, params, session) -> Opened:
        return Opened(upstream=await connect_tcp(resource))

    async def control(self, cluster, resource, request, identity) -> str | None:
        return None

    def acts_on(self, cluster, request) -> LiveSession | None:
        return None


TCP = TcpKind()

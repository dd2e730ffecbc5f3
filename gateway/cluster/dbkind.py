"""What every database kind's cluster strategy shares (PostgreSQL, MySQL, MongoDB).

A database kind's :class:`~gateway.cluster.dial.RouteKind` logs in to the
real server *as the requested db user*, with credentials the client never
sees. :class:`DatabaseKind` holds what that takes whatever the protocol:

* the password, when the resource's ``auth = "password"`` (from the
  cluster's environment or a file: ``DatabaseSpec.password_for``), or none
  with ``auth = "cert"`` (a client certificate for the db user, from
  gateway/cluster/upstream_auth.py);
* the TCP connection, then the whole login within :data:`LOGIN_TIMEOUT`,
  the connection closed on any failure (:meth:`DatabaseKind.open`);
* TLS with the server once the protocol has asked for it
  (:meth:`DatabaseKind.start_tls`): verified against the resource's CA and
  name under ``tls = "verify-full"``, with the db user's certificate under
  ``auth = "cert"``;
* every failure on the way turned into a typed refusal
  (``upstream_unreachable``, or ``access_denied`` for a missing secret)
  whose message names the resource and says what went wrong.

A kind subclasses it with :meth:`DatabaseKind.login`: the protocol's own
exchange on :class:`Upstream`, returning the ``Opened`` session.
"""

from __future__ import annotations

import logging
import ssl
from typing import Mapping

import trio

from gateway.cluster import resource_specs
from gateway.cluster.core import Cluster, LiveSession
from gateway.cluster.dial import Opened, Refused, connect_tcp
from gateway.cluster.store import Resource
from gateway.cluster.upstream_auth import ClientContexts
from gateway.net.tls import TLSStream
from protocols.errors import ErrorCode, ProtocolError

log = logging.getLogger("wicket.cluster.db")

#: The whole upstream login (TLS and the protocol's exchange) takes at most this.
LOGIN_TIMEOUT = 30.0
PARAM_DB_USER, PARAM_DB_NAME = "db_user", "db_name"


class Upstream:
    """The connection to the server while the cluster logs in: ``stream``
    is the TCP stream, then the TLS stream once started."""

    def __init__(self, tcp: trio.SocketStream) -> None:
        self.tcp = tcp
        self.stream: trio.abc.HalfCloseableStream = tcp


class DatabaseKind:
    """The shared part of a database kind's strategy; see the module docstring."""

    kind = "db"
    #: A kind that can stop what a session runs upstream before a cut
    #: defines ``async interrupt(cluster, resource, session, reason)``
    #: (gateway/cluster/routekind.py's RouteKind); None: closing is all there is.
    interrupt = None

    def __init__(self) -> None:
        self._contexts = ClientContexts()

    async def login(self, cluster: Cluster, resource: Resource, spec: resource_specs.DatabaseSpec,
                    params: Mapping[str, str], session: LiveSession, upstream: Upstream,
                    password: str | None) -> Opened:
        """The protocol's login on ``upstream`` (connected; TLS not yet).
        Raise :class:`Refused`, or let a ProtocolError, an OSError or a
        broken stream through: :meth:`open` words them."""
        raise NotImplementedError

    async def open(self, cluster: Cluster, resource: Resource, params: dict[str, str],
                   session: LiveSession) -> Opened:
        try:
            return await self._open(cluster, resource, params, session)
        except (ProtocolError, ValueError, OSError, ssl.SSLError, trio.BrokenResourceError,
                trio.ClosedResourceError) as exc:
            log.warning("%s_open_failed resource=%s error=%r", self.kind, resource.name, exc)
            raise Refused(ErrorCode.UPSTREAM_UNREACHABLE,
                          f"talking to {resource.name} failed: {getattr(exc, 'message', None) or exc}") from None

    async def _open(self, cluster: Cluster, resource: Resource, params: dict[str, str],
                    session: LiveSession) -> Opened:
        spec = resource_specs.DatabaseSpec.of(resource.spec)
        password = self.password(spec, resource, params[PARAM_DB_USER])
        upstream = Upstream(await connect_tcp(resource))
        try:
            with trio.fail_after(LOGIN_TIMEOUT):
                return await self.login(cluster, resource, spec, params, session, upstream, password)
        except trio.TooSlowError:
            await upstream.stream.aclose()
            raise Refused(ErrorCode.UPSTREAM_UNREACHABLE,
                          f"{resource.name} did not complete the login within {LOGIN_TIMEOUT:.0f}s") from None
        except BaseException:
            await upstream.stream.aclose()
            raise

    def password(self, spec: resource_specs.DatabaseSpec, resource: Resource, db_user: str) -> str | None:
        """The db user's password (``auth = "password"``), else None."""
        if spec.auth != "password":
            return None
        try:
            return spec.password_for(db_user)
        except resource_specs.SpecError as exc:
            log.error("%s_password_missing resource=%s error=%s", self.kind, resource.name, exc)
            raise Refused(ErrorCode.ACCESS_DENIED,
                          f"the cluster has no credentials for db user {db_user!r} on {resource.name}",
                          reason=str(exc)) from None

    def refuse_plaintext(self, spec: resource_specs.DatabaseSpec, resource: Resource) -> Refused:
        """The server will not do TLS, which the resource requires."""
        return Refused(ErrorCode.UPSTREAM_UNREACHABLE,
                       f"{resource.name} does not accept TLS connections, and the resource requires TLS "
                       f"(tls = {spec.tls!r})")

    async def start_tls(self, cluster: Cluster, upstream: Upstream, spec: resource_specs.DatabaseSpec,
                        resource: Resource, db_user: str) -> None:
        """TLS on ``upstream`` now (the protocol asked the server for it):
        ``upstream.stream`` becomes the TLS stream."""
        stream = TLSStream(upstream.tcp, self._contexts.get(cluster.db_client_ca, spec, db_user),
                           server_side=False,
                           server_hostname=spec.server_hostname(resource.address)
                           if spec.tls == "verify-full" else None)
        upstream.stream = stream
        try:
            await stream.do_handshake()
        except trio.BrokenResourceError as exc:
            raise Refused(ErrorCode.UPSTREAM_UNREACHABLE,
                          f"TLS with {resource.name} failed: {exc.__cause__ or exc}") from None

    async def control(self, cluster, resource, request, identity) -> str | None:
        return None

    def acts_on(self, cluster, request) -> LiveSession | None:
        return None

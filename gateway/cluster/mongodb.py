"""The cluster as MongoDB's front door (a stream of ``wicket-mux``, or the
``wicket-mongodb`` route).

Before any byte of the client's reaches the server, the cluster connects
and logs in as the requested db user, with credentials the client never
sees (gateway/cluster/dbkind.py and upstream_auth.py, shared by every
database kind):

* TLS from the first byte when the resource says so (``tls = "require"``
  or ``"verify-full"``, MongoDB has no in-band TLS upgrade), the server's
  certificate verified against ``ca_file`` under ``verify-full``;
* ``auth = "password"``: SCRAM-SHA-256, or SCRAM-SHA-1 when the server's
  hello says the user has only that (``saslSupportedMechs``), with the
  secret from the cluster's environment or a file, the server's signature
  verified (protocols/mongodb/scram.py);
* ``auth = "cert"``: MONGODB-X509 on ``$external`` with a short-lived
  client certificate for the db user whose key lives only in memory.

The server's hello (wire versions, limits, compressors) is kept for the
session: the gateway's client is answered from it, as one server that is
the whole deployment (protocols/mongodb/handshake.py). A hello probe (a
control dial with ``mongodb.probe``) gets only that: a connection of the
cluster's own sends one hello, no login, and closes, and the values go
back in the answer's parameters, so a gateway answers its clients' hellos
before any of them needs a session (gateway/local/mongo.py).

Then the relay carries the session with a
:class:`~gateway.cluster.mongodb_gate.CommandGate` as its message filter
(gateway/net/filters.py): every command is checked against the user's
roles (each database it touches, ``$db`` and ``$out``/``$merge``/
``$lookup`` targets alike), answered in place when it is a hello, a login
attempt or not allowed, and audited. See that module.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import trio

from gateway.cluster import resource_specs
from gateway.cluster.core import Cluster, LiveSession
from gateway.cluster.dbkind import LOGIN_TIMEOUT, PARAM_DB_NAME, PARAM_DB_USER, DatabaseKind, Upstream
from gateway.cluster.dial import Answered, Opened, Refused, connect_tcp
from gateway.cluster.mongodb_gate import CommandGate, integer, stand_in_for
from gateway.cluster.store import Resource
from gateway.identity import pki
from gateway.net.engine import engine
from protocols.dial import DialRequest
from protocols.errors import ErrorCode, ProtocolError
from protocols.mongodb.bson import Binary, Int64
from protocols.mongodb import (
    HELLO_PROBE, MessageReader, OpMsg, OpReply, ScramLogin, ScramLoginError, compressors_of, hello_params,
)
from protocols.signals import NEED_DATA, ConnectionClosed

log = logging.getLogger("wicket.cluster.mongodb")

#: PBKDF2 rounds a server may ask for (its default is 15000 for SHA-256):
#: more would let a hostile upstream burn the cluster's CPU on every login.
MAX_SCRAM_ITERATIONS = 100_000
#: The largest login-phase reply we read (a hello is a few hundred bytes).
MAX_LOGIN_MESSAGE = 1024 * 1024
#: Where users that log in with a password are defined (MongoDB's default
#: authSource), and where X.509 users live.
AUTH_SOURCE, X509_SOURCE = "admin", "$external"
_DRIVER = {"driver": {"name": "wicket-cluster", "version": "1"}, "os": {"type": "Linux"}}


def _check_name(what: str, value: str, *, database: bool = False) -> None:
    # MongoDB: a database name is < 64 bytes without / \ . " $ space or NUL.
    bad = "\x00" if not database else '\x00/\\. "$'
    if not value or len(value.encode()) > (63 if database else 1024) or any(c in value for c in bad):
        raise Refused(ErrorCode.BAD_REQUEST,
                      f"{what} {value[:64]!r} is not a valid MongoDB {'database' if database else 'user'} name")


class MongoKind(DatabaseKind):
    kind = "mongodb"
    def check_params(self, request: DialRequest, identity: pki.Identity) -> dict[str, str]:
        """``db_user`` (default: the user's own name); ``db_name`` only
        when the dial names one (``--db-name``): then the session keeps to
        that database. Without it every command's databases are checked
        against the roles as they come."""
        params = dict(request.params)
        out = {PARAM_DB_USER: params.get(PARAM_DB_USER) or identity.user}
        _check_name("db_user", out[PARAM_DB_USER])
        if params.get(PARAM_DB_NAME):
            _check_name("db_name", params[PARAM_DB_NAME], database=True)
            out[PARAM_DB_NAME] = params[PARAM_DB_NAME]
        if HELLO_PROBE in params:
            # The roles are asked about the same db user and database as
            # for the session the probe stands before.
            out[HELLO_PROBE] = "hello"
        return out

    # -- control dials: the hello probe ---------------------------------------------

    async def control(self, cluster: Cluster, resource: Resource, request: DialRequest,
                      identity: pki.Identity) -> Answered | None:
        """A hello probe: the server's hello values, from a connection that
        sends one hello (TLS first, with the db user's certificate under
        ``auth = "cert"``) and closes; no login, no session."""
        if HELLO_PROBE not in request.params:
            return None
        spec = resource_specs.DatabaseSpec.of(resource.spec)
        db_user = request.params.get(PARAM_DB_USER) or identity.user
        upstream = Upstream(await connect_tcp(resource))
        try:
            with trio.fail_after(LOGIN_TIMEOUT):
                _, hello = await self._hello(cluster, resource, spec, db_user, upstream, None)
        except trio.TooSlowError:
            raise Refused(ErrorCode.UPSTREAM_UNREACHABLE,
                          f"{resource.name} did not answer hello within {LOGIN_TIMEOUT:.0f}s") from None
        except (ProtocolError, ValueError, OSError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            log.warning("mongodb_probe_failed resource=%s error=%r", resource.name, exc)
            raise Refused(ErrorCode.UPSTREAM_UNREACHABLE,
                          f"talking to {resource.name} failed: {getattr(exc, 'message', None) or exc}") from None
        finally:
            await upstream.stream.aclose()
        return Answered("hello probe", hello_params(hello, compressors_of(hello)))

    # -- interrupting a session that is being cut ----------------------------------

    async def interrupt(self, cluster: Cluster, resource: Resource, session: LiveSession, reason: str) -> str:
        """The session is being cut (a lock, a revocation, the certificate's
        end): before the cut closes its connection, stop what it runs on
        the server, from a connection of our own logged in as the same db
        user: ``killSessions`` with the logical sessions its commands named
        (a server ends their running operations and cursors, and aborts
        their transactions), then ``killCursors`` for the cursors it was
        reading (for a server without killSessions; a cursor the client
        never continued is only known to the server). A closed connection
        alone would leave both: MongoDB keeps a session's cursors open for
        10 minutes and its operations running to their end."""
        gate = session.extra.get("mongodb_gate")
        if not isinstance(gate, CommandGate) or gate.refusal is not None:
            return "no server session"
        with engine().lock:  # the relay's thread writes them under it
            lsids, cursors = list(gate.lsids), dict(gate.cursors)
        if not lsids and not cursors:
            return "nothing to stop (no logical session or cursor seen)"
        spec = resource_specs.DatabaseSpec.of(resource.spec)
        try:
            password = self.password(spec, resource, gate.db_user)
            upstream = Upstream(await connect_tcp(resource))
            try:
                with trio.fail_after(LOGIN_TIMEOUT):
                    conversation, hello = await self._hello(cluster, resource, spec, gate.db_user, upstream, password)
                    await self._login(conversation, resource, gate.db_user, password, hello)
                    return await _kill(conversation, lsids, cursors)
            finally:
                await upstream.stream.aclose()
        except _LoginRefused:
            return "killSessions failed: the server refused the cluster's login"
        except (Refused, ProtocolError, OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                trio.TooSlowError) as exc:
            return f"killSessions failed: {getattr(exc, 'message', None) or exc!r}"

    # -- sessions ------------------------------------------------------------------

    async def _hello(self, cluster: Cluster, resource: Resource, spec: resource_specs.DatabaseSpec, db_user: str,
                     upstream: Upstream, password: str | None) -> tuple["_Conversation", dict[str, Any]]:
        """A fresh server connection, to the hello before the login."""
        if spec.tls != "disable":
            # MongoDB has no in-band upgrade: TLS from the first byte.
            await self.start_tls(cluster, upstream, spec, resource, db_user)
        conversation = _Conversation(upstream.stream)
        hello = await conversation.command({
            "hello": 1, "$db": AUTH_SOURCE, "client": _DRIVER, "compression": ["zlib"],
            **({"saslSupportedMechs": f"{AUTH_SOURCE}.{db_user}"} if password is not None else {}),
        })
        if not hello.get("ok"):
            raise Refused(ErrorCode.UPSTREAM_UNREACHABLE,
                          f"{resource.name} answered hello with an error: {_errmsg(hello)}")
        return conversation, hello

    async def login(self, cluster: Cluster, resource: Resource, spec: resource_specs.DatabaseSpec,
                    params: Mapping[str, str], session: LiveSession, upstream: Upstream,
                    password: str | None) -> Opened:
        db_user = params[PARAM_DB_USER]
        conversation, hello = await self._hello(cluster, resource, spec, db_user, upstream, password)
        details: dict[str, Any] = {"db_user": db_user}
        try:
            details["auth"] = await self._login(conversation, resource, db_user, password, hello)
            refusal = None
        except _LoginRefused as exc:
            # The server said no: as PostgreSQL's client gets the server's
            # own error, the driver hears it for each command, in its terms.
            details["login_error"] = refusal = exc.message
        stream, stand_in = upstream.stream, None
        if refusal is not None:
            # Nothing goes to a server that said no: the relay's upstream is
            # a stand-in the gate closes once the client's side ends.
            stream, stand_in = await stand_in_for(stream)
        gate = CommandGate(cluster, session, resource, hello=hello, db_user=db_user,
                           db_name=params.get(PARAM_DB_NAME), refusal=refusal, stand_in=stand_in,
                           snapshot=await cluster.snapshot())
        session.extra["mongodb_gate"] = gate  # for the interrupt: its lsids and cursors
        return Opened(upstream=stream, filter=gate, tap_server=gate.tap_server, finish=gate.finish,
                      reply_params=hello_params(hello, gate.compressors),
                      details={**details,
                               "max_wire_version": integer(hello.get("maxWireVersion")),
                               **({"db_name": params[PARAM_DB_NAME]} if PARAM_DB_NAME in params else {})})

    async def _login(self, upstream: "_Conversation", resource: Resource, db_user: str,
                     password: str | None, hello: dict[str, Any]) -> str:
        """Log in as ``db_user``; the mechanism used. _LoginRefused if the server says no."""
        if password is None:
            reply = await upstream.command({"authenticate": 1, "mechanism": "MONGODB-X509",
                                            "$db": X509_SOURCE})
            if not reply.get("ok"):
                raise _login_refused(resource, db_user, "MONGODB-X509", _errmsg(reply))
            return "MONGODB-X509"
        # SHA-1 only when the server says the user has SHA-1 and not SHA-256
        # (saslSupportedMechs); a server that says nothing gets SHA-256, every
        # server's default since 4.0, where drivers would fall back to SHA-1.
        offered = hello.get("saslSupportedMechs")
        mechanism = "SCRAM-SHA-256"
        if isinstance(offered, list) and "SCRAM-SHA-256" not in offered and "SCRAM-SHA-1" in offered:
            mechanism = "SCRAM-SHA-1"
        login = ScramLogin(username=db_user, password=password, mechanism=mechanism, source=AUTH_SOURCE,
                           max_iterations=MAX_SCRAM_ITERATIONS)
        body: dict[str, Any] | None = login.start()
        try:
            while body is not None:
                body = login.step(await upstream.command(body))
        except ScramLoginError as exc:
            raise _login_refused(resource, db_user, mechanism, exc.message) from None
        return mechanism


async def _kill(conversation: "_Conversation", lsids: list[bytes], cursors: dict[int, tuple[str, str]]) -> str:
    """killSessions, then killCursors per collection: what each did."""
    said = []
    if lsids:
        reply = await conversation.command({"killSessions": [{"id": Binary(4, lsid)} for lsid in lsids],
                                            "$db": AUTH_SOURCE})
        said.append(f"killSessions ({len(lsids)} sessions) "
                    + ("sent" if reply.get("ok") else f"refused: {_errmsg(reply)}"))
    by_collection: dict[tuple[str, str], list[int]] = {}
    for cursor, where in cursors.items():
        by_collection.setdefault(where, []).append(cursor)
    killed = unknown = 0
    for (database, collection), ids in by_collection.items():
        reply = await conversation.command({"killCursors": collection, "cursors": [Int64(i) for i in ids],
                                            "$db": database})
        if reply.get("ok"):
            killed += len(reply.get("cursorsKilled") or ())
            unknown += len(reply.get("cursorsNotFound") or reply.get("cursorsUnknown") or ())
    if cursors:
        said.append(f"killCursors: {killed} killed, {unknown} already closed")
    return "; ".join(said)


def _errmsg(reply: dict[str, Any]) -> str:
    errmsg = reply.get("errmsg")
    return (errmsg if isinstance(errmsg, str) else "no message")[:512]


class _LoginRefused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _login_refused(resource: Resource, db_user: str, mechanism: str, why: str) -> _LoginRefused:
    log.warning("mongodb_login_refused resource=%s db_user=%s mechanism=%s error=%r", resource.name, db_user,
                mechanism, why)
    return _LoginRefused(f"{resource.name} refused the cluster's login as db user {db_user!r} ({mechanism}): "
                         f"{why}; the cluster's credentials for that user need fixing (ask the cluster's "
                         f"administrator)")


class _Conversation:
    """Commands to the server during the login, one at a time."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.reader = MessageReader(max_message_size=MAX_LOGIN_MESSAGE, verify_checksums=False)
        self._ids = 0

    async def command(self, body: dict[str, Any]) -> dict[str, Any]:
        self._ids += 1
        await self.stream.send_all(OpMsg(request_id=self._ids, body=body).encode())
        while True:
            event = self.reader.next_event()
            if event is NEED_DATA:
                data = await self.stream.receive_some(65536)
                self.reader.receive_data(data)
                continue
            if isinstance(event, ConnectionClosed):
                raise trio.BrokenResourceError("the server closed the connection during the login")
            if isinstance(event, OpMsg) and event.response_to == self._ids:
                return dict(event.body)
            if isinstance(event, OpReply) and event.response_to == self._ids and event.documents:
                return dict(event.documents[0])
            raise trio.BrokenResourceError(f"the server sent an unexpected {type(event).__name__} during the login")


MONGODB = MongoKind()

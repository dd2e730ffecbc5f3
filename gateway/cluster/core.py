"""The cluster's state in one object: config, store, CAs, live sessions.

Everything here is shared by the API route and the data routes. The store is
synchronous SQLite; every call goes through :meth:`Cluster.db`, which runs it
on the store's own thread (gateway/cluster/storethread.py) one at a time, so
the event loop never blocks on a disk sync. The CLI (another process) writes to the same store; the lock watcher
notices its changes through the store's change counter.
"""

from __future__ import annotations

import collections
import datetime as dt
import logging
import math
import secrets
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import attrs
import trio
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from gateway import kinds
from gateway.cluster import bots
from gateway.cluster import config as cfg
from gateway.cluster.admission import UNAUTHENTICATED_PER_ADDRESS, AddressSlots
from gateway.cluster.audit import AuditLog
from gateway.cluster.auditflush import AuditFlusher
from gateway.cluster.rbac import Role
from gateway.cluster.sharedcounts import SharedCounts, WorkerPlace
from gateway.cluster.store import Resource, Store, StoreError, User
from gateway.cluster.storethread import StoreThread
from gateway.cluster.tally import OVERFLOW, Tally
from gateway.identity import pki, tlsconf
from gateway.identity.pki import utcnow
from gateway.net.descriptors import open_files_limit
from gateway.private_files import ensure_private_dir
from protocols.errors import ErrorCode

log = logging.getLogger("wicket.cluster")
T = TypeVar("T")

LOCK_POLL_INTERVAL = 0.5
#: How long a cut waits for the kind's interrupt (a CancelRequest) before it
#: closes the session anyway.
INTERRUPT_TIMEOUT = 2.0
#: How much longer than its certificate an interruptible session may last:
#: the lock watcher's look (every LOCK_POLL_INTERVAL) and the interrupt.
CUT_GRACE = INTERRUPT_TIMEOUT + 2 * LOCK_POLL_INTERVAL
#: Why a session may be cut: for these the kind interrupts it upstream first.
CUT_REASONS = frozenset({"user_locked", "user_removed", "cert_revoked", "cert_expired"})
IDENTITY_CACHE = 4096
MAX_CONNECTIONS = 20_000
#: Argon2 hashes (19 MiB each) computing at once, in all workers together.
PASSWORD_SLOTS = 4
HOST_CERT_RENEW_BEFORE = dt.timedelta(days=30)
#: How often the store's audit is pruned to ``[audit] keep`` (and at start).
RETENTION_INTERVAL = 3600.0
#: Audit events deleted per transaction (and per turn on the store's thread)
#: when pruning: a few milliseconds, so logins waiting for the store, here
#: or in another process, wait no longer than that.
RETENTION_BATCH = 1000
#: User names one client address gets audited by name per minute when its
#: logins are refused by the rate limit; the rest are counted together.
LOGIN_REFUSAL_USERS = 10


@attrs.frozen(slots=True)
class Snapshot:
    counter: int
    users: dict[str, User]
    locks: dict[str, Any]
    roles: dict[str, Role]
    resources: dict[str, Resource]
    #: Serials of revoked certificates that have not expired yet.
    revoked: frozenset[int] = frozenset()
    #: user -> why their certificates were last revoked at once.
    revocations: dict[str, str] = attrs.field(factory=dict)
    #: Bots by name (gateway/cluster/bots.py): identities of kind "bot".
    bots: dict[str, Any] = attrs.field(factory=dict)


class AtCapacity(Exception):
    """A new session would pass a limit (``[limits]``): the message names
    it, for the user; ``limit`` is its key, for the audit."""

    def __init__(self, message: str, limit: str) -> None:
        super().__init__(message)
        self.message, self.limit = message, limit


@attrs.define(eq=False)
class LiveSession:
    id: str
    user: str
    resource: str
    kind: str
    started: float
    cancel_scope: trio.CancelScope
    end_reason: str | None = None
    # Kind-specific state other dials may need (PostgreSQL: the upstream
    # backend's key, for routing a cancel).
    extra: dict[str, Any] = attrs.field(factory=dict)
    # Ends a session the relay engine runs without a trio task (a mux
    # stream started in the engine's thread); others are cut by their scope.
    cut: Callable[[str], None] | None = None
    cancelled: bool = False
    # The certificate the session was allowed with (set once allowed), or
    # the one its multiplexed connection was renewed with since
    # (gateway/cluster/linkrenewal.py): a revocation of it cuts the session.
    identity: pki.Identity | None = None
    # The serials of the connection's earlier certificates still in date:
    # revoking one of them cuts the session too.
    earlier_serials: tuple[int, ...] = ()
    # The kind's hook that stops what the session is doing upstream (a
    # PostgreSQL CancelRequest: RouteKind.interrupt), awaited before a lock,
    # a revocation or the certificate's expiry cuts the session, so a
    # running statement ends with it. Once.
    interrupt: Callable[[str], Awaitable[str]] | None = None
    interrupting: bool = False

    def cancel(self, reason: str) -> None:
        """End the session (from trio's thread), with ``reason`` in its
        session.end event."""
        if self.cancelled:
            return
        self.cancelled = True
        self.end_reason = reason
        if self.cut is not None:
            self.cut(reason)
        else:
            self.cancel_scope.cancel()


def _repeats(event: str, field: str, records: list[dict[str, Any]]) -> list[tuple]:
    """The audit events of a (user, ``field``) tally's finished windows: the
    refusals after each window's first (audited when it happened), as one
    ``event`` with ``repeats``."""
    out = []
    for r in records:
        if r["count"] < 2:
            continue
        user, value = r["key"] if isinstance(r["key"], tuple) else (None, r["key"])
        out.append((event, None if user in ("-", OVERFLOW) else user, {
            field: value, "repeats": r["count"] - 1, "first_seen": r["first_seen"],
            "last_seen": r["last_seen"], "window_seconds": r["window_seconds"]}, r["last_seen"]))
    return out


class Cluster:
    """Open with :meth:`open`; one per process. ``worker``: this process is
    one of several serving connections (gateway/cluster/workers.py): the
    supervisor wrote the config's roles and resources and the host
    certificate before it started, sessions per user and logins in progress
    are counted across the workers (gateway/cluster/sharedcounts.py), and
    the caps on what one process holds at once (Argon2 slots,
    unauthenticated connections per address) are split between them."""

    def __init__(self, config: cfg.ClusterConfig, store: Store, worker: WorkerPlace | None = None) -> None:
        self.config = config
        self.store = store
        self.worker = worker
        self.shared = None if worker is None else SharedCounts(worker.counts, worker.count, worker.index)
        # The store's calls, one at a time, in order (gateway/cluster/storethread.py).
        self.store_thread = StoreThread()
        self.sessions: dict[str, LiveSession] = {}
        # What one user and one connection may hold, and the descriptors
        # sessions may not take (config [limits], resolved against the open
        # files limit the CLI raised at start); sessions per user, and
        # connections open, counted under _count_lock (trio's thread and
        # the relay engine's both start and end sessions).
        self.open_files = open_files_limit()
        self.limits = config.limits.resolve(self.open_files)
        self.user_sessions: collections.Counter[str] = collections.Counter()
        self.open_connections = 0
        self._count_lock = threading.Lock()
        # Dials refused at a limit: the first per user, limit and minute is
        # audited in full, the rest as one count (one user's flood of
        # streams must not flood the audit).
        self.limit_refusals = Tally()
        # Upstream connects the relay engine still waits for (a _Connecting
        # each; touched under the engine's lock): the cluster gives up on
        # them when it stops, so that their dials are on record.
        self.engine_connects: set[Any] = set()
        # Bounds on what peers can make us hold: connections in progress, and
        # Argon2 hashes (19 MiB each) computing at once.
        self.connection_slots = trio.Semaphore(MAX_CONNECTIONS)
        # Connections per address that have not shown a session certificate.
        self.unauthenticated = AddressSlots(UNAUTHENTICATED_PER_ADDRESS if worker is None
                                            else worker.share(UNAUTHENTICATED_PER_ADDRESS, least=8))
        self.password_limiter = trio.CapacityLimiter(PASSWORD_SLOTS if worker is None
                                                     else worker.share(PASSWORD_SLOTS))
        # Logins in progress per ("user", name) and ("host", address).
        self.login_attempts: collections.Counter = collections.Counter()
        # A second connection, used only from the event loop for the cheap
        # freshness check (the store's thread owns the first).
        self._reader = Store.open(config.state_dir / "wicket.db")
        # And one for the relay engine's thread, which must never wait on
        # the file (every session's bytes would wait with it): if SQLite is
        # busy, the dial takes trio's path instead.
        self._engine_reader = Store.open(config.state_dir / "wicket.db", busy_timeout=0.0)
        self._snapshot: Snapshot | None = None
        # Parsed identities of recent certificates (parsing is pure, and a
        # gateway presents the same certificate on every dial).
        self._identities: dict[bytes, pki.Identity] = {}
        # Handshakes refused for a certificate from an unknown CA: audited
        # once per source and minute (gateway/cluster/tally.py).
        self.unknown_ca = Tally()
        # Logins refused by the rate limit: the first per user, address and
        # minute is audited at once, the rest as one count; past
        # LOGIN_REFUSAL_USERS user names from one address in a minute, the
        # address's others are counted together (a client may name a new
        # user on every try).
        self.login_refusals = Tally(max_per_group=LOGIN_REFUSAL_USERS)
        # Renewals refused on a multiplexed connection (linkrenewal.py): the
        # first per user, code and minute is audited in full, the rest as
        # one count (an agent retrying a refused renewal must not flood it).
        self.renew_refusals = Tally()
        now = utcnow()
        state = config.state_dir
        self.user_ca = pki.CertificateAuthority.load_or_create(
            state, "user_ca", f"{config.name} user CA", now=now
        )
        self.host_ca = pki.CertificateAuthority.load_or_create(
            state, "host_ca", f"{config.name} host CA", now=now
        )
        # PostgreSQL (and later MySQL) servers trust this CA for `cert` auth:
        # the cluster signs a short-lived certificate with CN=db_user per
        # connection, so no database password is stored anywhere.
        self.db_client_ca = pki.CertificateAuthority.load_or_create(
            state, "db_client_ca", f"{config.name} database client CA", now=now
        )
        self.ssh_user_ca = pki.load_or_create_ssh_ca(state)
        self.ssh_host_ca = pki.load_or_create_ssh_ca(state, "ssh_host_ca", "wicket-ssh-host-ca")
        # A worker takes the certificate its supervisor made sure of.
        self.host_cert_path, self.host_key_path = self.ensure_host_cert(now) if worker is None else \
            (state / "host.crt", state / "host.key")
        self.server_context = tlsconf.cluster_server_context(
            self.host_cert_path, self.host_key_path, state / "user_ca.crt",
            alpn=(tlsconf.ALPN_HTTP, tlsconf.ALPN_MUX, *kinds.alpn_ids()),
        )
        self.audit_log = AuditLog(store, config.audit_jsonl)
        # Events queued from any thread, written in batches by trio's
        # (gateway/cluster/auditflush.py); the tallies queue theirs there too.
        self.audit_flusher = AuditFlusher(
            lambda batch: self.db(self.audit_log.write_many, batch), self._queue_tallies,
            lambda: bool(self.unknown_ca or self.login_refusals or self.limit_refusals or self.renew_refusals))
        self._audit_pending = self.audit_flusher.pending

    @classmethod
    def open(cls, config: cfg.ClusterConfig, worker: WorkerPlace | None = None) -> "Cluster":
        ensure_private_dir(config.state_dir)
        store = Store.open(config.state_dir / "wicket.db")
        try:
            cluster = cls(config, store, worker)
            if worker is None:
                cluster._sync_config()
        except BaseException:
            store.close()
            raise
        return cluster

    def close(self) -> None:
        self.store_thread.close()
        self.audit_log.close()
        self._reader.close()
        self._engine_reader.close()
        self.store.close()
        if self.shared is not None:
            self.shared.close()

    # -- start-up ------------------------------------------------------------

    def ensure_host_cert(self, now: dt.datetime) -> tuple[Path, Path]:
        """Issue the listener's certificate from the host CA, again whenever
        the configured names change or it nears its end."""
        state = self.config.state_dir
        cert_path, key_path = state / "host.crt", state / "host.key"
        names = list(self.config.public_names)
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            try:
                san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                have = {str(v) for v in san.get_values_for_type(x509.DNSName)} | {
                    str(v) for v in san.get_values_for_type(x509.IPAddress)
                }
            except x509.ExtensionNotFound:
                have = set()
            fresh = cert.not_valid_after_utc - now > HOST_CERT_RENEW_BEFORE
            if have == set(names) and fresh and cert.issuer == self.host_ca.cert.subject:
                return cert_path, key_path
        key = pki.generate_key()
        cert = self.host_ca.issue_host_cert(key.public_key(), names, now=now)
        pki.write_private(key_path, pki.key_to_pem(key))
        # The chain includes the host CA so a gateway can verify against the pin.
        pki.write_public(cert_path, pki.cert_to_pem(cert) + self.host_ca.pem)
        return cert_path, key_path

    def _sync_config(self) -> None:
        """Roles and resources declared in the config file are (re)written to
        the store on every start, marked source=config; the CLI's own survive."""
        declared_roles = {role.name for role in self.config.roles}
        declared_resources = {spec.name for spec in self.config.resources}
        # What an earlier config declared and this one no longer does goes.
        for record in self.store.list_roles():
            if record.source == "config" and record.name not in declared_roles:
                self.store.delete_role(record.name)
        for resource in self.store.list_resources():
            if resource.source == "config" and resource.name not in declared_resources:
                self.store.delete_resource(resource.name)
        for role in self.config.roles:
            self.store.put_role(role.name, role.to_spec(), "config")
        for spec in self.config.resources:
            self.store.put_resource(
                Resource(
                    name=spec.name,
                    kind=spec.kind,
                    address=spec.address,
                    labels=dict(spec.labels),
                    spec=dict(spec.extra),
                    source="config",
                )
            )

    # -- store access --------------------------------------------------------

    async def db(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.store_thread.run(partial(fn, *args, **kwargs))

    async def audit(self, event: str, user: str | None, **fields: Any) -> None:
        """Write an event now (after any batched ones, so order is kept)."""
        await self.audit_flusher.audit(event, user, **fields)

    def audit_soon(self, event: str, user: str | None, **fields: Any) -> None:
        """Queue a high-volume event (a statement); written within
        AUDIT_FLUSH_INTERVAL, in order, many per transaction. Safe to call
        from any thread (the relay engine's audit taps do)."""
        self.audit_flusher.audit_fields_soon(event, user, fields)

    def audit_fields_soon(self, event: str, user: str | None, fields: dict[str, Any]) -> None:
        """:meth:`audit_soon` with the fields as a dict the caller gives up
        (the statement taps build theirs once, not twice)."""
        self.audit_flusher.audit_fields_soon(event, user, fields)

    def note_unknown_ca(self, client_host: str, error: str) -> None:
        """(trio's thread) A handshake refused: the peer's certificate is
        not from the user CA. Audited later, counted with the others from
        its source in the same minute."""
        self.unknown_ca.note(client_host, error, time.time())

    def note_login_refusal(self, user: str, client_host: str) -> bool:
        """(trio's thread) A login refused by the rate limit; True if it is
        the first for this user and address this minute (audit that one
        now: the rest are audited as one count when the minute is over)."""
        return self.login_refusals.note((user, client_host), "", time.time(), group=client_host)

    def note_renew_refusal(self, user: str | None, code: str) -> bool:
        """(trio's thread) A connection's renewal refused; True if it is the
        first for this user and code this minute (audit and log that one
        now: the rest are audited as one count when the minute is over)."""
        return self.renew_refusals.note((user or "-", code), "", time.time())

    def _queue_tallies(self, now: float | None) -> None:
        """Audit the tallies' records of windows that are over (``now``
        None: all of them, the cluster is stopping)."""
        def over(tally: Tally) -> list[dict[str, Any]]:
            return tally.drain() if now is None else tally.due(now)

        queue = self._audit_pending
        for r in over(self.unknown_ca):
            queue.append(("handshake.refused", None, {
                "reason": "unknown_ca", "client_host": r["key"], "count": r["count"], "first_seen": r["first_seen"],
                "last_seen": r["last_seen"], "window_seconds": r["window_seconds"], "error": r["error"],
            }, r["last_seen"]))
        for r in over(self.login_refusals):
            if r["count"] < 2:  # the first was audited when it happened
                continue
            user, host = r["key"] if isinstance(r["key"], tuple) else (None, r["key"])  # the overflow: "*"
            fields = {"client_host": host, "repeats": r["count"] - 1, "first_seen": r["first_seen"],
                      "last_seen": r["last_seen"], "window_seconds": r["window_seconds"]}
            if user == OVERFLOW:  # the address's users past LOGIN_REFUSAL_USERS, together
                user, fields["other_users"] = None, True
            queue.append(("login.rate_limited", user, fields, r["last_seen"]))
        with self._count_lock:
            limited = over(self.limit_refusals)
        queue.extend(_repeats("dial.limited", "limit", limited))
        queue.extend(_repeats("link.renew_denied", "code", over(self.renew_refusals)))

    async def flush_audit(self, *, backlog: bool = False) -> None:
        """Write the queued events (see AuditFlusher.flush_audit)."""
        await self.audit_flusher.flush_audit(backlog=backlog)

    async def run_audit_flusher(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self.audit_flusher.run(task_status=task_status)

    async def run_retention(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Prune the store at start and every hour: audit events older than
        ``[audit] keep`` (if set), and revocations of certificates that have
        expired anyway."""
        task_status.started()
        keep = self.config.audit_keep
        while True:
            now = time.time()
            try:
                revoked = await self.db(self.store.prune_revoked_certs, now)
                pruned = 0 if keep is None else await self.prune_audit(now - keep)
            except (StoreError, OSError) as exc:
                log.error("retention_failed error=%s action=%s", exc, "check the store; retrying in an hour")
            else:
                if pruned or revoked:
                    log.info("retention_pruned audit_events=%d revocations=%d keep=%s", pruned, revoked,
                             "forever" if keep is None else f"{keep:.0f}s")
            await trio.sleep(RETENTION_INTERVAL)

    async def prune_audit(self, before: float) -> int:
        """Delete the store's audit events older than ``before``; how many.
        One batch per transaction and per turn on the store's thread (whose
        limiter hands turns out in order), so a first prune of millions of
        rows never keeps a login from its store reads for more than a batch."""
        total = 0
        while True:
            deleted = await self.db(self.store.prune_audit_batch, before, RETENTION_BATCH)
            total += deleted
            if deleted < RETENTION_BATCH:
                return total

    async def roles_of(self, user: User, claimed: tuple[str, ...] | None = None) -> list[Role]:
        return self.roles_in(await self.snapshot(), user, claimed)

    async def session_roles(self, session: "LiveSession") -> list[Role]:
        """The roles a live session's user holds now (none if the user is
        gone), limited to those its certificate claims, for what a kind
        decides beside the dial (LOAD DATA LOCAL, agent forwarding)."""
        snap = await self.snapshot()
        user = snap.users.get(session.user)
        claimed = session.identity.roles if session.identity is not None else None
        return [] if user is None else self.roles_in(snap, user, claimed)

    @staticmethod
    def roles_in(snap: "Snapshot", user: User, claimed: tuple[str, ...] | None = None) -> list[Role]:
        """The user's current roles (intersected with those in a certificate,
        so removing a role from a user takes effect before the cert expires)."""
        roles = []
        for name in user.roles:
            if claimed is not None and name not in claimed:
                continue
            if name not in snap.roles:
                log.warning("role_missing user=%s role=%s action=%s", user.name, name,
                            "create the role or remove it from the user")
                continue
            roles.append(snap.roles[name])
        return roles

    # -- who is on the other end of a TLS connection -------------------------

    # -- the access snapshot -------------------------------------------------

    def _load_snapshot(self) -> "Snapshot":
        # The counter first: a change racing with this load makes the next
        # check see a newer counter and load again.
        counter = self.store.change_counter()
        roles = {}
        for record in self.store.list_roles():
            try:
                roles[record.name] = Role.from_spec(record.name, record.spec)
            except ValueError as exc:
                log.error("role_invalid role=%s error=%s action=%s", record.name, exc, "fix the role")
        return Snapshot(
            counter=counter,
            users={u.name: u for u in self.store.list_users()},
            locks={lock.user: lock for lock in self.store.list_locks()},
            roles=roles,
            resources={r.name: r for r in self.store.list_resources()},
            revoked=frozenset(r.serial for r in self.store.list_revoked_certs(live_at=time.time())),
            revocations=self.store.revocation_reasons(),
            bots={b.name: b for b in bots.list_bots(self.store)},
        )

    async def snapshot(self) -> "Snapshot":
        """Users, locks, roles and resources as of now.

        Checking freshness is one indexed read on a connection of the event
        loop's own (WAL readers never wait for writers), so a lock written by
        the CLI a moment ago refuses the very next dial; the tables are
        re-read, on the store's thread, only after something changed."""
        snap = self._snapshot
        if snap is None or self._reader.change_counter() != snap.counter:
            snap = self._snapshot = await self.db(self._load_snapshot)
        return snap

    def fresh_snapshot(self) -> "Snapshot | None":
        """(the relay engine's thread) The snapshot if nothing changed since
        it was loaded (one indexed read that never waits), else None."""
        snap = self._snapshot
        if snap is None:
            return None
        try:
            if self._engine_reader.change_counter() != snap.counter:
                return None
        except StoreError:  # busy: let trio's path wait for it
            return None
        return snap

    async def identify(self, der_cert: bytes | None) -> tuple[pki.Identity, User, list[Role]]:
        """Turn a verified peer certificate into a live identity, or raise
        :class:`pki.CertError` with the typed code to send back."""
        return self.identify_in(await self.snapshot(), der_cert)

    def identify_in(self, snap: "Snapshot", der_cert: bytes | None) -> tuple[pki.Identity, User, list[Role]]:
        """:meth:`identify` against ``snap`` (pure but for the parse cache;
        any thread)."""
        if not der_cert:
            raise pki.CertError(
                ErrorCode.CERT_REQUIRED,
                "this route needs a session certificate",
            )
        identity = self.parse_identity(der_cert)
        if identity.cluster != self.config.name:
            raise pki.CertError(ErrorCode.CERT_INVALID, "certificate is for another cluster")
        pki.check_validity(identity, utcnow())
        user = self.check_standing(snap, identity)
        return identity, user, self.roles_in(snap, user, identity.roles)

    def parse_identity(self, der_cert: bytes) -> pki.Identity:
        """The identity a certificate claims (OpenSSL verified its chain;
        nothing else is checked here); :class:`pki.CertError` if unreadable."""
        identity = self._identities.get(der_cert)
        if identity is None:
            identity = pki.identity_from_cert(x509.load_der_x509_certificate(der_cert))
            if len(self._identities) >= IDENTITY_CACHE:
                self._identities.clear()
            self._identities[der_cert] = identity
        return identity

    def claimed_user(self, der_cert: bytes | None) -> str | None:
        """Whom a refused certificate names (an expired one, a locked
        user's), for the audit: a claim, since the checks refused it."""
        if not der_cert:
            return None
        try:
            return self.parse_identity(der_cert).user
        except (pki.CertError, ValueError):
            return None

    @staticmethod
    def check_standing(snap: "Snapshot", identity: pki.Identity) -> User:
        """The certificate's user, if they still exist, are not locked and
        the certificate is not revoked; else :class:`pki.CertError`. The
        messages say what happened; the next step is added by whoever shows
        them (the gateway for a dial, :mod:`api` for the API), once."""
        if identity.kind == "bot":
            user = snap.bots.get(identity.user)
            if user is None:
                raise pki.CertError(ErrorCode.ACCESS_DENIED, f"bot {identity.user} no longer exists")
        else:
            user = snap.users.get(identity.user)
            if user is None:
                raise pki.CertError(ErrorCode.ACCESS_DENIED, f"user {identity.user} no longer exists")
        lock = snap.locks.get(identity.user)
        if lock is not None:
            raise pki.CertError(ErrorCode.USER_LOCKED, f"{'bot' if identity.kind == 'bot' else 'user'} "
                                                         f"{identity.user} is locked ({lock.reason})")
        # cert_expired: every gateway knows it means "log in again".
        if identity.generation < user.cert_generation:
            why = snap.revocations.get(identity.user, "revoked by an administrator")
            raise pki.CertError(ErrorCode.CERT_EXPIRED, f"this session certificate was revoked ({why})")
        if identity.serial in snap.revoked:
            raise pki.CertError(ErrorCode.CERT_EXPIRED,
                                "this session certificate was revoked (`wicket-cluster certs revoke`)")
        return user

    # -- live sessions -------------------------------------------------------

    def new_session(self, user: str, resource: str, kind: str) -> LiveSession:
        """A live session for ``user``; raises :class:`AtCapacity` past the
        user's limit or when only the reserved descriptors are left (any
        thread)."""
        limits = self.limits
        per_user = AtCapacity(f"you have {limits.streams_per_user} sessions open, the most one user may "
                              f"(the cluster's limits.streams_per_user); close some and try again",
                              "streams_per_user")
        with self._count_lock:
            if self.shared is None and self.user_sessions[user] >= limits.streams_per_user:
                raise per_user
            # Descriptors are each process's own: counted here alone.
            if len(self.sessions) + self.open_connections >= self.open_files - limits.reserve_fds:
                raise AtCapacity(f"the cluster holds as many sessions as its open files limit allows "
                                 f"({self.open_files}, less limits.reserve_fds = {limits.reserve_fds} kept for "
                                 f"its API); try again later", "open_files")
            # One user's sessions in all the workers together.
            if self.shared is not None and not self.shared.take(("user", user), limits.streams_per_user):
                raise per_user
            session = LiveSession(
                id=secrets.token_hex(8),
                user=user,
                resource=resource,
                kind=kind,
                started=time.time(),
                cancel_scope=trio.CancelScope(),
            )
            self.sessions[session.id] = session
            self.user_sessions[user] += 1
        return session

    def end_session(self, session: LiveSession) -> None:
        with self._count_lock:
            if self.sessions.pop(session.id, None) is not None:
                if self.shared is not None:
                    self.shared.add(("user", session.user), -1)
                self.user_sessions[session.user] -= 1
                if self.user_sessions[session.user] <= 0:
                    del self.user_sessions[session.user]

    def logins_started(self, keys: tuple[tuple[str, ...], ...]) -> list[int]:
        """(trio) A login began for each of ``keys`` (a user and address, an
        address): how many others were in progress for each, in every
        worker. :meth:`logins_ended` when it is over."""
        if self.shared is not None:
            return [self.shared.add(key) - 1 for key in keys]
        inflight = self.login_attempts
        for key in keys:
            inflight[key] += 1
        return [inflight[key] - 1 for key in keys]

    def logins_ended(self, keys: tuple[tuple[str, ...], ...]) -> None:
        if self.shared is not None:
            for key in keys:
                self.shared.add(key, -1)
            return
        inflight = self.login_attempts
        for key in keys:
            inflight[key] -= 1
            if not inflight[key]:
                del inflight[key]

    def connection_opened(self) -> None:
        with self._count_lock:
            self.open_connections += 1

    def connection_closed(self) -> None:
        with self._count_lock:
            self.open_connections -= 1

    def note_limit_refusal(self, user: str | None, limit: str) -> bool:
        """(any thread) A dial refused at ``limit``; True if it is the first
        for this user and limit this minute (audit and log that one now:
        the rest are audited as one count when the minute is over)."""
        with self._count_lock:
            return self.limit_refusals.note((user or "-", limit), "", time.time())

    async def watch_locks(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Cut the live sessions of users who get locked or removed, and of
        certificates that get revoked (within 2 s: the snapshot's freshness
        is checked every 0.5 s)."""
        task_status.started()
        async with trio.open_nursery() as cuts:
            while True:
                await trio.sleep(LOCK_POLL_INTERVAL)
                snap = await self.snapshot()
                for session in list(self.sessions.values()):
                    if session.cancelled or session.interrupting:
                        continue
                    reason = self.cut_reason(snap, session)
                    if reason is None and self.expired(session):
                        reason = "cert_expired"
                    if reason is not None:
                        log.info("session_cut session=%s user=%s reason=%s", session.id, session.user, reason)
                        cuts.start_soon(self.cut, session, reason)

    def expired(self, session: LiveSession) -> bool:
        """An interruptible session whose certificate ran out: cut here,
        with the interrupt, a moment before its own deadline would end it
        without one (gateway/cluster/dial.py's ``run_session``)."""
        return (session.interrupt is not None and session.identity is not None
                and self.config.disconnect_expired_cert and session.identity.not_after <= utcnow())

    def expiry_deadline(self, session: LiveSession) -> float:
        """(trio) When ``session``'s cancel scope is to end it for its
        certificate's expiry: never without ``disconnect_expired_cert``; an
        interruptible one CUT_GRACE later, since the lock watcher cuts it at
        expiry with the interrupt first (this is the backstop)."""
        if not self.config.disconnect_expired_cert or session.identity is None:
            return math.inf
        left = (session.identity.not_after - utcnow()).total_seconds()
        if session.interrupt is not None:
            left += CUT_GRACE
        return trio.current_time() + max(0.0, left)

    async def cut(self, session: LiveSession, reason: str) -> None:
        """End ``session`` for ``reason`` (one of :data:`CUT_REASONS`): the
        kind first stops what it runs upstream (``session.interrupt``, at
        most INTERRUPT_TIMEOUT), audited, then the session is cut."""
        if session.interrupt is not None and not session.interrupting:
            session.interrupting = True
            # The interrupt may end the session by itself (the client
            # gives up on its cancelled statement and quits) before the cut
            # below: it still ended for this reason.
            if session.end_reason is None:
                session.end_reason = reason
            result = "timed out"
            with trio.move_on_after(INTERRUPT_TIMEOUT):
                try:
                    result = await session.interrupt(reason)
                except Exception as exc:  # the cut goes on whatever happened upstream
                    log.warning("session_interrupt_failed session=%s error=%r", session.id, exc)
                    result = f"failed: {exc}"
            self.audit_soon("session.interrupt", session.user, session_id=session.id, resource=session.resource,
                            kind=session.kind, reason=reason, result=result)
        session.cancel(reason)

    @staticmethod
    def cut_reason(snap: "Snapshot", session: LiveSession) -> str | None:
        """Why ``session`` must end now (its session.end reason), or None."""
        if session.user in snap.locks:
            return "user_locked"
        if session.identity is None:  # not allowed yet: checked once it is
            return None
        if session.earlier_serials and not snap.revoked.isdisjoint(session.earlier_serials):
            return "cert_revoked"
        try:
            Cluster.check_standing(snap, session.identity)
        except pki.CertError as exc:
            return "user_removed" if exc.code is ErrorCode.ACCESS_DENIED else "cert_revoked"
        return None

    def host_ca_pem(self) -> str:
        return self.host_ca.pem.decode("ascii")

    def public_key_from_pem(self, pem: str):
        try:
            key = serialization.load_pem_public_key(pem.encode("ascii"))
        except (ValueError, UnicodeEncodeError, TypeError, UnsupportedAlgorithm):
            raise pki.CertError(ErrorCode.BAD_REQUEST, "public_key is not a PEM public key") from None
        if not pki.acceptable_session_key(key):
            raise pki.CertError(ErrorCode.BAD_REQUEST, "session keys must be ECDSA P-256 or Ed25519")
        return key

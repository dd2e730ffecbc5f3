"""Dials on the cluster's data routes, from the gateway.

:class:`Dialer` opens a TLS connection per dial (a warm pool of them ready
ahead of need); :class:`MuxDialer` carries sessions as streams of one
multiplexed connection (protocols/mux.py), which a renewed certificate is
presented on (protocols/linkrenewal.py), replaced after a new login, a
sleep or a stall.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from typing import Awaitable, Callable

import attrs
import trio

from gateway.identity import pki, tlsconf
from gateway.local.connect import ClusterError, Outage, connect_cluster
from gateway.local.profile import Profile, ProfileError, expired_message
from gateway.net.engine import engine
from gateway.net.muxlink import LinkClosed, MuxLink
from gateway.net.tcp import SLEEP_LIMIT, time_suspended
from gateway.net.tls import TLSStream
from protocols.dial import DialAccept, DialConnection, DialError, DialRequest, NEED_DATA, Role
from protocols import linkrenewal
from protocols.errors import ErrorCode, ProtocolError
from protocols.mux import Role as MuxRole

# Longer than the cluster's own worst case (10 s to connect upstream plus 30 s
# to log in), so its typed answer arrives rather than our timeout.
DIAL_TIMEOUT = 60.0
#: How long presenting a renewed certificate on a live connection may take
#: (two small exchanges and a look at the cluster's store).
RENEW_TIMEOUT = 10.0

log = logging.getLogger("wicket.client")


class DialRefused(Exception):
    def __init__(self, error: DialError) -> None:
        super().__init__(error.message)
        self.error = error


@attrs.frozen(slots=True)
class Dialed:
    stream: TLSStream
    accept: DialAccept
    trailing: bytes  # the first upstream bytes, which arrived with the accept


@attrs.frozen(slots=True)
class _Pooled:
    """A ready connection of the warm pool, and what decides whether it may
    still carry a dial."""

    created: float  # trio.current_time() before it was opened
    slept: float  # time_suspended() then
    ctx: ssl.SSLContext
    stream: TLSStream


class Dialer:
    """Opens data-route connections for one profile, reusing one TLS context
    (and the last session ticket, so later dials resume: one round trip less).

    With :meth:`run_pool` running, a few connections are kept handshaken and
    ready, so a client's connection costs only the dial frame's round trip.
    A pooled connection is used only while younger than ``POOL_MAX_AGE`` (the
    cluster waits ``10 s`` for a dial frame); older ones are closed and
    replaced, and so is one opened before the machine slept (see
    gateway/net/tcp.py). A pooled connection the cluster dropped meanwhile
    is retried once on a fresh one."""

    POOL_MAX_AGE = 5.0

    def __init__(self, profile: Profile, alpn: str) -> None:
        self.profile = profile
        self.alpn = alpn
        self._cert_stamp: tuple[int, int] | None = None
        self._cert_file = str(profile.cert_path)
        self._not_after = 0.0
        self._ctx: ssl.SSLContext
        self.identity: pki.Identity
        #: The certificate (DER) and key ``_ctx`` was made with, to present
        #: on a live connection (:meth:`MuxDialer.link`); replaced with it.
        self.credential: tuple[bytes, object]
        self._session: ssl.SSLSession | None = None
        self._pool: list[_Pooled] = []
        self._pool_wakeup = trio.Event()
        self.pool_hits = 0
        self._reload_if_changed()

    async def run_pool(self, size: int = 2, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep ``size`` ready connections until cancelled."""
        task_status.started()
        outage = Outage()
        try:
            while True:
                self._pool_wakeup = trio.Event()  # before the work: a dial meanwhile wakes the next wait
                for item in [i for i in self._pool if not self._fresh(i)]:
                    self._pool.remove(item)
                    await item.stream.aclose()
                while len(self._pool) < size:
                    ctx = self._ctx
                    # Read before connecting: a sleep during the handshake
                    # counts as after it, so the connection is not trusted.
                    created, slept = trio.current_time(), time_suspended()
                    try:
                        stream = await connect_cluster(self.profile.host, self.profile.port, ctx,
                                                self.profile.host, self._session)
                    except ClusterError as exc:
                        outage.failed(exc)
                        break  # the dials themselves report it to their clients; try again later
                    outage.ended()
                    self._pool.append(_Pooled(created, slept, ctx, stream))
                with trio.move_on_after(self.POOL_MAX_AGE / 2):
                    await self._pool_wakeup.wait()
        finally:
            pool, self._pool = self._pool, []
            with trio.CancelScope(shield=True):
                for item in pool:
                    await item.stream.aclose()

    @property
    def pool_ready(self) -> int:
        """Connections ready to carry a dial now."""
        return sum(self._fresh(item) for item in self._pool)

    def _fresh(self, item: _Pooled) -> bool:
        """Whether a pooled connection may still carry a dial."""
        return (trio.current_time() - item.created <= self.POOL_MAX_AGE and item.ctx is self._ctx
                and time_suspended() - item.slept <= SLEEP_LIMIT)

    def _take_pooled(self) -> TLSStream | None:
        if self._pool:
            self._pool_wakeup.set()  # run_pool: make up for it, or replace them all
            item = self._pool.pop()  # the newest
            if self._fresh(item):
                return item.stream
            self._pool.insert(0, item)  # run_pool closes it
        return None

    def _reload_if_changed(self) -> None:
        """Pick up a new certificate (``wicket login`` while a proxy runs)
        with one stat() per dial instead of re-reading files every time."""
        try:
            st = self.profile.cert_path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
            if stamp != self._cert_stamp:
                credential = self.profile.credential()
                self._ctx = self.profile.client_context((self.alpn,))
                self.credential = credential
                self.identity = self.profile.identity()
                self._not_after = self.identity.not_after.timestamp()
                self._session = None
                self._cert_stamp = stamp
        except (OSError, ValueError, ssl.SSLError, pki.CertError) as exc:
            raise ProfileError(
                f"the login in {self.profile.home} is gone or unreadable ({exc}); run `wicket login` again"
            ) from None

    def unchanged(self) -> bool:
        """Whether the login on disk is still the one loaded, and in date
        (no reload: for a thread other than trio's)."""
        try:
            st = os.stat(self._cert_file)
        except OSError:
            return False
        return (st.st_mtime_ns, st.st_ino) == self._cert_stamp and time.time() < self._not_after

    def changed_on_disk(self) -> bool:
        """Whether the certificate on disk is not the one loaded (one stat)."""
        try:
            st = os.stat(self._cert_file)
        except OSError:
            return True
        return (st.st_mtime_ns, st.st_ino) != self._cert_stamp

    def check_fresh(self) -> pki.Identity:
        """The current identity, or :class:`ProfileError` if it expired."""
        self._reload_if_changed()
        if pki.utcnow() >= self.identity.not_after:
            raise ProfileError(expired_message(self.profile.cluster_addr, self.identity))
        return self.identity

    async def dial(self, request: DialRequest) -> Dialed:
        pooled = self._take_pooled()
        if pooled is not None:
            try:
                result = await self._dial_on(pooled, request)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the cluster let it go meanwhile: dial afresh
            else:
                self.pool_hits += 1
                return result
        with trio.fail_after(DIAL_TIMEOUT):
            stream = await connect_cluster(self.profile.host, self.profile.port, self._ctx,
                                    self.profile.host, self._session)
        return await self._dial_on(stream, request)

    async def _dial_on(self, stream: TLSStream, request: DialRequest) -> Dialed:
        with trio.fail_after(DIAL_TIMEOUT):
            try:
                conn = DialConnection(Role.CLIENT)
                await stream.send_all(conn.send(request))
                while True:
                    event = conn.next_event()
                    if event is NEED_DATA:
                        conn.receive_data(await stream.receive_some(65536))
                        continue
                    break
            except ProtocolError as exc:
                await stream.aclose()
                raise DialRefused(DialError(code=ErrorCode.INTERNAL_ERROR,
                                            message=f"the cluster broke the dial protocol: {exc}")) from None
            except BaseException:
                await stream.aclose()
                raise
        # A resumed session's ticket stays good for later dials; only a full
        # handshake needs its fresh ticket saved (reading .session costs).
        if self._session is None or not stream.session_reused:
            self._session = stream.session
        if isinstance(event, DialError):
            await stream.aclose()
            raise DialRefused(event)
        trailing, _eof = conn.trailing_data
        return Dialed(stream=stream, accept=event, trailing=trailing)


class MuxDialer:
    """tcp-route sessions as streams of one multiplexed connection to the
    cluster (protocols/mux.py): after the first connection, a session costs
    one small frame each way, no TLS handshake and no socket to the cluster.

    The connection is opened with the profile's current certificate. When a
    renewal (or ``wicket login`` as the same user) replaced it, the new one
    is presented on the live connection (:func:`present`), which the cluster
    then keeps, with every session on it, until the new one ends. Where the
    cluster does not take it (another user's login, a cluster from before
    this), after the machine slept (the cluster will have let go of it
    meanwhile), or once it stopped getting answers (the network changed
    under it: gateway/net/tcp.py), new sessions go over a new connection,
    and the old one is closed once its sessions are over. A connection that failed (cluster restarted,
    network) is replaced on the next dial; :meth:`run_pool` opens it ahead
    of the first client and reopens it when it fails."""

    RETRY_DELAY = 1.0
    #: How often :meth:`run_pool` checks that the connection is still the
    #: one to use (the machine may have slept, the connection stalled): on
    #: the monotonic clock, which stops during a sleep, so this long after
    #: waking at most.
    CHECK_INTERVAL = 5.0
    #: How often it looks whether the certificate on disk changed (a
    #: renewal in another process, `wicket renew`; one stat()), to present
    #: it while the old one is still good; :meth:`wake` says so at once.
    CERT_POLL = 0.5

    def __init__(self, profile: Profile) -> None:
        self.dialer = Dialer(profile, tlsconf.ALPN_MUX)
        # The connection, the TLS context it was opened with, and
        # time_suspended() before it was opened: one tuple, replaced whole,
        # since the engine's thread reads it without the lock.
        self._current: tuple[MuxLink, ssl.SSLContext, float] | None = None
        self._draining: dict[MuxLink, str] = {}  # replaced, and why: closed after their last session
        self._lock = trio.Lock()
        # Connects that failed, and the last one's error (code, message,
        # passing) with the TLS context it used: what a caller who waited for
        # the lock meanwhile gets too, if it would connect with the same (see
        # :meth:`link`). Plain values: the exception would keep its frames.
        self._failures = 0
        self._failure: tuple[str, str, bool, ssl.SSLContext] | None = None
        self._wakeup = trio.Event()
        self._presentable = True  # False once the cluster showed it does not know link renewals
        #: Renewed certificates the cluster took on a live connection.
        self.renewed_in_place = 0

    def check_fresh(self) -> pki.Identity:
        return self.dialer.check_fresh()

    def wake(self) -> None:
        """(trio) The certificate on disk was just renewed: :meth:`run_pool`
        presents it now rather than at its next look."""
        self._wakeup.set()

    @property
    def _link(self) -> MuxLink | None:
        current = self._current
        return None if current is None else current[0]

    def _usable(self) -> MuxLink | None:
        current = self._current
        if current is None:
            return None
        link, ctx, slept = current
        if (link.failed is None and ctx is self.dialer._ctx and time_suspended() - slept <= SLEEP_LIMIT
                and not link.stalled()):
            return link
        return None

    async def link(self) -> MuxLink:
        """The current connection, opened if needed."""
        link = self._usable()
        if link is not None:
            return link
        failures = self._failures
        async with self._lock:
            link = self._usable()
            if link is not None:
                return link
            d = self.dialer
            if self._failures != failures and self._failure is not None and self._failure[3] is d._ctx:
                # A connect failed while this caller waited for its turn: that
                # is the answer for now. Trying again at once would make each
                # waiting client wait a whole CONNECT_TIMEOUT of its own, one
                # after the other, for a cluster that does not answer.
                code, message, passing, _ctx = self._failure
                raise ClusterError(code, message, passing=passing)
            ctx = d._ctx
            slept = time_suspended()  # before connecting: see Dialer.run_pool
            old = self._current
            if old is not None and await self._renewed_in_place(old, ctx, d.credential, slept):
                return old[0]
            why = None  # why the old one goes, as it stands now (it may change during the connect)
            if old is not None and old[0].failed is None:
                if slept - old[2] > SLEEP_LIMIT:
                    log.info("cluster_reconnect reason=suspended slept=%.0fs sessions=%d",
                             slept - old[2], len(old[0]))
                    why = "replaced after the machine slept"
                elif old[0].stalled():
                    log.info("cluster_reconnect reason=stalled sessions=%d", len(old[0]))
                    why = "replaced: it stopped getting answers from the cluster"
                else:
                    why = "replaced by a connection with the renewed certificate"
            try:
                with trio.fail_after(DIAL_TIMEOUT):
                    stream = await connect_cluster(d.profile.host, d.profile.port, ctx, d.profile.host, d._session)
            except ClusterError as exc:
                self._failures += 1
                self._failure = (exc.code, exc.message, exc.passing, ctx)
                raise
            self._failure = None
            if why is not None and old[0].failed is None:
                self._draining[old[0]] = why
            self._current = (MuxLink(engine(), stream, MuxRole.GATEWAY, name="cluster", socket_name="client"),
                             ctx, slept)
            for drained in [o for o in self._draining if o.failed is not None or not len(o)]:
                drained.close(self._draining.pop(drained))
            return self._current[0]

    async def _renewed_in_place(self, current: tuple[MuxLink, ssl.SSLContext, float], ctx: ssl.SSLContext,
                                credential: tuple[bytes, object], slept: float) -> bool:
        """(holding the lock) Whether ``current``, a live connection that only
        lacks the certificate ``ctx`` was made with, took it (it goes on as
        the current one then)."""
        link, old_ctx, since = current
        if (old_ctx is ctx or link.failed is not None or slept - since > SLEEP_LIMIT or link.stalled()
                or not self._presentable):
            return False
        try:
            with trio.fail_after(RENEW_TIMEOUT):
                reply = await present(link, *credential)
        except (LinkClosed, trio.TooSlowError, ValueError) as exc:
            log.info("link_renewal_failed error=%r sessions=%d action=%s", str(exc) or "no answer in time",
                     len(link), "a new connection with the renewed certificate")
            return False
        if isinstance(reply, DialError):
            if reply.code in (ErrorCode.RESOURCE_NOT_FOUND, ErrorCode.ACCESS_DENIED) and \
                    reply.message.find(linkrenewal.RESOURCE) >= 0:
                self._presentable = False  # a cluster from before renewals in place: say so once
            log.warning("link_renewal_refused code=%s message=%r sessions=%d action=%s",
                        reply.raw_code or reply.code.value, reply.message, len(link),
                        "a new connection with the renewed certificate; the sessions on this one end with "
                        "its certificate")
            return False
        self._current = (link, ctx, since)
        self.renewed_in_place += 1
        log.info("link_renewed expires_at=%s sessions=%d", reply.params.get("expires_at", "-"), len(link))
        return True

    async def _cert_changed(self) -> None:
        while not self.dialer.changed_on_disk():
            await trio.sleep(self.CERT_POLL)

    @property
    def connected(self) -> bool:
        """Whether a connection to the cluster is up and usable now (for
        readiness probes)."""
        return self._usable() is not None

    def is_current(self, link: MuxLink) -> bool:
        """Whether ``link`` is the connection new sessions take (not one
        replaced and draining). Any thread may ask."""
        return link is self._link

    @property
    def sessions(self) -> int:
        """Sessions open on this dialer's connections (the current one and
        those replaced but not yet drained)."""
        current = self._current
        return (len(current[0]) if current is not None else 0) + sum(len(link) for link in list(self._draining))

    def ready_link(self) -> MuxLink | None:
        """The current connection, if a session may start on it right now
        without trio: it is up, and the login on disk is the one it was
        opened with and still in date (one stat). Any thread may ask."""
        link = self._usable()
        return link if link is not None and self.dialer.unchanged() else None

    def release(self, link: MuxLink) -> None:
        """A session on ``link`` is over: close ``link`` if it was replaced
        (a renewed certificate, a sleep) and this was its last session."""
        if link in self._draining and not len(link):
            link.close(self._draining.pop(link))

    async def run_pool(self, size: int = 1, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep the connection open until cancelled (``size`` is ignored:
        one connection carries every session): reopen it when it fails, and
        replace it after a sleep before the next client comes."""
        task_status.started()
        outage = Outage()
        try:
            while True:
                try:
                    # A certificate renewed on disk (`wicket renew`, the
                    # agent's renewer) replaces the connection now, not at
                    # the next client: the old one ends with its
                    # certificate, and reconnecting with that would fail.
                    self.dialer._reload_if_changed()
                    link = await self.link()
                except (ClusterError, trio.TooSlowError) as exc:
                    outage.failed(exc)
                    await trio.sleep(self.RETRY_DELAY)  # the dials report it to their clients; try again later
                    continue
                except ProfileError:
                    await trio.sleep(self.RETRY_DELAY)  # the dials report it; try again later
                    continue
                outage.ended()
                with trio.move_on_after(self.CHECK_INTERVAL):
                    await _first_of(link.closed.wait, self._wakeup.wait, self._cert_changed)
                if self._wakeup.is_set():
                    self._wakeup = trio.Event()
                if link.failed is not None:
                    await trio.sleep(self.RETRY_DELAY)  # do not spin on a cluster that keeps refusing
        finally:
            for link in [self._link, *self._draining]:
                if link is not None:
                    link.close("the gateway is stopping")


class MuxLinks:
    """Sessions spread over several multiplexed connections to the cluster
    (``wicket proxy --cluster-links N``), each a :class:`MuxDialer` of its
    own (opened, renewed in place, replaced and drained on its own): a new
    session takes the usable one carrying the fewest. A cluster of several
    worker processes (gateway/cluster/workers.py) hands each new connection
    to the worker holding the fewest, so one gateway's sessions are relayed
    by several of them at once, each in its own process and core. The same
    interface as :class:`MuxDialer`."""

    def __init__(self, profile: Profile, links: int) -> None:
        if links < 1:
            raise ValueError("at least one link")
        self.parts = [MuxDialer(profile) for _ in range(links)]
        self.dialer = self.parts[0].dialer
        self._turn = 0

    def check_fresh(self) -> pki.Identity:
        identity = None
        for part in self.parts:  # each reloads a new login on disk (one stat)
            identity = part.check_fresh()
        return identity

    def wake(self) -> None:
        for part in self.parts:
            part.wake()

    def _least(self, links: list[MuxLink | None]) -> MuxLink | None:
        best = None
        for link in links:
            if link is not None and (best is None or len(link) < len(best)):
                best = link
        return best

    async def link(self) -> MuxLink:
        """The usable connection carrying the fewest sessions; with none
        usable, one of them opened (in turn)."""
        link = self._least([part._usable() for part in self.parts])
        if link is not None:
            return link
        self._turn = (self._turn + 1) % len(self.parts)
        return await self.parts[self._turn].link()

    def ready_link(self) -> MuxLink | None:
        return self._least([part.ready_link() for part in self.parts])

    def is_current(self, link: MuxLink) -> bool:
        return any(part.is_current(link) for part in self.parts)

    def release(self, link: MuxLink) -> None:
        for part in self.parts:
            part.release(link)

    @property
    def connected(self) -> bool:
        return any(part.connected for part in self.parts)

    @property
    def sessions(self) -> int:
        return sum(part.sessions for part in self.parts)

    @property
    def renewed_in_place(self) -> int:
        return sum(part.renewed_in_place for part in self.parts)

    async def run_pool(self, size: int = 1, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Keep every connection open until cancelled (MuxDialer.run_pool)."""
        async with trio.open_nursery() as nursery:
            for part in self.parts:
                await nursery.start(part.run_pool)
            task_status.started()


def mux_dialer(profile: Profile, links: int = 1) -> "MuxDialer | MuxLinks":
    """The dialer for ``links`` multiplexed connections to the cluster."""
    return MuxDialer(profile) if links == 1 else MuxLinks(profile, links)


async def present(link: MuxLink, certificate: bytes, key) -> DialAccept | DialError:
    """Present a renewed certificate (DER) on ``link``, proving ``key``
    (protocols/linkrenewal.py): the cluster's verdict. Raises LinkClosed,
    ValueError (a challenge without a nonce)."""
    reply = await link.control(linkrenewal.challenge_request(), timeout=RENEW_TIMEOUT)
    if isinstance(reply, DialError):
        return reply
    nonce = linkrenewal.nonce_of(reply)
    signature = pki.sign_possession(key, linkrenewal.proof_message(nonce, certificate))
    return await link.control(linkrenewal.renew_request(certificate, nonce, signature), timeout=RENEW_TIMEOUT)


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Until the first of ``waits`` returns."""
    async with trio.open_nursery() as nursery:
        async def one(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel()

        for wait in waits:
            nursery.start_soon(one, wait)

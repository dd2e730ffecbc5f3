"""The cluster's half of renewing a multiplexed connection's certificate
in place (protocols/linkrenewal.py has the wire and why).

Theory of operation
-------------------
Each multiplexed connection has a :class:`LinkCredential`: the certificate
its dials are decided with now, its identity, the cancel scope whose
deadline is that certificate's end (gateway/cluster/muxroute.py's
``handle_mux`` closes the connection when it passes), the serials of the
earlier certificates it was renewed from that are still in date, and the
challenge it may answer. A challenge is answered in the relay engine's
thread; a renewal is checked in trio (the store's snapshot):

- the nonce is the one this connection was sent, within NONCE_TTL, and is
  spent by the attempt, whatever its outcome;
- the certificate was signed by the user CA, is in date, and names this
  cluster; its key is a session key and signed the proof;
- it is the same holder's: the same user (or bot, and the same instance of
  it, one join), so a connection never changes hands;
- both the new and the current certificate are in good standing: the user
  exists and is not locked, neither certificate is revoked (a bot locked
  for a renewal out of turn cannot renew its connections either).

Then the connection's deadline moves to the new certificate's end; every
live session on it is re-pointed at the new identity (its cancel scope's
deadline too, and the lock watcher's expiry check follows), keeps the
earlier serials (revoking one still cuts it), and later dials on the
connection are decided with the new certificate. Audited as ``link.renew``
or ``link.renew_denied`` (the first per user, code and minute; the rest of
that minute as one ``link.renew_denied`` with ``repeats``).
"""

from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from typing import Callable

import attrs
import trio
from cryptography import x509

from gateway.cluster.core import Cluster, LiveSession
from gateway.identity import pki
from gateway.identity.pki import utcnow
from gateway.net.muxlink import MuxLink, Stream
from protocols import linkrenewal
from protocols.dial import DialError, DialRequest
from protocols.errors import ErrorCode

log = logging.getLogger("wicket.cluster.link")

#: How long a challenge may be answered.
NONCE_TTL = 30.0


@attrs.define(eq=False)
class LinkCredential:
    """What a multiplexed connection speaks with now; see the module
    docstring. ``identity`` is None on a connection without a valid
    certificate (its dials are refused with what is wrong with ``cert``)."""

    cert: bytes | None
    identity: pki.Identity | None
    #: Its deadline is the certificate's end (the connection is closed then).
    expiry: trio.CancelScope
    #: (serial, not_after) of the earlier certificates still in date.
    earlier: tuple[tuple[int, object], ...] = ()
    _nonce: tuple[bytes, float] | None = None
    _lock: threading.Lock = attrs.field(factory=threading.Lock)

    def challenge(self) -> bytes:
        """(any thread) A fresh nonce, replacing any earlier one."""
        nonce = secrets.token_bytes(linkrenewal.NONCE_BYTES)
        with self._lock:
            self._nonce = (nonce, time.monotonic() + NONCE_TTL)
        return nonce

    def spend(self, nonce: bytes) -> bool:
        """Whether ``nonce`` is the open challenge, in time; spent either way."""
        with self._lock:
            held, self._nonce = self._nonce, None
        return held is not None and time.monotonic() < held[1] and hmac.compare_digest(held[0], nonce)

    def earlier_serials(self) -> tuple[int, ...]:
        return tuple(serial for serial, _ in self.earlier)

    def adopt(self, session: LiveSession) -> None:
        """A session just allowed on this connection: if the certificate
        it was decided with has been renewed since, it lives by the new one."""
        identity = self.identity
        session.earlier_serials = self.earlier_serials()
        if identity is not None and session.identity is not None and session.identity.serial in \
                session.earlier_serials:
            session.identity = identity


def on_link_dial(cluster: Cluster, link: MuxLink, cred: LinkCredential, st: Stream, request: DialRequest,
                 client_addr: str, spawn: Callable[..., None]) -> None:
    """(the engine's thread) A dial for the connection itself: a challenge
    is answered here; a renewal is checked in trio (``spawn(fn, *args)``)."""
    if linkrenewal.wants_challenge(request):
        if cred.identity is None:
            link.answer(st, DialError(code=ErrorCode.CERT_REQUIRED,
                                      message="this connection has no valid certificate to renew"))
            return
        link.answer(st, linkrenewal.challenge_accept(cred.challenge()))
        return
    spawn(renew, cluster, link, cred, st, request, client_addr)


async def renew(cluster: Cluster, link: MuxLink, cred: LinkCredential, st: Stream, request: DialRequest,
                client_addr: str) -> None:
    """Check a renewal, and answer it; see the module docstring."""
    old = cred.identity
    try:
        der, identity = await _check(cluster, cred, request)
    except pki.CertError as exc:
        user = old.user if old else None
        # The first per user, code and minute in full, the rest counted
        # (gateway/cluster/core.py audits them as one event with `repeats`).
        if cluster.note_renew_refusal(user, exc.code.value):
            log.warning("link_renewal_refused client=%s user=%s code=%s message=%r", client_addr,
                        user or "-", exc.code.value, exc.message)
            cluster.audit_soon("link.renew_denied", user, client_addr=client_addr, code=exc.code.value,
                               reason=exc.message)
        link.answer(st, DialError(code=exc.code, message=exc.message))
        return
    now = utcnow()
    cred.earlier = tuple((serial, end) for serial, end in (*cred.earlier, (old.serial, old.not_after))
                         if end > now)
    cred.cert, cred.identity = der, identity
    if cluster.config.disconnect_expired_cert:
        cred.expiry.deadline = trio.current_time() + max(0.0, (identity.not_after - now).total_seconds())
    moved = _extend(cluster, link, cred)
    log.info("link_renewed client=%s user=%s serial=%x expires_at=%s sessions=%d", client_addr, identity.user,
             identity.serial, identity.not_after.isoformat(), moved)
    cluster.audit_soon("link.renew", identity.user, client_addr=client_addr, serial=format(identity.serial, "x"),
                       previous_serial=format(old.serial, "x"), expires_at=identity.not_after.isoformat(),
                       sessions=moved)
    link.answer(st, linkrenewal.renewed_accept(identity.not_after.isoformat()))


async def _check(cluster: Cluster, cred: LinkCredential, request: DialRequest) -> tuple[bytes, pki.Identity]:
    """The new certificate and its identity, if the renewal holds; else
    :class:`pki.CertError` saying why."""
    try:
        renewal = linkrenewal.parse_renew(request)
    except ValueError as exc:
        raise pki.CertError(ErrorCode.BAD_REQUEST, f"a malformed renewal: {exc}") from None
    fresh = cred.spend(renewal.nonce)
    old = cred.identity
    if old is None:
        raise pki.CertError(ErrorCode.CERT_REQUIRED, "this connection has no valid certificate to renew")
    if not fresh:
        raise pki.CertError(ErrorCode.CERT_INVALID, "the renewal answers no open challenge on this connection "
                                                    "(too late, or used); ask for a new one")
    try:
        cert = x509.load_der_x509_certificate(renewal.certificate)
    except ValueError:
        raise pki.CertError(ErrorCode.CERT_INVALID, "the renewal's certificate cannot be read") from None
    identity = pki.verify_session_cert(cert, cluster.user_ca.cert, now=utcnow())
    if identity.cluster != cluster.config.name:
        raise pki.CertError(ErrorCode.CERT_INVALID, "certificate is for another cluster")
    key = cert.public_key()
    if not pki.acceptable_session_key(key) or not pki.verify_possession(
            key, linkrenewal.proof_message(renewal.nonce, renewal.certificate), renewal.signature):
        raise pki.CertError(ErrorCode.CERT_INVALID, "the renewal's signature does not prove its certificate's key")
    if (identity.user, identity.kind, identity.instance) != (old.user, old.kind, old.instance):
        raise pki.CertError(ErrorCode.ACCESS_DENIED,
                            f"this connection is {old.kind} {old.user}'s; a renewal must be of the same "
                            f"{'bot instance' if old.kind == 'bot' else 'user'} (open a new connection instead)")
    snap = await cluster.snapshot()
    cluster.check_standing(snap, identity)
    cluster.check_standing(snap, old)  # a revoked certificate cannot pass its connection on
    if cred.identity is not old:
        raise pki.CertError(ErrorCode.CERT_INVALID, "the connection was renewed meanwhile")
    return renewal.certificate, identity


def _extend(cluster: Cluster, link: MuxLink, cred: LinkCredential) -> int:
    """Re-point every live session on ``link`` at the connection's new
    certificate; how many."""
    moved = 0
    earlier = cred.earlier_serials()
    for session in list(cluster.sessions.values()):
        on = session.extra.get("stream")
        if on is None or on[0] is not link or session.identity is None:
            continue
        session.identity = cred.identity
        session.earlier_serials = earlier
        if cluster.config.disconnect_expired_cert:
            session.cancel_scope.deadline = cluster.expiry_deadline(session)
        moved += 1
    return moved

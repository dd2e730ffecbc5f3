"""Getting and keeping a session certificate without a person at the
keyboard: a bot's join with a token, a renewal, and a task that renews in
the background well before expiry.

A renewal writes a new key and certificate into the profile; the dialers
pick them up (at once when told through ``on_renewed``, else within
seconds) and present them on their live connection to the cluster
(gateway/local/dialer.py, protocols/linkrenewal.py), so the sessions on it
live on with the new certificate and renewing cuts nothing.

A person's certificate renews up to the end of their login's maximum
session; then, or after a laptop slept past its expiry, :func:`keep_fresh`
says once what to run (``wicket login``) and waits for a new login on disk.
A bot renews by itself for as long as it is not locked or removed; if its
certificate expired while the machine slept, it cannot prove it any more:
it joins again with its token file (the agent's ``rejoin``) while the token
has uses left, else it says so and waits for a new token.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

from gateway.identity import pki, tlsconf
from gateway.identity.pki import utcnow
from gateway.local import api
from gateway.local.connect import ClusterError, connect_cluster
from gateway.local.profile import Profile
from gateway.addresses import parse_hostport
from gateway.net.http import HTTPClient

log = logging.getLogger("wicket.session")

#: Renew once this share of the certificate's life has passed.
RENEW_AT = 2 / 3
#: Retry a failed renewal after this long (doubling up to RETRY_MAX), never
#: later than the certificate's end allows.
RETRY_FIRST = 1.0
RETRY_MAX = 60.0
#: How often a person's agent looks for a new login after theirs ended.
LOGIN_POLL = 2.0


#: The most a token file may hold (a token is 47 characters).
MAX_TOKEN_FILE = 4096


def read_token_file(path: Path) -> str:
    """The join token in ``path`` (surrounding whitespace dropped);
    OSError if it cannot be read, ValueError if it is no token file."""
    with open(path, "rb") as f:
        raw = f.read(MAX_TOKEN_FILE + 1)
    if len(raw) > MAX_TOKEN_FILE:
        raise ValueError(f"{path} is not a token file (over {MAX_TOKEN_FILE} bytes)")
    token = raw.decode("utf-8", "replace").strip()
    if not token:
        raise ValueError(f"{path} is empty")
    return token


def _public_pem(key: Any) -> str:
    return key.public_key().public_bytes(pki.serialization.Encoding.PEM,
                                         pki.serialization.PublicFormat.SubjectPublicKeyInfo).decode("ascii")


async def join(home: Path, address: str, pin: str, token: str, *, ttl_seconds: float | None = None) -> Profile:
    """Join as a bot with ``token``, after checking the cluster's CA
    against ``pin``; the bot's profile in ``home``."""
    ca = await api.fetch_ca(address)
    if ca.pin != pin:
        raise ClusterError("cert_invalid", f"the cluster at {address} presented CA {ca.pin}, which does not match "
                           f"the pin {pin}: someone may be intercepting the connection, or the pin is wrong "
                           f"(`wicket-cluster ca pin` prints it)")
    key = pki.generate_key()
    body: dict[str, Any] = {"token": token, "public_key": _public_pem(key)}
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    host, port = parse_hostport(address)
    stream = await connect_cluster(host, port, tlsconf.gateway_client_context(ca.pem, alpn=(tlsconf.ALPN_HTTP,)),
                                   host)
    async with stream:
        with trio.fail_after(60):
            answer = await api._api(HTTPClient(stream, host), "POST", "/v1/join", body)
    return Profile.save(home, cluster_addr=address, cluster_name=answer["cluster"], user=answer["user"],
                        ca_pin=ca.pin, key_pem=pki.key_to_pem(key), cert_pem=answer["certificate"].encode("ascii"),
                        ca_pem=ca.pem)


async def renew(profile: Profile, *, ttl_seconds: float | None = None) -> Profile:
    """A fresh certificate for a new key, proved by the current one."""
    key = pki.generate_key()
    body: dict[str, Any] = {"public_key": _public_pem(key)}
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    answer = await api.api_call(profile, "POST", "/v1/renew", body)
    return Profile.save(profile.home, cluster_addr=profile.cluster_addr, cluster_name=profile.cluster_name,
                        user=profile.user, ca_pin=profile.ca_pin, key_pem=pki.key_to_pem(key),
                        cert_pem=answer["certificate"].encode("ascii"), ca_pem=profile.ca_path.read_bytes())


def renew_due(identity: pki.Identity, now: dt.datetime) -> float:
    """Seconds until a certificate should be renewed (0: now)."""
    issued = min(identity.not_before + pki.BACKDATE, identity.not_after)
    life = (identity.not_after - issued).total_seconds()
    due = issued + dt.timedelta(seconds=life * RENEW_AT)
    return max(0.0, (due - now).total_seconds())


class Renewer:
    """Keeps a profile's certificate fresh (:meth:`run`), and says how it
    stands for probes and metrics."""

    def __init__(self, profile: Profile, *, ttl_seconds: float | None = None,
                 rejoin: Callable[[], Awaitable[Any]] | None = None,
                 on_renewed: Callable[[], None] | None = None) -> None:
        self.profile = profile
        #: Told (in trio) after each renewal: the dialers present the new
        #: certificate on their connections at once.
        self.on_renewed = on_renewed
        self.ttl_seconds = ttl_seconds  # what to ask for (None: the cluster's default)
        #: A bot whose certificate ran out (a sleep, the cluster out of
        #: reach too long) cannot prove it any more: this joins again (the
        #: agent's token file, if its token has uses left).
        self.rejoin = rejoin
        self.renewals = 0
        self.failures = 0
        self.last_error: str | None = None
        #: Set once the certificate ran out and could not be renewed (a
        #: person's login ended, a bot slept past its expiry or was locked).
        self.stuck: str | None = None

    def identity(self) -> pki.Identity | None:
        try:
            return self.profile.identity()
        except (OSError, ValueError, pki.CertError):
            return None

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        retry = RETRY_FIRST
        while True:
            identity = self.identity()
            now = utcnow()
            if identity is None or now >= identity.not_after:
                await self._expired(identity)
                retry = RETRY_FIRST
                continue
            await trio.sleep(renew_due(identity, now))
            if self.identity() != identity:  # `wicket login` or another renewer meanwhile
                continue
            try:
                await renew(self.profile, ttl_seconds=self.ttl_seconds)
            except (ClusterError, OSError, trio.TooSlowError, trio.BrokenResourceError, ValueError,
                    KeyError) as exc:
                self.failures += 1
                self.last_error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                left = (identity.not_after - utcnow()).total_seconds()
                log.warning("renewal_failed user=%s error=%r expires_in=%.0f retry_in=%.0f", identity.user,
                            self.last_error, left, min(retry, max(left, 0)))
                if isinstance(exc, ClusterError) and exc.code in ("user_locked", "access_denied", "cert_expired"):
                    # Refused for good: wait for the certificate to run out
                    # (it is refused anyway) rather than knock all the time.
                    await trio.sleep(max(0.0, left) + 0.01)
                else:
                    await trio.sleep(min(retry, max(left, 0.0) + 0.01))
                    retry = min(retry * 2, RETRY_MAX)
                continue
            retry = RETRY_FIRST
            self.renewals += 1
            self.stuck = None
            if self.on_renewed is not None:
                self.on_renewed()
            fresh = self.identity()
            log.info("certificate_renewed user=%s kind=%s expires_at=%s", fresh.user if fresh else "-",
                     fresh.kind if fresh else "-", fresh.not_after.isoformat() if fresh else "-")
            if fresh is not None and fresh.not_after <= identity.not_after:
                # A person's login has reached its maximum session: renewing
                # again gains nothing. Serve until the end, then say so.
                log.info("session_at_maximum user=%s expires_at=%s", fresh.user, fresh.not_after.isoformat())
                await trio.sleep(max(0.0, (fresh.not_after - utcnow()).total_seconds()) + 0.01)

    async def _expired(self, identity: pki.Identity | None) -> None:
        """The certificate ran out: say so once, then wait for a new one on
        disk (a person's `wicket login`; a bot's new join)."""
        if identity is None:
            message = f"no usable login in {self.profile.home}; run `wicket login` (or `wicket join`)"
        elif identity.kind == "bot":
            message = (f"the bot certificate of {identity.user} expired at {identity.not_after.isoformat()} "
                       f"before it could be renewed (a sleep, or the cluster out of reach); join again with a "
                       f"new token: `wicket join`")
        else:
            message = (f"the session of {identity.user} expired at {identity.not_after.isoformat()}; run "
                       f"`wicket login {self.profile.cluster_addr} --user {identity.user}`: serving resumes then")
        if self.stuck != message:
            self.stuck = message
            log.warning("certificate_expired message=%r", message)
        delay = RETRY_FIRST
        while True:
            if self.rejoin is not None and (identity is None or identity.kind == "bot"):
                try:
                    await self.rejoin()
                except (ClusterError, OSError, ValueError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                    self.last_error = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
                    log.warning("rejoin_failed error=%r retry_in=%.0f", self.last_error, delay)
                else:
                    log.info("rejoined user=%s", self.profile.user)
                    self.stuck = None
                    return
                await trio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            await trio.sleep(LOGIN_POLL)
            fresh = self.identity()
            if fresh is not None and fresh != identity and utcnow() < fresh.not_after:
                log.info("certificate_found user=%s expires_at=%s", fresh.user, fresh.not_after.isoformat())
                self.stuck = None
                return


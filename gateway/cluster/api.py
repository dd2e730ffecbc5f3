"""The cluster's HTTP/1.1 API (ALPN ``http/1.1``): login, renew, whoami,
resources, health, ca.

Login and health (and ``ca``, which serves only public data a gateway checks
against its pin) need no client certificate; everything else needs a valid
session certificate, checked on every request (expiry and locks included).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from typing import Any

import trio

from gateway import __version__, printable
from gateway.cluster import join, login_limits, rbac
from gateway.cluster.core import Cluster
from gateway.identity.pki import utcnow
from gateway.cluster.passwords import (
    InvalidPasswordHash,
    burn_password_time,
    hash_password,
    needs_rehash,
    verify_password,
    verify_totp,
)
from gateway.identity import pki
from gateway.net.http import HTTPError, Request, Response
from protocols.errors import ErrorCode

log = logging.getLogger("wicket.cluster.api")

MIN_TTL = 1.0
#: Beyond any cap a cluster would set (ten years): a bound for the arithmetic.
MAX_TTL = 10 * 365 * 86400.0

# typed error code -> HTTP status
_STATUS = {
    ErrorCode.CERT_REQUIRED: 401,
    ErrorCode.CERT_EXPIRED: 401,
    ErrorCode.CERT_INVALID: 401,
    ErrorCode.ACCESS_DENIED: 403,
    ErrorCode.USER_LOCKED: 403,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.RATE_LIMITED: 429,
}


#: The next step for a refused certificate. The cluster's refusals say
#: what happened; on a dial the gateway adds the next step, while the API's
#: answers are shown as they are, so they get it here (once either way).
_NEXT_STEP = {
    ErrorCode.CERT_EXPIRED: "run `wicket login` again",
    ErrorCode.CERT_INVALID: "run `wicket login` again",
    ErrorCode.CERT_REQUIRED: "run `wicket login` first",
    ErrorCode.USER_LOCKED: "ask an administrator to unlock it",
    ErrorCode.ACCESS_DENIED: "ask an administrator",
}


def cert_http_error(exc: pki.CertError) -> HTTPError:
    return HTTPError(_STATUS.get(exc.code, 500), exc.code.value, exc.message)


def identify_http_error(exc: pki.CertError) -> HTTPError:
    """A refused certificate on an API call, with the next step."""
    step = _NEXT_STEP.get(exc.code)
    message = exc.message if step is None or step in exc.message else f"{exc.message}; {step}"
    return HTTPError(_STATUS.get(exc.code, 500), exc.code.value, message)


def _ttl_seconds(value: Any) -> float | None:
    """The requested ``ttl_seconds`` (None: the default), checked before
    any arithmetic: JSON numbers are unbounded (``1e400`` is infinity, a
    400-digit integer overflows a float)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not MIN_TTL <= value <= MAX_TTL or not math.isfinite(value):
        raise HTTPError(400, "bad_request", f"ttl_seconds must be a number of seconds from {MIN_TTL:.0f} "
                        f"to {MAX_TTL:.0f} (the cluster caps it further)")
    return float(value)


class API:
    def __init__(self, cluster: Cluster, *, peer_cert: bytes | None, client_addr: str) -> None:
        self.cluster = cluster
        self.peer_cert = peer_cert
        self.client_addr = client_addr

    async def __call__(self, request: Request) -> Response:
        route = {
            ("GET", "/v1/health"): self.health,
            ("GET", "/v1/ca"): self.ca,
            ("POST", "/v1/login"): self.login,
            ("POST", "/v1/renew"): self.renew,
            ("GET", "/v1/whoami"): self.whoami,
            ("GET", "/v1/resources"): self.resources,
            ("GET", "/v1/ssh/hosts"): self.ssh_hosts,
            ("POST", "/v1/ssh/cert"): self.ssh_cert,
            ("POST", "/v1/ssh/audit"): self.ssh_audit,
            ("POST", "/v1/join"): self.join,
        }.get((request.method, request.path.split("?", 1)[0]))
        if route is None:
            raise HTTPError(404, "not_found", f"no route {request.method} {request.path}")
        return await route(request)

    # -- unauthenticated -------------------------------------------------------

    async def health(self, request: Request) -> Response:
        return Response(status=200, body={"status": "ok", "cluster": self.cluster.config.name,
                                          "version": __version__})

    async def ca(self, request: Request) -> Response:
        return Response(status=200, body={
            "cluster": self.cluster.config.name,
            "host_ca": self.cluster.host_ca_pem(),
            "pin": self.cluster.host_ca.pin,
        })

    async def login(self, request: Request) -> Response:
        body = request.json()
        _ttl_seconds(body.get("ttl_seconds"))  # refused before a password or TOTP check is spent
        user_name = body.get("user")
        password = body.get("password")
        if not isinstance(user_name, str) or not isinstance(password, str) or not user_name:
            raise HTTPError(400, "bad_request", "login needs `user` and `password` strings")
        if len(user_name) > 64 or len(password) > 1024:
            raise HTTPError(400, "bad_request", "user or password too long")
        if not printable.is_clean(user_name):
            raise HTTPError(400, "bad_request", "user names have no control characters")
        public_key = self._public_key(body.get("public_key"))
        keys = (("pair", user_name, self.client_host), ("host", self.client_host))
        # Attempts in progress count against the limit too, so a burst of
        # parallel guesses cannot all slip in before the first is recorded
        # (in whichever of the cluster's workers they land).
        pair, host = self.cluster.logins_started(keys)
        try:
            await self._check_rate(user_name, pair, host)
            return await self._login_checked(body, user_name, password, public_key)
        finally:
            self.cluster.logins_ended(keys)

    async def _login_checked(self, body: dict[str, Any], user_name: str, password: str, public_key) -> Response:
        limiter = self.cluster.password_limiter
        user = await self.cluster.db(self.cluster.store.get_user, user_name)
        if user is None:
            await trio.to_thread.run_sync(burn_password_time, password, limiter=limiter)
            return await self._login_failed(user_name, "unknown user")
        try:
            ok = await trio.to_thread.run_sync(verify_password, user.password_hash, password, limiter=limiter)
        except InvalidPasswordHash:
            log.error("password_hash_corrupt user=%s action=%s", user_name,
                      "reset the password with `wicket-cluster users add` after removing the user")
            await trio.to_thread.run_sync(burn_password_time, password, limiter=limiter)
            ok = False
        if not ok:
            return await self._login_failed(user_name, "wrong password")
        # Locked? Say so before a TOTP code is spent on a refused login.
        lock = await self.cluster.db(self.cluster.store.get_lock, user_name)
        if lock is not None:
            await self.cluster.audit("login.failed", user_name, client_addr=self.client_addr,
                                     client_host=self.client_host, reason="user locked")
            raise HTTPError(403, "user_locked",
                            f"user {user_name} is locked ({lock.reason}); {_NEXT_STEP[ErrorCode.USER_LOCKED]}")
        if user.totp_secret is not None:
            code = body.get("totp_code")
            if not isinstance(code, str) or not code:
                await self.cluster.audit("login.failed", user_name, client_addr=self.client_addr,
                                         client_host=self.client_host, reason="totp code missing")
                raise HTTPError(401, "totp_required",
                                "this user has TOTP enrolled: pass --totp-code with the current code")
            step = verify_totp(user.totp_secret, code, now=time.time(), last_step=user.totp_last_step)
            if step is None or not await self.cluster.db(
                self.cluster.store.set_totp_last_step, user_name, step
            ):
                return await self._login_failed(user_name, "wrong or reused totp code")
        if needs_rehash(user.password_hash):
            await self._rehash(user_name, user.password_hash, password)
        roles = await self.cluster.roles_of(user)
        now = utcnow()
        return await self._issue(user_name, roles, public_key, body.get("ttl_seconds"),
                                 now=now, auth_time=now, event="login.ok", generation=user.cert_generation)

    async def _rehash(self, user_name: str, old: str, password: str) -> None:
        """The stored hash was made with weaker parameters: store one made
        with today's, now that we hold the verified password, unless the
        password changed meanwhile. A failure here costs the upgrade, never
        the login."""
        try:
            new = await trio.to_thread.run_sync(hash_password, password, limiter=self.cluster.password_limiter)
            replaced = await self.cluster.db(self.cluster.store.replace_password_hash, user_name, old, new)
        except Exception as exc:
            log.warning("password_rehash_failed user=%s error=%s", user_name, type(exc).__name__)
            return
        if replaced:
            log.info("password_rehashed user=%s reason=hash made with weaker parameters", user_name)

    async def join(self, request: Request) -> Response:
        """A bot's join token for a bot certificate (gateway/cluster/join.py)."""
        return await join.join(self, request)

    # -- authenticated -------------------------------------------------------

    async def _identify(self):
        try:
            return await self.cluster.identify(self.peer_cert)
        except pki.CertError as exc:
            raise identify_http_error(exc) from None

    async def renew(self, request: Request) -> Response:
        """A fresh certificate for a (new or the same) key, with current roles,
        never past the end of the original login's maximum session."""
        identity, user, roles = await self._identify()
        body = request.json()
        if identity.kind == "bot":
            return await join.renew(self, identity, user, body)
        public_key = self._public_key(body.get("public_key"))
        auth_time = identity.auth_time or identity.not_before
        return await self._issue(user.name, await self.cluster.roles_of(user), public_key,
                                 body.get("ttl_seconds"), now=utcnow(), auth_time=auth_time,
                                 event="login.renew", generation=user.cert_generation)

    async def whoami(self, request: Request) -> Response:
        identity, user, roles = await self._identify()
        return Response(status=200, body={
            "user": identity.user,
            "roles": [r.name for r in roles],
            "kind": identity.kind,
            "cluster": identity.cluster,
            "expires_at": identity.not_after.isoformat(),
            "remaining_seconds": int(identity.remaining(utcnow()).total_seconds()),
        })

    async def resources(self, request: Request) -> Response:
        identity, user, roles = await self._identify()
        items = []
        for res in (await self.cluster.snapshot()).resources.values():
            if rbac.visible(roles, res.name, res.labels):
                item: dict[str, Any] = {"name": res.name, "kind": res.kind, "labels": dict(res.labels)}
                params = rbac.allowed_params(roles, res.name, res.labels)
                if params:
                    item["allowed"] = params
                items.append(item)
        return Response(status=200, body={"resources": items})

    async def ssh_hosts(self, request: Request) -> Response:
        """known_hosts lines and allowed logins for `wicket config ssh` (gateway/cluster/ssh.py)."""
        from gateway.cluster import ssh

        identity, _user, roles = await self._identify()
        return await ssh.ssh_hosts(self.cluster, identity, roles)

    async def ssh_cert(self, request: Request) -> Response:
        """Gone: it signed every allowed login for the session's life."""
        raise HTTPError(410, "gone", "session-long SSH certificates are no longer signed: each ssh connection gets "
                        "its own on its dial; upgrade wicket and run `wicket config ssh` again")

    async def ssh_audit(self, request: Request) -> Response:
        """What a gateway saw inside its terminated SSH sessions (gateway/cluster/ssh.py)."""
        from gateway.cluster import ssh

        identity, _user, _roles = await self._identify()
        return ssh.record_gateway_reports(self.cluster, identity, request.json())

    # -- helpers ---------------------------------------------------------------

    async def _check_rate(self, user_name: str, pair_inflight: int, host_inflight: int) -> None:
        """Refuse (429, with how long to wait) an attempt that comes too
        soon after failures from this user and address, or from this
        address (gateway/cluster/login_limits.py)."""
        cfg = self.cluster.config
        now = time.time()
        since = now - cfg.login_failure_window
        store, host = self.cluster.store, ("client_host", self.client_host)
        pair = await self.cluster.db(store.last_audit, "login.failed", user=user_name, since=since, field=host)
        address = await self.cluster.db(store.last_audit, "login.failed", since=since, field=host)
        waits = (
            login_limits.wait(pair[0] + pair_inflight, pair[1], cfg.login_max_failures,
                              cfg.login_failure_window, now),
            login_limits.wait(address[0] + host_inflight, address[1],
                              login_limits.ADDRESS_FACTOR * cfg.login_max_failures, cfg.login_failure_window, now),
        )
        wait = max(waits)
        if wait <= 0:
            return
        scope = "user_and_address" if waits[0] >= waits[1] else "address"
        # Audited, but not as a failure: refusals must not make the wait
        # grow. The first per user, address and minute now, in full; the
        # rest as one count when the minute is over (a client that keeps
        # trying must not fill the disk).
        if self.cluster.note_login_refusal(user_name, self.client_host):
            log.warning("login_throttled user=%s client_host=%s scope=%s failures=%d wait=%.0f", user_name,
                        self.client_host, scope, pair[0] if scope == "user_and_address" else address[0], wait)
            await self.cluster.audit("login.rate_limited", user_name, client_addr=self.client_addr,
                                     client_host=self.client_host, scope=scope, failures_from_address=address[0],
                                     failures_for_user_from_address=pair[0], retry_after=round(wait, 1))
        raise HTTPError(
            429, "rate_limited",
            f"too many failed logins from this address; try again in {math.ceil(wait)} seconds",
            retry_after=wait,
        )

    def _public_key(self, pem: Any):
        if not isinstance(pem, str) or len(pem) > 4096:
            raise HTTPError(400, "bad_request", "public_key must be a PEM public key")
        try:
            return self.cluster.public_key_from_pem(pem)
        except pki.CertError as exc:
            raise cert_http_error(exc) from None

    @property
    def client_host(self) -> str:
        return self.client_addr.rsplit(":", 1)[0]

    async def _login_failed(self, user_name: str, reason: str) -> Response:
        await self.cluster.audit("login.failed", user_name, client_addr=self.client_addr,
                                 client_host=self.client_host, reason=reason)
        # One message whatever the reason: do not reveal which users exist.
        raise HTTPError(401, "access_denied", "invalid user name, password or TOTP code")

    async def _issue(self, user_name, roles, public_key, requested_ttl, *, now: dt.datetime,
                     auth_time: dt.datetime, event: str, generation: int, kind: str = "person",
                     instance: str = "", renewal: int = 0, extra: dict[str, Any] | None = None) -> Response:
        cfg = self.cluster.config
        ttl = _ttl_seconds(requested_ttl)
        if ttl is None:
            ttl = cfg.session_ttl
        caps = [cfg.max_session_ttl]
        role_cap = rbac.session_ttl_cap(roles)
        if role_cap is not None:
            caps.append(role_cap)
        ttl = min([ttl, *caps])
        not_after = now + dt.timedelta(seconds=ttl)
        # A renewal never outlives the login it descends from.
        latest = auth_time + dt.timedelta(seconds=min(caps))
        if not_after > latest:
            not_after = latest
        if not_after <= now:
            raise HTTPError(401, "cert_expired", "the login this session came from has reached its "
                            "maximum lifetime; run `wicket login` again")
        identity = pki.Identity(
            user=user_name, roles=tuple(r.name for r in roles), cluster=cfg.name, kind=kind,
            not_before=now - dt.timedelta(minutes=1), not_after=not_after, auth_time=auth_time,
            generation=generation, instance=instance, renewal=renewal,
        )
        try:
            cert = self.cluster.user_ca.issue_session_cert(public_key, identity)
        except pki.CertError as exc:
            raise cert_http_error(exc) from None
        await self.cluster.audit(event, user_name, client_addr=self.client_addr,
                                 roles=list(identity.roles), serial=format(cert.serial_number, "x"),
                                 expires_at=not_after.isoformat(), **(extra or {}),
                                 **({"instance": instance, "renewal": renewal} if instance else {}))
        return Response(status=200, body={
            "certificate": pki.cert_to_pem(cert).decode("ascii"),
            "host_ca": self.cluster.host_ca_pem(),
            "user": user_name,
            "roles": list(identity.roles),
            "cluster": cfg.name,
            "expires_at": not_after.isoformat(),
            "kind": kind,
        })

"""The API's bot routes: ``POST /v1/join`` (a join token for a bot
certificate) and a bot's ``POST /v1/renew`` (its current certificate for a
fresh one). gateway/cluster/bots.py keeps the bots, tokens and instances.

A join needs no client certificate: the token is the credential. Its
failures are audited (``bot.join_failed``, with the token's id when the
token is known) and counted per client address: past
``ADDRESS_FACTOR * [login] max_failures`` of them within the failure window
the address waits, as for logins (gateway/cluster/login_limits.py), so no
one fills the audit by guessing. A renewal proves the current certificate
(the TLS handshake did) and its place in its instance's renewal lineage; a
locked, removed or revoked bot's certificate is refused before that by the
checks every request passes (gateway/cluster/core.py).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING, Any

from gateway.cluster import bots, login_limits
from gateway.identity import pki
from gateway.identity.pki import utcnow
from gateway.net.http import HTTPError, Request, Response

if TYPE_CHECKING:
    from gateway.cluster.api import API

log = logging.getLogger("wicket.cluster.join")

#: A bot certificate's life unless the join or renewal asks for less (the
#: cluster's max_session_ttl and the bot's roles cap it further).
BOT_TTL = 3600.0


async def join(api: "API", request: Request) -> Response:
    cluster = api.cluster
    body = request.json()
    await _check_rate(api)
    token = body.get("token")
    public_key = api._public_key(body.get("public_key"))
    ttl = body.get("ttl_seconds")
    from gateway.cluster.api import _ttl_seconds

    _ttl_seconds(ttl)  # refused before a use of the token is spent
    try:
        record, instance = await cluster.db(bots.join, cluster.store, token, now=time.time())
    except bots.TokenRefused as exc:
        await cluster.audit("bot.join_failed", exc.bot, client_addr=api.client_addr, client_host=api.client_host,
                            reason=exc.reason, token=exc.token_id)
        raise HTTPError(401 if exc.reason == "unknown" else 403, f"token_{exc.reason}", exc.message) from None
    snap = await cluster.snapshot()
    bot = snap.bots.get(record.bot)
    if bot is None:  # removed between the two reads: its tokens went with it
        raise HTTPError(403, "access_denied", f"bot {record.bot} no longer exists")
    lock = snap.locks.get(bot.name)
    if lock is not None:
        await cluster.audit("bot.join_failed", bot.name, client_addr=api.client_addr, client_host=api.client_host,
                            reason="bot_locked", token=record.id)
        raise HTTPError(403, "user_locked", f"bot {bot.name} is locked ({lock.reason}); ask an administrator "
                        f"to unlock it (`wicket-cluster bots unlock`)")
    log.info("bot_joined bot=%s token=%s instance=%s uses_left=%d client=%s", bot.name, record.id, instance,
             record.uses_left, api.client_addr)
    return await _issue(api, bot, public_key, ttl, instance=instance, renewal=0, event="bot.join",
                        extra={"token": record.id, "uses_left": record.uses_left})


async def renew(api: "API", identity: pki.Identity, bot: Any, body: dict[str, Any]) -> Response:
    """A bot's renewal (the certificate passed every check already)."""
    cluster = api.cluster
    public_key = api._public_key(body.get("public_key"))
    if not identity.instance:
        raise HTTPError(400, "bad_request", "this bot certificate names no instance; join again with a token")
    renewal = await cluster.db(bots.advance_renewals, cluster.store, bot.name, identity.instance,
                               identity.renewal, now=time.time())
    if renewal is None:
        # Another holder of this certificate renewed it first (or the
        # instance is gone): stop every copy, and let a person decide.
        reason = (f"instance {identity.instance} renewed a certificate out of turn: a copy of it may be in "
                  f"other hands")
        await cluster.db(cluster.store.lock_user, bot.name, reason[:1024], "wicket-cluster", time.time())
        await cluster.audit("bot.lock", bot.name, client_addr=api.client_addr, reason=reason,
                            instance=identity.instance, renewal=identity.renewal, by="cluster")
        log.warning("bot_locked bot=%s instance=%s reason=%r action=%s", bot.name, identity.instance, reason,
                    "find out which copy is genuine; `wicket-cluster bots unlock` and a new token")
        raise HTTPError(403, "user_locked", f"bot {bot.name} is now locked: {reason}; an administrator must "
                        f"unlock it (`wicket-cluster bots unlock`) and give it a new join token")
    return await _issue(api, bot, public_key, body.get("ttl_seconds"), instance=identity.instance,
                        renewal=renewal, event="bot.renew", extra={})


async def _issue(api: "API", bot: Any, public_key: Any, ttl: Any, *, instance: str, renewal: int, event: str,
                 extra: dict[str, Any]) -> Response:
    roles = await api.cluster.roles_of(bot)
    requested = BOT_TTL if ttl is None else ttl
    return await api._issue(bot.name, roles, public_key, requested, now=utcnow(), auth_time=utcnow(),
                            event=event, generation=bot.cert_generation, kind="bot", instance=instance,
                            renewal=renewal, extra=extra)


async def _check_rate(api: "API") -> None:
    cluster = api.cluster
    cfg = cluster.config
    now = time.time()
    count, last = await cluster.db(cluster.store.last_audit, "bot.join_failed", since=now - cfg.login_failure_window,
                                   field=("client_host", api.client_host))
    wait = login_limits.wait(count, last, login_limits.ADDRESS_FACTOR * cfg.login_max_failures,
                             cfg.login_failure_window, now)
    if wait > 0:
        raise HTTPError(429, "rate_limited", f"too many failed joins from this address; try again in "
                        f"{math.ceil(wait)} seconds", retry_after=wait)

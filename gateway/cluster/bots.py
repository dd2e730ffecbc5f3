"""Bots and their join tokens, kept in the cluster's store.

A bot is a machine identity (a CI job, a sidecar) with roles, like a user
but with no password: it joins with a token an administrator made
(``wicket-cluster tokens add --bot NAME``) and gets a short-lived
certificate (kind ``bot``), which it renews itself by proving the current
one (``POST /v1/renew``). Bots share the users' name space (the store's
triggers keep the two tables apart), so a lock, a revocation generation and
an audit event name a bot as they name a user.

Tokens. A token is shown once, when it is made; the store keeps only its
SHA-256 (a token carries 256 random bits, so no slow hash is needed: there
is nothing to guess). Each has a use count and an expiry; using one is a
single conditional UPDATE, so two joins racing for the last use cannot both
win, in this process or another.

Renewal lineage. Each join makes an *instance* of the bot (a token with
several uses serves several replicas, each its own instance) with a
``renewals`` counter; every certificate the instance gets carries the
instance's id and the counter's value then. A renewal must present the
certificate with the current value, and moves it on. If a copy of a
certificate is renewed elsewhere, one of the two presents a stale value:
the bot is locked (every copy stops), since the administrator must decide
which was genuine (``bots unlock`` and a new token).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import sqlite3
from collections.abc import Iterable

import attrs

from gateway.cluster.store import AlreadyExists, Store, validate_name

#: What every token starts with: recognisable in a leaked log or a commit
#: (secret scanners key on such prefixes).
TOKEN_PREFIX = "wjt_"
#: The most uses one token may grant, and its longest life.
MAX_USES = 10_000
MAX_TOKEN_TTL = 30 * 86400.0
#: A join presents at most this much (a token is 47 characters).
MAX_TOKEN_LENGTH = 128


@attrs.frozen(slots=True, kw_only=True)
class Bot:
    """A bot as stored. ``name``, ``roles`` and ``cert_generation`` are what
    the cluster's checks read of a user too (gateway/cluster/core.py)."""

    name: str
    roles: tuple[str, ...] = attrs.field(converter=tuple)
    created_at: float
    created_by: str
    cert_generation: int = 0


@attrs.frozen(slots=True, kw_only=True)
class Token:
    """A join token as stored: never the token itself."""

    id: str
    bot: str
    uses_left: int
    used: int
    expires_at: float
    created_at: float
    created_by: str


class TokenRefused(Exception):
    """A join token that cannot be used; ``reason`` is one of
    ``unknown``, ``used_up``, ``expired`` (the audit's words), the message
    what to do."""

    def __init__(self, reason: str, message: str, token_id: str | None = None, bot: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.token_id = token_id
        self.bot = bot


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    return tuple(validate_name("role", r) for r in roles)


_BOTS = (
    "SELECT bots.*, coalesce(r.generation, 0) AS cert_generation"
    " FROM bots LEFT JOIN user_revocations AS r ON r.user_name = bots.name"
)


def _bot(row: sqlite3.Row) -> Bot:
    return Bot(name=row["name"], roles=json.loads(row["roles"]), created_at=row["created_at"],
               created_by=row["created_by"], cert_generation=row["cert_generation"])


def _token(row: sqlite3.Row) -> Token:
    return Token(id=row["id"], bot=row["bot_name"], uses_left=row["uses_left"], used=row["used"],
                 expires_at=row["expires_at"], created_at=row["created_at"], created_by=row["created_by"])


# -- bots ---------------------------------------------------------------------


def add_bot(store: Store, name: str, roles: Iterable[str], *, created_by: str, now: float) -> Bot:
    """Create a bot; :class:`AlreadyExists` if the name is a bot's or a
    user's."""
    bot = Bot(name=validate_name("bot", name), roles=_check_roles(roles), created_at=now,
              created_by=created_by[:256])
    with store.writing() as conn:
        try:
            conn.execute("INSERT INTO bots (name, roles, created_at, created_by) VALUES (?, ?, ?, ?)",
                         (bot.name, json.dumps(list(bot.roles)), bot.created_at, bot.created_by))
        except sqlite3.IntegrityError as exc:
            if exc.sqlite_errorname == "SQLITE_CONSTRAINT_PRIMARYKEY":
                raise AlreadyExists("bot", name) from None
            if exc.sqlite_errorname == "SQLITE_CONSTRAINT_TRIGGER":
                raise AlreadyExists("user", name) from None
            raise
    return bot


def set_roles(store: Store, name: str, roles: Iterable[str]) -> bool:
    """Replace a bot's roles (its live certificates get them at the next
    check: roles are intersected with the store's); False if no such bot."""
    checked = _check_roles(roles)
    with store.writing() as conn:
        return conn.execute("UPDATE bots SET roles = ? WHERE name = ?",
                            (json.dumps(list(checked)), name)).rowcount == 1


def get_bot(store: Store, name: str) -> Bot | None:
    with store.reading() as conn:
        row = conn.execute(f"{_BOTS} WHERE name = ?", (name,)).fetchone()
    return None if row is None else _bot(row)


def list_bots(store: Store) -> list[Bot]:
    with store.reading() as conn:
        return [_bot(r) for r in conn.execute(f"{_BOTS} ORDER BY name")]


def delete_bot(store: Store, name: str, *, now: float) -> bool:
    """Remove a bot, its tokens, and (by its revocation generation) every
    certificate it holds: a bot re-created under the name starts afresh."""
    if get_bot(store, name) is None:
        return False
    # Revoked first: if the removal then fails, its certificates are dead
    # anyway, which is what removing it was for.
    store.revoke_user_certs(name, "bot removed", now)
    with store.writing() as conn:
        return conn.execute("DELETE FROM bots WHERE name = ?", (name,)).rowcount == 1


def advance_renewals(store: Store, bot: str, instance: str, presented: int, *, now: float) -> int | None:
    """Move the instance's renewal count on from ``presented`` (the count in
    the certificate being renewed): the new count, or None if the store's
    count is another (a copy of the certificate was renewed first) or the
    instance is gone (its bot removed)."""
    with store.writing() as conn:
        row = conn.execute("UPDATE bot_instances SET renewals = renewals + 1, renewed_at = ?"
                           " WHERE id = ? AND bot_name = ? AND renewals = ? RETURNING renewals",
                           (now, instance, bot, presented)).fetchone()
    return None if row is None else row[0]


def list_instances(store: Store, bot: str) -> list[dict]:
    with store.reading() as conn:
        return [dict(r) for r in conn.execute(
            "SELECT id, token_id, renewals, joined_at, renewed_at FROM bot_instances WHERE bot_name = ?"
            " ORDER BY joined_at", (bot,))]


# -- tokens -------------------------------------------------------------------


def add_token(store: Store, bot: str, *, uses: int, ttl: float, created_by: str, now: float) -> tuple[str, Token]:
    """A new token for ``bot``: (the token, shown once; its record)."""
    if not 1 <= uses <= MAX_USES:
        raise ValueError(f"a token's uses are 1 to {MAX_USES}")
    if not 0 < ttl <= MAX_TOKEN_TTL:
        raise ValueError(f"a token lives at most {MAX_TOKEN_TTL / 86400:.0f} days")
    token = new_token()
    record = Token(id=secrets.token_hex(6), bot=bot, uses_left=uses, used=0, expires_at=now + ttl,
                   created_at=now, created_by=created_by[:256])
    with store.writing() as conn:
        if conn.execute("SELECT 1 FROM bots WHERE name = ?", (bot,)).fetchone() is None:
            raise LookupError(f"no bot {bot}")
        conn.execute("INSERT INTO join_tokens (id, digest, bot_name, uses_left, expires_at, created_at, created_by)"
                     " VALUES (?, ?, ?, ?, ?, ?, ?)",
                     (record.id, digest(token), bot, uses, record.expires_at, now, record.created_by))
    return token, record


def list_tokens(store: Store, bot: str | None = None) -> list[Token]:
    with store.reading() as conn:
        if bot is None:
            rows = conn.execute("SELECT * FROM join_tokens ORDER BY created_at")
        else:
            rows = conn.execute("SELECT * FROM join_tokens WHERE bot_name = ? ORDER BY created_at", (bot,))
        return [_token(r) for r in rows]


def delete_token(store: Store, token_id: str) -> bool:
    with store.writing() as conn:
        return conn.execute("DELETE FROM join_tokens WHERE id = ?", (token_id,)).rowcount == 1


def prune_tokens(store: Store, now: float) -> int:
    """Forget tokens that expired or were used up."""
    with store.writing() as conn:
        return conn.execute("DELETE FROM join_tokens WHERE expires_at <= ? OR uses_left = 0", (now,)).rowcount


def join(store: Store, token: str, *, now: float) -> tuple[Token, str]:
    """Spend one use of ``token`` on a new instance of its bot: the token's
    record after the use and the instance's id, or :class:`TokenRefused`
    saying why not. One statement decides, so a use is never granted
    twice; the instance is made in the same transaction."""
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > MAX_TOKEN_LENGTH:
        raise TokenRefused("unknown", "that is not a join token (they start with "
                           f"{TOKEN_PREFIX}); ask an administrator for one: `wicket-cluster tokens add`")
    key = digest(token)
    with store.writing() as conn:
        row = conn.execute(
            "UPDATE join_tokens SET uses_left = uses_left - 1, used = used + 1"
            " WHERE digest = ? AND uses_left > 0 AND expires_at > ? RETURNING *", (key, now)).fetchone()
        if row is not None:
            instance = secrets.token_hex(8)
            conn.execute("INSERT INTO bot_instances (id, bot_name, token_id, joined_at, renewed_at)"
                         " VALUES (?, ?, ?, ?, ?)", (instance, row["bot_name"], row["id"], now, now))
            return _token(row), instance
        row = conn.execute("SELECT * FROM join_tokens WHERE digest = ?", (key,)).fetchone()
    if row is None:
        raise TokenRefused("unknown", "the join token is not known to this cluster (removed, its bot "
                           "removed, or mistyped); ask an administrator for a new one")
    record = _token(row)
    if record.uses_left == 0:
        raise TokenRefused("used_up", f"the join token {record.id} has been used up ({record.used} "
                           f"use{'s' if record.used != 1 else ''}); ask an administrator for a new one",
                           record.id, record.bot)
    raise TokenRefused("expired", f"the join token {record.id} has expired; ask an administrator for a "
                       f"new one", record.id, record.bot)

"""``wicket-cluster bots`` and ``wicket-cluster tokens``: machine
identities and the join tokens they start with (gateway/cluster/bots.py).

Registered on ``wicket-cluster`` by :func:`register`, which hands over the
CLI's shared pieces (the ``--config`` option, the store opener, the table
printer), so this module imports nothing of gateway/cli/cluster.py.
"""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path
from typing import Any, Callable

import click

from gateway.cli.common import format_option
from gateway.cluster import bots as bot_store
from gateway.cluster.store import AlreadyExists, validate_name
from gateway.durations import format_duration, parse_duration


def register(main: click.Group, *, config_option: Callable, admin: Callable[[Path], Any],
             emit: Callable[[str, list[dict[str, Any]], list[str]], None]) -> None:
    """Add the ``bots`` and ``tokens`` groups to ``main``."""

    def roles_list(text: str) -> list[str]:
        return [r for r in (x.strip() for x in text.split(",")) if r]

    @main.group()
    def bots() -> None:
        """Machine identities (CI jobs, sidecars): they join with a token
        and renew their own short-lived certificates."""

    @bots.command("add")
    @config_option
    @click.argument("name")
    @click.option("--roles", default="", help="Comma-separated role names.")
    def bots_add(config_path: Path, name: str, roles: str) -> None:
        """Create bot NAME (then `wicket-cluster tokens add --bot NAME`)."""
        try:
            validate_name("bot", name)
            role_list = [validate_name("role", r) for r in roles_list(roles)]
        except ValueError as exc:
            raise click.BadParameter(str(exc)) from None
        with admin(config_path) as a:
            missing = [r for r in role_list if a.store.get_role(r) is None]
            if missing:
                click.echo(f"warning: role(s) {', '.join(missing)} do not exist yet", err=True)
            try:
                bot_store.add_bot(a.store, name, role_list, created_by=getpass.getuser(), now=time.time())
            except AlreadyExists as exc:
                raise click.ClickException(f"{exc.kind} {name} already exists; bots and users share names") \
                    from None
            a.audit.write("bot.add", name, {"roles": role_list, "by": getpass.getuser()})
        click.echo(f"bot {name} added with roles: {', '.join(role_list) or '(none)'}; give it a join token "
                   f"with `wicket-cluster tokens add --bot {name}`")

    @bots.command("ls")
    @config_option
    @format_option
    def bots_ls(config_path: Path, fmt: str) -> None:
        """List bots, with their lock and instances (joins)."""
        with admin(config_path) as a:
            locks = {lock.user: lock for lock in a.store.list_locks()}
            rows = []
            for b in bot_store.list_bots(a.store):
                instances = bot_store.list_instances(a.store, b.name)
                rows.append({"name": b.name, "roles": list(b.roles),
                             "locked": locks[b.name].reason if b.name in locks else None,
                             "instances": len(instances),
                             "last_renewed": max((i["renewed_at"] for i in instances), default=None),
                             "created": b.created_at})
        emit(fmt, rows, ["name", "roles", "locked", "instances", "last_renewed", "created"])

    @bots.command("rm")
    @config_option
    @click.argument("name")
    def bots_rm(config_path: Path, name: str) -> None:
        """Remove bot NAME and its tokens; its certificates are refused at
        once and its live sessions cut within 2 seconds."""
        with admin(config_path) as a:
            if not bot_store.delete_bot(a.store, name, now=time.time()):
                raise click.ClickException(f"no bot {name}")
            a.audit.write("bot.delete", name, {"by": getpass.getuser(), "certificates": "revoked"})
        click.echo(f"bot {name} removed with its tokens; its certificates are revoked")

    @bots.command("lock")
    @config_option
    @click.argument("name")
    @click.option("--reason", required=True, help="Why (shown to the bot and in the audit log).")
    def bots_lock(config_path: Path, name: str, reason: str) -> None:
        """Lock bot NAME: no renewal, no join, no dial; live sessions cut
        within 2 seconds; its certificates so far are revoked."""
        with admin(config_path) as a:
            if bot_store.get_bot(a.store, name) is None:
                raise click.ClickException(f"no bot {name}")
            a.store.lock_user(name, reason, getpass.getuser(), time.time())
            a.audit.write("bot.lock", name, {"reason": reason, "by": getpass.getuser(), "certificates": "revoked"})
        click.echo(f"bot {name} locked; its certificates are revoked")

    @bots.command("unlock")
    @config_option
    @click.argument("name")
    def bots_unlock(config_path: Path, name: str) -> None:
        """Unlock bot NAME (it joins again with a new token: its
        certificates from before the lock stay revoked)."""
        with admin(config_path) as a:
            if bot_store.get_bot(a.store, name) is None:
                raise click.ClickException(f"no bot {name}")
            if not a.store.unlock_user(name):
                raise click.ClickException(f"bot {name} is not locked")
            a.audit.write("bot.unlock", name, {"by": getpass.getuser()})
        click.echo(f"bot {name} unlocked; it joins again with a new token (`wicket-cluster tokens add --bot {name}`)")

    @main.group()
    def tokens() -> None:
        """Join tokens: what a bot presents once to get its first certificate."""

    @tokens.command("add")
    @config_option
    @click.option("--bot", "bot_name", required=True, help="The bot the token joins as.")
    @click.option("--ttl", default="10m", show_default=True, help="How long the token may be used (at most 30d).")
    @click.option("--uses", type=click.IntRange(1, bot_store.MAX_USES), default=1, show_default=True,
                  help="How many joins it allows (one per replica that joins with it).")
    @format_option
    def tokens_add(config_path: Path, bot_name: str, ttl: str, uses: int, fmt: str) -> None:
        """Make a join token for a bot. It is shown once, here: the cluster
        keeps only its hash. Its uses are audited (bot.join)."""
        try:
            seconds = parse_duration(ttl)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--ttl") from None
        with admin(config_path) as a:
            try:
                token, record = bot_store.add_token(a.store, bot_name, uses=uses, ttl=seconds,
                                                    created_by=getpass.getuser(), now=time.time())
            except LookupError as exc:
                raise click.ClickException(f"{exc.args[0]}; create it with `wicket-cluster bots add`") from None
            except ValueError as exc:
                raise click.BadParameter(str(exc)) from None
            a.audit.write("token.add", bot_name, {"token": record.id, "uses": uses, "ttl": seconds,
                                                  "by": getpass.getuser()})
        if fmt == "json":
            click.echo(json.dumps({"token": token, "id": record.id, "bot": bot_name, "uses": uses,
                                   "expires_at": record.expires_at}))
            return
        click.echo(token)
        click.echo(f"token {record.id} for bot {bot_name}: {uses} use{'s' if uses != 1 else ''} within "
                   f"{format_duration(seconds)}. It is shown only now. Join with:\n"
                   f"  wicket join CLUSTER:PORT --ca-pin PIN --token-file FILE", err=True)

    @tokens.command("ls")
    @config_option
    @click.option("--bot", "bot_name", help="Only this bot's tokens.")
    @format_option
    def tokens_ls(config_path: Path, bot_name: str | None, fmt: str) -> None:
        """List join tokens (their ids, never the tokens)."""
        now = time.time()
        with admin(config_path) as a:
            rows = [{"id": t.id, "bot": t.bot, "uses_left": t.uses_left, "used": t.used, "expires": t.expires_at,
                     "state": "expired" if t.expires_at <= now else "used up" if not t.uses_left else "usable",
                     "created_by": t.created_by} for t in bot_store.list_tokens(a.store, bot_name)]
        emit(fmt, rows, ["id", "bot", "uses_left", "used", "expires", "state", "created_by"])

    @tokens.command("rm")
    @config_option
    @click.argument("token_id")
    def tokens_rm(config_path: Path, token_id: str) -> None:
        """Remove join token TOKEN_ID (as `tokens ls` shows it); certificates
        bots got with it stay valid (`bots lock` stops those)."""
        with admin(config_path) as a:
            if not bot_store.delete_token(a.store, token_id):
                raise click.ClickException(f"no token {token_id}")
            a.audit.write("token.delete", None, {"token": token_id, "by": getpass.getuser()})
        click.echo(f"token {token_id} removed")

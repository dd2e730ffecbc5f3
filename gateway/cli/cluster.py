"""``wicket-cluster``: run the cluster and administer its store.

Administration commands open the same SQLite store as the running cluster
(which notices their changes within half a second), so they work whether or
not the cluster is running. Exit codes: 0 ok, 1 error, 2 usage.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, TextIO

import click

from gateway import kinds
from gateway.cli.common import format_option, read_password
from gateway.cluster import config as cfg
from gateway.cluster.audit import AuditLog
from gateway.cluster.passwords import check_password_policy, hash_password, new_totp_secret, totp_uri
from gateway.cluster.rbac import Role, RoleError
from gateway.cluster.store import AlreadyExists, NotFound, Resource, Store, StoreError, parse_serial, serial_text
from gateway.durations import parse_duration

CONFIG_ENV = "WICKET_CLUSTER_CONFIG"


def config_option(f: Callable) -> Callable:
    return click.option(
        "--config", "config_path", envvar=CONFIG_ENV, required=True,
        type=click.Path(dir_okay=False, path_type=Path),
        help=f"Cluster config file (TOML; see config/cluster.toml). Env: {CONFIG_ENV}.",
    )(f)


def load_config(path: Path) -> cfg.ClusterConfig:
    try:
        return cfg.load(path)
    except cfg.ConfigError as exc:
        raise click.ClickException(str(exc)) from None


class _Admin:
    """The store (and audit log) of the cluster a config names."""

    def __init__(self, path: Path) -> None:
        self.config = load_config(path)
        db = self.config.state_dir / "wicket.db"
        if not db.exists():
            raise click.ClickException(
                f"no cluster state in {self.config.state_dir}; run `wicket-cluster start --config {path}` "
                f"once to create it"
            )
        self.store = Store.open(db)
        self.audit = AuditLog(self.store, self.config.audit_jsonl)

    def __enter__(self) -> "_Admin":
        return self

    def __exit__(self, *exc: object) -> None:
        self.audit.close()
        self.store.close()


def _emit(fmt: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    if fmt == "json":
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    if not rows:
        click.echo("(none)")
        return
    cells = [[_cell(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip())
    for row in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip())


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return ",".join(f"{k}={'|'.join(map(str, v)) if isinstance(v, (list, tuple)) else v}"
                        for k, v in sorted(value.items())) or "-"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, float):
        return dt.datetime.fromtimestamp(value, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%SZ")
    return str(value)


def _pairs(values: tuple[str, ...], option: str) -> list[tuple[str, str]]:
    out = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint=option)
        out.append((key, value))
    return out


def _labels(values: tuple[str, ...], option: str = "--label") -> dict[str, str]:
    pairs = _pairs(values, option)
    keys = [k for k, _ in pairs]
    dup = {k for k in keys if keys.count(k) > 1}
    if dup:
        raise click.BadParameter(f"{', '.join(sorted(dup))} given more than once", param_hint=option)
    return dict(pairs)


def _spec_flags() -> dict[str, tuple[Any, list[str]]]:
    """Every kind's ``resources add`` flags (gateway/kinds.py), each once:
    option -> (its SpecFlag, the kinds that take it)."""
    flags: dict[str, tuple[Any, list[str]]] = {}
    for kind in kinds.KINDS.values():
        for flag in kind.spec.flags:
            flags.setdefault(flag.option, (flag, []))[1].append(kind.name)
    return flags


def spec_options(f: Callable) -> Callable:
    for option, (flag, names) in reversed(_spec_flags().items()):
        f = click.option(option, f"spec_{flag.key}", multiple=flag.table,
                         type=click.Choice(flag.choices) if flag.choices else None,
                         help=f"{', '.join(names)}: {flag.help}")(f)
    return f


def param_options(f: Callable) -> Callable:
    for param in reversed(kinds.params()):
        users = ", ".join(k.name for k in kinds.KINDS.values() if param in k.params)
        f = click.option(param.role_option, f"param_{param.role_key}", default="",
                         help=f"Comma-separated {param.help} ({users}).")(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "WICKET_CLUSTER"})
@click.version_option(package_name="wicket")
def main() -> None:
    """Run a Wicket cluster (CA, login API, proxy, audit) and administer it.

    Every option can also come from the environment, as WICKET_CLUSTER_,
    the command's words and the option's name in capitals with underscores
    (WICKET_CLUSTER_START_LOG_FORMAT=json); --config is
    WICKET_CLUSTER_CONFIG. An option on the command line wins.
    """


@main.command()
@config_option
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True)
@click.option("--log-level", type=click.Choice(["debug", "info", "warning"]), default="info",
              show_default=True)
@click.option("--ready-file", type=click.Path(dir_okay=False, path_type=Path),
              help="Once listening, write {address, pin} as JSON here (for supervisors and tests).")
@click.option("--workers", type=click.IntRange(1, cfg.MAX_WORKERS), default=None,
              help="Processes serving connections (each its own relay engine), instead of the config's "
                   "[server] workers (default 1).")
def start(config_path: Path, log_format: str, log_level: str, ready_file: Path | None,
          workers: int | None) -> None:
    """Run the cluster in the foreground (SIGTERM or Ctrl-C stops it cleanly)."""
    import functools

    import trio

    from gateway import logs
    from gateway.cluster.core import Cluster
    from gateway.cluster.server import serve
    from gateway.cluster.workers import WorkersFailing
    from gateway.net.descriptors import raise_open_files_limit

    logs.setup(log_format, log_level)
    config = load_config(config_path)
    # Every connection and upstream is a descriptor: take all the system
    # allows; [limits] keeps a reserve of them (gateway/net/descriptors.py).
    raise_open_files_limit()
    try:
        cluster = Cluster.open(config)
    except (OSError, ValueError, StoreError) as exc:
        raise click.ClickException(f"cannot open cluster state in {config.state_dir}: {exc}") from None
    workers = workers if workers is not None else config.workers
    if workers > 1:
        from gateway.cluster.workers import supervise
        serving = functools.partial(supervise, cluster, config_path=config_path, workers=workers,
                                    log_format=log_format, log_level=log_level)
    else:
        serving = functools.partial(serve, cluster)

    async def run() -> None:
        async with trio.open_nursery() as nursery:
            host, port = (await nursery.start(serving))[:2]
            if ready_file is not None:
                address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                doc = {"address": address, "pin": cluster.host_ca.pin, "cluster": config.name}
                tmp = ready_file.with_name(ready_file.name + ".tmp")
                tmp.write_text(json.dumps(doc))
                tmp.replace(ready_file)

    try:
        trio.run(run)
    except* OSError as group:
        exc = group.exceptions[0]
        host, port = config.listen
        raise click.ClickException(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    except* WorkersFailing:
        raise click.ClickException("the cluster's workers kept dying (see the log above); stopped") from None
    finally:
        cluster.close()


# -- users -------------------------------------------------------------------


@main.group()
def users() -> None:
    """Add, list, lock, unlock and remove users; set passwords."""


def _new_password(prompt: str, from_stdin: bool) -> str:
    password = read_password(prompt, from_stdin=from_stdin, confirm=True)
    try:
        check_password_policy(password)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    return password


@users.command("add")
@config_option
@click.argument("name")
@click.option("--roles", default="", help="Comma-separated role names.")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--totp", is_flag=True, help="Enrol TOTP and print the otpauth:// URI for an authenticator app.")
def users_add(config_path: Path, name: str, roles: str, password_stdin: bool, totp: bool) -> None:
    """Create user NAME."""
    try:
        cfg.validate_name("user", name)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="NAME") from None
    role_list = [r for r in (x.strip() for x in roles.split(",")) if r]
    password = _new_password(f"Password for {name}", password_stdin)
    with _Admin(config_path) as admin:
        missing = [r for r in role_list if admin.store.get_role(r) is None]
        if missing:
            click.echo(f"warning: role(s) {', '.join(missing)} do not exist yet", err=True)
        secret = new_totp_secret() if totp else None
        try:
            admin.store.add_user(name, hash_password(password), role_list, totp_secret=secret, now=time.time())
        except AlreadyExists:
            raise click.ClickException(f"user {name} already exists") from None
        except StoreError as exc:  # the name is a bot's (gateway/cluster/bots.py)
            raise click.ClickException(str(exc)) from None
        admin.audit.write("user.add", name, {"roles": role_list, "totp": totp})
    click.echo(f"user {name} added with roles: {', '.join(role_list) or '(none)'}")
    if secret is not None:
        click.echo("TOTP enrolled; add this URI to an authenticator app (it is shown once):")
        click.echo(totp_uri(secret, name, admin.config.name))


@users.command("ls")
@config_option
@format_option
def users_ls(config_path: Path, fmt: str) -> None:
    """List users."""
    with _Admin(config_path) as admin:
        locks = {lock.user: lock for lock in admin.store.list_locks()}
        rows = [
            {"name": u.name, "roles": list(u.roles), "totp": u.totp_enrolled,
             "locked": locks[u.name].reason if u.name in locks else None, "created": u.created_at}
            for u in admin.store.list_users()
        ]
    _emit(fmt, rows, ["name", "roles", "totp", "locked", "created"])


@users.command("lock")
@config_option
@click.argument("name")
@click.option("--reason", required=True, help="Why (shown to the user and in the audit log).")
def users_lock(config_path: Path, name: str, reason: str) -> None:
    """Lock user NAME: refuse new dials now, cut live sessions within 2
    seconds, and revoke every certificate issued so far (after an unlock
    the user logs in again)."""
    import getpass

    with _Admin(config_path) as admin:
        if admin.store.get_user(name) is None:
            raise click.ClickException(f"no user {name}")
        by = getpass.getuser()
        admin.store.lock_user(name, reason, by, time.time())
        admin.audit.write("user.lock", name, {"reason": reason, "by": by, "certificates": "revoked"})
    click.echo(f"user {name} locked; their certificates are revoked")


@users.command("unlock")
@config_option
@click.argument("name")
def users_unlock(config_path: Path, name: str) -> None:
    """Unlock user NAME."""
    import getpass

    with _Admin(config_path) as admin:
        if not admin.store.unlock_user(name):
            raise click.ClickException(f"user {name} is not locked")
        admin.audit.write("user.unlock", name, {"by": getpass.getuser()})
    click.echo(f"user {name} unlocked; certificates from before the lock stay revoked: "
               f"the user runs `wicket login` again")


@users.command("passwd")
@config_option
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Read the new password from standard input.")
def users_passwd(config_path: Path, name: str, password_stdin: bool) -> None:
    """Set user NAME's password. Revokes every certificate issued so far
    (live sessions are cut within 2 seconds): the user logs in again."""
    import getpass

    password = _new_password(f"New password for {name}", password_stdin)
    with _Admin(config_path) as admin:
        try:
            admin.store.set_password_hash(name, hash_password(password), now=time.time())
        except NotFound:
            raise click.ClickException(f"no user {name}") from None
        admin.audit.write("user.passwd", name, {"by": getpass.getuser(), "certificates": "revoked"})
    click.echo(f"password of {name} set; their certificates are revoked")


@users.command("rm")
@config_option
@click.argument("name")
def users_rm(config_path: Path, name: str) -> None:
    """Remove user NAME. Revokes their certificates (also for a user later
    created with the same name); live sessions are cut within 2 seconds."""
    import getpass

    with _Admin(config_path) as admin:
        if not admin.store.delete_user(name, now=time.time()):
            raise click.ClickException(f"no user {name}")
        admin.audit.write("user.delete", name, {"by": getpass.getuser(), "certificates": "revoked"})
    click.echo(f"user {name} removed; their certificates are revoked")


# -- certificates --------------------------------------------------------------


@main.group()
def certs() -> None:
    """Revoke single session certificates."""


@certs.command("revoke")
@config_option
@click.argument("serial")
@click.option("--reason", default="", help="Why (kept in the audit log).")
def certs_revoke(config_path: Path, serial: str, reason: str) -> None:
    """Revoke the session certificate with SERIAL (hex, as the audit's
    login.ok and login.renew events show it): dials and API calls with it
    are refused at once, its live sessions cut within 2 seconds."""
    import getpass

    try:
        number = parse_serial(serial)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="SERIAL") from None
    with _Admin(config_path) as admin:
        issued = admin.store.find_issued_cert(number)
        if issued is None:
            raise click.ClickException(
                f"no certificate with serial {serial_text(number)} in the audit log (login.ok, login.renew): "
                f"check the serial (`wicket-cluster audit --event login.`); one older than the audit "
                f"log has expired anyway")
        expires = issued.fields.get("expires_at")
        try:
            expires_at = dt.datetime.fromisoformat(expires).timestamp() if isinstance(expires, str) else None
        except ValueError:
            expires_at = None
        by = getpass.getuser()
        now = time.time()
        if not admin.store.revoke_cert(number, user=issued.user, reason=reason, revoked_by=by,
                                       expires_at=expires_at, now=now):
            raise click.ClickException(f"certificate {serial_text(number)} is already revoked")
        admin.store.prune_revoked_certs(now)
        admin.audit.write("cert.revoke", issued.user, {"serial": serial_text(number), "reason": reason, "by": by})
    click.echo(f"certificate {serial_text(number)} of {issued.user} revoked")


# -- roles -------------------------------------------------------------------


@main.group()
def roles() -> None:
    """Define and list roles (allow/deny by resource name and labels)."""


@roles.command("add")
@config_option
@click.argument("name")
@click.option("--allow-resources", default="", help="Comma-separated name globs to allow.")
@click.option("--allow-label", multiple=True,
              help="KEY=GLOB an allowed resource must carry (repeatable; the same key twice means either value).")
@param_options
@click.option("--deny-resources", default="", help="Comma-separated name globs to deny (deny wins).")
@click.option("--deny-label", multiple=True, help="KEY=GLOB that denies a resource (repeatable; each denies on its own).")
@click.option("--max-session-ttl", default=None, help="Cap on certificate lifetime, e.g. 1h.")
def roles_add(config_path: Path, name: str, allow_resources: str, allow_label: tuple[str, ...],
              deny_resources: str, deny_label: tuple[str, ...], max_session_ttl: str | None,
              **params: str) -> None:
    """Create or replace role NAME.

    The allow flags make one rule (a resource must match all of them); every
    deny flag is a rule of its own, so each one denies by itself."""

    def globs(text: str) -> list[str]:
        return [g.strip() for g in text.split(",") if g.strip()]

    allow: dict[str, Any] = {}
    if globs(allow_resources):
        allow["resources"] = globs(allow_resources)
    if allow_label:
        labels: dict[str, list[str]] = {}
        for key, value in _pairs(allow_label, "--allow-label"):
            labels.setdefault(key, []).append(value)
        allow["labels"] = labels
    for param in kinds.params():
        if globs(params[f"param_{param.role_key}"]):
            allow[param.role_key] = globs(params[f"param_{param.role_key}"])
    deny: list[dict[str, Any]] = []
    if globs(deny_resources):
        deny.append({"resources": globs(deny_resources)})
    deny += [{"labels": {key: value}} for key, value in _pairs(deny_label, "--deny-label")]
    spec: dict[str, Any] = {"allow": [allow] if allow else [], "deny": deny}
    if max_session_ttl:
        spec["max_session_ttl"] = max_session_ttl
    try:
        cfg.validate_name("role", name)
        role = Role.from_spec(name, spec)
    except (RoleError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    with _Admin(config_path) as admin:
        admin.store.put_role(name, role.to_spec(), "cli")
        admin.audit.write("role.put", None, {"role": name, "spec": role.to_spec()})
    click.echo(f"role {name} saved")


@roles.command("ls")
@config_option
@format_option
def roles_ls(config_path: Path, fmt: str) -> None:
    """List roles."""
    with _Admin(config_path) as admin:
        rows = [{"name": r.name, "source": r.source, **_role_row(r.spec)} for r in admin.store.list_roles()]
    _emit(fmt, rows, ["name", "allow", "deny", "max_session_ttl", "source"])


def _role_row(spec: dict[str, Any]) -> dict[str, Any]:
    def show(rules: list[dict[str, Any]]) -> str:
        return "; ".join(" ".join(f"{k}={_cell(v)}" for k, v in r.items()) for r in rules) or "-"

    ttl = spec.get("max_session_ttl")
    return {"allow": show(spec.get("allow", [])), "deny": show(spec.get("deny", [])),
            "max_session_ttl": None if ttl is None else f"{parse_duration(ttl):.0f}s"}


# -- resources ---------------------------------------------------------------


@main.group()
def resources() -> None:
    """Register and list resources."""


@resources.command("add")
@config_option
@click.argument("name")
@click.option("--kind", type=click.Choice(list(kinds.KINDS)), default="tcp", show_default=True,
              help="; ".join(f"{k.name}: {k.summary}" for k in kinds.KINDS.values()) + ".")
@click.option("--address", required=True, help="HOST:PORT of the upstream, as the cluster reaches it.")
@click.option("--label", multiple=True, help="KEY=VALUE label (repeatable).")
@spec_options
def resources_add(config_path: Path, name: str, kind: str, address: str, label: tuple[str, ...],
                  **values: Any) -> None:
    """Create or replace resource NAME."""
    spec: dict[str, Any] = {}
    for option, (flag, _names) in _spec_flags().items():
        value = values[f"spec_{flag.key}"]
        if flag.table and value:
            spec[flag.key] = _labels(value, option)
        elif not flag.table and value is not None:
            spec[flag.key] = value
    try:
        spec = cfg.validate_resource(name, kind, address, spec)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None
    try:
        resource = Resource(name=name, kind=kind, address=address, labels=_labels(label), spec=spec, source="cli")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--label") from None
    with _Admin(config_path) as admin:
        admin.store.put_resource(resource)
        admin.audit.write("resource.put", None, {"resource": name, "kind": kind, "address": address})
    click.echo(f"resource {name} ({kind} {address}) saved")


@resources.command("ls")
@config_option
@format_option
def resources_ls(config_path: Path, fmt: str) -> None:
    """List resources."""
    with _Admin(config_path) as admin:
        rows = [{"name": r.name, "kind": r.kind, "address": r.address, "labels": dict(r.labels),
                 "source": r.source} for r in admin.store.list_resources()]
    _emit(fmt, rows, ["name", "kind", "address", "labels", "source"])


@resources.command("rm")
@config_option
@click.argument("name")
def resources_rm(config_path: Path, name: str) -> None:
    """Remove resource NAME."""
    with _Admin(config_path) as admin:
        if not admin.store.delete_resource(name):
            raise click.ClickException(f"no resource {name}")
        admin.audit.write("resource.delete", None, {"resource": name})
    click.echo(f"resource {name} removed")


# -- audit -------------------------------------------------------------------


def _printable(text: str) -> str:
    """Audit text comes from peers (user names, SQL): escape control
    characters so nothing in it can drive the administrator's terminal."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def _when(value: str | None, option: str = "--since") -> float | None:
    """A point in time from a duration ago (30m, 2h) or an ISO time (UTC
    unless it says otherwise)."""
    if not value:
        return None
    try:
        return time.time() - parse_duration(value)
    except ValueError:
        pass
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("expected a duration (30m, 2h) or an ISO time", param_hint=option) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)
    return when.timestamp()


@main.group(invoke_without_command=True)
@click.option("--config", "config_path", envvar=CONFIG_ENV, type=click.Path(dir_okay=False, path_type=Path),
              help=f"Cluster config file (TOML; see config/cluster.toml). Env: {CONFIG_ENV}.")
@click.option("--since", help="Only events newer than this: a duration ago (30m, 2h) or an ISO time.")
@click.option("--user", help="Only this user's events.")
@click.option("--event", "event_prefix", help="Only events starting with this (e.g. session., dial.denied).")
@click.option("--limit", type=click.IntRange(1, 100000), default=1000, show_default=True,
              help="Show at most this many of the newest matching events.")
@format_option
@click.pass_context
def audit(ctx: click.Context, config_path: Path | None, since: str | None, user: str | None,
          event_prefix: str | None, limit: int, fmt: str) -> None:
    """Show the audit log (`audit export` writes all of it out)."""
    if ctx.invoked_subcommand is not None:
        return
    if config_path is None:
        raise click.UsageError("Missing option '--config' (or set WICKET_CLUSTER_CONFIG).")
    with _Admin(config_path) as admin:
        events = admin.store.query_audit(since=_when(since), user=user, event_prefix=event_prefix, limit=limit,
                                         latest=True)
    if fmt == "json":
        for e in events:
            click.echo(json.dumps({"id": e.id, "time": e.time, "event": e.event, "user": e.user,
                                   **dict(e.fields)}, separators=(",", ":"), default=str))
        return
    for e in events:
        when = dt.datetime.fromtimestamp(e.time, dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        user = _printable(e.user or "-")
        details = " ".join(
            f"{k}={v if isinstance(v, str) else json.dumps(v, separators=(',', ':'))}"
            for k, v in dict(e.fields).items()
        )
        click.echo(f"{when}Z {e.event:15} {user:12} {_printable(details)}")


#: The columns of `audit export --format csv`; jsonl has the same members.
EXPORT_COLUMNS = ("id", "time", "utc", "event", "user", "fields")


def _export_record(e: Any) -> dict[str, Any]:
    utc = dt.datetime.fromtimestamp(e.time, dt.timezone.utc).isoformat(timespec="microseconds")
    return {"id": e.id, "time": e.time, "utc": utc, "event": e.event, "user": e.user, "fields": dict(e.fields)}


def _open_export(output: Path | None) -> TextIO:
    if output is None:
        return sys.stdout
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        raise click.ClickException(f"{output} exists; export to a new file") from None
    except OSError as exc:
        raise click.ClickException(f"cannot create {output}: {exc.strerror}") from None
    return os.fdopen(fd, "w", encoding="utf-8", newline="")


@audit.command("export")
@config_option
@click.option("--since", help="Only events at or after this: a duration ago (30d) or an ISO time.")
@click.option("--until", help="Only events before this: a duration ago or an ISO time.")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True,
              help="jsonl: one JSON object per line; csv: a header row, fields as JSON text.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Write to this new file (created 0600; an existing one is not overwritten) "
                   "instead of standard output.")
def audit_export(config_path: Path, since: str | None, until: str | None, fmt: str, output: Path | None) -> None:
    """Write every audit event in the store (in a time window, if given),
    oldest first, each with its id, time (epoch seconds and UTC), event,
    user and fields as stored. Reads page by page: any size, little
    memory. E.g. to archive what `[audit] keep` will prune."""
    start, end = _when(since), _when(until, "--until")
    if start is not None and end is not None and end <= start:
        raise click.BadParameter("must be later than --since", param_hint="--until")
    count = 0
    with _Admin(config_path) as admin:
        out = _open_export(output)
        try:
            if fmt == "csv":
                writer = csv.writer(out, lineterminator="\n")
                writer.writerow(EXPORT_COLUMNS)
            for e in admin.store.iter_audit(start, end):
                record = _export_record(e)
                if fmt == "csv":
                    record["fields"] = json.dumps(record["fields"], ensure_ascii=False, separators=(",", ":"))
                    writer.writerow(record.values())
                else:
                    out.write(json.dumps(record, ensure_ascii=False, separators=(",", ":"), default=str) + "\n")
                count += 1
            out.flush()
        except BrokenPipeError:
            # `| head`: the reader has what it wanted. Keep Python's exit from
            # flushing into the closed pipe again.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise SystemExit(1) from None
        finally:
            if out is not sys.stdout:
                out.close()
    click.echo(f"{count} audit events exported" + (f" to {output}" if output else ""), err=True)


from gateway.cli import cluster_bots, cluster_ca  # noqa: E402

cluster_ca.register(main, config_option=config_option, load_config=load_config)
cluster_bots.register(main, config_option=config_option, admin=_Admin, emit=_emit)


if __name__ == "__main__":
    main()

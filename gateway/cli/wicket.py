"""``wicket``: log in to a cluster and open local ports to its resources.

Exit codes scripts can trust:
  0 ok · 1 other error · 2 usage · 3 not logged in or session expired ·
  4 refused (bad credentials, access denied, locked, rate limited) ·
  5 the cluster could not be reached or verified
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable

import click
import h11
import trio

from gateway import kinds
from gateway.cli.common import format_option, read_password
from gateway.durations import format_duration, parse_duration
from gateway.identity import pki
from gateway.identity.pki import utcnow
from gateway.local import api, profile as profiles
from gateway.local.connect import ClusterError
from gateway.local.waitroom import RIDE_OUT
from gateway.local.profile import Profile, ProfileError
from gateway.net.http import HTTPError

EXIT_NOT_LOGGED_IN = 3
EXIT_REFUSED = 4
EXIT_UNREACHABLE = 5

_REFUSED = {"access_denied", "user_locked", "rate_limited", "totp_required", "bad_request",
            "token_unknown", "token_used_up", "token_expired"}
_EXPIRED = {"cert_expired", "cert_required"}


class WicketError(click.ClickException):
    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _cluster_error(exc: ClusterError) -> WicketError:
    if exc.code in _EXPIRED:
        return WicketError(exc.message, EXIT_NOT_LOGGED_IN)
    if exc.code in _REFUSED:
        return WicketError(exc.message, EXIT_REFUSED)
    if exc.code in ("unreachable", "tls_failed", "bad_answer", "cert_invalid"):
        return WicketError(exc.message, EXIT_UNREACHABLE)
    return WicketError(exc.message)


def _run(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return trio.run(fn, *args)
    except ClusterError as exc:
        raise _cluster_error(exc) from None
    except ProfileError as exc:
        raise WicketError(str(exc), EXIT_NOT_LOGGED_IN) from None
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError,
            HTTPError) as exc:
        raise WicketError(f"the conversation with the cluster broke off ({type(exc).__name__}: {exc}); "
                          f"check that it is running and try again", EXIT_UNREACHABLE) from None


def _load_profile() -> Profile:
    try:
        return Profile.load()
    except ProfileError as exc:
        raise WicketError(str(exc), EXIT_NOT_LOGGED_IN) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "WICKET"})
@click.version_option(package_name="wicket")
def main() -> None:
    """Wicket gateway: one login, then localhost ports to every resource you may reach.

    Profile directory: $WICKET_HOME (default ~/.wicket).

    Every option can also come from the environment, as WICKET_, the
    command's words and the option's name in capitals with underscores
    (WICKET_PROXY_DB_PORT=15432 for `wicket proxy db --port`); an option on
    the command line wins.
    """


@main.command()
@click.argument("address")
@click.option("--user", required=True, help="Your user name on the cluster.")
@click.option("--ca-pin", help="sha256:... pin of the cluster CA (from `wicket-cluster ca pin`).")
@click.option("--insecure", is_flag=True, help="Trust the cluster CA without checking a pin (not for production).")
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
@click.option("--totp-code", help="Current TOTP code, if your user has TOTP enrolled (visible in ps; "
              "prefer --totp-stdin).")
@click.option("--totp-stdin", is_flag=True,
              help="Read the TOTP code from standard input (the line after the password with --password-stdin).")
@click.option("--ttl", help="Ask for a shorter session (e.g. 1h); the cluster caps it by your roles.")
@format_option
def login(address: str, user: str, ca_pin: str | None, insecure: bool, password_stdin: bool,
          totp_code: str | None, totp_stdin: bool, ttl: str | None, fmt: str) -> None:
    """Log in to the cluster at ADDRESS (HOST:PORT) and store a session certificate."""
    from gateway.addresses import parse_hostport

    try:
        parse_hostport(address)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="ADDRESS") from None
    ttl_seconds = None
    if ttl:
        try:
            ttl_seconds = parse_duration(ttl)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--ttl") from None
    pin = None
    if ca_pin:
        try:
            pin = pki.normalize_pin(ca_pin)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--ca-pin") from None
    interactive = sys.stdin.isatty()

    ca = _run(api.fetch_ca, address)
    if pin is not None:
        if pin != ca.pin:
            raise WicketError(
                f"the cluster at {address} presented CA {ca.pin}, which does not match --ca-pin {pin}. "
                f"Someone may be intercepting the connection, or the pin is wrong: check it with "
                f"`wicket-cluster ca pin` on the cluster.",
                EXIT_UNREACHABLE,
            )
    elif insecure:
        click.echo(f"WARNING: --insecure: trusting cluster CA {ca.pin} without checking a pin", err=True)
    else:
        click.echo(f"The cluster at {address} (name {ca.name!r}) presented CA\n  pin:         {ca.pin}\n"
                   f"  fingerprint: {ca.fingerprint}", err=True)
        if not interactive:
            raise WicketError("cannot confirm the cluster CA without a terminal: pass --ca-pin "
                              "(from `wicket-cluster ca pin`) or --insecure", EXIT_UNREACHABLE)
        if not click.confirm("Trust this cluster?", default=False, err=True):
            raise WicketError("not trusted; nothing was saved", EXIT_REFUSED)

    password = read_password(f"Password for {user}", from_stdin=password_stdin)

    if totp_stdin:
        totp_code = sys.stdin.readline().strip()

    key = pki.generate_key()
    public_pem = key.public_key().public_bytes(
        pki.serialization.Encoding.PEM, pki.serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")

    async def do_login() -> dict[str, Any]:
        return await api.login(address, ca, user=user, password=password, totp_code=totp_code,
                                  ttl_seconds=ttl_seconds, public_key_pem=public_pem)

    answer = _run(do_login)
    home = profiles.wicket_home()
    profile = Profile.save(
        home, cluster_addr=address, cluster_name=answer["cluster"], user=answer["user"], ca_pin=ca.pin,
        key_pem=pki.key_to_pem(key), cert_pem=answer["certificate"].encode("ascii"), ca_pem=ca.pem,
    )
    _refresh_ssh(profile)
    identity = profile.identity()
    left = identity.remaining(utcnow()).total_seconds()
    if fmt == "json":
        click.echo(json.dumps(_status_doc(profile, identity)))
    else:
        click.echo(f"Logged in to {answer['cluster']} ({address}) as {identity.user}; roles: "
                   f"{', '.join(identity.roles) or '(none)'}; valid for {format_duration(left)}. "
                   f"Profile: {home}")


def _refresh_ssh(profile: Profile) -> None:
    """After a login or renewal: the known_hosts of a profile set up for
    OpenSSH (`wicket config ssh`), for the nodes the roles reach now."""
    from gateway.local import ssh_config

    if not ssh_config.SshFiles.of(profile).known_hosts.exists():
        return
    try:
        _run(ssh_config.refresh, profile)
    except WicketError as exc:
        click.echo(f"WARNING: the nodes' SSH host keys were not refreshed ({exc.message}); run `wicket config ssh`",
                   err=True)


def _status_doc(profile: Profile, identity: pki.Identity) -> dict[str, Any]:
    now = utcnow()
    return {
        "cluster": profile.cluster_name,
        "address": profile.cluster_addr,
        "user": identity.user,
        "roles": list(identity.roles),
        "kind": identity.kind,
        "expires_at": identity.not_after.isoformat(),
        "remaining_seconds": max(0, int(identity.remaining(now).total_seconds())),
        "expired": now >= identity.not_after,
        "profile": str(profile.home),
    }


@main.command()
@format_option
def status(fmt: str) -> None:
    """Who you are logged in as, your roles and the time left (exit 3 if expired)."""
    profile = _load_profile()
    try:
        identity = profile.identity()
    except (OSError, ValueError, pki.CertError) as exc:
        raise WicketError(f"the login in {profile.home} is unreadable ({exc}); run `wicket login` again",
                          EXIT_NOT_LOGGED_IN) from None
    doc = _status_doc(profile, identity)
    if fmt == "json":
        click.echo(json.dumps(doc))
    else:
        left = "expired" if doc["expired"] else f"{format_duration(doc['remaining_seconds'])} left"
        click.echo(f"Cluster: {doc['cluster']} ({doc['address']})\nUser:    {doc['user']}\n"
                   f"Roles:   {', '.join(doc['roles']) or '(none)'}\n"
                   f"Valid:   until {doc['expires_at']} ({left})")
    if doc["expired"]:
        sys.exit(EXIT_NOT_LOGGED_IN)


@main.command("ls")
@format_option
def ls(fmt: str) -> None:
    """Resources you may reach, with their kind and labels."""
    from gateway.local import resource_kinds

    profile = _load_profile()
    try:
        profile.check_fresh(utcnow())
    except ProfileError as exc:
        raise WicketError(str(exc), EXIT_NOT_LOGGED_IN) from None
    doc = _run(api.api_call, profile, "GET", "/v1/resources")
    items = doc.get("resources", [])
    resource_kinds.remember(profile.home, items)
    if fmt == "json":
        click.echo(json.dumps(items))
        return
    if not items:
        click.echo("No resources are available to you.")
        return
    rows = []
    for i in items:
        labels = ",".join(f"{k}={v}" for k, v in sorted(i.get("labels", {}).items())) or "-"
        allowed = i.get("allowed", {})
        grants = " ".join(f"{k}s={','.join(v)}" for k, v in sorted(allowed.items())) or "-"
        rows.append((i["name"], i["kind"], labels, grants))
    header = ("NAME", "KIND", "LABELS", "ALLOWED")
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(3)]
    for row in [header, *rows]:
        click.echo("  ".join(v.ljust(w) for v, w in zip(row, widths)) + "  " + row[3])


@main.command()
@click.option("--ttl", help="Ask for a shorter session (e.g. 1h).")
@format_option
def renew(ttl: str | None, fmt: str) -> None:
    """Swap the session certificate for a fresh one (new key, current roles)
    without a password, up to the maximum session of the original login."""
    profile = _load_profile()
    try:
        profile.check_fresh(utcnow())
    except ProfileError as exc:
        raise WicketError(str(exc), EXIT_NOT_LOGGED_IN) from None
    body: dict[str, Any] = {}
    if ttl:
        try:
            body["ttl_seconds"] = parse_duration(ttl)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--ttl") from None
    from gateway.local import session

    profile = _run(functools.partial(session.renew, profile, ttl_seconds=body.get("ttl_seconds")))
    _refresh_ssh(profile)
    identity = profile.identity()
    if fmt == "json":
        click.echo(json.dumps(_status_doc(profile, identity)))
    else:
        left = format_duration(identity.remaining(utcnow()).total_seconds())
        click.echo(f"Renewed: {identity.user}, roles {', '.join(identity.roles) or '(none)'}, valid for {left}.")


@main.command()
def logout() -> None:
    """Delete the session key and certificate."""
    home = profiles.wicket_home()
    if profiles.remove(home):
        click.echo(f"Logged out (removed the session key and certificate from {home}).")
    else:
        click.echo("Not logged in.")


@main.group()
def proxy() -> None:
    """Open a local port to a resource."""


def _listen_options(f: Callable) -> Callable:
    f = click.option("--wait-for-cluster", type=click.FloatRange(0, 300), default=RIDE_OUT,
                     show_default=True, metavar="SECONDS",
                     help="How long a new client waits while the cluster cannot be reached (restarting, not up "
                          "yet, the network switching) before it is turned away; 0 turns it away at once.")(f)
    f = click.option("--allow-any-local-user", is_flag=True,
                     help="Let every local user connect (they act with YOUR identity); by default only "
                          "processes of your own uid (and root) may.")(f)
    f = click.option("--allow-uid", type=click.IntRange(0), multiple=True, metavar="UID",
                     help="Also let processes of this local uid connect (repeatable).")(f)
    f = click.option("--allow-non-loopback", is_flag=True,
                     help="Allow --bind on an address other hosts can reach (they would use YOUR identity).")(f)
    f = click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
                     show_default=True, help="Log lines as key=value text or JSON.")(f)
    f = click.option("--cluster-links", type=click.IntRange(1, 16), default=1, show_default=True, metavar="N",
                     help="Multiplexed connections to the cluster the sessions are spread over (the fewest "
                          "sessions first): a cluster of several workers relays them in several processes.")(f)
    f = click.option("--max-connections", type=click.IntRange(1), metavar="N",
                     help="Local clients served at once; more are refused in their own protocol "
                          "(default: the open files limit less a reserve).")(f)
    f = click.option("--unix-socket-mode", default="0600", show_default=True, metavar="MODE",
                     help="Octal permissions of the --unix-socket (0660 lets your group in as well).")(f)
    f = click.option("--unix-socket", type=click.Path(path_type=Path), metavar="PATH",
                     help="Listen on a unix socket instead of a TCP port: PATH itself, or in a directory "
                          "PATH the kind's own name (PostgreSQL: .s.PGSQL.<--port, default 5432>, so "
                          "`psql host=PATH` finds it). Only your uid may connect unless --unix-socket-mode "
                          "or --allow-uid say otherwise.")(f)
    f = click.option("--bind", default="127.0.0.1", show_default=True, help="Local address to listen on.")(f)
    f = click.option("--port", type=click.IntRange(0, 65535), default=0, show_default=True,
                     help="Local port; 0 picks a free one and prints it.")(f)
    return f


def _check_bind(bind: str, allow_non_loopback: bool) -> None:
    import ipaddress

    try:
        loopback = bind == "localhost" or ipaddress.ip_address(bind).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return
    if not allow_non_loopback:
        raise click.BadParameter(
            f"{bind} is reachable from other hosts, and anyone there would act as you; pass "
            f"--allow-non-loopback if that is really what you want", param_hint="--bind")
    click.echo(f"WARNING: listening on {bind}: whoever reaches it acts with your identity", err=True)


def _serve(name: str, handler, *, bind: str, port: int, log_format: str, identity: pki.Identity,
           try_line: Callable[[str, int], str], dialer=None, unix_socket: Path | None = None,
           unix_mode: int = 0o600) -> None:
    """Listen and serve until Ctrl-C / SIGTERM; print the address (stdout)
    and the line to try (stderr)."""
    from gateway.local.proxy import run_listener, unix_address

    async def serve() -> None:
        async with trio.open_nursery() as nursery:

            async def listen(task_status=trio.TASK_STATUS_IGNORED) -> None:
                await run_listener(handler, host=bind, port=port, unix_socket=unix_socket, unix_mode=unix_mode,
                                   task_status=task_status)
                nursery.cancel_scope.cancel()  # a signal stopped the listener: stop the pool too

            bound = await nursery.start(listen)
            if isinstance(bound, str):  # a unix socket: a directory and port for psql, or the path
                host, bound_port = unix_address(bound, port)
            else:
                host, bound_port = bound[:2]
            if dialer is not None:
                # Ready connections to the cluster: a client pays only the
                # dial's round trip, not a TLS handshake.
                await nursery.start(dialer.run_pool)
            left = format_duration(identity.remaining(utcnow()).total_seconds())
            click.echo(f"Proxying {name} on {host}:{bound_port} as {identity.user} (session valid for {left}). "
                       f"Ctrl-C stops.", err=True)
            click.echo(try_line(host, bound_port), err=True)
            if isinstance(bound, str):
                click.echo(json.dumps({"resource": name, "unix_socket": bound})
                           if log_format == "json" else f"listening on unix:{bound}")
            else:
                click.echo(json.dumps({"resource": name, "host": host, "port": bound_port})
                           if log_format == "json" else f"listening on {host}:{bound_port}")
            sys.stdout.flush()

    try:
        trio.run(serve)
    except* OSError as group:
        exc = group.exceptions[0]
        while isinstance(exc, BaseExceptionGroup):  # raised deeper than the listener's own nursery
            exc = exc.exceptions[0]
        where = unix_socket if unix_socket is not None else f"{bind}:{port}"
        raise WicketError(f"cannot listen on {where}: {exc.strerror or exc}") from None


def _fresh_identity(profile: Profile) -> pki.Identity:
    try:
        return profile.check_fresh(utcnow())
    except ProfileError as exc:
        raise WicketError(str(exc), EXIT_NOT_LOGGED_IN) from None


def _kind_for(verb: str, served: tuple, name: str, profile: Profile):
    """The kind of resource ``name`` among those ``verb`` serves: known at
    once when only one is, else asked of the cluster."""
    from gateway.local import resource_kinds

    if len(served) == 1:
        return served[0]
    try:
        doc = _run(api.api_call, profile, "GET", "/v1/resources")
    except WicketError as exc:
        if exc.exit_code != EXIT_UNREACHABLE:
            raise
        seen = resource_kinds.recall(profile.home, name)
        kind = next((k for k in served if k.name == seen), None)
        if kind is None:  # never listed: no way to know which protocol to speak
            verbs = " or ".join(f"`wicket proxy {k.name} {name}`" for k in served)
            raise WicketError(f"{exc.message}; the kind of {name} is not known yet, so name it: {verbs}",
                              EXIT_UNREACHABLE) from None
        return kind  # the client hears about the cluster in its own protocol
    resource_kinds.remember(profile.home, doc.get("resources", []))
    for resource in doc.get("resources", []):
        if resource.get("name") == name:
            for kind in served:
                if kind.name == resource.get("kind"):
                    return kind
            raise WicketError(f"{name} is a {resource.get('kind')} resource; use "
                              f"`{kinds.proxy_command(resource.get('kind'))} {name}`", 2)
    raise WicketError(f"no resource named {name!r} that you can reach; `wicket ls` lists them", EXIT_REFUSED)


def _proxy_command(verb: str, served: tuple) -> click.Command:
    """`wicket proxy VERB NAME` for the kinds in ``served`` (gateway/kinds.py)."""
    options: dict[str, Any] = {}
    for kind in served:  # a shared option keeps the first kind's help (postgres's for `db`)
        for option in kind.proxy_options:
            options.setdefault(option.name, option)

    def command(name: str, port: int, bind: str, log_format: str, allow_non_loopback: bool,
                wait_for_cluster: float, allow_uid: tuple[int, ...], allow_any_local_user: bool,
                unix_socket: Path | None, unix_socket_mode: str, max_connections: int | None,
                cluster_links: int, **values: Any) -> None:
        from gateway import logs
        from gateway.local.dialer import MuxLinks
        from gateway.local.proxy import Listening
        from gateway.local.proxy import ListenError, parse_unix_mode, unix_socket_path
        from gateway.net.descriptors import raise_open_files_limit
        from gateway.net.peercred import LocalUsers

        _check_bind(bind, allow_non_loopback)
        try:
            unix_mode = parse_unix_mode(unix_socket_mode)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--unix-socket-mode") from None
        raise_open_files_limit()  # every client is a descriptor: take what the system allows
        logs.setup(log_format)
        profile = _load_profile()
        identity = _fresh_identity(profile)
        kind = _kind_for(verb, served, name, profile)
        mine = {o.name for o in kind.proxy_options}
        stray = [options[k].option for k, v in values.items() if v and k not in mine]
        if stray:
            raise click.UsageError(f"{', '.join(stray)} does not apply to {kind.name} resources")
        local_users = LocalUsers(uids=LocalUsers().uids | set(allow_uid), anyone=allow_any_local_user)
        links = {} if cluster_links == 1 else {"dialer": MuxLinks(profile, cluster_links)}
        route = kind.local_route()(profile, name, identity, wait_for_cluster=wait_for_cluster,
                                   local_users=local_users, **links, **{k: v for k, v in values.items() if k in mine})
        if not isinstance(route, Listening):  # one session on stdin/stdout (ssh's ProxyCommand)
            sys.exit(_run(route.run))
        if max_connections is not None:
            route.route.max_clients = max_connections
        if unix_socket is not None:
            try:
                unix_socket = unix_socket_path(unix_socket, port or 5432, route.unix_name)
            except ListenError as exc:
                raise click.BadParameter(str(exc), param_hint="--unix-socket") from None
        _serve(name, route.handler, bind=bind, port=port, log_format=log_format, identity=identity,
               try_line=route.try_line, dialer=route.dialer, unix_socket=unix_socket, unix_mode=unix_mode)

    for option in reversed(list(options.values())):
        command = click.option(option.option, is_flag=option.is_flag, help=option.help)(command)
    command = _listen_options(command)
    command = click.argument("name")(command)
    names = " or ".join(kind.name for kind in served)
    about = "\n\n".join(f"{kind.name}: {kind.summary}." for kind in served)
    return click.command(verb, help=f"Open a local port to {names} resource NAME.\n\n{about}")(command)


for _verb, _served in kinds.proxy_verbs().items():
    proxy.add_command(_proxy_command(_verb, _served))


@click.command("ssh")
@click.option("--wicket-command", metavar="COMMAND",
              help="How ssh should run wicket in its ProxyCommand (default: `wicket` on PATH, else this Python).")
@format_option
def config_ssh(wicket_command: str | None, fmt: str) -> None:
    """Make an SSH key (once) and fetch the nodes' host keys, then print
    the ~/.ssh/config block for OpenSSH to the cluster's nodes:

        wicket config ssh >> ~/.ssh/config; ssh root@NODE.CLUSTER

    Each connection's ProxyCommand gets a certificate from the cluster for
    that login on that node only, valid two minutes; `wicket login` and
    `wicket renew` refresh the host keys."""
    from gateway.local import ssh_config

    profile = _load_profile()
    _fresh_identity(profile)
    answer = _run(ssh_config.refresh, profile)
    block = ssh_config.ssh_config(profile, command=wicket_command)
    if fmt == "json":
        files = ssh_config.SshFiles.of(profile)
        click.echo(json.dumps({"ssh_config": block, "logins": answer["logins"], "identity_file": str(files.key),
                               "certificate_file": str(files.certs / files.CERT_PATTERN),
                               "known_hosts_file": str(files.known_hosts)}))
        return
    click.echo(block, nl=False)
    logins = ", ".join(answer["logins"]) or "none by name (ask for a role with logins)"
    click.echo(f"Logins your roles allow by name: {logins}. Append the block above to ~/.ssh/config, then: "
               f"ssh LOGIN@NODE.{profile.cluster_name}", err=True)


@main.command()
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=Path(".wicket-demo"),
              show_default=True, help="Where the demo cluster keeps its state.")
@click.option("--port", type=click.IntRange(0, 65535), default=0,
              help="Local port for the demo PostgreSQL (0 picks a free one).")
def demo(state_dir: Path, port: int) -> None:
    """Embedded default: a local cluster, a throwaway PostgreSQL and a TCP
    echo resource, a logged-in gateway, and the psql line to paste."""
    from gateway.local.demo import run_demo

    run_demo(state_dir.resolve(), port)


from gateway.cli import wicket_agent, wicket_exec, wicket_profile  # noqa: E402

wicket_exec.register(main, sys.modules[__name__])
main.commands["config"].add_command(config_ssh)  # `wicket config ssh` beside the database clients' entries
wicket_agent.register(main, sys.modules[__name__])
wicket_profile.register(main)


if __name__ == "__main__":
    main()

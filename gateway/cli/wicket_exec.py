"""``wicket join``, ``wicket exec``, ``wicket env`` and ``wicket config``:
a bot's identity, and resources for a command, a shell or a client's own
configuration file.

Registered on ``wicket`` by :func:`register`, which is handed the CLI
module (gateway/cli/wicket.py) for its shared pieces (errors, exit codes,
the profile), so this module does not import it.

`wicket exec` theory of operation: it takes its identity from a join token
(joined into a private temporary profile, removed at the end) or from the
profile; asks the cluster which of the named resources it may reach (an
unknown or hidden one stops it before anything starts, exit 4); serves each
on a free loopback port (gateway/local/serving.py), except the kinds whose
clients reach their resources by themselves (ssh: an ssh_config with
`wicket proxy ssh --stdio` as its ProxyCommand, gateway/local/ssh_client.py),
whose files go into a private temporary directory; runs the command with
the clients' variables in its environment; passes signals on to it; and
when it ends, stops every listener, removes the directory and exits with
its exit code (128 + N if a signal N ended it). SIGINT and SIGQUIT are passed on only when wicket
is not in a terminal's foreground, where the terminal already sends them
to the command (it is in wicket's process group) and a second one would
make psql cancel twice.
"""

from __future__ import annotations

import functools
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

import click
import trio

from gateway import kinds

if TYPE_CHECKING:  # the relay's modules load only for the commands that serve
    from gateway.local.serving import Wanted

#: Signals passed on to the command.
FORWARDED = (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGINT, signal.SIGQUIT,
             signal.SIGWINCH)


def _read_token(token: str | None, token_file: Path | None) -> str | None:
    from gateway.local.session import read_token_file

    if token and token_file:
        raise click.UsageError("pass --token or --token-file, not both")
    if token_file is not None:
        try:
            return read_token_file(token_file)
        except OSError as exc:
            raise click.BadParameter(f"cannot read {token_file}: {exc.strerror}", param_hint="--token-file") \
                from None
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--token-file") from None
    return token or None


def _duration(text: str | None) -> float | None:
    from gateway.durations import parse_duration

    if not text:
        return None
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ttl") from None


def _identity_options(f: Callable) -> Callable:
    f = click.option("--ca-pin", help="sha256:... pin of the cluster CA, with --token (from `wicket-cluster ca pin`).")(f)
    f = click.option("--cluster", metavar="HOST:PORT",
                     help="The cluster to join, with --token or --token-file.")(f)
    f = click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
                     help="Join as a bot with the token in this file (instead of the profile's login).")(f)
    f = click.option("--token", help="Join as a bot with this token (visible in ps: prefer the environment "
                     "variable or --token-file).")(f)
    return f


def register(main: click.Group, cli: ModuleType) -> None:
    """Add ``join``, ``exec``, ``env`` and ``config`` to ``main``; ``cli``
    is gateway/cli/wicket.py."""
    from gateway.local import ports as remembered
    from gateway.local.profile import Profile, wicket_home

    def join_into(home: Path, cluster_addr: str | None, ca_pin: str | None, token: str, ttl: float | None):
        from gateway.identity import pki
        from gateway.local import session

        if not cluster_addr or not ca_pin:
            raise click.UsageError("joining with a token needs --cluster HOST:PORT and --ca-pin sha256:...")
        try:
            pin = pki.normalize_pin(ca_pin)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--ca-pin") from None
        return cli._run(functools.partial(session.join, home, cluster_addr, pin, token, ttl_seconds=ttl))

    def resolve(profile: Profile, wanted_names: list[tuple[str, str]], values: dict[str, Any],
                bind: str, port_of: Callable[[str], int]) -> list[Wanted]:
        """Each (verb, name) as a Wanted, checked against what the cluster
        lets this identity reach."""
        from gateway.local import api
        from gateway.local.serving import Wanted, grant_defaults

        doc = cli._run(api.api_call, profile, "GET", "/v1/resources")
        visible = {r.get("name"): r for r in doc.get("resources", [])}
        verbs = kinds.proxy_verbs()
        wanted = []
        for verb, name in wanted_names:
            resource = visible.get(name)
            if resource is None:
                raise cli.WicketError(f"no resource named {name!r} that you can reach; `wicket ls` lists them",
                                      cli.EXIT_REFUSED)
            kind = next((k for k in verbs[verb] if k.name == resource.get("kind")), None)
            if kind is None:
                raise cli.WicketError(f"{name} is a {resource.get('kind')} resource; name it with "
                                      f"--{kinds.get(resource.get('kind')).proxy_verb}", 2)
            mine = {o.name for o in kind.proxy_options}
            options = {k: v for k, v in values.items() if k in mine and v}
            # The profile's home: where a local TLS CA a client must trust lives.
            settings = {**grant_defaults(resource.get("allowed", {})), **options, "wicket_home": str(profile.home)}
            port = port_of(name) if kind.client_setup is None else 0  # no listener for it
            wanted.append(Wanted(name=name, kind=kind, options=options, settings=settings, bind=bind, port=port))
        return wanted

    def chosen(values: dict[str, Any]) -> list[tuple[str, str]]:
        names = [(verb, name) for verb in kinds.proxy_verbs() for name in values.pop(f"res_{verb}", ())]
        if not names:
            raise click.UsageError("name at least one resource: " + ", ".join(
                f"--{verb} NAME" for verb in kinds.proxy_verbs()))
        seen = [n for _, n in names]
        dup = {n for n in seen if seen.count(n) > 1}
        if dup:
            raise click.UsageError(f"{', '.join(sorted(dup))} named twice")
        return names

    def resource_options(f: Callable) -> Callable:
        # A kind served without a listener (ssh) has no use for its listener's options.
        options = {o.name: o for k in kinds.KINDS.values() if k.client_setup is None for o in k.proxy_options}
        for option in reversed(list(options.values())):
            f = click.option(option.option, is_flag=option.is_flag, help=option.help)(f)
        for verb, served in reversed(list(kinds.proxy_verbs().items())):
            f = click.option(f"--{verb}", f"res_{verb}", multiple=True, metavar="NAME",
                             help=f"A {' or '.join(k.name for k in served)} resource (repeatable).")(f)
        return f

    # -- join ------------------------------------------------------------------

    @main.command()
    @click.argument("address")
    @click.option("--ca-pin", required=True, help="sha256:... pin of the cluster CA (from `wicket-cluster ca pin`).")
    @click.option("--token-file", type=click.Path(dir_okay=False, path_type=Path),
                  help="File holding the join token (from `wicket-cluster tokens add`).")
    @click.option("--token", help="The join token (visible in ps: prefer the environment variable or --token-file).")
    @click.option("--ttl", help="Ask for a shorter certificate than the default hour (e.g. 20m).")
    @cli.format_option
    def join(address: str, ca_pin: str, token_file: Path | None, token: str | None, ttl: str | None,
             fmt: str) -> None:
        """Join the cluster at ADDRESS as a bot, with a join token; the bot's
        certificate goes into the profile ($WICKET_HOME), and `wicket renew`
        renews it with no token."""
        from gateway.identity.pki import utcnow

        secret = _read_token(token, token_file)
        if secret is None:
            raise click.UsageError("pass the join token with --token-file FILE (or WICKET_JOIN_TOKEN)")
        seconds = _duration(ttl)
        profile = join_into(wicket_home(), address, ca_pin, secret, seconds)
        identity = profile.identity()
        if fmt == "json":
            click.echo(json.dumps(cli._status_doc(profile, identity)))
        else:
            left = cli.format_duration(identity.remaining(utcnow()).total_seconds())
            click.echo(f"Joined {profile.cluster_name} ({address}) as bot {identity.user}; roles: "
                       f"{', '.join(identity.roles) or '(none)'}; valid for {left}. Profile: {profile.home}")

    # -- exec ------------------------------------------------------------------

    @main.command("exec", context_settings={"ignore_unknown_options": False})
    @resource_options
    @_identity_options
    @click.option("--wait-for-cluster", type=click.FloatRange(0, 300), default=10.0, show_default=True,
                  metavar="SECONDS", help="How long a new client waits while the cluster cannot be reached.")
    @click.option("--ttl", help="With a token: ask for shorter bot certificates than the default hour (e.g. 20m); "
                  "they are renewed in the background for as long as the command runs.")
    @click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
    def exec_(command: tuple[str, ...], token: str | None, token_file: Path | None, cluster: str | None,
              ca_pin: str | None, wait_for_cluster: float, ttl: str | None, **values: Any) -> None:
        """Run COMMAND with local ports to the named resources and their
        clients' variables in its environment (PGHOST, PGPORT, PGUSER,
        DATABASE_URL ..., and WICKET_<NAME>_HOST/PORT for each); for --ssh
        nodes an ssh_config (ssh NODE, scp, sftp, rsync -e ssh, git through
        GIT_SSH_COMMAND; WICKET_<NODE>_SSH_CONFIG) with its key and
        certificate in a private temporary directory. Everything stops, and
        that directory goes, when it ends; its exit code is wicket's.

        \b
        wicket exec --db pg-prod -- ./migrate.sh
        wicket exec --ssh web-1 -- sh -c 'ssh web-1 uptime && git clone root@web-1:/srv/app.git'
        WICKET_EXEC_TOKEN_FILE=/run/secrets/join wicket exec --cluster c:3025 \\
            --ca-pin sha256:... --db pg -- pgbench -S -T 30

        Exit codes: the command's (128 + N if signal N ended it); before it
        starts, wicket's own (3 not logged in, 4 refused, 5 unreachable)."""
        from gateway import logs
        from gateway.net.descriptors import raise_open_files_limit

        logs.setup("text")
        raise_open_files_limit()
        names = chosen(values)
        secret = _read_token(token, token_file)
        seconds = _duration(ttl)
        tmp = Path(tempfile.mkdtemp(prefix="wicket-exec-"))  # 0700: a bot's profile, the ssh files
        try:
            if secret is not None:
                profile = join_into(tmp / "profile", cluster, ca_pin, secret, seconds)
            else:
                profile = cli._load_profile()
            identity = cli._fresh_identity(profile)
            wanted = resolve(profile, names, values, "127.0.0.1", lambda name: 0)
            code = trio.run(_run_command, profile, identity, wanted, list(command), wait_for_cluster,
                            secret is not None, seconds, tmp)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        sys.exit(code)

    # -- env -------------------------------------------------------------------

    @main.command("env")
    @resource_options
    @click.option("--bind", default="127.0.0.1", show_default=True, help="The address the ports are on.")
    @click.option("--port", "ports", multiple=True, metavar="NAME=PORT",
                  help="The port a resource is served on (default: the one remembered in the profile, "
                       "chosen now if none yet).")
    @click.option("--format", "fmt", type=click.Choice(["sh", "json"]), default="sh", show_default=True,
                  help="sh: export lines for eval; json: an object.")
    def env(bind: str, ports: tuple[str, ...], fmt: str, **values: Any) -> None:
        """Print the clients' variables for the named resources, at their
        remembered ports: eval "$(wicket env --db pg)". Something must
        serve them there: `wicket proxy ... --port PORT`. --ssh nodes need
        no server: their ssh_config (ProxyCommand `wicket proxy ssh
        --stdio`) is written into $WICKET_HOME/ssh with the key and the
        certificate `wicket config ssh` writes, and GIT_SSH_COMMAND, RSYNC_RSH
        and WICKET_<NODE>_SSH_CONFIG name it."""
        from gateway.local.serving import Served, client_environment

        names = chosen(values)
        profile = cli._load_profile()
        cli._fresh_identity(profile)
        given = _port_pairs(ports)
        wanted = resolve(profile, names, values, bind,
                         lambda name: given.get(name) or remembered.assign(profile.home, name, bind))
        variables = client_environment([Served(wanted=w, host=w.bind, port=w.port) for w in wanted
                                        if w.kind.client_setup is None])
        for setup, nodes in _setups(wanted).items():
            variables.update(cli._run(setup, profile, nodes, None))
        if fmt == "json":
            click.echo(json.dumps(variables, indent=2, sort_keys=True))
        else:
            for key, value in variables.items():
                click.echo(f"export {key}={shlex.quote(value)}")

    # -- config ----------------------------------------------------------------

    @main.group("config")
    def config() -> None:
        """Write a client's own configuration for a resource's local port."""

    for verb, (kind, client_file) in kinds.client_files().items():
        config.add_command(_config_command(cli, verb, kind, client_file, remembered, resolve))


def _setups(wanted: list[Wanted]) -> dict[Callable, list[tuple[str, dict[str, Any]]]]:
    """The kinds' ``client_setup`` functions and the (resource, settings)
    each is for: the resources that get no listener."""
    out: dict[Callable, list[tuple[str, dict[str, Any]]]] = {}
    for w in wanted:
        setup = w.kind.client_setup_function()
        if setup is not None:
            out.setdefault(setup, []).append((w.name, w.settings))
    return out


def _port_pairs(values: tuple[str, ...]) -> dict[str, int]:
    out = {}
    for item in values:
        name, sep, port = item.partition("=")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise click.BadParameter(f"{item!r} is not NAME=PORT", param_hint="--port")
        out[name] = int(port)
    return out


def _config_command(cli: ModuleType, verb: str, kind: kinds.Kind, client_file: kinds.ClientFile,
                    remembered: ModuleType, resolve: Callable) -> click.Command:
    def command(name: str, port: int | None, bind: str, file: Path | None, stdout: bool, **values: Any) -> None:
        from gateway.local.client_files import update

        profile = cli._load_profile()
        cli._fresh_identity(profile)
        chosen_port = port or remembered.assign(profile.home, name, bind)
        (wanted,) = resolve(profile, [(kind.proxy_verb, name)], values, bind, lambda _: chosen_port)
        if wanted.kind is not kind:
            raise cli.WicketError(f"{name} is a {wanted.kind.name} resource, not {kind.name}", 2)
        entry = client_file.renderer()(name, bind, chosen_port, wanted.settings)
        if stdout:
            click.echo(entry, nl=False)
            return
        path = (file or Path(client_file.default_path)).expanduser()
        try:
            text = path.read_text()
        except FileNotFoundError:
            text = ""
        update(path, client_file.merger()(text, name, entry))
        click.echo(f"{path}: entry {name} now points at {bind}:{chosen_port}; serve it there with "
                   f"`{kinds.proxy_command(kind.name)} {name} --port {chosen_port}`")

    for option in reversed(kind.proxy_options):
        command = click.option(option.option, is_flag=option.is_flag, help=option.help)(command)
    command = click.option("--stdout", is_flag=True, help="Print the entry instead of writing the file.")(command)
    command = click.option("--file", type=click.Path(dir_okay=False, path_type=Path),
                           help=f"The file to edit (default {client_file.default_path}).")(command)
    command = click.option("--bind", default="127.0.0.1", show_default=True,
                           help="The address the port is on.")(command)
    command = click.option("--port", type=click.IntRange(1, 65535),
                           help="The local port (default: the one remembered in the profile).")(command)
    command = click.argument("name")(command)
    return click.command(verb, help=f"Write {client_file.summary} for {kind.name} resource NAME, at its "
                                    f"remembered local port (or --port); an earlier entry of that name is "
                                    f"replaced, the rest of the file kept.")(command)


async def _run_command(profile: Any, identity: Any, wanted: list[Wanted], argv: list[str], wait_for_cluster: float,
                       joined: bool, bot_ttl: float | None, tmp: Path) -> int:
    """Serve ``wanted``, run ``argv`` with the clients' environment, and
    stop everything when it ends; its exit status as an exit code. A bot
    ``joined`` for the command renews its certificate meanwhile (``bot_ttl``
    each); a profile's is left to its owner (a second renewer of one bot
    certificate would look like a stolen copy and lock the bot). The kinds
    whose clients need no listener write their files into ``tmp``."""
    import logging

    from gateway.local import serving
    from gateway.local.connect import ClusterError
    from gateway.local.serving import client_environment
    from gateway.local.session import Renewer

    log = logging.getLogger("wicket.exec")
    # Signals are taken from the start (one that comes before the command
    # does is passed on once it runs) until every task here has ended.
    with trio.open_signal_receiver(*FORWARDED) as signals:
        async with trio.open_nursery() as nursery:
            listened = [w for w in wanted if w.kind.client_setup is None]
            served = await serving.serve(profile, identity, listened, nursery, wait_for_cluster=wait_for_cluster)
            failed = [(s.wanted.name, s.error) for s in served if not s.ok]
            # The join token stays here; a wicket inside the command uses
            # this identity (a joined bot's temporary profile, or the person's).
            env = {k: v for k, v in os.environ.items() if not (k.startswith("WICKET_") and "TOKEN" in k)}
            env.update(client_environment(served), WICKET_HOME=str(profile.home))
            for setup, nodes in _setups(wanted).items():
                try:
                    env.update(await setup(profile, nodes, tmp))
                except (ClusterError, OSError, ValueError, trio.TooSlowError) as exc:
                    failed.append((", ".join(name for name, _ in nodes), getattr(exc, "message", None) or str(exc)))
            if failed:
                for name, error in failed:
                    click.echo(f"wicket exec: {name}: {error}", err=True)
                nursery.cancel_scope.cancel()
                return 1
            if joined:  # a longer job keeps its bot certificate fresh
                await nursery.start(Renewer(profile, ttl_seconds=bot_ttl).run)
            try:
                process = await trio.lowlevel.open_process(argv, env=env)
            except OSError as exc:
                click.echo(f"wicket exec: cannot run {argv[0]}: {exc.strerror or exc}", err=True)
                nursery.cancel_scope.cancel()
                return 127 if isinstance(exc, FileNotFoundError) else 126
            log.info("exec_started pid=%d resources=%s", process.pid, ",".join(
                f"{s.wanted.name}={s.host}:{s.port}" for s in served))

            async def forward() -> None:
                async for signum in signals:
                    if signum in (signal.SIGINT, signal.SIGQUIT) and _terminal_foreground():
                        continue  # the terminal sent it to the command too
                    if process.returncode is None:
                        process.send_signal(signum)

            nursery.start_soon(forward)
            try:
                status = await process.wait()
            finally:
                if process.returncode is None:  # wicket itself is being stopped: so is the command
                    process.kill()
                    with trio.CancelScope(shield=True):
                        await process.wait()
            nursery.cancel_scope.cancel()
    return status if status >= 0 else 128 - status


def _terminal_foreground() -> bool:
    """Whether this process runs in the foreground of a terminal (which
    then sends SIGINT and SIGQUIT to the command itself)."""
    try:
        fd = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
    except OSError:
        return False
    try:
        return os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        return False
    finally:
        os.close(fd)

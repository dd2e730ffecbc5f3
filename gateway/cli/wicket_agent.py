"""``wicket agent``: serve many resources in one process
(gateway/local/agent.py), and ``wicket agent wait`` / ``status`` against a
running one's admin address.

Registered on ``wicket`` by :func:`register` with the CLI module
(gateway/cli/wicket.py), like gateway/cli/wicket_exec.py.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import click

ADMIN_ENV = "WICKET_AGENT_ADMIN"


def _admin_get(address: str, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    import http.client

    from gateway.addresses import parse_hostport

    host, port = parse_hostport(address)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path)
        answer = conn.getresponse()
        return answer.status, answer.read(1 << 20)
    finally:
        conn.close()


def register(main: click.Group, cli: ModuleType) -> None:
    @main.group(invoke_without_command=True)
    @click.option("--config", "config_path", envvar="WICKET_AGENT_CONFIG",
                  type=click.Path(dir_okay=False, path_type=Path),
                  help="TOML file (see config/agent.toml); flags and WICKET_AGENT_* variables win over it.")
    @click.option("--profile", help="Profile directory (default $WICKET_HOME or ~/.wicket).")
    @click.option("--token-file", help="Join as a bot with this token when the profile has no valid bot certificate.")
    @click.option("--cluster", help="HOST:PORT of the cluster, for --token-file.")
    @click.option("--ca-pin", help="sha256:... pin of the cluster CA, for --token-file.")
    @click.option("--resource", "resources", multiple=True, metavar="NAME[=PORT|=/PATH]",
                  help="A resource to serve, on PORT or its remembered port, or on a unix socket at /PATH "
                       "(mode 0600; a directory: PostgreSQL's .s.PGSQL.5432 in it) (repeatable; replaces "
                       "the file's list; none anywhere: every resource you may reach). "
                       "WICKET_AGENT_RESOURCES: several, separated by spaces.")
    @click.option("--bind", help="Address the resources listen on (default 127.0.0.1).")
    @click.option("--allow-uid", "allow_uids", type=click.IntRange(0), multiple=True, metavar="UID",
                  help="Also let processes of this local uid connect (repeatable).")
    @click.option("--admin", envvar=ADMIN_ENV,
                  help="Loopback HOST:PORT of the admin endpoints (default 127.0.0.1:9464; port 0 picks one).")
    @click.option("--quitquitquit", is_flag=True, default=None, help="Serve POST /quitquitquit (stops, exit 0).")
    @click.option("--wait-for-cluster", metavar="DURATION",
                  help="How long a new client waits while the cluster cannot be reached (default 10s).")
    @click.option("--max-connections", type=click.IntRange(1), metavar="N",
                  help="Local clients each resource serves at once; more are refused in their own protocol "
                       "(default: the open files limit less a reserve).")
    @click.option("--min-sigterm-delay", metavar="DURATION",
                  help="After SIGTERM keep serving this long (default 0s), so the application's own shutdown "
                       "still reaches its resources.")
    @click.option("--max-sigterm-delay", metavar="DURATION",
                  help="The longest a stop may take (default 30s; at least --min-sigterm-delay).")
    @click.option("--exit-zero", is_flag=True, default=None, help="Exit 0 after SIGTERM/SIGINT (default 143/130).")
    @click.option("--log-format", type=click.Choice(["text", "json"]), help="Log lines as text or JSON.")
    @click.option("--check-upstreams", is_flag=True, default=None,
                  help="At start, have the cluster reach every resource's upstream; exit 1 with the reasons if "
                       "any cannot be served or reached.")
    @click.pass_context
    def agent(ctx: click.Context, config_path: Path | None, **overrides: Any) -> None:
        """Serve many resources in one process: a sidecar, a service, or a
        person's day (with no resources named, every resource you may
        reach, each on a port remembered across restarts).

        Precedence: a flag, then its WICKET_AGENT_* variable, then the
        --config file, then the default. Admin endpoints (loopback):
        /livez /startupz /readyz[?verbose] /status /metrics
        [/quitquitquit]."""
        if ctx.invoked_subcommand is not None:
            return
        import trio

        from gateway import logs
        from gateway.local.agent import Agent
        from gateway.local.agent_config import AgentConfigError, load
        from gateway.net.descriptors import raise_open_files_limit

        try:
            config = load(config_path, overrides)
        except AgentConfigError as exc:
            raise click.UsageError(str(exc)) from None
        logs.setup(config.log_format)
        raise_open_files_limit()  # every client of every resource is a descriptor: take what the system allows

        async def run() -> int:
            agent_ = Agent(config)
            async with trio.open_nursery() as nursery:
                async def main_task(task_status=trio.TASK_STATUS_IGNORED) -> None:
                    code = await agent_.run(task_status=task_status)
                    result.append(code)

                result: list[int] = []
                host, port = await nursery.start(main_task)
                click.echo(json.dumps({"admin": f"{host}:{port}"}) if config.log_format == "json"
                           else f"admin listening on {host}:{port}")
                sys.stdout.flush()
            return result[0]

        try:
            code = trio.run(run)
        except* OSError as group:
            exc = group.exceptions[0]
            raise cli.WicketError(f"cannot listen on the admin address {config.admin}: {exc.strerror or exc}") \
                from None
        sys.exit(code)

    @agent.command("wait")
    @click.option("--admin", envvar=ADMIN_ENV, default="127.0.0.1:9464", show_default=True,
                  help="The agent's admin HOST:PORT.")
    @click.option("--timeout", type=click.FloatRange(0, 3600), default=60.0, show_default=True,
                  metavar="SECONDS", help="Give up after this long (exit 1).")
    def wait(admin: str, timeout: float) -> None:
        """Block until the agent is ready (for init containers and scripts):
        exit 0 once /readyz answers 200, 1 after --timeout with why not."""
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            try:
                status, body = _admin_get(admin, "/readyz?verbose")
                if status == 200:
                    click.echo("ready")
                    return
                last = body.decode("utf-8", "replace").strip()
            except OSError as exc:
                last = f"the agent at {admin} does not answer ({exc})"
            if time.monotonic() >= deadline:
                raise cli.WicketError(f"not ready after {timeout:.0f}s:\n{last}")
            time.sleep(0.1)

    @agent.command("check")
    @click.argument("endpoint", type=click.Choice(["livez", "readyz", "startupz"]))
    @click.option("--admin", envvar=ADMIN_ENV, default="127.0.0.1:9464", show_default=True,
                  help="The agent's admin HOST:PORT.")
    def check(endpoint: str, admin: str) -> None:
        """Ask a running agent's probe endpoint once: exit 0 if it answers
        200, else 1 with its answer (for exec probes: the admin address is
        loopback, out of the kubelet's reach)."""
        try:
            code, body = _admin_get(admin, f"/{endpoint}?verbose" if endpoint == "readyz" else f"/{endpoint}")
        except OSError as exc:
            raise cli.WicketError(f"the agent at {admin} does not answer ({exc})") from None
        text = body.decode("utf-8", "replace").strip()
        if code != 200:
            raise cli.WicketError(f"{endpoint}: {code}\n{text}")
        click.echo(text.splitlines()[-1] if text else "ok")

    @agent.command("status")
    @click.option("--admin", envvar=ADMIN_ENV, default="127.0.0.1:9464", show_default=True,
                  help="The agent's admin HOST:PORT.")
    @cli.format_option
    def status(admin: str, fmt: str) -> None:
        """What a running agent serves, and why anything does not (exit 1
        when it is not ready)."""
        try:
            _code, body = _admin_get(admin, "/status")
            doc = json.loads(body)
        except (OSError, ValueError) as exc:
            raise cli.WicketError(f"the agent at {admin} does not answer ({exc}); is it running?",
                                  cli.EXIT_UNREACHABLE) from None
        if fmt == "json":
            click.echo(json.dumps(doc, indent=2))
        else:
            ident = doc.get("identity") or {}
            click.echo(f"{'ready' if doc.get('ready') else 'NOT READY'}; {ident.get('kind', '?')} "
                       f"{ident.get('user', '?')}, certificate until {ident.get('expires_at', '-')}, "
                       f"{doc.get('renewals', 0)} renewals")
            if doc.get("waiting"):
                click.echo(f"waiting: {doc['waiting']}")
            for r in doc.get("resources", []):
                where = f"{r['host']}:{r['port']}" if r.get("ok") else "-"
                state = ("ok" if r.get("cluster_connected") else "cluster not connected") if r.get("ok") \
                    else f"FAILED: {r.get('error')}"
                click.echo(f"  {r['name']:20} {r.get('kind') or '?':10} {where:22} {state}")
        if not doc.get("ready"):
            sys.exit(1)

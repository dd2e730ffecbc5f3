"""``wicket demo``: the embedded default, everything on this machine.

1. a real cluster process (``wicket-cluster start``) with SQLite state in the
   state directory and a ``demo`` role in its config;
2. a throwaway PostgreSQL (``initdb`` in the state directory) whose
   ``cert`` authentication trusts the cluster's database client CA,
   registered as resource ``demo-pg``; a throwaway MariaDB likewise
   (``demo-maria``, an account ``REQUIRE SUBJECT '/CN=demo'``) when
   ``mariadbd`` is installed; a throwaway MongoDB wire server (mongoeco,
   gateway/local/mongoserver.py, when a Python >= 3.13 is found) whose TLS
   front accepts X.509 logins from the same CA, as ``demo-mongo``; a
   throwaway sshd trusting the cluster's SSH user CA (when OpenSSH's server
   is installed) as ``demo-ssh``, for your own OS user as login; and a TCP
   echo server as ``demo-echo``;
3. a ``demo`` user (random password kept 0600 in the state directory);
4. ``wicket login`` as that user, pinned to the cluster's CA, into a profile
   inside the state directory (your ~/.wicket is not touched);
5. the gateway serving them (demo-ssh also through the gateway's own SSH
   server, on port 2222 when it is free), and a line to paste for each kind.

Ctrl-C stops the gateway, the servers and the cluster. Running it again
reuses the state.
"""

from __future__ import annotations

import json
import os
import getpass
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import trio

from gateway.private_files import ensure_private_dir
from gateway.identity import pki

CLUSTER_CONFIG = """\
# Written by `wicket demo`; see config/cluster.toml for every option.
[cluster]
name = "demo"
state_dir = "{state}"
listen = "127.0.0.1:0"
session_ttl = "8h"

[roles.demo]
max_session_ttl = "8h"
[[roles.demo.allow]]
labels = {{ env = "demo" }}
db_users = ["demo"]
db_names = ["demo"]
logins = ["{login}"]

[resources.demo-echo]
kind = "tcp"
address = "127.0.0.1:{echo_port}"
labels = {{ env = "demo" }}
"""


def _step(msg: str) -> None:
    click.echo(click.style("==> ", fg="green", bold=True) + msg, err=True)


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            async for chunk in stream:
                await stream.send_all(chunk)
            await stream.send_eof()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


def _wicket_cluster() -> list[str]:
    return [sys.executable, "-m", "gateway.cli.cluster"]


def _wait_ready(proc: subprocess.Popen, ready: Path, log_path: Path, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready.exists():
            return json.loads(ready.read_text())
        if proc.poll() is not None:
            raise click.ClickException(
                f"the demo cluster exited with {proc.returncode}; its log:\n{log_path.read_text()[-3000:]}"
            )
        time.sleep(0.05)
    raise click.ClickException(f"the demo cluster did not start within {timeout:.0f}s; see {log_path}")


def run_demo(state: Path, port: int) -> None:
    ensure_private_dir(state)
    cluster_state, home = state / "cluster", state / "home"
    config_path, ready = state / "cluster.toml", state / "cluster.ready"
    log_path = state / "cluster.log"
    children: list[subprocess.Popen] = []

    async def main() -> None:
        from gateway.local.pg import PostgresProxy
        from gateway.local.pgserver import PgServer
        from gateway.local.profile import Profile
        from gateway.local.proxy import TcpProxy

        pg: PgServer | None = None
        maria = mongo = sshd = None
        async with trio.open_nursery() as nursery:
            echo_listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
            echo_port = echo_listeners[0].socket.getsockname()[1]
            nursery.start_soon(trio.serve_listeners, _echo, echo_listeners)

            config_path.write_text(CLUSTER_CONFIG.format(state=cluster_state, echo_port=echo_port, login=_login()))
            ready.unlink(missing_ok=True)
            _step(f"starting the cluster (state: {cluster_state}, log: {log_path})")
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    [*_wicket_cluster(), "start", "--config", str(config_path), "--ready-file", str(ready)],
                    stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                )
            children.append(proc)
            try:
                info = await trio.to_thread.run_sync(_wait_ready, proc, ready, log_path)
                address, pin = info["address"], info["pin"]
                _step(f"cluster up at {address}, CA pin {pin}")

                _step("starting a throwaway PostgreSQL that trusts the cluster's database client CA")
                pg = PgServer(state / "postgres",
                              client_ca_pem=(cluster_state / "db_client_ca.crt").read_bytes())
                await trio.to_thread.run_sync(pg.start)
                await trio.to_thread.run_sync(_prepare_database, pg)
                _admin(config_path, "resources", "add", "demo-pg", "--kind", "postgres", "--address", pg.address,
                       "--ca-file", str(pg.server_ca_path), "--server-name", "localhost", "--label", "env=demo")
                _step(f"PostgreSQL {pg.address} registered as resource demo-pg (certificate auth, verify-full)")

                maria = await _start_mariadb(state, cluster_state, config_path)
                mongo = await _start_mongo(state, cluster_state, config_path)
                sshd = await _start_sshd(state, cluster_state, config_path)

                password_file = state / "demo-password"
                if not password_file.exists():
                    password = secrets.token_urlsafe(18)
                    pki.write_private(password_file, password.encode())
                    _admin(config_path, "users", "add", "demo", "--roles", "demo", "--password-stdin",
                           input=password + "\n")
                    _step("created user demo (password in demo-password, mode 0600)")
                env = {**os.environ, "WICKET_HOME": str(home)}
                subprocess.run(
                    [sys.executable, "-m", "gateway.cli.wicket", "login", address, "--user", "demo",
                     "--ca-pin", pin, "--password-stdin"],
                    input=password_file.read_text() + "\n", text=True, check=True, env=env,
                )
                os.environ["WICKET_HOME"] = str(home)
                profile = Profile.load(home)
                db = PostgresProxy(profile, "demo-pg")
                host, db_port = (await nursery.start(_listen, db.handle, port))[:2]
                echo = TcpProxy(profile, "demo-echo")
                _, echo_local = (await nursery.start(_listen, echo, 0))[:2]
                maria_line = mongo_line = ""
                if maria is not None:
                    from gateway.local.mysql import MySqlProxy

                    my_port = await _serve_db(nursery, MySqlProxy(profile, "demo-maria"))
                    maria_line = (f"MariaDB resource demo-maria is on {host}:{my_port}:\n\n"
                                  f"  mysql -h {host} -P {my_port} -u demo demo\n\n")
                if mongo is not None:
                    from gateway.local.mongo import MongoProxy

                    mg_port = await _serve_db(nursery, MongoProxy(profile, "demo-mongo"))
                    mongo_line = (f"MongoDB resource demo-mongo is on {host}:{mg_port} (mongosh, or any driver):\n\n"
                                  f'  mongosh "mongodb://{host}:{mg_port}/demo?directConnection=true"\n\n')
                ssh_line = ""
                if sshd is not None:
                    ssh_port = await _serve_ssh(nursery, profile, state)
                    ssh_line = await trio.to_thread.run_sync(_ssh_lines, state, home, env, ssh_port)
                click.echo(
                    f"\nThe gateway is serving PostgreSQL resource demo-pg on {host}:{db_port}. Paste this:\n\n"
                    f'  psql "host={host} port={db_port} user=demo dbname=demo"\n\n'
                    f"(no password: the cluster logs in to PostgreSQL with a short-lived certificate it signs)\n"
                    f"A plain TCP resource, demo-echo, is on {host}:{echo_local}:\n\n"
                    f"  python3 -c \"import socket; s = socket.create_connection(('{host}', {echo_local})); "
                    f"s.sendall(b'hello wicket'); print(s.recv(100))\"\n\n"
                    f"{maria_line}"
                    f"{mongo_line}"
                    f"{ssh_line}"
                    f"Use the CLI against this demo:  WICKET_HOME={home} wicket ls\n"
                    f"Audit log (every statement):  wicket-cluster audit --config {config_path}\n"
                    f"Ctrl-C stops the gateway, the servers and the cluster.\n"
                )
                sys.stdout.flush()
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    async for _ in signals:
                        break
            finally:
                with trio.CancelScope(shield=True):
                    for server in (pg, maria, mongo, sshd):
                        if server is not None:
                            await trio.to_thread.run_sync(server.stop)
                    proc.terminate()
                    try:
                        await trio.to_thread.run_sync(proc.wait, 10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                nursery.cancel_scope.cancel()
        _step("stopped")

    try:
        trio.run(main)
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        pass
    finally:
        for proc in children:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


def _admin(config_path: Path, *args: str, input: str | None = None) -> None:
    r = subprocess.run([*_wicket_cluster(), *args, "--config", str(config_path)], input=input, text=True,
                       capture_output=True)
    if r.returncode != 0:
        raise click.ClickException(f"wicket-cluster {args[0]} {args[1]} failed: {r.stderr.strip()}")


async def _start_mariadb(state: Path, cluster_state: Path, config_path: Path):
    """A throwaway MariaDB registered as demo-maria; None (and a note) if
    the server is not installed."""
    from gateway.local.mariadbserver import MariaDbError, MariaDbServer, find_mariadbd

    try:
        find_mariadbd()
    except MariaDbError as exc:
        _step(f"no MariaDB resource: {exc}")
        return None
    _step("starting a throwaway MariaDB that trusts the cluster's database client CA")
    maria = MariaDbServer(state / "mariadb", client_ca_pem=(cluster_state / "db_client_ca.crt").read_bytes())
    await trio.to_thread.run_sync(maria.start)
    try:
        await trio.to_thread.run_sync(maria.sql, "CREATE DATABASE IF NOT EXISTS demo;"
                                      "CREATE USER IF NOT EXISTS demo@'%' REQUIRE SUBJECT '/CN=demo';"
                                      "GRANT ALL ON demo.* TO demo@'%'")
        _admin(config_path, "resources", "add", "demo-maria", "--kind", "mysql", "--address", maria.address,
               "--ca-file", str(maria.server_ca_path), "--server-name", "localhost", "--label", "env=demo")
    except BaseException:  # not the demo's yet: its stop would not reach this server
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(maria.stop)
        raise
    _step(f"MariaDB {maria.address} registered as resource demo-maria (certificate auth, verify-full)")
    return maria


def _login() -> str:
    """The node login the demo's role allows: the OS user running the demo
    (the throwaway sshd runs as that user, and can only let that user in
    unless it is root)."""
    return "root" if os.geteuid() == 0 else getpass.getuser()


async def _start_mongo(state: Path, cluster_state: Path, config_path: Path):
    """A throwaway MongoDB wire server registered as demo-mongo (X.509
    login as demo); None (and a note) if it cannot run here."""
    from gateway.local.mongoserver import (MongoServer, Unavailable, find_python, make_server_tls, mongoeco_python,
                                           venv_dir)

    try:
        if not (venv_dir() / ".installed").exists():
            await trio.to_thread.run_sync(find_python)
            _step(f"making mongoeco's venv, once, in {venv_dir()} (the demo's MongoDB wire server)")
        await trio.to_thread.run_sync(mongoeco_python)
    except Unavailable as exc:
        _step(f"no MongoDB resource: {str(exc).splitlines()[0]}")
        return None
    _step("starting a throwaway MongoDB wire server (mongoeco) that trusts the cluster's database client CA")
    base = state / "mongodb"
    ensure_private_dir(base)
    cert, key, server_ca = make_server_tls(base, "wicket demo mongodb server CA")
    mongo = await trio.to_thread.run_sync(lambda: MongoServer(
        base / "mongoeco.log", user="demo", password=secrets.token_urlsafe(18), tls_cert=cert, tls_key=key,
        tls_ca=cluster_state / "db_client_ca.crt"))
    _admin(config_path, "resources", "add", "demo-mongo", "--kind", "mongodb", "--address",
           f"127.0.0.1:{mongo.tls_port}", "--tls", "verify-full", "--ca-file", str(server_ca),
           "--server-name", "localhost", "--auth", "cert", "--label", "env=demo")
    _step(f"MongoDB 127.0.0.1:{mongo.tls_port} registered as resource demo-mongo (X.509 auth, verify-full)")
    return mongo


async def _start_sshd(state: Path, cluster_state: Path, config_path: Path):
    """A throwaway sshd registered as demo-ssh with its host key; None (and
    a note) if OpenSSH's server is not installed."""
    from gateway.local.sshserver import SshServer, missing

    why = missing()
    if why:
        _step(f"no SSH resource: {why}")
        return None
    _step("starting a throwaway sshd that trusts the cluster's SSH user CA")
    sshd = SshServer(state / "sshd", cluster_state / "ssh_user_ca.pub")
    await trio.to_thread.run_sync(sshd.start)
    _admin(config_path, "resources", "add", "demo-ssh", "--kind", "ssh", "--address", sshd.address,
           "--host-key", sshd.host_key, "--label", "env=demo")
    _step(f"sshd {sshd.address} registered as resource demo-ssh (certificates only, login {_login()})")
    return sshd


async def _serve_ssh(nursery: trio.Nursery, profile, state: Path) -> int:
    """The gateway's own SSH server for demo-ssh (what `wicket proxy ssh
    demo-ssh --port 2222` runs), on 2222 or, if that is taken, a free
    port; its known_hosts line in the state directory. Any process of
    the demo's own OS user may log in to it without a key (the gateway lets
    no other local user in): the profile it would act with is theirs
    already. The port."""
    from gateway.local import ssh_asyncio
    from gateway.local.ssh import ssh_route
    from gateway.local.waitroom import RIDE_OUT

    route = ssh_route(profile, "demo-ssh", None, wait_for_cluster=RIDE_OUT, allow_no_auth=True)
    try:
        port = (await nursery.start(_listen, route.handler, 2222))[1]
    except OSError:  # 2222 is taken
        port = (await nursery.start(_listen, route.handler, 0))[1]
    line = ssh_asyncio.known_hosts_line(route.route.host_key, "127.0.0.1", port)
    pki.write_public(state / "gateway_known_hosts", (line + "\n").encode())
    return port


def _ssh_lines(state: Path, home: Path, env: dict[str, str], ssh_port: int) -> str:
    """``wicket config ssh`` into the state directory, and both ways in."""
    r = subprocess.run([sys.executable, "-m", "gateway.cli.wicket", "config", "ssh"], capture_output=True,
                       text=True, env=env)
    if r.returncode != 0:
        raise click.ClickException(f"wicket config ssh failed: {r.stderr.strip()}")
    config = state / "ssh_config"
    pki.write_private(config, r.stdout.encode())
    login = _login()
    return (f"SSH resource demo-ssh, OpenSSH end to end with a certificate the cluster signed "
            f"(the ssh_config block `wicket config ssh` printed, in {config}):\n\n"
            f"  ssh -F {config} {login}@demo-ssh.demo\n\n"
            f"or through the gateway's own SSH server, which the demo runs on port {ssh_port} (what "
            f"`WICKET_HOME={home} wicket proxy ssh demo-ssh --port 2222 --allow-no-auth` runs; your own "
            f"processes need no key for it):\n\n"
            f"  ssh -o UserKnownHostsFile={state / 'gateway_known_hosts'} -p {ssh_port} {login}@127.0.0.1\n\n")


def _prepare_database(pg) -> None:
    """The demo's db user and database (idempotent)."""
    exists = pg.sql("SELECT 1 FROM pg_roles WHERE rolname = 'demo'").strip()
    if not exists:
        pg.sql("CREATE ROLE demo LOGIN")
        pg.sql("CREATE DATABASE demo OWNER demo")


async def _serve_db(nursery: trio.Nursery, route) -> int:
    """A database kind's route served on a free loopback port: the port."""
    return (await nursery.start(_listen, route.handle, 0))[1]


async def _listen(handler, port: int, task_status=trio.TASK_STATUS_IGNORED) -> None:
    from gateway.local.proxy import run_listener

    await run_listener(handler, host="127.0.0.1", port=port, task_status=task_status, handle_signals=False)

"""`wicket exec`, `wicket env` and `wicket config pg` end to end: a real
PostgreSQL and cluster, psql and pgbench run by `wicket exec` as a person
and as a bot joining with a token."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.integration.harness import PY, ROOT, Gateway, Proc, _env, wait_for
from tests.integration.pgclients import _gateway  # pg_env: the test_postgres*.py files' PostgreSQL
from tests.integration.pgenv import need_postgres
from tests.integration.ssh_fixtures import node  # noqa: F401 (a fixture)

need_postgres()


@pytest.fixture(scope="module")
def person(pg_env, tmp_path_factory):  # noqa: F811
    cluster, _ = pg_env
    g = _gateway(cluster, tmp_path_factory.mktemp("exec"), "pg-app-only,dev")
    yield g
    g.stop()


def wicket_exec(gw: Gateway, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-m", "gateway.cli.wicket", "exec", *args], capture_output=True, text=True,
                          env={**gw.env(), "PGCONNECT_TIMEOUT": "30", **(env or {})}, cwd=ROOT, timeout=300)


def test_exec_runs_psql_with_the_clients_environment(person):
    r = wicket_exec(person, "--db", "pg", "--tcp", "echo", "--",
                    "sh", "-c", 'psql -X -tA -c "select current_user, current_database()" && '
                                'echo "$PGHOST $PGPORT $PGUSER $PGDATABASE $WICKET_PG_PORT $WICKET_ECHO_PORT '
                                '$DATABASE_URL"')
    assert r.returncode == 0, r.stderr
    first, second = r.stdout.strip().splitlines()
    assert first == "app|app"  # the grant's one db user and db name are the defaults
    host, port, user, db, pg_port, echo_port, url = second.split()
    assert (host, user, db, port) == ("127.0.0.1", "app", "app", pg_port) and echo_port != port
    assert url == f"postgresql://app@127.0.0.1:{port}/app?sslmode=disable"


def test_exec_runs_pgbench(person):
    script = "pgbench -i -s 1 -q && pgbench -S -c 2 -t 50"
    r = wicket_exec(person, "--db", "pg", "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert "number of transactions actually processed: 100/100" in r.stdout


def test_exec_passes_the_exit_code_and_leaves_nothing_listening(person):
    r = wicket_exec(person, "--db", "pg", "--", "sh", "-c", 'echo "$PGPORT"; exit 7')
    assert r.returncode == 7, r.stderr
    port = int(r.stdout.strip())
    with pytest.raises(OSError):
        import socket

        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    r = wicket_exec(person, "--db", "pg", "--", "psql", "-X", "-c", "select * from no_such_table")
    assert r.returncode == 1 and "no_such_table" in r.stderr
    assert wicket_exec(person, "--db", "pg", "--", "no-such-command-here").returncode == 127


def test_exec_refuses_a_resource_it_cannot_reach_before_running_anything(person, tmp_path):
    marker = tmp_path / "ran"
    r = wicket_exec(person, "--db", "pg-pw", "--", "touch", str(marker))
    assert r.returncode == 4 and "no resource named 'pg-pw'" in r.stderr
    assert not marker.exists()


def test_exec_passes_signals_on(person, tmp_path):
    ready = tmp_path / "ready"
    script = (f"trap 'echo got-term; exit 3' TERM; touch {shlex.quote(str(ready))}; "
              "while true; do sleep 0.05; done")
    proc = Proc([PY, "-m", "gateway.cli.wicket", "exec", "--db", "pg", "--", "sh", "-c", script],
                tmp_path / "exec.log", person.env())
    wait_for(ready.exists, what="the command to start")
    assert proc.stop(signal.SIGTERM) == 3  # the command's trap ran: it got the signal


def test_exec_as_a_bot_with_a_join_token_in_the_environment(pg_env, tmp_path):  # noqa: F811
    cluster, _ = pg_env
    cluster.admin("bots", "add", "ci-exec", "--roles", "pg-app-only")
    token = json.loads(cluster.admin("tokens", "add", "--bot", "ci-exec", "--format", "json").stdout)["token"]
    env = {**_env(WICKET_HOME=str(tmp_path / "no-profile")), "WICKET_EXEC_TOKEN": token,
           "WICKET_EXEC_CLUSTER": cluster.address, "WICKET_EXEC_CA_PIN": cluster.pin, "PGCONNECT_TIMEOUT": "30"}
    args = [PY, "-m", "gateway.cli.wicket", "exec", "--db", "pg", "--", "sh", "-c",
            'psql -X -tA -c "select 1"; env | grep -c WICKET_EXEC_TOKEN; echo "$WICKET_HOME"']
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    lines = r.stdout.split()
    assert lines[:2] == ["1", "0"], (r.stdout, r.stderr)  # the token is not passed to the command
    assert not os.path.exists(lines[2])  # its temporary profile is gone
    events = cluster.wait_audit(lambda evs: len(evs) >= 1, event="session.start", user="ci-exec")
    assert events[0]["resource"] == "pg"
    r = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 4 and "has been used up" in r.stderr  # one use, one job


def test_env_and_config_pg_name_the_remembered_port(person, tmp_path):
    r = person.run("env", "--db", "pg", "--tcp", "echo")
    assert r.returncode == 0, r.stderr
    exports = dict(line.removeprefix("export ").split("=", 1) for line in r.stdout.splitlines())
    port = int(exports["PGPORT"])
    assert exports["WICKET_PG_PORT"] == str(port) and exports["PGUSER"] == "app"
    again = person.run("env", "--db", "pg", "--format", "json")
    assert json.loads(again.stdout)["PGPORT"] == str(port)  # the same port tomorrow

    service = tmp_path / "pg_service.conf"
    service.write_text("[keep]\nhost=elsewhere\n")
    r = person.run("config", "pg", "pg", "--file", str(service))
    assert r.returncode == 0, r.stderr
    assert service.read_text().startswith("[keep]\nhost=elsewhere\n\n[pg]\n")
    assert f"port={port}\n" in service.read_text()

    proc, _ = person.proxy("db", "pg", "--port", str(port))
    r = subprocess.run(["psql", "-X", "-tA", "service=pg", "-c", "select current_user"], capture_output=True,
                       text=True, env={**os.environ, "PGSERVICEFILE": str(service), "PGCONNECT_TIMEOUT": "30"},
                       timeout=60)
    assert r.returncode == 0 and r.stdout.strip() == "app", r.stderr
    proc.stop()


@pytest.mark.heavy
def test_a_bots_certificate_renews_under_a_live_session(pg_env, tmp_path):  # noqa: F811
    """15-second certificates renewed in the background (at 10 s): a psql
    session open across the renewal carries on, and new sessions keep
    working past the first certificate's end and a second renewal. The
    waits are the workload (certificates must age), not a synchronisation."""
    cluster, _ = pg_env
    cluster.admin("bots", "add", "ci-renew", "--roles", "pg-app-only")
    token = json.loads(cluster.admin("tokens", "add", "--bot", "ci-renew", "--format", "json").stdout)["token"]
    env = {**_env(WICKET_HOME=str(tmp_path / "no-profile")), "WICKET_EXEC_TOKEN": token,
           "WICKET_EXEC_CLUSTER": cluster.address, "WICKET_EXEC_CA_PIN": cluster.pin, "PGCONNECT_TIMEOUT": "30"}
    script = ('psql -X -tA -c "select 1 from pg_sleep(10)" || exit 1; '
              'for i in $(seq 2 13); do psql -X -tA -c "select $i" || exit 1; sleep 1; done')
    r = subprocess.run([PY, "-m", "gateway.cli.wicket", "exec", "--ttl", "15s", "--db", "pg", "--", "sh", "-c",
                        script], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(i) for i in range(1, 14)]
    renewals = sorted(e["time"] for e in cluster.audit(event="bot.renew", user="ci-renew"))
    assert len(renewals) >= 2, r.stderr
    ends = sorted(cluster.wait_audit(lambda evs: len(evs) >= 13, event="session.end", user="ci-renew"),
                  key=lambda e: e["time"])
    first = ends[0]
    assert first["time"] - first["duration"] < renewals[0] < first["time"]  # open across the renewal
    assert ends[-1]["time"] > renewals[1]


def test_the_agent_drains_a_live_psql_session_on_sigterm(person):
    """A PostgreSQL session (set up in trio, unlike tcp's) outlives the
    listener: after SIGTERM the running query completes, then the agent
    exits."""
    from tests.integration.test_agent import _get, _refused, start_agent, status

    proc, admin = start_agent(person, "--resource", "pg", "--max-sigterm-delay", "120s")
    wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready")
    port = status(admin)["resources"][0]["port"]
    query = subprocess.Popen(
        ["psql", "-X", "-tA", "-h", "127.0.0.1", "-p", str(port), "-U", "app", "-d", "app", "-c",
         "select 42 from pg_sleep(3)"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PGCONNECT_TIMEOUT": "30"})
    wait_for(lambda: status(admin)["resources"][0]["ok"] and _sessions(admin) >= 1, what="the session to open")
    proc.popen.send_signal(signal.SIGTERM)
    wait_for(lambda: _refused(port), what="the agent to stop accepting")
    out, err = query.communicate(timeout=120)
    assert query.returncode == 0 and out.strip() == "42", err
    assert proc.popen.wait(60) == 143
    assert "sessions_cut=0" in proc.log()


def _sessions(admin: str) -> int:
    from tests.integration.test_agent import _get

    text = _get(admin, "/metrics")[1]
    return sum(int(float(line.split()[-1])) for line in text.splitlines()
               if line.startswith("wicket_agent_sessions{"))


def test_check_upstreams_probes_postgres_resources_without_a_login(pg_env, tmp_path):  # noqa: F811
    """A probe asks for no session, so no db user: the cluster only
    connects to each upstream (pg-down's port answers nothing)."""
    from tests.integration.test_agent import start_agent

    cluster, _ = pg_env
    gw = _gateway(cluster, tmp_path, "pg")
    proc, _ = start_agent(gw, "--resource", "pg", "--resource", "pg-down", "--check-upstreams")
    assert proc.popen.wait(60) == 1
    log = proc.log()
    assert re.search(r"upstream_check_failed resource=pg-down error=.*not reachable from the cluster", log), log
    assert "upstream_check_failed resource=pg " not in log


def test_the_agent_serves_postgres_on_a_unix_socket_and_removes_it(person, tmp_path):
    """``unix_socket`` (a directory) in the config: PostgreSQL's
    ``.s.PGSQL.<port>`` there with the configured mode, psql host=DIR
    reaches it, and the socket file goes with the agent."""
    import stat
    import tempfile

    from prometheus_client.parser import text_string_to_metric_families

    from tests.integration.test_agent import _get, start_agent, status

    with tempfile.TemporaryDirectory(prefix="wk-", dir="/tmp") as sockets:  # a socket path has ~100 bytes
        config = tmp_path / "agent.toml"
        config.write_text(f'[[resources]]\nname = "pg"\nunix_socket = "{sockets}"\nunix_socket_mode = "0660"\n')
        proc, admin = start_agent(person, "--config", str(config))
        wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready")
        (resource,) = status(admin)["resources"]
        assert (resource["host"], resource["port"]) == (sockets, 5432)
        path = os.path.join(sockets, ".s.PGSQL.5432")
        st = os.lstat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660
        r = subprocess.run(["psql", "-X", "-tA", f"host={sockets} port=5432 user=app dbname=app", "-c",
                            "select current_user, current_database()"], capture_output=True, text=True,
                           timeout=120, env={**os.environ, "PGCONNECT_TIMEOUT": "30"})
        assert r.returncode == 0 and r.stdout.strip() == "app|app", r.stderr
        timed = [s.value for f in text_string_to_metric_families(_get(admin, "/metrics")[1])
                 for s in f.samples if s.name == "wicket_agent_dial_seconds_count"]
        assert timed == [1.0]  # PostgreSQL's dials are timed too
        assert proc.stop(signal.SIGTERM) == 143
        assert not os.path.exists(path)


# -- ssh: an ssh_config with `wicket proxy ssh --stdio` as ProxyCommand, no listener --------


def _sshd_missing() -> str | None:
    from tests.servers import sshd as sshd_server

    return sshd_server.available() or (None if shutil.which("git") and shutil.which("rsync")
                                        else "git or rsync is not installed")


needs_sshd = pytest.mark.skipif(_sshd_missing() is not None, reason=str(_sshd_missing()))


def _left_behind(directory: str) -> list[str]:
    """What still names ``directory``: the path itself, or a process (a
    ProxyCommand, its carrier) with it on its command line."""
    from tests.integration.test_demo import _using

    return ([directory] if os.path.exists(directory) else []) + _using(Path(directory))


@needs_sshd
def test_exec_ssh_reaches_a_node_with_ssh_scp_and_rsync_and_leaves_nothing_behind(make_gateway, node, tmp_path):
    """`ssh web-1` as is (the role grants one login: the alias's User), scp
    and rsync -e ssh, with no key of the person's own; the temporary
    directory (config, key, certificate, wrappers) and every ProxyCommand
    gone afterwards, the person's profile untouched."""
    from tests.integration.ssh_fixtures import random_file, sha256
    from tests.servers.sshd import TEST_USER

    gw = make_gateway("ssh-user")
    src = random_file(tmp_path / "up.bin", 3 << 20)
    remote = f"/tmp/wicket-exec-{gw.user}"
    tree = tmp_path / "tree"
    tree.mkdir()
    random_file(tree / "a.bin", 300_000)
    script = (f'ssh web-1 id -un && scp -q {src} web-1:{remote}.bin && ssh web-1 sha256sum {remote}.bin && '
              f'rsync -a -e ssh {tree}/ web-1:{remote}-tree/ && ssh web-1 sha256sum {remote}-tree/a.bin && '
              f'ssh web-1 rm -r {remote}.bin {remote}-tree && '
              'echo "$WICKET_WEB_1_SSH_CONFIG" && echo "$GIT_SSH_COMMAND" && command -v ssh')
    r = wicket_exec(gw, "--ssh", "web-1", "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    login, up, tree_sum, config, git_ssh, ssh = r.stdout.splitlines()
    assert login == TEST_USER
    assert up.split()[0] == sha256(src) and tree_sum.split()[0] == sha256(tree / "a.bin")
    workdir = os.path.dirname(config)
    assert git_ssh == f"ssh -F {config}" and ssh == os.path.join(workdir, "bin", "ssh")
    assert wait_for(lambda: not _left_behind(workdir), what="the exec's directory and ProxyCommands to go")
    assert not (gw.home / "ssh").exists()  # the person's own SSH files were never written
    assert f"ID wicket:test:{gw.user}:" in node.log()  # the node saw the person's certificate


@needs_sshd
def test_exec_ssh_git_clone_over_git_ssh_command(make_gateway, node, tmp_path):
    """git clones a bare repository on the node with GIT_SSH_COMMAND alone
    (the wrappers taken off PATH), and pushes back to it."""
    gw = make_gateway("ssh-all")
    git = ["git", "-c", "user.name=wicket", "-c", "user.email=wicket@example.invalid",
           "-c", "init.defaultBranch=main"]
    bare, work = tmp_path / "repo.git", tmp_path / "work"
    subprocess.run([*git, "init", "-q", "--bare", str(bare)], check=True)
    subprocess.run([*git, "init", "-q", str(work)], check=True)
    (work / "README").write_text("over wicket\n")
    subprocess.run([*git, "-C", str(work), "add", "README"], check=True)
    subprocess.run([*git, "-C", str(work), "commit", "-q", "-m", "first"], check=True)
    subprocess.run([*git, "-C", str(work), "push", "-q", str(bare), "main"], check=True)
    clone = tmp_path / "clone"
    script = ('PATH="${PATH#*:}"; '  # without the exec's bin/: GIT_SSH_COMMAND must do it alone
              f'git clone -q root@web-1:{bare} {clone} && cd {clone} && echo more >> README && '
              f'git -c user.name=w -c user.email=w@example.invalid commit -qam second && git push -q origin HEAD')
    r = wicket_exec(gw, "--ssh", "web-1", "--", "sh", "-c", script)
    assert r.returncode == 0, r.stderr
    assert (clone / "README").read_text() == "over wicket\nmore\n"
    log = subprocess.run(["git", "-C", str(bare), "log", "--format=%s", "main"], capture_output=True, text=True,
                         check=True).stdout
    assert log.split() == ["second", "first"]


@needs_sshd
def test_env_ssh_prints_an_ssh_config_for_a_shell(make_gateway, node, tmp_path):
    gw = make_gateway("ssh-user")
    r = gw.run("env", "--ssh", "web-1", "--format", "json")
    assert r.returncode == 0, r.stderr
    variables = json.loads(r.stdout)
    config = variables["WICKET_WEB_1_SSH_CONFIG"]
    assert config == str(gw.home / "ssh" / "config-web-1")
    assert variables["GIT_SSH_COMMAND"] == variables["RSYNC_RSH"] == f"ssh -F {config}"
    assert "PATH" not in variables and "WICKET_WEB_1_PORT" not in variables  # no listener, no wrappers
    assert "Host web-1\n    HostName web-1.test\n    User wicketssh\n" in Path(config).read_text()
    # The shell's way: eval, then ssh by the alias and git's command.
    script = (f'eval "$({shlex.quote(PY)} -m gateway.cli.wicket env --ssh web-1)" && '
              '$GIT_SSH_COMMAND -o BatchMode=yes web-1 echo via-alias && '
              'ssh -F "$WICKET_WEB_1_SSH_CONFIG" -o BatchMode=yes root@web-1.test true || echo root-refused')
    r = subprocess.run(["sh", "-c", script], capture_output=True, text=True, env=gw.env(), cwd=ROOT, timeout=120)
    assert r.stdout.split() == ["via-alias", "root-refused"], r.stderr  # ssh-user grants no root


@needs_sshd
def test_exec_ssh_as_a_bot_joining_with_a_token(cluster, node, tmp_path):
    """A CI job: no profile and no SSH key of its own; the joined bot's
    temporary profile holds the SSH files too, and goes with the rest."""
    from tests.servers.sshd import TEST_USER

    cluster.admin("bots", "add", "ci-ssh", "--roles", "ssh-user")
    token = json.loads(cluster.admin("tokens", "add", "--bot", "ci-ssh", "--format", "json").stdout)["token"]
    env = {**_env(WICKET_HOME=str(tmp_path / "no-profile"), HOME=str(tmp_path)), "WICKET_EXEC_TOKEN": token,
           "WICKET_EXEC_CLUSTER": cluster.address, "WICKET_EXEC_CA_PIN": cluster.pin}
    r = subprocess.run([PY, "-m", "gateway.cli.wicket", "exec", "--ssh", "web-1", "--", "sh", "-c",
                        'ssh web-1 id -un && dirname "$WICKET_WEB_1_SSH_CONFIG"'],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    login, workdir = r.stdout.split()
    assert login == TEST_USER
    assert wait_for(lambda: not _left_behind(workdir), what="the exec's directory and ProxyCommands to go")
    assert not (tmp_path / "no-profile").exists() and not (tmp_path / ".ssh").exists()
    assert "ID wicket:test:ci-ssh:" in node.log()

"""`wicket agent` end to end: a real cluster, the agent process, its admin
endpoints scraped over HTTP, signals."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import PY, ROOT, Cluster, Gateway, Proc, established_fds, wait_for


def _get(admin: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{admin}{path}", timeout=10) as answer:
            return answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def start_agent(gw: Gateway, *args: str, env: dict | None = None) -> tuple[Proc, str]:
    log = gw.tmp / f"agent-{gw.user}-{len(gw.proxies)}.log"
    proc = Proc([PY, "-m", "gateway.cli.wicket", "agent", "--admin", "127.0.0.1:0", *args], log,
                {**gw.env(), **(env or {})})
    gw.proxies.append(proc)
    m = proc.read_line(r"admin listening on ([\d.]+:\d+)")
    return proc, m.group(1)


def status(admin: str) -> dict:
    return json.loads(_get(admin, "/status")[1])


def _echo(port: int) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"ping")
        return s.recv(4)


def test_one_bad_resource_never_takes_the_others_down(cluster, echo, make_gateway):
    cluster.admin("resources", "add", "echo-b", "--address", echo.address, "--label", "env=dev")
    cluster.admin("resources", "add", "echo-down", "--address", "127.0.0.1:9", "--label", "env=dev")
    cluster.admin("resources", "add", "echo-hidden", "--address", echo.address, "--label", "env=prod")
    gw = make_gateway("dev")
    proc, admin = start_agent(gw, "--resource", "echo", "--resource", "echo-b", "--resource", "echo-down",
                              "--resource", "echo-hidden", "--resource", "nope")
    wait_for(lambda: status(admin)["started"], what="the agent to start")
    doc = status(admin)
    by_name = {r["name"]: r for r in doc["resources"]}
    assert by_name["echo"]["ok"] and by_name["echo-b"]["ok"] and by_name["echo-down"]["ok"]
    assert "no resource named 'nope'" in by_name["nope"]["error"]
    assert "no resource named 'echo-hidden'" in by_name["echo-hidden"]["error"]  # not allowed: not visible
    assert _echo(by_name["echo"]["port"]) == b"ping" and _echo(by_name["echo-b"]["port"]) == b"ping"

    code, text = _get(admin, "/readyz?verbose")
    assert code == 503 and "[-]resource:nope failed" in text and "[+]resource:echo ok" in text
    assert _get(admin, "/livez")[0] == 200 and _get(admin, "/startupz")[0] == 200

    # Refusals by code: the cluster cannot reach echo-down's upstream.
    with socket.create_connection(("127.0.0.1", by_name["echo-down"]["port"]), timeout=30) as s:
        s.sendall(b"x")
        try:
            s.recv(1)
        except ConnectionResetError:
            pass

    def refusals():
        families = {f.name: f for f in text_string_to_metric_families(_get(admin, "/metrics")[1])}
        return {(s.labels["resource"], s.labels["code"]): s.value
                for s in families["wicket_agent_dial_refusals"].samples if s.name.endswith("_total")}

    assert wait_for(lambda: refusals().get(("echo-down", "upstream_unreachable")), what="the refusal counted") == 1

    def ended():
        families = {f.name: f for f in text_string_to_metric_families(_get(admin, "/metrics")[1])}
        return {s.labels["resource"]: s.value for s in families["wicket_agent_sessions_ended"].samples
                if s.name.endswith("_total")}

    wait_for(lambda: ended()["echo"] == 1 and ended()["echo-b"] == 1, what="both sessions' ends counted")
    families = {f.name: f for f in text_string_to_metric_families(_get(admin, "/metrics")[1])}
    sent = {(s.labels["resource"], s.labels["direction"]): s.value for s in families["wicket_agent_bytes"].samples
            if s.name.endswith("_total")}
    assert sent[("echo", "sent")] == 4 and sent[("echo", "received")] == 4
    up = {s.labels["resource"]: s.value for s in families["wicket_agent_resource_up"].samples}
    assert up["echo"] == 1.0 and up["nope"] == 0.0
    assert families["wicket_agent_certificate_expiry_timestamp_seconds"].samples[0].value > 0
    assert families["wicket_agent_ready"].samples[0].value == 0.0

    r = gw.run("agent", "status", "--admin", admin)
    assert r.returncode == 1 and "NOT READY" in r.stdout and "nope" in r.stdout
    assert proc.stop(signal.SIGTERM) == 143


def test_an_agent_carries_every_resource_on_one_connection_to_the_cluster(cluster, echo, make_gateway):
    """Three resources, a live session on each: one TLS connection from the
    agent to the cluster carries them all."""
    for name in ("echo-s1", "echo-s2"):
        cluster.admin("resources", "add", name, "--address", echo.address, "--label", "env=dev")
    gw = make_gateway("dev")
    proc, admin = start_agent(gw, "--resource", "echo", "--resource", "echo-s1", "--resource", "echo-s2")
    wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready")
    live = []
    for item in status(admin)["resources"]:
        s = socket.create_connection(("127.0.0.1", item["port"]), timeout=30)
        s.sendall(b"ping")
        assert s.recv(4) == b"ping"
        live.append(s)
    wait_for(lambda: len(established_fds(proc.popen.pid, cluster.port, remote=True)) == 1, what="one connection to the cluster")
    families = {f.name: f for f in text_string_to_metric_families(_get(admin, "/metrics")[1])}
    open_now = {s.labels["resource"]: s.value for s in families["wicket_agent_sessions"].samples}
    assert open_now == {"echo": 1.0, "echo-s1": 1.0, "echo-s2": 1.0}
    for s in live:
        s.close()
    assert proc.stop(signal.SIGTERM) == 143


def test_max_connections_limits_each_resources_clients(make_gateway):
    gw = make_gateway("dev")
    proc, admin = start_agent(gw, "--resource", "echo", env={"WICKET_AGENT_MAX_CONNECTIONS": "1"})
    wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready")
    port = status(admin)["resources"][0]["port"]
    with socket.create_connection(("127.0.0.1", port), timeout=30) as live:
        live.sendall(b"one!")
        assert live.recv(4) == b"one!"
        with socket.create_connection(("127.0.0.1", port), timeout=30) as second:
            try:
                assert second.recv(1) == b""
            except ConnectionResetError:
                pass  # a tcp client has no protocol to be told in: a reset, and the log says why
        wait_for(lambda: "clients_refused resource=echo" in proc.log(), what="the refusal logged")

    def open_now() -> float:
        families = {f.name: f for f in text_string_to_metric_families(_get(admin, "/metrics")[1])}
        return families["wicket_agent_sessions"].samples[0].value

    wait_for(lambda: open_now() == 0, what="the first client's end counted")
    assert _echo(port) == b"ping"  # room again
    assert proc.stop(signal.SIGTERM) == 143


def test_metrics_time_each_dial_from_the_clients_arrival_to_the_clusters_answer(make_gateway):
    """Sessions' dials in one histogram; control dials (here the
    --check-upstreams probe) in another."""
    gw = make_gateway("dev")
    proc, admin = start_agent(gw, "--resource", "echo", "--check-upstreams")
    wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready")
    port = status(admin)["resources"][0]["port"]

    def dials(family: str = "wicket_agent_dial_seconds") -> dict[tuple[str, str | None], float]:
        families = {f.name: f for f in text_string_to_metric_families(_get(admin, "/metrics")[1])}
        return {(s.name, s.labels.get("le")): s.value for s in families[family].samples
                if s.labels["resource"] == "echo"}

    control = dials("wicket_agent_control_dial_seconds")
    assert control[("wicket_agent_control_dial_seconds_count", None)] == 1  # the probe
    assert dials()[("wicket_agent_dial_seconds_count", None)] == 0
    for _ in range(3):
        assert _echo(port) == b"ping"

    samples = wait_for(lambda: (d := dials())[("wicket_agent_dial_seconds_count", None)] == 3 and d,
                       what="three dials timed")
    buckets = [(float(le), n) for (name, le), n in samples.items() if name.endswith("_bucket")]
    counts = [n for _, n in sorted(buckets)]
    assert counts == sorted(counts) and counts[-1] == 3  # cumulative, ending with +Inf
    assert 0 < samples[("wicket_agent_dial_seconds_sum", None)]
    assert proc.stop(signal.SIGTERM) == 143


def test_a_resource_flag_with_a_path_serves_on_a_unix_socket_of_the_owner_only(cluster, echo, make_gateway):
    import os
    import stat
    import tempfile

    cluster.admin("resources", "add", "echo-dir", "--address", echo.address, "--label", "env=dev")
    gw = make_gateway("dev")
    with tempfile.TemporaryDirectory(prefix="wk-", dir="/tmp") as sockets:  # a socket path has ~100 bytes
        path = os.path.join(sockets, "echo.sock")
        proc, admin = start_agent(gw, "--resource", f"echo={path}", "--resource", f"echo-dir={sockets}")
        wait_for(lambda: status(admin)["started"], what="the agent to start")
        by_name = {r["name"]: r for r in status(admin)["resources"]}
        assert (by_name["echo"]["host"], by_name["echo"]["port"]) == (path, 0)
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        # tcp has no socket name of its own to put in a directory: that resource's trouble only
        assert "is a directory" in by_name["echo-dir"]["error"]
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(30)
            s.connect(path)
            s.sendall(b"ping")
            assert s.recv(4) == b"ping"
        assert proc.stop(signal.SIGTERM) == 143
        assert not os.path.exists(path)


def test_a_port_taken_is_that_resources_trouble_only(cluster, echo, make_gateway, tmp_path):
    gw = make_gateway("dev")
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    port = held.getsockname()[1]
    config = tmp_path / "agent.toml"
    config.write_text(f'[[resources]]\nname = "echo"\nport = {port}\n\n[[resources]]\nname = "echo-b"\n')
    cluster.admin("resources", "add", "echo-b", "--address", echo.address, "--label", "env=dev")
    proc, admin = start_agent(gw, "--config", str(config))
    wait_for(lambda: status(admin)["started"], what="the agent to start")
    by_name = {r["name"]: r for r in status(admin)["resources"]}
    assert "cannot listen" in by_name["echo"]["error"] and by_name["echo-b"]["ok"]
    assert _echo(by_name["echo-b"]["port"]) == b"ping"
    held.close()
    proc.stop()


def test_readyz_follows_the_cluster_and_wait_blocks_until_ready(echo, tmp_path):
    cluster = Cluster(tmp_path, echo)
    try:
        cluster.add_user("ready1", "dev")
        gw = Gateway(tmp_path, cluster, "ready1")
        assert gw.login().returncode == 0
        proc, admin = start_agent(gw, "--resource", "echo")
        r = gw.run("agent", "wait", "--admin", admin, "--timeout", "60")
        assert r.returncode == 0 and r.stdout.strip() == "ready", r.stderr
        cluster.stop()
        wait_for(lambda: _get(admin, "/readyz")[0] == 503, what="readyz to fail with the cluster down")
        assert "the cluster is not connected" in _get(admin, "/readyz?verbose")[1]
        cluster.start()
        wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="readyz to pass again")
        port = status(admin)["resources"][0]["port"]
        assert _echo(port) == b"ping"
        proc.stop()
    finally:
        cluster.stop()


def test_sigterm_keeps_serving_for_the_minimum_delay_then_stops(make_gateway):
    gw = make_gateway("dev")
    proc, admin = start_agent(gw, "--resource", "echo", "--min-sigterm-delay", "3s")
    wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready")
    port = status(admin)["resources"][0]["port"]
    proc.popen.send_signal(signal.SIGTERM)
    wait_for(lambda: _get(admin, "/readyz")[0] == 503, what="readyz to say it is stopping")
    assert _echo(port) == b"ping"  # still serving new clients during the delay
    assert proc.stop(signal.SIGTERM) == 143


def test_quitquitquit_is_opt_in_and_exits_zero(make_gateway):
    gw = make_gateway("dev")
    proc, admin = start_agent(gw, "--resource", "echo")
    req = urllib.request.Request(f"http://{admin}/quitquitquit", method="POST")
    with pytest.raises(urllib.error.HTTPError) as off:
        urllib.request.urlopen(req, timeout=10)
    assert off.value.code == 404
    proc.stop()
    proc, admin = start_agent(gw, "--resource", "echo", env={"WICKET_AGENT_QUITQUITQUIT": "1"})
    req = urllib.request.Request(f"http://{admin}/quitquitquit", method="POST")
    assert urllib.request.urlopen(req, timeout=10).status == 200
    assert proc.popen.wait(30) == 0


def test_with_no_resources_it_serves_every_one_on_remembered_ports(make_gateway):
    gw = make_gateway("dev")
    proc, admin = start_agent(gw)
    wait_for(lambda: status(admin)["started"], what="the agent to start")
    first = {r["name"]: r["port"] for r in status(admin)["resources"] if r["ok"]}
    assert "echo" in first
    assert proc.stop(signal.SIGINT) == 130
    proc, admin = start_agent(gw, env={"WICKET_AGENT_EXIT_ZERO": "true"})
    wait_for(lambda: status(admin)["started"], what="the agent to start again")
    assert {r["name"]: r["port"] for r in status(admin)["resources"] if r["ok"]} == first
    assert proc.stop(signal.SIGTERM) == 0


def test_a_bot_agent_joins_once_and_a_restart_reuses_its_certificate(cluster, tmp_path):
    cluster.admin("bots", "add", "sidecar", "--roles", "dev")
    token = json.loads(cluster.admin("tokens", "add", "--bot", "sidecar", "--format", "json").stdout)["token"]
    token_file = tmp_path / "token"
    token_file.write_text(token)
    gw = Gateway(tmp_path, cluster, "sidecar")
    args = ("--token-file", str(token_file), "--cluster", cluster.address, "--ca-pin", cluster.pin,
            "--resource", "echo")
    proc, admin = start_agent(gw, *args)
    wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="the bot agent to be ready")
    assert status(admin)["identity"]["kind"] == "bot"
    proc.stop()
    proc, admin = start_agent(gw, *args)  # the one-time token is spent: the profile's certificate serves
    wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="the restarted bot agent to be ready")
    assert _echo(status(admin)["resources"][0]["port"]) == b"ping"
    proc.stop()


def test_every_agent_flag_has_an_environment_variable():
    from gateway.cli import wicket as wicket_cli

    group = wicket_cli.main.commands["agent"]
    root = wicket_cli.main.make_context("wicket", [], resilient_parsing=True, **wicket_cli.main.context_settings)
    ctx = group.make_context("agent", [], parent=root, resilient_parsing=True)
    import os

    for param in group.params:
        if param.name in ("help",):
            continue
        name = param.envvar or f"{ctx.auto_envvar_prefix}_{param.name.upper()}"
        os.environ[name] = "from-env"
        try:
            assert param.resolve_envvar_value(ctx) == "from-env", param.name
        finally:
            del os.environ[name]
    subprocess.run([PY, "-m", "gateway.cli.wicket", "agent", "--help"], check=True, cwd=ROOT, capture_output=True)


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except OSError:
        return True
    return False


def _live_session_through(gw: Gateway, *args: str) -> tuple[Proc, int, socket.socket]:
    """An agent serving echo, ready, with one session open through it."""
    proc, admin = start_agent(gw, "--resource", "echo", *args)
    wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready")
    port = status(admin)["resources"][0]["port"]
    live = socket.create_connection(("127.0.0.1", port), timeout=30)
    live.sendall(b"one!")
    assert live.recv(4) == b"one!"
    return proc, port, live


def test_sigterm_drains_live_sessions_then_cuts_what_is_left(make_gateway):
    gw = make_gateway("dev")
    # Finishes within the delay: the agent ends as soon as the last session does.
    proc, port, live = _live_session_through(gw, "--max-sigterm-delay", "60s")
    proc.popen.send_signal(signal.SIGTERM)
    wait_for(lambda: _refused(port), what="the agent to stop accepting")
    live.sendall(b"two!")
    assert live.recv(4) == b"two!"  # the live transfer goes on
    live.close()
    assert proc.popen.wait(60) == 143
    assert "sessions_cut=0" in proc.log()

    # Still open at the end of the delay: cut.
    proc, _port, live = _live_session_through(gw, "--max-sigterm-delay", "1s")
    assert proc.stop(signal.SIGTERM) == 143
    try:
        assert live.recv(4) == b""
    except ConnectionResetError:
        pass
    live.close()
    assert "sessions_cut=1" in proc.log()


def test_a_persons_agent_says_once_that_the_login_ended_and_serves_again_after_login(cluster, make_gateway):
    """A role caps the session at 8 s: renewals stop at the cap, the
    certificate runs out (as after a laptop's sleep), the agent says so
    once and is not ready; `wicket login` brings it back."""
    cluster.admin("roles", "add", "short-dev", "--allow-label", "env=dev", "--max-session-ttl", "8s")
    gw = make_gateway("short-dev")
    proc, admin = start_agent(gw, "--resource", "echo")
    wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready")
    wait_for(lambda: "run `wicket login" in _get(admin, "/readyz?verbose")[1], what="the login to run out")
    assert _get(admin, "/readyz")[0] == 503
    assert gw.login().returncode == 0
    wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready again after wicket login")
    assert _echo(status(admin)["resources"][0]["port"]) == b"ping"
    proc.stop()
    assert proc.log().count("certificate_expired") == 1


def test_a_token_never_replaces_a_persons_login(cluster, make_gateway, tmp_path):
    gw = make_gateway("dev")
    cluster.admin("bots", "add", "intruder", "--roles", "dev")
    token_file = tmp_path / "token"
    token_file.write_text(json.loads(cluster.admin("tokens", "add", "--bot", "intruder", "--format",
                                                   "json").stdout)["token"])
    proc, admin = start_agent(gw, "--token-file", str(token_file), "--cluster", cluster.address, "--ca-pin",
                              cluster.pin, "--resource", "echo")
    wait_for(lambda: "holds a person's login" in _get(admin, "/startupz")[1], what="the refusal to join")
    assert _get(admin, "/startupz")[0] == 503
    assert json.loads(gw.run("status", "--format", "json").stdout)["kind"] == "person"
    assert cluster.audit(event="bot.join", user="intruder") == []
    proc.stop()


def test_check_upstreams_fails_fast_with_the_reasons(cluster, echo, make_gateway):
    cluster.admin("resources", "add", "echo-gone", "--address", "127.0.0.1:9", "--label", "env=dev")
    gw = make_gateway("dev")
    proc, admin = start_agent(gw, "--resource", "echo", "--check-upstreams")
    wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready after the check passed")
    wait_for(lambda: "upstream_check_passed resources=1" in proc.log(), what="the check's log line")
    proc.stop()
    probes = cluster.wait_audit(event="dial.probe", user=gw.user)
    assert probes[0]["resource"] == "echo"

    proc, _ = start_agent(gw, "--resource", "echo", "--resource", "echo-gone", "--resource", "nope",
                          "--check-upstreams")
    assert proc.popen.wait(60) == 1
    log = proc.log()
    assert "upstream_check_failed resource=echo-gone" in log and "not reachable from the cluster" in log
    assert "upstream_check_failed resource=nope" in log
    assert "upstream_check_failed resource=echo " not in log


@pytest.mark.heavy
def test_a_bot_whose_certificate_ran_out_joins_again_with_its_token(echo, tmp_path):
    """The cluster is away longer than the bot's 5-second certificates (as
    a laptop asleep would be): the agent cannot renew, says so, and joins
    again with its token's second use once the cluster is back."""
    cluster = Cluster(tmp_path, echo)
    try:
        cluster.admin("roles", "add", "short-dev", "--allow-label", "env=dev", "--max-session-ttl", "5s")
        cluster.admin("bots", "add", "laptop", "--roles", "short-dev")
        token_file = tmp_path / "token"
        token_file.write_text(json.loads(cluster.admin("tokens", "add", "--bot", "laptop", "--uses", "2", "--format",
                                                       "json").stdout)["token"])
        gw = Gateway(tmp_path, cluster, "laptop")
        proc, admin = start_agent(gw, "--token-file", str(token_file), "--cluster", cluster.address, "--ca-pin",
                                  cluster.pin, "--resource", "echo")
        wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready")
        cluster.stop()
        wait_for(lambda: "join again" in _get(admin, "/readyz?verbose")[1], what="the certificate to run out")
        cluster.start()
        wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready again after joining again")
        assert _echo(status(admin)["resources"][0]["port"]) == b"ping"
        assert len(cluster.audit(event="bot.join", user="laptop")) == 2
        proc.stop()
    finally:
        cluster.stop()


@pytest.mark.heavy
def test_an_idle_agent_reconnects_with_each_renewed_certificate(echo, tmp_path):
    """No client connects: the agent's connection to the cluster is
    replaced by one with the renewed certificate by itself, before the
    old certificate ends (else the cluster would see a connection with an
    expired certificate, and only the next client would set it right)."""
    cluster = Cluster(tmp_path, echo)
    try:
        cluster.admin("roles", "add", "short6-dev", "--allow-label", "env=dev", "--max-session-ttl", "6s")
        cluster.admin("bots", "add", "idle", "--roles", "short6-dev")
        token_file = tmp_path / "token"
        token_file.write_text(json.loads(cluster.admin("tokens", "add", "--bot", "idle", "--format",
                                                       "json").stdout)["token"])
        gw = Gateway(tmp_path, cluster, "idle")
        proc, admin = start_agent(gw, "--token-file", str(token_file), "--cluster", cluster.address, "--ca-pin",
                                  cluster.pin, "--resource", "echo")
        wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready")
        wait_for(lambda: len(cluster.audit(event="bot.renew", user="idle")) >= 5, what="five renewals",
                 interval=0.5)
        assert "no valid session certificate" not in cluster.proc.log()
        wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready on the renewed certificate")
        assert _echo(status(admin)["resources"][0]["port"]) == b"ping"
        proc.stop()
    finally:
        cluster.stop()

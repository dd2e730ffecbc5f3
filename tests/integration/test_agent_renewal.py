"""An agent's renewed certificate presented on its live connection to the
cluster (protocols/linkrenewal.py): sessions outlive the certificate they
were opened with, and a lock still cuts them. A bot's role caps its
certificates at a few seconds, so renewals come every few seconds."""

from __future__ import annotations

import datetime as dt
import json
import re
import socket
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration import pgenv
from tests.integration.harness import Gateway, wait_for
from tests.integration.test_agent import _get, start_agent, status

pgenv.need_postgres()

#: Long enough that a renewal (at two thirds) lands well before the end on a
#: loaded machine; short enough that a test sees several.
TTL = "12s"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("renewal")
    with pgenv.running(tmp) as (cluster, server):
        cluster.admin("roles", "add", "pg-short", "--allow-resources", "pg", "--db-users", "app", "--db-names", "app",
                      "--max-session-ttl", TTL)
        yield tmp, cluster, server


def bot_agent(tmp, cluster, name: str):
    cluster.admin("bots", "add", name, "--roles", "pg-short")
    token_file = tmp / f"{name}.token"
    token_file.write_text(json.loads(cluster.admin("tokens", "add", "--bot", name, "--format", "json").stdout)["token"])
    gw = Gateway(tmp, cluster, name)
    proc, admin = start_agent(gw, "--token-file", str(token_file), "--cluster", cluster.address, "--ca-pin",
                              cluster.pin, "--resource", "pg")
    wait_for(lambda: _get(admin, "/readyz")[0] == 200, what="ready")
    return gw, proc, admin, status(admin)["resources"][0]["port"]


def psql(port: int, sql: str) -> subprocess.Popen:
    return subprocess.Popen(["psql", "-X", "-tA", f"host=127.0.0.1 port={port} user=app dbname=app", "-c", sql],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def renewals(cluster, user: str) -> list[dict]:
    return cluster.audit(event="link.renew", user=user)


@pytest.mark.heavy
def test_a_live_psql_session_outlives_the_certificate_it_was_opened_with(env):
    tmp, cluster, server = env
    gw, proc, admin, port = bot_agent(tmp, cluster, "steady")
    first = json.loads(gw.run("status", "--format", "json").stdout)
    # A statement that runs across two of the bot's certificates' ends.
    client = psql(port, "select 'alive' from pg_sleep(26)")
    wait_for(lambda: len([e for e in renewals(cluster, "steady") if e["sessions"] >= 1]) >= 2, timeout=60,
             what="two renewals of the connection with the session on it")
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    assert out.strip() == "alive"
    ended = cluster.wait_audit(event="session.end", user="steady")
    # Ended by the client, not cut (a cut's reason is cert_expired, user_locked ...).
    assert ended[0]["reason"] not in {"cert_expired", "cert_revoked", "user_locked", "user_removed"}, ended
    assert cluster.audit(event="session.interrupt", user="steady") == []
    assert json.loads(gw.run("status", "--format", "json").stdout)["expires_at"] != first["expires_at"]
    assert "link_renewed" in proc.log() and "link_renewal_refused" not in proc.log()
    families = {f.name: f for f in text_string_to_metric_families(_get(admin, "/metrics")[1])}
    assert families["wicket_agent_connection_renewals"].samples[0].value >= 2
    assert "the session certificate expired" not in cluster.proc.log()
    proc.stop()


def test_a_lock_still_cuts_a_session_on_a_renewed_connection(env):
    tmp, cluster, server = env
    gw, proc, _admin, port = bot_agent(tmp, cluster, "cut-later")
    slow = "select 1 from pg_sleep(600)"
    client = psql(port, slow)
    wait_for(lambda: len([e for e in renewals(cluster, "cut-later") if e["sessions"] >= 1]) >= 1, timeout=60,
             what="a renewal of the connection with the session on it")
    cluster.admin("bots", "lock", "cut-later", "--reason", "compromised")
    wait_for(lambda: client.poll() is not None, timeout=30, what="the session to be cut")
    assert client.returncode != 0
    ended = cluster.wait_audit(event="session.end", user="cut-later")
    assert ended[0]["reason"] == "user_locked", ended
    # Locked, the bot can renew neither its certificate nor its connection.
    wait_for(lambda: cluster.audit(event="link.renew_denied", user="cut-later") or
             "renewal_failed" in proc.log(), timeout=30, what="a refused renewal")
    proc.stop()


def presented(proc) -> list[dt.datetime]:
    """The ends of the certificates a proxy presented on its connection."""
    return [dt.datetime.fromisoformat(end) for end in re.findall(r"link_renewed expires_at=(\S+)", proc.log())]


def test_a_proxy_presents_a_renewal_made_by_another_process(env):
    """`wicket renew` in another terminal while `wicket proxy tcp` carries a
    live session: the proxy sees the new certificate on disk and presents
    it on its connection, and the session lives past the old certificate's
    end. (Waiting for that end is the workload: the certificate must age.)"""
    tmp, cluster, _ = env
    gw = pgenv.user(tmp, cluster, "person-renews", "dev")
    proc, port = gw.proxy("tcp", "echo")
    with socket.create_connection(("127.0.0.1", port), timeout=30) as live:
        live.sendall(b"one!")
        assert live.recv(4) == b"one!"
        # The certificate to outlive is made once the proxy and the session
        # are up (their start-up, slow on a loaded machine, must not use it
        # up); the proxy presents it on its connection. Its life is what
        # `wicket renew` (a process start: 7 s at load 19) takes, with room.
        gw.login_briefly(20)
        wait_for(lambda: len(presented(proc)) == 1, what="the proxy to present the short certificate")
        [first] = presented(proc)
        assert gw.run("renew", "--ttl", "10m").returncode == 0
        wait_for(lambda: len(presented(proc)) == 2, what="the proxy to present the renewed certificate")
        assert presented(proc)[1] > first + dt.timedelta(minutes=5)
        wait_for(lambda: dt.datetime.now(dt.timezone.utc) > first + dt.timedelta(seconds=2),
                 timeout=60, what="the first certificate to end")
        live.sendall(b"two!")
        assert live.recv(4) == b"two!"
    proc.stop()
    assert all(e["sessions"] == 1 for e in cluster.wait_audit(lambda evs: len(evs) >= 2, event="link.renew",
                                                              user="person-renews"))

"""A cluster of two worker processes (``[server] workers = 2``) and
gateways with two links to it (``--cluster-links 2``): one gateway's
PostgreSQL sessions are relayed by both workers (their upstream sockets
are in both processes), a user lock cuts them in each, ``[limits]`` count
one user's sessions across the workers, a worker that dies is started
again, and a stop leaves no process behind.

Real processes: the supervisor, its workers, gateways, PostgreSQL, psql."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from gateway.local.pgserver import PgServer
from tests.integration.dbenv import add_resource, database_env, new_gateway
from tests.integration.harness import socket_inodes, wait_for
from tests.integration.pgclients import dsn
from tests.integration.test_limits import echoes

pytestmark = pytest.mark.skipif(shutil.which("psql") is None, reason="psql not installed")

PER_USER = 4
CONFIG = f"""
[server]
workers = 2

[limits]
streams_per_user = {PER_USER}

[roles.pgw]
[[roles.pgw.allow]]
resources = ["pg"]
db_users = ["app"]
db_names = ["app"]
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("workers")
    with database_env(tmp, lambda ca: PgServer(tmp / "pgserver", client_ca_pem=ca), roles=CONFIG) as (cluster, server):
        server.sql("CREATE ROLE app LOGIN")
        server.sql("CREATE DATABASE app OWNER app")
        add_resource(cluster, server, "pg", "postgres")
        yield cluster, server, tmp


def workers_of(cluster) -> list[int]:
    pid = cluster.proc.popen.pid
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


def connections_to(pid: int, port: int) -> int:
    """Established TCP connections of process ``pid`` to 127.0.0.1:``port``."""
    inodes = socket_inodes(pid)
    if not inodes:
        return 0
    remote = f"0100007F:{port:04X}"
    with open("/proc/net/tcp") as f:
        return sum(1 for line in f.readlines()[1:]
                   if (fields := line.split())[3] == "01" and fields[2] == remote and fields[9] in inodes)


def pg_port_of(server) -> int:
    return int(server.address.rsplit(":", 1)[1])


def test_one_gateways_sessions_are_relayed_by_both_workers_and_a_lock_cuts_them_in_each(env):
    cluster, server, tmp = env
    workers = wait_for(lambda: len(workers_of(cluster)) == 2 and workers_of(cluster), what="two workers")
    gw = new_gateway(cluster, tmp, "pgw", "spread")
    _, port = gw.proxy("db", "pg", "--cluster-links", "2")
    sleepers = [subprocess.Popen(["psql", "-X", "-tA", dsn(port), "-c", "select pg_sleep(120)"],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                for _ in range(PER_USER)]
    try:
        upstream = pg_port_of(server)
        # Each worker holds the upstream sockets of the sessions on its link.
        held = wait_for(lambda: (lambda h: sum(h) == PER_USER and h)([connections_to(w, upstream) for w in workers]),
                        what="every session's upstream connection", timeout=60)
        assert all(held), held  # the gateway spreads them over its links, the links over the workers
        cluster.admin("users", "lock", gw.user, "--reason", "cut in every worker")
        for p in sleepers:
            p.wait(timeout=30)
            assert p.returncode != 0
        assert [connections_to(w, upstream) for w in workers] == [0, 0]
        ends = cluster.wait_audit(lambda evs: len(evs) >= PER_USER, event="session.end", user=gw.user)
        assert {e["reason"] for e in ends} == {"user_locked"}
    finally:
        for p in sleepers:
            p.kill()
            p.communicate()
        gw.stop()


def test_one_users_sessions_are_limited_across_the_workers(env):
    cluster, _, tmp = env
    gw = new_gateway(cluster, tmp, "dev", "limited")
    _, port = gw.proxy("tcp", "echo", "--cluster-links", "2")
    socks = []
    try:
        for _ in range(PER_USER):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            socks.append(s)
            assert echoes(s)
        # Two on each worker: each alone would let two more in.
        extra = socket.create_connection(("127.0.0.1", port), timeout=30)
        socks.append(extra)
        assert not echoes(extra)
        denied = cluster.wait_audit(event="dial.denied", user=gw.user)
        assert denied[0]["limit"] == "streams_per_user"
        socks.pop().close()  # the refused one
        socks.pop().close()  # one of the four ends: room for one again
        wait_for(lambda: _retry(socks, port), what="a session once one ended")
    finally:
        for s in socks:
            s.close()
        gw.stop()


def _retry(socks: list, port: int) -> bool:
    """A new session (the count of the one that ended may lag its close)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    socks.append(s)
    return echoes(s)


def test_a_worker_that_dies_is_reported_and_started_again(env):
    cluster, _, tmp = env
    before = wait_for(lambda: len(workers_of(cluster)) == 2 and workers_of(cluster), what="two workers")
    os.kill(before[0], signal.SIGKILL)
    after = wait_for(lambda: (lambda w: len(w) == 2 and before[0] not in w and w)(workers_of(cluster)),
                     what="the worker started again")
    assert before[1] in after
    died = wait_for(lambda: re.search(rf"cluster_worker_died worker=(\d) pid={before[0]} status=-9", cluster.proc.log()),
                    what="the death reported")
    wait_for(lambda: cluster.proc.log().count(f"cluster_worker_ready worker={died.group(1)}") >= 2,
             what="the new worker ready")
    gw = new_gateway(cluster, tmp, "dev", "after")  # its login and links go to both
    _, port = gw.proxy("tcp", "echo", "--cluster-links", "2")
    try:
        for _ in range(2):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                assert echoes(s)
    finally:
        gw.stop()


def test_a_stop_stops_every_worker(env):
    cluster, _, _ = env
    workers = wait_for(lambda: len(workers_of(cluster)) == 2 and workers_of(cluster), what="two workers")
    assert cluster.stop() == 0
    assert not [w for w in workers if Path(f"/proc/{w}").exists()]
    log = cluster.proc.log()
    assert log.count("cluster_worker_stopped") == 2 and "cluster_stopped" in log

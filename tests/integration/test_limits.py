"""No user, gateway connection or address can take the descriptors others
need: the cluster's [limits] (streams per user and per multiplexed
connection, a reserve of descriptors), the gateway's --max-connections,
and accept loops that pause quietly when descriptors run out.

Real cluster and gateway processes; the descriptor limits are lowered with
prlimit(1) for the processes under test only. Every loop is bounded."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket

import pytest

from tests.integration.harness import Cluster, Echo, Gateway, wait_for

pytestmark = pytest.mark.skipif(shutil.which("prlimit") is None, reason="prlimit (util-linux) not installed")


def prlimit(n: int) -> tuple[str, ...]:
    return ("prlimit", f"--nofile={n}:{n}", "--")


def echoes(sock: socket.socket) -> bool:
    """The session on ``sock`` relays (an echo comes back), or was refused
    (reset or closed)."""
    try:
        sock.sendall(b"ping")
        got = b""
        while len(got) < 4:
            chunk = sock.recv(4 - len(got))
            if not chunk:
                return False
            got += chunk
        return got == b"ping"
    except (ConnectionResetError, BrokenPipeError):
        return False


@contextlib.contextmanager
def clients(port: int, n: int, host: str = "127.0.0.1"):
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection((host, port), timeout=30)
            socks.append(s)
        yield socks
    finally:
        for s in socks:
            s.close()


def sessions(port: int, n: int) -> tuple[list[socket.socket], int]:
    """Open ``n`` sessions one after another (each has its answer before the
    next): the open ones, and how many were refused."""
    kept, refused = [], 0
    for _ in range(n):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
        except ConnectionResetError:  # reset even before connect returned
            refused += 1
            continue
        if echoes(s):
            kept.append(s)
        else:
            refused += 1
            s.close()
    return kept, refused


def serves(port: int, n: int = 1) -> bool:
    """``n`` new sessions all relay (closed again)."""
    kept, refused = sessions(port, n)
    for s in kept:
        s.close()
    return refused == 0


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("limits")
    echo = Echo(tmp)
    cluster = Cluster(tmp, echo, extra_config="\n[limits]\nstreams_per_user = 15\nstreams_per_connection = 10\n")
    yield tmp, cluster
    cluster.stop()
    echo.proc.stop()


def gateway(tmp, cluster: Cluster, name: str) -> Gateway:
    cluster.add_user(name, "dev")
    gw = Gateway(tmp, cluster, name)
    assert gw.login().returncode == 0
    return gw


def test_one_connection_and_one_user_are_held_to_their_limits(limited):
    tmp, cluster = limited
    greedy, other = gateway(tmp, cluster, "greedy"), gateway(tmp, cluster, "other")
    try:
        proc1, port1 = greedy.proxy("tcp", "echo")
        first, refused = sessions(port1, 12)
        # One gateway connection: 10 sessions, then refused naming the limit.
        assert len(first) == 10 and refused == 2
        wait_for(lambda: "limits.streams_per_connection" in proc1.log(), what="the refusal in the proxy's log")
        assert "code=rate_limited" in proc1.log()
        # A second gateway of the same user: 5 more, then the user's limit.
        proc2, port2 = greedy.proxy("tcp", "echo")
        second, refused = sessions(port2, 7)
        assert len(second) == 5 and refused == 2
        wait_for(lambda: "limits.streams_per_user" in proc2.log(), what="the user's limit in the log")
        # Everyone else is unaffected.
        _, port3 = other.proxy("tcp", "echo")
        theirs, refused = sessions(port3, 3)
        assert len(theirs) == 3 and refused == 0
        # The refusals are on record once each (the rest counted later).
        denied = cluster.wait_audit(lambda evs: {e.get("limit") for e in evs} >=
                                    {"streams_per_connection", "streams_per_user"},
                                    event="dial.denied", user="greedy")
        assert len(denied) == 2
        # Sessions that end give their room back.
        for s in first:
            s.close()
        wait_for(lambda: serves(port1), what="a new session after the others ended")
        for s in second + theirs:
            s.close()
    finally:
        greedy.stop()
        other.stop()


def test_sessions_leave_the_cluster_its_reserve_and_accept_pauses_quietly(tmp_path):
    echo = Echo(tmp_path)
    cluster = Cluster(tmp_path, echo, wrapper=prlimit(160),
                      extra_config="\n[limits]\nstreams_per_user = 1000\nstreams_per_connection = 1000\n"
                                   "reserve_fds = 48\n")
    try:
        greedy, other = gateway(tmp_path, cluster, "greedy"), gateway(tmp_path, cluster, "other")
        proc, port = greedy.proxy("tcp", "echo")
        kept, refused = [], 0
        for _ in range(200):  # far more than the cluster's 160 descriptors
            more, no = sessions(port, 1)
            kept += more
            refused += no
            if no:
                break
        assert refused == 1 and 40 < len(kept) < 160
        wait_for(lambda: "limits.reserve_fds" in proc.log(), what="the reserve named in the refusal")
        # The reserve is there for the API: logins and listings still work.
        assert other.run("ls").returncode == 0
        assert other.login().returncode == 0
        # Connections that take the reserve too (from other loopback
        # addresses, past the per-address cap): accept runs out of
        # descriptors, pauses, and says so once, with no traceback.
        hosts = [f"127.0.0.{i}" for i in range(2, 6)]
        held = []
        try:
            for host in hosts:
                for _ in range(40):
                    s = socket.socket()
                    s.bind((host, 0))
                    s.connect(("127.0.0.1", cluster.port))
                    held.append(s)
            wait_for(lambda: "accept_paused" in cluster.proc.log(), what="accept to pause")
        finally:
            for s in held:
                s.close()
        for s in kept:
            s.close()
        wait_for(lambda: "accept_resumed" in cluster.proc.log(), what="accept to resume")
        assert other.run("ls").returncode == 0
        log = cluster.proc.log()
        assert log.count("accept_paused") == log.count("accept_resumed") >= 1
        assert "Traceback" not in log
    finally:
        cluster.stop()
        echo.proc.stop()


def test_the_gateway_serves_at_most_max_connections(make_gateway):
    gw = make_gateway()
    proc, port = gw.proxy("tcp", "echo", "--max-connections", "3")
    with clients(port, 3) as socks:
        assert all(echoes(s) for s in socks)
        extra, refused = sessions(port, 2)
        assert not extra and refused == 2
        wait_for(lambda: "clients_refused" in proc.log(), what="the refusal in the proxy's log")
        assert proc.log().count("clients_refused") == 1  # once per episode
        assert "--max-connections" in proc.log()
    wait_for(lambda: serves(port, 3), what="clients served again once others left")


def test_the_relay_engines_accept_pauses_quietly_without_descriptors(make_gateway):
    gw = make_gateway()
    proc, port = gw.proxy("tcp", "echo", "--max-connections", "1000", wrapper=prlimit(64))
    held = []
    try:
        for _ in range(100):  # well past the gateway's 64 descriptors: they wait in the backlog
            held.append(socket.create_connection(("127.0.0.1", port), timeout=30))
        wait_for(lambda: "accept_paused" in proc.log(), what="the engine's accept to pause")
    finally:
        for s in held:
            s.close()
    wait_for(lambda: serves(port), what="a session once descriptors are free")
    wait_for(lambda: "accept_resumed" in proc.log(), what="the engine's accept to resume")
    log = proc.log()
    assert len(re.findall("accept_paused", log)) == log.count("accept_resumed")
    assert "Traceback" not in log

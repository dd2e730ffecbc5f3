"""The tcp route end to end: a real cluster process, the real `wicket` CLI and
gateway process, a real echo upstream, clients over loopback sockets.

Here the relay itself: sessions, bulk, half-close, resets, many clients,
memory, the audit of a session, the warm pool. By topic: test_tcp_login.py,
test_tcp_refusals.py, test_tcp_expiry_locks.py, test_tcp_cluster_restarts.py;
shared pieces in tcpenv.py."""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import struct

import pytest
import trio

from tests.integration.harness import keepalive_everywhere, wait_for
from tests.integration.tcpenv import connect, refused, roundtrip
from tests.unit.tlsutil import read_exactly, read_until_reset


def test_login_status_ls(make_gateway, cluster):
    gw = make_gateway("dev")
    st = gw.run("status", "--format", "json")
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    assert doc["user"] == gw.user and doc["roles"] == ["dev"] and doc["cluster"] == "test"
    assert 3500 < doc["remaining_seconds"] <= 3600
    ls = gw.run("ls", "--format", "json")
    assert ls.returncode == 0, ls.stderr
    assert json.loads(ls.stdout) == [{"name": "echo", "kind": "tcp", "labels": {"env": "dev"}}]
    text = gw.run("ls")
    assert "echo" in text.stdout and "env=dev" in text.stdout
    # The key never left this machine and is private; the profile has no secret.
    assert (gw.home / "key.pem").stat().st_mode & 0o777 == 0o600
    assert (gw.home).stat().st_mode & 0o777 == 0o700
    assert "PRIVATE" not in (gw.home / "profile.json").read_text()
    events = cluster.audit(user=gw.user, event="login")
    assert [e["event"] for e in events] == ["login.ok"]


def test_renew(make_gateway, cluster):
    gw = make_gateway("dev")
    before = (gw.home / "key.pem").read_bytes()
    r = gw.run("renew", "--ttl", "10m", "--format", "json")
    assert r.returncode == 0, r.stderr
    assert 500 < json.loads(r.stdout)["remaining_seconds"] <= 600
    assert (gw.home / "key.pem").read_bytes() != before  # a new key each time
    assert (gw.home / "key.pem").stat().st_mode & 0o777 == 0o600
    assert gw.run("ls").returncode == 0
    assert cluster.audit(user=gw.user, event="login.renew")


def test_logout(make_gateway):
    gw = make_gateway("dev")
    assert gw.run("logout").returncode == 0
    assert not (gw.home / "key.pem").exists()
    st = gw.run("status")
    assert st.returncode == 3 and "wicket login" in st.stderr


async def test_bulk_100mib_each_way(make_gateway):
    gw = make_gateway("dev")
    _, port = gw.proxy_tcp("echo")
    size = 100 * 1024 * 1024
    rnd = random.Random(1)
    block = rnd.randbytes(1 << 20)
    sent, got = hashlib.sha256(), hashlib.sha256()
    received = 0
    async with await connect(port) as s:

        async def send():
            for i in range(size // len(block)):
                chunk = block[i % 7 :] + block[: i % 7]  # vary content per MiB
                sent.update(chunk)
                await s.send_all(chunk)
            await s.send_eof()

        async with trio.open_nursery() as n:
            n.start_soon(send)
            async for chunk in s:
                got.update(chunk)
                received += len(chunk)
    assert received == size
    assert got.hexdigest() == sent.hexdigest()


async def test_half_close_is_carried(make_gateway):
    gw = make_gateway("dev")
    _, port = gw.proxy_tcp("echo")
    # The echo server only answers EOF with EOF after echoing: if our
    # shutdown(SHUT_WR) were not carried, this would hang (and time out).
    with trio.fail_after(20):
        assert await roundtrip(port, b"half-close works") == b"half-close works"
        assert await roundtrip(port, b"") == b""


async def test_200_concurrent_connections(make_gateway):
    gw = make_gateway("dev")
    _, port = gw.proxy_tcp("echo")
    results = {}

    async def one(i: int) -> None:
        payload = os.urandom(1000 + i * 37)
        results[i] = (await roundtrip(port, payload)) == payload

    with trio.fail_after(120):
        async with trio.open_nursery() as n:
            for i in range(200):
                n.start_soon(one, i)
    assert len(results) == 200 and all(results.values())


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def test_idle_connections_memory_is_bounded_and_given_back(make_gateway, cluster):
    """Resources, not speed: what an idle relayed connection costs each relay
    process, and that it all goes away when the connections close (no growth
    from one burst to the next). Bounds are generous; benchmarks/ has the
    real figures."""
    gw = make_gateway("dev")
    proc, port = gw.proxy_tcp("echo")
    pids = {"gateway": proc.popen.pid, "cluster": cluster.proc.popen.pid}
    count = 300

    async def burst() -> tuple[dict, dict]:
        streams = []
        try:
            for _ in range(count):
                s = await connect(port)
                streams.append(s)
                await s.send_all(b"?")  # established end to end, then idle
                assert await s.receive_some(1) == b"?"
            held = {name: rss_kib(pid) for name, pid in pids.items()}
        finally:
            for s in streams:
                await s.aclose()
        return held, {name: fd_count(pid) for name, pid in pids.items()}

    with trio.fail_after(120):
        await roundtrip(port, b"warm up")  # the pool, the caches, the engine thread
        fds_idle = {name: fd_count(pid) for name, pid in pids.items()}
        before = {name: rss_kib(pid) for name, pid in pids.items()}
        after = []
        for _ in range(4):
            held, _ = await burst()
            for name in pids:
                per_connection = (held[name] - before[name]) / count
                assert per_connection < 96, (name, per_connection)
            # Every relay closes its two sockets (and the gateway's warm pool
            # refills to where it was).
            wait_for(lambda: all(fd_count(pid) <= fds_idle[name] + 2 for name, pid in pids.items()),
                     what="the relays closing their sockets")
            after.append({name: rss_kib(pid) for name, pid in pids.items()})
    for name in pids:
        # From the second burst on, nothing should pile up. (Before the
        # relay engine broke its reference cycles, each burst left ~30 KiB
        # per connection behind until the next full garbage collection.)
        growth = after[3][name] - after[1][name]
        assert growth < count * 16, (name, [a[name] for a in after])


async def test_a_reset_is_passed_on_as_a_reset_both_ways(make_gateway, cluster):
    """An abort is never turned into a clean end on the way: an upstream that
    resets reaches the client as a reset, and a client's reset reaches the
    upstream as one, each after the bytes sent before it."""
    listener = (await trio.open_tcp_listeners(0, host="127.0.0.1"))[0]
    upstream_port = listener.socket.getsockname()[1]
    cluster.admin("resources", "add", "resetter", "--kind", "tcp", "--address", f"127.0.0.1:{upstream_port}",
                  "--label", "env=dev")
    gw = make_gateway("dev")
    proc, port = gw.proxy_tcp("resetter")
    async with listener:
        with trio.fail_after(20):
            # The upstream resets after answering.
            async with await connect(port) as client:
                await client.send_all(b"ping")
                upstream = await listener.accept()
                assert await read_exactly(upstream, 4) == b"ping"
                await upstream.send_all(b"last words")
                upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                await upstream.aclose()
                assert await read_until_reset(client) == b"last words"
            # The client resets after being answered.
            async with await connect(port) as client:
                await client.send_all(b"ping")
                upstream = await listener.accept()
                async with upstream:
                    assert await read_exactly(upstream, 4) == b"ping"
                    await upstream.send_all(b"pong")
                    assert await read_exactly(client, 4) == b"pong"
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    await client.aclose()
                    assert await read_until_reset(upstream) == b""
    wait_for(lambda: proc.log().count("session_end") >= 2, what="both session ends in the gateway log")
    ends = [line for line in proc.log().splitlines() if "session_end" in line]
    assert "reset the stream" in ends[0] and "upstream: receive failed" in ends[0], ends[0]
    assert "client: receive failed" in ends[1], ends[1]
    ended = cluster.wait_audit(lambda evs: len(evs) >= 2, user=gw.user, event="session.end")
    assert [(e["bytes_from_client"], e["bytes_to_client"]) for e in ended] == [(4, 10), (4, 4)]
    assert ended[0]["reason"] == "upstream: receive failed: Connection reset by peer", ended[0]
    assert ended[1]["reason"] == "gateway: reset the stream: client: receive failed: Connection reset by peer"


async def test_connections_to_the_cluster_are_probed_when_quiet(make_gateway, cluster):
    """Both ends of every gateway <-> cluster connection (here the proxy's
    multiplexed one, opened ahead of the first client) have keepalive on:
    a peer that vanished is noticed (gateway/net/tcp.py)."""
    gw = make_gateway("dev")
    _, port = gw.proxy_tcp("echo")
    with trio.fail_after(20):
        assert await roundtrip(port, b"hi") == b"hi"
    cluster_port = int(cluster.address.rsplit(":", 1)[1])
    wait_for(lambda: keepalive_everywhere(cluster_port),
             what="keepalive timers on both ends of every connection to the cluster", interval=0.1)


async def test_session_audit(make_gateway, cluster):
    gw = make_gateway("dev")
    _, port = gw.proxy_tcp("echo")
    assert await roundtrip(port, b"a" * 5000) == b"a" * 5000

    def ended():
        return [e for e in cluster.audit(user=gw.user, event="session.end")]

    end = wait_for(ended, what="session.end audit event")[-1]
    assert end["bytes_from_client"] == 5000 and end["bytes_to_client"] == 5000
    assert end["duration"] >= 0 and end["resource"] == "echo"
    start = cluster.audit(user=gw.user, event="session.start")[-1]
    assert start["session_id"] == end["session_id"]
    allowed = cluster.audit(user=gw.user, event="dial.allowed")[-1]
    assert allowed["reason"] == "allowed by role 'dev'"
    jsonl = (cluster.state / "audit.jsonl").read_text()
    assert end["session_id"] in jsonl
    assert (cluster.state / "audit.jsonl").stat().st_mode & 0o777 == 0o600


def test_cluster_cli(cluster):
    r = cluster.admin("resources", "add", "web", "--kind", "tcp", "--address", "127.0.0.1:9", "--label", "env=dev")
    assert "saved" in r.stdout
    rows = json.loads(cluster.admin("resources", "ls", "--format", "json").stdout)
    assert {"name": "web", "kind": "tcp", "address": "127.0.0.1:9", "labels": {"env": "dev"},
            "source": "cli"} in rows
    assert cluster.admin("ca", "pin").stdout.strip() == cluster.pin
    r = cluster.admin("users", "add", "Bad Name", "--password-stdin", input="x" * 20 + "\n", check=False)
    assert r.returncode == 2
    r = cluster.admin("users", "add", "shorty", "--password-stdin", input="short\n", check=False)
    assert r.returncode == 1 and "12" in r.stderr
    r = cluster.admin("roles", "add", "readers", "--allow-label", "env=dev", "--max-session-ttl", "1h")
    roles = {x["name"]: x for x in json.loads(cluster.admin("roles", "ls", "--format", "json").stdout)}
    assert roles["readers"]["source"] == "cli" and roles["dev"]["source"] == "config"
    users = json.loads(cluster.admin("users", "ls", "--format", "json").stdout)
    assert all("password" not in json.dumps(u) for u in users)


@pytest.mark.parametrize("stale", ["too old", "from before a sleep"])
async def test_warm_pool_serves_dials_and_drops_stale(make_gateway, monkeypatch, stale):
    from gateway import kinds
    from gateway.local import dialer as dialing
    from gateway.local.profile import Profile
    from protocols.dial import DialRequest

    asleep = [0.0]
    monkeypatch.setattr(dialing, "time_suspended", lambda: asleep[0])
    gw = make_gateway("dev")
    dialer = dialing.Dialer(Profile.load(gw.home), kinds.TCP.alpn)

    async def pool_filled() -> None:
        with trio.fail_after(20):
            while dialer.pool_ready < 2:
                await trio.sleep(0.01)

    async with trio.open_nursery() as nursery:
        await nursery.start(dialer.run_pool, 2)
        await pool_filled()
        dialed = await dialer.dial(DialRequest(resource="echo"))
        async with dialed.stream:
            await dialed.stream.send_all(b"pooled")
            assert await dialed.stream.receive_some(100) == b"pooled"
        assert dialer.pool_hits == 1
        if stale == "too old":
            dialer.POOL_MAX_AGE = 0.0  # every ready connection is now too old to use
        else:
            # The machine slept: the cluster has let go of them. (And the
            # pool's own sweep, every POOL_MAX_AGE / 2, is now too rare to
            # refill it below: only the dial's wake-up can.)
            dialer.POOL_MAX_AGE = 3600.0
            asleep[0] += 600.0
        dialed = await dialer.dial(DialRequest(resource="echo"))
        # ... resuming the TLS session of an earlier one (the cluster issues
        # one ticket per handshake; the dialer keeps the first).
        assert dialed.stream.session_reused
        await dialed.stream.aclose()
        assert dialer.pool_hits == 1  # a fresh connection served it
        if stale == "from before a sleep":
            await pool_filled()  # that dial woke the pool, which replaced them
            dialed = await dialer.dial(DialRequest(resource="echo"))
            await dialed.stream.aclose()
            assert dialer.pool_hits == 2
        nursery.cancel_scope.cancel()
    assert not dialer._pool  # closed on the way out


async def test_a_named_host_and_an_unreachable_upstream(make_gateway, cluster, echo):
    """The cluster starts a session in its relay engine when the upstream's
    address is an IP literal, and through trio (which resolves it) when it
    is a name: both relay, and both report an upstream that is down the same
    way."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]  # nothing listens there once closed
    for name, address in [("echo-named", f"localhost:{echo.port}"), ("dead-literal", f"127.0.0.1:{dead_port}"),
                          ("dead-named", f"localhost:{dead_port}")]:
        cluster.admin("resources", "add", name, "--kind", "tcp", "--address", address, "--label", "env=dev")
    gw = make_gateway("dev")
    _, port = gw.proxy_tcp("echo-named")
    with trio.fail_after(20):
        assert await roundtrip(port, b"by name") == b"by name"
    for name in ("dead-literal", "dead-named"):
        proc, port = gw.proxy_tcp(name)
        with trio.fail_after(20):
            assert await refused(port)
        wait_for(lambda: "code=upstream_unreachable" in proc.log(), what=f"{name}: refusal in the gateway log")
        assert "is not reachable from the cluster" in proc.log()
        denied = cluster.wait_audit(lambda evs: any(e["resource"] == name for e in evs), user=gw.user,
                                    event="dial.denied")
        assert [e["code"] for e in denied if e["resource"] == name] == ["upstream_unreachable"], denied

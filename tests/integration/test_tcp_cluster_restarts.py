"""The gateway waiting out the cluster, end to end: sleeps and stalls, a
cluster restart (state kept, sessions ridden through, connections the
cluster forgot), and dials still connecting when it stops."""

from __future__ import annotations

import json
import re

import pytest
import trio
import trio.testing

from tests.integration.harness import socket_inodes, wait_for
from tests.integration.tcpenv import connect, refused, roundtrip, until_reset
from tests.unit.tlsutil import read_exactly


@pytest.mark.parametrize("why", ["slept", "stalled"])
async def test_sessions_after_a_sleep_or_a_stall_take_a_new_multiplexed_connection(make_gateway, monkeypatch,
                                                                                   why):
    """After the machine slept, the cluster has let go of the multiplexed
    connection (its keepalive probes went unanswered); once the connection
    stops getting answers (the network changed under it), sessions sent into
    it would wait for nothing. Either way new sessions go over a new
    connection at once, while the sessions already on the old one keep it
    until they end. (The stall itself, as the kernel reports it, is
    tests/unit/gateway/net/test_muxlink_retry.py's.)"""
    import socket

    from gateway.local import dialer as dialing
    from gateway.local.profile import Profile
    from gateway.net.muxlink import MuxLink
    from gateway.net.relay import RelayCounters
    from protocols.dial import DialRequest

    asleep = [0.0]
    monkeypatch.setattr(dialing, "time_suspended", lambda: asleep[0])
    stalled: set = set()
    monkeypatch.setattr(MuxLink, "stalled", lambda link: link in stalled)
    gw = make_gateway("dev")
    dialer = dialing.MuxDialer(Profile.load(gw.home))
    first = await dialer.link()
    near, far = socket.socketpair()
    near.setblocking(False)
    far = trio.socket.from_stdlib_socket(far)
    ended, token = trio.Event(), trio.lowlevel.current_trio_token()
    first.start(DialRequest(resource="echo"), near, RelayCounters(),
                lambda _link, _stream: token.run_sync_soon(ended.set), reply_timeout=30)

    async def echoed(data: bytes) -> None:
        await far.send(data)
        got = b""
        with trio.fail_after(20):
            while len(got) < len(data):
                got += await far.recv(100)
        assert got == data

    await echoed(b"before")
    asleep[0] += 2.0  # a blink is not a sleep
    assert dialer.ready_link() is first
    if why == "slept":
        asleep[0] += 3600.0  # an hour with the lid shut
    else:
        stalled.add(first)
    assert dialer.ready_link() is None  # the engine hands new clients to trio
    second = await dialer.link()
    assert second is not first and dialer.ready_link() is second
    assert first.failed is None  # its session goes on
    await echoed(b"after")
    far.close()
    with trio.fail_after(20):
        await ended.wait()
    dialer.release(first)  # what the proxy does when a session on it ends
    assert first.failed == {"slept": "replaced after the machine slept",
                            "stalled": "replaced: it stopped getting answers from the cluster"}[why]
    assert second.failed is None
    second.close("test over")


async def test_clients_waiting_for_a_connect_that_fails_share_its_answer(make_gateway, monkeypatch):
    """A cluster that does not answer (a network dropping packets) costs a
    connect its CONNECT_TIMEOUT. Clients that came while that connect was
    under way get its failure when it fails, rather than each trying again
    in turn and waiting a timeout of its own."""
    from gateway.local import dialer as dialing
    from gateway.local.profile import Profile

    dialer = dialing.MuxDialer(Profile.load(make_gateway("dev").home))
    attempts, give_up = [], trio.Event()

    async def silent_cluster(*args, **kwargs):
        attempts.append(args)
        await give_up.wait()  # the timeout, as long as the test likes
        raise dialing.ClusterError("unreachable", "no answer from the cluster within 15s")

    monkeypatch.setattr(dialing, "connect_cluster", silent_cluster)
    failed: list[str] = []

    async def one_client() -> None:
        with pytest.raises(dialing.ClusterError) as info:
            await dialer.link()
        failed.append(info.value.message)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for _ in range(5):
                nursery.start_soon(one_client)
            await trio.testing.wait_all_tasks_blocked()
            assert len(attempts) == 1
            give_up.set()
    assert len(attempts) == 1 and failed == ["no answer from the cluster within 15s"] * 5


async def test_the_proxy_replaces_its_connection_after_a_sleep_before_any_client(make_gateway, monkeypatch):
    """Waking, the proxy opens the new connection by itself (within
    CHECK_INTERVAL on the monotonic clock), so the first client after the
    sleep starts at once, in the relay engine."""
    from gateway.local import dialer as dialing
    from gateway.local.profile import Profile

    asleep = [0.0]
    monkeypatch.setattr(dialing, "time_suspended", lambda: asleep[0])
    gw = make_gateway("dev")
    dialer = dialing.MuxDialer(Profile.load(gw.home))
    dialer.CHECK_INTERVAL = 0.05
    async with trio.open_nursery() as nursery:
        await nursery.start(dialer.run_pool)
        with trio.fail_after(20):
            while (first := dialer.ready_link()) is None:
                await trio.sleep(0.01)
            asleep[0] += 600.0
            while (second := dialer.ready_link()) is None:
                await trio.sleep(0.01)
            await first.closed.wait()  # it had no session: closed at once
        assert second is not first and first.failed == "replaced after the machine slept"
        nursery.cancel_scope.cancel()
    assert second.failed == "the gateway is stopping"


def test_cluster_restart_keeps_state(tmp_path, echo):
    from tests.integration.harness import Cluster, Gateway

    c = Cluster(tmp_path, echo)
    try:
        c.add_user("carol", "dev")
        gw = Gateway(tmp_path, c, "carol")
        assert gw.login().returncode == 0
        pin = c.pin
        assert c.stop() == 0  # SIGTERM: a clean stop
        assert "cluster_stopped" in c.proc.log()
        c.start()
        assert c.pin == pin  # the CAs survived
        assert gw.run("ls", "--format", "json").returncode == 0  # the old certificate still works
        assert gw.login().returncode == 0  # and a new login works
        assert [u["name"] for u in json.loads(c.admin("users", "ls", "--format", "json").stdout)] == ["carol"]
        assert (c.state / "wicket.db").stat().st_mode & 0o777 == 0o600
        for key in ("user_ca.key", "host_ca.key", "host.key", "ssh_user_ca"):
            assert (c.state / key).stat().st_mode & 0o777 == 0o600
    finally:
        c.stop()


@pytest.fixture
def own_cluster(tmp_path, echo):
    """A cluster of the test's own, to stop, crash and restart."""
    from tests.integration.harness import Cluster

    c = Cluster(tmp_path, echo)
    yield c
    c.stop()


def own_proxy(cluster, tmp_path, user: str):
    """``wicket proxy tcp echo`` for a new user of ``cluster``, logged in:
    (the proxy's process, its port)."""
    from tests.integration.harness import Gateway

    cluster.add_user(user, "dev")
    gw = Gateway(tmp_path, cluster, user)
    assert gw.login().returncode == 0
    return gw.proxy_tcp("echo")


async def test_the_proxy_rides_out_a_cluster_restart(own_cluster, tmp_path):
    """A running `wicket proxy tcp` loses its multiplexed connection when the
    cluster stops: live sessions end. A client that comes while the cluster
    is down waits for it (``--wait-for-cluster``, a log line says why) and
    gets its session once the cluster is back; one whose wait runs out is
    turned away with a log line saying what to check. The proxy's log says
    when the cluster went away and when it came back, once each."""
    from tests.integration.harness import Gateway

    c = own_cluster
    c.add_user("dave", "dev")
    gw = Gateway(tmp_path, c, "dave")
    assert gw.login().returncode == 0
    proc, port = gw.proxy("tcp", "echo", "--wait-for-cluster", "120")
    hasty, hasty_port = gw.proxy("tcp", "echo", "--wait-for-cluster", "0.5")
    async with await connect(port) as live:
        await live.send_all(b"before")
        assert await live.receive_some(100) == b"before"
        assert c.stop() == 0
        with trio.fail_after(20):  # the live session ends with the cluster
            await until_reset(live)
    # Its log says when the cluster went away, once, before any client came.
    wait_for(lambda: "cluster_unreachable" in proc.log(), what="the outage in the proxy's log")
    with trio.fail_after(20):
        assert await refused(hasty_port)
    turned_away = wait_for(lambda: re.search(r"dial_failed .*", hasty.log()), what="the refusal in the log")
    assert "Connection refused" in turned_away.group(0)
    assert re.search(r"waited [\d.]+s for the cluster", turned_away.group(0))
    assert "wicket-cluster start" in turned_away.group(0)  # what to check
    async with await connect(port) as waiting:
        await waiting.send_all(b"while it was down")
        wait_for(lambda: "cluster_wait" in proc.log(), what="the wait in the proxy's log")
        c.start()
        with trio.fail_after(60):
            assert await read_exactly(waiting, 17) == b"while it was down"
    assert "dial_failed" not in proc.log()
    wait_for(lambda: "cluster_reachable_again" in proc.log(), what="the outage's end in the log")
    assert proc.log().count("cluster_unreachable") == 1  # not a line per attempt


async def test_a_session_into_a_connection_the_cluster_forgot_goes_through(own_cluster, tmp_path):
    """The cluster's machine went down without a word (power, a kernel
    panic) and came back while the proxy sat idle: the proxy's multiplexed
    connection still looks open. The next client's session goes into it,
    meets a reset before the cluster's kernel acknowledged anything, so the
    cluster cannot have seen it: the proxy starts it again on a new
    connection, and the client notices nothing. The cluster records it
    once."""
    from tests.integration.harness import vanish_on_exit

    c = own_cluster
    proc, port = own_proxy(c, tmp_path, "fay")
    assert await roundtrip(port, b"before") == b"before"
    c.wait_audit(lambda events: len(events) == 1, event="session.start")  # stored before the crash
    assert vanish_on_exit(c.proc.popen.pid, c.port) == 1  # the one multiplexed connection
    c.proc.popen.kill()
    c.stop()
    c.start()
    with trio.fail_after(30):
        assert await roundtrip(port, b"after the crash") == b"after the crash"
    retried = wait_for(lambda: re.search(r"session_retry .*Connection reset by peer.*", proc.log()),
                       what="the retry in the proxy's log")
    assert "starting it on a new connection" in retried.group(0)
    c.stop()  # its audit log complete
    starts = c.audit(event="session.start")
    assert len(starts) == 2, starts  # one before the crash, and the retried one once


def _connecting_to(port: int, pid: int | None = None) -> int:
    """How many sockets on this machine (of process ``pid`` only, if given)
    are in SYN-SENT towards ``port``."""
    inodes = None if pid is None else socket_inodes(pid)
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                n += fields[3] == "02" and int(fields[2].rsplit(":", 1)[1], 16) == port \
                    and (inodes is None or fields[9] in inodes)
    return n


async def test_dials_still_connecting_when_the_cluster_stops_are_on_record(tmp_path, echo):
    """An upstream that neither answers nor refuses (its accept queue is
    full); the cluster stops while connecting to it, in its relay engine (an
    IP literal) and in trio (a name). Both dials are audited as given up,
    in the store, by the time the cluster has stopped."""
    from tests.integration.harness import Cluster, Gateway
    from tests.unit.gateway.net.test_engine import full_listener

    listener, fillers = full_listener()
    port = listener.getsockname()[1]
    c = Cluster(tmp_path, echo)
    try:
        c.add_user("erin", "dev")
        for name, address in [("slow-literal", f"127.0.0.1:{port}"), ("slow-named", f"localhost:{port}")]:
            c.admin("resources", "add", name, "--kind", "tcp", "--address", address, "--label", "env=dev")
        gw = Gateway(tmp_path, c, "erin")
        assert gw.login().returncode == 0
        clients = []
        # Fillers whose SYN the full queue dropped are connecting too, and
        # their number moves: count only the cluster process's own connects.
        for name in ("slow-literal", "slow-named"):
            _, proxy_port = gw.proxy_tcp(name)
            clients.append(await connect(proxy_port))
            await clients[-1].send_all(b"hello")
            wait_for(lambda: _connecting_to(port, c.proc.popen.pid) >= len(clients),
                     what=f"{name}: the cluster connecting")
        assert c.stop() == 0
        denied = {e["resource"]: e for e in c.audit(event="dial.denied")}
        for name in ("slow-literal", "slow-named"):
            assert denied[name]["code"] == "upstream_unreachable" and denied[name]["reason"] == "cluster_stopping", \
                denied
        for client in clients:
            await client.aclose()
    finally:
        c.stop()
        listener.close()
        for s in fillers:
            s.close()

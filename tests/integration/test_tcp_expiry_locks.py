"""Certificates that expire and users that get locked, end to end: refused at
the gateway, at the cluster and on the multiplexed connection; live sessions cut."""

from __future__ import annotations

import time

import pytest
import trio

from tests.integration.harness import wait_for
from tests.integration.tcpenv import connect, refused, roundtrip, until_reset


async def test_expired_certificate(make_gateway, cluster):
    gw = make_gateway("dev", login=False)
    # Long enough for the proxy to start first on a loaded machine (at a
    # load average of 9, 3 s were not: the proxy refused the expired login).
    r = gw.login("--ttl", "10s")
    assert r.returncode == 0, r.stderr
    proc, port = gw.proxy_tcp("echo")
    wait_for(lambda: gw.run("status").returncode == 3, timeout=30, what="the certificate to expire",
             interval=0.2)
    with trio.fail_after(20):
        assert await refused(port)
    wait_for(lambda: "wicket login" in proc.log() and "expired" in proc.log(), what="expiry in gateway log")


async def test_expired_certificate_refused_by_cluster(make_gateway, cluster):
    """The cluster refuses an expired certificate with a typed error, even when
    a gateway does not check its own clock first."""
    from gateway import kinds
    from gateway.local.dialer import Dialer, DialRefused
    from gateway.local.profile import Profile
    from protocols.dial import DialRequest
    from protocols.errors import ErrorCode

    gw = make_gateway("dev", login=False)
    assert gw.login("--ttl", "2s").returncode == 0
    profile = Profile.load(gw.home)
    wait_for(lambda: gw.run("status").returncode == 3, timeout=30, what="expiry", interval=0.2)
    with pytest.raises(DialRefused) as err:
        await Dialer(profile, kinds.TCP.alpn).dial(DialRequest(resource="echo"))
    assert err.value.error.code is ErrorCode.CERT_EXPIRED
    # The cluster says what happened; the gateway adds the next step, once.
    assert "expired at" in err.value.error.message and "wicket login" not in err.value.error.message


async def test_expired_certificate_refused_on_the_multiplexed_connection(make_gateway, cluster):
    """The same typed refusal when the dial is a stream of the multiplexed
    connection (what `wicket proxy tcp` uses)."""
    import socket

    from gateway.local.dialer import MuxDialer
    from gateway.local.profile import Profile
    from gateway.net.relay import RelayCounters
    from protocols.dial import DialError, DialRequest
    from protocols.errors import ErrorCode

    gw = make_gateway("dev", login=False)
    assert gw.login("--ttl", "2s").returncode == 0
    dialer = MuxDialer(Profile.load(gw.home))
    wait_for(lambda: gw.run("status").returncode == 3, timeout=30, what="expiry", interval=0.2)
    link = await dialer.link()
    near, far = socket.socketpair()
    near.setblocking(False)
    ended, token = trio.Event(), trio.lowlevel.current_trio_token()
    stream = link.start(DialRequest(resource="echo"), near, RelayCounters(),
                        lambda _link, _stream: token.run_sync_soon(ended.set), reply_timeout=30)
    with trio.fail_after(20):
        await ended.wait()
    assert isinstance(stream.reply, DialError) and stream.reply.code is ErrorCode.CERT_EXPIRED
    assert far.recv(10) == b""  # the refusal closed the client's socket
    far.close()
    link.close("test over")


async def test_lock_cuts_live_session_and_refuses_new(make_gateway, cluster):
    gw = make_gateway("dev")
    proc, port = gw.proxy_tcp("echo")
    async with await connect(port) as s:
        await s.send_all(b"ping")
        assert await s.receive_some(100) == b"ping"
        cluster.admin("users", "lock", gw.user, "--reason", "incident 42")
        locked_at = time.monotonic()
        with trio.fail_after(2.0):  # the spec: live sessions end within 2 s
            await until_reset(s)
        elapsed = time.monotonic() - locked_at
    assert elapsed < 2.0
    with trio.fail_after(20):
        assert await refused(port)
    wait_for(lambda: "code=user_locked" in proc.log(), what="lock refusal in gateway log")
    assert "incident 42" in proc.log()
    # The refused dial is on record under the user the certificate names.
    refusals = cluster.wait_audit(lambda evs: any(e["code"] == "user_locked" for e in evs), user=gw.user,
                                  event="dial.denied")
    assert all(e["user_claimed"] is True for e in refusals if e["code"] == "user_locked")
    ended = cluster.wait_audit(user=gw.user, event="session.end")
    assert ended[-1]["reason"] == "user_locked"
    assert ended[-1]["bytes_from_client"] == 4 and ended[-1]["bytes_to_client"] == 4
    cluster.admin("users", "unlock", gw.user)
    assert gw.login().returncode == 0  # the lock revoked the old certificate (test_revocation.py)
    with trio.fail_after(20):
        assert await roundtrip(port, b"back") == b"back"
    events = [e["event"] for e in cluster.wait_audit(lambda evs: len([e for e in evs if e["event"] == "session.end"]) >= 2,
                                                     user=gw.user)]
    assert "user.lock" in events and "user.unlock" in events


async def test_certificate_expiry_ends_a_live_session(make_gateway, cluster):
    gw = make_gateway("dev", login=False)
    assert gw.login("--ttl", "4s").returncode == 0
    _, port = gw.proxy_tcp("echo")
    async with await connect(port) as s:
        await s.send_all(b"ping")
        assert await s.receive_some(100) == b"ping"
        with trio.fail_after(20):  # held open until the certificate's end cuts it
            await until_reset(s)
    ended = cluster.wait_audit(user=gw.user, event="session.end")
    assert ended[-1]["reason"] == "cert_expired", ended[-1]
    assert ended[-1]["bytes_from_client"] == 4 and ended[-1]["bytes_to_client"] == 4

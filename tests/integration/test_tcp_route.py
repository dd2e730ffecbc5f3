"""The tcp route end to end: a real cluster process, the real `wicket` CLI and
gateway process, a real echo upstream, clients over loopback sockets."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import re
import socket
import ssl
import struct
import time

import pytest
import trio
import trio.testing

from tests.integration.harness import PASSWORD, keepalive_everywhere, wait_for
from tests.unit.tlsutil import read_exactly, read_until_reset


async def connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def roundtrip(port: int, payload: bytes) -> bytes:
    async with await connect(port) as s:
        await s.send_all(payload)
        await s.send_eof()
        out = bytearray()
        async for chunk in s:
            out += chunk
        return bytes(out)


@contextlib.contextmanager
def unverified_tls(cluster, alpn: str, timeout: float | None = None):
    """A TLS connection to the cluster that checks nothing and presents no
    certificate: what an anonymous peer can do."""
    host, port = cluster.address.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([alpn])
    with socket.create_connection((host, int(port)), timeout=timeout) as raw, ctx.wrap_socket(raw) as s:
        yield s


async def refused(port: int) -> bool:
    """The gateway reset the connection without relaying anything. A session
    that cannot start is an abort, never a clean (empty) end; our send may
    meet the reset already (EPIPE), and so may our EOF (ENOTCONN: after a
    reset, where after a clean end it would succeed). On a busy machine the
    reset may even come before trio has seen the connect finish: the
    connect itself then fails with it."""
    try:
        got = await roundtrip(port, b"hello")
    except OSError as exc:
        group = exc.__cause__
        if isinstance(group, ExceptionGroup) and group.subgroup(ConnectionResetError) is not None:
            return True
        raise
    except trio.BrokenResourceError as exc:
        if isinstance(exc.__cause__, (ConnectionResetError, BrokenPipeError)):
            return True
        if isinstance(exc.__cause__, OSError) and exc.__cause__.errno == errno.ENOTCONN:
            return True
        raise
    raise AssertionError(f"a clean end after {got!r}, where a reset was due")


async def until_reset(stream) -> None:
    """Read until the gateway resets the connection, as it does to a cut
    session; a clean EOF fails the test."""
    await read_until_reset(stream, 100)


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


async def test_role_that_denies(make_gateway, cluster):
    gw = make_gateway("nothing-dev")
    assert json.loads(gw.run("ls", "--format", "json").stdout) == []
    proc, port = gw.proxy_tcp("echo")
    with trio.fail_after(20):
        assert await refused(port)
    wait_for(lambda: "code=access_denied" in proc.log(), what="denial in gateway log")
    log = proc.log()
    # What to do, once; the role and its rule only in the audit.
    assert log.count("ask a cluster administrator") == 1 and "nothing-dev" not in log, log
    denied = cluster.wait_audit(user=gw.user, event="dial.denied")
    assert denied and denied[-1]["code"] == "access_denied" and "nothing-dev" in denied[-1]["reason"]


def _refusal(log: str, name: str) -> str:
    """The code and message of a refusal in a gateway's log, its resource's name blanked."""
    line = re.search(r"dial_refused .*? (code=\S+ message=.*?) next_step", log).group(1)
    return line.replace(repr(name), "NAME")


async def test_unknown_resource_looks_like_one_out_of_reach(make_gateway, cluster):
    gw = make_gateway("nothing-dev")
    unknown, unknown_port = gw.proxy_tcp("no-such-thing")
    denied, denied_port = gw.proxy_tcp("echo")
    with trio.fail_after(20):
        assert await refused(unknown_port) and await refused(denied_port)
    wait_for(lambda: "dial_refused" in unknown.log() and "dial_refused" in denied.log(), what="refusals in logs")
    told = _refusal(unknown.log(), "no-such-thing")
    assert told == _refusal(denied.log(), "echo")
    assert "code=access_denied" in told and "nothing-dev" not in told
    reasons = {e["resource"]: e["reason"] for e in cluster.wait_audit(
        lambda evs: len(evs) >= 2, user=gw.user, event="dial.denied")}
    assert reasons["no-such-thing"] == "no resource named 'no-such-thing'"
    assert "nothing-dev" in reasons["echo"]


def test_wrong_ca_pin(make_gateway):
    gw = make_gateway("dev", login=False)
    r = gw.login(pin="sha256:" + "ab" * 32)
    assert r.returncode == 5
    assert "does not match" in r.stderr and "wicket-cluster ca pin" in r.stderr
    assert not (gw.home / "key.pem").exists()


def test_login_without_pin_needs_terminal_or_insecure(make_gateway, cluster):
    gw = make_gateway("dev", login=False)
    r = gw.run("login", cluster.address, "--user", gw.user, "--password-stdin", input="x\n")
    assert r.returncode == 5 and "--ca-pin" in r.stderr and cluster.pin in r.stderr
    r = gw.run("login", cluster.address, "--user", gw.user, "--password-stdin", "--insecure",
               input="correct horse battery staple\n")
    assert r.returncode == 0, r.stderr
    assert "WARNING: --insecure" in r.stderr


def test_bad_password_and_rate_limit(make_gateway, cluster):
    gw = make_gateway("dev", login=False)
    for _ in range(5):
        r = gw.login(password="wrong password!!")
        assert r.returncode == 4 and "invalid user name, password or TOTP code" in r.stderr
    r = gw.login()  # the right password, but too many failures: refused
    assert r.returncode == 4 and "too many failed logins" in r.stderr
    reasons = [e["reason"] for e in cluster.audit(user=gw.user, event="login.failed")]
    assert reasons == ["wrong password"] * 5  # refusals do not extend the lockout
    assert cluster.audit(user=gw.user, event="login.rate_limited")
    # An unknown user gets the same answer as a wrong password.
    r = gw.run("login", cluster.address, "--user", "nobody-here", "--ca-pin", cluster.pin,
               "--password-stdin", input="whatever it is\n")
    assert r.returncode == 4 and "invalid user name, password or TOTP code" in r.stderr


def _login_from(cluster, source: str, user: str, password: str, totp_code: str | None = None) -> tuple[int, dict]:
    """A login over the API from the loopback address ``source``: (status, answer)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    body = {"user": user, "password": password, "public_key": key}
    if totp_code is not None:
        body["totp_code"] = totp_code
    payload = json.dumps(body).encode()
    host, port = cluster.address.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    with socket.create_connection((host, int(port)), timeout=30, source_address=(source, 0)) as raw, \
            ctx.wrap_socket(raw) as s:
        s.sendall(b"POST /v1/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                  b"content-length: %d\r\n\r\n" % len(payload) + payload)
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < int(
                re.search(rb"content-length: (\d+)", answer, re.I).group(1)):
            chunk = s.recv(65536)
            assert chunk, answer
            answer += chunk
    head, body_bytes = answer.split(b"\r\n\r\n", 1)
    return int(head.split()[1]), json.loads(body_bytes)


def test_failures_from_one_address_do_not_keep_the_user_out_of_another(cluster):
    import base64
    from urllib.parse import parse_qs, urlparse

    from cryptography.hazmat.primitives.hashes import SHA1
    from cryptography.hazmat.primitives.twofactor.totp import TOTP

    r = cluster.add_user("roamer", "dev", "--totp")
    uri = next(line for line in r.stdout.splitlines() if line.startswith("otpauth://totp/"))
    b32 = parse_qs(urlparse(uri).query)["secret"][0]
    secret = base64.b32decode(b32 + "=" * (-len(b32) % 8), casefold=True)
    # Someone at 127.0.0.3 guesses the password, past the limit.
    for _ in range(5):
        assert _login_from(cluster, "127.0.0.3", "roamer", "a wrong guess!!")[0] == 401
    status, answer = _login_from(cluster, "127.0.0.3", "roamer", "another guess!!")
    assert status == 429 and 0 < answer["error"]["retry_after"] <= 10, answer
    # The user, with the password and a TOTP code, from another address: in at once.
    code = TOTP(secret, 6, SHA1(), 30).generate(time.time()).decode()
    status, answer = _login_from(cluster, "127.0.0.4", "roamer", PASSWORD, code)
    assert status == 200 and answer["user"] == "roamer", answer
    # The pattern is on record: who, from where, how many failures.
    limited = cluster.audit(user="roamer", event="login.rate_limited")[-1]
    assert limited["client_host"] == "127.0.0.3" and limited["failures_for_user_from_address"] == 5


async def test_parallel_guesses_are_rate_limited(cluster, tmp_path):
    """A burst of concurrent wrong passwords cannot all be tried before the
    first failure is recorded."""
    from tests.integration.harness import Gateway

    cluster.add_user("burst", "dev")
    gw = Gateway(tmp_path, cluster, "burst")
    results: list[int] = []

    async def guess() -> None:
        r = await trio.to_thread.run_sync(lambda: gw.login(password="not the password!!"))
        results.append(r.returncode)

    async with trio.open_nursery() as n:
        for _ in range(12):
            n.start_soon(guess)
    assert len(results) == 12 and set(results) == {4}
    failures = cluster.audit(user="burst", event="login.failed")
    assert len(failures) <= 5  # the limit, not twelve tries


def test_totp_login(tmp_path, cluster):
    import base64
    from urllib.parse import parse_qs, urlparse

    from cryptography.hazmat.primitives.hashes import SHA1
    from cryptography.hazmat.primitives.twofactor.totp import TOTP

    from tests.integration.harness import Gateway

    r = cluster.add_user("tina", "dev", "--totp")
    uri = next(line for line in r.stdout.splitlines() if line.startswith("otpauth://totp/"))
    assert "issuer=test" in uri
    b32 = parse_qs(urlparse(uri).query)["secret"][0]
    secret = base64.b32decode(b32 + "=" * (-len(b32) % 8), casefold=True)
    gw = Gateway(tmp_path, cluster, "tina")
    r = gw.login()
    assert r.returncode == 4 and "--totp-code" in r.stderr
    code = TOTP(secret, 6, SHA1(), 30).generate(time.time()).decode()
    r = gw.run("login", cluster.address, "--user", "tina", "--ca-pin", cluster.pin, "--password-stdin",
               "--totp-stdin", input=f"{PASSWORD}\n{code}\n")
    assert r.returncode == 0, r.stderr
    r = gw.login("--totp-code", code)  # a code works once
    assert r.returncode == 4
    assert cluster.audit(user="tina", event="user.add")[-1]["totp"] is True


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


def test_multiplexed_connection_without_certificate_gets_a_typed_refusal(cluster):
    from protocols.dial import DialError, DialRequest
    from protocols.errors import ErrorCode
    from protocols.mux import NEED_DATA, MuxConnection, Role, StreamReplied

    conn = MuxConnection(Role.GATEWAY)
    with unverified_tls(cluster, "wicket-mux") as s:
        assert s.selected_alpn_protocol() == "wicket-mux"
        s.settimeout(20)
        # Each dial with early bytes behind it, as a gateway sends them: all
        # get the typed refusal (or, past the few streams such a connection
        # may hold, rate_limited), and none of the bytes go anywhere.
        for _ in range(20):
            sid, data = conn.send_open(DialRequest(resource="echo"))
            s.sendall(data + conn.send_data(sid, b"x" * 60_000) + conn.send_fin(sid))
        codes = []
        while len(codes) < 20:
            event = conn.next_event()
            if event is NEED_DATA:
                chunk = s.recv(65536)
                assert chunk, "the cluster closed the connection without answering"
                conn.receive_data(chunk)
                continue
            assert isinstance(event, StreamReplied) and isinstance(event.reply, DialError)
            codes.append(event.reply.code)
        assert ErrorCode.CERT_REQUIRED in codes
        assert set(codes) <= {ErrorCode.CERT_REQUIRED, ErrorCode.RATE_LIMITED}


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


def _connecting_to(port: int) -> int:
    """How many sockets on this machine are in SYN-SENT towards ``port``."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                n += fields[3] == "02" and int(fields[2].rsplit(":", 1)[1], 16) == port
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
        # A filler whose SYN the full queue dropped is connecting too: count
        # only the cluster's connects on top of those.
        fillers_connecting = _connecting_to(port)
        for name in ("slow-literal", "slow-named"):
            _, proxy_port = gw.proxy_tcp(name)
            clients.append(await connect(proxy_port))
            await clients[-1].send_all(b"hello")
            wait_for(lambda: _connecting_to(port) >= fillers_connecting + len(clients),
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


def test_cluster_health_without_cert(cluster):
    with unverified_tls(cluster, "http/1.1") as s:
        assert s.version() == "TLSv1.3"
        s.sendall(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
        assert b'"status":"ok"' in s.recv(4096)
        s.sendall(b"GET /v1/whoami HTTP/1.1\r\nhost: x\r\n\r\n")
        answer = s.recv(4096)
        assert b"401" in answer.split(b"\r\n")[0] and b"cert_required" in answer


def test_tls12_refused(cluster):
    host, port = cluster.address.rsplit(":", 1)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection((host, int(port))) as raw:
        with pytest.raises(ssl.SSLError):
            ctx.wrap_socket(raw).close()


def _raw_api(cluster, method: str, path: str, body: bytes) -> bytes:
    with unverified_tls(cluster, "http/1.1", timeout=30) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\n"
                  f"content-type: application/json\r\n\r\n".encode() + body)
        return s.recv(65536)


def test_hostile_peers_cannot_take_the_cluster_down(cluster):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    host, port = cluster.address.rsplit(":", 1)
    for _ in range(3):  # connect and reset at once
        s = socket.create_connection((host, int(port)))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    bodies = [
        b"[" * 30000 + b"]" * 30000,  # deep nesting
        json.dumps({"user": "x", "password": "y" * 12, "public_key": p384}).encode(),  # wrong curve
        json.dumps({"user": "x", "password": "y", "public_key": "-----BEGIN PUBLIC KEY-----\nAAAA\n"
                    "-----END PUBLIC KEY-----\n"}).encode(),
        b'{"user": "x", "password": "y", "ttl_seconds": NaN}',
    ]
    for body in bodies:
        answer = _raw_api(cluster, "POST", "/v1/login", body)
        assert answer.split(b"\r\n")[0].split()[1] in (b"400", b"413"), answer[:200]
    assert b'"status":"ok"' in _raw_api(cluster, "GET", "/v1/health", b"")


def _health_from(cluster, source: str) -> bool:
    """A health request over TLS from loopback address ``source`` is answered."""
    host, port = cluster.address.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        with socket.create_connection((host, int(port)), timeout=10, source_address=(source, 0)) as raw, \
                ctx.wrap_socket(raw) as s:
            s.sendall(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
            return b'"status":"ok"' in s.recv(4096)
    except (OSError, ssl.SSLError):
        return False


def test_one_address_cannot_hold_the_clusters_connections(cluster):
    from gateway.cluster.admission import UNAUTHENTICATED_PER_ADDRESS

    host, port = cluster.address.rsplit(":", 1)
    idle = []
    try:
        # Connections that never start their handshake, as many as the cap.
        for _ in range(UNAUTHENTICATED_PER_ADDRESS):
            idle.append(socket.create_connection((host, int(port)), timeout=10, source_address=("127.0.0.9", 0)))
        wait_for(lambda: not _health_from(cluster, "127.0.0.9"), what="the cap to refuse more from 127.0.0.9")
        assert _health_from(cluster, "127.0.0.10")  # everyone else is served
        # Log lines are written by a thread every 50 ms (gateway/logs.py): poll.
        wait_for(lambda: "connections_refused client_host=127.0.0.9" in cluster.proc.log(),
                 what="the refusal in the cluster's log")
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: _health_from(cluster, "127.0.0.9"), what="127.0.0.9 served again")


def test_a_20_kib_request_head_in_one_read_is_refused(cluster):
    with unverified_tls(cluster, "http/1.1", timeout=30) as s:
        s.sendall(b"GET /v1/health HTTP/1.1\r\nhost: x\r\nx-pad: " + b"a" * 20 * 1024 + b"\r\n\r\n")
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert b'"status":"ok"' in _raw_api(cluster, "GET", "/v1/health", b"")


def test_every_number_in_a_login_is_checked(make_gateway, cluster):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    gw = make_gateway("dev", login=False)
    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    head = json.dumps({"user": gw.user, "password": PASSWORD, "public_key": key})[:-1]
    # Infinity, an integer no float holds, a float past any cap, the wrong types.
    for ttl in ("1e400", "1" + "0" * 400, "-1e400", "1e300", "true", '"60"', "0.5", "[]"):
        answer = _raw_api(cluster, "POST", "/v1/login", f'{head}, "ttl_seconds": {ttl}}}'.encode())
        assert answer.split(b"\r\n")[0].split()[1] == b"400", (ttl, answer[:300])
        assert b"ttl_seconds must be a number of seconds" in answer, answer
    ok = _raw_api(cluster, "POST", "/v1/login", f'{head}, "ttl_seconds": 60}}'.encode())
    assert ok.split(b"\r\n")[0].split()[1] == b"200", ok[:300]
    assert "Traceback" not in cluster.proc.log()


def test_a_user_name_with_control_characters_is_refused_and_logged_escaped(cluster):
    forged = "eve\n2026-01-01T00:00:00.000Z login_ok user=admin"
    body = json.dumps({"user": forged, "password": PASSWORD, "public_key": "x"}).encode()
    answer = _raw_api(cluster, "POST", "/v1/login", body)
    assert answer.split(b"\r\n")[0].split()[1] == b"400" and b"control characters" in answer, answer[:300]
    # A db user cannot pass an "ro_*" glob with one, nor forge a line in
    # the cluster's log or its audit.jsonl (tests/unit/gateway/test_printable.py).
    assert not any(line.startswith("2026-01-01T00:00:00.000Z") for line in cluster.proc.log().splitlines())


def test_roles_add_deny_flags_each_deny(cluster):
    cluster.admin("roles", "add", "careful", "--allow-resources", "*", "--deny-label", "env=prod",
                  "--deny-label", "env=staging", "--db-users", "app")
    role = next(r for r in json.loads(cluster.admin("roles", "ls", "--format", "json").stdout)
                if r["name"] == "careful")
    assert role["deny"] == "labels=env=prod; labels=env=staging"
    assert "db_users=app" in role["allow"]


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


def test_login_upgrades_a_hash_made_with_older_parameters(make_gateway, cluster, monkeypatch):
    from gateway.cluster import passwords
    from gateway.cluster.store import Store

    gw = make_gateway("dev", login=False)
    monkeypatch.setattr(passwords, "TIME_COST", passwords.TIME_COST - 1)  # older, weaker parameters
    old = passwords.hash_password(PASSWORD)
    monkeypatch.undo()
    with Store.open(cluster.state / "wicket.db") as store:
        store.set_password_hash(gw.user, old)
        assert passwords.needs_rehash(store.get_user(gw.user).password_hash)
    assert gw.login().returncode == 0
    with Store.open(cluster.state / "wicket.db") as store:
        new = store.get_user(gw.user).password_hash
    assert new != old and not passwords.needs_rehash(new)
    assert passwords.verify_password(new, PASSWORD)
    assert gw.login().returncode == 0  # and the new one works


def test_login_upgrades_an_old_hash_only_once_totp_passed(tmp_path, cluster, monkeypatch):
    import base64
    from urllib.parse import parse_qs, urlparse

    from cryptography.hazmat.primitives.hashes import SHA1
    from cryptography.hazmat.primitives.twofactor.totp import TOTP

    from gateway.cluster import passwords
    from gateway.cluster.store import Store
    from tests.integration.harness import Gateway

    r = cluster.add_user("tom", "dev", "--totp")
    b32 = parse_qs(urlparse(next(line for line in r.stdout.splitlines()
                                 if line.startswith("otpauth://totp/"))).query)["secret"][0]
    totp = TOTP(base64.b32decode(b32 + "=" * (-len(b32) % 8), casefold=True), 6, SHA1(), 30)
    monkeypatch.setattr(passwords, "MEMORY_KIB", passwords.MEMORY_KIB // 2)  # older, weaker parameters
    old = passwords.hash_password(PASSWORD)
    monkeypatch.undo()
    with Store.open(cluster.state / "wicket.db") as store:
        store.set_password_hash("tom", old)

    def stored() -> str:
        with Store.open(cluster.state / "wicket.db") as store:
            return store.get_user("tom").password_hash

    gw = Gateway(tmp_path, cluster, "tom")
    now = time.time()
    code, wrong = totp.generate(now).decode(), "000000"
    if wrong == code:
        wrong = "111111"
    assert gw.login().returncode == 4  # the right password, no code: not upgraded
    assert gw.login("--totp-code", wrong).returncode == 4
    assert stored() == old
    assert gw.login("--totp-code", code).returncode == 0
    new = stored()
    assert new != old and not passwords.needs_rehash(new) and passwords.verify_password(new, PASSWORD)
    # And the new hash logs in (the next step's code: this one is spent).
    assert gw.login("--totp-code", totp.generate(now + 30).decode()).returncode == 0
    assert stored() == new


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to connect as another uid")
async def test_another_local_user_is_refused_and_the_log_says_why(make_gateway):
    import subprocess
    import sys

    gw = make_gateway("dev")
    proc, port = gw.proxy_tcp("echo")
    nobody = 65534
    # The reset may meet the client at any step after the connect.
    script = (f"import os, socket\nos.setgid({nobody}); os.setuid({nobody})\n"
              f"s = socket.socket(); s.connect(('127.0.0.1', {port}))\n"
              f"try:\n    s.sendall(b'hello'); s.shutdown(socket.SHUT_WR); print(repr(s.recv(100)))\n"
              f"except (ConnectionResetError, BrokenPipeError, OSError):\n    print('reset')\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd="/")
    assert r.stdout.strip() == "reset", (r.stdout, r.stderr)
    wait_for(lambda: "local_user_refused" in proc.log() and f"uid {nobody}" in proc.log(),
             what="the refusal in the proxy's log")
    assert await roundtrip(port, b"mine") == b"mine"  # the owner is served as before

"""Revocation end to end: a lock, a new password, a removal or `certs
revoke` ends the certificates issued before it, on every dial (the relay
engine's fast path included), renewal and API call, and cuts their live
sessions. A real cluster, the real CLIs, a real echo upstream."""

from __future__ import annotations

import time

import trio

from tests.integration.harness import PASSWORD, Gateway, wait_for
from tests.integration.tcpenv import connect, refused, roundtrip, until_reset

NEW_PASSWORD = "a quite different passphrase"


def _serial(cluster, gw) -> str:
    return cluster.wait_audit(user=gw.user, event="login.ok")[-1]["serial"]


async def _cut_within_2s(s) -> None:
    start = time.monotonic()
    with trio.fail_after(2.0):  # as a lock: live sessions end within 2 s
        await until_reset(s)
    assert time.monotonic() - start < 2.0


async def _echoes(s) -> None:
    await s.send_all(b"ping")
    assert await s.receive_some(100) == b"ping"


async def test_unlock_does_not_revive_a_certificate_from_before_the_lock(make_gateway, cluster):
    gw = make_gateway("dev")
    proc, port = gw.proxy_tcp("echo")
    with trio.fail_after(20):
        assert await roundtrip(port, b"before") == b"before"
    cluster.admin("users", "lock", gw.user, "--reason", "laptop stolen")
    unlocked = cluster.admin("users", "unlock", gw.user)
    assert "wicket login" in unlocked.stdout
    # The stolen laptop's certificate: no dial (the multiplexed connection
    # opened before the lock takes the engine's fast path), no renewal, no
    # API call.
    with trio.fail_after(20):
        assert await refused(port)
    wait_for(lambda: "code=cert_expired" in proc.log(), what="revocation refusal in gateway log")
    assert "revoked (user locked: laptop stolen)" in proc.log()
    renew = gw.run("renew")
    assert renew.returncode == 3 and "revoked" in renew.stderr and "wicket login" in renew.stderr, renew.stderr
    assert gw.run("ls").returncode == 3
    denied = cluster.wait_audit(lambda evs: any(e["code"] == "cert_expired" for e in evs), user=gw.user,
                                event="dial.denied")
    # On record under the user the refused certificate names, as a claim.
    assert "revoked" in denied[-1]["reason"] and denied[-1]["user_claimed"] is True
    # A new login works again, through the same running gateway.
    assert gw.login().returncode == 0
    with trio.fail_after(20):
        assert await roundtrip(port, b"after") == b"after"


async def test_passwd_revokes_and_cuts_live_sessions(make_gateway, cluster):
    gw = make_gateway("dev")
    _, port = gw.proxy_tcp("echo")
    async with await connect(port) as s:
        await _echoes(s)
        r = cluster.admin("users", "passwd", gw.user, "--password-stdin", input=NEW_PASSWORD + "\n")
        assert "revoked" in r.stdout
        await _cut_within_2s(s)
    ended = cluster.wait_audit(user=gw.user, event="session.end")
    assert ended[-1]["reason"] == "cert_revoked"
    with trio.fail_after(20):
        assert await refused(port)
    assert gw.login().returncode == 4  # the old password is gone
    assert gw.login(password=NEW_PASSWORD).returncode == 0
    with trio.fail_after(20):
        assert await roundtrip(port, b"new") == b"new"
    assert cluster.audit(user=gw.user, event="user.passwd")[-1]["certificates"] == "revoked"


async def test_rm_cuts_live_sessions_and_a_recreated_user_does_not_inherit(make_gateway, cluster):
    gw = make_gateway("dev")
    proc, port = gw.proxy_tcp("echo")
    async with await connect(port) as s:
        await _echoes(s)
        cluster.admin("users", "rm", gw.user)
        await _cut_within_2s(s)
    ended = cluster.wait_audit(user=gw.user, event="session.end")
    assert ended[-1]["reason"] == "user_removed"
    assert cluster.audit(user=gw.user, event="user.delete")
    cluster.add_user(gw.user, "dev")  # the same name, another person
    with trio.fail_after(20):
        assert await refused(port)
    wait_for(lambda: "revoked (user removed)" in proc.log(), what="revocation in gateway log")
    assert cluster.admin("users", "rm", gw.user).returncode == 0
    again = cluster.admin("users", "rm", gw.user, check=False)
    assert again.returncode == 1 and "no user" in again.stderr


async def test_certs_revoke_ends_one_certificate_only(make_gateway, cluster, tmp_path):
    laptop = make_gateway("dev")
    desktop = Gateway(tmp_path, cluster, laptop.user)  # the same user, another profile
    desktop.home = tmp_path / "home-desktop"
    assert desktop.login().returncode == 0
    _, laptop_port = laptop.proxy_tcp("echo")
    _, desktop_port = desktop.proxy_tcp("echo")
    logins = cluster.wait_audit(lambda evs: len(evs) >= 2, user=laptop.user, event="login.ok")
    serial = logins[0]["serial"]
    try:
        async with await connect(laptop_port) as s:
            await _echoes(s)
            r = cluster.admin("certs", "revoke", serial.upper(), "--reason", "left on a train")
            assert serial in r.stdout and laptop.user in r.stdout
            await _cut_within_2s(s)
        with trio.fail_after(20):
            assert await refused(laptop_port)
            assert await roundtrip(desktop_port, b"still") == b"still"
    finally:
        desktop.stop()
    assert laptop.run("renew").returncode == 3
    event = cluster.audit(user=laptop.user, event="cert.revoke")[-1]
    assert event["serial"] == serial and event["reason"] == "left on a train"
    assert cluster.wait_audit(user=laptop.user, event="session.end")[0]["reason"] == "cert_revoked"
    again = cluster.admin("certs", "revoke", serial, check=False)
    assert again.returncode == 1 and "already revoked" in again.stderr
    unknown = cluster.admin("certs", "revoke", "abc123", check=False)
    assert unknown.returncode == 1 and "no certificate with serial abc123" in unknown.stderr
    bad = cluster.admin("certs", "revoke", "not-hex", check=False)
    assert bad.returncode == 2 and "hex digits" in bad.stderr


def test_passwd_refuses_a_weak_password_and_an_unknown_user(make_gateway, cluster):
    gw = make_gateway("dev", login=False)
    weak = cluster.admin("users", "passwd", gw.user, "--password-stdin", input="short\n", check=False)
    assert weak.returncode == 1
    ghost = cluster.admin("users", "passwd", "ghost", "--password-stdin", input=PASSWORD + "\n", check=False)
    assert ghost.returncode == 1 and "no user ghost" in ghost.stderr


def test_handshakes_with_a_certificate_from_another_ca_are_audited_per_source_and_minute(echo, tmp_path):
    import socket
    import ssl

    from tests.integration.harness import Cluster
    from tests.unit import tlsutil

    cluster = Cluster(tmp_path, echo)  # its own: stopping it writes what it counted
    foreign = tlsutil.make_pki(tmp_path / "foreign", client_name="mallory")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.load_cert_chain(foreign.client_chain, foreign.client_key)
    ctx.set_alpn_protocols(["http/1.1"])
    host, port = cluster.address.rsplit(":", 1)
    for _ in range(3):
        with socket.create_connection((host, int(port)), timeout=20) as raw, ctx.wrap_socket(raw) as s:
            try:  # TLS 1.3: the client's certificate is judged after its handshake ends
                s.sendall(b"GET /v1/health HTTP/1.1\r\nhost: x\r\n\r\n")
                assert s.recv(4096) == b""
            except (ssl.SSLError, ConnectionResetError):
                pass
    wait_for(lambda: cluster.proc.log().count("handshake_failed") >= 3, what="three refused handshakes")
    assert cluster.stop() == 0
    events = cluster.audit(event="handshake.refused")
    # One event for the minute (two if the three straddled a minute's end).
    assert 1 <= len(events) <= 2 and sum(e["count"] for e in events) == 3, events
    assert all(e["client_host"] == "127.0.0.1" and e["reason"] == "unknown_ca" and e["user"] is None
               for e in events)

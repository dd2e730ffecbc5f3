"""What the cluster and the gateway refuse, end to end, and how the refusal
reads: roles that deny, unknown resources, CA pins, peers without a
certificate or with TLS 1.2, hostile and oversized requests, other local users."""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
import struct

import pytest
import trio

from tests.integration.harness import PASSWORD, wait_for
from tests.integration.tcpenv import refused, roundtrip, unverified_tls


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

"""The audit cannot be flooded and does not grow for ever: refused logins
are counted per user, address and minute; `[audit] keep` prunes the store;
`audit export` writes it out. A cluster of its own (stopping it writes what
it counted)."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
import socket
import ssl
import stat
import time

import pytest

from gateway.cluster.store import Store
from tests.integration.harness import PASSWORD, Cluster, wait_for
from tests.integration.tcpenv import _login_from


@pytest.fixture
def own_cluster(tmp_path, echo):
    c = Cluster(tmp_path, echo, extra_config='\n[audit]\nkeep = "1h"\n')
    yield c
    if c.proc.popen.poll() is None:
        c.stop()


def test_repeated_login_refusals_are_one_event_per_user_address_and_minute(own_cluster):
    cluster = own_cluster
    cluster.add_user("pat", "dev")
    for _ in range(5):
        assert _login_from(cluster, "127.0.0.6", "pat", "a wrong guess!!")[0] == 401
    # A client that keeps on trying, well within the 10 s the pair waits (a
    # new connection for each try took longer than that on a loaded machine).
    assert _logins_kept_alive(cluster, "127.0.0.6", ["pat"] * 30, deadline=8.0) == [429] * 30
    # The first refusal is on record at once, in full; the rest are counted.
    first = cluster.audit(user="pat", event="login.rate_limited")
    assert 1 <= len(first) <= 2 and "repeats" not in first[0] and first[0]["scope"] == "user_and_address"
    assert cluster.stop() == 0
    events = cluster.audit(user="pat", event="login.rate_limited")
    # 30 refusals: one event each minute they spanned, plus a count of the rest.
    assert len(events) <= 4 and sum(e.get("repeats", 1) for e in events) == 30, events
    assert all(e["client_host"] == "127.0.0.6" for e in events)


def test_a_flood_naming_a_new_user_each_time_is_a_bounded_number_of_rows(own_cluster):
    """Past its address's limit, a client names a new user on every try:
    each would be the first of its user and address, and audited in full."""
    from gateway.cluster.core import LOGIN_REFUSAL_USERS

    cluster = own_cluster
    for i in range(20):  # the address's limit: four times max_failures, across users
        assert _login_from(cluster, "127.0.0.7", f"ghost{i}", "a wrong guess!!")[0] == 401
    # The address waits 10 s from its last failure: a keep-alive connection
    # sends the flood well within that.
    flood = 300
    statuses = _logins_kept_alive(cluster, "127.0.0.7", [f"flood{i}" for i in range(flood)], deadline=8.0)
    assert statuses == [429] * flood
    assert cluster.stop() == 0
    events = [e for e in cluster.audit(event="login.rate_limited") if e["client_host"] == "127.0.0.7"]
    # Per minute the flood spans: LOGIN_REFUSAL_USERS users by name and one
    # row for the others, each at once and then with a count of its repeats.
    minutes = 1 + int(max(e["time"] for e in events) // 60 - min(e["time"] for e in events) // 60)
    assert len(events) <= 2 * (LOGIN_REFUSAL_USERS + 1) * minutes and minutes <= 3, events
    assert sum(e.get("repeats", 1) for e in events) == flood, events
    assert any(e.get("other_users") is True and e["user"] is None for e in events)


def _logins_kept_alive(cluster, source: str, users: list[str], *, deadline: float) -> list[int]:
    """Log in as each of ``users`` in turn, one request after another on a
    keep-alive API connection from ``source`` (a new one when the cluster
    ends one: it caps the requests per connection); the statuses. Fails
    past ``deadline`` seconds."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    host, port = cluster.address.rsplit(":", 1)
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    end = time.monotonic() + deadline
    statuses: list[int] = []
    while len(statuses) < len(users):
        assert time.monotonic() < end, f"{len(statuses)} answers in {deadline}s"
        with socket.create_connection((host, int(port)), timeout=deadline, source_address=(source, 0)) as raw, \
                ctx.wrap_socket(raw) as s:
            buffered = b""
            for user in users[len(statuses):]:
                payload = json.dumps({"user": user, "password": PASSWORD, "public_key": key}).encode()
                s.sendall(b"POST /v1/login HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                          b"content-length: %d\r\n\r\n" % len(payload) + payload)
                status = _answer(s, buffered, end)
                if status is None:
                    break  # the cluster ended the connection: ask again on a new one
                statuses.append(status[0])
                buffered = status[1]
    return statuses


def _answer(s: ssl.SSLSocket, buffered: bytes, end: float) -> tuple[int, bytes] | None:
    """The status of the next answer on ``s`` and the bytes after it; None
    if the peer closes first."""
    while True:
        assert time.monotonic() < end, "no answer in time"
        head, sep, rest = buffered.partition(b"\r\n\r\n")
        length = re.search(rb"content-length: (\d+)", head, re.I) if sep else None
        if length and len(rest) >= int(length.group(1)):
            return int(head.split()[1]), rest[int(length.group(1)):]
        try:
            chunk = s.recv(65536)
        except (ConnectionResetError, ssl.SSLEOFError):
            chunk = b""
        if not chunk:
            return None
        buffered += chunk


def test_keep_prunes_the_store_and_export_archives_it(own_cluster, tmp_path):
    cluster = own_cluster
    assert cluster.stop() == 0
    with Store.open(cluster.state / "wicket.db") as store:
        store.append_audit("login.ok", "old", {"note": "two hours ago"}, now=time.time() - 7200)
        store.append_audit("login.ok", "recent", {"note": "a minute ago"}, now=time.time() - 60)
    archive = tmp_path / "archive.jsonl"
    r = cluster.admin("audit", "export", "--output", str(archive))
    assert "audit events exported" in r.stderr
    exported = [json.loads(line) for line in archive.read_text().splitlines()]
    assert [e["user"] for e in exported if e["event"] == "login.ok"] == ["old", "recent"]
    assert stat.S_IMODE(archive.stat().st_mode) == 0o600
    again = cluster.admin("audit", "export", "--output", str(archive), check=False)
    assert again.returncode == 1 and "exists" in again.stderr
    cluster.start()  # prunes at start
    wait_for(lambda: not cluster.audit(user="old"), what="the old event to be pruned")
    assert cluster.audit(user="recent")
    assert "retention_pruned audit_events=1" in cluster.proc.log()


def test_export_round_trips_in_both_formats_within_its_window(own_cluster):
    cluster = own_cluster
    assert cluster.stop() == 0
    now = time.time()
    awkward = {"sql": 'SELECT \'a,b\'\n, "q" -- é ✓', "n": 3, "nested": {"list": [1, None, True]}}
    with Store.open(cluster.state / "wicket.db") as store:
        store.append_audit_many([("pg.query", f"u{i}", {**awkward, "i": i}, now - 3600 + i) for i in range(2500)])
        store.append_audit("login.ok", "later", {}, now=now - 60)
        stored = [e for e in store.query_audit(limit=100_000) if now - 3600 + 99.5 <= e.time < now - 120]
    assert len(stored) == 2400
    # --since between two events: an ISO time is only to the microsecond.
    window = ("--since", dt.datetime.fromtimestamp(now - 3600 + 99.5, dt.timezone.utc).isoformat(),
              "--until", "2m")

    def as_stored(records):
        return [(int(r["id"]), float(r["time"]), r["event"], r["user"] or None, r["fields"]) for r in records]

    expected = [(e.id, e.time, e.event, e.user, dict(e.fields)) for e in stored]
    jsonl = cluster.admin("audit", "export", *window).stdout
    assert as_stored(json.loads(line) for line in jsonl.splitlines()) == expected
    rows = list(csv.DictReader(io.StringIO(cluster.admin("audit", "export", *window, "--format", "csv").stdout)))
    assert as_stored({**r, "fields": json.loads(r["fields"])} for r in rows) == expected
    assert rows[0]["utc"].startswith(dt.datetime.fromtimestamp(stored[0].time, dt.timezone.utc).strftime("%Y-%m-%dT%H"))
    bad = cluster.admin("audit", "export", "--since", "1h", "--until", "2h", check=False)
    assert bad.returncode == 2 and "--until" in bad.stderr

"""The cluster's TLS client contexts for database upstreams: what each holds
(the server check, a client certificate for the db user) and when one is
reused or built again."""

from __future__ import annotations

import os
import ssl
import types

import pytest

from gateway.cluster import upstream_auth
from gateway.cluster.resource_specs import DatabaseSpec
from gateway.identity import pki as wpki
from tests.unit import tlsutil


@pytest.fixture
def cluster():
    """What the contexts need of a cluster: its database client CA."""
    return types.SimpleNamespace(db_client_ca=wpki.CertificateAuthority.create("db client CA", now=wpki.utcnow()))


def handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext) -> dict:
    """A TLS handshake between the two contexts in memory; the client
    certificate as the server saw it."""
    pipes = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(pipes[0], pipes[1], server_hostname=tlsutil.SERVER_NAME)
    server = server_ctx.wrap_bio(pipes[2], pipes[3], server_side=True)
    done = set()
    for _ in range(10):
        for name, obj in (("client", client), ("server", server)):
            try:
                obj.do_handshake()
                done.add(name)
            except ssl.SSLWantReadError:
                pass
        pipes[2].write(pipes[1].read())
        pipes[0].write(pipes[3].read())
        if done == {"client", "server"}:
            return server.getpeercert()
    raise AssertionError("the handshake did not finish")


def db_server_context(pki, cluster) -> ssl.SSLContext:
    """A PostgreSQL server's side: its certificate, and client certificates
    checked against the cluster's database client CA."""
    ctx = tlsutil.server_context(pki, require_client_cert=False, minimum_version=ssl.TLSVersion.TLSv1_2)
    ctx.load_verify_locations(cadata=wpki.cert_to_pem(cluster.db_client_ca.cert).decode())
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def common_name(peercert: dict) -> str:
    return dict(item[0] for item in peercert["subject"])["commonName"]


@pytest.fixture
def clocks(monkeypatch):
    """The monotonic and the wall clock as the contexts see them: [mono, wall]."""
    now = [1000.0, 1.8e9]
    monkeypatch.setattr(upstream_auth.time, "monotonic", lambda: now[0])
    monkeypatch.setattr(upstream_auth.time, "time", lambda: now[1])
    return now


def test_a_context_serves_its_db_user_until_half_the_certificate_is_used(pki, cluster, clocks):
    contexts = upstream_auth.ClientContexts()
    spec = DatabaseSpec(tls="verify-full", ca_file=pki.ca_file, auth="cert")
    app = contexts.get(cluster.db_client_ca, spec, "app")
    assert common_name(handshake(app, db_server_context(pki, cluster))) == "app"
    assert contexts.get(cluster.db_client_ca, spec, "app") is app
    other = contexts.get(cluster.db_client_ca, spec, "reporting")
    assert other is not app and common_name(handshake(other, db_server_context(pki, cluster))) == "reporting"
    reuse = upstream_auth.CONTEXT_REUSE.total_seconds()
    clocks[0] += reuse - 1
    clocks[1] += reuse - 1
    assert contexts.get(cluster.db_client_ca, spec, "app") is app
    clocks[0] += 1
    clocks[1] += 1
    renewed = contexts.get(cluster.db_client_ca, spec, "app")
    assert renewed is not app and common_name(handshake(renewed, db_server_context(pki, cluster))) == "app"


@pytest.mark.parametrize("step", ["suspended", "clock_set_back"])
def test_either_clock_ends_a_contexts_reuse(pki, cluster, clocks, step):
    # A machine suspended for 10 minutes: the monotonic clock stood still,
    # but the certificate (wall-clock validity) expired meanwhile. A wall
    # clock set back: the certificate's age is still counted.
    contexts = upstream_auth.ClientContexts()
    spec = DatabaseSpec(tls="require", auth="cert")
    app = contexts.get(cluster.db_client_ca, spec, "app")
    if step == "suspended":
        clocks[1] += 600
    else:
        clocks[1] -= 3600
        clocks[0] += upstream_auth.CONTEXT_REUSE.total_seconds()
    assert contexts.get(cluster.db_client_ca, spec, "app") is not app


def test_a_replaced_ca_file_is_read_again(pki, cluster, tmp_path):
    contexts = upstream_auth.ClientContexts()
    ca_file = tmp_path / "server-ca.pem"
    other_ca = wpki.CertificateAuthority.create("some other CA", now=wpki.utcnow())
    ca_file.write_bytes(wpki.cert_to_pem(other_ca.cert))
    spec = DatabaseSpec(tls="verify-full", ca_file=ca_file, auth="password")
    distrusting = contexts.get(cluster.db_client_ca, spec, "app")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(distrusting, db_server_context(pki, cluster))
    fixed = tmp_path / "server-ca.pem.new"  # the administrator fixes the file, as tools do: a new
    fixed.write_bytes(pki.ca_pem)  # file renamed over the old one
    os.replace(fixed, ca_file)
    trusting = contexts.get(cluster.db_client_ca, spec, "app")
    assert trusting is not distrusting
    handshake(trusting, tlsutil.server_context(pki, require_client_cert=False,
                                               minimum_version=ssl.TLSVersion.TLSv1_2))
    os.remove(ca_file)  # a missing file is reported, not served from the cache
    with pytest.raises(FileNotFoundError):
        contexts.get(cluster.db_client_ca, spec, "app")


def test_contexts_without_a_client_certificate_are_shared_by_db_users(pki, cluster):
    contexts = upstream_auth.ClientContexts()
    spec = DatabaseSpec(tls="require", auth="password")
    assert contexts.get(cluster.db_client_ca, spec, "app") is contexts.get(cluster.db_client_ca, spec, "reporting")
    assert contexts.get(cluster.db_client_ca, DatabaseSpec(tls="verify-full", ca_file=pki.ca_file, auth="password"),
                        "app") is not contexts.get(cluster.db_client_ca, spec, "app")


def test_the_cache_is_bounded(pki, cluster):
    contexts = upstream_auth.ClientContexts(limit=3)
    spec = DatabaseSpec(tls="require", auth="cert")
    for i in range(10):
        contexts.get(cluster.db_client_ca, spec, f"user{i}")
        assert len(contexts._entries) <= 3
    assert contexts.get(cluster.db_client_ca, spec, "user9") is contexts.get(cluster.db_client_ca, spec, "user9")


def test_a_db_users_key_never_touches_the_disk(pki, cluster, tmp_path, monkeypatch):
    # The key and certificate reach OpenSSL through anonymous memory files,
    # closed once loaded: no file is made, and no descriptor stays open.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    before = set(os.listdir("/proc/self/fd"))
    ctx = upstream_auth.build_context(cluster.db_client_ca, DatabaseSpec(tls="require", auth="cert"), "app")
    assert set(os.listdir("/proc/self/fd")) <= before
    assert list(tmp_path.iterdir()) == []
    assert common_name(handshake(ctx, db_server_context(pki, cluster))) == "app"


def test_database_spec_resolves_secret_references(tmp_path, monkeypatch):
    secret = tmp_path / "pass"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("APP_DB_PASSWORD", "from-env")
    spec = DatabaseSpec.of({"tls": "require", "auth": "password",
                            "passwords": {"app": "env:APP_DB_PASSWORD", "*": f"file:{secret}"}})
    assert spec.password_for("app") == "from-env"
    assert spec.password_for("other") == "s3cret"
    monkeypatch.delenv("APP_DB_PASSWORD")
    with pytest.raises(ValueError, match="APP_DB_PASSWORD") as info:
        spec.password_for("app")
    assert "s3cret" not in str(info.value)
    assert DatabaseSpec.of({"server_name": "db.internal"}).server_hostname("10.0.0.1:5432") == "db.internal"
    assert DatabaseSpec.of({}).server_hostname("[::1]:5432") == "::1"

"""``wicket proxy db --local-tls-client-cert``: only a client holding the
certificate the gateway issued (its key 0600 in the owner's home) gets in;
any other is told why, and how to connect, in PostgreSQL's own terms."""

from __future__ import annotations

import os
import re
import stat

import pytest

from tests.integration import pgenv
from tests.integration.harness import wait_for

pgenv.need_postgres()


@pytest.fixture(scope="module")
def proxy(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("clientcert")
    with pgenv.running(tmp) as (cluster, _server):
        gw = pgenv.user(tmp, cluster, "certuser")
        proc, port = gw.proxy("db", "pg", "--local-tls-client-cert")
        line = wait_for(lambda: re.search(r'Try: psql "([^"]+)"', proc.log()), what="the try line")
        yield gw, port, dict(part.split("=", 1) for part in line.group(1).split())
        gw.stop()


def conninfo(port: int, **settings: str) -> str:
    parts = {"host": "localhost", "port": str(port), "user": "app", "dbname": "app", **settings}
    return " ".join(f"{k}={v}" for k, v in parts.items())


def test_the_issued_certificate_gets_in(proxy):
    gw, port, settings = proxy
    assert settings["sslmode"] == "verify-full"
    assert stat.S_IMODE(os.stat(settings["sslkey"]).st_mode) == 0o600
    assert os.path.dirname(settings["sslkey"]) == str(gw.home)
    tls = {k: settings[k] for k in ("sslmode", "sslrootcert", "sslcert", "sslkey")}
    r = pgenv.psql(conninfo(port, **tls), "-c", "select current_user")
    assert r.returncode == 0 and r.stdout.strip() == "app", r.stderr


@pytest.mark.parametrize("settings", [
    {"sslmode": "disable"},
    {"sslmode": "require"},
], ids=["no-tls", "tls-without-certificate"])
def test_a_client_without_it_is_told_why_and_how(proxy, settings):
    _, port, issued = proxy
    r = pgenv.psql(conninfo(port, **settings), "-c", "select 1")
    assert r.returncode != 0
    assert "requires a TLS client certificate" in r.stderr and f"sslcert={issued['sslcert']}" in r.stderr, r.stderr

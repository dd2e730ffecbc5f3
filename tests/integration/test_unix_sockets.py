"""``wicket proxy --unix-socket``: a listener only the owner can reach (mode
0600 by default), PostgreSQL's socket naming in a directory so that
``psql host=DIR`` works, a plain path for tcp; other local users get the
protocol's own refusal when the mode lets them in."""

from __future__ import annotations

import os
import socket
import stat

import pytest

from tests.integration import pgenv
from tests.integration.harness import PY, Gateway, Proc, wait_for

pgenv.need_postgres()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("unix")
    with pgenv.running(tmp) as (cluster, _server):
        gw = pgenv.user(tmp, cluster, "sockuser", "pg,dev")
        yield gw
        gw.stop()


@pytest.fixture
def public_dir(tmp_path_factory):
    """A directory every local user can reach (pytest's are 0700)."""
    d = tmp_path_factory.mktemp("sockets")
    for p in [d, *d.parents]:
        if p == p.parent or str(p) in ("/tmp",):
            break
        os.chmod(p, os.stat(p).st_mode | 0o755)
    return d


def unix_proxy(gw: Gateway, kind: str, resource: str, *extra: str):
    log = gw.tmp / f"proxy-{gw.user}-{resource}-unix-{len(gw.proxies)}.log"
    p = Proc([PY, "-m", "gateway.cli.wicket", "proxy", kind, resource, *extra], log, gw.env())
    gw.proxies.append(p)
    return p, p.read_line(r"listening on unix:(\S+)").group(1)


def test_psql_finds_the_socket_in_a_directory_and_others_cannot_reach_it(env, public_dir):
    proc, path = unix_proxy(env, "db", "pg", "--unix-socket", str(public_dir), "--port", "6543")
    assert path == str(public_dir / ".s.PGSQL.6543")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    r = pgenv.psql(f"host={public_dir} port=6543 user=app dbname=app", "-c", "select current_user")
    assert r.returncode == 0 and r.stdout.strip() == "app", r.stderr
    # Another local user: the kernel refuses the socket (mode 0600).
    r = pgenv.psql(f"host={public_dir} port=6543 user=app dbname=app", "-c", "select 1",
                   preexec_fn=pgenv.as_nobody)
    assert r.returncode != 0 and "Permission denied" in r.stderr, r.stderr
    proc.stop()
    assert not os.path.exists(path)  # removed at the end


def test_a_wider_mode_still_tells_other_users_no_in_their_protocol(env, public_dir):
    _, path = unix_proxy(env, "db", "pg", "--unix-socket", str(public_dir), "--unix-socket-mode", "0666")
    assert path.endswith(".s.PGSQL.5432") and stat.S_IMODE(os.stat(path).st_mode) == 0o666
    r = pgenv.psql(f"host={public_dir} user=app dbname=app", "-c", "select 1", preexec_fn=pgenv.as_nobody)
    assert r.returncode != 0 and f"uid {pgenv.NOBODY}" in r.stderr and "--allow-uid" in r.stderr, r.stderr
    r = pgenv.psql(f"host={public_dir} user=app dbname=app", "-c", "select 1")
    assert r.stdout.strip() == "1", r.stderr


def test_the_tcp_route_listens_on_a_plain_path(env, tmp_path):
    path = tmp_path / "echo.sock"
    proc, bound = unix_proxy(env, "tcp", "echo", "--unix-socket", str(path))
    assert bound == str(path) and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        s.sendall(b"over a unix socket")
        got = b""
        while len(got) < 18:
            got += s.recv(64) or b"!"
        assert got == b"over a unix socket"
    # A socket left by a gateway that died is replaced; one in use is not.
    proc.popen.kill()
    proc.popen.wait()
    _, again = unix_proxy(env, "tcp", "echo", "--unix-socket", str(path))
    assert again == str(path)
    r = env.run("proxy", "tcp", "echo", "--unix-socket", str(path))
    assert r.returncode != 0 and "in use" in r.stderr, r.stderr
    wait_for(lambda: os.path.exists(path), what="the live socket to stay")


def test_a_directory_needs_a_kind_that_names_its_socket(env, tmp_path):
    r = env.run("proxy", "tcp", "echo", "--unix-socket", str(tmp_path))
    assert r.returncode == 2 and "socket's own path" in r.stderr, r.stderr

"""The gateway as an SSH server on localhost (``wicket proxy ssh NODE``): the
real ssh, scp and sftp against it, a real sshd as the node that trusts only
the cluster's SSH user CA, and the cluster between them."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.harness import wait_for
from tests.integration.ssh_fixtures import node  # noqa: F401 (a fixture)
from tests.integration.ssh_fixtures import (
    agent_listing, agent_with_a_key, check_file_transfers, check_forwarding, ended, impostor, long_session,
    node_with_host_cert,
)
from tests.servers import sshd as sshd_server
from tests.servers.sshd import TEST_USER

pytestmark = pytest.mark.skipif(sshd_server.available() is not None, reason=str(sshd_server.available()))


class LocalSsh:
    """A user's gateway serving SSH on a local port, and OpenSSH's tools
    with a key of the user's own and the gateway's known_hosts line."""

    def __init__(self, gw, tmp: Path, node_name: str = "web-1", *extra: str, wrapper: tuple[str, ...] = ()) -> None:
        self.gw = gw
        self.tmp = tmp
        self.key = tmp / f"id-{gw.user}"
        if not self.key.exists():
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.key)], check=True)
        self.known_hosts = tmp / f"known_hosts-{gw.user}"
        self.proc, self.port = gw.proxy("ssh", node_name, "--authorized-keys", f"{self.key}.pub",
                                        "--write-known-hosts", str(self.known_hosts), *extra, wrapper=wrapper)

    def options(self, tool: str = "ssh") -> list[str]:
        port = ["-P" if tool in ("scp", "sftp") else "-p", str(self.port)]
        return [*port, "-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={self.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-F", "/dev/null"]

    def run(self, tool: str, *args: str, timeout: float = 120, input: bytes | None = None
            ) -> subprocess.CompletedProcess:
        return subprocess.run([tool, *self.options(tool), *args], input=input, capture_output=True,
                              env=self.gw.env(), timeout=timeout)

    def ssh(self, user: str, *command: str, **kw) -> subprocess.CompletedProcess:
        return self.run("ssh", f"{user}@127.0.0.1", *command, **kw)


@pytest.fixture
def local_ssh(make_gateway, tmp_path, node):
    def make(roles: str = "ssh-all", *extra: str, **kw) -> LocalSsh:
        return LocalSsh(make_gateway(roles), tmp_path, "web-1", *extra, **kw)

    return make


def test_exec_with_exit_codes_stdin_and_stderr(local_ssh, cluster, node):
    s = local_ssh()
    r = s.ssh("root", "id -un; echo oops >&2; exit 7")
    assert r.returncode == 7, r.stderr
    assert r.stdout == b"root\n"
    assert b"oops\n" in r.stderr
    r = s.ssh(TEST_USER, "id -un")
    assert (r.returncode, r.stdout.strip()) == (0, TEST_USER.encode()), r.stderr
    payload = os.urandom(5 << 20)
    r = s.ssh("root", "sha256sum", input=payload)
    assert r.returncode == 0, r.stderr
    import hashlib

    assert r.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()
    starts = cluster.wait_audit(lambda evs: len(evs) >= 3, user=s.gw.user, event="session.start")
    assert {e["mode"] for e in starts} == {"terminated"}
    assert {e["login"] for e in starts} == {"root", TEST_USER}
    certs = cluster.wait_audit(lambda evs: len(evs) >= 3, user=s.gw.user, event="ssh.cert")
    assert all(len(e["principals"]) == 1 for e in certs)  # one login per certificate
    assert f"ID wicket:test:{s.gw.user}:" in node.log()
    # What the gateway saw inside the sessions, on record as its report.
    execs = cluster.wait_audit(lambda evs: len(evs) >= 3, user=s.gw.user, event="ssh.exec")
    assert {e["command"] for e in execs} == {"id -un; echo oops >&2; exit 7", "id -un", "sha256sum"}
    assert all(e["reported_by"] == "gateway" and e["resource"] == "web-1" for e in execs)
    exits = cluster.wait_audit(lambda evs: len(evs) >= 3, user=s.gw.user, event="ssh.exit")
    assert sorted(e["status"] for e in exits) == [0, 0, 7]
    # One line per session's end in the gateway's log, with the bytes each way.
    ends = wait_for(lambda: (lines := re.findall(r"ssh_session_end node=\S+ .* sent=(\d+) received=\d+",
                                                 s.proc.log())) and len(lines) >= 3 and lines, what="three ends logged")
    assert max(int(sent) for sent in ends) > 5 << 20  # the 5 MiB sent to sha256sum


def test_a_signal_ends_the_remote_command_and_comes_back(local_ssh):
    s = local_ssh()
    r = s.ssh("root", "kill -TERM $$")
    assert r.returncode == 255 or r.returncode == 128 + 15, (r.returncode, r.stderr)


@pytest.mark.parametrize("mib", [24, pytest.param(200, marks=pytest.mark.heavy)])
def test_scp_and_sftp_both_ways(local_ssh, tmp_path, cluster, mib):
    s = local_ssh()
    remote = f"/tmp/wicket-term-{s.gw.user}.bin"
    src = check_file_transfers(s.run, "root@127.0.0.1", tmp_path, mib, remote)
    # scp (the SFTP protocol since OpenSSH 9) and sftp file operations, with their bytes.
    files = cluster.wait_audit(lambda evs: len([e for e in evs if e["op"] == "remove"]) >= 2,
                               user=s.gw.user, event="ssh.sftp")
    ops = {(e["op"], e["path"], e.get("mode"), e.get("bytes_written", 0) + e.get("bytes_read", 0)) for e in files}
    size = src.stat().st_size
    assert ("file", remote, "write", size) in ops  # scp up
    assert ("file", remote + ".sftp", "write", size) in ops  # sftp put
    assert ("file", remote + ".sftp", "read", size) in ops  # sftp get
    assert ("remove", remote, None, 0) in ops
    legacy = cluster.wait_audit(user=s.gw.user, event="ssh.exec")
    assert any(e["command"] == f"scp -f {remote}" for e in legacy)  # scp -O: an exec


def test_one_port_reaches_several_nodes(local_ssh, cluster, node):
    cluster.admin("resources", "add", "web-3", "--kind", "ssh", "--address", node.address,
                  "--host-key", node.host_key, "--label", "env=ssh")
    try:
        s = local_ssh()
        assert s.ssh("root%web-3", "echo three").stdout == b"three\n"
        assert s.ssh("root", "echo one").stdout == b"one\n"
        starts = cluster.wait_audit(lambda evs: len(evs) >= 2, user=s.gw.user, event="session.start")
        assert {e["resource"] for e in starts} == {"web-1", "web-3"}
    finally:
        cluster.admin("resources", "rm", "web-3", check=False)


@pytest.mark.parametrize("user, expected", [
    ("root%nope", "access to 'nope' denied: no such resource, or none of your roles reaches it; `wicket ls`"),
    ("root%down-1", "down-1 (127.0.0.1:1) is not reachable from the cluster"),
    ("nosuchuser", "did not let nosuchuser in"),
])
def test_errors_are_printed_by_ssh_before_it_fails(local_ssh, user, expected):
    s = local_ssh("ssh-all" if user != "nosuchuser" else "ssh-any-login")
    r = s.ssh(user, "true")
    assert r.returncode == 255
    assert expected in r.stderr.decode(), r.stderr.decode()


@pytest.fixture(scope="module", autouse=True)
def any_login_role(cluster, node):
    cluster.admin("roles", "add", "ssh-any-login", "--allow-label", "env=ssh", "--logins", "*")


def test_a_login_the_roles_do_not_allow_is_a_banner(local_ssh):
    s = local_ssh("ssh-user")
    r = s.ssh("root", "true")
    assert r.returncode == 255
    err = r.stderr.decode()
    assert "wicket: access to 'web-1' denied: none of your roles allows login=root on it" in err, err
    assert s.ssh(TEST_USER, "true").returncode == 0


def test_a_key_the_user_does_not_trust_gets_no_session(local_ssh, tmp_path):
    s = local_ssh()
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    opts = s.options()
    opts[opts.index(str(s.key))] = str(other)
    r = subprocess.run(["ssh", *opts, "root@127.0.0.1", "true"], capture_output=True, env=s.gw.env(), timeout=60)
    assert r.returncode == 255
    assert b"Permission denied (publickey)" in r.stderr


def test_a_key_offered_but_not_proven_dials_nothing(local_ssh, cluster, tmp_path):
    # The client offers a trusted key (a query, RFC 4252 section 7: the
    # gateway answers that it would take it) but does not hold the private
    # half: nothing is dialled, no session starts, no certificate is signed.
    s = local_ssh()
    only_public = tmp_path / "only-public.pub"  # ssh offers it, and cannot sign with it
    only_public.write_bytes(s.key.with_name(s.key.name + ".pub").read_bytes())
    opts = s.options()
    opts[opts.index(str(s.key))] = str(only_public)
    r = subprocess.run(["ssh", "-v", *opts, "root@127.0.0.1", "true"], capture_output=True, env=s.gw.env(),
                       timeout=60)
    assert r.returncode == 255
    assert b"Server accepts key" in r.stderr and b"Permission denied (publickey)" in r.stderr, r.stderr
    # Then the key proven, as another login: its session is on record, and
    # nothing of root's before it (events reach the store in order).
    assert s.ssh(TEST_USER, "true").returncode == 0
    cluster.wait_audit(lambda evs: any(e["login"] == TEST_USER for e in evs), user=s.gw.user, event="session.start")
    assert [e["login"] for e in cluster.audit(user=s.gw.user, event="session.start")] == [TEST_USER]
    assert [e["params"]["login"] for e in cluster.audit(user=s.gw.user, event="dial.allowed")] == [TEST_USER]
    assert [e["principals"] for e in cluster.audit(user=s.gw.user, event="ssh.cert")] == [[TEST_USER]]


@pytest.mark.parametrize("mib", [8, pytest.param(50, marks=pytest.mark.heavy)])
def test_local_and_remote_forwarding(local_ssh, cluster, mib):
    s = local_ssh()
    echo_port, remote_port = check_forwarding(["ssh", *s.options()], "root@127.0.0.1", s.gw.env(), mib)
    forwards = cluster.wait_audit(lambda evs: len(evs) >= 2, user=s.gw.user, event="ssh.forward")
    assert {(e["direction"], e["port"]) for e in forwards} == {("local", echo_port), ("remote", remote_port)}


def test_agent_forwarding_where_a_role_allows_it_and_a_clear_refusal_elsewhere(local_ssh, cluster, tmp_path):
    # Each gateway's temporary directory, where asyncssh makes the agent
    # socket a forwarded agent is reached through (the node is this host).
    tmp = {role: tmp_path / f"tmp-{role}" for role in ("ssh-agent-fwd", "ssh-all")}
    for path in tmp.values():
        path.mkdir()
    allowed, refused = (local_ssh(role, wrapper=("env", f"TMPDIR={tmp[role]}")) for role in tmp)
    with agent_with_a_key(tmp_path) as (sock, fingerprint):
        r = agent_listing(["ssh", *allowed.options()], "root@127.0.0.1", allowed.gw.env(), sock)
        assert r.returncode == 0 and fingerprint in r.stdout, r.stderr
        r = agent_listing(["ssh", *refused.options()], "root@127.0.0.1", refused.gw.env(), sock)
        assert r.returncode == 2, (r.stdout, r.stderr)  # ssh-add -l: no agent on the node
        assert "wicket: agent forwarding to web-1 as root is not allowed by your roles" in r.stderr, r.stderr
        # The socket is made only where forwarding is allowed: a refused
        # client's request makes none, not even for the session's length.
        for s, role, made in ((allowed, "ssh-agent-fwd", True), (refused, "ssh-all", False)):
            listing = subprocess.run(["ssh", *s.options(), "-A", "-o", f"IdentityAgent={sock}", "root@127.0.0.1",
                                      f"ls -A {tmp[role]}"], capture_output=True, text=True,
                                     env={**s.gw.env(), "SSH_AUTH_SOCK": str(sock)}, timeout=60)
            assert listing.returncode == 0, listing.stderr
            assert ("asyncssh-" in listing.stdout) is made, (role, listing.stdout)
    for s, verdict in ((allowed, True), (refused, False)):
        events = cluster.wait_audit(lambda evs: len(evs) >= 2, user=s.gw.user, event="ssh.agent_forwarding")
        assert [e["allowed"] for e in events] == [verdict, verdict] and events[0]["reported_by"] == "gateway"
        starts = cluster.wait_audit(user=s.gw.user, event="session.start")
        assert starts[-1]["agent_forwarding"] is verdict
        certs = cluster.wait_audit(user=s.gw.user, event="ssh.cert")
        assert certs[-1]["agent_forwarding"] is verdict


def test_an_interactive_shell_with_a_pty(local_ssh):
    import pexpect

    s = local_ssh()
    child = pexpect.spawn("ssh", [*s.options(), "-tt", "root@127.0.0.1",
                                  "env PS1='wicket> ' TERM=dumb bash --norc --noprofile -i"],
                          env=s.gw.env(), dimensions=(24, 80), timeout=30)
    try:
        child.expect_exact("wicket> ")
        child.sendline("tty; stty size")
        child.expect(r"/dev/pts/\d+")
        child.expect_exact("24 80")
        child.setwinsize(40, 132)  # a window change reaches the node's pty
        child.expect_exact("wicket> ")
        child.sendline("stty size")
        child.expect_exact("40 132")
        child.sendline("sleep 600")
        child.sendintr()  # Ctrl-C: the node's pty turns it into SIGINT for sleep
        child.expect_exact("wicket> ")
        child.sendline("exit 5")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 5


def test_asyncssh_as_a_client_sees_exit_signals_and_environment(local_ssh):
    import asyncio
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import asyncssh

    s = local_ssh()

    async def run():
        async with asyncssh.connect("127.0.0.1", s.port, username="root", client_keys=[str(s.key)],
                                    known_hosts=str(s.known_hosts), config=None, agent_path=None) as conn:
            killed = await conn.run("kill -TERM $$", check=False)
            plain = await conn.run("echo $LANG; exit 3", check=False, env={"LANG": "C.UTF-8"})
            return killed, plain

    killed, plain = asyncio.run(run())
    assert killed.exit_signal is not None and killed.exit_signal[0] == "TERM"
    assert plain.exit_status == 3
    assert plain.stdout == "C.UTF-8\n"  # environment the node accepts (AcceptEnv LANG)


def test_a_lock_ends_a_live_session_with_the_reason(local_ssh, cluster):
    s = local_ssh()
    with long_session(["ssh", *s.options(), "root@127.0.0.1"], s.gw.env()) as proc:
        cluster.admin("users", "lock", s.gw.user, "--reason", "incident 42")
        assert "wicket: the session was cut" in ended(proc, 10, "ssh to end after the lock")


def test_the_certificates_end_ends_a_live_session_and_later_logins_are_told(make_gateway, tmp_path, node):
    gw = make_gateway("ssh-all")
    s = LocalSsh(gw, tmp_path)
    with long_session(["ssh", *s.options(), "root@127.0.0.1"], gw.env()) as proc:
        # The short certificate is made once the gateway and the session are
        # up (their start-up, slow on a loaded machine, must not use it up):
        # the gateway presents it on its connection, and the session's end
        # moves to its end.
        ends_by = gw.login_briefly(6)
        assert "wicket: the session was cut" in ended(proc, ends_by - time.monotonic() + 20,
                                                      "ssh to end with the certificate")
    r = s.ssh("root", "true")
    assert r.returncode == 255
    assert b"expired" in r.stderr and b"wicket login" in r.stderr, r.stderr


def test_an_unreachable_cluster_is_a_banner(local_ssh, cluster):
    s = local_ssh("ssh-all", "--wait-for-cluster", "0")
    assert s.ssh("root", "true").returncode == 0
    cluster.stop()
    try:
        r = s.ssh("root", "true")
        assert r.returncode == 255
        err = r.stderr.decode()
        assert "check that the Wicket cluster is running and reachable from this machine" in err, err
    finally:
        cluster.start()


def test_a_node_with_a_host_certificate_of_the_clusters_host_ca(local_ssh, cluster, tmp_path_factory):
    with node_with_host_cert(cluster, tmp_path_factory.mktemp("sshd-cert"), "cert-9"):
        r = local_ssh().ssh("root%cert-9", "echo ok")
        assert (r.returncode, r.stdout) == (0, b"ok\n"), r.stderr


def test_a_node_whose_host_key_is_not_the_registered_one(local_ssh, cluster, node, tmp_path):
    with impostor(cluster, node, tmp_path, "web-6"):
        s = local_ssh()
        r = s.ssh("root%web-6", "true")
        assert r.returncode == 255
        assert "the host key of web-6 is not the registered one" in r.stderr.decode(), r.stderr
        cluster.wait_audit(user=s.gw.user, event="ssh.hostkey_mismatch")


def test_the_none_opt_in_is_the_profiles_setting_and_lets_the_owner_in_without_a_key(make_gateway, tmp_path, node):
    gw = make_gateway("ssh-user")
    key = tmp_path / "k"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)

    def keyless(port: int, user: str, command: str = "true") -> subprocess.CompletedProcess:
        return subprocess.run(["ssh", "-F", "/dev/null", "-p", str(port), "-o", f"UserKnownHostsFile={tmp_path / 'kh'}",
                               "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "IdentitiesOnly=yes",
                               "-o", "IdentityFile=/dev/null", "-o", "IdentityAgent=none", f"{user}@127.0.0.1",
                               command], capture_output=True, env=gw.env(), timeout=60)

    # Without the opt-in a key is needed.
    _proc, port = gw.proxy("ssh", "web-1", "--authorized-keys", f"{key}.pub", "--write-known-hosts",
                           str(tmp_path / "kh"))
    r = keyless(port, TEST_USER)
    assert r.returncode == 255 and b"Permission denied (publickey)" in r.stderr, r.stderr
    # The profile's opt-in, kept across logins.
    r = gw.run("profile", "set", "ssh.allow_no_auth", "true")
    assert r.returncode == 0 and "ssh.allow_no_auth = true" in r.stdout, r.stderr
    assert gw.login().returncode == 0
    assert '"ssh.allow_no_auth": true' in gw.run("profile", "show", "--format", "json").stdout
    _proc, port = gw.proxy("ssh", "web-1", "--authorized-keys", f"{key}.pub", "--write-known-hosts",
                           str(tmp_path / "kh"))
    r = keyless(port, TEST_USER, "id -un")
    assert (r.returncode, r.stdout.strip()) == (0, TEST_USER.encode()), r.stderr
    # A refusal still says why, then no way in.
    r = keyless(port, "root")
    assert r.returncode == 255
    assert b"none of your roles allows login=root" in r.stderr, r.stderr
    # The flag is the opt-in for one run, whatever the profile says.
    assert gw.run("profile", "unset", "ssh.allow_no_auth").returncode == 0
    _proc, port = gw.proxy("ssh", "web-1", "--allow-no-auth", "--write-known-hosts", str(tmp_path / "kh"))
    assert keyless(port, TEST_USER).returncode == 0

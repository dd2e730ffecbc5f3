"""OpenSSH end to end through ``ProxyCommand wicket proxy ssh --stdio``: a
real cluster, a real sshd that trusts only the cluster's SSH user CA, and
the real ssh, scp, sftp and rsync, configured by ``wicket config ssh``."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import signal
import stat
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.harness import PY, ROOT
from tests.integration.ssh_fixtures import node  # noqa: F401 (a fixture)
from tests.integration.ssh_fixtures import (
    check_file_transfers, check_forwarding, ended, impostor, long_session, node_with_host_cert, random_file, sha256,
    agent_listing, agent_with_a_key, ssh_agent,
)
from tests.servers import sshd as sshd_server
from tests.servers.sshd import TEST_USER

pytestmark = pytest.mark.skipif(sshd_server.available() is not None, reason=str(sshd_server.available()))


class SshClient:
    """A user's profile with `wicket config ssh` run, and OpenSSH's tools
    pointed at the block it printed."""

    def __init__(self, gw, tmp: Path) -> None:
        self.gw = gw
        r = gw.run("config", "ssh", "--wicket-command", f"{PY} -m gateway.cli.wicket")
        assert r.returncode == 0, r.stderr
        self.config = tmp / f"ssh_config-{gw.user}"
        self.config.write_text(r.stdout)
        self.printed = r

    def run(self, tool: str, *args: str, timeout: float = 120, input: bytes | None = None
            ) -> subprocess.CompletedProcess:
        return subprocess.run([tool, "-F", str(self.config), "-o", "BatchMode=yes", *args], input=input,
                              capture_output=True, env=self.gw.env(), timeout=timeout)

    def ssh(self, target: str, *command: str, **kw) -> subprocess.CompletedProcess:
        return self.run("ssh", target, *command, **kw)


@pytest.fixture
def ssh_client(make_gateway, tmp_path, node):
    def make(roles: str = "ssh-all") -> SshClient:
        return SshClient(make_gateway(roles), tmp_path)

    return make


def _cert(path: Path) -> str:
    return subprocess.run(["ssh-keygen", "-L", "-f", str(path)], capture_output=True, text=True, check=True).stdout


def _principals(shown: str) -> list[str]:
    return shown.split("Principals:")[1].split("Critical Options:")[0].split()


def test_config_ssh_writes_a_key_and_known_hosts_and_each_connection_gets_its_own_certificate(
        ssh_client, node, cluster):
    client = ssh_client()
    home = client.gw.home / "ssh"
    assert stat.S_IMODE((home / "id_ed25519").stat().st_mode) == 0o600
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    block = client.config.read_text()
    assert "Host *.test" in block and "proxy ssh --stdio --fdpass %r@%h:%p" in block
    assert "ProxyUseFdpass yes" in block
    assert f"CertificateFile {home / 'certs'}/%r@%h-cert.pub" in block
    assert f"web-1.test {' '.join(node.host_key.split()[:2])}" in (home / "known_hosts").read_text()
    assert not (home / "certs").exists()  # no certificate until a connection asks for one
    assert "Logins your roles allow by name: root, " in client.printed.stderr
    # The ssh-user CA is what `ca show ssh-user` prints for TrustedUserCAKeys.
    assert cluster.admin("ca", "show", "ssh-user").stdout.split()[:2] == \
        (cluster.state / "ssh_user_ca.pub").read_text().split()[:2]
    for login in ("root", TEST_USER):
        r = client.ssh(f"{login}@web-1.test", "id -un")
        assert (r.returncode, r.stdout.decode().strip()) == (0, login), r.stderr
        shown = _cert(home / "certs" / f"{login}@web-1.test-cert.pub")
        assert "user certificate" in shown
        assert _principals(shown) == [login]  # that connection's login, and no other
        assert f"wicket:test:{client.gw.user}:" in shown  # the key id names the person in sshd's log
        assert "permit-pty" in shown and "permit-agent-forwarding" not in shown
        valid = shown.split("Valid: from ")[1].split()[:3]  # FROM to TO
        span = dt.datetime.fromisoformat(valid[2]) - dt.datetime.fromisoformat(valid[0])
        assert span <= dt.timedelta(minutes=3)  # two minutes, and one back for clock skew
    events = cluster.wait_audit(lambda evs: len(evs) >= 2, user=client.gw.user, event="ssh.cert")
    assert sorted(e["principals"][0] for e in events) == sorted(["root", TEST_USER])
    assert all(len(e["principals"]) == 1 and e["mode"] == "proxycommand" for e in events)
    # The old session-long certificate for every login is no longer signed.
    r = client.gw.run("renew")
    assert r.returncode == 0, r.stderr
    assert client.ssh("root@web-1.test", "true").returncode == 0


def _by_hand(client: SshClient, target: str, dial: str, cert: Path) -> subprocess.CompletedProcess:
    """ssh to ``target`` through a ProxyCommand run by hand that dials
    ``dial`` (LOGIN@NODE), offering ``cert``: what a user could try."""
    home = client.gw.home / "ssh"
    proxy = f"{PY} -m gateway.cli.wicket proxy ssh --stdio {dial}"
    return subprocess.run(["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", f"ProxyCommand={proxy}",
                           "-o", f"IdentityFile={home / 'id_ed25519'}", "-o", f"CertificateFile={cert}",
                           "-o", "IdentitiesOnly=yes", "-o", f"UserKnownHostsFile={home / 'known_hosts'}",
                           "-o", "StrictHostKeyChecking=yes", "-o", "IdentityAgent=none", target, "true"],
                          capture_output=True, env=client.gw.env(), timeout=120)


def test_a_certificate_for_one_node_is_refused_on_a_node_whose_certificates_name_it(
        ssh_client, cluster, node, tmp_path_factory):
    # web-4's resource says principals = "node" and its sshd takes
    # LOGIN@web-4.test for LOGIN (`ca show ssh-user --node web-4`). The
    # user may be root on web-1 and the test user on web-4.
    lines = cluster.admin("ca", "show", "ssh-user", "--node", "web-4").stdout
    assert "AuthorizedPrincipalsCommand /bin/echo %u@web-4.test" in lines
    scoped = sshd_server.Sshd(tmp_path_factory.mktemp("sshd-web-4"), cluster.state / "ssh_user_ca.pub",
                              extra_config="".join(line + "\n" for line in lines.splitlines()
                                                   if line.startswith("AuthorizedPrincipals")))
    cluster.admin("resources", "add", "web-4", "--kind", "ssh", "--address", scoped.address,
                  "--host-key", scoped.host_key, "--principals", "node", "--label", "split=4")
    cluster.admin("roles", "add", "ssh-split-1", "--allow-resources", "web-1", "--logins", "root")
    cluster.admin("roles", "add", "ssh-split-4", "--allow-label", "split=4", "--logins", TEST_USER)
    stolen = tmp_path_factory.mktemp("stolen")
    try:
        client = ssh_client("ssh-split-1,ssh-split-4")
        certs = client.gw.home / "ssh" / "certs"
        assert client.ssh("root@web-1.test", "true").returncode == 0
        assert _principals(_cert(certs / "root@web-1.test-cert.pub")) == ["root"]
        r = client.ssh(f"{TEST_USER}@web-4.test", "id -un")
        assert (r.returncode, r.stdout.strip()) == (0, TEST_USER.encode()), r.stderr
        assert _principals(_cert(certs / f"{TEST_USER}@web-4.test-cert.pub")) == [f"{TEST_USER}@web-4.test"]
        r = client.ssh("root@web-4.test", "true")
        assert r.returncode == 255 and b"none of your roles allows login=root on it" in r.stderr, r.stderr
        # By hand: a stream to web-4 dialled as the test user (allowed),
        # and root's certificate from the web-1 connection offered to it.
        (stolen / "root-cert.pub").write_bytes((certs / "root@web-1.test-cert.pub").read_bytes())
        r = _by_hand(client, "root@web-4.test", f"{TEST_USER}@web-4.test:22", stolen / "root-cert.pub")
        assert r.returncode == 255 and b"Permission denied (publickey)" in r.stderr, r.stderr
        # And web-4's certificate is no use on web-1 as the test user.
        (stolen / "user-cert.pub").write_bytes((certs / f"{TEST_USER}@web-4.test-cert.pub").read_bytes())
        r = _by_hand(client, f"{TEST_USER}@web-1.test", "root@web-1.test:22", stolen / "user-cert.pub")
        assert r.returncode == 255 and b"Permission denied (publickey)" in r.stderr, r.stderr
    finally:
        for role in ("ssh-split-1", "ssh-split-4"):
            cluster.admin("roles", "rm", role, check=False)
        cluster.admin("resources", "rm", "web-4", check=False)
        scoped.stop()


def test_exec_with_exit_codes_as_root_and_as_a_user(ssh_client, node, cluster):
    client = ssh_client()
    r = client.ssh("root@web-1.test", "id -un; exit 7")
    assert r.returncode == 7, r.stderr
    assert r.stdout == b"root\n"
    r = client.ssh(f"{TEST_USER}@web-1.test", "id -un")
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().strip() == TEST_USER
    # stdin reaches the command and its EOF too; stdout comes back whole.
    payload = os.urandom(3 << 20)
    r = client.ssh("root@web-1.test", "sha256sum", input=payload)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()
    # The node saw the certificate, whose key id names the person.
    assert f"ID wicket:test:{client.gw.user}:" in node.log()
    # The cluster's own record of each stream: who, which login on which
    # node, and at its end the bytes each way and how long (the commands
    # are inside SSH's encryption: not seen in this mode).
    starts = cluster.wait_audit(lambda evs: len(evs) >= 3, user=client.gw.user, event="session.start")
    assert {e["login"] for e in starts} == {"root", TEST_USER}
    assert all(e["kind"] == "ssh" and e["resource"] == "web-1" and e["node"] == node.address
               and e["mode"] == "proxycommand" for e in starts)
    ends = cluster.wait_audit(lambda evs: len(evs) >= 3, user=client.gw.user, event="session.end")
    assert {e["session_id"] for e in ends} == {e["session_id"] for e in starts}
    assert {(e["login"], e["node"], e["mode"]) for e in ends} == {(login, node.address, "proxycommand")
                                                                   for login in ("root", TEST_USER)}
    assert all(e["bytes_from_client"] > 0 and e["bytes_to_client"] > 0 and e["duration"] > 0 for e in ends)
    assert max(e["bytes_from_client"] for e in ends) > len(payload)
    assert not cluster.audit(user=client.gw.user, event="ssh.exec")


def test_sessions_that_end_cleanly_say_nothing_and_end_closed(ssh_client, cluster, tmp_path):
    # ssh closes its socket (the one --fdpass handed it) right after its
    # own EOF, before the node's comes: that is ssh ending the session, not
    # a cut. The carrying child shares ssh's stderr, which capture_output
    # reads to its end, so anything it printed is in r.stderr.
    client = ssh_client()
    src = random_file(tmp_path / "up.bin", 1 << 20)
    remote = f"/tmp/wicket-clean-{client.gw.user}.bin"
    runs = [client.ssh("root@web-1.test", "true"),
            client.run("scp", "-q", str(src), f"root@web-1.test:{remote}"),
            client.run("scp", "-q", "-O", f"root@web-1.test:{remote}", str(tmp_path / "back.bin")),
            client.ssh("root@web-1.test", "rm", remote)]
    for r in runs:
        assert r.returncode == 0 and b"wicket:" not in r.stderr, r.stderr
    assert sha256(tmp_path / "back.bin") == sha256(src)
    ends = cluster.wait_audit(lambda evs: len(evs) >= len(runs), user=client.gw.user, event="session.end")
    assert [e["reason"] for e in ends] == ["closed"] * len(runs), ends


def test_stdin_and_stdout_relayed_without_fdpass_the_certificate_in_the_agent(ssh_client, cluster, tmp_path):
    # The ProxyCommand relaying stdin and stdout itself (an ssh_config
    # written by hand, or an ssh without ProxyUseFdpass): ssh read its
    # certificate files before the dial, so the connection's key and
    # certificate go to the ssh-agent, for the certificate's two minutes.
    client = ssh_client()
    text = client.config.read_text().replace(" --fdpass", "").replace("    ProxyUseFdpass yes\n", "")
    client.config.write_text(text.replace("    IdentitiesOnly yes\n", ""))
    payload = os.urandom(3 << 20)
    with ssh_agent(tmp_path) as sock:
        env = {**client.gw.env(), "SSH_AUTH_SOCK": str(sock)}
        r = subprocess.run(["ssh", "-F", str(client.config), "-o", "BatchMode=yes", "root@web-1.test",
                            "sha256sum; exit 4"], input=payload, capture_output=True, env=env, timeout=120)
        assert r.returncode == 4 and b"wicket:" not in r.stderr, r.stderr
        assert r.stdout.split()[0].decode() == hashlib.sha256(payload).hexdigest()
        # ssh hangs up on its ProxyCommand as it exits (SIGHUP), before the
        # node's EOF came back: the session still ends cleanly.
        ended = cluster.wait_audit(user=client.gw.user, event="session.end")
        assert [e["reason"] for e in ended] == ["closed"], ended
        listed = subprocess.run(["ssh-add", "-L"], capture_output=True, text=True, env=env).stdout
        assert "ssh-ed25519-cert-v01@openssh.com" in listed and f"wicket:test:{client.gw.user}:" in listed
        r = subprocess.run(["ssh", "-F", str(client.config), "-o", "BatchMode=yes", "root@nope.test", "true"],
                           capture_output=True, env=env, timeout=120)
        assert r.returncode == 255 and b"access to 'nope' denied" in r.stderr
    # Without an agent, the ProxyCommand says what to use instead.
    r = client.ssh("root@web-1.test", "true")
    assert r.returncode == 255 and b"no ssh-agent (SSH_AUTH_SOCK)" in r.stderr, r.stderr
    assert b"ProxyUseFdpass yes" in r.stderr


def test_a_hang_up_on_the_stdio_proxy_cuts_a_session_the_node_does_not_end(ssh_client, cluster, tmp_path):
    # The same SIGHUP while the session goes on (ssh still there, the node's
    # command running): after HANGUP_GRACE the session is cut, with why.
    client = ssh_client()
    text = client.config.read_text().replace(" --fdpass", "").replace("    ProxyUseFdpass yes\n", "")
    client.config.write_text(text.replace("    IdentitiesOnly yes\n", ""))
    with ssh_agent(tmp_path) as sock:
        env = {**client.gw.env(), "SSH_AUTH_SOCK": str(sock)}
        with long_session(["ssh", "-F", str(client.config), "-o", "BatchMode=yes", "root@web-1.test"], env) as proc:
            children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
            assert len(children) == 1, children  # the ProxyCommand
            os.kill(int(children[0]), signal.SIGHUP)
            err = ended(proc, 60, "ssh to end once its proxy was hung up on")
    assert "ssh exited and the node had not ended the session" in err, err
    ends = cluster.wait_audit(user=client.gw.user, event="session.end")
    assert "ssh exited and the node had not ended the session" in ends[0]["reason"], ends


def test_a_hang_up_during_the_dial_gets_the_same_grace(make_gateway, cluster, node):
    # ssh may hang up on its ProxyCommand while the dial is still on its
    # way: the proxy keeps it, and once the session is up it has the same
    # grace as after a later hang-up, then is cut with why; it does not die
    # at once (killed by SIGHUP, with nothing on record but a cut stream).
    gw = make_gateway("ssh-all")
    with gw.cluster_held() as (accepted, release):
        proc = subprocess.Popen([PY, "-m", "gateway.cli.wicket", "proxy", "ssh", "--stdio", "root@web-1:22"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=gw.env(), cwd=ROOT)
        try:
            assert accepted.wait(60), "the proxy's dial never reached the cluster"
            os.kill(proc.pid, signal.SIGHUP)  # while its connection to the cluster is held
            release.set()
            proc.wait(timeout=60)  # stdin stays open: ssh's EOF never comes, the node waits
            err = proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 255, (proc.returncode, err)
    assert b"ssh exited and the node had not ended the session" in err, err
    ends = cluster.wait_audit(user=gw.user, event="session.end")
    assert "ssh exited and the node had not ended the session" in ends[0]["reason"], ends


def test_agent_forwarding_only_with_a_certificate_that_permits_it(ssh_client, tmp_path):
    # The node's sshd decides, from the connection's certificate: the
    # cluster adds permit-agent-forwarding only where a role allows it.
    allowed, refused = ssh_client("ssh-agent-fwd"), ssh_client("ssh-all")
    with agent_with_a_key(tmp_path) as (sock, fingerprint):
        for client, works in ((allowed, True), (refused, False)):
            r = agent_listing(["ssh", "-F", str(client.config), "-o", "BatchMode=yes"], "root@web-1.test",
                              client.gw.env(), sock)
            assert (r.returncode == 0 and fingerprint in r.stdout) if works else r.returncode == 2, r.stderr
            shown = _cert(client.gw.home / "ssh" / "certs" / "root@web-1.test-cert.pub")
            assert ("permit-agent-forwarding" in shown) is works


@pytest.mark.parametrize("mib", [24, pytest.param(200, marks=pytest.mark.heavy)])
def test_scp_and_sftp_both_ways_checked_by_sha256(ssh_client, tmp_path, mib):
    client = ssh_client()
    check_file_transfers(client.run, "root@web-1.test", tmp_path, mib, f"/tmp/wicket-scp-{client.gw.user}.bin")


@pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync is not installed")
def test_rsync_over_ssh(ssh_client, tmp_path):
    client = ssh_client()
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    random_file(tree / "a.bin", 1 << 20)
    random_file(tree / "sub" / "b.bin", 300_000)
    remote = f"/tmp/wicket-rsync-{client.gw.user}/"
    rsh = f"ssh -F {client.config} -o BatchMode=yes"
    r = subprocess.run(["rsync", "-a", "-e", rsh, f"{tree}/", f"root@web-1.test:{remote}"], capture_output=True,
                       env=client.gw.env(), timeout=120)
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back"
    r = subprocess.run(["rsync", "-a", "-e", rsh, f"root@web-1.test:{remote}", f"{back}/"], capture_output=True,
                       env=client.gw.env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert sha256(back / "a.bin") == sha256(tree / "a.bin")
    assert sha256(back / "sub" / "b.bin") == sha256(tree / "sub" / "b.bin")
    client.ssh("root@web-1.test", f"rm -rf {remote}")


def test_a_login_the_roles_do_not_allow_is_refused_before_the_node(ssh_client, cluster, node):
    client = ssh_client("ssh-user")
    r = client.ssh("root@web-1.test", "true")
    assert r.returncode == 255
    err = r.stderr.decode()
    assert "wicket: access to 'web-1' denied: none of your roles allows login=root on it" in err
    assert "`wicket ls` lists the nodes you can reach" in err
    events = cluster.wait_audit(user=client.gw.user, event="dial.denied")
    assert events[-1]["params"]["login"] == "root"
    # The login it does allow works.
    assert client.ssh(f"{TEST_USER}@web-1.test", "true").returncode == 0


def test_an_unknown_node_and_a_node_that_is_down_say_what_to_do(ssh_client):
    client = ssh_client()
    r = client.ssh("root@nope.test", "true")
    assert r.returncode == 255
    err = r.stderr.decode()
    assert "access to 'nope' denied: no such resource, or none of your roles reaches it" in err, err
    r = client.ssh("root@down-1.test", "true")
    assert r.returncode == 255
    err = r.stderr.decode()
    assert "down-1 (127.0.0.1:1) is not reachable from the cluster" in err, err


def test_a_node_whose_host_key_is_not_the_registered_one_is_cut_by_the_cluster(ssh_client, cluster, node, tmp_path):
    with impostor(cluster, node, tmp_path, "web-2"):
        client = ssh_client()
        r = client.ssh("root@web-2.test", "true")
        assert r.returncode == 255
        err = r.stderr.decode()
        # The cluster reads the key exchange and cuts the stream before the
        # reply with the node's key reaches ssh, which would refuse it too.
        assert "the host key of web-2 is not the registered one (presented SHA256:" in err, err
        events = cluster.wait_audit(user=client.gw.user, event="ssh.hostkey_mismatch")
        assert events[-1]["resource"] == "web-2" and events[-1]["presented"].startswith("SHA256:")


def test_a_lock_cuts_a_live_ssh_session(ssh_client, cluster):
    client = ssh_client()
    ssh = ["ssh", "-F", str(client.config), "-o", "BatchMode=yes", "root@web-1.test"]
    with long_session(ssh, client.gw.env()) as proc:
        cluster.admin("users", "lock", client.gw.user, "--reason", "test")
        assert "was cut" in ended(proc, 10, "ssh to end after the lock")


def test_the_certificates_end_ends_a_live_ssh_stream(make_gateway, tmp_path, node):
    gw = make_gateway("ssh-all")
    client = SshClient(gw, tmp_path)
    # Each ssh dials in a ProxyCommand of its own, with the certificate on
    # disk then (nothing presents a later one on its connection): the
    # certificate lives long enough for ssh and its ProxyCommand to start on
    # a loaded machine, and the cut is awaited by its end.
    ends_by = gw.login_briefly(20)
    with long_session(["ssh", "-F", str(client.config), "-o", "BatchMode=yes", "root@web-1.test"], gw.env()) as proc:
        assert "was cut" in ended(proc, ends_by - time.monotonic() + 20, "ssh to end with the certificate")
    r = client.ssh("root@web-1.test", "true")
    assert r.returncode == 255 and b"expired" in r.stderr and b"wicket login" in r.stderr, r.stderr


def test_a_node_with_a_host_certificate_of_the_clusters_host_ca(ssh_client, cluster, tmp_path_factory):
    with node_with_host_cert(cluster, tmp_path_factory.mktemp("sshd-cert"), "cert-1") as server:
        client = ssh_client()
        known = (client.gw.home / "ssh" / "known_hosts").read_text()
        assert "@cert-authority cert-1.test ssh-ed25519 " in known
        r = client.ssh("root@cert-1.test", "echo ok")
        assert (r.returncode, r.stdout) == (0, b"ok\n"), r.stderr
        # A node whose certificate is not for its name is cut by the cluster.
        cluster.admin("resources", "add", "cert-2", "--kind", "ssh", "--address", server.address, "--host-ca",
                      "cluster", "--label", "env=ssh")
        try:
            r = client.ssh("root@cert-2.test", "true")
            assert r.returncode == 255 and b"the host certificate is not for cert-2.test" in r.stderr, r.stderr
        finally:
            cluster.admin("resources", "rm", "cert-2", check=False)


@pytest.mark.parametrize("mib", [8, pytest.param(50, marks=pytest.mark.heavy)])
def test_local_and_remote_forwarding(ssh_client, mib):
    client = ssh_client()
    check_forwarding(["ssh", "-F", str(client.config), "-o", "BatchMode=yes"], "root@web-1.test", client.gw.env(),
                     mib)

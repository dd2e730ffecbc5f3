"""What the ssh tests share: a node (a throwaway sshd trusting the
cluster's SSH user CA) registered with the cluster, roles with logins, and
file helpers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.harness import wait_for
from tests.servers.sshd import TEST_USER, Sshd


@pytest.fixture(scope="module")
def node(tmp_path_factory, cluster):
    """web-1 (the sshd), down-1 (nothing listens), roles ssh-all (root and
    the test user), ssh-user (the test user only) and ssh-agent-fwd (root,
    with ssh -A)."""
    server = Sshd(tmp_path_factory.mktemp("sshd"), cluster.state / "ssh_user_ca.pub")
    cluster.admin("resources", "add", "web-1", "--kind", "ssh", "--address", server.address,
                  "--host-key", server.host_key, "--label", "env=ssh")
    # A node that is down: its port refuses connections.
    cluster.admin("resources", "add", "down-1", "--kind", "ssh", "--address", "127.0.0.1:1",
                  "--host-key", server.host_key, "--label", "env=ssh")
    cluster.admin("roles", "add", "ssh-all", "--allow-label", "env=ssh", "--logins", f"root,{TEST_USER}")
    cluster.admin("roles", "add", "ssh-user", "--allow-label", "env=ssh", "--logins", TEST_USER)
    cluster.admin("roles", "add", "ssh-agent-fwd", "--allow-label", "env=ssh", "--logins", "root",
                  "--ssh-agent-forwarding", "on")
    yield server
    server.stop()


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 1 << 20)
            f.write(os.urandom(n))
            left -= n
    return path


@contextlib.contextmanager
def long_session(ssh: list[str], env: dict[str, str]) -> Iterator[subprocess.Popen]:
    """``ssh`` (a command line up to the destination) running a command that
    lasts, once it has started; killed on the way out if still running, and
    so is the command on the node. (A cut connection does not end it: sshd
    signals only a pty's processes, and ``sleep`` never writes to find out.
    The test node is on this machine, so its process id is ours to end.)"""
    proc = subprocess.Popen([*ssh, "echo started $$; exec sleep 600"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    remote = None
    try:
        line = proc.stdout.readline()
        assert line.startswith(b"started "), (line, proc.stderr.read())
        remote = int(line.split()[1])
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if remote is not None:
            end_remote_sleep(remote)


def end_remote_sleep(pid: int) -> None:
    """Kill ``pid`` if it is still the node's ``sleep 600``."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if f.read() != b"sleep\x00600\x00":
                return  # gone (and perhaps the number reused)
        os.kill(pid, signal.SIGKILL)
    except (FileNotFoundError, ProcessLookupError):
        pass


def ended(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """What ssh printed on stderr, once it ended (with 255: a failed connection)."""
    wait_for(lambda: proc.poll() is not None, timeout=timeout, what=what)
    assert proc.returncode == 255
    return proc.stderr.read().decode()


@contextlib.contextmanager
def echo_server() -> Iterator[int]:
    """A TCP echo server on 127.0.0.1 (its port), for forwarded connections."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()

    def serve():
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                while data := conn.recv(65536):
                    conn.sendall(data)

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def check_forwarding(ssh: list[str], target: str, env: dict[str, str], mib: int) -> tuple[int, int]:
    """``ssh -L`` and ``ssh -R`` through ``ssh`` (a command line up to the
    destination) to ``target``, each carrying ``mib`` MiB to an echo server
    and back, checked. Returns (the -L destination port, the -R port)."""
    # -L: through the node (the same machine) to an echo server there.
    local_port = unused_port()
    with echo_server() as echo_port:
        fwd = subprocess.Popen([*ssh, "-N", "-o", "ExitOnForwardFailure=yes",
                                "-L", f"127.0.0.1:{local_port}:127.0.0.1:{echo_port}", target],
                               env=env, stderr=subprocess.PIPE)
        try:
            def connected():
                try:
                    return socket.create_connection(("127.0.0.1", local_port), timeout=5)
                except OSError:
                    return None

            conn = wait_for(connected, what="the -L port")
            payload = os.urandom(mib << 20)
            got = bytearray()

            def read():
                while len(got) < len(payload) and (data := conn.recv(1 << 16)):
                    got.extend(data)

            reader = threading.Thread(target=read)
            reader.start()
            conn.sendall(payload)
            reader.join(60)
            conn.close()
            assert bytes(got) == payload
        finally:
            fwd.terminate()
            fwd.wait()
    # -R: the node listens, and its connections come back to our echo server.
    remote_port = unused_port()
    with echo_server() as back_port:
        # Reading while it sends: an echo that cannot write back stops reading.
        script = (f"import socket, threading\n"
                  f"data = open('/dev/urandom', 'rb').read({mib << 20})\n"
                  f"s = socket.create_connection(('127.0.0.1', {remote_port}))\n"
                  f"def send():\n"
                  f"    s.sendall(data); s.shutdown(socket.SHUT_WR)\n"
                  f"threading.Thread(target=send).start()\n"
                  f"got = bytearray()\n"
                  f"while chunk := s.recv(65536): got += chunk\n"
                  f"print(got == data)\n")
        r = subprocess.run([*ssh, "-o", "ExitOnForwardFailure=yes", "-R",
                            f"127.0.0.1:{remote_port}:127.0.0.1:{back_port}", target, "python3", "-"],
                           input=script.encode(), capture_output=True, env=env, timeout=300)
    assert r.stdout.strip() == b"True", r.stderr
    return echo_port, remote_port


@contextlib.contextmanager
def node_with_host_cert(cluster, directory: Path, name: str) -> Iterator[Sshd]:
    """A second sshd whose host certificate the cluster's SSH host CA signed
    for ``name``, registered as ``name`` with ``host_ca = "cluster"``."""

    def sign(pub: Path) -> str:
        return cluster.admin("ca", "sign-ssh-host", name, "--key", str(pub), "--validity", "1h").stdout

    server = Sshd(directory, cluster.state / "ssh_user_ca.pub", host_cert=sign)
    cluster.admin("resources", "add", name, "--kind", "ssh", "--address", server.address, "--host-ca", "cluster",
                  "--label", "env=ssh")
    try:
        yield server
    finally:
        cluster.admin("resources", "rm", name, check=False)
        server.stop()


@contextlib.contextmanager
def impostor(cluster, node: Sshd, directory: Path, name: str) -> Iterator[None]:
    """``name``: the node's address, registered with a host key it does not have."""
    key = directory / f"impostor-{name}"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    cluster.admin("resources", "add", name, "--kind", "ssh", "--address", node.address,
                  "--host-key", key.with_name(key.name + ".pub").read_text().strip(), "--label", "env=ssh")
    try:
        yield
    finally:
        cluster.admin("resources", "rm", name, check=False)


def check_file_transfers(run, target: str, tmp: Path, mib: int, remote: str) -> Path:
    """scp up (SFTP), scp down (``scp -O``: the legacy protocol, an exec),
    sftp put and get, each checked by sha256; the remote files removed.
    ``run(tool, *args)`` runs scp or sftp with the path's options. Returns
    the file sent."""
    src = random_file(tmp / "up.bin", mib << 20)
    for args in ((str(src), f"{target}:{remote}"), ("-O", f"{target}:{remote}", str(tmp / "back.bin"))):
        r = run("scp", "-q", *args)
        assert r.returncode == 0, r.stderr
    assert sha256(tmp / "back.bin") == sha256(src)
    batch = tmp / "sftp.batch"
    batch.write_text(f"put {src} {remote}.sftp\nget {remote}.sftp {tmp / 'sftp-back.bin'}\n"
                     f"rm {remote}.sftp\nrm {remote}\n")
    r = run("sftp", "-q", "-b", str(batch), target)
    assert r.returncode == 0, r.stderr
    assert sha256(tmp / "sftp-back.bin") == sha256(src)
    return src


@contextlib.contextmanager
def ssh_agent(directory: Path) -> Iterator[Path]:
    """A running ssh-agent (its socket), stopped on the way out."""
    sock = directory / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_for(sock.exists, what="ssh-agent's socket")
        yield sock
    finally:
        proc.terminate()
        proc.wait()


@contextlib.contextmanager
def agent_with_a_key(directory: Path) -> Iterator[tuple[Path, str]]:
    """A running ssh-agent holding a new key: (its socket, the key's
    fingerprint as ``ssh-add -l`` prints it)."""
    key = directory / "agent-key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True)
    with ssh_agent(directory) as sock:
        subprocess.run(["ssh-add", "-q", str(key)], check=True, env={**os.environ, "SSH_AUTH_SOCK": str(sock)})
        shown = subprocess.run(["ssh-keygen", "-l", "-f", f"{key}.pub"], capture_output=True, text=True, check=True)
        yield sock, shown.stdout.split()[1]


def agent_listing(ssh: list[str], target: str, env: dict[str, str], sock: Path) -> subprocess.CompletedProcess:
    """``ssh -A TARGET ssh-add -l`` with the agent at ``sock``: what the
    node sees of the forwarded agent (exit 2: no agent reached it)."""
    return subprocess.run([*ssh, "-A", "-o", f"IdentityAgent={sock}", target, "ssh-add -l"], capture_output=True,
                          text=True, env={**env, "SSH_AUTH_SOCK": str(sock)}, timeout=60)

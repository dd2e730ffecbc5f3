"""What the ssh tests share: a node (a throwaway sshd trusting the
cluster's SSH user CA) registered with the cluster, roles with logins, and
file helpers."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest

from tests.integration.harness import wait_for
from tests.servers.sshd import TEST_USER, Sshd


@pytest.fixture(scope="module")
def node(tmp_path_factory, cluster):
    """web-1 (the sshd), down-1 (nothing listens), roles ssh-all (root and
    the test user) and ssh-user (the test user only)."""
    server = Sshd(tmp_path_factory.mktemp("sshd"), cluster.state / "ssh_user_ca.pub")
    cluster.admin("resources", "add", "web-1", "--kind", "ssh", "--address", server.address,
                  "--host-key", server.host_key, "--label", "env=ssh")
    # A node that is down: its port refuses connections.
    cluster.admin("resources", "add", "down-1", "--kind", "ssh", "--address", "127.0.0.1:1",
                  "--host-key", server.host_key, "--label", "env=ssh")
    cluster.admin("roles", "add", "ssh-all", "--allow-label", "env=ssh", "--logins", f"root,{TEST_USER}")
    cluster.admin("roles", "add", "ssh-user", "--allow-label", "env=ssh", "--logins", TEST_USER)
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
    lasts, once it has started; killed on the way out if still running."""
    proc = subprocess.Popen([*ssh, "echo started; exec sleep 600"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env)
    try:
        assert proc.stdout.readline() == b"started\n", proc.stderr.read()
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def ended(proc: subprocess.Popen, timeout: float, what: str) -> str:
    """What ssh printed on stderr, once it ended (with 255: a failed connection)."""
    wait_for(lambda: proc.poll() is not None, timeout=timeout, what=what)
    assert proc.returncode == 255
    return proc.stderr.read().decode()

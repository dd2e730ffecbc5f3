"""The tests' sshd: :mod:`gateway.local.sshserver` (a throwaway OpenSSH
sshd trusting the cluster's SSH user CA, which ``wicket demo`` runs too),
plus what only the tests need.

Run as root (as the tests' machines do), it lets root in and creates the
non-root test user :data:`TEST_USER` once (``useradd``; its password field
is ``*``, which sshd takes for "no password", not for a locked account).
"""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path
from typing import Callable

from gateway.local import sshserver
from gateway.local.sshserver import SSHD, SSH_KEYGEN, SshServer  # noqa: F401  (benchmarks/ssh.py's names)
from tests.integration.harness import _env

TEST_USER = "wicketssh"


def available() -> str | None:
    """Why this machine cannot run the fixture, or None."""
    for tool in (SSHD, SSH_KEYGEN, "/usr/bin/ssh", "/usr/bin/scp", "/usr/bin/sftp"):
        if not os.path.exists(tool):
            return f"{tool} is missing (requirements/apt.txt: openssh-server, openssh-client)"
    if os.geteuid() != 0:
        return "sshd needs root to switch to the test users"
    return None


def ensure_test_user() -> None:
    try:
        pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", TEST_USER], check=True)
    subprocess.run(["usermod", "-p", "*", TEST_USER], check=True)


def prepare(directory: Path, user_ca: Path, port: int, *, host_cert: Callable[[Path], str] | None = None
            ) -> tuple[Path, str]:
    """:func:`gateway.local.sshserver.prepare` with the test user made."""
    ensure_test_user()
    return sshserver.prepare(directory, user_ca, port, host_cert=host_cert, comment="wicket-test-node")


class Sshd(SshServer):
    """Started on construction, the test user made first."""

    def __init__(self, tmp: Path, user_ca: Path, host_cert: Callable[[Path], str] | None = None, *,
                 extra_config: str = "") -> None:
        super().__init__(tmp, user_ca, host_cert=host_cert, env=_env(), extra_config=extra_config)
        ensure_test_user()
        self.start()

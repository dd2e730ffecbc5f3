"""A throwaway OpenSSH sshd for tests: Debian's /usr/sbin/sshd by absolute
path, with its own config, host key and pid file in a temporary directory,
trusting the cluster's SSH user CA (``TrustedUserCAKeys``) and nothing else:
no authorized_keys, no passwords. Logs go to a file the tests read.

Run as root (as the tests' machines do), it lets root in and creates the
non-root test user :data:`TEST_USER` once (``useradd``; its password field
is ``*``, which sshd takes for "no password", not for a locked account).
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Callable

from tests.integration.harness import Proc, _env, wait_for

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
TEST_USER = "wicketssh"

CONFIG = """\
ListenAddress 127.0.0.1:{port}
HostKey {dir}/ssh_host_ed25519_key
PidFile {dir}/sshd.pid
TrustedUserCAKeys {ca}
AuthorizedKeysFile none
AuthorizedPrincipalsFile none
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
UsePAM no
StrictModes no
AllowTcpForwarding yes
PermitTTY yes
Subsystem sftp internal-sftp
AcceptEnv LANG LC_*
LogLevel VERBOSE
MaxStartups 100:30:200
"""


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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(directory: Path, user_ca: Path, port: int, *, host_cert: Callable[[Path], str] | None = None
            ) -> tuple[Path, str]:
    """An sshd's files in ``directory`` (its host key once, its config for
    ``port``; /run/sshd, the test user): the config's path and the host
    public key line. Run ``sshd -D -e -f CONFIG``."""
    directory.mkdir(parents=True, exist_ok=True)
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    ensure_test_user()
    key = directory / "ssh_host_ed25519_key"
    if not key.exists():
        subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "wicket-test-node", "-f", str(key)],
                       check=True)
    host_key = (directory / "ssh_host_ed25519_key.pub").read_text().strip()
    shutil.copy(user_ca, directory / "user_ca.pub")
    extra = ""
    if host_cert is not None:
        cert = directory / "ssh_host_ed25519_key-cert.pub"
        if not cert.exists():
            cert.write_text(host_cert(directory / "ssh_host_ed25519_key.pub").strip() + "\n")
        extra = f"HostCertificate {cert}\n"
    config = directory / "sshd_config"
    config.write_text(CONFIG.format(port=port, dir=directory, ca=directory / "user_ca.pub") + extra)
    check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
    if check.returncode:
        raise RuntimeError(f"sshd refused its config:\n{check.stderr}")
    return config, host_key


class Sshd:
    """``host_cert``: given the host public key's path, the host
    certificate line to present (HostCertificate)."""

    def __init__(self, tmp: Path, user_ca: Path, host_cert: Callable[[Path], str] | None = None) -> None:
        self.dir, self.user_ca, self.host_cert = tmp, user_ca, host_cert
        self.proc: Proc | None = None
        self.port = 0
        self.host_key = ""
        self.start()

    def start(self) -> None:
        for _attempt in range(5):
            self.port = free_port()
            config, self.host_key = prepare(self.dir, self.user_ca, self.port, host_cert=self.host_cert)
            self.proc = Proc([SSHD, "-D", "-e", "-f", str(config)], self.dir / "sshd.log", _env())

            def listening():
                if self.proc.popen.poll() is not None:
                    return "exited"
                return "Server listening" in self.proc.log() and "listening"

            if wait_for(listening, what="sshd listening") == "listening":
                return
            self.proc.stop()
        raise RuntimeError(f"sshd did not start:\n{self.proc.log()}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.proc.log() if self.proc else ""

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()

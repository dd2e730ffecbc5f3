"""A throwaway OpenSSH sshd for ``wicket demo`` and the tests: Debian's
/usr/sbin/sshd by absolute path, with its own config, host key and pid file
in a directory, trusting the cluster's SSH user CA (``TrustedUserCAKeys``)
and nothing else: no authorized_keys, no passwords. Its log goes to a file.

Run as root it can let in any local user (root too, with a certificate);
run as anyone else, sshd can only let in that same user.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

from gateway.local.pgserver import free_port, stop_child

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = "/usr/bin/ssh-keygen"

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


class SshdError(RuntimeError):
    pass


def missing() -> str | None:
    """Why sshd cannot run here (a binary is missing), or None."""
    for tool in (SSHD, SSH_KEYGEN):
        if not os.path.exists(tool):
            return f"{tool} is missing; install the Debian package openssh-server (requirements/apt.txt)"
    return None


def prepare(directory: Path, user_ca: Path, port: int, *, host_cert: Callable[[Path], str] | None = None,
            comment: str = "wicket-node", extra_config: str = "") -> tuple[Path, str]:
    """An sshd's files in ``directory`` (its host key once, its config for
    ``port``, /run/sshd): the config's path and the host public key line.
    ``host_cert``: given the host public key's path, the host certificate
    line to present (HostCertificate); ``extra_config``: more sshd_config
    lines. Run ``sshd -D -e -f CONFIG``."""
    directory.mkdir(parents=True, exist_ok=True)
    try:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    except PermissionError:
        pass  # not root: sshd does not separate privileges then
    key = directory / "ssh_host_ed25519_key"
    if not key.exists():
        subprocess.run([SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(key)], check=True)
    host_key = (directory / "ssh_host_ed25519_key.pub").read_text().strip()
    shutil.copy(user_ca, directory / "user_ca.pub")
    extra = ""
    if host_cert is not None:
        cert = directory / "ssh_host_ed25519_key-cert.pub"
        if not cert.exists():
            cert.write_text(host_cert(directory / "ssh_host_ed25519_key.pub").strip() + "\n")
        extra = f"HostCertificate {cert}\n"
    config = directory / "sshd_config"
    config.write_text(CONFIG.format(port=port, dir=directory, ca=directory / "user_ca.pub") + extra + extra_config)
    check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True, text=True)
    if check.returncode:
        raise SshdError(f"sshd refused its config:\n{check.stderr}")
    return config, host_key


class SshServer:
    """``start()``/``stop()`` an sshd under ``directory`` on a free loopback
    port; ``host_key`` is its public host key line once started."""

    def __init__(self, directory: Path, user_ca: Path, *, host_cert: Callable[[Path], str] | None = None,
                 env: dict[str, str] | None = None, extra_config: str = "") -> None:
        self.dir, self.user_ca, self.host_cert, self.env = directory, user_ca, host_cert, env
        self.extra_config = extra_config
        self.log_path = directory / "sshd.log"
        self.port = 0
        self.host_key = ""
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> None:
        for _attempt in range(5):  # a free port can be taken before sshd binds it
            self.port = free_port()
            config, self.host_key = prepare(self.dir, self.user_ca, self.port, host_cert=self.host_cert,
                                            extra_config=self.extra_config)
            start = self.log_path.stat().st_size if self.log_path.exists() else 0
            with open(self.log_path, "ab") as log:
                self._proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=log, stderr=log,
                                              stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if "Server listening" in self.log(start):
                    return
                if self._proc.poll() is not None:
                    break
                time.sleep(0.02)
            else:
                raise SshdError(f"sshd did not start within {timeout:.0f}s; see {self.log_path}")
            self.stop()
        raise SshdError(f"sshd did not start:\n{self.log()[-3000:]}")

    def log(self, start: int = 0) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(start)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 15.0) -> None:
        stop_child(self._proc, signal.SIGTERM, timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

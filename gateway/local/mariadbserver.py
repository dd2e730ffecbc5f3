"""A throwaway MariaDB server: ``mariadb-install-db`` in a directory, TLS
with a server CA made here, client certificates from the cluster's database
client CA accepted (accounts ``REQUIRE SUBJECT '/CN=<user>'``), the
``ed25519`` auth plugin loaded, started on a free loopback port. Used by
``wicket demo`` and by the integration tests.

Everything is on the command line after ``--no-defaults``: no my.cnf of the
machine's changes it. As root, the server runs as root (``--user=root``),
which mariadbd otherwise refuses. The superuser (``root@localhost``) logs in
over the server's unix socket without a password.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from gateway.identity import pki
from gateway.local.pgserver import free_port, stop_child


class MariaDbError(RuntimeError):
    pass


def find_mariadbd() -> tuple[str, str]:
    """The server binary and mariadb-install-db (Debian: /usr/sbin, /usr/bin)."""
    server = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/libexec")
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if not server or not install:
        raise MariaDbError("MariaDB server binaries not found (mariadbd, mariadb-install-db); install the "
                           "Debian package mariadb-server (./dev test installs it from requirements/apt.txt)")
    return server, install


class MariaDbServer:
    """``start()``/``stop()`` a MariaDB instance under ``base``.

    ``client_ca_pem``: the CA whose certificates the server verifies (the
    cluster's database client CA). The server's own TLS certificate is
    signed by a CA made here (``server_ca_path``), so a cluster can verify
    it with verify-full. ``extra_args``: more server options.
    """

    def __init__(self, base: Path, *, client_ca_pem: bytes, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.mariadbd, self.install_db = find_mariadbd()
        self.port = port or free_port()
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.datadir = base / "data"
        self.socket = base / "mysqld.sock"
        self.server_ca_path = base / "mariadb-server-ca.crt"
        self.log_path = base / "mariadbd.log"
        self._client_ca_pem = client_ca_pem
        self._extra = extra_args
        self._proc: subprocess.Popen | None = None

    def _user(self) -> list[str]:
        return ["--user=root"] if os.geteuid() == 0 else []

    def init(self) -> None:
        if (self.datadir / "mysql").is_dir():
            return
        r = subprocess.run([self.install_db, "--no-defaults", f"--datadir={self.datadir}", *self._user(),
                            "--auth-root-authentication-method=socket", "--skip-test-db",
                            "--skip-name-resolve"],
                           capture_output=True, text=True, timeout=180)
        if r.returncode != 0:
            raise MariaDbError(f"mariadb-install-db failed ({r.returncode}): {(r.stderr or r.stdout)[-2000:]}")
        now = pki.utcnow()
        server_ca = pki.CertificateAuthority.create("wicket test mariadb server CA", now=now)
        key = pki.generate_key()
        cert = server_ca.issue_host_cert(key.public_key(), ["localhost", "127.0.0.1"], now=now)
        tls = self.base / "tls"
        tls.mkdir(mode=0o700, exist_ok=True)
        (tls / "server.crt").write_bytes(pki.cert_to_pem(cert))
        key_path = tls / "server.key"
        key_path.write_bytes(pki.key_to_pem(key))
        os.chmod(key_path, 0o600)
        (tls / "client-ca.crt").write_bytes(self._client_ca_pem)
        self.server_ca_path.write_bytes(server_ca.pem)

    def start(self, timeout: float = 60.0) -> None:
        self.init()
        tls = self.base / "tls"
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [self.mariadbd, "--no-defaults", f"--datadir={self.datadir}", *self._user(),
             f"--port={self.port}", "--bind-address=127.0.0.1", f"--socket={self.socket}",
             f"--pid-file={self.base / 'mariadbd.pid'}", f"--log-error={self.log_path}",
             "--skip-name-resolve", "--skip-log-bin", "--plugin-load-add=auth_ed25519",
             f"--ssl-cert={tls / 'server.crt'}", f"--ssl-key={tls / 'server.key'}",
             f"--ssl-ca={tls / 'client-ca.crt'}", "--tls-version=TLSv1.2,TLSv1.3",
             "--max-connections=500", "--max-allowed-packet=256M", "--local-infile=1",
             "--innodb-buffer-pool-size=128M", "--innodb-flush-log-at-trx-commit=0",
             "--innodb-doublewrite=0", "--character-set-server=utf8mb4", *self._extra],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise MariaDbError(f"mariadbd exited ({self._proc.returncode}): "
                                   f"{self.log_path.read_text(errors='replace')[-2000:]}")
            r = subprocess.run(["mysqladmin", "--no-defaults", f"--socket={self.socket}", "-uroot",
                                "--connect-timeout=2", "ping"], capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.05)
        raise MariaDbError(f"mariadbd did not become ready within {timeout:.0f}s; see {self.log_path}")

    def sql(self, statement: str, database: str | None = None) -> str:
        """Run SQL as the superuser over the unix socket; tab-separated rows."""
        # mariadb-install-db made root@localhost and, run by anyone else, an
        # account of that OS user's name: unix_socket logs each in as itself.
        superuser = "root" if os.geteuid() == 0 else getpass.getuser()
        args = ["mysql", "--no-defaults", f"--socket={self.socket}", f"-u{superuser}", "-N", "-B", "-e", statement]
        if database:
            args.append(database)
        r = subprocess.run(args, capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise MariaDbError(f"mysql failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        return r.stdout

    def stop(self, timeout: float = 30.0) -> None:
        stop_child(self._proc, signal.SIGTERM, timeout)  # SIGTERM: a normal shutdown

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

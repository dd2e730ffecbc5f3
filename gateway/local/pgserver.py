"""A throwaway PostgreSQL server: ``initdb`` in a directory, certificate
authentication against the cluster's database client CA, started on a free
loopback port. Used by ``wicket demo`` and by the integration tests.

PostgreSQL refuses to run as root; when we are root the server runs as the
``postgres`` system user (created by Debian's package), in a data directory
that user owns (under a fresh directory in /tmp if the requested one is not
reachable by other users).
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from gateway.identity import pki


class PgServerError(RuntimeError):
    pass


def find_bindir() -> Path:
    """The directory with initdb/postgres (Debian keeps them off PATH)."""
    candidates = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(Path(out.stdout.strip()))
    root = Path("/usr/lib/postgresql")
    if root.is_dir():
        candidates += sorted((p / "bin" for p in root.iterdir()), reverse=True)
    for d in candidates:
        if (d / "initdb").exists() and (d / "postgres").exists():
            return d
    raise PgServerError(
        "PostgreSQL server binaries not found (initdb, postgres); install the Debian package "
        "postgresql-15 (./dev test installs it from requirements/apt.txt)"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_child(proc: subprocess.Popen | None, sig: int, timeout: float) -> None:
    """Stop a server we started with ``sig``; killed if it is not gone within ``timeout`` seconds."""
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _traversable_by_others(path: Path) -> bool:
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.stat().st_mode & 0o001:
            return False
    return True


class PgServer:
    """``start()``/``stop()`` a PostgreSQL instance under ``base``.

    ``client_ca_pem``: the CA whose certificates PostgreSQL accepts for
    ``cert`` authentication (the cluster's database client CA). The server's
    own TLS certificate is signed by a CA made here (``server_ca_path``), so a
    cluster can verify it with verify-full.
    """

    def __init__(self, base: Path, *, client_ca_pem: bytes, port: int | None = None,
                 hba_extra: str = "") -> None:
        self.bindir = find_bindir()
        self.port = port or free_port()
        self.run_as: str | None = None
        if os.geteuid() == 0:
            self.run_as = "postgres"
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PgServerError("running as root needs the 'postgres' system user") from None
            self._uid, self._gid = pw.pw_uid, pw.pw_gid
            if not _traversable_by_others(base):
                base = Path(tempfile.mkdtemp(prefix="wicket-pg-"))
                os.chmod(base, 0o711)
        base.mkdir(parents=True, exist_ok=True)
        self.base = base
        self.datadir = base / "pgdata"
        self.sockdir = base / "pgsock"
        self.server_ca_path = base / "pg-server-ca.crt"
        self._client_ca_pem = client_ca_pem
        self._hba_extra = hba_extra
        self._proc: subprocess.Popen | None = None
        self.log_path = base / "postgres.log"

    # -- helpers -------------------------------------------------------------

    def _chown(self, path: Path) -> None:
        if self.run_as:
            os.chown(path, self._uid, self._gid)

    def _as_user(self) -> dict:
        # Popen switches user itself (no su/runuser in between), so the pid
        # we hold is the server's and our signals reach it.
        if not self.run_as:
            return {}
        return {"user": self._uid, "group": self._gid, "extra_groups": [], "cwd": "/"}

    def _run(self, *args: str, input: str | None = None) -> str:
        r = subprocess.run(list(args), capture_output=True, text=True, input=input, timeout=120,
                           **self._as_user())
        if r.returncode != 0:
            raise PgServerError(f"{Path(args[0]).name} failed ({r.returncode}): {r.stderr.strip()[-2000:]}")
        return r.stdout

    def _write(self, path: Path, data: bytes, mode: int) -> None:
        path.write_bytes(data)
        os.chmod(path, mode)
        self._chown(path)

    # -- lifecycle -------------------------------------------------------------

    def init(self) -> None:
        if (self.datadir / "PG_VERSION").exists():
            return
        for d in (self.datadir, self.sockdir):
            d.mkdir(parents=True, exist_ok=True)
            os.chmod(d, 0o700)
            self._chown(d)
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                  "--auth-local=trust", "--auth-host=reject", "-E", "UTF8", "--locale=C.UTF-8")
        now = pki.utcnow()
        server_ca = pki.CertificateAuthority.create("wicket test postgres server CA", now=now)
        key = pki.generate_key()
        cert = server_ca.issue_host_cert(key.public_key(), ["localhost", "127.0.0.1"], now=now)
        self._write(self.datadir / "server.crt", pki.cert_to_pem(cert), 0o644)
        self._write(self.datadir / "server.key", pki.key_to_pem(key), 0o600)
        self._write(self.datadir / "client-ca.crt", self._client_ca_pem, 0o644)
        self.server_ca_path.write_bytes(server_ca.pem)
        conf = (
            "\nlisten_addresses = '127.0.0.1'\n"
            "ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n"
            "ssl_ca_file = 'client-ca.crt'\nssl_min_protocol_version = 'TLSv1.2'\n"
            "max_connections = 300\nshared_buffers = 64MB\nfsync = off\n"
            "synchronous_commit = off\nfull_page_writes = off\n"
            "password_encryption = 'scram-sha-256'\n"
        )
        with open(self.datadir / "postgresql.conf", "a") as f:
            f.write(conf)
        hba = (
            "# Written by wicket: local admin over the socket; over TCP, users\n"
            "# authenticate with a certificate from the cluster's db client CA,\n"
            "# except the password users the tests and the demo define below.\n"
            "local all all trust\n"
            f"{self._hba_extra}"
            "hostssl all all 127.0.0.1/32 cert\n"
        )
        self._write(self.datadir / "pg_hba.conf", hba.encode(), 0o600)

    def start(self, timeout: float = 60.0) -> None:
        self.init()
        log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            # Port and socket directory on the command line, so a data
            # directory can be started again on another free port.
            [str(self.bindir / "postgres"), "-D", str(self.datadir), "-p", str(self.port),
             "-k", str(self.sockdir)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True, **self._as_user(),
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise PgServerError(f"postgres exited ({self._proc.returncode}): "
                                    f"{self.log_path.read_text(errors='replace')[-2000:]}")
            r = subprocess.run([str(self.bindir / "pg_isready"), "-h", str(self.sockdir), "-p",
                                str(self.port), "-U", "postgres"], capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.05)
        raise PgServerError(f"postgres did not become ready within {timeout:.0f}s; see {self.log_path}")

    def sql(self, statement: str, dbname: str = "postgres") -> str:
        """Run SQL as the superuser over the local socket."""
        return self._run(str(self.bindir / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h",
                         str(self.sockdir), "-p", str(self.port), "-U", "postgres", "-d", dbname,
                         "-tA", "-c", statement)

    def stop(self, timeout: float = 30.0) -> None:
        # SIGINT: PostgreSQL's "fast" shutdown (disconnect clients, checkpoint).
        stop_child(self._proc, signal.SIGINT, timeout)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

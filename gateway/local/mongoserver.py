"""A throwaway MongoDB wire server for ``wicket demo`` and the tests:
mongoeco (a MongoDB server in Python) run by ``mongoeco_server.py`` beside
this file, one SCRAM user, a plain port and, with a certificate, a TLS port
in front of it (with a client CA, X.509 login as that user).

mongoeco needs Python >= 3.13, which the project's own interpreter may not
be, so it runs in its own virtual environment, made on first use and kept
in ``$WICKET_CACHE`` (default ``~/.cache/wicket``) as ``mongoeco-<hash>/``:
the pinned packages of ``mongoeco-requirements.txt`` (beside this file);
``<hash>`` changes with that file, so a new pin makes a new venv. The
Python is ``$WICKET_MONGOECO_PYTHON``, else ``python3.13``/``python3.14``
on PATH, else pyenv's newest 3.13+. Nothing of mongoeco's is imported into
the project's process.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

from gateway.identity import pki

HERE = Path(__file__).resolve().parent
REQUIREMENTS = HERE / "mongoeco-requirements.txt"
SERVER_SCRIPT = HERE / "mongoeco_server.py"
INSTALL_TIMEOUT = 900


class Unavailable(RuntimeError):
    """A part cannot be had on this machine (the message says why and what
    to do): the demo goes on without it, tests skip with it."""


def cache_dir() -> Path:
    root = os.environ.get("WICKET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wicket")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _python_ok(path: str) -> bool:
    try:
        r = subprocess.run([path, "-c", "import sys; sys.exit(sys.version_info < (3, 13))"],
                           capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def find_python() -> str:
    """A Python >= 3.13 for mongoeco's venv."""
    candidates = [os.environ.get("WICKET_MONGOECO_PYTHON", "")]
    candidates += [shutil.which(name) or "" for name in ("python3.13", "python3.14")]
    pyenv_root = os.environ.get("PYENV_ROOT") or os.path.expanduser("~/.pyenv")
    candidates += sorted(glob.glob(os.path.join(pyenv_root, "versions", "3.1[3-9]*", "bin", "python3")),
                         reverse=True)
    for candidate in candidates:
        if candidate and _python_ok(candidate):
            return candidate
    raise Unavailable("mongoeco needs Python >= 3.13 and none was found: install one "
                      "(pyenv install 3.13) or set WICKET_MONGOECO_PYTHON to its path")


class _Locked:
    """An exclusive lock file: two processes never build one venv at once."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __enter__(self):
        self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _run_install(args: list[str], what: str, cwd: Path | None = None) -> None:
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=INSTALL_TIMEOUT, cwd=cwd)
    except subprocess.TimeoutExpired:
        raise Unavailable(f"{what} took over {INSTALL_TIMEOUT}s (is the package registry reachable?)") from None
    if r.returncode != 0:
        raise Unavailable(f"{what} failed ({r.returncode}); is the package registry reachable?\n"
                          f"{r.stdout[-2000:]}\n{r.stderr[-4000:]}")


def venv_dir() -> Path:
    """Where mongoeco's venv for the current pins is (or will be)."""
    return cache_dir() / f"mongoeco-{hashlib.sha256(REQUIREMENTS.read_bytes()).hexdigest()[:12]}"


def mongoeco_python() -> Path:
    """The Python of mongoeco's venv, made on first use (see the module doc)."""
    pins = REQUIREMENTS.read_bytes()
    venv = venv_dir()
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.exists():
        return python
    with _Locked(cache_dir() / "mongoeco.lock"):
        if stamp.exists():
            return python
        if venv.exists():
            shutil.rmtree(venv)  # half made by an interrupted run
        _run_install([find_python(), "-m", "venv", str(venv)], "creating mongoeco's venv")
        _run_install([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                      "-r", str(REQUIREMENTS)], f"pip install -r {REQUIREMENTS.name}")
        stamp.write_text(pins.decode())
    return python


def make_server_tls(directory: Path, ca_name: str) -> tuple[Path, Path, Path]:
    """A server CA made here and a ``localhost`` certificate it signs, in
    ``directory``, once: the certificate's, key's (0600) and CA's paths."""
    cert, key, ca = directory / "server.crt", directory / "server.key", directory / "server-ca.crt"
    if not (cert.exists() and key.exists() and ca.exists()):
        now = pki.utcnow()
        authority = pki.CertificateAuthority.create(ca_name, now=now)
        private = pki.generate_key()
        pki.write_private(key, pki.key_to_pem(private))
        cert.write_bytes(pki.cert_to_pem(authority.issue_host_cert(private.public_key(), ["localhost"], now=now)))
        ca.write_bytes(authority.pem)
    return cert, key, ca


class MongoServer:
    """A running mongoeco with one SCRAM user (``user``/``password``), on
    ``port`` and, given a certificate, TLS on ``tls_port``; ``compressors``
    (``"zlib"``): OP_COMPRESSED as mongod's ``net.compression.compressors``
    (mongoeco has none). Stop with :meth:`stop` (closing its stdin ends it)."""

    def __init__(self, log: Path, *, user: str, password: str, mechanisms: str = "SCRAM-SHA-256,SCRAM-SHA-1",
                 tls_cert: Path | None = None, tls_key: Path | None = None, tls_ca: Path | None = None,
                 compressors: str = "") -> None:
        args = [str(mongoeco_python()), str(SERVER_SCRIPT), "--user", user, "--mechanisms", mechanisms]
        if compressors:
            args += ["--compressors", compressors]
        if tls_cert is not None:
            args += ["--tls-cert", str(tls_cert), "--tls-key", str(tls_key)]
            if tls_ca is not None:
                args += ["--tls-ca", str(tls_ca)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WICKET_", "PYTHON"))}
        env["MONGOECO_PASSWORD"] = password
        self.user, self.password = user, password
        self._log = open(log, "ab")
        self.popen = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                      env=env)
        line = self.popen.stdout.readline()  # the server prints it once listening (or exits)
        if not line:
            code = self.popen.wait()
            self._log.close()
            raise RuntimeError(f"mongoeco exited ({code}):\n{log.read_text(errors='replace')[-4000:]}")
        info = json.loads(line)
        self.port: int = info["port"]
        self.tls_port: int | None = info["tls_port"]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def uri(self, db: str = "admin") -> str:
        return (f"mongodb://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"
                f"?directConnection=true&authSource=admin&authMechanism=SCRAM-SHA-256")

    def stop(self, timeout: float = 15.0) -> int:
        if self.popen.poll() is None:
            self.popen.stdin.close()
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.popen.stdout.close()
        self._log.close()
        return self.popen.returncode

"""The paths under test and the processes behind them.

Every path ends at the same upstream process (:mod:`benchmarks.upstream`),
each on its own port of it:

``direct``   client -> upstream
``stunnel``  client -> stunnel (client mode) -> mutual TLS 1.3 -> stunnel -> upstream
``haproxy``  client -> haproxy (mode tcp) -> mutual TLS 1.3 -> haproxy -> upstream
``wicket``   client -> ``wicket proxy tcp`` -> mutual TLS 1.3 -> ``wicket-cluster`` -> upstream

Each relayed path has an *entry* process (the one the client connects to)
and an *exit* process (the one that connects to the upstream). The C pairs
use throwaway ECDSA P-256 certificates, the key type Wicket's own CAs use, so
the handshakes cost the same kind of signature.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

from gateway import kinds

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def wait_for(predicate: Callable[[], object], *, timeout: float = 30.0, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _drain(stream) -> None:
    """Keep reading a child's stdout so a chatty child never blocks on a full pipe."""
    def run():
        try:
            while stream.read(65536):
                pass
        except (OSError, ValueError):
            pass
    threading.Thread(target=run, daemon=True).start()


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if the benchmark dies, even by SIGKILL."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


@contextlib.contextmanager
def tree(root: Path):
    """Start what is started inside from the checkout at ``root`` (its
    code on PYTHONPATH, its directory the working one)."""
    global ROOT
    saved, ROOT = ROOT, root.resolve()
    try:
        yield
    finally:
        ROOT = saved


class Child:
    """A child process in its own process group (so a Ctrl-C reaches us first
    and we stop it in order), stderr to a log file."""

    def __init__(self, name: str, args: list[str], log: Path, *, stdout_pipe: bool = False,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log
        self._log = open(log, "ab")
        self.popen = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stderr=self._log,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            env=env, cwd=ROOT, start_new_session=True, preexec_fn=_die_with_parent)
        self.pid = self.popen.pid

    def readline(self, timeout: float = 30.0) -> str:
        assert self.popen.stdout is not None
        result: list[bytes] = []
        t = threading.Thread(target=lambda: result.append(self.popen.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not result or not result[0]:
            raise RuntimeError(f"{self.name} said nothing (exit {self.popen.poll()}):\n{self.log()}")
        return result[0].decode()

    def drain(self) -> None:
        if self.popen.stdout is not None:
            _drain(self.popen.stdout)

    def check(self) -> None:
        if self.popen.poll() is not None:
            raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n{self.log()[-3000:]}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.popen.poll() is None:
            try:
                os.killpg(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()


class Upstream:
    def __init__(self, work: Path, ports: int) -> None:
        self.child = Child("upstream", [PY, "-m", "benchmarks.upstream", "--ports", str(ports)],
                           work / "upstream.log", stdout_pipe=True)
        self.ports: list[int] = []
        while True:
            line = self.child.readline()
            if line.startswith("ready"):
                break
            self.ports.append(int(line.rsplit(":", 1)[1]))
        self.child.drain()
        self.pid = self.child.pid

    def stop(self) -> None:
        self.child.stop()


class BenchPath:
    """One way from the client to the upstream."""

    name = "?"
    entry_label = "entry"
    exit_label = "exit"
    #: Sockets a relay process of this path holds per client connection:
    #: what the open-files limit divides by (see run.py's idle levels).
    sockets_per_connection = 2

    def __init__(self) -> None:
        self.port = 0
        self.children: list = []

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def pids(self) -> dict[str, int]:
        """Relay processes by role: {"entry": pid, "exit": pid} (none for direct)."""
        return {}

    def _started(self, start, *args) -> None:
        """Run ``start``; if it fails, stop whatever it had started, then re-raise."""
        try:
            start(*args)
        except BaseException:
            try:
                self.stop()
            except Exception:
                pass
            raise

    def check(self) -> None:
        for c in self.children:
            c.check()

    def stop(self) -> None:
        errors = []
        for c in reversed(self.children):
            try:
                c.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(exc)
        self.children.clear()
        if errors:
            raise errors[0]


class Direct(BenchPath):
    name = "direct"

    def __init__(self, upstream_port: int) -> None:
        super().__init__()
        self.port = upstream_port


# -- throwaway PKI for the C pairs ------------------------------------------


def make_pki(directory: Path) -> dict[str, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def key_pem(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("bench CA")).issuer_name(name("bench CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=2))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False,
                                       encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                    critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .sign(ca_key, hashes.SHA256()))
        return cert.public_bytes(serialization.Encoding.PEM), key_pem(key)

    directory.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    for label, usage in (("server", ExtendedKeyUsageOID.SERVER_AUTH),
                         ("client", ExtendedKeyUsageOID.CLIENT_AUTH)):
        cert_pem, k_pem = leaf(f"bench {label}", usage)
        for suffix, data in ((".crt", cert_pem), (".key", k_pem), (".pem", cert_pem + k_pem)):
            p = directory / f"{label}{suffix}"
            p.write_bytes(data)
            os.chmod(p, 0o600)
            files[f"{label}{suffix}"] = p
    (directory / "ca.crt").write_bytes(ca_pem)
    files["ca.crt"] = directory / "ca.crt"
    return files


# -- stunnel ----------------------------------------------------------------


def stunnel_binary() -> str | None:
    return shutil.which("stunnel4") or shutil.which("stunnel")


class Stunnel(BenchPath):
    name = "stunnel"
    entry_label = "client-mode"
    exit_label = "server-mode"

    def __init__(self, work: Path, pki: dict[str, Path], upstream_port: int) -> None:
        super().__init__()
        self._started(self._start, work, pki, upstream_port)

    def _start(self, work: Path, pki: dict[str, Path], upstream_port: int) -> None:
        exe = stunnel_binary()
        if exe is None:
            raise RuntimeError("stunnel is not installed (apt-get install stunnel4)")
        self.port, mid = free_port(), free_port()
        common = ("foreground = yes\npid =\ndebug = 3\n"
                  "socket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n")
        tls = ("sslVersionMin = TLSv1.3\nsslVersionMax = TLSv1.3\n"
               f"CAfile = {pki['ca.crt']}\nverifyChain = yes\n")
        server_conf = work / "stunnel-server.conf"
        server_conf.write_text(
            common + "[bench]\n" + tls +
            f"accept = 127.0.0.1:{mid}\nconnect = 127.0.0.1:{upstream_port}\n"
            f"cert = {pki['server.crt']}\nkey = {pki['server.key']}\nrequireCert = yes\n")
        client_conf = work / "stunnel-client.conf"
        client_conf.write_text(
            common + "[bench]\nclient = yes\n" + tls +
            f"accept = 127.0.0.1:{self.port}\nconnect = 127.0.0.1:{mid}\n"
            f"cert = {pki['client.crt']}\nkey = {pki['client.key']}\ncheckHost = localhost\n")
        self.server = Child("stunnel server", [exe, str(server_conf)], work / "stunnel-server.log")
        self.children.append(self.server)
        wait_for(lambda: (self.server.check(), _listening(mid))[1], what="stunnel server")
        self.client = Child("stunnel client", [exe, str(client_conf)], work / "stunnel-client.log")
        self.children.append(self.client)
        wait_for(lambda: (self.client.check(), _listening(self.port))[1], what="stunnel client")

    def pids(self) -> dict[str, int]:
        return {"entry": self.client.pid, "exit": self.server.pid}


# -- haproxy ----------------------------------------------------------------


class Haproxy(BenchPath):
    name = "haproxy"
    entry_label = "tls-client"
    exit_label = "tls-server"

    def __init__(self, work: Path, pki: dict[str, Path], upstream_port: int, maxconn: int) -> None:
        super().__init__()
        self._started(self._start, work, pki, upstream_port, maxconn)

    def _start(self, work: Path, pki: dict[str, Path], upstream_port: int, maxconn: int) -> None:
        exe = shutil.which("haproxy")
        if exe is None:
            raise RuntimeError("haproxy is not installed (apt-get install haproxy)")
        self.port, mid = free_port(), free_port()
        head = (f"global\n    maxconn {maxconn}\n\n"
                f"defaults\n    mode tcp\n    maxconn {maxconn}\n    timeout connect 10s\n"
                "    timeout client 1h\n    timeout server 1h\n\n")
        tls = "ssl-min-ver TLSv1.3 ssl-max-ver TLSv1.3"
        server_conf = work / "haproxy-server.cfg"
        server_conf.write_text(
            head +
            f"frontend tls_in\n    bind 127.0.0.1:{mid} ssl crt {pki['server.pem']} "
            f"ca-file {pki['ca.crt']} verify required {tls}\n    default_backend upstream\n\n"
            f"backend upstream\n    server up 127.0.0.1:{upstream_port}\n")
        client_conf = work / "haproxy-client.cfg"
        client_conf.write_text(
            head +
            f"frontend plain_in\n    bind 127.0.0.1:{self.port}\n    default_backend tls_out\n\n"
            f"backend tls_out\n    server mid 127.0.0.1:{mid} ssl crt {pki['client.pem']} "
            f"ca-file {pki['ca.crt']} verify required verifyhost localhost sni str(localhost) {tls}\n")
        self.server = Child("haproxy server", [exe, "-db", "-f", str(server_conf)],
                            work / "haproxy-server.log")
        self.children.append(self.server)
        wait_for(lambda: (self.server.check(), _listening(mid))[1], what="haproxy server")
        self.client = Child("haproxy client", [exe, "-db", "-f", str(client_conf)],
                            work / "haproxy-client.log")
        self.children.append(self.client)
        wait_for(lambda: (self.client.check(), _listening(self.port))[1], what="haproxy client")

    def pids(self) -> dict[str, int]:
        return {"entry": self.client.pid, "exit": self.server.pid}


# -- wicket -----------------------------------------------------------------

_CLUSTER_CONFIG = """\
# Written by benchmarks/paths.py: one cluster, one user, one resource.
[cluster]
name = "bench"
state_dir = "{state}"
listen = "127.0.0.1:0"
public_names = ["localhost", "127.0.0.1"]
session_ttl = "8h"
max_session_ttl = "8h"

[roles.bench]
[[roles.bench.allow]]
resources = ["upstream"]
db_users = ["*"]
db_names = ["*"]
logins = ["root", "*"]

[resources.upstream]
kind = "{kind}"
address = "127.0.0.1:{port}"
{settings}"""

_PASSWORD = "benchmark password, thrown away with the run"


def _wicket_env(home: Path | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WICKET_")}
    env["PYTHONPATH"] = str(ROOT)
    if home is not None:
        env["WICKET_HOME"] = str(home)
    return env


class Wicket(BenchPath):
    # The gateway holds the client's socket, the cluster the upstream's: the
    # sessions share one multiplexed connection between them.
    sockets_per_connection = 1
    """``wicket-cluster start`` and ``wicket proxy tcp``, run the way a user
    runs them (default log level), each in its own process group."""

    name = "wicket"
    entry_label = "gateway"
    exit_label = "cluster"

    def __init__(self, work: Path, upstream_port: int, *, kind: str = "tcp", settings: str = "",
                 cluster_env: dict[str, str] | None = None, proxy_args: tuple[str, ...] = (),
                 workers: int = 1) -> None:
        """``kind``/``settings``: the resource (``settings`` are extra TOML
        lines, e.g. a postgres resource's tls and auth); the gateway runs
        ``wicket proxy tcp`` or, for postgres, ``wicket proxy db``, with
        ``proxy_args`` after. ``workers``: the cluster runs that many
        worker processes (``--workers``) and the gateway as many links to
        it (``--cluster-links``)."""
        super().__init__()
        self.kind, self.settings, self.cluster_env = kind, settings, cluster_env or {}
        self.workers = workers
        self.proxy_args = proxy_args if workers == 1 else (*proxy_args, "--cluster-links", str(workers))
        self._started(self._start, work, upstream_port)

    def _run(self, args: list[str], env: dict[str, str], what: str) -> None:
        r = subprocess.run([PY, "-m", *args], input=_PASSWORD + "\n", text=True, capture_output=True,
                           env=env, cwd=ROOT, timeout=120)
        if r.returncode != 0:
            raise RuntimeError(f"{what} failed ({r.returncode}): {r.stderr.strip()}")

    def _start(self, work: Path, upstream_port: int) -> None:
        if not (ROOT / "gateway" / "net" / "relay.py").exists():
            raise RuntimeError("gateway/net/relay.py does not exist yet")
        work.mkdir(parents=True, exist_ok=True)
        config = work / "cluster.toml"
        config.write_text(_CLUSTER_CONFIG.format(state=work / "cluster-state", port=upstream_port,
                                                 kind=self.kind, settings=self.settings))
        ready = work / "cluster.ready"
        workers = () if self.workers == 1 else ("--workers", str(self.workers))
        self.cluster = Child("wicket-cluster", [PY, "-m", "gateway.cli.cluster", "start", "--config",
                                                str(config), "--ready-file", str(ready), *workers],
                             work / "cluster.log", env={**_wicket_env(), **self.cluster_env})
        self.children.append(self.cluster)

        def is_ready():
            self.cluster.check()
            return ready.exists() and json.loads(ready.read_text())

        info = wait_for(is_ready, what="wicket-cluster's ready file")
        self._run(["gateway.cli.cluster", "users", "add", "bench", "--roles", "bench", "--password-stdin",
                   "--config", str(config)], _wicket_env(), "wicket-cluster users add")
        home = work / "home"
        self._run(["gateway.cli.wicket", "login", info["address"], "--user", "bench", "--ca-pin", info["pin"],
                   "--password-stdin"], _wicket_env(home), "wicket login")
        proxy = kinds.get(self.kind).proxy_verb  # tcp, or db
        self.gateway = Child("wicket proxy", [PY, "-m", "gateway.cli.wicket", "proxy", proxy, "upstream",
                                              "--port", "0", *self.proxy_args],
                             work / "gateway.log", stdout_pipe=True, env=_wicket_env(home))
        self.children.append(self.gateway)
        while True:
            line = self.gateway.readline()
            m = re.search(r"listening on [\d.]+:(\d+)", line)
            if m:
                self.port = int(m.group(1))
                break
        self.gateway.drain()

    def pids(self) -> dict[str, int]:
        return {"entry": self.gateway.pid, "exit": self.cluster.pid}

    def cluster_pids(self) -> list[int]:
        """The cluster's process and its workers' (``workers`` > 1)."""
        if self.workers == 1:
            return [self.cluster.pid]
        try:
            with open(f"/proc/{self.cluster.pid}/task/{self.cluster.pid}/children") as f:
                return [self.cluster.pid, *map(int, f.read().split())]
        except OSError:
            return [self.cluster.pid]


def _listening(port: int) -> bool:
    """True once something LISTENs on 127.0.0.1:port (read from /proc, so the
    probe itself opens no connection through the relay)."""
    want = f"0100007F:{port:04X}"
    for table in ("/proc/net/tcp",):
        with open(table) as f:
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[1] == want and parts[3] == "0A":
                    return True
    return False

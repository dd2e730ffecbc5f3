"""Real processes for integration tests: a cluster, gateways, upstreams.

Everything here starts an actual OS process over real sockets and waits for
readiness by polling with a deadline (a ready file, a line on stdout), never
by sleeping a fixed time.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable
PASSWORD = "correct horse battery staple"


def wait_for(predicate: Callable[[], object], *, timeout: float = 30.0, what: str = "condition",
             interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy, or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WICKET_")}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


class Proc:
    """A child process whose output goes to a log file we can read back.
    Every one still running is in :data:`LIVE` (see :func:`stop_started_since`)."""

    def __init__(self, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.log_path = log
        self._log = open(log, "ab")
        self.popen = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=self._log,
                                      stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        LIVE.append(self)

    def read_line(self, pattern: str, timeout: float = 30.0) -> re.Match:
        deadline = time.monotonic() + timeout
        assert self.popen.stdout is not None
        while time.monotonic() < deadline:
            line = self.popen.stdout.readline().decode()
            if not line:
                raise RuntimeError(f"process exited ({self.popen.wait()}):\n{self.log()}")
            m = re.search(pattern, line)
            if m:
                return m
        raise TimeoutError(f"no line matching {pattern!r}:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self in LIVE:
            LIVE.remove(self)
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                raise AssertionError(f"{self.popen.args} ignored signal {sig}:\n{self.log()}")
        if self.popen.stdout:
            self.popen.stdout.close()
        self._log.close()
        return self.popen.returncode


#: The processes started and not stopped yet, oldest first.
LIVE: list[Proc] = []


def stop_started_since(count: int) -> list[str]:
    """Stop the processes started after the first ``count`` of :data:`LIVE`
    that are still there; their command lines. A test that leaves a ``wicket
    proxy`` running leaves it retrying its cluster's port once a second for
    good: once a later test's listener gets that port, the stray proxy's
    TLS handshakes land in it."""
    left = LIVE[count:]
    for proc in reversed(left):
        proc.stop()
    return [" ".join(map(str, proc.popen.args)) for proc in left]


def established_timers(port: int) -> list[int]:
    """The kernel's timer kind (0 none, 1 retransmit, 2 keepalive) of every
    established TCP connection on this machine with 127.0.0.1:``port`` at
    either end (where the tests' servers listen)."""
    address = f"0100007F:{port:04X}"  # /proc/net/tcp's form of 127.0.0.1:port
    timers = []
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and address in (fields[1], fields[2]):
                timers.append(int(fields[5].split(":")[0], 16))
    return timers


def keepalive_everywhere(port: int) -> bool:
    """Some connections with ``port`` at one end are established, and each
    end of each has its keepalive timer running (none is left unprobed)."""
    timers = established_timers(port)
    return len(timers) >= 2 and set(timers) == {2}


def vanish_on_exit(pid: int, port: int) -> int:
    """Make the established connections of process ``pid`` on local port
    ``port`` close without a word when the process dies (no FIN, no reset),
    as if its machine had lost power: a peer learns that the connection is
    gone only from the reset its next segment meets. Returns how many.
    (Each socket is borrowed with pidfd_getfd and put in TCP_REPAIR mode by
    tests/unit/tlsutil.py's vanish, which closes only the borrowed copy.)"""
    import ctypes
    import socket

    from tests.unit.tlsutil import vanish

    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    done = 0
    try:
        for fd in established_fds(pid, port):
            mine = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd (Linux >= 5.6)
            if mine < 0:
                raise OSError(ctypes.get_errno(), f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
            vanish(socket.socket(fileno=mine))
            done += 1
    finally:
        os.close(pidfd)
    return done


def established_fds(pid: int, port: int, *, remote: bool = False) -> list[int]:
    """The descriptors of process ``pid`` that are established TCP
    connections with 127.0.0.1:``port`` at their own end (``remote``: at
    the far end), from the kernel's socket table."""
    inodes = set()
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "01" and fields[2 if remote else 1] == f"0100007F:{port:04X}":
                inodes.add(fields[9])
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            fds.append(int(fd))
    return fds


class Echo:
    def __init__(self, tmp: Path) -> None:
        self.proc = Proc([PY, "-m", "tests.servers.echo"], tmp / "echo.log", _env())
        m = self.proc.read_line(r"listening on ([\d.]+):(\d+)")
        self.host, self.port = m.group(1), int(m.group(2))

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


CONFIG = """\
[cluster]
name = "test"
state_dir = "{state}"
listen = "127.0.0.1:{port}"
session_ttl = "1h"
max_session_ttl = "2h"

[login]
max_failures = 5
failure_window = "5m"

[roles.dev]
[[roles.dev.allow]]
labels = {{ env = "dev" }}

[roles.nothing-dev]
[[roles.nothing-dev.allow]]
resources = ["*"]
[[roles.nothing-dev.deny]]
labels = {{ env = "dev" }}

[resources.echo]
kind = "tcp"
address = "{echo}"
labels = {{ env = "dev" }}
"""


class Cluster:
    def __init__(self, tmp: Path, echo: Echo, *, extra_config: str = "", env: dict[str, str] | None = None,
                 wrapper: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.wrapper = wrapper  # a command to run it under (prlimit ...)
        self.state = tmp / "cluster-state"
        self.config = tmp / "cluster.toml"
        self.port = 0
        self.env = env or {}
        self.config.write_text(CONFIG.format(state=self.state, port=0, echo=echo.address) + extra_config)
        self.proc: Proc | None = None
        self.start()

    def start(self) -> None:
        ready = self.tmp / "cluster.ready"
        ready.unlink(missing_ok=True)
        self.proc = Proc([*self.wrapper, PY, "-m", "gateway.cli.cluster", "start", "--config", str(self.config),
                          "--ready-file", str(ready)], self.tmp / "cluster.log", _env(**self.env))

        def is_ready():
            if self.proc.popen.poll() is not None:
                raise RuntimeError(f"cluster exited:\n{self.proc.log()}")
            return ready.exists() and json.loads(ready.read_text())

        info = wait_for(is_ready, what="cluster ready file")
        self.address, self.pin = info["address"], info["pin"]
        # Restart on the same port: gateways keep the address they logged in to.
        self.port = int(self.address.rsplit(":", 1)[1])
        self.config.write_text(re.sub(r'listen = "127.0.0.1:\d+"', f'listen = "127.0.0.1:{self.port}"',
                                      self.config.read_text()))

    def stop(self) -> int:
        assert self.proc is not None
        return self.proc.stop()

    def admin(self, *args: str, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        r = subprocess.run([PY, "-m", "gateway.cli.cluster", *args, "--config", str(self.config)],
                           input=input, text=True, capture_output=True, env=_env(), cwd=ROOT, timeout=60)
        if check and r.returncode != 0:
            raise AssertionError(f"wicket-cluster {' '.join(args)} failed ({r.returncode}):\n{r.stderr}")
        return r

    def add_user(self, name: str, roles: str, *extra: str) -> subprocess.CompletedProcess:
        return self.admin("users", "add", name, "--roles", roles, "--password-stdin", *extra,
                          input=PASSWORD + "\n")

    def audit(self, **filters: str) -> list[dict]:
        args = ["audit", "--format", "json"]
        for k, v in filters.items():
            args += [f"--{k}", v]
        return [json.loads(line) for line in self.admin(*args).stdout.splitlines() if line]

    def wait_audit(self, predicate: Callable[[list[dict]], bool] = bool, **filters: str) -> list[dict]:
        """The audit events matching ``filters`` once ``predicate`` holds for
        them (dial and session events reach the store in batches)."""
        return wait_for(lambda: (lambda evs: predicate(evs) and evs)(self.audit(**filters)),
                        what=f"audit events {filters}", interval=0.1)


class Gateway:
    """A user's profile directory and the wicket commands run against it."""

    def __init__(self, tmp: Path, cluster: Cluster, name: str) -> None:
        self.home = tmp / f"home-{name}"
        self.tmp = tmp
        self.cluster = cluster
        self.user = name
        self.proxies: list[Proc] = []

    @contextlib.contextmanager
    def cluster_unreachable(self):
        """The profile points at a port nobody listens on (bound, never
        listening) while the block runs: every connect is refused at once,
        as while the cluster restarts. The real address is back after it."""
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            with self._cluster_at(closed.getsockname()[1]):
                yield

    @contextlib.contextmanager
    def cluster_held(self):
        """The profile points at a port of ours while the block runs: each
        connection to it is accepted, then held until the ``release`` event
        yielded (with ``accepted``) is set, then carried to the cluster. So
        a test can act while a dial is on its way."""
        host, port = self.cluster.address.rsplit(":", 1)
        accepted, release = threading.Event(), threading.Event()
        taken: list[socket.socket] = []

        def pump(src: socket.socket, dst: socket.socket) -> None:
            try:
                while data := src.recv(65536):
                    dst.sendall(data)
                dst.shutdown(socket.SHUT_WR)
            except OSError:
                pass

        def carry(conn: socket.socket) -> None:
            release.wait()
            try:
                up = socket.create_connection((host, int(port)), timeout=30)
            except OSError:
                conn.close()
                return
            up.settimeout(None)
            taken.append(up)
            threading.Thread(target=pump, args=(conn, up), daemon=True).start()
            pump(up, conn)

        def accept(listener: socket.socket) -> None:
            while True:
                try:
                    conn, _ = listener.accept()
                except OSError:
                    return  # closed: the block is over
                taken.append(conn)
                accepted.set()
                threading.Thread(target=carry, args=(conn,), daemon=True).start()

        with socket.create_server(("127.0.0.1", 0)) as listener:
            threading.Thread(target=accept, args=(listener,), daemon=True).start()
            try:
                with self._cluster_at(listener.getsockname()[1]):
                    yield accepted, release
            finally:
                release.set()
                listener.shutdown(socket.SHUT_RDWR)
                for sock in taken:
                    sock.close()

    @contextlib.contextmanager
    def _cluster_at(self, port: int):
        """The profile's cluster address is 127.0.0.1:``port`` while the
        block runs; the real one is back after it."""
        profile = self.home / "profile.json"
        saved = profile.read_text()
        doc = json.loads(saved)
        doc["cluster_addr"] = f"127.0.0.1:{port}"
        profile.write_text(json.dumps(doc))
        try:
            yield
        finally:
            profile.write_text(saved)

    @classmethod
    def logged_in(cls, cluster: "Cluster", tmp: Path, name: str, roles: str) -> "Gateway":
        """A new user ``name`` with ``roles``, logged in."""
        cluster.add_user(name, roles)
        gateway = cls(tmp, cluster, name)
        r = gateway.login()
        assert r.returncode == 0, r.stderr
        return gateway

    def env(self) -> dict[str, str]:
        return _env(WICKET_HOME=str(self.home))

    def run(self, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run([PY, "-m", "gateway.cli.wicket", *args], input=input, text=True,
                              capture_output=True, env=self.env(), cwd=ROOT, timeout=60)

    def login(self, *extra: str, password: str = PASSWORD, pin: str | None = None) -> subprocess.CompletedProcess:
        return self.run("login", self.cluster.address, "--user", self.user, "--ca-pin",
                        pin or self.cluster.pin, "--password-stdin", *extra, input=password + "\n")

    def login_briefly(self, seconds: int) -> float:
        """Log in again for ``seconds`` (a certificate whose end a test
        waits for): the ``time.monotonic()`` by which that certificate has
        ended (the cluster made it before the login returned)."""
        r = self.login("--ttl", f"{seconds}s")
        assert r.returncode == 0, r.stderr
        return time.monotonic() + seconds

    def proxy_tcp(self, resource: str) -> tuple[Proc, int]:
        return self.proxy("tcp", resource)

    def proxy(self, kind: str, resource: str, *extra: str, wrapper: tuple[str, ...] = ()) -> tuple[Proc, int]:
        log = self.tmp / f"proxy-{self.user}-{resource}-{len(self.proxies)}.log"
        proc = Proc([*wrapper, PY, "-m", "gateway.cli.wicket", "proxy", kind, resource, "--port", "0", *extra],
                    log, self.env())
        self.proxies.append(proc)
        port = int(proc.read_line(r"listening on [\d.]+:(\d+)").group(1))
        return proc, port

    def stop(self) -> None:
        for p in self.proxies:
            p.stop()


def logged_in(tmp: Path, cluster: Cluster, name: str, roles: str, *login: str) -> Gateway:
    """A Gateway for a new user ``name`` with ``roles``, logged in
    (``login``: extra ``wicket login`` options)."""
    cluster.add_user(name, roles)
    gw = Gateway(tmp, cluster, name)
    r = gw.login(*login)
    assert r.returncode == 0, r.stderr
    return gw


def socket_inodes(pid: int) -> set[str]:
    """The inodes of process ``pid``'s sockets (to match /proc/net/tcp's
    inode column); empty once the process is gone."""
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    return inodes

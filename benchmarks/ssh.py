"""``python -m benchmarks.ssh``: OpenSSH through Wicket's two ways in, beside
a direct connection and a stunnel pair, in one run.

One throwaway OpenSSH sshd (trusting the cluster's SSH user CA), four ways in,
certificates of the same CA on each (``direct`` and ``stunnel`` use one the
benchmark signs itself with the cluster's CA for an hour, for
``wicket config ssh``'s key; ``proxycommand`` gets one per connection):

``direct``        ssh -> sshd
``stunnel``       ssh -> stunnel (client) == mutual TLS 1.3 ==> stunnel (server) -> sshd
``proxycommand``  ssh -> ProxyCommand wicket proxy ssh --stdio == mux, TLS 1.3 ==> wicket-cluster -> sshd
``terminated``    ssh -> wicket proxy ssh (asyncssh server; asyncssh client to the node) == mux ==>
                  wicket-cluster -> sshd: two SSH legs

Two workloads, interleaved per round with rotating path order:

* ``scp``: one file (1 GiB; ``--quick`` 128 MiB) uploaded to /dev/null on the
  node: MB/s;
* ``connect``: ``ssh HOST true``, ``--count`` times one after the other:
  the mean time of one, connection set-up included (what ProxyCommand mode's
  process start-up and TLS handshake cost, and terminated mode's two logins).

The table shows each and its ratio to stunnel (and to direct).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.paths import PY, ROOT, Child, Stunnel, Wicket, _wicket_env, free_port, make_pki, wait_for
from benchmarks.procstat import cpu_seconds, rss_kib
from tests.servers.sshd import SSHD, available, prepare

PATHS = ("direct", "stunnel", "proxycommand", "terminated")

#: The system calls ``--syscalls`` counts (a relay's socket reads and
#: writes and its event waits; stunnel reads and writes with read/write).
SYSCALLS = ("read", "write", "recvfrom", "sendto", "sendmsg", "epoll_wait", "epoll_ctl", "poll", "futex")


class SyscallCounter:
    """``perf stat`` counting :data:`SYSCALLS` of one process while it
    runs; :meth:`stop` returns the counts (Linux tracepoints: root, or
    ``kernel.perf_event_paranoid`` <= -1)."""

    def __init__(self, pid: int) -> None:
        events = ",".join(f"syscalls:sys_enter_{name}" for name in SYSCALLS)
        self.proc = subprocess.Popen(["perf", "stat", "-x,", "-e", events, "-p", str(pid)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def stop(self) -> dict[str, int]:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=30)
        counts = {}
        for line in err.splitlines():
            fields = line.split(",")
            if len(fields) > 2 and fields[0].strip().isdigit():
                counts[fields[2].removeprefix("syscalls:sys_enter_")] = int(fields[0])
        if not counts:
            raise RuntimeError(f"perf stat counted nothing: {err.strip()[-300:]}")
        return counts


def _random_file(path: Path, mib: int) -> Path:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))
    return path


def _sign_for_an_hour(work: Path, public_key: Path) -> Path:
    """A root certificate of the cluster's SSH user CA for ``public_key``,
    valid an hour: what the direct and stunnel paths log in with (the
    cluster itself signs only one per connection, for two minutes)."""
    import datetime as dt

    from gateway.identity import pki, sshcerts

    ca = pki.load_or_create_ssh_ca(work / "wicket" / "cluster-state")
    now = pki.utcnow()
    request = sshcerts.UserCertRequest(key_id="wicket-bench", principals=("root",), not_before=now,
                                       not_after=now + dt.timedelta(hours=1))
    cert = sshcerts.sign_user_cert(ca, sshcerts.parse_public_key(public_key.read_text()), request)
    path = work / "bench-cert.pub"
    path.write_text(sshcerts.cert_line(cert) + "\n")
    return path


class Clients:
    """The ssh command line for each path: the same user key and
    certificate, the node's host key checked everywhere."""

    def __init__(self, work: Path, wicket: Wicket, node_port: int, stunnel_port: int, host_key: str,
                 user_key: Path) -> None:
        home = work / "wicket" / "home"
        env = _wicket_env(home)
        r = subprocess.run([PY, "-m", "gateway.cli.wicket", "config", "ssh", "--wicket-command",
                            f"{PY} -m gateway.cli.wicket"], capture_output=True, text=True, env=env, cwd=ROOT,
                           timeout=60, check=True)
        self.env = env
        ssh_dir = home / "ssh"
        (work / "ssh_config").write_text(r.stdout)
        known = work / "known_hosts"
        known.write_text(f"node {' '.join(host_key.split()[:2])}\n")
        common = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "IdentitiesOnly=yes"]
        cert_file = _sign_for_an_hour(work, ssh_dir / "id_ed25519.pub")
        cert = ["-F", "/dev/null", "-i", str(ssh_dir / "id_ed25519"), "-o",
                f"CertificateFile={cert_file}", "-o", f"UserKnownHostsFile={known}",
                "-o", "HostKeyAlias=node", *common]
        gateway_known = work / "gateway_known_hosts"
        gateway_known.write_text(f"[127.0.0.1]:{wicket.port} "
                                 f"{(home / 'ssh' / 'gateway_host_key.pub').read_text().split(' wicket')[0]}\n")
        self.paths = {
            "direct": (["-p", str(node_port), *cert], "root@127.0.0.1"),
            "stunnel": (["-p", str(stunnel_port), *cert], "root@127.0.0.1"),
            "proxycommand": (["-F", str(work / "ssh_config"), *common], "root@upstream.bench"),
            "terminated": (["-F", "/dev/null", "-p", str(wicket.port), "-i", str(user_key), "-o",
                            f"UserKnownHostsFile={gateway_known}", *common], "root@127.0.0.1"),
        }

    def run(self, tool: str, path: str, *args: str, timeout: float = 3600) -> None:
        options, target = self.paths[path]
        if tool == "scp":
            options = ["-P" if o == "-p" else o for o in options]
            args = tuple(a.replace("TARGET", target) for a in args)
            command = ["scp", "-q", *options, *args]
        else:
            command = ["ssh", *options, target, *args]
        r = subprocess.run(command, capture_output=True, env=self.env, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"{path}: {' '.join(command[:2])} failed ({r.returncode}): "
                               f"{r.stderr.decode(errors='replace').strip()[-500:]}")


def start_node(work: Path, started: list) -> tuple[Wicket, int, str, Path]:
    """The node (a throwaway sshd trusting the cluster's SSH user CA) and a
    Wicket pair whose gateway serves terminated mode (``wicket proxy ssh``)
    for a user key of its own; each appended to ``started``. Returns the
    pair, the node's port, its host key line and the user's private key."""
    node_port = free_port()
    node_dir = work / "sshd"
    node_dir.mkdir()
    # The node's host key first: the cluster's resource names it, and the
    # node trusts the SSH user CA the cluster makes when it starts.
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(node_dir / "ssh_host_ed25519_key")],
                   check=True)
    host_key = (node_dir / "ssh_host_ed25519_key.pub").read_text().strip()
    user_key = work / "id_user"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(user_key)], check=True)
    wicket = Wicket(work / "wicket", node_port, kind="ssh", settings=f'host_key = "{host_key}"\n',
                    proxy_args=("--authorized-keys", f"{user_key}.pub"))
    started.append(wicket)
    config, _ = prepare(node_dir, work / "wicket" / "cluster-state" / "ssh_user_ca.pub", node_port)
    sshd = Child("sshd", [SSHD, "-D", "-e", "-f", str(config)], work / "sshd.log")
    started.append(sshd)
    wait_for(lambda: (sshd.check(), "Server listening" in sshd.log())[1], what="sshd listening")
    return wicket, node_port, host_key, user_key


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.ssh", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=1024, help="scp size in MiB (default 1024)")
    ap.add_argument("--count", type=int, default=20, help="ssh HOST true per round (default 20)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--quick", action="store_true", help="--mib 128 --count 5 --rounds 1")
    ap.add_argument("--paths", default=",".join(PATHS), help="comma-separated subset (stunnel and direct always run)")
    ap.add_argument("--syscalls", action="store_true",
                    help="also count the node-side relay's system calls per MiB of scp (needs perf, as root)")
    ap.add_argument("--format", choices=("table", "json"), default="table")
    args = ap.parse_args(argv)
    paths = tuple(p for p in PATHS if p in {"direct", "stunnel", *args.paths.split(",")})
    if args.quick:
        args.mib, args.count, args.rounds = 128, 5, 1
    why = available() or (args.syscalls and not shutil.which("perf") and "--syscalls needs perf (linux-perf)")
    if why:
        print(f"cannot run: {why}")
        return 1
    work = Path(tempfile.mkdtemp(prefix="wicket-ssh-bench-"))
    started: list = []
    try:
        wicket, node_port, host_key, user_key = start_node(work, started)
        st = Stunnel(work, make_pki(work / "pki"), node_port)
        started.append(st)
        clients = Clients(work, wicket, node_port, st.port, host_key, user_key)
        payload = _random_file(work / "payload.bin", args.mib)
        mbps: dict[str, list[float]] = {p: [] for p in paths}
        connect: dict[str, list[float]] = {p: [] for p in paths}
        for path in paths:  # warm-up: each path works, caches are hot
            clients.run("ssh", path, "true")
        # The relay's CPU per MiB on the node's side of the chain: the
        # cluster for Wicket's paths, stunnel's server for stunnel (the
        # other side is symmetric: the gateway's fdpass child, stunnel's
        # client). A load-independent view of what each byte costs.
        exit_pid = {"stunnel": st.pids()["exit"], "proxycommand": wicket.pids()["exit"],
                    "terminated": wicket.pids()["exit"]}
        cpu_ms_per_mib: dict[str, list[float]] = {p: [] for p in paths if p in exit_pid}
        # The client-side relay too where it outlives one ssh: stunnel's
        # client, and terminated mode's gateway (its two SSH legs and the
        # link), with the gateway's resident memory after each scp.
        entry_pid = {"stunnel": st.pids()["entry"], "terminated": wicket.pids()["entry"]}
        entry_cpu: dict[str, list[float]] = {p: [] for p in paths if p in entry_pid}
        entry_rss: dict[str, list[int]] = {p: [] for p in paths if p in entry_pid}
        syscalls: dict[str, list[dict[str, int]]] = {p: [] for p in paths if p in exit_pid}
        for rnd in range(args.rounds):
            order = paths[rnd % len(paths):] + paths[:rnd % len(paths)]
            for path in order:
                before = cpu_seconds(exit_pid[path]) if path in exit_pid else 0.0
                entry_before = cpu_seconds(entry_pid[path]) if path in entry_pid else 0.0
                counter = SyscallCounter(exit_pid[path]) if args.syscalls and path in exit_pid else None
                t0 = time.perf_counter()
                clients.run("scp", path, str(payload), "TARGET:/dev/null")
                mbps[path].append(args.mib * 1.048576 / (time.perf_counter() - t0))
                if counter is not None:
                    syscalls[path].append(counter.stop())
                if path in exit_pid:
                    cpu_ms_per_mib[path].append((cpu_seconds(exit_pid[path]) - before) * 1000 / args.mib)
                if path in entry_pid:
                    entry_cpu[path].append((cpu_seconds(entry_pid[path]) - entry_before) * 1000 / args.mib)
                    entry_rss[path].append(rss_kib(entry_pid[path]))
            for path in order:
                for _ in range(args.count):
                    t0 = time.perf_counter()
                    clients.run("ssh", path, "true")
                    connect[path].append((time.perf_counter() - t0) * 1000)
        result = {"mib": args.mib, "count": args.count, "rounds": args.rounds,
                  "scp_mb_per_s": {p: statistics.median(v) for p, v in mbps.items()},
                  "ssh_true_ms": {p: statistics.median(v) for p, v in connect.items()},
                  "exit_cpu_ms_per_mib": {p: statistics.median(v) for p, v in cpu_ms_per_mib.items()},
                  "entry_cpu_ms_per_mib": {p: statistics.median(v) for p, v in entry_cpu.items()},
                  "entry_rss_mib": {p: max(v) / 1024 for p, v in entry_rss.items()},
                  "scp_mb_per_s_each": mbps,
                  "load_average": os.getloadavg()[0]}
        if args.syscalls:
            result["exit_syscalls_per_mib"] = {
                p: {name: statistics.median(c.get(name, 0) for c in v) / args.mib for name in SYSCALLS}
                for p, v in syscalls.items()}
        if args.format == "json":
            print(json.dumps(result))
        else:
            print(_table(result))
        return 0
    finally:
        for thing in reversed(started):
            thing.stop()
        shutil.rmtree(work, ignore_errors=True)


def _table(r: dict) -> str:
    scp, conn = r["scp_mb_per_s"], r["ssh_true_ms"]
    rows = [f"scp of {r['mib']} MiB to /dev/null (median of {r['rounds']}) and `ssh HOST true` "
            f"(median of {r['rounds'] * r['count']})", "",
            "| path | scp MB/s | vs stunnel | vs direct | ssh true, ms | vs stunnel | vs direct |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for p in scp:
        rows.append(f"| {p} | {scp[p]:.0f} | {scp[p] / scp['stunnel']:.2f}x | {scp[p] / scp['direct']:.2f}x "
                    f"| {conn[p]:.0f} | {conn[p] / conn['stunnel']:.2f}x | {conn[p] / conn['direct']:.2f}x |")
    cpu = r["exit_cpu_ms_per_mib"]
    rows += ["", "CPU of the relay's node-side process per MiB of scp (cluster; stunnel's server): "
             + ", ".join(f"{p} {v:.2f} ms" for p, v in cpu.items())]
    rows.append("CPU of the client-side process per MiB of scp (stunnel's client; the gateway): "
                + ", ".join(f"{p} {v:.2f} ms" for p, v in r["entry_cpu_ms_per_mib"].items())
                + "; its largest resident size after an scp: "
                + ", ".join(f"{p} {v:.0f} MiB" for p, v in r["entry_rss_mib"].items()))
    rows.append("scp MB/s, each round: " + ", ".join(f"{p} " + "/".join(f"{x:.0f}" for x in v)
                                                     for p, v in r["scp_mb_per_s_each"].items()))
    for p, counts in r.get("exit_syscalls_per_mib", {}).items():
        rows.append(f"{p}: system calls of that process per MiB: "
                    + ", ".join(f"{name} {n:.1f}" for name, n in counts.items() if n >= 0.05))
    rows.append(f"load average {r['load_average']:.1f}")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())

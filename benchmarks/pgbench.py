"""``python -m benchmarks.pgbench``: pgbench through the gateway, beside a
direct connection and a stunnel pair with mutual TLS, in one run.

One throwaway PostgreSQL 15 (``gateway.local.pgserver``), four ways in:

``direct``      pgbench -> PostgreSQL
``stunnel``     pgbench -> stunnel (client) == mutual TLS 1.3 ==> stunnel (server) -> PostgreSQL
``wicket``      pgbench -> wicket proxy db == mutual TLS 1.3 ==> wicket-cluster -> PostgreSQL
                (upstream leg plain, like stunnel's: the fair comparison)
``wicket-tls``  the same, with the production default upstream leg: TLS verify-full and a
                per-connection client certificate from the cluster's db client CA

Two workloads, interleaved per round with rotating path order:

* ``-S``: select-only transactions over 4 persistent connections (TPS);
* ``-S -C``: a new connection per transaction (TPS): what connection set-up
  through each path costs, PostgreSQL's own fork and login included.

The table shows TPS and the ratio to the stunnel pair.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.paths import Stunnel, Wicket, free_port, make_pki
from benchmarks.procstat import thread_cpu
from gateway.local.pgserver import PgServer

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("direct", "stunnel", "wicket", "wicket-tls")
WORKLOADS = {"select": ["-S", "-c", "4", "-j", "2"], "connect": ["-S", "-C", "-c", "2", "-j", "2"]}
_PW_ENV = "WICKET_BENCH_PG_PASSWORD"


def _pgbench(port: int, user: str, args: list[str], seconds: int) -> tuple[float, int]:
    """(TPS, transactions)."""
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": user, "PGDATABASE": "bench"}
    r = subprocess.run(["pgbench", "-n", "-T", str(seconds), *args], capture_output=True, text=True,
                       env=env, timeout=seconds + 120)
    if r.returncode != 0:
        raise RuntimeError(f"pgbench {' '.join(args)} on port {port} failed: {r.stderr.strip()[-500:]}")
    m = re.search(r"tps = ([\d.]+)", r.stdout)
    n = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
    if not m or not n:
        raise RuntimeError(f"no tps in pgbench output:\n{r.stdout}")
    return float(m.group(1)), int(n.group(1))


def _cpu(wicket) -> dict[str, dict[str, float]]:
    """CPU seconds so far of a Wicket pair's processes, per thread name."""
    return {"gateway": thread_cpu(wicket.gateway.pid), "cluster": thread_cpu(wicket.cluster.pid)}


def _cpu_table(label: str, cpu: dict[str, dict[str, dict[str, float]]], txns: dict[str, int]) -> list[str]:
    """Rows: µs of CPU per transaction, per process and thread."""
    rows = ["", f"| CPU per {label} transaction, µs (all rounds) | thread | " + " | ".join(cpu) + " |",
            "|---|---|" + "---:|" * len(cpu)]
    for proc in ("gateway", "cluster"):
        names = sorted({t for path in cpu.values() for t in path[proc]})
        for name in ["(all)", *names]:
            cells = []
            for path, by_proc in cpu.items():
                used = by_proc[proc]
                seconds = sum(used.values()) if name == "(all)" else used.get(name, 0.0)
                cells.append(f"{seconds / max(txns[path], 1) * 1e6:.0f}")
            if name == "(all)" or any(c != "0" for c in cells):
                rows.append(f"| {proc} | {name} | " + " | ".join(cells) + " |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pgbench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=8, help="pgbench -T per measurement (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--quick", action="store_true", help="--seconds 3 --rounds 1")
    ap.add_argument("--format", choices=("table", "json"), default="table")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 3, 1
    if shutil.which("pgbench") is None:
        print("pgbench is not installed (apt-get install postgresql-client-15)")
        return 1

    work = Path(tempfile.mkdtemp(prefix="wicket-pgbench-"))
    os.chmod(work, 0o755)  # PostgreSQL may run as the postgres user under it
    started: list = []
    server = None
    try:
        pg_port = free_port()
        # The cluster for wicket-tls must exist before PostgreSQL (its db
        # client CA goes into the server's ssl_ca_file); the resource only
        # needs the port, chosen above.
        server_ca = work / "pg" / "pg-server-ca.crt"
        w_tls = Wicket(work / "wicket-tls", pg_port, kind="postgres",
                       settings=f'tls = "verify-full"\nca_file = "{server_ca}"\nserver_name = "localhost"\n'
                                f'auth = "cert"\n')
        started.append(w_tls)
        server = start_server(work, pg_port, work / "wicket-tls")
        init_database(server, pg_port, scale=4)
        server.sql("CREATE ROLE benchcert LOGIN")
        server.sql("GRANT ALL ON SCHEMA public TO benchcert", dbname="bench")
        server.sql("GRANT SELECT ON ALL TABLES IN SCHEMA public TO benchcert", dbname="bench")
        w_plain = Wicket(work / "wicket", pg_port, kind="postgres",
                         settings=f'tls = "disable"\nauth = "password"\npasswords = {{ "*" = "env:{_PW_ENV}" }}\n',
                         cluster_env={_PW_ENV: "unused: the server trusts this user"})
        started.append(w_plain)
        st = Stunnel(work, make_pki(work / "pki"), pg_port)
        started.append(st)
        routes = {"direct": (pg_port, "bench"), "stunnel": (st.port, "bench"), "wicket": (w_plain.port, "bench"),
                  "wicket-tls": (w_tls.port, "benchcert")}
        results: dict[str, dict[str, list[float]]] = {w: {p: [] for p in PATHS} for w in WORKLOADS}
        wickets = {"wicket": w_plain, "wicket-tls": w_tls}
        # CPU of the Wicket processes per workload, per thread name.
        cpu = {w: {p: {"gateway": {}, "cluster": {}} for p in wickets} for w in WORKLOADS}
        txns = {w: {p: 0 for p in wickets} for w in WORKLOADS}
        for rnd in range(args.rounds):
            order = PATHS[rnd % len(PATHS):] + PATHS[:rnd % len(PATHS)]
            for workload, wargs in WORKLOADS.items():
                for path in order:
                    port, user = routes[path]
                    before = _cpu(wickets[path]) if path in wickets else None
                    tps, n = _pgbench(port, user, wargs, args.seconds)
                    if before is not None:
                        after = _cpu(wickets[path])
                        txns[workload][path] += n
                        for proc, used in after.items():
                            for name, seconds in used.items():
                                total = cpu[workload][path][proc]
                                total[name] = total.get(name, 0.0) + seconds - before[proc].get(name, 0.0)
                    results[workload][path].append(tps)
                    print(f"[{time.strftime('%H:%M:%S')}] round {rnd + 1}/{args.rounds} {workload:7} "
                          f"{path:10} {tps:10.0f} tps", flush=True)
        medians = {w: {p: sorted(v)[len(v) // 2] for p, v in r.items()} for w, r in results.items()}
        if args.format == "json":
            print(json.dumps({"seconds": args.seconds, "rounds": args.rounds, "tps": results,
                              "median_tps": medians, "cpu_seconds": cpu, "transactions": txns},
                             indent=2))
        else:
            print(f"\n| pgbench (median of {args.rounds} x {args.seconds}s) | " + " | ".join(PATHS) + " |")
            print("|---|" + "---:|" * len(PATHS))
            labels = {"select": "-S, 4 connections, TPS ↑", "connect": "-S -C (connection per txn), TPS ↑"}
            for w, m in medians.items():
                base = m["stunnel"]
                cells = [f"{m[p]:.0f}" + ("" if p == "stunnel" else f" ({m[p] / base:.2f}x)") for p in PATHS]
                print(f"| {labels[w]} | " + " | ".join(cells) + " |")
            for w, label in (("select", "-S"), ("connect", "-S -C")):
                print("\n".join(_cpu_table(label, cpu[w], txns[w])))
        return 0
    finally:
        stop_all(started, server, work)


def start_server(work: Path, port: int, wicket_dir: Path) -> PgServer:
    """A throwaway PostgreSQL in ``work/pg`` on ``port`` that trusts the
    ``bench`` user from 127.0.0.1 and the db client CA of the Wicket pair
    in ``wicket_dir``."""
    server = PgServer(work / "pg", port=port,
                      client_ca_pem=(wicket_dir / "cluster-state" / "db_client_ca.crt").read_bytes(),
                      hba_extra="host all bench 127.0.0.1/32 trust\n")
    server.start()
    return server


def init_database(server: PgServer, port: int, *, scale: int) -> None:
    """The ``bench`` role and database, filled by ``pgbench -i``."""
    server.sql("CREATE ROLE bench LOGIN")
    server.sql("CREATE DATABASE bench OWNER bench")
    subprocess.run(["pgbench", "-i", "-s", str(scale), "-q", "-h", "127.0.0.1", "-p", str(port), "-U", "bench",
                    "bench"], check=True, capture_output=True, timeout=300)


def stop_all(started: list, server: PgServer | None, work: Path) -> None:
    """Stop the relay paths (last started first), then PostgreSQL; remove ``work``."""
    for path in reversed(started):
        try:
            path.stop()
        except Exception as exc:
            print(f"stopping {path.name}: {exc}")
    if server is not None:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

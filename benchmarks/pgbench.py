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

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks.paths import Stunnel, Wicket, free_port, make_pki, interleaved_args, ratio_cells, stop_all
from benchmarks.procstat import add_thread_cpu, cpu_table
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


def main(argv=None) -> int:
    args = interleaved_args("python -m benchmarks.pgbench", __doc__, argv, seconds_help="pgbench -T per measurement")
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
        server = PgServer(work / "pg", port=pg_port,
                          client_ca_pem=(work / "wicket-tls" / "cluster-state" / "db_client_ca.crt").read_bytes(),
                          hba_extra="host all bench 127.0.0.1/32 trust\n")
        server.start()
        server.sql("CREATE ROLE bench LOGIN")
        server.sql("CREATE ROLE benchcert LOGIN")
        server.sql("CREATE DATABASE bench OWNER bench")
        server.sql("GRANT ALL ON SCHEMA public TO benchcert", dbname="bench")
        subprocess.run(["pgbench", "-i", "-s", "4", "-q", "-h", "127.0.0.1", "-p", str(pg_port), "-U", "bench",
                        "bench"], check=True, capture_output=True, timeout=300)
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
                    before = wickets[path].thread_cpu() if path in wickets else None
                    tps, n = _pgbench(port, user, wargs, args.seconds)
                    if before is not None:
                        after = wickets[path].thread_cpu()
                        txns[workload][path] += n
                        for proc, used in after.items():
                            add_thread_cpu(cpu[workload][path][proc], before[proc], used)
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
                print(f"| {labels[w]} | " + " | ".join(ratio_cells(m, PATHS)) + " |")
            for w, label in (("select", "-S"), ("connect", "-S -C")):
                print("\n".join(cpu_table(f"{label} transaction", cpu[w], txns[w])))
        return 0
    finally:
        stop_all(started)
        if server is not None:
            server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

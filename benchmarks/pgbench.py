"""``python -m benchmarks.pgbench``: pgbench through the gateway, beside a
direct connection and a stunnel pair with mutual TLS, in one run.

One throwaway PostgreSQL 15 (``gateway.local.pgserver``), four ways in:

``direct``      pgbench -> PostgreSQL
``stunnel``     pgbench -> stunnel (client) == mutual TLS 1.3 ==> stunnel (server) -> PostgreSQL
``wicket``      pgbench -> wicket proxy db == mutual TLS 1.3 ==> wicket-cluster -> PostgreSQL
                (upstream leg plain, like stunnel's: the fair comparison)
``wicket-tls``  the same, with the production default upstream leg: TLS verify-full and a
                per-connection client certificate from the cluster's db client CA
``wicket-wN``   (``--workers N``) ``wicket`` with a cluster of N worker processes and a
                gateway with N links to it

Two workloads, interleaved per round with rotating path order:

* ``-S``: select-only transactions over 4 persistent connections (TPS);
* ``-S -C``: a new connection per transaction (TPS): what connection set-up
  through each path costs, PostgreSQL's own fork and login included.

The table shows TPS and the ratio to the stunnel pair.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

from benchmarks.dbbench import add_worker_paths, arguments, chosen_paths, measure_and_report, stop_all
from benchmarks.paths import Stunnel, Wicket, free_port, make_pki
from gateway.local.pgserver import PgServer

ROOT = Path(__file__).resolve().parents[1]
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
    args = arguments("python -m benchmarks.pgbench", __doc__, "pgbench", "apt-get install postgresql-client-15", argv)
    if args is None:
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
        server.sql("CREATE ROLE benchcert LOGIN")
        init_database(server, pg_port, scale=4)
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
        wickets = {"wicket": w_plain, "wicket-tls": w_tls}
        add_worker_paths(args, routes, wickets, started, lambda name, n: Wicket(
            work / name, pg_port, kind="postgres", workers=n,
            settings=f'tls = "disable"\nauth = "password"\npasswords = {{ "*" = "env:{_PW_ENV}" }}\n',
            cluster_env={_PW_ENV: "unused: the server trusts this user"}))
        measure_and_report("pgbench", args, chosen_paths(args, routes), WORKLOADS, routes, wickets,
                           _pgbench, "tps",
                           {"select": "-S, 4 connections, TPS ↑", "connect": "-S -C (connection per txn), TPS ↑"},
                           {"select": "-S", "connect": "-S -C"})
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


if __name__ == "__main__":
    raise SystemExit(main())

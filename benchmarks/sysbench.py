"""``python -m benchmarks.sysbench``: sysbench through the gateway, beside a
direct connection and a stunnel pair with mutual TLS, in one run.

One throwaway MariaDB 10.11 (``gateway.local.mariadbserver``), four ways in:

``direct``      sysbench -> MariaDB
``stunnel``     sysbench -> stunnel (client) == mutual TLS 1.3 ==> stunnel (server) -> MariaDB
``wicket``      sysbench -> wicket proxy db == mutual TLS 1.3 ==> wicket-cluster -> MariaDB
                (upstream leg plain, mysql_native_password: like stunnel's, the fair comparison)
``wicket-tls``  the same, with the production default upstream leg: TLS verify-full and a
                client certificate from the cluster's db client CA (REQUIRE SUBJECT)
``wicket-ab``   with ``--ab TREE``: ``wicket`` run from another checkout (an A/B of two
                commits, in the same rounds as everything else)

Workloads, interleaved per round with rotating path order, every command
audited on the Wicket paths (the cluster's default):

* ``point_select``: ``oltp_point_select``, 4 threads, prepared statements (QPS);
* ``read_write``: ``oltp_read_write``, 4 threads (QPS);
* ``connect``: a new connection per event that runs ``select 1``
  (``benchmarks/sysbench_connect.lua``), 2 threads (connections/s).

The table shows the medians and the ratio to the stunnel pair.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from pathlib import Path

from benchmarks.dbbench import add_worker_paths, arguments, chosen_paths, measure_and_report, stop_all
from benchmarks import paths
from benchmarks.paths import Stunnel, Wicket, free_port, make_pki
from gateway.local.mariadbserver import MariaDbServer

HERE = Path(__file__).resolve().parent
WORKLOADS = {
    "point_select": ["oltp_point_select", "--threads=4"],
    "read_write": ["oltp_read_write", "--threads=4"],
    "connect": [str(HERE / "sysbench_connect.lua"), "--threads=2"],
}
TABLE = ["--tables=4", "--table-size=10000"]
_PW_ENV = "WICKET_BENCH_MY_PASSWORD"
_PASSWORD = "sysbench password, thrown away with the run"
#: The ``wicket`` path's resource settings and the cluster's environment for them.
PLAIN_LEG = f'tls = "disable"\nauth = "password"\npasswords = {{ "*" = "env:{_PW_ENV}" }}\n'
PLAIN_ENV = {_PW_ENV: _PASSWORD}


def create_database(server: MariaDbServer) -> None:
    """The ``sbtest`` database and its users: ``bench`` (a password) and
    ``benchcert`` (a client certificate)."""
    server.sql("CREATE DATABASE sbtest;"
               f"CREATE USER bench@'%' IDENTIFIED VIA mysql_native_password USING PASSWORD('{_PASSWORD}');"
               "CREATE USER benchcert@'%' REQUIRE SUBJECT '/CN=benchcert';"
               "GRANT ALL ON sbtest.* TO bench@'%'; GRANT ALL ON sbtest.* TO benchcert@'%';")


def run(port: int, user: str, args: list[str], seconds: int, *, action: str = "run",
        events: int = 0) -> tuple[float, int]:
    """(queries per second, or events per second for connect; events):
    for ``seconds``, or until ``events`` (then give ``seconds`` 0)."""
    password = _PASSWORD if user == "bench" else ""
    r = subprocess.run(["sysbench", *args, *TABLE, "--mysql-host=127.0.0.1", f"--mysql-port={port}",
                        f"--mysql-user={user}", f"--mysql-password={password}", "--mysql-db=sbtest",
                        "--mysql-ssl=off", f"--time={seconds}", f"--events={events}", "--report-interval=0",
                        action], capture_output=True, text=True, timeout=seconds + 3600)
    if r.returncode != 0:
        raise RuntimeError(f"sysbench {' '.join(args)} {action} on port {port} failed: "
                           f"{(r.stderr or r.stdout).strip()[-800:]}")
    if action != "run":
        return 0.0, 0
    events = re.search(r"total number of events:\s+(\d+)", r.stdout)
    queries = re.search(r"queries:\s+\d+\s+\(([\d.]+) per sec", r.stdout)
    eps = re.search(r"transactions:\s+\d+\s+\(([\d.]+) per sec", r.stdout)
    if not events or not eps:
        raise RuntimeError(f"no rates in sysbench output:\n{r.stdout}")
    rate = float(eps.group(1)) if "connect" in args[0] else float(queries.group(1))
    return rate, int(events.group(1))


def main(argv=None) -> int:
    args = arguments("python -m benchmarks.sysbench", __doc__, "sysbench", "apt-get install sysbench", argv, ab=True)
    if args is None:
        return 1

    work = Path(tempfile.mkdtemp(prefix="wicket-sysbench-"))
    started: list = []
    server = None
    try:
        my_port = free_port()
        # The cluster for wicket-tls must exist before MariaDB (its db
        # client CA is the server's ssl-ca); the resource needs the port only.
        server_ca = work / "mariadb" / "mariadb-server-ca.crt"
        w_tls = Wicket(work / "wicket-tls", my_port, kind="mysql",
                       settings=f'tls = "verify-full"\nca_file = "{server_ca}"\nserver_name = "localhost"\n'
                                f'auth = "cert"\n')
        started.append(w_tls)
        server = MariaDbServer(work / "mariadb", port=my_port,
                               client_ca_pem=(work / "wicket-tls" / "cluster-state" / "db_client_ca.crt").read_bytes())
        server.start()
        create_database(server)
        run(my_port, "bench", ["oltp_read_write"], 0, action="prepare")
        w_plain = Wicket(work / "wicket", my_port, kind="mysql", settings=PLAIN_LEG, cluster_env=PLAIN_ENV)
        started.append(w_plain)
        st = Stunnel(work, make_pki(work / "pki"), my_port)
        started.append(st)
        routes = {"direct": (my_port, "bench"), "stunnel": (st.port, "bench"), "wicket": (w_plain.port, "bench"),
                  "wicket-tls": (w_tls.port, "benchcert")}
        wickets = {"wicket": w_plain, "wicket-tls": w_tls}
        if args.ab is not None:
            with paths.tree(args.ab):
                w_ab = Wicket(work / "wicket-ab", my_port, kind="mysql", settings=PLAIN_LEG, cluster_env=PLAIN_ENV)
            started.append(w_ab)
            routes["wicket-ab"], wickets["wicket-ab"] = (w_ab.port, "bench"), w_ab
        add_worker_paths(args, routes, wickets, started, lambda name, n: Wicket(
            work / name, my_port, kind="mysql", settings=PLAIN_LEG, cluster_env=PLAIN_ENV, workers=n))
        measure_and_report("sysbench", args, chosen_paths(args, routes), WORKLOADS, routes, wickets,
                           run, "/s",
                           {"point_select": "oltp_point_select, 4 threads, QPS ↑",
                            "read_write": "oltp_read_write, 4 threads, QPS ↑",
                            "connect": "connect + select 1, 2 threads, connections/s ↑"},
                           {w: w for w in WORKLOADS})
        return 0
    finally:
        stop_all(started, server, work)


if __name__ == "__main__":
    raise SystemExit(main())

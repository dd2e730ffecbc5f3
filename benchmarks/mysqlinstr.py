"""``python -m benchmarks.mysqlinstr``: instructions per sysbench
``oltp_point_select`` query (``--workload read_write``: per
``oltp_read_write`` transaction, 18 queries) in each thread of the gateway
or the cluster, counted by callgrind (``benchmarks/callgrind.py`` says
how, and how to read it).

One throwaway MariaDB, one Wicket pair (plain upstream leg,
mysql_native_password, every command audited), and one of its two
processes (``--side``) under ``valgrind --tool=callgrind
--separate-threads=yes``; after a warm-up the counters are zeroed,
sysbench runs ``--transactions`` events on each of 4 threads (prepared
statements, as in ``./dev bench sysbench``), and the counters are dumped.

``--tree PATH`` runs the Wicket processes from another checkout of the
repository (an A/B of two commits with the same script).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks import sysbench
from benchmarks.callgrind import arguments, count
from benchmarks.paths import Wicket, free_port, make_pki
from gateway.local.mariadbserver import MariaDbServer

WORKLOADS = {"point_select": "oltp_point_select", "read_write": "oltp_read_write"}


def _start(workload: str):
    def start(work: Path, started: list, servers: list) -> tuple:
        my_port = free_port()
        ca = make_pki(work / "pki")["ca.crt"]  # the server wants a client CA; nobody uses it here
        server = MariaDbServer(work / "mariadb", port=my_port, client_ca_pem=ca.read_bytes())
        server.start()
        servers.append(server)
        sysbench.create_database(server)
        sysbench.run(my_port, "bench", ["oltp_read_write"], 0, action="prepare")
        wicket = Wicket(work / "wicket", my_port, kind="mysql", settings=sysbench.PLAIN_LEG,
                        cluster_env=sysbench.PLAIN_ENV)
        started.append(wicket)

        def run(n: int) -> int:
            return sysbench.run(wicket.port, "bench", [WORKLOADS[workload], "--threads=4"], 0, events=4 * n)[1]

        return wicket, run, f"sysbench {WORKLOADS[workload]}"

    return start


def main(argv=None) -> int:
    args = arguments("python -m benchmarks.mysqlinstr", __doc__, "sysbench events", 300, argv,
                     lambda ap: ap.add_argument("--workload", choices=sorted(WORKLOADS), default="point_select"))
    return count(args, ("sysbench",), "wicket-mysqlinstr-", _start(args.workload))


if __name__ == "__main__":
    raise SystemExit(main())

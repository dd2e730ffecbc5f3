"""``python -m benchmarks.pginstr``: instructions per ``pgbench -S``
transaction in each thread of the gateway or the cluster, counted by
callgrind (``benchmarks/callgrind.py`` says how, and how to read it).

One throwaway PostgreSQL, one Wicket pair (plain upstream leg,
per-statement audit on), and one of its two processes (``--side``) started
under ``valgrind --tool=callgrind --separate-threads=yes``. After a
warm-up, the counters are zeroed, ``-t`` transactions run on 4
connections, and the counters are dumped: the table gives thousands of
instructions per transaction, per thread, in the order the threads were
started.

``--tree PATH`` runs the Wicket processes from another checkout of the
repository (an A/B of two commits with the same script).
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from benchmarks.callgrind import arguments, count
from benchmarks.paths import Wicket, free_port
from benchmarks.pgbench import _PW_ENV, init_database, start_server


def _pgbench(port: int, transactions: int) -> int:
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "bench", "PGDATABASE": "bench"}
    r = subprocess.run(["pgbench", "-n", "-t", str(transactions), "-S", "-c", "4", "-j", "2"],
                       capture_output=True, text=True, env=env, timeout=1800)
    m = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"pgbench failed: {r.stderr.strip()[-500:]}")
    return int(m.group(1))


def _start(work: Path, started: list, servers: list) -> tuple:
    pg_port = free_port()
    wicket = Wicket(work / "wicket", pg_port, kind="postgres",
                    settings=f'tls = "disable"\nauth = "password"\npasswords = {{ "*" = "env:{_PW_ENV}" }}\n',
                    cluster_env={_PW_ENV: "unused: the server trusts this user"})
    started.append(wicket)
    server = start_server(work, pg_port, work / "wicket")
    servers.append(server)
    init_database(server, pg_port, scale=1)
    return wicket, lambda n: _pgbench(wicket.port, n), "pgbench -S"


def main(argv=None) -> int:
    args = arguments("python -m benchmarks.pginstr", __doc__, "pgbench -t transactions", 300, argv)
    return count(args, ("pgbench",), "wicket-pginstr-", _start)


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m benchmarks.pginstr``: instructions per ``pgbench -S``
transaction in each thread of the gateway or the cluster, counted by
callgrind.

Throughput on a shared 2-core machine swings with everyone else's load;
an instruction count does not. One throwaway PostgreSQL, one Wicket pair
(plain upstream leg, per-statement audit on), and one of its two processes
(``--side``) started under ``valgrind --tool=callgrind
--separate-threads=yes``. After a warm-up, the counters are zeroed, ``-t``
transactions run on 4 connections, and the counters are dumped: the table
gives thousands of instructions per transaction, per thread, in the order
the threads were started.

Reading it: the relay engine thread (``wicket-relay``) is the one with
the most work per transaction; in the cluster the audit store's worker
thread comes next. Work done on a timer (trio's thread, the lock watcher's
store reads, log flushes) is counted per transaction too, and since
everything runs ~50 times slower under callgrind it weighs far more than
it does natively: compare those threads between two runs only loosely, the
relay thread closely (a few thousand instructions run to run).

``--tree PATH`` runs the Wicket processes from another checkout of the
repository (an A/B of two commits with the same script).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks import paths
from benchmarks.paths import Wicket, free_port
from benchmarks.dbbench import stop_all
from benchmarks.pgbench import _PW_ENV, init_database, start_server

#: What each side's command line contains (the wrapper puts only that one
#: under callgrind).
SIDES = {"gateway": "gateway.cli.wicket proxy", "cluster": "gateway.cli.cluster start"}


def _wrapper(work: Path, side: str, out: Path) -> Path:
    """A stand-in for the Python interpreter that runs ``side`` under
    callgrind and everything else as usual."""
    script = work / "python-under-callgrind"
    script.write_text(
        "#!/bin/sh\n"
        f'case "$*" in *"{SIDES[side]}"*)\n'
        f'  exec valgrind --tool=callgrind --dump-instr=no --separate-threads=yes '
        f'--callgrind-out-file={out}.%p "{paths.PY}" "$@";;\n'
        f'esac\nexec "{paths.PY}" "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def _pgbench(port: int, transactions: int) -> int:
    env = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(port), "PGUSER": "bench", "PGDATABASE": "bench"}
    r = subprocess.run(["pgbench", "-n", "-t", str(transactions), "-S", "-c", "4", "-j", "2"],
                       capture_output=True, text=True, env=env, timeout=1800)
    m = re.search(r"number of transactions actually processed: (\d+)", r.stdout)
    if r.returncode != 0 or not m:
        raise RuntimeError(f"pgbench failed: {r.stderr.strip()[-500:]}")
    return int(m.group(1))


def _per_thread(out: Path, pid: int) -> list[int]:
    """Instructions counted by the last dump, one figure per thread."""
    counts = []
    for path in sorted(glob.glob(f"{out}.{pid}.1-*")):
        m = re.search(r"^(?:summary|totals): (\d+)", Path(path).read_text(), re.M)
        counts.append(int(m.group(1)) if m else 0)
    return counts


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pginstr", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", choices=sorted(SIDES), default="cluster")
    ap.add_argument("--transactions", type=int, default=300,
                    help="pgbench -t per connection (4 connections; default 300)")
    ap.add_argument("--tree", type=Path, help="run the Wicket processes from this checkout")
    ap.add_argument("--format", choices=("table", "json"), default="table")
    args = ap.parse_args(argv)
    for tool in ("pgbench", "valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (requirements/apt.txt lists its package)")
            return 1
    if args.tree is not None:
        paths.ROOT = args.tree.resolve()
    work = Path(tempfile.mkdtemp(prefix="wicket-pginstr-"))
    os.chmod(work, 0o755)  # PostgreSQL may run as the postgres user under it
    out = work / "callgrind.out"
    real_py = paths.PY
    paths.PY = str(_wrapper(work, args.side, out))
    # Start-up under callgrind takes a minute or more.
    paths.Child.readline.__defaults__ = (600.0,)
    paths.wait_for.__kwdefaults__["timeout"] = 600.0
    started: list = []
    server = None
    try:
        pg_port = free_port()
        wicket = Wicket(work / "wicket", pg_port, kind="postgres",
                        settings=f'tls = "disable"\nauth = "password"\npasswords = {{ "*" = "env:{_PW_ENV}" }}\n',
                        cluster_env={_PW_ENV: "unused: the server trusts this user"})
        started.append(wicket)
        server = start_server(work, pg_port, work / "wicket")
        init_database(server, pg_port, scale=1)
        pid = wicket.gateway.pid if args.side == "gateway" else wicket.cluster.pid
        _pgbench(wicket.port, 20)  # warm-up: sessions open, code paths taken once
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True, timeout=300)
        n = _pgbench(wicket.port, args.transactions)
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True, timeout=300)
        deadline = time.monotonic() + 60
        while not _per_thread(out, pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        counts = _per_thread(out, pid)
        per_txn = [c / n for c in counts]
        if args.format == "json":
            print(json.dumps({"side": args.side, "transactions": n, "instructions_per_transaction": per_txn}))
        else:
            print(f"\n{args.side}, pgbench -S, {n} transactions: thousands of instructions per transaction")
            print("| thread (in start order) | k instructions / transaction |\n|---|---:|")
            for i, k in enumerate(per_txn, 1):
                print(f"| {i} | {k / 1000:.1f} |")
            print(f"| all | {sum(per_txn) / 1000:.1f} |")
        return 0
    finally:
        paths.PY = real_py
        stop_all(started, server)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

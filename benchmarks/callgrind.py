"""What the instruction-counting benchmarks share (``benchmarks.pginstr``,
``benchmarks.mysqlinstr``): one side of a Wicket pair under callgrind, its
counters zeroed after a warm-up, a fixed number of transactions, the count
per transaction for each thread.

Throughput on a shared 2-core machine swings with everyone else's load;
an instruction count does not. Reading the table: the relay engine thread
(``wicket-relay``) is the one with the most work per transaction; in the
cluster the audit store's worker thread comes next. Work done on a timer
(trio's thread, the lock watcher's store reads, log flushes) is counted per
transaction too, and since everything runs ~50 times slower under
callgrind it weighs far more than it does natively: compare those threads
between two runs only loosely, the relay thread closely (a few thousand
instructions run to run).
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
from typing import Callable

from benchmarks import paths
from benchmarks.dbbench import stop_all

#: What each side's command line contains (the wrapper puts only that one
#: under callgrind).
SIDES = {"gateway": "gateway.cli.wicket proxy", "cluster": "gateway.cli.cluster start"}

#: start(work, started, servers) -> (the Wicket pair, run(n) -> transactions
#: done, the run's label); it appends what it starts to ``started`` (paths)
#: and ``servers`` (the database server), which the caller stops.
Start = Callable[[Path, list, list], tuple]


def arguments(prog: str, doc: str, tool: str, default: int, argv=None,
              more: Callable[[argparse.ArgumentParser], None] | None = None) -> argparse.Namespace:
    """The options every counting benchmark takes (``more`` adds its own)."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if more is not None:
        more(ap)
    ap.add_argument("--side", choices=sorted(SIDES), default="cluster")
    ap.add_argument("--transactions", type=int, default=default,
                    help=f"{tool} per connection (4 connections; default {default})")
    ap.add_argument("--tree", type=Path, help="run the Wicket processes from this checkout")
    ap.add_argument("--format", choices=("table", "json"), default="table")
    return ap.parse_args(argv)


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


def _per_thread(out: Path, pid: int) -> list[int]:
    """Instructions counted by the last dump, one figure per thread."""
    counts = []
    for path in sorted(glob.glob(f"{out}.{pid}.1-*")):
        m = re.search(r"^(?:summary|totals): (\d+)", Path(path).read_text(), re.M)
        counts.append(int(m.group(1)) if m else 0)
    return counts


def count(args: argparse.Namespace, tools: tuple[str, ...], prefix: str, start: Start) -> int:
    """Start a pair with ``args.side`` under callgrind (``start``), warm it
    up, count ``args.transactions``, print the table (or JSON)."""
    for tool in (*tools, "valgrind", "callgrind_control"):
        if shutil.which(tool) is None:
            print(f"{tool} is not installed (requirements/apt.txt lists its package)")
            return 1
    if args.tree is not None:
        paths.ROOT = args.tree.resolve()
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(work, 0o755)  # a database server may run as its own user under it
    out = work / "callgrind.out"
    real_py = paths.PY
    paths.PY = str(_wrapper(work, args.side, out))
    # Start-up under callgrind takes a minute or more.
    paths.Child.readline.__defaults__ = (600.0,)
    paths.wait_for.__kwdefaults__["timeout"] = 600.0
    started: list = []
    servers: list = []
    try:
        wicket, run, label = start(work, started, servers)
        pid = wicket.gateway.pid if args.side == "gateway" else wicket.cluster.pid
        run(20)  # warm-up: sessions open, code paths taken once
        subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True, timeout=300)
        n = run(args.transactions)
        subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True, timeout=300)
        deadline = time.monotonic() + 60
        while not _per_thread(out, pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        per_txn = [c / n for c in _per_thread(out, pid)]
        if args.format == "json":
            print(json.dumps({"side": args.side, "workload": label, "transactions": n,
                              "instructions_per_transaction": per_txn}))
        else:
            print(f"\n{args.side}, {label}, {n} transactions: thousands of instructions per transaction")
            print("| thread (in start order) | k instructions / transaction |\n|---|---:|")
            for i, k in enumerate(per_txn, 1):
                print(f"| {i} | {k / 1000:.1f} |")
            print(f"| all | {sum(per_txn) / 1000:.1f} |")
        return 0
    finally:
        paths.PY = real_py
        stop_all(started, servers[0] if servers else None, work)

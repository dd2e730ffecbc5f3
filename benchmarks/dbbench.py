"""What the database benchmarks share (``benchmarks.pgbench``,
``benchmarks.sysbench``): interleaved rounds over the paths, the CPU the
Wicket processes spend per transaction by thread, and the tables."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Callable

from benchmarks.procstat import thread_cpu

#: measure(path, workload) -> (rate, transactions)
Measure = Callable[[str, str], tuple[float, int]]


def arguments(prog: str, doc: str, tool: str, install: str, argv=None, *,
              ab: bool = False) -> argparse.Namespace | None:
    """The options every database benchmark takes (``ab``: and ``--ab
    TREE``); None (and why) when ``tool`` is not installed."""
    ap = argparse.ArgumentParser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if ab:
        ap.add_argument("--ab", type=Path, metavar="TREE",
                        help="also a path wicket-ab: the plain-leg pair run from another checkout (an A/B of "
                             "two commits in the same rounds)")
    ap.add_argument("--workers", type=int, action="append", default=[], metavar="N",
                    help="also a path wicket-wN: the plain-leg pair with a cluster of N worker processes "
                         "and a gateway with N links to it (repeatable; an A/B of workers in the same rounds)")
    ap.add_argument("--paths", help="only these paths (comma-separated, e.g. stunnel,wicket,wicket-w2)")
    ap.add_argument("--seconds", type=int, default=8, help=f"{tool}'s time per measurement (default 8)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    ap.add_argument("--quick", action="store_true", help="--seconds 3 --rounds 1")
    ap.add_argument("--workloads", help="only these workloads (comma-separated names from the table)")
    ap.add_argument("--format", choices=("table", "json"), default="table")
    args = ap.parse_args(argv)
    if args.quick:
        args.seconds, args.rounds = 3, 1
    if shutil.which(tool) is None:
        print(f"{tool} is not installed ({install})")
        return None
    return args


def stop_all(started: list, server, work: Path) -> None:
    """Stop the paths (last started first), then the database server;
    remove the run's directory ``work``."""
    for path in reversed(started):
        try:
            path.stop()
        except Exception as exc:
            print(f"stopping {path.name}: {exc}")
    if server is not None:
        server.stop()
    shutil.rmtree(work, ignore_errors=True)


def cpu_of(wicket) -> dict[str, dict[str, float]]:
    """CPU seconds so far of a Wicket pair's processes, per thread name (a
    cluster's workers' threads summed by name)."""
    cluster: dict[str, float] = {}
    for pid in wicket.cluster_pids():
        for name, seconds in thread_cpu(pid).items():
            cluster[name] = cluster.get(name, 0.0) + seconds
    return {"gateway": thread_cpu(wicket.gateway.pid), "cluster": cluster}


def add_worker_paths(args: argparse.Namespace, routes: dict, wickets: dict, started: list,
                     make: Callable[[str, int], object], user: str = "bench") -> None:
    """The ``--workers N`` paths: ``make(name, N)`` starts each pair."""
    for n in args.workers:
        name = f"wicket-w{n}"
        w = make(name, n)
        started.append(w)
        routes[name], wickets[name] = (w.port, user), w


def chosen_paths(args: argparse.Namespace, routes: dict) -> tuple[str, ...]:
    """The paths to measure: ``--paths``, else all (stunnel always: the ratios' base)."""
    if not args.paths:
        return tuple(routes)
    wanted = args.paths.split(",")
    unknown = set(wanted) - set(routes)
    if unknown:
        raise SystemExit(f"unknown paths {', '.join(sorted(unknown))}: the names are {', '.join(routes)}")
    return tuple(p for p in routes if p in wanted or p == "stunnel")


def run_rounds(paths: tuple[str, ...], workloads: tuple[str, ...], wickets: dict, rounds: int,
               measure: Measure, unit: str):
    """Every workload on every path, ``rounds`` times, the path order rotated
    per round. Returns (rates[workload][path] list, cpu[workload][path][proc]
    {thread: seconds}, transactions[workload][path]) for the Wicket paths."""
    results = {w: {p: [] for p in paths} for w in workloads}
    cpu = {w: {p: {"gateway": {}, "cluster": {}} for p in wickets} for w in workloads}
    txns = {w: {p: 0 for p in wickets} for w in workloads}
    for rnd in range(rounds):
        order = paths[rnd % len(paths):] + paths[:rnd % len(paths)]
        for workload in workloads:
            for path in order:
                before = cpu_of(wickets[path]) if path in wickets else None
                rate, n = measure(path, workload)
                if before is not None:
                    after = cpu_of(wickets[path])
                    txns[workload][path] += n
                    for proc, used in after.items():
                        for name, seconds in used.items():
                            total = cpu[workload][path][proc]
                            total[name] = total.get(name, 0.0) + seconds - before[proc].get(name, 0.0)
                results[workload][path].append(rate)
                print(f"[{time.strftime('%H:%M:%S')}] round {rnd + 1}/{rounds} {workload:12} "
                      f"{path:10} {rate:10.1f} {unit}", flush=True)
    return results, cpu, txns


def medians(results: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, float]]:
    return {w: {p: sorted(v)[len(v) // 2] for p, v in r.items()} for w, r in results.items()}


def ratio_table(title: str, paths: tuple[str, ...], meds: dict[str, dict[str, float]],
                labels: dict[str, str], fmt: str = "{:.0f}") -> list[str]:
    """Rows: each workload's median per path, with its ratio to stunnel."""
    rows = [f"| {title} | " + " | ".join(paths) + " |", "|---|" + "---:|" * len(paths)]
    for w, m in meds.items():
        base = m["stunnel"]
        cells = [fmt.format(m[p]) + ("" if p == "stunnel" else f" ({m[p] / base:.2f}x)") for p in paths]
        rows.append(f"| {labels[w]} | " + " | ".join(cells) + " |")
    return rows


def cpu_table(label: str, cpu: dict[str, dict[str, dict[str, float]]], txns: dict[str, int]) -> list[str]:
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


def measure_and_report(tool: str, args: argparse.Namespace, paths: tuple[str, ...], workloads: dict[str, list[str]],
                       routes: dict[str, tuple[int, str]], wickets: dict, run_one, unit: str,
                       labels: dict[str, str], cpu_labels: dict[str, str]) -> None:
    """Run every workload on every path (``run_one(port, user, workload's
    args, seconds) -> (rate, transactions)``) and print the tables, or
    JSON under ``--format json``."""

    if args.workloads:
        wanted = args.workloads.split(",")
        unknown = set(wanted) - set(workloads)
        if unknown:
            raise SystemExit(f"unknown workloads {', '.join(sorted(unknown))}: the names are {', '.join(workloads)}")
        workloads = {w: a for w, a in workloads.items() if w in wanted}
        labels = {w: label for w, label in labels.items() if w in wanted}
        cpu_labels = {w: label for w, label in cpu_labels.items() if w in wanted}

    def measure(path: str, workload: str) -> tuple[float, int]:
        port, user = routes[path]
        return run_one(port, user, workloads[workload], args.seconds)

    results, cpu, txns = run_rounds(paths, tuple(workloads), wickets, args.rounds, measure, unit)
    meds = medians(results)
    if args.format == "json":
        print(json.dumps({"seconds": args.seconds, "rounds": args.rounds, "rates": results, "median_rates": meds,
                          "cpu_seconds": cpu, "transactions": txns}, indent=2))
        return
    print()
    print("\n".join(ratio_table(f"{tool} (median of {args.rounds} x {args.seconds}s)", paths, meds, labels)))
    for w, label in cpu_labels.items():
        print("\n".join(cpu_table(label, cpu[w], txns[w])))

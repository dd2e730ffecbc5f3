"""``python -m benchmarks``: the relay measured beside a direct connection and
two C proxy pairs, in one run, on one machine. See benchmarks/README.md.

This module starts and stops the processes (the upstream, each path's
relays: benchmarks/paths.py); benchmarks/relaytests.py runs the tests over
them, benchmarks/relayreport.py prints what they measured."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import tempfile
import time
import traceback
from pathlib import Path

from benchmarks import load, procstat
from benchmarks.paths import ROOT, BenchPath, Direct, Haproxy, Stunnel, Upstream, Wicket, make_pki
from benchmarks.relayreport import machine, print_report
from benchmarks.relaytests import ALL_TESTS, Bench, log, wakeup_probe
from benchmarks.upstream import raise_nofile

ALL_PATHS = ("direct", "stunnel", "haproxy", "wicket")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes and counts: about a minute and a half")
    ap.add_argument("--paths", default=",".join(ALL_PATHS), help=f"comma-separated subset of {ALL_PATHS}")
    ap.add_argument("--tests", default=",".join(ALL_TESTS), help=f"comma-separated subset of {ALL_TESTS}")
    ap.add_argument("--size", type=int, help="bulk MiB each way per path (default 1024, --quick 64)")
    ap.add_argument("--busy-size", type=int, help="MiB across the busy connections per path (default 1024, quick 256)")
    ap.add_argument("--busy-conns", type=int, default=200)
    ap.add_argument("--latency-count", type=int, help="64-byte round trips per path (default 20000, quick 4000)")
    ap.add_argument("--connect-count", type=int, help="sequential connections per path (default 1000, quick 200)")
    ap.add_argument("--idle", help="idle connection levels (default 1000,10000; quick 1000)")
    ap.add_argument("--rounds", type=int, help="interleaved rounds (default 4, quick 2)")
    ap.add_argument("--format", choices=("table", "json"), default="table",
                    help="json: also write the results to --output")
    ap.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "latest.json"))
    ap.add_argument("--keep", action="store_true", help="keep the work directory (configs, logs)")
    a = ap.parse_args(argv)
    q = a.quick
    a.size = a.size or (64 if q else 1024)
    a.busy_size = a.busy_size or (256 if q else 1024)
    a.latency_count = a.latency_count or (4000 if q else 20000)
    a.connect_count = a.connect_count or (200 if q else 1000)
    a.rounds = a.rounds or (2 if q else 4)
    a.idle = [int(x) for x in (a.idle or ("1000" if q else "1000,10000")).split(",")]
    a.paths = [p for p in a.paths.split(",") if p]
    a.tests = [t for t in a.tests.split(",") if t]
    for p in a.paths:
        if p not in ALL_PATHS:
            ap.error(f"unknown path {p!r}")
    for t in a.tests:
        if t not in ALL_TESTS:
            ap.error(f"unknown test {t!r}")
    return a


def _summary(exc: BaseException) -> str:
    """The first line of an error, plus the child's last alert line if it has one."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    tail = [ln for ln in lines[1:] if any(w in ln.lower() for w in ("alert", "error", "fatal", "cannot"))]
    return lines[0] + (" " + tail[-1] if tail else "")


def _sigterm(signum, frame):
    raise KeyboardInterrupt


def start_paths(args, work: Path, upstream: Upstream, status: dict, paths: dict[str, BenchPath]) -> None:
    """Start each path asked for in front of its upstream port, and probe it
    end to end: those ready go in ``paths``; every path's status (ready, or
    why not) in ``status``."""
    hard = args.nofile_hard
    pki = make_pki(work / "pki") if {"stunnel", "haproxy"} & set(args.paths) else {}
    p: BenchPath
    for i, name in enumerate(args.paths):
        port = upstream.ports[i]
        try:
            if name == "direct":
                p = Direct(port)
            elif name == "stunnel":
                p = Stunnel(work, pki, port)
            elif name == "haproxy":
                p = Haproxy(work, pki, port, maxconn=min(max(args.idle), (hard - 600) // 2) + 100)
            else:
                p = Wicket(work / "wicket", port)
        except Exception as exc:  # the constructor stopped whatever it had started
            msg = _summary(exc)
            log(f"{name}: cannot start: {msg}")
            status[name] = {"status": "error", "error": msg}
            continue
        paths[name] = p
        try:
            load.connects(p.address, 1)  # one end-to-end probe before it counts as ready
        except Exception as exc:
            del paths[name]
            p.stop()
            msg = f"probe connection failed: {exc!r}"
            log(f"{name}: {msg}")
            status[name] = {"status": "error", "error": msg}
            continue
        status[name] = {"status": "ok", "entry": p.entry_label if p.pids() else "",
                        "exit": p.exit_label if p.pids() else "", "port": p.port, "pids": p.pids()}
        log(f"{name}: listening on 127.0.0.1:{p.port}")


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even if started with SIGINT ignored
    hard = raise_nofile()  # children inherit the raised soft limit
    # A C relay process holds two sockets per connection, Wicket's one (see
    # BenchPath.sockets_per_connection): each path's idle levels stay under
    # the hard limit we cannot raise (no CAP_SYS_RESOURCE in a container).
    args.nofile_hard = hard
    if max(args.idle) > (hard - 600) // 2:
        log(f"open-files hard limit is {hard}: a path holding two sockets per connection is held at "
            f"{(hard - 600) // 2} connections where a level asks for more (noted under the table)")
    work = Path(tempfile.mkdtemp(prefix="wicket-bench-"))
    started = time.monotonic()
    doc = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine(),
        "options": {k: v for k, v in vars(args).items() if k not in ("output", "format", "keep")},
        "paths": {}, "metrics": {}, "detail": {},
    }
    busy0 = procstat.machine_busy_seconds()
    time.sleep(1.0)
    doc["other_load_before_cpus"] = round(procstat.machine_busy_seconds() - busy0, 2)
    if doc["other_load_before_cpus"] > 0.2:
        log(f"WARNING: before starting, other processes keep {doc['other_load_before_cpus']:.1f} of "
            f"{os.cpu_count()} CPUs busy: the figures will be skewed")
    upstream = None
    paths: dict[str, BenchPath] = {}
    failed = False
    try:
        upstream = Upstream(work, len(args.paths))
        log(f"upstream on ports {upstream.ports} (work dir {work})")
        start_paths(args, work, upstream, doc["paths"], paths)
        if not paths:
            raise RuntimeError("no path could be started")
        doc["machine"].update(wakeup_probe(upstream))
        bench = Bench(args, paths, upstream)
        bench.warmup()
        for test in ALL_TESTS:
            if test in args.tests:
                bench.run_test(test)
        doc["metrics"] = {k: {p: round(v, 3) for p, v in vals.items()} for k, vals in bench.metrics.items()}
        doc["detail"] = bench.detail
        doc["per_round_ratios"] = bench.per_round_ratios()
        doc["idle_capped"] = [{"path": n, "asked": a, "held": h} for (n, a), h in bench.capped.items()]
        # CPUs' worth of work done by processes other than ours, per test
        # (other jobs, kernel threads such as ksoftirqd): should be near 0.
        doc["other_load_cpus"] = bench.foreign
        for name, msg in bench.failures.items():
            doc["paths"][name].update(status="failed", error=msg)
            failed = True  # keep the logs
        doc["elapsed_seconds"] = round(time.monotonic() - started, 1)
        # Order the columns as asked, ready paths only.
        doc["paths"] = {n: doc["paths"][n] for n in args.paths if n in doc["paths"]}
        print_report(doc, args)
        if args.format == "json":
            out = Path(args.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
            log(f"results written to {out}")
        return 1 if failed else 0
    except KeyboardInterrupt:
        failed = True
        log("interrupted: stopping everything")
        return 130
    except Exception:
        failed = True
        traceback.print_exc()
        return 1
    finally:
        for p in paths.values():
            try:
                p.stop()
            except Exception as exc:
                log(f"stopping {p.name}: {exc}")
        if upstream is not None:
            upstream.stop()
        if failed or args.keep:
            log(f"logs and configs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

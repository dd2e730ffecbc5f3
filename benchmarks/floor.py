"""``python -m benchmarks.floor``: how close any CPython relay can get to
stunnel on the 64-byte round trip, on this machine.

Three pairs in front of one upstream, measured interleaved: the stunnel
pair, the least Python a TLS relay pair can be (``benchmarks/minrelay.py``:
an epoll loop over SSLObject + MemoryBIO, nothing else), and Wicket's
gateway + cluster. If the bare Python pair is already above stunnel, a
round-trip target of stunnel's latency needs native code in the
per-message path, not a leaner Python one; the gap between it and Wicket
is what Wicket's own work per message (multiplexing, flow control,
bookkeeping) costs. See benchmarks/README.md, "The Python floor".
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import load, procstat
from benchmarks.paths import Stunnel, Upstream, Wicket, free_port, make_pki
from benchmarks.relaytests import pct

WARMUP = 200  # load.round_trips' own warm-up exchanges, which run under the CPU meter too


def _minimal_pair(pki: dict[str, Path], upstream_port: int) -> tuple[list[subprocess.Popen], int]:
    entry_port, exit_port = free_port(), free_port()
    procs: list[subprocess.Popen] = []
    try:
        _start_minimal(procs, pki, upstream_port, entry_port, exit_port)
    except BaseException:
        for proc in procs:  # not the caller's to stop yet
            proc.kill()
            proc.wait()
        raise
    return procs, entry_port


def _start_minimal(procs: list[subprocess.Popen], pki: dict[str, Path], upstream_port: int, entry_port: int,
                   exit_port: int) -> None:
    for mode, listen, target, who in (("exit", exit_port, upstream_port, "server"),
                                      ("entry", entry_port, exit_port, "client")):
        proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.minrelay", mode, str(listen), str(target), str(pki["ca.crt"]),
             str(pki[f"{who}.crt"]), str(pki[f"{who}.key"])],
            stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
        procs.append(proc)
        if proc.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"minrelay {mode} did not start")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=10000, help="64-byte round trips per path and round")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (order alternates)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="wicket-floor-"))
    upstream = Upstream(work, 3)
    started: list = []
    minimal: list[subprocess.Popen] = []
    try:
        pki = make_pki(work / "pki")
        stunnel = Stunnel(work, pki, upstream.ports[0])
        started.append(stunnel)
        minimal, minimal_port = _minimal_pair(pki, upstream.ports[1])
        wicket = Wicket(work / "wicket", upstream.ports[2])
        started.append(wicket)
        paths = {
            "stunnel": (stunnel.address, list(stunnel.pids().values())),
            "python floor": (("127.0.0.1", minimal_port), [p.pid for p in minimal]),
            "wicket": (wicket.address, list(wicket.pids().values())),
        }
        samples: dict[str, list[float]] = {name: [] for name in paths}
        user = dict.fromkeys(paths, 0.0)
        system = dict.fromkeys(paths, 0.0)
        metered = dict.fromkeys(paths, 0)
        names = list(paths)

        def times(pids: list[int]) -> tuple[float, float]:
            both = [procstat.cpu_times(pid) for pid in pids]
            return sum(u for u, _ in both), sum(s for _, s in both)

        for rnd in range(args.rounds):
            for name in names[rnd % len(names):] + names[:rnd % len(names)]:
                address, pids = paths[name]
                u0, s0 = times(pids)
                samples[name] += load.round_trips(address, args.count, warmup=WARMUP)
                u1, s1 = times(pids)
                user[name] += u1 - u0
                system[name] += s1 - s0
                metered[name] += args.count + WARMUP
        base = pct(samples["stunnel"], 50)
        print(f"\n| 64 B round trip ({args.rounds} x {args.count}) | p50 µs | p99 µs "
              f"| relay CPU per round trip µs: user | system |")
        print("|---|---:|---:|---:|---:|")
        for name, s in samples.items():
            p50 = pct(s, 50)
            ratio = "" if name == "stunnel" else f" ({p50 / base:.2f}x)"
            print(f"| {name} | {p50 * 1e6:.0f}{ratio} | {pct(s, 99) * 1e6:.0f} | "
                  f"{user[name] / metered[name] * 1e6:.0f} | {system[name] / metered[name] * 1e6:.0f} |")
        return 0
    finally:
        for proc in minimal:
            proc.kill()
            proc.wait()
        for path in reversed(started):
            path.stop()
        upstream.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())

"""The relay benchmark's tests (idle, bulk, busy, latency, connect), each
run over every path in interleaved rounds with the CPU of every process
involved metered; the figures and details for benchmarks/relayreport.py.
``python -m benchmarks`` (benchmarks/run.py) starts the paths and runs them."""

from __future__ import annotations

import os
import statistics
import sys
import time

from benchmarks import load, procstat
from benchmarks.paths import BenchPath, Upstream

# idle first: it reads resident memory, which is only comparable while the
# relays' heaps have not yet been grown (and, in Python, kept) by bulk buffers.
ALL_TESTS = ("idle", "bulk", "busy", "latency", "connect")
MiB = 1 << 20
GiB = 1 << 30
MB = 1e6


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- CPU bookkeeping ----------------------------------------------------------


class CpuMeter:
    """utime+stime deltas of every process involved in one path's measurement:
    its relays (by role), the upstream, and this process (the client)."""

    def __init__(self, path: BenchPath, upstream_pid: int) -> None:
        self.pids = dict(path.pids())
        self.pids["upstream"] = upstream_pid

    def snapshot(self) -> dict[str, float]:
        out = {role: procstat.cpu_seconds(pid) for role, pid in self.pids.items()}
        out["client"] = procstat.self_cpu_seconds()
        return out

    @staticmethod
    def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: after[k] - before[k] for k in before}


def _add(acc: dict[str, float], d: dict[str, float]) -> None:
    for k, v in d.items():
        acc[k] = acc.get(k, 0.0) + v


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    if not s:
        return float("nan")
    i = min(len(s) - 1, max(0, int(round(q / 100 * (len(s) - 1)))))
    return s[i]


# -- the measurements -----------------------------------------------------------


class Bench:
    def __init__(self, args, paths: dict[str, BenchPath], upstream: Upstream) -> None:
        self.args = args
        self.paths = dict(paths)  # the ones still being measured (main() stops all it started)
        self.upstream = upstream
        self.meters = {name: CpuMeter(p, upstream.pid) for name, p in paths.items()}
        self.metrics: dict[str, dict[str, float]] = {}
        self.detail: dict[str, dict] = {name: {} for name in paths}
        self.failures: dict[str, str] = {}
        self.all_paths = dict(paths)
        self.foreign: dict[str, float] = {}
        self.current = "warm-up"
        self.capped: dict[tuple[str, int], int] = {}  # (path, level asked) -> connections held
        # metric -> path -> round -> value: the figure each interleaved round
        # gave (see per_round_ratios).
        self.rounds: dict[str, dict[str, dict[int, float]]] = {}

    def order(self, rnd: int) -> list[str]:
        """Paths in a different order every round, so drift hits all alike."""
        names = list(self.paths)
        k = rnd % len(names)
        return names[k:] + names[:k]

    def timed(self, name: str, fn, *a):
        """Run one measurement on one path: (result, CPU deltas), or None if
        the path failed; a failed path is dropped from the rest of the run
        (and reported), the others carry on."""
        meter = self.meters[name]
        try:
            self.paths[name].check()
            before = meter.snapshot()
            result = fn(*a)
            after = meter.snapshot()
        except (OSError, RuntimeError, TimeoutError) as exc:
            self.fail(name, exc)
            return None
        return result, CpuMeter.delta(before, after)

    def fail(self, name: str, exc: BaseException) -> None:
        msg = f"{self.current}: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        log(f"{name} FAILED during {msg}; dropping it from the rest of the run")
        self.failures[name] = msg
        del self.paths[name]

    def warmup(self) -> None:
        for name, p in list(self.paths.items()):
            log(f"warm-up {name}")
            def warm(addr=p.address):
                load.connects(addr, 20)
                load.round_trips(addr, 500, warmup=0)
                load.upload(addr, 16 * MiB)
                load.download(addr, 16 * MiB)
            self.timed(name, warm)

    def bulk(self) -> None:
        a = self.args
        rounds = a.rounds
        per = a.size * MiB // rounds
        acc = {n: {"up_s": 0.0, "down_s": 0.0, "bytes": 0, "cpu": {}, "cpu_up": {}, "cpu_down": {},
                  "up_rates": [], "down_rates": []}
               for n in self.paths}
        for r in range(rounds):
            for name in self.order(r):
                addr = self.paths[name].address
                r_up = self.timed(name, load.upload, addr, per)
                r_down = r_up and self.timed(name, load.download, addr, per)
                if not r_down:
                    continue
                (up, cu), (down, cd) = r_up, r_down
                st = acc[name]
                st["up_s"] += up
                st["down_s"] += down
                st["bytes"] += 2 * per
                st["up_rates"].append(per / up / MB)
                st["down_rates"].append(per / down / MB)
                self.round_figure("bulk_up", name, r, per / up / MB)
                self.round_figure("bulk_down", name, r, per / down / MB)
                _add(st["cpu"], cu)
                _add(st["cpu"], cd)
                _add(st["cpu_up"], cu)
                _add(st["cpu_down"], cd)
                log(f"bulk round {r + 1}/{rounds} {name}: up {per / up / MB:.0f} MB/s, "
                    f"down {per / down / MB:.0f} MB/s")
        for name, st in acc.items():
            if name not in self.paths:
                continue
            moved = per * rounds
            self.metric("bulk_up", name, moved / st["up_s"] / MB)
            self.metric("bulk_down", name, moved / st["down_s"] / MB)
            gib = st["bytes"] / GiB
            cpu = {k: v / gib for k, v in st["cpu"].items()}
            relays = [k for k in cpu if k in ("entry", "exit")]
            if relays:
                self.metric("cpu_entry", name, cpu["entry"])
                self.metric("cpu_exit", name, cpu["exit"])
                self.metric("cpu_relays", name, cpu["entry"] + cpu["exit"])
            self.metric("cpu_client", name, cpu["client"])
            self.metric("cpu_upstream", name, cpu["upstream"])
            wall = st["up_s"] + st["down_s"]
            self.detail[name]["bulk"] = {
                "bytes_each_way": moved, "rounds": rounds,
                "upload_MBps_per_round": [round(x, 1) for x in st["up_rates"]],
                "download_MBps_per_round": [round(x, 1) for x in st["down_rates"]],
                "cpu_seconds": {k: round(v, 3) for k, v in st["cpu"].items()},
                "cpu_utilisation": {k: round(v / wall, 3) for k, v in st["cpu"].items()},
                # Per direction: where upload and download differ, and why.
                "cpu_seconds_per_GiB_upload": {k: round(v / (gib / 2), 3) for k, v in st["cpu_up"].items()},
                "cpu_seconds_per_GiB_download": {k: round(v / (gib / 2), 3) for k, v in st["cpu_down"].items()},
                "cpu_utilisation_upload": {k: round(v / st["up_s"], 3) for k, v in st["cpu_up"].items()},
                "cpu_utilisation_download": {k: round(v / st["down_s"], 3) for k, v in st["cpu_down"].items()},
                "wall_seconds": round(wall, 3),
            }

    def busy(self) -> None:
        a = self.args
        rounds = max(1, a.rounds // 2)
        per = a.busy_size * MiB // rounds
        acc = {n: {"s": 0.0, "bytes": 0, "cpu": {}} for n in self.paths}
        for r in range(rounds):
            for name in self.order(r):
                r_ = self.timed(name, load.busy, self.paths[name].address, a.busy_conns, per)
                if not r_:
                    continue
                secs, cpu = r_
                moved = (per // a.busy_conns) * a.busy_conns
                acc[name]["s"] += secs
                acc[name]["bytes"] += moved
                _add(acc[name]["cpu"], cpu)
                log(f"busy round {r + 1}/{rounds} {name}: {a.busy_conns} connections, "
                    f"{moved / secs / MB:.0f} MB/s")
        for name, st in acc.items():
            if name not in self.paths:
                continue
            self.metric("busy", name, st["bytes"] / st["s"] / MB)
            self.detail[name]["busy"] = {
                "connections": a.busy_conns, "bytes": st["bytes"], "seconds": round(st["s"], 3),
                "cpu_seconds": {k: round(v, 3) for k, v in st["cpu"].items()},
                "cpu_utilisation": {k: round(v / st["s"], 3) for k, v in st["cpu"].items()},
            }

    def latency(self) -> None:
        a = self.args
        per = a.latency_count // a.rounds
        samples = {n: [] for n in self.paths}
        cpu = {n: {} for n in self.paths}
        executed = {n: 0 for n in self.paths}
        for r in range(a.rounds):
            for name in self.order(r):
                executed[name] += per + 200  # round_trips' own warm-up runs under the meter too
                r_ = self.timed(name, load.round_trips, self.paths[name].address, per)
                if not r_:
                    continue
                s = r_[0]
                samples[name] += s
                _add(cpu[name], r_[1])
                self.round_figure("rtt_p50", name, r, pct(s, 50) * 1e6)
                log(f"latency round {r + 1}/{a.rounds} {name}: p50 {pct(s, 50) * 1e6:.0f} µs, "
                    f"p99 {pct(s, 99) * 1e6:.0f} µs")
        for name, s in samples.items():
            if name not in self.paths:
                continue
            if "entry" in cpu[name]:
                self.metric("rtt_cpu", name, (cpu[name]["entry"] + cpu[name]["exit"]) / executed[name] * 1e6)
            self.metric("rtt_p50", name, pct(s, 50) * 1e6)
            self.metric("rtt_p99", name, pct(s, 99) * 1e6)
            self.detail[name]["latency"] = {
                "count": len(s), "size": 64, "mean_us": round(statistics.fmean(s) * 1e6, 2),
                "p90_us": round(pct(s, 90) * 1e6, 2), "p999_us": round(pct(s, 99.9) * 1e6, 2),
                "max_us": round(max(s) * 1e6, 2),
                "cpu_us_per_round_trip": {k: round(v / executed[name] * 1e6, 1) for k, v in cpu[name].items()},
            }

    def connect(self) -> None:
        a = self.args
        per = a.connect_count // a.rounds
        samples = {n: [] for n in self.paths}
        cpu = {n: {} for n in self.paths}
        for r in range(a.rounds):
            for name in self.order(r):
                r_ = self.timed(name, load.connects, self.paths[name].address, per)
                if not r_:
                    continue
                s, c = r_
                samples[name] += s
                _add(cpu[name], c)
                self.round_figure("conn_p50", name, r, pct(s, 50) * 1e3)
                log(f"connect round {r + 1}/{a.rounds} {name}: p50 {pct(s, 50) * 1e3:.2f} ms, "
                    f"p99 {pct(s, 99) * 1e3:.2f} ms")
        for name, s in samples.items():
            if name not in self.paths:
                continue
            if "entry" in cpu[name]:
                self.metric("conn_cpu", name, (cpu[name]["entry"] + cpu[name]["exit"]) / len(s) * 1e3)
            self.metric("conn_p50", name, pct(s, 50) * 1e3)
            self.metric("conn_p99", name, pct(s, 99) * 1e3)
            self.detail[name]["connect"] = {
                "count": len(s), "mean_ms": round(statistics.fmean(s) * 1e3, 3),
                "max_ms": round(max(s) * 1e3, 3),
                "cpu_ms_per_connection": {k: round(v / len(s) * 1e3, 3) for k, v in cpu[name].items()},
            }

    def idle(self) -> None:
        for name in list(self.paths):
            if self.paths[name].pids():
                try:
                    self.idle_one(name)
                except (OSError, RuntimeError, TimeoutError, ConnectionError) as exc:
                    self.fail(name, exc)

    def idle_one(self, name: str) -> None:
        """Idle connections held through one relay at a time (not interleaved:
        each level is a state, not a rate). RSS per connection at each level
        is (RSS at that level - RSS before the first) / level."""
        path = self.paths[name]
        pids = path.pids()
        path.check()
        base = {role: procstat.rss_kib(pid) for role, pid in pids.items()}
        base_fds = {role: procstat.open_fds(pid) for role, pid in pids.items()}
        holder = load.IdleHolder(path.address)
        info = {"baseline_rss_kib": base, "levels": {}}
        self.detail[name]["idle"] = info
        prev_level, prev_rss = 0, base
        try:
            cap = (self.args.nofile_hard - 600) // path.sockets_per_connection
            for asked in self.args.idle:
                level = min(asked, cap)
                if level < asked:
                    self.capped[(name, asked)] = level
                secs = holder.fill(level)
                time.sleep(1.0)  # let every hop finish its bookkeeping
                path.check()
                rss = {role: procstat.rss_kib(pid) for role, pid in pids.items()}
                per = {role: (rss[role] - base[role]) / level for role in pids}
                info["levels"][level] = {
                    "open_seconds": round(secs, 3),
                    "opened_per_second": round(level / secs, 1),
                    "rss_kib": rss,
                    "kib_per_connection": {k: round(v, 2) for k, v in per.items()},
                    # the slope from the previous level: what one more connection costs
                    "marginal_kib_per_connection": {
                        role: round((rss[role] - prev_rss[role]) / (level - prev_level), 2) for role in pids},
                    "fds": {role: procstat.open_fds(pid) for role, pid in pids.items()},
                    "threads": {role: procstat.threads(pid) for role, pid in pids.items()},
                    "smaps_rollup_kib": {role: {k: v for k, v in procstat.smaps_rollup(pid).items()
                                                if k in ("Rss", "Pss", "Private_Dirty", "Anonymous")}
                                         for role, pid in pids.items()},
                }
                self.metric(f"idle_{asked}_entry", name, per["entry"])
                self.metric(f"idle_{asked}_exit", name, per["exit"])
                self.metric(f"idle_{asked}", name, per["entry"] + per["exit"])
                self.metric(f"idle_{asked}_rate", name, level / secs)
                prev_level, prev_rss = level, rss
                log(f"idle {name}: {level} connections held (opened in {secs:.1f} s, "
                    f"{level / secs:.0f}/s); KiB/conn entry {per['entry']:.1f}, exit {per['exit']:.1f}")
        finally:
            holder.close()
            # Wait for the relay to let go before anything else runs.
            t0 = time.monotonic()

            def settled():
                return all(procstat.open_fds(pid) <= base_fds[role] + 8 for role, pid in pids.items())
            while not settled() and time.monotonic() < t0 + 120:
                time.sleep(0.1)
            info["released"] = settled()
            info["release_seconds"] = round(time.monotonic() - t0, 2)
            info["rss_after_release_kib"] = {role: procstat.rss_kib(pid) for role, pid in pids.items()}

    def own_cpu_seconds(self) -> float:
        """CPU time of every process this benchmark runs (relays of every
        path, the upstream, this process), dead ones excepted."""
        total = procstat.self_cpu_seconds()
        pids = {self.upstream.pid}
        for p in self.all_paths.values():
            pids.update(p.pids().values())
        for pid in pids:
            try:
                total += procstat.cpu_seconds(pid)
            except OSError:
                pass
        return total

    def run_test(self, test: str) -> None:
        """Run one test over every path; note how much CPU the rest of the
        machine used meanwhile (another job on a shared box skews everything)."""
        self.current = test
        t0, busy0, own0 = time.monotonic(), procstat.machine_busy_seconds(), self.own_cpu_seconds()
        getattr(self, test)()
        wall = time.monotonic() - t0
        foreign = (procstat.machine_busy_seconds() - busy0) - (self.own_cpu_seconds() - own0)
        self.foreign[test] = round(max(0.0, foreign) / wall, 2)
        log(f"{test} done in {wall:.0f} s (other load meanwhile: {self.foreign[test]:.2f} CPUs)")

    def metric(self, key: str, path: str, value: float) -> None:
        self.metrics.setdefault(key, {})[path] = value

    def round_figure(self, key: str, path: str, rnd: int, value: float) -> None:
        self.rounds.setdefault(key, {}).setdefault(path, {})[rnd] = value

    def per_round_ratios(self, ref: str = "stunnel") -> dict[str, dict[str, list[float]]]:
        """metric -> path -> its ratio to ``ref`` in each round both measured.
        A round's paths run back to back, so a ratio within one round is
        spared most of the drift that moves this machine's absolute figures
        by 15 % between rounds: the spread of these ratios says how firmly a
        pooled ratio in the table stands."""
        out: dict[str, dict[str, list[float]]] = {}
        for key, by_path in self.rounds.items():
            base = by_path.get(ref, {})
            for path, values in by_path.items():
                if path != ref:
                    ratios = [round(v / base[r], 3) for r, v in sorted(values.items()) if base.get(r)]
                    if ratios:
                        out.setdefault(key, {})[path] = ratios
        return out


def wakeup_probe(upstream: Upstream, count: int = 3000) -> dict[str, float]:
    """Round-trip p50 on the direct path with the client and the upstream
    pinned to the same CPU, then to different CPUs: what one cross-CPU wake-up
    costs on this machine (a virtual machine's idle vCPU can take tens of
    microseconds to wake), which every hop of every relay pays now and then."""
    if (os.cpu_count() or 1) < 2:
        return {}
    addr = ("127.0.0.1", upstream.ports[0])
    mine = os.sched_getaffinity(0)
    theirs = os.sched_getaffinity(upstream.pid)
    out = {}
    try:
        for label, (c, u) in (("same_cpu", (0, 0)), ("cross_cpu", (0, 1))):
            os.sched_setaffinity(0, {c})
            for tid in os.listdir(f"/proc/{upstream.pid}/task"):  # pooled threads too
                os.sched_setaffinity(int(tid), {u})
            s = load.round_trips(addr, count)
            out[f"rtt_p50_{label}_us"] = round(pct(s, 50) * 1e6, 1)
    finally:
        os.sched_setaffinity(0, mine)
        os.sched_setaffinity(upstream.pid, theirs)
        # the pooled echo thread keeps the pin: give it back the full set too
        for tid in os.listdir(f"/proc/{upstream.pid}/task"):
            try:
                os.sched_setaffinity(int(tid), theirs)
            except OSError:
                pass
    return out


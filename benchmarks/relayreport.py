"""The relay benchmark's report: the table of figures beside stunnel, and
what the machine and the code measured were."""

from __future__ import annotations

import os
import platform
import shutil
import ssl
import subprocess

from benchmarks.paths import ROOT
from benchmarks.upstream import raise_nofile


# -- the table ----------------------------------------------------------------

# key, label, unit, format, better ("high" / "low")
ROWS = [
    ("bulk_up", "bulk upload (client -> sink)", "MB/s", "{:.0f}", "high"),
    ("bulk_down", "bulk download (source -> client)", "MB/s", "{:.0f}", "high"),
    ("busy", "{busy} busy connections, aggregate", "MB/s", "{:.0f}", "high"),
    ("rtt_p50", "64 B round trip, p50", "µs", "{:.0f}", "low"),
    ("rtt_p99", "64 B round trip, p99", "µs", "{:.0f}", "low"),
    ("conn_p50", "connect + 16 B round trip, p50", "ms", "{:.2f}", "low"),
    ("conn_p99", "connect + 16 B round trip, p99", "ms", "{:.2f}", "low"),
    ("rtt_cpu", "relay CPU per 64 B round trip, both", "µs", "{:.0f}", "low"),
    ("conn_cpu", "relay CPU per connection set-up, both", "ms", "{:.2f}", "low"),
    ("idle_{level}", "RSS per idle connection @{level}, both", "KiB", "{:.1f}", "low"),
    ("idle_{level}_entry", "  entry side", "KiB", "{:.1f}", "low"),
    ("idle_{level}_exit", "  exit side", "KiB", "{:.1f}", "low"),
    ("idle_{level}_rate", "  opening rate (64 in flight)", "conn/s", "{:.0f}", "high"),
    ("cpu_relays", "relay CPU per GiB relayed, both", "s", "{:.2f}", "low"),
    ("cpu_entry", "  entry side", "s", "{:.2f}", "low"),
    ("cpu_exit", "  exit side", "s", "{:.2f}", "low"),
    ("cpu_client", "load generator CPU per GiB", "s", "{:.2f}", "low"),
    ("cpu_upstream", "upstream CPU per GiB", "s", "{:.2f}", "low"),
]


def expand_rows(args) -> list[tuple]:
    rows = []
    level_rows = [r for r in ROWS if "{level}" in r[0]]
    for key, label, unit, fmt, better in ROWS:
        if "{level}" not in key:
            rows.append((key, label.format(busy=args.busy_conns), unit, fmt, better))
        elif key == level_rows[0][0]:
            for level in args.idle:
                for k, lab, u, f, b in level_rows:
                    rows.append((k.format(level=level), lab.format(level=level), u, f, b))
    return rows


def render_table(doc: dict, args) -> str:
    names = [n for n in doc["paths"] if doc["paths"][n]["status"] in ("ok", "failed")]
    metrics = doc["metrics"]
    header = ["figure", "unit"] + names
    lines = []
    for key, label, unit, fmt, better in expand_rows(args):
        if key not in metrics:
            continue
        vals = metrics[key]
        ref = vals.get("stunnel")
        cells = []
        for n in names:
            v = vals.get(n)
            if v is None:
                cells.append("-")
                continue
            text = fmt.format(v)
            if ref and n != "stunnel":
                text += f" ({v / ref:.2f}x)"
            cells.append(text)
        arrow = "↑" if better == "high" else "↓"
        lines.append([f"{label} {arrow}", unit] + cells)
    widths = [max(len(str(r[i])) for r in [header] + lines) for i in range(len(header))]
    out = []
    for j, row in enumerate([header] + lines):
        out.append("| " + " | ".join(str(c).ljust(widths[i]) if i < 2 else str(c).rjust(widths[i])
                                     for i, c in enumerate(row)) + " |")
        if j == 0:
            out.append("|" + "|".join("-" * (w + 2) if i < 2 else "-" * (w + 1) + ":"
                                      for i, w in enumerate(widths)) + "|")
    names_map = "; ".join(f"{n}: entry = {doc['paths'][n]['entry']}, exit = {doc['paths'][n]['exit']}"
                          for n in names if doc["paths"][n].get("entry"))
    notes = [f"({doc['date']}; ratio in brackets = path / stunnel; ↑ higher is better, ↓ lower is better; "
             f"MB = 10^6 bytes)", names_map]
    labels = {key: label for key, label, *_ in ROWS}
    for key, by_path in doc.get("per_round_ratios", {}).items():
        spreads = [f"{n} {min(r):.2f}-{max(r):.2f}x" for n, r in by_path.items() if n in names and len(r) > 1]
        if spreads:
            notes.append(f"{labels.get(key, key)}, ratio within each interleaved round (min-max): "
                         + ", ".join(spreads))
    for c in doc.get("idle_capped", []):
        notes.append(f"{c['path']}: @{c['asked']} held {c['held']} connections (two sockets per connection "
                     f"in each relay process; open-files hard limit {args.nofile_hard})")
    for n, p in doc["paths"].items():
        if p["status"] == "error":
            notes.append(f"{n}: not measured: {p['error']}")
        elif p["status"] == "failed":
            notes.append(f"{n}: FAILED during {p['error']} (figures before the failure are shown)")
    return "\n".join(out + [""] + [x for x in notes if x])


# -- machine description --------------------------------------------------------


def _first_line(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not installed"
    for line in (r.stdout + r.stderr).splitlines():
        if line.strip() and "inetd" not in line:
            return line.strip()
    return "?"


def machine() -> dict[str, str]:
    cpu = "?"
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem = "?"
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / (1 << 20):.1f} GiB"
    return {
        "cpu": cpu, "cpus": str(os.cpu_count()), "memory": mem,
        "kernel": platform.release(), "python": platform.python_version(),
        "python_openssl": ssl.OPENSSL_VERSION,
        "openssl": _first_line(["openssl", "version"]),
        "stunnel": _first_line([shutil.which("stunnel4") or "stunnel", "-version"]),
        "haproxy": _first_line(["haproxy", "-v"]),
        "nofile_limit": str(raise_nofile()),
        "code": _code_version(),
    }


def _code_version() -> str:
    """The commit measured, and whether the working tree had changes on top."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "gateway",
                                "protocols"], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + (" + uncommitted changes in gateway/ or protocols/" if dirty else "")


def print_report(doc: dict, args) -> None:
    """The table, then the machine, the code and the load it was measured with."""
    print(render_table(doc, args))
    print(f"\nmachine: {doc['machine']['cpu']}, {doc['machine']['cpus']} CPUs, {doc['machine']['memory']}; "
          f"Linux {doc['machine']['kernel']}; Python {doc['machine']['python']} "
          f"({doc['machine']['python_openssl']}); {doc['machine']['stunnel']}; {doc['machine']['haproxy']}")
    m = doc["machine"]
    print(f"code: {m['code']}")
    if "rtt_p50_same_cpu_us" in m:
        print(f"loopback 64 B round trip, client and upstream pinned: same CPU {m['rtt_p50_same_cpu_us']:.0f} µs, "
              f"different CPUs {m['rtt_p50_cross_cpu_us']:.0f} µs (cross-CPU wake-ups dominate latency here)")
    other = doc["other_load_cpus"]
    print("other load during each test (CPUs busy outside the benchmark's processes): "
          + ", ".join(f"{t} {v:.2f}" for t, v in other.items()))
    if any(v > 0.2 for v in other.values()):
        print("WARNING: something else was using the CPUs during this run; absolute figures are "
              "skewed (the interleaved ratios less so). Rerun on a quiet machine.")
    print(f"elapsed: {doc['elapsed_seconds']:.0f} s")

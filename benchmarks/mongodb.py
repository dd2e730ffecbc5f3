"""``python -m benchmarks.mongodb``: pymongo through the gateway, beside a
direct connection and a stunnel pair with mutual TLS, in one run.

One MongoDB wire server (mongoeco, the demo's and tests': gateway/local/mongoserver.py
makes its venv), three ways in:

``direct``   pymongo -> mongoeco (SCRAM-SHA-256 once per client)
``stunnel``  pymongo -> stunnel (client) == mutual TLS 1.3 ==> stunnel (server) -> mongoeco
``wicket``   pymongo -> wicket proxy mongodb == mutual TLS 1.3 ==> wicket-cluster -> mongoeco
             (no credentials on the client; the cluster logs in, checks and audits
             every command; upstream leg plain, like stunnel's)

Two workloads, 4 client processes each (a MongoClient of one connection
each), interleaved per round with rotating path order:

* ``find_one``: ``find_one({"_id": k})`` on a 10,000-document collection
  in a loop (operations per second, all clients together);
* ``insert_many``: ``insert_many`` of 1,000 small documents in a loop
  (documents per second).

The table shows the medians and the ratio to the stunnel pair. ``--ab
TREE`` adds ``wicket-ab``: the same pair run from another checkout, in the
same rounds (an A/B of two commits).
"""

from __future__ import annotations

import multiprocessing
import random
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import paths
from benchmarks.dbbench import arguments, measure_and_report, stop_all
from benchmarks.paths import Stunnel, Wicket, make_pki
from gateway.local.mongoserver import MongoServer

WORKLOADS = ("find_one", "insert_many")
CLIENTS = 4
DOCS = 10_000
_USER, _PW_ENV = "bench", "WICKET_BENCH_MONGO_PASSWORD"
_PASSWORD = "benchmark mongo password, thrown away with the run"


def _client(uri: str):
    import pymongo
    return pymongo.MongoClient(uri, maxPoolSize=1, serverSelectionTimeoutMS=30_000)


def _worker(uri: str, workload: str, seconds: float, start_at: float, seed: int, out) -> None:
    """One client process: run ``workload`` for ``seconds`` from ``start_at``
    (a shared start, so the clients overlap); put its count on ``out``."""
    rng = random.Random(seed)
    with _client(uri) as c:
        t = c.bench.items
        t.find_one({"_id": "item-0"})  # connected and logged in before the clock starts
        batch = [{"n": i, "pad": "x" * 32} for i in range(1000)]
        while time.time() < start_at:
            time.sleep(0.001)
        end = start_at + seconds
        count = 0
        if workload == "find_one":
            while time.time() < end:
                t.find_one({"_id": f"item-{rng.randrange(DOCS)}"})
                count += 1
        else:
            w = c.bench[f"ins{seed}"]
            while time.time() < end:
                w.insert_many([dict(d) for d in batch], ordered=False)
                count += len(batch)
                if count % 10_000 == 0:
                    w.drop()  # the test server's inserts slow down as a collection grows
        out.put(count)


def _measure(uri: str, workload: str, seconds: float) -> float:
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 2.0
    procs = [ctx.Process(target=_worker, args=(uri, workload, seconds, start_at, i, out)) for i in range(CLIENTS)]
    for p in procs:
        p.start()
    counts = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(30)
        if p.exitcode != 0:
            raise RuntimeError(f"a {workload} client on {uri.split('@')[-1]} exited with {p.exitcode}")
    return sum(counts) / seconds


def main(argv=None) -> int:
    # No tool to look for: the clients are this Python's pymongo.
    args = arguments("python -m benchmarks.mongodb", __doc__, sys.executable, "", argv, ab=True)
    work = Path(tempfile.mkdtemp(prefix="wicket-mongobench-"))
    started: list = []
    server = None
    try:
        server = MongoServer(work / "mongoeco.log", user=_USER, password=_PASSWORD)
        with _client(server.uri()) as c:
            c.bench.items.drop()
            for start in range(0, DOCS, 1000):
                c.bench.items.insert_many([{"_id": f"item-{i}", "name": f"item {i}", "price": i % 100}
                                           for i in range(start, start + 1000)])
        settings = f'tls = "disable"\nauth = "password"\npasswords = {{ "*" = "env:{_PW_ENV}" }}\n'
        wicket = Wicket(work / "wicket", server.port, kind="mongodb", settings=settings,
                        cluster_env={_PW_ENV: _PASSWORD})
        started.append(wicket)
        wickets = {"wicket": wicket}
        st = Stunnel(work, make_pki(work / "pki"), server.port)
        started.append(st)
        creds = f"{_USER}:{_PASSWORD.replace(' ', '%20').replace(',', '%2C')}@"
        options = "?directConnection=true&authSource=admin&authMechanism=SCRAM-SHA-256"
        uris = {"direct": f"mongodb://{creds}127.0.0.1:{server.port}/{options}",
                "stunnel": f"mongodb://{creds}127.0.0.1:{st.port}/{options}",
                "wicket": f"mongodb://127.0.0.1:{wicket.port}/?directConnection=true"}
        # dbbench's rounds hand run_one a route's (port, who) and the workload's
        # arguments: here (port, the path's URI) and (the workload's name,).
        if args.ab is not None:
            with paths.tree(args.ab):
                w_ab = Wicket(work / "wicket-ab", server.port, kind="mongodb", settings=settings,
                              cluster_env={_PW_ENV: _PASSWORD})
            started.append(w_ab)
            wickets["wicket-ab"] = w_ab
            uris["wicket-ab"] = f"mongodb://127.0.0.1:{w_ab.port}/?directConnection=true"
        routes = {path: (0, uri) for path, uri in uris.items()}

        def run_one(_port: int, uri: str, workload: list[str], seconds: int) -> tuple[float, int]:
            rate = _measure(uri, workload[0], seconds)
            return rate, round(rate * seconds)

        measure_and_report(f"pymongo, {CLIENTS} clients", args, tuple(routes), {w: [w] for w in WORKLOADS},
                           routes, wickets, run_one, "/s",
                           labels={"find_one": "find_one by _id, operations/s ↑",
                                   "insert_many": "insert_many of 1,000, documents/s ↑"},
                           cpu_labels={"find_one": "find_one", "insert_many": "inserted document"})
        return 0
    finally:
        stop_all(started, server, work)


if __name__ == "__main__":
    raise SystemExit(main())

"""gateway.cluster.core: audit retention gives the store's thread back
between batches. (Standing and cuts are in tests/unit/test_core.py.)"""

from __future__ import annotations

import time

import trio

from gateway.cluster import config as cfg
from gateway.cluster import core
from gateway.cluster.core import Cluster


def _cluster(tmp_path) -> Cluster:
    return Cluster.open(cfg.from_dict({"cluster": {"state_dir": str(tmp_path / "state")}}))


async def test_a_long_prune_lets_a_login_read_the_store_between_batches(tmp_path, monkeypatch):
    monkeypatch.setattr(core, "RETENTION_BATCH", 100)
    cluster = _cluster(tmp_path)
    try:
        old, new = time.time() - 7 * 86400, time.time()
        cluster.store.append_audit_many([("login.failed", "x", {"i": i}, old) for i in range(500)])
        cluster.store.append_audit_many([("login.ok", "y", {}, new)])
        batches: list[int] = []
        first_batch_done = trio.Event()
        prune_batch = cluster.store.prune_audit_batch

        def counted(before: float, limit: int) -> int:
            deleted = prune_batch(before, limit)
            batches.append(deleted)
            trio.from_thread.run_sync(first_batch_done.set)  # (a worker thread of this trio run)
            return deleted

        monkeypatch.setattr(cluster.store, "prune_audit_batch", counted)
        batches_before_login: list[int] = []

        async def login() -> None:
            await first_batch_done.wait()
            await cluster.db(cluster.store.get_user, "alice")
            batches_before_login.append(len(batches))

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(login)
                assert await cluster.prune_audit(new - 86400) == 500
        # Six turns (five full batches and the empty one that ends it): the
        # login's read went in between them, not after the whole prune.
        assert len(batches) == 6 and batches_before_login[0] < len(batches)
        assert [e.event for e in cluster.store.query_audit()] == ["login.ok"]
    finally:
        cluster.close()

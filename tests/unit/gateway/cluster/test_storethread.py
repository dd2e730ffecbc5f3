"""gateway.cluster.storethread: the store's calls on one thread named
wicket-store (the name the benchmarks' CPU tables show), in order, a
queued call given up by its cancelled caller, errors raised in the caller."""

from __future__ import annotations

import threading

import pytest
import trio
import trio.testing

from gateway.cluster import config as cfg
from gateway.cluster.core import Cluster
from gateway.cluster.storethread import StoreThread


def _os_name() -> str:
    with open(f"/proc/self/task/{threading.get_native_id()}/comm") as f:
        return f.read().strip()


async def test_the_clusters_store_calls_run_on_one_thread_named_wicket_store(tmp_path):
    cluster = Cluster.open(cfg.from_dict({"cluster": {"state_dir": str(tmp_path / "state")}}))
    try:
        seen = set()

        def where() -> None:
            seen.add((threading.get_native_id(), _os_name(), threading.current_thread().name))

        for _ in range(3):
            await cluster.db(where)
        await cluster.audit("login.ok", "alice")  # the audit's writes too
        await cluster.db(where)
        assert seen == {(next(iter(seen))[0], "wicket-store", "wicket-store")}, seen
    finally:
        cluster.close()


async def test_calls_run_in_order_and_errors_reach_the_caller():
    store = StoreThread()
    try:
        done: list[int] = []
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(store.run, lambda i=i: done.append(i))
                await trio.testing.wait_all_tasks_blocked()  # each call made before the next
        assert done == list(range(20))

        def broken() -> None:
            raise ValueError("disk full")

        with pytest.raises(ValueError, match="disk full"):
            await store.run(broken)
        assert await store.run(lambda: 42) == 42
    finally:
        store.close()


async def test_a_caller_cancelled_while_its_call_waits_gives_it_up():
    store = StoreThread()
    holding, release = threading.Event(), threading.Event()
    ran: list[str] = []

    def hold() -> None:
        holding.set()
        release.wait()

    try:
        async with trio.open_nursery() as nursery:
            try:
                nursery.start_soon(store.run, hold)
                await trio.to_thread.run_sync(holding.wait)  # the store's thread is busy
                with trio.move_on_after(0.05) as waited:
                    await store.run(lambda: ran.append("queued"))
                assert waited.cancelled_caught
            finally:
                release.set()
        assert await store.run(lambda: "after") == "after"
        assert ran == []  # the cancelled call never ran
    finally:
        release.set()
        store.close()

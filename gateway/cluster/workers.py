"""A cluster of several worker processes (``[server] workers = N``): the
supervisor.

Theory of operation. One cluster process carries every session in one
relay engine thread under one GIL, so on a machine with idle cores its
sessions wait for each other; N worker processes (gateway/cluster/worker.py)
each run the whole cluster (trio loop, relay engine, lock watcher, audit
flusher), and this process, the supervisor, sits in front:

* It opens the cluster's state first, as a one-process cluster does (the
  CAs, the store's migrations, the config's roles and resources, the host
  certificate), then starts the workers, and while they run prunes the
  store (``[audit] keep``): the jobs that must run once, not once per
  worker.
* It alone listens. Each accepted connection's descriptor goes to the
  worker holding the fewest connections it was handed (ties in turn), in
  an ``SCM_RIGHTS`` message: so a gateway's several links
  (``wicket proxy --cluster-links``) land on different workers, which
  ``SO_REUSEPORT``'s hash of the address pair would not promise. A
  connection costs the supervisor an accept and a send, then nothing: the
  worker does the TLS handshake and everything after.
* What must hold across workers is in the store (users, locks,
  revocations: every worker's lock watcher reads it, so a lock cuts live
  sessions in all of them) or in a small shared table
  (gateway/cluster/sharedcounts.py: sessions per user, logins in
  progress). What is each process's own is split (Argon2 slots,
  unauthenticated connections per address) or per process by nature (open
  files, connections per link).
* SIGTERM or SIGINT stops the supervisor's listener and sends each worker
  SIGTERM: each stops as a one-process cluster does (sessions cut with
  ``cluster_stopping``, the audit flushed); a worker still running
  :data:`STOP_TIMEOUT` later is killed. The workers run in their own
  process group, so a terminal's Ctrl-C reaches only the supervisor, which
  stops them once. A worker whose supervisor vanished (SIGKILL) stops by
  itself: its hand-off socket closes.
* A worker that exits while the cluster is not stopping is reported
  (``cluster_worker_died``), its counts in the shared table are dropped
  (its sessions died with it) and it is started again; if workers die
  :data:`RESTARTS` times within :data:`RESTART_WINDOW`, something is wrong
  beyond one process (a bad disk, memory), and the cluster stops with exit
  status 1 for its service manager to see.
"""

from __future__ import annotations

import functools
import itertools
import logging
import os
import signal
import socket
import sys
import time
from pathlib import Path

import trio

import gateway

from gateway.addresses import format_addr
from gateway.cluster import sharedcounts
from gateway.cluster.core import Cluster
from gateway.cluster.server import wait_for_stop
from gateway.cluster.worker import CONNECTION, ENDED, READY, receive, send
from gateway.identity.pki import utcnow
from gateway.net.descriptors import serve_listeners
from gateway.net.relay import reset_on_close

log = logging.getLogger("wicket.cluster")

#: How long a worker may take to start serving.
START_TIMEOUT = 60.0
#: How long workers may take to stop once told (their own grace period is
#: 2 s; the rest is the audit's last flush).
STOP_TIMEOUT = 20.0
RESTARTS = 5
_CODE = str(Path(gateway.__file__).resolve().parent.parent)
RESTART_WINDOW = 60.0


class WorkersFailing(Exception):
    """Workers kept dying: the cluster stopped."""


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: trio.Process | None = None
        self.sock: socket.socket | None = None
        #: Connections handed to it that have not ended.
        self.held = 0
        self.ready = False


class Supervisor:
    def __init__(self, cluster: Cluster, *, config_path: Path, workers: int, log_format: str,
                 log_level: str) -> None:
        self.cluster = cluster
        self.config_path = config_path
        self.workers = [_Worker(i) for i in range(workers)]
        self.counts_path = cluster.config.state_dir / "workers.counts"
        self.log_args = ["--log-format", log_format, "--log-level", log_level]
        self.stopping = False
        self._turn = itertools.count()
        self._deaths: list[float] = []
        self._all_ready = trio.Event()
        self.address: tuple[str, int] = cluster.config.listen

    # -- the workers ---------------------------------------------------------

    async def _run_worker(self, worker: _Worker) -> None:
        """Start ``worker`` and keep it running (restarted when it dies)
        until the cluster stops."""
        while not self.stopping:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            ours.setblocking(False)
            args = [sys.executable, "-m", "gateway.cluster.worker", "--config", str(self.config_path),
                    "--index", str(worker.index), "--count", str(len(self.workers)),
                    "--counts", str(self.counts_path), "--handoff-fd", str(theirs.fileno()),
                    "--address", format_addr(self.address), *self.log_args]
            # The workers run the supervisor's own code, wherever it was imported from.
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (_CODE, os.environ.get("PYTHONPATH")))))
            try:
                process = await trio.lowlevel.open_process(args, pass_fds=(theirs.fileno(),), process_group=0,
                                                           env=env)
            finally:
                theirs.close()
            worker.process, worker.sock, worker.held, worker.ready = process, ours, 0, False
            started = time.monotonic()
            async with trio.open_nursery() as watching:
                watching.start_soon(self._listen_to, worker, ours)
                status = await process.wait()
                watching.cancel_scope.cancel()
            worker.ready, worker.sock = False, None
            ours.close()
            if self.stopping:
                log.info("cluster_worker_stopped worker=%d pid=%d status=%d", worker.index, process.pid, status)
                return
            log.error("cluster_worker_died worker=%d pid=%d status=%d lived=%.1fs held=%d action=%s",
                      worker.index, process.pid, status, time.monotonic() - started, worker.held,
                      "its sessions ended with it; starting it again (see the worker's log above for why)")
            self.counts.clear_worker(worker.index)
            now = time.monotonic()
            self._deaths = [t for t in self._deaths if now - t < RESTART_WINDOW] + [now]
            if len(self._deaths) >= RESTARTS:
                log.error("cluster_workers_failing deaths=%d window=%.0fs action=%s", len(self._deaths),
                          RESTART_WINDOW, "the cluster stops; look for why its workers die (memory? the disk?)")
                raise WorkersFailing()
            # Whatever renewal a long-lived cluster's host certificate
            # needs happens here, in one place, before the new worker reads it.
            await self.cluster.db(self.cluster.ensure_host_cert, utcnow())

    async def _listen_to(self, worker: _Worker, sock: socket.socket) -> None:
        while True:
            message, fds = await receive(sock)
            for fd in fds:
                os.close(fd)
            if message == ENDED:
                worker.held = max(0, worker.held - 1)
            elif message == READY:
                worker.ready = True
                log.info("cluster_worker_ready worker=%d pid=%d", worker.index, worker.process.pid)
                if all(w.ready for w in self.workers):
                    self._all_ready.set()
            elif not message:
                return  # gone: _run_worker sees its exit

    def _pick(self) -> _Worker | None:
        ready = [w for w in self.workers if w.ready and w.sock is not None]
        if not ready:
            return None
        turn = next(self._turn)
        # The fewest held; among equals, the next in turn.
        return min(ready, key=lambda w: (w.held, (w.index - turn) % len(self.workers)))

    async def _hand_over(self, stream: trio.SocketStream) -> None:
        """(serve_listeners' handler) Give ``stream``'s descriptor to a
        worker; the supervisor's copy is closed on return."""
        for _ in range(len(self.workers)):
            worker = self._pick()
            if worker is None:
                break
            try:
                await send(worker.sock, CONNECTION, (stream.socket.fileno(),))
            except OSError:  # it just died: _run_worker reports it
                worker.ready = False
                continue
            worker.held += 1
            return
        log.warning("connection_refused reason=%s", "no worker is serving (they are starting again)")
        reset_on_close(stream)

    # -- the whole -----------------------------------------------------------

    async def serve(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        sharedcounts.create(self.counts_path, len(self.workers))
        self.counts = sharedcounts.SharedCounts(self.counts_path, len(self.workers), 0)
        try:
            await self._serve(task_status)
        finally:
            self.counts.close()

    async def _serve(self, task_status) -> None:
        cluster = self.cluster
        host, port = cluster.config.listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.address = listeners[0].socket.getsockname()[:2]
        async with trio.open_nursery() as outer:
            await outer.start(cluster.run_retention)
            try:
                async with trio.open_nursery() as running:
                    for worker in self.workers:
                        running.start_soon(self._run_worker, worker)
                    with trio.fail_after(START_TIMEOUT):
                        await self._all_ready.wait()
                    async with trio.open_nursery() as accepting:
                        accepting.start_soon(functools.partial(serve_listeners, self._hand_over, listeners,
                                                               name="cluster"))
                        log.info("cluster_listening cluster=%s address=%s pin=%s workers=%d pids=%s",
                                 cluster.config.name, format_addr(self.address), cluster.host_ca.pin,
                                 len(self.workers), ",".join(str(w.process.pid) for w in self.workers))
                        task_status.started(self.address)
                        why = await wait_for_stop(True)
                        log.info("cluster_stopping %s workers=%d", why, len(self.workers))
                        self.stopping = True
                        accepting.cancel_scope.cancel()
                    await self._stop_workers()
            finally:
                # However it ends (a worker failing over and over, a bug),
                # no worker outlives the supervisor.
                self.stopping = True
                with trio.CancelScope(shield=True):
                    await self._stop_workers()
            outer.cancel_scope.cancel()
        log.info("cluster_stopped")

    async def _stop_workers(self) -> None:
        live = [w.process for w in self.workers if w.process is not None and w.process.returncode is None]
        for process in live:
            process.send_signal(signal.SIGTERM)
        with trio.move_on_after(STOP_TIMEOUT):
            for process in live:
                await process.wait()
        for process in live:
            if process.returncode is None:
                log.error("cluster_worker_killed pid=%d reason=%s", process.pid,
                          f"still running {STOP_TIMEOUT:.0f}s after SIGTERM")
                process.kill()
                await process.wait()


async def supervise(cluster: Cluster, *, config_path: Path, workers: int, log_format: str = "text",
                    log_level: str = "info", task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the cluster as ``workers`` processes until SIGTERM/SIGINT;
    :class:`WorkersFailing` if they keep dying."""
    supervisor = Supervisor(cluster, config_path=config_path, workers=workers, log_format=log_format,
                            log_level=log_level)
    await supervisor.serve(task_status=task_status)

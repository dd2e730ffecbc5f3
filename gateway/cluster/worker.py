"""One of a cluster's worker processes: connections arrive from the
supervisor (gateway/cluster/workers.py) over a unix socket, each accepted
TCP connection's descriptor in an ``SCM_RIGHTS`` message, and are served
exactly as the one-process cluster serves those it accepts
(gateway/cluster/server.py): handshake, ALPN, the API or the multiplexed
link, the worker's own relay engine thread.

The hand-off socket (``SOCK_SEQPACKET``, so each message keeps its
bounds) carries, from the supervisor, :data:`CONNECTION` with one
descriptor; to it, :data:`READY` once the worker serves and :data:`ENDED`
when a connection it was given has ended (the supervisor hands the next
connection to the worker holding the fewest). When the supervisor goes
(its end of the socket closes), the worker stops as on SIGTERM.

Run as ``python -m gateway.cluster.worker`` by the supervisor only.
"""

from __future__ import annotations

import argparse
import functools
import logging
import socket
import sys
from pathlib import Path
from typing import Any, Awaitable, Callable

import trio

log = logging.getLogger("wicket.cluster")

CONNECTION = b"C"
READY = b"R"
ENDED = b"-"


async def send(sock: socket.socket, message: bytes, fds: tuple[int, ...] = ()) -> None:
    """One message (and descriptors) on a non-blocking hand-off socket.
    Raises OSError (BrokenPipeError: the other end is gone)."""
    while True:
        try:
            if fds:
                socket.send_fds(sock, [message], list(fds))
            else:
                sock.send(message)
            return
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)


async def receive(sock: socket.socket) -> tuple[bytes, list[int]]:
    """The next message and its descriptors; (b"", []) once the other end
    is gone."""
    while True:
        try:
            message, fds, _flags, _addr = socket.recv_fds(sock, 16, 4)
            return message, fds
        except BlockingIOError:
            await trio.lowlevel.wait_readable(sock)
        except ConnectionResetError:
            return b"", []


class Handoff:
    """The worker's end: where its connections come from (for
    :func:`gateway.cluster.server.serve`)."""

    def __init__(self, sock: socket.socket, address: tuple[str, int]) -> None:
        sock.setblocking(False)
        self.sock = sock
        #: The supervisor's listening address (for the log).
        self.address = address
        #: Set when the supervisor is gone: the worker stops.
        self.closed = trio.Event()

    async def ready(self) -> None:
        await send(self.sock, READY)

    async def serve(self, handler: Callable[[trio.SocketStream], Awaitable[Any]], *,
                    handler_nursery: trio.Nursery) -> None:
        """Serve each connection handed over under ``handler_nursery`` until
        the supervisor goes (or this is cancelled)."""
        while True:
            message, fds = await receive(self.sock)
            if not message:
                self.closed.set()
                return
            if message != CONNECTION or len(fds) != 1:
                for fd in fds:
                    socket.close(fd)
                log.error("handoff_unexpected message=%r fds=%d", message[:8], len(fds))
                continue
            try:
                sock = socket.socket(fileno=fds[0])
            except OSError as exc:  # not a socket after all
                socket.close(fds[0])
                log.error("handoff_unexpected error=%s", exc)
                continue
            handler_nursery.start_soon(self._one, handler, trio.SocketStream(trio.socket.from_stdlib_socket(sock)))

    async def _one(self, handler: Callable[[trio.SocketStream], Awaitable[Any]], stream: trio.SocketStream) -> None:
        try:
            await handler(stream)
        finally:
            await trio.aclose_forcefully(stream)
            with trio.CancelScope(shield=True):
                try:
                    await send(self.sock, ENDED)
                except OSError:
                    pass  # the supervisor is gone: nobody is counting


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="wicket-cluster-worker")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--counts", type=Path, required=True)
    parser.add_argument("--handoff-fd", type=int, required=True)
    parser.add_argument("--address", required=True)
    parser.add_argument("--log-format", default="text")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)

    from gateway import logs
    from gateway.addresses import parse_hostport
    from gateway.cluster import config as cfg
    from gateway.cluster.core import Cluster
    from gateway.cluster.server import serve
    from gateway.cluster.sharedcounts import WorkerPlace
    from gateway.net.descriptors import raise_open_files_limit

    logs.setup(args.log_format, args.log_level)
    raise_open_files_limit()
    config = cfg.load(args.config)
    handoff_sock = socket.socket(fileno=args.handoff_fd)
    cluster = Cluster.open(config, WorkerPlace(index=args.index, count=args.count, counts=args.counts))
    try:
        async def run() -> None:
            handoff = Handoff(handoff_sock, parse_hostport(args.address))
            async with trio.open_nursery() as nursery:
                await nursery.start(functools.partial(serve, cluster, handoff=handoff))
                await handoff.ready()

        trio.run(run)
    finally:
        cluster.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

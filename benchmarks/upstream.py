"""The benchmarks' upstream: sink, source, echo and idle holder on one port.

``python -m benchmarks.upstream --ports N`` listens on N ports of 127.0.0.1
(one per path under test, so no two paths share a port's ephemeral range
or TIME_WAIT table) and prints one ``listening on 127.0.0.1:PORT`` line per
port, then ``ready``.

The first byte a client sends picks what the connection is:

``U`` + u64be n   upload: read exactly n bytes, then answer one byte ``k``.
``D`` + u64be n   download: send n bytes, then wait for the client to close.
``E``             echo: every byte, the ``E`` included, is sent back.
``I``             idle: answer one byte ``i``, then hold until the peer closes.

Cost matters more than anything here, because this process shares two cores
with the relays and the load generator. Bulk and echo connections each get a
(pooled) thread running plain blocking ``recv_into`` / ``send`` on preallocated
buffers, so the GIL is released for the whole of every system call and no
bytes object is allocated per read. Idle connections never get a thread: they
stay on the one selector loop that also accepts, so holding ten thousand of
them costs a socket each and nothing more.
"""

from __future__ import annotations

import argparse
import os
import queue
import resource
import selectors
import signal
import socket
import struct
import sys
import threading

CHUNK = 1 << 20
_PATTERN = memoryview(os.urandom(CHUNK))
_HEADER = struct.Struct(">Q")


def raise_nofile() -> int:
    """Lift the soft open-files limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        got = sock.recv(n - len(out))
        if not got:
            raise ConnectionError("peer closed early")
        out += got
    return bytes(out)


def _wait_close(sock: socket.socket) -> None:
    """The client closes first (so TIME_WAIT stays on its side); a reset then is fine."""
    try:
        sock.recv(1)
    except ConnectionResetError:
        pass


def _upload(sock: socket.socket) -> None:
    (n,) = _HEADER.unpack(_recv_exact(sock, 8))
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    left = n
    while left:
        got = sock.recv_into(view, min(left, CHUNK))
        if not got:
            raise ConnectionError("peer closed during upload")
        left -= got
    sock.sendall(b"k")
    _wait_close(sock)


def _download(sock: socket.socket) -> None:
    (n,) = _HEADER.unpack(_recv_exact(sock, 8))
    left = n
    while left:
        left -= sock.send(_PATTERN[: min(left, CHUNK)])
    _wait_close(sock)


def _echo(sock: socket.socket) -> None:
    sock.sendall(b"E")
    buf = bytearray(1 << 16)
    view = memoryview(buf)
    while True:
        got = sock.recv_into(view)
        if not got:
            sock.shutdown(socket.SHUT_WR)
            return
        sock.sendall(view[:got])


_HANDLERS = {b"U": _upload, b"D": _download, b"E": _echo}


def _serve_thread(sock: socket.socket, mode: bytes) -> None:
    try:
        sock.setblocking(True)
        _HANDLERS[mode](sock)
    except OSError as exc:
        print(f"{mode.decode()} connection failed: {exc!r}", file=sys.stderr, flush=True)
    finally:
        sock.close()


class Workers:
    """Threads that serve one connection at a time and then wait for the next:
    starting a thread costs more than a round trip on this kind of machine,
    so a connection set-up test would otherwise measure thread creation."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0

    def submit(self, sock: socket.socket, mode: bytes) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._queue.put((sock, mode))
                return
        threading.Thread(target=self._run, args=(sock, mode), daemon=True).start()

    def _run(self, sock: socket.socket, mode: bytes) -> None:
        while True:
            _serve_thread(sock, mode)
            with self._lock:
                self._idle += 1
            sock, mode = self._queue.get()


def serve(ports: int, host: str = "127.0.0.1") -> None:
    raise_nofile()
    threading.stack_size(256 * 1024)
    sel = selectors.DefaultSelector()
    listeners = []
    for _ in range(ports):
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((host, 0))
        ls.listen(4096)
        ls.setblocking(False)
        sel.register(ls, selectors.EVENT_READ, "listen")
        listeners.append(ls)
        print(f"listening on {host}:{ls.getsockname()[1]}", flush=True)
    print("ready", flush=True)

    workers = Workers()
    stop = threading.Event()
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    sel.register(wake_r, selectors.EVENT_READ, "wake")

    def on_signal(signum, frame):
        stop.set()
        try:
            wake_w.send(b"x")
        except OSError:
            pass

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)

    while not stop.is_set():
        for key, _ in sel.select():
            what = key.data
            if what == "listen":
                for _ in range(64):
                    try:
                        conn, _addr = key.fileobj.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as exc:  # EMFILE and friends: say so, keep serving
                        print(f"accept failed: {exc}", file=sys.stderr, flush=True)
                        break
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sel.register(conn, selectors.EVENT_READ, "new")
            elif what == "new":
                conn = key.fileobj
                try:
                    mode = conn.recv(1)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    mode = b""
                if mode == b"I":
                    sel.modify(conn, selectors.EVENT_READ, "idle")
                    try:
                        conn.send(b"i")
                    except OSError:
                        sel.unregister(conn)
                        conn.close()
                elif mode in _HANDLERS:
                    sel.unregister(conn)
                    workers.submit(conn, mode)
                else:
                    sel.unregister(conn)
                    conn.close()
            elif what == "idle":
                conn = key.fileobj
                try:
                    data = conn.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    conn.close()
            elif what == "wake":
                try:
                    wake_r.recv(64)
                except OSError:
                    pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ports", type=int, default=1)
    ap.add_argument("--host", default="127.0.0.1")
    args = ap.parse_args()
    serve(args.ports, args.host)


if __name__ == "__main__":
    main()

"""The load generator: what the client side of each measurement does.

All of it runs in the benchmark's own process, in one thread, with plain
sockets and preallocated buffers: a bulk transfer is a loop of ``send`` /
``recv_into`` on 1 MiB slices (the GIL is released for every call), a round
trip is one ``sendall`` and one or two ``recv_into``. Its own CPU time is
measured alongside the relays' (see ``client`` in the results), so a reader
can check that it was not the bottleneck.
"""

from __future__ import annotations

import errno
import os
import selectors
import socket
import struct
import time

CHUNK = 1 << 20
_PATTERN = memoryview(os.urandom(CHUNK))
_RECV = memoryview(bytearray(CHUNK))
_Q = struct.Struct(">Q")


def _connect(addr: tuple[str, int], timeout: float = 30.0) -> socket.socket:
    s = socket.create_connection(addr, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _recv_exact(s: socket.socket, n: int) -> None:
    view = _RECV
    while n:
        got = s.recv_into(view, min(n, CHUNK))
        if not got:
            raise ConnectionError("connection closed early")
        n -= got


def upload(addr: tuple[str, int], nbytes: int) -> float:
    """Send nbytes to the sink; seconds from the first byte to the sink's ack."""
    with _connect(addr, timeout=300) as s:
        t0 = time.perf_counter()
        s.sendall(b"U" + _Q.pack(nbytes))
        left = nbytes
        while left:
            left -= s.send(_PATTERN[: min(left, CHUNK)])
        if s.recv(1) != b"k":
            raise ConnectionError("upload: no ack from the sink")
        return time.perf_counter() - t0


def download(addr: tuple[str, int], nbytes: int) -> float:
    """Receive nbytes from the source; seconds from the request to the last byte."""
    with _connect(addr, timeout=300) as s:
        t0 = time.perf_counter()
        s.sendall(b"D" + _Q.pack(nbytes))
        _recv_exact(s, nbytes)
        return time.perf_counter() - t0


def round_trips(addr: tuple[str, int], count: int, size: int = 64, warmup: int = 200) -> list[float]:
    """``count`` request/response round trips of ``size`` bytes on one
    connection to the echo; the latency of each, in seconds."""
    msg = os.urandom(size)
    buf = memoryview(bytearray(size))
    with _connect(addr) as s:
        s.sendall(b"E")
        _recv_exact(s, 1)
        out = []
        perf = time.perf_counter
        recv_into, sendall = s.recv_into, s.sendall
        for i in range(warmup + count):
            t0 = perf()
            sendall(msg)
            got = recv_into(buf, size)
            while got < size:
                n = recv_into(buf[got:], size - got)
                if not n:
                    raise ConnectionError("echo closed")
                got += n
            t1 = perf()
            if i >= warmup:
                out.append(t1 - t0)
        return out


def connects(addr: tuple[str, int], count: int) -> list[float]:
    """``count`` sequential connections, each: connect, send 16 bytes, read
    the echo; seconds each (closing is not timed)."""
    msg = b"E" + os.urandom(15)
    buf = memoryview(bytearray(16))
    out = []
    perf = time.perf_counter
    for _ in range(count):
        t0 = perf()
        s = socket.create_connection(addr, timeout=30)
        try:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.sendall(msg)
            got = 0
            while got < 16:
                n = s.recv_into(buf[got:], 16 - got)
                if not n:
                    raise ConnectionError("echo closed during connect test")
                got += n
            out.append(perf() - t0)
        finally:
            s.close()
    return out


class IdleHolder:
    """Opens connections to the upstream's idle mode and holds them.

    ``fill(n)`` grows the set to n live connections, each confirmed end to
    end (the upstream's ``i`` came back, so every hop of the relay exists),
    with at most ``inflight`` handshakes under way at once so no listen
    backlog overflows into SYN retries.
    """

    def __init__(self, addr: tuple[str, int], inflight: int = 64) -> None:
        self.addr = addr
        self.inflight = inflight
        self.held: list[socket.socket] = []

    def fill(self, target: int, timeout: float = 300.0) -> float:
        """Returns the seconds it took."""
        sel = selectors.DefaultSelector()
        pending: dict[socket.socket, str] = {}
        t0 = time.perf_counter()
        deadline = time.monotonic() + timeout
        try:
            while len(self.held) < target:
                while len(pending) < self.inflight and len(self.held) + len(pending) < target:
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    s.setblocking(False)
                    err = s.connect_ex(self.addr)
                    if err not in (0, errno.EINPROGRESS):
                        s.close()
                        raise OSError(err, f"connect: {os.strerror(err)}")
                    pending[s] = "connecting"
                    sel.register(s, selectors.EVENT_WRITE)
                if time.monotonic() > deadline:
                    raise TimeoutError(f"only {len(self.held)} of {target} idle connections after {timeout}s")
                for key, _ in sel.select(1.0):
                    s = key.fileobj
                    state = pending[s]
                    if state == "connecting":
                        err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                        if err:
                            raise OSError(err, f"connect: {os.strerror(err)}")
                        s.send(b"I")
                        pending[s] = "waiting"
                        sel.modify(s, selectors.EVENT_READ)
                    else:
                        data = s.recv(1)
                        if data != b"i":
                            raise ConnectionError(f"idle connection {len(self.held)} closed before it was confirmed")
                        sel.unregister(s)
                        del pending[s]
                        self.held.append(s)
        finally:
            for s in pending:
                s.close()
            sel.close()
        return time.perf_counter() - t0

    def close(self) -> None:
        for s in self.held:
            s.close()
        self.held.clear()


def busy(addr: tuple[str, int], conns: int, total: int, timeout: float = 600.0) -> float:
    """``conns`` connections at once, half uploading and half downloading,
    ``total`` bytes in all; seconds from the first request to the last byte."""
    per = max(total // conns, 1)
    socks = []
    try:
        for _ in range(conns):
            socks.append(_connect(addr))
        sel = selectors.DefaultSelector()
        state = {}
        t0 = time.perf_counter()
        for i, s in enumerate(socks):
            if i % 2 == 0:
                s.sendall(b"U" + _Q.pack(per))
                s.setblocking(False)
                state[s] = ["U", per]
                sel.register(s, selectors.EVENT_WRITE)
            else:
                s.sendall(b"D" + _Q.pack(per))
                s.setblocking(False)
                state[s] = ["D", per]
                sel.register(s, selectors.EVENT_READ)
        live = conns
        deadline = time.monotonic() + timeout
        recv = _RECV
        while live:
            if time.monotonic() > deadline:
                raise TimeoutError("busy connections did not finish")
            for key, _ in sel.select(1.0):
                s = key.fileobj
                st = state[s]
                try:
                    if st[0] == "U":
                        st[1] -= s.send(_PATTERN[: min(st[1], 256 * 1024)])
                        if st[1] == 0:
                            st[0] = "A"
                            sel.modify(s, selectors.EVENT_READ)
                    elif st[0] == "A":
                        if s.recv(1) != b"k":
                            raise ConnectionError("busy upload: no ack")
                        sel.unregister(s)
                        live -= 1
                    else:
                        got = s.recv_into(recv, min(st[1], CHUNK))
                        if not got:
                            raise ConnectionError("busy download closed early")
                        st[1] -= got
                        if st[1] == 0:
                            sel.unregister(s)
                            live -= 1
                except (BlockingIOError, InterruptedError):
                    pass
        elapsed = time.perf_counter() - t0
        sel.close()
        return elapsed
    finally:
        for s in socks:
            s.close()

"""gateway/net/endio.py: the engine's TLS read of one end, fed records cut
anywhere by the kernel (socket pairs, SSLObjects over memory BIOs)."""

from __future__ import annotations

import os
import random
import socket
import ssl

from gateway.net.endio import _RECORD_MAX
from gateway.net.ends import End
from gateway.net.engine import engine
from tests.unit import tlsutil


class Counting:
    """An SSLObject's C object, counting the reads that could only say
    "want read" (a raised exception each: what read_tls avoids)."""

    def __init__(self, obj) -> None:
        self.obj = obj
        self.want_read = 0

    def read(self, *args):
        try:
            return self.obj.read(*args)
        except ssl.SSLWantReadError:
            self.want_read += 1
            raise

    def pending(self) -> int:
        return self.obj.pending()


def records(pki, sizes: list[int]):
    """(the client end's TLS state, its peer's records for plaintexts of
    ``sizes`` bytes, one record each at most 16 KiB, and those plaintexts)."""
    client, server = tlsutil.memory_pair(pki)
    try:
        client[0].read(1)  # the server's session tickets, out of the way
    except ssl.SSLWantReadError:
        pass
    plain = [os.urandom(n) for n in sizes]
    wire = []
    for data in plain:
        server[0].write(data)
        wire.append(server[2].read())
    return client, wire, b"".join(plain)


def read_all(end: End, want: int) -> bytes:
    view = memoryview(bytearray(256 * 1024))
    out = bytearray()
    while len(out) < want:
        n = engine().read_tls(end, view)
        if n < 0:
            break
        out += view[:n]
    return bytes(out)


def test_a_record_cut_by_the_receive_is_left_for_the_next_without_a_failed_read(pki):
    client, wire, plain = records(pki, [16384, 16384, 16384])
    cut = len(wire[0]) + len(wire[1]) + 100  # two whole records, and the start of the third
    stream = b"".join(wire)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        end = End(ours, "tls", client, None)
        end.ssl = counting = Counting(end.ssl)
        theirs.sendall(stream[:cut])
        assert read_all(end, 2 * 16384) == plain[:2 * 16384]
        assert counting.want_read == 0
        # Its header alone, then the rest: each read takes what is whole.
        theirs.sendall(stream[cut:])
        assert read_all(end, 16384) == plain[2 * 16384:]
        assert counting.want_read == 0


def test_records_cut_anywhere_all_arrive_in_order(pki):
    rng = random.Random(7)
    sizes = [rng.choice([1, 5, 100, 4000, 16384]) for _ in range(60)]
    client, wire, plain = records(pki, sizes)
    stream = b"".join(wire)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        ours.setblocking(False)
        end = End(ours, "tls", client, None)
        end.ssl = counting = Counting(end.ssl)
        out = bytearray()
        pos = 0
        view = memoryview(bytearray(256 * 1024))
        while len(out) < len(plain):
            if pos < len(stream):
                step = rng.choice([1, 3, 5, 6, 700, _RECORD_MAX, 40000])
                theirs.sendall(stream[pos:pos + step])
                pos += step
            n = engine().read_tls(end, view)
            if n > 0:
                out += view[:n]
            else:
                assert n < 0 and pos < len(stream)  # nothing whole yet: "would block"
        assert bytes(out) == plain
        # A failed read only where a record was cut before any whole one
        # came in the same receive (then nothing says where it ends).
        assert counting.want_read < len(sizes)

"""``python -m benchmarks.muxchunks``: the relay engine's CPU per MiB of a
one-way bulk transfer over a multiplexed connection, both links in one
process.

A gateway MuxLink and a cluster MuxLink over TLS 1.3 on loopback (as
``tests/unit/gateway/net/muxenv.py`` links them), one stream: a writer
process sends ``--mib`` MiB in ``--chunk`` byte writes into the client's
socket (AF_UNIX, as ssh's ProxyCommand socket), a reader process drains
the upstream's (TCP). The one engine thread runs both sides; its CPU
(``/proc/self/task/TID/schedstat``) per MiB is printed. ``--paced``
writes a chunk only once the reader has the last one, so each chunk is
one wake-up on each side: run under ``valgrind --tool=callgrind
--separate-threads=yes`` and read the engine thread's file for
instructions per chunk, which do not move with the load (how the
2026-12-07 fast path was counted: benchmarks/README.md). Another
checkout's code: ``PYTHONPATH=/that/tree``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trio

from gateway.net.engine import engine
from tests.unit import tlsutil
from tests.unit.gateway.net.muxenv import linked

_WRITER = """import os, sys
chunk, n, ack = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
data = bytes(chunk)
for _ in range(n):
    os.write(1, data)
    if ack >= 0:
        os.read(ack, 1)
"""

_READER = """import os, sys
total, chunk, ack = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
got = owed = 0
while got < total:
    data = os.read(0, 262144)
    if not data:
        break
    got += len(data)
    owed += len(data)
    while ack >= 0 and owed >= chunk:
        owed -= chunk
        os.write(ack, b"x")
print(got)
"""


def _cpu_ns(tid: int) -> int:
    with open(f"/proc/self/task/{tid}/schedstat") as f:
        return int(f.read().split()[0])


async def _run(mib: float, chunk: int, paced: bool) -> str:
    pki = tlsutil.make_pki(Path(tempfile.mkdtemp(prefix="muxchunks-")))
    total = int(mib * 1024 * 1024) // chunk * chunk
    async with linked(pki) as pair:
        client, _started = await pair.session("bulk")
        upstream = pair.upstreams["bulk"]
        cfd, ufd = client.socket.detach(), upstream.socket.detach()
        os.set_blocking(cfd, True)
        os.set_blocking(ufd, True)
        ack_r, ack_w = os.pipe() if paced else (-1, -1)
        fds = (ack_r, ack_w) if paced else ()
        writer = subprocess.Popen([sys.executable, "-c", _WRITER, str(chunk), str(total // chunk), str(ack_r)],
                                  stdout=cfd, pass_fds=fds)
        reader = subprocess.Popen([sys.executable, "-c", _READER, str(total), str(chunk), str(ack_w)],
                                  stdin=ufd, stdout=subprocess.PIPE, pass_fds=fds)
        for fd in (cfd, ufd, *fds):
            os.close(fd)
        tid = engine()._thread.native_id
        start, cpu = time.monotonic(), _cpu_ns(tid)
        while reader.poll() is None:
            await trio.sleep(0.05)
        seconds, cpu = time.monotonic() - start, _cpu_ns(tid) - cpu
        got = int(reader.stdout.read() or 0)
        writer.wait()
        if got != total:
            raise SystemExit(f"the reader got {got} bytes of {total}")
    mib = total / 1048576
    return (f"engine {cpu / 1e6 / mib:.3f} ms CPU/MiB, {mib / seconds:.0f} MiB/s, chunk {chunk} B"
            f"{' paced' if paced else ''}, load {os.getloadavg()[0]:.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.muxchunks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=float, default=256, help="MiB to send (default 256)")
    ap.add_argument("--chunk", type=int, default=32768, help="bytes per write (default 32768: ssh's packets)")
    ap.add_argument("--paced", action="store_true", help="one chunk in flight at a time")
    args = ap.parse_args(argv)
    print(trio.run(_run, args.mib, args.chunk, args.paced))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Micro-benchmarks of the per-message paths in protocols/: the PostgreSQL
statement auditors and mux frame decoding.

Run from the repository root:  python -m tests.unit.protocols.microbench
Numbers are the best of several rounds of CPU time (process_time: a round
that waited for the CPU is not charged for it), so a busy machine shows its
quiet moments; compare two versions by running both, interleaved, on one
machine.
(It belongs in benchmarks/, whose owner may move it there.)

* pg: pgbench -S-like traffic (extended protocol, prepared statement): per
  transaction the client sends Bind/Execute/Sync and the server answers
  BindComplete/RowDescription/DataRow/CommandComplete/ReadyForQuery. The
  streams are fed in 16 KiB chunks, as a relay reads them; µs per
  transaction per direction.
* mux: DATA frames of 100 bytes (a query-sized message) and of 16 KiB,
  fed borrowed in 64 KiB chunks, as muxlink does; ns per frame. With
  ``--splitter``, the same frames through the shared FrameSplitter too.
* mongo: the cluster's command gate reading a pymongo ``find_one`` by
  ``_id`` (``client_event``: the command, its database, collection,
  filter shape and lsid), as it does for every message relayed; µs per
  message. ``--only mongo`` (or pg, mux) runs one. ``--mongo-reads N``
  only does N such reads (after one), untimed: run it under callgrind with
  N and with 0 and divide the difference by N for instructions per read
  (load-independent)::

      valgrind --tool=callgrind python -m tests.unit.protocols.microbench --mongo-reads 2000
"""

from __future__ import annotations

import struct
import sys
import time

from protocols.dial import DialRequest
from protocols.mux import HEADER, MuxConnection, Role
from protocols.mux import NEED_DATA as MUX_NEED_DATA
from protocols.postgres.audit import BackendAuditor, FrontendAuditor
from protocols.postgres.messages import NEED_DATA

TRANSACTIONS = 20_000
ROUNDS = 7


def _msg(type_code: bytes, body: bytes) -> bytes:
    return type_code + struct.pack(">I", 4 + len(body)) + body


def pgbench_streams(n: int) -> tuple[bytes, bytes]:
    """``n`` transactions of SELECT abalance FROM pgbench_accounts WHERE aid = $1."""
    aid = b"123456"
    bind = _msg(b"B", b"\x00P0_1\x00" + struct.pack(">HhH", 1, 0, 1)
                + struct.pack(">i", len(aid)) + aid + struct.pack(">H", 0))
    execute = _msg(b"E", b"\x00" + struct.pack(">i", 0))
    sync = _msg(b"S", b"")
    client = (bind + execute + sync) * n
    row_desc = _msg(b"T", struct.pack(">H", 1) + b"abalance\x00"
                    + struct.pack(">IhIhih", 16397, 2, 23, 4, -1, 0))
    data_row = _msg(b"D", struct.pack(">Hi", 1, 4) + b"-365")
    server = (_msg(b"2", b"") + row_desc + data_row + _msg(b"C", b"SELECT 1\x00")
              + _msg(b"Z", b"I")) * n
    return client, server


def chunks(data: bytes, size: int) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def audit(make, pieces: list[bytes]) -> int:
    auditor = make()
    events = 0
    for piece in pieces:
        auditor.receive_data(piece)
        while auditor.next_event() is not NEED_DATA:
            events += 1
    return events


def best(fn, *args) -> float:
    times = []
    for _ in range(ROUNDS):
        start = time.process_time()
        fn(*args)
        times.append(time.process_time() - start)
    return min(times)


def mux_stream(payload: int, frames: int) -> bytes:
    one = HEADER.pack(3, 1, payload) + b"x" * payload
    return one * frames


def mux_decode(pieces: list[bytes]) -> int:
    conn = MuxConnection(Role.GATEWAY)
    conn.send_open(DialRequest(resource="r"))
    # Stream 1, accepted, with a window that never runs out (a reader that
    # acknowledges as it goes): only the decoding is measured.
    stream = conn._streams[1]
    stream.accepted = True
    stream.recv_window = 1 << 62
    n = 0
    for piece in pieces:
        conn.receive_data(piece, borrowed=True)
        while conn.next_event() is not MUX_NEED_DATA:
            n += 1
        conn.release()
    return n


def mux_via_splitter(pieces: list[bytes]) -> int:
    """The same frames through the shared FrameSplitter, each payload kept
    whole: what mux would cost on it (with no stream checks at all)."""
    from protocols.framing import MUX_FRAME, FrameSplitter
    splitter = FrameSplitter(MUX_FRAME, max_length=256 * 1024)
    n = 0
    for piece in pieces:
        for _ in splitter.feed(piece):
            n += 1
    return n


def find_one_message(key: int = 1234) -> bytes:
    """What pymongo 4 sends for ``coll.find_one({"_id": key})`` on a
    directly connected server."""
    from protocols.mongodb import OpMsg, bson

    return OpMsg(request_id=7, body={
        "find": "bench", "filter": {"_id": key}, "limit": 1, "singleBatch": True,
        "lsid": {"id": bson.Binary(4, bytes(range(16)))}, "$db": "bench",
        "$readPreference": {"mode": "primaryPreferred"}}).encode()


def mongo_gate_reads(frames: list) -> int:
    from protocols.mongodb.audit import client_event

    n = 0
    for frame in frames:
        client_event(frame)
        n += 1
    return n


def main() -> None:
    if "--mongo-reads" in sys.argv:
        from protocols.framing import Frame

        raw = find_one_message()
        mongo_gate_reads([Frame(None, len(raw) - 4, raw[4:])] * (1 + int(sys.argv[sys.argv.index("--mongo-reads") + 1])))
        return
    only = sys.argv[sys.argv.index("--only") + 1] if "--only" in sys.argv else None
    print(f"python {sys.version.split()[0]}; best of {ROUNDS}")
    if only in (None, "pg"):
        pg()
    if only in (None, "mux"):
        mux()
    if only in (None, "mongo"):
        from protocols.framing import Frame

        raw = find_one_message()
        frames = [Frame(None, len(raw) - 4, raw[4:])] * TRANSACTIONS
        t = best(mongo_gate_reads, frames) / TRANSACTIONS * 1e6
        print(f"mongo gate, a find_one read ({len(raw)} B): {t:6.2f} µs/message")


def pg() -> None:
    client, server = pgbench_streams(TRANSACTIONS)
    cpieces, spieces = chunks(client, 16384), chunks(server, 16384)
    print(f"{TRANSACTIONS} transactions")
    print(f"client stream {len(client) // TRANSACTIONS} B/tx, server stream {len(server) // TRANSACTIONS} B/tx")
    front = best(audit, FrontendAuditor, cpieces) / TRANSACTIONS * 1e6
    back = best(audit, BackendAuditor, spieces) / TRANSACTIONS * 1e6
    print(f"pg FrontendAuditor: {front:6.2f} µs/transaction (client -> server)")
    print(f"pg BackendAuditor:  {back:6.2f} µs/transaction (server -> client)")


def mux() -> None:
    for payload, count in ((100, 200_000), (16384, 20_000)):
        pieces = chunks(mux_stream(payload, count), 65536)
        t = best(mux_decode, pieces) / count * 1e9
        print(f"mux DATA {payload:>5} B: {t:7.1f} ns/frame")
        if "--splitter" in sys.argv:
            t = best(mux_via_splitter, pieces) / count * 1e9
            print(f"  the same through FrameSplitter.feed: {t:7.1f} ns/frame")


if __name__ == "__main__":
    main()

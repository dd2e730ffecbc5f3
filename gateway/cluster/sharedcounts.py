"""Counts shared by a cluster's worker processes: sessions per user, logins
in progress, held the same whichever worker a gateway's link landed on.

Theory of operation: one small file in the state directory (0600), mapped
by every worker (``mmap`` with ``MAP_SHARED``), is an open-addressed table
of ``SLOTS`` entries after an 8-byte header (how many entries are
taken). An entry is a key's 8-byte digest (0: empty) and one
32-bit count per worker, so a worker that dies takes only its own column
with it (:meth:`SharedCounts.clear_worker`, by the supervisor before the
worker is started again), and a key's total is the sum of its row. Every
operation holds ``flock`` on the file (other processes) and a
``threading.Lock`` (this process's threads: trio's and the relay
engine's both start sessions; flock does not exclude two threads sharing
one open file): a few microseconds, once per session start and end, never
per message. A row whose counts are all 0 stays until the table is half
full, then every such row goes at once (:meth:`_compact`); a full table
(more keys with live counts than ``SLOTS // 2``) counts nothing more and
says so once, so a limit is then enforced per worker only.

The file is made afresh by the supervisor at each start (no count
survives a restart, as no session does).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import struct
import threading
from pathlib import Path

import attrs

log = logging.getLogger("wicket.cluster")

SLOTS = 1 << 15
_KEY = struct.Struct("<Q")
_HEADER = _KEY.size  # the number of taken entries


def _digest(key: tuple[str, ...]) -> int:
    raw = "\x00".join(key).encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") | 1  # never 0: empty


def create(path: Path, workers: int) -> None:
    """(the supervisor, before any worker starts) A zeroed table for
    ``workers`` workers."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, _HEADER + SLOTS * (8 + 4 * workers))
    finally:
        os.close(fd)
    tmp.replace(path)


class SharedCounts:
    """One worker's view of the table (``worker``: its column)."""

    def __init__(self, path: Path, workers: int, worker: int) -> None:
        if not 0 <= worker < workers:
            raise ValueError(f"worker {worker} of {workers}")
        self.workers, self.worker = workers, worker
        self._row = struct.Struct(f"<Q{workers}i")
        self._fd = os.open(path, os.O_RDWR)
        size = _HEADER + SLOTS * self._row.size
        if os.fstat(self._fd).st_size != size:
            os.close(self._fd)
            raise ValueError(f"{path} is not a table for {workers} workers")
        self._map = mmap.mmap(self._fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self._lock = threading.Lock()
        self._full_said = False

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def __enter__(self) -> "SharedCounts":
        self._lock.acquire()
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        self._lock.release()

    # -- under the lock ------------------------------------------------------

    def _at(self, slot: int) -> int:
        return _HEADER + slot * self._row.size

    def _find(self, digest: int) -> tuple[int, bool]:
        """The slot of ``digest`` (True) or the empty one it would take
        (False); -1 if the table is full."""
        mem = self._map
        slot = digest % SLOTS
        for _ in range(SLOTS):
            have = _KEY.unpack_from(mem, self._at(slot))[0]
            if have == digest:
                return slot, True
            if have == 0:
                return slot, False
            slot = (slot + 1) % SLOTS
        return -1, False

    def _counts(self, slot: int) -> list[int]:
        return list(self._row.unpack_from(self._map, self._at(slot))[1:])

    def _taken(self) -> int:
        return _KEY.unpack_from(self._map, 0)[0]

    def _compact(self) -> None:
        """Drop every row whose counts are all 0 (rows re-inserted, so the
        probe sequences stay whole)."""
        row = self._row
        keep = []
        for s in range(SLOTS):
            values = row.unpack_from(self._map, self._at(s))
            if values[0] and any(values[1:]):
                keep.append(values)
        self._map[:] = bytes(len(self._map))
        for values in keep:
            slot, _found = self._find(values[0])
            row.pack_into(self._map, self._at(slot), *values)
        _KEY.pack_into(self._map, 0, len(keep))

    def _add(self, key: tuple[str, ...], delta: int, limit: int | None) -> int | None:
        """The key's total after adding ``delta`` to this worker's count, or
        None if that would take the total past ``limit`` (nothing added)."""
        digest = _digest(key)
        slot, found = self._find(digest)
        if not found:
            if delta <= 0:
                return 0  # nothing counted here (a table that was full)
            if slot < 0 or self._taken() >= SLOTS // 2:
                self._compact()
                slot, found = self._find(digest)
                if slot < 0 or self._taken() >= SLOTS // 2:
                    if not self._full_said:
                        self._full_said = True
                        log.warning("shared_counts_full keys=%d action=%s", SLOTS // 2,
                                    "limits are held per worker until fewer users hold sessions")
                    return 0 if limit is None or delta <= limit else None
            counts = [0] * self.workers
            _KEY.pack_into(self._map, 0, self._taken() + 1)
        else:
            counts = self._counts(slot)
        total = sum(counts)
        if limit is not None and delta > 0 and total + delta > limit:
            return None
        counts[self.worker] = max(0, counts[self.worker] + delta)
        self._row.pack_into(self._map, self._at(slot), digest, *counts)
        return sum(counts)

    # -- any thread ----------------------------------------------------------

    def take(self, key: tuple[str, ...], limit: int) -> bool:
        """Count one more for ``key`` unless its total across workers is at
        ``limit`` already."""
        with self:
            return self._add(key, 1, limit) is not None

    def add(self, key: tuple[str, ...], delta: int = 1) -> int:
        """Count ``delta`` more (or fewer) for ``key``; its total after."""
        with self:
            total = self._add(key, delta, None)
        return 0 if total is None else total

    def total(self, key: tuple[str, ...]) -> int:
        with self:
            slot, found = self._find(_digest(key))
            return sum(self._counts(slot)) if found else 0

    def clear_worker(self, worker: int) -> None:
        """(the supervisor) ``worker`` is gone: nothing it counted holds."""
        row = self._row
        with self:
            for s in range(SLOTS):
                values = list(row.unpack_from(self._map, self._at(s)))
                if values[0] and values[1 + worker]:
                    values[1 + worker] = 0
                    row.pack_into(self._map, self._at(s), *values)


@attrs.frozen(slots=True)
class WorkerPlace:
    """Which of a cluster's worker processes this is (gateway/cluster/workers.py)."""

    index: int
    count: int
    #: The shared counts' file (:func:`create`).
    counts: Path

    def share(self, whole: int, *, least: int = 1) -> int:
        """This worker's part of a budget the workers split: ``whole`` over
        the workers, rounded up, at least ``least``."""
        return max(least, -(-whole // self.count))

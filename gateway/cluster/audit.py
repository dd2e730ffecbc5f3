"""The audit trail: every event goes to the store and, if configured, to a
JSON-lines file (one object per line, append-only, mode 0600) that log
shippers can tail. Synchronous; the server calls it on the store's thread."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from gateway.cluster.store import Store
from gateway.printable import escape_json

log = logging.getLogger(__name__)

_TEXT = json.JSONEncoder(ensure_ascii=False).encode

#: JSON lines kept for the file while it cannot take them (disk full, say):
#: the store has every event already, and the file catches up on a later
#: write. Past this, the oldest lines are dropped (and counted).
JSONL_BACKLOG = 16 * 1024 * 1024
#: How long a batch waits for another writer's lock on the file. Ours hold
#: it for one write; past this, something else holds it (a stuck process,
#: someone's ``flock``), and the lines wait in the backlog, as on a full disk,
#: rather than the store's thread waiting for good.
LOCK_WAIT = 1.0


#: What flock says on a file system that cannot lock (NFS without a lock
#: daemon, some FUSE ones): the lines go out unlocked then, as one write.
_CANNOT_LOCK = frozenset({errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})


def _lock(fd: int) -> bool:
    """Take the file's exclusive lock, waiting up to :data:`LOCK_WAIT`
    (then BlockingIOError). False: the file system cannot lock."""
    deadline = time.monotonic() + LOCK_WAIT
    pause = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
        except OSError as exc:
            if exc.errno in _CANNOT_LOCK:
                return False
            raise


def _line(now: float, event: str, user: str | None, fields: str) -> str:
    """One JSON line: time, event and user, then the fields' members, with
    control and bidirectional-control characters as \\u escapes (the same
    JSON; a line stays a line and reads as what it holds)."""
    head = f'{{"time":{round(now, 6)!r},"event":{_TEXT(event)},"user":{_TEXT(user)}'
    return escape_json(f"{head}}}" if fields == "{}" else f"{head},{fields[1:]}") + "\n"


class AuditLog:
    """The cluster and the admin CLI (another process) append to the same
    JSON-lines file. A batch goes out under an exclusive ``flock`` on the
    file, in one ``write`` on an ``O_APPEND`` descriptor (more if the kernel
    takes part of it), so no other writer's lines come between its bytes.
    A write that stops inside a line (a full disk) takes that line back
    before letting go of the lock: the file holds whole lines only, and the
    line is written again, whole, later. A file that ends inside a line all
    the same (a writer killed mid-write) gets a newline before the next
    batch, so the next lines stay whole."""

    def __init__(self, store: Store, jsonl: Path | None) -> None:
        self.store = store
        self._fd: int | None = None
        self._unwritten = bytearray()  # whole lines the file has not taken yet
        self.jsonl_dropped = 0  # lines lost because that backlog was full
        self._dropped_reported = 0
        self._unlocked_reported = False
        if jsonl is not None:
            # Read too: the torn-line check reads the file's last byte.
            self._fd = os.open(jsonl, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, event: str, user: str | None, fields: dict[str, Any], now: float | None = None) -> None:
        self.write_many([(event, user, fields, time.time() if now is None else now)])

    def write_many(self, events: list[tuple[str, str | None, dict[str, Any], float]]) -> None:
        """One store transaction for the whole batch, then the JSON lines,
        each spliced from the fields' JSON the store made (one encoding
        per event, not two: a busy cluster writes thousands a second)."""
        rows = self.store.append_audit_many(events)  # all or none: raising here, it wrote none
        if self._fd is not None and rows:
            self._to_file("".join(_line(*row) for row in rows).encode("utf-8"))

    def _to_file(self, data: bytes) -> None:
        """Append lines to the file, after any it could not take before.
        Never raises: the events are in the store already, and a caller
        retrying the batch would store them twice."""
        failing = bool(self._unwritten)
        unwritten = self._unwritten
        unwritten += data
        try:
            locked = _lock(self._fd)
            if not locked and not self._unlocked_reported:
                self._unlocked_reported = True
                log.warning("audit_jsonl_unlocked action=%s", "keep audit.jsonl on a file system with "
                            "locks (flock): lines from the admin CLI and the cluster may meet mid-line")
            try:
                self._append_locked(unwritten)
            finally:
                if locked:
                    fcntl.flock(self._fd, fcntl.LOCK_UN)
        except OSError as exc:
            if len(unwritten) > JSONL_BACKLOG:
                # Drop the oldest whole lines (the backlog holds whole lines only).
                cut = unwritten.find(b"\n", len(unwritten) - JSONL_BACKLOG) + 1
                self.jsonl_dropped += unwritten.count(b"\n", 0, cut)
                del unwritten[:cut]
            if not failing:
                if isinstance(exc, BlockingIOError):
                    log.error("audit_jsonl_write_failed error=%s action=%s",
                              f"another process has held a lock on the file for over {LOCK_WAIT:g}s",
                              "find it with `fuser` on the file; the store has every event and the "
                              "file catches up on the next write")
                else:
                    log.error("audit_jsonl_write_failed error=%s action=%s", exc.strerror or exc,
                              "free disk space or fix the file's permissions; the store has every "
                              "event and the file catches up on the next write")
            return
        if failing:
            log.warning("audit_jsonl_caught_up dropped_lines=%d",
                        self.jsonl_dropped - self._dropped_reported)
            self._dropped_reported = self.jsonl_dropped

    def _append_locked(self, unwritten: bytearray) -> None:
        """Write ``unwritten`` (whole lines) at the end of the file (its
        lock held); on an error, leave the file with whole lines only and
        ``unwritten`` with what it did not take, then raise."""
        fd = self._fd
        start = os.fstat(fd).st_size
        if start and os.pread(fd, 1, start - 1) != b"\n":
            os.write(fd, b"\n")  # a writer died mid-line: end its line, not ours
            start += 1
        written = 0
        try:
            while written < len(unwritten):  # a regular file takes it all at once; a full disk may not
                written += os.write(fd, unwritten if not written else unwritten[written:])
        except OSError:
            whole = unwritten.rfind(b"\n", 0, written) + 1
            if whole < written:
                # The file ends in the middle of a line: take that part back
                # (if that fails too, the next batch ends the line first).
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, start + whole)
            del unwritten[:whole]
            raise
        del unwritten[:]

    def close(self) -> None:
        if self._fd is not None:
            if self._unwritten:
                self._to_file(b"")
                lost = self._unwritten.count(b"\n") + self.jsonl_dropped - self._dropped_reported
                if lost:
                    log.error("audit_jsonl_lines_lost lines=%d action=%s", lost,
                              "they are in the store: `wicket-cluster audit` shows them")
            os.close(self._fd)
            self._fd = None

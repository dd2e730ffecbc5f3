"""The audit trail: every event goes to the store and, if configured, to a
JSON-lines file (one object per line, append-only, mode 0600) that log
shippers can tail. Synchronous; the server calls it on the store's thread."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from gateway.cluster.store import Store

log = logging.getLogger(__name__)

_TEXT = json.JSONEncoder(ensure_ascii=False).encode

#: JSON lines kept for the file while it cannot take them (disk full, say):
#: the store has every event already, and the file catches up on a later
#: write. Past this, the oldest lines are dropped (and counted).
JSONL_BACKLOG = 16 * 1024 * 1024


def _line(now: float, event: str, user: str | None, fields: str) -> str:
    """One JSON line: time, event and user, then the fields' members."""
    head = f'{{"time":{round(now, 6)!r},"event":{_TEXT(event)},"user":{_TEXT(user)}'
    return f"{head}}}\n" if fields == "{}" else f"{head},{fields[1:]}\n"


class AuditLog:
    """The cluster and the admin CLI (another process) append to the same
    JSON-lines file: each batch goes out in one ``write`` on an ``O_APPEND``
    descriptor, so their lines never interleave mid-line."""

    def __init__(self, store: Store, jsonl: Path | None) -> None:
        self.store = store
        self._fd: int | None = None
        self._unwritten = bytearray()  # lines the file has not taken yet
        self._midline = False  # the file ends inside a line: _unwritten starts with its rest
        self.jsonl_dropped = 0  # lines lost because that backlog was full
        self._dropped_reported = 0
        if jsonl is not None:
            self._fd = os.open(jsonl, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

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
            while unwritten:  # a regular file takes it all at once; a full disk may not
                n = os.write(self._fd, unwritten)
                self._midline = n < len(unwritten) and unwritten[n - 1] != 0x0A
                del unwritten[:n]
        except OSError as exc:
            if len(unwritten) > JSONL_BACKLOG:
                # Drop the oldest whole lines; never the rest of a line the
                # file has begun (the next line would be glued onto it).
                head = unwritten.find(b"\n") + 1 if self._midline else 0
                cut = unwritten.find(b"\n", max(head, len(unwritten) - JSONL_BACKLOG)) + 1
                if cut > head:
                    self.jsonl_dropped += unwritten.count(b"\n", head, cut)
                    del unwritten[head:cut]
            if not failing:
                log.error("audit_jsonl_write_failed error=%s action=%s", exc.strerror or exc,
                          "free disk space or fix the file's permissions; the store has every "
                          "event and the file catches up on the next write")
            return
        if failing:
            log.warning("audit_jsonl_caught_up dropped_lines=%d",
                        self.jsonl_dropped - self._dropped_reported)
            self._dropped_reported = self.jsonl_dropped

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

"""The audit trail: every event goes to the store and, if configured, to a
JSON-lines file (one object per line, append-only, mode 0600) that log
shippers can tail. Synchronous; the server calls it on the store's thread."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from gateway.cluster.store import Store


_TEXT = json.JSONEncoder(ensure_ascii=False).encode


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
        if jsonl is not None:
            self._fd = os.open(jsonl, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def write(self, event: str, user: str | None, fields: dict[str, Any], now: float | None = None) -> None:
        self.write_many([(event, user, fields, time.time() if now is None else now)])

    def write_many(self, events: list[tuple[str, str | None, dict[str, Any], float]]) -> None:
        """One store transaction for the whole batch, then the JSON lines,
        each spliced from the fields' JSON the store made (one encoding
        per event, not two: a busy cluster writes thousands a second)."""
        rows = self.store.append_audit_many(events)
        if self._fd is not None and rows:
            data = memoryview("".join(_line(*row) for row in rows).encode("utf-8"))
            while data:  # a regular file takes it all at once; a full disk may not
                data = data[os.write(self._fd, data):]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

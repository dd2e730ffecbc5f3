"""Structured logs: ``key=value`` lines for people, JSON lines for machines.

Call sites log with printf-style ``"event key=%s key2=%s"`` messages so the
text form stays grep-able; the JSON form wraps the rendered message with the
time, level and logger. No call site passes a secret.

Values may come from peers (a db user, a resource name): the text form
writes control and bidirectional-control characters escaped
(gateway/printable.py), so a value cannot forge a line or reorder what a
reader sees; the JSON form escapes them as JSON (ASCII only).
"""

from __future__ import annotations

import collections
import json
import logging
import sys
import threading
import time

from gateway.printable import escape, is_clean


class _KVFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second, self._stamp = -1, ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:  # one strftime per second, not per line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line = f"{self._stamp}.{int(record.msecs):03d}Z {record.levelname.lower():7} {record.name}: " \
               f"{escape(record.getMessage())}"
        if record.exc_text:  # a traceback's lines stay lines; what is in them is escaped
            line += "".join("\n" + escape(part) for part in record.exc_text.split("\n"))
        return line


class _JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {
            "time": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_text:
            doc["exc"] = record.exc_text
        return json.dumps(doc, separators=(",", ":"))  # ensure_ascii: every such character escaped


class _Handoff(logging.Handler):
    """Renders the message in the thread that logs and queues the record;
    a writer thread writes what queued every ``FLUSH_INTERVAL``, in one
    write. So a thread that logs (trio's, the relay engine's) never blocks on
    a slow stderr (a stalled journald, a full pipe), and a line costs it the
    record and a queue append: no wake-up of another thread per line."""

    FLUSH_INTERVAL = 0.05
    CLOSE_TIMEOUT = 5.0
    #: Records that may wait for a stalled stderr; more are counted and dropped.
    MAX_QUEUED = 100_000

    def __init__(self, stream, formatter: logging.Formatter) -> None:
        super().__init__()
        self.stream = stream
        self.formatter = formatter
        self.records: collections.deque[logging.LogRecord] = collections.deque()
        self.dropped = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="wicket-log", daemon=True)
        self.thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) >= self.MAX_QUEUED:
            self.dropped += 1  # stderr has stalled: memory must not grow with it
            return
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:  # the traceback's frames must not outlive this call
            record.exc_text = _TRACEBACKS.formatException(record.exc_info)
            record.exc_info = None
        self.records.append(record)

    def _run(self) -> None:
        while not self.stopping.wait(self.FLUSH_INTERVAL):
            self.write_queued()
        self.write_queued()

    def write_queued(self) -> None:
        records, lines = self.records, []
        if self.dropped:
            dropped, self.dropped = self.dropped, 0
            lines.append(self.formatter.format(logging.makeLogRecord({
                "name": "wicket.logs", "levelno": logging.WARNING, "levelname": "WARNING",
                "msg": f"log_lines_dropped count={dropped} reason=stderr did not take them in time",
            })) + "\n")
        while records:
            record = records.popleft()
            try:
                lines.append(self.formatter.format(record) + "\n")
            except Exception:
                self.handleError(record)
        if lines:
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except Exception:  # stderr closed: nowhere left to say so
                pass

    def close(self) -> None:
        """Write what is still queued and stop the writer thread."""
        self.stopping.set()
        if self.thread.is_alive() and self.thread is not threading.current_thread():
            self.thread.join(self.CLOSE_TIMEOUT)  # a stalled stderr must not hold up the exit
        super().close()


class _Tracebacks(logging.Formatter):
    """Tracebacks whose exception messages are escaped: a message may hold
    a peer's text, and a newline in it must not make a line of its own
    (the traceback's own line breaks stay)."""

    def formatException(self, ei) -> str:
        text = super().formatException(ei)
        for message in _messages(ei[1]):
            if not is_clean(message):
                text = text.replace(message, escape(message))
        return text


def _messages(exc: BaseException | None, limit: int = 64) -> list[str]:
    """The messages of ``exc``, its causes, contexts and (in a group) members."""
    out: list[str] = []
    todo, seen = [exc], set()
    while todo and len(seen) < limit:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        try:
            out.append(str(current))
        except Exception:  # a __str__ that fails: the traceback says so itself
            pass
        todo += [current.__cause__, current.__context__]
        if isinstance(current, BaseExceptionGroup):
            todo += current.exceptions
    return out


_TRACEBACKS = _Tracebacks()


def setup(fmt: str = "text", level: str = "info") -> None:
    root = logging.getLogger()
    for old in root.handlers:
        old.close()
    root.handlers[:] = [_Handoff(sys.stderr, _JSONFormatter() if fmt == "json" else _KVFormatter())]
    root.setLevel(level.upper())

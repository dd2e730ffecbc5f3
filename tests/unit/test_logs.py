"""gateway/logs.py: lines are rendered where they are logged and written by
the writer thread, in order, with tracebacks, and nothing queued is lost
when logging shuts down."""

from __future__ import annotations

import io
import json
import logging
import threading

import pytest

from gateway import logs


@pytest.fixture
def root():
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    yield root
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = saved
    root.setLevel(level)


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_lines_from_any_thread_are_written_in_order_with_tracebacks(root, fmt):
    logs.setup(fmt)
    out = io.StringIO()
    handler = root.handlers[0]
    handler.stream = out
    log = logging.getLogger("wicket.test")
    log.info("first n=%d", 1)
    thread = threading.Thread(target=lambda: log.warning("from another thread n=%d", 2))
    thread.start()
    thread.join()
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed n=%d", 3)
    log.debug("below the level")
    handler.close()  # writes what is queued, as logging.shutdown does at exit
    lines = out.getvalue()
    if fmt == "json":
        docs = [json.loads(line) for line in lines.splitlines()]
        assert [d["msg"] for d in docs] == ["first n=1", "from another thread n=2", "failed n=3"]
        assert [d["level"] for d in docs] == ["info", "warning", "error"]
        assert "ValueError: boom" in docs[2]["exc"] and "Traceback" in docs[2]["exc"]
    else:
        first, second, third = lines.split("\n", 2)
        assert first.endswith("info    wicket.test: first n=1")
        assert second.endswith("warning wicket.test: from another thread n=2")
        assert "error   wicket.test: failed n=3\nTraceback" in third and "ValueError: boom" in third
        assert "below the level" not in lines

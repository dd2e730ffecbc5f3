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


def test_a_stalled_stderr_bounds_what_waits_and_says_how_much_it_dropped(root, monkeypatch):
    monkeypatch.setattr(logs._Handoff, "FLUSH_INTERVAL", 3600)  # the writer never gets to it
    monkeypatch.setattr(logs._Handoff, "MAX_QUEUED", 3)
    logs.setup("text")
    out = io.StringIO()
    handler = root.handlers[0]
    handler.stream = out
    log = logging.getLogger("wicket.test")
    for i in range(10):
        log.info("line n=%d", i)
    assert len(handler.records) == 3
    handler.close()
    lines = out.getvalue().splitlines()
    assert "log_lines_dropped count=7" in lines[0]
    assert [line.rsplit(" ", 1)[1] for line in lines[1:]] == ["n=0", "n=1", "n=2"]

"""gateway.cluster.audit: the JSON-lines file that the cluster and the admin
CLI (other processes) append to at once. (The store's side, and one file
written from two threads, are in store/test_audit.py and below.)"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gateway.cluster import audit
from gateway.cluster.audit import AuditLog
from gateway.cluster.store import Store

ROOT = Path(__file__).resolve().parents[4]

#: A writer in its own process: AuditLog(jsonl).write_many, batches times,
#: lines of every size up to well past a pipe buffer (so no write is
#: atomic just by being small).
WRITER = """
import resource, signal, sys
from pathlib import Path
from gateway.cluster.audit import AuditLog
from gateway.cluster.store import Store

jsonl, db, who, batches, fsize = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
log = AuditLog(Store.open(Path(db)), Path(jsonl))
if fsize:
    # The file may grow to fsize bytes: the kernel takes part of the write
    # that crosses it, and refuses the next (EFBIG, SIGXFSZ ignored).
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
for b in range(batches):
    log.write_many([("test.event", who, {"b": b, "i": i, "pad": "x" * (i * 3001 % 70_000)}, 1.0)
                    for i in range(8)])
log.close()
"""


def run_writers(tmp_path: Path, jsonl: Path, specs: list[tuple[str, int, int]]) -> None:
    """Start one process per (who, batches, fsize) at once; wait for all."""
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(jsonl), str(tmp_path / f"{who}.db"), who,
                               str(batches), str(fsize)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                              stderr=subprocess.PIPE, text=True)
             for who, batches, fsize in specs]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err


def lines_of(jsonl: Path) -> list[dict]:
    data = jsonl.read_bytes()
    assert not data or data.endswith(b"\n")
    return [json.loads(line) for line in data.decode("utf-8").splitlines()]  # each one whole


def test_writers_in_many_processes_never_interleave(tmp_path: Path) -> None:
    jsonl = tmp_path / "audit.jsonl"
    run_writers(tmp_path, jsonl, [(f"w{n}", 30, 0) for n in range(6)])
    docs = lines_of(jsonl)
    assert len(docs) == 6 * 30 * 8
    for n in range(6):  # each writer's lines all there, in its order
        assert [(d["b"], d["i"]) for d in docs if d["user"] == f"w{n}"] == [
            (b, i) for b in range(30) for i in range(8)]


def test_a_write_cut_short_leaves_no_half_line_for_the_next_writer(tmp_path: Path) -> None:
    # A real short write: a process whose file size limit falls inside its
    # batch. The kernel writes part of a line and refuses the rest; that
    # part is taken back, so the next process's lines do not glue onto it.
    jsonl = tmp_path / "audit.jsonl"
    first = AuditLog(Store.open(tmp_path / "first.db"), jsonl)
    # 1.2 MB already: the limit must leave room for the writer's own store.
    first.write_many([("test.event", "first", {"n": n, "pad": "y" * 200_000}, 1.0) for n in range(6)])
    run_writers(tmp_path, jsonl, [("cut", 1, jsonl.stat().st_size + 20_000)])
    first.write_many([("test.event", "first", {"n": 6}, 2.0)])
    docs = lines_of(jsonl)
    assert [d["n"] for d in docs if d["user"] == "first"] == [0, 1, 2, 3, 4, 5, 6]
    cut = [d["i"] for d in docs if d["user"] == "cut"]
    assert 0 < len(cut) < 8 and cut == list(range(len(cut)))  # the lines that fit, whole
    first.close()
    first.store.close()


def test_a_line_cut_by_a_full_disk_is_taken_back_and_written_whole_later(tmp_path: Path, monkeypatch) -> None:
    jsonl = tmp_path / "audit.jsonl"
    log = AuditLog(Store.open(tmp_path / "a.db"), jsonl)
    other = AuditLog(Store.open(tmp_path / "b.db"), jsonl)
    monkeypatch.setattr(audit, "JSONL_BACKLOG", 100)
    real_write, state = os.write, {"room": 20}

    def write(fd, data):
        if fd != log._fd or state["room"] is None:
            return real_write(fd, data)
        if not state["room"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = real_write(fd, bytes(data[:state["room"]]))
        state["room"] -= n
        return n

    monkeypatch.setattr(audit.os, "write", write)
    log.write_many([("test.event", "u", {"n": n}, 1.0) for n in range(10)])
    assert jsonl.read_bytes() == b""  # not 20 bytes of a line
    other.write_many([("test.event", "other", {"n": 0}, 1.5)])
    state["room"] = None  # space again
    log.write_many([("test.event", "u", {"n": 10}, 2.0)])
    docs = lines_of(jsonl)
    assert docs[0]["user"] == "other"
    numbers = [d["n"] for d in docs[1:]]
    assert numbers[-1] == 10 and numbers == sorted(numbers) and len(numbers) > 1
    assert log.jsonl_dropped == 11 - len(numbers)  # the oldest went, to bound the backlog
    for each in (log, other):
        each.close()
        each.store.close()


def test_a_line_left_torn_by_a_killed_writer_does_not_swallow_the_next(tmp_path: Path) -> None:
    jsonl = tmp_path / "audit.jsonl"
    jsonl.write_bytes(b'{"time":1.0,"event":"test.event","user":"killed","n":')
    log = AuditLog(Store.open(tmp_path / "a.db"), jsonl)
    log.write_many([("test.event", "u", {"n": 1}, 1.0)])
    torn, line = jsonl.read_bytes().split(b"\n", 1)
    assert torn.endswith(b'"n":') and json.loads(line)["n"] == 1
    log.close()
    log.store.close()


def test_a_lock_held_elsewhere_delays_the_lines_not_the_cluster(tmp_path: Path, monkeypatch, caplog) -> None:
    jsonl = tmp_path / "audit.jsonl"
    log = AuditLog(Store.open(tmp_path / "a.db"), jsonl)
    monkeypatch.setattr(audit, "LOCK_WAIT", 0.05)
    holder = os.open(jsonl, os.O_RDONLY)  # another open file: its lock conflicts with ours
    fcntl.flock(holder, fcntl.LOCK_EX)
    log.write_many([("test.event", "u", {"n": 1}, 1.0)])  # returns, the line kept
    assert jsonl.read_bytes() == b""
    assert "another process has held a lock on the file" in caplog.text and "fuser" in caplog.text
    fcntl.flock(holder, fcntl.LOCK_UN)
    os.close(holder)
    log.write_many([("test.event", "u", {"n": 2}, 2.0)])
    assert [d["n"] for d in lines_of(jsonl)] == [1, 2]
    assert "audit_jsonl_caught_up dropped_lines=0" in caplog.text
    log.close()
    log.store.close()


def test_a_file_system_without_locks_still_gets_the_lines(tmp_path: Path, monkeypatch, caplog) -> None:
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    jsonl = tmp_path / "audit.jsonl"
    log = AuditLog(Store.open(tmp_path / "a.db"), jsonl)
    monkeypatch.setattr(audit.fcntl, "flock", no_locks)
    for n in range(2):
        log.write_many([("test.event", "u", {"n": n}, 1.0)])
    assert [d["n"] for d in lines_of(jsonl)] == [0, 1]
    assert caplog.text.count("audit_jsonl_unlocked") == 1
    log.close()
    log.store.close()


def test_other_lock_errors_are_write_failures(tmp_path: Path, monkeypatch, caplog) -> None:
    def broken(fd, op):
        raise OSError(errno.EIO, "Input/output error")

    log = AuditLog(Store.open(tmp_path / "a.db"), tmp_path / "audit.jsonl")
    monkeypatch.setattr(audit.fcntl, "flock", broken)
    log.write_many([("test.event", "u", {"n": 1}, 1.0)])
    assert "audit_jsonl_write_failed error=Input/output error" in caplog.text
    monkeypatch.undo()
    log.close()  # writes what waited
    assert [d["n"] for d in lines_of(tmp_path / "audit.jsonl")] == [1]
    log.store.close()


def test_audit_jsonl_lines_from_two_writers_never_interleave(tmp_path: Path) -> None:
    # The cluster and the admin CLI append to one file, each from its own
    # descriptor (as two processes do): every line stays whole.
    import json

    from gateway.cluster.audit import AuditLog

    jsonl = tmp_path / "audit.jsonl"
    logs = [AuditLog(Store.open(tmp_path / f"w{i}.db"), jsonl) for i in range(2)]
    big = {"statement": "x" * 20_000, "params": {"é": "ü"}}

    def writer(log: AuditLog, who: str) -> None:
        for i in range(20):
            log.write_many([("session.statement", who, {**big, "n": i}, 1.0)] * 10)

    threads = [threading.Thread(target=writer, args=(log, f"user{i}")) for i, log in enumerate(logs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    lines = jsonl.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 * 20 * 10
    docs = [json.loads(line) for line in lines]
    assert {d["user"] for d in docs} == {"user0", "user1"}
    assert all(d["params"] == {"é": "ü"} and d["event"] == "session.statement" for d in docs)
    assert stat.S_IMODE(jsonl.stat().st_mode) == 0o600
    for log in logs:
        log.close()
        log.store.close()


def test_audit_jsonl_that_cannot_be_written_catches_up_and_never_duplicates(tmp_path: Path, monkeypatch,
                                                                           caplog) -> None:
    # The file fails after the store committed (disk full: /dev/full in
    # its place). write_many must not raise (a caller retrying the batch
    # would store it twice); the file gets the lines once it can.
    import json

    from gateway.cluster import audit

    jsonl = tmp_path / "audit.jsonl"
    log = audit.AuditLog(Store.open(tmp_path / "a.db"), jsonl)
    real = os.dup(log._fd)
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, log._fd)
    log.write_many([("test.event", "u", {"n": 1}, 1.0), ("test.event", "u", {"n": 2}, 2.0)])
    log.write_many([("test.event", "u", {"n": 3}, 3.0)])
    assert "audit_jsonl_write_failed" in caplog.text and caplog.text.count("audit_jsonl_write_failed") == 1
    assert jsonl.read_text() == ""
    os.dup2(real, log._fd)
    log.write_many([("test.event", "u", {"n": 4}, 4.0)])
    assert [json.loads(line)["n"] for line in jsonl.read_text().splitlines()] == [1, 2, 3, 4]
    assert sorted(e.fields["n"] for e in log.store.query_audit()) == [1, 2, 3, 4]  # each once
    assert "audit_jsonl_caught_up dropped_lines=0" in caplog.text

    # Past JSONL_BACKLOG the oldest whole lines go, and are counted.
    monkeypatch.setattr(audit, "JSONL_BACKLOG", 100)
    os.dup2(full, log._fd)
    log.write_many([("test.event", "u", {"n": n}, 5.0) for n in range(5, 15)])
    os.dup2(real, log._fd)
    log.write_many([("test.event", "u", {"n": 15}, 6.0)])
    kept = [json.loads(line)["n"] for line in jsonl.read_text().splitlines()][4:]
    assert 1 <= len(kept) < 11 and kept == list(range(16 - len(kept), 16))  # the newest, in order
    assert log.jsonl_dropped == 11 - len(kept)
    assert sorted(e.fields["n"] for e in log.store.query_audit()) == list(range(1, 16))
    for fd in (real, full):
        os.close(fd)
    log.close()
    log.store.close()

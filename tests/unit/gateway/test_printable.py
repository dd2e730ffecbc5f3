"""Control and bidirectional-control characters from peers: refused in
names, matched by no glob, escaped in logs and in the audit's JSON lines."""

from __future__ import annotations

import io
import json
import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway import logs, printable
from gateway.cluster import rbac
from gateway.cluster.audit import AuditLog
from gateway.cluster.store import Resource, Store

FORGED = "ro_\n2026-01-01T00:00:00.000Z info    wicket.cluster: login_ok user=admin"
UNSAFE = ["\n", "\r", "\x00", "\x1b[31m", "\x7f", "\x85", "\u202e", "\u2066", "\u200f", "\u2028"]


@pytest.mark.parametrize("char", UNSAFE)
def test_unsafe_characters_are_found_and_escaped(char):
    text = f"a{char}b"
    assert not printable.is_clean(text)
    assert printable.first_unsafe(text) == f"U+{ord(char[0]):04X}"
    assert printable.is_clean(printable.escape(text))
    assert "\\" in printable.escape(text)


@given(st.text(alphabet=st.characters(max_codepoint=0x2100)) | st.text(alphabet=st.characters(max_codepoint=0x7f)))
def test_clean_means_no_character_of_the_pattern(text):
    # ASCII text takes a quicker test than the pattern: both must agree.
    assert printable.is_clean(text) is (printable._UNSAFE.search(text) is None)
    assert printable.is_clean(text + "\x7f") is False and printable.is_clean(text + "\x1b") is False


def test_ordinary_text_is_left_alone():
    for text in ("alice", "ro_reader", "Zürich", "日本", "a b\\c"):
        assert printable.is_clean(text) and printable.escape(text) == text


def test_no_glob_matches_a_control_character():
    role = rbac.Role.from_spec("ro", {"allow": [{"resources": ["*"], "db_users": ["ro_*"]}]})
    assert rbac.decide([role], "pg", {}, {"db_user": "ro_reader"}).allowed
    assert not rbac.decide([role], "pg", {}, {"db_user": FORGED}).allowed
    assert not rbac.decide([role], "x\u202e", {}, {}).allowed
    with pytest.raises(rbac.RoleError, match="control character"):
        rbac.Role.from_spec("bad", {"allow": [{"resources": ["web\n*"]}]})


def test_labels_with_control_characters_are_refused():
    with pytest.raises(ValueError, match="control character"):
        Resource(name="web", kind="tcp", address="127.0.0.1:80", labels={"env": "dev\u202e"})


@pytest.fixture
def text_log():
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    logs.setup("text")
    out = io.StringIO()
    root.handlers[0].stream = out
    yield out
    for handler in root.handlers:
        handler.close()
    root.handlers[:] = saved
    root.setLevel(level)


def test_a_log_value_cannot_forge_a_line_or_reorder_one(text_log):
    log = logging.getLogger("wicket.test")
    log.info("dial_refused db_user=%s resource=%s", FORGED, "web\u202eexe.txt")
    try:
        raise ValueError(FORGED)
    except ValueError:
        log.exception("failed")
    logging.getLogger().handlers[0].write_queued()
    lines = text_log.getvalue().splitlines()
    assert len(lines[0].split("\n")) == 1 and "ro_\\x0a2026" in lines[0] and "web\\u202eexe" in lines[0]
    assert not any(line.startswith("2026-01-01T00:00:00.000Z") for line in lines)
    assert "ValueError: ro_\\x0a2026" in text_log.getvalue()  # in a traceback too


def test_audit_jsonl_escapes_them_and_keeps_the_values(tmp_path):
    jsonl = tmp_path / "audit.jsonl"
    with Store.open(tmp_path / "wicket.db") as store:
        audit = AuditLog(store, jsonl)
        audit.write("login.failed", "eve\u202e\x85", {"db_user": FORGED, "note": "\u2066x\x7f"}, now=1.0)
        audit.close()
        stored = store.query_audit()[0]
    text = jsonl.read_text(encoding="utf-8")
    assert text.count("\n") == 1 and printable.is_clean(text[:-1])
    doc = json.loads(text)
    assert doc["user"] == "eve\u202e\x85" and doc["db_user"] == FORGED and doc["note"] == "\u2066x\x7f"
    assert stored.fields["db_user"] == FORGED  # the store keeps the value as it was

"""protocols.mysql.responses: the server's answers followed, ERRs and LOCAL
INFILE requests told from row data."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import RemoteProtocolError
from protocols.mysql.commands import CommandTracker
from protocols.mysql.constants import Capability, Command, ErrorNumber, ServerStatus
from protocols.mysql.commands import LocalInfileDataEvent
from protocols.mysql.packets import iter_packets
from protocols.mysql.responses import ErrorEvent, LocalInfileRequestEvent, ResponseAuditor
from protocols.signals import ConnectionClosed
from tests.unit.protocols.feeding import FEEDS, fuzz, malformed, split
from tests.unit.protocols.mysql.session import (
    CAPS, COLUMN, MODERN, Session, command, cut, definitions, eof, err, ok, outcome, pkt, query, query_event,
    result_set,
)

SYNTAX = ErrorEvent(errno=1064, sqlstate="42000", message="You have an error", truncated=False)
MORE = ServerStatus.AUTOCOMMIT | ServerStatus.MORE_RESULTS_EXISTS
# Rows that start like a LOCAL INFILE request would (a NULL first column),
# or like an OK with DEPRECATE_EOF off (0x00: a binary row). A row cannot
# start 0xFE below 16 MiB: see test_sixteen_mib_rows_are_followed.
TRICKY_ROWS = [b"\xfb\x01x", b"\xfbabcdefghijklmnopqrstuvwxyz", b"\x00\x00\x01", b"\x01a"]


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("deprecate_eof", [True, False])
def test_errors_are_told_from_rows(how: str, deprecate_eof: bool) -> None:
    session = Session(MODERN if deprecate_eof else CAPS)
    session.client(query("select * from t") + query("selec") + query("do 1"))
    stream = (result_set(TRICKY_ROWS, deprecate_eof=deprecate_eof) + err(1) + ok(1)
              + query("trailing")[:3])
    assert session.server(stream, how) == [SYNTAX]
    assert not session.tracker.pending


def test_an_err_in_the_middle_of_a_result_set() -> None:
    session = Session()
    session.client(query("select * from big") + query("select 1"))
    interrupted = "Query execution was interrupted, maximum statement execution time exceeded"
    broken = result_set([b"\x01a"], deprecate_eof=True)[:-11]  # drop the terminator
    events = session.server(broken + err(5, 3024, interrupted) + err(1))
    assert events == [ErrorEvent(errno=3024, sqlstate="42000", message=interrupted,
                                 truncated=False), SYNTAX]
    # Where a row might be, only a long row's prefix is kept: an ERR that
    # long keeps its number and SQLSTATE, and the start of its message.
    session.client(query("select * from big"))
    long_message = interrupted * 10
    (cut,) = session.server(broken + err(5, 3024, long_message))
    assert isinstance(cut, ErrorEvent) and cut.errno == 3024 and cut.sqlstate == "42000"
    assert cut.truncated and long_message.startswith(cut.message) and cut.message


def test_multiple_results() -> None:
    session = Session()
    session.client(query("call p()") + query("x"))
    stream = (result_set([b"\x01a"], deprecate_eof=True, status=MORE)
              + ok(6, MORE) + result_set([], deprecate_eof=True, start=7)
              + err(1))
    assert session.server(stream) == [SYNTAX]


def test_local_infile_request() -> None:
    session = Session()
    session.client(query("load data local infile '/etc/hosts' into table t"))
    assert session.server(pkt(1, b"\xfb/etc/hosts")) == [
        LocalInfileRequestEvent(file_name="/etc/hosts", truncated=False)]
    assert session.tracker.infile
    session.client(pkt(2, b"127.0.0.1 localhost\n") + pkt(3, b""))
    session.client(query("x"))
    assert session.server(ok(4) + err(1)) == [SYNTAX]
    # A NULL first column in a row is not a request.
    session.client(query("select null"))
    assert session.server(result_set([b"\xfb"], deprecate_eof=True, columns=1)) == []
    assert not session.tracker.infile


def test_a_long_file_name_is_cut() -> None:
    session = Session()
    session.client(query("load data local infile 'x' into table t"))
    (event,) = session.server(pkt(1, b"\xfb" + b"n" * 5000))
    assert isinstance(event, LocalInfileRequestEvent) and event.truncated
    assert len(event.file_name) == 4096


@pytest.mark.parametrize("deprecate_eof", [True, False])
def test_prepare_and_execute(deprecate_eof: bool) -> None:
    session = Session(MODERN if deprecate_eof else CAPS)
    session.client(command(Command.STMT_PREPARE, b"select ?, a from t where b = ?"))
    params, seq = definitions(2, 1, deprecate_eof=deprecate_eof)
    columns, _ = definitions(1, seq, deprecate_eof=deprecate_eof)
    prepared = pkt(1, b"\x00" + struct.pack("<IHHxH", 3, 1, 2, 0))
    assert session.server(prepared + params + columns) == []
    assert session.tracker.params(3) == 2
    session.client(command(Command.STMT_EXECUTE, struct.pack("<IBI", 3, 0, 1)) + query("x"))
    stream = result_set([b"\x00\x00\x01"], deprecate_eof=deprecate_eof, columns=1) + err(1)
    assert session.server(stream) == [SYNTAX]


def test_a_prepare_that_fails() -> None:
    session = Session()
    session.client(command(Command.STMT_PREPARE, b"selec"))
    assert session.server(err(1)) == [SYNTAX]
    session.client(command(Command.STMT_PREPARE, b"select 1"))
    assert session.server(pkt(1, b"\x00" + struct.pack("<IHHxH", 4, 0, 0, 0))) == []
    assert session.tracker.params(4) == 0 and not session.tracker.pending


@pytest.mark.parametrize("deprecate_eof", [True, False])
def test_cursors_and_fetch(deprecate_eof: bool) -> None:
    session = Session(MODERN if deprecate_eof else CAPS)
    session.client(command(Command.STMT_EXECUTE, struct.pack("<IBI", 3, 1, 1)))
    cursor = ServerStatus.AUTOCOMMIT | ServerStatus.CURSOR_EXISTS
    stream = pkt(1, b"\x01") + pkt(2, COLUMN)
    stream += ok(3, cursor, header=0xFE) if deprecate_eof else eof(3, cursor)
    assert session.server(stream) == [] and not session.tracker.pending
    session.client(command(Command.STMT_FETCH, struct.pack("<II", 3, 10)) + query("x"))
    last = ok(3, ServerStatus.LAST_ROW_SENT, 0xFE) if deprecate_eof else eof(3)
    assert session.server(pkt(1, b"\x00\x00\x01") + pkt(2, b"\x00\x00\x02") + last
                          + err(1)) == [SYNTAX]


def test_field_list_statistics_and_simple_commands() -> None:
    session = Session(CAPS)
    session.client(command(Command.FIELD_LIST, b"t\x00") + command(Command.STATISTICS)
                   + command(Command.SET_OPTION, b"\x00\x00") + command(Command.PING)
                   + query("x"))
    stream = (pkt(1, COLUMN) + pkt(2, COLUMN) + eof(3) + pkt(1, b"Uptime: 5  Threads: 1")
              + eof(1) + ok(1) + err(1))
    assert session.server(stream) == [SYNTAX]


def test_change_user_exchange() -> None:
    session = Session()
    session.client(command(Command.CHANGE_USER, b"bob\x00\x00") + pkt(2, b"a" * 20)
                   + query("x"))
    switch = pkt(1, b"\xfemysql_native_password\x00" + b"n" * 21)
    assert session.server(switch + ok(3) + err(1)) == [SYNTAX]
    session.client(command(Command.CHANGE_USER, b"eve\x00\x00"))
    denied = pkt(1, b"\xff\x15\x04#28000Access denied")
    assert session.server(denied) == [ErrorEvent(errno=1045, sqlstate="28000",
                                                 message="Access denied", truncated=False)]


def test_mariadb_progress_reports_are_skipped() -> None:
    session = Session()
    session.client(query("alter table t engine=innodb"))
    progress = pkt(1, b"\xff\xff\xff\x01\x01\x00\x10\x00\x00")
    assert session.server(progress + ok(2)) == [] and not session.tracker.pending


def test_streams_without_an_end() -> None:
    session = Session()
    session.client(command(Command.BINLOG_DUMP, b"\x04\x00\x00\x00\x00\x00\x01\x00\x00\x00"))
    assert session.server(pkt(1, b"\x00event") + pkt(2, b"\xff\x00\x00x")) == []


def test_sixteen_mib_rows_are_followed() -> None:
    session = Session()
    session.client(query("select blob") + query("x"))
    row = b"\xfe" + b"\x00" * (2**24 - 2)  # a full packet that starts like an OK
    stream = (pkt(1, b"\x01") + pkt(2, COLUMN) + pkt(3, row) + pkt(4, b"\xff\x00")
              + ok(5, header=0xFE) + err(1))
    assert session.server(stream) == [SYNTAX]


@pytest.mark.parametrize(("stream", "words", "hint"), [
    (ok(1), "no command asked", ErrorNumber.ER_MALFORMED_PACKET),
    (pkt(1, b"\x01") + pkt(3, COLUMN), "out of order", ErrorNumber.ER_NET_PACKETS_OUT_OF_ORDER),
    (pkt(1, b"\x00\x01"), "truncated", ErrorNumber.ER_MALFORMED_PACKET),
    (pkt(1, b"\xfc\x00\x00"), "0 columns", ErrorNumber.ER_MALFORMED_PACKET),
    (pkt(1, b"\x01") + pkt(2, COLUMN) + pkt(3, b"\x01a"), "not followed by EOF",
     ErrorNumber.ER_MALFORMED_PACKET),
])
def test_malformed_responses(stream: bytes, words: str, hint: int) -> None:
    session = Session(CAPS)
    if words != "no command asked":
        session.client(query("select 1"))
    err_ = malformed(session.server, stream)
    assert words in err_.message and err_.wire_hint == hint


def test_an_unsolicited_err_is_reported() -> None:
    session = Session()
    timeout = pkt(0, b"\xff\xbf\x0f#HY000The client was disconnected by the server because of "
                  b"inactivity.")
    (event,) = session.server(timeout)
    assert isinstance(event, ErrorEvent) and event.errno == 4031
    session.client(query("select 1"))
    assert session.server(err(1)) == [SYNTAX]


def test_eof_and_bounds() -> None:
    session = Session()
    session.client(query("select 1"))
    assert session.server(pkt(1, b"\x01")[:3]) == []
    assert session.server(b"") == [ConnectionClosed(clean=False)]
    with pytest.raises(ValueError):
        ResponseAuditor(CommandTracker(CAPS), max_message=10)


@fuzz
@given(st.binary(max_size=200))
def test_random_server_bytes_raise_only_protocol_errors(data: bytes) -> None:
    session = Session()
    session.client(query("select 1") + command(Command.STMT_PREPARE, b"x")
                   + command(Command.STMT_EXECUTE, b"\x01\x00\x00\x00\x00\x01\x00\x00\x00"))
    try:
        session.server(data, "bytewise")
        session.server(b"")
    except RemoteProtocolError:
        pass


@fuzz
@given(st.lists(st.sampled_from([
    result_set([b"\x01a"], deprecate_eof=True), err(1), ok(1), pkt(1, b"\xfbf"),
    ok(1, MORE), pkt(2, COLUMN), pkt(1, b"\x00" + struct.pack("<IHHxH", 1, 1, 1, 0)),
]), max_size=6))
def test_shuffled_responses_raise_only_protocol_errors(parts: list[bytes]) -> None:
    session = Session()
    session.client(query("a") + query("b") + command(Command.STMT_PREPARE, b"c") + query("d"))
    try:
        session.server(b"".join(parts))
    except RemoteProtocolError:
        pass


# --- whole sessions, generated: the auditors report exactly what was in them -------------

KINDS = st.sampled_from(["ok", "err", "rows", "infile", "multi", "broken"])


def exchange(index: int, kind: str, rows: list[bytes], deprecate_eof: bool,
             ) -> tuple[bytes, bytes, list[object], list[object]]:
    """A COM_QUERY and its answer: (client bytes after the query, server
    bytes, the client's events after the query, the server's events)."""
    error = ErrorEvent(errno=1000 + index, sqlstate="42000", message=f"e{index}",
                       truncated=False)
    if kind == "ok":
        return b"", ok(1), [], []
    if kind == "err":
        return b"", err(1, 1000 + index, f"e{index}"), [], [error]
    if kind == "rows":
        return b"", result_set(rows, deprecate_eof=deprecate_eof), [], []
    if kind == "infile":
        # The file's second packet has id 0 and looks like a COM_QUERY.
        contents = pkt(2, b"a,b\n") + pkt(0, b"\x03drop table t") + pkt(4, b"")
        return (contents, pkt(1, b"\xfbf.csv") + ok(5),
                [LocalInfileDataEvent(bytes=17, packets=2)],
                [LocalInfileRequestEvent(file_name="f.csv", truncated=False)])
    if kind == "multi":
        first = result_set(rows, deprecate_eof=deprecate_eof, status=MORE)
        start = len(list(iter_packets(first))) + 1
        # The second statement of a multi-statement query fails.
        return b"", first + err(start, 1000 + index, f"e{index}"), [], [error]
    # "broken": an ERR where the next row would be.
    whole = result_set(rows, deprecate_eof=deprecate_eof)
    packets = list(iter_packets(whole))[:-1]
    body = b"".join(pkt(seq, payload) for seq, payload in packets)
    return b"", body + err(len(packets) + 1, 1000 + index, f"e{index}"), [], [error]


@fuzz
@given(st.lists(st.tuples(KINDS, st.lists(st.sampled_from(TRICKY_ROWS), max_size=4)),
                max_size=6), st.booleans(), st.sampled_from(FEEDS))
def test_generated_sessions_report_exactly_their_events(
        script: list[tuple[str, list[bytes]]], deprecate_eof: bool, how: str) -> None:
    session = Session(MODERN if deprecate_eof else CAPS)
    for index, (kind, rows) in enumerate(script):
        text = f"q{index}"
        assert session.client(query(text), how) == [query_event(text)]
        more_client, server, client_events, server_events = exchange(index, kind, rows,
                                                                     deprecate_eof)
        if kind == "infile":  # the request reaches the client before its file
            assert session.server(server[:10], how) == server_events
            assert session.client(more_client, how) == client_events
            assert session.server(server[10:], how) == []
        else:
            assert session.server(server, how) == server_events
        assert not session.tracker.pending and not session.tracker.infile


# --- the usual packets straight from the chunk (ResponseAuditor._scan) --------------------

@fuzz
@given(st.lists(st.sampled_from([
    result_set([b"\x01a"], deprecate_eof=True), result_set(TRICKY_ROWS, deprecate_eof=False),
    result_set([b"\x01a"], deprecate_eof=False, status=MORE), err(1), ok(1), ok(1, MORE), eof(1),
    pkt(1, b"\xfbf"), pkt(2, COLUMN), pkt(1, b"\x00" + struct.pack("<IHHxH", 1, 1, 1, 0)), pkt(1, b""),
    pkt(1, b"\x01"), pkt(1, b"\xfe" + b"\x00" * 10), pkt(3, b"\x02"), eof(2, ServerStatus.CURSOR_EXISTS),
    pkt(1, b"\x00\xfc\x00\x01\x02\x00\x00\x00"), pkt(1, b"\xff\xff\xff\x00\x00"),
    result_set([b"\x01a"], deprecate_eof=True, metadata=0), result_set([b"\x01a"], deprecate_eof=False, metadata=1),
    result_set([b"\x01a"], deprecate_eof=False, metadata=0, status=MORE), pkt(1, b"\x01\x02"), pkt(1, b"\x01\x00"),
]), max_size=8), st.lists(st.integers(min_value=0), max_size=6), st.booleans(), st.booleans(), st.booleans())
def test_the_fast_path_says_what_the_packet_by_packet_path_says(
        parts: list[bytes], points: list[int], deprecate_eof: bool, prepare_first: bool, cache: bool) -> None:
    """Whatever the server sends, cut anywhere: the same events, the same
    error, the same state as one byte at a time (which never takes the fast
    path: no packet is whole in one byte)."""
    stream = b"".join(parts)
    outcomes = []
    for chunks in (cut(stream, points), split(stream, "bytewise")):
        session = Session((MODERN if deprecate_eof else CAPS) | (CACHE if cache else Capability(0)))
        session.client((command(Command.STMT_PREPARE, b"c") if prepare_first else b"")
                       + query("a") + command(Command.STMT_EXECUTE, b"\x01\x00\x00\x00\x00\x01\x00\x00\x00")
                       + query("b") + command(Command.STATISTICS) + query("d") * 4)
        events, error = outcome(session.responses, chunks)
        r = session.responses
        outcomes.append((events, error, None if error else (r._phase, r._seq, r._left, len(session.tracker.pending),
                                                            r.messages_seen, r.bytes_seen)))
    assert outcomes[0] == outcomes[1]


CACHE = Capability.MARIADB_CACHE_METADATA


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("deprecate_eof", [True, False])
@pytest.mark.parametrize("metadata", [0, 1])
def test_cached_metadata(how: str, deprecate_eof: bool, metadata: int) -> None:
    """MariaDB's MARIADB_CLIENT_CACHE_METADATA: a column count has a
    "metadata follows" byte; at 0 (an execution whose columns the client
    already has) no definitions come, only the EOF without DEPRECATE_EOF."""
    session = Session((MODERN if deprecate_eof else CAPS) | CACHE)
    assert session.tracker.cache_metadata
    session.client(command(Command.STMT_EXECUTE, b"\x01\x00\x00\x00\x00\x01\x00\x00\x00") + query("x")
                   + query("select 1"))
    stream = (result_set(TRICKY_ROWS, deprecate_eof=deprecate_eof, metadata=metadata) + err(1)
              + result_set([b"\x011"], deprecate_eof=deprecate_eof, columns=1, metadata=1))
    assert session.server(stream, how) == [SYNTAX]
    assert not session.tracker.pending and session.responses._phase == "IDLE"


@pytest.mark.parametrize(("count", "words"), [
    (b"\x02", "truncated"), (b"\x02\x02", "metadata follows is 2"), (b"\x02\x01\x00", "trailing"),
])
def test_a_column_count_without_its_metadata_byte(count: bytes, words: str) -> None:
    session = Session(MODERN | CACHE)
    session.client(query("select 1, 2"))
    assert words in malformed(session.server, pkt(1, count)).message


def test_a_point_select_with_cached_metadata_is_read_in_one_go() -> None:
    """sysbench's point select with MariaDB's cached metadata: column count
    (and its byte), EOF, the row, EOF; no definition."""
    session = Session(CAPS | CACHE)
    answer = result_set([b"\x05hello"], deprecate_eof=False, columns=1, metadata=0)
    session.client(command(Command.STMT_EXECUTE, b"\x01\x00\x00\x00\x00\x01\x00\x00\x00") * 20)
    assert session.server(answer * 20) == []
    assert session.responses._scanned == 80 and not session.tracker.pending


def test_a_point_selects_answers_are_read_in_one_go() -> None:
    """sysbench's point select through the gateway (no cached metadata):
    column count, one definition, EOF, the row, EOF; twenty of them in one
    chunk make no event and leave the auditor between responses."""
    session = Session(CAPS)
    answer = result_set([b"\x05hello"], deprecate_eof=False, columns=1)
    session.client(command(Command.STMT_EXECUTE, b"\x01\x00\x00\x00\x00\x01\x00\x00\x00") * 20)
    assert session.server(answer * 20) == []
    assert session.responses._scanned == 100 and session.responses.messages_seen == 100
    assert not session.tracker.pending

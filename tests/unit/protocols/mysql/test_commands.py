"""protocols.mysql.commands: the client's commands as audit events."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.mysql.commands import (
    ChangeUserEvent, CommandEvent, CommandTracker, ExecuteEvent, InitDbEvent,
    LocalInfileDataEvent, PrepareEvent, QueryEvent, QuitEvent, ResetConnectionEvent,
    StatementCloseEvent, StatementResetEvent,
)
from protocols.mysql.constants import MAX_PAYLOAD, Capability, Command, ErrorNumber
from protocols.mysql.packets import lenenc_bytes
from protocols.signals import ConnectionClosed
from tests.unit.protocols.feeding import FEEDS, fuzz, malformed, split
from tests.unit.protocols.mysql.session import (
    CAPS, MODERN, Session, command, cut, outcome, pkt, query,
)

PREPARE_OK = pkt(1, b"\x00" + struct.pack("<IHHxH", 7, 0, 2, 0))  # statement 7, 2 params


def change_user(caps: Capability) -> bytes:
    body = b"bob\x00\x14" + b"a" * 20 + b"hr\x00\x2d\x00mysql_native_password\x00"
    if Capability.SECURE_CONNECTION not in caps:
        body = b"bob\x00" + b"a" * 20 + b"\x00hr\x00\x2d\x00"
    return command(Command.CHANGE_USER, body)


SESSION = b"".join([
    query("select 1"),
    command(Command.STMT_PREPARE, b"select ?, ?"),
    command(Command.STMT_EXECUTE, struct.pack("<IBI", 7, 0, 1) + b"\x00\x01\x08\x00\x08\x00"
            + b"\x01" * 16),
    command(Command.STMT_RESET, struct.pack("<I", 7)),
    command(Command.STMT_CLOSE, struct.pack("<I", 7)),
    command(Command.INIT_DB, b"shop"),
    command(Command.PING),
    command(Command.RESET_CONNECTION),
    change_user(MODERN),
])
EVENTS = [
    QueryEvent(text="select 1", truncated=False, size=9),
    PrepareEvent(text="select ?, ?", truncated=False, size=12),
    ExecuteEvent(statement_id=7, param_count=None, flags=0, size=32),
    StatementResetEvent(statement_id=7),
    StatementCloseEvent(statement_id=7),
    InitDbEvent(schema="shop"),
    CommandEvent(command=Command.PING, size=1),
    ResetConnectionEvent(),
    ChangeUserEvent(username="bob", database="hr", plugin="mysql_native_password"),
]


@pytest.mark.parametrize("how", FEEDS)
def test_every_command_then_quit(how: str) -> None:
    session = Session()
    trailing = query("ignored after COM_QUIT")
    events = session.client(SESSION + command(Command.QUIT) + trailing, how)
    assert events == [*EVENTS, QuitEvent()]
    assert session.commands.messages_seen == len(EVENTS) + 1
    assert [c for c, _ in session.tracker.pending] == [
        Command.QUERY, Command.STMT_PREPARE, Command.STMT_EXECUTE, Command.STMT_RESET,
        Command.INIT_DB, Command.PING, Command.RESET_CONNECTION, Command.CHANGE_USER]
    assert session.client(b"") == [ConnectionClosed(clean=True)]


def test_change_user_without_secure_connection() -> None:
    caps = CAPS & ~Capability.SECURE_CONNECTION & ~Capability.PLUGIN_AUTH
    (event,) = Session(caps).client(change_user(caps))
    assert event == ChangeUserEvent(username="bob", database="hr", plugin=None)
    (short,) = Session().client(command(Command.CHANGE_USER, b"bob\x00\x00"))
    assert short == ChangeUserEvent(username="bob", database=None, plugin=None)


def test_execute_reports_the_parameter_count_once_prepared() -> None:
    session = Session()
    session.client(command(Command.STMT_PREPARE, b"select ?, ?"))
    session.server(PREPARE_OK + pkt(2, b"def") + pkt(3, b"def"))
    (event,) = session.client(command(Command.STMT_EXECUTE, struct.pack("<IBI", 7, 1, 1)))
    assert event == ExecuteEvent(statement_id=7, param_count=2, flags=1, size=10)
    # MariaDB's "the statement prepared last".
    (event,) = session.client(command(Command.STMT_EXECUTE, struct.pack("<IBI", 2**32 - 1, 0, 1)))
    assert isinstance(event, ExecuteEvent) and event.statement_id == 7 and event.param_count == 2
    session.client(command(Command.STMT_CLOSE, struct.pack("<I", 7)))
    assert session.tracker.params(7) is None


def test_long_text_is_cut_and_huge_commands_kept_as_a_prefix() -> None:
    session = Session(max_text=10, max_message=2000)
    (event,) = session.client(query("select 'a long string'"))
    assert event == QueryEvent(text="select 'a ", truncated=True, size=23)
    (event,) = session.client(query("x" * 5000))
    assert event == QueryEvent(text="x" * 10, truncated=True, size=5001)
    (event,) = session.client(command(Command.STMT_PREPARE, b"y" * 5000))
    assert isinstance(event, PrepareEvent) and event.truncated


def attributes_block(*values: tuple[int, bytes, bytes | None]) -> bytes:
    """count, set count, null bitmap, bind flag, (type, name)..., values."""
    nulls = sum(1 << i for i, (_, _, value) in enumerate(values) if value is None)
    out = bytearray([len(values), 1]) + nulls.to_bytes((len(values) + 7) // 8, "little") + b"\x01"
    for field_type, name, _ in values:
        out += field_type.to_bytes(2, "little") + lenenc_bytes(name)
    for _, _, value in values:
        out += value or b""
    return bytes(out)


def test_query_attributes_are_skipped() -> None:
    caps = MODERN | Capability.QUERY_ATTRIBUTES
    block = attributes_block(
        (0x03, b"id", b"\x01\x00\x00\x00"),  # LONG
        (0xFD, b"trace", None),  # VAR_STRING, NULL
        (0x0C, b"at", b"\x04\xe8\x07\x01\x02"),  # DATETIME, 4 bytes
        (0x8008, b"big", b"\x00" * 8),  # unsigned LONGLONG
        (0xFE, b"tag", lenenc_bytes(b"blue")),  # STRING
    )
    (event,) = Session(caps).client(query_with(block, "select 1"))
    assert event == QueryEvent(text="select 1", truncated=False, size=len(block) + 9,
                               attributes=5)
    (event,) = Session(caps).client(query_with(b"\x00\x01", "select 2"))
    assert isinstance(event, QueryEvent) and event.text == "select 2" and event.attributes == 0
    big = attributes_block((0xFC, b"blob", lenenc_bytes(b"z" * 3000)))  # over the prefix
    (event,) = Session(caps, max_text=4, max_message=8).client(query_with(big, "select 3"))
    assert event == QueryEvent(text="", truncated=True, size=len(big) + 9)
    unbound = b"\x01\x01\x00\x00"  # new_params_bind_flag 0: the types are missing
    err = malformed(Session(caps).client, query_with(unbound, "select 4"))
    assert "new_params_bind_flag" in err.message


def query_with(block: bytes, text: str) -> bytes:
    return command(Command.QUERY, block + text.encode())


def test_local_infile_contents_are_counted_not_read() -> None:
    session = Session()
    session.client(query("load data local infile 'a.csv' into table t"))
    session.server(pkt(1, b"\xfba.csv"))
    assert session.tracker.infile
    # A file's packet with id 0 that looks like a command is still the file.
    contents = pkt(2, b"1,2\n") + pkt(0, b"\x03drop table t") + pkt(4, b"")
    assert session.client(contents) == [LocalInfileDataEvent(bytes=17, packets=2)]
    assert not session.tracker.infile
    assert session.client(query("select 1"))[0] == QueryEvent(text="select 1", truncated=False,
                                                              size=9)


def test_eof_in_the_middle_of_a_file() -> None:
    session = Session()
    session.client(query("load data local infile 'a.csv' into table t"))
    session.server(pkt(1, b"\xfba.csv"))
    assert session.client(pkt(2, b"123") + pkt(3, b"45")[:5]) == []
    assert session.client(b"") == [LocalInfileDataEvent(bytes=5, packets=2),
                                   ConnectionClosed(clean=False)]


def test_a_command_over_16_mib_is_one_command() -> None:
    session = Session(max_text=8)
    text = b"x" * (MAX_PAYLOAD - 1)
    events = session.client(command(Command.QUERY, text) + pkt(1, b"") + query("select 2"))
    assert [type(e) for e in events] == [QueryEvent, QueryEvent]
    assert events[0] == QueryEvent(text="x" * 8, truncated=True, size=MAX_PAYLOAD)


def test_packets_that_answer_the_server_are_skipped() -> None:
    session = Session()
    events = session.client(change_user(MODERN) + pkt(2, b"\x03" + b"a" * 20) + query("select 1"))
    assert [type(e) for e in events] == [ChangeUserEvent, QueryEvent]


@pytest.mark.parametrize(("data", "words"), [
    (pkt(0, b""), "empty command"),
    (command(Command.STMT_EXECUTE, b"\x01\x00"), "truncated"),
    (command(Command.STMT_CLOSE, b"\x01"), "truncated"),
])
def test_malformed_commands(data: bytes, words: str) -> None:
    session = Session()
    err = malformed(session.client, data)
    assert words in err.message
    if words == "empty command":
        assert err.wire_hint == ErrorNumber.ER_UNKNOWN_COM_ERROR


def test_the_tracker_refuses_what_it_cannot_follow() -> None:
    with pytest.raises(LocalProtocolError):
        CommandTracker(CAPS | Capability.COMPRESS)
    with pytest.raises(LocalProtocolError):
        CommandTracker(CAPS | Capability.ZSTD_COMPRESSION_ALGORITHM)
    tracker = CommandTracker(CAPS, max_pending=2, max_statements=1)
    tracker.sent(Command.PING)
    tracker.sent(Command.STMT_CLOSE)  # no answer comes: not queued
    tracker.sent(Command.PING)
    with pytest.raises(RemoteProtocolError):
        tracker.sent(Command.PING)
    tracker.prepared(1, 3)
    tracker.prepared(2, 4)  # over the bound: not remembered, but "last" is
    assert tracker.params(1) == 3 and tracker.params(2) is None and tracker.resolve(2**32 - 1) == 2
    with pytest.raises(ValueError):
        Session(max_text=0)


@fuzz
@given(st.binary(max_size=200))
def test_random_client_bytes_raise_only_protocol_errors(data: bytes) -> None:
    session = Session(MODERN | Capability.QUERY_ATTRIBUTES, max_text=16, max_message=64)
    try:
        session.client(data, "bytewise")
        session.client(b"")
    except RemoteProtocolError:
        pass


@fuzz
@given(st.lists(st.sampled_from(SESSION.split(b"\x00\x00\x00")), max_size=8))
def test_shuffled_sessions_raise_only_protocol_errors(parts: list[bytes]) -> None:
    try:
        Session().client(b"\x00\x00\x00".join(parts))
    except RemoteProtocolError:
        pass


@fuzz
@given(st.lists(st.sampled_from([
    *SESSION.split(b"\x00\x00\x00"), query("x" * 80), command(Command.STMT_EXECUTE, struct.pack("<IB", 7, 1)),
    command(Command.STMT_EXECUTE, b"\x07\x00"), command(Command.STMT_EXECUTE, struct.pack("<IBI", 2**32 - 1, 0, 1)),
    command(Command.STMT_EXECUTE, b"x" * 70), pkt(0, b""), pkt(1, b"\x17abc"), pkt(2, b""), command(Command.QUIT),
    query("select 2")[:5], query(""), query("\u00e9t\u00e9 " * 4), query_with(attributes_block(), "select 3"),
]), max_size=8), st.lists(st.integers(min_value=0), max_size=6), st.booleans(), st.booleans())
def test_the_fast_path_says_what_the_packet_by_packet_path_says(parts: list[bytes], points: list[int],
                                                                 infile: bool, attributes: bool) -> None:
    """Whatever the client sends, cut anywhere, during a LOCAL INFILE
    transfer or not, with query attributes or not: the same events, the
    same error, the same state as one byte at a time (which never takes
    the fast path)."""
    stream = b"".join(parts)
    outcomes = []
    for chunks in (cut(stream, points), split(stream, "bytewise")):
        session = Session(MODERN | Capability.QUERY_ATTRIBUTES if attributes else MODERN, max_text=16,
                          max_message=64)
        session.tracker.prepared(7, 2)
        session.tracker.infile = infile  # as the server's request would set it
        events, error = outcome(session.commands, chunks)
        c = session.commands
        # (after an error, how much was fed depends on where the chunks end)
        outcomes.append((events, error, list(session.tracker.pending), session.tracker.infile,
                         None if error else (c.messages_seen, c.bytes_seen, c._ended)))
    assert outcomes[0] == outcomes[1]


def test_a_new_connection_forgets_the_prepared_statements():
    # A COM_CHANGE_USER re-dialled: the old connection's statements are gone.
    tracker = CommandTracker(MODERN)
    tracker.prepared(1, 3)
    assert tracker.params(1) == 3 and tracker.resolve(0xFFFFFFFF) == 1
    tracker.new_connection()
    assert tracker.params(1) is None and tracker.resolve(0xFFFFFFFF) == 0xFFFFFFFF

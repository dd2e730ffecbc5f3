"""protocols.mysql.commands: the client's commands as audit events."""

from __future__ import annotations

import struct
from hashlib import sha256

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.mysql.commands import (
    ChangeUserEvent, CommandEvent, CommandTracker, ExecuteEvent, InitDbEvent,
    LocalInfileDataEvent, PrepareEvent, QueryEvent, QuitEvent, ResetConnectionEvent,
    StatementCloseEvent, StatementResetEvent,
)
from protocols.mysql.constants import MAX_PAYLOAD, Capability, Command, ErrorNumber
from protocols.mysql.packets import encode_packets, lenenc_bytes
from protocols.signals import ConnectionClosed
from tests.unit.protocols.feeding import FEEDS, fuzz, malformed, split
from tests.unit.protocols.mysql.session import (
    CAPS, MODERN, Session, command, cut, outcome, pkt, prepare_event, query, query_event,
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
    query_event("select 1"),
    prepare_event("select ?, ?"),
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
    assert event == QueryEvent(
        text="selec\n/* [audit: 12 of 22 bytes not shown; sha256 is of them all] */\nring'",
        truncated=True, length=22, sha256=sha256(b"select 'a long string'").hexdigest(), size=23)
    (event,) = session.client(query("x" * 5000))
    assert event == QueryEvent(
        text="x" * 5 + "\n/* [audit: 4990 of 5000 bytes not shown; sha256 is of them all] */\n" + "x" * 5,
        truncated=True, length=5000, sha256=sha256(b"x" * 5000).hexdigest(), size=5001)
    (event,) = session.client(command(Command.STMT_PREPARE, b"y" * 5000))
    assert isinstance(event, PrepareEvent) and event.truncated and event.length == 5000
    assert event.sha256 == sha256(b"y" * 5000).hexdigest() and event.size == 5001


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
    assert event == query_event("select 1", size=len(block) + 9, attributes=5)
    (event,) = Session(caps).client(query_with(b"\x00\x01", "select 2"))
    assert isinstance(event, QueryEvent) and event.text == "select 2" and event.attributes == 0
    big = attributes_block((0xFC, b"blob", lenenc_bytes(b"z" * 3000)))  # over the prefix
    (event,) = Session(caps, max_text=4, max_message=8).client(query_with(big, "select 3"))
    assert event == QueryEvent(text="", truncated=True, length=None, sha256=None, size=len(big) + 9)
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
    assert session.client(query("select 1"))[0] == query_event("select 1")


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
    assert events[0] == QueryEvent(
        text="x" * 4 + f"\n/* [audit: {MAX_PAYLOAD - 9} of {MAX_PAYLOAD - 1} bytes not shown; sha256 is of them "
        f"all] */\n" + "x" * 4, truncated=True, length=MAX_PAYLOAD - 1, sha256=sha256(text).hexdigest(),
        size=MAX_PAYLOAD)


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


# --- statements: length and digest of all of it, however it comes ------------------


def expected(raw: bytes, max_text: int) -> tuple[str, bool]:
    """The text and flag an event carries for statement ``raw``: whole, or
    its first and last halves of ``max_text`` around the marker (worked
    out here from the rule, not with the auditor's reader)."""
    if len(raw) <= max_text:
        return raw.decode("utf-8", "replace"), False
    head, tail = raw[: max_text // 2], raw[len(raw) - (max_text - max_text // 2):]
    left = len(raw) - len(head) - len(tail)
    return (f"{head.decode('utf-8', 'replace')}\n/* [audit: {left} of {len(raw)} bytes not shown; sha256 is "
            f"of them all] */\n{tail.decode('utf-8', 'replace')}"), True


def assert_statement(event: object, raw: bytes, max_text: int, size: int) -> None:
    assert isinstance(event, (QueryEvent, PrepareEvent))
    text, cut = expected(raw, max_text)
    assert (event.text, event.truncated, event.length, event.sha256, event.size) == (
        text, cut, len(raw), sha256(raw).hexdigest(), size)


@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("code", [Command.QUERY, Command.STMT_PREPARE])
def test_a_statement_over_max_message_is_followed_to_its_end(how: str, code: int) -> None:
    # 17 KiB of comment ahead of the statement (issue 15, item 6): kept as
    # a prefix, yet the event has the end of it and the digest of all.
    raw = b"/*" + b"p" * 17000 + b"*/ create table t (a int)"
    session = Session(max_message=4096)
    events = session.client(command(code, raw) + query("select 2"), how)
    assert len(events) == 2
    assert_statement(events[0], raw, 16 * 1024, len(raw) + 1)
    assert events[0].text.endswith("*/ create table t (a int)")
    assert events[1] == query_event("select 2")
    assert session.commands.at_command


def test_query_attributes_ahead_of_a_followed_statement() -> None:
    caps = MODERN | Capability.QUERY_ATTRIBUTES
    block = attributes_block((0x03, b"id", b"\x01\x00\x00\x00"))
    raw = b"select '" + b"q" * 3000 + b"'"
    (event,) = Session(caps, max_text=64, max_message=100).client(
        command(Command.QUERY, block + raw), "bytewise")
    assert_statement(event, raw, 64, 1 + len(block) + len(raw))
    assert event.attributes == 1


def test_eof_inside_a_followed_statement() -> None:
    session = Session(max_text=8, max_message=16)
    data = query("x" * 3000)
    assert session.client(data[:2000]) == []
    (event, closed) = session.client(b"")
    assert isinstance(event, QueryEvent) and event.truncated and event.length == 2000 - 5
    assert event.sha256 == sha256(b"x" * (2000 - 5)).hexdigest()
    assert closed == ConnectionClosed(clean=False)


def payload_packets(payload: bytes) -> bytes:
    """``payload`` as the client sends it: packets of 2^24-1 bytes, ids 0, 1, ..."""
    return encode_packets(payload, 0)[0]


SIXTEEN_MIB_SIZES = [MAX_PAYLOAD - 2, MAX_PAYLOAD - 1, MAX_PAYLOAD, 2 * MAX_PAYLOAD - 1, 2 * MAX_PAYLOAD + 10]


@pytest.mark.parametrize("text_length", SIXTEEN_MIB_SIZES)
def test_a_statement_in_several_16_mib_packets(text_length: int) -> None:
    # A payload of 2^24-1 bytes or more goes on in the packets after it
    # (an empty one when it is a multiple of 2^24-1): one statement, whose
    # digest covers every packet's share.
    raw = bytes(range(256)) * (text_length // 256) + b"e" * (text_length % 256)
    stream = payload_packets(bytes([Command.QUERY]) + raw) + query("select 2")
    for chunks in ([stream], [stream[i : i + 5_000_000] for i in range(0, len(stream), 5_000_000)]):
        session = Session()
        events: list[object] = []
        for chunk in chunks:
            events += session.client(chunk)
        assert len(events) == 2, text_length
        assert_statement(events[0], raw, 16 * 1024, 1 + text_length)
        assert events[1] == query_event("select 2")
        assert session.commands.at_command and not session.tracker.infile


def test_eof_between_the_packets_of_a_statement() -> None:
    raw = b"z" * MAX_PAYLOAD  # the payload is two packets; only the first comes
    session = Session()
    assert session.client(payload_packets(bytes([Command.QUERY]) + raw)[: 4 + MAX_PAYLOAD]) == []
    (event, closed) = session.client(b"")
    assert isinstance(event, QueryEvent) and event.truncated and event.length == MAX_PAYLOAD - 1
    assert closed == ConnectionClosed(clean=False)


def test_a_statement_kept_whole_yet_continued() -> None:
    # A max_message of 2^24-1 or more keeps the first packet whole: the
    # statement still goes on in the next.
    raw = b"w" * (MAX_PAYLOAD + 3)
    session = Session(max_message=MAX_PAYLOAD)
    (event,) = session.client(payload_packets(bytes([Command.STMT_PREPARE]) + raw))
    assert_statement(event, raw, 16 * 1024, 1 + len(raw))


@fuzz
@given(st.binary(max_size=3000), st.integers(min_value=1, max_value=80), st.sampled_from([16, 200, 5000]),
       st.lists(st.integers(min_value=0), max_size=6), st.booleans())
def test_any_statement_cut_anywhere_has_its_length_and_digest(raw: bytes, max_text: int, max_message: int,
                                                               points: list[int], prepare: bool) -> None:
    code = Command.STMT_PREPARE if prepare else Command.QUERY
    stream = command(code, raw) + query("select 2")
    session = Session(max_text=max_text, max_message=max_message)
    events, error = outcome(session.commands, cut(stream, points))
    assert error is None and len(events) == 2
    assert_statement(events[0], raw, max_text, 1 + len(raw))
    assert_statement(events[1], b"select 2", max_text, 9)


@settings(derandomize=True, database=None, deadline=None, max_examples=12)
@given(st.sampled_from(SIXTEEN_MIB_SIZES), st.lists(st.integers(min_value=0), min_size=1, max_size=5))
def test_a_multi_packet_statement_cut_anywhere(text_length: int, points: list[int]) -> None:
    raw = b"m" * text_length
    stream = payload_packets(bytes([Command.QUERY]) + raw) + query("select 2")
    session = Session(max_text=32)
    events, error = outcome(session.commands, cut(stream, points))
    assert error is None and len(events) == 2
    assert_statement(events[0], raw, 32, 1 + text_length)

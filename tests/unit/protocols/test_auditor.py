"""protocols.auditor: the base every streaming statement auditor builds on,
exercised through a small auditor of MySQL commands."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.auditor import Statement, StatementReader, StreamAuditor
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.framing import MYSQL_PACKET, Frame
from protocols.signals import ConnectionClosed
from tests.unit.protocols.feeding import FEEDS, fuzz, pump, split

COM_QUIT, COM_QUERY = 0x01, 0x03


class CommandAuditor(StreamAuditor):
    """A command's first byte (and COM_QUERY's text, cut to 8 bytes); packets
    that continue a command (sequence id > 0) are skipped by their length."""

    def __init__(self) -> None:
        super().__init__(MYSQL_PACKET, max_length=64)

    def _keep(self, kind: int, body_length: int) -> int | None:
        if body_length == 0:
            raise MYSQL_PACKET.error("an empty command")
        return None if kind else 9

    def _on_frame(self, frame: Frame) -> None:
        command = frame.body[0]
        self._events.append((command, frame.body[1:]))
        self._ended = command == COM_QUIT


def packet(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload




SESSION = (packet(0, bytes([COM_QUERY]) + b"select 1") + packet(1, b"x" * 40)
           + packet(0, bytes([COM_QUERY]) + b"select 1234567890"))
EVENTS = [(COM_QUERY, b"select 1"), (COM_QUERY, b"select 1")]


@pytest.mark.parametrize("how", FEEDS)
def test_events_then_a_clean_close(how: str) -> None:
    auditor = CommandAuditor()
    assert pump(auditor, split(SESSION, how) + [b""]) == EVENTS + [ConnectionClosed(clean=True)]
    assert auditor.messages_seen == 3 and auditor.bytes_seen == len(SESSION)
    assert auditor.next_event() == ConnectionClosed(clean=True)  # forever
    auditor.receive_data(b"")  # a second EOF changes nothing
    with pytest.raises(LocalProtocolError):
        auditor.receive_data(b"more")


def test_next_events_gives_what_next_event_would_in_one_call() -> None:
    auditor = CommandAuditor()
    auditor.receive_data(SESSION)
    assert auditor.next_events() == EVENTS and auditor.next_events() == []
    # Events before a malformed packet first, then its error.
    auditor = CommandAuditor()
    auditor.receive_data(SESSION + packet(0, b""))
    assert auditor.next_events() == EVENTS
    with pytest.raises(RemoteProtocolError):
        auditor.next_events()
    # After EOF: the close is left out (next_event says it).
    auditor = CommandAuditor()
    auditor.receive_data(SESSION)
    auditor.receive_data(b"")
    assert auditor.next_events() == EVENTS and auditor.next_events() == []
    assert auditor.next_event() == ConnectionClosed(clean=True)


def test_eof_inside_a_message_is_unclean() -> None:
    auditor = CommandAuditor()
    cut = packet(0, bytes([COM_QUERY]) + b"select")[:7]
    assert pump(auditor, [SESSION + cut, b""]) == EVENTS + [ConnectionClosed(clean=False)]


@pytest.mark.parametrize("how", FEEDS)
def test_trailing_data_after_the_end_is_not_parsed(how: str) -> None:
    quit_ = packet(0, bytes([COM_QUIT]))
    garbage = b"\xff\xff\xff\x00"  # over the cap, were it parsed
    auditor = CommandAuditor()
    assert pump(auditor, split(SESSION + quit_ + garbage, how)) == EVENTS + [(COM_QUIT, b"")]
    assert auditor.bytes_seen == len(SESSION + quit_ + garbage)


def test_a_malformed_stream_raises_after_the_events_before_it_and_poisons() -> None:
    auditor = CommandAuditor()
    auditor.receive_data(SESSION[:13] + packet(0, b""))
    assert auditor.next_event() == EVENTS[0]
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match="an empty command"):
            auditor.next_event()
    auditor.receive_data(SESSION)  # ignored
    auditor.receive_data(b"")  # and no ConnectionClosed
    with pytest.raises(RemoteProtocolError):
        auditor.next_event()


def test_the_cap_bounds_a_message() -> None:
    auditor = CommandAuditor()
    auditor.receive_data(packet(1, b"x" * 65))
    with pytest.raises(RemoteProtocolError, match="exceeds the maximum 64") as info:
        auditor.next_event()
    assert info.value.wire_hint == 1153


def test_a_protocol_provides_keep_and_on_frame() -> None:
    with pytest.raises(NotImplementedError):
        StreamAuditor(MYSQL_PACKET).receive_data(packet(0, b"\x03"))
    with pytest.raises(NotImplementedError):
        StreamAuditor._on_frame(CommandAuditor(), Frame(0, 1, b"\x03"))


@fuzz
@given(data=st.binary(max_size=200), cut=st.integers(min_value=0, max_value=200))
def test_fuzz(data: bytes, cut: int) -> None:
    try:
        pump(CommandAuditor(), [chunk for chunk in (data[:cut], data[cut:]) if chunk] + [b""])
    except RemoteProtocolError:
        pass


# --- statements: whole, or head and tail, with their length and digest -------------------


class QueryAuditor(StreamAuditor):
    """COM_QUERY statements as the base records them (MySQL's text runs to
    the end of the packet: no terminator). Only 20 bytes of a packet are
    kept: the rest of a long query is followed."""

    def __init__(self) -> None:
        super().__init__(MYSQL_PACKET, max_length=4096)

    def _keep(self, kind: int, body_length: int) -> int | None:
        return None if kind else 20

    def _on_frame(self, frame: Frame) -> None:
        if frame.body[:1] == bytes([COM_QUERY]):
            reader = StatementReader(8)
            reader.update(frame.body[1:])
            statement = self._statement(frame, reader, lambda s: s)
            if statement is not None:
                self._events.append(statement)


@pytest.mark.parametrize("how", FEEDS)
def test_a_statement_of_any_size_keeps_its_head_tail_length_and_digest(how: str) -> None:
    long = b"select /*" + b"." * 1000 + b"*/ 1; drop table t"
    data = packet(0, bytes([COM_QUERY]) + long) + packet(0, bytes([COM_QUERY]) + b"select 1")
    events = pump(QueryAuditor(), split(data, how))
    assert events == [
        Statement(text=f"sele\n/* [audit: {len(long) - 8} of {len(long)} bytes not shown; sha256 is of them all]"
                       " */\nle t", length=len(long), sha256=hashlib.sha256(long).hexdigest(), truncated=True),
        Statement(text="select 1", length=8, sha256=hashlib.sha256(b"select 1").hexdigest(), truncated=False),
    ]


def test_statement_reader_stops_at_its_terminator_and_skips_what_comes_first() -> None:
    reader = StatementReader(100, until=b"\x00", after=1)
    assert reader.update(b"name") == 0 and reader.update(memoryview(b"\x00sel")) == 3
    assert reader.update(b"ect 1\x00\x00\x01types") == 5 and reader.ended
    assert reader.update(b"more") == 0
    assert reader.result() == Statement(text="select 1", length=8, sha256=hashlib.sha256(b"select 1").hexdigest(),
                                        truncated=False)


def test_statement_text_is_decoded_whole_when_nothing_is_left_out() -> None:
    # A character split between the head and the tail is not mangled.
    assert StatementReader.of("ab€".encode(), 6).text == "ab€"
    cut = StatementReader.of(("é" * 10).encode(), 8)
    assert cut.truncated and cut.length == 20 and cut.text.startswith("éé\n") and cut.text.endswith("\néé")
    with pytest.raises(ValueError):
        StatementReader(0)

"""protocols.auditor: the base every streaming statement auditor builds on,
exercised through a small auditor of MySQL commands."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.auditor import StreamAuditor
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

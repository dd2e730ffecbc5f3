"""protocols.framing: one bounded splitter for every length-prefixed layout."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.buffer import ReceiveBuffer
from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.framing import (
    DIAL_FRAME, MONGODB_MESSAGE, MUX_FRAME, MYSQL_PACKET, POSTGRES_MESSAGE, POSTGRES_STARTUP, Frame,
    FrameLayout, FrameSplitter,
)
from tests.unit.protocols.feeding import FEEDS, fuzz, malformed, split

TRAILING = (False, True)


def pg(type_code: bytes, body: bytes) -> bytes:
    return type_code + struct.pack(">I", 4 + len(body)) + body


def mysql(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


def mongo(op: int, body: bytes, request: int = 7) -> bytes:
    return struct.pack("<iiii", 16 + len(body), request, 0, op) + body


def dial(ftype: int, body: bytes) -> bytes:
    return struct.pack(">IBB", 2 + len(body), 1, ftype) + body


def mux(ftype: int, payload: bytes) -> bytes:
    return struct.pack(">BII", ftype, 5, len(payload)) + payload


def startup(payload: bytes) -> bytes:
    return struct.pack(">I", 4 + len(payload)) + payload


# Per layout: frames and the (kind, body) each one is.
CASES = {
    "postgres": (POSTGRES_MESSAGE, [(pg(b"Q", b"select 1\x00"), b"Q", b"select 1\x00"),
                                    (pg(b"S", b""), b"S", b"")]),
    "startup": (POSTGRES_STARTUP, [(startup(b"\x04\xd2\x16\x2f"), None, b"\x04\xd2\x16\x2f")]),
    "dial": (DIAL_FRAME, [(dial(1, b'{"resource":"r"}'), 1, b'{"resource":"r"}'),
                          (dial(2, b""), 2, b"")]),
    "mux": (MUX_FRAME, [(mux(3, b"data"), 3, b"data"), (mux(4, b""), 4, b"")]),
    "mysql": (MYSQL_PACKET, [(mysql(0, b"\x03select 1"), 0, b"\x03select 1"),
                             (mysql(1, b""), 1, b"")]),
    "mongodb": (MONGODB_MESSAGE, [(mongo(2013, b"\x00" * 9), 2013, b"\x00" * 9),
                                  (mongo(2004, b""), 2004, b"")]),
}


def expected(layout: FrameLayout, case: list[tuple[bytes, object, bytes]]) -> list[Frame]:
    return [Frame(kind, len(body), body) for _, kind, body in case]


def feed_all(splitter: FrameSplitter, chunks: list[bytes]) -> list[Frame]:
    return [frame for chunk in chunks for frame in splitter.feed(chunk)]


def read_all(splitter: FrameSplitter, chunks: list[bytes]) -> tuple[list[Frame], ReceiveBuffer]:
    buffer = ReceiveBuffer(1 << 20)
    frames: list[Frame] = []
    for chunk in chunks:
        buffer.feed(chunk)
        while (frame := splitter.read_frame(buffer)) is not None:
            frames.append(frame)
    return frames, buffer


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("how", FEEDS)
@pytest.mark.parametrize("trailing", TRAILING)
def test_every_layout_reads_its_frames(name: str, how: str, trailing: bool) -> None:
    layout, case = CASES[name]
    data = b"".join(raw for raw, _, _ in case)
    # Trailing data: all of another frame but its last byte.
    tail = case[0][0][:-1] if trailing else b""
    chunks = split(data + tail, how)
    # read_frame: whole frames; what follows the last one stays in the buffer.
    splitter = FrameSplitter(layout)
    frames, buffer = read_all(splitter, chunks)
    assert frames == expected(layout, case) and splitter.frames == len(case)
    assert buffer.take_all() == tail
    # feed: the same frames; the trailing bytes are a frame's beginning.
    splitter = FrameSplitter(layout)
    assert feed_all(splitter, split(data, how)) == expected(layout, case)
    assert splitter.at_boundary


def test_mysql_length_is_three_bytes_little_endian() -> None:
    payload = b"x" * 70000  # more than a u16
    frames, _ = read_all(FrameSplitter(MYSQL_PACKET), [mysql(9, payload)])
    assert frames == [Frame(9, 70000, payload)]
    assert MYSQL_PACKET.length_of(b"\x01\x02\x03\x00") == 0x030201
    assert MYSQL_PACKET.byteorder == "little" and MYSQL_PACKET.length_end == 3


def test_a_header_may_skip_the_fields_nobody_reads() -> None:
    # MongoDB's header with requestID and responseTo as pad bytes.
    layout = FrameLayout(name="op", header="<i8xi", length_field=0, kind_field=1, uncounted=0,
                         max_length=100)
    frames, _ = read_all(FrameSplitter(layout), [mongo(2013, b"abc")])
    assert frames == [Frame(2013, 3, b"abc")] and layout.length_end == 4


def test_the_length_is_checked_as_soon_as_it_is_in() -> None:
    # Only the length field of a frame over the cap: no waiting for the rest.
    splitter = FrameSplitter(DIAL_FRAME)
    buffer = ReceiveBuffer(100)
    buffer.feed(struct.pack(">I", 65537))
    err = malformed(splitter.read_frame, buffer)
    assert "dial frame length 65537 exceeds the maximum 65536" in err.message
    assert err.code is ErrorCode.BAD_REQUEST and err.wire_hint is None
    buffer = ReceiveBuffer(100)
    buffer.feed(b"\x00\x00")
    assert splitter.read_frame(buffer) is None


@pytest.mark.parametrize("layout, data, words, hint", [
    (POSTGRES_MESSAGE, b"Q\x00\x00\x00\x03", "below the minimum of 4", "08P01"),
    (POSTGRES_MESSAGE, b"Q\x40\x00\x00\x00", "exceeds the maximum", "08P01"),
    (POSTGRES_STARTUP, b"\x00\x00\x00\x07", "below the minimum of 8", "08P01"),
    (POSTGRES_STARTUP, b"\x00\x00\x27\x11", "exceeds the maximum 10000", "08P01"),
    (DIAL_FRAME, b"\x00\x00\x00\x01\x01\x01", "below the minimum of 2", None),
    (MONGODB_MESSAGE, struct.pack("<iiii", 15, 0, 0, 2013), "below the minimum of 16", 17),
    (MONGODB_MESSAGE, struct.pack("<iiii", -1, 0, 0, 2013), "below the minimum", 17),
    (MONGODB_MESSAGE, struct.pack("<iiii", 48_000_001, 0, 0, 2013), "exceeds", 17),
])
@pytest.mark.parametrize("how", FEEDS)
def test_bad_lengths_are_remote_errors_with_the_wire_hint(
        layout: FrameLayout, data: bytes, words: str, hint: object, how: str) -> None:
    err = malformed(feed_all, FrameSplitter(layout), split(data, how))
    assert words in err.message and err.wire_hint == hint
    buffer = ReceiveBuffer(100)
    buffer.feed(data)
    assert malformed(FrameSplitter(layout).read_frame, buffer).wire_hint == hint


def test_a_cap_below_the_protocols_own() -> None:
    splitter = FrameSplitter(MYSQL_PACKET, max_length=4)
    assert feed_all(splitter, [mysql(0, b"1234")]) == [Frame(0, 4, b"1234")]
    err = malformed(feed_all, splitter, [mysql(1, b"12345")])
    assert "MySQL packet length 5 exceeds the maximum 4" in err.message
    assert err.wire_hint == 1153  # ER_NET_PACKET_TOO_LARGE


@pytest.mark.parametrize("max_length", [-1, 2**24])
def test_the_cap_must_fit_the_layout(max_length: int) -> None:
    with pytest.raises(ValueError):
        FrameSplitter(MYSQL_PACKET, max_length=max_length)


@pytest.mark.parametrize("kwargs", [
    {"header": "BI"},  # no byte order
    {"header": ">BI", "length_field": 2},  # no such field
    {"header": ">BI", "min_length": 10, "max_length": 5},
    {"header": ">BI", "min_length": 2, "uncounted": 0},  # a frame could end inside its header
])
def test_bad_layouts_are_refused(kwargs: dict[str, object]) -> None:
    layout = {"name": "x", "header": ">BI", "length_field": 1, "uncounted": 5,
              "max_length": 100, **kwargs}
    with pytest.raises(ValueError):
        FrameLayout(**layout)  # type: ignore[arg-type]


# --- feed: what is kept, what is skipped ----------------------------------------------


STREAM = pg(b"d", b"x" * 1000) + pg(b"Q", b"select 1\x00") + pg(b"D", b"row") + pg(b"Z", b"I")


def keep_policy(kind: object, size: int) -> int | None:
    return {b"d": 0, b"Q": 3, b"D": None}.get(kind, size)  # type: ignore[call-overload]


@pytest.mark.parametrize("how", FEEDS)
def test_keep_none_skips_a_frame_unseen_and_a_prefix_is_kept(how: str) -> None:
    splitter = FrameSplitter(POSTGRES_MESSAGE, keep=keep_policy)
    frames = feed_all(splitter, split(STREAM, how))
    assert frames == [Frame(b"d", 1000, b""), Frame(b"Q", 9, b"sel"), Frame(b"Z", 1, b"I")]
    assert not frames[1].complete and frames[2].complete and frames[2].type_code == b"Z"
    assert splitter.frames == 4 and splitter.at_boundary


@pytest.mark.parametrize("how", FEEDS)
def test_only_some_kinds_are_asked_about_the_rest_pass_by_their_length(how: str) -> None:
    asked: list[object] = []

    def keep(kind: object, size: int) -> int | None:
        asked.append(kind)
        return keep_policy(kind, size)

    splitter = FrameSplitter(POSTGRES_MESSAGE, keep=keep, only=frozenset({b"Q", b"D"}))
    frames = feed_all(splitter, split(STREAM, how))
    # As if keep had said None for the others: skipped unseen, still counted.
    assert frames == [Frame(b"Q", 9, b"sel")] and asked == [b"Q", b"D"]
    assert splitter.frames == 4 and splitter.at_boundary


def test_a_frame_keeping_nothing_comes_out_after_its_header() -> None:
    splitter = FrameSplitter(POSTGRES_MESSAGE, keep=lambda kind, size: -5)
    assert feed_all(splitter, [STREAM[:5]]) == [Frame(b"d", 1000, b"")]
    assert not splitter.at_boundary
    assert feed_all(splitter, [STREAM[5:1005]]) == []
    assert splitter.at_boundary


@pytest.mark.parametrize("how", FEEDS)
def test_follow_hands_over_the_rest_of_a_frame_kept_as_a_prefix(how: str) -> None:
    splitter = FrameSplitter(POSTGRES_MESSAGE, keep=keep_policy)
    rest: list[bytes] = []
    ends: list[int] = []
    frames = []
    for chunk in split(STREAM, how):
        for frame in splitter.feed(chunk):
            frames.append(frame)
            if frame.type_code == b"Q":
                splitter.follow(lambda piece: rest.append(bytes(piece)), lambda: ends.append(len(frames)))
    assert b"".join(rest) == b"ect 1\x00" and ends == [2]  # all of it, before the next frame
    assert [f.type_code for f in frames] == [b"d", b"Q", b"Z"] and splitter.at_boundary


def test_follow_is_only_for_a_frame_just_kept_in_part() -> None:
    splitter = FrameSplitter(POSTGRES_MESSAGE, keep=keep_policy)
    with pytest.raises(LocalProtocolError):
        splitter.follow(print, print)
    [whole] = feed_all(splitter, [STREAM[1005:]])[-1:]
    assert whole.complete
    with pytest.raises(LocalProtocolError):
        splitter.follow(print, print)


def test_keep_beyond_the_body_keeps_the_body() -> None:
    splitter = FrameSplitter(POSTGRES_MESSAGE, keep=lambda kind, size: size + 100)
    assert feed_all(splitter, [STREAM[:3], STREAM[3:]])[0] == Frame(b"d", 1000, b"x" * 1000)


@pytest.mark.parametrize("wrap", [bytearray, memoryview])
def test_feed_takes_any_bytes_like(wrap: type) -> None:
    splitter = FrameSplitter(POSTGRES_MESSAGE, keep=keep_policy)
    frames = feed_all(splitter, [wrap(STREAM[:600]), wrap(STREAM[600:])])
    assert [type(frame.body) for frame in frames] == [bytes] * 3
    assert frames[1] == Frame(b"Q", 9, b"sel")


@fuzz
@given(cuts=st.lists(st.integers(min_value=1, max_value=len(STREAM) - 1), max_size=12))
def test_any_chunking_gives_the_same_frames(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in zip(bounds, bounds[1:]) if a < b]
    whole = feed_all(FrameSplitter(POSTGRES_MESSAGE, keep=keep_policy), [STREAM])
    assert feed_all(FrameSplitter(POSTGRES_MESSAGE, keep=keep_policy), chunks) == whole
    frames, _ = read_all(FrameSplitter(POSTGRES_MESSAGE), chunks)
    assert [frame.kind for frame in frames] == [b"d", b"Q", b"D", b"Z"]


@fuzz
@given(name=st.sampled_from(sorted(CASES)), data=st.binary(max_size=300),
       cut=st.integers(min_value=0, max_value=300))
def test_fuzz_only_remote_errors(name: str, data: bytes, cut: int) -> None:
    layout = CASES[name][0]
    for splitter in (FrameSplitter(layout, max_length=max(layout.min_length, 64)),
                     FrameSplitter(layout, keep=lambda kind, size: size // 2 or None)):
        try:
            for frame in feed_all(splitter, [data[:cut], data[cut:]]):
                assert len(frame.body) <= frame.body_length
        except RemoteProtocolError as exc:
            assert exc.code is ErrorCode.BAD_REQUEST

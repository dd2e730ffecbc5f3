"""protocols.postgres.messages.framing: typed message framing and the splitter."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import RemoteProtocolError
from protocols.postgres import messages as m
from tests.unit.protocols.feeding import fuzz
from protocols.postgres.messages import Frame, FrameSplitter
from tests.unit.protocols.postgres.messages.test_frontend import FRONTEND

def keep_all(_type: bytes, size: int) -> int:
    return size


def split_all(splitter: FrameSplitter, chunks: list[bytes]) -> list[Frame]:
    return [frame for chunk in chunks for frame in splitter.feed(chunk)]


STREAM = b"".join(x.encode() for x in FRONTEND)


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_splitter_yields_every_message(how: str) -> None:
    chunks = [STREAM] if how == "whole" else [STREAM[i : i + 1] for i in range(len(STREAM))]
    splitter = FrameSplitter(keep_all)
    frames = split_all(splitter, chunks)
    assert splitter.at_boundary
    assert [m.decode_frontend(f.type_code, f.body) for f in frames] == FRONTEND
    assert all(f.complete for f in frames)


def test_splitter_keeps_only_what_is_asked_for() -> None:
    big = m.CopyData(data=b"x" * 100_000).encode()
    query = m.Query(text="y" * 50).encode()
    splitter = FrameSplitter(lambda t, n: 10 if t == b"Q" else 0)
    frames = split_all(splitter, [big[:3], big[3:70_000], big[70_000:] + query[:7], query[7:]])
    assert frames == [Frame(b"d", 100_000, b""), Frame(b"Q", 51, b"y" * 10)]
    assert not frames[1].complete and splitter.at_boundary
    # A policy asking for more than the body, or a negative amount, is clamped.
    frames = split_all(FrameSplitter(lambda t, n: n + 100), [query])
    assert frames[0].complete
    frames = split_all(FrameSplitter(lambda t, n: -5), [query])
    assert frames == [Frame(b"Q", 51, b"")]


def test_splitter_is_mid_message_between_chunks() -> None:
    splitter = FrameSplitter(keep_all)
    assert split_all(splitter, [b"Q\x00"]) == [] and not splitter.at_boundary
    assert split_all(splitter, [b"\x00\x00\x06a"]) == [] and not splitter.at_boundary
    assert split_all(splitter, [b"\x00"]) == [Frame(b"Q", 2, b"a\x00")]


@pytest.mark.parametrize("length", [0, 3, 2**31, 2**32 - 1, m.MAX_MESSAGE_LENGTH + 1])
def test_splitter_rejects_bad_lengths(length: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        split_all(FrameSplitter(keep_all), [b"Q" + struct.pack(">I", length)])
    assert info.value.wire_hint == "08P01"


def test_splitter_custom_max_length() -> None:
    splitter = FrameSplitter(keep_all, max_length=100)
    assert len(split_all(splitter, [m.Query(text="a" * 90).encode()])) == 1
    with pytest.raises(RemoteProtocolError):
        split_all(splitter, [m.Query(text="a" * 96).encode()])


def test_splitter_accepts_memoryview_and_bytearray() -> None:
    data = m.Sync().encode() + m.Flush().encode()
    assert len(split_all(FrameSplitter(keep_all), [bytearray(data)])) == 2
    assert len(split_all(FrameSplitter(keep_all), [memoryview(data)])) == 2


@fuzz
@given(cuts=st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=20))
def test_splitter_any_chunking(cuts: list[int]) -> None:
    bounds = [0, *sorted(cuts), len(STREAM)]
    chunks = [STREAM[a:b] for a, b in zip(bounds, bounds[1:])]
    frames = split_all(FrameSplitter(lambda t, n: min(n, 3)), chunks)
    assert frames == split_all(FrameSplitter(lambda t, n: min(n, 3)), [STREAM])
    assert len(frames) == len(FRONTEND)


@fuzz
@given(data=st.binary(max_size=200), cut=st.integers(min_value=0, max_value=200))
def test_fuzz_splitter(data: bytes, cut: int) -> None:
    splitter = FrameSplitter(lambda t, n: n if t == b"Q" else 2)
    try:
        split_all(splitter, [data[:cut], data[cut:]])
    except RemoteProtocolError:
        pass

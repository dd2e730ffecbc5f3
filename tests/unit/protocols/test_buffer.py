"""protocols.buffer: ReceiveBuffer (BufferedReceiver is exercised through the
connections built on it: dial, postgres startup, upstream login)."""

from __future__ import annotations


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.buffer import ReceiveBuffer
from protocols.errors import ErrorCode, RemoteProtocolError

# Deterministic property tests: the same examples on every run and machine.
fuzz = settings(derandomize=True, database=None, deadline=None, max_examples=300)


def test_rejects_a_nonsense_cap() -> None:
    for bad in (0, -1, True, 1.5, "10"):
        with pytest.raises(ValueError, match="max_size"):
            ReceiveBuffer(bad)  # type: ignore[arg-type]
    assert ReceiveBuffer(7).max_size == 7


def test_peek_and_consume() -> None:
    buf = ReceiveBuffer(100)
    assert len(buf) == 0 and not buf
    assert buf.peek(0) == b"" and buf.consume_exactly(0) == b""
    assert buf.peek(1) is None and buf.consume_exactly(1) is None
    buf.feed(b"hello")
    buf.feed(bytearray(b" "))
    buf.feed(memoryview(b"world"))
    assert len(buf) == 11 and buf
    assert buf.peek(5) == b"hello"
    assert len(buf) == 11  # peeking consumes nothing
    assert buf.consume_exactly(12) is None
    assert len(buf) == 11  # neither does a failed consume
    assert buf.consume_exactly(6) == b"hello "
    assert buf.peek(5) == b"world" and len(buf) == 5
    assert buf.consume_exactly(5) == b"world"
    assert len(buf) == 0 and buf.peek(1) is None


def test_negative_sizes_are_a_bug() -> None:
    buf = ReceiveBuffer(10)
    with pytest.raises(ValueError, match="negative"):
        buf.peek(-1)
    with pytest.raises(ValueError, match="negative"):
        buf.consume_exactly(-1)


def test_rollback_undoes_consumes_since_commit() -> None:
    buf = ReceiveBuffer(100)
    buf.feed(b"\x00\x05abc")
    assert buf.consume_exactly(2) == b"\x00\x05"
    assert buf.consume_exactly(5) is None  # frame incomplete: give the header back
    buf.rollback()
    assert len(buf) == 5
    buf.feed(b"de")
    assert buf.consume_exactly(2) == b"\x00\x05"
    assert buf.consume_exactly(5) == b"abcde"
    buf.commit()
    buf.rollback()  # nothing to undo after a commit
    assert len(buf) == 0


def test_cap_counts_uncommitted_bytes_only() -> None:
    buf = ReceiveBuffer(8)
    buf.feed(b"12345678")
    assert buf.consume_exactly(8) == b"12345678"
    # consumed but not committed: still held (a rollback could need it)
    with pytest.raises(RemoteProtocolError):
        buf.feed(b"9")
    buf.commit()
    buf.feed(b"abcdefgh")  # committed bytes no longer count
    assert buf.peek(8) == b"abcdefgh"


def test_overflow_is_a_remote_error_and_keeps_the_buffer() -> None:
    buf = ReceiveBuffer(10)
    buf.feed(b"123456")
    with pytest.raises(RemoteProtocolError) as info:
        buf.feed(b"78901")
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert "more than 10 bytes" in str(info.value)
    assert "6 buffered, 5 more" in str(info.value)
    assert buf.peek(len(buf)) == b"123456"
    buf.feed(b"7890")  # exactly the cap is fine
    assert len(buf) == 10


def test_take_all_returns_the_rest_and_frees_the_cap() -> None:
    buf = ReceiveBuffer(10)
    assert buf.take_all() == b""
    buf.feed(b"HDRpayload")
    assert buf.consume_exactly(3) == b"HDR"
    buf.commit()
    assert buf.take_all() == b"payload"
    assert len(buf) == 0 and buf.take_all() == b""
    buf.feed(b"0123456789")  # the whole cap is available again
    assert buf.consume_exactly(2) == b"01"
    assert buf.take_all() == b"23456789"  # uncommitted consumes are committed too
    buf.rollback()
    assert len(buf) == 0


def test_many_small_messages_compact_the_storage() -> None:
    # The cap covers what is uncommitted, so this only passes if committed
    # bytes stop counting; the repr stays honest throughout.
    buf = ReceiveBuffer(64)
    for i in range(10_000):
        buf.feed(bytes([i % 256]) * 3)
        assert buf.consume_exactly(2) == bytes([i % 256]) * 2
        buf.commit()
        assert buf.consume_exactly(1) == bytes([i % 256])
        buf.commit()
    assert len(buf) == 0
    assert repr(buf) == "<ReceiveBuffer 0 unread bytes, cap 64>"


# A model-based check: any sequence of operations behaves like the obvious
# (slow) implementation over a bytes object and two offsets.
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("feed"), st.binary(max_size=20)),
        st.tuples(st.just("peek"), st.integers(0, 25)),
        st.tuples(st.just("consume"), st.integers(0, 25)),
        st.tuples(st.just("commit")),
        st.tuples(st.just("rollback")),
        st.tuples(st.just("take_all")),
    ),
    max_size=60,
)


@fuzz
@given(cap=st.integers(1, 40), ops=_ops)
def test_behaves_like_the_reference_model(cap: int, ops: list[tuple]) -> None:
    buf = ReceiveBuffer(cap)
    data, start, pos = b"", 0, 0
    for op, *args in ops:
        if op == "feed":
            if len(data) - start + len(args[0]) > cap:
                with pytest.raises(RemoteProtocolError):
                    buf.feed(args[0])
            else:
                buf.feed(args[0])
                data += args[0]
        elif op == "peek":
            n = args[0]
            assert buf.peek(n) == (data[pos : pos + n] if pos + n <= len(data) else None)
        elif op == "consume":
            n = args[0]
            expected = data[pos : pos + n] if pos + n <= len(data) else None
            assert buf.consume_exactly(n) == expected
            if expected is not None:
                pos += n
        elif op == "commit":
            buf.commit()
            start = pos
        elif op == "rollback":
            buf.rollback()
            pos = start
        else:
            assert buf.take_all() == data[pos:]
            data, start, pos = b"", 0, 0
        assert len(buf) == len(data) - pos
        assert bool(buf) == (len(data) > pos)

"""protocols.mysql.packets: packets, continuation, sequence ids, the field codec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocols.buffer import ReceiveBuffer
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.mysql.constants import MAX_PAYLOAD, ErrorNumber
from protocols.mysql.packets import (
    Cut, PacketChannel, Reader, encode_packets, iter_packets, lenenc_bytes, lenenc_int,
    nul_bytes,
)
from tests.unit.protocols.feeding import FEEDS, fuzz, malformed, split


def packet(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


def read_all(channel: PacketChannel, chunks: list[bytes], cap: int = 1 << 26) -> list[bytes]:
    buffer = ReceiveBuffer(cap)
    out = []
    for chunk in chunks:
        buffer.feed(chunk)
        while (payload := channel.read(buffer)) is not None:
            out.append(payload)
    return out


# --- length-encoded integers and strings -----------------------------------------------

LENENC = [(0, b"\x00"), (250, b"\xfa"), (251, b"\xfc\xfb\x00"), (0xFFFF, b"\xfc\xff\xff"),
          (0x10000, b"\xfd\x00\x00\x01"), (0xFFFFFF, b"\xfd\xff\xff\xff"),
          (1 << 24, b"\xfe\x00\x00\x00\x01\x00\x00\x00\x00"),
          ((1 << 64) - 1, b"\xfe" + b"\xff" * 8)]


@pytest.mark.parametrize(("value", "wire"), LENENC)
def test_lenenc_integers_at_every_boundary(value: int, wire: bytes) -> None:
    assert lenenc_int(value) == wire
    reader = Reader(wire + b"!", "test")
    assert reader.lenenc_int() == value and reader.rest() == b"!"


@pytest.mark.parametrize("first", [b"\xfb", b"\xff"])
def test_null_and_err_bytes_are_not_integers(first: bytes) -> None:
    err = malformed(Reader(first, "a row").lenenc_int)
    assert err.wire_hint == ErrorNumber.ER_MALFORMED_PACKET and "a row" in err.message


@pytest.mark.parametrize("bad", [-1, 1 << 64, True, 1.0])
def test_lenenc_refuses_what_it_cannot_encode(bad: object) -> None:
    with pytest.raises(LocalProtocolError):
        lenenc_int(bad)  # type: ignore[arg-type]


@fuzz
@given(st.binary(max_size=300))
def test_lenenc_strings_round_trip(data: bytes) -> None:
    reader = Reader(lenenc_bytes(data) + b"tail", "test")
    assert reader.lenenc_bytes() == data and reader.remaining == 4


def test_reader_fields_and_errors() -> None:
    reader = Reader(b"\x01\x02\x00\x03\x00\x00\x04\x00\x00\x00" + b"\x05" + b"\x00" * 7
                    + b"abc\x00rest", "a test packet", ErrorNumber.ER_HANDSHAKE_ERROR)
    assert (reader.int1(), reader.int2(), reader.int3(), reader.int4(), reader.int8()) == (
        1, 2, 3, 4, 5)
    assert reader.peek() == ord("a") and reader.nul_bytes() == b"abc"
    assert reader.nul_or_rest() == b"rest" and reader.at_end() and reader.peek() is None
    reader.end()
    err = malformed(reader.int1)
    assert err.wire_hint == ErrorNumber.ER_HANDSHAKE_ERROR and "truncated" in err.message
    assert malformed(Reader(b"abc", "x").nul_bytes).wire_hint == ErrorNumber.ER_MALFORMED_PACKET
    assert "trailing" in malformed(Reader(b"ab", "x").end).message
    short = Reader(b"ab", "x", complete=False)
    with pytest.raises(Cut):
        short.raw(3)
    with pytest.raises(Cut):
        short.nul_bytes()
    short.end()  # a prefix may stop anywhere
    with pytest.raises(LocalProtocolError):
        nul_bytes(b"a\x00b")


# --- packets ----------------------------------------------------------------------------


def test_encode_splits_at_the_maximum_payload() -> None:
    small, seq = encode_packets(b"abc", 7)
    assert small == b"\x03\x00\x00\x07abc" and seq == 8
    assert encode_packets(b"", 255) == (b"\x00\x00\x00\xff", 0)
    exact, seq = encode_packets(b"x" * MAX_PAYLOAD, 0)
    # A payload of exactly 2^24-1 bytes ends with an empty packet.
    assert [(s, len(p)) for s, p in iter_packets(exact)] == [(0, MAX_PAYLOAD), (1, 0)]
    assert seq == 2
    longer, seq = encode_packets(b"y" * (MAX_PAYLOAD + 5), 255)
    assert [(s, len(p)) for s, p in iter_packets(longer)] == [(255, MAX_PAYLOAD), (0, 5)]
    assert list(iter_packets(longer[:-1])) == [(255, b"y" * MAX_PAYLOAD)]


@pytest.mark.parametrize("how", FEEDS)
def test_channel_reads_payloads_and_checks_ids(how: str) -> None:
    data = packet(0, b"hello") + packet(1, b"") + packet(2, b"world") + b"\x05\x00"
    channel = PacketChannel()
    assert read_all(channel, split(data, how)) == [b"hello", b"", b"world"]
    assert channel.seq == 3 and channel.at_boundary
    assert channel.write(b"ok") == packet(3, b"ok") and channel.seq == 4
    channel.reset()
    assert channel.seq == 0


def test_a_wrong_sequence_id_is_out_of_order() -> None:
    channel = PacketChannel(what="client")
    err = malformed(read_all, channel, [packet(0, b"a") + packet(2, b"b")])
    assert err.wire_hint == ErrorNumber.ER_NET_PACKETS_OUT_OF_ORDER
    assert "client sent packet 2 where 1 was due" in err.message


def test_reassembles_continued_payloads_within_the_bound() -> None:
    big = b"z" * MAX_PAYLOAD + b"tail"
    wire, _ = encode_packets(big, 254)
    channel = PacketChannel(max_packet=MAX_PAYLOAD + 4)
    channel.reset(254)
    chunks = [wire[i : i + (1 << 20)] for i in range(0, len(wire), 1 << 20)]
    assert read_all(channel, chunks) == [big]
    assert channel.seq == 0
    half = PacketChannel()
    half.reset(254)
    assert read_all(half, [wire[: MAX_PAYLOAD + 4]]) == [] and not half.at_boundary
    with pytest.raises(LocalProtocolError):  # not while a payload is half read
        half.write(b"x")
    with pytest.raises(LocalProtocolError):
        half.reset()
    half.abandon()
    half.reset()
    tight = PacketChannel(max_packet=MAX_PAYLOAD + 3)
    tight.reset(254)
    err = malformed(read_all, tight, chunks)
    assert err.wire_hint == ErrorNumber.ER_NET_PACKET_TOO_LARGE


def test_a_packet_over_the_bound_is_refused_from_its_header() -> None:
    channel = PacketChannel(max_packet=10)
    err = malformed(read_all, channel, [b"\x0b\x00\x00\x00"])  # no body needed
    assert err.wire_hint == ErrorNumber.ER_NET_PACKET_TOO_LARGE
    with pytest.raises(ValueError):
        PacketChannel(max_packet=0)


def test_trailing_bytes_stay_in_the_buffer() -> None:
    buffer = ReceiveBuffer(100)
    buffer.feed(packet(0, b"one") + b"\x07\x00")
    channel = PacketChannel()
    assert channel.read(buffer) == b"one" and channel.read(buffer) is None
    assert buffer.take_all() == b"\x07\x00"


@fuzz
@given(st.lists(st.binary(max_size=40), max_size=6), st.integers(0, 255))
def test_round_trip(payloads: list[bytes], start: int) -> None:
    writer, reader = PacketChannel(), PacketChannel()
    writer.reset(start)
    reader.reset(start)
    wire = b"".join(writer.write(p) for p in payloads)
    assert read_all(reader, split(wire, "bytewise")) == payloads


@fuzz
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_errors(data: bytes) -> None:
    try:
        read_all(PacketChannel(max_packet=64), [data])
    except RemoteProtocolError:
        pass

"""protocols.mongodb.wire: OP_MSG, OP_QUERY, OP_REPLY, OP_COMPRESSED, and a
stream of them fed whole, a byte at a time and with trailing data."""

from __future__ import annotations

import struct
import zlib
from functools import partial
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.mongodb import bson, wire
from protocols.mongodb.crc32c import crc32c
from protocols.mongodb.wire import (
    OP_COMPRESSED, OP_MSG, OP_QUERY, OP_REPLY, Compressor, DocumentSequence, MessageReader,
    OpCompressed, OpMsg, OpQuery, OpReply, UnsupportedCompressor,
)
from protocols.signals import NEED_DATA, ConnectionClosed
from tests.unit.protocols.feeding import FEEDS, fuzz, malformed, pump, split
from tests.unit.protocols.mongodb.corpus import captured_streams


def raw_message(op_code: int, body: bytes, request_id: int = 1, response_to: int = 0) -> bytes:
    return struct.pack("<iiii", 16 + len(body), request_id, response_to, op_code) + body


def msg_body(flags: int, *sections: bytes) -> bytes:
    return struct.pack("<I", flags) + b"".join(sections)


def kind0(document: dict[str, Any]) -> bytes:
    return b"\x00" + bson.encode(document)


def kind1(identifier: str, *documents: dict[str, Any]) -> bytes:
    payload = identifier.encode() + b"\x00" + b"".join(bson.encode(d) for d in documents)
    return b"\x01" + struct.pack("<i", len(payload) + 4) + payload


HELLO = OpQuery(request_id=1, collection="admin.$cmd", limit=-1,
                query={"isMaster": 1, "helloOk": True, "client": {"driver": {"name": "x"}}})
INSERT = OpMsg(request_id=2, body={"insert": "users", "ordered": True, "$db": "app"},
               sequences=[DocumentSequence(identifier="documents",
                                           documents=[{"_id": 1}, {"_id": 2, "n": "b"}])])
FIND = OpMsg(request_id=3, body={"find": "users", "filter": {"age": {"$gt": 30}}, "$db": "app"},
             checksum=True)
REPLY = OpReply(response_to=1, flags=8, documents=[{"ismaster": True, "maxWireVersion": 21,
                                                   "ok": 1.0}])
EXHAUST = OpMsg(request_id=4, body={"getMore": bson.Int64(9), "collection": "users",
                                    "$db": "app"}, exhaust_allowed=True)
MORE = OpMsg(request_id=5, response_to=4, body={"cursor": {"id": bson.Int64(9)}, "ok": 1.0},
             more_to_come=True, optional_flags=1 << 20)
MESSAGES = [HELLO, INSERT, FIND, REPLY, EXHAUST, MORE]


def test_op_msg_bytes_are_as_the_spec_draws_them() -> None:
    body = kind0({"insert": "users", "ordered": True, "$db": "app"})
    seq = kind1("documents", {"_id": 1}, {"_id": 2, "n": "b"})
    assert INSERT.encode() == raw_message(OP_MSG, msg_body(0, body, seq), request_id=2)
    # A checksum is the CRC-32C of everything before it, header included.
    raw = FIND.encode()
    assert struct.unpack("<I", raw[-4:])[0] == crc32c(raw[:-4])
    assert struct.unpack("<I", raw[16:20])[0] == wire.CHECKSUM_PRESENT
    assert FIND.flag_bits == 1 and EXHAUST.flag_bits == 1 << 16
    assert MORE.flag_bits == wire.MORE_TO_COME | 1 << 20


def test_legacy_bytes() -> None:
    assert HELLO.encode() == raw_message(
        OP_QUERY, struct.pack("<i", 0) + b"admin.$cmd\x00" + struct.pack("<ii", 0, -1)
        + bson.encode(HELLO.query))
    reply = REPLY.encode()
    assert reply == raw_message(OP_REPLY, struct.pack("<iqii", 8, 0, 0, 1)
                                + bson.encode(REPLY.documents[0]), request_id=0, response_to=1)
    with_fields = OpQuery(collection="a.$cmd", query={"x": 1}, fields={"y": 1})
    assert wire.decode_message(with_fields.encode()) == with_fields


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: f"{type(m).__name__}-{m.request_id}")
def test_every_message_round_trips(message: wire.Message) -> None:
    raw = message.encode()
    assert wire.decode_message(raw) == message
    assert wire.decode_message(raw).encode() == raw


STREAM = b"".join(m.encode() for m in MESSAGES)


@pytest.mark.parametrize("how", FEEDS)
def test_a_stream_fed_whole_or_bytewise(how: str) -> None:
    reader = MessageReader()
    assert pump(reader, split(STREAM, how) + [b""]) == MESSAGES + [ConnectionClosed(clean=True)]
    assert reader.next_event() == ConnectionClosed(clean=True)
    with pytest.raises(LocalProtocolError):
        reader.receive_data(b"more")


@pytest.mark.parametrize("how", FEEDS)
def test_trailing_data_waits_for_the_rest(how: str) -> None:
    reader = MessageReader()
    tail = FIND.encode()[:21]
    assert pump(reader, split(STREAM + tail, how)) == MESSAGES
    assert reader.next_event() is NEED_DATA
    assert pump(reader, [b""]) == [ConnectionClosed(clean=False)]


def test_checksums_can_be_left_to_the_server() -> None:
    raw = bytearray(FIND.encode())
    raw[-1] ^= 0xFF
    assert "checksum" in malformed(pump, MessageReader(), [bytes(raw)]).message
    assert pump(MessageReader(verify_checksums=False), [bytes(raw)]) == [FIND]


def test_a_bad_message_poisons_the_reader_after_the_good_ones() -> None:
    reader = MessageReader()
    reader.receive_data(INSERT.encode() + raw_message(9999, b"") + FIND.encode())
    assert reader.next_event() == INSERT
    err = malformed(reader.next_event)
    assert "opCode 9999" in err.message and err.wire_hint == wire.PROTOCOL_ERROR
    malformed(reader.next_event)  # poisoned for good
    reader.receive_data(b"ignored")


def test_the_message_cap_is_checked_from_the_length_alone() -> None:
    reader = MessageReader(max_message_size=1000)
    reader.receive_data(struct.pack("<i", 1001))
    err = malformed(reader.next_event)
    assert "exceeds the maximum 1000" in err.message and err.wire_hint == 17
    reader = MessageReader()
    reader.receive_data(struct.pack("<i", 15))
    assert "below the minimum" in malformed(reader.next_event).message


def test_a_peer_far_ahead_of_the_reader_poisons_it() -> None:
    reader = MessageReader(max_message_size=100)
    reader.receive_data(bytes(100 + 64 * 1024 + 1))
    assert "ahead" in malformed(reader.next_event).message


def test_decode_message_takes_exactly_one_message() -> None:
    raw = FIND.encode()
    assert "is not its" in malformed(wire.decode_message, raw + b"x").message
    assert "shorter than its header" in malformed(wire.decode_message, raw[:10]).message
    assert "exceeds" in malformed(partial(wire.decode_message, max_message_size=20), raw).message


DOC = kind0({"ping": 1, "$db": "admin"})


@pytest.mark.parametrize("body, words, hint", [
    (msg_body(1 << 2, DOC), "required flag bits", wire.ILLEGAL_OP_MSG_FLAG),
    (msg_body(1 << 15, DOC), "required flag bits", wire.ILLEGAL_OP_MSG_FLAG),
    (msg_body(0), "shorter", 17),
    (msg_body(0, kind1("documents", {"a": 1})), "no body", 17),
    (msg_body(0, DOC, DOC), "two body", 17),
    (msg_body(0, DOC, b"\x02" + bson.encode({})), "unknown kind 2", 17),
    (msg_body(0, DOC, kind1("d"), kind1("d")), "appears twice", 17),
    (msg_body(0, DOC, kind1("ping")), "appears twice", 17),
    (msg_body(0, DOC, b"\x01" + struct.pack("<i", 4) + b"\x00"), "does not fit", 17),
    (msg_body(0, DOC, b"\x01" + struct.pack("<i", 99) + b"x\x00"), "does not fit", 17),
    (msg_body(0, DOC, b"\x01\x05\x00"), "cut short", 17),
    (msg_body(0, DOC, b"\x01" + struct.pack("<i", 6) + b"\x00\x00"), "empty identifier", 17),
    (msg_body(0, DOC, b"\x01" + struct.pack("<i", 6) + b"ab"), "NUL-terminated", 17),
    (msg_body(0, DOC, b"\x01" + struct.pack("<i", 6) + b"\xff\x00"), "UTF-8", 22),
    (msg_body(0, DOC, kind1("d", {"a": 1})[:-1] + b"\x01"), "NUL", 22),
    (msg_body(0, DOC[:-1]), "", 22),
    (msg_body(1, DOC) + b"\x00" * 4, "checksum does not match", 288),
    (msg_body(1, DOC[:-1]) + b"\x00" * 4, "checksum does not match", 288),
    (msg_body(1, b"\x00"), "too short to hold", 17),
], ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_op_msg(body: bytes, words: str, hint: int) -> None:
    err = malformed(wire.decode_message, raw_message(OP_MSG, body))
    assert words in err.message and err.wire_hint == hint


def test_sequence_documents_can_be_walked_without_decoding() -> None:
    raw = INSERT.encode()[16:]
    flags, body, found = wire.split_op_msg(raw, sequences=False)
    assert flags == 0 and body == INSERT.body and found == [("documents", [], 2)]
    assert wire.split_op_msg(raw, sequences={"documents"})[2] == [
        ("documents", [{"_id": 1}, {"_id": 2, "n": "b"}], 2)]
    assert wire.split_op_msg(raw, sequences={"updates"})[2] == [("documents", [], 2)]
    bad = msg_body(0, DOC, kind1("d", {"a": 1})[:-1] + b"\x01")
    assert "does not fit" in malformed(partial(wire.split_op_msg, sequences=False), bad).message
    short = msg_body(0, DOC, b"\x01" + struct.pack("<i", 8) + b"d\x00\x05\x00")
    assert "cut short" in malformed(partial(wire.split_op_msg, sequences=False), short).message


@pytest.mark.parametrize("op_code, body, words", [
    (OP_QUERY, b"\x00\x00", "cut short"),
    (OP_QUERY, struct.pack("<i", 1) + b"a.$cmd\x00", "reserved flag"),
    (OP_QUERY, struct.pack("<i", 1 << 8) + b"a.$cmd\x00", "reserved flag"),
    (OP_QUERY, struct.pack("<i", 0) + b"a.$cmd", "NUL-terminated"),
    (OP_QUERY, struct.pack("<i", 0) + b"a.$cmd\x00\x00", "cut short"),
    (OP_QUERY, OpQuery(collection="a.$cmd", query={}).encode()[16:] + b"\x05\x00\x00\x00\x00"
     + b"x", "follow"),
    (OP_REPLY, b"\x00" * 19, "cut short"),
    (OP_REPLY, struct.pack("<iqii", 0, 0, 0, 2) + bson.encode({}), "says 2 documents"),
    (OP_COMPRESSED, b"\x00" * 8, "cut short"),
    (OP_COMPRESSED, struct.pack("<iiB", OP_COMPRESSED, 0, 0), "another OP_COMPRESSED"),
    (OP_COMPRESSED, struct.pack("<iiB", OP_MSG, -1, 0), "over the message cap"),
    (OP_COMPRESSED, struct.pack("<iiB", OP_MSG, wire.DEFAULT_MAX_MESSAGE_SIZE, 0), "over the"),
    (2004 - 2002, b"", "unsupported opCode"),
])
def test_malformed_legacy_and_compressed(op_code: int, body: bytes, words: str) -> None:
    assert words in malformed(wire.decode_message, raw_message(op_code, body)).message


def test_query_flags_drivers_send_are_accepted() -> None:
    query = OpQuery(collection="admin.$cmd", flags=4, query={"hello": 1})  # SlaveOk
    assert wire.decode_message(query.encode()).flags == 4


@pytest.mark.parametrize("compressor", [Compressor.ZLIB, Compressor.NOOP])
@pytest.mark.parametrize("message", [INSERT, FIND, HELLO, REPLY],
                         ids=lambda m: type(m).__name__)
def test_compression_round_trips(message: wire.Message, compressor: Compressor) -> None:
    compressed = wire.compress(message, compressor)
    raw = compressed.encode()
    decoded = wire.decode_message(raw)
    assert isinstance(decoded, OpCompressed) and decoded == compressed
    assert decoded.original_opcode == struct.unpack_from("<i", message.encode(), 12)[0]
    assert wire.decompress(decoded) == message


def compressed(payload: bytes, size: int, compressor: int = 2) -> OpCompressed:
    return OpCompressed(request_id=1, original_opcode=OP_MSG, uncompressed_size=size,
                        compressor_id=compressor, payload=payload)


def test_bad_compressed_payloads() -> None:
    body = FIND.encode()[16:]
    packed = zlib.compress(body)
    assert "corrupt" in malformed(wire.decompress, compressed(b"nonsense", len(body))).message
    # Declared smaller than it inflates to: zlib stops at the declared size.
    err = malformed(wire.decompress, compressed(packed, len(body) - 1))
    assert "exactly" in err.message and err.wire_hint == 147
    err = malformed(wire.decompress, compressed(packed, len(body) + 1))
    assert "not its declared" in err.message
    assert "exactly" in malformed(wire.decompress, compressed(packed + b"x", len(body))).message
    assert "not its declared" in malformed(wire.decompress, compressed(body, 3, 0)).message
    assert "cap" in malformed(partial(wire.decompress, max_message_size=30),
                              compressed(packed, len(body))).message


def test_a_zlib_bomb_inflates_no_further_than_declared() -> None:
    bomb = zlib.compress(bytes(10_000_000))
    malformed(wire.decompress, compressed(bomb, 100))


@pytest.mark.parametrize("compressor, name", [(1, "snappy"), (3, "zstd"), (9, "compressor id 9")])
def test_snappy_and_zstd_are_refused_clearly(compressor: int, name: str) -> None:
    with pytest.raises(UnsupportedCompressor) as info:
        wire.decompress(compressed(b"x", 1, compressor))
    assert info.value.message.startswith(name) and "hello" in info.value.message
    assert info.value.compressor_id == compressor
    assert isinstance(info.value, RemoteProtocolError)
    assert wire.SUPPORTED_COMPRESSORS == ("zlib",)


def test_what_cannot_be_sent_is_a_local_error() -> None:
    with pytest.raises(LocalProtocolError):
        OpMsg(body={"insert": "t", "documents": []},
              sequences=[DocumentSequence(identifier="documents", documents=[])]).encode()
    with pytest.raises(LocalProtocolError):
        OpMsg(body={"a": 1}, sequences=[DocumentSequence(identifier="d", documents=[]),
                                        DocumentSequence(identifier="d", documents=[])]).encode()
    with pytest.raises(LocalProtocolError):
        OpQuery(collection="a\x00b", query={}).encode()
    with pytest.raises(LocalProtocolError):
        wire.compress(wire.compress(FIND))
    with pytest.raises(LocalProtocolError):
        wire.compress(FIND, Compressor.SNAPPY)


@pytest.mark.parametrize("build", [
    lambda: OpMsg(body={}, request_id=2**31), lambda: OpMsg(body={}, optional_flags=1),
    lambda: OpMsg(body={}, optional_flags=wire.EXHAUST_ALLOWED),
    lambda: DocumentSequence(identifier="", documents=[]),
    lambda: DocumentSequence(identifier="a\x00", documents=[]),
])
def test_events_check_themselves(build: Any) -> None:
    with pytest.raises(ValueError):
        build()


# --- fuzzing -------------------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=300))
def test_random_bytes_only_ever_raise_a_remote_error(data: bytes) -> None:
    reader = MessageReader(max_message_size=4096)
    try:
        pump(reader, [data, b""])  # (an empty ``data`` is only the EOF)
    except RemoteProtocolError:
        pass


@fuzz
@given(st.sampled_from([OP_MSG, OP_QUERY, OP_REPLY, OP_COMPRESSED]), st.binary(max_size=200))
def test_random_bodies_of_each_opcode(op_code: int, body: bytes) -> None:
    try:
        message = wire.decode_message(raw_message(op_code, body))
        if isinstance(message, OpCompressed):
            wire.decompress(message)
    except RemoteProtocolError:
        pass


_docs = st.dictionaries(st.text("abc$", min_size=1, max_size=4),
                        st.one_of(st.integers(-5, 5), st.text(max_size=4), st.none()), max_size=3)


@settings(parent=fuzz, max_examples=150)
@given(body=_docs, sequences=st.dictionaries(st.text("xyz", min_size=1, max_size=3),
                                             st.lists(_docs, max_size=3), max_size=2),
       flags=st.tuples(st.booleans(), st.booleans(), st.booleans()),
       request_id=st.integers(-(2**31), 2**31 - 1), compress=st.booleans())
def test_op_msg_round_trips_through_a_reader(body: dict[str, Any], sequences: dict[str, Any],
                                             flags: tuple[bool, bool, bool], request_id: int,
                                             compress: bool) -> None:
    sequences = {k: v for k, v in sequences.items() if k not in body}
    message = OpMsg(request_id=request_id, body=body, checksum=flags[0], more_to_come=flags[1],
                    exhaust_allowed=flags[2],
                    sequences=[DocumentSequence(identifier=k, documents=v)
                               for k, v in sequences.items()])
    raw = (wire.compress(message) if compress else message).encode()
    reader = MessageReader()
    events = pump(reader, split(raw, "bytewise") + [b""])
    decoded = events[0]
    if compress:
        assert isinstance(decoded, OpCompressed)
        decoded = wire.decompress(decoded)
    assert decoded == message and events[1:] == [ConnectionClosed(clean=True)]


# --- real driver traffic (captures/README.md) -------------------------------------------

@pytest.mark.parametrize("name, stream", captured_streams(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_pymongo_traffic_decodes_and_encodes_back_to_the_same_bytes(name: str,
                                                                    stream: bytes) -> None:
    messages = pump(MessageReader(), split(stream, "whole") + [b""])
    assert messages[-1] == ConnectionClosed(clean=True)
    assert b"".join(m.encode() for m in messages[:-1]) == stream
    for message in messages[:-1]:
        if isinstance(message, OpCompressed):
            assert message.compressor_id == Compressor.ZLIB
            assert isinstance(wire.decompress(message), OpMsg)

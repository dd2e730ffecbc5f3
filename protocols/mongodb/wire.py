"""MongoDB wire messages: OP_MSG, the legacy OP_QUERY/OP_REPLY pair a first
``hello`` may use, and OP_COMPRESSED.

Spec: "MongoDB Wire Protocol" (the server manual: Standard Message Header,
OP_MSG, OP_QUERY, OP_REPLY, OP_COMPRESSED); mongodb/specifications
``source/message/OP_MSG.md`` (flag bits, sections, checksum) and
``source/compression/OP_COMPRESSED.md`` (compressor ids).

Theory of operation
-------------------
Every message starts with the 16-byte MsgHeader (messageLength, requestID,
responseTo, opCode, int32 little-endian; the length counts the whole
message). :class:`MessageReader` frames a stream with the shared
:class:`~protocols.framing.FrameSplitter` (layout
:data:`~protocols.framing.MONGODB_MESSAGE`), capped at the server's
``maxMessageSizeBytes``, and turns each message into a frozen event:
:class:`OpMsg`, :class:`OpQuery`, :class:`OpReply` or :class:`OpCompressed`.
Each event's ``encode()`` gives its bytes back; for a decoded event those
are the bytes it was decoded from when its body section came first (drivers
send it first; the sections' order carries no meaning) and its checksum, if
any, was right: the checksum is recomputed.

OP_MSG rules enforced (OP_MSG.md): flag bits 0-15 are required ones: any we
do not know is an error (IllegalOpMsgFlag, 223); unknown optional bits
(16-31) are kept, not judged. Exactly one kind-0 section (the command
body), any number of kind-1 document sequences with unique identifiers that
do not also appear in the body; any other kind is an error. With
checksumPresent, the last four bytes are the CRC-32C of everything before
them, header included: verified when reading (unless a reader is told to
leave that to the server), written when encoding with ``checksum=True``.

OP_COMPRESSED is handed out as it is (a relay may carry it end to end);
:func:`decompress` opens a zlib or noop one (bounded by its declared
``uncompressedSize``, itself bounded by the message cap, so no zlib bomb
grows past it) into the message inside. snappy and zstd raise
:class:`UnsupportedCompressor`: the gateway leaves them out of the
``compression`` list it answers a ``hello`` with, so a client never uses them.

Errors are RemoteProtocolError with a MongoDB code as the wire hint:
ProtocolError (17) by default, InvalidBSON (22) from a document,
ChecksumMismatch (288), ZLibError (147).
"""

from __future__ import annotations

import enum
import struct
import zlib
from collections.abc import Collection, Mapping
from typing import Any, Final, Literal, Union

import attrs

from protocols.buffer import BufferedReceiver, ReceiveBuffer
from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.framing import MONGODB_MESSAGE, FrameSplitter
from protocols.mongodb import bson
from protocols.mongodb.crc32c import crc32c
from protocols.signals import NEED_DATA, ConnectionClosed, Signal

__all__ = [
    "OP_REPLY", "OP_QUERY", "OP_COMPRESSED", "OP_MSG", "DEFAULT_MAX_MESSAGE_SIZE",
    "PROTOCOL_ERROR", "ILLEGAL_OP_MSG_FLAG", "CHECKSUM_MISMATCH", "ZLIB_ERROR",
    "CHECKSUM_PRESENT", "MORE_TO_COME", "EXHAUST_ALLOWED",
    "Compressor", "SUPPORTED_COMPRESSORS", "DocumentSequence", "OpMsg", "OpQuery", "OpReply",
    "OpCompressed",
    "Message", "UnsupportedCompressor", "MessageReader",
    "decode_message", "decompress", "compress", "split_op_msg", "protocol_error",
]

OP_REPLY: Final = 1
OP_QUERY: Final = 2004
OP_COMPRESSED: Final = 2012
OP_MSG: Final = 2013

#: The server's default maxMessageSizeBytes.
DEFAULT_MAX_MESSAGE_SIZE: Final = 48_000_000
#: MongoDB error codes these errors carry as their wire hint.
PROTOCOL_ERROR: Final = 17
ILLEGAL_OP_MSG_FLAG: Final = 223
CHECKSUM_MISMATCH: Final = 288
ZLIB_ERROR: Final = 147

# OP_MSG flagBits (OP_MSG.md, "flagBits").
CHECKSUM_PRESENT: Final = 1 << 0
MORE_TO_COME: Final = 1 << 1
EXHAUST_ALLOWED: Final = 1 << 16
_KNOWN_REQUIRED: Final = CHECKSUM_PRESENT | MORE_TO_COME

HEADER: Final = struct.Struct("<iiii")
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_QUERY_TAIL = struct.Struct("<ii")  # numberToSkip, numberToReturn
_REPLY_HEAD = struct.Struct("<iqii")  # responseFlags, cursorID, startingFrom, numberReturned
_COMPRESSED_HEAD = struct.Struct("<iiB")  # originalOpcode, uncompressedSize, compressorId
_QUERY_FLAGS: Final = 0xFE  # bits 1-7 are defined; bit 0 and 8-31 are reserved


def _INT32(_instance: object, attribute: Any, value: int) -> None:
    if not -(2**31) <= value < 2**31:
        raise ValueError(f"{attribute.name} must fit an int32")


def protocol_error(message: str, hint: int = PROTOCOL_ERROR) -> RemoteProtocolError:
    """A malformed MongoDB message: RemoteProtocolError with ``hint``, a
    MongoDB error code (ProtocolError, 17, by default)."""
    return RemoteProtocolError(message, code=ErrorCode.BAD_REQUEST, wire_hint=hint)


class Compressor(enum.IntEnum):
    """OP_COMPRESSED's compressorId (OP_COMPRESSED.md, "Compressors")."""

    NOOP = 0
    SNAPPY = 1
    ZLIB = 2
    ZSTD = 3


#: What this codec can open: the ``compression`` list the gateway may offer.
SUPPORTED_COMPRESSORS: Final = ("zlib",)


class UnsupportedCompressor(RemoteProtocolError):
    """An OP_COMPRESSED this codec cannot open (snappy, zstd, an unknown id).
    The peer used a compressor the gateway's ``hello`` did not offer."""

    def __init__(self, compressor_id: int) -> None:
        try:
            name = Compressor(compressor_id).name.lower()
        except ValueError:
            name = f"compressor id {compressor_id}"
        super().__init__(f"{name} compression is not supported here (only zlib): "
                         f"it must be negotiated away in hello", code=ErrorCode.BAD_REQUEST,
                         wire_hint=PROTOCOL_ERROR)
        self.compressor_id = compressor_id


def _header(length: int, request_id: int, response_to: int, op_code: int) -> bytes:
    return HEADER.pack(length, request_id, response_to, op_code)


# --- the messages -------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class DocumentSequence:
    """An OP_MSG kind-1 section: documents pulled out of the command body
    under ``identifier`` (``documents`` of an insert, ``updates``, ...)."""

    identifier: str = attrs.field()
    documents: tuple[Mapping[str, Any], ...] = attrs.field(converter=tuple, hash=False)

    @identifier.validator
    def _cstring(self, _attr: object, value: str) -> None:
        if not value or "\x00" in value:
            raise ValueError("a sequence identifier is a non-empty cstring")


@attrs.frozen(kw_only=True)
class OpMsg:
    """OP_MSG (2013): one command or reply. ``optional_flags`` holds flag
    bits 16-31 other than exhaustAllowed, kept as received."""

    request_id: int = attrs.field(default=0, validator=_INT32)
    response_to: int = attrs.field(default=0, validator=_INT32)
    body: Mapping[str, Any] = attrs.field(hash=False)
    sequences: tuple[DocumentSequence, ...] = attrs.field(default=(), converter=tuple,
                                                          hash=False)
    more_to_come: bool = False
    exhaust_allowed: bool = False
    checksum: bool = False
    optional_flags: int = attrs.field(default=0)

    @optional_flags.validator
    def _optional(self, _attr: object, value: int) -> None:
        if value & ~0xFFFE0000:
            raise ValueError("optional_flags holds bits 16-31 other than exhaustAllowed")

    @property
    def flag_bits(self) -> int:
        return (self.optional_flags | (CHECKSUM_PRESENT if self.checksum else 0)
                | (MORE_TO_COME if self.more_to_come else 0)
                | (EXHAUST_ALLOWED if self.exhaust_allowed else 0))

    def encode(self) -> bytes:
        parts = [_U32.pack(self.flag_bits), b"\x00", bson.encode(self.body)]
        names = set(self.body)
        for sequence in self.sequences:
            if sequence.identifier in names:
                raise LocalProtocolError(f"the sequence {sequence.identifier!r} is also a "
                                         f"body field, or appears twice")
            names.add(sequence.identifier)
            payload = sequence.identifier.encode("utf-8") + b"\x00" + b"".join(
                bson.encode(doc) for doc in sequence.documents)
            parts += [b"\x01", _I32.pack(len(payload) + 4), payload]
        body = b"".join(parts)
        length = HEADER.size + len(body) + (4 if self.checksum else 0)
        message = _header(length, self.request_id, self.response_to, OP_MSG) + body
        if self.checksum:
            message += _U32.pack(crc32c(message))
        return message


@attrs.frozen(kw_only=True)
class OpQuery:
    """The legacy OP_QUERY (2004); today only a first ``hello``/``isMaster``
    on ``admin.$cmd`` (``collection`` is the fullCollectionName)."""

    request_id: int = attrs.field(default=0, validator=_INT32)
    response_to: int = attrs.field(default=0, validator=_INT32)
    flags: int = 0
    collection: str
    skip: int = attrs.field(default=0, validator=_INT32)
    limit: int = attrs.field(default=-1, validator=_INT32)  # numberToReturn
    query: Mapping[str, Any] = attrs.field(hash=False)
    fields: Mapping[str, Any] | None = attrs.field(default=None, hash=False)

    def encode(self) -> bytes:
        if "\x00" in self.collection:
            raise LocalProtocolError("a collection name cannot contain NUL")
        body = (_I32.pack(self.flags) + self.collection.encode("utf-8") + b"\x00"
                + _QUERY_TAIL.pack(self.skip, self.limit) + bson.encode(self.query)
                + (b"" if self.fields is None else bson.encode(self.fields)))
        return _header(HEADER.size + len(body), self.request_id, self.response_to,
                       OP_QUERY) + body


@attrs.frozen(kw_only=True)
class OpReply:
    """The legacy OP_REPLY (1): the answer to an OP_QUERY."""

    request_id: int = attrs.field(default=0, validator=_INT32)
    response_to: int = attrs.field(default=0, validator=_INT32)
    flags: int = 0  # responseFlags: CursorNotFound 1, QueryFailure 2, AwaitCapable 8
    cursor_id: int = 0
    starting_from: int = 0
    documents: tuple[Mapping[str, Any], ...] = attrs.field(converter=tuple, hash=False)

    def encode(self) -> bytes:
        body = _REPLY_HEAD.pack(self.flags, self.cursor_id, self.starting_from,
                                len(self.documents)) + b"".join(
            bson.encode(doc) for doc in self.documents)
        return _header(HEADER.size + len(body), self.request_id, self.response_to,
                       OP_REPLY) + body


@attrs.frozen(kw_only=True)
class OpCompressed:
    """OP_COMPRESSED (2012): another message, compressed; see :func:`decompress`."""

    request_id: int = attrs.field(default=0, validator=_INT32)
    response_to: int = attrs.field(default=0, validator=_INT32)
    original_opcode: int
    uncompressed_size: int
    compressor_id: int
    payload: bytes = attrs.field(repr=lambda b: f"<{len(b)} bytes>")

    def encode(self) -> bytes:
        body = _COMPRESSED_HEAD.pack(self.original_opcode, self.uncompressed_size,
                                     self.compressor_id) + self.payload
        return _header(HEADER.size + len(body), self.request_id, self.response_to,
                       OP_COMPRESSED) + body


Message = Union[OpMsg, OpQuery, OpReply, OpCompressed]


# --- decoding -----------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class _Limits:
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    max_document_size: int = bson.DEFAULT_MAX_SIZE
    max_depth: int = bson.DEFAULT_MAX_DEPTH


def _cstring(body: bytes, pos: int, end: int, what: str) -> tuple[str, int]:
    stop = body.find(b"\x00", pos, end)
    if stop < 0:
        raise protocol_error(f"{what} is not NUL-terminated")
    try:
        return body[pos:stop].decode("utf-8"), stop + 1
    except UnicodeDecodeError:
        raise protocol_error(f"{what} is not valid UTF-8", bson.INVALID_BSON) from None


def split_op_msg(body: bytes, *, max_document_size: int = bson.DEFAULT_MAX_SIZE,
                 max_depth: int = bson.DEFAULT_MAX_DEPTH,
                 sequences: bool | Collection[str] = True,
                 fields: tuple[Collection[str], Collection[str]] | None = None,
                 ) -> tuple[int, dict[str, Any], list[tuple[str, list[Any], int]]]:
    """An OP_MSG body (after the header) as (flagBits, command body,
    [(identifier, documents, count)]); checks everything OpMsg does but the
    checksum. The documents of kind-1 sections are decoded if ``sequences``
    is True or names their identifier; others are walked by their lengths
    and not decoded (their list stays empty): what an auditor wants of a
    1,000-document insert, while it reads an update's filters. ``fields``
    (keep, count): the command body is read with
    :func:`~protocols.mongodb.bson.decode_fields`, only its first field and
    those in ``keep`` decoded, arrays in ``count`` counted."""
    if len(body) < 5:
        raise protocol_error("an OP_MSG is shorter than its flags and one section")
    (flags,) = _U32.unpack_from(body)
    unknown = flags & 0xFFFF & ~_KNOWN_REQUIRED
    if unknown:
        raise protocol_error(f"an OP_MSG sets required flag bits we do not know (0x{unknown:04x})",
                     ILLEGAL_OP_MSG_FLAG)
    end = len(body)
    if flags & CHECKSUM_PRESENT:
        end -= 4
        if end < 5:
            raise protocol_error("an OP_MSG with a checksum is too short to hold it")
    pos = 4
    command: dict[str, Any] | None = None
    found: list[tuple[str, list[Any], int]] = []
    while pos < end:
        kind = body[pos]
        pos += 1
        if kind == 0:
            if command is not None:
                raise protocol_error("an OP_MSG has two body (kind 0) sections")
            if fields is None:
                command, pos = bson.decode_at(body, pos, end, max_size=max_document_size,
                                              max_depth=max_depth)
            else:
                command, pos = bson.decode_fields(body, pos, end, keep=fields[0], count=fields[1],
                                                  max_size=max_document_size, max_depth=max_depth)
        elif kind == 1:
            if end - pos < 4:
                raise protocol_error("a document sequence is cut short")
            (size,) = _I32.unpack_from(body, pos)
            if size < 5 or size > end - pos:
                raise protocol_error(f"a document sequence's size {size} does not fit its message")
            stop = pos + size
            identifier, pos = _cstring(body, pos + 4, stop, "a sequence identifier")
            if not identifier:
                raise protocol_error("a document sequence has an empty identifier")
            documents: list[Any] = []
            count = 0
            wanted = sequences if isinstance(sequences, bool) else identifier in sequences
            while pos < stop:
                if wanted:
                    doc, pos = bson.decode_at(body, pos, stop, max_size=max_document_size,
                                              max_depth=max_depth)
                    documents.append(doc)
                else:
                    pos = _skip_document(body, pos, stop, max_document_size)
                count += 1
            found.append((identifier, documents, count))
        else:
            raise protocol_error(f"an OP_MSG section of unknown kind {kind}")
    if command is None:
        raise protocol_error("an OP_MSG has no body (kind 0) section")
    names = set(command)
    for identifier, _, _ in found:
        if identifier in names:
            raise protocol_error(f"the document sequence {identifier[:64]!r} appears twice, "
                                 f"or also "
                         f"as a body field")
        names.add(identifier)
    return flags, command, found


def _skip_document(body: bytes, pos: int, stop: int, max_size: int) -> int:
    """Past the document at ``pos`` by its length (checked, not decoded)."""
    if stop - pos < 5:
        raise protocol_error("a document is cut short", bson.INVALID_BSON)
    (size,) = _I32.unpack_from(body, pos)
    if not 5 <= size <= min(stop - pos, max_size) or body[pos + size - 1]:
        raise protocol_error(f"a document's length {size} does not fit its sequence",
                     bson.INVALID_BSON)
    return pos + size


def _op_msg(request_id: int, response_to: int, body: bytes, limits: _Limits,
            header: bytes | None) -> OpMsg:
    # The checksum first: bytes damaged in transit are reported as such,
    # not as whatever they happen to break.
    if len(body) >= 9 and body[0] & CHECKSUM_PRESENT and header is not None:
        (expected,) = _U32.unpack_from(body, len(body) - 4)
        if crc32c(memoryview(body)[:-4], crc32c(header)) != expected:
            raise protocol_error("an OP_MSG's CRC-32C checksum does not match its bytes",
                         CHECKSUM_MISMATCH)
    flags, command, found = split_op_msg(body, max_document_size=limits.max_document_size,
                                         max_depth=limits.max_depth)
    return OpMsg(request_id=request_id, response_to=response_to, body=command,
                 sequences=tuple(DocumentSequence(identifier=name, documents=docs)
                                 for name, docs, _ in found),
                 more_to_come=bool(flags & MORE_TO_COME),
                 exhaust_allowed=bool(flags & EXHAUST_ALLOWED),
                 checksum=bool(flags & CHECKSUM_PRESENT),
                 optional_flags=flags & 0xFFFE0000)


def _op_query(request_id: int, response_to: int, body: bytes, limits: _Limits) -> OpQuery:
    if len(body) < 4:
        raise protocol_error("an OP_QUERY is cut short")
    (flags,) = _I32.unpack_from(body)
    if flags & ~_QUERY_FLAGS:
        raise protocol_error(f"an OP_QUERY sets reserved flag bits (0x{flags & ~_QUERY_FLAGS:08x})")
    collection, pos = _cstring(body, 4, len(body), "an OP_QUERY's collection name")
    if len(body) - pos < _QUERY_TAIL.size:
        raise protocol_error("an OP_QUERY is cut short")
    skip, limit = _QUERY_TAIL.unpack_from(body, pos)
    query, pos = bson.decode_at(body, pos + _QUERY_TAIL.size, max_size=limits.max_document_size,
                                max_depth=limits.max_depth)
    fields = None
    if pos < len(body):
        fields, pos = bson.decode_at(body, pos, max_size=limits.max_document_size,
                                     max_depth=limits.max_depth)
    if pos != len(body):
        raise protocol_error(f"{len(body) - pos} bytes follow an OP_QUERY's documents")
    return OpQuery(request_id=request_id, response_to=response_to, flags=flags,
                   collection=collection, skip=skip, limit=limit, query=query, fields=fields)


def _op_reply(request_id: int, response_to: int, body: bytes, limits: _Limits) -> OpReply:
    if len(body) < _REPLY_HEAD.size:
        raise protocol_error("an OP_REPLY is cut short")
    flags, cursor_id, starting_from, count = _REPLY_HEAD.unpack_from(body)
    documents = []
    pos = _REPLY_HEAD.size
    while pos < len(body):
        doc, pos = bson.decode_at(body, pos, max_size=limits.max_document_size,
                                  max_depth=limits.max_depth)
        documents.append(doc)
    if count != len(documents):
        raise protocol_error(f"an OP_REPLY says {count} documents and holds {len(documents)}")
    return OpReply(request_id=request_id, response_to=response_to, flags=flags,
                   cursor_id=cursor_id, starting_from=starting_from, documents=documents)


def _op_compressed(request_id: int, response_to: int, body: bytes,
                   limits: _Limits) -> OpCompressed:
    if len(body) < _COMPRESSED_HEAD.size:
        raise protocol_error("an OP_COMPRESSED is cut short")
    original, size, compressor = _COMPRESSED_HEAD.unpack_from(body)
    if original == OP_COMPRESSED:
        raise protocol_error("an OP_COMPRESSED holds another OP_COMPRESSED")
    if not 0 <= size <= limits.max_message_size - HEADER.size:
        raise protocol_error(f"an OP_COMPRESSED's uncompressed size {size} is over the message cap")
    return OpCompressed(request_id=request_id, response_to=response_to,
                        original_opcode=original, uncompressed_size=size,
                        compressor_id=compressor, payload=body[_COMPRESSED_HEAD.size :])


_DECODERS: Final = {OP_QUERY: _op_query, OP_REPLY: _op_reply, OP_COMPRESSED: _op_compressed}


def _decode(op_code: int, request_id: int, response_to: int, body: bytes, limits: _Limits,
            header: bytes | None) -> Message:
    if op_code == OP_MSG:
        return _op_msg(request_id, response_to, body, limits, header)
    decoder = _DECODERS.get(op_code)
    if decoder is None:
        raise protocol_error(f"unsupported opCode {op_code} (this codec speaks OP_MSG, and "
                     f"OP_QUERY/OP_REPLY for a first hello)")
    return decoder(request_id, response_to, body, limits)  # type: ignore[operator]


def decode_message(data: bytes | bytearray | memoryview, *,
                   max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                   max_document_size: int = bson.DEFAULT_MAX_SIZE,
                   max_depth: int = bson.DEFAULT_MAX_DEPTH) -> Message:
    """Exactly one whole message, header included."""
    data = bytes(data)
    if len(data) < HEADER.size:
        raise protocol_error("a message is shorter than its header")
    length, request_id, response_to, op_code = HEADER.unpack_from(data)
    if length != len(data):
        raise protocol_error(f"a message's length {length} is not its {len(data)} bytes")
    if length > max_message_size:
        raise protocol_error(f"a message of {length} bytes exceeds the maximum of "
                             f"{max_message_size}")
    limits = _Limits(max_message_size=max_message_size, max_document_size=max_document_size,
                     max_depth=max_depth)
    return _decode(op_code, request_id, response_to, data[HEADER.size :], limits,
                   data[: HEADER.size])


def decompress(message: OpCompressed, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
               max_document_size: int = bson.DEFAULT_MAX_SIZE,
               max_depth: int = bson.DEFAULT_MAX_DEPTH) -> Message:
    """The message inside an OP_COMPRESSED (zlib or noop), with its request
    ids; UnsupportedCompressor for snappy, zstd or an unknown compressor."""
    size = message.uncompressed_size
    if not 0 <= size <= max_message_size - HEADER.size:
        raise protocol_error(f"an OP_COMPRESSED's uncompressed size {size} is over the message cap")
    if message.compressor_id == Compressor.NOOP:
        body = message.payload
    elif message.compressor_id == Compressor.ZLIB:
        inflater = zlib.decompressobj()
        try:
            body = inflater.decompress(message.payload, size)
        except zlib.error:
            raise protocol_error("an OP_COMPRESSED's zlib data is corrupt", ZLIB_ERROR) from None
        if inflater.unconsumed_tail or not inflater.eof or inflater.unused_data:
            raise protocol_error("an OP_COMPRESSED's zlib data does not inflate to exactly its "
                         "declared size", ZLIB_ERROR)
    else:
        raise UnsupportedCompressor(message.compressor_id)
    if len(body) != size:
        raise protocol_error(f"an OP_COMPRESSED inflates to {len(body)} bytes, not its "
                             f"declared {size}")
    header = _header(HEADER.size + size, message.request_id, message.response_to,
                     message.original_opcode)
    return decode_message(header + body, max_message_size=max_message_size,
                          max_document_size=max_document_size, max_depth=max_depth)


def compress(message: Message, compressor: Compressor = Compressor.ZLIB, *,
             level: int = -1) -> OpCompressed:
    """``message`` as an OP_COMPRESSED (zlib or noop)."""
    if isinstance(message, OpCompressed):
        raise LocalProtocolError("an OP_COMPRESSED cannot be compressed again")
    raw = message.encode()
    _, request_id, response_to, op_code = HEADER.unpack_from(raw)
    body = raw[HEADER.size :]
    if compressor == Compressor.ZLIB:
        payload = zlib.compress(body, level)
    elif compressor == Compressor.NOOP:
        payload = body
    else:
        raise LocalProtocolError(f"{compressor.name.lower()} compression is not supported")
    return OpCompressed(request_id=request_id, response_to=response_to, original_opcode=op_code,
                        uncompressed_size=len(body), compressor_id=int(compressor),
                        payload=payload)


# --- a stream of messages ----------------------------------------------------------------


class MessageReader(BufferedReceiver):
    """Messages from one direction of a connection, h11 style:
    ``receive_data(bytes)`` (``b""`` for EOF), then ``next_event()`` until
    NEED_DATA. After EOF, ConnectionClosed forever (``clean`` is False when
    the EOF cut a message). A malformed message raises RemoteProtocolError
    from next_event() and poisons the reader.

    ``verify_checksums=False`` leaves OP_MSG checksums to whoever the bytes
    are relayed to (the server checks its own): the pure-Python CRC-32C
    costs about 0.7 s per MB, which a gateway's event loop should not spend
    on a peer's say-so."""

    def __init__(self, *, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
                 max_document_size: int = bson.DEFAULT_MAX_SIZE,
                 max_depth: int = bson.DEFAULT_MAX_DEPTH, verify_checksums: bool = True) -> None:
        self._verify = verify_checksums
        self._limits = _Limits(max_message_size=max_message_size,
                               max_document_size=max_document_size, max_depth=max_depth)
        self._splitter = FrameSplitter(MONGODB_MESSAGE, max_length=max_message_size)
        # Room for one whole message and the start of the next.
        self._buffer = ReceiveBuffer(max_message_size + 64 * 1024)
        self._eof = False
        self._error: RemoteProtocolError | None = None

    def _overflowed(self, exc: RemoteProtocolError) -> None:
        self._error = protocol_error(f"the peer sent more than one message's worth of bytes "
                             f"ahead ({exc.message})")

    def next_event(self) -> Message | ConnectionClosed | Literal[Signal.NEED_DATA]:
        if self._error is not None:
            err = self._error
            raise RemoteProtocolError(err.message, code=err.code, wire_hint=err.wire_hint)
        try:
            head = self._buffer.peek(HEADER.size)
            frame = self._splitter.read_frame(self._buffer)
            if frame is None:
                if self._eof:
                    return ConnectionClosed(clean=not self._buffer)
                return NEED_DATA
            assert head is not None  # a whole frame has a whole header
            _, request_id, response_to, op_code = HEADER.unpack(head)
            return _decode(op_code, request_id, response_to, frame.body, self._limits,
                           head if self._verify else None)
        except RemoteProtocolError as exc:
            self._error = exc
            raise

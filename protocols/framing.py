"""Length-prefixed frames: one bounded splitter, the header layout a parameter.

Every binary protocol Wicket reads frames its messages the same way: a fixed
header holding the length of what follows (and usually a type), then a body.
Only the layout differs::

    PostgreSQL   type:u8  length:u32be                 length counts itself
    (startup)    length:u32be                           length counts itself
    dial         length:u32be version:u8 type:u8        length counts what follows it
    mux          type:u8 stream:u32be length:u32be      length counts the payload
    MySQL        length:u24le sequence_id:u8            length counts the payload
    MongoDB      messageLength:i32le requestID:i32le responseTo:i32le opCode:i32le
                                                        length counts the whole message

so a :class:`FrameLayout` names the header (a :mod:`struct` format), which
field is the length (a three-byte ``3s`` field is read as an integer in the
header's byte order: MySQL), which field is the frame's kind, and how many
bytes of a frame its length does not count.

Theory of operation
-------------------
A :class:`FrameSplitter` applies a layout with a cap (``max_length``, on the
length field, as each protocol states its own limit) and is fed one of two
ways:

* :meth:`~FrameSplitter.read_frame` takes one whole frame out of a
  :class:`~protocols.buffer.ReceiveBuffer` the caller owns, or None while it
  is incomplete. For the short framed phases (a dial, a startup packet, an
  upstream login), after which whatever is left in the buffer belongs to the
  next phase. The length is checked as soon as the length field is in: a peer
  announcing a frame over the cap hears so at once, without our waiting for
  bytes that would never fit.
* :meth:`~FrameSplitter.feed` takes a relayed stream in whatever chunks it
  arrives, keeps none of them, and yields a :class:`Frame` per message it is
  asked for. At each header it asks ``keep(kind, body_length)`` how many body
  bytes the caller wants: None skips the message by its length (no copy, no
  object: the per-message cost of a message nobody audits is one header
  unpack and that call), a number keeps that much of the body (whole, or a
  prefix, then the rest is counted down as it streams past). Memory is the
  largest ``keep`` answer plus one header, whatever the peer sends. A caller
  that needs more of a frame it kept only a prefix of (a statement's tail
  and digest) calls :meth:`~FrameSplitter.follow` when the frame comes out:
  the rest of its body is then handed over as it streams past, still
  uncopied, and a callback says when it has all gone by.

A length below the layout's minimum or over the cap is a
:class:`~protocols.errors.RemoteProtocolError` carrying the layout's wire
hint (SQLSTATE 08P01 for PostgreSQL, error 1153 for MySQL, code 17 for
MongoDB); the splitter is then unusable, as is the connection.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable, Iterator
from typing import Final, NamedTuple

import attrs

from protocols.buffer import ReceiveBuffer
from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = [
    "FrameLayout", "Frame", "FrameSplitter", "KeepPolicy",
    "POSTGRES_MESSAGE", "POSTGRES_STARTUP", "DIAL_FRAME", "MUX_FRAME", "MYSQL_PACKET",
    "MONGODB_MESSAGE",
]

_FIELD = re.compile(r"(\d*)([xcbB?hHiIlLqQnNefdsp])")


@attrs.frozen(kw_only=True)
class FrameLayout:
    """Where a protocol's frame header keeps the length, and what it counts."""

    #: What a frame is called in error messages ("dial frame").
    name: str
    #: The fixed header; ``header.unpack`` gives its fields.
    header: struct.Struct = attrs.field(converter=lambda f: f if isinstance(f, struct.Struct)
                                        else struct.Struct(f))
    #: Which field is the length.
    length_field: int
    #: Bytes of a frame its length does not count: frame size = length + uncounted.
    uncounted: int
    #: Which field names the frame's kind (its type, opcode...), or None.
    kind_field: int | None = None
    #: The smallest valid length; by default the one that leaves an empty body.
    min_length: int = attrs.field()
    #: The protocol's own ceiling on the length field.
    max_length: int
    #: How the protocol says "malformed frame" natively (a SQLSTATE, an error number).
    wire_hint: str | int | None = None
    #: ... and "frame too large", if it says that differently.
    too_large_hint: str | int | None = attrs.field()
    #: Derived: where the length field ends (enough bytes to judge a frame).
    length_end: int = attrs.field(init=False)
    #: Derived: the length field's own struct, or None for a three-byte one.
    _length: struct.Struct | None = attrs.field(init=False, repr=False)
    #: Derived: the header's byte order, as ``int.from_bytes`` names it.
    byteorder: str = attrs.field(init=False, repr=False)
    #: Derived: where the length field starts (read on every frame: worked
    #: out once, not from the format each time).
    _length_start: int = attrs.field(init=False, repr=False)

    @min_length.default
    def _empty_body(self) -> int:
        return self.header.size - self.uncounted

    @too_large_hint.default
    def _same_hint(self) -> str | int | None:
        return self.wire_hint

    @length_end.default
    def _length_end(self) -> int:
        return self._field_span(self.length_field)[1]

    @_length.default
    def _length_struct(self) -> struct.Struct | None:
        start, _ = self._field_span(self.length_field)
        code = self._codes()[self.length_field]
        if code.endswith("s"):
            return None  # read with int.from_bytes (MySQL's three bytes)
        return struct.Struct(f"{self._order()}{start}x{code}")

    @byteorder.default
    def _byteorder(self) -> str:
        return "little" if self._order() == "<" else "big"

    @_length_start.default
    def _start(self) -> int:
        return self._field_span(self.length_field)[0]

    def __attrs_post_init__(self) -> None:
        if self.header.format[:1] not in ("<", ">", "!"):
            raise ValueError(f"{self.name}: the header format must name its byte order")
        if not 0 <= self.min_length <= self.max_length:
            raise ValueError(f"{self.name}: min_length must be 0..max_length")
        if self.min_length + self.uncounted < self.header.size:
            raise ValueError(f"{self.name}: a frame of min_length would end inside its header")

    def length_of(self, head: bytes) -> int:
        """The length field of a header that starts ``head`` (at least
        ``length_end`` bytes)."""
        if self._length is not None:
            return int(self._length.unpack_from(head)[0])
        return int.from_bytes(head[self._length_start:self.length_end], self.byteorder)

    def frame_size(self, length: int, max_length: int) -> int:
        """The size of the whole frame whose length field says ``length``;
        RemoteProtocolError if that is below the minimum or over ``max_length``."""
        if length < self.min_length:
            raise self.error(f"{self.name} length {length} is below the minimum of "
                             f"{self.min_length}")
        if length > max_length:
            raise self.error(f"{self.name} length {length} exceeds the maximum {max_length}",
                             hint=self.too_large_hint)
        return length + self.uncounted

    def error(self, message: str, *, hint: str | int | None = None) -> RemoteProtocolError:
        """A framing error in this protocol's own terms."""
        return RemoteProtocolError(message, code=ErrorCode.BAD_REQUEST,
                                   wire_hint=self.wire_hint if hint is None else hint)

    # -- reading the struct format ----------------------------------------

    def _order(self) -> str:
        return self.header.format[:1]

    def _codes(self) -> list[str]:
        """One struct code per field (pad bytes, which make none, left out)."""
        return [count + code for count, code in _FIELD.findall(self.header.format)
                if code != "x"]

    def _field_span(self, index: int) -> tuple[int, int]:
        """Byte offsets of field ``index`` within the header."""
        order, offset, fields = self._order(), 0, -1
        for count, code in _FIELD.findall(self.header.format):
            size = struct.calcsize(f"{order}{count}{code}")
            if code != "x":
                fields += 1
                if fields == index:
                    return offset, offset + size
            offset += size
        raise ValueError(f"{self.name}: the header has no field {index}")


class Frame(NamedTuple):
    """One frame from :meth:`FrameSplitter.feed`.

    ``body`` is the whole body when ``complete``, else only its first bytes
    (as many as ``keep`` asked for): the rest was skipped.
    """

    kind: object  # the layout's kind field (PostgreSQL: the type byte), or None
    body_length: int  # the body's full length
    body: bytes

    @property
    def complete(self) -> bool:
        return len(self.body) == self.body_length

    @property
    def type_code(self) -> object:
        """PostgreSQL's name for :attr:`kind`."""
        return self.kind


#: keep(kind, body_length) -> body bytes to keep (clamped to 0..body_length),
#: or None to skip the frame unseen.
KeepPolicy = Callable[[object, int], "int | None"]


def _keep_all(_kind: object, body_length: int) -> int:
    return body_length


class FrameSplitter:
    """Frames of one layout, at most ``max_length`` long; see the module doc."""

    __slots__ = ("layout", "max_length", "_keep", "_header", "_kind", "_length", "_kept",
                 "_want", "_skip", "_sink", "_sink_end", "frames", "_plan")

    def __init__(self, layout: FrameLayout, *, keep: KeepPolicy | None = None,
                 max_length: int | None = None, only: frozenset | None = None) -> None:
        """``only``: the kinds ``keep`` is asked about; a frame of any other
        kind is skipped unseen without asking (a server's rows, say: one
        call fewer per message). None: ``keep`` is asked about every frame."""
        if max_length is None:
            max_length = layout.max_length
        if not layout.min_length <= max_length <= layout.max_length:
            raise ValueError(f"max_length must be {layout.min_length}..{layout.max_length} "
                             f"for a {layout.name}")
        self.layout = layout
        self.max_length = max_length
        self._keep = _keep_all if keep is None else keep
        self._header = bytearray()  # a header split between chunks
        self._kind: object = None
        self._length = 0  # the body length of the frame being kept
        self._kept = bytearray()
        self._want = 0  # body bytes still to keep
        self._skip = 0  # body bytes still to drop
        self._sink: Callable[[bytes | memoryview], None] | None = None  # see follow()
        self._sink_end: Callable[[], None] | None = None
        #: Frames whose header has been read (skipped ones included).
        self.frames = 0
        # What feed() reads of the layout, in one tuple: feed runs once per
        # chunk a relay forwards, so its set-up is a per-message cost.
        self._plan = (layout.header.unpack_from, layout.header.size, layout.length_field,
                      layout.kind_field, layout.min_length, max_length,
                      layout.uncounted - layout.header.size, layout.byteorder, self._keep, only)

    # -- a whole frame out of a buffer -----------------------------------------

    def read_frame(self, buffer: ReceiveBuffer) -> Frame | None:
        """The next whole frame in ``buffer`` (consumed and committed), or None
        while it is incomplete. Raises RemoteProtocolError for a bad length,
        as soon as the length field is in."""
        layout = self.layout
        head = buffer.peek(layout.length_end)
        if head is None:
            return None
        size = layout.frame_size(layout.length_of(head), self.max_length)
        raw = buffer.consume_exactly(size)
        if raw is None:
            return None
        buffer.commit()
        self.frames += 1
        start = layout.header.size
        kind = None if layout.kind_field is None else layout.header.unpack_from(raw)[
            layout.kind_field]
        return Frame(kind, size - start, raw[start:])

    # -- a stream, in chunks it does not keep ------------------------------------

    @property
    def at_boundary(self) -> bool:
        """True between frames (nothing of a frame is pending)."""
        return not (self._header or self._want or self._skip)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Frame]:
        """Consume ``data``, yielding each frame ``keep`` asked for as soon as
        its kept bytes are in (a frame keeping nothing comes out right after
        its header). Raises RemoteProtocolError for a bad length; the splitter
        is then unusable. Consume the iterator fully: bytes are only taken as
        it advances."""
        if type(data) is not bytes:
            data = memoryview(data).cast("B")
        # byteorder: for a three-byte length field (MySQL's).
        unpack, header_size, length_field, kind_field, lowest, highest, to_body, byteorder, keep_of, only = \
            self._plan
        pos, end = 0, len(data)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                if self._sink is not None:
                    self._sink(data[pos : pos + step])
                    if not self._skip:
                        self._followed()
                pos += step
                continue
            if self._want:
                step = min(self._want, end - pos)
                self._kept += data[pos : pos + step]
                self._want -= step
                pos += step
                if not self._want:
                    yield self._emit(bytes(self._kept))
                continue
            if not self._header and end - pos >= header_size:
                fields = unpack(data, pos)
                pos += header_size
            else:
                step = min(header_size - len(self._header), end - pos)
                self._header += data[pos : pos + step]
                pos += step
                if len(self._header) < header_size:
                    break
                fields = unpack(self._header)
                self._header.clear()
            length = fields[length_field]
            if type(length) is bytes:
                length = int.from_bytes(length, byteorder)
            if not lowest <= length <= highest:
                self.layout.frame_size(length, highest)  # raises, saying which bound
            self.frames += 1
            body = length + to_body
            kind = None if kind_field is None else fields[kind_field]
            keep = keep_of(kind, body) if only is None or kind in only else None
            if keep is None:  # skipped unseen, by its length
                if end - pos >= body:
                    pos += body
                else:
                    self._skip = body - (end - pos)
                    pos = end
            elif keep >= body and end - pos >= body:
                # The common case: a small message wholly inside this chunk.
                out = data[pos : pos + body]
                pos += body
                yield Frame(kind, body, out if type(out) is bytes else bytes(out))
            else:
                self._kind, self._length = kind, body
                keep = min(max(keep, 0), body)
                if keep == 0:
                    yield self._emit(b"")
                else:
                    self._kept = bytearray()
                    self._want = keep

    def follow(self, sink: Callable[[bytes | memoryview], None], end: Callable[[], None]) -> None:
        """Hand the rest of the frame :meth:`feed` has just yielded
        incomplete to ``sink``, chunk by chunk as it streams past (views of
        the caller's data: copy what you keep), then call ``end``. Call it
        before the iterator advances. EOF before the frame's end calls
        neither: the caller knows it reached EOF."""
        if not self._skip or self._sink is not None:
            raise LocalProtocolError("follow() is only for an incomplete frame feed() has just yielded")
        self._sink, self._sink_end = sink, end

    def _followed(self) -> None:
        end = self._sink_end
        self._sink = self._sink_end = None
        end()  # type: ignore[misc]

    def _emit(self, kept: bytes) -> Frame:
        self._kept = bytearray()
        self._skip = self._length - len(kept)
        return Frame(self._kind, self._length, kept)


# --- the layouts ---------------------------------------------------------------

#: PostgreSQL, after the startup packet (spec: "Message Formats"): the server
#: refuses lengths of 1 GiB or more.
POSTGRES_MESSAGE: Final = FrameLayout(
    name="PostgreSQL message", header=">cI", kind_field=0, length_field=1, uncounted=1,
    max_length=(1 << 30) - 1, wire_hint="08P01")
#: PostgreSQL's untyped first packet (StartupMessage, SSLRequest, ...): at
#: least a length and a code, at most the server's MAX_STARTUP_PACKET_LENGTH.
POSTGRES_STARTUP: Final = FrameLayout(
    name="PostgreSQL startup packet", header=">I", length_field=0, uncounted=0, min_length=8,
    max_length=10000, wire_hint="08P01")
#: The dial frame (docs/wire.md): the version and type are counted.
DIAL_FRAME: Final = FrameLayout(
    name="dial frame", header=">IBB", length_field=0, kind_field=2, uncounted=4,
    max_length=65536)
#: A mux frame (docs/wire.md); its per-type caps are the codec's business.
MUX_FRAME: Final = FrameLayout(
    name="mux frame", header=">BII", kind_field=0, length_field=2, uncounted=9,
    max_length=2**32 - 1)
#: A MySQL packet (Client/Server Protocol, "MySQL Packets"): the kind is the
#: sequence id. A payload of 2^24-1 bytes is continued by the next packet;
#: over the cap the server says ER_NET_PACKET_TOO_LARGE (1153, 08S01).
MYSQL_PACKET: Final = FrameLayout(
    name="MySQL packet", header="<3sB", length_field=0, kind_field=1, uncounted=4,
    max_length=2**24 - 1, wire_hint=1153)
#: A MongoDB wire message (MongoDB Wire Protocol, "Standard Message Header"):
#: the kind is the opCode; servers take at most 48,000,000 bytes
#: (maxMessageSizeBytes) and call a bad length ProtocolError (17).
MONGODB_MESSAGE: Final = FrameLayout(
    name="MongoDB message", header="<iiii", length_field=0, kind_field=3, uncounted=0,
    max_length=48_000_000, wire_hint=17)

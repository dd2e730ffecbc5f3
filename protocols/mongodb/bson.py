"""BSON, every type of the spec, strictly: bytes to plain Python values and back.

Spec: bsonspec.org "BSON Specification Version 1.1"; the decode rules and
test data of mongodb/specifications ``source/bson-corpus/bson-corpus.md``;
Decimal128's string form from ``source/bson-decimal128/decimal128.md``
(IEEE 754-2008 decimal128, BID encoding, "to-scientific-string").

Theory of operation
-------------------
A document decodes to a ``dict`` (key order kept), an array to a ``list``,
and each value to the plainest Python value that round-trips:

==============  ==========================  ==============  =======================
BSON            Python                      BSON            Python
==============  ==========================  ==============  =======================
double          float                       regex           :class:`Regex`
string          str                         DBPointer       :class:`DBPointer`
document        dict                        JavaScript      :class:`Code`
array           list                        symbol          :class:`Symbol`
binary 0x00     bytes                       code w/ scope   :class:`CodeWithScope`
binary other    :class:`Binary`             int32           int
undefined       :data:`UNDEFINED`           timestamp       :class:`Timestamp`
ObjectId        :class:`ObjectId`           int64           :class:`Int64` (an int)
bool            bool                        decimal128      :class:`Decimal128`
datetime        :class:`DateTime`           min/max key     :data:`MIN_KEY`/:data:`MAX_KEY`
null            None
==============  ==========================  ==============  =======================

so ``encode(decode(b)) == b`` for every canonical document (the corpus
checks this for each of its ``canonical_bson`` cases). A plain ``int``
encodes as int32 when it fits and int64 otherwise; ``Int64`` always as int64.

Decoding is strict, because what we decode decides what a user may do (a
command's ``$db``): every length must agree with the bytes it covers and
with its enclosing document; strings and keys are NUL-terminated, valid
UTF-8; booleans are 0 or 1; a document's keys are unique (two ``$db`` would
let a client show the auditor one database and the server another); no byte
may follow the top-level document. Anything else is a
:class:`~protocols.errors.RemoteProtocolError` with MongoDB's InvalidBSON
(22) as the wire hint. Nesting is bounded (``max_depth``, as the server
bounds it) and so is a document's declared size (``max_size``), so a hostile
peer can cost neither the stack nor memory beyond the bytes it sent.

:func:`decode_fields` reads a document's top level as strictly (its
lengths, keys unique and UTF-8) but decodes only the values asked for: the
others are walked by their lengths (checked to fit and to end as their
type ends) and stand as :data:`SKIPPED`, and an array asked to be counted
becomes its length. The command gate reads every relayed command so: what
it decides on is decoded, strictly, and what the server alone reads
(``$readPreference``, ``$clusterTime``, an insert's documents) costs no
Python objects; the server checks those itself.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Container, Iterator, Mapping
from typing import Any, Final

from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.mongodb.bson_types import (
    MAX_KEY, MIN_KEY, UNDEFINED, Binary, Code, CodeWithScope, Constant, DateTime, DBPointer,
    Decimal128, Int64, ObjectId, Regex, Symbol, Timestamp, is_int32, is_int64, type_name,
)

__all__ = [
    "DEFAULT_MAX_SIZE", "DEFAULT_MAX_DEPTH", "INVALID_BSON",
    "Int64", "Binary", "ObjectId", "DateTime", "Regex", "DBPointer", "Code", "Symbol",
    "CodeWithScope", "Timestamp", "Decimal128", "Constant", "UNDEFINED", "MIN_KEY", "MAX_KEY",
    "decode", "decode_at", "decode_fields", "encode", "type_name", "elements", "decode_element", "SKIPPED",
]

#: The server's maxBSONObjectSize (16 MiB) plus its 16 KiB allowance for a
#: command wrapped around a document of that size.
DEFAULT_MAX_SIZE: Final = 16 * 1024 * 1024 + 16 * 1024
#: The server's own bound on nesting (BSONDepth's default maximum).
DEFAULT_MAX_DEPTH: Final = 200
#: MongoDB's error code for malformed BSON.
INVALID_BSON: Final = 22

_I32 = struct.Struct("<i")
_I32_FROM = _I32.unpack_from
_I64 = struct.Struct("<q")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")


def _invalid(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"invalid BSON: {message}", code=ErrorCode.BAD_REQUEST,
                               wire_hint=INVALID_BSON)


# --- decoding -----------------------------------------------------------------------


class _Decoder:
    """One decode: the bytes and the nesting bound. Each reader takes the
    value's start and the end it must fit in, and returns (value, next)."""

    __slots__ = ("data", "max_depth")

    def __init__(self, data: bytes, max_depth: int) -> None:
        self.data = data
        self.max_depth = max_depth

    def document(self, pos: int, limit: int, depth: int, array: bool = False,
                 keep: Container[str] | None = None, count: Container[str] = ()) -> tuple[Any, int]:
        """``keep`` (a document, not an array): only the first field and
        those named are decoded, arrays under ``count`` counted, the rest
        walked by their lengths (:func:`decode_fields`)."""
        if depth > self.max_depth:
            raise _invalid(f"nested deeper than {self.max_depth} levels")
        data = self.data
        if limit - pos < 5:
            raise _invalid("a document is cut short")
        (length,) = _I32.unpack_from(data, pos)
        if length < 5:
            raise _invalid(f"a document's length {length} is below 5")
        if length > limit - pos:
            raise _invalid(f"a document's length {length} exceeds the {limit - pos} "
                           f"bytes it may take")
        end = pos + length
        if data[end - 1]:
            raise _invalid("a document does not end with NUL")
        body_end = end - 1
        items: list[Any] = []
        fields: dict[str, Any] = {}
        pos += 4
        readers = _READERS
        find = data.find
        while pos < body_end:
            kind = data[pos]
            key_end = find(b"\x00", pos + 1, body_end)
            if kind == 0:
                raise _invalid("a document ends before its length says")
            if key_end < 0:
                raise _invalid("a key is not NUL-terminated inside its document")
            try:
                key = data[pos + 1 : key_end].decode("utf-8")
            except UnicodeDecodeError:
                raise _invalid("a key is not valid UTF-8") from None
            pos = key_end + 1
            if keep is not None and fields and key not in keep:
                if key in fields:
                    raise _invalid(f"the key {key[:64]!r} appears twice in one document")
                if kind == 0x04 and key in count:
                    fields[key], pos = _count(data, pos, body_end)
                    continue
                size = _FIXED.get(kind)
                if size is not None and pos + size <= body_end:
                    pos += size
                else:
                    pos = _skip(data, kind, pos, body_end)
                fields[key] = SKIPPED
                continue
            # The commonest values read here, without a call (a command is
            # read per message relayed): each as its reader below reads it.
            if kind == 0x02:
                if body_end - pos < 4:
                    raise _invalid("a string's length is cut short")
                (length,) = _I32_FROM(data, pos)
                if length < 1 or length > body_end - pos - 4:
                    raise _invalid(f"a string's length {length} does not fit its document")
                value_end = pos + 4 + length
                if data[value_end - 1]:
                    raise _invalid("a string is not NUL-terminated")
                try:
                    value = data[pos + 4 : value_end - 1].decode("utf-8")
                except UnicodeDecodeError:
                    raise _invalid("a string is not valid UTF-8") from None
                pos = value_end
            elif kind == 0x10:
                if body_end - pos < 4:
                    raise _invalid("an int32 is cut short")
                (value,) = _I32_FROM(data, pos)
                pos += 4
            else:
                reader = readers.get(kind)
                if reader is None:
                    raise _invalid(f"unknown element type 0x{kind:02x}")
                value, pos = reader(self, pos, body_end, depth)
            if array:
                items.append(value)
            else:
                if key in fields:
                    raise _invalid(f"the key {key[:64]!r} appears twice in one document")
                fields[key] = value
        return (items if array else fields), end

    def _fixed(self, pos: int, limit: int, size: int, what: str) -> int:
        if limit - pos < size:
            raise _invalid(f"{what} is cut short")
        return pos + size

    def double(self, pos: int, limit: int, _depth: int) -> tuple[float, int]:
        end = self._fixed(pos, limit, 8, "a double")
        return _F64.unpack_from(self.data, pos)[0], end

    def string(self, pos: int, limit: int, _depth: int = 0, what: str = "a string"
               ) -> tuple[str, int]:
        data = self.data
        self._fixed(pos, limit, 4, f"{what}'s length")
        (length,) = _I32.unpack_from(data, pos)
        if length < 1 or length > limit - pos - 4:
            raise _invalid(f"{what}'s length {length} does not fit its document")
        end = pos + 4 + length
        if data[end - 1]:
            raise _invalid(f"{what} is not NUL-terminated")
        return _utf8(data[pos + 4 : end - 1], what), end

    def cstring(self, pos: int, limit: int, what: str) -> tuple[str, int]:
        end = self.data.find(b"\x00", pos, limit)
        if end < 0:
            raise _invalid(f"{what} is not NUL-terminated")
        return _utf8(self.data[pos:end], what), end + 1

    def embedded(self, pos: int, limit: int, depth: int) -> tuple[Any, int]:
        return self.document(pos, limit, depth + 1)

    def array(self, pos: int, limit: int, depth: int) -> tuple[Any, int]:
        # Array keys ("0", "1", ...) are not checked: the corpus calls
        # arrays with wrong keys degenerate, not invalid.
        return self.document(pos, limit, depth + 1, array=True)

    def binary(self, pos: int, limit: int, _depth: int) -> tuple[bytes | Binary, int]:
        data = self.data
        self._fixed(pos, limit, 5, "a binary's header")
        (length,) = _I32.unpack_from(data, pos)
        subtype = data[pos + 4]
        if length < 0 or length > limit - pos - 5:
            raise _invalid(f"a binary's length {length} does not fit its document")
        start, end = pos + 5, pos + 5 + length
        if subtype == 0:
            return data[start:end], end
        if subtype == 2:  # the old binary: a second length inside
            if length < 4 or _I32.unpack_from(data, start)[0] != length - 4:
                raise _invalid("an old binary (subtype 2)'s inner length disagrees")
            start += 4
        return _binary(subtype, data[start:end]), end

    def undefined(self, pos: int, _limit: int, _depth: int) -> tuple[Constant, int]:
        return UNDEFINED, pos

    def object_id(self, pos: int, limit: int, _depth: int) -> tuple[ObjectId, int]:
        end = self._fixed(pos, limit, 12, "an ObjectId")
        return ObjectId(self.data[pos:end]), end

    def boolean(self, pos: int, limit: int, _depth: int) -> tuple[bool, int]:
        end = self._fixed(pos, limit, 1, "a boolean")
        byte = self.data[pos]
        if byte > 1:
            raise _invalid(f"a boolean is {byte}, not 0 or 1")
        return byte == 1, end

    def datetime(self, pos: int, limit: int, _depth: int) -> tuple[DateTime, int]:
        end = self._fixed(pos, limit, 8, "a datetime")
        return DateTime(_I64.unpack_from(self.data, pos)[0]), end

    def null(self, pos: int, _limit: int, _depth: int) -> tuple[None, int]:
        return None, pos

    def regex(self, pos: int, limit: int, _depth: int) -> tuple[Regex, int]:
        pattern, pos = self.cstring(pos, limit, "a regex pattern")
        flags, pos = self.cstring(pos, limit, "a regex's options")
        return Regex(pattern, flags), pos

    def db_pointer(self, pos: int, limit: int, _depth: int) -> tuple[DBPointer, int]:
        namespace, pos = self.string(pos, limit, what="a DBPointer's namespace")
        oid, pos = self.object_id(pos, limit, 0)
        return DBPointer(namespace, oid), pos

    def code(self, pos: int, limit: int, _depth: int) -> tuple[Code, int]:
        text, pos = self.string(pos, limit, what="JavaScript code")
        return Code(text), pos

    def symbol(self, pos: int, limit: int, _depth: int) -> tuple[Symbol, int]:
        text, pos = self.string(pos, limit, what="a symbol")
        return Symbol(text), pos

    def code_with_scope(self, pos: int, limit: int, depth: int) -> tuple[CodeWithScope, int]:
        data = self.data
        self._fixed(pos, limit, 4, "code with scope")
        (length,) = _I32.unpack_from(data, pos)
        # The smallest: its length, an empty string (5) and an empty scope (5).
        if length < 14 or length > limit - pos:
            raise _invalid(f"code with scope's length {length} does not fit its document")
        end = pos + length
        text, inner = self.string(pos + 4, end, what="code with scope's code")
        scope, inner = self.document(inner, end, depth + 1)
        if inner != end:
            raise _invalid("code with scope's length disagrees with its parts")
        return CodeWithScope(text, scope), end

    def int32(self, pos: int, limit: int, _depth: int) -> tuple[int, int]:
        end = self._fixed(pos, limit, 4, "an int32")
        return _I32.unpack_from(self.data, pos)[0], end

    def timestamp(self, pos: int, limit: int, _depth: int) -> tuple[Timestamp, int]:
        end = self._fixed(pos, limit, 8, "a timestamp")
        (both,) = _U64.unpack_from(self.data, pos)
        return Timestamp(both >> 32, both & 0xFFFFFFFF), end

    def int64(self, pos: int, limit: int, _depth: int) -> tuple[Int64, int]:
        end = self._fixed(pos, limit, 8, "an int64")
        return Int64(_I64.unpack_from(self.data, pos)[0]), end

    def decimal128(self, pos: int, limit: int, _depth: int) -> tuple[Decimal128, int]:
        end = self._fixed(pos, limit, 16, "a decimal128")
        return Decimal128(self.data[pos:end]), end

    def min_key(self, pos: int, _limit: int, _depth: int) -> tuple[Constant, int]:
        return MIN_KEY, pos

    def max_key(self, pos: int, _limit: int, _depth: int) -> tuple[Constant, int]:
        return MAX_KEY, pos


def _binary(subtype: int, data: bytes) -> Binary:
    """A :class:`Binary` of parts the decoder already checked (a byte, bytes),
    made without its validators: every command's ``lsid`` is one."""
    value = object.__new__(Binary)
    object.__setattr__(value, "subtype", subtype)
    object.__setattr__(value, "data", data)
    return value


def _utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _invalid(f"{what} is not valid UTF-8") from None


_Reader = Callable[[_Decoder, int, int, int], tuple[Any, int]]
_READERS: Final[dict[int, _Reader]] = {
    0x01: _Decoder.double, 0x02: _Decoder.string, 0x03: _Decoder.embedded,
    0x04: _Decoder.array, 0x05: _Decoder.binary, 0x06: _Decoder.undefined,
    0x07: _Decoder.object_id, 0x08: _Decoder.boolean, 0x09: _Decoder.datetime,
    0x0A: _Decoder.null, 0x0B: _Decoder.regex, 0x0C: _Decoder.db_pointer,
    0x0D: _Decoder.code, 0x0E: _Decoder.symbol, 0x0F: _Decoder.code_with_scope,
    0x10: _Decoder.int32, 0x11: _Decoder.timestamp, 0x12: _Decoder.int64,
    0x13: _Decoder.decimal128, 0xFF: _Decoder.min_key, 0x7F: _Decoder.max_key,
}


def decode_at(data: bytes, pos: int = 0, end: int | None = None, *,
              max_size: int = DEFAULT_MAX_SIZE,
              max_depth: int = DEFAULT_MAX_DEPTH) -> tuple[dict[str, Any], int]:
    """The document at ``data[pos:]`` (which must end by ``end``) and where
    it ends: for documents that follow one another (OP_MSG sequences)."""
    if end is None:
        end = len(data)
    limit = min(end, pos + max_size)
    if end - pos >= 4 and _I32.unpack_from(data, pos)[0] > max_size:
        raise _invalid(f"a document of {_I32.unpack_from(data, pos)[0]} bytes exceeds the "
                       f"maximum of {max_size}")
    doc, after = _Decoder(data, max_depth).document(pos, limit, 0)
    return doc, after


def decode(data: bytes | bytearray | memoryview, *, max_size: int = DEFAULT_MAX_SIZE,
           max_depth: int = DEFAULT_MAX_DEPTH) -> dict[str, Any]:
    """The one document ``data`` holds; RemoteProtocolError (InvalidBSON) if
    it is malformed, too large, too deep, or followed by anything."""
    data = bytes(data)
    doc, end = decode_at(data, 0, max_size=max_size, max_depth=max_depth)
    if end != len(data):
        raise _invalid(f"{len(data) - end} bytes follow the document")
    return doc


# --- a document's top level, without decoding it ------------------------------------

_FIXED: Final = {0x01: 8, 0x06: 0, 0x07: 12, 0x08: 1, 0x09: 8, 0x0A: 0, 0x10: 4, 0x11: 8,
                 0x12: 8, 0x13: 16, 0xFF: 0, 0x7F: 0}
_COUNTED: Final = {0x02: 4, 0x0D: 4, 0x0E: 4, 0x0C: 16, 0x05: 5, 0x03: 0, 0x04: 0, 0x0F: 0}


class _Skipped:
    __slots__ = ()

    def __repr__(self) -> str:
        return "SKIPPED"


#: A value :func:`decode_fields` walked past without decoding.
SKIPPED: Final = _Skipped()
_ENDS_WITH_NUL: Final = frozenset({0x02, 0x03, 0x04, 0x0D, 0x0E})  # string-like and documents


def _skip(data: bytes, kind: int, pos: int, limit: int) -> int:
    """Past the value of type ``kind`` at ``pos`` by its length: it must fit
    ``limit``, a string or document be at least its empty self and end with
    NUL. Nothing inside is checked."""
    end = _value_end(data, kind, pos, limit)
    if end is None:
        raise _invalid("a value's length exceeds its document")
    if kind in _ENDS_WITH_NUL:
        smallest = 5 if kind in (0x03, 0x04) else 1
        if _I32_FROM(data, pos)[0] < smallest or data[end - 1]:
            raise _invalid("a value's length disagrees with its bytes")
    return end


def _count(data: bytes, pos: int, limit: int) -> tuple[int, int]:
    """The number of elements of the array at ``pos``, and its end."""
    end = _skip(data, 0x04, pos, limit)
    n, pos, body_end = 0, pos + 4, end - 1
    while pos < body_end:
        kind = data[pos]
        key_end = data.find(b"\x00", pos + 1, body_end)
        if kind == 0 or key_end < 0:
            raise _invalid("an array's element is cut short")
        pos = _skip(data, kind, key_end + 1, body_end)
        n += 1
    return n, end


def decode_fields(data: bytes, pos: int = 0, end: int | None = None, *, keep: Container[str],
                  count: Container[str] = (), max_size: int = DEFAULT_MAX_SIZE,
                  max_depth: int = DEFAULT_MAX_DEPTH) -> tuple[dict[str, Any], int]:
    """As :func:`decode_at`, but only the first field's value and those whose
    key is in ``keep`` are decoded; an array under a key in ``count`` is its
    number of elements; every other value is :data:`SKIPPED` (see the
    module docstring). The keys are all there, in order, each once."""
    if end is None:
        end = len(data)
    limit = min(end, pos + max_size)
    if end - pos >= 4 and _I32_FROM(data, pos)[0] > max_size:
        raise _invalid(f"a document of {_I32_FROM(data, pos)[0]} bytes exceeds the maximum of {max_size}")
    return _Decoder(data, max_depth).document(pos, limit, 0, keep=keep, count=count)


def _value_end(data: bytes, kind: int, pos: int, limit: int) -> int | None:
    """Where the value of type ``kind`` at ``pos`` ends, from its length
    alone; None if that is past ``limit``."""
    size = _FIXED.get(kind)
    if size is None:
        extra = _COUNTED.get(kind)
        if extra is None:
            if kind != 0x0B:
                raise _invalid(f"unknown element type 0x{kind:02x}")
            first = data.find(b"\x00", pos, limit)
            second = data.find(b"\x00", first + 1, limit) if first >= 0 else -1
            return None if second < 0 else second + 1
        if limit - pos < 4:
            return None
        (length,) = _I32.unpack_from(data, pos)
        if length < 0:
            raise _invalid(f"a value's length {length} is negative")
        size = length + extra
    return pos + size if pos + size <= limit else None


def elements(data: bytes, pos: int = 0, end: int | None = None
             ) -> Iterator[tuple[str, int, int, int]]:
    """The top-level elements of the document at ``data[pos:end]`` as (key,
    type, value start, value end), each value skipped by its length, not
    decoded (nor checked beyond its length). The document may be a prefix
    (an auditor keeps only the start of a large reply): iteration then stops
    at the first element that does not fit."""
    if end is None:
        end = len(data)
    if end - pos < 4:
        return
    (length,) = _I32.unpack_from(data, pos)
    if length < 5:
        raise _invalid(f"a document's length {length} is below 5")
    limit = min(end, pos + length - 1)
    pos += 4
    while pos < limit:
        kind = data[pos]
        if kind == 0:
            raise _invalid("a document ends before its length says")
        key_end = data.find(b"\x00", pos + 1, limit)
        if key_end < 0:
            return
        value_end = _value_end(data, kind, key_end + 1, limit)
        if value_end is None:
            return
        yield _utf8(data[pos + 1 : key_end], "a key"), kind, key_end + 1, value_end
        pos = value_end


def decode_element(data: bytes, kind: int, start: int, end: int, *,
                   max_depth: int = DEFAULT_MAX_DEPTH) -> Any:
    """The value of type ``kind`` that :func:`elements` found at ``start``."""
    reader = _READERS.get(kind)
    if reader is None:
        raise _invalid(f"unknown element type 0x{kind:02x}")
    value, stop = reader(_Decoder(data, max_depth), start, end, 0)
    if stop != end:
        raise _invalid("a value's length disagrees with its bytes")
    return value


# --- encoding -----------------------------------------------------------------------


def _refuse(message: str) -> LocalProtocolError:
    return LocalProtocolError(f"cannot encode as BSON: {message}", code=ErrorCode.BAD_REQUEST)


def _utf8_of(text: str, what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        raise _refuse(f"{what} holds a lone surrogate, which UTF-8 cannot") from None


class _Encoder:
    __slots__ = ("out", "max_depth")

    def __init__(self, max_depth: int) -> None:
        self.out = bytearray()
        self.max_depth = max_depth

    def document(self, items: Any, depth: int) -> None:
        if depth > self.max_depth:
            raise _refuse(f"nested deeper than {self.max_depth} levels")
        out = self.out
        start = len(out)
        out += b"\x00\x00\x00\x00"
        for key, value in items:
            if not isinstance(key, str):
                raise _refuse(f"a key must be a str, not {type(key).__name__}")
            raw_key = _utf8_of(key, "a key")
            if b"\x00" in raw_key:
                raise _refuse("a key cannot contain NUL")
            tag = len(out)
            out.append(0)
            out += raw_key
            out.append(0)
            out[tag] = self.value(value, depth)
        out.append(0)
        out[start : start + 4] = _I32.pack(len(out) - start)

    def cstring(self, text: str, what: str) -> None:
        raw = _utf8_of(text, what)
        if b"\x00" in raw:
            raise _refuse(f"{what} cannot contain NUL")
        self.out += raw + b"\x00"

    def string(self, text: str) -> None:
        raw = _utf8_of(text, "a string")
        self.out += _I32.pack(len(raw) + 1) + raw + b"\x00"

    def value(self, value: Any, depth: int) -> int:
        """Append ``value``; its element type."""
        out = self.out
        kind = type(value)
        if kind is bool:
            out.append(1 if value else 0)
            return 0x08
        if kind is Int64:
            out += _I64.pack(value)
            return 0x12
        if isinstance(value, int):
            if is_int32(value):
                out += _I32.pack(value)
                return 0x10
            if is_int64(value):
                out += _I64.pack(value)
                return 0x12
            raise _refuse(f"{value} does not fit an int64")
        if isinstance(value, float):
            out += _F64.pack(value)
            return 0x01
        if isinstance(value, str):
            self.string(value)
            return 0x02
        if isinstance(value, Mapping):
            self.document(value.items(), depth + 1)
            return 0x03
        if isinstance(value, (list, tuple)):
            self.document(((str(i), v) for i, v in enumerate(value)), depth + 1)
            return 0x04
        if isinstance(value, (bytes, bytearray, memoryview)):
            raw = bytes(value)
            out += _I32.pack(len(raw)) + b"\x00" + raw
            return 0x05
        if value is None:
            return 0x0A
        writer = _WRITERS.get(kind)
        if writer is None:
            raise _refuse(f"no BSON type for {kind.__name__}")
        return writer(self, value, depth)

    def binary(self, value: Binary, _depth: int) -> int:
        data = value.data
        if value.subtype == 2:
            data = _I32.pack(len(data)) + data
        self.out += _I32.pack(len(data)) + bytes([value.subtype]) + data
        return 0x05

    def constant(self, value: Constant, _depth: int) -> int:
        return value.value

    def object_id(self, value: ObjectId, _depth: int) -> int:
        self.out += value.binary
        return 0x07

    def datetime(self, value: DateTime, _depth: int) -> int:
        self.out += _I64.pack(value.millis)
        return 0x09

    def regex(self, value: Regex, _depth: int) -> int:
        self.cstring(value.pattern, "a regex pattern")
        self.cstring(value.flags, "a regex's options")
        return 0x0B

    def db_pointer(self, value: DBPointer, _depth: int) -> int:
        self.string(value.namespace)
        self.out += value.id.binary
        return 0x0C

    def code(self, value: Code, _depth: int) -> int:
        self.string(value.code)
        return 0x0D

    def symbol(self, value: Symbol, _depth: int) -> int:
        self.string(value.name)
        return 0x0E

    def code_with_scope(self, value: CodeWithScope, depth: int) -> int:
        out = self.out
        start = len(out)
        out += b"\x00\x00\x00\x00"
        self.string(value.code)
        self.document(value.scope.items(), depth + 1)
        out[start : start + 4] = _I32.pack(len(out) - start)
        return 0x0F

    def timestamp(self, value: Timestamp, _depth: int) -> int:
        self.out += _U64.pack(value.time << 32 | value.increment)
        return 0x11

    def decimal128(self, value: Decimal128, _depth: int) -> int:
        self.out += value.raw
        return 0x13


_WRITERS: Final[dict[type, Callable[[_Encoder, Any, int], int]]] = {
    Binary: _Encoder.binary, Constant: _Encoder.constant, ObjectId: _Encoder.object_id,
    DateTime: _Encoder.datetime, Regex: _Encoder.regex, DBPointer: _Encoder.db_pointer,
    Code: _Encoder.code, Symbol: _Encoder.symbol, CodeWithScope: _Encoder.code_with_scope,
    Timestamp: _Encoder.timestamp, Decimal128: _Encoder.decimal128,
}


def encode(document: Mapping[str, Any], *, max_depth: int = DEFAULT_MAX_DEPTH) -> bytes:
    """``document`` as BSON; LocalProtocolError for a value BSON cannot hold
    (an int over 64 bits, a NUL in a key, an unknown type, too deep)."""
    if not isinstance(document, Mapping):
        raise _refuse(f"a document must be a mapping, not {type(document).__name__}")
    encoder = _Encoder(max_depth)
    encoder.document(document.items(), 0)
    return bytes(encoder.out)

"""protocols.mongodb.bson: every type both ways, strict decoding, bounds;
the official corpus when present (README.md)."""

from __future__ import annotations

import math
from functools import partial
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.mongodb import bson
from protocols.mongodb.bson import (
    MAX_KEY, MIN_KEY, UNDEFINED, Binary, Code, CodeWithScope, DateTime, DBPointer, Decimal128,
    Int64, ObjectId, Regex, Symbol, Timestamp,
)
from tests.unit.protocols.feeding import fuzz, malformed
from tests.unit.protocols.mongodb import corpus
from tests.unit.protocols.mongodb.corpus import corpus_dir, decode_error_cases, valid_cases


def doc(*elements: bytes) -> bytes:
    """A document around raw elements (type, key, value already encoded)."""
    body = b"".join(elements)
    return struct.pack("<i", len(body) + 5) + body + b"\x00"


def element(kind: int, key: str, value: bytes) -> bytes:
    return bytes([kind]) + key.encode() + b"\x00" + value


def string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack("<i", len(raw) + 1) + raw + b"\x00"


OID = ObjectId(bytes(range(12)))

# One element of each type: (value, its bytes).
EACH_TYPE: list[tuple[Any, int, bytes]] = [
    (1.5, 0x01, struct.pack("<d", 1.5)),
    ("héllo", 0x02, string("héllo")),
    ({"a": None}, 0x03, doc(element(0x0A, "a", b""))),
    ([True, "x"], 0x04, doc(element(0x08, "0", b"\x01"), element(0x02, "1", string("x")))),
    (b"\x00\xff", 0x05, struct.pack("<i", 2) + b"\x00\x00\xff"),
    (Binary(4, bytes(16)), 0x05, struct.pack("<i", 16) + b"\x04" + bytes(16)),
    (Binary(2, b"ab"), 0x05, struct.pack("<ii", 6, 2)[:4] + b"\x02" + struct.pack("<i", 2) + b"ab"),
    (UNDEFINED, 0x06, b""),
    (OID, 0x07, bytes(range(12))),
    (False, 0x08, b"\x00"),
    (DateTime(-1), 0x09, struct.pack("<q", -1)),
    (None, 0x0A, b""),
    (Regex("^a.c$", "im"), 0x0B, b"^a.c$\x00im\x00"),
    (DBPointer("db.c", OID), 0x0C, string("db.c") + bytes(range(12))),
    (Code("x = 1"), 0x0D, string("x = 1")),
    (Symbol("sym"), 0x0E, string("sym")),
    (CodeWithScope("f()", {"n": 1}), 0x0F,
     struct.pack("<i", 4 + 8 + 12) + string("f()") + doc(element(0x10, "n", struct.pack("<i", 1)))),
    (-7, 0x10, struct.pack("<i", -7)),
    (Timestamp(time=5, increment=9), 0x11, struct.pack("<II", 9, 5)),
    (Int64(3), 0x12, struct.pack("<q", 3)),
    (Int64(2**40), 0x12, struct.pack("<q", 2**40)),
    (Decimal128(bytes(15) + b"\x30"), 0x13, bytes(15) + b"\x30"),
    (MIN_KEY, 0xFF, b""),
    (MAX_KEY, 0x7F, b""),
]


@pytest.mark.parametrize("value, kind, raw", EACH_TYPE,
                         ids=[f"0x{k:02x}-{type(v).__name__}" for v, k, _ in EACH_TYPE])
def test_each_type_both_ways(value: Any, kind: int, raw: bytes) -> None:
    data = doc(element(kind, "v", raw))
    assert bson.encode({"v": value}) == data
    decoded = bson.decode(data)["v"]
    assert decoded == value and type(decoded) is type(value)


def test_int_width_follows_the_value_unless_it_is_an_int64() -> None:
    edges = bson.decode(bson.encode({"a": 2**31 - 1, "b": -(2**31), "c": 2**31}))
    assert edges == {"a": 2**31 - 1, "b": -(2**31), "c": Int64(2**31)}
    assert type(edges["b"]) is int
    assert type(bson.decode(bson.encode({"a": 1}))["a"]) is int
    assert type(bson.decode(bson.encode({"a": Int64(1)}))["a"]) is Int64
    assert repr(Int64(5)) == "Int64(5)"


@pytest.mark.parametrize("value", [
    {"a\x00b": 1}, {1: 2}, {"a": 2**64}, {"a": object()}, {"a": Regex("a\x00", "")},
    {"a": Regex("a", "\x00")}, {"\ud800": 1}, {"a": "\udfff"},
])
def test_what_bson_cannot_hold_is_a_local_error(value: Any) -> None:
    with pytest.raises(LocalProtocolError):
        bson.encode(value)


def test_encode_takes_only_a_mapping() -> None:
    with pytest.raises(LocalProtocolError):
        bson.encode([1, 2])  # type: ignore[arg-type]


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def test_depth_is_bounded_both_ways() -> None:
    data = bson.encode(nested(10))
    assert bson.decode(data, max_depth=10) == nested(10)
    assert "deeper" in malformed(partial(bson.decode, max_depth=9), data).message
    with pytest.raises(LocalProtocolError):
        bson.encode(nested(11), max_depth=10)
    # Arrays and code-with-scope count as levels too.
    deep_array: Any = []
    for _ in range(5):
        deep_array = [deep_array]
    malformed(partial(bson.decode, max_depth=4), bson.encode({"x": deep_array}))
    scope = bson.encode({"c": CodeWithScope("f", nested(3))})
    malformed(partial(bson.decode, max_depth=3), scope)
    assert bson.decode(scope, max_depth=4)["c"].scope == nested(3)


def test_the_default_depth_survives_the_stack() -> None:
    data = bson.encode(nested(bson.DEFAULT_MAX_DEPTH))
    assert bson.decode(data) == nested(bson.DEFAULT_MAX_DEPTH)
    with pytest.raises(LocalProtocolError):
        bson.encode(nested(bson.DEFAULT_MAX_DEPTH + 1))


def test_size_is_bounded_before_the_bytes_arrive() -> None:
    data = bson.encode({"s": "x" * 100})
    assert bson.decode(data, max_size=len(data))["s"] == "x" * 100
    err = malformed(partial(bson.decode, max_size=len(data) - 1), data)
    assert err.wire_hint == bson.INVALID_BSON and "maximum" in err.message
    # A huge declared length is refused from its first four bytes.
    malformed(bson.decode, struct.pack("<i", 2**31 - 1))


@pytest.mark.parametrize("data, words", [
    (doc(element(0x10, "a", struct.pack("<i", 1)), element(0x10, "a", struct.pack("<i", 2))),
     "twice"),
    (doc(element(0x08, "b", b"\x02")), "boolean"),
    (doc(element(0x02, "s", struct.pack("<i", 2) + b"\xe9\x00")), "UTF-8"),
    (doc(b"\x0a\xff\x00"), "a key is not valid UTF-8"),
    (doc(element(0x20, "x", b"")), "unknown element type"),
    (doc(element(0x05, "b", struct.pack("<i", 99) + b"\x00abc")), "does not fit"),
    (doc(element(0x05, "b", struct.pack("<i", 3) + b"\x02abc")), "inner length"),
    (doc(element(0x0F, "c", struct.pack("<i", 13) + string("") + doc()[:-1])), "code with scope"),
    (doc(element(0x0F, "c", struct.pack("<i", 20) + string("") + doc() + b"xxxxxx")),
     "code with scope"),
    (doc(element(0x0B, "r", b"abc")), "NUL-terminated"),
    (doc(element(0x03, "d", doc(element(0x10, "x", struct.pack("<i", 1)))[:-1] + b"\x01")),
     "NUL"),
    (doc(element(0x03, "d", struct.pack("<i", 4) + b"\x00")), "below 5"),
    (doc(b"\x10a"), "key"),
    (doc(element(0x01, "d", b"\x00" * 4)), "a double is cut short"),
    (doc(element(0x02, "s", struct.pack("<i", 50) + b"ab\x00")), "does not fit"),
    (doc(element(0x02, "s", struct.pack("<i", 3) + b"abc")), "not NUL-terminated"),
    (doc(b"\x00\x00"), "ends before"),
], ids=lambda v: v if isinstance(v, str) else "")
def test_malformed_documents(data: bytes, words: str) -> None:
    err = malformed(bson.decode, data)
    assert words in err.message and err.wire_hint == bson.INVALID_BSON


SAMPLE = bson.encode({"find": "users", "filter": {"age": {"$gt": 30}}, "$db": "app",
                      "x": [1, Int64(2), 2.5, None, OID, DateTime(0)]})


def test_every_prefix_is_cut_short_and_trailing_bytes_are_refused() -> None:
    for cut in range(len(SAMPLE)):
        malformed(bson.decode, SAMPLE[:cut])
    assert "follow" in malformed(bson.decode, SAMPLE + b"\x00").message
    # decode_at reads one of documents that follow each other.
    two = SAMPLE + bson.encode({"b": 1})
    first, end = bson.decode_at(two)
    assert end == len(SAMPLE) and bson.decode_at(two, end) == ({"b": 1}, len(two))
    malformed(bson.decode_at, two, end, len(two) - 1)


def test_decode_takes_any_bytes_like() -> None:
    assert bson.decode(bytearray(SAMPLE)) == bson.decode(memoryview(SAMPLE)) == bson.decode(SAMPLE)


# --- the official corpus ---------------------------------------------------------------

_NO_CORPUS = pytest.mark.skipif(corpus_dir() is None, reason=corpus.why_missing or "no BSON corpus")


@_NO_CORPUS
@pytest.mark.parametrize("name, suite, case", valid_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_corpus_valid_round_trips(name: str, suite: dict[str, Any], case: dict[str, Any]) -> None:
    import json

    canonical = bytes.fromhex(case["canonical_bson"])
    decoded = bson.decode(canonical)
    assert bson.encode(decoded) == canonical
    if "degenerate_bson" in case:
        bson.decode(bytes.fromhex(case["degenerate_bson"]))
    if suite["bson_type"] == "0x13":
        expected = json.loads(case["canonical_extjson"])[suite["test_key"]]["$numberDecimal"]
        assert str(decoded[suite["test_key"]]) == expected


@_NO_CORPUS
@pytest.mark.parametrize("name, suite, case", decode_error_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_corpus_decode_errors(name: str, suite: dict[str, Any], case: dict[str, Any]) -> None:
    malformed(bson.decode, bytes.fromhex(case["bson"]))


# --- fuzzing -----------------------------------------------------------------------------


@fuzz
@given(st.binary(max_size=200))
def test_random_bytes_only_ever_raise_a_remote_error(data: bytes) -> None:
    try:
        decoded = bson.decode(data)
    except RemoteProtocolError:
        return
    bson.encode(decoded)  # whatever decodes can be sent on


@fuzz
@given(st.binary(min_size=5, max_size=120))
def test_random_bodies_behind_a_right_length(body: bytes) -> None:
    data = struct.pack("<i", len(body) + 4) + body
    try:
        bson.decode(data)
    except RemoteProtocolError:
        pass


_texts = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)
_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
    st.builds(Int64, st.integers(-(2**63), 2**63 - 1)),
    st.floats(allow_nan=False), _texts, st.binary(max_size=20),
    st.builds(Binary, st.integers(1, 255), st.binary(max_size=20)),
    st.builds(ObjectId, st.binary(min_size=12, max_size=12)),
    st.builds(DateTime, st.integers(-(2**63), 2**63 - 1)),
    st.builds(Regex, st.text(st.characters(blacklist_characters="\x00",
                                          blacklist_categories=("Cs",)), max_size=8),
              st.text("ilmsux", max_size=3)),
    st.builds(Code, _texts), st.builds(Symbol, _texts),
    st.builds(Timestamp, time=st.integers(0, 2**32 - 1), increment=st.integers(0, 2**32 - 1)),
    st.builds(Decimal128, st.binary(min_size=16, max_size=16)),
    st.sampled_from([UNDEFINED, MIN_KEY, MAX_KEY]),
)
_keys = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)),
                max_size=8)
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4),
    st.builds(CodeWithScope, _texts, st.dictionaries(_keys, inner, max_size=3))),
    max_leaves=20)


@settings(parent=fuzz, max_examples=100)
@given(st.dictionaries(_keys, _values, max_size=5))
def test_encode_then_decode_is_the_identity(document: dict[str, Any]) -> None:
    data = bson.encode(document)
    decoded = bson.decode(data)
    assert decoded == document
    assert bson.encode(decoded) == data


def test_nan_round_trips_bit_for_bit() -> None:
    data = doc(element(0x01, "d", bytes.fromhex("120000000000F87F")))
    value = bson.decode(data)["d"]
    assert math.isnan(value) and bson.encode({"d": value}) == data


# --- the top level, walked by lengths ---------------------------------------------------

WALKED = bson.encode({"d": 1.5, "s": "x", "doc": {"a": [1]}, "bin": b"ab", "u": UNDEFINED,
                      "oid": OID, "t": True, "dt": DateTime(0), "n": None,
                      "r": Regex("a", "i"), "p": DBPointer("n.c", OID), "c": Code("f"),
                      "sym": Symbol("s"), "cws": CodeWithScope("f", {"x": 1}), "i": 1,
                      "ts": Timestamp(time=1, increment=2), "l": Int64(1),
                      "dec": Decimal128(bytes(16)), "min": MIN_KEY, "max": MAX_KEY})


def test_elements_walk_every_type_by_its_length() -> None:
    walked = {key: bson.decode_element(WALKED, kind, start, end)
              for key, kind, start, end in bson.elements(WALKED)}
    assert walked == bson.decode(WALKED)


def test_elements_of_a_prefix_stop_at_the_cut() -> None:
    for cut in range(len(WALKED)):
        keys = [key for key, *_ in bson.elements(WALKED[:cut])]
        assert keys == list(bson.decode(WALKED))[: len(keys)]
    # A regex cut inside its options, a counted value cut inside its length.
    regex = bson.encode({"r": Regex("abc", "i")})
    assert list(bson.elements(regex[:12])) == []
    assert list(bson.elements(bson.encode({"s": "x"})[:9])) == []
    assert list(bson.elements(doc(b"\x10ab"))) == []  # a key cut short


@pytest.mark.parametrize("data, words", [
    (struct.pack("<i", 4), "below 5"),
    (doc(element(0x20, "x", b"")), "unknown element type"),
    (doc(element(0x02, "s", struct.pack("<i", -1))), "negative"),
    (doc(b"\x0a\xff\x00"), "UTF-8"),
    (doc(b"\x00\x00"), "ends before"),
])
def test_elements_still_check_what_they_read(data: bytes, words: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        list(bson.elements(data))
    assert words in info.value.message


def test_decode_element_checks_the_span() -> None:
    data = doc(element(0x10, "i", struct.pack("<i", 1)))
    ((_, kind, start, end),) = bson.elements(data)
    malformed(partial(bson.decode_element, data, kind, start), end + 1)
    malformed(partial(bson.decode_element, data, 0x20, start), end)


# --- the top level, only the fields asked for decoded ------------------------------------


def test_decode_fields_decodes_the_first_and_the_kept_and_skips_the_rest() -> None:
    fields, end = bson.decode_fields(WALKED, keep={"oid", "cws"})
    assert end == len(WALKED)
    full = bson.decode(WALKED)
    assert list(fields) == list(full)  # every key, in order
    assert {k: v for k, v in fields.items() if v is not bson.SKIPPED} == {
        "d": full["d"], "oid": full["oid"], "cws": full["cws"]}
    assert bson.decode_fields(WALKED, keep=set(full)) == (full, len(WALKED))


def test_decode_fields_counts_arrays_asked_to_be_counted() -> None:
    data = bson.encode({"insert": "t", "documents": [{"a": 1}, {"b": [1, 2]}, {}], "other": [1],
                        "ops": "not an array", "$db": "app"})
    fields, _ = bson.decode_fields(data, keep={"$db"}, count={"documents", "ops"})
    assert fields == {"insert": "t", "documents": 3, "other": bson.SKIPPED, "ops": bson.SKIPPED,
                      "$db": "app"}
    empty, _ = bson.decode_fields(bson.encode({"x": 1, "documents": []}), keep=(), count={"documents"})
    assert empty["documents"] == 0


@pytest.mark.parametrize("data, words", [
    # A top-level key twice is refused even when neither is decoded.
    (doc(element(0x10, "a", b"\x01\x00\x00\x00") + element(0x10, "b", b"\x01\x00\x00\x00")
         + element(0x10, "b", b"\x01\x00\x00\x00")), "twice"),
    (doc(element(0x10, "a", b"\x01\x00\x00\x00") + element(0x02, "s", struct.pack("<i", 2) + b"xy")),
     "disagrees"),  # a skipped string without its NUL
    (doc(element(0x10, "a", b"\x01\x00\x00\x00") + element(0x03, "d", struct.pack("<i", 9))),
     "exceeds"),  # a skipped document longer than its parent
    (doc(element(0x10, "a", b"\x01\x00\x00\x00") + element(0x03, "d", struct.pack("<i", 4) + b"\x00\x00")),
     "disagrees"),  # a skipped document shorter than an empty one
    (doc(element(0x10, "a", b"\x01\x00\x00\x00") + element(0x04, "n", struct.pack("<i", 8) + b"\x10\x00\x00\x00")),
     "exceeds"),  # a counted array's element cut short
    (doc(element(0x10, "a", b"\x01\x00\x00\x00") + element(0x20, "x", b"")), "unknown element type"),
    (doc(element(0x10, "a", b"\x01\x00\x00\x00") + b"\x0a\xff\x00"), "UTF-8"),
    (struct.pack("<i", 17 * 1024 * 1024) + b"\x00", "exceeds the maximum"),
    (doc(element(0x10, "a", b"\x01\x00\x00\x00"))[:-1] + b"\x01", "NUL"),
])
def test_decode_fields_still_checks_what_it_walks(data: bytes, words: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        bson.decode_fields(data, keep=(), count={"n"})
    assert words in info.value.message


@_NO_CORPUS
@pytest.mark.parametrize("name, suite, case", valid_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_corpus_valid_documents_read_by_their_fields(name: str, suite: dict[str, Any],
                                                      case: dict[str, Any]) -> None:
    canonical = bytes.fromhex(case["canonical_bson"])
    full = bson.decode(canonical)
    every, end = bson.decode_fields(canonical, keep=set(full))
    assert end == len(canonical) and bson.encode(every) == canonical  # NaN is not equal to itself
    fields, _ = bson.decode_fields(canonical, keep=())
    assert list(fields) == list(full)


@_NO_CORPUS
@pytest.mark.parametrize("name, suite, case", decode_error_cases(),
                         ids=lambda v: v if isinstance(v, str) else "")
def test_corpus_decode_errors_when_every_field_is_read(name: str, suite: dict[str, Any],
                                                        case: dict[str, Any]) -> None:
    data = bytes.fromhex(case["bson"])
    try:
        keys = [key for key, *_ in bson.elements(data)]
    except RemoteProtocolError:
        keys = []
    try:
        fields, end = bson.decode_fields(data, keep=set(keys))
    except RemoteProtocolError:
        return
    assert end != len(data)  # only bytes after the document are left to the caller to refuse


@fuzz
@given(st.binary(min_size=5, max_size=120), st.booleans())
def test_decode_fields_of_random_bodies_only_ever_raise_a_remote_error(body: bytes, keep_all: bool) -> None:
    data = struct.pack("<i", len(body) + 4) + body
    try:
        keys = {key for key, *_ in bson.elements(data)} if keep_all else ()
        fields, _ = bson.decode_fields(data, keep=keys, count={"0", "a"})
    except RemoteProtocolError:
        return
    full = None
    try:
        full = bson.decode(data)
    except RemoteProtocolError:
        pass
    if full is not None:  # what decodes whole reads the same, field by field
        assert list(fields) == list(full)
        assert all(v is bson.SKIPPED or isinstance(v, int) or bson.encode({k: v}) == bson.encode({k: full[k]})
                   for k, v in fields.items())


@settings(parent=fuzz, max_examples=100)
@given(st.dictionaries(_keys, _values, min_size=1, max_size=5), st.data())
def test_decode_fields_agrees_with_decode(document: dict[str, Any], data) -> None:
    encoded = bson.encode(document)
    keep = data.draw(st.sets(st.sampled_from(sorted(document))))
    fields, end = bson.decode_fields(encoded, keep=keep)
    assert end == len(encoded)
    first = next(iter(document))
    assert fields == {k: (v if k == first or k in keep else bson.SKIPPED) for k, v in document.items()}

"""protocols.mongodb.bson_types: the small frozen types, Decimal128's string
form, and the type names an audit shows instead of values."""

from __future__ import annotations

from typing import Any

import pytest

from protocols.errors import LocalProtocolError
from protocols.mongodb import bson
from protocols.mongodb.bson_types import (
    MAX_KEY, MIN_KEY, UNDEFINED, Binary, Code, CodeWithScope, DateTime, DBPointer, Decimal128,
    Int64, ObjectId, Regex, Symbol, Timestamp,
)

OID = ObjectId(bytes(range(12)))


def test_special_values_print_as_the_spec_says() -> None:
    assert str(OID) == "000102030405060708090a0b"
    assert repr(MIN_KEY) == "MIN_KEY"
    assert str(Decimal128(bytes(15) + b"\x30")) == "0E-32"
    assert str(Decimal128(b"\x01" + bytes(13) + b"\x40\x30")) == "1"  # exponent 0
    assert str(Decimal128(bytes(15) + b"\x7c")) == "NaN"
    assert str(Decimal128(bytes(15) + b"\xf8")) == "-Infinity"
    # Non-canonical encodings read as zero (decimal128.md): the "11" form,
    # and a coefficient over 10**34 - 1.
    assert str(Decimal128(bytes(14) + b"\x10\x6c")) == "0"
    assert str(Decimal128(b"\xff" * 14 + b"\x11\x6c")) == "0E+3"
    assert str(Decimal128(b"\xff" * 14 + b"\x41\x30")) == "0"


@pytest.mark.parametrize("bad", [
    lambda: ObjectId(b"short"), lambda: Decimal128(b"x"), lambda: Binary(256, b""),
    lambda: DateTime(2**63), lambda: Timestamp(time=-1, increment=0),
])
def test_the_small_types_check_themselves(bad: Any) -> None:
    with pytest.raises(ValueError):
        bad()


@pytest.mark.parametrize("value, name", [
    (1, "int32"), (2**40, "int64"), (Int64(1), "int64"), (True, "bool"), (1.0, "double"),
    ("s", "string"), ({}, "document"), ([], "array"), (b"", "binary"), (Binary(4, b""), "binary"),
    (None, "null"), (OID, "objectId"), (DateTime(0), "datetime"), (Regex("a"), "regex"),
    (UNDEFINED, "undefined"), (MIN_KEY, "minKey"), (MAX_KEY, "maxKey"),
    (Decimal128(bytes(16)), "decimal128"), (Timestamp(time=0, increment=0), "timestamp"),
    (Code(""), "code"), (CodeWithScope("", {}), "codeWithScope"), (Symbol(""), "symbol"),
    (DBPointer("a", OID), "dbPointer"),
])
def test_type_names(value: Any, name: str) -> None:
    assert bson.type_name(value) == name


def test_type_name_of_an_int_subclass_and_of_nothing_bson_knows() -> None:
    class Flag(int):
        pass

    assert bson.type_name(Flag(3)) == "int32" and bson.type_name(Flag(2**40)) == "int64"
    with pytest.raises(LocalProtocolError):
        bson.type_name(object())

"""protocols.mongodb.crc32c: the Castagnoli CRC an OP_MSG checksum uses."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from protocols.mongodb.crc32c import CHECK_VALUE, crc32c
from tests.unit.protocols.feeding import fuzz


def test_the_standard_check_value() -> None:
    assert crc32c(b"123456789") == CHECK_VALUE == 0xE3069283


def test_known_vectors() -> None:
    # RFC 3720, appendix B.4: 32 bytes of zeros, of ones, and ascending.
    assert crc32c(bytes(32)) == 0x8A9136AA
    assert crc32c(b"\xff" * 32) == 0x62A8AB43
    assert crc32c(bytes(range(32))) == 0x46DD794E
    assert crc32c(b"") == 0


def test_any_bytes_like() -> None:
    assert crc32c(bytearray(b"123456789")) == crc32c(memoryview(b"123456789")) == CHECK_VALUE


@fuzz
@given(st.binary(max_size=64), st.binary(max_size=64))
def test_it_goes_on_from_a_previous_result(a: bytes, b: bytes) -> None:
    assert crc32c(b, crc32c(a)) == crc32c(a + b)

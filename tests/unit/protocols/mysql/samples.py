"""Test data helpers the MySQL message tests share."""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given
from hypothesis import strategies as st

from protocols.errors import RemoteProtocolError
from tests.unit.protocols.feeding import fuzz


def payload(dump: str) -> bytes:
    """A packet's payload from a hex dump that starts with its 4-byte header."""
    raw = bytes.fromhex(dump.replace(" ", ""))
    assert int.from_bytes(raw[:3], "little") == len(raw) - 4
    return raw[4:]


#: Text a name field can hold: no NUL, no lone surrogates.
names = st.text(alphabet=st.characters(blacklist_characters="\x00",
                                       blacklist_categories=("Cs",)), max_size=20)


def fuzz_decoders(decoders: list[Callable[[bytes], object]], *,
                  max_size: int) -> Callable[..., None]:
    """A test: random payloads into each decoder raise nothing but
    RemoteProtocolError."""
    @fuzz
    @given(st.sampled_from(decoders), st.binary(max_size=max_size))
    def test(decode: Callable[[bytes], object], data: bytes) -> None:
        try:
            decode(data)
        except RemoteProtocolError:
            pass
    return test

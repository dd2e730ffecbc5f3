"""Test data helpers the MySQL message tests share."""

from __future__ import annotations

from hypothesis import strategies as st


def payload(dump: str) -> bytes:
    """A packet's payload from a hex dump that starts with its 4-byte header."""
    raw = bytes.fromhex(dump.replace(" ", ""))
    assert int.from_bytes(raw[:3], "little") == len(raw) - 4
    return raw[4:]


#: Text a name field can hold: no NUL, no lone surrogates.
names = st.text(alphabet=st.characters(blacklist_characters="\x00",
                                       blacklist_categories=("Cs",)), max_size=20)

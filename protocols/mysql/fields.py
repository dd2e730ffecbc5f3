"""The field helpers every MySQL message class shares: text as the wire
carries it, and the validators a message runs when it is built (a bad
message cannot be built: LocalProtocolError).

Text is UTF-8 with ``surrogateescape``: lossless, so a decoded message
encodes back to the same bytes whatever charset the peer used, and a name
that is not UTF-8 never matches an RBAC rule by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import attrs

from protocols.mysql.constants import Capability
from protocols.mysql.packets import invalid

__all__ = ["frozen", "text", "wire", "to_capabilities", "uint", "no_nul"]

#: Messages and events: small frozen classes with keyword-only fields.
frozen = attrs.frozen(kw_only=True)
_Validator = Callable[[Any, "attrs.Attribute[Any]", Any], None]


def text(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def wire(value: str) -> bytes:
    return value.encode("utf-8", "surrogateescape")


def to_capabilities(value: object) -> Capability:
    """Converter: a Capability, or the bits of one (unknown bits dropped)."""
    if isinstance(value, Capability):
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        invalid("capabilities must be a Capability or a non-negative int")
    return Capability.of(value)


def uint(bits: int) -> _Validator:
    """Validator: an integer in 0..2^bits-1."""
    def check(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << bits:
            invalid(f"{attr.name} must be an integer in 0..2^{bits}-1")
    return check


def no_nul(_inst: object, attr: attrs.Attribute[Any], value: object) -> None:
    """Validator: a string without NUL (or None)."""
    if value is not None and (not isinstance(value, str) or "\x00" in value):
        invalid(f"{attr.name} must be a string without NUL")

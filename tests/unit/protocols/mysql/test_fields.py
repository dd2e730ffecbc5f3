"""protocols.mysql.fields: text as the wire carries it, and the validators."""

from __future__ import annotations

import attrs
import pytest

from protocols.errors import LocalProtocolError
from protocols.mysql.constants import Capability
from protocols.mysql.fields import frozen, no_nul, text, to_capabilities, uint, wire


@frozen
class Sample:
    count: int = attrs.field(validator=uint(8))
    name: str | None = attrs.field(default=None, validator=no_nul)
    caps: Capability = attrs.field(default=Capability(0), converter=to_capabilities)


def test_text_is_lossless() -> None:
    assert text(b"caf\xe9") == "caf\udce9" and wire("caf\udce9") == b"caf\xe9"
    assert wire(text("ünï".encode())) == "ünï".encode()


def test_validators() -> None:
    sample = Sample(count=255, name="ok", caps=0x200)
    assert sample.caps is Capability.PROTOCOL_41
    for bad in ({"count": 256}, {"count": -1}, {"count": True}, {"name": "a\x00"},
                {"name": 3}, {"caps": -1}, {"caps": 1.5}):
        with pytest.raises(LocalProtocolError):
            Sample(**{"count": 1, **bad})  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        Sample(1)  # type: ignore[misc]  # keyword-only

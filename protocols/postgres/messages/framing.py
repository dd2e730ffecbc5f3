"""PostgreSQL framing: a typed message's header, and the streaming splitter.

Spec: PostgreSQL docs, "Frontend/Backend Protocol", "Message Formats"::

    typed    := type:Byte1 | length:Int32 | body     (everything after the
                                                      startup packet)

``length`` counts itself but not the type byte. The splitting itself is
:mod:`protocols.framing`'s, with the :data:`~protocols.framing.POSTGRES_MESSAGE`
layout; a frame's kind is its type byte.
"""

from __future__ import annotations

from typing import Final

from protocols import framing
from protocols.framing import POSTGRES_MESSAGE, Frame, KeepPolicy

__all__ = ["HEADER", "MAX_MESSAGE_LENGTH", "frame", "Frame", "FrameSplitter", "KeepPolicy"]

#: A typed message's length field (which counts itself) may be at most this:
#: the server refuses anything of 1 GiB or more.
MAX_MESSAGE_LENGTH: Final = POSTGRES_MESSAGE.max_length
HEADER: Final = POSTGRES_MESSAGE.header  # type byte, length


def frame(type_code: bytes, body: bytes = b"") -> bytes:
    """One typed message: ``type_code`` (one byte), the length, the body."""
    return HEADER.pack(type_code, 4 + len(body)) + body


class FrameSplitter(framing.FrameSplitter):
    """A :class:`protocols.framing.FrameSplitter` over typed PostgreSQL
    messages: ``keep(type_code, body_length)`` says how much of each body to
    keep (None: skip it unseen). Bad lengths are 08P01."""

    __slots__ = ()

    def __init__(self, keep: KeepPolicy, *, max_length: int = MAX_MESSAGE_LENGTH) -> None:
        super().__init__(POSTGRES_MESSAGE, keep=keep, max_length=max_length)

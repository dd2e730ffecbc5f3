"""PostgreSQL framing: a typed message's header, and the streaming splitter.

Spec: PostgreSQL docs, "Frontend/Backend Protocol", "Message Formats"::

    typed    := type:Byte1 | length:Int32 | body     (everything after the
                                                      startup packet)

``length`` counts itself but not the type byte.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from typing import Final

import attrs

from protocols.postgres.messages.sqlstate import protocol_violation

__all__ = ["HEADER", "MAX_MESSAGE_LENGTH", "frame", "Frame", "FrameSplitter", "KeepPolicy"]

# A typed message's length field (which counts itself) may be at most this:
# the server refuses anything of 1 GiB or more.
MAX_MESSAGE_LENGTH: Final = (1 << 30) - 1
HEADER: Final = struct.Struct(">cI")  # type byte, length


def frame(type_code: bytes, body: bytes = b"") -> bytes:
    """One typed message: ``type_code`` (one byte), the length, the body."""
    return HEADER.pack(type_code, 4 + len(body)) + body


@attrs.frozen(slots=True)
class Frame:
    """One typed message from a :class:`FrameSplitter`.

    ``body`` is the whole body when ``complete``, else only its first bytes
    (as many as the splitter's ``keep`` asked for): the rest was skipped.
    """

    type_code: bytes
    body_length: int  # the body's full length (the length field minus 4)
    body: bytes

    @property
    def complete(self) -> bool:
        return len(self.body) == self.body_length


#: keep(type_code, body_length) -> how many body bytes to keep (0..body_length).
KeepPolicy = Callable[[bytes, int], int]


class FrameSplitter:
    """Splits a stream of typed messages without buffering what it need not.

    Theory of operation: for each message the splitter reads the 5-byte
    header, asks ``keep(type, body_length)`` how many body bytes the caller
    wants, collects exactly those, hands out a :class:`Frame`, and then only
    counts down the remainder of the body as it streams past. Memory is the
    largest ``keep`` answer, whatever the peer sends. ``keep`` may raise (a
    RemoteProtocolError for a type the stream may not carry, say).

    A frame is handed out as soon as its kept bytes are in: a message whose
    body is skipped (``keep`` said 0) comes out right after its header. The
    chunk passed to :meth:`feed` is not retained.
    """

    __slots__ = ("_keep", "_max_length", "_header", "_type", "_length", "_kept", "_want",
                 "_skip")

    def __init__(self, keep: KeepPolicy, *, max_length: int = MAX_MESSAGE_LENGTH) -> None:
        self._keep = keep
        self._max_length = max_length
        self._header = bytearray()
        self._type = b""
        self._length = 0
        self._kept = bytearray()
        self._want = 0  # body bytes still to keep
        self._skip = 0  # body bytes still to drop

    @property
    def at_boundary(self) -> bool:
        """True between messages (nothing of a message is pending)."""
        return not (self._header or self._want or self._skip)

    def feed(self, data: bytes | bytearray | memoryview) -> Iterator[Frame]:
        """Consume ``data``, yielding each frame as it becomes available.

        Raises RemoteProtocolError (08P01) for a bad length; the splitter is
        then unusable. Consume the iterator fully: bytes are only taken as
        it advances.
        """
        view = memoryview(data).cast("B")
        pos, end = 0, len(view)
        while pos < end:
            if self._skip:
                step = min(self._skip, end - pos)
                self._skip -= step
                pos += step
                continue
            if self._want:
                step = min(self._want, end - pos)
                self._kept += view[pos : pos + step]
                self._want -= step
                pos += step
                if not self._want:
                    yield self._emit(bytes(self._kept))
                continue
            if not self._header and end - pos >= 5:
                type_code, length = HEADER.unpack_from(view, pos)
                pos += 5
            else:
                step = min(5 - len(self._header), end - pos)
                self._header += view[pos : pos + step]
                pos += step
                if len(self._header) < 5:
                    break
                type_code, length = HEADER.unpack(self._header)
                self._header.clear()
            if not 4 <= length <= self._max_length:
                raise protocol_violation(f"invalid message length {length}")
            body = length - 4
            keep = min(max(self._keep(type_code, body), 0), body)
            self._type, self._length = type_code, body
            if keep == body and end - pos >= body:
                # The common case: a small message wholly inside this chunk.
                out = bytes(view[pos : pos + body])
                pos += body
                yield Frame(type_code, body, out)
            elif keep == 0:
                yield self._emit(b"")
            else:
                self._kept = bytearray()
                self._want = keep
        view.release()

    def _emit(self, kept: bytes) -> Frame:
        self._kept = bytearray()
        self._skip = self._length - len(kept)
        return Frame(self._type, self._length, kept)

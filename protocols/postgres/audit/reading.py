"""What both auditors share: reading a kept message body, the bounds,
and the CopyData run (see the package's theory of operation)."""

from __future__ import annotations

from typing import Final, NoReturn

from protocols.auditor import StreamAuditor
from protocols.framing import POSTGRES_MESSAGE, Frame
from protocols.postgres.audit.events import CopyDataEvent, CopyDirection
from protocols.postgres.messages import protocol_violation

DEFAULT_MAX_MESSAGE: Final = 1024 * 1024
_PREFIX_SLACK: Final = 1024  # room for names and counts ahead of the text


# --- reading kept bodies -----------------------------------------------------------


class Cut(Exception):
    """Ran off the kept prefix of a message whose body was partly skipped."""


class Fields:
    """Reads a kept body. Running off its end is malformed when the body is
    whole, and means "cut here" (:class:`Cut`) when it is only a prefix."""

    __slots__ = ("_data", "_pos", "_complete", "_what")

    def __init__(self, frame: Frame, what: str) -> None:
        self._data = frame.body
        self._pos = 0
        self._complete = frame.complete
        self._what = what

    def _short(self) -> NoReturn:
        if self._complete:
            raise protocol_violation(f"{self._what} is truncated")
        raise Cut

    def raw(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            self._short()
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def partial(self, n: int) -> tuple[bytes, bool]:
        """Up to ``n`` bytes, and whether all ``n`` were there (not cut)."""
        out = self._data[self._pos : self._pos + n]
        if len(out) < n and self._complete:
            self._short()
        self._pos += len(out)
        return out, len(out) == n

    def number(self, size: int, *, signed: bool = True) -> int:
        return int.from_bytes(self.raw(size), "big", signed=signed)

    def cstring(self) -> tuple[bytes, bool]:
        """A NUL-terminated string, and whether its end was seen (not cut)."""
        end = self._data.find(b"\x00", self._pos)
        if end < 0:
            if self._complete:
                raise protocol_violation(f"{self._what} has a string without its NUL")
            out = self._data[self._pos :]
            self._pos = len(self._data)
            return out, False
        out = self._data[self._pos : end]
        self._pos = end + 1
        return out, True

    def formats(self) -> tuple[int, ...]:
        codes = tuple(self.number(2) for _ in range(self.number(2, signed=False)))
        if any(code not in (0, 1) for code in codes):
            raise protocol_violation(f"{self._what} has an invalid format code")
        return codes

    def counted(self, a_value: str) -> tuple[tuple[int, ...], int]:
        """Format codes, then how many values follow (Bind's parameters,
        FunctionCall's arguments: ``a_value`` names one, "a parameter")."""
        formats = self.formats()
        count = self.number(2, signed=False)
        if len(formats) not in (0, 1, count):
            noun = a_value.split()[-1]
            raise protocol_violation(f"{self._what} has a format count that matches no {noun} count")
        return formats, count

    def length(self, a_value: str) -> int:
        """One value's length; -1 is NULL."""
        size = self.number(4)
        if size < -1:
            raise protocol_violation(f"{self._what} has {a_value} of negative length")
        return size

    def end(self) -> None:
        if self._complete and self._pos != len(self._data):
            raise protocol_violation(f"{self._what} has unexpected trailing bytes")


def clip_text(data: bytes, limit: int) -> tuple[str, bool]:
    """``data`` cut to ``limit`` bytes and decoded leniently; and whether cut."""
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


# --- the auditors --------------------------------------------------------------------


class Auditor(StreamAuditor):
    """What both directions share: PostgreSQL framing, the bounds, and the
    CopyData run (counted from the headers, bodies skipped unseen)."""

    _direction: CopyDirection

    def __init__(self, *, max_text: int, max_message: int, max_length: int,
                 only: frozenset | None = None) -> None:
        if max_text < 1 or max_message < 1:
            raise ValueError("max_text and max_message must be positive")
        super().__init__(POSTGRES_MESSAGE, max_length=max_length, only=only)
        self._max_text = max_text
        self._max_message = max_message
        self._prefix = max_text + _PREFIX_SLACK
        self._copy_messages = 0
        self._copy_bytes = 0

    def _count_copy(self, size: int) -> None:
        self._copy_messages += 1
        self._copy_bytes += size

    def _flush_copy(self) -> None:
        if self._copy_messages:
            self._events.append(CopyDataEvent(direction=self._direction,
                                              messages=self._copy_messages,
                                              bytes=self._copy_bytes))
            self._copy_messages = self._copy_bytes = 0

    _on_eof = _flush_copy

    def _whole_or_prefix(self, size: int) -> int:
        return size if size <= self._max_message else self._prefix

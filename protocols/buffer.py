"""A capped receive buffer for length-prefixed binary protocols.

Theory of operation
-------------------
Bytes arrive in arbitrary chunks; a parser wants whole messages. The parser
reads a header with :meth:`ReceiveBuffer.consume_exactly` (or looks at it with
:meth:`~ReceiveBuffer.peek`), and either finds the whole message there and
calls :meth:`~ReceiveBuffer.commit`, or finds it incomplete and calls
:meth:`~ReceiveBuffer.rollback`, which puts every byte consumed since the last
commit back, so the next attempt starts from the same header.

Internally there is one ``bytearray`` and two offsets into it::

    [ committed (dead) | consumed, not committed | unread ]
    0                  ^ _start                  ^ _pos   ^ len(_data)

Dropping the dead prefix costs a copy of everything after it, so it is done
lazily, on commit, only once the dead prefix is at least as large as what
remains: each byte is then copied at most a bounded number of times, and a
stream of many small messages costs linear, not quadratic, time.

The cap (``max_size``) bounds what the buffer holds that is not yet committed.
A peer that sends an endless header, or far more than a message may be, gets
a :class:`~protocols.errors.RemoteProtocolError` instead of our memory.
"""

from __future__ import annotations

from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError

__all__ = ["BufferedReceiver", "ReceiveBuffer"]


class ReceiveBuffer:
    """Bytes received from a peer and not yet parsed, at most ``max_size``."""

    __slots__ = ("_data", "_start", "_pos", "_max_size")

    def __init__(self, max_size: int) -> None:
        if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
            raise ValueError(f"max_size must be a positive integer, got {max_size!r}")
        self._data = bytearray()
        self._start = 0  # end of the committed (dead) prefix
        self._pos = 0  # read cursor: end of what has been consumed
        self._max_size = max_size

    @property
    def max_size(self) -> int:
        return self._max_size

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; raise RemoteProtocolError if that exceeds the cap.

        On error nothing is appended: the buffer keeps what it had, but the
        caller should treat the connection as broken.
        """
        held = len(self._data) - self._start
        incoming = memoryview(data).nbytes
        if held + incoming > self._max_size:
            raise RemoteProtocolError(
                f"peer sent more than {self._max_size} bytes without completing a message "
                f"({held} buffered, {incoming} more arrived)",
                code=ErrorCode.BAD_REQUEST,
            )
        self._data += data

    def __len__(self) -> int:
        """Bytes available to read (not yet consumed)."""
        return len(self._data) - self._pos

    def __bool__(self) -> bool:
        return len(self._data) > self._pos

    def peek(self, n: int) -> bytes | None:
        """The next ``n`` bytes without consuming them, or None if fewer are here."""
        end = self._end_of(n)
        if end is None:
            return None
        return bytes(self._data[self._pos : end])

    def consume_exactly(self, n: int) -> bytes | None:
        """Consume and return the next ``n`` bytes, or None (consuming nothing)
        if fewer are available. Undone by :meth:`rollback` until :meth:`commit`."""
        end = self._end_of(n)
        if end is None:
            return None
        out = bytes(self._data[self._pos : end])
        self._pos = end
        return out

    def commit(self) -> None:
        """Make every consume so far final (and maybe reclaim their memory)."""
        self._start = self._pos
        remaining = len(self._data) - self._start
        if self._start and self._start >= remaining:
            # The copy below moves `remaining` bytes, and only happens once at
            # least as many dead bytes have piled up: amortised O(1) per byte.
            del self._data[: self._start]
            self._pos = self._start = 0

    def rollback(self) -> None:
        """Undo every consume since the last :meth:`commit`."""
        self._pos = self._start

    def take_all(self) -> bytes:
        """Consume and commit everything left, e.g. bytes that follow the last
        message of a framed phase and belong to whatever comes next."""
        out = bytes(self._data[self._pos :])
        self._data = bytearray()
        self._pos = self._start = 0
        return out

    def __repr__(self) -> str:
        return f"<ReceiveBuffer {len(self)} unread bytes, cap {self._max_size}>"

    def _end_of(self, n: int) -> int | None:
        if n < 0:
            raise ValueError(f"cannot read a negative number of bytes ({n})")
        end = self._pos + n
        return end if end <= len(self._data) else None


class BufferedReceiver:
    """The receiving half the sans-I/O connections here share: bytes go into
    ``self._buffer`` (a :class:`ReceiveBuffer`), ``b""`` is the peer's EOF,
    and a peer that sends more than the buffer may hold does not make
    :meth:`receive_data` raise (the caller only fed us bytes): the
    connection is poisoned instead, through :meth:`_overflowed`, and the
    next ``next_event()`` says so. A subclass sets ``_buffer``, ``_eof``
    and ``_error`` (None until the connection fails)."""

    __slots__ = ()

    _buffer: ReceiveBuffer
    _eof: bool
    _error: object

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the peer; ``b""`` means the peer closed its side."""
        if not data:
            self._eof = True
            return
        if self._eof:
            raise LocalProtocolError("receive_data() got bytes after EOF (b'')")
        if self._error is not None:
            return  # poisoned: nothing will be parsed again, so keep nothing
        try:
            self._buffer.feed(data)
        except RemoteProtocolError as exc:
            self._overflowed(exc)

    def _overflowed(self, exc: RemoteProtocolError) -> None:
        """Poison the connection with ``exc`` (the buffer's cap was hit), in
        the subclass's own terms."""
        raise NotImplementedError

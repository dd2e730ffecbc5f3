"""Many relayed sessions over one gateway <-> cluster TLS connection.

Why. With one TLS connection per session, every client connection costs a
TLS handshake on both relay processes (most of the CPU of a connection
set-up) and a socket plus OpenSSL state on each side for as long as it
lives. A multiplexed connection ("mux", ALPN ``wicket-mux``) is set up once
per gateway, with the session certificate; after that a new session is one
small frame each way, and an idle one costs no TLS state at all.

Wire format (version 1; docs/wire.md says the same in prose)
------------------------------------------------------------
Both directions carry frames::

    frame  := type:u8 | stream:u32 big-endian | length:u32 big-endian | payload
    type     1 OPEN    gateway -> cluster; payload: a dial frame (DialRequest,
                       see protocols.dial) for a new stream id
             2 REPLY   cluster -> gateway; payload: a dial frame (DialAccept or
                       DialError) answering the OPEN of that stream
             3 DATA    the session's bytes, 1..MAX_DATA of them
             4 FIN     the sender will send no more DATA on that stream
                       (half-close; the other direction goes on)
             5 RESET   the stream is over both ways; payload: a UTF-8
                       reason, at most MAX_REASON bytes
             6 WINDOW  payload: u32, 1..2^31-1: the receiver took that many
                       more DATA bytes off the stream

Streams. Only the gateway opens streams, with ids strictly increasing from
1. The gateway may send DATA (at most EARLY_DATA bytes) and FIN right behind
its OPEN, without waiting for the REPLY: a client's first bytes travel with
the OPEN, so a session starts one round trip sooner. The cluster holds them until
it decides and passes them on only after accepting; a DialError reply ends
the stream and discards them. The cluster sends DATA and FIN only after its
DialAccept. A stream ends when both sides sent FIN, or on a RESET from either
side. Frames for a stream id that was used and has ended are ignored (they
crossed a DialError or a RESET on the wire); frames for an id never opened
are a protocol error.

Flow control. Each side may have at most INITIAL_WINDOW bytes of DATA per
stream that the receiver has not yet acknowledged with WINDOW. A receiver
acknowledges bytes once it has passed them on (written them to the
session's socket), so a slow reader holds back its own stream only, never
the connection: the receiver never stops reading the connection, and what it
buffers for one stream is bounded by the window. DATA beyond the window is
a protocol error. Receivers acknowledge in batches (once a quarter of a
window is due), so a stream of small messages does not double the frame
count, and a bulk one keeps three quarters of a window in flight.

Any protocol error ends the whole connection (and with it its streams).

Theory of operation
-------------------
A DATA payload is handed on as it arrives, in as many :class:`StreamData`
events as it takes, not once the whole frame is in: a bulk frame is never
buffered whole, and its first bytes reach the socket while the rest is
still on the wire. The header is checked (window, stream state) before any
of it is delivered.

The header layout, its errors and NEED_DATA are the shared ones
(:data:`protocols.framing.MUX_FRAME`, :mod:`protocols.signals`), but not the
splitter's buffer: a relay hands its read buffer over ``borrowed`` and gets
DATA back as memoryviews into it, pieces of a frame as they come, so the
bytes of a session are never copied here. A
:class:`~protocols.framing.FrameSplitter` copies what it keeps and yields
whole frames; this is the per-message hot path of every session, and a
micro-benchmark (tests/unit/protocols/microbench.py) keeps it honest.

:class:`MuxConnection` is sans-I/O, in the h11 manner: ``receive_data`` takes
plaintext from the TLS connection, ``next_event`` returns one event or
``NEED_DATA``, and the ``send_*`` methods return the bytes to write. It keeps
each stream's state and both windows, and checks every rule above on both
sides: what we are about to send (:class:`LocalProtocolError`) and what the
peer sent (:class:`RemoteProtocolError`). It knows nothing of sockets, TLS or
what a DialRequest means: the relay engine does the I/O, the cluster decides
what to answer.
"""

from __future__ import annotations

import enum
import struct
from typing import Final, Literal, Union

import attrs

from protocols.dial import DialAccept, DialError, DialRequest, decode_event, encode_event
from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.framing import MUX_FRAME
from protocols.signals import NEED_DATA, Signal

__all__ = [
    "ALPN", "EARLY_DATA", "HEADER", "INITIAL_WINDOW", "MAX_DATA", "MAX_REASON", "MAX_STREAM_ID", "NEED_DATA",
    "FrameType", "Role", "MuxConnection", "MuxEvent",
    "StreamOpened", "StreamReplied", "StreamData", "StreamFin", "StreamReset", "StreamWindow",
]

ALPN: Final = "wicket-mux"

HEADER: Final = MUX_FRAME.header  # type, stream, length
INITIAL_WINDOW: Final = 2 * 1024 * 1024
EARLY_DATA: Final = 64 * 1024  # DATA the gateway may send on a stream before its REPLY
MAX_DATA: Final = 256 * 1024
MAX_CONTROL: Final = 4 + 65536  # one whole dial frame
MAX_REASON: Final = 1024
MAX_STREAM_ID: Final = 2**32 - 1
MAX_WINDOW: Final = 2**31 - 1
_WINDOW = struct.Struct(">I")
_HEADER_SIZE = HEADER.size
_unpack_header = HEADER.unpack_from
_pack_header = HEADER.pack
_ACK_AT = INITIAL_WINDOW // 4  # acknowledge once this much is due


class FrameType(enum.IntEnum):
    OPEN = 1
    REPLY = 2
    DATA = 3
    FIN = 4
    RESET = 5
    WINDOW = 6


_DATA: Final = int(FrameType.DATA)


class Role(enum.Enum):
    GATEWAY = "gateway"  # opens streams
    CLUSTER = "cluster"  # answers them


@attrs.frozen(slots=True)
class StreamOpened:
    """(cluster) The gateway asks for a session."""
    stream: int
    request: DialRequest


@attrs.frozen(slots=True)
class StreamReplied:
    """(gateway) The cluster's answer to our OPEN."""
    stream: int
    reply: DialAccept | DialError


@attrs.frozen(slots=True)
class StreamData:
    """Payload bytes, as a memoryview: no copy is made of them. Valid until
    :meth:`MuxConnection.release` if they came in borrowed."""
    stream: int
    data: memoryview


@attrs.frozen(slots=True)
class StreamFin:
    """The peer sent its last DATA on this stream."""
    stream: int


@attrs.frozen(slots=True)
class StreamReset:
    """The peer ended the stream both ways; it is forgotten."""
    stream: int
    reason: str


@attrs.frozen(slots=True)
class StreamWindow:
    """The peer acknowledged DATA: ``send_window(stream)`` grew."""
    stream: int


MuxEvent = Union[StreamOpened, StreamReplied, StreamData, StreamFin, StreamReset, StreamWindow]


class _Stream:
    __slots__ = ("accepted", "send_window", "recv_window", "unacked", "local_fin", "remote_fin", "early_left",
                 "early_in")

    def __init__(self) -> None:
        self.accepted = False  # a DialAccept went (cluster) or came (gateway)
        self.early_left = EARLY_DATA  # (gateway) DATA we may still send before the REPLY
        self.early_in = EARLY_DATA  # (cluster) DATA the gateway may still send before our REPLY
        self.send_window = INITIAL_WINDOW  # DATA we may still send
        self.recv_window = INITIAL_WINDOW  # DATA the peer may still send
        self.unacked = 0  # DATA passed on but not yet acknowledged with WINDOW
        self.local_fin = False
        self.remote_fin = False

    def window(self) -> int:
        """DATA that may be sent now: the window, and before the REPLY also
        what is left of EARLY_DATA."""
        return self.send_window if self.accepted else min(self.send_window, self.early_left)

    def spend(self, n: int) -> None:
        self.send_window -= n
        if not self.accepted:
            self.early_left -= n


_remote = MUX_FRAME.error  # the peer broke the protocol: BAD_REQUEST

def _local(message: str) -> LocalProtocolError:
    return LocalProtocolError(message, code=ErrorCode.INTERNAL_ERROR)


class MuxConnection:
    """One side of a multiplexed connection; see the module docstring."""

    def __init__(self, role: Role) -> None:
        self.role = role
        # Received, not yet parsed. Normally an immutable bytes object, so
        # DATA payloads can be handed out as memoryviews of it (no copy) that
        # stay valid whatever arrives next; the caller's own memory between
        # a borrowed receive_data and release().
        self._buf: bytes | bytearray | memoryview = b""
        self._pos = 0
        self._streams: dict[int, _Stream] = {}
        self._last_id = 0  # the highest stream id opened so far
        self._error: RemoteProtocolError | None = None
        # The DATA frame being delivered: its stream (None: skip, the stream
        # ended) and how many payload bytes are still to come.
        self._data_stream: int | None = None
        self._data_left = 0

    # -- introspection ---------------------------------------------------

    def __len__(self) -> int:
        """Streams not yet over."""
        return len(self._streams)

    def unparsed(self) -> int:
        """Bytes received and not yet turned into events."""
        return len(self._buf) - self._pos

    def is_live(self, stream: int) -> bool:
        return stream in self._streams

    def send_window(self, stream: int) -> int:
        """DATA bytes we may send on ``stream`` now (0 if it is over)."""
        s = self._streams.get(stream)
        if s is None or s.local_fin:
            return 0
        return s.send_window if s.accepted else s.window()

    # -- receiving -------------------------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview, *, borrowed: bool = False) -> None:
        """Add plaintext from the connection (not b"": the connection's end
        is the I/O layer's business, it ends every stream).

        ``borrowed=True`` skips the copy: ``data`` must then stay unchanged
        until :meth:`release` is called, and the payloads of the
        :class:`StreamData` events parsed from it are only valid until then
        (copy what you keep). A relay reading into one scratch buffer saves
        a copy of every byte this way."""
        if self._error is not None:
            raise _remote(f"the connection already failed: {self._error}")
        if self._pos == len(self._buf):
            self._buf = data if borrowed else bytes(data)
        else:
            # Only a partial header or control frame is ever left over
            # (DATA is handed on as it arrives), so this join is rare and
            # small, unless the caller stopped taking events.
            self._buf = bytes(self._buf[self._pos:]) + bytes(data)
        self._pos = 0

    def release(self) -> None:
        """Stop relying on borrowed bytes (see :meth:`receive_data`): keep a
        copy of whatever is not parsed yet."""
        if type(self._buf) is not bytes:
            self._buf = bytes(self._buf[self._pos:]) if self._pos < len(self._buf) else b""
            self._pos = 0

    def next_event(self) -> MuxEvent | Literal[Signal.NEED_DATA]:
        """The next event, or ``NEED_DATA``. Raises
        :class:`RemoteProtocolError` (and stays failed) if the peer broke the
        protocol."""
        if self._error is not None:
            raise _remote(f"the connection already failed: {self._error}")
        try:
            while True:
                event = self._next()
                if event is not None:
                    return event
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next(self) -> MuxEvent | Literal[Signal.NEED_DATA] | None:
        buf, pos = self._buf, self._pos
        left = self._data_left
        if not left:
            if len(buf) - pos < _HEADER_SIZE:
                return NEED_DATA
            kind, stream, length = _unpack_header(buf, pos)
            if kind != _DATA:
                return self._control(buf, pos, kind, stream, length)
            if length > MAX_DATA:
                raise _remote(f"DATA frame is {length} bytes long; the limit is {MAX_DATA}")
            pos += _HEADER_SIZE
            self._pos = pos
            self._data_stream = self._check_data(stream, length)
            left = self._data_left = length
        # The payload, or as much of it as is here.
        take = len(buf) - pos
        if not take:
            return NEED_DATA
        if take > left:
            take = left
        self._data_left = left - take
        self._pos = pos + take
        if self._data_stream is None:
            return None  # skipping the payload of an ended stream
        return StreamData(self._data_stream, memoryview(buf)[pos:pos + take])

    def take_data(self, pieces: list, limit: int) -> int | None:
        """The relay's fast path through the usual bytes: the DATA of one
        established stream at the head of what was received, without an
        event per frame. Its payload pieces (memoryviews, as
        :class:`StreamData` carries them) are appended to ``pieces``, frame
        after frame, until a frame that is not DATA of that stream, the end
        of what was received, or ``limit`` pieces in the list; returns the
        stream's id. None when it took nothing: nothing came, or the head
        is anything else (a control frame, a DATA header that needs the full
        checks, the payload of an ended stream, a failed connection); then
        :meth:`next_event` says what it is. The same pieces as the
        :class:`StreamData` events :meth:`next_event` would return, in the
        same order, with the same checks (a header beyond them is left to
        it); the run may be empty when only a header came."""
        if self._error is not None:
            return None
        buf, pos = self._buf, self._pos
        start, end = pos, len(buf)
        left = self._data_left
        sid = self._data_stream if left else None
        if left and sid is None:
            return None  # skipping an ended stream's payload
        streams = self._streams
        view = None
        while len(pieces) < limit:
            if not left:
                if end - pos < _HEADER_SIZE:
                    break
                kind, stream, length = _unpack_header(buf, pos)
                if kind != _DATA or (sid is not None and stream != sid):
                    break
                s = streams.get(stream)
                if s is None or not s.accepted or s.remote_fin or not 0 < length <= s.recv_window \
                        or length > MAX_DATA:
                    break  # next_event's full checks (and errors)
                s.recv_window -= length
                pos += _HEADER_SIZE
                sid = self._data_stream = stream
                left = length
            take = end - pos
            if not take:
                break
            if take > left:
                take = left
            if view is None:
                view = memoryview(buf)
            pieces.append(view[pos:pos + take])
            pos += take
            left -= take
        if pos == start:
            return None
        self._pos = pos
        self._data_left = left
        return sid

    def _control(self, buf, pos: int, kind: int, stream: int,
                 length: int) -> MuxEvent | Literal[Signal.NEED_DATA] | None:
        """A frame other than DATA, whose header starts at ``pos``."""
        if length > MAX_CONTROL:
            raise _remote(f"frame of type {kind} is {length} bytes long; the limit is {MAX_CONTROL}")
        end = pos + HEADER.size + length
        if len(buf) < end:
            return NEED_DATA
        payload = bytes(buf[pos + HEADER.size:end])  # a slice of bytes is not copied twice
        self._pos = end
        return self._handle(kind, stream, payload)

    def _check_data(self, stream_id: int, length: int) -> int | None:
        """A DATA header: the stream to deliver to, None to skip it."""
        s = self._streams.get(stream_id)
        if s is not None and s.accepted and not s.remote_fin and 0 < length <= s.recv_window:
            s.recv_window -= length  # an established stream's DATA, checked at once
            return stream_id
        s = self._live(stream_id, "DATA")
        if s is None:
            return None
        if not length:
            raise _remote(f"empty DATA frame on stream {stream_id}")
        if s.remote_fin or not (s.accepted or self.role is Role.CLUSTER):
            raise _remote(f"DATA on stream {stream_id} " + ("after FIN" if s.remote_fin else "before it was accepted"))
        if length > s.recv_window:
            raise _remote(f"DATA on stream {stream_id} exceeds its window ({length} > {s.recv_window})")
        if not s.accepted:
            if length > s.early_in:
                raise _remote(f"more than {EARLY_DATA} bytes of DATA on stream {stream_id} before its REPLY")
            s.early_in -= length
        s.recv_window -= length
        return stream_id

    def _handle(self, kind: int, stream_id: int, payload: bytes) -> MuxEvent | None:
        if kind == FrameType.WINDOW:
            s = self._live(stream_id, "WINDOW")
            if s is None:
                return None
            if len(payload) != 4:
                raise _remote(f"WINDOW payload must be 4 bytes, not {len(payload)}")
            (increment,) = _WINDOW.unpack(payload)
            if not 1 <= increment <= MAX_WINDOW or s.send_window + increment > MAX_WINDOW:
                raise _remote(f"bad WINDOW increment {increment} on stream {stream_id}")
            s.send_window += increment
            return StreamWindow(stream_id)
        if kind == FrameType.FIN:
            s = self._live(stream_id, "FIN")
            if s is None:
                return None
            if payload or s.remote_fin or not (s.accepted or self.role is Role.CLUSTER):
                raise _remote(f"unexpected FIN on stream {stream_id}")
            s.remote_fin = True
            self._maybe_over(stream_id, s)
            return StreamFin(stream_id)
        if kind == FrameType.RESET:
            if len(payload) > MAX_REASON:
                raise _remote(f"RESET reason is {len(payload)} bytes; the limit is {MAX_REASON}")
            s = self._live(stream_id, "RESET")
            if s is None:
                return None
            try:
                reason = payload.decode("utf-8")
            except UnicodeDecodeError:
                raise _remote("RESET reason is not UTF-8") from None
            del self._streams[stream_id]
            return StreamReset(stream_id, reason)
        if kind == FrameType.OPEN:
            if self.role is not Role.CLUSTER:
                raise _remote("only the gateway opens streams")
            if not self._last_id < stream_id <= MAX_STREAM_ID:
                raise _remote(f"stream id {stream_id} is not above the last one ({self._last_id})")
            request = self._dial_payload(payload)
            if not isinstance(request, DialRequest):
                raise _remote(f"OPEN must carry a DialRequest, not a {type(request).__name__}")
            self._last_id = stream_id
            self._streams[stream_id] = _Stream()
            return StreamOpened(stream_id, request)
        if kind == FrameType.REPLY:
            if self.role is not Role.GATEWAY:
                raise _remote("only the cluster replies to streams")
            s = self._live(stream_id, "REPLY")
            if s is None:
                return None
            if s.accepted:
                raise _remote(f"second REPLY on stream {stream_id}")
            reply = self._dial_payload(payload)
            if isinstance(reply, DialRequest):
                raise _remote("REPLY must carry a DialAccept or a DialError")
            if isinstance(reply, DialError):
                del self._streams[stream_id]
            else:
                s.accepted = True
            return StreamReplied(stream_id, reply)
        raise _remote(f"unknown frame type {kind}")

    def _live(self, stream_id: int, what: str) -> _Stream | None:
        s = self._streams.get(stream_id)
        if s is None and not 0 < stream_id <= self._last_id:
            raise _remote(f"{what} for stream {stream_id}, which was never opened")
        return s  # None: it ended and this frame crossed its end

    @staticmethod
    def _dial_payload(payload: bytes):
        try:
            return decode_event(payload)
        except RemoteProtocolError as exc:
            raise RemoteProtocolError(f"bad dial frame in a mux frame: {exc.message}", code=exc.code) from None

    def _maybe_over(self, stream_id: int, s: _Stream) -> None:
        if s.local_fin and s.remote_fin:
            del self._streams[stream_id]

    # -- sending ---------------------------------------------------------

    def send_open(self, request: DialRequest) -> tuple[int, bytes]:
        """(gateway) A new stream asking for ``request``: its id and bytes."""
        if self.role is not Role.GATEWAY:
            raise _local("only the gateway opens streams")
        if self._last_id >= MAX_STREAM_ID:
            raise _local("stream ids are used up on this connection; open a new one")
        self._last_id += 1
        self._streams[self._last_id] = _Stream()
        payload = encode_event(request)
        return self._last_id, _frame(FrameType.OPEN, self._last_id, payload)

    def send_reply(self, stream_id: int, reply: DialAccept | DialError) -> bytes:
        """(cluster) Answer an OPEN; a DialError ends the stream."""
        if self.role is not Role.CLUSTER:
            raise _local("only the cluster replies")
        s = self._streams.get(stream_id)
        if s is None or s.accepted:
            raise _local(f"stream {stream_id} is not waiting for a reply")
        payload = encode_event(reply)
        if isinstance(reply, DialError):
            del self._streams[stream_id]
        else:
            s.accepted = True
        return _frame(FrameType.REPLY, stream_id, payload)

    def send_data_header(self, stream_id: int, n: int) -> bytes:
        """The header of one DATA frame of ``n`` bytes (at most MAX_DATA and
        the window), for a caller that has the payload in its own buffer
        right behind room for the header (no copy of the payload)."""
        s = self._streams.get(stream_id)
        if s is not None and s.accepted and not s.local_fin and 0 < n <= s.send_window and n <= MAX_DATA:
            s.send_window -= n  # an established stream's DATA, checked at once
            return _pack_header(_DATA, stream_id, n)
        s = self._sendable(stream_id)
        window = s.window()
        if not 0 < n <= window or n > MAX_DATA:
            raise _local(f"{n} bytes do not fit one DATA frame on stream {stream_id} (window {window})")
        s.spend(n)
        return _pack_header(_DATA, stream_id, n)

    def send_data(self, stream_id: int, data: bytes | bytearray | memoryview) -> bytes:
        """DATA frames for ``data`` (split at MAX_DATA); at most
        ``send_window(stream_id)`` bytes."""
        s = self._sendable(stream_id)
        n = len(data)
        if not 0 < n <= s.window():
            raise _local(f"{n} bytes do not fit stream {stream_id}'s window ({s.window()})")
        s.spend(n)
        if n <= MAX_DATA:
            return HEADER.pack(FrameType.DATA, stream_id, n) + data
        out = bytearray()
        view = memoryview(data)
        for start in range(0, n, MAX_DATA):
            chunk = view[start:start + MAX_DATA]
            out += HEADER.pack(FrameType.DATA, stream_id, len(chunk))
            out += chunk
        return bytes(out)

    def send_fin(self, stream_id: int) -> bytes:
        s = self._sendable(stream_id)
        s.local_fin = True
        self._maybe_over(stream_id, s)
        return _frame(FrameType.FIN, stream_id, b"")

    def send_reset(self, stream_id: int, reason: str) -> bytes:
        """End ``stream_id`` both ways (b"" if it is already over)."""
        if self._streams.pop(stream_id, None) is None:
            return b""
        payload = reason.encode("utf-8")[:MAX_REASON]
        # Cut at a character boundary.
        payload = payload.decode("utf-8", "ignore").encode("utf-8")
        return _frame(FrameType.RESET, stream_id, payload)

    def acknowledge(self, stream_id: int, n: int) -> bytes:
        """We passed ``n`` received bytes on: a WINDOW frame once a quarter
        of a window is due, else b""."""
        s = self._streams.get(stream_id)
        if s is None or s.remote_fin:
            return b""  # the peer sends no more: nothing to acknowledge
        s.unacked += n
        if s.unacked < _ACK_AT:
            return b""
        increment, s.unacked = s.unacked, 0
        s.recv_window += increment
        return _frame(FrameType.WINDOW, stream_id, _WINDOW.pack(increment))

    def _sendable(self, stream_id: int) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None or s.local_fin or not (s.accepted or self.role is Role.GATEWAY):
            raise _local(f"stream {stream_id} cannot carry DATA or FIN now")
        return s


def _frame(kind: FrameType, stream_id: int, payload: bytes) -> bytes:
    return HEADER.pack(kind, stream_id, len(payload)) + payload

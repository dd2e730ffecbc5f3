"""MySQL packets and the field codec every MySQL message shares.

Spec: MySQL Source Code Documentation, "Client/Server Protocol": MySQL
Packets, Sending More Than 16Mb, Basic Data Types (Integer Types: fixed and
length-encoded; String Types: fixed, NUL-terminated, length-encoded,
rest-of-packet)::

    packet   := payload_length:int<3> (little-endian) | sequence_id:int<1> | payload

Theory of operation
-------------------
A payload of 2^24-1 bytes or more is sent as several packets: every packet
but the last carries exactly 2^24-1 bytes, and a payload whose length is a
multiple of 2^24-1 ends with an empty packet. :func:`encode_packets` does
the splitting; :class:`PacketChannel` does the reading (through
:mod:`protocols.framing`'s splitter with the ``MYSQL_PACKET`` layout) and
puts the pieces back together, up to ``max_packet`` bytes of payload.

Sequence ids: each packet of an exchange carries the next id, whichever
side sends it (modulo 256); the connection phase is one exchange, and every
command starts a new one at 0. A :class:`PacketChannel` keeps that one
counter for both directions: ``read`` checks the id of every packet it takes
(a wrong one is ER_NET_PACKETS_OUT_OF_ORDER, as servers say), ``write``
stamps the next ones, ``reset`` starts a new exchange.

:class:`Reader` reads a payload front to back; running off its end, or a
length-encoded integer's reserved first byte, is a RemoteProtocolError whose
``wire_hint`` is the error number the reader was made with.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import Final, NoReturn

from protocols.buffer import ReceiveBuffer
from protocols.errors import ErrorCode, LocalProtocolError, RemoteProtocolError
from protocols.framing import MYSQL_PACKET, FrameSplitter
from protocols.mysql.constants import MAX_PAYLOAD, ErrorNumber

__all__ = [
    "HEADER_SIZE", "DEFAULT_MAX_PACKET", "malformed", "invalid", "Cut", "Reader", "lenenc_int",
    "lenenc_bytes", "nul_bytes", "encode_packets", "PacketChannel",
]

HEADER_SIZE: Final = 4
#: The default bound on a reassembled payload: MySQL's default
#: max_allowed_packet (64 MiB).
DEFAULT_MAX_PACKET: Final = 64 * 1024 * 1024
_U16: Final = struct.Struct("<H")
_U32: Final = struct.Struct("<I")
_U64: Final = struct.Struct("<Q")


def malformed(message: str, errno: int = ErrorNumber.ER_MALFORMED_PACKET,
              code: ErrorCode = ErrorCode.BAD_REQUEST) -> NoReturn:
    raise RemoteProtocolError(message, code=code, wire_hint=int(errno))


def invalid(message: str) -> NoReturn:
    raise LocalProtocolError(message, code=ErrorCode.BAD_REQUEST)


class Cut(Exception):
    """Ran off the end of a payload the auditor only kept a prefix of."""


class Reader:
    """Reads a payload front to back; every error names ``what`` and
    carries ``errno`` as its wire hint. With ``complete=False`` the data is
    only a payload's prefix: running off its end raises :class:`Cut`."""

    __slots__ = ("_data", "_pos", "_what", "_errno", "_complete")

    def __init__(self, data: bytes, what: str,
                 errno: int = ErrorNumber.ER_MALFORMED_PACKET, *, complete: bool = True) -> None:
        self._data = data
        self._pos = 0
        self._what = what
        self._errno = errno
        self._complete = complete

    def fail(self, message: str) -> NoReturn:
        malformed(f"{self._what}: {message}", self._errno)

    def _short(self, message: str) -> NoReturn:
        if not self._complete:
            raise Cut
        self.fail(message)

    def _take(self, n: int) -> bytes:
        end = self._pos + n
        if end > len(self._data):
            self._short("truncated")
        out = self._data[self._pos : end]
        self._pos = end
        return out

    def int1(self) -> int:
        return self._take(1)[0]

    def int2(self) -> int:
        return int(_U16.unpack(self._take(2))[0])

    def int3(self) -> int:
        return int.from_bytes(self._take(3), "little")

    def int4(self) -> int:
        return int(_U32.unpack(self._take(4))[0])

    def int8(self) -> int:
        return int(_U64.unpack(self._take(8))[0])

    def lenenc_int(self) -> int:
        """A length-encoded integer. 0xFB (NULL in a row) and 0xFF are not
        integers: here they are malformed."""
        first = self.int1()
        if first < 0xFB:
            return first
        if first == 0xFC:
            return self.int2()
        if first == 0xFD:
            return self.int3()
        if first == 0xFE:
            return self.int8()
        self.fail(f"0x{first:02X} does not start a length-encoded integer")

    def lenenc_bytes(self) -> bytes:
        return self._take(self.lenenc_int())

    def nul_bytes(self) -> bytes:
        end = self._data.find(b"\x00", self._pos)
        if end < 0:
            self._short("a string lacks its NUL terminator")
        out = self._data[self._pos : end]
        self._pos = end + 1
        return out

    def nul_or_rest(self) -> bytes:
        """A NUL-terminated string, or the rest of the payload if it has no
        NUL (some servers leave the auth plugin name unterminated)."""
        if self._data.find(b"\x00", self._pos) < 0:
            return self.rest()
        return self.nul_bytes()

    def raw(self, n: int) -> bytes:
        return self._take(n)

    def skip(self, n: int) -> None:
        self._take(n)

    def rest(self) -> bytes:
        out = self._data[self._pos :]
        self._pos = len(self._data)
        return out

    @property
    def consumed(self) -> int:
        """Bytes read so far."""
        return self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def at_end(self) -> bool:
        return self._pos == len(self._data)

    def peek(self) -> int | None:
        return self._data[self._pos] if self._pos < len(self._data) else None

    def end(self) -> None:
        if self._complete and self._pos != len(self._data):
            self.fail(f"{len(self._data) - self._pos} unexpected trailing bytes")


def lenenc_int(value: int) -> bytes:
    """A length-encoded integer (0 .. 2^64-1)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 64:
        invalid(f"a length-encoded integer is 0..2^64-1, not {value!r}")
    if value < 0xFB:
        return bytes([value])
    if value < 1 << 16:
        return b"\xfc" + _U16.pack(value)
    if value < 1 << 24:
        return b"\xfd" + value.to_bytes(3, "little")
    return b"\xfe" + _U64.pack(value)


def lenenc_bytes(value: bytes) -> bytes:
    return lenenc_int(len(value)) + value


def nul_bytes(value: bytes, what: str = "a string") -> bytes:
    if b"\x00" in value:
        invalid(f"{what} may not contain NUL")
    return value + b"\x00"


def encode_packets(payload: bytes, seq: int) -> tuple[bytes, int]:
    """``payload`` as packets numbered from ``seq``; returns the bytes and
    the sequence id after the last packet."""
    out = bytearray()
    pos = 0
    while True:
        chunk = payload[pos : pos + MAX_PAYLOAD]
        out += len(chunk).to_bytes(3, "little") + bytes([seq]) + chunk
        seq = (seq + 1) & 0xFF
        pos += len(chunk)
        if len(chunk) < MAX_PAYLOAD:
            return bytes(out), seq


class PacketChannel:
    """One side's view of an exchange: reads whole payloads out of a buffer
    the caller owns, checking sequence ids, and numbers the packets it
    writes; see the module doc."""

    __slots__ = ("max_packet", "_splitter", "_seq", "_parts", "_held", "_what")

    def __init__(self, *, max_packet: int = DEFAULT_MAX_PACKET, what: str = "peer") -> None:
        if max_packet < 1:
            raise ValueError("max_packet must be positive")
        self.max_packet = max_packet
        self._splitter = FrameSplitter(MYSQL_PACKET)
        self._seq = 0
        self._parts: list[bytes] = []  # a payload being reassembled
        self._held = 0
        self._what = what

    @property
    def seq(self) -> int:
        """The sequence id the next packet (either way) must carry."""
        return self._seq

    @property
    def at_boundary(self) -> bool:
        """No payload is half reassembled."""
        return not self._parts

    def reset(self, seq: int = 0) -> None:
        """A new exchange (a command) starts: ids count from ``seq``."""
        if self._parts:
            raise LocalProtocolError("cannot reset the sequence in the middle of a payload")
        self._seq = seq

    def read(self, buffer: ReceiveBuffer) -> bytes | None:
        """The next whole payload from ``buffer`` (its packets consumed), or
        None while it is incomplete. RemoteProtocolError for a wrong
        sequence id (1156) or a payload over ``max_packet`` (1153)."""
        while True:
            head = buffer.peek(HEADER_SIZE)
            if head is None:
                return None
            if head[3] != self._seq:
                malformed(f"the {self._what} sent packet {head[3]} where {self._seq} was due "
                          f"(packets out of order)", ErrorNumber.ER_NET_PACKETS_OUT_OF_ORDER)
            length = int.from_bytes(head[:3], "little")
            if self._held + length > self.max_packet:
                malformed(f"the {self._what} sent a payload over {self.max_packet} bytes",
                          ErrorNumber.ER_NET_PACKET_TOO_LARGE)
            frame = self._splitter.read_frame(buffer)
            if frame is None:
                return None
            self._seq = (self._seq + 1) & 0xFF
            if frame.body_length < MAX_PAYLOAD and not self._parts:
                return frame.body
            self._parts.append(frame.body)
            self._held += frame.body_length
            if frame.body_length < MAX_PAYLOAD:
                payload = b"".join(self._parts)
                self._parts, self._held = [], 0
                return payload

    def abandon(self) -> None:
        """Drop a half-reassembled payload (the connection is failing and
        only an ERR will still be written)."""
        self._parts, self._held = [], 0

    def write(self, payload: bytes) -> bytes:
        """``payload`` as packets carrying the next sequence ids."""
        if self._parts:
            raise LocalProtocolError("cannot write while a peer's payload is half read")
        out, self._seq = encode_packets(payload, self._seq)
        return out


def iter_packets(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(sequence id, payload) of each whole packet in ``data``, for tests
    and logs; a trailing partial packet is left out."""
    pos = 0
    while pos + HEADER_SIZE <= len(data):
        length = int.from_bytes(data[pos : pos + 3], "little")
        if pos + HEADER_SIZE + length > len(data):
            return
        yield data[pos + 3], data[pos + HEADER_SIZE : pos + HEADER_SIZE + length]
        pos += HEADER_SIZE + length

"""The generic response packets: OK, ERR and EOF.

Spec: MySQL Source Code Documentation, "Client/Server Protocol", Generic
Response Packets (OK_Packet, ERR_Packet, EOF_Packet); MariaDB Server docs,
"ERR_Packet" (progress reports, error 0xFFFF).

Their layouts depend on the capabilities both ends agreed (SESSION_TRACK,
DEPRECATE_EOF), passed in. A bad packet received is a RemoteProtocolError
with ER_MALFORMED_PACKET (1835).
"""

from __future__ import annotations

import attrs

from protocols.mysql.constants import SQLSTATE_OF, Capability, ServerStatus
from protocols.mysql.fields import frozen, text, uint, wire
from protocols.mysql.packets import Reader, invalid, lenenc_bytes, lenenc_int

__all__ = ["OkPacket", "ErrPacket", "EofPacket", "is_eof"]


@frozen
class OkPacket:
    """OK_Packet (0x00; 0xFE when it ends a result set under
    CLIENT_DEPRECATE_EOF). ``session_state`` is the raw session state
    information, present when ``status`` has SESSION_STATE_CHANGED."""

    affected_rows: int = attrs.field(default=0, validator=uint(64))
    last_insert_id: int = attrs.field(default=0, validator=uint(64))
    status: int = attrs.field(default=ServerStatus.AUTOCOMMIT, validator=uint(16))
    warnings: int = attrs.field(default=0, validator=uint(16))
    info: bytes = b""
    session_state: bytes | None = None
    header: int = attrs.field(default=0x00)

    def __attrs_post_init__(self) -> None:
        if self.header not in (0x00, 0xFE):
            invalid("an OK packet's header is 0x00 or 0xFE")
        if (self.session_state is not None) != bool(
                self.status & ServerStatus.SESSION_STATE_CHANGED):
            invalid("session_state is given exactly when SESSION_STATE_CHANGED is set")

    def encode(self, capabilities: Capability) -> bytes:
        out = bytearray([self.header])
        out += lenenc_int(self.affected_rows) + lenenc_int(self.last_insert_id)
        out += self.status.to_bytes(2, "little") + self.warnings.to_bytes(2, "little")
        if Capability.SESSION_TRACK in capabilities:
            if self.info or self.session_state is not None:
                out += lenenc_bytes(self.info)
            if self.session_state is not None:
                out += lenenc_bytes(self.session_state)
        else:
            out += self.info
        return bytes(out)

    @classmethod
    def decode(cls, payload: bytes, capabilities: Capability) -> OkPacket:
        reader = Reader(payload, "the OK packet")
        header = reader.int1()
        if header not in (0x00, 0xFE):
            reader.fail("not an OK packet")
        affected, insert_id = reader.lenenc_int(), reader.lenenc_int()
        status, warnings = reader.int2(), reader.int2()
        state = None
        if Capability.SESSION_TRACK in capabilities:
            info = b"" if reader.at_end() else reader.lenenc_bytes()
            if status & ServerStatus.SESSION_STATE_CHANGED:
                state = reader.lenenc_bytes()
            reader.end()
        else:
            info = reader.rest()
            status &= ~ServerStatus.SESSION_STATE_CHANGED
        return cls(affected_rows=affected, last_insert_id=insert_id, status=status,
                   warnings=warnings, info=info, session_state=state, header=header)


@frozen
class ErrPacket:
    """ERR_Packet (0xFF). ``sqlstate`` is None when the server left out the
    '#' marker (before PROTOCOL_41, or some early handshake errors)."""

    errno: int = attrs.field(validator=uint(16))
    sqlstate: str | None = "HY000"
    message: str = ""

    def __attrs_post_init__(self) -> None:
        if self.sqlstate is not None and not (len(self.sqlstate) == 5 and
                                              self.sqlstate.isascii()):
            invalid("a SQLSTATE is 5 ASCII characters")
        if self.errno == 0xFFFF:
            invalid("error number 0xFFFF is MariaDB's progress report, not an error")

    @classmethod
    def of(cls, errno: int, message: str) -> ErrPacket:
        """An ERR with the SQLSTATE servers send with ``errno``."""
        return cls(errno=errno, sqlstate=SQLSTATE_OF.get(errno, "HY000"), message=message)

    def encode(self) -> bytes:
        marker = b"" if self.sqlstate is None else b"#" + self.sqlstate.encode("ascii")
        return b"\xff" + self.errno.to_bytes(2, "little") + marker + wire(self.message)

    @classmethod
    def decode(cls, payload: bytes) -> ErrPacket:
        reader = Reader(payload, "the ERR packet")
        if reader.int1() != 0xFF:
            reader.fail("not an ERR packet")
        errno = reader.int2()
        if errno == 0xFFFF:
            reader.fail("a progress report where an error was due")
        sqlstate = None
        if reader.peek() == 0x23:  # '#'
            reader.skip(1)
            raw = reader.raw(5)
            if not raw.isascii():
                reader.fail("the SQLSTATE is not ASCII")
            sqlstate = raw.decode("ascii")
        return cls(errno=errno, sqlstate=sqlstate, message=text(reader.rest()))


@frozen
class EofPacket:
    """EOF_Packet (0xFE, under 9 bytes)."""

    warnings: int = attrs.field(default=0, validator=uint(16))
    status: int = attrs.field(default=ServerStatus.AUTOCOMMIT, validator=uint(16))

    def encode(self) -> bytes:
        return b"\xfe" + self.warnings.to_bytes(2, "little") + self.status.to_bytes(2, "little")

    @classmethod
    def decode(cls, payload: bytes) -> EofPacket:
        if not is_eof(payload):
            Reader(payload, "the EOF packet").fail("not an EOF packet")
        reader = Reader(payload[1:], "the EOF packet")
        packet = cls(warnings=reader.int2(), status=reader.int2())
        reader.end()
        return packet


def is_eof(payload: bytes) -> bool:
    """0xFE in a packet under 9 bytes is an EOF (a longer one is a row or a
    length-encoded integer): the spec's own test."""
    return payload[:1] == b"\xfe" and len(payload) < 9

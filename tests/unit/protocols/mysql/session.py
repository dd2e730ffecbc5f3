"""A relayed MySQL session for the auditor tests: both directions' auditors
joined by one tracker, fed in the order a relay would feed them, and
builders for the packets either side sends."""

from __future__ import annotations

import hashlib

from protocols.mysql.commands import CommandAuditor, CommandTracker, PrepareEvent, QueryEvent
from protocols.mysql.constants import Capability, Command
from protocols.mysql.packets import lenenc_bytes
from protocols.mysql.responses import ResponseAuditor
from protocols.errors import RemoteProtocolError
from protocols.signals import NEED_DATA
from tests.unit.protocols.feeding import pump, split

CAPS = (Capability.PROTOCOL_41 | Capability.SECURE_CONNECTION | Capability.PLUGIN_AUTH
        | Capability.MULTI_RESULTS | Capability.PS_MULTI_RESULTS)
MODERN = CAPS | Capability.DEPRECATE_EOF | Capability.SESSION_TRACK


def pkt(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


def command(code: int, body: bytes = b"") -> bytes:
    return pkt(0, bytes([code]) + body)


def query(text: str) -> bytes:
    return command(Command.QUERY, text.encode())


def statement_fields(text: str | bytes) -> dict[str, object]:
    """What an event of a statement short enough to be kept whole says of it."""
    raw = text.encode() if isinstance(text, str) else text
    return {"text": raw.decode("utf-8", "replace"), "truncated": False, "length": len(raw),
            "sha256": hashlib.sha256(raw).hexdigest()}


def query_event(text: str | bytes, *, size: int | None = None, attributes: int = 0) -> QueryEvent:
    """The QueryEvent of a whole, short COM_QUERY ``text``."""
    fields = statement_fields(text)
    return QueryEvent(**fields, size=1 + fields["length"] if size is None else size,  # type: ignore[arg-type]
                      attributes=attributes)


def prepare_event(text: str | bytes) -> PrepareEvent:
    fields = statement_fields(text)
    return PrepareEvent(**fields, size=1 + fields["length"])  # type: ignore[arg-type]


def ok(seq: int, status: int = 2, header: int = 0x00) -> bytes:
    return pkt(seq, bytes([header]) + b"\x00\x00" + status.to_bytes(2, "little") + b"\x00\x00")


def eof(seq: int, status: int = 2) -> bytes:
    return pkt(seq, b"\xfe\x00\x00" + status.to_bytes(2, "little"))


def err(seq: int, errno: int = 1064, message: str = "You have an error") -> bytes:
    return pkt(seq, b"\xff" + errno.to_bytes(2, "little") + b"#42000" + message.encode())


COLUMN = (lenenc_bytes(b"def") + lenenc_bytes(b"shop") + lenenc_bytes(b"t") * 2
          + lenenc_bytes(b"c") * 2 + b"\x0c\x21\x00\xff\x00\x00\x00\xfd\x00\x00\x00\x00\x00")


def definitions(count: int, seq: int, *, deprecate_eof: bool) -> tuple[bytes, int]:
    """``count`` column definitions numbered after ``seq``, and their EOF
    unless DEPRECATE_EOF; and the last id used."""
    out = bytearray()
    for _ in range(count):
        seq += 1
        out += pkt(seq, COLUMN)
    if not deprecate_eof:
        seq += 1
        out += eof(seq)
    return bytes(out), seq


def result_set(rows: list[bytes], *, deprecate_eof: bool, status: int = 2,
               columns: int = 2, start: int = 1, metadata: int | None = None) -> bytes:
    """A text result set: count, definitions, [EOF], rows, EOF or OK(0xFE).
    ``metadata``: the byte after the count with MariaDB's cached metadata
    (MARIADB_CACHE_METADATA), 1: the definitions follow, 0: they do not."""
    seq = start
    out = bytearray(pkt(seq, bytes([columns] if metadata is None else [columns, metadata])))
    defs, seq = definitions(0 if metadata == 0 else columns, seq, deprecate_eof=deprecate_eof)
    out += defs
    for row in rows:
        seq += 1
        out += pkt(seq, row)
    seq += 1
    out += ok(seq, status, header=0xFE) if deprecate_eof else eof(seq, status)
    return bytes(out)


class Session:
    """The two auditors of one session, sharing a tracker."""

    def __init__(self, capabilities: Capability = MODERN, **limits: int) -> None:
        self.tracker = CommandTracker(capabilities)
        self.commands = CommandAuditor(self.tracker, **limits)
        self.responses = ResponseAuditor(self.tracker)

    def client(self, data: bytes, how: str = "whole") -> list[object]:
        """Feed client bytes (``b""``: EOF) to their auditor; its events."""
        return pump(self.commands, split(data, how) if data else [b""])

    def server(self, data: bytes, how: str = "whole") -> list[object]:
        return pump(self.responses, split(data, how) if data else [b""])


def cut(data: bytes, points: list[int]) -> list[bytes]:
    """``data`` cut at ``points`` (taken modulo its length + 1)."""
    bounds = sorted({p % (len(data) + 1) for p in points} | {0, len(data)})
    return [data[a:b] for a, b in zip(bounds, bounds[1:]) if b > a]


def outcome(auditor, chunks: list[bytes]) -> tuple[list[object], str | None]:
    """The events of ``chunks`` fed one by one to ``auditor``, and the
    message of the protocol error that ended them, if any."""
    events: list[object] = []
    try:
        for chunk in chunks:
            auditor.receive_data(chunk)
            while (event := auditor.next_event()) is not NEED_DATA:
                events.append(event)
    except RemoteProtocolError as exc:
        return events, exc.message
    return events, None

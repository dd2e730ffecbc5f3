"""Audit events from a relayed MongoDB session: the cluster's side.

Spec: mongodb/specifications ``source/message/OP_MSG.md`` (sections,
moreToCome, exhaustAllowed); the wire protocol's OP_QUERY/OP_REPLY (a
legacy hello) and OP_COMPRESSED.

Theory of operation
-------------------
Both auditors are :class:`~protocols.auditor.StreamAuditor` s: the relay
copies each chunk into them, they parse at once and keep no reference to
it. Their frames are MongoDB messages read with a layout whose header is
only ``messageLength``, so a kept body starts with requestID, responseTo and
opCode: the events carry the request ids, which is how the cluster pairs an
error with its command (an exhaust reply's responseTo names the reply
before it, as OP_MSG.md says of moreToCome).

:class:`ClientAuditor` (client -> server) keeps each message whole up to
``max_message`` bytes (by default the largest BSON document and its command
around it, so a 15 MiB insert is kept; a 48 MB bulk write keeps its first
``max_message`` bytes). An OP_MSG gives a :class:`CommandEvent`: the
:class:`~protocols.mongodb.commands.Command` (name, ``$db``, collection,
namespaces, filter shapes; never a value) from its body, of which only
the fields the view reads are decoded (``commands.READ_FIELDS``, with
``bson.decode_fields``: a find's ``$readPreference`` or an insert's
documents in the body cost no Python objects), while document
sequences are counted by their lengths and only ``updates``/``deletes`` (for
their filters) and bulkWrite's ``nsInfo`` are decoded (never an insert's
documents).
``more_to_come`` marks an unacknowledged write (no reply will come);
``exhaust_allowed`` a request the server may answer many times. A legacy
OP_QUERY on ``db.$cmd`` (the first hello) is a command too; zlib/noop
OP_COMPRESSED is opened and audited as what it holds; snappy and zstd
poison the auditor (UnsupportedCompressor): the gateway offers neither, so
a client using one is not a client we can audit.

:class:`ServerAuditor` (server -> client) keeps at most ``max_reply``
bytes of each reply and walks its top-level fields by their lengths
(:func:`~protocols.mongodb.bson.elements`), decoding nothing but ``ok``,
``code``, ``codeName`` and ``errmsg``: a reply whose ``ok`` is 0 is an
:class:`ErrorReplyEvent`; every other reply (a batch of documents, the
common case) costs a copy of its first bytes and a walk over a handful of
fields. A reply whose ``ok`` lies past ``max_reply`` is taken as a success:
error replies are small.

A malformed stream raises RemoteProtocolError from ``next_event()`` after
the events before it, with MongoDB's code as the wire hint.
"""

from __future__ import annotations

import math
import struct
from typing import Any, Final

import attrs

from protocols.auditor import StreamAuditor
from protocols.errors import RemoteProtocolError
from protocols.framing import Frame, FrameLayout
from protocols.mongodb import bson, commands, wire
from protocols.mongodb.commands import Command

__all__ = [
    "MESSAGE_AFTER_LENGTH", "DEFAULT_MAX_MESSAGE", "DEFAULT_MAX_REPLY", "DEFAULT_MAX_TEXT",
    "CommandEvent", "UnauditedMessageEvent", "ErrorReplyEvent", "ClientAuditor", "client_event",
    "ServerAuditor",
]

#: A MongoDB message whose frame header is only messageLength: the body
#: then starts with requestID, responseTo and opCode.
MESSAGE_AFTER_LENGTH: Final = FrameLayout(
    name="MongoDB message", header="<i", length_field=0, uncounted=0, min_length=16,
    max_length=wire.DEFAULT_MAX_MESSAGE_SIZE, wire_hint=wire.PROTOCOL_ERROR)
DEFAULT_MAX_MESSAGE: Final = bson.DEFAULT_MAX_SIZE + 64 * 1024
DEFAULT_MAX_REPLY: Final = 64 * 1024
DEFAULT_MAX_TEXT: Final = 1024
_IDS = struct.Struct("<iii")  # requestID, responseTo, opCode
# The document sequences an audit decodes: update and delete statements (for
# their filters) and bulkWrite's nsInfo (for the namespaces it writes to).
_DECODED: Final = frozenset({"updates", "deletes", "nsInfo"})


@attrs.frozen(kw_only=True)
class CommandEvent:
    """A command from the client."""

    request_id: int
    command: Command
    more_to_come: bool = False  # no reply will come (an unacknowledged write)
    exhaust_allowed: bool = False
    size: int  # the message's length
    #: Kept only in part (over max_message): sequences were not counted.
    truncated: bool = False


@attrs.frozen(kw_only=True)
class UnauditedMessageEvent:
    """A client message too large to read its command from (its body section
    did not start within max_message bytes)."""

    request_id: int
    op_code: int
    size: int


@attrs.frozen(kw_only=True)
class ErrorReplyEvent:
    """A reply with ``ok: 0``."""

    response_to: int
    code: int | None
    code_name: str | None
    errmsg: str
    truncated: bool  # errmsg was cut to max_text characters


def _ids(frame: Frame) -> tuple[int, int, int]:
    # The layout's minimum length (16) puts all three in every body.
    return _IDS.unpack_from(frame.body)  # type: ignore[return-value]


def _whole(frame: Frame) -> bytes:
    """The message a whole frame holds, its length put back in front."""
    return struct.pack("<i", frame.body_length + 4) + frame.body


def _command_event(request_id: int, command: Command, flags: int, size: int,
                   truncated: bool = False) -> CommandEvent:
    return CommandEvent(request_id=request_id, command=command,
                        more_to_come=bool(flags & wire.MORE_TO_COME),
                        exhaust_allowed=bool(flags & wire.EXHAUST_ALLOWED), size=size,
                        truncated=truncated)


def client_event(frame: Frame, max_message_size: int = wire.DEFAULT_MAX_MESSAGE_SIZE
                 ) -> CommandEvent | UnauditedMessageEvent:
    """The event of one client message, framed by :data:`MESSAGE_AFTER_LENGTH`
    (whole, or kept in part: see :class:`ClientAuditor`). The cluster's
    command gate reads each whole message with it before deciding."""
    request_id, _, op_code = _ids(frame)
    size = frame.body_length + 4
    body = frame.body[_IDS.size :]
    if not frame.complete:
        return _partial(request_id, op_code, body, size)
    if op_code == wire.OP_MSG:
        flags, command, found = wire.split_op_msg(
            body, sequences=_DECODED, fields=(commands.READ_FIELDS, commands.COUNTED_FIELDS))
        counts = {name: (docs if name in _DECODED else count) for name, docs, count in found}
        return _command_event(request_id, commands.view(command, counts), flags, size)
    message = wire.decode_message(_whole(frame), max_message_size=max_message_size)
    if isinstance(message, wire.OpCompressed):
        message = wire.decompress(message, max_message_size=max_message_size)
    if isinstance(message, wire.OpReply):
        raise wire.protocol_error("a client sent an OP_REPLY, which only servers send")
    flags = message.flag_bits if isinstance(message, wire.OpMsg) else 0
    return _command_event(request_id, commands.view_message(message), flags, size)


def _partial(request_id: int, op_code: int, body: bytes, size: int) -> Any:
    """A message kept in part: its command, if its body section is first
    and whole (drivers put it first; a bulk write's documents follow)."""
    if op_code == wire.OP_MSG and len(body) > 5 and body[4] == 0:
        (flags,) = struct.unpack_from("<I", body)
        try:
            command, _ = bson.decode_at(body, 5)
        except RemoteProtocolError:
            command = None  # the body section itself goes past the prefix
        if command is not None:
            return _command_event(request_id, commands.view(command), flags, size,
                                  truncated=True)
    return UnauditedMessageEvent(request_id=request_id, op_code=op_code, size=size)


class _MessageAuditor(StreamAuditor):
    """What both directions share: messages framed after their length, each
    kept up to ``keep`` bytes."""

    def __init__(self, keep: int, max_message_size: int) -> None:
        super().__init__(MESSAGE_AFTER_LENGTH, max_length=max_message_size)
        self._keep_at_most = keep
        self._max_message_size = max_message_size

    def _keep(self, _kind: None, body_length: int) -> int:
        return min(body_length, self._keep_at_most)


class ClientAuditor(_MessageAuditor):
    """Command events from the client -> server stream; see the module doc."""

    def __init__(self, *, max_message: int = DEFAULT_MAX_MESSAGE,
                 max_message_size: int = wire.DEFAULT_MAX_MESSAGE_SIZE) -> None:
        super().__init__(max_message, max_message_size)

    def _on_frame(self, frame: Frame) -> None:
        self._events.append(client_event(frame, self._max_message_size))



class ServerAuditor(_MessageAuditor):
    """Error replies from the server -> client stream; see the module doc."""

    def __init__(self, *, max_reply: int = DEFAULT_MAX_REPLY, max_text: int = DEFAULT_MAX_TEXT,
                 max_message_size: int = wire.DEFAULT_MAX_MESSAGE_SIZE) -> None:
        super().__init__(max_reply, max_message_size)
        self._max_text = max_text

    def _on_frame(self, frame: Frame) -> None:
        _, response_to, op_code = _ids(frame)
        body = frame.body
        start = _IDS.size
        if op_code == wire.OP_COMPRESSED:
            if not frame.complete:
                return  # a large compressed reply: a batch, not an error
            message = wire.decode_message(_whole(frame), max_message_size=self._max_message_size)
            assert isinstance(message, wire.OpCompressed)
            if message.uncompressed_size > self._keep_at_most:
                return
            body = wire.decompress(message, max_message_size=self._max_message_size).encode()[4:]
            op_code = message.original_opcode
        if op_code == wire.OP_MSG:
            if len(body) < start + 5:
                raise wire.protocol_error("an OP_MSG is shorter than its flags and one section")
            (flags,) = struct.unpack_from("<I", body, start)
            if flags & 0xFFFF & ~(wire.CHECKSUM_PRESENT | wire.MORE_TO_COME):
                raise wire.protocol_error("an OP_MSG sets required flag bits we do not know",
                                  wire.ILLEGAL_OP_MSG_FLAG)
            if body[start + 4] != 0:
                return  # replies carry their body first; nothing to audit otherwise
            self._reply(response_to, body, start + 5)
        elif op_code == wire.OP_REPLY:
            # responseFlags, cursorID, startingFrom, numberReturned, then documents.
            self._reply(response_to, body, start + 20)
        else:
            raise wire.protocol_error(f"a server sent opCode {op_code}")

    def _reply(self, response_to: int, body: bytes, pos: int) -> None:
        fields: dict[str, Any] = {}
        for key, kind, start, end in bson.elements(body, pos):
            if key == "ok" and kind in (0x01, 0x08, 0x10, 0x12):
                fields[key] = bson.decode_element(body, kind, start, end)
            elif key in ("code", "codeName", "errmsg") and kind in (0x01, 0x02, 0x10, 0x12):
                fields[key] = bson.decode_element(body, kind, start, end)
        if "ok" not in fields or fields["ok"]:
            return
        code = fields.get("code")
        name = fields.get("codeName")
        errmsg = fields.get("errmsg")
        errmsg = errmsg if isinstance(errmsg, str) else ""
        self._events.append(ErrorReplyEvent(
            response_to=response_to,
            code=int(code) if isinstance(code, int) or (
                isinstance(code, float) and math.isfinite(code)) else None,
            code_name=name[:128] if isinstance(name, str) else None,
            errmsg=errmsg[: self._max_text], truncated=len(errmsg) > self._max_text))

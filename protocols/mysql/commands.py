"""Audit events from the client's side of a relayed MySQL session (command phase).

Spec: MySQL Source Code Documentation, "Client/Server Protocol", Command
Phase: Text Protocol (COM_QUERY with query attributes, COM_INIT_DB,
COM_CHANGE_USER, COM_RESET_CONNECTION, COM_QUIT), Prepared Statements
(COM_STMT_PREPARE, COM_STMT_EXECUTE, COM_STMT_CLOSE, COM_STMT_RESET),
Binary Protocol Value; LOCAL INFILE Request.

Theory of operation
-------------------
A command is the first packet of an exchange: sequence id 0. The client's
other packets are skipped by their length, unseen: the rest of a payload of
2^24-1 bytes or more (the packet after a full one continues it, whatever
its id), its answers in a COM_CHANGE_USER exchange (ids 2, 4, ...), and the
contents of a file the server asked for with LOCAL INFILE, which run until
an empty packet and are only counted (their ids wrap past 0, so they must
be known for what they are, or a file could forge commands in the audit).

The two directions share a :class:`CommandTracker`. The relay feeds each
chunk to its direction's auditor before forwarding it, so the server
cannot answer a command the tracker has not been told of: this auditor
queues each command that has a response (and what that response will look
like) for :class:`~.responses.ResponseAuditor`, which in turn says when a
LOCAL INFILE transfer starts, and which prepared statement has how many
parameters (so COM_STMT_EXECUTE can report the count; values never are).

A command is kept whole up to ``max_message`` bytes, else as a prefix of
``max_text`` + 1 KiB. A statement (COM_QUERY, COM_STMT_PREPARE) is
recorded as :class:`~protocols.auditor.StreamAuditor` records every
statement (issue 15's rule): its full length and the SHA-256 of all of its
bytes, always, and its text whole up to ``max_text`` bytes, else its first
and last halves of that around a marker. A statement longer than what was
kept, or than one packet (a payload of 2^24-1 bytes or more goes on in the
packets after it), is followed to its end as it streams past, into the
digest and the tail: its event comes with its last packet. Other text is
cut to ``max_text`` bytes. Text is decoded as UTF-8 with replacement (an
audit record never fails over a charset). Compressed sessions cannot be
read: the tracker refuses a CLIENT_COMPRESS session.
"""

from __future__ import annotations

import enum
from collections import deque
from hashlib import sha256 as _sha256
from collections.abc import Callable, Mapping
from typing import Final, Union

import attrs

from protocols.auditor import DEFAULT_MAX_TEXT, LATER, Statement, StatementReader, StreamAuditor
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.framing import MYSQL_PACKET, Frame
from protocols.mysql.constants import MAX_PAYLOAD, Capability, Command, ErrorNumber
from protocols.mysql.packets import Cut, Reader, malformed
from protocols.signals import ConnectionClosed

__all__ = [
    "DEFAULT_MAX_TEXT", "DEFAULT_MAX_MESSAGE", "Expect", "CommandTracker", "QueryEvent",
    "PrepareEvent", "ExecuteEvent", "StatementCloseEvent", "StatementResetEvent",
    "InitDbEvent", "ChangeUserEvent", "ResetConnectionEvent", "QuitEvent", "CommandEvent",
    "LocalInfileDataEvent", "CommandAuditEvent", "CommandAuditor", "query_text",
]

DEFAULT_MAX_MESSAGE: Final = 1024 * 1024
_PREFIX_SLACK: Final = 1024
_LAST_PREPARED: Final = 0xFFFFFFFF  # MariaDB: "the statement prepared last"


class Expect(enum.Enum):
    """What the server's response to a command looks like."""

    RESULT = "RESULT"  # OK, ERR, LOCAL INFILE, or result sets (COM_QUERY, COM_STMT_EXECUTE)
    PREPARE = "PREPARE"  # COM_STMT_PREPARE_OK and its definitions, or ERR
    ROWS = "ROWS"  # rows then EOF/OK (COM_STMT_FETCH)
    FIELDS = "FIELDS"  # column definitions then EOF (COM_FIELD_LIST)
    AUTH = "AUTH"  # an authentication exchange ending in OK or ERR (COM_CHANGE_USER)
    ONE = "ONE"  # one packet of anything (COM_STATISTICS)
    SIMPLE = "SIMPLE"  # OK, ERR or EOF
    STREAM = "STREAM"  # no end the auditor can see (COM_BINLOG_DUMP, COM_CLONE)


_EXPECT: Final[Mapping[int, Expect]] = {
    Command.QUERY: Expect.RESULT, Command.STMT_EXECUTE: Expect.RESULT,
    Command.PROCESS_INFO: Expect.RESULT, Command.MARIADB_STMT_BULK_EXECUTE: Expect.RESULT,
    Command.STMT_PREPARE: Expect.PREPARE, Command.STMT_FETCH: Expect.ROWS,
    Command.FIELD_LIST: Expect.FIELDS, Command.CHANGE_USER: Expect.AUTH,
    Command.STATISTICS: Expect.ONE, Command.BINLOG_DUMP: Expect.STREAM,
    Command.BINLOG_DUMP_GTID: Expect.STREAM, Command.CLONE: Expect.STREAM,
    Command.MARIADB_MULTI: Expect.STREAM,
}
_SIMPLE: Final = Expect.SIMPLE  # (an Enum member read per command: bound once)
#: Commands the server does not answer.
_UNANSWERED: Final = frozenset({Command.QUIT, Command.STMT_CLOSE, Command.STMT_SEND_LONG_DATA})


class CommandTracker:
    """What the two directions of one session tell each other; see the
    module docstring. ``capabilities`` are the session's (both ends agree)."""

    def __init__(self, capabilities: Capability, *, max_pending: int = 4096,
                 max_statements: int = 65536) -> None:
        if Capability.COMPRESS in capabilities or (
                Capability.ZSTD_COMPRESSION_ALGORITHM in capabilities):
            raise LocalProtocolError("a compressed MySQL session cannot be audited")
        self.capabilities = capabilities
        # (Flag membership is a Python call: asked once, not per packet.)
        self.deprecate_eof = Capability.DEPRECATE_EOF in capabilities
        self.query_attributes = Capability.QUERY_ATTRIBUTES in capabilities
        # MariaDB: a column count carries a "metadata follows" byte.
        self.cache_metadata = Capability.MARIADB_CACHE_METADATA in capabilities
        self.pending: deque[tuple[int, Expect]] = deque()
        self.infile = False
        self._statements: dict[int, int] = {}
        self._last_prepared: int | None = None
        self._max_pending = max_pending
        self._max_statements = max_statements

    def sent(self, command: int) -> None:
        if command in _UNANSWERED:
            return
        if len(self.pending) >= self._max_pending:
            malformed(f"the client sent over {self._max_pending} commands without waiting "
                      f"for an answer")
        self.pending.append((command, _EXPECT.get(command, _SIMPLE)))

    def prepared(self, statement_id: int, params: int) -> None:
        if len(self._statements) < self._max_statements:
            self._statements[statement_id] = params
        self._last_prepared = statement_id

    def resolve(self, statement_id: int) -> int:
        if statement_id == _LAST_PREPARED and self._last_prepared is not None:
            return self._last_prepared
        return statement_id

    def params(self, statement_id: int) -> int | None:
        return self._statements.get(statement_id)

    def closed(self, statement_id: int) -> None:
        self._statements.pop(statement_id, None)

    def new_connection(self) -> None:
        """The session goes on with another connection to the server (a
        COM_CHANGE_USER re-dialled): the statements prepared on the old
        one are gone with it, and their ids will be given again."""
        self._statements.clear()
        self._last_prepared = None


_event = attrs.frozen(kw_only=True)


@_event
class QueryEvent:
    """COM_QUERY. ``attributes``: how many query attributes came with it
    (their values are not reported).

    ``text`` is the statement whole, or its head and tail around a marker
    (:class:`~protocols.auditor.Statement`); ``length`` its full length in
    bytes and ``sha256`` the digest of all of them. Both are None only when
    query attributes ahead of the text were too long to read past (over
    ``max_text`` + 1 KiB in a command over ``max_message``): ``text`` is
    then empty and ``truncated`` set."""

    text: str
    truncated: bool
    length: int | None
    sha256: str | None
    size: int  # the command's payload, in bytes
    attributes: int = 0


@_event
class PrepareEvent:
    """COM_STMT_PREPARE: the statement as :class:`QueryEvent` has it."""

    text: str
    truncated: bool
    length: int
    sha256: str
    size: int


@_event
class ExecuteEvent:
    """COM_STMT_EXECUTE: never the values. ``param_count`` is None when the
    statement's preparation was not seen."""

    statement_id: int
    param_count: int | None
    flags: int
    size: int


@_event
class StatementCloseEvent:
    statement_id: int


@_event
class StatementResetEvent:
    statement_id: int


@_event
class InitDbEvent:
    schema: str


@_event
class ChangeUserEvent:
    username: str
    database: str | None
    plugin: str | None


@_event
class ResetConnectionEvent:
    pass


@_event
class QuitEvent:
    """COM_QUIT: nothing after it is parsed."""


@_event
class CommandEvent:
    """Any other command (COM_PING, COM_FIELD_LIST, COM_STMT_SEND_LONG_DATA...)."""

    command: int
    size: int


@_event
class LocalInfileDataEvent:
    """The contents of a file sent for LOAD DATA LOCAL: counted, never kept."""

    bytes: int
    packets: int


CommandAuditEvent = Union[QueryEvent, PrepareEvent, ExecuteEvent, StatementCloseEvent,
                          StatementResetEvent, InitDbEvent, ChangeUserEvent,
                          ResetConnectionEvent, QuitEvent, CommandEvent, LocalInfileDataEvent,
                          ConnectionClosed]


def _text(data: bytes, limit: int) -> tuple[str, bool]:
    return data[:limit].decode("utf-8", "replace"), len(data) > limit


# Binary Protocol Value sizes by field type (the low byte of the type).
_QUIT: Final = int(Command.QUIT)
_EXECUTE: Final = int(Command.STMT_EXECUTE)
_QUERY: Final = int(Command.QUERY)
_FIXED_SIZE: Final = {0x01: 1, 0x02: 2, 0x0D: 2, 0x03: 4, 0x09: 4, 0x04: 4, 0x08: 8, 0x05: 8,
                      0x06: 0}
_LENGTH_BYTE: Final = frozenset({0x07, 0x0A, 0x0B, 0x0C})  # TIMESTAMP DATE TIME DATETIME


def _skip_value(reader: Reader, field_type: int) -> None:
    size = _FIXED_SIZE.get(field_type)
    if size is not None:
        reader.skip(size)
    elif field_type in _LENGTH_BYTE:
        reader.skip(reader.int1())
    else:
        reader.lenenc_bytes()


def _skip_query_attributes(reader: Reader) -> int:
    """The attributes block ahead of the text (CLIENT_QUERY_ATTRIBUTES):
    skipped, their number returned."""
    count = reader.lenenc_int()
    reader.lenenc_int()  # parameter_set_count, always 1
    if not count:
        return 0
    nulls = reader.raw((count + 7) // 8)
    if reader.int1() != 1:
        reader.fail("query attributes without their types (new_params_bind_flag 0)")
    types = []
    for _ in range(count):
        types.append(reader.int2() & 0xFF)
        reader.lenenc_bytes()  # the attribute's name
    for index, field_type in enumerate(types):
        if not nulls[index // 8] >> (index % 8) & 1:
            _skip_value(reader, field_type)
    return count


def query_text(packets: bytes, query_attributes: bool) -> str:
    """A COM_QUERY's whole statement text, as its event's would read were
    it not cut: ``packets`` is the command as it came (its packets, headers
    and all: one of 16 MiB and more is several); ``query_attributes``:
    the session has CLIENT_QUERY_ATTRIBUTES."""
    parts, pos = [], 0
    while pos < len(packets):
        length = int.from_bytes(packets[pos:pos + 3], "little")
        parts.append(packets[pos + 4:pos + 4 + length])
        pos += 4 + length
    reader = Reader(parts[0] if len(parts) == 1 else b"".join(parts), "a command")
    reader.skip(1)
    if query_attributes:
        _skip_query_attributes(reader)
    return reader.rest().decode("utf-8", "replace")


class CommandAuditor(StreamAuditor):
    """Client -> server bytes of a session's command phase, as audit events."""

    def __init__(self, tracker: CommandTracker, *, max_text: int = DEFAULT_MAX_TEXT,
                 max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        if max_text < 1 or max_message < 1:
            raise ValueError("max_text and max_message must be positive")
        super().__init__(MYSQL_PACKET)
        self._tracker = tracker
        self._max_text = max_text
        self._max_message = max_message
        self._prefix = max_text + _PREFIX_SLACK
        self._continues = False  # the previous packet was a full one
        self._file_bytes = self._file_packets = 0

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        # A client waits for each answer: a chunk is usually one whole
        # command, which goes to _on_frame without the splitter's generator
        # and _keep (what _keep says of it: keep it whole).
        if data and not self._continues and not self._tracker.infile and self._error is None and \
                not self._eof and not self._ended and self._splitter.at_boundary:
            end, pos, count = len(data), 0, 0
            on_frame, limit, tracker = self._on_frame, min(self._max_message, MAX_PAYLOAD - 1), self._tracker
            while end - pos >= 5 and not data[pos + 3]:  # sequence id 0: a command
                length = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
                body = pos + 4
                if not 0 < length <= limit or body + length > end:
                    break
                pos = body + length
                count += 1
                try:
                    # The usual statements (once per statement): their
                    # events straight from the bytes, the same as _on_frame's.
                    command = data[body]
                    if command == _EXECUTE and length >= 6:
                        tracker.sent(_EXECUTE)
                        self._events.append(self._execute_event(
                            data[body + 1] | data[body + 2] << 8 | data[body + 3] << 16 | data[body + 4] << 24,
                            data[body + 5], length))
                    elif command == _QUERY and not tracker.query_attributes:
                        tracker.sent(_QUERY)
                        raw = data[body + 1:pos]
                        if type(raw) is not bytes:
                            raw = bytes(raw)
                        if length <= self._max_text:  # whole: the event straight from the bytes
                            self._events.append(QueryEvent(text=raw.decode("utf-8", "replace"), truncated=False,
                                                           length=length - 1, sha256=_sha256(raw).hexdigest(),
                                                           size=length))
                        else:
                            s = StatementReader.of(raw, self._max_text)
                            self._events.append(QueryEvent(text=s.text, truncated=s.truncated, length=s.length,
                                                           sha256=s.sha256, size=length))
                    else:
                        on_frame(Frame(0, length, bytes(data[body:pos])))
                except RemoteProtocolError as exc:
                    self._error = exc
                if self._ended or self._error is not None or tracker.infile:
                    break
            if count:
                self.bytes_seen += pos
                self._splitter.frames += count
                if pos == end or self._ended or self._error is not None:
                    self.bytes_seen += end - pos  # (what StreamAuditor counts, parsed or not)
                    return
                data = memoryview(data)[pos:]
        super().receive_data(data)

    @property
    def at_command(self) -> bool:
        """Whether the next byte starts a command: a packet's first, not
        the rest of a full one, nor a file's contents. (A relay that
        answers a command itself looks, before it feeds a chunk, whether
        the chunk starts with one.)"""
        return self._splitter.at_boundary and not (self._continues or self._tracker.infile or self._ended)

    def _keep(self, seq: int, length: int) -> int | None:
        continues, self._continues = self._continues, length == MAX_PAYLOAD
        if self._tracker.infile:
            if continues or length:
                self._file_packets += 1
                self._file_bytes += length
            else:  # the empty packet: end of file
                self._flush_file()
            return None
        if continues:
            # The rest of a payload of 2^24-1 bytes or more: followed,
            # unkept, if it is a statement's (see _on_frame), else skipped.
            return None if self._following is None else 0
        if seq:
            return None
        if not length:
            malformed("an empty command packet", ErrorNumber.ER_UNKNOWN_COM_ERROR)
        return length if length <= self._max_message else self._prefix

    def _flush_file(self) -> None:
        self._events.append(LocalInfileDataEvent(bytes=self._file_bytes,
                                                 packets=self._file_packets))
        self._file_bytes = self._file_packets = 0
        self._tracker.infile = False

    def _on_eof(self) -> None:
        if self._tracker.infile and (self._file_packets or self._file_bytes):
            self._flush_file()

    def _on_frame(self, frame: Frame) -> None:
        if self._following is not None:  # the next packet of a statement's payload
            self._statement_goes_on(frame, last=frame.body_length < MAX_PAYLOAD)
            return
        command = frame.body[0]
        handler = _HANDLERS.get(command, CommandAuditor._other)
        reader = Reader(frame.body, "a command", complete=frame.complete)
        reader.skip(1)
        self._tracker.sent(command)
        try:
            event = handler(self, reader, frame)
        except Cut:
            event = CommandEvent(command=command, size=frame.body_length)
        if event is not LATER:  # (else queued once the statement has streamed past)
            self._events.append(event)
        self._ended = command == _QUIT

    def _query(self, reader: Reader, frame: Frame) -> QueryEvent | object:
        count = 0
        if self._tracker.query_attributes:
            try:
                count = _skip_query_attributes(reader)
            except Cut:
                return QueryEvent(text="", truncated=True, length=None, sha256=None,
                                  size=frame.body_length)

        def event(s: Statement, size: int) -> QueryEvent:
            return QueryEvent(text=s.text, truncated=s.truncated, length=s.length, sha256=s.sha256,
                              size=size, attributes=count)

        return self._statement_of(reader, frame, event)

    def _prepare(self, reader: Reader, frame: Frame) -> PrepareEvent | object:
        def event(s: Statement, size: int) -> PrepareEvent:
            return PrepareEvent(text=s.text, truncated=s.truncated, length=s.length, sha256=s.sha256,
                                size=size)

        return self._statement_of(reader, frame, event)

    def _statement_of(self, reader: Reader, frame: Frame,
                      event: Callable[[Statement, int], object]) -> object:
        """The event of the statement that runs from ``reader``'s position
        to the end of the payload: now if it is all in ``frame``, else
        :data:`LATER` (followed through the rest of the frame and the
        packets that continue it)."""
        continued = frame.body_length == MAX_PAYLOAD
        if frame.complete and not continued:
            return event(StatementReader.of(reader.rest(), self._max_text), frame.body_length)
        ahead = reader.consumed  # the command byte and any query attributes
        statement = StatementReader(self._max_text)
        statement.update(reader.rest())
        return self._statement_event(frame, statement, lambda s: event(s, ahead + s.length),
                                     continued=continued)

    def _execute(self, reader: Reader, frame: Frame) -> ExecuteEvent:
        statement = reader.int4()
        return self._execute_event(statement, reader.int1(), frame.body_length)

    def _execute_event(self, statement: int, flags: int, size: int) -> ExecuteEvent:
        statement = self._tracker.resolve(statement)
        return ExecuteEvent(statement_id=statement, param_count=self._tracker.params(statement),
                            flags=flags, size=size)

    def _close(self, reader: Reader, _frame: Frame) -> StatementCloseEvent:
        statement = self._tracker.resolve(reader.int4())
        self._tracker.closed(statement)
        return StatementCloseEvent(statement_id=statement)

    def _reset(self, reader: Reader, _frame: Frame) -> StatementResetEvent:
        return StatementResetEvent(statement_id=self._tracker.resolve(reader.int4()))

    def _init_db(self, reader: Reader, _frame: Frame) -> InitDbEvent:
        return InitDbEvent(schema=_text(reader.rest(), self._max_text)[0])

    def _change_user(self, reader: Reader, _frame: Frame) -> ChangeUserEvent:
        caps = self._tracker.capabilities
        username = reader.nul_bytes()
        if Capability.SECURE_CONNECTION in caps:
            reader.skip(reader.int1())
        else:
            reader.nul_bytes()
        database = plugin = None
        if not reader.at_end():
            database = reader.nul_or_rest()
        if not reader.at_end():
            reader.skip(2)  # character set
            if Capability.PLUGIN_AUTH in caps and not reader.at_end():
                plugin = reader.nul_or_rest()
        return ChangeUserEvent(username=_text(username, self._max_text)[0],
                               database=None if database is None
                               else _text(database, self._max_text)[0],
                               plugin=None if plugin is None else _text(plugin, 64)[0])

    def _reset_connection(self, _reader: Reader, _frame: Frame) -> ResetConnectionEvent:
        return ResetConnectionEvent()

    def _quit(self, _reader: Reader, _frame: Frame) -> QuitEvent:
        return QuitEvent()

    def _other(self, _reader: Reader, frame: Frame) -> CommandEvent:
        return CommandEvent(command=frame.body[0], size=frame.body_length)


_HANDLERS: Final = {
    Command.QUERY: CommandAuditor._query,
    Command.STMT_PREPARE: CommandAuditor._prepare,
    Command.STMT_EXECUTE: CommandAuditor._execute,
    Command.STMT_CLOSE: CommandAuditor._close,
    Command.STMT_RESET: CommandAuditor._reset,
    Command.INIT_DB: CommandAuditor._init_db,
    Command.CHANGE_USER: CommandAuditor._change_user,
    Command.RESET_CONNECTION: CommandAuditor._reset_connection,
    Command.QUIT: CommandAuditor._quit,
}

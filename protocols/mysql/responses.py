"""Audit events from the server's side of a relayed MySQL session (command phase).

Spec: MySQL Source Code Documentation, "Client/Server Protocol", Command
Phase: COM_QUERY Response (Text Resultset, LOCAL INFILE Request),
COM_STMT_PREPARE Response, COM_STMT_EXECUTE Response (Binary Protocol
Resultset), Multi-Resultset, COM_STMT_FETCH, COM_FIELD_LIST,
COM_CHANGE_USER; Generic Response Packets (OK_Packet, ERR_Packet,
EOF_Packet); MariaDB docs, "ERR_Packet" (progress reports).

Theory of operation
-------------------
Reported: ERR packets (code, SQLSTATE, message) and LOCAL INFILE requests
(the file name); everything else is skipped. The catch is telling an ERR
(0xFF) or a LOCAL INFILE request (0xFB) from row data, which can start with
the same bytes (0xFB is a NULL first column). So :class:`ResponseAuditor`
follows each response's structure, knowing from the shared
:class:`~.commands.CommandTracker` which command it answers::

    RESULT:  OK | ERR | 0xFB file name | column count, N column definitions,
             [EOF], rows ..., EOF or OK(0xFE) or ERR;
             another result follows while the status says MORE_RESULTS_EXISTS;
             with MariaDB's MARIADB_CLIENT_CACHE_METADATA the column count
             has a byte after it, "metadata follows": 0 (an execution whose
             columns did not change since the client last saw them) and no
             definitions come, only the [EOF]
    PREPARE: ERR | PREPARE_OK, P parameter and C column definitions, each
             run followed by EOF unless CLIENT_DEPRECATE_EOF
    ROWS:    rows ..., EOF/OK(0xFE) or ERR        (COM_STMT_FETCH)

Column definitions are skipped by count, unseen. Of a row over 512 bytes
only the first 24 are kept (a shorter one is cheaper to take whole):
enough to tell a row from an EOF, an OK(0xFE) or an ERR,
whose code and SQLSTATE fit in them (an ERR in the middle of a result set,
rare, may have its message cut; one that is a whole response is kept up to
``max_message``). A terminator with CURSOR_EXISTS ends the response (the
rows come later, through COM_STMT_FETCH). MariaDB's progress reports (ERR
0xFFFF) are skipped. The packet after one of 2^24-1 bytes continues it and
is never interpreted. With no command pending only an ERR may come (MySQL 8
explains an idle timeout with one before it closes). Sequence ids run on
consecutively within a response
(a gap is ER_NET_PACKETS_OUT_OF_ORDER), except where the client speaks in
between (after a LOCAL INFILE request, in COM_CHANGE_USER's exchange).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, Union

import attrs

from protocols.auditor import StreamAuditor
from protocols.framing import MYSQL_PACKET, Frame
from protocols.mysql.commands import DEFAULT_MAX_MESSAGE, CommandTracker, Expect
from protocols.mysql.constants import MAX_PAYLOAD, Command, ErrorNumber, ServerStatus
from protocols.mysql.packets import Cut, Reader, malformed
from protocols.signals import ConnectionClosed

__all__ = ["ErrorEvent", "LocalInfileRequestEvent", "ResponseAuditEvent", "ResponseAuditor"]

_ROW_PREFIX: Final = 24
_SHORT_ROW: Final = 512
_MAX_FILE_NAME: Final = 4096
_EOF_MAX: Final = 9
# Plain ints: an IntFlag operation per packet costs more than the rest.
_MORE_RESULTS: Final = int(ServerStatus.MORE_RESULTS_EXISTS)
_CURSOR: Final = int(ServerStatus.CURSOR_EXISTS)
# Enum members read per response, bound once (see _Phase).
_RESULT: Final = Expect.RESULT
_PREPARE: Final = Expect.PREPARE


@attrs.frozen(kw_only=True)
class ErrorEvent:
    """An ERR packet: the command (or, mid-result, the result set) failed."""

    errno: int
    sqlstate: str | None
    message: str
    truncated: bool


@attrs.frozen(kw_only=True)
class LocalInfileRequestEvent:
    """The server asks the client for a file (LOAD DATA LOCAL INFILE)."""

    file_name: str
    truncated: bool


ResponseAuditEvent = Union[ErrorEvent, LocalInfileRequestEvent, ConnectionClosed]


class _Phase:
    """Where a response is (plain strings compared by identity: on Python
    3.11 reading an Enum member costs ten times a class attribute, and
    this is read several times per packet)."""

    IDLE = "IDLE"  # between responses
    FIRST = "FIRST"  # a response's (or a further result's) first packet
    DEFINITIONS = "DEFINITIONS"  # column/parameter definitions, skipped by count
    DEFINITIONS_EOF = "DEFINITIONS_EOF"  # the EOF after a run of definitions
    ROWS = "ROWS"  # rows until a terminator
    INFILE_RESULT = "INFILE_RESULT"  # the OK/ERR after the client's file
    AUTH = "AUTH"  # COM_CHANGE_USER's exchange
    STREAM = "STREAM"  # skipped to the end of the session
    UNSOLICITED = "UNSOLICITED"  # a packet with no command pending: only an ERR may come


class ResponseAuditor(StreamAuditor):
    """Server -> client bytes of a session's command phase, as audit events."""

    def __init__(self, tracker: CommandTracker, *,
                 max_message: int = DEFAULT_MAX_MESSAGE) -> None:
        if max_message < _ROW_PREFIX:
            raise ValueError(f"max_message must be at least {_ROW_PREFIX}")
        super().__init__(MYSQL_PACKET)
        self._tracker = tracker
        self._max_message = max_message
        self._phase = _Phase.IDLE
        self._command = 0
        self._expect = Expect.SIMPLE
        self._runs: list[int] = []  # definition runs still to come (PREPARE: params, columns)
        self._left = 0  # definitions left in the current run
        self._seq = -1  # the id the next packet must carry; -1: any
        self._continues = False
        self._scanned = 0  # packets the last _scan took

    # -- the usual packets, straight from the chunk ------------------------------------

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        if data and not self._continues and self._error is None and not self._eof and \
                self._splitter.at_boundary:
            taken = self._scan(data)
            if taken:
                self.bytes_seen += taken
                self._splitter.frames += self._scanned
                if taken == len(data):
                    return
                data = memoryview(data)[taken:]
        super().receive_data(data)

    def _scan(self, data: bytes | bytearray | memoryview) -> int:
        """Follow the whole packets at the start of ``data`` that make no
        event (definitions, rows, EOFs, OKs, a result's column count) the
        way ``_keep`` and ``_on_frame`` would, without a frame or a call per
        packet: a point select's answer is five packets, read here in one
        loop. Stops before the first packet that needs more (an ERR, a
        LOCAL INFILE request, a PREPARE_OK, a split or 16 MiB packet, a
        phase of its own, anything out of the way) and returns how many
        bytes it took; :meth:`receive_data` gives the rest to the splitter,
        which is at a packet boundary there. ``_scanned``: packets taken."""
        self._scanned = 0
        phase = self._phase
        if phase is not _Phase.IDLE and self._expect is not _RESULT:
            return 0
        end = len(data)
        pos = count = 0
        seq_due, left = self._seq, self._left
        deprecate_eof = self._tracker.deprecate_eof
        count_length = 2 if self._tracker.cache_metadata else 1  # (and the metadata byte)
        while end - pos >= 5:
            length = data[pos] | data[pos + 1] << 8 | data[pos + 2] << 16
            body = pos + 4
            if not 0 < length < MAX_PAYLOAD or body + length > end:
                break
            seq = data[pos + 3]
            if phase is _Phase.IDLE:
                pending = self._tracker.pending
                if not pending or pending[0][1] is not _RESULT:
                    break
                self._command, self._expect = pending.popleft()
                phase, seq_due = _Phase.FIRST, -1
            if seq_due >= 0 and seq != seq_due:
                break
            first = data[body]
            if phase is _Phase.DEFINITIONS:  # skipped by count, unseen
                left -= 1
                if not left:
                    phase = _Phase.ROWS if deprecate_eof else _Phase.DEFINITIONS_EOF
            elif first == 0xFF:
                break
            elif phase is _Phase.ROWS:
                if first == 0xFE and (length < _EOF_MAX or deprecate_eof):
                    if length < 5 or data[body + 1] >= 0xFB or data[body + 2] >= 0xFB:
                        break
                    status = data[body + 3] | data[body + 4] << 8
                    phase = _Phase.FIRST if status & _MORE_RESULTS and not status & _CURSOR else _Phase.IDLE
            elif phase is _Phase.DEFINITIONS_EOF:
                if first != 0xFE or not 5 <= length < _EOF_MAX:
                    break
                status = data[body + 3] | data[body + 4] << 8
                phase = _Phase.IDLE if status & _CURSOR else _Phase.ROWS
            elif phase is _Phase.FIRST:
                if first == 0x00 or (first == 0xFE and length < _EOF_MAX):  # OK, EOF
                    if length < 5 or data[body + 1] >= 0xFB or data[body + 2] >= 0xFB:
                        break
                    status = data[body + 3] | data[body + 4] << 8
                    phase = _Phase.FIRST if status & _MORE_RESULTS and not status & _CURSOR else _Phase.IDLE
                elif length == count_length and first < 0xFB:  # a column count (a RESULT's runs are [])
                    if length == 1 or data[body + 1] == 1:
                        phase, left = _Phase.DEFINITIONS, first
                    elif data[body + 1]:
                        break  # (the general way says what is wrong)
                    else:  # metadata cached: no definitions
                        phase = _Phase.ROWS if deprecate_eof else _Phase.DEFINITIONS_EOF
                else:
                    break
            else:
                break
            seq_due = -1 if phase is _Phase.IDLE else (seq + 1) & 0xFF
            pos = body + length
            count += 1
        self._phase, self._seq, self._left = phase, seq_due, left
        self._scanned = count
        return pos

    # -- keeping: decided from the header alone ----------------------------------------

    def _keep(self, seq: int, length: int) -> int | None:
        continues, self._continues = self._continues, length == MAX_PAYLOAD
        if continues:
            self._check_seq(seq)
            return None
        if self._phase is _Phase.IDLE:
            self._start_response()
        self._check_seq(seq)
        phase = self._phase
        if phase is _Phase.DEFINITIONS:
            self._left -= 1
            if not self._left:
                self._end_run()
            return None
        if phase is _Phase.STREAM:
            return None
        if phase is _Phase.ROWS:
            # A short row whole is the splitter's fast path; of a long one
            # only the prefix that tells a row from an EOF, OK or ERR.
            return length if length <= _SHORT_ROW else _ROW_PREFIX
        if phase is _Phase.DEFINITIONS_EOF:
            return _EOF_MAX
        return min(length, self._max_message)

    def _check_seq(self, seq: int) -> None:
        if self._seq >= 0 and seq != self._seq:
            malformed(f"the server sent packet {seq} where {self._seq} was due (packets "
                      f"out of order)", ErrorNumber.ER_NET_PACKETS_OUT_OF_ORDER)
        self._seq = -1 if self._phase in (_Phase.AUTH, _Phase.INFILE_RESULT) else (seq + 1) & 0xFF

    def _start_response(self) -> None:
        if not self._tracker.pending:
            # MySQL 8 says why it drops an idle connection with an ERR of
            # its own (4031); anything else is out of turn.
            self._command, self._expect, self._phase = -1, Expect.SIMPLE, _Phase.UNSOLICITED
            self._seq = -1
            return
        self._command, self._expect = self._tracker.pending.popleft()
        self._seq = -1
        self._phase = _FIRST_PHASE.get(self._expect, _Phase.FIRST)

    def _end_run(self) -> None:
        if self._tracker.deprecate_eof:
            self._phase = self._after_definitions()
        else:
            self._phase = _Phase.DEFINITIONS_EOF

    def _after_definitions(self) -> _Phase:
        while self._runs:
            self._left = self._runs.pop(0)
            if self._left:
                return _Phase.DEFINITIONS
        if self._expect is _PREPARE:
            self._done()
            return _Phase.IDLE
        return _Phase.ROWS

    def _done(self) -> None:
        self._phase = _Phase.IDLE
        self._seq = -1

    # -- reading the packets kept ----------------------------------------------------------

    def _on_frame(self, frame: Frame) -> None:
        body = frame.body
        first = body[0] if body else -1
        if first == 0xFF and self._phase is not _Phase.STREAM:
            self._on_err(frame)
            return
        handler = _HANDLERS[self._phase]
        handler(self, frame, first)

    def _on_err(self, frame: Frame) -> None:
        # A kept ERR is whole or at least 24 bytes long: its code and
        # SQLSTATE are always there.
        reader = Reader(frame.body, "an ERR packet")
        reader.skip(1)
        errno = reader.int2()
        if errno == 0xFFFF:  # MariaDB progress report: not an answer
            return
        sqlstate = None
        if reader.peek() == 0x23:  # '#'
            reader.skip(1)
            sqlstate = reader.raw(5).decode("ascii", "replace")
        message = reader.rest().decode("utf-8", "replace")
        self._events.append(ErrorEvent(errno=errno, sqlstate=sqlstate, message=message,
                                       truncated=not frame.complete))
        self._done()

    def _on_first(self, frame: Frame, first: int) -> None:
        if first == 0x00:
            if self._expect is _PREPARE:
                self._on_prepare_ok(frame)
            else:
                self._terminated(frame)
        elif first == 0xFE and frame.body_length < _EOF_MAX:
            self._terminated(frame)
        elif first == 0xFB and self._command == Command.QUERY:
            name = frame.body[1 : 1 + _MAX_FILE_NAME]
            self._events.append(LocalInfileRequestEvent(
                file_name=name.decode("utf-8", "replace"),
                truncated=frame.body_length - 1 > _MAX_FILE_NAME))
            self._tracker.infile = True
            self._phase = _Phase.INFILE_RESULT
            self._seq = -1
        elif self._expect is _RESULT:
            reader = Reader(frame.body, "a column count")
            columns = reader.lenenc_int()
            follows = reader.int1() if self._tracker.cache_metadata else 1
            reader.end()
            if not 0 < columns <= 0xFFFF:
                reader.fail(f"a result set of {columns} columns")
            if follows not in (0, 1):
                reader.fail(f"metadata follows is {follows}, not 0 or 1")
            self._runs = []
            if follows:
                self._left, self._phase = columns, _Phase.DEFINITIONS
            else:  # the client has them from before: only the [EOF] comes
                self._left = 0
                self._end_run()
        else:  # COM_STATISTICS' text, or whatever a simple command got
            self._done()

    def _on_prepare_ok(self, frame: Frame) -> None:
        reader = Reader(frame.body, "a COM_STMT_PREPARE_OK")
        reader.skip(1)
        statement, columns, params = reader.int4(), reader.int2(), reader.int2()
        self._tracker.prepared(statement, params)
        self._runs = [params, columns]
        self._phase = self._after_definitions()

    def _terminated(self, frame: Frame) -> None:
        """An OK or EOF ends this result: another may follow."""
        status = self._status_of(frame)
        if status & _MORE_RESULTS and not status & _CURSOR:
            self._phase = _Phase.FIRST
        else:
            self._done()

    @staticmethod
    def _status_of(frame: Frame) -> int:
        body = frame.body
        if len(body) >= 5 and body[1] < 0xFB and body[2] < 0xFB:
            # The common case: an EOF, or an OK whose two counts fit a byte.
            return body[3] | body[4] << 8
        reader = Reader(body, "an OK or EOF packet", complete=frame.complete)
        try:
            if reader.int1() == 0xFE and frame.body_length < _EOF_MAX:
                reader.skip(2)  # warnings
                return reader.int2()
            reader.lenenc_int()
            reader.lenenc_int()
            return reader.int2()
        except Cut:
            return 0

    def _on_definitions_eof(self, frame: Frame, first: int) -> None:
        if first != 0xFE or frame.body_length >= _EOF_MAX:
            Reader(b"", "a result set").fail("definitions not followed by EOF")
        if self._expect is _RESULT and self._status_of(frame) & _CURSOR:
            self._done()  # the rows come with COM_STMT_FETCH
            return
        self._phase = self._after_definitions()

    def _on_row(self, frame: Frame, first: int) -> None:
        if first == 0xFE and (frame.body_length < _EOF_MAX or (
                self._tracker.deprecate_eof and frame.body_length < MAX_PAYLOAD)):
            self._terminated(frame)

    def _on_infile_result(self, frame: Frame, first: int) -> None:
        # The client's auditor ends the transfer (its empty packet): the
        # server only answers after it.
        self._terminated(frame)

    def _on_unsolicited(self, frame: Frame, first: int) -> None:
        malformed("the server sent a packet no command asked for")

    def _on_auth(self, frame: Frame, first: int) -> None:
        if first == 0x00:
            self._done()


# The phase a response starts in, by what its command expects (FIELDS:
# definitions until an EOF, the same test as rows).
_FIRST_PHASE: Final[Mapping[Expect, _Phase]] = {
    Expect.ROWS: _Phase.ROWS, Expect.FIELDS: _Phase.ROWS, Expect.AUTH: _Phase.AUTH,
    Expect.STREAM: _Phase.STREAM,
}

_HANDLERS: Final = {
    _Phase.FIRST: ResponseAuditor._on_first,
    _Phase.DEFINITIONS_EOF: ResponseAuditor._on_definitions_eof,
    _Phase.ROWS: ResponseAuditor._on_row,
    _Phase.INFILE_RESULT: ResponseAuditor._on_infile_result,
    _Phase.AUTH: ResponseAuditor._on_auth,
    _Phase.UNSOLICITED: ResponseAuditor._on_unsolicited,
}

"""The server -> client half of a PostgreSQL session's audit: errors,
COPY, and on request CommandComplete and ReadyForQuery; everything else
skipped by its length."""

from __future__ import annotations

from typing import Final, Literal

from protocols.auditor import DEFAULT_MAX_TEXT
from protocols.framing import Frame
from protocols.postgres.audit.events import (
    BackendEvent, CommandCompleteEvent, CopyDirection, CopyDoneEvent, CopyResponseEvent, ErrorEvent,
    ReadyForQueryEvent,
)
from protocols.postgres.audit.reading import DEFAULT_MAX_MESSAGE, Auditor, Cut, Fields, clip_text
from protocols.postgres.messages import MAX_MESSAGE_LENGTH, Signal, protocol_violation


_COPY_RESPONSES: Final = {b"G": CopyDirection.IN, b"H": CopyDirection.OUT,
                          b"W": CopyDirection.BOTH}
# What the backend auditor reads: errors and COPY; with ``completions``,
# CommandComplete and ReadyForQuery too. Everything else (DataRow,
# RowDescription, BindComplete, notices...) is skipped by its length.
_BACKEND_READ: Final = frozenset({b"E", b"c", b"d", *_COPY_RESPONSES})
_COMPLETIONS: Final = frozenset({b"C", b"Z"})


class BackendAuditor(Auditor):
    """Audit events from the server -> client stream (after startup):
    errors, COPY starts, CopyData totals and CopyDone; with
    ``completions=True`` also CommandComplete and ReadyForQuery (a decode per
    statement and per transaction that the cluster's audit does not need).
    Every other message, known or not (a newer server may add some), is
    skipped by its length, unread."""

    _direction = CopyDirection.OUT

    def __init__(self, *, max_text: int = DEFAULT_MAX_TEXT,
                 max_message: int = DEFAULT_MAX_MESSAGE, completions: bool = False,
                 max_length: int = MAX_MESSAGE_LENGTH) -> None:
        read = _BACKEND_READ | _COMPLETIONS if completions else _BACKEND_READ
        # Only these are looked at; the rest pass by their length unasked.
        super().__init__(max_text=max_text, max_message=max_message, max_length=max_length, only=read)
        self._read = read

    def next_event(self) -> BackendEvent | Literal[Signal.NEED_DATA]:
        """The next event, or NEED_DATA; after EOF, ConnectionClosed forever.
        Raises RemoteProtocolError (08P01) for a malformed stream."""
        return super().next_event()  # type: ignore[no-any-return]

    def _keep(self, type_code: bytes, size: int) -> int | None:
        if type_code not in self._read:
            return None  # DataRow, RowDescription, ...: the per-row path is this
        if type_code == b"d":
            self._count_copy(size)
            return None
        if (type_code == b"Z" and size != 1) or (type_code == b"c" and size):
            raise protocol_violation(f"invalid length for message type {type_code!r}")
        return self._whole_or_prefix(size)

    def _on_frame(self, frame: Frame) -> None:
        if self._copy_messages:
            self._flush_copy()
        type_code = frame.kind
        r = Fields(frame, f"backend message {type_code!r}")
        if type_code == b"E":
            self._events.append(self._error_event(r))
        elif type_code == b"C":
            raw, _ = r.cstring()
            r.end()
            self._events.append(CommandCompleteEvent(tag=clip_text(raw, self._max_text)[0]))
        elif type_code == b"Z":
            status = r.raw(1).decode("latin-1")
            if status not in ("I", "T", "E"):
                raise protocol_violation("ReadyForQuery has an unknown transaction status")
            self._events.append(ReadyForQueryEvent(status=status))
        elif type_code == b"c":
            self._events.append(CopyDoneEvent(direction=CopyDirection.OUT))
        else:  # G, H or W
            self._events.append(self._copy_response(type_code, r))

    def _error_event(self, r: Fields) -> ErrorEvent:
        fields: dict[bytes, bytes] = {}
        whole = True
        try:
            while (code := r.raw(1)) != b"\x00":
                value, whole = r.cstring()
                fields[code] = value
                if not whole:
                    break
            else:
                r.end()
        except Cut:
            whole = False
        message, cut = clip_text(fields.get(b"M", b""), self._max_text)
        severity = fields.get(b"V") or fields.get(b"S")
        sqlstate = fields.get(b"C")
        return ErrorEvent(
            severity=None if severity is None else clip_text(severity, 64)[0],
            sqlstate=None if sqlstate is None else clip_text(sqlstate, 16)[0],
            message=message, truncated=cut or not whole,
        )

    def _copy_response(self, type_code: bytes, r: Fields) -> CopyResponseEvent:
        fmt = r.raw(1)[0]
        try:
            columns = len(r.formats())
        except Cut:
            columns = -1  # only a response of over max_message bytes gets here
        if fmt not in (0, 1):
            raise protocol_violation("a CopyResponse has an invalid format")
        r.end()
        return CopyResponseEvent(direction=_COPY_RESPONSES[type_code], format=fmt,
                                 columns=columns)

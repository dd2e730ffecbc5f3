"""The audit events of a relayed PostgreSQL session, both directions
(what :mod:`.frontend` and :mod:`.backend` hand out)."""

from __future__ import annotations

import enum
from typing import Union

import attrs

from protocols.postgres.messages import ConnectionClosed


class CopyDirection(enum.Enum):
    IN = "in"  # client -> server (COPY FROM STDIN)
    OUT = "out"  # server -> client (COPY TO STDOUT)
    BOTH = "both"  # CopyBothResponse (replication)


_event = attrs.frozen(kw_only=True)


# --- frontend events -----------------------------------------------------------


@_event
class QueryEvent:
    """A simple Query: one or more statements, run now."""

    text: str  # whole, or its head and tail (protocols.auditor.Statement)
    truncated: bool  # text is not all of the statement
    length: int  # the statement's full length in bytes
    sha256: str  # of all of its bytes
    size: int  # the message body's full size in bytes


@_event
class ParseEvent:
    """Parse: prepare ``text`` as ``statement`` ("" is the unnamed one)."""

    statement: str
    text: str  # as QueryEvent's
    truncated: bool
    length: int
    sha256: str
    size: int
    param_types: int | None  # how many parameter types were given; None if cut off


@_event
class BindEvent:
    """Bind: make ``portal`` from ``statement`` and parameter values.

    Values are only carried when the auditor was built with
    ``bind_values=True`` (each cut to ``max_value`` bytes; None is SQL NULL);
    ``param_formats`` says which are text (0) and binary (1): one code for
    all, one per value, or none for all-text.
    """

    portal: str
    statement: str
    param_count: int | None  # None if the message was cut before the count
    param_formats: tuple[int, ...]
    values: tuple[bytes | None, ...] | None = attrs.field(repr=False)
    truncated: bool
    size: int


@_event
class ExecuteEvent:
    portal: str
    max_rows: int  # 0: all rows


@_event
class FunctionCallEvent:
    """A fast-path function call by OID (libpq's large-object calls are these)."""

    oid: int
    arg_count: int | None
    size: int


@_event
class CopyDataEvent:
    """A run of CopyData messages: how many, and their bodies' total length
    as declared in their headers (bodies are never kept). A run cut by EOF
    counts the last message whole; its ConnectionClosed then says unclean."""

    direction: CopyDirection
    messages: int
    bytes: int


@_event
class CopyDoneEvent:
    direction: CopyDirection


@_event
class CopyFailEvent:
    """The client aborted a COPY FROM STDIN."""

    message: str
    truncated: bool


@_event
class TerminateEvent:
    """The client said goodbye; nothing after it is parsed."""


@_event
class MessageEvent:
    """Any other message (Sync, Flush, Describe, Close, a password message):
    only reported when the auditor was built with ``report_all=True``."""

    type_code: bytes
    size: int


# --- backend events -------------------------------------------------------------


@_event
class ErrorEvent:
    """An ErrorResponse: the statement (or the session, if FATAL) failed."""

    severity: str | None
    sqlstate: str | None
    message: str
    truncated: bool


@_event
class CommandCompleteEvent:
    tag: str  # e.g. "SELECT 5", "INSERT 0 1", "COPY 1000"


@_event
class CopyResponseEvent:
    """CopyInResponse, CopyOutResponse or CopyBothResponse: a COPY started."""

    direction: CopyDirection
    format: int  # 0 text, 1 binary
    columns: int


@_event
class ReadyForQueryEvent:
    status: str  # I idle, T in a transaction, E in a failed transaction


FrontendEvent = Union[QueryEvent, ParseEvent, BindEvent, ExecuteEvent, FunctionCallEvent,
                      CopyDataEvent, CopyDoneEvent, CopyFailEvent, TerminateEvent, MessageEvent,
                      ConnectionClosed]
BackendEvent = Union[ErrorEvent, CommandCompleteEvent, CopyResponseEvent, CopyDataEvent,
                     CopyDoneEvent, ReadyForQueryEvent, ConnectionClosed]

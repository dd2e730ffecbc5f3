"""Audit events from a relayed PostgreSQL session: the cluster's side.

Spec: PostgreSQL docs, "Frontend/Backend Protocol": Simple Query, Extended
Query, Function Call, COPY Operations, Termination; "Message Formats".

Theory of operation
-------------------
The relay copies every client -> server byte (after the startup phase) into a
:class:`FrontendAuditor` and every server -> client byte into a
:class:`BackendAuditor`, in whatever chunks it read them. Both are built on
:class:`~protocols.auditor.StreamAuditor`, over the PostgreSQL frame layout
(``receive_data``, then ``next_event()`` until ``NEED_DATA``; no reference
to a chunk is kept, so the relay may reuse its buffers).

This runs on every message of every session, so each message is read only
as far as an event needs it (issue 14):

* server -> client: only ErrorResponse and COPY are read (and, with
  ``completions``, CommandComplete and ReadyForQuery). DataRow,
  RowDescription and everything else are skipped by their length, unread
  and uncopied.
* client -> server: Query, Parse, Execute, FunctionCall and CopyFail are
  read; Bind up to its parameter count (its values only with
  ``bind_values``); Sync, Flush, Describe, Close and password messages
  ('p', never looked into) are skipped by their length unless
  ``report_all`` asks for them.
* CopyData is never kept: consecutive CopyData messages are counted from
  their headers and summed into one :class:`CopyDataEvent` (messages and
  bytes), handed out when the run ends.

Memory is bounded whatever the peer sends: a message is kept whole only
when it is at most ``max_message`` bytes (1 MiB by default), else as a
prefix (``max_text`` + 1 KiB): the event then carries what the prefix held
and ``truncated=True``, and the rest of the body streams past uncounted
except for its length. A statement (Query, Parse) is the exception: its
event carries its full length and SHA-256, and its text whole up to
``max_text`` bytes or else its first and last halves of that around a
marker (:class:`~protocols.auditor.Statement`); in a message kept only as a
prefix, the rest of the statement is followed as it streams past and the
event comes when the message ends. Other text is cut to ``max_text`` bytes,
with a flag.

Text is decoded as UTF-8 with replacement: the session's client_encoding
may be anything, and an audit record must never fail over it. Framing, and
the layout of what is read, are checked as strictly as the server checks
them, so a malformed stream raises RemoteProtocolError (08P01) once the
events before it have been handed out; the auditor is then poisoned. What
is skipped unread is not checked.

Modules: :mod:`.frontend` (:class:`FrontendAuditor`), :mod:`.backend`
(:class:`BackendAuditor`), :mod:`.reading` (what both share: reading a kept
body, the bounds, the CopyData run), :mod:`.events`.
"""

from protocols.auditor import DEFAULT_MAX_TEXT
from protocols.postgres.audit.backend import BackendAuditor
from protocols.postgres.audit.events import (
    BackendEvent, BindEvent, CommandCompleteEvent, CopyDataEvent, CopyDirection, CopyDoneEvent, CopyFailEvent,
    CopyResponseEvent, ErrorEvent, ExecuteEvent, FrontendEvent, FunctionCallEvent, MessageEvent, ParseEvent,
    QueryEvent, ReadyForQueryEvent, TerminateEvent,
)
from protocols.postgres.audit.frontend import FrontendAuditor
from protocols.postgres.audit.reading import DEFAULT_MAX_MESSAGE

__all__ = [
    "DEFAULT_MAX_TEXT", "DEFAULT_MAX_MESSAGE", "CopyDirection",
    "QueryEvent", "ParseEvent", "BindEvent", "ExecuteEvent", "FunctionCallEvent",
    "CopyDataEvent", "CopyDoneEvent", "CopyFailEvent", "TerminateEvent", "MessageEvent",
    "ErrorEvent", "CommandCompleteEvent", "CopyResponseEvent", "ReadyForQueryEvent",
    "FrontendEvent", "BackendEvent", "FrontendAuditor", "BackendAuditor",
]

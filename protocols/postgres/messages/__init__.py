"""PostgreSQL wire messages (protocol 3.0): framing, encoding and decoding.

Spec: the PostgreSQL documentation, chapter "Frontend/Backend Protocol":
"Message Data Types", "Message Formats", "Error and Notice Message Fields".

Two kinds of packet share one connection::

    untyped  := length:Int32 | code:Int32 | payload       (first packet only:
                StartupMessage, SSLRequest, GSSENCRequest, CancelRequest)
    typed    := type:Byte1 | length:Int32 | body           (everything after)

One module per job, each re-exported here (``from protocols.postgres import
messages as m; m.Query``):

* :mod:`.framing`: a typed message's header, :func:`frame`, and the streaming
  :class:`FrameSplitter` the audit parsers use;
* :mod:`.startup`: the untyped startup-phase packets;
* :mod:`.frontend` and :mod:`.backend`: one small frozen class per message we
  send or read, with ``encode()``, validated when constructed, and
  :func:`decode_frontend` / :func:`decode_backend`;
* :mod:`.sqlstate`: the SQLSTATE <-> :class:`ErrorCode` vocabulary;
* :mod:`.fields`: the field reader, writers and validators they share.

A bad message cannot be built (:class:`LocalProtocolError`); a bad one
received is a :class:`RemoteProtocolError` with SQLSTATE 08P01.
"""

from protocols.postgres.messages.backend import (
    AuthenticationCleartextPassword, AuthenticationMD5Password, AuthenticationOk,
    AuthenticationOther, AuthenticationSASL, AuthenticationSASLContinue, AuthenticationSASLFinal,
    BackendKeyData, BackendMessage, CommandComplete, CopyBothResponse, CopyInResponse,
    CopyOutResponse, ErrorResponse, NegotiateProtocolVersion, NoticeResponse, ParameterStatus,
    ReadyForQuery, decode_backend, error_response_for,
)
from protocols.postgres.messages.framing import (
    HEADER, MAX_MESSAGE_LENGTH, Frame, FrameSplitter, KeepPolicy, frame,
)
from protocols.postgres.messages.frontend import (
    FRONTEND_TYPES, Bind, Close, CopyData, CopyDone, CopyFail, Describe, Execute, Flush,
    FrontendMessage, FunctionCall, Parse, PasswordMessage, Query, SASLInitialResponse,
    SASLResponse, Sync, Terminate, decode_frontend,
)
from protocols.postgres.messages.sqlstate import (
    SQLSTATE_FOR_CODE, SqlState, error_code_for_sqlstate, protocol_violation,
)
from protocols.postgres.messages.startup import (
    CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_CANCEL_KEY, MAX_STARTUP_PACKET, MIN_CANCEL_KEY,
    PROTOCOL_3_0, SSL_REQUEST_CODE, CancelRequest, GSSENCRequest, SSLRequest, StartupMessage,
    StartupPacket, decode_startup_packet, parse_ssl_answer, replication_requested,
)
from protocols.signals import NEED_DATA, PAUSED, ConnectionClosed, Signal

__all__ = [
    # constants
    "PROTOCOL_3_0", "SSL_REQUEST_CODE", "GSSENC_REQUEST_CODE", "CANCEL_REQUEST_CODE",
    "MAX_STARTUP_PACKET", "MIN_CANCEL_KEY", "MAX_CANCEL_KEY", "MAX_MESSAGE_LENGTH",
    "SqlState", "SQLSTATE_FOR_CODE", "error_code_for_sqlstate", "protocol_violation",
    # untyped startup packets
    "SSLRequest", "GSSENCRequest", "CancelRequest", "StartupMessage", "StartupPacket",
    "decode_startup_packet", "parse_ssl_answer", "replication_requested",
    # backend messages
    "AuthenticationOk", "AuthenticationCleartextPassword", "AuthenticationMD5Password",
    "AuthenticationSASL", "AuthenticationSASLContinue", "AuthenticationSASLFinal",
    "AuthenticationOther", "ParameterStatus", "BackendKeyData", "ReadyForQuery",
    "ErrorResponse", "NoticeResponse", "NegotiateProtocolVersion", "CommandComplete",
    "CopyInResponse", "CopyOutResponse", "CopyBothResponse", "BackendMessage",
    "decode_backend", "error_response_for",
    # frontend messages
    "PasswordMessage", "SASLInitialResponse", "SASLResponse", "Query", "Parse", "Bind",
    "Execute", "Describe", "Close", "Sync", "Flush", "CopyData", "CopyDone", "CopyFail",
    "FunctionCall", "Terminate", "FrontendMessage", "FRONTEND_TYPES", "decode_frontend",
    # framing
    "HEADER", "frame", "Frame", "FrameSplitter", "KeepPolicy", "Signal", "NEED_DATA", "PAUSED",
    "ConnectionClosed",
]

"""protocols.postgres: the PostgreSQL wire protocol (3.0), sans-I/O.

* :mod:`.messages`: one module per job: framing, startup packets, frontend
  and backend message classes with ``encode()`` and decoders, the SQLSTATE
  vocabulary and refusals.
* :mod:`.frontend`: the gateway playing the server to a local client:
  :class:`StartupConnection` (SSLRequest, GSSENCRequest, direct TLS,
  CancelRequest, StartupMessage), :func:`negotiation_for`, and
  :class:`StartupRelay` (swaps BackendKeyData on the way back).
* :mod:`.scram`: the cluster logging in upstream: :class:`UpstreamLogin`
  (cleartext, md5, SCRAM-SHA-256 with server verification).
* :mod:`.audit`: the cluster's audit of a relayed session:
  :class:`FrontendAuditor` (``audit/frontend.py``) and
  :class:`BackendAuditor` (``audit/backend.py``).

Every parser here raises only :class:`~protocols.errors.RemoteProtocolError`
for bad input, with ``wire_hint`` set to the SQLSTATE to answer with.
"""

from protocols.postgres.audit import (
    BackendAuditor, BindEvent, CommandCompleteEvent, CopyDataEvent, CopyDirection,
    CopyDoneEvent, CopyFailEvent, CopyResponseEvent, ErrorEvent, ExecuteEvent, FrontendAuditor,
    FunctionCallEvent, MessageEvent, ParseEvent, QueryEvent, ReadyForQueryEvent, TerminateEvent,
)
from protocols.postgres.frontend import (
    DirectTLS, StartupConnection, StartupRelay, State, negotiation_for,
)
from protocols.postgres.messages import (
    NEED_DATA, PAUSED, AuthenticationOk, BackendKeyData, CancelRequest, ConnectionClosed,
    ErrorResponse,
    GSSENCRequest, NegotiateProtocolVersion, NoticeResponse, ParameterStatus, ReadyForQuery,
    Signal, SqlState, SSLRequest, StartupMessage, error_code_for_sqlstate, error_response_for,
    parse_ssl_answer, replication_requested,
)
from protocols.postgres.scram import (
    AuthMethod, LoginReady, LoginState, ScramSHA256Client, UpstreamLogin, UpstreamLoginError,
    md5_password,
)

__all__ = [
    # signals
    "NEED_DATA", "PAUSED", "Signal", "ConnectionClosed",
    # messages the gateway and cluster build or read
    "SSLRequest", "GSSENCRequest", "CancelRequest", "StartupMessage", "AuthenticationOk",
    "ParameterStatus", "BackendKeyData", "ReadyForQuery", "ErrorResponse", "NoticeResponse",
    "NegotiateProtocolVersion", "SqlState", "error_response_for", "error_code_for_sqlstate",
    "parse_ssl_answer", "replication_requested",
    # gateway
    "StartupConnection", "State", "DirectTLS", "negotiation_for",
    "StartupRelay",
    # cluster: login
    "UpstreamLogin", "LoginState", "LoginReady", "UpstreamLoginError", "AuthMethod",
    "ScramSHA256Client", "md5_password",
    # cluster: audit
    "FrontendAuditor", "BackendAuditor", "QueryEvent", "ParseEvent", "BindEvent",
    "ExecuteEvent", "FunctionCallEvent", "CopyDataEvent", "CopyDoneEvent", "CopyFailEvent",
    "TerminateEvent", "MessageEvent", "ErrorEvent", "CommandCompleteEvent",
    "CopyResponseEvent", "ReadyForQueryEvent", "CopyDirection",
]

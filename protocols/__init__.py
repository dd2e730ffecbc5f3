"""Sans-I/O protocol engines: bytes in, events out, bytes to send.

Nothing in this package awaits, opens sockets, touches TLS or reads a clock;
the I/O lives in ``gateway/``. Each protocol raises only the two error
families of :mod:`protocols.errors`, answers ``next_event()`` with the one
set of :mod:`protocols.signals`, reads length-prefixed frames with
:mod:`protocols.framing`, and audits a relayed stream on
:mod:`protocols.auditor`.
"""

from protocols.auditor import Statement, StatementReader, StreamAuditor
from protocols.buffer import ReceiveBuffer
from protocols.dial import (
    DIAL_VERSION,
    MAX_FRAME,
    NEED_DATA,
    PAUSED,
    SUPPORTED_VERSIONS,
    DialAccept,
    DialConnection,
    DialError,
    DialEvent,
    DialRequest,
    Role,
    State,
    refusal_for,
)
from protocols.errors import ErrorCode, LocalProtocolError, ProtocolError, RemoteProtocolError
from protocols.framing import Frame, FrameLayout, FrameSplitter
from protocols.signals import ConnectionClosed, Signal

__all__ = [
    "DIAL_VERSION",
    "MAX_FRAME",
    "NEED_DATA",
    "PAUSED",
    "SUPPORTED_VERSIONS",
    "ConnectionClosed",
    "DialAccept",
    "DialConnection",
    "DialError",
    "DialEvent",
    "DialRequest",
    "ErrorCode",
    "Frame",
    "FrameLayout",
    "FrameSplitter",
    "LocalProtocolError",
    "ProtocolError",
    "ReceiveBuffer",
    "RemoteProtocolError",
    "Role",
    "Signal",
    "State",
    "Statement",
    "StatementReader",
    "StreamAuditor",
    "refusal_for",
]

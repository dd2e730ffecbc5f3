"""The gateway's side of a PostgreSQL startup: it plays the server to a local client.

Spec: PostgreSQL docs, "Frontend/Backend Protocol", "Message Flow": Start-up,
SSL Session Encryption, GSSAPI Session Encryption, Canceling Requests in
Progress; "Protocol Versions" for NegotiateProtocolVersion.

Theory of operation
-------------------
:class:`StartupConnection` reads the client's untyped first packets, h11
style: ``receive_data`` takes bytes (``b""`` for EOF), ``next_event`` returns
one event or a signal. A client may first ask for encryption, then start::

    [GSSENCRequest -> "N"] [SSLRequest -> "S" + TLS | "N"] StartupMessage
    or, on a connection of its own:  CancelRequest (no answer; close)
    or, PostgreSQL 17's direct TLS:  a TLS ClientHello as the first byte

Each encryption request is answered by the caller through this object
(:meth:`~StartupConnection.answer_ssl`, :meth:`~StartupConnection.answer_gssenc`,
:meth:`~StartupConnection.accept_direct_tls`), which owns the rules the server
enforces: each kind of request at most once, none once TLS is up, and no
plaintext byte may follow an SSLRequest that is answered "S" (such bytes would
be read as if they had come through TLS: CVE-2021-23214). After a
StartupMessage or CancelRequest the object is done: ``next_event`` returns
``PAUSED`` and ``trailing_data`` holds whatever the client pipelined after it.

What is answered next is the gateway's business: maybe a
NegotiateProtocolVersion (:func:`negotiation_for`), then the cluster's bytes,
or a FATAL ErrorResponse (:func:`~.messages.error_response_for`). The
cluster's startup answer goes through a :class:`StartupRelay`, which swaps
the upstream BackendKeyData for the gateway's own (so a CancelRequest comes
back to the gateway, which knows the session to cancel) and then gets out of
the way.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final, Literal, Union

import attrs

from protocols.buffer import BufferedReceiver, ReceiveBuffer
from protocols.errors import LocalProtocolError, RemoteProtocolError
from protocols.framing import POSTGRES_MESSAGE, POSTGRES_STARTUP, FrameSplitter
from protocols.postgres.messages import (
    HEADER, MAX_CANCEL_KEY, MAX_STARTUP_PACKET, MIN_CANCEL_KEY, NEED_DATA, PAUSED,
    BackendKeyData, CancelRequest, ConnectionClosed, ErrorResponse, GSSENCRequest,
    NegotiateProtocolVersion, Signal, SSLRequest, StartupMessage, decode_backend,
    decode_startup_packet, protocol_violation,
)

__all__ = [
    "DEFAULT_MAX_BUFFER_SIZE", "State", "DirectTLS",
    "StartupEvent", "StartupConnection", "negotiation_for", "StartupRelay",
]

# A client sends one small packet and waits, so this is only reached by a
# client that pipelines a lot behind its StartupMessage (none known does).
DEFAULT_MAX_BUFFER_SIZE: Final = 64 * 1024
_TLS_HANDSHAKE: Final = 0x16  # first byte of a TLS record carrying a handshake


class State(enum.Enum):
    AWAIT_PACKET = "AWAIT_PACKET"  # reading the next startup-phase packet
    SSL_ANSWER_DUE = "SSL_ANSWER_DUE"  # an SSLRequest came: answer_ssl()
    GSS_ANSWER_DUE = "GSS_ANSWER_DUE"  # a GSSENCRequest came: answer_gssenc()
    DIRECT_TLS_DUE = "DIRECT_TLS_DUE"  # a ClientHello came: accept_direct_tls() or close
    DONE = "DONE"  # StartupMessage or CancelRequest read; the rest is trailing_data
    CLOSED = "CLOSED"  # the client hung up between packets
    ERROR = "ERROR"


@attrs.frozen(kw_only=True)
class DirectTLS:
    """The client opened with a TLS ClientHello (``sslnegotiation=direct``,
    PostgreSQL 17+). Such clients insist on ALPN ``postgresql``."""


StartupEvent = Union[SSLRequest, GSSENCRequest, CancelRequest, StartupMessage, DirectTLS,
                     ConnectionClosed]

# Which packet may come next. As the server has it, each kind of encryption
# request is allowed once, and neither once an encryption layer is up: an
# event listed here is refused when the named flag is set. (A DirectTLS is
# only recognised as the very first byte of a connection.)
_REFUSED_WHEN: Final[Mapping[type, str]] = MappingProxyType({
    SSLRequest: "_ssl_done",
    GSSENCRequest: "_gss_done",
})

# The state an event leaves us in.
_AFTER: Final[Mapping[type, State]] = MappingProxyType({
    SSLRequest: State.SSL_ANSWER_DUE,
    GSSENCRequest: State.GSS_ANSWER_DUE,
    DirectTLS: State.DIRECT_TLS_DUE,
    CancelRequest: State.DONE,
    StartupMessage: State.DONE,
    ConnectionClosed: State.CLOSED,
})


class StartupConnection(BufferedReceiver):
    """The client's startup packets, read by the gateway; see the module doc."""

    def __init__(self, *, max_buffer_size: int = DEFAULT_MAX_BUFFER_SIZE) -> None:
        if max_buffer_size < MAX_STARTUP_PACKET:
            raise ValueError(f"max_buffer_size must hold a whole startup packet "
                             f"({MAX_STARTUP_PACKET} bytes)")
        self._buffer = ReceiveBuffer(max_buffer_size)
        self._splitter = FrameSplitter(POSTGRES_STARTUP)
        self._state = State.AWAIT_PACKET
        self._ssl_done = False  # an SSLRequest was answered (or TLS is up)
        self._gss_done = False  # a GSSENCRequest was answered (or TLS is up)
        self._tls = False
        self._fresh = True  # nothing consumed yet on this connection
        self._eof = False
        self._error: RemoteProtocolError | None = None

    @property
    def state(self) -> State:
        return self._state

    @property
    def tls(self) -> bool:
        """Whether the caller was told to switch to TLS (bytes are now decrypted)."""
        return self._tls

    def __repr__(self) -> str:
        return f"<StartupConnection {self._state.name} tls={self._tls}>"

    # -- receiving ------------------------------------------------------------

    # receive_data (BufferedReceiver): bytes from the client, decrypted ones
    # once TLS is up.

    def _overflowed(self, exc: RemoteProtocolError) -> None:
        self._poison(protocol_violation(exc.message))

    def next_event(self) -> StartupEvent | Literal[Signal.NEED_DATA, Signal.PAUSED]:
        """The client's next packet, NEED_DATA, or PAUSED while an answer is
        owed or once the startup packet is in.

        Raises RemoteProtocolError (its ``wire_hint`` is the SQLSTATE to put in
        the FATAL ErrorResponse); the connection is then poisoned."""
        if self._error is not None:
            err = self._error
            raise RemoteProtocolError(err.message, code=err.code, wire_hint=err.wire_hint) from err
        if self._state is State.CLOSED:
            return ConnectionClosed(clean=True)
        if self._state is not State.AWAIT_PACKET:
            return PAUSED
        try:
            event = self._read_packet()
        except RemoteProtocolError as exc:
            self._poison(exc)
            raise
        if event is not NEED_DATA:
            self._state = _AFTER[type(event)]
        return event

    @property
    def trailing_data(self) -> tuple[bytes, bool]:
        """``(bytes after the startup packet, whether EOF was seen)``: the
        first bytes of the session, to forward once it is set up. Also the
        ClientHello bytes after DirectTLS (see accept_direct_tls)."""
        if self._error is not None:
            err = self._error
            raise RemoteProtocolError(err.message, code=err.code, wire_hint=err.wire_hint) from err
        if self._state not in (State.DONE, State.DIRECT_TLS_DUE):
            raise LocalProtocolError("no trailing data before the startup packet has arrived")
        return self._buffer.peek(len(self._buffer)) or b"", self._eof

    def _read_packet(self) -> StartupEvent | Literal[Signal.NEED_DATA]:
        buf = self._buffer
        head = buf.peek(4)
        if head is None:
            if self._fresh and buf.peek(1) == bytes([_TLS_HANDSHAKE]):
                return DirectTLS()  # no need to wait for 4 bytes
            return self._short()
        if self._fresh and head[0] == _TLS_HANDSHAKE:
            # As a length this would be over 350 MB: it can only be a TLS
            # record, from a client that skips the SSLRequest.
            return DirectTLS()
        packet = self._splitter.read_frame(buf)  # judges the length (08P01)
        if packet is None:
            return self._short()
        self._fresh = False
        return self._check(decode_startup_packet(packet.body))

    def _check(self, event: StartupEvent) -> StartupEvent:
        flag = _REFUSED_WHEN.get(type(event))
        if flag is not None and getattr(self, flag):
            raise protocol_violation(
                f"unexpected {type(event).__name__}: encryption was already negotiated"
            )
        return event

    def _short(self) -> ConnectionClosed | Literal[Signal.NEED_DATA]:
        if not self._eof:
            return NEED_DATA
        if not self._buffer:
            return ConnectionClosed(clean=True)
        raise protocol_violation("incomplete startup packet")

    def _poison(self, exc: RemoteProtocolError) -> None:
        self._error = exc
        self._state = State.ERROR

    # -- answering --------------------------------------------------------------

    def answer_ssl(self, *, accept: bool) -> bytes:
        """The one-byte answer to the SSLRequest just received: ``b"S"`` (then
        run the TLS handshake and feed decrypted bytes from then on) or
        ``b"N"`` (the client may go on in plaintext, or give up).

        Accepting raises RemoteProtocolError if the client already sent more
        plaintext: those bytes must not be mistaken for encrypted ones."""
        self._expect(State.SSL_ANSWER_DUE, "answer_ssl")
        self._ssl_done = True
        if accept:
            if self._buffer:
                err = protocol_violation("received unencrypted data after SSL request")
                self._poison(err)
                raise err
            self._gss_done = self._tls = True
        self._state = State.AWAIT_PACKET
        return b"S" if accept else b"N"

    def answer_gssenc(self) -> bytes:
        """``b"N"``: Wicket does not do GSSAPI encryption; libpq then tries
        TLS or plaintext on the same connection."""
        self._expect(State.GSS_ANSWER_DUE, "answer_gssenc")
        self._gss_done = True
        self._state = State.AWAIT_PACKET
        return b"N"

    def accept_direct_tls(self) -> bytes:
        """After DirectTLS: the bytes received so far, which open the TLS
        handshake (feed them to the TLS object first); from now on feed the
        decrypted bytes. To refuse direct TLS, just close the connection."""
        self._expect(State.DIRECT_TLS_DUE, "accept_direct_tls")
        hello = self._buffer.take_all()
        self._ssl_done = self._gss_done = self._tls = True
        self._fresh = False
        self._state = State.AWAIT_PACKET
        return hello

    def _expect(self, state: State, what: str) -> None:
        if self._state is not state:
            raise LocalProtocolError(f"{what}() is not allowed in state {self._state.name}")


def negotiation_for(startup: StartupMessage) -> NegotiateProtocolVersion | None:
    """What to send right after a StartupMessage that asks for more than 3.0
    (a newer minor version or ``_pq_.*`` options), or None if nothing is owed.

    The gateway speaks 3.0 and no protocol options, so the answer names 3.0
    and every ``_pq_.*`` option, in the client's order; a client that can
    live with that carries on (libpq does), else it hangs up."""
    options = tuple(startup.protocol_options)
    if startup.minor == 0 and not options:
        return None
    return NegotiateProtocolVersion(newest_minor=0, unrecognized=options)


# --- the backend's answer to the startup, on its way to the client ------------

# Messages the relay holds whole to read or rewrite; anything else streams
# past with at most its 5-byte header buffered.
_KEY_MAX_BODY: Final = 4 + MAX_CANCEL_KEY
_ERROR_MAX_BODY: Final = 64 * 1024


class StartupRelay:
    """Backend -> client bytes of the startup phase, with BackendKeyData swapped.

    ``feed(data)`` returns the bytes to write to the client now. Every message
    passes unchanged except BackendKeyData: it is replaced by ``key`` (unless
    ``key`` is None), and the upstream one is kept in :attr:`upstream_key`. A
    small ErrorResponse is also kept, in :attr:`error`, for the gateway's log.
    Once ReadyForQuery has gone through, :attr:`done` is True and ``feed``
    returns its input untouched (the rest of that chunk included): the caller
    switches to the plain relay. Memory is one BackendKeyData or one bounded
    ErrorResponse; other messages stream past whatever their size.

    Raises RemoteProtocolError (08P01) for a malformed frame.
    """

    __slots__ = ("_key", "_done", "_upstream_key", "_error", "_header", "_held", "_want",
                 "_type", "_pass")

    def __init__(self, key: BackendKeyData | None) -> None:
        if key is not None and not isinstance(key, BackendKeyData):
            raise TypeError("key must be a BackendKeyData or None")
        if key is not None and len(key.secret_key) != MIN_CANCEL_KEY:
            # We always tell the client "protocol 3.0", whose keys are 4 bytes
            # (libpq 18 refuses others on a 3.0 connection).
            raise ValueError("a protocol 3.0 client needs a 4-byte secret key")
        self._key = key
        self._done = False
        self._upstream_key: BackendKeyData | None = None
        self._error: ErrorResponse | None = None
        self._header = bytearray()
        self._held = bytearray()  # the body of a message held whole
        self._want = 0  # body bytes still to hold
        self._type = b""
        self._pass = 0  # body bytes still to pass through

    @property
    def done(self) -> bool:
        """True once ReadyForQuery has been passed on."""
        return self._done

    @property
    def upstream_key(self) -> BackendKeyData | None:
        """The backend's own BackendKeyData (what a cancel must quote upstream)."""
        return self._upstream_key

    @property
    def error(self) -> ErrorResponse | None:
        """The ErrorResponse the backend sent during startup, if any (and small)."""
        return self._error

    def feed(self, data: bytes | bytearray | memoryview) -> bytes:
        if self._done:
            return bytes(data)
        view = memoryview(data).cast("B")
        out = bytearray()
        pos, end = 0, len(view)
        while pos < end and not self._done:
            if self._pass:
                step = min(self._pass, end - pos)
                out += view[pos : pos + step]
                self._pass -= step
                pos += step
                continue
            if self._want:
                step = min(self._want, end - pos)
                self._held += view[pos : pos + step]
                self._want -= step
                pos += step
                if not self._want:
                    out += self._finish()
                continue
            step = min(5 - len(self._header), end - pos)
            self._header += view[pos : pos + step]
            pos += step
            if len(self._header) == 5:
                self._start(out)
        out += view[pos:]  # after ReadyForQuery: untouched
        view.release()
        return bytes(out)

    def _start(self, out: bytearray) -> None:
        type_code, length = HEADER.unpack(self._header)
        body = POSTGRES_MESSAGE.frame_size(length, POSTGRES_MESSAGE.max_length) - 5
        held = (type_code == b"K" and body <= _KEY_MAX_BODY) or type_code == b"Z" or (
            type_code == b"E" and body <= _ERROR_MAX_BODY)
        self._type = type_code
        if held and body:
            self._want = body
            self._held = bytearray()
        elif held:
            out += self._finish()  # an empty K or Z: _finish() rejects it
        else:
            if type_code == b"K":
                raise protocol_violation("BackendKeyData is too long")
            out += self._header
            self._header.clear()
            self._pass = body

    def _finish(self) -> bytes:
        header, body = bytes(self._header), bytes(self._held)
        self._header.clear()
        self._held = bytearray()
        if self._type == b"Z" and len(body) != 1:
            raise protocol_violation("ReadyForQuery has an invalid length")
        message = decode_backend(self._type, body)
        if isinstance(message, BackendKeyData):
            self._upstream_key = message
            if self._key is not None:
                return self._key.encode()
        elif isinstance(message, ErrorResponse):
            self._error = message
        else:
            self._done = True
        return header + body


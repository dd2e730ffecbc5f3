"""One side of a relayed session (:class:`End`): a non-blocking socket,
its TLS state if it speaks TLS, and what waits to be written to it; with
the few operations on an end alone that every owner shares: sealing
records (:func:`seal`, a key update first when one is due), the epoll
interest of an end that only watches, and the ways an operation on an end
fails. :mod:`gateway.net.engine` moves the bytes between ends; see its
theory of operation."""

from __future__ import annotations

import os
import select
import socket
import ssl
from typing import TYPE_CHECKING, Callable

import trio

from gateway.net import tlskeys
from gateway.net.tcp import TCP_CLOSE, unacknowledged
from gateway.net.tls import TLSStream, linger_reset

if TYPE_CHECKING:
    from gateway.net.pairs import _Session

__all__ = ["Tap", "eligible", "reset_and_close", "seal", "watch_mask"]

_IN, _OUT = select.EPOLLIN, select.EPOLLOUT


_ALWAYS = select.EPOLLERR | select.EPOLLHUP


#: The interest of a socket we neither read nor write now but must hear
#: fail: one that sent us its EOF while we owe it more (a half-closed,
#: quiet session), so that keepalive's verdict on a peer that vanished
#: (gateway/net/tcp.py) ends the session. Only errors and hang-ups are
#: reported for it. On TCP a hang-up only comes with an error here (our
#: side of the socket is still open for writing); on a unix socket it also
#: comes when the peer closed its socket after its EOF: the peer ending the
#: session, not a failure (:func:`failed_quietly`).
_WATCH = select.EPOLLERR


_TRUNCATED = (
    "the peer closed the TCP connection without a TLS close_notify, so the "
    "stream may have been cut short"
)


#: Shown every chunk one side sent, before it goes on; raising ends the
#: session. A tap only looks: what the cluster answers itself goes through
#: a message filter (gateway/net/filters.py).
Tap = Callable[[bytes], None]


def reset_and_close(sock: socket.socket) -> None:
    """Close ``sock`` with a TCP RST instead of a FIN (SO_LINGER 0): what a
    relay does to a connection whose other half was cut, so that its peer
    sees an abort, not an end. Anything still unsent is dropped."""
    linger_reset(sock)
    sock.close()


def _unacknowledged(sock: socket.socket) -> int:
    """Bytes written to ``sock`` that its peer's kernel has not acknowledged
    yet (SIOCOUTQ); 0 if the connection failed (a reset, keepalive's
    timeout: nothing more will be delivered, although the count may stay
    up) or the socket cannot say."""
    try:
        # tcpi_state, the first byte of TCP_INFO: a reset or timed-out
        # connection is CLOSE for good (SO_ERROR would say so only once).
        if sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] == TCP_CLOSE:
            return 0
    except OSError:
        pass  # not TCP (a test's AF_UNIX pair): SIOCOUTQ alone
    return unacknowledged(sock) or 0


class _Cut(Exception):
    """Ends a session on our own account (a tap that refused bytes): both
    sides are reset at once, with this message."""


class Failure(Exception):
    """One side's operation failed; ends the session with this message."""


def _ssl_text(exc: ssl.SSLError) -> str:
    return exc.reason or str(exc)


def send_failure(end: "End", exc: OSError, doing: str = "send") -> Failure:
    """``end``'s socket refused a write (``doing``: "send", "send_eof"):
    mark it failed and return the :class:`Failure` to raise, whose text the
    session's end is audited with ("client: send failed: Broken pipe")."""
    end.failed = True
    end.os_error = exc.errno
    return Failure(f"{end.name}: {doing} failed: {exc.strerror or exc}")


class End:
    """One side of a session: a non-blocking socket, TLS state if any, and
    what is waiting to be written to it."""

    __slots__ = (
        "sock", "fd", "name", "obj", "ssl", "incoming", "outgoing", "peer", "session", "tap", "forward",
        "owner", "filter",
        "tail", "more", "more_bytes", "carry", "mask", "registered", "in_done", "eof_wanted", "eof_sent", "peer_closed",
        "tcp_eof", "failed", "hung_up", "error_pending", "os_error", "kernel_full",
        "records", "rekey_at", "key_update", "shift",
    )

    def __init__(self, sock: socket.socket, name: str, tls: tuple | None, tap: Tap | None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.name = name
        # ``tls``: (SSLObject, incoming BIO, outgoing BIO[, records written
        # under the current key so far]), as detach hands it over.
        self.obj, self.incoming, self.outgoing, *written = tls if tls is not None else (None, None, None)
        # The C object behind the SSLObject: its read, write and pending are
        # the same calls without a Python frame around each (they are on
        # every message's path). ``obj`` itself if that ever moves.
        self.ssl = getattr(self.obj, "_sslobj", self.obj)
        self.peer: End | None = None
        self.session: _Session | None = None
        self.tap = tap
        # A two-socket session's client side may carry a message filter
        # (gateway/net/filters.py): what is read here goes through it.
        self.filter = None
        self.forward = True  # data read here counts as a_to_b
        # Not None for the ends of a multiplexed connection and its streams
        # (gateway/net/muxlink.py), which handles their events itself.
        self.owner = None
        self.tail: memoryview | None = None  # bytes for this socket the kernel has not taken
        # Queued behind the tail (a list, so appending costs no copy of what
        # is already queued); non-empty only while there is a tail.
        self.more: list[bytes] = []
        self.more_bytes = 0
        self.carry: bytearray | None = None  # plaintext read here, not yet handed to the peer
        self.mask = 0
        self.registered = False
        self.in_done = False  # EOF read from this end (and passed on)
        self.eof_wanted = False  # send EOF here once the tail has drained
        self.eof_sent = False  # our EOF (close_notify and/or FIN) went out here
        self.peer_closed = False  # TLS: their close_notify was read
        self.tcp_eof = False  # TLS: the socket reported EOF
        self.failed = False  # an operation on this end failed
        # A unix socket's peer closed it after its EOF, with no error: it
        # reads nothing more (a write to it fails: EPIPE), so it is no
        # longer watched; the session ends when the other side's EOF comes.
        self.hung_up = False
        self.error_pending: str | None = None  # an error to report after delivering data
        self.os_error: int | None = None  # the errno a read or write of the socket failed with
        # TLS: the last receive filled the buffer, so the kernel likely holds
        # more: a read that already has some plaintext receives again.
        self.kernel_full = False
        # TLS: records written under the current key, and when to ask for a
        # new one (gateway/net/tlskeys.py); how (None: not looked up yet,
        # False: not possible here).
        self.records = written[0] if written else 0
        self.rekey_at = tlskeys.UPDATE_AFTER
        self.key_update: Callable[[], None] | None | bool = None
        self.shift = 14 if self.obj is None else tlskeys.record_shift(self.obj)  # see tlskeys.records


def eligible(stream: object) -> bool:
    """Whether the engine can take ``stream`` over: a connected socket
    stream, or one of our TLS streams between operations with nothing
    half-done inside it."""
    if isinstance(stream, TLSStream):
        return stream.detachable()
    return type(stream) is trio.SocketStream and stream.socket.fileno() >= 0


def detach(stream) -> tuple[socket.socket, tuple | None]:
    if isinstance(stream, TLSStream):
        fd, tls = stream.detach()
        tls = (*tls, stream.records)  # the count goes on (gateway/net/tlskeys.py)
    else:
        fd, tls = stream.socket.detach(), None
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock, tls


def seal(end: End, data) -> bytes:
    """Encrypt ``data`` for the TLS ``end``: the records to write to its
    socket (a key update first when one is due). Raises :class:`Failure`."""
    if end.records >= end.rekey_at:
        rekey(end)  # right before a write, which sends the KeyUpdate: see tlskeys.rekey
    try:
        end.ssl.write(data)
    except ssl.SSLError as exc:
        end.failed = True
        raise Failure(f"{end.name}: send failed: TLS error: {_ssl_text(exc)}") from None
    end.records += (len(data) >> end.shift) + 1  # tlskeys.records, inline: every message pays it
    return end.outgoing.read()


def rekey(end: End) -> None:
    """:func:`tlskeys.rekey` for an end; raises :class:`Failure`."""
    try:
        tlskeys.rekey(end, end.obj, end.name)
    except tlskeys.KeysWornOut as exc:
        end.failed = True
        raise Failure(str(exc)) from None


def watch_mask(end: End) -> int:
    """The interest for an end that wants neither to read nor to write:
    ``_WATCH`` if it sent its EOF and we still owe it ours (unless it has
    hung up since: nothing more to hear from it), else none."""
    return (_WATCH if end.in_done and not end.eof_sent and end.tail is None and not end.failed and not end.hung_up
            else 0)


def failed_quietly(end: End, ev: int) -> None:
    """An error or hang-up on an end we only watch (``_WATCH``): raise
    :class:`Failure` with what the socket says (keepalive's "Connection
    timed out", a reset). Ends with any other interest meet their errors
    in their reads and writes.

    But a unix socket whose peer closed it after its EOF (only watched
    ends sent theirs) hangs up with no error: that peer ending the session
    (ssh closes its socket once it has sent its EOF, before the node's
    comes), not a failure. The end is marked :attr:`End.hung_up`; its
    owner stops watching it and the session ends as the other side's EOF
    comes, as for a TCP client that closed its socket, whose hang-up we
    cannot see: bytes still to deliver to it fail as writes to a closed
    socket do. On TCP a hang-up without an error stays a failure."""
    if ev & _ALWAYS and end.mask == _WATCH:
        try:
            code = end.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        except OSError as exc:
            code = exc.errno or 0
        if not code and ev & select.EPOLLHUP and end.sock.family == socket.AF_UNIX:
            end.hung_up = True
            return
        end.failed = True
        end.os_error = code or None
        raise Failure(f"{end.name}: connection failed: {os.strerror(code) if code else 'closed by the peer'}")


def _receive_failed(src: End, error: str, got: int) -> None:
    """A read of ``src`` failed after ``got`` bytes of plaintext: with none,
    raise :class:`Failure` now; else the error waits in ``error_pending``
    for the next read, so the bytes that came before it are passed on."""
    if not got:
        src.failed = True
        raise Failure(error) from None  # the text says it all; no chained traceback
    src.error_pending = error

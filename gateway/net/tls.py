"""TLS over a trio socket, tuned for relaying bulk and interactive traffic.

Theory of operation
-------------------
Every byte a user sends crosses this module twice (the gateway encrypts, the
cluster decrypts), so it trades generality for a short hot path.
``trio.SSLStream`` works over any stream and pays for that with extra
scheduler passes and buffer copies per operation (measured here: about 3x the
CPU per relayed byte); :class:`TLSStream` works over one connected socket
only and talks to the kernel directly.

The TLS state machine is an :class:`ssl.SSLObject` between two
:class:`ssl.MemoryBIO` s: ciphertext from the socket is written into
``_incoming``, OpenSSL writes ciphertext for the peer into ``_outgoing``, and we
move bytes between those and the socket's file descriptor with non-blocking
``os.readv`` / ``os.write``. Every SSLObject call is synchronous and trio is
single-threaded, so OpenSSL itself needs no locking: the only question is who
moves bytes when.

Receiving. ``receive_some`` first decrypts every complete record already in
``_incoming``, up to the caller's limit, into a scratch buffer (or, with
``receive_into``, straight into the caller's buffer: no copy, no allocation;
the relay reads that way). Only when that yields nothing does it read the
socket; it waits (``wait_readable``) only when the kernel has nothing
either. If a read filled the whole ciphertext buffer there is probably more
in the kernel, so it reads again before returning. A bulk transfer therefore
moves up to 256 KiB per call and per wake-up, and an interactive one costs
one ``readv`` and one ``SSL_read``. ``SSL_read`` is not even called when no
complete record can be waiting, since its "want read" answer is a raised
exception. The scratch and ciphertext buffers are shared by all streams of
a thread (they never hold data across an ``await``), so an idle connection
costs no buffer memory.

Sending. ``send_all`` encrypts at most ``SEND_CHUNK`` bytes of plaintext at a
time, then flushes ``_outgoing`` to the socket before encrypting more, so a
huge send never holds more than one chunk of ciphertext in memory.

The flush rule. TLS 1.3 lets the *receiving* side need to send: a KeyUpdate
answer, or the alert that explains why a bad record was rejected.
Bytes must leave in the order OpenSSL produced them, and a record must never
be split by another writer. Two pieces of state keep that true: ``_tail``
holds ciphertext already taken out of ``_outgoing`` but not yet accepted by the
kernel (it always goes first), and ``_flushing`` is set while a task is
awaiting inside a flush. Only tasks on the sending side (``send_all``,
``send_eof``, the handshake) ever await in a flush, and at most one of them
runs at a time, so a flush never has to wait for another. The receiving task
only flushes without blocking (``_flush_nowait``): if a send is in progress
the sender carries the receiver's bytes along, otherwise whatever the kernel
does not take now stays in ``_tail`` for the next receive or send. Were the
receiver to wait for the socket instead, two peers whose send buffers are
both full could each stop reading while waiting to send, and deadlock.

A flush cancelled halfway keeps its unsent ciphertext in ``_tail`` as well,
so a cancelled ``send_all`` never leaves half a record on the wire followed
by a fresh one. (As for any trio stream, the caller cannot know how much of
a cancelled ``send_all`` went through.)

Checkpoints. Each public method is one trio checkpoint: it checks for
cancellation on entry and yields exactly once, either inside the one wait it
needed or, when everything completed without blocking, through
``cancel_shielded_checkpoint`` at the end (the same pattern trio's sockets
use). Doing several non-blocking syscalls per call without yielding between
them is what makes this fast.

Half-close (TLS 1.3, RFC 8446 section 6.1). ``send_eof`` sends close_notify
and then shuts down the TCP write side: after close_notify OpenSSL writes
nothing more on this connection, and a plain-TCP peer (a C proxy relaying
our stream) then sees a FIN too. Reading keeps working until the peer sends
its own close_notify. If the peer had already sent its close_notify and has
since dropped the connection (allowed, and what TLS 1.2-minded peers do), a
close_notify of ours that cannot be delivered is not an error: both
directions are over. One OpenSSL quirk matters here: ``SSLObject.unwrap``
calls ``SSL_shutdown`` twice, and the second call tries to read the peer's
close_notify; if complete application-data records are waiting in
``_incoming`` it fails with APPLICATION_DATA_AFTER_CLOSE_NOTIFY (and that data
would be lost). So ``send_eof`` first decrypts whatever is waiting into
``_stash``, which ``receive_some`` serves before anything else.

End of stream. The peer's close_notify makes ``receive_some`` return b"".
A TCP EOF without close_notify is a truncation (an attacker, or a crashed
peer, cut the stream); it raises :class:`trio.BrokenResourceError` after every
authentic byte before it has been delivered.

Closing. ``aclose`` is prompt: it sends close_notify only if that fits in the
kernel buffer right now, never waits for the peer's, and always closes the
socket, even when cancelled. For a graceful end that waits until the
close_notify is in the kernel, under the caller's deadline, call ``send_eof``
first (the relay does). After ``reset_on_close`` it is an abort instead: no
close_notify, and a TCP RST (what a relay does when the other side failed).

Errors. OpenSSL errors and socket errors become
:class:`trio.BrokenResourceError` whose ``__cause__`` is the original exception
(so callers can tell an ``ssl.SSLCertVerificationError`` apart), and the stream
stays broken. Using the stream after ``aclose`` raises
:class:`trio.ClosedResourceError`. A failed handshake first tries to deliver
OpenSSL's alert, so the peer learns why ("unknown ca", "certificate
required") rather than seeing a bare EOF.

Limits. POSIX only (``os.readv`` / ``os.write`` on the socket's descriptor).
At most one task may receive and one may send (``send_all`` / ``send_eof``)
at a time; a second one gets :class:`trio.BusyResourceError`.
"""

from __future__ import annotations

import contextlib
import errno
import operator
import os
import socket
import ssl
import struct
import threading

import trio
from trio.lowlevel import (
    cancel_shielded_checkpoint,
    checkpoint,
    checkpoint_if_cancelled,
    wait_readable,
    wait_writable,
)

from gateway.net import tlskeys

__all__ = [
    "DEFAULT_RECEIVE_SIZE",
    "linger_reset",
    "SEND_CHUNK",
    "TLSStream",
]

#: ``receive_some()`` without ``max_bytes`` returns up to this much; it is
#: also the most any one call returns, whatever ``max_bytes`` says.
DEFAULT_RECEIVE_SIZE = 256 * 1024

#: Plaintext encrypted per flush in ``send_all``: bounds the ciphertext held
#: in memory while still handing the kernel large writes.
SEND_CHUNK = 256 * 1024

# Ciphertext read from the kernel per ``readv``: enough for a full plaintext
# read plus the per-record overhead (at most 256 bytes per 16 KiB record).
_RECV_CHUNK = DEFAULT_RECEIVE_SIZE + 8 * 1024

#: SO_LINGER on, 0 s: ``close()`` sends a TCP RST and drops what is unsent.
_LINGER_RESET = struct.pack("ii", 1, 0)


def linger_reset(sock) -> None:
    """Make ``close()`` of ``sock`` (a stdlib or trio socket) send a TCP RST
    instead of a FIN; one already closed or reset is left as it is."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)

_TRUNCATED = (
    "the peer closed the TCP connection without a TLS close_notify, so the "
    "stream may have been cut short"
)


def _describe(exc: ssl.SSLError) -> str:
    """OpenSSL's reason code, plus the verifier's words when there are some
    (``CERTIFICATE_VERIFY_FAILED (certificate has expired)``)."""
    text = exc.reason or str(exc)
    detail = getattr(exc, "verify_message", None)
    return f"{text} ({detail})" if detail else text


class _Scratch(threading.local):
    """Per-thread buffers shared by every stream of that thread's trio run.

    A buffer is filled and emptied within one synchronous step (``readv`` then
    ``MemoryBIO.write``; ``SSL_read`` then ``bytes(...)``), never across an
    ``await``, so streams can share it: a thousand idle connections cost no
    buffer memory. Thread-local because two threads may each run trio."""

    def __init__(self) -> None:
        self.cipher = memoryview(bytearray(_RECV_CHUNK))
        self.plain = memoryview(bytearray(DEFAULT_RECEIVE_SIZE))


_scratch = _Scratch()


class _OneAtATime:
    """Entered by one task at a time; a second gets trio.BusyResourceError."""

    __slots__ = ("busy", "message")

    def __init__(self, message: str) -> None:
        self.busy = False
        self.message = message

    def __enter__(self) -> None:
        if self.busy:
            raise trio.BusyResourceError(self.message)
        self.busy = True

    def __exit__(self, *exc_info) -> None:
        self.busy = False


class TLSStream(trio.abc.HalfCloseableStream):
    """A TLS connection over a connected :class:`trio.SocketStream`.

    The stream owns the transport from now on: ``aclose`` closes it. The
    handshake runs on first use, or explicitly with :meth:`do_handshake`.
    See the module docstring for the semantics of each operation.
    """

    def __init__(
        self,
        transport: trio.SocketStream,
        context: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
        received: bytes = b"",
    ) -> None:
        """``received``: TLS bytes already read from ``transport`` (a
        ClientHello a protocol peeked at to tell TLS from its own packets)."""
        self.transport_stream = transport
        self._sock = transport.socket
        self._incoming = ssl.MemoryBIO()
        if received:
            self._incoming.write(received)
        self._outgoing = ssl.MemoryBIO()
        self._obj = context.wrap_bio(
            self._incoming,
            self._outgoing,
            server_side=server_side,
            server_hostname=server_hostname,
            session=session,
        )
        scratch = _scratch
        self._cipher_buf = scratch.cipher
        self._plain_buf = scratch.plain

        self._handshake_done = False
        self._handshake_lock = trio.Lock()
        # One task at a time on each side (trio's rule for streams).
        self._receiving = _OneAtATime("another task is already receiving on this TLS stream")
        self._sending = _OneAtATime("another task is already sending on this TLS stream")
        self._flushing = False  # a sending-side task is awaiting inside _flush
        self._tail: memoryview | None = None  # ciphertext out of _outgoing, not yet sent
        self._stash = bytearray()  # plaintext decrypted early by send_eof
        self._peer_closed = False  # their close_notify has been read
        self._eof_sent = False  # our close_notify has been written
        self._tcp_eof = False  # the socket reported EOF
        self._broken: trio.BrokenResourceError | None = None
        self._closed = False
        self._abort = False  # aclose resets the connection instead of ending it
        # Records written under the current key, and when to ask for a new
        # one (gateway/net/tlskeys.py; after a detach the engine counts on).
        self.records = 0
        self.rekey_at = tlskeys.UPDATE_AFTER
        self.key_update = None
        self.shift = 14  # tlskeys.records; set from the handshake's outcome

    # ------------------------------------------------------------------
    # Introspection (valid once the handshake is done).

    def selected_alpn_protocol(self) -> str | None:
        return self._obj.selected_alpn_protocol()

    def getpeercert(self, binary_form: bool = False):
        """The peer's certificate, as :meth:`ssl.SSLObject.getpeercert`:
        ``None`` if the peer sent none (a server with ``CERT_OPTIONAL``)."""
        return self._obj.getpeercert(binary_form)

    def version(self) -> str | None:
        return self._obj.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._obj.cipher()

    @property
    def session(self) -> ssl.SSLSession | None:
        """The TLS session, to pass as ``session=`` to a later connection.

        With TLS 1.3 the server sends its session tickets *after* the
        handshake, so a client's session becomes resumable only once it has
        received some data after the handshake (any successful
        ``receive_some``). Read it then, not straight after connecting."""
        return self._obj.session

    @property
    def session_reused(self) -> bool:
        return self._obj.session_reused

    @property
    def server_side(self) -> bool:
        return self._obj.server_side

    # ------------------------------------------------------------------
    # Handing the connection over (to :mod:`gateway.net.engine`).

    def detachable(self) -> bool:
        """Whether :meth:`detach` may be called now: handshake done, no
        operation in progress, nothing half-sent or stashed, neither side
        closed, not broken."""
        return (
            self._handshake_done and not self._closed and self._broken is None
            and not (self._receiving.busy or self._sending.busy or self._flushing)
            and self._tail is None and not self._stash
            and not (self._peer_closed or self._eof_sent or self._tcp_eof)
        )

    def detach(self) -> tuple[int, tuple[ssl.SSLObject, ssl.MemoryBIO, ssl.MemoryBIO]]:
        """Give up the connection: return the socket's descriptor (now the
        caller's to close) and the TLS state. The stream is closed after
        this; ``aclose`` does nothing."""
        if not self.detachable():
            raise trio.BusyResourceError("this TLS stream is not in a state that can be handed over")
        fd = self._sock.detach()
        self._closed = True
        return fd, (self._obj, self._incoming, self._outgoing)

    # ------------------------------------------------------------------
    # Low-level helpers. None of them yields unless it says so.

    def _fd(self) -> int:
        fd = self._sock.fileno()
        if fd < 0:
            raise trio.ClosedResourceError("the TLS stream's socket was closed")
        return fd

    def _check_open(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream was closed")
        if self._broken is not None:
            raise trio.BrokenResourceError(*self._broken.args) from self._broken.__cause__

    def _fail(self, message: str, cause: BaseException | None) -> trio.BrokenResourceError:
        """Mark the stream broken; return the exception for the caller to raise."""
        error = trio.BrokenResourceError(message)
        error.__cause__ = cause
        if self._broken is None:
            self._broken = error
        return error

    def _os_error(self, exc: OSError, doing: str) -> Exception:
        if exc.errno == errno.EBADF:
            return trio.ClosedResourceError("the TLS stream's socket was closed")
        return self._fail(f"socket error while {doing}: {exc.strerror or exc}", exc)

    def _ssl_error(self, exc: ssl.SSLError) -> trio.BrokenResourceError:
        if isinstance(exc, ssl.SSLEOFError):
            return self._fail(_TRUNCATED, exc)
        return self._fail(f"TLS error: {_describe(exc)}", exc)

    def _decrypt(self, view: memoryview, limit: int) -> int:
        """Decrypt complete records from ``_incoming`` into ``view`` until
        ``limit`` bytes, the peer's close_notify, or a partial record.

        An error after some plaintext was produced only marks the stream
        broken, so the authentic data before it is still delivered; the next
        call raises."""
        total = 0
        obj, incoming = self._obj, self._incoming
        read = obj.read
        try:
            # An SSL_read that can only answer "want read" costs a raised
            # exception; skip it when no complete record can be waiting:
            # nothing in the BIO, no EOF to report, nothing decrypted but
            # unread. (OpenSSL consumes a record from the BIO only when it
            # returns data from it, so an empty BIO cannot hide a whole one.)
            while total < limit and (incoming.pending or incoming.eof or obj.pending()):
                n = read(limit - total, view[total:])
                if not n:  # close_notify, reported as 0 while ours is unsent
                    self._peer_closed = True
                    break
                total += n
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:  # close_notify, after ours was sent
            self._peer_closed = True
        except ssl.SSLError as exc:
            error = self._ssl_error(exc)
            if not total:
                self._flush_nowait()  # OpenSSL's alert, if it wrote one
                raise error from exc
        return total

    def _write_nowait(self, data: memoryview) -> memoryview:
        """Write what the kernel takes now; return the rest. Raises
        ``OSError`` other than ``BlockingIOError``."""
        fd = self._fd()
        try:
            while data:
                data = data[os.write(fd, data):]
        except BlockingIOError:
            pass
        return data

    def _flush_nowait(self) -> None:
        """Flush from the receiving side: never blocks, never raises (see "The
        flush rule"). A socket error marks the stream broken, so the next
        operation reports it."""
        if self._flushing:
            return  # the sending task is flushing and will carry our bytes
        if self._eof_sent:
            # Nothing may follow our close_notify (OpenSSL should not have
            # written anything, but the TCP write side may be shut already).
            self._outgoing.read()
            return
        outgoing = self._outgoing
        try:
            while self._tail is not None or outgoing.pending:
                data = self._tail if self._tail is not None else memoryview(outgoing.read())
                rest = self._write_nowait(data)
                self._tail = rest if rest else None
                if rest:
                    return
        except trio.ClosedResourceError:
            pass
        except OSError as exc:
            self._os_error(exc, "sending")

    async def _flush(self) -> bool:
        """Write ``_tail`` and ``_outgoing`` to the socket, waiting as needed.
        Only the sending side calls this (see "The flush rule"). Returns
        whether it yielded."""
        waited = False
        outgoing = self._outgoing
        self._flushing = True
        try:
            while self._tail is not None or outgoing.pending:
                data = self._tail if self._tail is not None else memoryview(outgoing.read())
                # Kept in _tail until the kernel took all of it, in case the
                # wait below is cancelled.
                self._tail = data
                while True:
                    try:
                        data = self._write_nowait(data)
                    except OSError as exc:
                        raise self._os_error(exc, "sending") from exc
                    self._tail = data if data else None
                    if not data:
                        break
                    await wait_writable(self._fd())
                    waited = True
        finally:
            self._flushing = False
        return waited

    async def _feed(self) -> None:
        """Move ciphertext from the socket into ``_incoming``, waiting for at
        least some (or EOF). Used by the handshake; yields."""
        while True:
            fd = self._fd()
            try:
                n = os.readv(fd, [self._cipher_buf])
            except BlockingIOError:
                await wait_readable(fd)
                continue
            except OSError as exc:
                raise self._os_error(exc, "receiving") from exc
            if n:
                self._incoming.write(self._cipher_buf[:n])
            else:
                self._tcp_eof = True
                self._incoming.write_eof()
            return

    # ------------------------------------------------------------------
    # Handshake.

    async def do_handshake(self) -> None:
        """Run the TLS handshake, if not done yet; idempotent. Raises
        :class:`trio.BrokenResourceError` (cause: the ``ssl`` error) if it
        fails. No timeout inside: wrap it in ``trio.fail_after``."""
        await checkpoint_if_cancelled()
        if self._handshake_done:
            await cancel_shielded_checkpoint()
            return
        async with self._handshake_lock:
            self._check_open()
            if self._handshake_done:
                return
            obj = self._obj
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    await self._flush()
                    await self._feed()
                except ssl.SSLError as exc:
                    if isinstance(exc, ssl.SSLEOFError):
                        message = "the peer closed the connection during the TLS handshake"
                    else:
                        message = f"TLS handshake failed: {_describe(exc)}"
                    error = self._fail(message, exc)
                    self._flush_nowait()  # the alert tells the peer why
                    raise error from exc
            # Our last flight (and a server's session tickets).
            await self._flush()
            self.shift = tlskeys.record_shift(self._obj)
            self._handshake_done = True

    # ------------------------------------------------------------------
    # Receiving.

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Return up to ``max_bytes`` of plaintext (at most
        :data:`DEFAULT_RECEIVE_SIZE`), b"" once the peer sent close_notify.

        Raises :class:`trio.BrokenResourceError` on truncation (TCP EOF
        without close_notify) or a TLS/socket error."""
        if max_bytes is None:
            limit = DEFAULT_RECEIVE_SIZE
        else:
            limit = operator.index(max_bytes)  # TypeError for 1.5, as trio's streams
            if limit < 1:
                raise ValueError("max_bytes must be >= 1")
            limit = min(limit, DEFAULT_RECEIVE_SIZE)
        with self._receiving:
            await checkpoint_if_cancelled()
            plain = self._plain_buf
            n, waited = await self._receive_into(plain, limit)
            # Copy out of the shared scratch buffer before yielding.
            data = bytes(plain[:n])
            if not waited:
                await cancel_shielded_checkpoint()
            return data

    async def receive_into(self, buffer: memoryview | bytearray) -> int:
        """Like :meth:`receive_some`, but decrypt straight into ``buffer``
        (no copy, no allocation) and return how many bytes were written;
        0 once the peer sent close_notify. The relay uses this."""
        with memoryview(buffer) as view:
            if view.ndim != 1 or view.itemsize != 1:
                view = view.cast("B")
            if not len(view):
                raise ValueError("buffer must not be empty")
            with self._receiving:
                await checkpoint_if_cancelled()
                n, waited = await self._receive_into(view, len(view))
                if not waited:
                    await cancel_shielded_checkpoint()
                return n

    async def _receive_into(self, view: memoryview, limit: int) -> tuple[int, bool]:
        """The receive path shared by both public methods: fill ``view`` with
        up to ``limit`` bytes. Returns (count, whether it yielded); the
        caller adds the final checkpoint if it did not."""
        waited = await self._handshake_first()
        if self._stash:
            n = min(limit, len(self._stash))
            view[:n] = self._stash[:n]
            del self._stash[:n]
            return n, waited
        if self._closed:
            raise trio.ClosedResourceError("this TLS stream was closed")
        if self._peer_closed:
            # Reads stay at EOF even if a later send failed: the peer's
            # close_notify came first.
            return 0, waited
        self._check_open()
        cipher = self._cipher_buf
        total = 0
        more_in_kernel = False
        while True:
            total += self._decrypt(view[total:], limit - total)
            if total == limit or self._peer_closed or self._broken is not None:
                break
            if total and not more_in_kernel:
                break
            # Nothing (more) decrypted: read the socket.
            if self._tcp_eof:
                raise self._fail(_TRUNCATED, None)
            fd = self._fd()
            try:
                n = os.readv(fd, [cipher])
            except BlockingIOError:
                if total:
                    break
                if self._tail is not None:
                    self._flush_nowait()
                await wait_readable(fd)
                waited = True
                continue
            except OSError as exc:
                error = self._os_error(exc, "receiving")
                if total:  # deliver what we have; the next call raises
                    break
                raise error from exc
            if n:
                self._incoming.write(cipher[:n])
                more_in_kernel = n == len(cipher)
            else:
                self._tcp_eof = True
                self._incoming.write_eof()
                more_in_kernel = False
        if self._outgoing.pending or self._tail is not None:
            # Reading produced TLS output (a KeyUpdate answer, say).
            self._flush_nowait()
        return total, waited

    # ------------------------------------------------------------------
    # Sending.

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Encrypt and send all of ``data``; returns once the ciphertext is
        in the kernel's send buffer."""
        with self._sending:
            await checkpoint_if_cancelled()
            self._check_open()
            if self._eof_sent:
                raise trio.ClosedResourceError("can't send data after sending EOF")
            waited = await self._handshake_first()
            write = self._obj.write
            with memoryview(data) as view:
                if view.ndim != 1 or view.itemsize != 1:
                    view = view.cast("B")
                for start in range(0, len(view), SEND_CHUNK):
                    self._check_open()
                    chunk = view[start:start + SEND_CHUNK]
                    try:
                        if self.records >= self.rekey_at:
                            tlskeys.rekey(self, self._obj, "TLS stream")
                        write(chunk)
                        self.records += tlskeys.records(len(chunk), self.shift)
                    except ssl.SSLError as exc:
                        raise self._ssl_error(exc) from exc
                    except tlskeys.KeysWornOut as exc:
                        raise self._fail(str(exc), None) from None
                    if await self._flush():
                        waited = True
            if not waited:
                await cancel_shielded_checkpoint()

    async def _handshake_first(self) -> bool:
        """Complete the handshake if it has not been; whether that waited."""
        if self._handshake_done:
            return False
        await self.do_handshake()
        return True

    async def wait_send_all_might_not_block(self) -> None:
        with self._sending:
            await checkpoint_if_cancelled()
            self._check_open()
            await wait_writable(self._fd())

    async def send_eof(self) -> None:
        """Send close_notify, then shut down the TCP write side; receiving
        still works until the peer's own close_notify. Idempotent."""
        with self._sending:
            await checkpoint_if_cancelled()
            self._check_open()
            waited = await self._handshake_first()
            if not self._eof_sent:
                self._stash_pending_plaintext()
                try:
                    self._obj.unwrap()
                except ssl.SSLWantReadError:
                    pass  # ours is written; theirs has not arrived: expected
                except ssl.SSLError as exc:
                    raise self._ssl_error(exc) from exc
                # From here on nothing else may be written (see _flush_nowait).
                self._eof_sent = True
                try:
                    if await self._flush():
                        waited = True
                    self._sock.shutdown(socket.SHUT_WR)
                except (trio.BrokenResourceError, OSError) as exc:
                    if not self._peer_closed:
                        if isinstance(exc, OSError):
                            raise self._os_error(exc, "shutting down the write side") from exc
                        raise
                    # The peer had already ended its side with close_notify and
                    # has since dropped the connection (allowed; TLS 1.2 peers
                    # do just that): both directions are over, so failing to
                    # deliver our close_notify is not an error.
            if not waited:
                await cancel_shielded_checkpoint()

    def _stash_pending_plaintext(self) -> None:
        """Decrypt every complete record waiting in ``_incoming`` into
        ``_stash`` (see "Half-close" above for why)."""
        plain = self._plain_buf
        while not self._peer_closed and self._broken is None:
            n = self._decrypt(plain, len(plain))
            self._stash += plain[:n]
            if n < len(plain):
                return

    # ------------------------------------------------------------------
    # Closing.

    def reset_on_close(self) -> None:
        """Make ``aclose`` an abort: no close_notify, and a TCP RST instead
        of a FIN, so the peer learns that the stream was cut, not ended (a
        relay whose other side failed does this)."""
        self._abort = True
        linger_reset(self._sock)

    async def aclose(self) -> None:
        """Send close_notify if it fits in the kernel buffer now (without
        waiting for the peer's), then close the socket; after
        :meth:`reset_on_close`, reset it instead. Idempotent; the socket is
        closed even if this is cancelled."""
        if self._closed:
            await checkpoint()
            return
        self._closed = True
        try:
            if self._handshake_done and not self._eof_sent and self._broken is None \
                    and not self._flushing and not self._abort:
                try:
                    self._obj.unwrap()
                except ssl.SSLError:
                    # WantRead (expected), or application data waiting after
                    # our close_notify was written: either way it is queued.
                    pass
                self._eof_sent = True
                with contextlib.suppress(OSError, trio.ClosedResourceError):
                    for data in (self._tail, memoryview(self._outgoing.read())):
                        if data is not None and self._write_nowait(data):
                            break  # the kernel is full: give up, do not wait
        finally:
            self._sock.close()
        await checkpoint()


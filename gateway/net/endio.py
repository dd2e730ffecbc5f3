"""Reading and writing one end for the relay engine: plaintext in from a
socket or through its TLS object (the TLS pump), plaintext or records out
with what the kernel does not take kept as the end's tail, a tail drained
on EPOLLOUT, and an end's EOF (close_notify and FIN). The rules are the
engine's (see :mod:`gateway.net.engine`, "TLS rules"); the two-socket relay
(:mod:`gateway.net.pairs`) and the multiplexed connections
(:mod:`gateway.net.muxlink`) share them. A mixin of
:class:`~gateway.net.engine.RelayEngine`, whose scratch buffers and
``again`` list it uses."""

from __future__ import annotations

import socket
import ssl

from gateway.net.ends import _TRUNCATED, End, Failure, _receive_failed, _ssl_text

__all__ = ["EndIO"]

_NOTHING = memoryview(b"")  # what write_some returns when the kernel took everything


class EndIO:
    """The engine's reads and writes of single ends (see the module doc)."""

    def read_into(self, src: End, view: memoryview) -> int:
        """:meth:`_read`, after the plaintext ``src`` holds in ``carry``
        (stashed before its close_notify went out): for an owner that needs
        the bytes in its own buffer (gateway/net/muxlink.py)."""
        carry = src.carry
        if carry:
            n = min(len(carry), len(view))
            view[:n] = carry[:n]
            del carry[:n]
            if not carry:
                src.carry = None
            return n
        return self._read(src, view)

    def _read(self, src: End, view: memoryview) -> int:
        """Read plaintext from ``src`` into ``view``: the count, 0 for EOF,
        -1 if it would block. Raises :class:`Failure`."""
        if src.obj is None:
            try:
                return src.sock.recv_into(view)
            except BlockingIOError:
                return -1
            except OSError as exc:
                src.failed = True
                src.os_error = exc.errno
                raise Failure(f"{src.name}: receive failed: {exc.strerror or exc}") from None
        return self.read_tls(src, view)

    def read_tls(self, src: End, view: memoryview) -> int:
        """:meth:`_read` for a TLS end. An error that came with data is
        reported by the next call, once that data is passed on."""
        if src.error_pending is not None:
            src.failed = True
            raise Failure(src.error_pending)
        if src.peer_closed:
            return 0
        ssl_obj, incoming = src.ssl, src.incoming
        limit = len(view)
        total = 0
        cipher = self._cipher
        read = ssl_obj.read
        while True:
            try:
                # SSL_read costs a raised exception when it can only say
                # "want read": skip it when no complete record can be waiting.
                while total < limit and (incoming.pending or incoming.eof or ssl_obj.pending()):
                    n = read(limit - total, view[total:] if total else view)
                    if not n:
                        src.peer_closed = True
                        break
                    total += n
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                src.peer_closed = True
            except ssl.SSLError as exc:
                message = _TRUNCATED if isinstance(exc, ssl.SSLEOFError) else f"TLS error: {_ssl_text(exc)}"
                self._flush_protocol_output(src)  # the alert tells the peer why
                _receive_failed(src, f"{src.name}: receive failed: {message}", total)
                break
            if total == limit or src.peer_closed:
                break
            if total and not src.kernel_full:
                break
            if src.tcp_eof:
                # write_eof was fed and OpenSSL still wants data: unreachable
                # in practice (it raises SSLEOFError), kept as a guard.
                src.failed = True
                raise Failure(f"{src.name}: receive failed: {_TRUNCATED}")
            try:
                n = src.sock.recv_into(cipher)
            except BlockingIOError:
                src.kernel_full = False
                break
            except OSError as exc:
                src.os_error = exc.errno
                _receive_failed(src, f"{src.name}: receive failed: {exc.strerror or exc}", total)
                break
            if n:
                incoming.write(cipher[:n])
                src.kernel_full = n == len(cipher)
            else:
                src.tcp_eof = True
                incoming.write_eof()
                src.kernel_full = False
        if src.outgoing.pending:
            self._flush_protocol_output(src)
        if total:
            return total
        return 0 if src.peer_closed else -1

    def _flush_protocol_output(self, end: End) -> None:
        """Queue what OpenSSL wrote while reading (a KeyUpdate answer, an
        alert) for ``end``'s socket, after anything already queued."""
        data = end.outgoing.read()
        if not data or end.eof_sent:
            return  # nothing may follow our close_notify
        self.write(end, memoryview(data), copy=False)

    def write(self, dst: End, data: memoryview | bytes, *, copy: bool) -> None:
        """Write ``data`` to ``dst`` after its tail; keep what the kernel
        does not take (a copy, when ``data`` is a scratch buffer)."""
        if dst.tail is not None:
            dst.more.append(bytes(data))
            dst.more_bytes += len(data)
            return
        try:
            rest = self.write_some(dst, data)
        except OSError as exc:
            dst.failed = True
            dst.os_error = exc.errno
            raise Failure(f"{dst.name}: send failed: {exc.strerror or exc}") from None
        if rest:
            dst.tail = memoryview(bytes(rest) if copy else rest)

    @staticmethod
    def write_some(end: End, data: memoryview | bytes) -> memoryview | bytes:
        """Send as much of ``data`` as the kernel takes; the rest (empty if
        it took everything, as it nearly always does: one call then)."""
        send = end.sock.send
        try:
            n = send(data)
            while n < len(data):
                data = data[n:]
                n = send(data)
        except BlockingIOError:
            return data
        return _NOTHING

    def drain(self, end: End) -> int:
        """Write ``end``'s tail, then what is queued behind it, as far as the
        kernel takes it; return how many bytes went. Raises ``OSError``."""
        written = 0
        while end.tail is not None:
            before = len(end.tail)
            rest = self.write_some(end, end.tail)
            written += before - len(rest)
            if rest:
                end.tail = rest
                return written
            if end.more:
                end.tail = memoryview(b"".join(end.more))
                end.more, end.more_bytes = [], 0
            else:
                end.tail = None
        return written

    @staticmethod
    def backlog(end: End) -> int:
        """Bytes waiting for ``end``'s socket."""
        return 0 if end.tail is None else len(end.tail) + end.more_bytes

    def send_eof(self, end: End) -> None:
        """The direction into ``end`` is over: close_notify (TLS) and FIN,
        after anything still queued for it."""
        if end.eof_sent:
            return
        if end.obj is not None and not end.failed:
            self._stash(end)
            try:
                end.obj.unwrap()
            except ssl.SSLWantReadError:
                pass  # ours is written; theirs has not come: expected
            except ssl.SSLError as exc:
                if not end.peer_closed:
                    end.failed = True
                    raise Failure(f"{end.name}: send_eof failed: TLS error: {_ssl_text(exc)}") from None
            data = end.outgoing.read()
            if data:
                try:
                    rest = self.write_some(end, memoryview(data))
                except OSError as exc:
                    rest = None
                    if not end.peer_closed:
                        end.failed = True
                        raise Failure(f"{end.name}: send_eof failed: {exc.strerror or exc}") from None
                if rest:
                    end.tail = rest  # flushed on EPOLLOUT, then shut down
                    end.eof_wanted = True
                    return
        end.eof_sent = True
        try:
            end.sock.shutdown(socket.SHUT_WR)
        except OSError as exc:
            # Not an error only after a TLS peer's close_notify: it may drop
            # the connection then. Otherwise (ENOTCONN included) the peer
            # reset the connection, perhaps after its own EOF, and what we
            # sent may not have been read: an abort, not an end.
            if not end.peer_closed:
                end.failed = True
                raise Failure(f"{end.name}: send_eof failed: {exc.strerror or exc}") from None

    def _stash(self, end: End) -> None:
        """Decrypt every complete record waiting in ``end``'s incoming BIO
        into ``end.carry`` (``unwrap`` would fail on them)."""
        obj, incoming = end.obj, end.incoming
        plain = self._plain
        try:
            while not end.peer_closed and (incoming.pending or obj.pending()):
                n = obj.read(len(plain), plain)
                if not n:
                    end.peer_closed = True
                    break
                if end.carry is None:
                    end.carry = bytearray()
                end.carry += plain[:n]
        except ssl.SSLWantReadError:
            pass
        except ssl.SSLZeroReturnError:
            end.peer_closed = True
        except ssl.SSLError as exc:
            end.error_pending = f"{end.name}: receive failed: TLS error: {_ssl_text(exc)}"
        if end.carry:
            # That plaintext goes to the other side as soon as it can take it.
            self.again.append(end)

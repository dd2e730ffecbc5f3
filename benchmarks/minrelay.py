"""The least Python a TLS relay hop can be, for ``python -m benchmarks.floor``.

Not Wicket and not for use: one connection at a time, a blocking handshake,
then an epoll loop over ``ssl.SSLObject`` + ``MemoryBIO`` with no framing,
no flow control, no bookkeeping and no error handling beyond ending the
connection. ``entry`` takes plain TCP and speaks TLS 1.3 (client
certificate) to ``exit``, which speaks plain TCP to the upstream: the shape
of a stunnel pair and of Wicket's gateway + cluster. What it costs per round
trip is the floor for any relay written in CPython on this machine.

    python -m benchmarks.minrelay entry|exit LISTEN_PORT TARGET_PORT CA CERT KEY
"""

from __future__ import annotations

import select
import socket
import ssl
import sys


def _context(mode: str, ca: str, cert: str, key: str) -> ssl.SSLContext:
    if mode == "entry":
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False  # the benchmark's throwaway certificates name no host
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(ca)
    ctx.load_cert_chain(cert, key)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def _send_all(sock: socket.socket, data) -> None:
    """``sendall`` for a non-blocking socket: wait while the kernel is full."""
    view = memoryview(data)
    while view:
        try:
            view = view[sock.send(view):]
        except BlockingIOError:
            select.select([], [sock], [])


def _decrypted(plain: socket.socket, obj: ssl.SSLObject, inc: ssl.MemoryBIO, buf: memoryview) -> None:
    """Pass on every record waiting in ``inc``. SSL_read says "want read"
    with a raised exception, which costs more than the check that avoids it
    (a relay that paid it on every read measured 0.1x of stunnel slower)."""
    try:
        while inc.pending and (k := obj.read(len(buf), buf)):
            _send_all(plain, buf[:k])
    except ssl.SSLWantReadError:
        pass  # the rest of a record is still on its way


def _relay(plain: socket.socket, tls: socket.socket, obj: ssl.SSLObject, inc: ssl.MemoryBIO,
           out: ssl.MemoryBIO) -> None:
    plain.setblocking(False)
    tls.setblocking(False)
    ep = select.epoll()
    ep.register(plain.fileno(), select.EPOLLIN)
    ep.register(tls.fileno(), select.EPOLLIN)
    buf = memoryview(bytearray(256 * 1024))
    plain_fd = plain.fileno()
    try:
        _decrypted(plain, obj, inc, buf)  # the handshake's last read may have brought some
        while True:
            for fd, _ in ep.poll():
                if fd == plain_fd:
                    n = plain.recv_into(buf)
                    if not n:
                        return
                    obj.write(buf[:n])
                    _send_all(tls, out.read())
                else:
                    n = tls.recv_into(buf)
                    if not n:
                        return
                    inc.write(buf[:n])
                    _decrypted(plain, obj, inc, buf)
                    if out.pending:
                        _send_all(tls, out.read())
    except (OSError, ssl.SSLError):
        return
    finally:
        ep.close()


def main(argv: list[str]) -> None:
    mode, listen_port, target_port, ca, cert, key = argv
    ctx = _context(mode, ca, cert, key)
    listener = socket.create_server(("127.0.0.1", int(listen_port)))
    print("ready", flush=True)
    while True:
        a, _ = listener.accept()
        b = socket.create_connection(("127.0.0.1", int(target_port)))
        for s in (a, b):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        plain, tls = (a, b) if mode == "entry" else (b, a)
        inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(inc, out, server_side=mode == "exit")
        try:
            while True:
                try:
                    obj.do_handshake()
                    break
                except ssl.SSLWantReadError:
                    if out.pending:
                        tls.sendall(out.read())
                    data = tls.recv(65536)
                    if not data:
                        raise OSError("closed during the handshake")
                    inc.write(data)
            if out.pending:
                tls.sendall(out.read())
            _relay(plain, tls, obj, inc, out)
        except (OSError, ssl.SSLError):
            pass
        finally:
            a.close()
            b.close()


if __name__ == "__main__":
    main(sys.argv[1:])

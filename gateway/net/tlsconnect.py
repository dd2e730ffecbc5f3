"""TLS connections made and accepted: TCP plus the handshake of a
:class:`~gateway.net.tls.TLSStream`, with nothing left open when either
fails. No timeout inside: callers own their deadlines."""

from __future__ import annotations

import ssl

import trio

from gateway.net.tls import TLSStream

__all__ = ["accept_tls", "open_tls_connection"]


async def open_tls_connection(
    host: str | bytes,
    port: int,
    context: ssl.SSLContext,
    *,
    server_hostname: str | None,
    session: ssl.SSLSession | None = None,
) -> TLSStream:
    """Connect over TCP and complete a client-side TLS handshake.

    Raises :class:`OSError` if the TCP connection fails and
    :class:`trio.BrokenResourceError` (cause: the ``ssl`` error) if the
    handshake does. Nothing is left open on failure. No timeout inside."""
    tcp = await trio.open_tcp_stream(host, port)
    try:
        stream = TLSStream(
            tcp, context, server_side=False, server_hostname=server_hostname, session=session
        )
        await stream.do_handshake()
    except BaseException:
        tcp.socket.close()
        raise
    return stream


async def accept_tls(sock_stream: trio.SocketStream, context: ssl.SSLContext) -> TLSStream:
    """Complete a server-side TLS handshake on an accepted connection.

    On failure (including cancellation) the socket is closed and the error
    raised, as for :func:`open_tls_connection`."""
    try:
        stream = TLSStream(sock_stream, context, server_side=True)
        await stream.do_handshake()
    except BaseException:
        sock_stream.socket.close()
        raise
    return stream

"""Network addresses as people write them and as sockets give them.

Both halves need these (a resource's upstream, the cluster's address, log
lines naming a peer), so they live below both.
"""

from __future__ import annotations


def parse_hostport(text: str, *, default_host: str | None = None) -> tuple[str, int]:
    """``host:port`` or ``[v6]:port`` (or ``:port`` with a default host)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host:
        if default_host is None:
            raise ValueError(f"{text!r} has no host")
        host = default_host
    p = int(port)
    if not 0 <= p <= 65535:
        raise ValueError(f"port {p} is out of range")
    return host, p


def format_addr(addr) -> str:
    """A socket address (``getpeername()``, ``accept()``) as ``host:port``,
    IPv6 hosts in brackets; a unix socket's as ``unix:PATH`` (a client's
    is usually unnamed: ``unix:local``)."""
    if isinstance(addr, (str, bytes)):
        path = addr.decode("utf-8", "replace") if isinstance(addr, bytes) else addr
        return f"unix:{path or 'local'}"
    host, port = addr[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

"""Networking shared by the gateway and the cluster: the TLS stream of the
gateway <-> cluster wire, the relay that carries a session's bytes, and the
small HTTP/1.1 layer of the cluster's API (``gateway.net.http``).
"""

from gateway.net.relay import RelayCounters, RelayStats, relay
from gateway.net.tls import TLSStream
from gateway.net.tlsconnect import accept_tls, open_tls_connection

__all__ = [
    "RelayCounters",
    "RelayStats",
    "TLSStream",
    "accept_tls",
    "open_tls_connection",
    "relay",
]

"""TLS contexts for the gateway <-> cluster wire (TLS 1.3 only, mutual).

The cluster's one listener requests (but does not require) a client
certificate during the handshake, because the login and health routes are
reached before a gateway has one. Every other route refuses a connection
without a verified session certificate, with a typed error.

Expiry is checked by us, not by OpenSSL: with ``X509_V_FLAG_NO_CHECK_TIME``
the handshake of an expired session certificate still completes (the chain
and signature are fully verified), so the cluster can answer with a typed
``cert_expired`` error the gateway turns into "run wicket login" instead of a
bare handshake alert. The time check itself is :func:`pki.check_validity`,
applied to every request and dial.
"""

from __future__ import annotations

import ssl
from pathlib import Path

#: ALPN protocol ids on the cluster's listener that belong to no kind. Each
#: kind's own data route has one more (its registry entry, gateway/kinds.py).
ALPN_HTTP = "http/1.1"
#: Many sessions over one connection (protocols/mux.py).
ALPN_MUX = "wicket-mux"

# OpenSSL's X509_V_FLAG_NO_CHECK_TIME (x509_vfy.h); not exported by Python's ssl.
_X509_V_FLAG_NO_CHECK_TIME = 0x200000


def _base(purpose: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(
        ssl.PROTOCOL_TLS_SERVER if purpose == ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT
    )
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= ssl.OP_NO_COMPRESSION
    return ctx


def cluster_server_context(cert_chain: Path, key: Path, user_ca: Path, alpn: tuple[str, ...]) -> ssl.SSLContext:
    ctx = _base(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert_chain, key)
    ctx.load_verify_locations(cafile=str(user_ca))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    ctx.verify_flags |= _X509_V_FLAG_NO_CHECK_TIME
    ctx.set_alpn_protocols(list(alpn))
    # A session ticket lets a gateway resume (one round trip and the
    # certificate checks less per connection). One is enough: the gateway
    # keeps the first it gets and resumes every later connection with it
    # (gateway/local/dialer.py). Each ticket costs the cluster ~60 us after
    # a resumption and ~300 us after a full handshake here (OpenSSL 3.0
    # encodes the session, client certificate included, into it).
    ctx.num_tickets = 1
    return ctx


def gateway_client_context(
    cluster_ca_pem: bytes,
    *,
    cert: Path | None = None,
    key: Path | None = None,
    alpn: tuple[str, ...],
) -> ssl.SSLContext:
    """Verify the cluster against its pinned host CA, present our session cert."""
    ctx = _base(ssl.Purpose.SERVER_AUTH)
    ctx.load_verify_locations(cadata=cluster_ca_pem.decode("ascii"))
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(list(alpn))
    return ctx


def bootstrap_context() -> ssl.SSLContext:
    """For the one request that fetches the cluster's CA before any trust
    exists. What it fetches is accepted only if it matches the pin (or the
    user said --insecure, loudly); nothing secret is sent on it."""
    ctx = _base(ssl.Purpose.SERVER_AUTH)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([ALPN_HTTP])
    return ctx

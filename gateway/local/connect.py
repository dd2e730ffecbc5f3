"""Connections from the gateway to the cluster, and what their failures mean.

Every other piece of the gateway (the API calls, the dialers) opens its
connections here, so a failure is worded once, for the person who must act
on it, and classified once: :class:`ClusterError`'s ``passing`` says whether
trying again within seconds is worth it (a cluster restarting, a network
switching), which is what the wait room (waitroom.py) waits out.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import ssl

import trio

from gateway.net.tcp import keep_alive
from gateway.net.tls import TLSStream
from gateway.net.tlsconnect import open_tls_connection

CONNECT_TIMEOUT = 15.0
#: What a connect meets then: an answer at once, not a silence (that one
#: already waited CONNECT_TIMEOUT).
_NOT_NOW = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ENETUNREACH,
            errno.EHOSTUNREACH, errno.ENETDOWN}

log = logging.getLogger("wicket.client")


class ClusterError(Exception):
    """Something the person must act on; ``code`` is the typed error.
    ``passing``: the cluster could not be reached right now, in a way that
    may pass within seconds (refused, reset, no route), so trying again is
    worth it."""

    def __init__(self, code: str, message: str, *, passing: bool = False) -> None:
        super().__init__(message)
        self.code, self.message, self.passing = code, message, passing


async def connect_cluster(host: str, port: int, ctx: ssl.SSLContext, server_hostname: str | None,
                   session: ssl.SSLSession | None = None) -> TLSStream:
    """A TLS connection to the cluster, or a :class:`ClusterError` saying
    what went wrong and whether it may pass within seconds."""
    try:
        with trio.fail_after(CONNECT_TIMEOUT):
            stream = await open_tls_connection(host, port, ctx, server_hostname=server_hostname,
                                               session=session)
        keep_alive(stream.transport_stream.socket)  # a cluster that vanished is noticed (gateway/net/tcp.py)
        return stream
    except trio.TooSlowError:
        raise ClusterError("unreachable", f"no answer from the cluster at {host}:{port} "
                           f"within {CONNECT_TIMEOUT:.0f}s; check the address and the network") from None
    except OSError as exc:
        errors = _os_errors(exc)
        reason = "; ".join(sorted({_reason(e) for e in errors}))
        raise ClusterError("unreachable", f"cannot reach the cluster at {host}:{port}: "
                           f"{reason}; is `wicket-cluster start` running there?",
                           passing=all(_passing(e) for e in errors)) from None
    except trio.BrokenResourceError as exc:
        cause = exc.__cause__
        if isinstance(cause, ssl.SSLCertVerificationError):
            raise ClusterError(
                "cert_invalid",
                f"the cluster at {host}:{port} presented a certificate we do not trust "
                f"({cause.verify_message}); if the cluster was re-created, log in again with its new pin",
            ) from None
        # Cut off during the handshake (EOF, reset): a cluster stopping
        # drops what it had not accepted yet, and that passes too. A TLS
        # alert (a certificate refused, no shared protocol) does not.
        cut = isinstance(cause, ssl.SSLEOFError) or (isinstance(cause, OSError)
                                                      and not isinstance(cause, ssl.SSLError) and _passing(cause))
        raise ClusterError("tls_failed", f"TLS with the cluster at {host}:{port} failed: "
                           f"{cause or exc}", passing=cut) from None


def _reason(exc: OSError) -> str:
    """What went wrong, in the system's words (trio puts the address in
    front of them; a resolver error's errno is its own, negative)."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        return exc.strerror or str(exc)
    return os.strerror(exc.errno)


def _passing(exc: OSError) -> bool:
    """Whether an error connecting may pass within seconds (see ``_NOT_NOW``;
    a resolver that cannot answer right now too)."""
    if isinstance(exc, socket.gaierror):
        return exc.errno == socket.EAI_AGAIN
    return exc.errno in _NOT_NOW


def _os_errors(exc: OSError) -> list[OSError]:
    """What each connect attempt met: trio raises one OSError without an
    errno for all of them (an address may resolve to several), its cause a
    group of the attempts' own."""
    group = exc.__cause__
    if exc.errno is None and isinstance(group, ExceptionGroup):
        inner = [e for e in group.exceptions if isinstance(e, OSError)]
        if inner:
            return inner
    return [exc]


class Outage:
    """What a gateway's background connects (the warm pool, the multiplexed
    connection) saw of the cluster, logged at its turns only: one line when
    connecting starts failing, one when it works again, none per attempt
    between (a sidecar's log says when the cluster went away, and for how
    long, before any client came)."""

    def __init__(self) -> None:
        self.since: float | None = None

    def failed(self, exc: BaseException) -> None:
        if self.since is None:
            self.since = trio.current_time()
            log.warning("cluster_unreachable error=%r action=%r",
                        getattr(exc, "message", None) or "the cluster did not answer in time",
                        "retrying every few seconds; meanwhile new clients wait up to --wait-for-cluster")

    def ended(self) -> None:
        if self.since is not None:
            log.info("cluster_reachable_again after=%.1fs", trio.current_time() - self.since)
            self.since = None

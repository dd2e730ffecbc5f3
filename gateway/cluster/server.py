"""The cluster's one TLS 1.3 listener: handshake, then ALPN picks the route.

Each connection lives in its own task under the handler nursery; a graceful
stop (SIGTERM/SIGINT) closes the listener, gives live connections a short
grace period, then cancels them, so audit ``session.end`` records still get
written.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import ssl
from typing import TYPE_CHECKING

import trio

from gateway import kinds
from gateway.addresses import format_addr
from gateway.cluster.admission import Slot
from gateway.cluster.api import API
from gateway.cluster.core import Cluster
from gateway.cluster.dial import handle_route
from gateway.cluster.enginedial import abandon_engine_connects
from gateway.cluster.muxroute import handle_mux
from gateway.identity import tlsconf
from gateway.net.descriptors import serve_listeners
from gateway.net.http import serve_http
from gateway.net.relay import reset_on_close
from gateway.net.tcp import keep_alive
from gateway.net.tlsconnect import accept_tls

if TYPE_CHECKING:
    from gateway.cluster.worker import Handoff

log = logging.getLogger("wicket.cluster")

HANDSHAKE_TIMEOUT = 10.0
GRACE_PERIOD = 2.0


async def handle_connection(cluster: Cluster, tcp: trio.SocketStream) -> None:
    """One connection. Whatever goes wrong stays with it: a bug or a hostile
    peer ends this connection (logged), never the cluster."""
    cluster.connection_opened()
    try:
        async with cluster.connection_slots:
            await _handle_connection(cluster, tcp)
    except Exception:
        log.exception("connection_failed action=%s", "report this as a bug with the traceback")
        reset_on_close(tcp)  # cut short, not ended
        await tcp.aclose()
    finally:
        cluster.connection_closed()


async def _handle_connection(cluster: Cluster, tcp: trio.SocketStream) -> None:
    try:
        client_addr = format_addr(tcp.socket.getpeername())
    except OSError:  # reset before we looked
        await tcp.aclose()
        return
    slot = cluster.unauthenticated.take(client_addr.rsplit(":", 1)[0])
    if slot is None:  # its address holds too many already (gateway/cluster/admission.py)
        reset_on_close(tcp)
        await tcp.aclose()
        return
    try:
        await _serve_connection(cluster, tcp, client_addr, slot)
    finally:
        slot.release()


async def _serve_connection(cluster: Cluster, tcp: trio.SocketStream, client_addr: str, slot: Slot) -> None:
    keep_alive(tcp.socket)  # a gateway that vanished ends its sessions (gateway/net/tcp.py)
    try:
        with trio.fail_after(HANDSHAKE_TIMEOUT):
            stream = await accept_tls(tcp, cluster.server_context)
    except trio.TooSlowError:
        log.info("handshake_timeout client=%s", client_addr)
        await tcp.aclose()
        return
    except (trio.BrokenResourceError, OSError) as exc:
        # Wrong CA, TLS 1.2, no shared ALPN...: the peer sees a TLS alert.
        cause = exc.__cause__ or exc
        log.info("handshake_failed client=%s error=%s", client_addr, cause)
        if isinstance(cause, ssl.SSLCertVerificationError):
            # A certificate the user CA did not sign: someone trying keys.
            cluster.note_unknown_ca(client_addr.rsplit(":", 1)[0], cause.verify_message or str(cause))
        await tcp.aclose()
        return
    if stream.getpeercert(binary_form=True):
        slot.release()  # a certificate of the user CA: no longer counted
    async with stream:
        alpn = stream.selected_alpn_protocol()
        kind = kinds.by_alpn(alpn)
        try:
            if kind is not None:
                await handle_route(cluster, stream, kind.route(), client_addr=client_addr)
            elif alpn == tlsconf.ALPN_MUX:
                await handle_mux(cluster, stream, client_addr=client_addr)
            elif alpn == tlsconf.ALPN_HTTP:
                api = API(cluster, peer_cert=stream.getpeercert(binary_form=True), client_addr=client_addr)
                await serve_http(stream, api)
            else:
                log.info("no_route client=%s alpn=%s", client_addr, alpn)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass


async def serve(
    cluster: Cluster,
    *,
    task_status=trio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
    handoff: "Handoff | None" = None,
) -> None:
    """Serve until SIGTERM/SIGINT. ``handoff``: this is one of several
    worker processes (gateway/cluster/workers.py), whose connections come
    from the supervisor, which listens, prunes the store and renews the
    host certificate; the worker stops when the supervisor goes, too."""
    for kind in kinds.KINDS.values():
        kind.route()  # imported now, not on a client's first dial
    handler = functools.partial(handle_connection, cluster)
    if handoff is None:
        host, port = cluster.config.listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        bound = listeners[0].socket.getsockname()
        accept = functools.partial(serve_listeners, handler, listeners, name="cluster")
    else:
        bound = handoff.address
        accept = functools.partial(handoff.serve, handler)
    async with trio.open_nursery() as outer:
        await outer.start(cluster.watch_locks)
        await outer.start(cluster.run_audit_flusher)
        if cluster.worker is None:
            await outer.start(cluster.run_retention)
        async with trio.open_nursery() as handlers:

            accept_scope = trio.CancelScope()

            async def accept_all() -> None:
                # Out of descriptors, it pauses quietly (gateway/net/descriptors.py).
                with accept_scope:
                    await accept(handler_nursery=handlers)

            handlers.start_soon(accept_all)
            limits = cluster.limits
            worker = "" if cluster.worker is None else f" worker={cluster.worker.index} pid={os.getpid()}"
            log.info("cluster_listening cluster=%s address=%s pin=%s open_files=%d reserve_fds=%d "
                     "streams_per_user=%d streams_per_connection=%d%s", cluster.config.name, format_addr(bound),
                     cluster.host_ca.pin, cluster.open_files, limits.reserve_fds, limits.streams_per_user,
                     limits.streams_per_connection, worker)
            task_status.started(bound)
            why = await wait_for_stop(handle_signals, handoff.closed if handoff is not None else None)
            log.info("cluster_stopping %s live_sessions=%d%s", why, len(cluster.sessions), worker)
            accept_scope.cancel()
            handlers.cancel_scope.deadline = trio.current_time() + GRACE_PERIOD
            for session in list(cluster.sessions.values()):
                session.cancel("cluster_stopping")
            abandon_engine_connects(cluster)
        # Dials that came in on still-open links during the grace period
        # may have started connects since; the links are closed now.
        abandon_engine_connects(cluster)
        outer.cancel_scope.cancel()
    log.info("cluster_stopped")


async def wait_for_stop(handle_signals: bool, gone: trio.Event | None = None) -> str:
    """Until SIGTERM or SIGINT (if ``handle_signals``) or ``gone`` is set
    (a worker's supervisor went); what it was, for the log."""
    why = "signal=none"
    async with trio.open_nursery() as nursery:
        if handle_signals:
            async def signalled() -> None:
                nonlocal why
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for signum in signals:
                        why = f"signal={signal.Signals(signum).name}"
                        nursery.cancel_scope.cancel()

            nursery.start_soon(signalled)
        if gone is not None:
            async def supervisor_gone() -> None:
                nonlocal why
                await gone.wait()
                why = "signal=none reason=supervisor_gone"
                nursery.cancel_scope.cancel()

            nursery.start_soon(supervisor_gone)
        await trio.sleep_forever()
    return why

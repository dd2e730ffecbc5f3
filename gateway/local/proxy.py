"""``wicket proxy tcp``: a local listener relaying each connection to a
resource over the mutual-TLS ``tcp`` route.

Each accepted client gets its own dial. A refused dial (denied, expired,
unknown resource, unreachable upstream) is logged with what to do next and
the client's connection is closed; other clients are unaffected.
"""

from __future__ import annotations

import logging
import signal

import trio

from gateway.identity import tlsconf
from gateway.local.client import ClusterError, DialRefused, MuxDialer
from gateway.local.profile import Profile, ProfileError
from gateway.net.relay import RelayCounters
from protocols.dial import DialRequest
from protocols.errors import ErrorCode

log = logging.getLogger("wicket.proxy")

NEXT_STEP = {
    ErrorCode.CERT_EXPIRED: "run `wicket login` again",
    ErrorCode.CERT_INVALID: "run `wicket login` again",
    ErrorCode.CERT_REQUIRED: "run `wicket login` again",
    ErrorCode.ACCESS_DENIED: "ask a cluster administrator for a role that allows it",
    ErrorCode.USER_LOCKED: "ask a cluster administrator to unlock your user",
    ErrorCode.RESOURCE_NOT_FOUND: "`wicket ls` lists the resources you can reach",
    ErrorCode.UPSTREAM_UNREACHABLE: "the resource is down or unreachable from the cluster",
}


def peer_addr(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:  # the client already reset the connection
        return "unknown"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class TcpProxy:
    """Each client connection is a stream of the gateway's one multiplexed
    connection to the cluster (see :class:`MuxDialer`)."""

    def __init__(self, profile: Profile, resource: str) -> None:
        self.profile = profile
        self.resource = resource
        self.dialer = MuxDialer(profile)
        self.active = 0

    async def handle(self, client: trio.SocketStream) -> None:
        client_addr = peer_addr(client)
        async with client:
            try:
                self.dialer.check_fresh()
                link, stream, accept = await self.dialer.open(
                    DialRequest(resource=self.resource, client_addr=client_addr))
            except ProfileError as exc:
                log.warning("dial_refused resource=%s client=%s code=cert_expired message=%r",
                            self.resource, client_addr, str(exc))
                return
            except DialRefused as exc:
                err = exc.error
                log.warning("dial_refused resource=%s client=%s code=%s message=%r next_step=%r",
                            self.resource, client_addr, err.raw_code or err.code.value, err.message,
                            NEXT_STEP.get(err.code, "see the cluster's audit log"))
                return
            except (ClusterError, trio.TooSlowError) as exc:
                log.warning("dial_failed resource=%s client=%s error=%r", self.resource, client_addr,
                            getattr(exc, "message", None) or "the cluster did not answer in time")
                return
            self.active += 1
            counters = RelayCounters()
            try:
                error = await link.attach(stream, client, counters)
                log.info("session_end resource=%s client=%s session=%s sent=%d received=%d%s",
                         self.resource, client_addr, accept.session_id, counters.a_to_b,
                         counters.b_to_a, f" error={error!r}" if error else "")
            finally:
                self.active -= 1
                self.dialer.release(link)


async def run_listener(
    handler,
    *,
    host: str,
    port: int,
    task_status=trio.TASK_STATUS_IGNORED,
    handle_signals: bool = True,
) -> None:
    """Listen on ``host:port`` and serve each connection with ``handler``
    until SIGINT/SIGTERM (or cancellation). Started value: the bound address."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()

    async def guarded(stream: trio.SocketStream) -> None:
        # One client's trouble, even a bug, ends that client's connection
        # only: every other client keeps its session.
        try:
            await handler(stream)
        except Exception:
            log.exception("connection_failed client=%s action=%s", peer_addr(stream),
                          "report this as a bug with the traceback")
            await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, guarded, listeners)
        task_status.started(bound)
        if handle_signals:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("proxy_stopping signal=%s", signal.Signals(signum).name)
                    break
            nursery.cancel_scope.cancel()

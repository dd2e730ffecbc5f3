"""The agent's admin endpoints, on their own loopback address (never a
resource's): probes, metrics, status and an opt-in way to stop it.

    GET  /livez          200 while the process runs its event loop
    GET  /startupz       503 until the agent first served, then 200
    GET  /readyz         200 when the certificate is valid, every resource
                         listens and its connection to the cluster is up;
                         else 503. ?verbose: one line per check, [+] or [-]
    GET  /status         the agent's state as JSON (`wicket agent status`)
    GET  /metrics        Prometheus text (prometheus_client)
    POST /quitquitquit   stop, exit code 0 (only with `quitquitquit` on)

Every request is bounded in size and time by gateway/net/http.py, and the
connections at once by :data:`MAX_CONNECTIONS`.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from gateway.addresses import parse_hostport
from gateway.net.http import HTTPError, Request, Response, serve_http

if TYPE_CHECKING:
    from gateway.local.agent import Agent

log = logging.getLogger("wicket.admin")

MAX_CONNECTIONS = 64
REQUEST_TIMEOUT = 5.0


class _Collector:
    """The agent's state as metrics, read at each scrape."""

    def __init__(self, agent: "Agent") -> None:
        self.agent = agent

    def collect(self) -> Any:
        agent = self.agent
        ready = GaugeMetricFamily("wicket_agent_ready", "1 when /readyz answers 200")
        ready.add_metric([], 1.0 if agent.ready() else 0.0)
        yield ready
        identity = agent.identity()
        expiry = GaugeMetricFamily("wicket_agent_certificate_expiry_timestamp_seconds",
                                   "When the current certificate expires (Unix time)")
        if identity is not None:
            expiry.add_metric([], identity.not_after.timestamp())
        yield expiry
        renewer = agent.renewer
        renewals = CounterMetricFamily("wicket_agent_certificate_renewals", "Certificates renewed")
        renewals.add_metric([], renewer.renewals if renewer else 0)
        yield renewals
        failures = CounterMetricFamily("wicket_agent_certificate_renewal_failures", "Renewals that failed")
        failures.add_metric([], renewer.failures if renewer else 0)
        presented = CounterMetricFamily("wicket_agent_connection_renewals",
                                        "Renewed certificates the cluster took on the live connection")
        presented.add_metric([], agent.dialer.renewed_in_place if agent.dialer else 0)
        yield presented
        yield failures
        up = GaugeMetricFamily("wicket_agent_resource_up", "1 when the resource's listener is up",
                               labels=["resource", "kind"])
        connected = GaugeMetricFamily("wicket_agent_cluster_connected",
                                      "1 when the resource's connection to the cluster is up", labels=["resource"])
        for item in agent.served:
            kind = item.wanted.kind.name if item.wanted.kind else ""
            up.add_metric([item.wanted.name, kind], 1.0 if item.ok else 0.0)
            connected.add_metric([item.wanted.name], 1.0 if item.ok and item.route.dialer.connected else 0.0)
        sessions = GaugeMetricFamily("wicket_agent_sessions", "Sessions open through the resource",
                                     labels=["resource"])
        for item in agent.served:
            if item.ok:
                sessions.add_metric([item.wanted.name], float(item.sessions))
        yield up
        yield connected
        yield sessions
        ended = CounterMetricFamily("wicket_agent_sessions_ended", "Sessions that ended", labels=["resource"])
        transferred = CounterMetricFamily("wicket_agent_bytes", "Bytes relayed by ended sessions",
                                          labels=["resource", "direction"])
        refused = CounterMetricFamily("wicket_agent_dial_refusals", "Dials the cluster refused, by error code",
                                      labels=["resource", "code"])
        failed = CounterMetricFamily("wicket_agent_dial_failures", "Dials that got no answer (cluster unreachable)",
                                     labels=["resource"])
        dial = HistogramMetricFamily("wicket_agent_dial_seconds", "From a client's arrival to the cluster's "
                                     "answer to its dial (accepted or refused)", labels=["resource"])
        control = HistogramMetricFamily("wicket_agent_control_dial_seconds", "From the start of a control dial "
                                        "(a cancel, a probe) to the cluster's answer", labels=["resource"])
        for item in agent.served:
            if not item.ok:
                continue
            stats = item.route.route.stats  # every kind's MuxRoute keeps them
            name, snap = item.wanted.name, stats.snapshot()
            ended.add_metric([name], snap["sessions"])
            transferred.add_metric([name, "sent"], snap["sent"])
            transferred.add_metric([name, "received"], snap["received"])
            for code, count in sorted(snap["refused"].items()):
                refused.add_metric([name, code], count)
            failed.add_metric([name], snap["failed"])
            buckets, total = stats.dial_histogram()
            dial.add_metric([name], buckets, total)
            buckets, total = stats.control_histogram()
            control.add_metric([name], buckets, total)
        yield ended
        yield transferred
        yield refused
        yield failed
        yield dial
        yield control


def _text(status: int, text: str) -> Response:
    return Response(status=status, body=text.encode())


class AdminAPI:
    def __init__(self, agent: "Agent") -> None:
        self.agent = agent
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(agent))

    async def __call__(self, request: Request) -> Response:
        path, _, query = request.path.partition("?")
        route = {
            ("GET", "/livez"): self.livez,
            ("GET", "/startupz"): self.startupz,
            ("GET", "/readyz"): self.readyz,
            ("GET", "/status"): self.status,
            ("GET", "/metrics"): self.metrics,
            ("POST", "/quitquitquit"): self.quitquitquit,
        }.get((request.method, path))
        if route is None:
            raise HTTPError(404, "not_found", f"no route {request.method} {path}")
        return await route(query)

    async def livez(self, query: str) -> Response:
        return _text(200, "ok\n")

    async def startupz(self, query: str) -> Response:
        agent = self.agent
        return _text(200, "ok\n") if agent.started else _text(503, f"starting: {agent.waiting}\n")

    async def readyz(self, query: str) -> Response:
        checks = self.agent.checks()
        ok = all(passed for _, passed, _ in checks)
        if "verbose" in query.split("&") or query.startswith("verbose="):
            lines = [f"[{'+' if passed else '-'}]{name} {'ok' if passed else 'failed'}: {detail}"
                     for name, passed, detail in checks]
            lines.append("readyz check passed" if ok else "readyz check failed")
            return _text(200 if ok else 503, "\n".join(lines) + "\n")
        return _text(200, "ok\n") if ok else _text(503, "not ready (?verbose says why)\n")

    async def status(self, query: str) -> Response:
        return Response(status=200, body=self.agent.status())

    async def metrics(self, query: str) -> Response:
        return Response(status=200, body=generate_latest(self.registry),
                        headers=(("content-type", CONTENT_TYPE_LATEST),))

    async def quitquitquit(self, query: str) -> Response:
        if not self.agent.config.quitquitquit:
            raise HTTPError(404, "not_found", "/quitquitquit is off (turn it on with --quitquitquit)")
        log.info("agent_quit via=quitquitquit")
        self.agent.request_stop(0)
        return _text(200, "stopping\n")


async def serve_admin(agent: "Agent", *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve the admin endpoints until cancelled; started value: the bound
    (host, port)."""
    host, port = parse_hostport(agent.config.admin)
    listeners = await trio.open_tcp_listeners(port, host=host)
    bound = listeners[0].socket.getsockname()[:2]
    handler = AdminAPI(agent)
    slots = trio.Semaphore(MAX_CONNECTIONS)

    async def one(stream: trio.SocketStream) -> None:
        if slots.value == 0:
            await stream.aclose()  # a flood of probes does not pile up
            return
        async with slots, stream:
            try:
                await serve_http(stream, handler, request_timeout=REQUEST_TIMEOUT, max_requests=100)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    log.info("admin_listening address=%s:%d", bound[0], bound[1])
    task_status.started(bound)
    await trio.serve_listeners(one, listeners)

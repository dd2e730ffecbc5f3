"""`wicket agent`: many resources in one process, for a sidecar, a
service, or a person's day.

Theory of operation
-------------------
The admin endpoints come up first (gateway/local/admin.py), so probes get
answers from the start: /livez at once, /startupz and /readyz 503 until
the agent serves. Then the identity: the profile's login, or a bot's
certificate, joining with the token file when the profile holds no valid
bot certificate (a restarted sidecar does not spend a one-time token
again). Then the resources: those configured (each must be one the
identity may reach), or with none configured every resource it may reach,
each on its configured port or the one remembered in the profile. While
the cluster cannot be reached or the login has ended, the agent says so
once and tries again, and the probes say why they fail.

Every resource is served by its kind's route (gateway/local/serving.py):
one that cannot be served (unknown, not allowed, its port taken) is
reported with the reason in the log, /readyz?verbose and `wicket agent
status`, and the others serve. The certificate is renewed in the
background (gateway/local/session.py's Renewer); new sessions use the new
one, live ones carry on.

SIGTERM (or SIGINT, or POST /quitquitquit when enabled): /readyz turns
503 at once; the agent keeps accepting for ``min_sigterm_delay`` (the
application's own shutdown may still need its database), then stops
accepting and lets live sessions finish until ``max_sigterm_delay``, then
ends the rest (``sessions_cut`` in the last log line). The exit code is
143 after SIGTERM, 130 after SIGINT, 0 after /quitquitquit or with
``exit_zero``.
"""

from __future__ import annotations

import logging
import signal
import time
from pathlib import Path
from typing import Any

import trio

from gateway import kinds
from gateway.identity import pki
from gateway.identity.pki import utcnow
from gateway.local import api, ports, serving, session
from gateway.local.agent_config import AgentConfig
from gateway.local.connect import ClusterError
from gateway.local.profile import Profile, ProfileError, wicket_home
from gateway.local.dialer import DIAL_TIMEOUT, MuxDialer
from gateway.net.muxlink import LinkClosed
from gateway.net.peercred import LocalUsers
from protocols.dial import PARAM_PROBE, DialError, DialRequest

log = logging.getLogger("wicket.agent")

#: How long to wait before trying the cluster again at start, at most.
START_RETRY_MAX = 10.0
#: How often a draining stop looks whether the live sessions have ended.
DRAIN_POLL = 0.1
#: The exit code when --check-upstreams finds a resource it cannot serve.
EXIT_CHECK_FAILED = 1


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.home: Path = config.profile or wicket_home()
        self.profile: Profile | None = None
        self.renewer: session.Renewer | None = None
        #: The one connection to the cluster every resource shares.
        self.dialer: MuxDialer | None = None
        self.served: list[serving.Served] = []
        #: Why the agent does not serve yet (None once it does).
        self.waiting: str | None = "starting"
        self.started = False
        self.stopping = False
        self.stop_requested = trio.Event()
        self.exit_code = 0
        self.started_at = time.time()

    # -- what the probes and `wicket agent status` read ---------------------

    def identity(self) -> pki.Identity | None:
        return None if self.renewer is None else self.renewer.identity()

    def checks(self) -> list[tuple[str, bool, str]]:
        """(name, ok, detail) for every readiness check."""
        out = []
        identity = self.identity()
        if self.waiting is not None:
            out.append(("startup", False, self.waiting))
        if identity is None:
            out.append(("certificate", False, "no certificate yet"))
        elif utcnow() >= identity.not_after or (self.renewer and self.renewer.stuck):
            out.append(("certificate", False, (self.renewer and self.renewer.stuck) or "expired"))
        else:
            out.append(("certificate", True, f"{identity.kind} {identity.user}, expires "
                                              f"{identity.not_after.isoformat()}"))
        for item in self.served:
            name = f"resource:{item.wanted.name}"
            if not item.ok:
                out.append((name, False, item.error))
            elif not item.route.dialer.connected:
                out.append((name, False, f"listening on {item.host}:{item.port}; the cluster is not connected"))
            else:
                out.append((name, True, f"{item.wanted.kind.name} on {item.host}:{item.port}"))
        if self.stopping:
            out.append(("shutdown", False, "stopping"))
        return out

    def ready(self) -> bool:
        return all(ok for _, ok, _ in self.checks())

    def status(self) -> dict[str, Any]:
        identity = self.identity()
        return {
            "ready": self.ready(),
            "started": self.started,
            "waiting": self.waiting,
            "stopping": self.stopping,
            "identity": None if identity is None else {
                "user": identity.user, "kind": identity.kind, "roles": list(identity.roles),
                "expires_at": identity.not_after.isoformat()},
            "renewals": 0 if self.renewer is None else self.renewer.renewals,
            "resources": [{"name": s.wanted.name, "kind": s.wanted.kind.name if s.wanted.kind else None,
                           "host": s.host, "port": s.port, "ok": s.ok, "error": s.error,
                           "cluster_connected": bool(s.ok and s.route.dialer.connected)} for s in self.served],
            "checks": [{"name": n, "ok": ok, "detail": d} for n, ok, d in self.checks()],
        }

    def request_stop(self, code: int) -> None:
        if not self.stop_requested.is_set():
            self.exit_code = 0 if self.config.exit_zero else code
            self.stop_requested.set()

    # -- running ---------------------------------------------------------------

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> int:
        from gateway.local.admin import serve_admin

        async with trio.open_nursery() as nursery:
            admin = await nursery.start(serve_admin, self)
            task_status.started(admin)
            nursery.start_soon(self._signals)
            nursery.start_soon(self._serve, nursery)
            await self.stop_requested.wait()
            self.stopping = True
            await self._stop()
            nursery.cancel_scope.cancel()
        return self.exit_code

    def sessions(self) -> int:
        return sum(item.sessions for item in self.served)

    async def _stop(self) -> None:
        """Serve on for min_sigterm_delay, stop accepting, let live sessions
        finish until max_sigterm_delay, then end what is left."""
        config = self.config
        if config.min_sigterm_delay:
            log.info("agent_stopping phase=still_accepting seconds=%.1f", config.min_sigterm_delay)
            await trio.sleep(config.min_sigterm_delay)
        for item in self.served:
            item.stop_accepting()
        left = config.max_sigterm_delay - config.min_sigterm_delay
        if self.sessions():
            log.info("agent_stopping phase=draining sessions=%d seconds=%.1f", self.sessions(), left)
        with trio.move_on_after(left):
            while self.sessions():
                await trio.sleep(DRAIN_POLL)
        cut = self.sessions()
        log.info("agent_stopped exit_code=%d sessions_cut=%d", self.exit_code, cut)

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("agent_signal signal=%s", signal.Signals(signum).name)
                self.request_stop(128 + signum)

    async def _serve(self, nursery: trio.Nursery) -> None:
        self.profile = await self._identity()
        # One connection to the cluster for every resource, renewed in place.
        dialer = self.dialer = MuxDialer(self.profile)
        self.renewer = session.Renewer(self.profile, rejoin=self._join if self.config.token_file else None,
                                       on_renewed=dialer.wake)
        nursery.start_soon(self.renewer.run)
        wanted, refused = await self._resources()
        local_users = LocalUsers(uids=LocalUsers().uids | set(self.config.allow_uids))
        self.served = refused + await serving.serve(
            self.profile, self.profile.identity(), wanted, nursery, wait_for_cluster=self.config.wait_for_cluster,
            local_users=local_users, dialer=dialer, max_connections=self.config.max_connections)
        self.served.sort(key=lambda s: s.wanted.name)
        ok = sum(s.ok for s in self.served)
        if self.config.check_upstreams:  # before the probes say ready
            self.waiting = "checking that the cluster reaches every upstream"
            failures = [(s.wanted.name, s.error) for s in self.served if not s.ok]
            failures += await self._probe_upstreams()
            for name, why in failures:
                log.error("upstream_check_failed resource=%s error=%r", name, why)
            if failures:
                self.waiting = f"--check-upstreams: {len(failures)} resource(s) cannot be served or reached"
                self.exit_code = EXIT_CHECK_FAILED
                self.stop_requested.set()
                return
            log.info("upstream_check_passed resources=%d", ok)
        self.waiting = None
        self.started = True
        log.info("agent_serving resources=%d failed=%d %s", ok, len(self.served) - ok,
                 " ".join(f"{s.wanted.name}={s.host}:{s.port}" if s.ok else f"{s.wanted.name}=failed"
                          for s in self.served))

    async def _probe_upstreams(self) -> list[tuple[str, str]]:
        """Ask the cluster to reach every served resource's upstream, all at
        once; the (resource, why) of those it cannot."""
        failures: list[tuple[str, str]] = []

        async def probe(item: serving.Served) -> None:
            request = DialRequest(resource=item.wanted.name, params={PARAM_PROBE: "1"},
                                  client_addr="check-upstreams")
            try:
                with trio.fail_after(DIAL_TIMEOUT):
                    link = await item.route.dialer.link()
                    reply = await item.route.route.control_dial(link, request)
            except (ClusterError, LinkClosed, trio.TooSlowError) as exc:
                failures.append((item.wanted.name, f"the cluster did not answer: "
                                                   f"{getattr(exc, 'message', None) or exc}"))
                return
            if isinstance(reply, DialError):
                failures.append((item.wanted.name, reply.message))

        async with trio.open_nursery() as nursery:
            for item in self.served:
                if item.ok:
                    nursery.start_soon(probe, item)
        return sorted(failures)

    async def _identity(self) -> Profile:
        """The profile to serve with, once it holds a valid certificate."""
        config, backoff = self.config, _Backoff(self)
        while True:
            person = False
            try:
                profile = Profile.load(self.home)
                person = profile.identity().kind != "bot"
                identity = profile.check_fresh(utcnow())
                if config.token_file is None or identity.kind == "bot":
                    return profile
            except (ProfileError, OSError, ValueError, pki.CertError) as exc:
                reason = str(exc)
            if person and config.token_file is not None:
                # Never replace a person's login with a bot's.
                reason = (f"{self.home} holds a person's login; give the bot a profile of its own "
                          f"(--profile DIR) or drop --token-file")
            elif config.token_file is not None:
                try:
                    return await self._join()
                except ClusterError as exc:
                    reason = f"joining with {config.token_file} failed: {exc.message}"
                except (OSError, ValueError) as exc:
                    reason = f"cannot join with {config.token_file}: {exc}"
            await backoff.wait(reason)

    async def _join(self) -> Profile:
        """Join as the bot with the token file (at start, or again after
        the certificate ran out); the profile. Raises ClusterError, OSError,
        ValueError."""
        config = self.config
        token = session.read_token_file(config.token_file)
        return await session.join(self.home, config.cluster, pki.normalize_pin(config.ca_pin), token)

    async def _resources(self) -> tuple[list[serving.Wanted], list[serving.Served]]:
        """What to serve (and what cannot be, with why), once the cluster
        says what the identity may reach."""
        backoff = _Backoff(self)
        while True:
            try:
                doc = await api.api_call(self.profile, "GET", "/v1/resources")
                break
            except (ClusterError, OSError, trio.TooSlowError, trio.BrokenResourceError) as exc:
                await backoff.wait(f"the cluster did not list the resources: "
                                   f"{getattr(exc, 'message', None) or exc}")
        visible = {r.get("name"): r for r in doc.get("resources", [])}
        configured = self.config.resources or tuple(
            _Default(name) for name in sorted(n for n in visible if isinstance(n, str)))
        wanted, refused = [], []
        for rc in configured:
            resource = visible.get(rc.name)
            kind = kinds.KINDS.get(resource.get("kind")) if resource else None
            if kind is None:
                why = (f"no resource named {rc.name!r} that this identity may reach" if resource is None
                       else f"kind {resource.get('kind')!r} is not served by this wicket")
                refused.append(serving.Served(wanted=serving.Wanted(name=rc.name, kind=None), error=why))
                log.warning("resource_failed resource=%s error=%r", rc.name, why)
                continue
            mine = {o.name for o in kind.proxy_options}
            stray = sorted(set(rc.options) - mine)
            if stray:
                why = f"{', '.join(stray)} does not apply to {kind.name} resources"
                refused.append(serving.Served(wanted=serving.Wanted(name=rc.name, kind=kind), error=why))
                log.warning("resource_failed resource=%s error=%r", rc.name, why)
                continue
            grants = serving.grant_defaults(resource.get("allowed", {}))
            unix = rc.unix_socket
            if unix is not None:  # a directory's socket is named after the port: PostgreSQL's default
                port = rc.port or 5432
            else:
                port = rc.port or ports.assign(self.home, rc.name, self.config.bind)
            wanted.append(serving.Wanted(name=rc.name, kind=kind, options=dict(rc.options),
                                         settings={**grants, **rc.options}, bind=self.config.bind, port=port,
                                         unix_socket=unix, unix_mode=rc.unix_socket_mode))
        return wanted, refused


class _Backoff:
    """Waits between start-up attempts, longer each time; says why the
    agent waits (in /startupz and once in the log per new reason)."""

    def __init__(self, agent: Agent) -> None:
        self.agent, self.delay, self.said = agent, 0.5, None

    async def wait(self, reason: str) -> None:
        self.agent.waiting = reason
        if reason != self.said:
            log.warning("agent_waiting reason=%r", reason)
            self.said = reason
        await trio.sleep(self.delay)
        self.delay = min(self.delay * 2, START_RETRY_MAX)


class _Default:
    """A resource served because none were configured: its remembered port."""

    def __init__(self, name: str) -> None:
        self.name, self.port, self.options = name, 0, {}
        self.unix_socket, self.unix_socket_mode = None, 0o600

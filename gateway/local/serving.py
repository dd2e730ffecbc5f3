"""Many resources served by one process: `wicket exec`'s listeners (and
the agent's). Each resource gets its kind's route (gateway/kinds.py's
``gateway_route``) on its own local port, and one resource's trouble (an
unknown kind, a port taken, a route that cannot be built) is that
resource's alone: it is reported with the reason and the others serve on.

Each resource's client environment is its kind's (``client_env``: PGHOST,
DATABASE_URL ...) plus ``WICKET_<NAME>_HOST`` and ``WICKET_<NAME>_PORT``
for every resource; where two resources of a kind would set the same
variable (two PostgreSQL resources, one PGPORT), the first named wins and
the others are reached through their ``WICKET_<NAME>_...`` variables.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import attrs
import trio

from gateway.kinds import Kind
from gateway.local.dialer import MuxDialer
from gateway.local.profile import Profile
from gateway.local.proxy import ListenError, Listening, run_listener, unix_address, unix_socket_path
from gateway.net.peercred import LocalUsers

log = logging.getLogger("wicket.serving")


@attrs.frozen(slots=True, kw_only=True)
class Wanted:
    """A resource to serve: its name and kind, the kind's proxy options
    (``db_user`` ...), what its clients are told besides (``settings``: the
    options and the defaults the cluster's grants imply), where to listen."""

    name: str
    kind: Kind
    options: dict[str, Any] = attrs.field(factory=dict)
    settings: dict[str, Any] = attrs.field(factory=dict)
    bind: str = "127.0.0.1"
    port: int = 0
    #: Listen on this unix socket instead (a directory: the kind's socket
    #: name in it, from ``port``), created with ``unix_mode``.
    unix_socket: Path | None = None
    unix_mode: int = 0o600


@attrs.define
class Served:
    """How a wanted resource stands: listening on ``host:port``, or not,
    with ``error`` saying why."""

    wanted: Wanted
    host: str | None = None
    port: int | None = None
    error: str | None = None
    route: Listening | None = None
    #: Cancelling it stops accepting; live sessions carry on.
    accepting: trio.CancelScope | None = None

    def stop_accepting(self) -> None:
        if self.accepting is not None:
            self.accepting.cancel()

    @property
    def sessions(self) -> int:
        """This resource's local clients now (their sessions, and those
        still starting)."""
        return self.route.route.clients if self.route is not None else 0

    @property
    def ok(self) -> bool:
        return self.error is None


def grant_defaults(allowed: dict[str, list[str]]) -> dict[str, str]:
    """A parameter the cluster grants exactly one literal value of (one db
    user, no glob; `/v1/resources`' ``allowed``) is what a client will
    want: its default."""
    return {k: v[0] for k, v in allowed.items() if len(v) == 1 and not set(v[0]) & set("*?[")}


def env_name(resource: str) -> str:
    """``pg-prod`` -> ``PG_PROD`` (for ``WICKET_PG_PROD_PORT``)."""
    return re.sub(r"[^A-Za-z0-9]", "_", resource).upper()


def client_environment(served: list[Served]) -> dict[str, str]:
    """The variables a client process gets for the resources that serve."""
    env: dict[str, str] = {}
    for item in served:
        if not item.ok:
            continue
        w, name = item.wanted, env_name(item.wanted.name)
        env[f"WICKET_{name}_HOST"] = item.host
        env[f"WICKET_{name}_PORT"] = str(item.port)
        for key, value in w.kind.client_environment(w.name, item.host, item.port, w.settings).items():
            env.setdefault(key, value)
    return env


async def serve(profile: Profile, identity: Any, wanted: list[Wanted], nursery: trio.Nursery, *,
                wait_for_cluster: float, local_users: LocalUsers | None = None,
                dialer: MuxDialer | None = None, max_connections: int | None = None) -> list[Served]:
    """Start every wanted resource's listener in ``nursery``, and the one
    connection to the cluster they share (its streams carry every
    resource's sessions; a renewed certificate is presented on it once for
    all of them); how each stands. Never raises for one resource's
    trouble."""
    served = []
    dialer = dialer if dialer is not None else MuxDialer(profile)
    if wanted:
        await nursery.start(dialer.run_pool)
    for w in wanted:
        item = Served(wanted=w)
        served.append(item)
        try:
            route = w.kind.local_route()(profile, w.name, identity, wait_for_cluster=wait_for_cluster,
                                         local_users=local_users, dialer=dialer, **w.options)
            if max_connections is not None:
                route.route.max_clients = max_connections
            unix = None if w.unix_socket is None else unix_socket_path(w.unix_socket, w.port, route.unix_name)
            bound, accepting = await nursery.start(_listen, route.handler, w.bind, w.port, nursery, unix,
                                                   w.unix_mode)
        except ListenError as exc:
            item.error = str(exc)
        except OSError as exc:
            where = w.unix_socket if w.unix_socket is not None else f"{w.bind}:{w.port}"
            item.error = f"cannot listen on {where}: {exc.strerror or exc}"
        except Exception as exc:  # one resource's trouble, even a bug, is its own
            item.error = f"{type(exc).__name__}: {exc}"
        else:
            if isinstance(bound, str):  # a unix socket
                bound = unix_address(bound, w.port)
            item.host, item.port, item.route, item.accepting = bound[0], bound[1], route, accepting
            log.info("resource_listening resource=%s kind=%s address=%s:%d", w.name, w.kind.name, item.host,
                     item.port)
            continue
        log.warning("resource_failed resource=%s kind=%s error=%r", w.name, w.kind.name, item.error)
    return served


async def _listen(handler: Any, host: str, port: int, handler_nursery: trio.Nursery, unix_socket: Path | None,
                  unix_mode: int, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Accept until the scope it starts with (the started value's second
    half) is cancelled; the sessions' tasks run in ``handler_nursery``, so
    they outlive that. A unix socket is removed when accepting stops."""
    with trio.CancelScope() as accepting:
        await run_listener(handler, host=host, port=port, unix_socket=unix_socket, unix_mode=unix_mode,
                           handle_signals=False, handler_nursery=handler_nursery,
                           task_status=_WithScope(task_status, accepting))


class _WithScope:
    """A task status that reports the bound address with the scope."""

    def __init__(self, task_status: Any, scope: trio.CancelScope) -> None:
        self._task_status, self._scope = task_status, scope

    def started(self, value: Any = None) -> None:
        self._task_status.started((value, self._scope))

"""The kinds of resource Wicket serves, one registry entry each.

Everything kind-specific that the rest of the code needs to know is derived
from an entry here: the ALPN id of the kind's own data route, the settings a
resource of the kind takes (validated, with ``wicket-cluster resources add``
flags), the dial parameters RBAC sees (and the role keys and ``roles add``
flags that constrain them), the cluster's strategy for opening the upstream
(gateway/cluster/dial.py's ``RouteKind``), and the ``wicket proxy`` verb.

Adding a kind is: a sans-I/O codec in ``protocols/<kind>/``, a cluster
module with its ``RouteKind``, a gateway module of hooks, an entry in
:data:`KINDS`, tests. docs/adding-a-kind.md walks through it with ``tcp``.

This module imports nothing heavy: strategies are named by import path and
loaded on first use, so the CLI and the config parser can read the registry
without pulling in the relay engine.
"""

from __future__ import annotations

import importlib
from typing import Any

import attrs

from gateway.cluster.resource_specs import DATABASE, NO_SETTINGS, Schema


@attrs.frozen(slots=True, kw_only=True)
class Param:
    """A dial parameter that roles constrain (``db_user``), with the key
    that lists its allowed globs in a role rule (``db_users``)."""

    name: str
    role_key: str
    help: str

    @property
    def role_option(self) -> str:
        """The ``wicket-cluster roles add`` option for it."""
        return "--" + self.role_key.replace("_", "-")


DB_USER = Param(name="db_user", role_key="db_users", help="db user globs the allow rule grants")
DB_NAME = Param(name="db_name", role_key="db_names", help="database globs the allow rule grants")


@attrs.frozen(slots=True, kw_only=True)
class Kind:
    name: str
    #: One line for help texts and `wicket ls`.
    summary: str
    #: The ALPN id of the kind's data route on the cluster's listener (a
    #: dial on a connection of its own; the multiplexed connection carries
    #: every kind as well).
    alpn: str
    #: `wicket proxy VERB NAME` serves a resource of this kind.
    proxy_verb: str
    spec: Schema
    params: tuple[Param, ...] = ()
    #: "module:attribute" of the cluster's RouteKind for this kind.
    cluster_route: str
    is_database: bool = False

    def route(self) -> Any:
        """The cluster's strategy for this kind, imported on first use."""
        module, _, attr = self.cluster_route.partition(":")
        return getattr(importlib.import_module(module), attr)


TCP = Kind(
    name="tcp",
    summary="any TCP service, relayed byte for byte",
    alpn="wicket-tcp",
    proxy_verb="tcp",
    spec=NO_SETTINGS,
    cluster_route="gateway.cluster.dial:TCP",
)

POSTGRES = Kind(
    name="postgres",
    summary="PostgreSQL: no password on the client, the cluster logs in as the db user, statements audited",
    alpn="wicket-postgres",
    proxy_verb="db",
    spec=DATABASE,
    params=(DB_USER, DB_NAME),
    cluster_route="gateway.cluster.postgres:POSTGRES",
    is_database=True,
)

#: Every kind, by name. The one place a kind is plugged in.
KINDS: dict[str, Kind] = {kind.name: kind for kind in (TCP, POSTGRES)}


class UnknownKind(ValueError):
    pass


def get(name: str) -> Kind:
    try:
        return KINDS[name]
    except KeyError:
        raise UnknownKind(f"kind {name!r} is not one of {', '.join(KINDS)}") from None


def by_alpn(alpn: str | None) -> Kind | None:
    for kind in KINDS.values():
        if kind.alpn == alpn:
            return kind
    return None


def alpn_ids() -> tuple[str, ...]:
    return tuple(kind.alpn for kind in KINDS.values())


def params() -> tuple[Param, ...]:
    """Every dial parameter some kind's dials carry and roles constrain."""
    seen: dict[str, Param] = {}
    for kind in KINDS.values():
        for param in kind.params:
            seen.setdefault(param.name, param)
    return tuple(seen.values())


def proxy_command(kind_name: str) -> str:
    """How a person opens a local port to a resource of this kind."""
    kind = KINDS.get(kind_name)
    return f"wicket proxy {kind.proxy_verb if kind else kind_name}"

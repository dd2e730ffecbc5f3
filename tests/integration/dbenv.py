"""The shape every database kind's integration set-up shares: a cluster
with the module's roles, a throwaway server of the kind that trusts the
cluster's database client CA, resources pointing at it, and logged-in
gateways for fresh users. pgclients.py (PostgreSQL) and test_mysql.py
(MariaDB) build theirs from these pieces; what differs (the server, its
accounts, which resources) stays theirs."""

from __future__ import annotations

import contextlib
import itertools
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

from tests.integration.harness import Cluster, Echo, Gateway

#: An address nobody listens on: a resource whose server is down.
NOWHERE = "127.0.0.1:9"

_users = itertools.count(1)


@contextlib.contextmanager
def database_env(tmp: Path, make_server: Callable[[bytes], Any], *, roles: str,
                 env: Mapping[str, str] | None = None) -> Iterator[tuple[Cluster, Any]]:
    """(cluster, server), both running until the block ends: a cluster with
    ``roles`` (TOML) and ``env``, and ``make_server(db_client_ca_pem)``,
    started (a server with ``start()``, ``stop()``, ``address`` and
    ``server_ca_path``)."""
    echo = Echo(tmp)
    cluster = Cluster(tmp, echo, extra_config=roles, env=dict(env or {}))
    server = None
    try:
        server = make_server((cluster.state / "db_client_ca.crt").read_bytes())
        server.start()
        yield cluster, server
    finally:
        if server is not None:
            server.stop()
        cluster.stop()
        echo.proc.stop()


def add_resource(cluster: Cluster, server: Any, name: str, kind: str, *extra: str) -> None:
    """Resource ``name`` for ``server``, over TLS verified against its CA
    (``extra``: more `resources add` options)."""
    cluster.admin("resources", "add", name, "--kind", kind, "--address", server.address,
                  "--ca-file", str(server.server_ca_path), "--server-name", "localhost", *extra)


def add_down_resource(cluster: Cluster, name: str, kind: str) -> None:
    """Resource ``name`` whose server cannot be reached."""
    cluster.admin("resources", "add", name, "--kind", kind, "--address", NOWHERE, "--tls", "require")


def new_gateway(cluster: Cluster, tmp: Path, roles: str, prefix: str) -> Gateway:
    """A gateway for a fresh user ``<prefix><n>`` with ``roles``, logged in."""
    return Gateway.logged_in(cluster, tmp, f"{prefix}{next(_users)}", roles)

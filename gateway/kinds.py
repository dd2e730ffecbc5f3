"""The kinds of resource Wicket serves, one registry entry each.

Everything kind-specific that the rest of the code needs to know is derived
from an entry here: the ALPN id of the kind's own data route, the settings a
resource of the kind takes (validated, with ``wicket-cluster resources add``
flags), the dial parameters RBAC sees (and the role keys and ``roles add``
flags that constrain them), the cluster's strategy for opening the upstream
(gateway/cluster/routekind.py's ``RouteKind``), and the ``wicket proxy`` verb.

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

from gateway.cluster.resource_specs import DATABASE, NO_SETTINGS, SSH_NODE, Schema


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
LOCAL_INFILE = Param(name="local_infile", role_key="local_infile",
                     help='"on": MySQL LOAD DATA LOCAL may send the client\'s files (off unless a rule says so)')
LOGIN = Param(name="login", role_key="logins", help="node login (OS user) globs the allow rule grants")
AGENT_FORWARDING = Param(name="agent_forwarding", role_key="ssh_agent_forwarding",
                         help='"on": ssh -A may forward the client\'s ssh-agent to the node (off unless a rule says so)')


@attrs.frozen(slots=True, kw_only=True)
class ProxyOption:
    """A `wicket proxy` option of the kind's own (``--db-user``), passed to
    its gateway route by ``name``."""

    name: str
    help: str
    is_flag: bool = False

    @property
    def option(self) -> str:
        return "--" + self.name.replace("_", "-")


DATABASE_PROXY_OPTIONS = (
    ProxyOption(name="db_user", help="Database user for every connection (default: what the client asks for)."),
    ProxyOption(name="db_name", help="Database for every connection (default: what the client asks for)."),
    ProxyOption(name="local_tls", is_flag=True,
                help="Offer TLS to local clients (sslmode=require / verify-full) with the gateway's local CA."),
    ProxyOption(name="local_tls_client_cert", is_flag=True,
                help="Implies --local-tls, and requires a client certificate the gateway issues "
                     "($WICKET_HOME/local-client.crt and .key, printed at start): only who can read the "
                     "key may connect."),
)


@attrs.frozen(slots=True, kw_only=True)
class ClientFile:
    """A client's own configuration file that can name a local port
    (``wicket config pg`` writes a pg_service.conf section)."""

    #: `wicket config VERB NAME`.
    verb: str
    #: The file it edits by default (``~`` expanded).
    default_path: str
    #: One line for help texts.
    summary: str
    #: "module:attribute" of a function (resource, host, port, settings)
    #: -> the entry's text, and of one (file text, resource, entry) -> the
    #: file's new text with that entry in place of any earlier one.
    render: str
    merge: str

    def renderer(self) -> Any:
        return _load(self.render)

    def merger(self) -> Any:
        return _load(self.merge)


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
    #: "module:attribute" of the gateway's route factory: called with the
    #: profile, the resource's name, the identity, ``wait_for_cluster``,
    #: ``local_users`` and the kind's proxy options, it returns a
    #: gateway.local.proxy.Listening.
    gateway_route: str
    #: The kind's own `wicket proxy` options.
    proxy_options: tuple[ProxyOption, ...] = ()
    is_database: bool = False
    #: "module:attribute" of a function (resource, host, port, settings) ->
    #: the environment variables the kind's clients read (PGHOST, ...) for
    #: `wicket exec` and `wicket env`; settings are the proxy options,
    #: the defaults the cluster's grants imply (a single db_user) and
    #: ``wicket_home`` (the profile's directory, with the local CA). None:
    #: only the WICKET_<NAME>_HOST/PORT every resource gets.
    client_env: str | None = None
    #: The client configuration file `wicket config` writes, if any.
    client_file: ClientFile | None = None
    #: "module:attribute" of an async function (profile, [(resource,
    #: settings)], directory or None) -> the environment variables with
    #: which the kind's clients reach those resources by themselves, with
    #: no local listener (ssh's ProxyCommand); it writes what they need into
    #: ``directory`` (private, removed by `wicket exec` at the end), or into
    #: the profile for `wicket env` (None). A kind with one gets no listener
    #: from `wicket exec` and `wicket env`.
    client_setup: str | None = None

    def route(self) -> Any:
        """The cluster's strategy for this kind, imported on first use."""
        return _load(self.cluster_route)

    def local_route(self) -> Any:
        """The gateway's route factory for this kind, imported on first use."""
        return _load(self.gateway_route)

    def client_environment(self, resource: str, host: str, port: int, settings: dict[str, Any]) -> dict[str, str]:
        """The kind's client variables for a resource served on host:port."""
        return {} if self.client_env is None else _load(self.client_env)(resource, host, port, settings)

    def client_setup_function(self) -> Any:
        """The kind's ``client_setup``, imported on first use (None: none)."""
        return None if self.client_setup is None else _load(self.client_setup)


def _load(path: str) -> Any:
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)


TCP = Kind(
    name="tcp",
    summary="any TCP service, relayed byte for byte",
    alpn="wicket-tcp",
    proxy_verb="tcp",
    spec=NO_SETTINGS,
    cluster_route="gateway.cluster.dial:TCP",
    gateway_route="gateway.local.proxy:tcp_route",
)

POSTGRES = Kind(
    name="postgres",
    summary="PostgreSQL: no password on the client, the cluster logs in as the db user, statements audited",
    alpn="wicket-postgres",
    proxy_verb="db",
    spec=DATABASE,
    params=(DB_USER, DB_NAME),
    cluster_route="gateway.cluster.postgres:POSTGRES",
    gateway_route="gateway.local.pg:postgres_route",
    proxy_options=DATABASE_PROXY_OPTIONS,
    is_database=True,
    client_env="gateway.local.pg_client:client_env",
    client_file=ClientFile(verb="pg", default_path="~/.pg_service.conf",
                           summary="a pg_service.conf section: `psql service=NAME`",
                           render="gateway.local.pg_client:service_entry",
                           merge="gateway.local.client_files:merge_ini_section"),
)

MYSQL = Kind(
    name="mysql",
    summary="MySQL and MariaDB: no password on the client, the cluster logs in as the db user, commands audited",
    alpn="wicket-mysql",
    proxy_verb="db",
    spec=DATABASE,
    params=(DB_USER, DB_NAME, LOCAL_INFILE),
    cluster_route="gateway.cluster.mysql:MYSQL",
    gateway_route="gateway.local.mysql:mysql_route",
    proxy_options=DATABASE_PROXY_OPTIONS,
    is_database=True,
    client_env="gateway.local.mysql_client:client_env",
    client_file=ClientFile(verb="mysql", default_path="~/.my.cnf",
                           summary="a my.cnf group: `mysql --defaults-group-suffix=_NAME`",
                           render="gateway.local.mysql_client:option_group",
                           merge="gateway.local.client_files:merge_ini_section"),
)

MONGODB = Kind(
    name="mongodb",
    summary="MongoDB: drivers and mongosh without credentials, the cluster logs in, every command checked and audited",
    alpn="wicket-mongodb",
    proxy_verb="db",
    spec=DATABASE,
    params=(DB_USER, DB_NAME),
    cluster_route="gateway.cluster.mongodb:MONGODB",
    gateway_route="gateway.local.mongo:mongodb_route",
    proxy_options=(
        ProxyOption(name="db_user", help="Database user the cluster logs in as (default: your Wicket user name)."),
        ProxyOption(name="db_name", help="Keep every command to this database (default: any your roles allow)."),
        *DATABASE_PROXY_OPTIONS[2:],  # --local-tls, --local-tls-client-cert
    ),
    is_database=True,
    client_env="gateway.local.mongo_client:client_env",
)

SSH = Kind(
    name="ssh",
    summary="OpenSSH nodes: a short-lived SSH certificate from the cluster's SSH user CA, no key on the node",
    alpn="wicket-ssh",
    proxy_verb="ssh",
    spec=SSH_NODE,
    params=(LOGIN, AGENT_FORWARDING),
    cluster_route="gateway.cluster.ssh:SSH",
    gateway_route="gateway.local.ssh:ssh_route",
    proxy_options=(
        ProxyOption(name="stdio", is_flag=True,
                    help="Carry one SSH connection on standard input and output, NAME being LOGIN@NODE[:PORT]: "
                         "OpenSSH's ProxyCommand (see `wicket config ssh`)."),
        ProxyOption(name="fdpass", is_flag=True,
                    help="With --stdio: hand ssh a socket (ssh_config's ProxyUseFdpass yes) rather than relay "
                         "standard input and output: faster."),
        ProxyOption(name="authorized_keys", help="The public keys that may log in to the local SSH server "
                    "(default: ~/.ssh/*.pub and the ssh-agent's)."),
        ProxyOption(name="allow_no_auth", is_flag=True, help="Let every process of your own local user log in "
                    "to the local SSH server without a key (ssh's `none` method), this once; the profile's "
                    "setting: `wicket profile set ssh.allow_no_auth true`."),
        ProxyOption(name="write_known_hosts", help="Append the local SSH server's known_hosts line to this file."),
    ),
    client_setup="gateway.local.ssh_client:client_setup",
)

#: Every kind, by name. The one place a kind is plugged in.
KINDS: dict[str, Kind] = {kind.name: kind for kind in (TCP, POSTGRES, MYSQL, MONGODB, SSH)}


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


def proxy_verbs() -> dict[str, tuple[Kind, ...]]:
    """`wicket proxy` verbs and the kinds each serves: every kind's
    ``proxy_verb`` (database kinds share ``db``) and, where that differs,
    its own name (``wicket proxy postgres``)."""
    verbs: dict[str, list[Kind]] = {}
    for kind in KINDS.values():
        verbs.setdefault(kind.proxy_verb, []).append(kind)
        if kind.name != kind.proxy_verb:
            verbs.setdefault(kind.name, []).append(kind)
    return {verb: tuple(served) for verb, served in verbs.items()}


def client_files() -> dict[str, tuple[Kind, ClientFile]]:
    """`wicket config` verbs: the kinds whose clients have a file for it."""
    return {kind.client_file.verb: (kind, kind.client_file) for kind in KINDS.values() if kind.client_file}


def proxy_command(kind_name: str) -> str:
    """How a person opens a local port to a resource of this kind."""
    kind = KINDS.get(kind_name)
    return f"wicket proxy {kind.proxy_verb if kind else kind_name}"

"""The cluster's configuration file (TOML), parsed once into frozen objects.

Every error names the file, the key and what was expected. See
``config/cluster.toml`` for a commented example.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any, Mapping

import attrs

from gateway import kinds, printable
from gateway.addresses import parse_hostport
from gateway.cluster import resource_specs
from gateway.cluster.rbac import Role, RoleError
from gateway.durations import format_duration, parse_duration
from gateway.net.descriptors import default_reserve

#: The most worker processes a cluster runs (``[server] workers``).
MAX_WORKERS = 64

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class ConfigError(ValueError):
    pass


@attrs.frozen(slots=True, kw_only=True)
class ResourceSpec:
    name: str
    kind: str
    address: str
    labels: Mapping[str, str] = attrs.field(factory=dict)
    extra: Mapping[str, Any] = attrs.field(factory=dict)


@attrs.frozen(slots=True, kw_only=True)
class Limits:
    """``[limits]``: what one user or one connection may hold, and the
    descriptors kept back from sessions. None: derived from the open files
    limit at start (:meth:`resolve`)."""

    streams_per_connection: int | None = None
    streams_per_user: int | None = None
    reserve_fds: int | None = None

    KEYS = ("streams_per_connection", "streams_per_user", "reserve_fds")

    def resolve(self, open_files: int) -> "Limits":
        """Every limit as a number, for a process that may open
        ``open_files`` descriptors: the reserve is 1/8 of them (32 to
        1,024); one user's sessions 1/8 of the rest, one connection's half
        a user's, so no one user or gateway can take what others need."""
        reserve = self.reserve_fds if self.reserve_fds is not None else default_reserve(open_files)
        budget = max(0, open_files - reserve)
        per_user = self.streams_per_user if self.streams_per_user is not None else max(8, budget // 8)
        per_connection = self.streams_per_connection if self.streams_per_connection is not None else \
            min(per_user, max(8, per_user // 2))
        return Limits(streams_per_connection=per_connection, streams_per_user=per_user, reserve_fds=reserve)


@attrs.frozen(slots=True, kw_only=True)
class ClusterConfig:
    path: Path | None
    name: str
    state_dir: Path
    listen: tuple[str, int]
    public_names: tuple[str, ...]
    session_ttl: float
    max_session_ttl: float
    login_max_failures: int
    login_failure_window: float
    audit_jsonl: Path | None
    #: How long the store keeps audit events (None: for ever).
    audit_keep: float | None = None
    disconnect_expired_cert: bool
    limits: Limits = Limits()
    #: ``[server] workers``: cluster processes serving connections (see
    #: gateway/cluster/workers.py); 1 serves them in the one process.
    workers: int = 1
    roles: tuple[Role, ...]
    resources: tuple[ResourceSpec, ...]


def validate_name(what: str, name: str) -> str:
    if not NAME_RE.match(name):
        raise ValueError(
            f"{what} name {name!r} must be 1-63 characters of a-z, 0-9, '.', '_', '-', "
            f"starting with a letter or digit"
        )
    return name


def validate_resource(name: str, kind: str, address: str, spec: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Check a resource; return its normalized kind-specific settings."""
    validate_name("resource", name)
    host, port = parse_hostport(address)
    if port == 0:
        raise ValueError(f"resource {name!r}: address needs a port other than 0")
    try:
        return kinds.get(kind).spec.check(spec or {})
    except (kinds.UnknownKind, resource_specs.SpecError) as exc:
        raise ValueError(f"resource {name!r}: {exc}") from None


def load(path: Path) -> ClusterConfig:
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file (see config/cluster.toml for an example)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    return from_dict(raw, path=path)


def from_dict(raw: Mapping[str, Any], *, path: Path | None = None) -> ClusterConfig:
    where = str(path) if path else "<config>"

    def fail(key: str, msg: str) -> ConfigError:
        return ConfigError(f"{where}: {key}: {msg}")

    unknown = set(raw) - {"cluster", "server", "login", "audit", "limits", "roles", "resources"}
    if unknown:
        raise fail(", ".join(sorted(unknown)),
                   "unknown section (expected cluster, server, login, audit, limits, roles, resources)")
    c = raw.get("cluster", {})
    if not isinstance(c, Mapping):
        raise fail("cluster", "must be a table")
    known = {"name", "state_dir", "listen", "public_names", "session_ttl", "max_session_ttl",
             "audit_jsonl", "disconnect_expired_cert"}
    if set(c) - known:
        raise fail("cluster." + sorted(set(c) - known)[0], f"unknown key (expected {', '.join(sorted(known))})")

    def get_str(key: str, default: str | None) -> str:
        v = c.get(key, default)
        if not isinstance(v, str) or not v:
            raise fail(f"cluster.{key}", "expected a non-empty string")
        return v

    def get_duration(table: Mapping[str, Any], key: str, default: str, prefix: str) -> float:
        try:
            v = parse_duration(table.get(key, default))
        except (ValueError, TypeError) as exc:
            raise fail(f"{prefix}.{key}", str(exc)) from None
        if v <= 0:
            raise fail(f"{prefix}.{key}", "must be positive")
        return v

    name = get_str("name", "wicket")
    try:
        validate_name("cluster", name)
    except ValueError as exc:
        raise fail("cluster.name", str(exc)) from None
    if "state_dir" not in c:
        raise fail("cluster.state_dir", "required: the directory for the store and the CAs")
    state_dir = Path(get_str("state_dir", None)).expanduser()
    if path is not None and not state_dir.is_absolute():
        state_dir = (path.parent / state_dir).resolve()
    try:
        listen = parse_hostport(get_str("listen", "127.0.0.1:3025"))
    except ValueError as exc:
        raise fail("cluster.listen", str(exc)) from None
    names = c.get("public_names", ["localhost", "127.0.0.1"])
    if not isinstance(names, list) or not names or not all(isinstance(n, str) and n for n in names):
        raise fail("cluster.public_names", "expected a non-empty list of host names or IP addresses")
    session_ttl = get_duration(c, "session_ttl", "8h", "cluster")
    max_ttl = get_duration(c, "max_session_ttl", "30h", "cluster")
    if session_ttl > max_ttl:
        raise fail("cluster.session_ttl", "is longer than cluster.max_session_ttl")
    audit = c.get("audit_jsonl", "audit.jsonl")
    if not isinstance(audit, str):
        raise fail("cluster.audit_jsonl", 'expected a path, or "" to write the audit log only to the store')
    audit_path = None if audit == "" else (state_dir / audit if not Path(audit).is_absolute() else Path(audit))
    dec = c.get("disconnect_expired_cert", True)
    if not isinstance(dec, bool):
        raise fail("cluster.disconnect_expired_cert", "expected true or false")

    login = raw.get("login", {})
    if not isinstance(login, Mapping) or set(login) - {"max_failures", "failure_window"}:
        raise fail("login", "expected a table with max_failures and failure_window")
    max_failures = login.get("max_failures", 5)
    if not isinstance(max_failures, int) or isinstance(max_failures, bool) or max_failures < 1:
        raise fail("login.max_failures", "expected a positive integer")
    window = get_duration(login, "failure_window", "5m", "login")

    audit_table = raw.get("audit", {})
    if not isinstance(audit_table, Mapping) or set(audit_table) - {"keep"}:
        raise fail("audit", 'expected a table with keep (e.g. keep = "90d")')
    keep = None if "keep" not in audit_table else get_duration(audit_table, "keep", "", "audit")
    if keep is not None and keep < window:
        # The login limit counts recent failures in the store's audit.
        raise fail("audit.keep", f"must be at least login.failure_window ({format_duration(window)}): "
                                 "the login limit counts the failures it keeps")

    limits_table = raw.get("limits", {})
    if not isinstance(limits_table, Mapping) or set(limits_table) - set(Limits.KEYS):
        raise fail("limits", f"expected a table with {', '.join(Limits.KEYS)}")
    for key, value in limits_table.items():
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 10_000_000:
            raise fail(f"limits.{key}", "expected a positive integer")
    limits = Limits(**limits_table)

    server = raw.get("server", {})
    if not isinstance(server, Mapping) or set(server) - {"workers"}:
        raise fail("server", "expected a table with workers")
    workers = server.get("workers", 1)
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= MAX_WORKERS:
        raise fail("server.workers", f"expected a whole number of processes from 1 to {MAX_WORKERS}")

    roles_raw = raw.get("roles", {})
    if not isinstance(roles_raw, Mapping):
        raise fail("roles", "must be a table of role tables")
    roles = []
    for rname, spec in roles_raw.items():
        try:
            validate_name("role", rname)
            roles.append(Role.from_spec(rname, spec))
        except (RoleError, ValueError) as exc:
            raise fail(f"roles.{rname}", str(exc)) from None

    res_raw = raw.get("resources", {})
    if not isinstance(res_raw, Mapping):
        raise fail("resources", "must be a table of resource tables")
    resources = []
    for rname, spec in res_raw.items():
        if not isinstance(spec, Mapping):
            raise fail(f"resources.{rname}", "must be a table")
        kind, address = spec.get("kind", "tcp"), spec.get("address")
        labels = spec.get("labels", {})
        if not isinstance(address, str):
            raise fail(f"resources.{rname}.address", "required: HOST:PORT of the upstream")
        if not isinstance(labels, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise fail(f"resources.{rname}.labels", "expected a table of string = string")
        for key, value in labels.items():
            if not printable.is_clean(value):
                raise fail(f"resources.{rname}.labels.{key}",
                           f"contains a control character ({printable.first_unsafe(value)}); use printable text")
        extra = {k: v for k, v in spec.items() if k not in ("kind", "address", "labels")}
        try:
            extra = validate_resource(rname, kind, address, extra)
        except ValueError as exc:
            raise fail(f"resources.{rname}", str(exc)) from None
        resources.append(ResourceSpec(name=rname, kind=kind, address=address, labels=dict(labels), extra=extra))

    return ClusterConfig(
        path=path,
        name=name,
        state_dir=state_dir,
        listen=listen,
        public_names=tuple(names),
        session_ttl=session_ttl,
        max_session_ttl=max_ttl,
        login_max_failures=max_failures,
        login_failure_window=window,
        audit_jsonl=audit_path,
        audit_keep=keep,
        disconnect_expired_cert=dec,
        limits=limits,
        workers=workers,
        roles=tuple(roles),
        resources=tuple(resources),
    )

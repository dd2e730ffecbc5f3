"""`wicket agent`'s configuration: a TOML file (config/agent.toml is the
commented example), every key of which is also a `wicket agent` flag and a
``WICKET_AGENT_...`` environment variable.

Precedence, highest first: the command line, the environment, the file,
the defaults. The CLI passes what the first two gave as ``overrides``
(None where neither did); :func:`load` parses the file once into the
frozen :class:`AgentConfig`, with errors that name the file, the key and
what was expected.
"""

from __future__ import annotations

import ipaddress
import tomllib
from pathlib import Path
from typing import Any

import attrs

from gateway.addresses import parse_hostport
from gateway.durations import parse_duration
from gateway.local.proxy import parse_unix_mode


class AgentConfigError(ValueError):
    pass


@attrs.frozen(slots=True, kw_only=True)
class ResourceConfig:
    """A resource the agent serves: its name, a fixed local port (0: the
    one remembered in the profile) and its kind's proxy options."""

    name: str
    port: int = 0
    options: dict[str, Any] = attrs.field(factory=dict)
    #: Listen on this unix socket instead of a TCP port: the path, or a
    #: directory for PostgreSQL's ``.s.PGSQL.<port>`` (port, else 5432).
    unix_socket: Path | None = None
    unix_socket_mode: int = 0o600


@attrs.frozen(slots=True, kw_only=True)
class AgentConfig:
    #: The profile directory (None: $WICKET_HOME or ~/.wicket).
    profile: Path | None = None
    #: Join as a bot with this token file when the profile holds no valid
    #: bot certificate; cluster and ca_pin say where.
    token_file: Path | None = None
    cluster: str | None = None
    ca_pin: str | None = None
    bind: str = "127.0.0.1"
    allow_uids: tuple[int, ...] = ()
    #: The admin endpoints' address (loopback only): /livez, /readyz ...
    admin: str = "127.0.0.1:9464"
    quitquitquit: bool = False
    wait_for_cluster: float = 10.0
    #: Local clients each resource serves at once (None: the open files
    #: limit less a reserve); more are refused in their own protocol.
    max_connections: int | None = None
    min_sigterm_delay: float = 0.0
    max_sigterm_delay: float = 30.0
    exit_zero: bool = False
    log_format: str = "text"
    #: Dial every resource at start (the cluster connects to its upstream)
    #: and stop with exit code 1, saying why, if any cannot be reached.
    check_upstreams: bool = False
    #: Empty: every resource the identity may reach.
    resources: tuple[ResourceConfig, ...] = ()


#: file section -> keys, and the flag each key is (the key with - for _).
SECTIONS = {
    "identity": ("profile", "token_file", "cluster", "ca_pin"),
    "listen": ("bind", "allow_uids"),
    "admin": ("admin", "quitquitquit"),
    "limits": ("wait_for_cluster", "max_connections"),
    "shutdown": ("min_sigterm_delay", "max_sigterm_delay", "exit_zero"),
    "log": ("log_format",),
    "startup": ("check_upstreams",),
}
_DURATIONS = {"wait_for_cluster", "min_sigterm_delay", "max_sigterm_delay"}
_PATHS = {"profile", "token_file"}
_FLAGS = {"quitquitquit", "exit_zero", "check_upstreams"}
#: A [[resources]] table's own keys; the others are its kind's options.
_RESOURCE_KEYS = ("name", "port", "unix_socket", "unix_socket_mode")


def _fail(source: str, key: str, expected: str) -> AgentConfigError:
    return AgentConfigError(f"{source}: {key}: expected {expected}")


def _value(source: str, key: str, value: Any) -> Any:
    if key in _DURATIONS:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            seconds = float(value)
        else:
            try:
                seconds = parse_duration(str(value))
            except ValueError:
                raise _fail(source, key, "a duration such as 30s or 2m") from None
        if not 0 <= seconds <= 3600:
            raise _fail(source, key, "a duration of at most an hour")
        return seconds
    if key in _PATHS:
        return Path(str(value)).expanduser()
    if key in _FLAGS:
        if not isinstance(value, bool):
            raise _fail(source, key, "true or false")
        return value
    if key == "max_connections":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise _fail(source, key, "a number of connections, at least 1")
        return value
    if key == "allow_uids":
        if not isinstance(value, (list, tuple)) or not all(isinstance(u, int) and u >= 0 for u in value):
            raise _fail(source, key, "a list of uids")
        return tuple(value)
    if key == "log_format":
        if value not in ("text", "json"):
            raise _fail(source, key, '"text" or "json"')
        return value
    if not isinstance(value, str):
        raise _fail(source, key, "a string")
    if key == "admin":
        try:
            host, _port = parse_hostport(value)
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            raise _fail(source, key, "HOST:PORT") from None
        if not loopback:
            raise _fail(source, key, "a loopback address (the admin endpoints can stop the agent)")
    if key == "cluster":
        try:
            parse_hostport(value)
        except ValueError:
            raise _fail(source, key, "HOST:PORT") from None
    return value


def _resources(source: str, items: Any) -> tuple[ResourceConfig, ...]:
    if not isinstance(items, list):
        raise _fail(source, "resources", "an array of tables ([[resources]])")
    out, seen = [], set()
    for i, item in enumerate(items):
        where = f"resources[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise _fail(source, where, "a table with a name")
        name = item["name"]
        if name in seen:
            raise _fail(source, where, f"one entry per resource ({name} is named twice)")
        seen.add(name)
        port = item.get("port", 0)
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise _fail(source, f"{where}.port", "a port number")
        unix_socket = item.get("unix_socket")
        if unix_socket is not None and (not isinstance(unix_socket, str) or not unix_socket.startswith(("/", "~"))):
            raise _fail(source, f"{where}.unix_socket", "an absolute path (a socket's, or a directory)")
        try:
            mode = parse_unix_mode(item.get("unix_socket_mode", 0o600))
        except ValueError as exc:
            raise _fail(source, f"{where}.unix_socket_mode", str(exc)) from None
        if "unix_socket_mode" in item and unix_socket is None:
            raise _fail(source, f"{where}.unix_socket_mode", "a unix_socket beside it")
        options = {k: v for k, v in item.items() if k not in _RESOURCE_KEYS}
        for key, value in options.items():
            if not isinstance(value, (str, bool)):
                raise _fail(source, f"{where}.{key}", "a string or true/false")
        out.append(ResourceConfig(name=name, port=port, options=options, unix_socket_mode=mode,
                                  unix_socket=None if unix_socket is None else Path(unix_socket).expanduser()))
    return tuple(out)


def parse_resource_flag(text: str) -> ResourceConfig:
    """``--resource NAME``, ``NAME=PORT`` or ``NAME=/PATH`` (a unix socket,
    mode 0600; its own path, or a directory for PostgreSQL's)."""
    name, sep, where = text.partition("=")
    if name and sep and where.startswith("/"):
        return ResourceConfig(name=name, unix_socket=Path(where))
    if not name or (sep and (not where.isdigit() or not 0 < int(where) < 65536)):
        raise AgentConfigError(f"--resource {text!r}: expected NAME, NAME=PORT or NAME=/PATH (a unix socket)")
    return ResourceConfig(name=name, port=int(where) if sep else 0)


def load(path: Path | None, overrides: dict[str, Any]) -> AgentConfig:
    """The file at ``path`` (if any) under ``overrides`` (flags and
    environment; None values are not given)."""
    values: dict[str, Any] = {}
    if path is not None:
        source = str(path)
        try:
            doc = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise AgentConfigError(f"{source}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise AgentConfigError(f"{source}: cannot read it ({exc})") from None
        except tomllib.TOMLDecodeError as exc:
            raise AgentConfigError(f"{source}: not valid TOML ({exc})") from None
        for section, table in doc.items():
            if section == "resources":
                values["resources"] = _resources(source, table)
                continue
            if section not in SECTIONS:
                raise AgentConfigError(f"{source}: unknown section [{section}] (known: "
                                       f"{', '.join([*SECTIONS, 'resources'])})")
            if not isinstance(table, dict):
                raise _fail(source, section, "a table")
            for key, value in table.items():
                if key not in SECTIONS[section]:
                    raise AgentConfigError(f"{source}: [{section}] has no key {key!r} (known: "
                                           f"{', '.join(SECTIONS[section])})")
                values[key] = _value(f"{source}: [{section}]", key, value)
    for key, value in overrides.items():
        if value is None or value == ():
            continue
        if key == "resources":
            values["resources"] = tuple(parse_resource_flag(v) for v in value)
        else:
            values[key] = _value(f"--{key.replace('_', '-')}", key, value)
    config = AgentConfig(**values)
    if config.token_file is not None and (not config.cluster or not config.ca_pin):
        raise AgentConfigError("joining with token_file needs cluster (HOST:PORT) and ca_pin (sha256:...)")
    if config.max_sigterm_delay < config.min_sigterm_delay:
        raise AgentConfigError("max_sigterm_delay must be at least min_sigterm_delay")
    return config

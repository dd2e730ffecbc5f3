"""Run-time settings a client passes when it connects, checked against an
allowlist.

Theory of operation
-------------------
A PostgreSQL client may set run-time settings (GUCs) in its StartupMessage
in two ways, and the server applies both before the session starts
(``process_startup_options`` in src/backend/utils/init/postinit.c):

* each as a start-up parameter of its own: any name other than ``user``,
  ``database``, ``options``, ``replication`` and ``_pq_.*`` is a setting
  (libpq sends ``application_name`` and ``client_encoding`` this way, JDBC
  ``DateStyle``, ``TimeZone`` and ``extra_float_digits``);
* inside ``options``, a command line for the backend (libpq's ``options``
  connection parameter, ``PGOPTIONS``): ``pg_split_opts`` splits it at
  ASCII whitespace, a backslash taking the next character literally, and
  ``process_postgres_switches`` reads the words with getopt, where
  ``-c NAME=VALUE``, ``-cNAME=VALUE`` and ``--NAME=VALUE`` set a setting
  (``ParseLongOption``: the name ends at the first ``=``, and a ``-`` in it
  means ``_``) and other switches (``-B``, ``-d``, ``-E``...) mean other
  things.

A client could set anything a superuser's command line can: settings that
only take effect at connection start (``local_preload_libraries``,
``ignore_system_indexes``), ones that hide what a session does from the
server's log (``log_statement``, ``log_disconnections``, for a db user that
may set them), ``role``. So only :data:`ALLOWED_SETTINGS` pass: settings
any user may change in their own session with ``SET``, which shape how the
session talks and how long it waits, and grant nothing. Names compare as
PostgreSQL compares setting names: ASCII letters without regard to case.

``options`` is parsed here strictly, accepting only settings, and
:func:`session_parameters` forwards it rebuilt from what was checked
(:func:`format_options`), never as the client wrote it, so the server
cannot read into it anything the check did not see.

Everything here raises :class:`~protocols.errors.RemoteProtocolError` (the
client sent it) with ``wire_hint`` the SQLSTATE to answer with: 42501
(insufficient_privilege) for a setting or switch that is not allowed, as
PostgreSQL answers a user who may not set a parameter ("permission denied
to set parameter"); 42601 (syntax_error) for ``options`` the server could
not read either, as PostgreSQL answers ``-c name`` without a value.
Messages name the setting, never its value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Final

import attrs

from protocols.errors import ErrorCode, RemoteProtocolError
from protocols.postgres import SqlState

__all__ = [
    "ALLOWED_SETTINGS", "NOT_SETTINGS", "Setting", "format_options", "parse_options",
    "session_parameters", "setting_allowed", "split_options",
]

#: Settings a client may pass at connection start, in lower case. Each is one
#: any user may ``SET`` in their own session (context "user" in
#: pg_settings), which grants nothing and ends with the session. Adding one
#: is a security decision: it must be as harmless (and docs/wire.md, which
#: lists them for users, changes with it).
ALLOWED_SETTINGS: Final = frozenset({
    # Who is talking, in which encoding, and which messages it wants.
    "application_name", "client_encoding", "client_min_messages",
    # How values are written and read.
    "datestyle", "intervalstyle", "timezone", "extra_float_digits", "bytea_output",
    "lc_monetary", "lc_numeric", "lc_time", "xmlbinary", "xmloption", "default_text_search_config",
    # Where names are looked up, and how long statements may wait or run.
    "search_path", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
    "idle_session_timeout",
    # Transactions' defaults.
    "default_transaction_isolation", "default_transaction_read_only", "default_transaction_deferrable",
    # Memory the session's own sorts and maintenance may use.
    "work_mem", "maintenance_work_mem",
})

#: Start-up parameters that are not settings: the caller deals with them.
NOT_SETTINGS: Final = frozenset({"user", "database", "options", "replication"})
_PROTOCOL_OPTION_PREFIX: Final = "_pq_."

#: pg_split_opts splits at what isspace() calls space; for the bytes of
#: UTF-8 (and of the single-byte encodings glibc knows), that is these.
_SPACE: Final = frozenset(" \t\n\v\f\r")
#: Longest name quoted back in an error (a name is the client's input).
_MAX_QUOTED: Final = 64
_SYNTAX_ERROR: Final = "42601"

_WHAT_TO_DO: Final = (
    "remove it from PGOPTIONS (libpq's options) or from the connection parameters; "
    "a client may set only per-session settings such as search_path, statement_timeout and "
    "application_name when it connects, and may SET others after connecting where the server allows it"
)


def _check_name(_inst: object, _attr: object, value: str) -> None:
    if not value or "=" in value or "\x00" in value:
        raise ValueError(f"a setting's name must be non-empty, without '=' or NUL: {_quote(value)}")


def _check_value(_inst: object, _attr: object, value: str) -> None:
    if "\x00" in value:
        raise ValueError("a setting's value must not contain NUL")


@attrs.frozen(kw_only=True, slots=True)
class Setting:
    """One ``-c NAME=VALUE`` of ``options``, the name as the server reads it
    (a ``-`` already turned into ``_``)."""

    name: str = attrs.field(validator=[attrs.validators.instance_of(str), _check_name])
    value: str = attrs.field(validator=[attrs.validators.instance_of(str), _check_value])


def _quote(name: str) -> str:
    """``name`` for a message: quoted, control characters escaped, cut."""
    shown = name if len(name) <= _MAX_QUOTED else name[:_MAX_QUOTED] + "..."
    return '"' + shown.encode("unicode_escape").decode("ascii").replace('"', '\\"') + '"'


def _syntax(message: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"cannot read the options start-up parameter: {message}",
                               code=ErrorCode.BAD_REQUEST, wire_hint=_SYNTAX_ERROR)


def _not_allowed(what: str) -> RemoteProtocolError:
    return RemoteProtocolError(f"{what} is not allowed when connecting through Wicket: {_WHAT_TO_DO}",
                               code=ErrorCode.ACCESS_DENIED, wire_hint=SqlState.INSUFFICIENT_PRIVILEGE)


def setting_allowed(name: str) -> bool:
    """Whether a client may set ``name`` at connection start (compared as
    PostgreSQL compares setting names: ASCII, case-insensitive)."""
    return name.isascii() and name.lower() in ALLOWED_SETTINGS


def split_options(text: str) -> list[str]:
    """The words of ``options``, as pg_split_opts makes them: split at
    whitespace; a backslash takes the next character, whitespace or
    backslash included, as it is (and a backslash at the end goes)."""
    words: list[str] = []
    word: list[str] = []
    in_word = escaped = False
    for ch in text:
        if escaped:
            word.append(ch)
            escaped = False
        elif ch == "\\":
            in_word = escaped = True
        elif ch in _SPACE:
            if in_word:
                words.append("".join(word))
                word.clear()
                in_word = False
        else:
            word.append(ch)
            in_word = True
    if in_word:
        words.append("".join(word))
    return words


def _long_option(arg: str, switch: str) -> Setting:
    """ParseLongOption: NAME=VALUE, a ``-`` in NAME read as ``_``."""
    name, eq, value = arg.partition("=")
    if not eq:
        raise _syntax(f"{switch} {_quote(arg)} needs a value ({switch} NAME=VALUE)")
    if not name:
        raise _syntax(f"{switch} needs a setting's name before '='")
    return Setting(name=name.replace("-", "_"), value=value)


def parse_options(text: str) -> tuple[Setting, ...]:
    """The settings in ``options``. Accepts only ``-c NAME=VALUE``,
    ``-cNAME=VALUE`` and ``--NAME=VALUE``; another switch is refused (42501),
    anything the server could not read either is a syntax error (42601).
    Does not check the names (:func:`setting_allowed` does)."""
    if "\x00" in text:
        raise _syntax("it contains NUL")
    words = iter(split_options(text))
    settings = []
    for word in words:
        if word.startswith("--"):
            if word == "--":
                raise _syntax("a bare '--' sets nothing")
            settings.append(_long_option(word[2:], "--"))
        elif word.startswith("-") and len(word) > 1:
            switch, attached = word[1], word[2:]
            if switch != "c":
                raise _not_allowed(f"the {_quote('-' + switch)} switch in the options start-up parameter")
            # getopt: the argument is the rest of the word, else the next word.
            arg = attached or next(words, None)
            if arg is None:
                raise _syntax("-c at the end needs NAME=VALUE after it")
            settings.append(_long_option(arg, "-c"))
        else:
            raise _syntax(f"{_quote(word)} is not a switch (-c NAME=VALUE sets a setting)")
    return tuple(settings)


def _escape(word: str) -> str:
    return "".join("\\" + ch if ch in _SPACE or ch == "\\" else ch for ch in word)


def format_options(settings: Iterable[Setting]) -> str:
    """``options`` that the server reads as exactly ``settings``
    (the inverse of :func:`parse_options`)."""
    return " ".join(f"-c {_escape(s.name)}={_escape(s.value)}" for s in settings)


def session_parameters(parameters: Mapping[str, str]) -> dict[str, str]:
    """The start-up parameters to pass on for the settings in
    ``parameters`` (a StartupMessage's), after checking each against
    :data:`ALLOWED_SETTINGS`: every setting parameter as it came, and
    ``options`` rebuilt from the settings read in it (left out if it has
    none). The rest is the caller's business and not returned: ``user``,
    ``database``, ``replication``, ``_pq_.*`` protocol options.

    Raises RemoteProtocolError (42501) naming the first setting that is not
    allowed, or (42601) if ``options`` cannot be read.
    """
    out: dict[str, str] = {}
    for name, value in parameters.items():
        if name in NOT_SETTINGS or name.startswith(_PROTOCOL_OPTION_PREFIX):
            continue
        if not setting_allowed(name):
            raise _not_allowed(f"setting {_quote(name)}")
        out[name] = value
    options = parameters.get("options")
    if options is not None:
        settings = parse_options(options)
        for s in settings:
            if not setting_allowed(s.name):
                raise _not_allowed(f"setting {_quote(s.name)} in the options start-up parameter")
        if settings:
            out["options"] = format_options(settings)
    return out

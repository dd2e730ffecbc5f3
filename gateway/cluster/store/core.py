"""The store's core: the SQLite connection, its schema and migrations, and the
argument checks every part shares (the records are in ``records``). The methods by
job are in the sibling modules; :class:`gateway.cluster.store.Store` joins them.

Theory of operation
-------------------
One SQLite file in the cluster's state directory, opened by the server and,
at the same time, by ``wicket-cluster`` CLI commands. So:

* WAL journal: readers never block the writer and vice versa; with
  ``synchronous=NORMAL`` a commit is an append to the WAL (durable across a
  process crash; the last commits may be lost on power loss, which is the
  usual trade for a WAL store).
* ``busy_timeout`` of 5 s: when both processes write at once, one waits
  instead of failing. Every write opens with ``BEGIN IMMEDIATE`` so the write
  lock is taken up front; a read-then-upgrade transaction could instead fail
  with SQLITE_BUSY without waiting at all.
* The API is synchronous. The async server calls it on a thread of its
  own, one call at a time (gateway/cluster/storethread.py); the single
  connection is opened with ``check_same_thread=False`` and every method holds
  an internal lock, so the object is also safe from several threads.
* Transactions are explicit (the connection is in autocommit mode), so
  Python's sqlite3 module never opens or commits one behind our back.

The file holds password hashes and TOTP secrets, so it is created 0600 and an
existing file readable by others is refused (as the CA keys are). SQLite
creates ``-wal`` and ``-shm`` with the mode of the database file. No umask is
touched: it is process-wide, and other threads may be creating files.

Schema changes are :data:`MIGRATIONS`, applied in order inside one
transaction when the file is opened; the version is ``PRAGMA user_version``.

Change detection. The server caches locks, roles, resources, users and
revocations and must notice a lock written by the CLI within about two
seconds. It polls :meth:`Store.change_counter` every half second: a counter
in the ``meta`` table that triggers bump on every write to those tables,
whichever process made it. Triggers rather than code, so no write path can forget.
(Audit writes and TOTP step updates do not bump it: they happen at every
login and would make every poller reload.) Read the counter *before*
reloading: a change that lands in between is then just picked up again on the
next tick. :meth:`Store.data_version` is SQLite's even cheaper "did another
connection commit anything" number, useful as a pre-check.

The store never sees a plaintext password: it takes encoded hashes only, and
refuses a value that does not look like one. Secrets stay out of reprs and
error messages.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import sqlite3
import stat
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, Self


from gateway import printable

log = logging.getLogger(__name__)

Source = Literal["config", "cli"]
_SOURCES = ("config", "cli")

_BUSY_TIMEOUT_S = 5.0
_PRUNE_BATCH = 10_000
_MAX_QUERY_LIMIT = 100_000
_MAX_AUDIT_FIELDS_BYTES = 256 * 1024
_MAX_TEXT = 1024


# --- errors --------------------------------------------------------------------


class StoreError(Exception):
    """The store cannot do what was asked (I/O, corruption, concurrency)."""


class AlreadyExists(StoreError):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} already exists")
        self.kind = kind
        self.name = name


class NotFound(StoreError):
    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"{kind} {name!r} does not exist")
        self.kind = kind
        self.name = name


class SchemaTooNew(StoreError):
    def __init__(self, path: Path, found: int, known: int) -> None:
        super().__init__(
            f"{path} has schema version {found}, but this wicket knows only up to "
            f"version {known}: upgrade wicket (a newer version wrote this file)"
        )
        self.path = path
        self.found = found
        self.known = known


# --- validation ----------------------------------------------------------------

# Names of users, roles and resources. Starting with a letter or digit keeps
# '.', '..' and '-flag' look-alikes out (names end up in paths and CLI args).
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}", re.ASCII)
_KIND_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}", re.ASCII)
_LABEL_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,62}", re.ASCII)
_EVENT_RE = re.compile(r"[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)*", re.ASCII)
_EVENT_PREFIX_RE = re.compile(r"[a-z0-9_.]*", re.ASCII)
_FIELD_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}", re.ASCII)
_ADDRESS_RE = re.compile(
    r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})", re.ASCII
)


def validate_name(kind: str, value: object) -> str:
    """Return *value* if it is a valid user/role/resource name, else raise ValueError.

    1 to 64 characters of ``[a-z0-9._-]``, starting with a letter or digit.
    """
    if not isinstance(value, str) or _NAME_RE.fullmatch(value) is None:
        raise ValueError(
            f"invalid {kind} name {value!r}: use 1-64 characters of a-z 0-9 . _ - "
            "starting with a letter or digit"
        )
    return value


def _check_text(what: str, value: object, *, max_len: int = _MAX_TEXT, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be str, not {type(value).__name__}")
    if len(value) > max_len or (not value and not empty):
        raise ValueError(f"{what} must be {0 if empty else 1} to {max_len} characters")
    return value


def _check_time(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite epoch time in seconds")
    return float(value)


def _now(now: float | None) -> float:
    return time.time() if now is None else _check_time("now", now)


def _check_source(value: object) -> str:
    if value not in _SOURCES:
        raise ValueError(f"source must be 'config' or 'cli', not {value!r}")
    return value  # type: ignore[return-value]


def _check_roles(roles: Iterable[str]) -> tuple[str, ...]:
    if isinstance(roles, str):  # a lone string would iterate into letters
        raise TypeError("roles must be a list of role names, not a string")
    out = tuple(validate_name("role", r) for r in roles)
    if len(set(out)) != len(out):
        raise ValueError("roles must not repeat")
    return out


def _check_password_hash(value: object) -> str:
    # A guard against a caller passing the password itself: never echo it.
    if not isinstance(value, str) or not value.startswith("$argon2id$") or len(value) > 512:
        raise ValueError(
            "password_hash must be an encoded Argon2id hash (see passwords.hash_password)"
        )
    return value


def _check_totp_secret(value: object) -> bytes | None:
    if value is None:
        return None
    if not isinstance(value, bytes) or not 16 <= len(value) <= 64:
        raise ValueError("totp_secret must be 16 to 64 bytes")
    return value


def _json_default(value: object) -> object:
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dumps(value: object) -> str:
    # Canonical form (sorted, compact) so equal content is equal text: the
    # put_* upserts compare text to skip no-op writes.
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
        allow_nan=False, default=_json_default,
    )


def _audit_json_default(value: object) -> object:
    # An audit event is worth more than strict typing: an odd value (a Path,
    # an enum, a datetime) is recorded as its str() rather than lost.
    return dict(value) if isinstance(value, Mapping) else str(value)


# Built once: json.dumps with any option builds a new encoder per call.
_AUDIT_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                               default=_audit_json_default)


def _freeze_spec(value: Mapping[str, Any]) -> Mapping[str, Any]:
    """A read-only private copy of a JSON object (errors early if not JSON)."""
    if not isinstance(value, Mapping):
        raise TypeError(f"spec must be a mapping, not {type(value).__name__}")
    try:
        copy = json.loads(_dumps(value))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"spec must be JSON-serialisable: {exc}") from None
    return MappingProxyType(copy)


def _freeze_labels(value: Mapping[str, str]) -> Mapping[str, str]:
    if not isinstance(value, Mapping):
        raise TypeError(f"labels must be a mapping, not {type(value).__name__}")
    for key, val in value.items():
        if not isinstance(key, str) or _LABEL_KEY_RE.fullmatch(key) is None:
            raise ValueError(f"invalid label key {key!r}: 1-63 characters of A-Z a-z 0-9 . _ / -")
        if not isinstance(val, str) or len(val) > 256:
            raise ValueError(f"label {key!r} must have a string value of at most 256 characters")
        if not printable.is_clean(val):
            raise ValueError(f"label {key!r}: the value contains a control character "
                             f"({printable.first_unsafe(val)}); use printable text")
    return MappingProxyType(dict(value))


def _check_address(_inst: object, _attr: object, value: object) -> None:
    match = _ADDRESS_RE.fullmatch(value) if isinstance(value, str) else None
    if match is None or not 1 <= int(match["port"]) <= 65535:
        raise ValueError(f"invalid address {value!r}: expected host:port or [ipv6]:port")


# --- schema --------------------------------------------------------------------

_JSON_OBJECT = "CHECK (json_valid({col}) AND json_type({col}) = 'object')"


def _counter_triggers(table: str, update_of: str | None = None) -> tuple[str, ...]:
    bump = "UPDATE meta SET value = value + 1 WHERE key = 'change_counter';"
    update = f"UPDATE OF {update_of}" if update_of else "UPDATE"
    return tuple(
        f"CREATE TRIGGER {table}_{name}_bump AFTER {op} ON {table} BEGIN {bump} END"
        for name, op in (("insert", "INSERT"), ("update", update), ("delete", "DELETE"))
    )


# MIGRATIONS[i] takes the schema from version i to i + 1. Append-only: a
# released migration is never edited, or existing files and new ones diverge.
MIGRATIONS: list[tuple[str, ...]] = [
    (
        "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value INTEGER NOT NULL)",
        "INSERT INTO meta (key, value) VALUES ('change_counter', 0)",
        """CREATE TABLE users (
            name           TEXT PRIMARY KEY NOT NULL,
            password_hash  TEXT NOT NULL,
            totp_secret    BLOB,
            totp_last_step INTEGER,
            roles          TEXT NOT NULL DEFAULT '[]'
                           CHECK (json_valid(roles) AND json_type(roles) = 'array'),
            created_at     REAL NOT NULL
        )""",
        f"""CREATE TABLE roles (
            name       TEXT PRIMARY KEY NOT NULL,
            spec       TEXT NOT NULL {_JSON_OBJECT.format(col="spec")},
            source     TEXT NOT NULL CHECK (source IN ('config', 'cli')),
            updated_at REAL NOT NULL
        )""",
        f"""CREATE TABLE resources (
            name       TEXT PRIMARY KEY NOT NULL,
            kind       TEXT NOT NULL,
            address    TEXT NOT NULL,
            labels     TEXT NOT NULL {_JSON_OBJECT.format(col="labels")},
            spec       TEXT NOT NULL {_JSON_OBJECT.format(col="spec")},
            source     TEXT NOT NULL CHECK (source IN ('config', 'cli')),
            updated_at REAL NOT NULL
        )""",
        # No foreign key to users: a lock may name an identity that has no
        # local password row (a bot, a future SSO user), and it must survive
        # the user being deleted and re-created.
        """CREATE TABLE locks (
            user_name  TEXT PRIMARY KEY NOT NULL,
            reason     TEXT NOT NULL,
            created_by TEXT NOT NULL,
            created_at REAL NOT NULL
        )""",
        # AUTOINCREMENT: ids are never reused after pruning, so a reader
        # tailing by id never sees an old id come back with a new event.
        f"""CREATE TABLE audit (
            id        INTEGER PRIMARY KEY AUTOINCREMENT,
            time      REAL NOT NULL,
            event     TEXT NOT NULL,
            user_name TEXT,
            fields    TEXT NOT NULL DEFAULT '{{}}' {_JSON_OBJECT.format(col="fields")}
        )""",
        "CREATE INDEX audit_time ON audit (time)",
        "CREATE INDEX audit_user_time ON audit (user_name, time)",
        "CREATE INDEX audit_event_time ON audit (event, time)",
        # The login rate limiter counts recent failures per client host (the
        # address without the port, which changes with every connection).
        "CREATE INDEX audit_event_client_host_time"
        " ON audit (event, json_extract(fields, '$.client_host'), time)",
        # totp_last_step moves at every TOTP login and is not cached: excluded.
        *_counter_triggers("users", "name, password_hash, totp_secret, roles"),
        *_counter_triggers("roles"),
        *_counter_triggers("resources"),
        *_counter_triggers("locks"),
    ),
    (
        # Revocation. A row per user who ever had certificates revoked at
        # once (a lock, a new password, a removal): a session certificate
        # carries the user's generation when it was issued, and one below
        # the current generation is refused. No foreign key to users: the
        # generation must outlive a removal, or re-creating the name would
        # revive the old certificates.
        """CREATE TABLE user_revocations (
            user_name  TEXT PRIMARY KEY NOT NULL,
            generation INTEGER NOT NULL CHECK (generation > 0),
            reason     TEXT NOT NULL,
            revoked_at REAL NOT NULL
        )""",
        # Single certificates, by serial (lower-case hex, as the audit
        # records it: serials are 159-bit, more than an SQLite integer).
        """CREATE TABLE revoked_certs (
            serial     TEXT PRIMARY KEY NOT NULL,
            user_name  TEXT,
            reason     TEXT NOT NULL,
            revoked_by TEXT NOT NULL,
            revoked_at REAL NOT NULL,
            expires_at REAL
        )""",
        *_counter_triggers("user_revocations"),
        *_counter_triggers("revoked_certs"),
    ),
    (
        # Bots (gateway/cluster/bots.py): machine identities that join with
        # a token and renew by proving their certificate. They share the
        # users' name space (locks, revocation generations and the audit
        # name a bot by its name), so neither table takes the other's names.
        """CREATE TABLE bots (
            name       TEXT PRIMARY KEY NOT NULL,
            roles      TEXT NOT NULL DEFAULT '[]'
                       CHECK (json_valid(roles) AND json_type(roles) = 'array'),
            created_at REAL NOT NULL,
            created_by TEXT NOT NULL
        )""",
        # Join tokens, by the SHA-256 of the token (never the token itself).
        """CREATE TABLE join_tokens (
            id         TEXT PRIMARY KEY NOT NULL,
            digest     TEXT NOT NULL UNIQUE,
            bot_name   TEXT NOT NULL REFERENCES bots (name) ON DELETE CASCADE,
            uses_left  INTEGER NOT NULL CHECK (uses_left >= 0),
            used       INTEGER NOT NULL DEFAULT 0,
            expires_at REAL NOT NULL,
            created_at REAL NOT NULL,
            created_by TEXT NOT NULL
        )""",
        "CREATE INDEX join_tokens_bot ON join_tokens (bot_name)",
        # One row per join: the renewal lineage of that instance's
        # certificates (a stale count presented means a copied certificate).
        """CREATE TABLE bot_instances (
            id         TEXT PRIMARY KEY NOT NULL,
            bot_name   TEXT NOT NULL REFERENCES bots (name) ON DELETE CASCADE,
            token_id   TEXT NOT NULL,
            renewals   INTEGER NOT NULL DEFAULT 0 CHECK (renewals >= 0),
            joined_at  REAL NOT NULL,
            renewed_at REAL NOT NULL
        )""",
        "CREATE INDEX bot_instances_bot ON bot_instances (bot_name)",
        """CREATE TRIGGER users_name_not_a_bot BEFORE INSERT ON users
            WHEN EXISTS (SELECT 1 FROM bots WHERE name = NEW.name)
            BEGIN SELECT RAISE(ABORT, 'the name is taken by a bot'); END""",
        """CREATE TRIGGER bots_name_not_a_user BEFORE INSERT ON bots
            WHEN EXISTS (SELECT 1 FROM users WHERE name = NEW.name)
            BEGIN SELECT RAISE(ABORT, 'the name is taken by a user'); END""",
        *_counter_triggers("bots"),
    ),
    (
        # The login limiters count failures per client host: their index
        # held a json_extract of every audit row, every audited statement
        # included. Now only of the events they count, which their queries
        # name literally (a partial index serves a query whose WHERE has
        # one of its WHERE's terms as it is: Store._audit_filters).
        "DROP INDEX audit_event_client_host_time",
        "CREATE INDEX audit_event_client_host_time"
        " ON audit (event, json_extract(fields, '$.client_host'), time)"
        " WHERE event = 'login.failed' OR event = 'bot.join_failed'",
    ),
]

SCHEMA_VERSION = len(MIGRATIONS)


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    latest = len(MIGRATIONS)
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    if version > latest:
        raise SchemaTooNew(path, version, latest)
    if version == latest:
        return  # the common case: no write lock taken
    conn.execute("BEGIN IMMEDIATE")
    try:
        # Re-read under the write lock: another process may have just migrated.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > latest:
            raise SchemaTooNew(path, version, latest)
        for index in range(version, latest):
            for statement in MIGRATIONS[index]:
                conn.execute(statement)
        # user_version lives in the file header, which is part of the transaction.
        conn.execute(f"PRAGMA user_version = {int(latest)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    if version < latest:
        log.info("store migrated path=%s from_version=%d to_version=%d", path, version, latest)


def _prepare_file(path: Path) -> None:
    """Create the database file 0600, or check an existing one is private."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        for candidate in (path, Path(f"{path}-wal"), Path(f"{path}-shm")):
            try:
                mode = stat.S_IMODE(candidate.stat().st_mode)
            except FileNotFoundError:
                continue
            if mode & 0o077:
                raise StoreError(
                    f"{candidate} is accessible by other users (mode {mode:o}) and holds "
                    f"password hashes; run: chmod 600 {candidate}"
                ) from None
        return
    except FileNotFoundError:
        raise StoreError(f"cannot create {path}: directory {path.parent} does not exist") from None
    except OSError as exc:
        raise StoreError(f"cannot create {path}: {exc.strerror}") from None
    try:
        os.fchmod(fd, 0o600)  # exact, whatever the umask removed
    finally:
        os.close(fd)


# --- the store -----------------------------------------------------------------


class StoreBase:
    """The connection and its transactions: what every part of :class:`Store`
    (in ``__init__``) builds on. Create a store with :meth:`Store.open`.

    Methods raise :class:`StoreError` (or a subclass) for store problems and
    ValueError/TypeError for invalid arguments. Every ``now`` defaults to the
    current time; tests pass it explicitly.
    """

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._path = path
        self._mutex = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, busy_timeout: float = _BUSY_TIMEOUT_S) -> Self:
        """Open (creating and migrating if needed) the store at *path*.
        *busy_timeout*: how long a call may wait for another writer."""
        path = Path(path)
        _prepare_file(path)
        try:
            conn = sqlite3.connect(
                str(path), timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open {path}: {exc}") from None
        try:
            conn.row_factory = sqlite3.Row
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(
                    f"{path}: cannot use WAL journal mode (got {mode!r}); "
                    "put the state directory on a local file system"
                )
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            _migrate(conn, path)
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError(f"cannot open {path}: {exc}") from exc
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    @property
    def path(self) -> Path:
        return self._path

    def close(self) -> None:
        with self._mutex:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else "open"
        return f"<Store {str(self._path)!r} {state}>"

    # -- plumbing --

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with self._mutex:
            conn = self._live()
            try:
                yield conn
            except sqlite3.Error as exc:
                raise StoreError(f"{self._path}: {exc}") from exc

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding SQLite's write lock from the start."""
        with self._mutex:
            conn = self._live()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"{self._path}: {exc}") from exc

    def reading(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """The connection, for a module that keeps its own tables in this
        file (gateway/cluster/bots.py); errors become StoreError."""
        return self._read()

    def writing(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        """One write transaction, for such a module (see :meth:`reading`)."""
        return self._write()

    def _live(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StoreError(f"store {self._path} is closed")
        return self._conn

    # -- change detection --

    def data_version(self) -> int:
        """SQLite's ``PRAGMA data_version``: differs between two calls iff
        another connection (another Store, another process) committed in
        between. This connection's own commits do not change it."""
        with self._read() as conn:
            return conn.execute("PRAGMA data_version").fetchone()[0]

    def change_counter(self) -> int:
        """A number that grows with every committed change to users, roles,
        resources or locks, from any connection (one indexed row read)."""
        with self._read() as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'change_counter'").fetchone()
            return row[0]

    # -- shared by users and locks --

    @staticmethod
    def _revoke_generation(conn: sqlite3.Connection, user: str, reason: str, now: float) -> int:
        return conn.execute(
            "INSERT INTO user_revocations (user_name, generation, reason, revoked_at) VALUES (?, 1, ?, ?)"
            " ON CONFLICT (user_name) DO UPDATE SET generation = generation + 1,"
            "   reason = excluded.reason, revoked_at = excluded.revoked_at"
            " RETURNING generation",
            (user, reason, now),
        ).fetchone()[0]

"""The store's audit table: appending (one event or a batch), filtered
queries, export a page at a time, and pruning."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from gateway.cluster.store.core import (
    _AUDIT_JSON,
    _EVENT_PREFIX_RE,
    _EVENT_RE,
    _FIELD_KEY_RE,
    _MAX_AUDIT_FIELDS_BYTES,
    _MAX_QUERY_LIMIT,
    _PRUNE_BATCH,
    StoreBase,
    _check_text,
    _check_time,
    _now,
)
from gateway.cluster.store.records import (
    AuditEvent,
    _audit,
)


#: The events whose client_host is indexed (core.MIGRATIONS): the ones the
#: login and join limiters count per address.
_HOST_INDEXED = frozenset({"login.failed", "bot.join_failed"})


class Audit(StoreBase):
    """The audit methods of :class:`Store`."""

    def append_audit(
        self,
        event: str,
        user: str | None,
        fields: Mapping[str, Any] | None = None,
        now: float | None = None,
    ) -> int:
        """Append an audit event; return its id.

        *event* is dotted lower case (``login.failed``). *user* is free text
        up to 256 characters (a failed login may name a user that does not
        exist); the caller keeps secrets out of *fields*.
        """
        row = self._audit_row(event, user, fields, now)
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO audit (time, event, user_name, fields) VALUES (?, ?, ?, ?)", row
            )
            return cursor.lastrowid

    def append_audit_many(
        self, events: Iterable[tuple[str, str | None, Mapping[str, Any] | None, float | None]]
    ) -> list[tuple[float, str, str | None, str]]:
        """Append several events (event, user, fields, now) in one
        transaction: a busy cluster's statement log costs one commit per
        batch, not per statement. All or none are written. Returns the rows
        as stored: (time, event, user, fields as JSON text)."""
        rows = [self._audit_row(*e) for e in events]
        if not rows:
            return rows
        with self._write() as conn:
            conn.executemany(
                "INSERT INTO audit (time, event, user_name, fields) VALUES (?, ?, ?, ?)", rows
            )
        return rows

    @staticmethod
    def _audit_row(
        event: str, user: str | None, fields: Mapping[str, Any] | None, now: float | None
    ) -> tuple[float, str, str | None, str]:
        if not isinstance(event, str) or len(event) > 64 or _EVENT_RE.fullmatch(event) is None:
            raise ValueError(f"invalid audit event name {event!r}: expected e.g. 'login.failed'")
        if user is not None:
            _check_text("audit user", user, max_len=256)
        if fields is not None and not isinstance(fields, Mapping):
            raise TypeError(f"audit fields must be a mapping, not {type(fields).__name__}")
        try:
            text = _AUDIT_JSON.encode(dict(fields or {}))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"audit fields for {event} are not JSON-serialisable: {exc}") from None
        if len(text.encode("utf-8")) > _MAX_AUDIT_FIELDS_BYTES:
            raise ValueError(
                f"audit fields for {event} exceed {_MAX_AUDIT_FIELDS_BYTES} bytes; truncate them"
            )
        return (_now(now), event, user, text)

    @staticmethod
    def _audit_filters(
        *,
        since: float | None,
        user: str | None,
        event: str | None = None,
        event_prefix: str | None = None,
        field: tuple[str, str | int] | None = None,
        after_id: int | None = None,
    ) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        if since is not None:
            clauses.append("time >= ?")
            params.append(_check_time("since", since))
        if user is not None:
            clauses.append("user_name = ?")
            params.append(user)
        if event is not None:
            if field is not None and event in _HOST_INDEXED:
                # Inlined, so the partial index on these events' client_host
                # serves the query (SQLite uses a partial index only for a
                # WHERE that holds one of the index's terms as it is written).
                clauses.append(f"event = '{event}'")
            else:
                clauses.append("event = ?")
                params.append(event)
        if event_prefix:
            if not isinstance(event_prefix, str) or not _EVENT_PREFIX_RE.fullmatch(event_prefix):
                raise ValueError(f"invalid audit event prefix {event_prefix!r}")
            # A range, so the (event, time) index serves it. Event names use
            # only characters below U+007F, so prefix + U+007F bounds every
            # name that starts with the prefix.
            clauses.append("event >= ? AND event < ?")
            params += [event_prefix, event_prefix + "\x7f"]
        if after_id is not None:
            clauses.append("id > ?")
            params.append(int(after_id))
        if field is not None:
            key, value = field
            if not isinstance(key, str) or _FIELD_KEY_RE.fullmatch(key) is None:
                raise ValueError(f"invalid audit field name {key!r}")
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise TypeError(f"audit field {key!r} can be matched only against str or int")
            # The JSON path is inlined (the key is validated above) because
            # SQLite uses an expression index only when the expression in the
            # query is textually the same, path literal included.
            clauses.append(f"json_extract(fields, '$.{key}') = ?")
            params.append(value)
        where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
        return where, params

    def query_audit(
        self,
        since: float | None = None,
        user: str | None = None,
        event_prefix: str | None = None,
        limit: int = 1000,
        *,
        after_id: int | None = None,
        latest: bool = False,
    ) -> list[AuditEvent]:
        """Audit events matching every given filter, in id (append) order.

        At most *limit* events: the oldest matches, or with ``latest=True``
        the newest ones (still returned oldest first). ``after_id`` pages
        forward or tails the log: pass the last id seen.
        """
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise ValueError(f"limit must be an integer from 1 to {_MAX_QUERY_LIMIT}")
        if not 1 <= limit <= _MAX_QUERY_LIMIT:
            raise ValueError(f"limit must be an integer from 1 to {_MAX_QUERY_LIMIT}")
        where, params = self._audit_filters(
            since=since, user=user, event_prefix=event_prefix, after_id=after_id
        )
        order = "DESC" if latest else "ASC"
        with self._read() as conn:
            rows = conn.execute(
                f"SELECT * FROM audit{where} ORDER BY id {order} LIMIT ?", (*params, limit)
            ).fetchall()
        events = [_audit(r) for r in rows]
        if latest:
            events.reverse()
        return events

    def count_audit(
        self,
        event: str,
        user: str | None = None,
        since: float | None = None,
        *,
        field: tuple[str, str | int] | None = None,
    ) -> int:
        """Count events named exactly *event*, optionally only those for
        *user*, at or after *since*, and whose top-level JSON field equals a
        value: ``field=("client_host", "192.0.2.7")``.

        None means "any" for *user*, not "no user". Counting
        ``login.failed`` or ``bot.join_failed`` by ``client_host`` is served
        by an index, for the login and join rate limiters; other events and
        fields work but scan the event's rows in the time window.
        """
        where, params = self._audit_filters(since=since, user=user, event=event, field=field)
        with self._read() as conn:
            return conn.execute(f"SELECT count(*) FROM audit{where}", params).fetchone()[0]

    def last_audit(
        self, event: str, user: str | None = None, since: float | None = None,
        *, field: tuple[str, str | int] | None = None,
    ) -> tuple[int, float | None]:
        """(how many, time of the newest) of the events :meth:`count_audit`
        would count."""
        where, params = self._audit_filters(since=since, user=user, event=event, field=field)
        with self._read() as conn:
            count, newest = conn.execute(f"SELECT count(*), max(time) FROM audit{where}", params).fetchone()
        return count, newest

    def prune_audit(self, before: float) -> int:
        """Delete audit events older than *before*; return how many.

        Deletes in batches, each its own transaction, so a large prune never
        holds the write lock long enough to stall logins in other processes.
        (The running cluster calls :meth:`prune_audit_batch` itself, one
        batch per turn on its store thread, so its own logins get turns in
        between too.)
        """
        total = 0
        while True:
            deleted = self.prune_audit_batch(before)
            total += deleted
            if deleted < _PRUNE_BATCH:
                return total

    def prune_audit_batch(self, before: float, limit: int = _PRUNE_BATCH) -> int:
        """Delete up to *limit* of the oldest audit events older than
        *before*, in one transaction; return how many (fewer than *limit*:
        none older is left)."""
        cutoff = _check_time("before", before)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError("limit must be a positive integer")
        with self._write() as conn:
            return conn.execute(
                "DELETE FROM audit WHERE id IN"
                " (SELECT id FROM audit WHERE time < ? ORDER BY time LIMIT ?)",
                (cutoff, limit),
            ).rowcount

    def iter_audit(
        self, since: float | None = None, until: float | None = None, *, page: int = 1000
    ) -> Iterator[AuditEvent]:
        """Every audit event with ``since <= time < until`` (either bound
        optional), in id (append) order, read *page* events at a time: an
        export of any size holds one page in memory, and each read is its
        own short statement (no read transaction held open while the caller
        writes the events out, which would keep the WAL from being
        checkpointed)."""
        if isinstance(page, bool) or not isinstance(page, int) or not 1 <= page <= _MAX_QUERY_LIMIT:
            raise ValueError(f"page must be an integer from 1 to {_MAX_QUERY_LIMIT}")
        # "+time": not the time index. Pages follow the primary key, so each
        # one starts where the last stopped; through the time index, every
        # page would sort all the remaining matches again.
        clauses, params = ["id > ?"], [0]
        if since is not None:
            clauses.append("+time >= ?")
            params.append(_check_time("since", since))
        if until is not None:
            clauses.append("+time < ?")
            params.append(_check_time("until", until))
        query = f"SELECT * FROM audit WHERE {' AND '.join(clauses)} ORDER BY id LIMIT ?"
        while True:
            with self._read() as conn:
                rows = conn.execute(query, (*params, page)).fetchall()
            events = [_audit(r) for r in rows]
            yield from events
            if len(rows) < page:
                return
            params[0] = events[-1].id

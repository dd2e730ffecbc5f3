"""The store's users (password hashes, TOTP) and roles."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Mapping
from typing import Any

from gateway.cluster.store.core import (
    AlreadyExists,
    NotFound,
    Source,
    StoreBase,
    _check_password_hash,
    _check_roles,
    _check_totp_secret,
    _dumps,
    _now,
    validate_name,
)
from gateway.cluster.store.records import (
    _USERS,
    RoleRecord,
    User,
    _role,
    _user,
)


class Users(StoreBase):
    """The users and roles methods of :class:`Store`."""

    def add_user(
        self,
        name: str,
        password_hash: str,
        roles: Iterable[str] = (),
        totp_secret: bytes | None = None,
        now: float | None = None,
    ) -> User:
        """Create a user; raise :class:`AlreadyExists` if the name is taken."""
        user = User(
            name=validate_name("user", name),
            roles=_check_roles(roles),
            created_at=_now(now),
            password_hash=_check_password_hash(password_hash),
            totp_secret=_check_totp_secret(totp_secret),
        )
        with self._write() as conn:
            try:
                conn.execute(
                    "INSERT INTO users (name, password_hash, totp_secret, roles, created_at)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (user.name, user.password_hash, user.totp_secret, _dumps(list(user.roles)),
                     user.created_at),
                )
            except sqlite3.IntegrityError as exc:
                # Only the primary key means "taken"; any other constraint
                # failure is a real error and is reported as one.
                if exc.sqlite_errorname != "SQLITE_CONSTRAINT_PRIMARYKEY":
                    raise
                raise AlreadyExists("user", name) from None
        return user

    def get_user(self, name: str) -> User | None:
        with self._read() as conn:
            row = conn.execute(f"{_USERS} WHERE name = ?", (name,)).fetchone()
        return None if row is None else _user(row)

    def list_users(self) -> list[User]:
        with self._read() as conn:
            return [_user(r) for r in conn.execute(f"{_USERS} ORDER BY name")]

    def _update_user(self, name: str, assignments: str, params: tuple[Any, ...]) -> None:
        with self._write() as conn:
            cursor = conn.execute(f"UPDATE users SET {assignments} WHERE name = ?", (*params, name))
            if cursor.rowcount == 0:
                raise NotFound("user", name)

    def set_user_roles(self, name: str, roles: Iterable[str]) -> None:
        self._update_user(name, "roles = ?", (_dumps(list(_check_roles(roles))),))

    def set_password_hash(self, name: str, password_hash: str, now: float | None = None) -> int:
        """A new password: it revokes every certificate issued before it
        (whoever had the old one may hold one). Returns the new generation."""
        hashed = _check_password_hash(password_hash)
        with self._write() as conn:
            if conn.execute("UPDATE users SET password_hash = ? WHERE name = ?", (hashed, name)).rowcount == 0:
                raise NotFound("user", name)
            return self._revoke_generation(conn, name, "password changed", _now(now))

    def replace_password_hash(self, name: str, old: str, new: str) -> bool:
        """Set *new* only if the stored hash is still *old* (a re-hash at
        login must not undo a password change made meanwhile)."""
        with self._write() as conn:
            cursor = conn.execute("UPDATE users SET password_hash = ? WHERE name = ? AND password_hash = ?",
                                  (_check_password_hash(new), name, old))
            return cursor.rowcount == 1

    def set_totp_secret(self, name: str, totp_secret: bytes | None) -> None:
        """Enrol (or with None, un-enrol) TOTP; forgets the last accepted step."""
        self._update_user(
            name, "totp_secret = ?, totp_last_step = NULL", (_check_totp_secret(totp_secret),)
        )

    def set_totp_last_step(self, name: str, step: int) -> bool:
        """Record *step* as the last accepted TOTP step, only if it is newer.

        Returns False if the stored step is already >= *step*: another login
        (perhaps in another cluster process) accepted this code first, and
        this login must be refused. The compare-and-set is one SQL statement,
        so two processes cannot both win.
        """
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError("TOTP step must be a non-negative integer")
        with self._write() as conn:
            cursor = conn.execute(
                "UPDATE users SET totp_last_step = ?"
                " WHERE name = ? AND (totp_last_step IS NULL OR totp_last_step < ?)",
                (step, name, step),
            )
            if cursor.rowcount:
                return True
            if conn.execute("SELECT 1 FROM users WHERE name = ?", (name,)).fetchone() is None:
                raise NotFound("user", name)
            return False

    def delete_user(self, name: str, now: float | None = None) -> bool:
        """Delete a user and revoke their certificates (a user re-created
        under the name does not inherit them); False if there was none. Any
        lock on the name stays."""
        when = _now(now)
        with self._write() as conn:
            if conn.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount == 0:
                return False
            self._revoke_generation(conn, name, "user removed", when)
            return True

    # -- roles --

    def put_role(
        self, name: str, spec: Mapping[str, Any], source: Source, now: float | None = None
    ) -> bool:
        """Create or replace a role; True if anything changed.

        Writing identical content is a no-op (no change_counter bump), so
        syncing roles from the config file at every start does not make every
        server process reload.
        """
        role = RoleRecord(name=name, spec=spec, source=source)
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO roles (name, spec, source, updated_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET"
                "   spec = excluded.spec, source = excluded.source,"
                "   updated_at = excluded.updated_at"
                " WHERE spec IS NOT excluded.spec OR source IS NOT excluded.source",
                (role.name, _dumps(role.spec), role.source, _now(now)),
            )
            return cursor.rowcount > 0

    def get_role(self, name: str) -> RoleRecord | None:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM roles WHERE name = ?", (name,)).fetchone()
        return None if row is None else _role(row)

    def list_roles(self) -> list[RoleRecord]:
        with self._read() as conn:
            return [_role(r) for r in conn.execute("SELECT * FROM roles ORDER BY name")]

    def delete_role(self, name: str) -> bool:
        """Delete a role; False if there was none. Users naming it keep the
        name (an unknown role grants nothing)."""
        with self._write() as conn:
            return conn.execute("DELETE FROM roles WHERE name = ?", (name,)).rowcount > 0

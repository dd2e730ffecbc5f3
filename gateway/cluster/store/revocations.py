"""The store's revocations (per user generation and per certificate) and
user locks, which revoke too."""

from __future__ import annotations

from gateway.cluster.store.core import (
    _MAX_TEXT,
    StoreBase,
    _check_text,
    _check_time,
    _now,
    validate_name,
)
from gateway.cluster.store.records import (
    AuditEvent,
    Lock,
    RevokedCert,
    _audit,
    _lock,
    _revoked,
    serial_text,
)


class Revocations(StoreBase):
    """The revocation and lock methods of :class:`Store`."""

    def revoke_user_certs(self, user: str, reason: str, now: float | None = None) -> int:
        """Revoke every certificate issued to *user* so far: bump their
        generation (certificates carry the one they were issued with).
        Returns the new generation."""
        validate_name("user", user)
        _check_text("revocation reason", reason)
        when = _now(now)
        with self._write() as conn:
            return self._revoke_generation(conn, user, reason, when)

    def revocation_reasons(self) -> dict[str, str]:
        """user -> why their certificates were last revoked at once."""
        with self._read() as conn:
            return dict(conn.execute("SELECT user_name, reason FROM user_revocations").fetchall())

    def revoke_cert(
        self, serial: int, *, user: str | None, reason: str, revoked_by: str,
        expires_at: float | None, now: float | None = None,
    ) -> bool:
        """Revoke one certificate by serial; False if it already was."""
        if isinstance(serial, bool) or not isinstance(serial, int) or not 0 < serial < 1 << 160:
            raise ValueError("a certificate serial is a positive integer below 2**160")
        _check_text("revocation reason", reason, empty=True)
        _check_text("revoked_by", revoked_by, max_len=256)
        row = (serial_text(serial), user, reason, revoked_by, _now(now),
               None if expires_at is None else _check_time("expires_at", expires_at))
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO revoked_certs (serial, user_name, reason, revoked_by, revoked_at, expires_at)"
                " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (serial) DO NOTHING", row,
            )
            return cursor.rowcount > 0

    def list_revoked_certs(self, *, live_at: float | None = None) -> list[RevokedCert]:
        """Revoked certificates; with *live_at*, only those not yet expired then."""
        with self._read() as conn:
            if live_at is None:
                rows = conn.execute("SELECT * FROM revoked_certs ORDER BY revoked_at")
            else:
                rows = conn.execute(
                    "SELECT * FROM revoked_certs WHERE expires_at IS NULL OR expires_at > ?"
                    " ORDER BY revoked_at", (_check_time("live_at", live_at),))
            return [_revoked(r) for r in rows]

    def prune_revoked_certs(self, before: float) -> int:
        """Forget revocations of certificates that expired before *before*."""
        with self._write() as conn:
            return conn.execute("DELETE FROM revoked_certs WHERE expires_at < ?",
                                (_check_time("before", before),)).rowcount

    def find_issued_cert(self, serial: int) -> AuditEvent | None:
        """The audit event that issued the certificate with *serial*
        (``login.ok`` or ``login.renew``), if the audit still has it."""
        with self._read() as conn:
            row = conn.execute(
                "SELECT * FROM audit WHERE event IN ('login.ok', 'login.renew', 'bot.join', 'bot.renew')"
                " AND json_extract(fields, '$.serial') = ? ORDER BY id DESC LIMIT 1",
                (serial_text(serial),),
            ).fetchone()
        return None if row is None else _audit(row)

    # -- locks --

    def lock_user(self, user: str, reason: str, created_by: str, now: float | None = None) -> Lock:
        """Lock *user* out (new logins and, via the poller, live sessions),
        and revoke every certificate issued to them so far, in the same
        transaction: an unlock does not revive a certificate that may have
        been stolen (the user logs in again).

        Locking an already locked user replaces the reason, author and time:
        the newest decision is the one an operator wants to read.
        """
        lock = Lock(
            user=validate_name("user", user),
            reason=_check_text("lock reason", reason, empty=True),
            created_by=_check_text("lock created_by", created_by, max_len=256),
            created_at=_now(now),
        )
        with self._write() as conn:
            conn.execute(
                "INSERT INTO locks (user_name, reason, created_by, created_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (user_name) DO UPDATE SET reason = excluded.reason,"
                "   created_by = excluded.created_by, created_at = excluded.created_at",
                (lock.user, lock.reason, lock.created_by, lock.created_at),
            )
            self._revoke_generation(conn, lock.user, f"user locked: {lock.reason}"[:_MAX_TEXT],
                                    lock.created_at)
        return lock

    def unlock_user(self, user: str) -> bool:
        """Remove a lock; False if the user was not locked."""
        with self._write() as conn:
            return conn.execute("DELETE FROM locks WHERE user_name = ?", (user,)).rowcount > 0

    def get_lock(self, user: str) -> Lock | None:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM locks WHERE user_name = ?", (user,)).fetchone()
        return None if row is None else _lock(row)

    def list_locks(self) -> list[Lock]:
        with self._read() as conn:
            return [_lock(r) for r in conn.execute("SELECT * FROM locks ORDER BY user_name")]

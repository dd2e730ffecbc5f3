"""The store's records (users, roles, resources, locks, revoked certificates,
audit events: frozen, validated on creation) and their conversion from rows."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from typing import Any

import attrs

from gateway.cluster.store.core import (
    _KIND_RE,
    Source,
    _check_address,
    _check_source,
    _freeze_labels,
    _freeze_spec,
    validate_name,
)


# --- records -------------------------------------------------------------------


@attrs.frozen(slots=True, kw_only=True)
class User:
    name: str = attrs.field(validator=lambda _i, _a, v: validate_name("user", v))
    roles: tuple[str, ...] = attrs.field(converter=tuple)
    created_at: float
    password_hash: str = attrs.field(repr=False)
    totp_secret: bytes | None = attrs.field(default=None, repr=False)
    # The step of the last accepted TOTP code (replay protection).
    totp_last_step: int | None = None
    # Derived from totp_secret; a field (not a property) so it shows in reprs.
    totp_enrolled: bool = attrs.field(
        default=attrs.Factory(lambda self: self.totp_secret is not None, takes_self=True)
    )
    # Session certificates issued with a lower generation are revoked (a
    # lock, a new password, a removal bumped it); see revoke_user_certs.
    cert_generation: int = 0

    @totp_enrolled.validator
    def _check_enrolled(self, _attr: object, value: bool) -> None:
        if value != (self.totp_secret is not None):
            raise ValueError("totp_enrolled must match whether totp_secret is set")


@attrs.frozen(slots=True, kw_only=True)
class RoleRecord:
    """A role as stored. The spec is opaque here; the RBAC code interprets it."""

    name: str = attrs.field(validator=lambda _i, _a, v: validate_name("role", v))
    # Read-only view; dict(record.spec) gives a plain dict.
    spec: Mapping[str, Any] = attrs.field(converter=_freeze_spec, hash=False)
    source: Source = attrs.field(validator=lambda _i, _a, v: _check_source(v))


@attrs.frozen(slots=True, kw_only=True)
class Resource:
    """Something behind the cluster that users dial (a database, an SSH host)."""

    name: str = attrs.field(validator=lambda _i, _a, v: validate_name("resource", v))
    kind: str = attrs.field(
        validator=attrs.validators.matches_re(_KIND_RE)  # e.g. 'tcp', 'postgres', 'ssh'
    )
    address: str = attrs.field(validator=_check_address)
    labels: Mapping[str, str] = attrs.field(factory=dict, converter=_freeze_labels, hash=False)
    spec: Mapping[str, Any] = attrs.field(factory=dict, converter=_freeze_spec, hash=False)
    source: Source = attrs.field(default="cli", validator=lambda _i, _a, v: _check_source(v))


@attrs.frozen(slots=True, kw_only=True)
class Lock:
    user: str
    reason: str
    created_by: str
    created_at: float


@attrs.frozen(slots=True, kw_only=True)
class RevokedCert:
    """One session certificate revoked by its serial (``certs revoke``)."""

    serial: int
    user: str | None
    reason: str
    revoked_by: str
    revoked_at: float
    # When the certificate ends anyway; the row can go after that.
    expires_at: float | None


@attrs.frozen(slots=True, kw_only=True)
class AuditEvent:
    id: int
    time: float
    event: str
    user: str | None
    fields: Mapping[str, Any] = attrs.field(converter=_freeze_spec, hash=False)


# --- row conversion ------------------------------------------------------------


# Users with their certificate generation (0: never revoked).
_USERS = (
    "SELECT users.*, coalesce(r.generation, 0) AS cert_generation"
    " FROM users LEFT JOIN user_revocations AS r ON r.user_name = users.name"
)


def _user(row: sqlite3.Row) -> User:
    return User(
        name=row["name"],
        roles=json.loads(row["roles"]),
        created_at=row["created_at"],
        password_hash=row["password_hash"],
        totp_secret=row["totp_secret"],
        totp_last_step=row["totp_last_step"],
        cert_generation=row["cert_generation"],
    )


def serial_text(serial: int) -> str:
    """A certificate serial as the audit and the store write it."""
    return format(serial, "x")


def parse_serial(text: str) -> int:
    """A serial as an administrator may paste it: hex, any case, an
    optional ``0x`` and colons (as openssl prints it)."""
    digits = text.strip().lower().removeprefix("0x").replace(":", "")
    if not 1 <= len(digits) <= 40 or any(c not in "0123456789abcdef" for c in digits):
        raise ValueError(f"invalid certificate serial {text!r}: expected up to 40 hex digits, "
                         "as the audit's login.ok events show it")
    return int(digits, 16)


def _revoked(row: sqlite3.Row) -> RevokedCert:
    return RevokedCert(
        serial=int(row["serial"], 16), user=row["user_name"], reason=row["reason"],
        revoked_by=row["revoked_by"], revoked_at=row["revoked_at"], expires_at=row["expires_at"],
    )


def _role(row: sqlite3.Row) -> RoleRecord:
    return RoleRecord(name=row["name"], spec=json.loads(row["spec"]), source=row["source"])


def _resource(row: sqlite3.Row) -> Resource:
    return Resource(
        name=row["name"], kind=row["kind"], address=row["address"],
        labels=json.loads(row["labels"]), spec=json.loads(row["spec"]), source=row["source"],
    )


def _lock(row: sqlite3.Row) -> Lock:
    return Lock(
        user=row["user_name"], reason=row["reason"],
        created_by=row["created_by"], created_at=row["created_at"],
    )


def _audit(row: sqlite3.Row) -> AuditEvent:
    return AuditEvent(
        id=row["id"], time=row["time"], event=row["event"],
        user=row["user_name"], fields=json.loads(row["fields"]),
    )

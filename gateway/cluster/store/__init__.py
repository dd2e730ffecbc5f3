"""The cluster's persistent store: users, roles, resources, revocations,
locks and audit, in one SQLite file.

:class:`Store` is the one handle the rest of the cluster uses; its methods
live by job in this package's modules, over one connection and schema:

* ``core``: the connection, transactions, schema :data:`MIGRATIONS`, change
  detection and the argument checks (its docstring is the theory of
  operation);
* ``records``: the records returned, and their conversion from rows;
* ``users``: users (password hashes, TOTP) and roles;
* ``resources``: resources;
* ``revocations``: certificate revocations and user locks;
* ``audit``: the audit table.
"""

from __future__ import annotations

from gateway.cluster.store.audit import Audit
from gateway.cluster.store.core import (
    MIGRATIONS,
    SCHEMA_VERSION,
    AlreadyExists,
    NotFound,
    SchemaTooNew,
    Source,
    StoreError,
    validate_name,
)
from gateway.cluster.store.records import (
    AuditEvent,
    Lock,
    Resource,
    RevokedCert,
    RoleRecord,
    User,
    parse_serial,
    serial_text,
)
from gateway.cluster.store.resources import Resources
from gateway.cluster.store.revocations import Revocations
from gateway.cluster.store.users import Users

__all__ = [
    "AlreadyExists",
    "AuditEvent",
    "Lock",
    "MIGRATIONS",
    "NotFound",
    "Resource",
    "RevokedCert",
    "RoleRecord",
    "SCHEMA_VERSION",
    "SchemaTooNew",
    "Source",
    "Store",
    "StoreError",
    "User",
    "parse_serial",
    "serial_text",
    "validate_name",
]


class Store(Users, Resources, Revocations, Audit):
    """A handle on the cluster's SQLite store. Create with :meth:`Store.open`.

    Methods raise :class:`StoreError` (or a subclass) for store problems and
    ValueError/TypeError for invalid arguments. Every ``now`` defaults to the
    current time; tests pass it explicitly.
    """

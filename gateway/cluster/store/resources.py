"""The store's resources: what users may reach, by kind and address."""

from __future__ import annotations

from gateway.cluster.store.core import (
    StoreBase,
    _dumps,
    _now,
)
from gateway.cluster.store.records import (
    Resource,
    _resource,
)


class Resources(StoreBase):
    """The resources methods of :class:`Store`."""

    def put_resource(self, resource: Resource, now: float | None = None) -> bool:
        """Create or replace a resource; True if anything changed (see put_role)."""
        if not isinstance(resource, Resource):
            raise TypeError(f"expected a Resource, not {type(resource).__name__}")
        with self._write() as conn:
            cursor = conn.execute(
                "INSERT INTO resources (name, kind, address, labels, spec, source, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET"
                "   kind = excluded.kind, address = excluded.address, labels = excluded.labels,"
                "   spec = excluded.spec, source = excluded.source,"
                "   updated_at = excluded.updated_at"
                " WHERE kind IS NOT excluded.kind OR address IS NOT excluded.address"
                "   OR labels IS NOT excluded.labels OR spec IS NOT excluded.spec"
                "   OR source IS NOT excluded.source",
                (resource.name, resource.kind, resource.address, _dumps(resource.labels),
                 _dumps(resource.spec), resource.source, _now(now)),
            )
            return cursor.rowcount > 0

    def get_resource(self, name: str) -> Resource | None:
        with self._read() as conn:
            row = conn.execute("SELECT * FROM resources WHERE name = ?", (name,)).fetchone()
        return None if row is None else _resource(row)

    def list_resources(self, kind: str | None = None) -> list[Resource]:
        with self._read() as conn:
            if kind is None:
                rows = conn.execute("SELECT * FROM resources ORDER BY name")
            else:
                rows = conn.execute("SELECT * FROM resources WHERE kind = ? ORDER BY name", (kind,))
            return [_resource(r) for r in rows]

    def delete_resource(self, name: str) -> bool:
        with self._write() as conn:
            return conn.execute("DELETE FROM resources WHERE name = ?", (name,)).rowcount > 0

"""What PostgreSQL's clients (libpq: psql, pgbench, psycopg, and the
drivers that read the same variables) need to find a resource the gateway
serves: their environment variables and a pg_service.conf entry
(gateway/kinds.py names both for the postgres kind).

The gateway speaks plain TCP on loopback unless `--local-tls` is on, so
``sslmode=disable`` (the cluster's TLS is the gateway's business); with
local TLS, ``require``. No password: the cluster logs in upstream.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote


def _sslmode(settings: dict[str, Any]) -> str:
    return "require" if settings.get("local_tls") else "disable"


def client_env(resource: str, host: str, port: int, settings: dict[str, Any]) -> dict[str, str]:
    user, db = settings.get("db_user"), settings.get("db_name")
    env = {"PGHOST": host, "PGPORT": str(port), "PGSSLMODE": _sslmode(settings)}
    if user:
        env["PGUSER"] = user
    if db:
        env["PGDATABASE"] = db
    hostpart = f"[{host}]" if ":" in host else host
    url = f"postgresql://{quote(user, safe='') + '@' if user else ''}{hostpart}:{port}"
    if db:
        url += "/" + quote(db, safe="")
    env["DATABASE_URL"] = f"{url}?sslmode={_sslmode(settings)}"
    return env


def service_entry(resource: str, host: str, port: int, settings: dict[str, Any]) -> str:
    """A pg_service.conf section: ``psql service=RESOURCE``."""
    lines = [f"[{resource}]", "# written by `wicket config pg`: the gateway's local port for this resource",
             f"host={host}", f"port={port}", f"sslmode={_sslmode(settings)}"]
    if settings.get("db_user"):
        lines.append(f"user={settings['db_user']}")
    if settings.get("db_name"):
        lines.append(f"dbname={settings['db_name']}")
    return "\n".join(lines) + "\n"

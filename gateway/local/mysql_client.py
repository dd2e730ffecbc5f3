"""What MySQL and MariaDB clients (mysql, mysqldump, mysqlclient and the
drivers that read the same variables) need to find a resource the gateway
serves: their environment variables and an option-file group
(gateway/kinds.py names both for the mysql kind).

No password: the gateway takes any, and the cluster logs in upstream. The
option group is ``[client_<resource>]``, which the clients read with
``--defaults-group-suffix=_<resource>`` (and nothing else does), so a
user's own ``[client]`` group stays theirs.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote


def client_env(resource: str, host: str, port: int, settings: dict[str, Any]) -> dict[str, str]:
    user, db = settings.get("db_user"), settings.get("db_name")
    env = {"MYSQL_HOST": host, "MYSQL_TCP_PORT": str(port)}
    hostpart = f"[{host}]" if ":" in host else host
    url = f"mysql://{quote(user, safe='') + '@' if user else ''}{hostpart}:{port}"
    if db:
        url += "/" + quote(db, safe="")
    env["MYSQL_URL"] = url
    return env


def option_group(resource: str, host: str, port: int, settings: dict[str, Any]) -> str:
    """A my.cnf group: ``mysql --defaults-group-suffix=_RESOURCE``."""
    lines = [f"[client_{resource}]",
             f"# written by `wicket config mysql`: use with --defaults-group-suffix=_{resource}",
             f"host={host}", f"port={port}", "protocol=TCP"]
    if settings.get("db_user"):
        lines.append(f"user={settings['db_user']}")
    if settings.get("db_name"):
        lines.append(f"database={settings['db_name']}")
    return "\n".join(lines) + "\n"

"""What MongoDB's clients (mongosh, every driver) need to find a resource
the gateway serves: one connection string (gateway/kinds.py names it for
the mongodb kind). No credentials: the cluster logs in upstream;
``directConnection`` keeps drivers on the gateway instead of the members
a topology would name.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote


def client_env(resource: str, host: str, port: int, settings: dict[str, Any]) -> dict[str, str]:
    hostpart = f"[{host}]" if ":" in host else host
    db = settings.get("db_name")
    path = "/" + quote(db, safe="") if db else "/"
    return {"MONGODB_URI": f"mongodb://{hostpart}:{port}{path}?directConnection=true"}

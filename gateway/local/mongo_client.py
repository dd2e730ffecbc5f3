"""What MongoDB's clients (mongosh, every driver) need to find a resource
the gateway serves: one connection string (gateway/kinds.py names it for
the mongodb kind). No credentials: the cluster logs in upstream;
``directConnection`` keeps drivers on the gateway instead of the members
a topology would name. Under ``--local-tls`` the string says TLS with the
local CA (``tlsCAFile``), and under ``--local-tls-client-cert`` the client
certificate and key (``tlsCertificateKeyFile``), as the URI ``wicket
proxy`` prints does (:func:`tls_options`, shared with it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import quote

from gateway.local.localtls import local_ca_path, local_client_pem_path


def tls_options(ca_path: Path | None, client_pem: Path | None = None) -> str:
    """The URI options (``tls=true&tlsCAFile=...``) for a client of a
    gateway with local TLS whose CA is ``ca_path``; "" for none."""
    if ca_path is None:
        return ""
    options = f"tls=true&tlsCAFile={quote(str(ca_path), safe='/')}"
    if client_pem is not None:
        options += f"&tlsCertificateKeyFile={quote(str(client_pem), safe='/')}"
    return options


def client_env(resource: str, host: str, port: int, settings: dict[str, Any]) -> dict[str, str]:
    hostpart = f"[{host}]" if ":" in host else host
    db = settings.get("db_name")
    path = "/" + quote(db, safe="") if db else "/"
    uri = f"mongodb://{hostpart}:{port}{path}?directConnection=true"
    home = settings.get("wicket_home")
    client_cert = bool(settings.get("local_tls_client_cert"))
    if home and (settings.get("local_tls") or client_cert):
        home = Path(home)
        uri += "&" + tls_options(local_ca_path(home), local_client_pem_path(home) if client_cert else None)
    return {"MONGODB_URI": uri}

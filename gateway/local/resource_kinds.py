"""The kind of each resource, as the cluster last listed it, remembered in
the profile (``kinds.json``).

Several database kinds share `wicket proxy db NAME`; which one NAME is comes
from the cluster. When the cluster cannot be reached right then (a restart,
a laptop just back on the network), the last answer lets the gateway start
anyway and answer its clients in their own protocol while it waits.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from gateway.identity import pki
from gateway.private_files import ensure_private_dir

FILE = "kinds.json"


def load(home: Path) -> dict[str, str]:
    try:
        doc = json.loads((home / FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, str)}


def remember(home: Path, resources: Iterable[dict[str, Any]]) -> None:
    """Record the kinds of a `/v1/resources` listing; only writes when
    something changed."""
    seen = load(home)
    listed = {r["name"]: r["kind"] for r in resources
              if isinstance(r.get("name"), str) and isinstance(r.get("kind"), str)}
    merged = {**seen, **listed}
    if merged == seen:
        return
    ensure_private_dir(home)
    pki.write_public(home / FILE, json.dumps(merged, indent=2, sort_keys=True).encode() + b"\n")


def recall(home: Path, name: str) -> str | None:
    return load(home).get(name)

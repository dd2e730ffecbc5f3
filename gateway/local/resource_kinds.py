"""The kind of each resource, as the cluster last listed it, remembered in
the profile (``kinds.json``).

Several database kinds share `wicket proxy db NAME`; which one NAME is comes
from the cluster. When the cluster cannot be reached right then (a restart,
a laptop just back on the network), the last answer lets the gateway start
anyway and answer its clients in their own protocol while it waits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from gateway.local import remembered

FILE = "kinds.json"


def load(home: Path) -> dict[str, str]:
    return remembered.load(home / FILE, lambda v: isinstance(v, str))  # type: ignore[return-value]


def remember(home: Path, resources: Iterable[dict[str, Any]]) -> None:
    """Record the kinds of a `/v1/resources` listing; only writes when
    something changed."""
    seen = load(home)
    listed = {r["name"]: r["kind"] for r in resources
              if isinstance(r.get("name"), str) and isinstance(r.get("kind"), str)}
    merged = {**seen, **listed}
    if merged == seen:
        return
    remembered.save(home / FILE, merged)


def recall(home: Path, name: str) -> str | None:
    return load(home).get(name)

"""Small JSON maps the gateway remembers in the profile (``ports.json``,
``kinds.json``): read forgivingly (a missing or damaged file is an empty
map, entries of the wrong type are skipped), written whole, public."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from gateway.identity import pki
from gateway.private_files import ensure_private_dir


def load(path: Path, keep: Callable[[object], bool]) -> dict[str, object]:
    """The map in ``path``: its string keys whose values ``keep`` accepts."""
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: v for k, v in doc.items() if isinstance(k, str) and keep(v)}


def save(path: Path, entries: dict) -> None:
    ensure_private_dir(path.parent)
    pki.write_public(path, json.dumps(entries, indent=2, sort_keys=True).encode() + b"\n")

"""Local ports remembered per resource in the profile (``ports.json``), so
a resource is on the same port tomorrow: `wicket env` and `wicket config`
print and write it (`wicket proxy ... --port` serves it there; the agent,
when it lands, will listen on it by itself).
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

from gateway.identity import pki
from gateway.private_files import ensure_private_dir

FILE = "ports.json"


def load(home: Path) -> dict[str, int]:
    try:
        doc = json.loads((home / FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(doc, dict):
        return {}
    return {k: v for k, v in doc.items() if isinstance(k, str) and isinstance(v, int) and 0 < v < 65536}


def _free_port(bind: str, taken: set[int]) -> int:
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    for _ in range(64):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((bind, 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port
    raise OSError(f"no free port found on {bind}")


def assign(home: Path, resource: str, bind: str = "127.0.0.1") -> int:
    """The port remembered for ``resource``, or a free one, remembered now."""
    ports = load(home)
    port = ports.get(resource)
    if port is None:
        port = _free_port(bind, set(ports.values()))
        ports[resource] = port
        ensure_private_dir(home)
        pki.write_public(home / FILE, json.dumps(ports, indent=2, sort_keys=True).encode() + b"\n")
    return port

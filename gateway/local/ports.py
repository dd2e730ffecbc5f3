"""Local ports remembered per resource in the profile (``ports.json``), so
a resource is on the same port tomorrow: `wicket env` and `wicket config`
print and write it (`wicket proxy ... --port` serves it there; `wicket
agent` listens on it by itself).
"""

from __future__ import annotations

import socket
from pathlib import Path

from gateway.local import remembered

FILE = "ports.json"


def load(home: Path) -> dict[str, int]:
    return remembered.load(home / FILE, lambda v: isinstance(v, int) and 0 < v < 65536)  # type: ignore[return-value]


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
        remembered.save(home / FILE, ports)
    return port

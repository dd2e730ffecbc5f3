"""The MongoDB parts the tests start: mongoeco (a MongoDB wire server in
Python, :mod:`gateway.local.mongoserver`, which ``wicket demo`` runs too)
and the Node.js clients (the ``mongodb`` driver, ``mongosh``).

Nothing here is installed by hand: on first use mongoeco's venv is made
(see gateway/local/mongoserver.py) and ``tests/clients/mongodb/node_modules``
is ``npm ci`` of the committed package.json and package-lock.json
(node_modules is ignored by git).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
from pathlib import Path

from gateway.local.mongoserver import (  # noqa: F401  (the tests' names for them)
    MongoServer, Unavailable, _Locked, _run_install, cache_dir, find_python, mongoeco_python,
)

NODE_CLIENTS = Path(__file__).resolve().parent.parent / "clients" / "mongodb"


def node_clients() -> Path:
    """tests/clients/mongodb with its node_modules installed (``npm ci``)."""
    npm = shutil.which("npm")
    if npm is None or shutil.which("node") is None:
        raise Unavailable("node and npm are needed for the MongoDB Node.js clients "
                          "(requirements/apt.txt lists them: run ./dev setup-system)")
    lock = NODE_CLIENTS / "package-lock.json"
    stamp = NODE_CLIENTS / "node_modules" / ".wicket-installed"
    digest = hashlib.sha256(lock.read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return NODE_CLIENTS
    with _Locked(cache_dir() / "npm-mongodb.lock"):
        if not (stamp.exists() and stamp.read_text() == digest):
            _run_install([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], "npm ci",
                         cwd=NODE_CLIENTS)
            stamp.write_text(digest)
    return NODE_CLIENTS


def mongosh() -> Path:
    return node_clients() / "node_modules" / ".bin" / "mongosh"


if __name__ == "__main__":  # python -m tests.servers.mongo: install both, print where
    print(mongoeco_python())
    print(node_clients())
    sys.exit(0)

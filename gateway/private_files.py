"""Directories only their owner may enter (state, profiles, local CAs).

Keys and password hashes live in them; the directory's mode is the first
fence, the files' own 0600 the second.
"""

from __future__ import annotations

import os
from pathlib import Path


def ensure_private_dir(path: Path) -> None:
    """Create ``path`` (and its parents) if needed and make it 0700,
    whatever it was and whatever the umask allowed."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)

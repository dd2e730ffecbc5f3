"""Client configuration files that `wicket config` edits: an entry put in
place of any earlier one of the same name, the rest of the file kept as it
was, written atomically (a reader never sees half a file) and private when
new (0600: some hold passwords of their own).
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path


def merge_ini_section(text: str, name: str, entry: str) -> str:
    """``text`` (an INI-style file: pg_service.conf, my.cnf) with section
    ``[name]`` replaced by ``entry`` (added at the end if there was none)."""
    out: list[str] = []
    replaced = skipping = False
    header = re.compile(r"^\s*\[\s*([^\]]*?)\s*\]\s*$")
    for line in text.splitlines(keepends=True):
        m = header.match(line)
        if m:
            skipping = m.group(1) == name
            if skipping and not replaced:
                out.append(entry if entry.endswith("\n") else entry + "\n")
                replaced = True
        if not skipping:
            out.append(line)
    merged = "".join(out)
    if not replaced:
        if merged and not merged.endswith("\n"):
            merged += "\n"
        if merged and not merged.endswith("\n\n"):
            merged += "\n"  # a blank line between sections
        merged += entry if entry.endswith("\n") else entry + "\n"
    return merged


def update(path: Path, merged: str) -> None:
    """Write ``merged`` to ``path`` atomically, keeping an existing file's
    mode (0600 for a new one)."""
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(merged)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise

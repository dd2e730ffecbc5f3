"""Test data from outside: the official BSON corpus (mongodb/specifications,
source/bson-corpus/tests), read from where the developer put it (README.md
beside this file), and byte captures of real driver traffic (captures/)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

#: Where the corpus's *.json files are; unset or missing: the corpus cases skip.
CORPUS_ENV = "WICKET_BSON_CORPUS"


def corpus_dir() -> Path | None:
    path = os.environ.get(CORPUS_ENV)
    if not path or not Path(path, "top.json").is_file():
        return None
    return Path(path)


def _cases(kind: str) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    folder = corpus_dir()
    if folder is None:
        return []
    out = []
    for path in sorted(folder.glob("*.json")):
        suite = json.loads(path.read_text(encoding="utf-8"))
        for case in suite.get(kind, []):
            out.append((f"{path.stem}: {case['description']}", suite, case))
    return out


def valid_cases() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return _cases("valid")


def decode_error_cases() -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    return _cases("decodeErrors")


CAPTURES = Path(__file__).parent / "captures"


def captured_streams() -> list[tuple[str, bytes]]:
    out = []
    for path in sorted(CAPTURES.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            out.append((f"{path.stem}#{record['conn']}", bytes.fromhex(record["stream"])))
    return out

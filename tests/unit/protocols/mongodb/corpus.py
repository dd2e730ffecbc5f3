"""Test data from outside: the official BSON corpus, and byte captures of
real driver traffic (captures/).

The corpus (mongodb/specifications, source/bson-corpus/tests) is fetched
at test set-up from pymongo's source distribution on PyPI, which carries it
as test/bson_corpus under Apache-2.0, and kept outside the repository
(``$WICKET_CACHE``, default ~/.cache/wicket). ``WICKET_BSON_CORPUS`` points
at another copy instead (README.md beside this file). Only a machine that
cannot reach PyPI skips the corpus cases, and says so."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Any

#: Where the corpus's *.json files are, if not fetched.
CORPUS_ENV = "WICKET_BSON_CORPUS"
#: The pymongo release whose sdist the corpus comes from.
PYMONGO_SDIST = "pymongo==4.20.1"
_MEMBER = "/test/bson_corpus/"
#: Why the corpus is missing (the skip's reason), once corpus_dir() said None.
why_missing = ""


def _cache() -> Path:
    root = os.environ.get("WICKET_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "wicket")
    return Path(root)


def _fetch(target: Path) -> None:
    """pymongo's sdist's test/bson_corpus/*.json into ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / "bson-corpus.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "top.json").is_file():
            return
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "download", PYMONGO_SDIST, "--no-binary", ":all:",
                                "--no-deps", "--disable-pip-version-check", "-q", "-d", tmp],
                               capture_output=True, text=True, timeout=300)
            if r.returncode != 0:
                raise OSError(f"pip download {PYMONGO_SDIST} failed: {r.stderr.strip()[-500:]}")
            (sdist,) = Path(tmp).glob("*.tar.gz")
            staging = Path(tmp) / "corpus"
            staging.mkdir()
            with tarfile.open(sdist) as tar:
                for member in tar.getmembers():
                    if _MEMBER in member.name and member.name.endswith(".json") and member.isfile():
                        data = tar.extractfile(member).read()
                        (staging / member.name.rsplit("/", 1)[1]).write_bytes(data)
            if not (staging / "top.json").is_file():
                raise OSError(f"{sdist.name} has no test/bson_corpus/top.json")
            staging.rename(target)


@functools.cache
def corpus_dir() -> Path | None:
    global why_missing
    path = os.environ.get(CORPUS_ENV)
    if path:
        if not Path(path, "top.json").is_file():
            why_missing = f"{CORPUS_ENV}={path} has no top.json"
            return None
        return Path(path)
    target = _cache() / f"bson-corpus-{PYMONGO_SDIST.replace('==', '-')}"
    if not (target / "top.json").is_file():
        try:
            _fetch(target)
        except (OSError, subprocess.SubprocessError, ValueError, tarfile.TarError) as exc:
            why_missing = (f"the BSON corpus could not be fetched from PyPI ({exc}); offline? "
                           f"set {CORPUS_ENV} to a copy (README.md)")
            return None
    return target


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

"""The store tests' fixtures: a fresh store on disk."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway.cluster.store import Store


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "wicket.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    with Store.open(db_path) as s:
        yield s


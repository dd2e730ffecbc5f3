"""protocols.mysql's curated API: every name it exports exists."""

from __future__ import annotations

import protocols.mysql as mysql


def test_every_exported_name_resolves() -> None:
    assert len(set(mysql.__all__)) == len(mysql.__all__)
    for name in mysql.__all__:
        assert getattr(mysql, name) is not None

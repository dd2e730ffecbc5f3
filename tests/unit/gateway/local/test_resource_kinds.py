"""gateway/local/resource_kinds.py: the kinds the cluster last listed."""

import stat

from gateway.local import resource_kinds


def test_a_listing_is_remembered_and_merged(tmp_path):
    home = tmp_path / "home"
    assert resource_kinds.recall(home, "pg") is None  # no profile dir yet: nothing known
    resource_kinds.remember(home, [{"name": "pg", "kind": "postgres"}, {"name": "maria", "kind": "mysql"}])
    assert resource_kinds.recall(home, "pg") == "postgres"
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    # A later listing adds and changes; a resource gone from it keeps its last kind.
    resource_kinds.remember(home, [{"name": "maria", "kind": "postgres"}, {"name": 3, "kind": "x"}, {}])
    assert resource_kinds.load(home) == {"pg": "postgres", "maria": "postgres"}


def test_a_damaged_file_is_nothing_known(tmp_path):
    (tmp_path / resource_kinds.FILE).write_text("[1, 2")
    assert resource_kinds.load(tmp_path) == {}
    (tmp_path / resource_kinds.FILE).write_text('["pg"]')
    assert resource_kinds.load(tmp_path) == {}
    (tmp_path / resource_kinds.FILE).write_text('{"pg": "postgres", "n": 1}')
    assert resource_kinds.load(tmp_path) == {"pg": "postgres"}

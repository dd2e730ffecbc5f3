"""protocols.mysql.statements: the databases a USE statement switches to."""

from __future__ import annotations

import pytest

from protocols.mysql.statements import MAX_TEXT, use_targets


@pytest.mark.parametrize("text, schemas", [
    ("use app", ["app"]), ("USE `se``c`;", ["se`c"]), ("/* hint */ use secret", ["secret"]),
    ("select 1; use other", ["other"]), ("-- note\nuse x", ["x"]),
    ("select user()", []), ("select 'use'", []), ("update t set user = 1", []),
    # Executable comments: the server runs what they hold.
    ("/*!USE secret*/", ["secret"]), ("/*!40101 use secret */", ["secret"]),
    ("select 1 /*M!100000 ; use secret */", ["secret"]), ("/* not !use x */ select 1", []),
])
def test_use_statements_are_found(text, schemas):
    assert use_targets(text) == schemas


def test_only_the_start_of_a_long_statement_is_read():
    assert use_targets("select 1;" + " " * MAX_TEXT + "use far") == []

"""protocols.mysql.statements: the databases a USE statement switches to."""

from __future__ import annotations

import pytest

import time

from protocols.mysql.statements import use_targets


@pytest.mark.parametrize("text, schemas", [
    ("use app", ["app"]), ("USE `se``c`;", ["se`c"]), ("/* hint */ use secret", ["secret"]),
    ("select 1; use other", ["other"]), ("-- note\nuse x", ["x"]),
    ("select user()", []), ("select 'use'", []), ("update t set user = 1", []),
    # "--1" is no comment; a ";" inside one is read as a statement's start
    # all the same (text only: too much refused, never too little).
    ("select 1 --1;use secret\n", ["secret"]), ("select 1 -- ;use maybe\n", ["maybe"]),
    # Executable comments: the server runs what they hold.
    ("/*!USE secret*/", ["secret"]), ("/*!40101 use secret */", ["secret"]),
    ("select 1 /*M!100000 ; use secret */", ["secret"]), ("/* not !use x */ select 1", []),
])
def test_use_statements_are_found(text, schemas):
    assert use_targets(text) == schemas


def test_the_whole_of_a_long_statement_is_read():
    assert use_targets("/* " + "x" * (1 << 20) + " */ use far") == ["far"]
    assert use_targets("select 1;" + " " * (1 << 20) + "use far") == ["far"]


@pytest.mark.parametrize("unit", [";/*", ";--", ";#", ";-- use", "; /* use"])
def test_a_hostile_statement_costs_its_length_not_its_square(unit):
    text = unit * 200_000  # comments that never end, a statement start in each
    started = time.process_time()
    use_targets(text + "; use x")
    assert time.process_time() - started < 2.0  # quadratic would take minutes

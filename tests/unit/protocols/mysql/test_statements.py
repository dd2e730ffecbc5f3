"""protocols.mysql.statements: the databases a USE statement switches to."""

from __future__ import annotations

import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocols.mysql.statements import UseSearch, use_targets


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
    # Comments between USE and the name: the server reads past them.
    ("use/**/secret", ["secret"]), ("use /* x */ secret", ["secret"]), ("use -- x\n secret", ["secret"]),
    ("use#x\nsecret", ["secret"]), ("use/*a*//*b*/`se``c`", ["se`c"]), ("use`secret`", ["secret"]),
    ('use "secret"', ["secret"]),  # a name under ANSI_QUOTES (else the server fails it)
    ("use secret#x\n", ["secret"]), ("use secret/**/;", ["secret"]), ("use --1", []),
    # An executable comment before the name: run or skipped by the
    # server's version, so both readings.
    ("use /*!secret*/", ["secret"]), ("use /*!99999 a*/ b", ["a", "b"]), ("use /*M!100000 a */ b", ["a", "b"]),
    ("/*!USE*/ secret", ["secret"]), ("/*!50000 use */`secret`", ["secret"]),  # the comment's end: read on
    # Not a USE: a longer word, or no name.
    ("user secret", []), ("useful; users", []), ("use; use", []), ("use /* never ends secret", []),
])
def test_use_statements_are_found(text, schemas):
    assert use_targets(text) == schemas


def test_the_whole_of_a_long_statement_is_read():
    assert use_targets("/* " + "x" * (1 << 20) + " */ use far") == ["far"]
    assert use_targets("select 1;" + " " * (1 << 20) + "use far") == ["far"]


@pytest.mark.parametrize("unit", [";/*", ";--", ";#", ";-- use", "; /* use", ";use /*", ";use/**/", ";use `",
                                  ";use /*!1 ", "use use "])
def test_a_hostile_statement_costs_its_length_not_its_square(unit):
    text = unit * 200_000  # comments that never end, a statement start in each
    started = time.process_time()
    use_targets(text + "; use x")
    assert time.process_time() - started < 2.0  # quadratic would take minutes


# --- generated: any whitespace and comments between the tokens -------------------------

_GAPS = st.lists(st.sampled_from([" ", "\t", "\n", "/**/", "/* x */", "/* use app */", "-- c\n", "--\t\n",
                                  "#c\n", "#\n", "/*** ; **/"]), max_size=4).map("".join)
_NAMES = st.one_of(st.from_regex(r"[A-Za-z_$][0-9A-Za-z_$]{0,20}", fullmatch=True),
                   st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12))


def _quoted(name: str, quote: str) -> str:
    return quote + name.replace(quote, quote * 2) + quote


@settings(max_examples=400, deadline=None)
@given(before=_GAPS, between=_GAPS, after=_GAPS, name=_NAMES, data=st.data())
def test_a_use_is_found_whatever_whitespace_and_comments_surround_its_tokens(before, between, after, name,
                                                                              data):
    quote = data.draw(st.sampled_from(["`", '"', ""]) if name.isidentifier() and name.isascii()
                      else st.sampled_from(["`", '"']))
    use = data.draw(st.sampled_from(["use", "USE", "Use"]))
    written = _quoted(name, quote) if quote else name
    if not between and not quote:
        between = " "  # "usex" is one word
    text = f"{before}{use}{between}{written}{after}"
    prefix = data.draw(st.sampled_from(["", "select 1;", "/*!", "/*!50000 "]))
    if prefix.startswith("/*!"):
        text = f"{prefix}{text} */"
    assert use_targets(text) == [name]
    # The same, anywhere in a text that comes in pieces (Latin-1, as off
    # the wire), cut at random places.
    raw = ("select 'x'; " + text + "; select 2").encode().decode("latin-1")
    cuts = sorted(data.draw(st.sets(st.integers(0, len(raw)), max_size=4)))
    search, found = UseSearch(), []
    for start, end in zip([0, *cuts], [*cuts, len(raw)]):
        found += search.feed(raw[start:end], last=end == len(raw))
    assert name.encode() in [f.encode("latin-1") for f in found]


@pytest.mark.parametrize("text, names", [
    ("select 1; us|e /* |" + "x" * 2000 + "| */ sec|ret;", ["secret"]),
    ("use /*!99999 |" + " " * 2000 + "|a*/ b", ["a", "b"]),
    ("use `a`|`b`", ["a`b"]),  # a doubled backquote cut: the name goes on
    ("use sec|ret", ["secret"]),
    ("use -|- x\n secret", ["secret"]),
    ("use #|" + "c" * 2000 + "|\n secret", ["secret"]),
    ("select 'use /*' ; use|  secret -- */", ["secret"]),  # a "use" in a string: the next is read all the same
    ("use a; select 1; use b|; use c", ["a", "b", "c"]),
])
def test_a_use_cut_between_pieces_is_read_whole(text, names):
    search = UseSearch()
    pieces = text.split("|")
    found = []
    for i, piece in enumerate(pieces):
        found += search.feed(piece, last=i == len(pieces) - 1)
    assert found == names


@pytest.mark.parametrize("unit", ["use /*", "use --", "use #", "use `", "use /*!1 ", "use ", "use/**/"])
def test_a_hostile_text_in_pieces_costs_its_length_not_its_square(unit):
    search = UseSearch(max_uses=1 << 30)  # (its own bound set aside: below)
    started = time.process_time()
    for _ in range(4):  # each piece a text of "use"s whose reading the piece's end may cut
        search.feed(unit * 100_000)
    assert time.process_time() - started < 10.0  # quadratic would take hours


def test_a_piece_with_too_many_uses_is_refused_as_too_costly():
    assert UseSearch(max_uses=3).feed("use a; use b; use c", last=True) == ["a", "b", "c"]
    with pytest.raises(ValueError, match="more than 3 'use' words"):
        UseSearch(max_uses=3).feed("use /*" * 4)

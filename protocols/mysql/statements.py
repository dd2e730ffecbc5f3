"""What the gateway and the cluster read in a statement's text: the
databases a ``USE`` switches to (drivers send it as a COM_QUERY where the
mysql CLI sends COM_INIT_DB). Text only, no SQL parser: a ``USE`` at the
start, after comments, after another statement of a multi-statement
query, or inside an executable comment; a quoted name with its doubled
backquotes undone."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["use_targets"]

# A statement starts at the text's start, after a ";", or inside an
# executable comment (``/*! ...*/``, ``/*M!100000 ...*/``: the server runs
# what it holds), then comes whitespace and plain comments.
_START: Final = re.compile(r";|/\*M?!\d*")
_EXECUTABLE: Final = re.compile(r"/\*M?!")
_SPACE: Final = re.compile(r"\s+")
#: A comment to the line's end: ``#``, or ``--`` and a space or control
#: character (``--1`` is minus minus one, not a comment).
_LINE: Final = re.compile(r"#|--[\s\x00-\x1f]")
_USE: Final = re.compile(r"use\s+(?:`((?:[^`]|``)+)`|([^\s;`*/]+))", re.IGNORECASE)


def use_targets(text: str) -> list[str]:
    """The databases ``text`` switches to with USE, in order. The whole
    text is read, in one pass (every character is looked at a bounded
    number of times, whatever the text: a statement of many megabytes
    costs its length, never its square)."""
    if "use" not in text.lower():
        return []
    found: list[str] = []
    # Where the last comment end and line end are: an unterminated comment
    # is known at once, not by a search to the end from every statement.
    last_close, last_newline = text.rfind("*/"), text.rfind("\n")
    pos = 0
    while True:
        pos = _gap(text, pos, last_close, last_newline)
        use = _USE.match(text, pos)
        if use is not None:
            quoted, bare = use.groups()
            found.append(quoted.replace("``", "`") if quoted else bare)
            pos = use.end()
        start = _START.search(text, pos)
        if start is None:
            return found
        pos = start.end()


def _gap(text: str, pos: int, last_close: int, last_newline: int) -> int:
    """Past the whitespace and plain comments at ``pos``. One that does not
    end is not skipped (read as text, as the server would fail it)."""
    while True:
        space = _SPACE.match(text, pos)
        if space is not None:
            pos = space.end()
        if text.startswith("/*", pos) and _EXECUTABLE.match(text, pos) is None:
            if last_close < pos + 2:
                return pos
            pos = text.index("*/", pos + 2) + 2
        elif _LINE.match(text, pos) is not None:
            if last_newline < pos:
                return pos
            pos = text.index("\n", pos) + 1
        else:
            return pos

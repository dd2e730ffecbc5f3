"""What the gateway and the cluster read in a statement's text: the
databases a ``USE`` switches to (drivers send it as a COM_QUERY where the
mysql CLI sends COM_INIT_DB). Text only, no SQL parser: a ``USE`` at the
start, after comments, after another statement of a multi-statement
query, or inside an executable comment; its name after any whitespace and
comments (``use/**/x``, ``use -- x\\n y``, ``use#x\\ny``, ``use`x```: the
server reads them all); a quoted name with its doubled quotes undone.

The server's lexer (sql/sql_lex.cc) ends a keyword at any character that
cannot be in an unquoted identifier, and a comment is a token separator
like whitespace. Where a reading is in doubt (an executable comment
between USE and the name: run or skipped by version), both readings'
names are returned: too much refused, never too little."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["use_targets", "UseSearch"]

# A statement starts at the text's start, after a ";", or inside an
# executable comment (``/*! ...*/``, ``/*M!100000 ...*/``: the server runs
# what it holds), then comes whitespace and plain comments.
_START: Final = re.compile(r";|/\*M?!\d*")
_EXECUTABLE: Final = re.compile(r"/\*M?!\d*")
_SPACE: Final = re.compile(r"\s+")
#: A comment to the line's end: ``#``, or ``--`` and a space or control
#: character (``--1`` is minus minus one, not a comment).
_LINE: Final = re.compile(r"#|--[\s\x00-\x1f]")
#: What an unquoted identifier is made of (MySQL's "Schema Object Names":
#: ASCII letters, digits, ``$``, ``_``, and U+0080 on; text read from bytes
#: as Latin-1 has each byte of a UTF-8 character in ``\x80-\xff``).
_IDENT: Final = "0-9A-Za-z$_\x80-\U0010ffff"
_USE: Final = re.compile(rf"use(?![{_IDENT}])", re.IGNORECASE)
_USE_ANYWHERE: Final = re.compile(rf"(?<![{_IDENT}])use(?![{_IDENT}])", re.IGNORECASE)
#: A database name: backquoted, double-quoted (a name under ANSI_QUOTES;
#: otherwise the server fails the statement), or bare. Names are at most
#: 64 characters (256 bytes of UTF-8): a longer one the server refuses, and
#: the bound keeps an unclosed quote from being read to the end each time.
_NAME: Final = re.compile(rf'`((?:[^`]|``){{1,256}})`|"((?:[^"]|""){{1,256}})"|([{_IDENT}]{{1,256}})')


class _Ends:
    """Where the next comment end and line end are from a position: each
    found one is kept with the stretch before it known to hold none, so
    reading on from inside that stretch (the next ``use`` inside the last
    one's comment) does not search it again."""

    def __init__(self, text: str) -> None:
        self.text = text
        self._found = {"*/": (0, -1), "\n": (0, -1)}  # what: (from, at): none of it in text[from:at]

    def close(self, pos: int) -> int:
        return self._next("*/", pos)

    def newline(self, pos: int) -> int:
        return self._next("\n", pos)

    def _next(self, what: str, pos: int) -> int:
        start, at = self._found[what]
        if start <= pos <= at or (at == len(self.text) and pos >= start):
            return at if at < len(self.text) else -1
        found = self.text.find(what, pos)
        found = len(self.text) if found < 0 else found
        self._found[what] = (min(pos, start), at) if found == at else (pos, found)
        return found if found < len(self.text) else -1


def use_targets(text: str) -> list[str]:
    """The databases ``text`` switches to with USE, in order. The whole
    text is read, in one pass (every character is looked at a bounded
    number of times, whatever the text: a statement of many megabytes
    costs its length, never its square)."""
    if "use" not in text.lower():
        return []
    found: list[str] = []
    ends = _Ends(text)
    pos = 0
    while True:
        pos = _gap(text, pos, ends)
        use = _USE.match(text, pos)
        if use is not None:
            names, pos, _ = _names(text, use.end(), ends)
            found.extend(names)
        start = _START.search(text, pos)
        if start is None:
            return found
        pos = start.end()


def _gap(text: str, pos: int, ends: _Ends) -> int:
    """Past the whitespace and plain comments at ``pos``. One that does not
    end is not skipped (read as text, as the server would fail it)."""
    while True:
        space = _SPACE.match(text, pos)
        if space is not None:
            pos = space.end()
        if text.startswith("/*", pos) and _EXECUTABLE.match(text, pos) is None:
            close = ends.close(pos + 2)
            if close < 0:
                return pos
            pos = close + 2
        elif _LINE.match(text, pos) is not None:
            newline = ends.newline(pos)
            if newline < 0:
                return pos
            pos = newline + 1
        else:
            return pos


def _names(text: str, pos: int, ends: _Ends) -> tuple[list[str], int, int]:
    """The name a USE that ends at ``pos`` switches to, past whitespace and
    comments; where reading stopped, and where the last gap ended (the
    name's start, or what stopped the reading). Before the name, an
    executable comment is read both ways (``use /*!99999 a*/ b``: ``a``
    where the server's version runs it, ``b`` where it skips it)."""
    names: list[str] = []
    while True:
        pos = _name_gap(text, pos, ends)
        name = _NAME.match(text, pos)
        if name is not None:
            names.append(_unquote(name))
            return names, name.end(), pos
        executable = _EXECUTABLE.match(text, pos)
        if executable is None:
            return names, pos, pos
        inside = _NAME.match(text, _name_gap(text, executable.end(), ends))
        if inside is not None:
            names.append(_unquote(inside))
        close = ends.close(executable.end())
        if close < 0:
            return names, pos, pos
        pos = close + 2


def _name_gap(text: str, pos: int, ends: _Ends) -> int:
    """Past the whitespace and plain comments before a USE's name, and the
    end of an executable comment (``/*!USE*/ secret``: the server reads on
    past it; where no such comment is open, the statement fails anyway)."""
    while True:
        pos = _gap(text, pos, ends)
        if not text.startswith("*/", pos):
            return pos
        pos += 2


def _unquote(name: re.Match) -> str:
    backquoted, quoted, bare = name.groups()
    if backquoted is not None:
        return backquoted.replace("``", "`")
    if quoted is not None:
        return quoted.replace('""', '"')
    return bare


#: How much of a text's end :class:`UseSearch` keeps for the next piece at
#: most (a name, a comment's opening, the start of a ``use``).
_CARRY: Final = 600


class UseSearch:
    """A ``USE`` anywhere in a text that comes in pieces (a command too long
    to hold), not only at a statement's start: a superset of the
    statements' USEs, its name read by the same rule as
    :func:`use_targets` (whitespace and comments between, across pieces).
    Feed it text read as Latin-1 (one character a byte, as it comes off
    the wire: a UTF-8 character cut between pieces is joined again)."""

    def __init__(self, max_uses: int = 65536) -> None:
        self._carry = ""
        #: The most ``use`` words a piece may hold (each is read, a few
        #: microseconds apiece): past that, :meth:`feed` raises ValueError,
        #: as a text too costly to check.
        self.max_uses = max_uses

    def feed(self, piece: str, *, last: bool = False) -> list[str]:
        """The names of the USEs in ``piece`` (and what was carried of the
        last one) that the piece's end does not cut: a cut one is carried
        and read with the next piece, or, when this is the ``last``, read
        as far as it goes."""
        text = self._carry + piece
        ends = _Ends(text)
        found: list[str] = []
        cut: list[tuple[list[str], int, int]] = []
        pos = count = 0
        while (use := _USE_ANYWHERE.search(text, pos)) is not None:
            count += 1
            if count > self.max_uses:
                raise ValueError(f"more than {self.max_uses} 'use' words in {len(piece)} bytes")
            names, stop, at = _names(text, use.end(), ends)
            if not last and _cut(text, stop, ends):
                cut.append((names, use.start(), at))
            else:
                found.extend(names)
            pos = use.end()
        if not cut:
            self._carry = text[-3:]  # a "use" cut, and the character before it
        elif len(text) - cut[0][1] <= _CARRY:
            self._carry = text[cut[0][1]:]  # every cut one, read again whole
        else:  # too long to carry whole: the first and last, their gaps shrunk
            kept = {0, len(cut) - 1}
            self._carry = " ".join("use " + _shrunk(text, cut[i][2], ends) for i in sorted(kept))
            for i, (names, _, _) in enumerate(cut):
                if i not in kept:
                    found.extend(names)  # read as far as they go
        return found


def _cut(text: str, stop: int, ends: _Ends) -> bool:
    """Whether what follows a USE's reading at ``stop`` may change once more
    text comes: too near the end (a name cut, a ``--`` or ``/`` that may be
    a comment, a doubled quote cut), a comment or quote still open."""
    if len(text) - stop <= 2 and text[stop:] in ("", "/", "-", "--"):
        return True
    if text.startswith("/*", stop):
        return ends.close(stop + 2) < 0
    if _LINE.match(text, stop) is not None:
        return ends.newline(stop) < 0
    # A quote that is no name yet (``````, a doubled one cut): more text
    # may make one, as long as a name fits in what is left.
    return text[stop] in "`\"" and len(text) - stop <= 2 * 256 + 2


def _shrunk(text: str, at: int, ends: _Ends, inside: bool = False) -> str:
    """What matters of ``text[at:]``, a cut USE's unfinished part: an open
    comment's opening (an executable one's too, and what it holds so far,
    shrunk), a name or quote as far as a name goes."""
    executable = None if inside else _EXECUTABLE.match(text, at)
    if executable is not None:
        return executable.group() + " " + _shrunk(text, _gap(text, executable.end(), ends), ends, True)
    rest = text[at:]
    if rest.startswith("/*"):
        return "/*" + ("*" if len(rest) > 2 and rest.endswith("*") else "")
    if _LINE.match(rest) is not None:
        return "#"
    return rest[:_CARRY]

"""Text from peers, made safe to match and to write down.

A name that reaches a log line, the audit or a glob may come from the
network (a db user, a resource name in a dial, a user name at login). Two
kinds of character in it can deceive whoever reads the result:

* control characters (Unicode category Cc: C0, DEL, C1): a newline forges
  a log line, an escape sequence drives the reader's terminal;
* bidirectional controls (the embeddings, overrides and isolates, the
  marks, and the line and paragraph separators): they reorder what a
  reader sees ("Trojan Source", CVE-2021-42574).

Names with either are refused where they come in (:func:`is_clean`), globs
never match them, and logs and the audit's JSON lines write them escaped
(:func:`escape`, :func:`escape_json`), so one record stays one line and
reads as what it holds.
"""

from __future__ import annotations

import re

__all__ = ["escape", "escape_json", "first_unsafe", "is_clean"]

_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def is_clean(text: str) -> bool:
    """No control or bidirectional-control character in ``text``."""
    if text.isascii():
        # Every audit line and most names: in ASCII the unprintable
        # characters are exactly the C0 controls and DEL, and this test
        # costs a few instructions a character where the pattern costs
        # dozens.
        return text.isprintable()
    return _UNSAFE.search(text) is None


def first_unsafe(text: str) -> str | None:
    """The first such character, as ``U+XXXX`` (for an error message)."""
    found = _UNSAFE.search(text)
    return None if found is None else f"U+{ord(found.group()):04X}"


def _escaped(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` with each such character written ``\\xNN`` or ``\\uNNNN``."""
    return text if is_clean(text) else _UNSAFE.sub(_escaped, text)


def _json_escaped(match: re.Match) -> str:
    return f"\\u{ord(match.group()):04x}"


def escape_json(text: str) -> str:
    """JSON text with each such character written as a ``\\uNNNN`` escape:
    the same JSON value (they can only stand inside strings), safe to show."""
    return text if is_clean(text) else _UNSAFE.sub(_json_escaped, text)

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
_USE: Final = re.compile(
    r"(?:^|;|/\*M?!\d*)(?:\s|/\*(?!M?!).*?\*/|--[^\n]*\n|#[^\n]*\n)*use\s+(?:`((?:[^`]|``)+)`|([^\s;`*/]+))",
    re.IGNORECASE | re.DOTALL)
#: Only this much of a statement is looked at.
MAX_TEXT: Final = 4096


def use_targets(text: str) -> list[str]:
    """The databases ``text`` switches to with USE, in order."""
    text = text[:MAX_TEXT]
    if "use" not in text.lower():
        return []
    return [quoted.replace("``", "`") if quoted else bare for quoted, bare in _USE.findall(text)]

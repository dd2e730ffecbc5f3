"""What the gateway and the cluster read in a statement's text: the
databases a ``USE`` switches to (drivers send it as a COM_QUERY where the
mysql CLI sends COM_INIT_DB). Text only, no SQL parser: a ``USE`` at the
start, after comments, or after another statement of a multi-statement
query; a quoted name with its doubled backquotes undone."""

from __future__ import annotations

import re
from typing import Final

__all__ = ["use_targets"]

_USE: Final = re.compile(
    r"(?:^|;)(?:\s|/\*.*?\*/|--[^\n]*\n|#[^\n]*\n)*use\s+(?:`((?:[^`]|``)+)`|([^\s;`]+))",
    re.IGNORECASE | re.DOTALL)
#: Only this much of a statement is looked at.
MAX_TEXT: Final = 4096


def use_targets(text: str) -> list[str]:
    """The databases ``text`` switches to with USE, in order."""
    text = text[:MAX_TEXT]
    if "use" not in text.lower():
        return []
    return [quoted.replace("``", "`") if quoted else bare for quoted, bare in _USE.findall(text)]
